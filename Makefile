# xdplb: every target installs what it needs first (scripts/setup.sh is
# idempotent: a second run installs nothing). Run as root.
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST := $(PY) -m pytest

.PHONY: setup test lint bench demo demo-down bgp-lab bgp-lab-down fleet-lab fleet-lab-down clean proto etcd-proto lock wheel fuzz

setup:
	@bash scripts/setup.sh

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
# The modules run on two workers, a module to a worker (its labs are shared by
# its tests); most of the time goes to waiting on namespaces, checks and timers.
test: setup
	@$(PYTEST) -q -n 2 --dist loadfile; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$rc

lint: setup
	@$(VENV)/bin/ruff check .

# Every benchmark runs even when one before it fails; the failures are listed
# at the end (and make exits 1).
BENCHES := bench_datapath bench_maglev bench_reconcile bench_health bench_linerate \
	bench_memlatency sim_capacity
bench: setup
	@failed=""; for b in $(BENCHES); do \
		echo "== $$b"; \
		$(PY) benchmarks/$$b.py --json bench-results/$${b#*_}.json || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "make bench: failed:$$failed" >&2; exit 1; fi; \
	echo "make bench: all $(words $(BENCHES)) benchmarks ran"

# The long fuzz campaign (about an hour): the API property campaign against a
# real lbd and the packet fuzzer; make test runs both on a small budget.
fuzz: setup
	@bash scripts/fuzz.sh

# Regenerates the API modules from daemon/xdplb/v1/lb.proto (they are committed;
# tests/test_api_proto.py checks they match the proto).
# Regenerates xdplb.etcdv3 (etcd's gRPC API) from Debian's etcd protos (committed;
# tests/test_etcd_proto.py checks they match).
etcd-proto: setup
	@$(PY) scripts/etcd_proto.py daemon

proto: setup
	@$(PY) -m grpc_tools.protoc -I daemon --python_out=daemon --pyi_out=daemon \
		--grpc_python_out=daemon daemon/xdplb/v1/lb.proto

# Pins every dependency, with hashes: requirements.lock (runtime + dev: what
# setup.sh, CI, the demo and Vagrant install) and requirements-runtime.lock (an
# LB host), the second constrained by the first so the two never disagree.
# `make lock` keeps the pins there are and adds what pyproject.toml gained;
# `make lock UPGRADE=1` re-resolves everything to the newest releases allowed.
# Debian 12 (Python 3.11, glibc 2.36) on x86_64 is the platform of record.
LOCK_FLAGS := --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_36 --custom-compile-command "make lock"
lock: setup
	@$(VENV)/bin/uv pip compile $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade) --extra dev \
		pyproject.toml -o requirements.lock
	@$(VENV)/bin/uv pip compile $(LOCK_FLAGS) --constraint requirements.lock pyproject.toml \
		-o requirements-runtime.lock

# The package for an LB host or a backend host: dist/xdplb-VERSION-*.whl, with the
# Maglev fill compiled (the host needs no compiler). See the README's install steps.
wheel: setup
	@$(VENV)/bin/pip wheel --quiet --no-deps --no-build-isolation -w dist .

demo: setup
	@$(PY) -m xdplb_lab.demo up

demo-down: setup
	@$(PY) -m xdplb_lab.demo down

# Two LB hosts behind a router, each with its own BIRD and lbd; the router's
# BIRD merges their announcements into ECMP routes (see lab/xdplb_lab/bgp.py).
bgp-lab: setup
	@$(PY) -m xdplb_lab.bgp up

bgp-lab-down: setup
	@$(PY) -m xdplb_lab.bgp down

# The fleet lab: a 3-member etcd cluster and two LB hosts sharing one desired state.
fleet-lab: setup
	@$(PY) -m xdplb_lab.fleet up

fleet-lab-down: setup
	@$(PY) -m xdplb_lab.fleet down

clean: demo-down bgp-lab-down fleet-lab-down
	rm -rf $(VENV) bench-results dist build
