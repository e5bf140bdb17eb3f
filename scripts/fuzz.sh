#!/usr/bin/env bash
# The long fuzz campaign (`make fuzz`): the API property campaign against a real
# lbd and the packet fuzzer, with budgets far beyond `make test`'s, then their
# figures (requests tried, accepted, refused by code; frames by outcome).
# XDPLB_FUZZ_API_EXAMPLES and XDPLB_FUZZ_EXAMPLES set the budgets (defaults:
# about an hour together on a 2-core VM). Run as root from the checkout.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
report="${XDPLB_FUZZ_REPORT:-$repo/bench-results/fuzz.txt}"
mkdir -p "$(dirname "$report")"
: >"$report"
started=$(date +%s)
XDPLB_FUZZ_REPORT="$report" \
XDPLB_FUZZ_API_EXAMPLES="${XDPLB_FUZZ_API_EXAMPLES:-12000}" \
XDPLB_FUZZ_EXAMPLES="${XDPLB_FUZZ_EXAMPLES:-300000}" \
  .venv/bin/python -m pytest -q -p no:cacheprovider --timeout 0 \
  tests/test_fuzz_api.py tests/test_fuzz_packets.py
rc=$?
echo "fuzz: $(( $(date +%s) - started )) s, pytest exit $rc; figures ($report):"
cat "$report"
exit "$rc"
