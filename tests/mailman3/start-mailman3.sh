#!/usr/bin/env bash
# start-mailman3.sh - start a throwaway GNU Mailman 3 (Debian 12 package) for tests.
# (Used by tests/test_mailman.cpp; also handy by hand to try MailmanProxy.)
#
# Usage (as root):
#   start-mailman3.sh [--dir DIR] [--list NAME@DOMAIN] [--member ADDR]... \
#                     [--no-sink] [--timeout SECONDS] LMTP_PORT SMTP_PORT
#
#   LMTP_PORT  port for Mailman's LMTP runner on 127.0.0.1 (the proxy hands mail to it)
#   SMTP_PORT  port on 127.0.0.1 where Mailman sends its outgoing mail. Unless
#              --no-sink is given, this script starts a small SMTP sink there that
#              stores each message as DIR/sink/NNNNNN.eml and one JSON line per
#              message (mail_from, rcpt_tos, subject) in DIR/sink/index.jsonl.
#   --dir      state directory (default /tmp/mm3-test-LMTP_PORT); must not hold a
#              running instance; it is wiped and recreated.
#   --list     list to create (default test@example.com); may be repeated.
#   --member   address subscribed (no welcome mail) to every created list;
#              default alice@example.org; may be repeated.
#   --timeout  seconds to wait for LMTP to answer 220 (default 180).
#
# The Debian packages mailman3 and python3-aiosmtpd must be installed (make deps does it,
# starting no service). Everything listens on 127.0.0.1 only. Prints
# KEY=VALUE lines (also written to DIR/env) including MASTER_PID, RUNNER_PIDS and
# SINK_PID. Stop with stop-mailman3.sh DIR (or: stop-mailman3.sh --lmtp-port PORT).
# Exit status: 0 ready; 1 usage; 2 not installed; 3 port busy; 4 start/ready failed
# (everything this script started is stopped again in that case).
set -euo pipefail

PY=/usr/bin/python3
DIR=""
LISTS=()
MEMBERS=()
START_SINK=1
TIMEOUT=180

die() { local rc=$1; shift; echo "start-mailman3: $*" >&2; exit "$rc"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --dir) DIR=$2; shift 2 ;;
        --list) LISTS+=("$2"); shift 2 ;;
        --member) MEMBERS+=("$2"); shift 2 ;;
        --no-sink) START_SINK=0; shift ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        --) shift; break ;;
        -*) die 1 "unknown option $1" ;;
        *) break ;;
    esac
