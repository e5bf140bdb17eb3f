#!/usr/bin/env bash
# Runs `make demo` + `make demo-down` N times (default 20) and counts the
# failures: the demo must never flake. Each cycle's output goes to
# $LOG_DIR/cycle-K.log (default bench-results/demo-cycles); the summary is the
# last line. Run as root from the checkout.
set -uo pipefail
cycles="${1:-20}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
log_dir="${LOG_DIR:-$repo/bench-results/demo-cycles}"
mkdir -p "$log_dir"
cd "$repo" || exit 1
failed=0
for k in $(seq 1 "$cycles"); do
  started=$(date +%s)
  if make demo >"$log_dir/cycle-$k.log" 2>&1 && make demo-down >>"$log_dir/cycle-$k.log" 2>&1
  then result=ok
  else result=FAILED; failed=$((failed + 1)); make demo-down >/dev/null 2>&1
  fi
  echo "cycle $k/$cycles: $result in $(( $(date +%s) - started )) s" \
    "($(grep -o 'judged down after [0-9.]* s, out of the ring after [0-9.]* s' \
        "$log_dir/cycle-$k.log" || echo 'no failover line'))"
done
echo "demo cycles: $((cycles - failed)) of $cycles passed, $failed failed (logs: $log_dir)"
[ "$failed" -eq 0 ]
