// test_support.hpp - the one set of helpers for the tests.
//
// Every test file includes what it needs and compiles right after smtpd.cpp, in any order.
// test_e2e.cpp, test_interop.cpp and test_proxy.cpp talk to the built binary only (env
// SMTPD_BIN, default ./smtpd). All the others also call smtpd.cpp's internals directly:
// test_channel.cpp the Channel (no sockets, so Windows builds it too, with section 1 only),
// test_loop.cpp the reactor, test_outputs.cpp the output formatters and SinkServer,
// test_exec.cpp CommandRun, test_data_reader.cpp DataReader, test_reply_parser.cpp
// ReplyParser, test_listen.cpp listen_everywhere, and test_auth.cpp, test_compat.cpp,
// test_hostile.cpp, test_pipelining.cpp, test_refusals.cpp and test_tls.cpp the Channel and
// parse_command_line beside their end-to-end cases. A new file that calls internals says so
// here. Everything here is bounded in time and owned by RAII objects: a ServerProcess or a
// Client going out of scope (also when an assertion throws) kills its child or closes its
// socket. Children also get SIGKILL from the kernel if the test process dies (Linux
// PR_SET_PDEATHSIG), so a crashed test run leaves no servers behind.
//
// Contents:
//   1. Time and text - Deadline, wait_until, seconds_since, count, lines_of, starts_with,
//                      crlf, on_the_wire, message_with, made (texts in chunks); the
//                      command line: parse_args, settings_of; the channel: test_config,
//                      auth_config, auth_plain, Session
//                      (portable: the Windows build of test_channel.cpp uses this section)
//   2. Processes     - ExitStatus, OwnedFd, OutputPipe, Child (spawn, pump, wait_exit),
//                      run_command
//   3. Environment   - smtpd_bin, find_in_path, require_tool
//   4. Sockets       - Client (connect, send, recv_line, read_reply, command, reset),
//                      ServerProcess (launch, wait_listening, connect, address, stop)
//   5. Fixtures      - have_ipv6_loopback, loopback_socket, IdlePort, TempFile,
//                      AsanOptionsAdded, ignore_sigpipe,
//                      proc_status, rss_kb, cpu_seconds, cpu_used_over (Linux),
//                      list_dir, TempDir, read_file, write_file, Script
//   6. smtpd         - start_smtpd, run_smtpd, check_one_error_line, read_greeting, greet,
//                      greeted_client, Outcome, open_data, try_wire, begin_data, send_wire,
//                      send_mail, printed (what DebuggingServer prints for a message),
//                      start_proxy; its clients: swaks, curl_send, smtplib
//   7. Upstreams     - free_port, smtp_sink_path, SmtpSink (Postfix's smtp-sink),
//                      StandInUpstream (a scripted server in threads of the test process)
//
// Like the test files, this header compiles right after smtpd.cpp. Only loopback addresses are
// used (127.0.0.1, ::1). Sections 2 to 7 are POSIX only.
#ifndef SMTPD_TEST_SUPPORT_HPP
#define SMTPD_TEST_SUPPORT_HPP

#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace smtpd_test {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Default bound for one wait (a reply, a line on stderr, a process exit).
constexpr milliseconds kWait{5000};

// ==== 1. Time and text ====

// Deadline - a point in time; remaining_ms() is what is left, clamped to [0, INT_MAX].
class Deadline {
 public:
  explicit Deadline(milliseconds timeout) : end_(Clock::now() + timeout) {}
  bool expired() const { return Clock::now() >= end_; }
  int remaining_ms() const {
    auto left = std::chrono::duration_cast<milliseconds>(end_ - Clock::now()).count();
    if (left < 0) return 0;
    if (left > 1000000000) return 1000000000;
    return static_cast<int>(left);
  }

 private:
  Clock::time_point end_;
};

// wait_until - poll pred every few ms until it is true or timeout passes; returns pred().
template <class Pred>
bool wait_until(Pred pred, milliseconds timeout = kWait) {
  Deadline deadline(timeout);
  while (!pred()) {
    if (deadline.expired()) return pred();
    std::this_thread::sleep_for(milliseconds(2));
  }
  return true;
}

// seconds_since - seconds from start until now.
inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// count - number of non-overlapping occurrences of needle in hay.
inline std::size_t count(const std::string& hay, const std::string& needle) {
  std::size_t n = 0;
  for (std::size_t pos = hay.find(needle); pos != std::string::npos;
       pos = hay.find(needle, pos + needle.size()))
    ++n;
  return n;
}

// lines_of - split text on '\n' (a trailing '\n' does not make an empty last line).
inline std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::string::size_type start = 0;
  while (start < text.size()) {
    auto nl = text.find('\n', start);
    if (nl == std::string::npos) {
      lines.push_back(text.substr(start));
      break;
    }
    lines.push_back(text.substr(start, nl - start));
    start = nl + 1;
  }
  return lines;
}

inline bool starts_with(const std::string& s, const std::string& prefix) {
  return s.compare(0, prefix.size(), prefix) == 0;
}

// crlf - turn the "\n" line ends of a readable literal into the "\r\n" SMTP wants.
inline std::string crlf(const std::string& text) {
  std::string out;
  for (char ch : text) out += ch == '\n' ? std::string("\r\n") : std::string(1, ch);
  return out;
}

// on_the_wire - a message written with "\n" line ends as a client sends it after DATA: CRLF
// line ends, and a dot doubled at the start of a line (RFC 5321 4.5.2); no final dot.
inline std::string on_the_wire(const std::string& text) {
  std::string out;
  for (const std::string& line : lines_of(text))
    out += (starts_with(line, ".") ? "." : "") + line + "\r\n";
  return out;
}

// message_with - an envelope holding `data` from `peer`, shared as the message texts take it
inline std::shared_ptr<const Envelope> message_with(std::string data,
                                                    std::string peer = "192.0.2.9") {
  Envelope e;
  e.data = std::move(data);
  e.peer = std::move(peer);
  return std::make_shared<const Envelope>(std::move(e));
}

// made - what a TextSource makes, read whole. Read 1, 2, 3 and 7 bytes at a time it must make
// the same, whatever the chunk boundaries; make() gives a fresh text each time.
template <class Make>
std::string made(Make make) {
  auto whole = make();
  std::string text = read_all(whole);
  for (std::size_t want : {std::size_t{1}, std::size_t{2}, std::size_t{3}, std::size_t{7}}) {
    auto part = make();
    std::string in_chunks;
    while (part.more(in_chunks, want)) {
    }
    CHECK(in_chunks == text);
  }
  return text;
}

// parse_args - smtpd.cpp's parse_command_line on these arguments (argv[0] added).
inline CommandLine parse_args(std::vector<const char*> args) {
  args.insert(args.begin(), "smtpd");
  return parse_command_line(static_cast<int>(args.size()), args.data());
}

// settings_of - the Settings parse_command_line makes of these arguments (REQUIREs some: not
// --help or --version)
inline Settings settings_of(const std::vector<std::string>& args) {
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  CommandLine cl = parse_args(argv);
  REQUIRE(cl.settings.has_value());
  return *cl.settings;
}