done
[ $# -eq 2 ] || die 1 "usage: $0 [options] LMTP_PORT SMTP_PORT (see --help)"
LMTP_PORT=$1; SMTP_PORT=$2
for p in "$LMTP_PORT" "$SMTP_PORT" "$TIMEOUT"; do
    [[ "$p" =~ ^[0-9]+$ ]] || die 1 "not a number: $p"
done
[ "$(id -u)" -eq 0 ] || die 1 "run as root (apt-get, mailman --run-as-root)"
[ ${#LISTS[@]} -gt 0 ] || LISTS=(test@example.com)
[ ${#MEMBERS[@]} -gt 0 ] || MEMBERS=(alice@example.org)
DIR=${DIR:-/tmp/mm3-test-$LMTP_PORT}
case "$DIR" in /*) ;; *) DIR=$PWD/$DIR ;; esac
[ "$DIR" != / ] || die 1 "refusing --dir /"

T0=$(date +%s.%N)
elapsed() { $PY -c "import sys;print('%.1f' % (float(sys.argv[2]) - float(sys.argv[1])))" "$1" "$(date +%s.%N)"; }

# ---------------------------------------------------------------- installed?
# Installing is tests/ensure-tools.sh's job (make deps), so a missing Mailman fails loudly here.
if ! { [ -x /usr/lib/mailman3/bin/master ] && [ -x /usr/bin/mailman ] &&
       $PY -c 'import mailman, aiosmtpd' 2>/dev/null; }; then
    die 2 "mailman3 is not installed: run make deps as root (Debian packages mailman3, python3-aiosmtpd)"
fi

# ---------------------------------------------------------------- pre-flight
port_free() {  # exit 0 when nothing accepts on 127.0.0.1:$1 and we can bind it
    $PY - "$1" <<'EOF'
import socket, sys
p = int(sys.argv[1])
s = socket.socket()
try:
    s.settimeout(1)
    if s.connect_ex(("127.0.0.1", p)) == 0:
        sys.exit(1)
finally:
    s.close()
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", p))
except OSError:
    sys.exit(1)
finally:
    s.close()
EOF
}
if [ -f "$DIR/master.pid.ours" ] && kill -0 "$(cat "$DIR/master.pid.ours")" 2>/dev/null; then
    die 3 "an instance from $DIR is still running; stop it with stop-mailman3.sh $DIR"
fi
port_free "$LMTP_PORT" || die 3 "127.0.0.1:$LMTP_PORT (LMTP) is in use"
if [ $START_SINK -eq 1 ]; then
    port_free "$SMTP_PORT" || die 3 "127.0.0.1:$SMTP_PORT (SMTP sink) is in use"
fi

rm -rf "$DIR"
mkdir -p "$DIR/var" "$DIR/sink"
CFG=$DIR/mailman.cfg
cat > "$CFG" <<EOF
# Throwaway Mailman 3 for tests; written by start-mailman3.sh
[mailman]
layout: ci
site_owner: postmaster@example.com

[paths.ci]
var_dir: $DIR/var
bin_dir: /usr/lib/mailman3/bin

[database]
class: mailman.database.sqlite.SQLiteDatabase
url: sqlite:///\$DATA_DIR/mailman.db

[mta]
# NullMTA: no postfix/exim alias maps are written on list creation.
incoming: mailman.mta.null.NullMTA
outgoing: mailman.mta.deliver.deliver
smtp_host: 127.0.0.1
smtp_port: $SMTP_PORT
lmtp_host: 127.0.0.1
lmtp_port: $LMTP_PORT

# Runners not needed for LMTP in / SMTP out; fewer runners = faster start.
[runner.rest]
start: no
[runner.nntp]
start: no
[runner.digest]
start: no
[runner.archive]
start: no
[runner.retry]
start: no
[runner.task]
start: no
EOF

# Clean environment for Mailman's Python (a pyenv or venv on PATH must not leak in).
MMENV=(env -u PYTHONPATH -u PYTHONHOME -u VIRTUAL_ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 LANG=C.UTF-8)
MM=("${MMENV[@]}" /usr/bin/mailman --run-as-root -C "$CFG")

STARTED_PIDS=()
cleanup_on_fail() {
    local rc=$?
    trap - EXIT
    if [ $rc -ne 0 ]; then
        echo "start-mailman3: failed (rc=$rc); stopping what was started" >&2
        for f in master.out sink.out var/logs/mailman.log; do
            [ -f "$DIR/$f" ] && { echo "--- $f (tail)" >&2; tail -15 "$DIR/$f" >&2; }
        done
        if [ -f "$DIR/master.pid.ours" ]; then
            local m; m=$(cat "$DIR/master.pid.ours")
            kill -TERM -- "-$m" 2>/dev/null || true
        fi
        for p in "${STARTED_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
        sleep 3
        if [ -f "$DIR/master.pid.ours" ]; then
            kill -KILL -- "-$(cat "$DIR/master.pid.ours")" 2>/dev/null || true
        fi
        for p in "${STARTED_PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
        exit $rc
    fi
}
trap cleanup_on_fail EXIT

# ---------------------------------------------------------------- SMTP sink
SINK_PID=""
if [ $START_SINK -eq 1 ]; then
    cat > "$DIR/mm3sink.py" <<'EOF'
"""Tiny SMTP sink for Mailman's outgoing mail: one .eml per message + index.jsonl."""
import email, email.policy, json, os, threading


class Sink:
    def __init__(self, outdir):
        self.outdir = outdir
        self.n = 0
        self.lock = threading.Lock()

    @classmethod
    def from_cli(cls, parser, *args):
        return cls(args[0] if args else ".")

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.n += 1
            n = self.n
        name = "%06d.eml" % n
        content = envelope.original_content or envelope.content
        if isinstance(content, str):
            content = content.encode("utf-8", "surrogateescape")
        head = ("X-Sink-Mail-From: %s\r\nX-Sink-Rcpt-To: %s\r\n"
                % (envelope.mail_from, ", ".join(envelope.rcpt_tos))).encode()
        tmp = os.path.join(self.outdir, "." + name)
        with open(tmp, "wb") as f:
            f.write(head + content)
        os.rename(tmp, os.path.join(self.outdir, name))
        msg = email.message_from_bytes(content, policy=email.policy.compat32)
        rec = {"file": name, "mail_from": envelope.mail_from,
               "rcpt_tos": list(envelope.rcpt_tos),
               "subject": str(msg.get("Subject", "")),
               "list_id": str(msg.get("List-Id", ""))}
        with self.lock, open(os.path.join(self.outdir, "index.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
        return "250 OK"
EOF
    ( cd "$DIR" && exec "${MMENV[@]}" PYTHONPATH="$DIR" $PY -W ignore -m aiosmtpd -n \
        -l "127.0.0.1:$SMTP_PORT" -c mm3sink.Sink "$DIR/sink" \
        </dev/null >"$DIR/sink.out" 2>&1 ) &
    SINK_PID=$!
    STARTED_PIDS+=("$SINK_PID")
    echo "$SINK_PID" > "$DIR/sink.pid.ours"
fi

# ---------------------------------------------------------------- lists
# Creating the lists before the master starts also creates the sqlite schema,
# so runners never race on a fresh database.
for l in "${LISTS[@]}"; do
    timeout 120 "${MM[@]}" create -N "$l" >>"$DIR/create.out" 2>&1 ||
        { cat "$DIR/create.out" >&2; exit 4; }
    printf '%s\n' "${MEMBERS[@]}" | timeout 120 "${MM[@]}" addmembers -W - "$l" >>"$DIR/create.out" 2>&1 ||
        { cat "$DIR/create.out" >&2; exit 4; }
done

# ---------------------------------------------------------------- master
# setsid: the master and its runners get their own process group (pgid = master
# pid), so stop-mailman3.sh can signal exactly this instance.
T1=$(date +%s.%N)
( cd "$DIR/var" && exec setsid "${MMENV[@]}" MAILMAN_VAR_DIR="$DIR/var" \
    $PY /usr/lib/mailman3/bin/master -C "$CFG" </dev/null >"$DIR/master.out" 2>&1 ) &
MASTER_PID=$!
echo "$MASTER_PID" > "$DIR/master.pid.ours"

# ---------------------------------------------------------------- wait for LMTP
$PY - "$LMTP_PORT" "$TIMEOUT" "$MASTER_PID" "$SINK_PID" "$SMTP_PORT" <<'EOF' || exit 4
import os, socket, sys, time
port, timeout, master = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
sink = int(sys.argv[4]) if sys.argv[4] else None
smtp_port = int(sys.argv[5])
t0 = time.monotonic()
def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as dead.
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
def banner(p):
    try:
        with socket.create_connection(("127.0.0.1", p), timeout=2) as s:
            s.settimeout(5)
            b = s.recv(512)
            s.sendall(b"QUIT\r\n")
            return b
    except OSError:
        return b""
sink_ok = sink is None
lmtp_ok = False
while time.monotonic() - t0 < timeout:
    if not alive(master):
        sys.exit("start-mailman3: master exited before LMTP was ready")
    if sink is not None and not alive(sink):
        sys.exit("start-mailman3: SMTP sink exited")
    if not sink_ok:
        sink_ok = banner(smtp_port).startswith(b"220")
    if not lmtp_ok:
        lmtp_ok = banner(port).startswith(b"220")
    if sink_ok and lmtp_ok:
        sys.exit(0)
    time.sleep(0.2)
sys.exit("start-mailman3: LMTP on 127.0.0.1:%d not ready after %.0fs" % (port, timeout))
EOF
READY_S=$(elapsed "$T1")
# Runner PIDs = children of the master (read from /proc; procps may be absent).
RUNNER_PIDS=$($PY - "$MASTER_PID" <<'EOF'
import os, sys
kids = []
for d in os.listdir("/proc"):
    if d.isdigit():
        try:
            with open("/proc/%s/stat" % d) as f:
                if f.read().rsplit(")", 1)[1].split()[1] == sys.argv[1]:
                    kids.append(int(d))
        except (OSError, IndexError):
            pass
print(" ".join(map(str, sorted(kids))))
EOF
)
trap - EXIT

{
    echo "MM3_DIR=$DIR"
    echo "MM3_CONFIG=$CFG"
    echo "MM3_LMTP=127.0.0.1:$LMTP_PORT"
    echo "MM3_SMTP_OUT=127.0.0.1:$SMTP_PORT"
    echo "MM3_LISTS=\"${LISTS[*]}\""
    echo "MM3_MEMBERS=\"${MEMBERS[*]}\""
    echo "MASTER_PID=$MASTER_PID"
    echo "RUNNER_PIDS=\"$RUNNER_PIDS\""
    echo "SINK_PID=$SINK_PID"
    echo "SINK_DIR=$DIR/sink"
    echo "MAILMAN_CMD=\"/usr/bin/mailman --run-as-root -C $CFG\""
    echo "READY_SECONDS=$READY_S"
    echo "TOTAL_SECONDS=$(elapsed "$T0")"
} | tee "$DIR/env"
