#!/usr/bin/env python3
"""windows-smoke.py - the Windows build (smtpd.exe under Wine) over real loopback sockets.

    python3 tests/windows-smoke.py [RUNNER...] EXE        e.g.  wine build-win/smtpd.exe

Starts the program on 127.0.0.1:0 for each check, reads the port from its "listening on"
line, talks SMTP with Python's smtplib and plain sockets, and checks replies, what it printed
(byte for byte: no CRLF from a text-mode stdout), a Maildir, a 552, bad arguments and a
Ctrl-C stop. Every wait is bounded. The last line is "N passed, M failed"; exit 0 only if
nothing failed.
"""
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time

COMMAND = sys.argv[1:]
START_TIMEOUT = 60  # Wine's first start in a fresh prefix can take a while
results = []


def check(name, condition, detail=""):
    results.append(condition)
    print(("ok     " if condition else "FAILED ") + name + ("" if condition else ": " + detail))


class Server:
    """smtpd.exe ARGS 127.0.0.1:0, with its stdout and stderr collected."""

    def __init__(self, *args):
        # A fresh Wine prefix may still be settling: a start that ends at once with nothing
        # said is tried again (twice at most); one that says why it ended is not.
        for attempt in range(3):
            self._start(args)
            if self.port or self.err or attempt == 2:
                break
            time.sleep(2)
        if not self.port:
            raise RuntimeError("no listening line; stderr: %r" % self.err)

    def _start(self, args):
        self.proc = subprocess.Popen(COMMAND + list(args) + ["127.0.0.1:0"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True)
        self.out, self.err = b"", b""
        self.readers = [threading.Thread(target=self._drain, args=(s, k), daemon=True)
                        for s, k in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
        for r in self.readers:
            r.start()
        deadline = time.monotonic() + START_TIMEOUT
        self.port = None
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.err.decode("utf-8", "replace").replace("\r", "").splitlines():
                if line.startswith("listening on ") and line.rsplit(":", 1)[1].isdigit():
                    self.port = int(line.rsplit(":", 1)[1])
            if self.port:
                break
            time.sleep(0.05)
        if not self.port:
            self.stop()

    def _drain(self, stream, kind):
        for chunk in iter(lambda: stream.read1(65536), b""):
            setattr(self, kind, getattr(self, kind) + chunk)

    def stop(self, sig=signal.SIGINT):
        """Ctrl-C (Wine turns SIGINT into a console event); kill if it does not end."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for r in self.readers:
            r.join(timeout=5)
        return self.proc.returncode


def send(port, sender, rcpt, text):
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        return client.sendmail(sender, [rcpt], text)


def printed(body_lines, options=""):
    """DebuggingServer's print-out of a message with one Subject header."""
    head = b"---------- MESSAGE FOLLOWS ----------\n" + options.encode()
    return head + b"".join(line + b"\n" for line in body_lines) + \
        b"------------ END MESSAGE ------------\n"


def debugging_server():
    srv = Server("-n", "-s", "0")
    errors = []

    def one(n):
        try:
            send(srv.port, "a@example.org", "b@example.org",
                 "Subject: %d\r\n\r\n..dot %d\r\nline\r\n" % (n, n))
        except Exception as e:  # reported below
            errors.append(repr(e))
    threads = [threading.Thread(target=one, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    time.sleep(0.3)
    status = srv.stop()
    check("three clients at once are answered 250", not errors, "; ".join(errors))
    for n in range(3):
        # smtplib stuffs "..dot" to "...dot" on the wire; the server must undo exactly that
        want = printed([b"Subject: %d" % n, b"X-Peer: 127.0.0.1", b"", b"..dot %d" % n, b"line"])
        check("message %d printed byte for byte (LF, dot-unstuffed, X-Peer)" % n,
              want in srv.out, repr(srv.out[:400]))
    check("Ctrl-C ends the server with exit status 0", status == 0, "status %r" % status)


def maildir_and_size():
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server("-n", "-c", "sink", "-s", "100", "--maildir", tmp + "/md")
        send(srv.port, "a@example.org", "b@example.org", "Subject: kept\r\n\r\nbody\r\n")
        try:
            send(srv.port, "a@example.org", "b@example.org", "x" * 300 + "\r\n")
            refused = ""
        except smtplib.SMTPException as e:
            refused = str(e)
        srv.stop()
        files = os.listdir(os.path.join(tmp, "md", "new")) if os.path.isdir(tmp + "/md/new") else []
        check("--maildir: one message in new/", len(files) == 1, "files %r" % files)
        if files:
            with open(os.path.join(tmp, "md", "new", files[0]), "rb") as f:
                data = f.read()
            expected = b"Return-Path: <a@example.org>\nDelivered-To: <b@example.org>\n"
            check("--maildir: the file holds the envelope, then the message",
                  data == expected + b"Subject: kept\n\nbody\n", repr(data))
        check("-s 100: a 300-byte message gets 552", "552" in refused, refused)


def bad_arguments():
    for args in (["--bogus"], ["-s", "abc"], ["no-colon"]):
        proc = subprocess.run(COMMAND + args, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=START_TIMEOUT)
        lines = proc.stderr.decode("utf-8", "replace").replace("\r", "").strip().splitlines()
        check("bad arguments %s: exit 2 and one line" % args,
              proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("smtpd: "),
              "status %d, stderr %r" % (proc.returncode, proc.stderr))


def main():
    if not COMMAND:
        print(__doc__)
        return 2
    for step in (debugging_server, maildir_and_size, bad_arguments):
        try:
            step()
        except Exception as e:
            check(step.__name__, False, repr(e))
    failed = results.count(False)
    print("%d passed, %d failed" % (len(results) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
