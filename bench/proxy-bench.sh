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
sink=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
source_bin=$(command -v smtp-source || echo /usr/sbin/smtp-source)
[ -x "$sink" ] && [ -x "$source_bin" ] || { echo "proxy-bench: needs smtp-sink and smtp-source (Debian package postfix)" >&2; exit 2; }
[ -x ./smtpd ] || { echo "proxy-bench: build ./smtpd first (make)" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
user_flag=(); [ "$(id -u)" = 0 ] && user_flag=(-u nobody)  # smtp-sink refuses to run as root

sink_port=$(free_port)
"$sink" "${user_flag[@]}" -m 1000 "127.0.0.1:$sink_port" 1024 & pids+=($!)
./smtpd -n -c PureProxy 127.0.0.1:0 "127.0.0.1:$sink_port" 2>"$work/proxy.err" & pids+=($!)
for _ in $(seq 50); do grep -q '^listening on' "$work/proxy.err" 2>/dev/null && break; sleep 0.1; done
proxy_port=$(sed -n 's/^listening on .*://p' "$work/proxy.err")
sleep 0.2

# rate PORT - messages per second smtp-source achieves against PORT
rate() {
  local start end
  start=$(date +%s.%N)
  timeout 120 "$source_bin" -d -s "$sessions" -m "$messages" -l "$size" \
      -f sender@bench.example -t rcpt@bench.example "127.0.0.1:$1" >/dev/null
  end=$(date +%s.%N)
  python3 -c "print(f'{$messages / ($end - $start):.0f}')"
}

direct=$(rate "$sink_port")
proxied=$(rate "$proxy_port")
echo "messages: $messages x $size bytes over $sessions sessions"
echo "direct to smtp-sink:        $direct msgs/s"
echo "through smtpd -c PureProxy: $proxied msgs/s"
python3 -c "print(f'ratio proxy/direct: {$proxied / $direct:.2f}')"
