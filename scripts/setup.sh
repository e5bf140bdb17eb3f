#!/usr/bin/env bash
# Installs everything xdplb needs on a Debian 12 host, idempotently:
# apt packages, kernel-header links for bcc, bpffs, and a venv that can
# import Debian's bcc module. A second run installs nothing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${XDPLB_VENV:-$REPO/.venv}"
APT_PACKAGES=(
  python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv python3-dev gcc
  iproute2 iputils-ping ethtool tcpdump curl openssl util-linux
  prometheus  # promtool checks the metrics; the server scrapes lbd in the tests
  bird2  # BGP: lbd announces VIPs through it; the multi-host lab runs it as the router
  netsniff-ng  # trafgen: the line-rate benchmark's generator where live frames are refused
  systemd  # systemd-analyze verifies and scores lbd's unit in the tests
  etcd-server etcd-client  # the fleet store: tests and the fleet lab run their own members
  golang-etcd-server-dev  # etcd's .proto files: xdplb.etcdv3 is generated from them
)

log() { printf 'setup: %s\n' "$*"; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: must run as root (loads BPF programs, creates namespaces)" >&2
    exit 1
  fi
}

# Debian's etcd-server enables a system etcd.service on install: a stray
# single-member store on every LB host. Masked first, so it never starts; the
# tests and the fleet lab run the members they need themselves.
mask_system_etcd() {
  local unit=/etc/systemd/system/etcd.service
  [ -L "$unit" ] && [ "$(readlink "$unit")" = /dev/null ] && return 0
  mkdir -p /etc/systemd/system
  ln -sf /dev/null "$unit"
}

install_apt_packages() {
  local missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
      || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# bcc compiles against the running kernel's headers. When the running kernel
# has no headers package, point it at the newest installed Debian headers:
# XDP/tc programs only use the stable UAPI, so that is sufficient.
link_kernel_headers() {
  local moddir="/lib/modules/$(uname -r)"
  [ -e "$moddir/build/include" ] && return 0
  local build common
  build=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  if [ -z "$build" ] || [ -z "$common" ]; then
    echo "setup: no kernel headers under /usr/src (linux-headers-amd64 failed?)" >&2
    exit 1
  fi
  log "linking kernel headers: $build"
  mkdir -p "$moddir"
  ln -sfn "$build" "$moddir/build"
  ln -sfn "$common" "$moddir/source"
}

mount_bpffs() {
  mountpoint -q /sys/fs/bpf && return 0
  log "mounting bpffs on /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpf /sys/fs/bpf
}

# Debian's bcc module lives in /usr/bin/python3's dist-packages, so the venv
# must be built from that interpreter with system site-packages visible.
# Python packages come from requirements.lock, every version and hash pinned
# (`make lock` renews it), so a new machine gets exactly what the suite passed
# with; then xdplb itself, editable, built with the locked setuptools (which
# compiles the Maglev fill), and the lab (lab/: namespace labs, demo, test
# servers, benchmark programs), which is never shipped.
make_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
  fi
  local inputs stamp
  inputs=$(cat "$REPO/pyproject.toml" "$REPO/requirements.lock" "$REPO/daemon/xdplb/_maglev.c" \
    "$REPO/lab/pyproject.toml" | sha256sum | cut -c1-16)
  stamp="$VENV/.installed-$inputs"
  [ -e "$stamp" ] && return 0
  log "installing python dependencies into $VENV (requirements.lock)"
  local pip_log="$VENV/pip-install.log"
  if ! { "$VENV/bin/pip" install --require-hashes --no-deps -r "$REPO/requirements.lock" \
         && "$VENV/bin/pip" install --no-deps --no-build-isolation -e "$REPO" \
         && "$VENV/bin/pip" install --no-deps --no-build-isolation -e "$REPO/lab"; } \
      >"$pip_log" 2>&1; then
    tail -n 30 "$pip_log" >&2
    echo "setup: pip install failed (full log: $pip_log)" >&2
    exit 1
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
}

main() {
  need_root
  mask_system_etcd
  install_apt_packages
  link_kernel_headers
  mount_bpffs
  make_venv
  "$VENV/bin/python" -c 'import bcc' \
    || { echo "setup: the venv cannot import bcc" >&2; exit 1; }
}

main "$@"
