#!/usr/bin/env python3
"""pipeline-load.py - a bounded SMTP load on a loopback port, pipelined when EHLO offers
PIPELINING (RFC 2920): MAIL, every RCPT and DATA in one write, then the text and QUIT with
the next group. Postfix's smtp-source greets with HELO and never pipelines, so this stands in.

usage: pipeline-load.py PORT MESSAGES SESSIONS RECIPIENTS   prints: messages/s round-trips/msg
"""
import socket, sys, threading, time

port, messages, sessions, recipients = (int(a) for a in sys.argv[1:5])
body = b"Subject: load\r\n\r\n" + b"x" * 998 + b"\r\n"
trips = [0] * sessions


def replies(f, n):
    """read n complete replies (multi-line ones count once); fail on anything unexpected"""
    for _ in range(n):
        while True:
            line = f.readline()
            if not line or line[:1] not in b"23":
                raise SystemExit(f"unexpected reply: {line!r}")
            if line[3:4] != b"-":
                break


def session(index, count):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    replies(f, 1)
    s.sendall(b"EHLO load.example\r\n")
    ehlo = b""
    while True:
        line = f.readline()
        ehlo += line
        if line[3:4] != b"-":
            break
    pipelining = b"PIPELINING" in ehlo
    envelope = [b"MAIL FROM:<load@example.com>\r\n"]
    envelope += [b"RCPT TO:<r%d@example.com>\r\n" % r for r in range(recipients)]
    envelope += [b"DATA\r\n"]
    for m in range(count):
        if pipelining:
            s.sendall(b"".join(envelope))
            replies(f, len(envelope))
            trips[index] += 1
        else:
            for command in envelope:
                s.sendall(command)
                replies(f, 1)
                trips[index] += 1
        s.sendall(body + b".\r\n")
        replies(f, 1)
        trips[index] += 1
    s.sendall(b"QUIT\r\n")
    replies(f, 1)
    s.close()


start = time.monotonic()
threads = [threading.Thread(target=session, args=(i, messages // sessions)) for i in range(sessions)]
for t in threads:
    t.start()
for t in threads:
    t.join(120)
elapsed = time.monotonic() - start
done = messages // sessions * sessions
print(f"{done / elapsed:.0f} {sum(trips) / done:.2f}")
