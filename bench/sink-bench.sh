#!/usr/bin/env bash
# sink-bench.sh - smtpd as a sink against Postfix's smtp-sink, measured in the same run.
#
#   bench/sink-bench.sh [MESSAGES [SESSIONS [SIZE [IDLE]]]]     (defaults 20000 20 1024 2000)
#
# Throughput: Postfix's smtp-source sends MESSAGES messages of SIZE bytes over SESSIONS
# parallel sessions (reusing each session, -d) to smtp-sink, then to `smtpd -c SMTPServer`;
# both rates and their ratio are printed. Memory: IDLE clients connect to each server and
# wait after the greeting; the growth of the server's resident memory per client is printed.
# Loopback only; every step is bounded by `timeout`. Needs postfix (smtp-sink, smtp-source),
# python3 and a built ./smtpd.
set -euo pipefail
cd "$(dirname "$0")/.."
messages=${1:-20000} sessions=${2:-20} size=${3:-1024} idle=${4:-2000}
name=sink-bench
source bench/common.sh

sink_port=$(free_port)
"$sink" "${user_flag[@]}" -m 5000 "127.0.0.1:$sink_port" 4096 & sink_pid=$!; pids+=($sink_pid)
start_smtpd -c SMTPServer 127.0.0.1:0
sleep 0.2

# per_client PORT PID - kB of resident memory the server gains per idle client
per_client() {
  timeout 120 python3 - "$1" "$2" "$idle" <<'PY'
import resource, socket, sys, time
port, pid, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, max(count + 100, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
def rss():
    with open(f"/proc/{pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
before, clients = rss(), []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.recv(200)  # the greeting: the server has set up this client
    clients.append(s)
time.sleep(0.5)
print(f"{(rss() - before) / count:.2f}")
PY
}

direct=$(rate "$sink_port")
ours=$(rate "$smtpd_port")
echo "messages: $messages x $size bytes over $sessions sessions"
echo "smtp-sink:                $direct msgs/s"
echo "smtpd -c SMTPServer:      $ours msgs/s"
python3 -c "print(f'ratio smtpd/smtp-sink:    {$ours / $direct:.2f}')"
echo "idle clients: $idle"
echo "smtp-sink:                $(per_client "$sink_port" "$sink_pid") kB per client"
echo "smtpd -c SMTPServer:      $(per_client "$smtpd_port" "$smtpd_pid") kB per client"
