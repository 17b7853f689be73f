#!/usr/bin/env bash
# proxy-bench.sh - PureProxy's throughput against direct delivery, measured in the same run.
#
#   bench/proxy-bench.sh [MESSAGES [SESSIONS [SIZE]]]     (defaults 5000 20 1024)
#
# Postfix's smtp-source sends MESSAGES messages of SIZE bytes over SESSIONS parallel sessions
# (reusing each session, -d), first straight to Postfix's smtp-sink, then through
# `smtpd -c PureProxy` in front of the same smtp-sink. It prints messages per second for both
# and their ratio. Loopback only; each run is bounded by `timeout`. Needs postfix (smtp-sink,
# smtp-source) and a built ./smtpd.
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-5000} sessions=${2:-20} size=${3:-1024}
name=proxy-bench
source bench/common.sh

sink_port=$(free_port)
"$sink" "${user_flag[@]}" -m 1000 "127.0.0.1:$sink_port" 1024 & pids+=($!)
start_smtpd -c PureProxy 127.0.0.1:0 "127.0.0.1:$sink_port"
sleep 0.2

direct=$(rate "$sink_port")
proxied=$(rate "$smtpd_port")
echo "messages: $messages x $size bytes over $sessions sessions"
echo "direct to smtp-sink:        $direct msgs/s"
echo "through smtpd -c PureProxy: $proxied msgs/s"
python3 -c "print(f'ratio proxy/direct: {$proxied / $direct:.2f}')"
