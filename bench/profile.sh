#!/usr/bin/env bash
# CPU seconds per process of one `deno task bench` run (Linux): samples /proc/<pid>/stat of
# every process the bench starts until it ends. Deno cannot read other processes' /proc
# entries without --allow-all, so this stays outside the bench.
#   bench/profile.sh --only weft --items 10000 --duration 5
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
deno task bench "$@" >"$out/bench.txt" 2>&1 &
bench=$!
descendants() { local p; for p in $(pgrep -P "$1"); do echo "$p"; descendants "$p"; done; }
while kill -0 "$bench" 2>/dev/null; do
  for p in $(descendants "$bench"); do
    args=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
    name=$(grep -oE "services/[a-z]+\.ts|bare_stage\.ts [^ ]+ [^ ]+ bare[0-9]|bullmq_stage\.ts [0-9]+ [a-z]+|bench/http_load\.ts|^[^ ]*(nats|redis)-server|bench/pipeline\.ts" <<<"$args" | tail -1 || true)
    cpu=$(awk '{print ($14+$15)/100}' "/proc/$p/stat" 2>/dev/null) || continue
    case "$name" in bullmq_stage*) name="bullmq-${name##* }" ;; esac
    [ -n "$name" ] && echo "$cpu ${name##* }" >"$out/cpu.$p"
  done
  sleep 0.5
done
grep -v '^Task' "$out/bench.txt"
echo "--- CPU seconds per process"
cat "$out"/cpu.* | sort -k2