// test_config - the ChannelConfig of the channel tests: host test.example, no size limit.
inline ChannelConfig test_config(std::uint64_t size = 0, bool utf8 = false) {
  ChannelConfig config;
  config.fqdn = "test.example";
  config.data_size_limit = size;
  config.enable_smtputf8 = utf8;
  return config;
}

// auth_config - test_config with AUTH offered: any user and password, or only `users`;
// `required`: MAIL waits for a login (--auth-required)
inline ChannelConfig auth_config(std::shared_ptr<const AuthUsers> users = nullptr,
                                 bool required = false) {
  ChannelConfig config = test_config();
  config.offer_auth = true;
  config.auth_users = std::move(users);
  config.auth_required = required;
  return config;
}

// auth_plain - the base64 response of AUTH PLAIN (RFC 4616): authzid NUL user NUL password
inline std::string auth_plain(const std::string& user, const std::string& password,
                              const std::string& authzid = "") {
  return base64_encode(authzid + std::string(1, '\0') + user + std::string(1, '\0') + password);
}

// Session - a channel with its greeting already read; send() returns the replies to one write
struct Session {
  explicit Session(ChannelConfig config = test_config()) : channel(std::move(config), "192.0.2.7") {
    greeting = take();
  }
  std::string take() {
    std::string out = channel.output();
    channel.consume_output(out.size());
    return out;
  }
  std::string send(std::string_view bytes) {
    channel.feed(bytes);
    return take();
  }
  // deliver - play the mode: take the finished message and answer with `reply`
  Envelope deliver(const std::string& reply = "") {
    REQUIRE(channel.has_message());
    Envelope e = channel.take_message();
    channel.answer(reply);
    return e;
  }
  Channel channel;
  std::string greeting;
};

}  // namespace smtpd_test

// Sections 2 to 7 start processes and sockets: POSIX only.
#ifndef _WIN32

#include <arpa/inet.h>
#include <dirent.h>
#include <doctest/doctest.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pwd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#ifdef __linux__
#include <sys/prctl.h>
#endif

namespace smtpd_test {

// ==== 2. Processes ====

// ExitStatus - how a child ended: exited(code), killed by a signal, or still running
// when we gave up waiting (then the caller killed it).
struct ExitStatus {
  bool exited = false;
  int code = -1;
  int signal = 0;
  bool timed_out = false;

  std::string describe() const {
    std::ostringstream os;
    if (exited)
      os << "exit " << code;
    else if (signal)
      os << "killed by signal " << signal;
    else
      os << "unknown";
    if (timed_out) os << " (after timing out)";
    return os.str();
  }
};

inline ExitStatus decode_status(int raw) {
  ExitStatus st;
  if (WIFEXITED(raw)) {
    st.exited = true;
    st.code = WEXITSTATUS(raw);
  } else if (WIFSIGNALED(raw)) {
    st.signal = WTERMSIG(raw);
  }
  return st;
}

// OwnedFd - a file descriptor, closed when its owner goes; moving hands it over.
class OwnedFd {
 public:
  OwnedFd() = default;
  explicit OwnedFd(int fd) : fd_(fd) {}
  OwnedFd(OwnedFd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  OwnedFd& operator=(OwnedFd&& o) noexcept {
    if (this != &o) reset(std::exchange(o.fd_, -1));
    return *this;
  }
  ~OwnedFd() { reset(); }
  int get() const { return fd_; }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

// OutputPipe - the read end of a child's stdout or stderr, drained without blocking
// into text(). Owned: closes its fd.
class OutputPipe {
 public:
  OutputPipe() = default;
  explicit OutputPipe(int fd) : fd_(fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); }

  int fd() const { return eof_ ? -1 : fd_.get(); }
  bool eof() const { return eof_; }
  const std::string& text() const { return text_; }

  // drain - read whatever is available now; never blocks.
  void drain() {
    if (fd_.get() < 0 || eof_) return;
    char buf[65536];
    for (;;) {
      ssize_t n = ::read(fd_.get(), buf, sizeof buf);
      if (n > 0) {
        text_.append(buf, static_cast<std::size_t>(n));
      } else if (n == 0) {
        eof_ = true;
        return;
      } else if (errno == EINTR) {
        continue;
      } else {
        if (errno != EAGAIN && errno != EWOULDBLOCK) eof_ = true;
        return;
      }
    }
  }

 private:
  OwnedFd fd_;
  std::string text_;
  bool eof_ = false;
};

// poll_pipes - wait up to timeout_ms for any of the pipes to become readable, then drain
// them all. With every pipe at EOF it just sleeps a little (the caller polls something else).
inline void poll_pipes(std::vector<OutputPipe*> pipes, int timeout_ms) {
  std::vector<pollfd> fds;
  for (auto* p : pipes)
    if (p && p->fd() >= 0) fds.push_back({p->fd(), POLLIN, 0});
  if (fds.empty()) {
    if (timeout_ms > 0) std::this_thread::sleep_for(milliseconds(std::min(timeout_ms, 5)));
    return;
  }
  ::poll(fds.data(), fds.size(), timeout_ms);
  for (auto* p : pipes)
    if (p) p->drain();
}

// Child - a forked-and-exec'd process with stdin on /dev/null and stdout/stderr on pipes.
// The destructor kills (SIGKILL) and reaps it if it is still running.
class Child {
 public:
  Child() = default;
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  Child(Child&& o) noexcept { *this = std::move(o); }
  Child& operator=(Child&& o) noexcept {
    if (this != &o) {
      kill_and_reap();
      pid_ = std::exchange(o.pid_, -1);
      out = std::move(o.out);
      err = std::move(o.err);
      status_ = o.status_;
    }
    return *this;
  }
  ~Child() { kill_and_reap(); }

