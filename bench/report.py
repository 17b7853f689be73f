#!/usr/bin/env python3
"""report.py - every figure of README.md's Performance section, from one run (make bench).

    python3 bench/report.py [--messages N] [--sessions N] [--size BYTES] [--rounds N]
                            [--idle 100,1000,10000] [--held-messages N]

Servers, each started fresh on 127.0.0.1 for each measurement, stdout to /dev/null:
  smtp-sink            Postfix's smtp-sink, the fastest real SMTP peer on the machine
  smtpd sink           ./smtpd -n -c SMTPServer
  smtpd Debugging      ./smtpd -n -c DebuggingServer (prints every message)
  smtpd PureProxy      ./smtpd -n -c PureProxy in front of a second smtp-sink
  Python Debugging     python3.11 -m smtpd -n -c DebuggingServer (the program smtpd replaces)

Throughput: Postfix's smtp-source sends --messages messages of --size bytes over --sessions
parallel sessions, each session reused (-d); the rounds are interleaved and the median is
printed, with the server's CPU time (user + system, from /proc) per message. Idle cost: N
clients connect and read the greeting, the growth of the server's resident memory per client
is printed, and then, with the N clients still connected, --held-messages messages are sent as
above. Loopback only; every step is bounded by a timeout; all processes end with the script.
Needs postfix (smtp-sink, smtp-source), a built ./smtpd and Linux (/proc).
"""
import argparse
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

STEP_TIMEOUT = 120  # seconds any one load may take
IS_ROOT = os.geteuid() == 0


def tool(name):
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.access(path, os.X_OK):
        sys.exit(f"report.py: needs {name} (Debian package postfix)")
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid):
    """user + system CPU seconds of pid and its reaped children"""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def proc_rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class Server:
    """one server process on 127.0.0.1, ready once it has sent a 220 greeting"""

    def __init__(self, argv, port=None):
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self.log)
        self.port = port or self._announced_port()
        self._wait_greeting()

    def _announced_port(self):  # smtpd with 127.0.0.1:0 says "listening on 127.0.0.1:PORT"
        deadline = time.time() + 10
        while time.time() < deadline:
            self.log.seek(0)
            for line in self.log.read().decode(errors="replace").splitlines():
                if line.startswith("listening on "):
                    return int(line.rsplit(":", 1)[1])
            time.sleep(0.05)
        self.stop()
        sys.exit("report.py: no 'listening on' line from " + " ".join(self.proc.args))

    def _wait_greeting(self):
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(100).startswith(b"220"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        sys.exit("report.py: no greeting from " + " ".join(self.proc.args))

    def stop(self):
        self.proc.kill()
        self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def smtp_sink(sink):
    port = free_port()
    user = ["-u", "nobody"] if IS_ROOT else []  # smtp-sink refuses to run as root
    return Server([sink, *user, "-m", "15000", f"127.0.0.1:{port}", "4096"], port)


def python_debugging():
    port = free_port()
    return Server(["python3.11", "-W", "ignore", "-m", "smtpd", "-n", "-c", "DebuggingServer",
                   f"127.0.0.1:{port}"], port)


def smtpd(*args):
    return Server(["./smtpd", "-n", *args])


def load(source, server, messages, sessions, size):
    """send the messages; returns (messages per second, server CPU microseconds per message)"""
    cpu = proc_cpu(server.proc.pid)
    start = time.monotonic()
    subprocess.run([source, "-d", "-s", str(sessions), "-m", str(messages), "-l", str(size),
                    "-f", "sender@bench.example", "-t", "rcpt@bench.example",
                    f"127.0.0.1:{server.port}"], stdout=subprocess.DEVNULL, check=True,
                   timeout=STEP_TIMEOUT)
    took = time.monotonic() - start
    return messages / took, (proc_cpu(server.proc.pid) - cpu) * 1e6 / messages


def hold_idle(server, count):
    """connect count clients that read the greeting; returns (sockets, kB per client)"""
    before = proc_rss_kb(server.proc.pid)
    clients = []
    deadline = time.monotonic() + STEP_TIMEOUT
    for _ in range(count):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(clients)} of {count} idle clients connected")
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        s.recv(200)
        clients.append(s)
    time.sleep(0.5)
    return clients, (proc_rss_kb(server.proc.pid) - before) / count


def load_line():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def machine():
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    kernel = os.uname().release
    return f"{os.cpu_count()} x {model}, Linux {kernel}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", default="100,1000,10000")
    ap.add_argument("--held-messages", type=int, default=5000)
    opt = ap.parse_args()
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if not os.access("./smtpd", os.X_OK):
        sys.exit("report.py: build ./smtpd first (make)")
    sink, source = tool("smtp-sink"), tool("smtp-source")
    idle_counts = [int(n) for n in opt.idle.split(",")]
    want = max(idle_counts) + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, want), hard), hard))
    has_python_smtpd = subprocess.run(["python3.11", "-W", "ignore", "-c", "import smtpd"],
                                      capture_output=True).returncode == 0

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"machine: {machine()}")
    print(f"started {started}, load average {load_line()}")
    print(f"load: {opt.messages} messages x {opt.size} bytes over {opt.sessions} sessions "
          f"(smtp-source -d), {opt.rounds} interleaved rounds, medians")

    servers = {
        "smtp-sink": lambda: smtp_sink(sink),
        "smtpd sink": lambda: smtpd("-c", "SMTPServer", "127.0.0.1:0"),
        "smtpd DebuggingServer": lambda: smtpd("-c", "DebuggingServer", "127.0.0.1:0"),
    }
    if has_python_smtpd:
        servers["Python 3.11 DebuggingServer"] = python_debugging
    results = {name: [] for name in [*servers, "smtpd PureProxy -> smtp-sink"]}
    for _ in range(opt.rounds):
        for name, make in servers.items():
            with make() as server:
                results[name].append(load(source, server, opt.messages, opt.sessions, opt.size))
        with smtp_sink(sink) as upstream:
            with smtpd("-c", "PureProxy", "127.0.0.1:0", f"127.0.0.1:{upstream.port}") as proxy:
                results["smtpd PureProxy -> smtp-sink"].append(
                    load(source, proxy, opt.messages, opt.sessions, opt.size))

    direct = statistics.median(r[0] for r in results["smtp-sink"])
    print()
    print("| server | messages/s | vs smtp-sink | server CPU per message |")
    print("|---|---:|---:|---:|")
    for name, runs in results.items():
        rate = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"| {name} | {rate:,.0f} | {rate / direct:.2f} | {cpu:.0f} µs |")

    print()
    print(f"idle clients (each reads the greeting, then waits); with them connected, "
          f"{opt.held_messages} messages as above")
    print()
    print("| server | idle clients | memory per client | messages/s | server CPU per message |")
    print("|---|---:|---:|---:|---:|")
    idle_servers = {"smtp-sink": servers["smtp-sink"], "smtpd sink": servers["smtpd sink"]}
    for name, make in idle_servers.items():
        for count in idle_counts:
            with make() as server:
                clients, per_client = hold_idle(server, count)
                rate, cpu = load(source, server, opt.held_messages, opt.sessions, opt.size)
                for s in clients:
                    s.close()
            print(f"| {name} | {count:,} | {per_client:.1f} kB | {rate:,.0f} | {cpu:.0f} µs |")
    print()
    print(f"finished {time.strftime('%H:%M UTC', time.gmtime())}, load average {load_line()}")


if __name__ == "__main__":
    main()
