#!/usr/bin/env bash
# pipelining-bench.sh - the same load against `smtpd -c sink` without and with --pipelining:
# messages per second, client round trips per message, and the server's writes (send calls,
# counted by strace -c when strace is installed) per message.
#
#   bench/pipelining-bench.sh [MESSAGES [SESSIONS [RECIPIENTS]]]   (default 2000 10 5)
#
# The load is bench/pipeline-load.py: Postfix's smtp-source greets with HELO and so never
# pipelines (checked with smtpd -d), which would make both runs the same. Loopback only;
# every run is bounded by timeout.
set -euo pipefail
name=pipelining-bench
messages=${1:-2000}
sessions=${2:-10}
recipients=${3:-5}
size=1000
source "$(dirname "$0")/common.sh"
load=(timeout 150 python3 "$(dirname "$0")/pipeline-load.py")

printf '%-14s %8s %14s %12s\n' "smtpd -c sink" "msgs/s" "round trips/msg" "writes/msg"
for flag in "" --pipelining; do
  start_smtpd -c sink $flag 127.0.0.1:0
  read -r per_second trips < <("${load[@]}" "$smtpd_port" "$messages" "$sessions" "$recipients")
  writes=-
  if command -v strace >/dev/null; then
    timeout 150 strace -f -qq -e trace=sendto,write -c -o "$work/strace" -p "$smtpd_pid" &
    tracer=$!
    sleep 0.5
    "${load[@]}" "$smtpd_port" "$messages" "$sessions" "$recipients" >/dev/null
    kill -INT "$tracer"; wait "$tracer" 2>/dev/null || true
    calls=$(awk '$NF == "sendto" || $NF == "write" { n += $4 } END { print n + 0 }' "$work/strace")
    writes=$(python3 -c "print(f'{$calls / $messages:.2f}')")
  fi
  kill "$smtpd_pid"; wait "$smtpd_pid" 2>/dev/null || true
  printf '%-14s %8s %14s %12s\n' "${flag:-(plain)}" "$per_second" "$trips" "$writes"
done