  // spawn - start argv[0] (searched in PATH when it has no '/'); throws std::runtime_error
  // when the program cannot be started (missing file, not executable). max_open_files > 0
  // sets the child's RLIMIT_NOFILE (to provoke EMFILE).
  static Child spawn(const std::vector<std::string>& argv, int max_open_files = 0) {
    if (argv.empty()) throw std::runtime_error("spawn: empty argv");
    int out_pipe[2], err_pipe[2], exec_pipe[2];
    if (::pipe2(out_pipe, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    if (::pipe2(err_pipe, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    if (::pipe2(exec_pipe, O_CLOEXEC) != 0) throw std::runtime_error("pipe2 failed");
    std::vector<char*> cargv;
    for (const auto& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
    cargv.push_back(nullptr);
    pid_t parent = ::getpid();

    pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
      // Child: async-signal-safe calls only.
#ifdef __linux__
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (::getppid() != parent) _exit(127);
#else
      (void)parent;
#endif
      ::signal(SIGPIPE, SIG_DFL);
      if (max_open_files > 0) {
        rlimit lim{static_cast<rlim_t>(max_open_files), static_cast<rlim_t>(max_open_files)};
        if (::setrlimit(RLIMIT_NOFILE, &lim) != 0) _exit(126);
      }
      int devnull = ::open("/dev/null", O_RDONLY);
      if (devnull >= 0) ::dup2(devnull, 0);
      ::dup2(out_pipe[1], 1);
      ::dup2(err_pipe[1], 2);
      ::execvp(cargv[0], cargv.data());
      int e = errno;
      ssize_t ignored = ::write(exec_pipe[1], &e, sizeof e);
      (void)ignored;
      _exit(127);
    }
    ::close(out_pipe[1]);
    ::close(err_pipe[1]);
    ::close(exec_pipe[1]);
    Child c;
    c.pid_ = pid;
    c.out = OutputPipe(out_pipe[0]);
    c.err = OutputPipe(err_pipe[0]);
    // The exec pipe closes on a successful exec (CLOEXEC) or carries errno on failure.
    int e = 0;
    ssize_t n;
    do n = ::read(exec_pipe[0], &e, sizeof e);
    while (n < 0 && errno == EINTR);
    ::close(exec_pipe[0]);
    if (n == static_cast<ssize_t>(sizeof e)) {
      c.wait_exit(kWait);
      throw std::runtime_error("cannot execute " + argv[0] + ": " + std::strerror(e));
    }
    return c;
  }

  pid_t pid() const { return pid_; }
  bool running() {
    reap(false);
    return pid_ > 0;
  }
  const std::optional<ExitStatus>& status() const { return status_; }

  // send_signal - send sig if the child is still running.
  void send_signal(int sig) {
    if (running()) ::kill(pid_, sig);
  }

  // pump - drain stdout and stderr without blocking (keeps the child from blocking on a
  // full pipe). Call it from any wait loop.
  void pump() {
    out.drain();
    err.drain();
  }

  // wait_exit - wait up to timeout for the child to end on its own, draining its output;
  // on timeout kill it (SIGKILL) and mark the status timed_out. Also waits (bounded) for
  // EOF on both pipes so all output is collected.
  ExitStatus wait_exit(milliseconds timeout = kWait) {
    Deadline deadline(timeout);
    bool timed_out = false;
    while (running()) {
      if (deadline.expired()) {
        timed_out = true;
        kill_and_reap();
        break;
      }
      poll_pipes({&out, &err}, std::min(deadline.remaining_ms(), 10));
    }
    // Grandchildren could hold the pipes open; bound the wait for EOF.
    Deadline eof_deadline(milliseconds(1000));
    while ((!out.eof() || !err.eof()) && !eof_deadline.expired())
      poll_pipes({&out, &err}, std::min(eof_deadline.remaining_ms(), 50));
    pump();
    ExitStatus st = status_.value_or(ExitStatus{});
    st.timed_out = st.timed_out || timed_out;
    status_ = st;
    return st;
  }

  // wait_output - wait (draining both pipes) until pred(pipe.text()) holds, or timeout, or
  // the pipe reached EOF. Returns pred's final value.
  template <class Pred>
  bool wait_output(OutputPipe& pipe, Pred pred, milliseconds timeout = kWait) {
    Deadline deadline(timeout);
    for (;;) {
      pump();
      if (pred(pipe.text())) return true;
      if (deadline.expired() || pipe.eof()) return pred(pipe.text());
      poll_pipes({&out, &err}, std::min(deadline.remaining_ms(), 20));
    }
  }

  OutputPipe out;
  OutputPipe err;

 private:
  void reap(bool block) {
    if (pid_ <= 0) return;
    int raw = 0;
    pid_t r;
    do r = ::waitpid(pid_, &raw, block ? 0 : WNOHANG);
    while (r < 0 && errno == EINTR);
    if (r == pid_) {
      status_ = decode_status(raw);
      pid_ = -1;
    } else if (r < 0) {
      pid_ = -1;  // not our child any more (ECHILD): nothing left to reap
    }
  }
  void kill_and_reap() {
    if (pid_ <= 0) return;
    reap(false);
    if (pid_ <= 0) return;
    ::kill(pid_, SIGKILL);
    reap(true);
    if (status_) status_->timed_out = true;
  }

  pid_t pid_ = -1;
  std::optional<ExitStatus> status_;
};

// CommandResult - what run_command saw.
struct CommandResult {
  ExitStatus status;
  std::string out;
  std::string err;

  bool ok() const { return status.exited && status.code == 0 && !status.timed_out; }
  std::string describe() const {
    return status.describe() + "\n--- stdout ---\n" + out + "\n--- stderr ---\n" + err;
  }
};

// run_command - run argv with stdin on /dev/null, capture stdout/stderr, kill it after
// timeout. A program that cannot be started gives exit 127 and the reason on err.
inline CommandResult run_command(const std::vector<std::string>& argv,
                                 milliseconds timeout = milliseconds(15000)) {
  CommandResult r;
  try {
    Child c = Child::spawn(argv);
    r.status = c.wait_exit(timeout);
    r.out = c.out.text();
    r.err = c.err.text();
  } catch (const std::exception& e) {
    r.status.exited = true;
    r.status.code = 127;
    r.err = e.what();
  }
  return r;
}

// ==== 3. Environment ====

// smtpd_bin - the binary under test: $SMTPD_BIN or ./smtpd.
inline std::string smtpd_bin() {
  const char* env = std::getenv("SMTPD_BIN");
  return (env && *env) ? env : "./smtpd";
}

// find_in_path - full path of an executable named name in $PATH, or "" if none.
inline std::string find_in_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string p = path ? path : "/usr/local/bin:/usr/bin:/bin";
  std::stringstream ss(p);
  std::string dir;
  while (std::getline(ss, dir, ':')) {
    if (dir.empty()) dir = ".";
    std::string full = dir + "/" + name;
    struct stat sb;
    if (::stat(full.c_str(), &sb) == 0 && S_ISREG(sb.st_mode) && ::access(full.c_str(), X_OK) == 0)
      return full;
  }
  return "";
}

// require_tool - full path of program; fails the test naming the Debian package if absent.
inline std::string require_tool(const std::string& program, const std::string& package) {
  std::string path = find_in_path(program);
  REQUIRE_MESSAGE(!path.empty(), program << " not found in PATH: install the Debian package "
                                         << package << " (apt-get install " << package << ")");
  return path;
}

// ==== 4. Sockets ====

class ServerProcess;

// Client - one TCP connection to a loopback address, with a line buffer. Every wait is
// bounded; while waiting it also drains the server's stdout/stderr (if it knows the
// server) so a server blocked on a full pipe cannot deadlock the test.
class Client {
 public:
  // connect - to host (a numeric loopback address) and port; throws on failure/timeout.
  // rcvbuf_bytes > 0 shrinks the receive buffer (SO_RCVBUF), so replies back up sooner.
  static Client connect(const std::string& host, int port, ServerProcess* server = nullptr,
                        milliseconds timeout = kWait, int rcvbuf_bytes = 0);

  bool is_open() const { return fd_.get() >= 0; }
  int fd() const { return fd_.get(); }

  void close() { fd_.reset(); }

  // reset - close abruptly: SO_LINGER 0 makes the kernel send RST instead of FIN.
  void reset() {
    if (fd_.get() < 0) return;
    linger lg{1, 0};
    ::setsockopt(fd_.get(), SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
    close();
  }

  // send - write all bytes (bounded wait); false if the peer is gone or it timed out.
  bool send(const std::string& data, milliseconds timeout = kWait) {
    Deadline deadline(timeout);
    std::size_t off = 0;
    while (off < data.size()) {
      ssize_t n = ::send(fd_.get(), data.data() + off, data.size() - off, MSG_NOSIGNAL);
      if (n > 0) {
        off += static_cast<std::size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        if (deadline.expired()) return false;
        wait_fd(POLLOUT, std::min(deadline.remaining_ms(), 20));
        continue;
      }
      return false;
    }
    return true;
  }

  // recv_line - next line without its CRLF (or LF); nullopt on timeout or EOF.
  std::optional<std::string> recv_line(milliseconds timeout = kWait) {
    Deadline deadline(timeout);
    for (;;) {
      auto nl = buf_.find('\n');
      if (nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        if (!line.empty() && line.back() == '\r') line.pop_back();
        return line;
      }
      if (eof_ || deadline.expired()) return std::nullopt;
      fill(std::min(deadline.remaining_ms(), 20));
    }
  }

  // read_reply - one SMTP reply (all "NNN-" lines and the final "NNN " line), lines joined
  // with "\n"; "" on timeout/EOF (with whatever partial lines arrived prefixed "<partial>").
  std::string read_reply(milliseconds timeout = kWait) {
    Deadline deadline(timeout);
    std::string reply;
    for (;;) {
      auto line = recv_line(milliseconds(deadline.remaining_ms()));
      if (!line) return reply.empty() ? "" : "<partial>" + reply;
      if (!reply.empty()) reply += "\n";
      reply += *line;
      if (line->size() < 4 || (*line)[3] != '-') return reply;
    }
  }

  // command - send line + CRLF and read the reply.
  std::string command(const std::string& line, milliseconds timeout = kWait) {
    if (!send(line + "\r\n", timeout)) return "<send failed>";
    return read_reply(timeout);
  }

  // wait_closed - true once the server has closed the connection (EOF or reset) within
  // timeout; unread data before EOF is kept in the buffer.
  bool wait_closed(milliseconds timeout = kWait) {
    Deadline deadline(timeout);
    while (!eof_) {
      if (deadline.expired()) return false;
      fill(std::min(deadline.remaining_ms(), 20));
    }
    return true;
  }

  // pending - bytes received but not yet returned as lines.
  const std::string& pending() const { return buf_; }

  // poll_once - read what is available now (no waiting); lets a test check "nothing has
  // arrived" without a sleep.
  void poll_once() { fill(0); }

 private:
  void wait_fd(short events, int timeout_ms);
  void fill(int timeout_ms) {
    if (fd_.get() < 0) {
      eof_ = true;
      return;
    }
    wait_fd(POLLIN, timeout_ms);
    char tmp[65536];
    for (;;) {
      ssize_t n = ::recv(fd_.get(), tmp, sizeof tmp, 0);
      if (n > 0) {
        buf_.append(tmp, static_cast<std::size_t>(n));
        continue;
      }
      if (n == 0) {
        eof_ = true;
        return;
      }
      if (errno == EINTR) continue;
      if (errno != EAGAIN && errno != EWOULDBLOCK) eof_ = true;  // reset counts as closed
      return;
    }
  }

  OwnedFd fd_;
  std::string buf_;
  bool eof_ = false;
  ServerProcess* server_ = nullptr;
};

// ServerProcess - the smtpd binary under test, started with args; waits for the
// "listening on HOST:PORT" line on stderr. Destructor: SIGKILL and reap if still running.
class ServerProcess {
 public:
  // start - spawn smtpd_bin() with args. Does not wait for the listening line.
  static ServerProcess start(const std::vector<std::string>& args, int max_open_files = 0) {
    std::vector<std::string> argv{smtpd_bin()};
    argv.insert(argv.end(), args.begin(), args.end());
    ServerProcess s;
    s.args_ = args;
    s.child = Child::spawn(argv, max_open_files);
    return s;
  }

  // launch - start and wait for the listening line; throws std::runtime_error with the
  // server's stderr if it does not appear within timeout.
  static ServerProcess launch(const std::vector<std::string>& args, milliseconds timeout = kWait,
                              int max_open_files = 0) {
    ServerProcess s = start(args, max_open_files);
    if (!s.wait_listening(timeout)) {
      s.child.pump();
      std::string err = s.child.err.text();
      std::string why = s.child.running() ? "no listening line within timeout"
                                          : "exited: " + s.child.status()->describe();
      throw std::runtime_error("smtpd " + s.args_text() + " did not start (" + why +
                               "); stderr: " + err);
    }
    return s;
  }

  // wait_listening - read stderr until a line "listening on HOST:PORT"; parses host/port.
  bool wait_listening(milliseconds timeout = kWait) {
    const std::string tag = "listening on ";
    bool seen = child.wait_output(
        child.err,
        [&](const std::string& t) {
          auto pos = t.find(tag);
          return pos != std::string::npos && t.find('\n', pos) != std::string::npos;
        },
        timeout);
    if (!seen) return false;
    const std::string& t = child.err.text();
    auto pos = t.find(tag);
    listening_line_ = t.substr(pos, t.find('\n', pos) - pos);
    std::string hostport = listening_line_.substr(tag.size());
    auto colon = hostport.rfind(':');
    if (colon == std::string::npos) return false;
    host_ = hostport.substr(0, colon);
    if (host_.size() >= 2 && host_.front() == '[' && host_.back() == ']')
      host_ = host_.substr(1, host_.size() - 2);
    try {
      port_ = std::stoi(hostport.substr(colon + 1));
    } catch (...) {
      return false;
    }
    return port_ > 0;
  }

  const std::string& host() const { return host_; }
  int port() const { return port_; }
  // address - HOST:PORT as it announced them, to give another server as its upstream
  std::string address() const { return format_endpoint(host_, static_cast<unsigned>(port_)); }
  const std::string& listening_line() const { return listening_line_; }
  std::string args_text() const {
    std::string s;
    for (const auto& a : args_) s += (s.empty() ? "" : " ") + a;
    return s;
  }

  // connect - a client to the address the server announced.
  Client connect(milliseconds timeout = kWait, int rcvbuf_bytes = 0) {
    return Client::connect(host_, port_, this, timeout, rcvbuf_bytes);
  }

  // stdout_text / stderr_text - everything the server printed so far (drains first).
  const std::string& stdout_text() {
    child.pump();
    return child.out.text();
  }
  const std::string& stderr_text() {
    child.pump();
    return child.err.text();
  }

  // wait_stdout - wait until stdout contains needle `times` times (bounded).
  bool wait_stdout(const std::string& needle, std::size_t times = 1, milliseconds timeout = kWait) {
    return child.wait_output(
        child.out, [&](const std::string& t) { return count(t, needle) >= times; }, timeout);
  }
  bool wait_stderr(const std::string& needle, milliseconds timeout = kWait) {
    return child.wait_output(
        child.err, [&](const std::string& t) { return t.find(needle) != std::string::npos; },
        timeout);
  }

  // stop - SIGTERM (or sig), then wait up to timeout for the exit; SIGKILL after that.
  ExitStatus stop(int sig = SIGTERM, milliseconds timeout = kWait) {
    child.send_signal(sig);
    return child.wait_exit(timeout);
  }

  Child child;

 private:
  std::vector<std::string> args_;
  std::string host_;
  int port_ = 0;
  std::string listening_line_;
};

inline void Client::wait_fd(short events, int timeout_ms) {
  if (server_) {
    server_->child.pump();
    // Wake up for either the socket or the server's pipes, whichever comes first.
    Deadline deadline{milliseconds(timeout_ms)};
    for (;;) {
      std::vector<pollfd> fds{{fd_.get(), events, 0}};
      if (server_->child.out.fd() >= 0) fds.push_back({server_->child.out.fd(), POLLIN, 0});
      if (server_->child.err.fd() >= 0) fds.push_back({server_->child.err.fd(), POLLIN, 0});
      int rc = ::poll(fds.data(), fds.size(), deadline.remaining_ms());
      server_->child.pump();
      if (rc <= 0 || fds[0].revents != 0 || deadline.expired()) return;
    }
  }
  pollfd p{fd_.get(), events, 0};
  ::poll(&p, 1, timeout_ms);
}

inline Client Client::connect(const std::string& host, int port, ServerProcess* server,
                              milliseconds timeout, int rcvbuf_bytes) {
  // A numeric address only (AI_NUMERICHOST): no name lookup, so nothing leaves loopback.
  addrinfo hints{};
  hints.ai_flags = AI_NUMERICHOST | AI_NUMERICSERV;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (::getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0)
    throw std::runtime_error("not a numeric IP address: " + host);
  sockaddr_storage ss{};
  std::memcpy(&ss, found->ai_addr, found->ai_addrlen);
  socklen_t len = found->ai_addrlen;
  int family = found->ai_family;
  ::freeaddrinfo(found);
  Client c;
  c.server_ = server;
  c.fd_.reset(::socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (c.fd_.get() < 0) throw std::runtime_error(std::string("socket: ") + std::strerror(errno));
  int one = 1;
  ::setsockopt(c.fd_.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (rcvbuf_bytes > 0)
    ::setsockopt(c.fd_.get(), SOL_SOCKET, SO_RCVBUF, &rcvbuf_bytes, sizeof rcvbuf_bytes);
  if (::connect(c.fd_.get(), reinterpret_cast<sockaddr*>(&ss), len) != 0) {
    if (errno != EINPROGRESS)
      throw std::runtime_error("connect " + host + ":" + std::to_string(port) + ": " +
                               std::strerror(errno));
    pollfd p{c.fd_.get(), POLLOUT, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) != 1)
      throw std::runtime_error("connect " + host + ":" + std::to_string(port) + ": timeout");
    int err = 0;
    socklen_t elen = sizeof err;
    ::getsockopt(c.fd_.get(), SOL_SOCKET, SO_ERROR, &err, &elen);
    if (err != 0)
      throw std::runtime_error("connect " + host + ":" + std::to_string(port) + ": " +
                               std::strerror(err));
  }
  return c;
}

// ==== 5. Fixtures ====

// have_ipv6_loopback - true if a TCP socket can bind to [::1]:0 on this machine.
inline bool have_ipv6_loopback() {
  int fd = ::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_in6 a{};
  a.sin6_family = AF_INET6;
  a.sin6_addr = in6addr_loopback;
  bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0;
  ::close(fd);
  return ok;
}

// loopback_socket - a TCP socket bound to 127.0.0.1:<kernel-chosen port>; returns the port.
inline int loopback_socket(int& fd) {
  fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) throw std::runtime_error("socket failed");
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), len) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    int err = errno;
    ::close(fd);
    throw std::runtime_error(std::string("bind 127.0.0.1:0: ") + std::strerror(err));
  }
  return ntohs(a.sin_port);
}

// IdlePort - a port on 127.0.0.1 that never answers, for as long as this object lives
// (nobody else can take the port). Closed: bound but not listening, so a connection is
// refused. Silent: listening but never accepting, so connections complete (the kernel queues
// up to 64) and never hear a greeting. Full: listening with its accept queue already full
// (one connection made here fills a backlog of 0): Linux then drops further SYNs, so a
// connect neither succeeds nor fails until the connecting side gives up.
class IdlePort {
 public:
  enum Kind { Closed, Silent, Full };
  explicit IdlePort(Kind kind) {
    int fd = -1;
    port_ = loopback_socket(fd);
    fd_.reset(fd);
    if (kind != Closed && ::listen(fd, kind == Full ? 0 : 64) != 0)
      throw std::runtime_error("listen failed");
    if (kind == Full) filler_ = Client::connect("127.0.0.1", port_);
  }
  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  OwnedFd fd_;
  int port_ = 0;
  Client filler_;  // closed before fd_
};

// TempFile - a file under $TMPDIR (or /tmp) with the given contents, removed at scope end.
class TempFile {
 public:
  explicit TempFile(const std::string& contents) {
    const char* dir = std::getenv("TMPDIR");
    std::string tmpl = std::string(dir && *dir ? dir : "/tmp") + "/smtpd-test-XXXXXX";
    std::vector<char> name(tmpl.begin(), tmpl.end());
    name.push_back('\0');
    int fd = ::mkstemp(name.data());
    if (fd < 0) throw std::runtime_error("mkstemp failed");
    path_ = name.data();
    std::size_t off = 0;
    while (off < contents.size()) {
      ssize_t n = ::write(fd, contents.data() + off, contents.size() - off);
      if (n <= 0 && errno != EINTR) break;
      if (n > 0) off += static_cast<std::size_t>(n);
    }
    ::close(fd);
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  ~TempFile() { ::unlink(path_.c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// AsanOptionsAdded - while it lives, ASAN_OPTIONS has `more` appended, for the servers started
// meanwhile (smtpd-asan reads it at start; other builds ignore it); then the old value is back
class AsanOptionsAdded {
 public:
  explicit AsanOptionsAdded(const std::string& more) {
    const char* now = std::getenv("ASAN_OPTIONS");
    had_value_ = now != nullptr;
    saved_ = now ? now : "";
    ::setenv("ASAN_OPTIONS", (saved_ + ":" + more).c_str(), 1);
  }
  AsanOptionsAdded(const AsanOptionsAdded&) = delete;
  AsanOptionsAdded& operator=(const AsanOptionsAdded&) = delete;
  ~AsanOptionsAdded() {
    if (had_value_)
      ::setenv("ASAN_OPTIONS", saved_.c_str(), 1);
    else
      ::unsetenv("ASAN_OPTIONS");
  }

 private:
  bool had_value_ = false;
  std::string saved_;
};

// ignore_sigpipe - writing to a closed socket must fail with EPIPE, not kill the tests.
// (send uses MSG_NOSIGNAL; this also covers anything else.)
inline void ignore_sigpipe() { ::signal(SIGPIPE, SIG_IGN); }

#ifdef __linux__
// proc_status - the first number after `field` (such as "VmRSS:") in /proc/PID/status, or -1.
inline long proc_status(pid_t pid, const std::string& field) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line))
    if (starts_with(line, field)) return std::stol(line.substr(field.size()));
  return -1;
}

// rss_kb - resident memory of a process in kB, or -1.
inline long rss_kb(pid_t pid) { return proc_status(pid, "VmRSS:"); }

// cpu_seconds - user + system CPU time a process has used so far, from /proc/PID/stat, or -1.
inline double cpu_seconds(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string text((std::istreambuf_iterator<char>(stat)), std::istreambuf_iterator<char>());
  auto paren = text.rfind(')');  // the command name in brackets may hold spaces
  if (paren == std::string::npos) return -1;
  std::istringstream fields(text.substr(paren + 2));
  std::vector<std::string> f;
  for (std::string w; fields >> w;) f.push_back(w);
  if (f.size() < 13) return -1;  // f[0] is field 3 (state); utime is field 14, stime 15
  return static_cast<double>(std::stoll(f[11]) + std::stoll(f[12])) /
         static_cast<double>(::sysconf(_SC_CLK_TCK));
}

// cpu_used_over - the CPU seconds srv uses in the next `window`, its stderr drained meanwhile
// (a flood of log lines must not block it into looking idle); -1 if /proc cannot be read
inline double cpu_used_over(ServerProcess& srv, milliseconds window) {
  double before = cpu_seconds(srv.child.pid());
  srv.child.wait_output(
      srv.child.err, [](const std::string&) { return false; }, window);
  double after = cpu_seconds(srv.child.pid());
  return before < 0 || after < 0 ? -1 : after - before;
}
#endif

// list_dir - the names in a directory (without . and ..), sorted; empty if it cannot be read.
inline std::vector<std::string> list_dir(const std::string& path) {
  std::vector<std::string> names;
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) return names;
  while (dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

// TempDir - a fresh directory under $TMPDIR (or /tmp), removed with its contents at scope end.
class TempDir {
 public:
  TempDir() {
    const char* dir = std::getenv("TMPDIR");
    std::string tmpl = std::string(dir && *dir ? dir : "/tmp") + "/smtpd-test-XXXXXX";
    std::vector<char> name(tmpl.begin(), tmpl.end());
    name.push_back('\0');
    if (::mkdtemp(name.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = name.data();
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() { run_command({"rm", "-rf", path_}, std::chrono::milliseconds(10000)); }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

  std::vector<std::string> files() const { return list_dir(path_); }

 private:
  std::string path_;
};

// read_file - the whole file as bytes; "" if it cannot be read.
inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

inline void write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// Script - a shell script written into a temporary directory; command() is its --exec.
// Inside the script $D is that directory. (shell_quote is smtpd.cpp's, which builds the
// Mailman 2 command line the same way.)
class Script {
 public:
  explicit Script(const std::string& body) {
    write_file(dir_ / "script.sh", "D=" + shell_quote(dir_.path()) + "\n" + body);
  }
  std::string command() const { return "sh " + shell_quote(dir_ / "script.sh"); }
  std::string operator/(const std::string& name) const { return dir_ / name; }
  const std::string& path() const { return dir_.path(); }

 private:
  TempDir dir_;
};

// ==== 6. smtpd ====

constexpr const char* kDataReply = "354 End data with <CR><LF>.<CR><LF>";
constexpr const char* kFollows = "---------- MESSAGE FOLLOWS ----------\n";
constexpr const char* kEnd = "------------ END MESSAGE ------------\n";

// start_smtpd - smtpd -n [options] ADDRESS, once it says it is listening (-n: it never
// drops privileges, so the test can kill it). ADDRESS is the last argument: a proxy's
// upstream, with its local address at the end of options.
inline ServerProcess start_smtpd(std::vector<std::string> options = {},
                                 const std::string& address = "127.0.0.1:0") {
  ignore_sigpipe();
  options.insert(options.begin(), "-n");
  options.push_back(address);
  return ServerProcess::launch(options);
}

// run_smtpd - run smtpd with args to completion (bounded), as a user on a shell would.
inline CommandResult run_smtpd(const std::vector<std::string>& args,
                               milliseconds timeout = milliseconds(10000)) {
  std::vector<std::string> argv{smtpd_bin()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, timeout);
}

// check_one_error_line - exit status `code`, nothing on stdout, exactly one line on stderr
// starting "smtpd: ".
inline void check_one_error_line(const CommandResult& r, int code) {
  INFO(r.describe());
  CHECK(r.status.exited);
  CHECK(r.status.code == code);
  CHECK(r.out == "");
  CHECK(starts_with(r.err, "smtpd: "));
  CHECK(count(r.err, "\n") == 1);
  CHECK((!r.err.empty() && r.err.back() == '\n'));
}

// read_greeting - read the 220 greeting (REQUIREd); returns the host name it gives.
inline std::string read_greeting(Client& c) {
  std::string greeting = c.read_reply();
  REQUIRE_MESSAGE(starts_with(greeting, "220 "), "greeting: " << greeting);
  auto sp = greeting.find(' ', 4);
  return greeting.substr(4, sp == std::string::npos ? std::string::npos : sp - 4);
}

// greet - read the greeting and say EHLO (or `helo`), REQUIREing 220 and 250; returns the
// reply to EHLO.
inline std::string greet(Client& c, const std::string& helo = "EHLO client.example") {
  read_greeting(c);
  std::string reply = c.command(helo);
  REQUIRE_MESSAGE(starts_with(reply, "250"), helo << " -> " << reply);
  return reply;
}

// greeted_client - a client of srv that has read the greeting and said EHLO (see greet).
inline Client greeted_client(ServerProcess& srv) {
  Client c = srv.connect();
  greet(c);
  return c;
}

// Outcome - the replies of one transaction; a step not reached stays "" (with several
// recipients, rcpt is the last reply).
struct Outcome {
  std::string mail, rcpt, data, end;
  bool accepted() const { return starts_with(end, "250"); }
};

// open_data - MAIL FROM:`mail` (the address in <> and any parameters), RCPT TO each of
// rcpts, DATA; stops at the first step not answered 250 (354 for DATA).
inline Outcome open_data(Client& c, const std::string& mail = "<a@example.com>",
                         const std::vector<std::string>& rcpts = {"b@example.com"}) {
  Outcome o;
  o.mail = c.command("MAIL FROM:" + mail);
  for (std::size_t i = 0; i < rcpts.size() && starts_with(o.mail, "250"); ++i) {
    o.rcpt = c.command("RCPT TO:<" + rcpts[i] + ">");
    if (!starts_with(o.rcpt, "250")) return o;
  }
  if (starts_with(o.rcpt, "250")) o.data = c.command("DATA");
  return o;
}

// try_wire - open_data, then `wire` (CRLF, already dot-stuffed, without the final dot) and
// "." once DATA is answered 354. Tolerates refusals: for upstreams and refusing modes.
inline Outcome try_wire(Client& c, const std::string& wire,
                        const std::string& mail = "<a@example.com>",
                        const std::vector<std::string>& rcpts = {"b@example.com"},
                        milliseconds timeout = kWait) {
  Outcome o = open_data(c, mail, rcpts);
  if (o.data == kDataReply && c.send(wire, timeout)) o.end = c.command(".", timeout);
  return o;
}

// require_open - REQUIRE the replies our own server gives an accepted envelope.
inline void require_open(const Outcome& o) {
  REQUIRE(o.mail == "250 OK");
  REQUIRE(o.rcpt == "250 OK");
  REQUIRE(o.data == kDataReply);
}

// begin_data - open_data, REQUIREing 250 OK for each step and 354 for DATA.
inline void begin_data(Client& c, const std::string& mail = "<a@example.com>",
                       const std::vector<std::string>& rcpts = {"b@example.com"}) {
  require_open(open_data(c, mail, rcpts));
}

// send_wire - try_wire on a greeted client, REQUIREing the envelope accepted; returns the
// reply to the final dot ("" if the text could not be sent).
inline std::string send_wire(Client& c, const std::string& wire,
                             const std::string& mail = "<a@example.com>",
                             const std::vector<std::string>& rcpts = {"b@example.com"},
                             milliseconds timeout = kWait) {
  Outcome o = try_wire(c, wire, mail, rcpts, timeout);
  require_open(o);
  return o.end;
}

// send_mail - send_wire with a message written with "\n" line ends (see on_the_wire).
inline std::string send_mail(Client& c, const std::string& message,
                             const std::string& mail = "<a@example.com>") {
  return send_wire(c, on_the_wire(message), mail);
}

// stored_envelope - the lines --maildir and --mbox write before a message: Return-Path with
// the sender ("" for <>), then Delivered-To for each recipient
inline std::string stored_envelope(const std::string& from = "a@example.com",
                                   const std::vector<std::string>& rcpts = {"b@example.com"}) {
  std::string lines = "Return-Path: <" + from + ">\n";
  for (const std::string& rcpt : rcpts) lines += "Delivered-To: <" + rcpt + ">\n";
  return lines;
}

// printed - the block DebuggingServer prints for a message with these header lines and
// body lines (each given with "\n" ends) from peer.
inline std::string printed(const std::string& headers, const std::string& body,
                           const std::string& peer = "127.0.0.1") {
  return std::string(kFollows) + headers + "X-Peer: " + peer + "\n\n" + body + kEnd;
}

// start_proxy - ./smtpd -n -c PureProxy [options] 127.0.0.1:0 UPSTREAM, listening.
inline ServerProcess start_proxy(const std::string& upstream,
                                 std::vector<std::string> options = {}) {
  options.insert(options.begin(), {"-c", "PureProxy"});
  options.push_back("127.0.0.1:0");
  return start_smtpd(options, upstream);
}

// swaks - swaks sends one message from app@example.com to user@example.com to srv, with
// these extra switches (a later --to or --from wins); bounded
inline CommandResult swaks(const ServerProcess& srv, const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv{require_tool("swaks", "swaks"), "--server", "127.0.0.1", "--port",
                                std::to_string(srv.port())};
  for (const char* option : {"--from", "app@example.com", "--to", "user@example.com"})
    argv.push_back(option);
  argv.insert(argv.end(), {"--timeout", "10"});
  argv.insert(argv.end(), extra.begin(), extra.end());
  return run_command(argv);
}

// curl_send - curl uploads FILE to URL (smtp:// or smtps://) from app@ to user@example.com
inline CommandResult curl_send(const std::string& url, const std::string& file,
                               const std::vector<std::string>& extra = {}) {
  std::vector<std::string> argv{
      require_tool("curl", "curl"), "-sS", "--max-time", "10", "--url", url};
  for (const char* option : {"--mail-from", "app@example.com", "--mail-rcpt", "user@example.com"})
    argv.push_back(option);
  argv.insert(argv.end(), {"--upload-file", file});
  argv.insert(argv.end(), extra.begin(), extra.end());
  return run_command(argv);
}

// kSmtplibScript - python3 -c script; argv: port, user ("" for no login), password, recipient.
// Prints "sent", or the exception's class and SMTP code and exits 1.
constexpr const char* kSmtplibScript = R"PY(
import smtplib, sys
port, user, password, rcpt = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
try:
    with smtplib.SMTP('127.0.0.1', port, timeout=10) as s:
        if user:
            s.login(user, password)
        s.sendmail('app@example.com', [rcpt], b'Subject: from smtplib\r\n\r\nHello.\r\n')
    print('sent')
except smtplib.SMTPException as e:
    print(type(e).__name__, getattr(e, 'smtp_code', ''))
    sys.exit(1)
)PY";

// smtplib - Python's smtplib sends one message to srv, logging in first unless user is ""
inline CommandResult smtplib(const ServerProcess& srv, const std::string& user = "",
                             const std::string& password = "",
                             const std::string& rcpt = "user@example.com") {
  return run_command({require_tool("python3", "python3"), "-c", kSmtplibScript,
                      std::to_string(srv.port()), user, password, rcpt});
}

// ==== 7. Upstreams ====

// free_port - a TCP port on 127.0.0.1 that was free a moment ago (for programs that cannot
// be told to pick their own, as smtp-sink cannot).
inline int free_port() {
  int fd = -1;
  int port = loopback_socket(fd);
  ::close(fd);
  return port;
}

// smtp_sink_path - /usr/sbin/smtp-sink (not on every PATH), or one on PATH; fails the test
// naming the package.
inline std::string smtp_sink_path() {
  const std::string path = "/usr/sbin/smtp-sink";
  return ::access(path.c_str(), X_OK) == 0 ? path : require_tool("smtp-sink", "postfix");
}

// SmtpSink - Postfix's smtp-sink on 127.0.0.1:<free port> with the given switches, writing
// each transaction to its own file in a temporary directory (-d). The file starts at MAIL
// with smtp-sink's own X-... and Received: lines, gets the message text as it arrives (CRs
// and the stuffed dots taken out), ends with an empty line when "." arrives, and is deleted
// if the transaction is abandoned (RSET, QUIT or a disconnect before ".").
//
// As root smtp-sink insists on -u USER. We pass the user we already are (root): switching to
// nobody would change the effective uid, and the kernel then drops the parent-death signal
// test_support.hpp sets, so a crashed test run would leave smtp-sink listening forever.
class SmtpSink {
 public:
  explicit SmtpSink(std::vector<std::string> switches = {}) {
    std::string program = smtp_sink_path();
    std::string last_error;
    for (int attempt = 0; attempt < 5; ++attempt) {  // the free port may be taken meanwhile
      port_ = free_port();
      std::vector<std::string> argv{program};
      if (::geteuid() == 0) {
        const passwd* pw = ::getpwuid(0);
        argv.insert(argv.end(), {"-u", pw ? pw->pw_name : "root"});
      }
      argv.insert(argv.end(), {"-d", dir_.path() + "/msg."});
      argv.insert(argv.end(), switches.begin(), switches.end());
      argv.insert(argv.end(), {"127.0.0.1:" + std::to_string(port_), "64"});
      child = Child::spawn(argv);
      if (wait_ready()) return;
      child.pump();
      last_error = child.err.text();
      child = Child();
    }
    throw std::runtime_error("smtp-sink did not start: " + last_error);
  }

  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

  // dump_count - how many transactions smtp-sink has on file right now.
  std::size_t dump_count() const { return dir_.files().size(); }

  // dumps - the contents of the dump files, in name order (names are random).
  std::vector<std::string> dumps() const {
    std::vector<std::string> out;
    for (const std::string& f : dir_.files()) {
      std::ifstream in(dir_.path() + "/" + f, std::ios::binary);
      out.emplace_back(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    return out;
  }

  // messages - the message part of each dump: everything after smtp-sink's three-line
  // Received: header ("Received: ...", "\tby ...", "\t<date>").
  std::vector<std::string> messages() const {
    std::vector<std::string> out;
    for (const std::string& d : dumps()) {
      auto by = d.find("\n\tby ");
      auto by_end = by == std::string::npos ? by : d.find('\n', by + 1);
      auto date_end = by_end == std::string::npos ? by_end : d.find('\n', by_end + 1);
      out.push_back(date_end == std::string::npos ? "<no Received header in:>" + d
                                                  : d.substr(date_end + 1));
    }
    return out;
  }

  // header - the value of smtp-sink's X-... line named name in dump d ("" if none).
  static std::string header(const std::string& d, const std::string& name) {
    for (const std::string& line : lines_of(d))
      if (starts_with(line, name + ": ")) return line.substr(name.size() + 2);
    return "";
  }

  Child child;

 private:
  // wait_ready - true once smtp-sink greets a connection; false if it exited (port taken).
  bool wait_ready() {
    Deadline deadline(kWait);
    while (!deadline.expired()) {
      child.pump();
      if (!child.running()) return false;
      try {
        Client probe = Client::connect("127.0.0.1", port_, nullptr, milliseconds(500));
        if (starts_with(probe.read_reply(milliseconds(1000)), "220 smtp-sink")) return true;
      } catch (const std::exception&) {
        // not listening yet
      }
      std::this_thread::sleep_for(milliseconds(10));
    }
    return false;
  }

  TempDir dir_;
  int port_ = 0;
};

// StandInUpstream - a stand-in upstream server for tests, in threads of this process. It
// listens on 127.0.0.1:<free port> from construction, so address() is known at once; start()
// runs a thread that accepts connections and hands each to the script, one at a time in that
// thread or each in a thread of its own (Serving::Concurrently). The connection is closed
// when the script returns. It stops at stop(), when it goes out of scope, or when its lifetime
// is up, whichever comes first: scripts wait in steps of at most kStepMs and return soon
// after stopping() turns true, so stop() (which joins every thread) is bounded in time.
// An owner whose script uses its members declares it last, so it stops before they go.
class StandInUpstream {
 public:
  enum class Serving { OneAtATime, Concurrently };
  static constexpr int kStepMs = 20;
  static constexpr milliseconds kLifetime{60000};

  // Connection - one accepted connection as the script sees it
  class Connection {
   public:
    Connection(int fd, const StandInUpstream& server) : fd_(fd), server_(server) {}
    int fd() const { return fd_.get(); }
    bool stopping() const { return server_.stopping(); }

    // say - send reply and CRLF at once (a few lines: the socket buffer takes them)
    void say(const std::string& reply) const {
      std::string line = reply + "\r\n";
      ::send(fd(), line.data(), line.size(), MSG_NOSIGNAL);
    }

    // receive - wait for the next bytes the peer sends and keep them for read_line; false
    // once the peer has closed or the server is stopping
    bool receive() {
      while (!stopping()) {
        pollfd p{fd(), POLLIN, 0};
        if (::poll(&p, 1, kStepMs) <= 0) continue;
        char buf[4096];
        ssize_t n = ::recv(fd(), buf, sizeof buf, 0);
        if (n <= 0) return false;
        in_.append(buf, static_cast<std::size_t>(n));
        return true;
      }
      return false;
    }

    // read_line - the next line the peer sends, without its CRLF; nullopt once the peer has
    // closed or the server is stopping
    std::optional<std::string> read_line() {
      std::size_t end;
      while ((end = in_.find("\r\n")) == std::string::npos)
        if (!receive()) return std::nullopt;
      std::string line = in_.substr(0, end);
      in_.erase(0, end + 2);
      return line;
    }

   private:
    OwnedFd fd_;
    const StandInUpstream& server_;
    std::string in_;
  };
  using Script = std::function<void(Connection&)>;

  explicit StandInUpstream(int backlog = 16) {
    int fd = -1;
    port_ = loopback_socket(fd);
    listener_.reset(fd);
    if (::listen(fd, backlog) != 0) throw std::runtime_error("listen failed");
  }
  StandInUpstream(const StandInUpstream&) = delete;
  StandInUpstream& operator=(const StandInUpstream&) = delete;
  ~StandInUpstream() { stop(); }

  // start - accept connections and run script on each until stop() or lifetime is up
  void start(Script script, Serving serving = Serving::OneAtATime,
             milliseconds lifetime = kLifetime) {
    script_ = std::move(script);
    serving_ = serving;
    end_ = Clock::now() + lifetime;
    acceptor_ = std::thread([this] { accept_connections(); });
  }

  // stop - end the threads and wait for them; the listener closes (new connections are
  // refused). Safe to call again.
  void stop() {
    stop_ = true;
    if (acceptor_.joinable()) acceptor_.join();
    for (std::thread& t : sessions_) t.join();  // the acceptor, which adds them, has ended
    sessions_.clear();
    listener_.reset();
  }

  bool stopping() const { return stop_ || Clock::now() >= end_; }
  int port() const { return port_; }
  std::string address() const { return "127.0.0.1:" + std::to_string(port_); }

 private:
  void accept_connections() {
    while (!stopping()) {
      pollfd p{listener_.get(), POLLIN, 0};
      if (::poll(&p, 1, kStepMs) <= 0) continue;
      int fd = ::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC);
      if (fd < 0) continue;
      if (serving_ == Serving::Concurrently)
        sessions_.emplace_back([this, fd] { serve(fd); });
      else
        serve(fd);
    }
  }

  void serve(int fd) {
    Connection connection(fd, *this);
    script_(connection);
  }

  OwnedFd listener_;
  int port_ = 0;
  Script script_;
  Serving serving_ = Serving::OneAtATime;
  Clock::time_point end_;
  std::atomic<bool> stop_{false};
  std::thread acceptor_;
  std::vector<std::thread> sessions_;  // Serving::Concurrently: one a connection
};

}  // namespace smtpd_test

#endif  // _WIN32
#endif  // SMTPD_TEST_SUPPORT_HPP
