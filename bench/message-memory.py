#!/usr/bin/env python3
"""message-memory.py - how much memory one big message costs in each of smtpd's modes.

    python3 bench/message-memory.py [--mb N] [--smtpd ./smtpd] [--python python3.11]

For each mode a fresh server on 127.0.0.1 takes one message of N MB (10^6 bytes; -s 0,
100-byte lines), sent by this script over one session. The figure is the growth of the
server's peak resident memory (VmHWM) from just before DATA to just after the reply to the
final dot, divided by the message size: 1.00x means the server held one copy of the message at
its peak. Issue 9's
target is at most 1.50x for every mode that keeps or passes the message on, and next to
nothing for the sink without outputs. The anchor is Python 3.11's DebuggingServer, measured
in the same run. A PureProxy or MailmanProxy relays to a second smtpd sink (whose memory is
not counted); MailmanProxy hands the list's copy to a Mailman 2 stand-in `mail/mailman`
script made in a temporary directory (Mailman 2 is no longer packaged). Loopback only; each
server is bounded by a timeout and killed at the end. Needs Linux (/proc).
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

STEP_TIMEOUT = 300  # seconds one message may take


def peak_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def start(argv, **kw):
    """a server on a free port: (process, port), the port read from its first stderr line"""
    p = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, **kw)
    line = p.stderr.readline().decode()
    if "listening on" not in line:
        p.kill()
        sys.exit(f"message-memory.py: {argv[0]} did not start: {line!r}")
    return p, int(line.strip().rsplit(":", 1)[1].split()[0].rstrip(")"))


class Session:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=STEP_TIMEOUT)
        self.file = self.sock.makefile("rb")
        self.reply()

    def reply(self):
        lines = []
        while True:
            line = self.file.readline().decode(errors="replace")
            lines.append(line.rstrip())
            if len(line) < 4 or line[3] != "-":
                return "\n".join(lines)

    def command(self, line):
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()


def send_message(s, mb):
    """mb MB of 100-byte lines; the reply to the final dot"""
    chunk = (b"x" * 98 + b"\r\n") * 10000
    for _ in range(mb * 1000000 // len(chunk)):
        s.sock.sendall(chunk)
    return s.command(".")


def measure(argv, mb, rcpt="bob@example.org", **kw):
    """(reply to the dot, peak growth in bytes) for one message of mb MB"""
    p, port = start(argv, **kw)
    try:
        s = Session(port)
        for line in ("EHLO bench", "MAIL FROM:<alice@example.org>", f"RCPT TO:<{rcpt}>"):
            r = s.command(line)
            if not r.startswith("2"):
                return f"{line} -> {r}", None
        if not s.command("DATA").startswith("354"):
            return "DATA refused", None
        before = peak_kb(p.pid)
        reply = send_message(s, mb)
        time.sleep(0.2)  # outputs written after the reply (none today) would count too
        return reply, (peak_kb(p.pid) - before) * 1024
    finally:
        p.kill()
        p.wait()


def mailman2_home(work):
    """a Mailman 2 stand-in (no longer packaged): list "team", a wrapper that takes the mail"""
    home = os.path.join(work, "mailman")
    os.makedirs(os.path.join(home, "lists", "team"))
    os.makedirs(os.path.join(home, "mail"))
    open(os.path.join(home, "lists", "team", "config.pck"), "w").close()
    wrapper = os.path.join(home, "mail", "mailman")
    with open(wrapper, "w") as f:
        f.write("#!/bin/sh\n# Mailman 2 stand-in: reads the message and succeeds\ncat >/dev/null\n")
    os.chmod(wrapper, 0o755)
    return home


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--smtpd", default="./smtpd")
    ap.add_argument("--python", default="python3.11")
    args = ap.parse_args()
    smtpd = os.path.abspath(args.smtpd)
    work = tempfile.mkdtemp(prefix="smtpd-memory.")
    here = "127.0.0.1:0"
    upstream, up_port = start([smtpd, "-n", "-c", "SMTPServer", "-s", "0", here])
    relay = f"127.0.0.1:{up_port}"
    mailman = ["-c", "MailmanProxy", "--mailman-home", mailman2_home(work), here, relay]
    base = [smtpd, "-n", "-s", "0"]
    modes = [
        ("smtpd sink (no outputs)", ["-c", "SMTPServer", here], {}),
        ("smtpd DebuggingServer", ["-c", "DebuggingServer", here], {}),
        ("smtpd --maildir", ["-c", "SMTPServer", "--maildir", work + "/md", here], {}),
        ("smtpd --mbox", ["-c", "SMTPServer", "--mbox", work + "/mbox", here], {}),
        ("smtpd --json", ["-c", "SMTPServer", "--json", here], {}),
        ("smtpd --exec", ["-c", "SMTPServer", "--exec", "cat >/dev/null", here], {}),
        ("smtpd PureProxy", ["-c", "PureProxy", here, relay], {}),
        ("smtpd MailmanProxy, to the upstream", mailman, {}),
        ("smtpd MailmanProxy, to a Mailman 2 list", mailman, {"rcpt": "team@example.org"}),
    ]
    print(f"One message of {args.mb} MB; peak resident growth from DATA to its reply\n")
    print("| server | reply | peak growth | x message |")
    print("|---|---|---:|---:|")

    def row(label, reply, grown, mb):
        figure = "- | -" if grown is None else f"{grown / 1e6:,.0f} MB | {grown / (mb * 1e6):.2f}x"
        print(f"| {label} | {reply[:30]} | {figure} |", flush=True)

    try:
        for label, options, extra in modes:
            row(label, *measure(base + options, args.mb, **extra), args.mb)
        mb = min(args.mb, 30)  # Python refuses more than 32 MiB, and has no -s option
        argv = [args.python, "-m", "smtpd", "-n", "-c", "DebuggingServer",
                f"127.0.0.1:{free_port()}"]
        row(f"Python 3.11 DebuggingServer ({mb} MB)", *measure_python(argv, mb), mb)
    finally:
        upstream.kill()
        upstream.wait()
        subprocess.run(["rm", "-rf", work])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_python(argv, mb):
    """Python's server prints nothing on start: wait for its port to answer"""
    port = int(argv[-1].rsplit(":", 1)[1])
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        s = Session(port)
        for line in ("EHLO bench", "MAIL FROM:<alice@example.org>", "RCPT TO:<bob@example.org>",
                     "DATA"):
            s.command(line)
        before = peak_kb(p.pid)
        reply = send_message(s, mb)
        return reply, (peak_kb(p.pid) - before) * 1024
    finally:
        p.kill()
        p.wait()


if __name__ == "__main__":
    main()
