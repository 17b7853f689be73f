# common.sh - what the benchmark scripts share; sourced by them, with `name`, `messages`,
# `sessions` and `size` set first. Loopback only; every load is bounded by `timeout`.
sink=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
source_bin=$(command -v smtp-source || echo /usr/sbin/smtp-source)
[ -x "$sink" ] && [ -x "$source_bin" ] ||
  { echo "$name: needs smtp-sink and smtp-source (Debian package postfix)" >&2; exit 2; }
[ -x ./smtpd ] || { echo "$name: build ./smtpd first (make)" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
user_flag=(); [ "$(id -u)" = 0 ] && user_flag=(-u nobody)  # smtp-sink refuses to run as root

# start_smtpd ARGS... - ./smtpd on 127.0.0.1:0 in the background; sets smtpd_pid, smtpd_port
start_smtpd() {
  ./smtpd -n "$@" 2>"$work/smtpd.err" & smtpd_pid=$!; pids+=($smtpd_pid)
  for _ in $(seq 50); do grep -q '^listening on' "$work/smtpd.err" 2>/dev/null && break; sleep 0.1; done
  smtpd_port=$(sed -n 's/^listening on .*://p' "$work/smtpd.err")
}

# rate PORT - messages per second smtp-source achieves against PORT
rate() {
  local start end
  start=$(date +%s.%N)
  timeout 120 "$source_bin" -d -s "$sessions" -m "$messages" -l "$size" \
      -f sender@bench.example -t rcpt@bench.example "127.0.0.1:$1" >/dev/null
  end=$(date +%s.%N)
  python3 -c "print(f'{$messages / ($end - $start):.0f}')"
}
