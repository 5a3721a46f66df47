#!/usr/bin/env bash
# A CPU flamegraph of Petrel on the plain HTTP/1.1 hop under closed-loop load: perf samples the
# proxy (pinned to CPU 0) while wrk (CPU 1) drives 16 connections through it to nginx.
#
#   bench/profile/flamegraph.sh [petrel binary] [output.svg] [bootstrap]
#
# The bootstrap defaults to bench.yaml beside this script (the plain hop); it must listen on
# 127.0.0.1:18000 in front of 127.0.0.1:18080 (observed.py makes the observability variant).
#
# Needs perf, nginx, wrk (../shared/bench/setup.sh) and inferno (`cargo install inferno`).
# The release build keeps symbols (`debug = "line-tables-only"` is not needed: frame pointers
# are not either, perf unwinds with DWARF).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin="${1:-$here/../../target/release/petrel}"
out="${2:-$here/flamegraph-http1-hop.svg}"
config="${3:-$here/bench.yaml}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; nginx -c "$work/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/nginx.pid;
error_log $work/nginx.err;
events { worker_connections 1024; }
http { access_log off; server { listen 127.0.0.1:18080; location / { return 200 "hello"; } } }
NGINX
taskset -c 1 nginx -c "$work/nginx.conf" &
taskset -c 0 "$bin" -c "$config" --concurrency 1 --disable-hot-restart -l error &
proxy=$!
for _ in $(seq 50); do curl -sf 127.0.0.1:18000/ >/dev/null && break; sleep 0.1; done
taskset -c 1 wrk -t1 -c16 -d14s http://127.0.0.1:18000/ >"$work/wrk.txt" &
sleep 2
perf record -F 999 -g --call-graph dwarf,16384 -p "$proxy" -o "$work/perf.data" -- sleep 10 2>/dev/null
wait %3 2>/dev/null || true
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf | tee "$work/folded.txt" | inferno-flamegraph --minwidth 0.25 --title "Petrel, HTTP/1.1 hop, wrk -c16" >"$out"
grep Requests/sec "$work/wrk.txt" || true
# The heaviest leaf frames, for the notes.
awk '{n=$NF; $NF=""; k=split($0,f,";"); leaf[f[k]]+=n; t+=n} END {for (l in leaf) printf "%5.1f%% %s\n", 100*leaf[l]/t, l}' "$work/folded.txt" | sort -rn | head -15
echo "wrote $out"
