// smtpd.cpp - a small SMTP server for tests, debugging and relaying.
//
// A native successor to Python's `python -m smtpd` (removed in Python 3.12): the same command
// line, the same replies byte for byte, in one C++17 file with no run-time dependencies.
//
//   Build:  g++ -std=c++17 -O2 smtpd.cpp -o smtpd        (needs cxxopts.hpp, header-only)
//   Run:    ./smtpd -n -c DebuggingServer localhost:1025
//
// Licence: MIT. See README.md and man/smtpd.1 for the user's side.
//
// Contents
//   1. Includes
//   2. Limits and defaults
//   3. Platform layer        (the only place that knows Windows from POSIX: sockets, signals,
//                             synced files, child processes, socket addresses)
//   4. Small utilities       (strings as Python sees them, JSON, base64, patterns, dates)
//   5. Addresses             (the part of Python's email address parser that smtpd uses)
//   6. Replies               (every reply text, named)
//   7. SMTP channel          (the pure state machine: bytes in, replies and questions out)
//   8. Reactor               (sockets, timers and deferred tasks; PollReactor on poll())
//   9. Modes                 (what the server asks a mode, and how the mode answers)
//  10. Reading mail          (headers, MIME parts, charsets: what a mail client would show)
//  11. Message texts         (a message held once, made into what goes out a chunk at a time)
//  12. Local delivery        (stdout and stderr, the print-out, Maildir, mbox, --exec;
//                             SMTPServer and DebuggingServer)
//  13. SMTP client           (a non-blocking client session with an upstream server)
//  14. Relays                (PureProxy, MailmanProxy)
//  15. Transports and TLS    (plain TCP, and OpenSSL with make TLS=1)
//  16. Server                (listeners, connections, the exit policy, the server loop)
//  17. Command line          (the option table, addresses, validation, the start in order)
//  18. main                  (left out when SMTPD_NO_MAIN is defined, for the unit tests)

// ==== 1. Includes ====

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#ifdef _WIN32
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <direct.h>
#include <fcntl.h>
#include <io.h>
#include <process.h>
#include <sys/stat.h>
#include <windows.h>
#include <winsock2.h>
#include <ws2tcpip.h>
#else
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
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
#endif

// iconv(3), for the charsets section 10 has no table for: in the C library of glibc, musl and
// the BSDs, in libiconv on macOS (the Makefile links it there). MinGW has none: on Windows a
// body in such a charset is kept undecoded.
#if !defined(_WIN32) && defined(__has_include)
#if __has_include(<iconv.h>)
#include <iconv.h>
#define SMTPD_ICONV 1
#endif
#endif

#include <cxxopts.hpp>

#ifdef SMTPD_TLS  // make TLS=1: OpenSSL 1.1.1 or later
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#endif

// ==== 2. Limits and defaults ====
// Every tunable, with its unit and where the number comes from. Runtime options take their
// defaults from here, and their help texts name these values.

constexpr const char* kVersion = "smtpd 1.0.0";
constexpr std::size_t kCommandSizeLimit = 512;  // smtpd.py command_size_limit; RFC 5321 4.5.3.1.4
constexpr std::size_t kSizeParamExtra = 26;  // smtpd.py: MAIL may grow by 26 with SIZE (RFC 1870)
constexpr std::size_t kSmtpUtf8Extra = 10;   // smtpd.py: MAIL may grow by 10 with SMTPUTF8
constexpr std::size_t kLongestCommand = kCommandSizeLimit + kSizeParamExtra + kSmtpUtf8Extra;
constexpr std::uint64_t kDataSizeDefault = 33554432;  // smtpd.py DATA_SIZE_DEFAULT (32 MiB)
// --max-recipients: RFC 5321 4.5.3.1.8 asks for at least 100; Postfix allows 1000. Without a
// cap, 100,000 long recipients would cost 50 MB in one session.
constexpr std::size_t kMaxRecipientsDefault = 1000;
// AUTH: failed attempts a session gets before it hears 421 and is closed. A client that knows
// its password needs one try per mechanism; Postfix closes after 20 errors of any kind.
constexpr unsigned kAuthFailureLimit = 10;
constexpr const char* kDefaultLocal = "localhost:8025";        // smtpd.py's default local address
constexpr const char* kDefaultRemote = "localhost:25";         // smtpd.py's default upstream
constexpr const char* kDefaultMailmanLmtp = "127.0.0.1:8024";  // Mailman 3's lmtp_host/port
constexpr std::size_t kReadChunk = 64 * 1024;                  // bytes read from a socket at once
constexpr std::size_t kInputBacklog = 256 * 1024;   // unprocessed input before we stop reading
constexpr std::size_t kOutputBacklog = 256 * 1024;  // unsent replies before we stop reading
constexpr int kListenBacklog = 128;  // smtpd.py uses 5; a burst of test clients needs more
[[maybe_unused]] constexpr long kSelfSignedDays = 30;  // --tls: the throwaway certificate's days
constexpr int kPortAttempts = 16;    // port 0 on several addresses: ports tried until one is
                                     // free on all of them
constexpr int kAcceptBurst = 64;     // connections accepted per loop turn, so reads still run
constexpr int kPollWakeMs = 1000;    // longest poll() sleep; signals usually wake it sooner
constexpr int kAcceptPauseMs = 250;  // out of file descriptors: wait this long before accepting
constexpr unsigned long kMaxDescriptors = 1UL << 20;  // the soft limit is raised up to this
constexpr long long kConnectTimeoutMs = 30 * 1000;    // --connect-timeout: reaching the upstream
// --reply-timeout: each upstream reply. RFC 5321 4.5.3.2 gives clients 5 minutes for most
// replies, so a 2-minute upstream limit still answers our client (451) before it gives up.
constexpr long long kReplyTimeoutMs = 120 * 1000;
// One upstream reply, all its lines: an EHLO reply has about 15 lines and 300 bytes, so these
// only stop an upstream that never ends its reply, which would otherwise fill our memory.
constexpr std::size_t kUpstreamReplyLimit = 64 * 1024;  // bytes
constexpr std::size_t kUpstreamReplyLines = 200;        // lines
constexpr std::size_t kUpstreamReadChunk = 16 * 1024;   // bytes read from the upstream at once
constexpr std::size_t kUpstreamSendChunk = 1 << 20;     // bytes handed to one send() upstream
constexpr std::size_t kQuotedReplyLimit = 200;   // bytes of an upstream reply quoted in our 451
constexpr std::size_t kQuotedLineLimit = 80;     // bytes of a bad upstream line quoted in a log
constexpr std::size_t kTraceLineLimit = 200;     // bytes of a client's command line shown by -d
constexpr long long kExecTimeoutMs = 30 * 1000;  // --exec-timeout: one run of the --exec command
constexpr std::size_t kExecOutputLimit = 4096;   // bytes of its output kept (the reply is line 1)
constexpr std::size_t kExecPipeChunk = 1 << 16;  // bytes moved through its pipes at once
constexpr std::size_t kReplyLineLimit = 510;     // RFC 5321 4.5.3.1.5: 512 with the CRLF
constexpr int kExecReapPollMs = 10;              // how often to look for its exit status
constexpr int kKillWaitRounds = 100;             // after a kill, looked for this often (1 s)
// --exec: SMTPD_RCPTTOS is left out above this size (Linux refuses a variable over 128 KiB
// and all of them over about 2 MB: the command would not start); SMTPD_RCPTTOS_FILE always
// has the list
constexpr std::size_t kExecVariableLimit = 64 * 1024;
constexpr int kExitFlushRounds = 20;   // at exit, queued replies get this many tries to leave,
constexpr int kExitFlushPauseMs = 50;  // this far apart (1 s in all)
// --timeout: RFC 5321 4.5.3.2 gives a server at least 5 minutes for each command; a client
// that trickles bytes cannot stretch one command past it. In DATA the time runs
// between reads, and the whole message gets kDataDeadlineFactor times as long.
constexpr long long kCommandTimeoutMs = 300 * 1000;
constexpr long long kDataDeadlineFactor = 10;
constexpr int kDrainGraceMs = 5000;
// SIGTERM/SIGINT: sessions in the middle of DATA (or waiting for its verdict) get this long to
// finish before they hear 421; idle ones hear it at once
constexpr int kShutdownGraceMs = 5000;
// --max-clients with --tls-implicit: a client over the limit is told so inside TLS, so the
// handshake runs first; this many at once, each for at most this long. Past that it is
// closed without a word (a flood of handshakes must not cost more than the clients served).
constexpr std::size_t kTurnAwayHandshakes = 64;
constexpr long long kTurnAwayTimeoutMs = 10 * 1000;
// stdout and stderr on a pipe nobody reads: trace lines queue up to this much,
// then are dropped and counted; at exit, what is queued gets this long to leave
constexpr std::size_t kTraceBacklog = 256 * 1024;
// A message on its way out (to a file, a command, a stream or an upstream server) is made a
// chunk of this many bytes at a time from the one copy held, never as a second whole copy
// (a whole JSON copy of a message is 1.33 times its size, and the escaping more)
constexpr std::size_t kTextChunk = 1 << 16;
constexpr int kOutputDrainMs = 2000;   // at exit: longest wait for stdout and stderr to drain
constexpr int kMboxLockWaitMs = 5000;  // --mbox: longest wait for another program's lock. The loop
                                       // has one thread, so a longer wait would stall every client;
                                       // past it the client gets 451 and retries.
constexpr int kLockRetryMs = 10;       // --mbox: pause between two attempts to take the lock
// Reading mail (section 10): what one message may cost the reader. Real mail nests 3 or 4
// deep (mixed > alternative > related, a forwarded message one more) and has a few dozen
// parts; Postfix stops at 100 levels (mime_nesting_limit). Each level reads its lines once
// for its boundary, so the depth also bounds the work: at most 32 passes over a message.
constexpr std::size_t kMimeDepthLimit = 32;     // multipart levels read; a deeper one is listed
constexpr std::size_t kMimePartLimit = 1000;    // parts read; past it the rest are not read
constexpr std::size_t kMimeHeaderLimit = 1000;  // fields kept of one part (a long relay path's
                                                // Received lines fit); the rest are skipped
constexpr std::size_t kMimeParamLimit = 64;     // parameters of one Content-Type: 1 to 3 in real
                                                // mail, a long RFC 2231 file name a few dozen
// bytes of text and HTML bodies decoded and held for one message: the default message size
// (kDataSizeDefault), so any message at the default limit is decoded; a part past it is not
constexpr std::size_t kMimeDecodedLimit = 32 * 1024 * 1024;
constexpr std::size_t kMimeLinkLimit = 1000;  // links kept of one message
// smtpd --wait: how often the Maildir is listed while waiting. Four times a second costs
// next to nothing (two directory reads) and sees a message within a quarter of a second.
constexpr int kWaitPollMs = 250;
constexpr std::size_t kReasonLimit = 400;  // bytes of an error in a 451 reply; RFC 5321 4.5.3.1.5
                                           // allows 512 per reply line

// ==== 3. Platform layer ====
// Sockets, poll, signals and synced files differ between Windows and POSIX; the difference
// stops here. Nothing below this section spells closesocket, WSAGetLastError, errno for
// sockets, fsync, or _WIN32.
//   socket_t, kInvalidSocket, close_socket, poll_sockets, last_socket_error, sleep_ms,
//   would_block, set_nonblocking, socket_error_text, SocketRuntime, install_stop_handlers,
//   drop_privileges, open_standard_descriptors, File, make_directory, rename_file, remove_file,
//   sync_directory, process_id

#ifdef _WIN32
using socket_t = SOCKET;
using pollfd_t = WSAPOLLFD;
constexpr socket_t kInvalidSocket = INVALID_SOCKET;
constexpr int kSendFlags = 0;

// close_socket - release a socket handle
inline void close_socket(socket_t s) { closesocket(s); }
inline void sleep_ms(int ms) { Sleep(static_cast<DWORD>(ms)); }

// poll_sockets - WSAPoll; with no sockets it fails on Windows, so sleep instead
inline int poll_sockets(pollfd_t* fds, std::size_t n, int timeout_ms) {
  if (n == 0) {
    sleep_ms(timeout_ms);
    return 0;
  }
  return WSAPoll(fds, static_cast<ULONG>(n), timeout_ms);
}
inline int last_socket_error() { return WSAGetLastError(); }
inline bool would_block(int err) { return err == WSAEWOULDBLOCK || err == WSAEINTR; }
inline bool interrupted(int err) { return err == WSAEINTR; }
inline void set_close_on_exec(socket_t) {}  // Windows handles are not inherited by default
inline bool set_nonblocking(socket_t s) {
  u_long on = 1;
  return ioctlsocket(s, FIONBIO, &on) == 0;
}
inline std::string socket_error_text(int err) {
  char buf[256] = {0};
  FormatMessageA(FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS, nullptr,
                 static_cast<DWORD>(err), 0, buf, sizeof buf, nullptr);
  std::string text(buf);
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == '.'))
    text.pop_back();
  return text.empty() ? "socket error " + std::to_string(err) : text;
}
inline bool address_in_use(int err) { return err == WSAEADDRINUSE; }
inline bool address_unavailable(int err) {
  return err == WSAEADDRNOTAVAIL || err == WSAEAFNOSUPPORT;
}
inline bool out_of_descriptors(int err) { return err == WSAEMFILE || err == WSAENOBUFS; }
inline bool connect_in_progress(int err) { return err == WSAEWOULDBLOCK || err == WSAEINPROGRESS; }

// SocketRuntime - WSAStartup for the lifetime of the server
struct SocketRuntime {
  SocketRuntime() {
    WSADATA data;
    WSAStartup(MAKEWORD(2, 2), &data);
  }
  ~SocketRuntime() { WSACleanup(); }
};

std::atomic<bool> g_stop_requested{false};
inline BOOL WINAPI on_console_event(DWORD) {
  if (g_stop_requested.exchange(true)) std::_Exit(130);  // the second one: at once
  return TRUE;
}
// install_stop_handlers - Ctrl-C and console close end the loop cleanly
inline void install_stop_handlers() { SetConsoleCtrlHandler(on_console_event, TRUE); }
// binary_stdout - the C runtime's text mode would turn each "\n" of a printed message into
// "\r\n"; messages go out as the bytes they are, as on POSIX
inline void binary_stdout() { _setmode(_fileno(stdout), _O_BINARY); }
inline bool running_as_root() { return false; }
inline void raise_descriptor_limit() {}     // WSAPoll has no per-process descriptor limit to raise
inline void open_standard_descriptors() {}  // sockets are handles, never the CRT's 0, 1 or 2
inline bool set_output_nonblocking(int) { return false; }  // WSAPoll takes sockets only
inline long write_output(int fd, const char* data, std::size_t size) {
  return _write(fd, data, static_cast<unsigned>(std::min<std::size_t>(size, 1 << 30)));
}
inline bool drop_privileges(std::string& error) {
  error.clear();
  return true;  // Windows has no setuid; -n is implied
}

#else
using socket_t = int;
using pollfd_t = struct pollfd;
constexpr socket_t kInvalidSocket = -1;
#ifdef MSG_NOSIGNAL
constexpr int kSendFlags = MSG_NOSIGNAL;
#else
constexpr int kSendFlags = 0;
#endif

inline void close_socket(socket_t s) { ::close(s); }
inline int poll_sockets(pollfd_t* fds, std::size_t n, int timeout_ms) {
  return ::poll(fds, static_cast<nfds_t>(n), timeout_ms);
}
inline int last_socket_error() { return errno; }
inline void sleep_ms(int ms) { ::poll(nullptr, 0, ms); }
inline bool would_block(int err) { return err == EAGAIN || err == EWOULDBLOCK || err == EINTR; }
inline bool interrupted(int err) { return err == EINTR; }
inline bool set_nonblocking(socket_t s) {
  int flags = fcntl(s, F_GETFL, 0);
  return flags >= 0 && fcntl(s, F_SETFL, flags | O_NONBLOCK) == 0;
}
inline std::string socket_error_text(int err) { return std::strerror(err); }
// set_close_on_exec - a command run by --exec must not inherit our sockets: a client's
// connection would stay open (after its 221) as long as the command runs
inline void set_close_on_exec(socket_t s) { fcntl(s, F_SETFD, FD_CLOEXEC); }
inline bool address_in_use(int err) { return err == EADDRINUSE; }
// address_unavailable - this machine has no such address or family (IPv6 turned off)
inline bool address_unavailable(int err) { return err == EADDRNOTAVAIL || err == EAFNOSUPPORT; }
inline bool out_of_descriptors(int err) {
  return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}
inline bool connect_in_progress(int err) { return err == EINPROGRESS || err == EINTR; }

struct SocketRuntime {};

std::atomic<bool> g_stop_requested{false};
// on_stop_signal - the first SIGINT/SIGTERM asks for a graceful stop; a second ends us at once
extern "C" inline void on_stop_signal(int sig) {
  if (g_stop_requested.exchange(true)) _exit(128 + sig);
}

// install_stop_handlers - SIGINT/SIGTERM end the loop; no SA_RESTART so poll() wakes at once
inline void install_stop_handlers() {
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = 0;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a client that hangs up must not kill the server
}
inline bool running_as_root() { return geteuid() == 0; }
inline void binary_stdout() {}  // POSIX streams have no text mode

// set_output_nonblocking - stdout or stderr on a pipe or socket could wait forever for its
// reader: its writes fail with EAGAIN instead. Files and terminals stay blocking
// (O_NONBLOCK on a terminal would reach the shell that shares it).
inline bool set_output_nonblocking(int fd) {
  struct stat st {};
  if (fstat(fd, &st) != 0 || !(S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode))) return false;
  int flags = fcntl(fd, F_GETFL);
  return flags >= 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}
inline long write_output(int fd, const char* data, std::size_t size) {
  return static_cast<long>(::write(fd, data, size));
}

// open_standard_descriptors - 0, 1 and 2 on /dev/null where they are closed.
// Started with them closed (smtpd <&- >&-), the listener and the first clients would take
// those numbers, and a message printed on "stdout" would go to another client's socket.
inline void open_standard_descriptors() {
  for (int fd = 0; fd <= 2; ++fd) {
    if (fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    int opened = ::open("/dev/null", fd == 0 ? O_RDONLY : O_WRONLY);  // the lowest free: fd
    if (opened > 2) ::close(opened);  // cannot happen while fd is free; never hold it open
  }
}

// raise_descriptor_limit - each client is a descriptor, and the usual soft limit (1024) is far
// below what the loop can hold; take what the hard limit allows, as servers commonly do
inline void raise_descriptor_limit() {
  struct rlimit limit {};
  if (getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur >= limit.rlim_max) return;
  limit.rlim_cur = std::min<rlim_t>(limit.rlim_max, kMaxDescriptors);
  setrlimit(RLIMIT_NOFILE, &limit);
}

// drop_privileges - become user nobody (groups first: after setuid we could not change them)
inline bool drop_privileges(std::string& error) {
  struct passwd* nobody = getpwnam("nobody");
  if (nobody == nullptr) {
    error = "cannot change to user nobody: no such user; try running with -n";
    return false;
  }
  if (setgroups(0, nullptr) != 0 || setgid(nobody->pw_gid) != 0 || setuid(nobody->pw_uid) != 0) {
    error = std::string("cannot change to user nobody: ") + std::strerror(errno) +
            "; try running with -n";
    return false;
  }
  return true;
}

#endif

// Child processes for --exec: /bin/sh -c COMMAND in its own process group, with pipes for its
// standard input and output that the loop polls like sockets. POSIX only for now: on Windows
// CreateProcess with overlapped pipes does not fit WSAPoll, which polls sockets only.
//   ChildProcess, spawn_shell, kill_child, reap_child, PipeResult, read_pipe, write_pipe,
//   close_pipe, kCanRunCommands; detach, kCanDetach (--background)
#ifdef _WIN32
using process_t = int;
#else
using process_t = pid_t;
#endif
struct ChildProcess {
  process_t pid = -1;
  socket_t to_child = kInvalidSocket;    // its standard input
  socket_t from_child = kInvalidSocket;  // its standard output
};

// PipeResult - one non-blocking read or write on a pipe: bytes moved, nothing yet (it would
// block), or the end (end of output, or a command that stopped reading: EPIPE)
struct PipeResult {
  enum class Status { Ok, WouldBlock, End } status;
  std::size_t bytes;
};

#ifdef _WIN32
constexpr bool kCanRunCommands = false;
inline bool spawn_shell(const std::string&, const std::vector<std::pair<std::string, std::string>>&,
                        ChildProcess&, std::string& error) {
  error = "running commands is not supported on Windows yet";
  return false;
}
inline void kill_child(const ChildProcess&) {}
inline bool reap_child(const ChildProcess&, int& exit_code) {
  exit_code = -1;
  return true;
}
inline PipeResult read_pipe(socket_t, char*, std::size_t) { return {PipeResult::Status::End, 0}; }
inline PipeResult write_pipe(socket_t, const char*, std::size_t) {
  return {PipeResult::Status::End, 0};
}
inline void close_pipe(socket_t) {}
constexpr bool kCanDetach = false;
inline long detach(std::string& error) {
  error = "--background is not available on Windows";
  return -1;
}
#else
constexpr bool kCanRunCommands = true;
constexpr bool kCanDetach = true;

// detach - --background: fork; the parent gets the child's pid, the child 0 and goes on in
// a session of its own with stdin on /dev/null. Its stdout and stderr stay where they are
// when they are files or terminals; a pipe or socket is replaced by /dev/null, or a shell's
// $(smtpd --background ...) would wait for the server to end. -1 and `error` when fork fails.
inline long detach(std::string& error) {
  std::fflush(stdout);
  std::fflush(stderr);
  pid_t pid = fork();
  if (pid != 0) {
    if (pid < 0) error = std::string("cannot fork: ") + std::strerror(errno);
    return pid;
  }
  setsid();
  int null = ::open("/dev/null", O_RDWR);
  if (null < 0) return 0;  // as good as we can do: the descriptors stay as they are
  dup2(null, 0);
  for (int fd : {1, 2}) {
    struct stat st {};
    if (fstat(fd, &st) != 0 || S_ISFIFO(st.st_mode) || S_ISSOCK(st.st_mode)) dup2(null, fd);
  }
  if (null > 2) ::close(null);
  return 0;
}

// spawn_shell - start `sh -c command` with extra environment variables; false and `error`
// when it could not start
inline bool spawn_shell(const std::string& command,
                        const std::vector<std::pair<std::string, std::string>>& environment,
                        ChildProcess& child, std::string& error) {
  int in[2], out[2];
  if (pipe(in) != 0) return error = std::strerror(errno), false;
  if (pipe(out) != 0) {
    error = std::strerror(errno);
    ::close(in[0]), ::close(in[1]);
    return false;
  }
  pid_t pid = fork();
  if (pid < 0) {
    error = std::strerror(errno);
    for (int fd : {in[0], in[1], out[0], out[1]}) ::close(fd);
    return false;
  }
  if (pid == 0) {   // the child: only async-signal-safe calls matter here, and setenv is fine
    setpgid(0, 0);  // so a timeout can kill what the command started too
    dup2(in[0], 0);
    dup2(out[1], 1);
    for (int fd : {in[0], in[1], out[0], out[1]}) ::close(fd);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    for (const auto& [name, value] : environment) setenv(name.c_str(), value.c_str(), 1);
    execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
    const char* why = std::strerror(errno);  // said on our stderr, not only as exit status 127
    static const char kPrefix[] = "smtpd: cannot run /bin/sh for --exec: ";
    if (::write(2, kPrefix, sizeof kPrefix - 1) > 0 && ::write(2, why, std::strlen(why)) > 0)
      (void)!::write(2, "\n", 1);
    _exit(127);
  }
  setpgid(pid, pid);  // also here, so the group exists before we might kill it
  ::close(in[0]);
  ::close(out[1]);
  child.pid = pid;
  child.to_child = in[1];
  child.from_child = out[0];
  set_nonblocking(child.to_child);
  set_nonblocking(child.from_child);
  fcntl(child.to_child, F_SETFD, FD_CLOEXEC);
  fcntl(child.from_child, F_SETFD, FD_CLOEXEC);
  return true;
}

// kill_child - the command and everything it started
inline void kill_child(const ChildProcess& child) {
  if (child.pid > 0) kill(-child.pid, SIGKILL);
}

// reap_child - true once the child has ended; exit_code is its status, or 128+signal
inline bool reap_child(const ChildProcess& child, int& exit_code) {
  int status = 0;
  pid_t done = waitpid(child.pid, &status, WNOHANG);
  if (done == 0) return false;
  if (done < 0) return exit_code = -1, true;
  exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return true;
}

// pipe_result - what read() or write() on a non-blocking pipe returned, as a PipeResult
inline PipeResult pipe_result(ssize_t n) {
  if (n > 0) return {PipeResult::Status::Ok, static_cast<std::size_t>(n)};
  if (n < 0 && would_block(errno)) return {PipeResult::Status::WouldBlock, 0};
  return {PipeResult::Status::End, 0};
}
inline PipeResult read_pipe(socket_t fd, char* buffer, std::size_t size) {
  return pipe_result(::read(fd, buffer, size));
}
inline PipeResult write_pipe(socket_t fd, const char* data, std::size_t size) {
  return pipe_result(::write(fd, data, size));
}

inline void close_pipe(socket_t fd) {
  if (fd != kInvalidSocket) ::close(fd);
}
#endif

// shell_quote - one word for sh -c, quoted so the shell takes it literally
inline std::string shell_quote(const std::string& word) {
  std::string out = "'";
  for (char c : word) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// Socket addresses, the same on both systems once the headers above are in.
//   Endpoint, format_endpoint, numeric_address, resolve_endpoint, start_connect, connect_error

struct Endpoint {
  std::string host;  // as given: a name, an IPv4 address or an IPv6 address without brackets
  std::uint16_t port = 0;
};

// format_endpoint - "127.0.0.1:8025" or "[::1]:8025"
inline std::string format_endpoint(const std::string& host, unsigned port) {
  if (host.find(':') != std::string::npos) return "[" + host + "]:" + std::to_string(port);
  return host + ":" + std::to_string(port);
}

// numeric_address - IP address text and port of a socket address
inline std::pair<std::string, unsigned> numeric_address(const sockaddr* addr, socklen_t len) {
  char host[NI_MAXHOST] = {0}, serv[NI_MAXSERV] = {0};
  if (getnameinfo(addr, len, host, sizeof host, serv, sizeof serv,
                  NI_NUMERICHOST | NI_NUMERICSERV) != 0)
    return {"?", 0};
  std::string text = host;
  if (text.rfind("::ffff:", 0) == 0 && text.find('.') != std::string::npos)
    text = text.substr(7);  // an IPv4 client on a dual-stack socket
  return {text, static_cast<unsigned>(std::atoi(serv))};
}

// SocketAddress - one resolved address, ready for connect()
struct SocketAddress {
  sockaddr_storage storage{};
  socklen_t length = 0;
  int family = AF_INET;
};

// resolve_endpoint - every address of a host, in getaddrinfo's order; empty on failure
inline std::vector<SocketAddress> resolve_endpoint(const Endpoint& where, std::string& error) {
  struct addrinfo hints {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  struct addrinfo* found = nullptr;
  std::string port = std::to_string(where.port);
  std::vector<SocketAddress> addresses;
  int rc = getaddrinfo(where.host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0) {
    error = gai_strerror(rc);
    return addresses;
  }
  for (struct addrinfo* a = found; a != nullptr; a = a->ai_next) {
    SocketAddress address;
    std::memcpy(&address.storage, a->ai_addr, a->ai_addrlen);
    address.length = static_cast<socklen_t>(a->ai_addrlen);
    address.family = a->ai_family;
    addresses.push_back(address);
  }
  freeaddrinfo(found);
  return addresses;
}

// start_connect - a non-blocking connect; kInvalidSocket and `error` when it failed at once
inline socket_t start_connect(const SocketAddress& to, std::string& error) {
  socket_t s = socket(to.family, SOCK_STREAM, 0);
  if (s == kInvalidSocket) {
    error = socket_error_text(last_socket_error());
    return s;
  }
  set_close_on_exec(s);
  if (!set_nonblocking(s)) {
    error = socket_error_text(last_socket_error());
    close_socket(s);
    return kInvalidSocket;
  }
  int on = 1;
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&on), sizeof on);
  if (connect(s, reinterpret_cast<const sockaddr*>(&to.storage), to.length) != 0) {
    int err = last_socket_error();
    if (!connect_in_progress(err)) {
      error = socket_error_text(err);
      close_socket(s);
      return kInvalidSocket;
    }
  }
  return s;
}

// connect_error - after a non-blocking connect became writable: 0, or why it failed
inline int connect_error(socket_t s) {
  int err = 0;
  socklen_t len = sizeof err;
  if (getsockopt(s, SOL_SOCKET, SO_ERROR, reinterpret_cast<char*>(&err), &len) != 0)
    return last_socket_error();
  return err;
}

// is_loopback_host - "localhost", ::1 or a dotted quad in 127.0.0.0/8: where a relay is not
// an open relay. A name that merely starts with "127." (127.example.net) is not loopback.
inline bool is_loopback_host(const std::string& host) {
  if (host == "localhost" || host == "::1") return true;
  int parts = 0;
  for (std::size_t start = 0; start != std::string::npos; ++parts) {
    std::size_t dot = host.find('.', start);
    std::string part = host.substr(start, dot == std::string::npos ? dot : dot - start);
    bool number = !part.empty() && part.size() <= 3 &&
                  part.find_first_not_of("0123456789") == std::string::npos &&
                  std::stoi(part) <= 255;
    if (!number || (parts == 0 && part != "127")) return false;
    start = dot == std::string::npos ? dot : dot + 1;
  }
  return parts == 4;
}

// Files, for the Maildir and mbox outputs: a message counts as kept only once it is on disk,
// so they need fsync, an atomic rename, a whole-file lock and a directory sync. File is a
// descriptor that closes itself; every call returns false with "what PATH: reason" in error.
//   File (create_new, open_append, write_all, sync, lock, size, truncate, close),
//   make_directory, rename_file, remove_file, sync_directory, process_id, kPathSeparators,
//   path_exists, read_whole_file, list_directory

// fail_path - error = "what PATH: reason"; returns false
inline bool fail_path(const char* what, const std::string& path, std::string& error, int err) {
  error = std::string(what) + " " + path + ": " + std::strerror(err);
  return false;
}

class File {
 public:
  File() = default;
  ~File() {
    std::string ignored;
    close(ignored);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  bool create_new(const std::string& path, std::string& error);   // fails if it exists
  bool open_append(const std::string& path, std::string& error);  // created if missing
  bool write_all(std::string_view data, std::string& error);
  bool sync(std::string& error);
  bool lock(int timeout_ms, std::string& error);  // exclusive, whole file; close releases it
  bool size(std::int64_t& bytes, std::string& error);
  void truncate(std::int64_t bytes);  // best effort: undo a half-written append
  bool close(std::string& error);

 private:
  bool open(const std::string& path, int flags, std::string& error);
  bool fail(const char* what, std::string& error, int err) const {
    return fail_path(what, path_, error, err);
  }
  int fd_ = -1;
  std::string path_;
};

#ifdef _WIN32
constexpr const char* kPathSeparators = "/\\";
constexpr int kCreateNewFlags = _O_WRONLY | _O_CREAT | _O_EXCL | _O_BINARY | _O_NOINHERIT;
constexpr int kAppendFlags = _O_WRONLY | _O_APPEND | _O_CREAT | _O_BINARY | _O_NOINHERIT;

inline bool File::open(const std::string& path, int flags, std::string& error) {
  path_ = path;
  fd_ = _open(path.c_str(), flags, _S_IREAD | _S_IWRITE);
  return fd_ >= 0 || fail("cannot open", error, errno);
}
inline bool File::write_all(std::string_view data, std::string& error) {
  while (!data.empty()) {
    unsigned chunk = static_cast<unsigned>(std::min<std::size_t>(data.size(), 1u << 30));
    int n = _write(fd_, data.data(), chunk);
    if (n <= 0) return fail("cannot write", error, n < 0 ? errno : ENOSPC);
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}
inline bool File::sync(std::string& error) {
  return _commit(fd_) == 0 || fail("cannot sync", error, errno);
}
// lock - LockFileEx over the largest range; retried so a busy file cannot hang the loop
inline bool File::lock(int timeout_ms, std::string& error) {
  HANDLE handle = reinterpret_cast<HANDLE>(_get_osfhandle(fd_));
  for (int waited = 0;; waited += kLockRetryMs) {
    OVERLAPPED at{};
    if (LockFileEx(handle, LOCKFILE_EXCLUSIVE_LOCK | LOCKFILE_FAIL_IMMEDIATELY, 0, MAXDWORD,
                   MAXDWORD, &at))
      return true;
    DWORD err = GetLastError();
    if (err != ERROR_LOCK_VIOLATION || waited >= timeout_ms) {
      error = "cannot lock " + path_ + ": " +
              (err == ERROR_LOCK_VIOLATION ? std::string("locked by another program")
                                           : socket_error_text(static_cast<int>(err)));
      return false;
    }
    sleep_ms(kLockRetryMs);
  }
}
inline bool File::size(std::int64_t& bytes, std::string& error) {
  bytes = _filelengthi64(fd_);
  return bytes >= 0 || fail("cannot measure", error, errno);
}
inline void File::truncate(std::int64_t bytes) { (void)_chsize_s(fd_, bytes); }
inline bool File::close(std::string& error) {
  if (fd_ < 0) return true;
  int rc = _close(fd_);
  fd_ = -1;
  return rc == 0 || fail("cannot close", error, errno);
}

// make_directory - _mkdir; an existing one is fine
inline bool make_directory(const std::string& path, std::string& error) {
  if (_mkdir(path.c_str()) == 0 || errno == EEXIST) return true;
  return fail_path("cannot create directory", path, error, errno);
}
// rename_file - replaces the target, as POSIX rename does
inline bool rename_file(const std::string& from, const std::string& to, std::string& error) {
  if (MoveFileExA(from.c_str(), to.c_str(), MOVEFILE_REPLACE_EXISTING | MOVEFILE_WRITE_THROUGH))
    return true;
  error = "cannot rename " + from + " to " + to + ": " +
          socket_error_text(static_cast<int>(GetLastError()));
  return false;
}
inline void remove_file(const std::string& path) { _unlink(path.c_str()); }
// sync_directory - Windows cannot sync a directory; MOVEFILE_WRITE_THROUGH stands in for it
inline bool sync_directory(const std::string&, std::string&) { return true; }
inline long process_id() { return static_cast<long>(_getpid()); }
#else
constexpr const char* kPathSeparators = "/";
constexpr int kCreateNewFlags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC;
constexpr int kAppendFlags = O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC;

// open - new files are 0600: mail is private
inline bool File::open(const std::string& path, int flags, std::string& error) {
  path_ = path;
  do fd_ = ::open(path.c_str(), flags, 0600);
  while (fd_ < 0 && errno == EINTR);
  return fd_ >= 0 || fail("cannot open", error, errno);
}
inline bool File::write_all(std::string_view data, std::string& error) {
  while (!data.empty()) {
    ssize_t n = ::write(fd_, data.data(), data.size());
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail("cannot write", error, n < 0 ? errno : ENOSPC);
    data.remove_prefix(static_cast<std::size_t>(n));
  }
  return true;
}
inline bool File::sync(std::string& error) {
  return ::fsync(fd_) == 0 || fail("cannot sync", error, errno);
}
// lock - an fcntl write lock on the whole file, as mutt and Python's mailbox take; retried
// with F_SETLK rather than waiting in F_SETLKW, so a lock held for long gives an error
// instead of a server that stops answering everyone.
inline bool File::lock(int timeout_ms, std::string& error) {
  for (int waited = 0;; waited += kLockRetryMs) {
    struct flock whole {};
    whole.l_type = F_WRLCK;
    whole.l_whence = SEEK_SET;  // l_start 0, l_len 0: the whole file, however long it grows
    if (::fcntl(fd_, F_SETLK, &whole) == 0) return true;
    int err = errno;
    bool is_busy = err == EACCES || err == EAGAIN;
    if (!is_busy && err != EINTR) return fail("cannot lock", error, err);
    if (waited >= timeout_ms) {
      error = "cannot lock " + path_ + ": locked by another program for " +
              std::to_string(timeout_ms / 1000) + " s";
      return false;
    }
    sleep_ms(kLockRetryMs);
  }
}
inline bool File::size(std::int64_t& bytes, std::string& error) {
  struct stat info {};
  if (::fstat(fd_, &info) != 0) return fail("cannot measure", error, errno);
  bytes = static_cast<std::int64_t>(info.st_size);
  return true;
}
inline void File::truncate(std::int64_t bytes) {
  int rc;
  do rc = ::ftruncate(fd_, static_cast<off_t>(bytes));
  while (rc != 0 && errno == EINTR);
}
inline bool File::close(std::string& error) {
  if (fd_ < 0) return true;
  int rc = ::close(fd_);  // not retried on EINTR: on Linux the descriptor is gone either way
  fd_ = -1;
  return rc == 0 || fail("cannot close", error, errno);
}

// make_directory - mkdir with mode 0700; an existing one is fine
inline bool make_directory(const std::string& path, std::string& error) {
  if (::mkdir(path.c_str(), 0700) == 0 || errno == EEXIST) return true;
  return fail_path("cannot create directory", path, error, errno);
}
inline bool rename_file(const std::string& from, const std::string& to, std::string& error) {
  if (::rename(from.c_str(), to.c_str()) == 0) return true;
  error = "cannot rename " + from + " to " + to + ": " + std::strerror(errno);
  return false;
}
inline void remove_file(const std::string& path) { ::unlink(path.c_str()); }
// sync_directory - fsync a directory, so a rename into it survives a crash
inline bool sync_directory(const std::string& path, std::string& error) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return fail_path("cannot open", path, error, errno);
  bool is_synced = ::fsync(fd) == 0;
  int err = errno;
  ::close(fd);
  return is_synced || fail_path("cannot sync", path, error, err);
}
inline long process_id() { return static_cast<long>(::getpid()); }
#endif

// path_exists - a file or directory is there (Mailman 2's lists/NAME/config.pck)
inline bool path_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// read_whole_file - all of a file's bytes into text; false and `error` when it cannot be read
inline bool read_whole_file(const std::string& path, std::string& text, std::string& error) {
  std::FILE* file = std::fopen(path.c_str(), "rb");
  if (file == nullptr) return fail_path("cannot read", path, error, errno);
  text.clear();
  char buffer[4096];
  for (std::size_t n; (n = std::fread(buffer, 1, sizeof buffer, file)) > 0;) text.append(buffer, n);
  bool is_read = !std::ferror(file);
  std::fclose(file);
  if (!is_read) error = "cannot read " + path;
  return is_read;
}

#ifdef _WIN32
// list_directory - the names in a directory but . and .., in no order; empty if it cannot be read
inline std::vector<std::string> list_directory(const std::string& path) {
  std::vector<std::string> names;
  WIN32_FIND_DATAA found;
  HANDLE search = FindFirstFileA((path + "\\*").c_str(), &found);
  if (search == INVALID_HANDLE_VALUE) return names;
  do {
    std::string name = found.cFileName;
    if (name != "." && name != "..") names.push_back(name);
  } while (FindNextFileA(search, &found));
  FindClose(search);
  return names;
}
#else
inline std::vector<std::string> list_directory(const std::string& path) {
  std::vector<std::string> names;
  DIR* dir = ::opendir(path.c_str());
  if (dir == nullptr) return names;
  while (const struct dirent* entry = ::readdir(dir)) {
    std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(dir);
  return names;
}
#endif

inline bool File::create_new(const std::string& path, std::string& error) {
  return open(path, kCreateNewFlags, error);
}
inline bool File::open_append(const std::string& path, std::string& error) {
  return open(path, kAppendFlags, error);
}

// ==== 4. Small utilities ====
// Python's str methods as smtpd.py uses them (strip, split, upper, isalnum, isdigit), a UTF-8
// check, Python's repr of a str for the "mail options:" line, JSON strings, base64,
// shell-style patterns, a seeded random source, the asctime and RFC 5322 dates, wall-clock
// time, durations as text (seconds_text), and our name (getfqdn).

// decode_utf8_at - code point at s[i] and its length; false for a malformed sequence
inline bool decode_utf8_at(std::string_view s, std::size_t i, std::uint32_t& cp, std::size_t& len) {
  auto byte = [&](std::size_t k) { return static_cast<unsigned char>(s[k]); };
  unsigned char c = byte(i);
  if (c < 0x80) {
    cp = c;
    len = 1;
    return true;
  }
  std::uint32_t min;
  if ((c & 0xE0) == 0xC0) {
    cp = c & 0x1F, len = 2, min = 0x80;
  } else if ((c & 0xF0) == 0xE0) {
    cp = c & 0x0F, len = 3, min = 0x800;
  } else if ((c & 0xF8) == 0xF0) {
    cp = c & 0x07, len = 4, min = 0x10000;
  } else {
    return false;
  }
  if (i + len > s.size()) return false;
  for (std::size_t k = 1; k < len; ++k) {
    if ((byte(i + k) & 0xC0) != 0x80) return false;
    cp = (cp << 6) | (byte(i + k) & 0x3F);
  }
  // Overlong forms, surrogates and values past U+10FFFF are what Python's decoder refuses.
  return cp >= min && cp <= 0x10FFFF && !(cp >= 0xD800 && cp <= 0xDFFF);
}

// is_valid_utf8 - would Python's bytes.decode('utf-8') accept these bytes?
inline bool is_valid_utf8(std::string_view s) {
  std::uint32_t cp;
  std::size_t len;
  for (std::size_t i = 0; i < s.size(); i += len)
    if (!decode_utf8_at(s, i, cp, len)) return false;
  return true;
}

// is_python_space - str.isspace() for one code point
inline bool is_python_space(std::uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20) || cp == 0x85 || cp == 0xA0 ||
         cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
         cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

// space_length_at - bytes of the Python whitespace character at s[i], or 0
inline std::size_t space_length_at(std::string_view s, std::size_t i) {
  std::uint32_t cp;
  std::size_t len;
  if (!decode_utf8_at(s, i, cp, len)) return 0;
  return is_python_space(cp) ? len : 0;
}

// python_lstrip - str.lstrip() with no argument
inline std::string_view python_lstrip(std::string_view s) {
  std::size_t i = 0, len;
  while (i < s.size() && (len = space_length_at(s, i)) > 0) i += len;
  return s.substr(i);
}

// python_strip - str.strip() with no argument (whitespace is at most 3 bytes in UTF-8)
inline std::string_view python_strip(std::string_view s) {
  s = python_lstrip(s);
  bool trimmed = true;
  while (trimmed && !s.empty()) {
    trimmed = false;
    for (std::size_t len = 1; len <= 3 && len <= s.size(); ++len) {
      if (space_length_at(s, s.size() - len) == len) {
        s.remove_suffix(len);
        trimmed = true;
        break;
      }
    }
  }
  return s;
}

// python_split - str.split() with no argument
inline std::vector<std::string> python_split(std::string_view s) {
  std::vector<std::string> words;
  std::size_t i = 0;
  while (i < s.size()) {
    std::size_t len = space_length_at(s, i);
    if (len > 0) {
      i += len;
      continue;
    }
    std::size_t start = i;
    while (i < s.size() && space_length_at(s, i) == 0) i += 1;
    words.emplace_back(s.substr(start, i - start));
  }
  return words;
}

// ascii_upper - upper-case ASCII letters; other bytes unchanged
// differs from smtpd.py: str.upper() also upper-cases non-ASCII letters; no SMTP verb or
// parameter has any, so only the echo of an unknown non-ASCII verb can differ.
inline std::string ascii_upper(std::string_view s) {
  std::string out(s);
  for (char& c : out)
    if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
  return out;
}

inline bool is_ascii_alnum(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

// python_isalnum - str.isalnum(): non-empty, letters and digits (non-ASCII counted as letters)
inline bool python_isalnum(std::string_view s) {
  if (s.empty()) return false;
  for (char c : s)
    if (!is_ascii_alnum(c) && static_cast<unsigned char>(c) < 0x80) return false;
  return true;
}

// is_decimal - str.isdigit() for ASCII: non-empty and only 0-9
inline bool is_decimal(std::string_view s) {
  return !s.empty() && std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// python_repr - repr() of a str, as "mail options: [...]" prints each option
inline std::string python_repr(std::string_view s) {
  bool has_single = s.find('\'') != std::string_view::npos;
  bool has_double = s.find('"') != std::string_view::npos;
  char quote = (has_single && !has_double) ? '"' : '\'';
  std::string out(1, quote);
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (ch == '\\' || ch == quote) {
      out += '\\';
      out += ch;
    } else if (ch == '\t') {
      out += "\\t";
    } else if (ch == '\n') {
      out += "\\n";
    } else if (ch == '\r') {
      out += "\\r";
    } else if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += ch;  // non-ASCII: printable characters stay as they are, as in Python 3
    }
  }
  out += quote;
  return out;
}

// python_list_repr - repr() of a list of str: ['A', 'B']
inline std::string python_list_repr(const std::vector<std::string>& items) {
  std::string out = "[";
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ", ";
    out += python_repr(items[i]);
  }
  return out + "]";
}

// printable - bytes made safe for a one-line log or error message: control characters as
// \xNN, and with keep_non_ascii false the bytes above 0x7F too: a reply that echoes part of a
// command is ASCII unless the transaction is SMTPUTF8, as smtpd.py encodes its replies
inline std::string printable(std::string_view s, bool keep_non_ascii = true) {
  std::string out;
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7F || (c > 0x7F && !keep_non_ascii)) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out;
}

// json_escape_into - s inside a JSON string (RFC 8259 section 7), appended to out: quotes,
// backslashes and control characters escaped; bytes that are not UTF-8 become U+FFFD, so the
// output always parses
inline void json_escape_into(std::string& out, std::string_view s) {
  std::uint32_t cp;
  std::size_t len;
  for (std::size_t i = 0; i < s.size(); i += len) {
    if (!decode_utf8_at(s, i, cp, len)) {
      out += "\\ufffd";
      len = 1;
      continue;
    }
    switch (cp) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (cp < 0x20 || cp == 0x7F) {
          char buf[16];
          std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(cp));
          out += buf;
        } else {
          out.append(s.data() + i, len);
        }
    }
  }
}

// json_string - s as a JSON string, quoted
inline std::string json_string(std::string_view s) {
  std::string out = "\"";
  json_escape_into(out, s);
  return out + "\"";
}

// json_list - a list of strings as a JSON array: ["a", "b"], spaced as Python's json.dumps
inline std::string json_list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (std::size_t i = 0; i < items.size(); ++i) out += (i > 0 ? ", " : "") + json_string(items[i]);
  return out + "]";
}

// base64_encode_into - RFC 4648 section 4, with padding and no line breaks, appended to out;
// bytes given in several calls must come in multiples of 3 but for the last
inline void base64_encode_into(std::string& out, std::string_view bytes) {
  static const char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  for (std::size_t i = 0; i < bytes.size(); i += 3) {
    std::size_t n = std::min<std::size_t>(3, bytes.size() - i);
    std::uint32_t group = 0;
    for (std::size_t k = 0; k < 3; ++k)
      group = (group << 8) | (k < n ? static_cast<unsigned char>(bytes[i + k]) : 0u);
    for (std::size_t k = 0; k < 4; ++k)
      out += k <= n ? kAlphabet[(group >> (18 - 6 * k)) & 0x3F] : '=';
  }
}

inline std::string base64_encode(std::string_view bytes) {
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  base64_encode_into(out, bytes);
  return out;
}

// base64_decode - RFC 4648 section 4, padding required as RFC 4954 asks of AUTH responses;
// nothing for any other character, or for bits left over
inline std::optional<std::string> base64_decode(std::string_view text) {
  if (text.size() % 4 != 0) return std::nullopt;
  std::string out;
  std::uint32_t group = 0;
  std::size_t padding = 0;
  for (std::size_t i = 0; i < text.size(); ++i) {
    char c = text[i];
    int value = c >= 'A' && c <= 'Z'   ? c - 'A'
                : c >= 'a' && c <= 'z' ? c - 'a' + 26
                : c >= '0' && c <= '9' ? c - '0' + 52
                : c == '+'             ? 62
                : c == '/'             ? 63
                                       : -1;
    bool is_tail = i + 2 >= text.size();  // '=' only in the last two places, and at the end
    if (c == '=' && is_tail && (padding > 0 || i + 1 == text.size() || text[i + 1] == '=')) {
      ++padding, value = 0;
    } else if (value < 0 || padding > 0) {
      return std::nullopt;
    }
    group = (group << 6) | static_cast<std::uint32_t>(value);
    if (i % 4 != 3) continue;
    for (std::size_t k = 0; k < 3 - padding; ++k)
      out += static_cast<char>((group >> (16 - 8 * k)) & 0xFF);
    if ((padding == 1 && (group & 0xFF) != 0) || (padding == 2 && (group & 0xFFFF) != 0))
      return std::nullopt;
    group = 0;
  }
  return out;
}

inline char ascii_lower(char c) {
  return c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c;
}

// glob_class - the [set] at pattern[p] against c; next is set just past its ']', or to 0 when
// there is no ']' (then the '[' is an ordinary character)
inline bool glob_class(std::string_view pattern, std::size_t p, char c, std::size_t& next) {
  std::size_t i = p + 1;
  bool negate = i < pattern.size() && (pattern[i] == '!' || pattern[i] == '^');
  if (negate) ++i;
  bool found = false;
  for (std::size_t first = i; i < pattern.size() && (pattern[i] != ']' || i == first); ++i) {
    char lo = ascii_lower(pattern[i]), hi = lo;
    if (i + 2 < pattern.size() && pattern[i + 1] == '-' && pattern[i + 2] != ']')
      hi = ascii_lower(pattern[i += 2]);
    found = found || (ascii_lower(c) >= lo && ascii_lower(c) <= hi);
  }
  next = i < pattern.size() ? i + 1 : 0;
  return found != negate;
}

// glob_match - a shell-style pattern (fnmatch without flags: * ? [set] [!set] [a-z]) against
// text; ASCII letters match without regard to case, as in mail domains and host names
inline bool glob_match(std::string_view pattern, std::string_view text) {
  std::size_t p = 0, t = 0, star = std::string_view::npos, resume = 0;
  while (t < text.size()) {
    if (p < pattern.size() && pattern[p] == '*') {
      star = p++, resume = t;  // first try matching nothing; on a mismatch take one more
      continue;
    }
    std::size_t next = p + 1;
    bool is_match = false;
    if (p < pattern.size() && pattern[p] == '?') {
      is_match = true;
    } else if (p < pattern.size() && pattern[p] == '[') {
      is_match = glob_class(pattern, p, text[t], next);
      if (next == 0) next = p + 1, is_match = text[t] == '[';
    } else if (p < pattern.size()) {
      is_match = ascii_lower(pattern[p]) == ascii_lower(text[t]);
    }
    if (is_match) {
      p = next, ++t;
    } else if (star != std::string_view::npos) {
      p = star + 1, t = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.size() && pattern[p] == '*') ++p;
  return p == pattern.size();
}

// SeededRandom - splitmix64 (Steele, Lea, Flood 2014): the same numbers from the same seed on
// every platform, which std::uniform_real_distribution does not promise
class SeededRandom {
 public:
  explicit SeededRandom(std::uint64_t seed) : state_(seed) {}
  // chance - true with the given probability in percent
  bool chance(double percent) {
    return static_cast<double>(next() >> 11) * 0x1.0p-53 * 100 < percent;
  }

 private:
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
  std::uint64_t state_;
};

// format_asctime_utc - Python's time.asctime(time.gmtime(t)): "Sun Nov 29 05:10:00 2026".
// Computed by hand (days to civil date, H. Hinnant's algorithm) rather than with gmtime and
// strftime, which differ between C libraries and follow the locale.
inline std::string format_asctime_utc(std::int64_t t) {
  static const char* const kDays[] = {"Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"};
  static const char* const kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                        "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  std::int64_t days = t / 86400, secs = t % 86400;
  if (secs < 0) secs += 86400, days -= 1;
  std::int64_t z = days + 719468;  // days since 0000-03-01
  std::int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  std::int64_t doe = z - era * 146097;
  std::int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  std::int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  std::int64_t mp = (5 * doy + 2) / 153;
  std::int64_t day = doy - (153 * mp + 2) / 5 + 1;
  std::int64_t month = mp < 10 ? mp + 3 : mp - 9;
  std::int64_t year = yoe + era * 400 + (month <= 2 ? 1 : 0);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s %s %2d %02d:%02d:%02d %lld", kDays[((days % 7) + 7) % 7],
                kMonths[month - 1], static_cast<int>(day), static_cast<int>(secs / 3600),
                static_cast<int>(secs / 60 % 60), static_cast<int>(secs % 60),
                static_cast<long long>(year));
  return buf;
}

// format_rfc5322_date_utc - "Sun, 29 Nov 2026 05:10:00 +0000" (RFC 5322 3.3), from the
// asctime form above
inline std::string format_rfc5322_date_utc(std::int64_t t) {
  std::string a = format_asctime_utc(t);  // "Sun Nov 29 05:10:00 2026"
  std::string day = a.substr(8, 2);
  if (day[0] == ' ') day.erase(0, 1);
  return a.substr(0, 3) + ", " + day + " " + a.substr(4, 3) + " " + a.substr(20) + " " +
         a.substr(11, 8) + " +0000";
}

// unix_time_us - microseconds since 1970 by the wall clock (for names and dates in files)
inline std::int64_t unix_time_us() {
  using namespace std::chrono;
  return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count();
}

// seconds_text - a duration given in milliseconds, in seconds as people write them ("30", "0.5")
inline std::string seconds_text(long long ms) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", static_cast<double>(ms) / 1000);
  return text;
}

// getfqdn - our name, as smtpd.py's socket.getfqdn(): in the greeting, in EHLO and HELO to an
// upstream, in Maildir file names. gethostname(), "localhost" if it fails.
// differs from smtpd.py: socket.getfqdn() asks the resolver, which can stall start-up for
// seconds on a host whose name is not in /etc/hosts; the name the system gives is used as is.
inline std::string getfqdn() {
  char name[256] = {0};
  if (gethostname(name, sizeof name - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

// ==== 5. Addresses ====
// smtpd.py reads the address of MAIL, RCPT and VRFY with get_angle_addr/get_addr_spec from
// email._header_value_parser (RFC 5322 syntax, obsolete forms included) and answers with
// whatever address that parser normalises to. This is a port of the part it reaches: CFWS,
// dot-atoms, quoted strings, obsolete local parts, domain literals and source routes.
//   parse_address(arg) -> {address, rest} or nothing where Python's parser raises.
// Not ported: RFC 2047 encoded words inside addresses (Python decodes "=?utf-8?q?a?=@x").
// differs from smtpd.py: input that makes Python's parser raise (and so drops Python's
// connection with a traceback) gives nothing here, and the caller answers 501.

struct ParsedAddress {
  std::string address;  // normalised as Python's addr_spec; empty means "no address"
  std::string rest;     // what follows the address: the ESMTP parameters
};

class AddressParser {
 public:
  explicit AddressParser(std::string_view text) : s_(text) {}

  // parse - smtpd.py _getaddr on a non-empty argument
  std::optional<ParsedAddress> parse() {
    try {
      std::string address = (python_lstrip(s_).substr(0, 1) == "<") ? angle_addr() : addr_spec();
      return ParsedAddress{address, std::string(s_.substr(pos_))};
    } catch (const Refused&) {
      return std::nullopt;
    }
  }

 private:
  struct Refused {};  // Python's HeaderParseError (or IndexError); never leaves this class
  // A local part is a run of pieces; spaces and comments between words survive as one space.
  struct Piece {
    enum Kind { Word, Dot, Space } kind;
    std::string text;
  };

  static bool is_special(char c) { return std::strchr("()<>@,:;.\\\"[]", c) != nullptr && c; }
  static bool is_wsp(char c) { return c == ' ' || c == '\t'; }
  static bool is_atom_end(char c) { return is_special(c) || is_wsp(c); }
  // PHRASE_ENDS: specials that end a phrase ('.', '"' and '(' may continue one)
  static bool is_phrase_end(char c) { return is_special(c) && c != '.' && c != '"' && c != '('; }

  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return at_end() ? '\0' : s_[pos_]; }
  bool at_cfws_leader() const { return !at_end() && (is_wsp(peek()) || peek() == '('); }

  // skip_fws - Python's get_fws strips with str.lstrip(): any Unicode whitespace
  void skip_fws() { pos_ = s_.size() - python_lstrip(s_.substr(pos_)).size(); }

  // skip_comment - a parenthesised comment, nested, with quoted pairs; unterminated is allowed
  void skip_comment() {
    ++pos_;  // '('
    while (!at_end() && peek() != ')') {
      if (is_wsp(peek())) {
        skip_fws();
      } else if (peek() == '(') {
        skip_comment();
      } else {
        if (peek() == '\\') ++pos_;
        if (!at_end()) ++pos_;
      }
    }
    if (!at_end()) ++pos_;  // ')'
  }

  // skip_cfws - comments and folding white space; true when anything was skipped
  bool skip_cfws() {
    std::size_t start = pos_;
    while (at_cfws_leader()) {
      if (peek() == '(')
        skip_comment();
      else
        skip_fws();
    }
    return pos_ != start;
  }

  std::string atext() {
    std::size_t start = pos_;
    while (!at_end() && !is_atom_end(peek())) ++pos_;
    if (pos_ == start) throw Refused{};
    return std::string(s_.substr(start, pos_ - start));
  }

  // quoted_string_content - "..." with quoted pairs decoded; a missing closing quote is allowed
  std::string quoted_string_content() {
    ++pos_;  // '"'
    std::string content;
    while (!at_end() && peek() != '"') {
      if (peek() == '\\' && pos_ + 1 < s_.size()) ++pos_;
      content += s_[pos_++];
    }
    if (!at_end()) ++pos_;
    return content;
  }

  // word - [CFWS] (atom | quoted-string) [CFWS]; leading/trailing CFWS reported as flags
  Piece word(bool& space_before, bool& space_after) {
    space_before = skip_cfws();
    if (at_end()) throw Refused{};
    Piece piece{Piece::Word, ""};
    if (peek() == '"') {
      piece.text = quoted_string_content();
    } else {
      if (is_special(peek())) throw Refused{};
      piece.text = atext();
    }
    space_after = skip_cfws();
    return piece;
  }

  // local_part_pieces - get_local_part: a dot-atom, a word, or Python's obsolete local part
  std::vector<Piece> local_part_pieces() {
    if (at_end()) throw Refused{};
    std::vector<Piece> pieces;
    std::size_t start = pos_;
    // Python raises when only CFWS comes before a phrase end: "(c)@x" (found by fuzz_address)
    skip_cfws();
    if (at_end() || (peek() != '\\' && is_phrase_end(peek()))) throw Refused{};
    pos_ = start;
    while (!at_end() && (peek() == '\\' || !is_phrase_end(peek()))) {
      if (peek() == '.') {
        pieces.push_back({Piece::Dot, "."});
        ++pos_;
        continue;
      }
      if (peek() == '\\') {  // a misplaced backslash is kept as text, as Python does
        pieces.push_back({Piece::Word, "\\"});
        ++pos_;
        continue;
      }
      bool before = false, after = false;
      std::size_t word_start = pos_;
      try {
        Piece w = word(before, after);
        if (before && !pieces.empty() && pieces.back().kind != Piece::Dot &&
            pieces.back().kind != Piece::Space)
          pieces.push_back({Piece::Space, " "});
        pieces.push_back(w);
        if (after) pieces.push_back({Piece::Space, " "});
      } catch (const Refused&) {
        pos_ = word_start;
        if (!at_cfws_leader()) throw;
        skip_cfws();
        if (!pieces.empty() && pieces.back().kind == Piece::Word)
          pieces.push_back({Piece::Space, " "});
      }
    }
    if (pos_ == start) throw Refused{};
    return pieces;
  }

  // local_part_text - LocalPart.local_part: spaces dropped at the ends and around dots
  static std::string local_part_text(const std::vector<Piece>& pieces) {
    std::string out;
    for (std::size_t i = 0; i < pieces.size(); ++i) {
      const Piece& p = pieces[i];
      if (p.kind == Piece::Space) {
        bool at_edge = out.empty() || i + 1 == pieces.size();
        bool next_to_dot = pieces[i + (i + 1 < pieces.size() ? 1 : 0)].kind == Piece::Dot ||
                           (i > 0 && pieces[i - 1].kind == Piece::Dot);
        bool only_spaces_follow =
            std::all_of(pieces.begin() + static_cast<long>(i), pieces.end(),
                        [](const Piece& q) { return q.kind == Piece::Space; });
        if (at_edge || next_to_dot || only_spaces_follow) continue;
        if (!out.empty() && out.back() == ' ') continue;
      }
      out += p.text;
    }
    return out;
  }

  // quote_if_needed - addr_spec quotes a local part holding specials or white space
  static std::string quote_if_needed(const std::string& local) {
    bool needs =
        std::any_of(local.begin(), local.end(), [](char c) { return c != '.' && is_atom_end(c); });
    if (!needs) return local;
    std::string out = "\"";
    for (char c : local) {
      if (c == '\\' || c == '"') out += '\\';
      out += c;
    }
    return out + "\"";
  }

  // domain - get_domain: dot-atom or domain literal; white space and comments dropped
  std::string domain() {
    skip_cfws();
    if (at_end()) throw Refused{};
    std::string out;
    if (peek() == '[') {
      out = domain_literal();
    } else {
      out = atom_text_with_cfws();
      if (peek() == '@') throw Refused{};
      while (peek() == '.') {
        ++pos_;
        out += "." + atom_text_with_cfws();
      }
    }
    std::string squeezed;  // Domain.domain: ''.join(value.split())
    for (const std::string& part : python_split(out)) squeezed += part;
    return squeezed;
  }

  std::string atom_text_with_cfws() {
    skip_cfws();
    if (at_end() || is_special(peek())) throw Refused{};
    std::string text = atext();
    skip_cfws();
    return text;
  }

  // domain_literal - '[' dtext ']' with optional white space inside, then CFWS
  std::string domain_literal() {
    ++pos_;  // '['
    skip_fws();
    std::size_t start = pos_;
    while (!at_end() && std::strchr("[]\\", peek()) == nullptr && !is_wsp(peek()) &&
           space_length_at(s_, pos_) == 0)
      ++pos_;
    std::string text(s_.substr(start, pos_ - start));
    skip_fws();
    if (peek() != ']') throw Refused{};
    ++pos_;
    skip_cfws();
    return "[" + text + "]";
  }

  // addr_spec_parts - local part and, after '@', the domain (a local part alone is allowed)
  std::pair<std::string, std::optional<std::string>> addr_spec_parts() {
    std::string local = local_part_text(local_part_pieces());
    if (peek() != '@') return {local, std::nullopt};
    ++pos_;
    return {local, domain()};
  }

  std::string addr_spec() {
    auto [local, dom] = addr_spec_parts();
    std::string lp = quote_if_needed(local);
    return dom ? lp + "@" + *dom : lp;
  }

  // obs_route - "@a,@b:" before the address in an angle address; skipped
  void obs_route() {
    while (!at_end() && (peek() == ',' || at_cfws_leader())) {
      if (peek() == ',')
        ++pos_;
      else
        skip_cfws();
    }
    if (peek() != '@') throw Refused{};
    ++pos_;
    domain();
    while (peek() == ',') {
      ++pos_;
      if (at_end()) break;
      skip_cfws();
      if (peek() == '@') {
        ++pos_;
        domain();
      }
    }
    if (peek() != ':') throw Refused{};
    ++pos_;
  }

  // angle_addr - get_angle_addr; "<>" is the null reverse-path
  std::string angle_addr() {
    skip_cfws();
    if (peek() != '<') throw Refused{};
    ++pos_;
    if (at_end()) throw Refused{};
    if (peek() == '>') {
      ++pos_;
      return "<>";  // Python returns here, before any CFWS that follows
    }
    std::size_t start = pos_;
    std::pair<std::string, std::optional<std::string>> parts;
    try {
      parts = addr_spec_parts();
    } catch (const Refused&) {
      pos_ = start;
      obs_route();
      parts = addr_spec_parts();
    }
    if (peek() == '>') ++pos_;
    skip_cfws();
    const auto& [local, dom] = parts;
    // AngleAddr.addr_spec keeps an empty local part visible as ""
    std::string lp = local.empty() ? std::string("\"\"") : quote_if_needed(local);
    return dom ? lp + "@" + *dom : lp;
  }

  std::string_view s_;
  std::size_t pos_ = 0;
};

// parse_address - smtpd.py _getaddr: ("", "") for empty input, nothing where Python raises
inline std::optional<ParsedAddress> parse_address(std::string_view arg) {
  if (arg.empty()) return ParsedAddress{};
  return AddressParser(arg).parse();
}

// parse_params - smtpd.py _getparams: KEY or KEY=VALUE words; nothing if one is malformed
inline std::optional<std::vector<std::pair<std::string, std::optional<std::string>>>> parse_params(
    const std::vector<std::string>& words) {
  std::vector<std::pair<std::string, std::optional<std::string>>> params;
  for (const std::string& word : words) {
    std::size_t eq = word.find('=');
    std::string key = word.substr(0, eq);
    if (!python_isalnum(key)) return std::nullopt;
    if (eq == std::string::npos) {
      params.emplace_back(key, std::nullopt);
    } else {
      if (eq + 1 == word.size()) return std::nullopt;
      params.emplace_back(key, word.substr(eq + 1));
    }
  }
  return params;
}

// ==== 6. Replies ====
// Every reply we send, as smtpd.py words it, so code and tests share one spelling: constants,
// and for replies that carry a value, the small functions that build them. A verb's syntax
// text lives in the channel's verb table (kVerbTable) and is quoted from there.
//   the kReply* constants; is_accepting, reply_code; reply_greeting, reply_unknown_command,
//   reply_cannot_vrfy; reply_closing; reply_exec_*; reply_upstream_*

constexpr const char* kReplyOk = "250 OK";
constexpr const char* kReplyBye = "221 Bye";
constexpr const char* kReplyStartData = "354 End data with <CR><LF>.<CR><LF>";
constexpr const char* kReplyBadSyntax = "500 Error: bad syntax";
constexpr const char* kReplyLineTooLong = "500 Error: line too long";
constexpr const char* kReplyNotUtf8 = "500 Error: command is not valid UTF-8";
constexpr const char* kReplySendHeloFirst = "503 Error: send HELO first";
constexpr const char* kReplyNestedMail = "503 Error: nested MAIL command";
constexpr const char* kReplyNeedMail = "503 Error: need MAIL command";
constexpr const char* kReplyNeedRcpt = "503 Error: need RCPT command";
constexpr const char* kReplyBadBody = "501 Error: BODY can only be one of 7BIT, 8BITMIME";
constexpr const char* kReplySmtpUtf8Arg = "501 Error: SMTPUTF8 takes no arguments";
constexpr const char* kReplySizeExceeded =
    "552 Error: message size exceeds fixed maximum message size";
constexpr const char* kReplyTooMuchData = "552 Error: Too much mail data";
// BDAT (RFC 3030), offered with --chunking: a chunk is answered with its size, as in the RFC's
// examples; the last one with the mode's verdict, as the end of DATA is
constexpr const char* kBdatSyntax = "BDAT size [LAST]";
constexpr const char* kReplyDataAfterBdat = "503 Error: DATA after BDAT in one transaction";
constexpr const char* kReplyMailParams =
    "555 MAIL FROM parameters not recognized or not implemented";
constexpr const char* kReplyRcptParams = "555 RCPT TO parameters not recognized or not implemented";
constexpr const char* kReplyVrfyCannot =
    "252 Cannot VRFY user, but will accept message and attempt delivery";
constexpr const char* kReplyExpn = "502 EXPN not implemented";
constexpr const char* kMailParamsSyntax = " [SP <mail-parameters>]";
constexpr const char* kReplySyntax = "501 Syntax: ";                   // + the verb's syntax
constexpr const char* kReplyHelpSyntax = "250 Syntax: ";               // + the verb's syntax
constexpr const char* kReplyHelpList = "250 Supported commands: ";     // + the verbs
constexpr const char* kReplyHelpUnknown = "501 Supported commands: ";  // + the verbs
// Our own replies, for what smtpd.py never had to say:
constexpr const char* kReplyNotStored = "451 Error: could not store the message: ";  // + reason
constexpr const char* kReplyControlInAddress =  // RFC 5321 4.1.2
    "501 Error: control characters are not allowed in an address";
constexpr const char* kReplyTooManyRecipients = "452 Error: too many recipients";    // 4.5.3.1.10
constexpr const char* kReplyNotSmtp = "221 Error: this is an SMTP server; closing";  // HTTP
constexpr const char* kClosingLimitReached = "closing: message limit reached";  // 421 <fqdn> ...
constexpr const char* kClosingTimeout = "Error: timeout exceeded";  // as Postfix says it
constexpr const char* kClosingShutdown = "Error: shutting down; try again later";
constexpr const char* kClosingTooMany = "Error: too many connections; try again later";
constexpr const char* kClosingAuthFailures = "Error: too many failed AUTH attempts";
// AUTH (RFC 4954), offered with --auth, --auth-file or --auth-required; the 334 challenges
// of LOGIN are "Username:" and "Password:" in base64, as every client expects.
constexpr const char* kReplyAuthOk = "235 2.7.0 Authentication successful";
constexpr const char* kReplyAuthInvalid = "535 5.7.8 Authentication credentials invalid";
constexpr const char* kReplyAuthRequired = "530 5.7.0 Authentication required";
constexpr const char* kReplyAuthAgain = "503 5.5.1 Error: already authenticated";
constexpr const char* kReplyAuthInMail = "503 5.5.1 Error: MAIL transaction in progress";
constexpr const char* kReplyAuthMechanism = "504 5.5.4 Unrecognized authentication type";
constexpr const char* kReplyAuthCancelled = "501 5.7.0 Authentication cancelled";
constexpr const char* kReplyAuthUndecodable = "501 5.5.2 Cannot decode response";
constexpr const char* kAuthSyntax = "AUTH mechanism [initial-response]";
constexpr const char* kAuthMechanisms = "PLAIN LOGIN";  // after AUTH in the EHLO reply
constexpr const char* kChallengeEmpty = "334 ";
constexpr const char* kChallengeUsername = "334 VXNlcm5hbWU6";
constexpr const char* kChallengePassword = "334 UGFzc3dvcmQ6";
// STARTTLS (RFC 3207), offered with --tls, --tls-cert and --tls-key, or --tls-required.
constexpr const char* kReplyTlsReady = "220 2.0.0 Ready to start TLS";
constexpr const char* kReplyTlsActive = "503 5.5.1 Error: TLS already active";
constexpr const char* kReplyTlsRequired = "530 5.7.0 Must issue a STARTTLS command first";

// is_accepting - a verdict that accepts: empty (the usual 250 OK) or any 2xx
inline bool is_accepting(const std::string& reply) { return reply.empty() || reply[0] == '2'; }

// reply_code - the code a reply line starts with, or 0 when it starts with none: three digits,
// the first 1 to 5 (RFC 5321 4.2; "000" would read as no reply at all), then the line's end,
// a space or, inside a multiline reply, a hyphen. Read here, with the replies, as the
// upstream's replies (ReplyParser), the --exec command's (CommandRun) and the --reject rules'
// (is_refusal_reply) are all read with it.
inline int reply_code(std::string_view line) {
  bool has_code = line.size() >= 3 && is_decimal(line.substr(0, 3)) && line[0] >= '1' &&
                  line[0] <= '5' && (line.size() == 3 || line[3] == ' ' || line[3] == '-');
  return has_code ? (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0') : 0;
}

// Enhanced status codes (RFC 3463), given with --enhanced-status-codes (RFC 2034) once the
// client has greeted with EHLO: after the reply code of every reply but those to EHLO and
// HELO and the 3xx ones (a 334 challenge is base64, a 354 an invitation). A success says what
// it answers; a failure is found here by the start of its reply, and one that is not (a
// --reject or --exec reply without a code of its own, an upstream's) gets its class only.
enum class ReplyTo { Hello, Mail, Rcpt, Message, Other };  // what a reply answers
struct EnhancedCode {
  std::string_view start;  // of the reply, or for a 421 of its reason
  const char* code;
};
constexpr EnhancedCode kEnhancedFailures[] = {
    {"500 ", "5.5.2"}, {"501 Error: control characters", "5.1.3"},
    {"501 ", "5.5.4"}, {"502 ", "5.5.1"},
    {"503 ", "5.5.1"}, {"504 ", "5.5.4"},
    {"552 ", "5.3.4"}, {"555 ", "5.5.4"},
    {"452 ", "4.5.3"}, {"451 ", "4.3.0"},
};
constexpr EnhancedCode kEnhancedClosings[] = {
    {kClosingTimeout, "4.4.2"}, {kClosingShutdown, "4.3.2"},     {kClosingLimitReached, "4.3.2"},
    {kClosingTooMany, "4.7.0"}, {kClosingAuthFailures, "4.7.0"},
};

// has_enhanced_code - "NNN X.Y.Z ...": the reply carries one already (RFC 3463 2: a class, a
// subject of 1 to 3 digits and a detail of 1 to 3)
inline bool has_enhanced_code(std::string_view reply) {
  if (reply.size() < 9) return false;  // "NNN X.Y.Z" at the least
  std::size_t at = 4, end = reply.find(' ', at);
  std::string_view code = reply.substr(at, end == std::string_view::npos ? end : end - at);
  std::size_t dot1 = code.find('.'), dot2 = code.rfind('.');
  auto digits = [&](std::size_t from, std::size_t to) {
    return to > from && to - from <= 3 && is_decimal(code.substr(from, to - from));
  };
  return code.size() >= 5 && dot1 == 1 && dot2 > 2 && is_decimal(code.substr(0, 1)) &&
         digits(2, dot2) && digits(dot2 + 1, code.size());
}

// enhanced_code_for - the code a reply gets: see kEnhancedFailures and kEnhancedClosings
inline std::string enhanced_code_for(std::string_view reply, ReplyTo to) {
  char kind = reply[0];
  if (kind == '2' || reply.substr(0, 4) == "221 ") {
    if (to == ReplyTo::Mail && kind == '2' && reply[1] == '5') return "2.1.0";
    if (to == ReplyTo::Rcpt && kind == '2' && reply[1] == '5') return "2.1.5";
    return "2.0.0";
  }
  if (reply.substr(0, 4) == "421 ")
    for (const EnhancedCode& closing : kEnhancedClosings)
      if (reply.find(closing.start) != std::string_view::npos) return closing.code;
  if (reply.substr(0, 30) == "501 Error: control characters " && to == ReplyTo::Mail)
    return "5.1.7";  // the sender's address, not a recipient's
  for (const EnhancedCode& failure : kEnhancedFailures)
    if (reply.substr(0, failure.start.size()) == failure.start) return failure.code;
  return std::string(1, kind) + ".0.0";
}

// with_enhanced_code - the reply as --enhanced-status-codes sends it
inline std::string with_enhanced_code(const std::string& reply, ReplyTo to) {
  bool is_one_line =
      reply.size() >= 3 && is_decimal(reply.substr(0, 3)) && (reply.size() == 3 || reply[3] == ' ');
  if (!is_one_line || to == ReplyTo::Hello || reply[0] == '3' || has_enhanced_code(reply))
    return reply;
  std::string code = enhanced_code_for(reply, to);
  return reply.size() == 3 ? reply + " " + code : reply.substr(0, 4) + code + reply.substr(3);
}

inline std::string reply_chunk_received(std::uint64_t octets) {
  return "250 " + std::to_string(octets) + " octets received";
}
inline std::string reply_greeting(const std::string& fqdn) {
  return "220 " + fqdn + " " + kVersion;
}
inline std::string reply_unknown_command(const std::string& verb) {
  return "500 Error: command \"" + verb + "\" not recognized";
}
inline std::string reply_cannot_vrfy(const std::string& argument) {
  return "502 Could not VRFY " + argument;
}
// reply_closing - "421 <fqdn> <why>": the server closes the session (the message limit, a
// timeout, shutdown, too many clients)
inline std::string reply_closing(const std::string& fqdn, const char* why = kClosingLimitReached) {
  return "421 " + fqdn + " " + why;
}

// --exec (CommandRun): a command that cannot decide gets the client a 451, so it retries
inline std::string reply_exec_cannot_run(const std::string& why) {
  return "451 Error: cannot run the --exec command: " + why;
}
inline std::string reply_exec_failed(int exit_code) {
  return "451 Error: the --exec command failed (exit status " + std::to_string(exit_code) +
         "); try again later";
}
inline std::string reply_exec_not_final(const std::string& code) {
  return "451 Error: the --exec command replied " + code +
         ", which does not end a message; try again later";
}
inline std::string reply_exec_timed_out(long long timeout_ms) {
  return "451 Error: the --exec command ran longer than " + seconds_text(timeout_ms) +
         " s and was stopped; try again later";
}

// Relaying (UpstreamSession): `role` is what the upstream is to us ("upstream server"), `name`
// its host:port, `text` its reply, quoted printable and cut at kQuotedReplyLimit
inline std::string quoted(const std::string& text) {
  return printable(text.substr(0, kQuotedReplyLimit));
}
inline std::string reply_upstream_no_8bit(const std::string& role) {
  return "554 5.6.3 Error: the " + role + " does not accept 8-bit mail";
}
inline std::string reply_upstream_no_smtputf8(const std::string& role) {
  return "553 5.6.7 Error: the " + role + " does not support SMTPUTF8";
}
inline std::string reply_upstream_closed(const std::string& role, const std::string& name,
                                         const std::string& text) {
  return "451 Error: " + role + " " + name + " closed the session (" + quoted(text) +
         "); try again later";
}
inline std::string reply_upstream_unexpected(const std::string& role, const std::string& step,
                                             const std::string& text) {
  return "451 Error: unexpected reply from the " + role + " to " + step + ": " + quoted(text);
}
inline std::string reply_upstream_failed(const std::string& role, const std::string& name,
                                         const std::string& why) {
  return "451 Error: " + role + " " + name + " " + why + "; try again later";
}
inline std::string reply_upstream_refused(const std::string& role, const std::string& name,
                                          const std::string& text) {
  return "451 Error: " + role + " " + name + " refused the session: " + quoted(text);
}
inline std::string reply_upstream_lost(const std::string& role, const std::string& name) {
  return "451 Error: the connection to " + role + " " + name + " was lost; try again later";
}

// ==== 7. SMTP channel ====
// The protocol of one client connection as a pure state machine: feed() takes the bytes the
// client sent, output() holds the replies to send, and a finished message waits in
// take_message() until the mode's verdict comes back through answer(). No sockets, no
// clock, no printing: tests and fuzzers drive it directly. State names follow smtpd.py's
// SMTPChannel (smtp_state, seen_greeting, mailfrom, rcpttos, received_data, fqdn, peer).
// A mode that must consult someone else (a relay asks its upstream) sets ask_envelope, and
// then MAIL and RCPT wait for a verdict too, through the same question() and answer().
// The DATA text and the AUTH exchange are readers of their own, which the channel drives.
//   Refusals; ChannelConfig, Envelope, MailRequest; DataReader; AuthExchange,
//   is_header_safe_name; Channel (feed, output, consume_output, question, take_message,
//   answer, close_with, wants_input, is_closing; one cmd_* handler per verb, listed in
//   kVerbTable); rename_client_auth_headers

// Refusals - the --reject rules: at a stage of the session, the first rule whose pattern
// matches (a shell-style pattern on the client IP, the HELO name, the sender or a recipient,
// or "N%": that share of the time, from a seeded generator) gives the reply instead of the
// usual one. One generator for the whole server, so a seed repeats a run's sequence.
class Refusals {
 public:
  enum class Stage { Connect, Helo, Mail, Rcpt, Data };
  struct Rule {
    Stage stage;
    std::string pattern;  // shell-style; unused when percent is set
    double percent = -1;  // "N%": refuse this share of the time; -1 for a pattern rule
    std::string reply;    // a complete 4xx or 5xx reply line, without CRLF
  };

  Refusals(std::vector<Rule> rules, std::uint64_t seed) : rules_(std::move(rules)), random_(seed) {}

  // reply_for - the reply of the first rule for this stage that takes any of the subjects, or
  // "" when none does; each N% rule reached draws one number
  std::string reply_for(Stage stage, const std::vector<std::string>& subjects) {
    for (const Rule& rule : rules_) {
      if (rule.stage != stage) continue;
      bool is_hit = rule.percent >= 0 ? random_.chance(rule.percent)
                                      : std::any_of(subjects.begin(), subjects.end(),
                                                    [&](const std::string& subject) {
                                                      return glob_match(rule.pattern, subject);
                                                    });
      if (is_hit) return rule.reply;
    }
    return "";
  }

 private:
  std::vector<Rule> rules_;
  SeededRandom random_;
};

using AuthUsers = std::map<std::string, std::string>;  // --auth-file: user name -> password

struct ChannelConfig {
  std::string fqdn = "localhost";                      // name in the greeting and in EHLO
  std::uint64_t data_size_limit = kDataSizeDefault;    // 0: no limit, no SIZE in EHLO
  std::size_t max_recipients = kMaxRecipientsDefault;  // --max-recipients; 0: no limit
  bool enable_smtputf8 = false;                        // -u: announce and accept SMTPUTF8
  bool offer_8bitmime = true;                          // a relay's upstream may lack 8BITMIME
  bool ask_envelope = false;                           // MAIL and RCPT wait for the mode's verdict
  bool keep_data = true;          // false: the mode wants no message text (a sink without outputs)
  bool offer_pipelining = false;  // --pipelining: announce PIPELINING
  bool offer_chunking = false;    // --chunking: announce CHUNKING and accept BDAT
  bool enhanced_status_codes = false;  // --enhanced-status-codes: RFC 3463 codes in replies
  bool offer_starttls = false;         // --tls...: announce and accept STARTTLS
  bool records_tls = false;            // TLS is on: messages say whether they came through it
  bool tls_required = false;           // --tls-required: no MAIL or AUTH before STARTTLS
  bool offer_auth = false;             // --auth...: announce and accept AUTH
  bool auth_required = false;          // --auth-required: no MAIL before AUTH
  std::shared_ptr<const AuthUsers> auth_users;    // --auth-file; null: anyone logs in
  std::shared_ptr<Refusals> refusals;             // --reject; null: none
  std::function<void(const std::string&)> trace;  // -d: protocol trace sink (may be empty)
};

// Envelope - one finished message, as handed to a mode (smtpd.py process_message arguments)
struct Envelope {
  std::string peer;                       // client IP address (peer[0] in Python)
  std::string mailfrom;                   // reverse-path as parsed; "<>" for the null sender
  std::vector<std::string> rcpttos;       // forward-paths, in the order accepted
  std::vector<std::string> mail_options;  // MAIL parameters, upper-cased
  std::vector<std::string> rcpt_options;  // parameters of accepted RCPTs, upper-cased
  std::string data;                       // dot-unstuffed, lines joined with "\n"
  bool smtputf8 = false;                  // MAIL carried SMTPUTF8
  std::optional<std::string> auth_user;   // AUTH offered: the user logged in, "" for none
  std::optional<std::string> tls;         // TLS on: "TLSv1.3 CIPHER" of the session, "" for none
  bool is_matching = true;  // --match: every rule holds (the server decides, before the mode
                            // sees it); a message that does not is neither printed nor counted
};

// MailRequest - what a relay needs to know of an accepted-looking MAIL command
struct MailRequest {
  std::string address;               // "<>" for the null sender
  std::vector<std::string> options;  // upper-cased, as the channel keeps them
  bool smtputf8 = false;
};

// DataReader - the message text after DATA's 354 (RFC 5321 4.5.2): line by line, a leading
// dot taken off, until the line "." ends it. Bytes are stored as they arrive (CRLF as "\n"),
// so memory follows the size limit: past it they are only counted, and a reader that keeps no
// text (a sink without outputs) only counts. Sizes are smtpd.py's num_bytes: every byte of the
// lines, the stuffed dots and the CRLFs included.
class DataReader {
 public:
  DataReader(std::uint64_t size_limit, bool keeps_text)
      : size_limit_(size_limit), keeps_text_(keeps_text) {}

  // take - read what can be read of `in`; returns the bytes used, and sets is_ended once the
  // end-of-data line is among them. Bytes that might begin that line, or the CR of a CRLF,
  // are left in `in` until more come.
  std::size_t take(std::string_view in, bool& is_ended) {
    std::size_t at = 0;
    is_ended = false;
    while (at < in.size() && !is_ended && step(in, at, is_ended)) {
    }
    return at;
  }

  // reset - ready for the next message; the text is let go, whatever its size was
  void reset() {
    text_ = std::string();
    bytes_ = 0;
    is_too_big_ = false;
    at_line_start_ = true;
  }

  // size - the message's bytes as smtpd.py counts them, without the CRLF before the "."
  std::uint64_t size() const { return bytes_ >= 2 ? bytes_ - 2 : 0; }
  bool is_too_big() const { return size_limit_ != 0 && size() > size_limit_; }
  const std::string& text() const { return text_; }
  // take_text - the message, lines joined with "\n" (the last line has none)
  std::string take_text() {
    std::string text = std::exchange(text_, std::string());
    if (!text.empty()) text.pop_back();  // the "\n" of the CRLF before the "."
    return text;
  }

 private:
  // step - one line, or as much of one as has come; false when it must wait for more
  bool step(std::string_view in, std::size_t& at, bool& is_ended) {
    if (at_line_start_ && in[at] == '.') {
      std::string_view rest = in.substr(at);
      if (rest.size() < 3 && std::string_view(".\r\n").substr(0, rest.size()) == rest)
        return false;  // could still be the end-of-data line
      if (rest.substr(0, 3) == ".\r\n") {
        at += 3;
        is_ended = true;
        return true;
      }
      bytes_ += 1;  // the stuffed dot counts, as in smtpd.py's num_bytes
      at += 1;
    }
    at_line_start_ = false;
    std::size_t end = in.find("\r\n", at);
    if (end == std::string_view::npos) {
      std::size_t stop = in.back() == '\r' ? in.size() - 1 : in.size();  // maybe half a CRLF
      append(in.substr(at, stop - at));
      at = stop;
      return false;
    }
    append(in.substr(at, end - at));
    append("\r\n");
    at = end + 2;
    at_line_start_ = true;
    return true;
  }

  // append - count message bytes; store them (CRLF as "\n") until the limit is passed
  void append(std::string_view bytes) {
    bytes_ += bytes.size();
    // The CRLF before the final dot is not message data, so the count may run 2 over.
    if (size_limit_ != 0 && bytes_ > size_limit_ + 2 && !is_too_big_) {
      is_too_big_ = true;
      text_ = std::string();
    }
    if (is_too_big_ || !keeps_text_) return;  // counted, not kept
    if (bytes == "\r\n")
      text_ += '\n';
    else
      text_.append(bytes.data(), bytes.size());
  }

  std::uint64_t size_limit_;  // 0: no limit
  bool keeps_text_;
  std::string text_;
  std::uint64_t bytes_ = 0;    // so far, counted as smtpd.py's num_bytes
  bool is_too_big_ = false;    // bytes_ passed the limit: stop storing
  bool at_line_start_ = true;  // the next byte begins a line
};

// ChunkReader - the message text of BDAT (RFC 3030): each chunk is exactly the octets its
// command announced, with no dot-stuffing and no end line, and the chunks of a message are
// joined. The text is kept as DataReader keeps DATA's (CRLF as "\n", the line end after the
// last line dropped), so a message reads the same whichever way it came; past the size
// limit it is only counted.
class ChunkReader {
 public:
  ChunkReader(std::uint64_t size_limit, bool keeps_text)
      : size_limit_(size_limit), keeps_text_(keeps_text) {}

  // begin - a chunk of this many octets follows
  void begin(std::uint64_t octets) {
    left_ = octets;
    is_started_ = true;
  }
  // take - the chunk's octets among `in`; returns how many were used
  std::size_t take(std::string_view in) {
    std::size_t n = static_cast<std::size_t>(std::min<std::uint64_t>(left_, in.size()));
    append(in.substr(0, n));
    left_ -= n;
    return n;
  }
  bool is_chunk_read() const { return left_ == 0; }
  // is_started - a BDAT has been taken since the last reset: DATA may not follow
  bool is_started() const { return is_started_; }
  std::uint64_t size() const { return bytes_; }
  bool is_too_big() const { return size_limit_ != 0 && bytes_ > size_limit_; }

  void reset() {
    text_ = std::string();
    bytes_ = left_ = 0;
    is_started_ = is_cr_pending_ = ends_in_crlf_ = false;
  }
  // take_text - the message, lines joined with "\n" (the last line has none)
  std::string take_text() {
    if (std::exchange(is_cr_pending_, false)) text_ += '\r';
    if (std::exchange(ends_in_crlf_, false)) text_.pop_back();
    return std::exchange(text_, std::string());
  }

 private:
  // append - count the octets; keep them, CRLF as "\n", a CR at a chunk's end held until
  // the next octet says whether a LF follows it
  void append(std::string_view octets) {
    bytes_ += octets.size();
    if (is_too_big()) text_ = std::string();
    if (is_too_big() || !keeps_text_) return;
    for (char c : octets) {
      bool was_cr = std::exchange(is_cr_pending_, false);
      if (was_cr && c != '\n') text_ += '\r';
      ends_in_crlf_ = was_cr && c == '\n';
      if (c == '\r')
        is_cr_pending_ = true;
      else
        text_ += c;
    }
  }

  std::uint64_t size_limit_;  // 0: no limit
  bool keeps_text_;
  std::string text_;
  std::uint64_t bytes_ = 0;     // the octets of every chunk so far
  std::uint64_t left_ = 0;      // of the chunk being read
  bool is_started_ = false;     // a BDAT was taken in this transaction
  bool is_cr_pending_ = false;  // the last octet was a CR, not yet kept
  bool ends_in_crlf_ = false;   // the text ends with a "\n" that was a CRLF
};

// AuthExchange - one AUTH command and the lines that answer its 334 challenges (RFC 4954), a
// state machine of its own beside the channel: PLAIN (RFC 4616) and LOGIN, each with or
// without an initial response. It ends in a 235 and the user name, or in a failure. Failures
// are counted over the session, so a client trying password after password is stopped: the
// kAuthFailureLimit-th failure closes the session instead of answering.
class AuthExchange {
 public:
  // Outcome - what the channel does next: send the challenge and read the next line as a
  // response, log the user in, send the failure and go on, or say 421 and close
  enum class Outcome { Challenge, LoggedIn, Failed, TooManyFailures };
  struct Result {
    Outcome outcome;
    std::string reply;  // empty for TooManyFailures: the channel's 421 names the server
    std::string user;   // LoggedIn: the user name, one printable line
  };

  explicit AuthExchange(const AuthUsers* users) : users_(users) {}  // null: anyone logs in

  // is_waiting - the next line answers a challenge: it is a response, not a command
  bool is_waiting() const { return waiting_for_ != Waiting::None; }
  // start - AUTH MECHANISM [INITIAL-RESPONSE]
  Result start(const std::string& mechanism, const std::optional<std::string>& initial);
  // respond - the line after a challenge; is_too_long when it was cut at the line limit
  Result respond(std::string_view line, bool is_too_long);

 private:
  enum class Waiting { None, PlainResponse, LoginUser, LoginPassword };

  Result challenge(Waiting next, const char* reply);
  Result fail(const char* reply);
  Result plain(std::string_view response);
  Result login_user(std::string_view response);
  Result log_in(const std::string& user, const std::string& password);

  const AuthUsers* users_;
  Waiting waiting_for_ = Waiting::None;
  std::string login_user_;  // AUTH LOGIN: the user name, while the password is asked for
  unsigned failures_ = 0;   // in this session
};

// has_control_character - C0 controls and DEL; `allow_tab` for a whole argument, where a
// tab may separate parameters (RFC 5321 4.1.2 allows no control character in an address)
inline bool has_control_character(std::string_view text, bool allow_tab = false) {
  return std::any_of(text.begin(), text.end(), [allow_tab](char c) {
    auto u = static_cast<unsigned char>(c);
    return (u < 0x20 && !(allow_tab && c == '\t')) || u == 0x7F;
  });
}

// is_header_safe_name - a user name that can go into a header line and the environment as
// it is: UTF-8 without C0 or C1 controls, DEL, or the Unicode line and paragraph separators
// (U+0085, U+2028 and U+2029 end a line for readers that split on Unicode line breaks)
inline bool is_header_safe_name(std::string_view name) {
  if (name.empty() || !is_valid_utf8(name) || has_control_character(name)) return false;
  for (std::size_t i = 0; i < name.size(); ++i) {
    auto c = static_cast<unsigned char>(name[i]);
    auto next = i + 1 < name.size() ? static_cast<unsigned char>(name[i + 1]) : 0;
    if (c == 0xC2 && next >= 0x80 && next <= 0x9F) return false;  // U+0080..U+009F
    if (c == 0xE2 && next == 0x80 && i + 2 < name.size() &&
        (name[i + 2] == '\xA8' || name[i + 2] == '\xA9'))
      return false;  // U+2028, U+2029
  }
  return true;
}

AuthExchange::Result AuthExchange::start(const std::string& mechanism,
                                         const std::optional<std::string>& initial) {
  std::string name = ascii_upper(mechanism);
  if (name == "PLAIN" && initial) return plain(*initial);
  if (name == "LOGIN" && initial) return login_user(*initial);
  if (name == "PLAIN") return challenge(Waiting::PlainResponse, kChallengeEmpty);
  if (name == "LOGIN") return challenge(Waiting::LoginUser, kChallengeUsername);
  return fail(kReplyAuthMechanism);
}

// respond - "*" cancels (RFC 4954 4)
AuthExchange::Result AuthExchange::respond(std::string_view line, bool is_too_long) {
  Waiting step = std::exchange(waiting_for_, Waiting::None);
  std::string user = std::exchange(login_user_, "");
  if (is_too_long) return fail(kReplyLineTooLong);
  if (line == "*") return fail(kReplyAuthCancelled);
  if (step == Waiting::PlainResponse) return plain(line);
  if (step == Waiting::LoginUser) return login_user(line);
  std::optional<std::string> password = base64_decode(line);
  if (!password) return fail(kReplyAuthUndecodable);
  return log_in(user, *password);
}

AuthExchange::Result AuthExchange::challenge(Waiting next, const char* reply) {
  waiting_for_ = next;
  return {Outcome::Challenge, reply, ""};
}

AuthExchange::Result AuthExchange::fail(const char* reply) {
  if (++failures_ >= kAuthFailureLimit) return {Outcome::TooManyFailures, "", ""};
  return {Outcome::Failed, reply, ""};
}

// plain - RFC 4616: authorization identity, NUL, user name, NUL, password; "=" is an empty
// initial response. Logging in as someone else (a different authorization identity) is
// refused.
AuthExchange::Result AuthExchange::plain(std::string_view response) {
  std::optional<std::string> decoded = response == "=" ? std::string() : base64_decode(response);
  std::size_t first = decoded ? decoded->find('\0') : std::string::npos;
  std::size_t second = first == std::string::npos ? first : decoded->find('\0', first + 1);
  if (second == std::string::npos || decoded->find('\0', second + 1) != std::string::npos)
    return fail(kReplyAuthUndecodable);
  std::string authzid = decoded->substr(0, first);
  std::string user = decoded->substr(first + 1, second - first - 1);
  if (!authzid.empty() && authzid != user) return fail(kReplyAuthInvalid);
  return log_in(user, decoded->substr(second + 1));
}

// login_user - the user name of AUTH LOGIN; the password is asked for next
AuthExchange::Result AuthExchange::login_user(std::string_view response) {
  std::optional<std::string> user = base64_decode(response);
  if (!user) return fail(kReplyAuthUndecodable);
  login_user_ = *user;
  return challenge(Waiting::LoginPassword, kChallengePassword);
}

// log_in - check a user name and password: with --auth-file against its lines, else any
// will do. The name goes into header lines and the environment: is_header_safe_name.
AuthExchange::Result AuthExchange::log_in(const std::string& user, const std::string& password) {
  bool is_known = true;
  if (users_) {
    auto it = users_->find(user);
    is_known = it != users_->end() && it->second == password;
  }
  if (!is_header_safe_name(user) || !is_known) return fail(kReplyAuthInvalid);
  return {Outcome::LoggedIn, kReplyAuthOk, user};
}

class Channel {
 public:
  // The states are smtpd.py's COMMAND and DATA, plus three of ours: Chunk while a BDAT
  // chunk's octets are read, Waiting while the mode decides (question() says on what),
  // Closing after QUIT once the reply is queued.
  enum class State { Command, Data, Chunk, Waiting, Closing };
  enum class Question { None, Mail, Rcpt, Message, StartTls };

  Channel(std::shared_ptr<const ChannelConfig> config, std::string peer);  // one per server
  Channel(ChannelConfig config, std::string peer)  // a config of its own (tests, fuzzing)
      : Channel(std::make_shared<const ChannelConfig>(std::move(config)), std::move(peer)) {}

  void feed(std::string_view bytes);
  const std::string& output() const { return output_; }
  void consume_output(std::size_t n) { output_.erase(0, n); }
  Question question() const { return question_; }
  bool has_message() const { return question_ == Question::Message; }
  const std::string& pending_address() const { return pending_address_; }  // MAIL/RCPT asked
  MailRequest mail_request() const { return {pending_address_, mail_options, require_smtputf8}; }
  Envelope take_message();
  void answer(const std::string& reply);
  void close_with(const std::string& reply);
  bool wants_input() const;
  std::uint64_t progress() const { return progress_; }  // grows with each line and verdict
  bool is_closing() const { return smtp_state == State::Closing; }
  void restart_in_tls();
  // set_security - TLS is up: "TLSv1.3 TLS_AES_256_GCM_SHA384" (the transport knows)
  void set_security(const std::string& tls) { tls_ = tls; }
  bool is_plain_text() const { return tls_.empty(); }
  // is_in_data - message text is being read (DATA, or a BDAT chunk)
  bool is_in_data() const { return smtp_state == State::Data || smtp_state == State::Chunk; }
  // is_idle - between transactions' commands: closing now would lose nothing of a message
  bool is_idle() const { return smtp_state == State::Command && question_ == Question::None; }
  // has_unread_input - bytes wait behind the question (a pipelined group)
  bool has_unread_input() const { return input_.size() > input_pos_; }
  std::string_view unread_input() const { return std::string_view(input_).substr(input_pos_); }
  const std::string& received_data() const { return data_.text(); }  // the message so far

  // Transaction state, public so tests can look at it as Python's tests do.
  State smtp_state = State::Command;
  std::string seen_greeting;   // HELO/EHLO argument; empty before the greeting
  bool extended_smtp = false;  // EHLO (rather than HELO) was the greeting
  std::string mailfrom;        // empty: no MAIL yet (Python's None)
  std::vector<std::string> rcpttos;
  std::vector<std::string> mail_options;
  std::vector<std::string> rcpt_options;
  bool require_smtputf8 = false;
  std::string auth_user;    // the user name AUTH accepted; empty before
  const std::string& fqdn;  // config's: the greeting host
  const std::string peer;

  static const char* to_string(State state);

 private:
  using Arg = std::optional<std::string>;  // None when the verb had no space after it
  // Keyword - what a row says in the EHLO reply: nothing, its name, its name and the size
  // limit (none without one), or its name only as TLS allows (AUTH with --tls-required waits
  // for TLS; STARTTLS is said only before it)
  enum class Keyword { None, Name, Size, Auth, StartTls };
  struct Command {
    const char* verb;                      // the command, or an EHLO keyword's name
    void (Channel::*handler)(const Arg&);  // nullptr: an EHLO keyword only, not a command
    const char* syntax;                    // HELP text; nullptr for verbs HELP does not list
    bool ChannelConfig::*offered;          // the option that turns it on; nullptr: always on
    Keyword keyword;                       // how EHLO announces it
  };
  static const Command kVerbTable[];

  void push(const std::string& reply);  // the reply, with an enhanced code if they are on
  void push_line(const std::string& reply);
  void enter_state(State to);
  void set_post_data_state();
  void set_rset_state();
  void process_input();
  bool process_command_bytes();
  bool process_data_bytes();
  bool process_chunk_bytes();
  void end_of_chunk();
  void end_of_data();
  void handle_command_line(std::string_view line, std::size_t size);
  void refuse_non_smtp();
  std::size_t command_size_limit(const std::string& verb) const;
  std::string syntax_of(const char* verb) const;
  std::string syntax_reply(const char* verb) const;
  std::optional<ParsedAddress> address_argument(const Arg& arg, const char* keyword,
                                                const std::string& syntax);
  bool check_mail_params(const std::string& syntax);

  void cmd_helo(const Arg& arg);
  void cmd_ehlo(const Arg& arg);
  void greet(const Arg& arg, bool extended);
  void cmd_noop(const Arg& arg);
  void cmd_quit(const Arg& arg);
  void cmd_help(const Arg& arg);
  void cmd_vrfy(const Arg& arg);
  void cmd_mail(const Arg& arg);
  void cmd_rcpt(const Arg& arg);
  void cmd_rset(const Arg& arg);
  void cmd_data(const Arg& arg);
  void cmd_bdat(const Arg& arg);
  void cmd_expn(const Arg& arg);
  void cmd_auth(const Arg& arg);
  void cmd_starttls(const Arg& arg);
  void auth_response(std::string_view line, std::size_t size);
  void follow(const AuthExchange::Result& result);
  bool is_offered(const Command& command) const;
  std::string ehlo_keyword(const Command& command) const;
  bool is_refused(Refusals::Stage stage, const std::vector<std::string>& subjects);
  void ask(Question question, const std::string& address);

  std::shared_ptr<const ChannelConfig> config_;  // shared by every connection of a server
  Question question_ = Question::None;
  std::string pending_address_;  // the MAIL or RCPT address waiting for a verdict
  std::string output_;
  std::string input_;                  // bytes received and not yet processed as a whole line
  std::size_t input_pos_ = 0;          // processed prefix of input_
  std::size_t dropped_bytes_ = 0;      // bytes of an overlong command line thrown away
  DataReader data_;                    // the message text, in DATA
  ChunkReader chunks_;                 // the message text, in BDAT chunks
  bool is_last_chunk_ = false;         // the chunk being read ends the message (BDAT ... LAST)
  std::string chunk_refusal_;          // the chunk being read is thrown away, then this reply
  std::string tls_;                    // the session's TLS version and cipher; empty before TLS
  std::uint64_t progress_ = 0;         // command lines, data chunks and verdicts so far
  AuthExchange auth_;                  // AUTH's challenges and responses, and its failures
  ReplyTo reply_to_ = ReplyTo::Other;  // what the next reply answers (its enhanced code)
};

// kVerbTable - the protocol's index: every verb and every EHLO keyword, once. HELP lists
// the verbs that have a syntax in this order, and EHLO announces the keywords in this order.
const Channel::Command Channel::kVerbTable[] = {
    {"EHLO", &Channel::cmd_ehlo, "EHLO hostname", nullptr, Keyword::None},
    {"HELO", &Channel::cmd_helo, "HELO hostname", nullptr, Keyword::None},
    {"MAIL", &Channel::cmd_mail, "MAIL FROM: <address>", nullptr, Keyword::None},
    {"RCPT", &Channel::cmd_rcpt, "RCPT TO: <address>", nullptr, Keyword::None},
    {"DATA", &Channel::cmd_data, "DATA", nullptr, Keyword::None},
    {"BDAT", &Channel::cmd_bdat, kBdatSyntax, &ChannelConfig::offer_chunking, Keyword::None},
    {"RSET", &Channel::cmd_rset, "RSET", nullptr, Keyword::None},
    {"NOOP", &Channel::cmd_noop, "NOOP", nullptr, Keyword::None},
    {"QUIT", &Channel::cmd_quit, "QUIT", nullptr, Keyword::None},
    {"VRFY", &Channel::cmd_vrfy, "VRFY <address>", nullptr, Keyword::None},
    {"EXPN", &Channel::cmd_expn, nullptr, nullptr, Keyword::None},
    {"SIZE", nullptr, nullptr, nullptr, Keyword::Size},
    {"8BITMIME", nullptr, nullptr, &ChannelConfig::offer_8bitmime, Keyword::Name},
    {"SMTPUTF8", nullptr, nullptr, &ChannelConfig::enable_smtputf8, Keyword::Name},
    {"PIPELINING", nullptr, nullptr, &ChannelConfig::offer_pipelining, Keyword::Name},
    {"CHUNKING", nullptr, nullptr, &ChannelConfig::offer_chunking, Keyword::Name},
    {"ENHANCEDSTATUSCODES", nullptr, nullptr, &ChannelConfig::enhanced_status_codes, Keyword::Name},
    {"AUTH", &Channel::cmd_auth, kAuthSyntax, &ChannelConfig::offer_auth, Keyword::Auth},
    {"STARTTLS", &Channel::cmd_starttls, "STARTTLS", &ChannelConfig::offer_starttls,
     Keyword::StartTls},
    {"HELP", &Channel::cmd_help, nullptr, nullptr, Keyword::Name},  // last in EHLO, as Python's
};

Channel::Channel(std::shared_ptr<const ChannelConfig> config, std::string peer_address)
    : fqdn(config->fqdn),
      peer(std::move(peer_address)),
      config_(std::move(config)),
      data_(config_->data_size_limit, config_->keep_data),
      chunks_(config_->data_size_limit, config_->keep_data),
      auth_(config_->auth_users.get()) {
  // --reject connect:...: the refusal instead of the greeting, then the end (RFC 5321 3.1
  // would let the client QUIT first; closing is what clients handle everywhere)
  if (is_refused(Refusals::Stage::Connect, {peer}))
    enter_state(State::Closing);
  else
    push(reply_greeting(fqdn));
}

const char* Channel::to_string(State state) {
  switch (state) {
    case State::Command: return "COMMAND";
    case State::Data: return "DATA";
    case State::Chunk: return "CHUNK";
    case State::Waiting: return "WAITING";
    case State::Closing: return "CLOSING";
  }
  return "?";
}

// push - queue one reply line
void Channel::push(const std::string& reply) {
  if (config_->enhanced_status_codes && extended_smtp)
    return push_line(with_enhanced_code(reply, reply_to_));
  push_line(reply);
}

void Channel::push_line(const std::string& reply) {
  if (config_->trace) config_->trace(peer + " -> " + printable(reply));
  output_ += reply;
  output_ += "\r\n";
}

// enter_state - every state change goes through here, so -d can explain a session
void Channel::enter_state(State to) {
  if (config_->trace && to != smtp_state)
    config_->trace(peer + " state " + to_string(smtp_state) + " -> " + to_string(to));
  smtp_state = to;
}

// set_post_data_state - smtpd.py _set_post_data_state: back to commands, transaction cleared
void Channel::set_post_data_state() {
  enter_state(State::Command);
  mailfrom.clear();
  rcpttos.clear();
  rcpt_options.clear();
  require_smtputf8 = false;
  data_.reset();
  chunks_.reset();
}

// set_rset_state - smtpd.py _set_rset_state: everything but the greeting
void Channel::set_rset_state() { set_post_data_state(); }

// wants_input - false while the mode decides, after QUIT, or when the client is far ahead
bool Channel::wants_input() const {
  if (smtp_state == State::Waiting || smtp_state == State::Closing) return false;
  return input_.size() - input_pos_ < kInputBacklog && output_.size() < kOutputBacklog;
}

void Channel::feed(std::string_view bytes) {
  input_.append(bytes.data(), bytes.size());
  process_input();
}

// process_input - handle every whole line (or data bytes) received so far
void Channel::process_input() {
  bool progress = true;
  while (progress && input_pos_ < input_.size()) {
    if (smtp_state == State::Command)
      progress = process_command_bytes();
    else if (smtp_state == State::Data)
      progress = process_data_bytes();
    else if (smtp_state == State::Chunk)
      progress = process_chunk_bytes();
    else
      progress = false;
  }
  input_.erase(0, input_pos_);
  input_pos_ = 0;
}

// process_command_bytes - one command line if a whole one is here; bound an overlong one
bool Channel::process_command_bytes() {
  std::size_t end = input_.find("\r\n", input_pos_);
  if (end == std::string::npos) {
    // Keep just enough to tell "too long" from "fine"; count the rest and drop it. The
    // last byte stays: it may be the CR of a CRLF split across two reads.
    std::size_t have = input_.size() - input_pos_;
    if (have > kLongestCommand + 2) {
      dropped_bytes_ += have - 1;
      input_pos_ = input_.size() - 1;
    }
    return false;
  }
  // A view is enough: command handlers never touch input_ (only answer() resumes
  // input processing, and never from inside a handler).
  std::string_view line(input_.data() + input_pos_, end - input_pos_);
  std::size_t size = dropped_bytes_ + line.size();
  input_pos_ = end + 2;
  dropped_bytes_ = 0;
  handle_command_line(line, size);
  return true;
}

// process_data_bytes - message text, read by the DATA reader; the end-of-data line ends it
bool Channel::process_data_bytes() {
  bool is_ended = false;
  reply_to_ = ReplyTo::Message;
  std::size_t used = data_.take(unread_input(), is_ended);
  input_pos_ += used;
  if (used > 0) ++progress_;
  if (is_ended) end_of_data();
  return is_ended;
}

// process_chunk_bytes - a BDAT chunk's octets, as many as it announced
bool Channel::process_chunk_bytes() {
  reply_to_ = ReplyTo::Message;
  std::size_t used = chunks_.take(unread_input());
  input_pos_ += used;
  if (used > 0) ++progress_;
  if (!chunks_.is_chunk_read()) return false;
  end_of_chunk();
  return true;
}

// end_of_chunk - a chunk is in: answer it, refuse the message, or (LAST) hand it to the mode
void Channel::end_of_chunk() {
  enter_state(State::Command);
  if (!chunk_refusal_.empty()) {
    chunks_.reset();
    return push(std::exchange(chunk_refusal_, ""));
  }
  if (chunks_.is_too_big()) {
    push(kReplyTooMuchData);
    return set_rset_state();  // the transaction is over; chunks still in the pipe get 503
  }
  if (!is_last_chunk_) return push(reply_chunk_received(chunks_.size()));
  if (is_refused(Refusals::Stage::Data, rcpttos)) return set_rset_state();
  ask(Question::Message, "");
}

// end_of_data - the lone dot arrived: refuse an oversized message or hand it to the mode
void Channel::end_of_data() {
  if (data_.is_too_big()) {
    push(kReplyTooMuchData);
    // differs from smtpd.py: Python stays in DATA state here and reads the next commands
    // as message text; RFC 5321 4.1.1.4 returns the session to command state.
    set_rset_state();
    return;
  }
  if (is_refused(Refusals::Stage::Data, rcpttos)) return set_rset_state();  // never stored
  ask(Question::Message, "");
}

// ask - wait for the mode's verdict; input stays buffered until answer()
void Channel::ask(Question question, const std::string& address) {
  question_ = question;
  pending_address_ = address;
  enter_state(State::Waiting);
}

// rename_client_auth_headers - with AUTH offered, "X-Auth-User:" is the server's line (the
// user who logged in), and a client's own header of that name would pass for a login: in the
// header section it becomes "X-Original-Auth-User:", its value kept
inline void rename_client_auth_headers(std::string& data) {
  constexpr std::string_view kName = "X-AUTH-USER";
  for (std::size_t at = 0; at < data.size() && data[at] != '\n';) {
    std::size_t after = at + kName.size();
    while (after < data.size() && (data[after] == ' ' || data[after] == '\t')) ++after;
    bool is_ours = after < data.size() && data[after] == ':' &&
                   ascii_upper(std::string_view(data).substr(at, kName.size())) == kName;
    if (is_ours) data.replace(at, kName.size(), "X-Original-Auth-User");
    std::size_t end = data.find('\n', at);
    at = end == std::string::npos ? data.size() : end + 1;
  }
}

Envelope Channel::take_message() {
  Envelope envelope;
  envelope.peer = peer;
  envelope.mailfrom = mailfrom;
  envelope.rcpttos = rcpttos;
  envelope.mail_options = mail_options;
  envelope.rcpt_options = rcpt_options;
  envelope.data = chunks_.is_started() ? chunks_.take_text() : data_.take_text();
  envelope.smtputf8 = require_smtputf8;
  if (config_->offer_auth) {
    envelope.auth_user = auth_user;
    rename_client_auth_headers(envelope.data);
  }
  if (config_->records_tls) envelope.tls = tls_;
  return envelope;
}

// answer - the mode's verdict on the question asked; an empty reply means "250 OK", as in
// smtpd.py's process_message returning None. A 2xx reply accepts the MAIL or RCPT address.
void Channel::answer(const std::string& reply) {
  if (smtp_state != State::Waiting) return;
  Question question = std::exchange(question_, Question::None);
  ++progress_;
  reply_to_ = question == Question::Mail   ? ReplyTo::Mail
              : question == Question::Rcpt ? ReplyTo::Rcpt
                                           : ReplyTo::Message;
  bool accepted = is_accepting(reply);
  if (question == Question::Message) {
    set_post_data_state();
  } else {
    enter_state(State::Command);
    if (question == Question::Mail && accepted) mailfrom = pending_address_;
    if (question == Question::Mail && !accepted) require_smtputf8 = false;
    if (question == Question::Rcpt && accepted) rcpttos.push_back(pending_address_);
  }
  pending_address_.clear();
  push(reply.empty() ? std::string(kReplyOk) : reply);
  process_input();
}

// close_with - the server is going away: send this reply (a 421) and close after it, in
// whatever state the session was (RFC 5321 3.8 allows 421 at any time)
void Channel::close_with(const std::string& reply) {
  question_ = Question::None;  // a verdict still to come no longer matters
  reply_to_ = ReplyTo::Other;
  push(reply);
  enter_state(State::Closing);
}

// is_http_verb - the methods a browser's request line starts with
inline bool is_http_verb(std::string_view verb) {
  for (const char* method : {"GET", "POST", "HEAD", "PUT", "CONNECT", "OPTIONS"})
    if (verb == method) return true;
  return false;
}

// command_size_limit - 512, and for MAIL after EHLO room for SIZE= and SMTPUTF8
// differs from smtpd.py: Python keeps this table in the class, shared by all connections, and
// clears it whenever a client connects; here each connection has its own.
std::size_t Channel::command_size_limit(const std::string& verb) const {
  if (!extended_smtp || verb != "MAIL") return kCommandSizeLimit;
  std::size_t limit = kCommandSizeLimit;
  if (config_->data_size_limit != 0) limit += kSizeParamExtra;
  if (config_->enable_smtputf8) limit += kSmtpUtf8Extra;
  return limit;
}

// handle_command_line - smtpd.py found_terminator in COMMAND state
void Channel::handle_command_line(std::string_view line, std::size_t size) {
  ++progress_;
  reply_to_ = ReplyTo::Other;
  if (auth_.is_waiting()) return auth_response(line, size);
  // AUTH's initial response holds the password: the trace shows the verb and mechanism only
  std::string_view shown = line.substr(0, kTraceLineLimit);
  if (ascii_upper(line.substr(0, 5)) == "AUTH ") shown = line.substr(0, line.find(' ', 5));
  if (config_->trace) config_->trace(peer + " <- " + printable(shown));
  if (line.empty()) return push(kReplyBadSyntax);
  std::size_t space = line.find(' ');
  std::string verb = ascii_upper(line.substr(0, space));
  reply_to_ = verb == "HELO" || verb == "EHLO" ? ReplyTo::Hello
              : verb == "MAIL"                 ? ReplyTo::Mail
              : verb == "RCPT"                 ? ReplyTo::Rcpt
                                               : ReplyTo::Other;
  if (is_http_verb(verb) || (verb.size() > 1 && verb.back() == ':')) return refuse_non_smtp();
  // differs from smtpd.py: Python's decode raises and drops the connection.
  if (size <= line.size() && !is_valid_utf8(line)) return push(kReplyNotUtf8);
  Arg arg;
  if (space != std::string_view::npos) arg = std::string(python_strip(line.substr(space + 1)));
  if (size > command_size_limit(verb)) return push(kReplyLineTooLong);
  for (const Command& command : kVerbTable) {
    if (verb == command.verb && command.handler != nullptr && is_offered(command))
      return (this->*command.handler)(arg);
  }
  // differs from smtpd.py: Python echoes the verb as it came, and a non-ASCII one makes its
  // reply fail to encode, which drops the connection.
  push(reply_unknown_command(printable(verb, require_smtputf8)));
}

// is_offered - false for an extension's verb when its option is off: then it is unknown
bool Channel::is_offered(const Command& command) const {
  return command.offered == nullptr || (*config_).*command.offered;
}

// is_refused - a --reject rule for this stage takes one of the subjects: its reply is sent
bool Channel::is_refused(Refusals::Stage stage, const std::vector<std::string>& subjects) {
  if (!config_->refusals) return false;
  std::string reply = config_->refusals->reply_for(stage, subjects);
  if (reply.empty()) return false;
  push(reply);
  return true;
}

inline bool has_text(const std::optional<std::string>& arg) { return arg && !arg->empty(); }

// refuse_non_smtp - an HTTP request line or a header line: a web page is making a browser
// talk to us (cross-protocol attack), so stop reading and close at once, as Postfix does.
// differs from smtpd.py: Python answers 500 to each line and goes on reading.
void Channel::refuse_non_smtp() {
  push(kReplyNotSmtp);
  enter_state(State::Closing);
}

void Channel::cmd_helo(const Arg& arg) { greet(arg, false); }
void Channel::cmd_ehlo(const Arg& arg) { greet(arg, true); }

// greet - HELO and EHLO
// differs from smtpd.py: a second HELO/EHLO resets the transaction like RSET and is answered
// again (RFC 5321 4.1.4), where Python answers "503 Duplicate HELO/EHLO".
void Channel::greet(const Arg& arg, bool extended) {
  if (!has_text(arg)) return push(syntax_reply(extended ? "EHLO" : "HELO"));
  if (is_refused(Refusals::Stage::Helo, {*arg})) return;
  set_rset_state();
  seen_greeting = *arg;
  extended_smtp = extended;
  if (!extended) return push("250 " + fqdn);
  std::vector<std::string> lines{fqdn};
  for (const Command& command : kVerbTable) {
    std::string keyword = ehlo_keyword(command);
    if (!keyword.empty()) lines.push_back(std::move(keyword));
  }
  for (std::size_t i = 0; i < lines.size(); ++i)
    push((i + 1 < lines.size() ? "250-" : "250 ") + lines[i]);
}

// ehlo_keyword - what EHLO says of a row of kVerbTable now: "" for nothing
std::string Channel::ehlo_keyword(const Command& command) const {
  if (!is_offered(command)) return "";
  switch (command.keyword) {
    case Keyword::None: return "";
    case Keyword::Name: return command.verb;
    case Keyword::Size:
      if (config_->data_size_limit == 0) return "";
      return std::string(command.verb) + " " + std::to_string(config_->data_size_limit);
    case Keyword::Auth:
      if (config_->tls_required && is_plain_text()) return "";
      return std::string(command.verb) + " " + kAuthMechanisms;
    case Keyword::StartTls: return is_plain_text() ? command.verb : "";
  }
  return "";
}

void Channel::cmd_noop(const Arg& arg) { push(has_text(arg) ? syntax_reply("NOOP") : kReplyOk); }

void Channel::cmd_quit(const Arg&) {  // the argument is ignored, as in smtpd.py
  push(kReplyBye);
  enter_state(State::Closing);
}

// cmd_help - the syntax of one verb, or the list of verbs, from kVerbTable
void Channel::cmd_help(const Arg& arg) {
  std::string list;
  for (const Command& command : kVerbTable) {
    if (command.syntax == nullptr || !is_offered(command)) continue;
    list += list.empty() ? "" : " ";
    list += command.verb;
  }
  if (!has_text(arg)) return push(kReplyHelpList + list);
  std::string verb = ascii_upper(*arg);
  for (const Command& command : kVerbTable) {
    if (command.syntax == nullptr || !is_offered(command) || verb != command.verb) continue;
    return push(kReplyHelpSyntax + syntax_of(command.verb));
  }
  push(kReplyHelpUnknown + list);
}

void Channel::cmd_vrfy(const Arg& arg) {
  if (!has_text(arg)) return push(syntax_reply("VRFY"));
  std::optional<ParsedAddress> parsed = parse_address(*arg);
  if (has_control_character(*arg, true) || (parsed && has_control_character(parsed->address)))
    return push(kReplyControlInAddress);
  if (parsed && !parsed->address.empty()) return push(kReplyVrfyCannot);
  push(reply_cannot_vrfy(printable(*arg, require_smtputf8)));
}

// syntax_of - a verb's syntax from kVerbTable; after EHLO, MAIL and RCPT take parameters too
std::string Channel::syntax_of(const char* verb) const {
  for (const Command& command : kVerbTable) {
    if (std::strcmp(command.verb, verb) != 0 || command.syntax == nullptr) continue;
    bool has_params =
        extended_smtp && (std::strcmp(verb, "MAIL") == 0 || std::strcmp(verb, "RCPT") == 0);
    return std::string(command.syntax) + (has_params ? kMailParamsSyntax : "");
  }
  return verb;
}

// syntax_reply - "501 Syntax: MAIL FROM: <address>" and the like, for the verb's misuse
std::string Channel::syntax_reply(const char* verb) const { return kReplySyntax + syntax_of(verb); }

// address_argument - "FROM:<addr> params" -> address and rest; replies and gives nothing on error
std::optional<ParsedAddress> Channel::address_argument(const Arg& arg, const char* keyword,
                                                       const std::string& syntax) {
  if (!arg) {
    push(syntax);
    return std::nullopt;
  }
  // smtpd.py _strip_command_keyword: no keyword leaves nothing, which is a syntax error
  std::string_view text(*arg);
  std::size_t keylen = std::strlen(keyword);
  std::string_view after;
  if (ascii_upper(text.substr(0, keylen)) == keyword) after = python_strip(text.substr(keylen));
  std::optional<ParsedAddress> parsed = parse_address(after);
  // differs from smtpd.py: Python accepts control characters in a quoted local part, which a
  // relay would pass on (a bare LF there smuggles a command to the upstream)
  if (has_control_character(text, true) || (parsed && has_control_character(parsed->address))) {
    push(kReplyControlInAddress);
    return std::nullopt;
  }
  if (!parsed || parsed->address.empty() || (!extended_smtp && !parsed->rest.empty())) {
    push(syntax);
    return std::nullopt;
  }
  return parsed;
}

void Channel::cmd_mail(const Arg& arg) {
  if (seen_greeting.empty()) return push(kReplySendHeloFirst);
  if (config_->tls_required && tls_.empty()) return push(kReplyTlsRequired);
  if (config_->auth_required && auth_user.empty()) return push(kReplyAuthRequired);
  std::string syntax = syntax_reply("MAIL");
  std::optional<ParsedAddress> parsed = address_argument(arg, "FROM:", syntax);
  if (!parsed) return;
  if (!mailfrom.empty()) return push(kReplyNestedMail);
  mail_options = python_split(ascii_upper(parsed->rest));
  if (!check_mail_params(syntax)) return;
  if (is_refused(Refusals::Stage::Mail, {parsed->address})) {
    require_smtputf8 = false;
    return;
  }
  if (config_->ask_envelope) return ask(Question::Mail, parsed->address);
  mailfrom = parsed->address;
  push(kReplyOk);
}

// check_mail_params - BODY, SMTPUTF8 and SIZE as smtpd.py checks them, in its order
bool Channel::check_mail_params(const std::string& syntax) {
  auto params = parse_params(mail_options);
  if (!params) return push(syntax), false;
  auto take = [&](const char* key) -> std::optional<std::optional<std::string>> {
    std::optional<std::optional<std::string>> found;
    for (auto it = params->begin(); it != params->end();) {  // Python's dict: the last wins
      if (it->first == key) {
        found = it->second;
        it = params->erase(it);
      } else {
        ++it;
      }
    }
    return found;
  };
  auto body = take("BODY");
  if (body && (!*body || (**body != "7BIT" && **body != "8BITMIME")))
    return push(kReplyBadBody), false;
  if (config_->enable_smtputf8) {
    auto smtputf8 = take("SMTPUTF8");
    if (smtputf8 && *smtputf8) return push(kReplySmtpUtf8Arg), false;
    if (smtputf8) require_smtputf8 = true;
  }
  auto size = take("SIZE");
  if (size) {
    // differs from smtpd.py: a bare SIZE with no value crashes Python; here it is a syntax error
    if (!*size || !is_decimal(**size)) return push(syntax), false;
    std::uint64_t limit = config_->data_size_limit;
    bool too_big = (*size)->size() > 19 || std::stoull(**size) > limit;
    if (limit != 0 && too_big) return push(kReplySizeExceeded), false;
  }
  if (!params->empty()) return push(kReplyMailParams), false;
  return true;
}

void Channel::cmd_rcpt(const Arg& arg) {
  if (seen_greeting.empty()) return push(kReplySendHeloFirst);
  if (mailfrom.empty()) return push(kReplyNeedMail);
  std::size_t max = config_->max_recipients;
  if (max != 0 && rcpttos.size() >= max) return push(kReplyTooManyRecipients);
  std::string syntax = syntax_reply("RCPT");
  std::optional<ParsedAddress> parsed = address_argument(arg, "TO:", syntax);
  if (!parsed) return;
  std::vector<std::string> options = python_split(ascii_upper(parsed->rest));
  auto params = parse_params(options);
  if (!params) return push(syntax);
  // differs from smtpd.py: Python has already stored the parameters as the message's
  // rcpt_options, so the refused ones of the last RCPT reach the message; here they do not.
  if (!params->empty()) return push(kReplyRcptParams);  // no RCPT parameter is known
  if (is_refused(Refusals::Stage::Rcpt, {parsed->address})) return;
  if (config_->ask_envelope) return ask(Question::Rcpt, parsed->address);
  rcpttos.push_back(parsed->address);
  push(kReplyOk);
}

void Channel::cmd_rset(const Arg& arg) {
  if (has_text(arg)) return push(syntax_reply("RSET"));
  set_rset_state();
  push(kReplyOk);
}

void Channel::cmd_data(const Arg& arg) {
  if (seen_greeting.empty()) return push(kReplySendHeloFirst);
  if (rcpttos.empty()) return push(kReplyNeedRcpt);
  if (chunks_.is_started()) return push(kReplyDataAfterBdat);
  if (has_text(arg)) return push(syntax_reply("DATA"));
  data_.reset();
  // differs from smtpd.py: Python waits for CRLF "." CRLF, so a "." right after 354 does not
  // end an empty message there; here every line is checked (RFC 5321 4.1.1.4).
  enter_state(State::Data);
  push(kReplyStartData);
}

// parse_chunk_size - BDAT's size: decimal digits that fit in 64 bits; false for anything else
inline bool parse_chunk_size(const std::string& word, std::uint64_t& size) {
  if (word.empty() || word.size() > 19 || !is_decimal(word)) return false;
  size = std::stoull(word);
  return true;
}

// cmd_bdat - RFC 3030: BDAT size [LAST], then exactly size octets. A chunk that is refused
// (no greeting or no recipient yet) is still read to its end and thrown away, so the
// session stays in step with the client; only a size that cannot be read leaves it to the
// client to resynchronise (501, as for any syntax error).
void Channel::cmd_bdat(const Arg& arg) {
  std::vector<std::string> words = python_split(arg.value_or(""));
  std::uint64_t size = 0;
  bool is_last = words.size() == 2 && ascii_upper(words[1]) == "LAST";
  bool is_read = !words.empty() && parse_chunk_size(words[0], size);
  if (!is_read || words.size() > 2 || (words.size() == 2 && !is_last))
    return push(syntax_reply("BDAT"));
  if (seen_greeting.empty())
    chunk_refusal_ = kReplySendHeloFirst;
  else if (rcpttos.empty())
    chunk_refusal_ = kReplyNeedRcpt;
  is_last_chunk_ = is_last;
  chunks_.begin(size);
  enter_state(State::Chunk);
  if (size == 0) end_of_chunk();
}

void Channel::cmd_expn(const Arg&) { push(kReplyExpn); }

// cmd_starttls - RFC 3207: 220, then the loop starts TLS (question StartTls) and calls
// restart_in_tls. What the client sent after STARTTLS, before the handshake, is discarded
// (RFC 3207 4.2: a client must not pipeline past STARTTLS, and such commands would otherwise
// run as if they came through TLS).
void Channel::cmd_starttls(const Arg& arg) {
  if (has_text(arg)) return push("501 Syntax: STARTTLS");
  if (!tls_.empty()) return push(kReplyTlsActive);
  push(kReplyTlsReady);
  input_pos_ = input_.size();
  dropped_bytes_ = 0;
  ask(Question::StartTls, "");
}

// restart_in_tls - TLS is in place: the session starts over, as RFC 3207 4.2 asks (no
// greeting, no login, no transaction; the client sends EHLO again)
void Channel::restart_in_tls() {
  if (question_ != Question::StartTls) return;
  question_ = Question::None;
  enter_state(State::Command);
  set_rset_state();
  seen_greeting.clear();
  extended_smtp = false;
  auth_user.clear();
}

// cmd_auth - AUTH once per session and not inside a transaction; AuthExchange does the rest
void Channel::cmd_auth(const Arg& arg) {
  if (seen_greeting.empty()) return push(kReplySendHeloFirst);
  if (config_->tls_required && tls_.empty()) return push(kReplyTlsRequired);
  if (!auth_user.empty()) return push(kReplyAuthAgain);
  if (!mailfrom.empty()) return push(kReplyAuthInMail);
  std::vector<std::string> words = python_split(arg.value_or(""));
  if (words.empty() || words.size() > 2) return push(syntax_reply("AUTH"));
  std::optional<std::string> initial;
  if (words.size() == 2) initial = words[1];
  follow(auth_.start(words[0], initial));
}

// auth_response - a line answering our 334 challenge. Never traced: it holds a password.
void Channel::auth_response(std::string_view line, std::size_t size) {
  if (config_->trace) config_->trace(peer + " <- (AUTH response, not shown)");
  follow(auth_.respond(line, size > line.size()));
}

// follow - do what a step of the AUTH exchange says
void Channel::follow(const AuthExchange::Result& result) {
  if (result.outcome == AuthExchange::Outcome::TooManyFailures)
    return close_with(reply_closing(fqdn, kClosingAuthFailures));
  if (result.outcome == AuthExchange::Outcome::LoggedIn) auth_user = result.user;
  push(result.reply);
}

// ==== 8. Reactor ====
// The loop's engine, as Redis's ae.c is under its server: it watches sockets, runs timers and
// runs tasks deferred until the current callbacks are done, and knows nothing of SMTP. Reactor
// is what modes and the server may ask of it; PollReactor gives it on poll() (WSAPoll on
// Windows), the portable base.
//   Reactor (watch, set_events, unwatch, release, start_timer, restart_timer, cancel_timer,
//   defer, dispose); PollReactor (turn, run_deferred, now_ms)

// Reactor - the loop's services to modes and the server: watch a socket, run a
// timer, and run a task after the current callbacks. That last one is the only guard against
// re-entrancy anywhere: whatever must not happen inside a callback (destroying the object
// whose callback is on the stack, asking the mode its next question) is deferred, and
// deferred tasks run in the order given, before the next poll. A watched socket is closed
// through release(), after the current callbacks, so its number cannot come back to a new
// socket while this turn's events are still being handed out.
class Reactor {
 public:
  using ReadyHandler = std::function<void(short revents)>;
  using Task = std::function<void()>;
  using TimerId = std::uint64_t;  // 0 is never a timer, so "no timer" needs no flag

  virtual ~Reactor() = default;
  virtual void watch(socket_t s, short events, ReadyHandler on_ready) = 0;  // add or replace
  virtual void set_events(socket_t s, short events) = 0;  // same handler; 0 polls it not at all
  virtual void unwatch(socket_t s) = 0;
  virtual void release(socket_t s, void (*close)(socket_t)) = 0;  // unwatch; close after callbacks
  virtual TimerId start_timer(long long delay_ms, Task on_expiry) = 0;
  virtual void restart_timer(TimerId id, long long delay_ms) = 0;  // same handler, new deadline
  virtual void cancel_timer(TimerId id) = 0;                       // 0 or a fired timer: no-op
  virtual void defer(Task task) = 0;  // run after the current callbacks, before the next poll

  // dispose - destroy an object after the current callbacks (its own may be on the stack)
  template <class T>
  void dispose(std::unique_ptr<T> object) {
    if (object) defer([kept = std::shared_ptr<T>(std::move(object))] {});
  }
};

// PollReactor - the Reactor on poll(): one turn polls every watched socket, runs the handlers
// of those that are ready, then the timers that are due, then the deferred tasks. Timers are
// kept by deadline, so starting, restarting or cancelling one costs a map update however many
// there are (a timer per connection is cheap).
class PollReactor : public Reactor {
 public:
  ~PollReactor() override { run_deferred(); }

  void watch(socket_t s, short events, ReadyHandler on_ready) override {
    watchers_[s] = Watcher{events, std::move(on_ready)};
  }
  void set_events(socket_t s, short events) override {
    auto it = watchers_.find(s);
    if (it != watchers_.end()) it->second.events = events;
  }
  void unwatch(socket_t s) override { watchers_.erase(s); }
  void release(socket_t s, void (*close)(socket_t)) override {
    unwatch(s);
    defer([s, close] { close(s); });
  }
  TimerId start_timer(long long delay_ms, Task on_expiry) override {
    TimerId id = ++last_timer_id_;
    long long deadline = now_ms() + delay_ms;
    timers_.emplace(std::make_pair(deadline, id), std::move(on_expiry));
    deadlines_.emplace(id, deadline);
    return id;
  }
  void restart_timer(TimerId id, long long delay_ms) override {
    auto at = deadlines_.find(id);
    if (at == deadlines_.end()) return;
    auto node = timers_.extract(std::make_pair(at->second, id));
    at->second = now_ms() + delay_ms;
    node.key() = std::make_pair(at->second, id);
    timers_.insert(std::move(node));
  }
  void cancel_timer(TimerId id) override {
    auto at = deadlines_.find(id);
    if (at == deadlines_.end()) return;
    timers_.erase(std::make_pair(at->second, id));
    deadlines_.erase(at);
  }
  void defer(Task task) override { deferred_.push_back(std::move(task)); }

  // turn - wait up to max_wait_ms (less when a timer is due sooner), then run what is ready;
  // false when poll itself fails, with the reason in error()
  bool turn(int max_wait_ms) {
    fds_.clear();
    // A socket that wants no events is left out, not polled with events 0: poll reports POLLHUP
    // and POLLERR whatever is asked, so a client reset while its verdict is pending would wake
    // every turn at once and spin the loop.
    for (const auto& [s, w] : watchers_)
      if (w.events != 0) fds_.push_back(pollfd_t{s, w.events, 0});
    if (poll_sockets(fds_.data(), fds_.size(), wait_ms(max_wait_ms)) < 0) {
      int err = last_socket_error();
      if (interrupted(err)) return true;
      error_ = "poll failed: " + socket_error_text(err);
      return false;
    }
    for (const pollfd_t& p : fds_)
      if (p.revents != 0) dispatch(p.fd, p.revents);
    fire_timers();
    run_deferred();
    return true;
  }

  // run_deferred - the deferred tasks, in order, including those they defer in turn
  void run_deferred() {
    while (!deferred_.empty()) {
      std::vector<Task> batch = std::exchange(deferred_, {});
      for (Task& task : batch) std::exchange(task, nullptr)();  // each gone before the next
    }
  }

  const std::string& error() const { return error_; }

  static long long now_ms() {
    using namespace std::chrono;
    return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
  }

 private:
  struct Watcher {
    short events = 0;
    ReadyHandler on_ready;
  };

  int wait_ms(int max_wait_ms) const {
    if (!deferred_.empty()) return 0;
    long long wait = max_wait_ms;
    if (!timers_.empty()) wait = std::min(wait, timers_.begin()->first.first - now_ms());
    return static_cast<int>(std::max(0LL, wait));
  }

  // dispatch - a socket unwatched earlier in this turn gets nothing; a handler may replace
  // or remove itself, so it runs from a copy
  void dispatch(socket_t s, short revents) {
    auto it = watchers_.find(s);
    if (it == watchers_.end()) return;
    ReadyHandler handler = it->second.on_ready;
    handler(revents);
  }

  // fire_timers - those due now, earliest first; one started meanwhile waits for a later turn
  void fire_timers() {
    long long now = now_ms();
    TimerId newest = last_timer_id_;
    while (!timers_.empty()) {
      auto first = timers_.begin();
      auto [deadline, id] = first->first;
      if (deadline > now || id > newest) break;
      Task task = std::move(first->second);
      timers_.erase(first);
      deadlines_.erase(id);
      task();
    }
  }

  std::unordered_map<socket_t, Watcher> watchers_;
  std::map<std::pair<long long, TimerId>, Task> timers_;  // by deadline, then by age
  std::unordered_map<TimerId, long long> deadlines_;      // each timer's key in timers_
  TimerId last_timer_id_ = 0;
  std::vector<Task> deferred_;
  std::vector<pollfd_t> fds_;  // this turn's poll set
  std::string error_;
};

// ==== 9. Modes ====
// What happens to mail: the -c CLASS of smtpd.py. The server opens a ModeSession for each
// client and asks it about every step the channel waits on; the session answers through a
// Verdict, at once (the printer) or later (--exec, or a relay once its upstream has replied).
// An empty verdict means the usual success reply; a mode that cannot keep a message answers
// 4xx, so the client keeps it and retries.
//   Verdict, ModeSession, ServerMode (MailRequest is the channel's)

using Verdict = std::function<void(const std::string& reply)>;

// ModeSession - one client's dealings with the mode; only relays care about MAIL and RCPT
class ModeSession {
 public:
  virtual ~ModeSession() = default;
  virtual void on_mail(const MailRequest&, Verdict verdict) { verdict(""); }
  virtual void on_rcpt(const std::string&, Verdict verdict) { verdict(""); }
  virtual void on_message(Envelope envelope, Verdict verdict) = 0;
};

class ServerMode {
 public:
  virtual ~ServerMode() = default;
  virtual bool asks_envelope() const { return false; }  // MAIL and RCPT wait for verdicts
  virtual bool keeps_data() const { return true; }      // false: message text is not needed
  virtual std::unique_ptr<ModeSession> open_session(Reactor& reactor, const std::string& peer) = 0;
  virtual void start(Reactor&) {}              // the loop is there: a relay asks its upstream
  virtual void stop() {}                       // the loop is going: let go of what uses it
  virtual void shape(ChannelConfig&) const {}  // what a new client's EHLO offers
};

// ==== 10. Reading mail ====
// What a mail client shows of a message, read from Envelope::data as the channel stores it
// (lines joined with "\n", dot-unstuffed): the headers unfolded, with RFC 2047 encoded words
// decoded; the MIME tree (RFC 2045, 2046, 2231); bodies decoded to UTF-8; and a MailSummary with
// the text, the HTML, the attachments and the links. Pure: bytes in, values out, no I/O.
// Python 3.11's email package (policy.default) is the reference; every departure is marked
// "differs from Python's email". A hostile message costs at most what the kMime* limits allow:
// what is past a cap is listed, not decoded, and the summary says it is not complete.
//   append_utf8, invalid_utf8_length, replace_invalid_utf8; Charset, charset_kind,
//   charset_to_utf8 (tables, iconv); ByteSink, decode_base64_loose, decode_quoted_printable,
//   decode_q_word; EncodedWordText, decode_header_text; MimeHeader, line_at,
//   read_header_block, is_field_name, decoded_header, message_header; MimeValue, parse_mime_value
//   (RFC 2231); MimePart, MimeTree; DecodedBody, transfer_decode, decoded_size, decode_text_body;
//   related_root, find_body, MailAttachment, AttachmentFinder; LinkList, url_end, find_text_links,
//   entity_code_point, decode_html_entities, tag_end, find_html_links; MailSummary, summarize_mail

constexpr const char* kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD, for what is not UTF-8

// append_utf8 - code point cp (at most U+10FFFF, no surrogate) as UTF-8, appended to out
inline void append_utf8(std::string& out, std::uint32_t cp) {
  auto put = [&](std::uint32_t byte) { out += static_cast<char>(byte); };
  if (cp < 0x80) return put(cp);
  if (cp < 0x800) {
    put(0xC0 | cp >> 6);
  } else if (cp < 0x10000) {
    put(0xE0 | cp >> 12), put(0x80 | (cp >> 6 & 0x3F));
  } else {
    put(0xF0 | cp >> 18), put(0x80 | (cp >> 12 & 0x3F)), put(0x80 | (cp >> 6 & 0x3F));
  }
  put(0x80 | (cp & 0x3F));
}

// invalid_utf8_length - bytes of the malformed sequence at s[i] that one U+FFFD stands for:
// the longest start of a well-formed sequence, or 1, as Python's errors='replace' counts them
inline std::size_t invalid_utf8_length(std::string_view s, std::size_t i) {
  unsigned char lead = static_cast<unsigned char>(s[i]);
  std::size_t want = lead >= 0xC2 && lead <= 0xDF   ? 2
                     : lead >= 0xE0 && lead <= 0xEF ? 3
                     : lead >= 0xF0 && lead <= 0xF4 ? 4
                                                    : 1;
  std::size_t k = 1;
  for (; k < want && i + k < s.size(); ++k) {
    unsigned char c = static_cast<unsigned char>(s[i + k]);
    unsigned char lo = k == 1 && lead == 0xE0 ? 0xA0 : k == 1 && lead == 0xF0 ? 0x90 : 0x80;
    unsigned char hi = k == 1 && lead == 0xED ? 0x9F : k == 1 && lead == 0xF4 ? 0x8F : 0xBF;
    if (c < lo || c > hi) break;
  }
  return k;
}

// replace_invalid_utf8 - s with each malformed UTF-8 sequence replaced by U+FFFD
inline std::string replace_invalid_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  std::uint32_t cp;
  std::size_t len;
  for (std::size_t i = 0; i < s.size(); i += len) {
    if (decode_utf8_at(s, i, cp, len)) {
      out.append(s.data() + i, len);
    } else {
      out += kReplacementChar;
      len = invalid_utf8_length(s, i);
    }
  }
  return out;
}

// Charset - how a charset named in a message becomes UTF-8: as it is, by one of three tables,
// or through iconv(3)
enum class Charset { Utf8, Latin1, Latin9, Windows1252, Other };

// charset_kind - the Charset for a name as messages write it (Python's aliases, any case)
// differs from Python's email: US-ASCII (and text with no charset) is read as UTF-8, so an
// 8-bit body a client forgot to label keeps its letters; Python gives U+FFFD for each byte.
inline Charset charset_kind(std::string_view name) {
  static const std::pair<const char*, Charset> kNames[] = {{"", Charset::Utf8},
                                                           {"utf-8", Charset::Utf8},
                                                           {"utf8", Charset::Utf8},
                                                           {"us-ascii", Charset::Utf8},
                                                           {"ascii", Charset::Utf8},
                                                           {"iso-8859-1", Charset::Latin1},
                                                           {"iso8859-1", Charset::Latin1},
                                                           {"latin1", Charset::Latin1},
                                                           {"latin-1", Charset::Latin1},
                                                           {"l1", Charset::Latin1},
                                                           {"iso-8859-15", Charset::Latin9},
                                                           {"iso8859-15", Charset::Latin9},
                                                           {"latin-9", Charset::Latin9},
                                                           {"latin9", Charset::Latin9},
                                                           {"l9", Charset::Latin9},
                                                           {"windows-1252", Charset::Windows1252},
                                                           {"cp1252", Charset::Windows1252}};
  std::string lower;
  for (char c : python_strip(name)) lower += c == '_' ? '-' : ascii_lower(c);
  for (const auto& [known, kind] : kNames)
    if (lower == known) return kind;
  return Charset::Other;
}

// table_code_point - byte b in ISO-8859-1, ISO-8859-15 or Windows-1252; U+FFFD for the five
// bytes Windows-1252 leaves undefined (Python's cp1252 refuses them too)
inline std::uint32_t table_code_point(Charset charset, unsigned char b) {
  static const std::uint16_t kWindows1252[32] = {
      0x20AC, 0xFFFD, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160,
      0x2039, 0x0152, 0xFFFD, 0x017D, 0xFFFD, 0xFFFD, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022,
      0x2013, 0x2014, 0x02DC, 0x2122, 0x0161, 0x203A, 0x0153, 0xFFFD, 0x017E, 0x0178};
  static const std::pair<unsigned char, std::uint16_t> kLatin9[] = {
      {0xA4, 0x20AC}, {0xA6, 0x0160}, {0xA8, 0x0161}, {0xB4, 0x017D},
      {0xB8, 0x017E}, {0xBC, 0x0152}, {0xBD, 0x0153}, {0xBE, 0x0178}};
  if (charset == Charset::Windows1252 && b >= 0x80 && b < 0xA0) return kWindows1252[b - 0x80];
  if (charset == Charset::Latin9)
    for (const auto& [byte, cp] : kLatin9)
      if (b == byte) return cp;
  return b;
}

#ifdef SMTPD_ICONV
// iconv_to_utf8 - bytes in a charset only the C library knows, as UTF-8; nothing when it does
// not know the name. A malformed sequence costs one U+FFFD and one byte, as errors='replace'
// does in Python; a sequence cut short at the end, one U+FFFD.
inline std::optional<std::string> iconv_to_utf8(std::string_view bytes, const std::string& name) {
  iconv_t cd = iconv_open("UTF-8", name.c_str());
  if (cd == reinterpret_cast<iconv_t>(-1)) return std::nullopt;
  std::string out;
  char buffer[4096];
  char* in = const_cast<char*>(bytes.data());  // iconv does not write to its input
  std::size_t in_left = bytes.size();
  for (bool is_flushed = false; !is_flushed;) {
    char* to = buffer;
    std::size_t to_left = sizeof buffer;
    is_flushed = in_left == 0;  // with no input left, iconv ends a stateful charset's shift
    std::size_t done = is_flushed ? iconv(cd, nullptr, nullptr, &to, &to_left)
                                  : iconv(cd, &in, &in_left, &to, &to_left);
    out.append(buffer, static_cast<std::size_t>(to - buffer));
    if (done != static_cast<std::size_t>(-1) || errno == E2BIG) continue;
    out += kReplacementChar;  // EILSEQ: skip one byte; EINVAL: the rest is a cut sequence
    std::size_t skip = errno == EILSEQ ? 1 : in_left;
    in += skip, in_left -= std::min(skip, in_left);
    iconv(cd, nullptr, nullptr, nullptr, nullptr);
    is_flushed = false;
  }
  iconv_close(cd);
  return out;
}
#endif

// charset_to_utf8 - bytes in the named charset as UTF-8, malformed input as U+FFFD; nothing
// for a charset neither the tables nor iconv know (on Windows: none but the tables')
inline std::optional<std::string> charset_to_utf8(std::string_view bytes, std::string_view name) {
  Charset kind = charset_kind(name);
  if (kind == Charset::Utf8) return replace_invalid_utf8(bytes);
  if (kind == Charset::Other) {
#ifdef SMTPD_ICONV
    std::string clean(python_strip(name));  // a name, not iconv's "//TRANSLIT" suffixes
    bool is_name =
        !clean.empty() && clean.size() <= 40 && std::all_of(clean.begin(), clean.end(), [](char c) {
          return is_ascii_alnum(c) || (c != '\0' && std::strchr("-_.:+", c) != nullptr);
        });
    if (is_name) return iconv_to_utf8(bytes, clean);
#endif
    return std::nullopt;
  }
  std::string out;
  out.reserve(bytes.size() + bytes.size() / 2);
  for (char c : bytes) append_utf8(out, table_code_point(kind, static_cast<unsigned char>(c)));
  return out;
}

// ByteSink - where a decoder puts its bytes: a string, or only a count when nothing is kept
// (an attachment's size needs no copy of it)
struct ByteSink {
  std::string* out = nullptr;
  std::size_t size = 0;
  void put(char c) {
    ++size;
    if (out != nullptr) *out += c;
  }
};

// base64_value - the 6 bits of a base64 character, or -1
inline int base64_value(char c) {
  return c >= 'A' && c <= 'Z'   ? c - 'A'
         : c >= 'a' && c <= 'z' ? c - 'a' + 26
         : c >= '0' && c <= '9' ? c - '0' + 52
         : c == '+'             ? 62
         : c == '/'             ? 63
                                : -1;
}

// decode_base64_loose - a base64 body or B encoded word as Python's email reads one
// (binascii.a2b_base64 without strict_mode): other characters skipped, the text ends where
// padding completes a group, a group cut short gives the bytes it has.
// differs from Python's email: a body with one character too many (1 more than a multiple
// of 4) is decoded without it; Python gives the base64 text itself.
inline void decode_base64_loose(std::string_view text, ByteSink& sink) {
  std::uint32_t bits = 0;
  std::size_t in_group = 0, pads = 0;
  for (char c : text) {
    if (c == '=') {
      if (in_group >= 2 && in_group + ++pads >= 4) return;
      continue;
    }
    int value = base64_value(c);
    if (value < 0) continue;
    pads = 0;
    bits = (bits << 6) | static_cast<std::uint32_t>(value);
    if (in_group > 0) sink.put(static_cast<char>((bits >> (6 - 2 * in_group)) & 0xFF));
    in_group = (in_group + 1) % 4;
  }
}

inline int hex_value(char c) {
  return c >= '0' && c <= '9'   ? c - '0'
         : c >= 'a' && c <= 'f' ? c - 'a' + 10
         : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                : -1;
}

// decode_quoted_printable - a quoted-printable body (RFC 2045 6.7) as Python's quopri reads
// one (binascii.a2b_qp): "=" at a line end joins the lines, =XX is a byte, anything else
// after "=" is kept as written; a lone "=" at the very end is dropped
inline void decode_quoted_printable(std::string_view text, ByteSink& sink) {
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] != '=') {
      sink.put(text[i]);
    } else if (i + 1 < text.size() && (text[i + 1] == '\n' || text[i + 1] == '\r')) {
      i = std::min(text.find('\n', i + 1), text.size() - 1);  // a soft line break
    } else if (i + 1 < text.size() && text[i + 1] == '=') {
      sink.put('='), ++i;  // "==": what an old Python encoder wrote for "="
    } else if (i + 2 < text.size() && hex_value(text[i + 1]) >= 0 && hex_value(text[i + 2]) >= 0) {
      sink.put(static_cast<char>(hex_value(text[i + 1]) * 16 + hex_value(text[i + 2])));
      i += 2;
    } else if (i + 1 < text.size()) {
      sink.put('=');
    }
  }
}

// decode_q_word - the text of a Q encoded word (RFC 2047 4.2): "_" is a space, =XX a byte,
// anything else as written
inline std::string decode_q_word(std::string_view text) {
  std::string out;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '=' && i + 2 < text.size() && hex_value(text[i + 1]) >= 0 &&
        hex_value(text[i + 2]) >= 0) {
      out += static_cast<char>(hex_value(text[i + 1]) * 16 + hex_value(text[i + 2]));
      i += 2;
    } else {
      out += text[i] == '_' ? ' ' : text[i];
    }
  }
  return out;
}

// EncodedWordText - a header value with its encoded words decoded (RFC 2047), built a piece
// at a time: plain text, white space, encoded words. White space between two encoded words is
// dropped (RFC 2047 6.2); the bytes of adjacent words in one charset are joined before they
// are converted, so a character split between two words survives.
// differs from Python's email: Python converts each word alone, so a split character becomes
// U+FFFD there.
class EncodedWordText {
 public:
  void add_text(std::string_view text) {
    flush();
    out_ += replace_invalid_utf8(std::exchange(space_, std::string_view()));
    out_ += replace_invalid_utf8(text);
  }
  void add_space(std::string_view space) {
    if (is_after_word_) {
      space_ = space;  // kept only if plain text follows
    } else {
      out_ += space;
    }
  }
  void add_word(std::string_view charset, std::string bytes) {
    space_ = {};
    if (!is_after_word_ || charset != charset_) flush();
    charset_ = charset, is_after_word_ = true;
    bytes_ += bytes;
  }
  std::string take() {
    flush();
    out_ += space_;
    return std::move(out_);
  }

 private:
  void flush() {
    if (!bytes_.empty()) {  // an unknown charset: the bytes kept, what is not UTF-8 as U+FFFD
      std::optional<std::string> text = charset_to_utf8(bytes_, charset_);
      out_ += text ? *text : replace_invalid_utf8(bytes_);
    }
    bytes_.clear();
    is_after_word_ = false;
  }

  std::string out_;
  std::string bytes_;  // of the encoded words not yet converted
  std::string_view charset_;
  std::string_view space_;  // white space after an encoded word, not yet known to stay
  bool is_after_word_ = false;
};

// encoded_word_at - the encoded word "=?charset?B|Q?text?=" at s[i]: its charset (an RFC 2231
// language "*en" taken off), its decoded bytes and where it ends; nothing if there is none.
// Like Python's email, a word is read even inside other text; no white space or "?" inside it.
inline std::optional<std::size_t> encoded_word_at(std::string_view s, std::size_t i,
                                                  std::string_view& charset, std::string& bytes) {
  if (s.compare(i, 2, "=?") != 0) return std::nullopt;
  auto field_end = [&](std::size_t from) {
    std::size_t at = from;
    while (at < s.size() && s[at] != '?' && s[at] != ' ' && s[at] != '\t') ++at;
    return at;
  };
  std::size_t charset_end = field_end(i + 2);
  if (charset_end + 2 >= s.size() || s[charset_end] != '?' || s[charset_end + 2] != '?')
    return std::nullopt;
  char encoding = ascii_lower(s[charset_end + 1]);
  std::size_t text_end = field_end(charset_end + 3);
  if ((encoding != 'b' && encoding != 'q') || s.compare(text_end, 2, "?=") != 0)
    return std::nullopt;
  charset = s.substr(i + 2, charset_end - i - 2);
  charset = charset.substr(0, charset.find('*'));
  std::string_view text = s.substr(charset_end + 3, text_end - charset_end - 3);
  if (encoding == 'q') {
    bytes = decode_q_word(text);
  } else {
    ByteSink sink{&bytes};
    decode_base64_loose(text, sink);
  }
  return text_end + 2;
}

// decode_header_text - a header's value as a mail client shows it: unfolded (the line breaks
// taken out, the white space after them kept, as RFC 5322 2.2.3 says), leading white space
// dropped, encoded words decoded, and what is not UTF-8 as U+FFFD (Python's policy.default)
inline std::string decode_header_text(std::string_view raw) {
  std::string value;
  for (char c : raw)
    if (c != '\r' && c != '\n') value += c;
  std::string_view s = value;
  s.remove_prefix(std::min(s.find_first_not_of(" \t"), s.size()));
  EncodedWordText text;
  std::size_t i = 0;
  while (i < s.size()) {
    std::string_view charset;
    std::string bytes;
    if (s[i] == ' ' || s[i] == '\t') {
      std::size_t end = std::min(s.find_first_not_of(" \t", i), s.size());
      text.add_space(s.substr(i, end - i));
      i = end;
    } else if (std::optional<std::size_t> word_end = encoded_word_at(s, i, charset, bytes)) {
      text.add_word(charset, std::move(bytes));
      i = *word_end;
    } else {  // plain text up to white space or the next "=?" (not the one it starts with)
      std::size_t end = i + 1;
      while (end < s.size() && s[end] != ' ' && s[end] != '\t' && s.compare(end, 2, "=?") != 0)
        ++end;
      text.add_text(s.substr(i, end - i));
      i = end;
    }
  }
  return text.take();
}

// MimeHeader - one header field as it stands in the message: its name, and its value from
// after the colon with its line breaks (a view into the message data)
struct MimeHeader {
  std::string_view name;
  std::string_view raw;
};

// LineSpan - one line of the message: its text without the line end, and where the next
// line starts
struct LineSpan {
  std::string_view text;
  std::size_t next;
};

// line_at - the line that starts at data[at], looked for no further than end
inline LineSpan line_at(std::string_view data, std::size_t at, std::size_t end) {
  std::size_t line_end = std::min(data.substr(0, end).find('\n', at), end);
  std::string_view text = data.substr(at, line_end - at);
  if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
  return {text, std::min(line_end + 1, end)};
}

// is_header_name - could this be a field name? Printable ASCII but the colon (RFC 5322 2.2),
// and at least one character
inline bool is_header_name(std::string_view name) {
  return !name.empty() && std::all_of(name.begin(), name.end(),
                                      [](char c) { return c > ' ' && c < 0x7F && c != ':'; });
}

// read_header_block - the header fields from data[begin] to the empty line that ends them,
// at most kMimeHeaderLimit kept (the rest skipped); returns where the body begins. As in
// Python's feedparser, a line that is no header field (and no continuation) begins the body,
// a continuation with no field before it and a "From " line are skipped.
inline std::size_t read_header_block(std::string_view data, std::size_t begin, std::size_t end,
                                     std::vector<MimeHeader>& headers) {
  bool is_kept = false;  // the last field read is in headers
  for (std::size_t at = begin; at < end;) {
    LineSpan line = line_at(data, at, end);
    if (line.text.empty()) return line.next;
    char first = line.text[0];
    std::size_t colon = line.text.find(':');
    if (first == ' ' || first == '\t') {
      if (is_kept) {
        MimeHeader& last = headers.back();
        last.raw = std::string_view(last.raw.data(),
                                    static_cast<std::size_t>(line.text.end() - last.raw.begin()));
      }
    } else if (line.text.compare(0, 5, "From ") == 0) {
      is_kept = false;
    } else if (colon != std::string_view::npos && is_header_name(line.text.substr(0, colon))) {
      is_kept = headers.size() < kMimeHeaderLimit;
      if (is_kept) headers.push_back({line.text.substr(0, colon), line.text.substr(colon + 1)});
    } else if (colon != 0) {
      return at;
    }
    at = line.next;
  }
  return end;
}

// is_field_name - a header field's name is `name`, without regard to ASCII case
inline bool is_field_name(std::string_view field, std::string_view name) {
  return field.size() == name.size() &&
         std::equal(name.begin(), name.end(), field.begin(),
                    [](char a, char b) { return ascii_lower(a) == ascii_lower(b); });
}

// find_header - the first field of that name (any case), as Python's msg[name]
inline const MimeHeader* find_header(const std::vector<MimeHeader>& headers,
                                     std::string_view name) {
  for (const MimeHeader& header : headers)
    if (is_field_name(header.name, name)) return &header;
  return nullptr;
}

// decoded_header - the first field of that name (any case), decoded; nothing when there is none
inline std::optional<std::string> decoded_header(const std::vector<MimeHeader>& headers,
                                                 std::string_view name) {
  const MimeHeader* found = find_header(headers, name);
  if (found == nullptr) return std::nullopt;
  return decode_header_text(found->raw);
}

// message_header - a message's first field of that name, decoded, read from its header block
// alone: no part is read, so one field costs only the header
inline std::optional<std::string> message_header(std::string_view data, std::string_view name) {
  std::vector<MimeHeader> headers;
  read_header_block(data, 0, data.size(), headers);
  return decoded_header(headers, name);
}

// MimeParam - one parameter of a Content-Type or Content-Disposition field; an RFC 2231 one
// (name*=charset'lang'%XX, name*0*=, name*1=...) joined and decoded to UTF-8, a plain one as
// written (quotes and backslashes taken off)
struct MimeParam {
  std::string name;  // lower case, without the RFC 2231 stars and section numbers
  std::string value;
  bool is_rfc2231 = false;
};

// MimeValue - a Content-Type or Content-Disposition field: its value in lower case
// ("text/plain", "attachment") and its parameters
struct MimeValue {
  std::string value;
  std::vector<MimeParam> params;
  // param - the parameter of that name (an RFC 2231 one before a plain one), or nothing
  const MimeParam* param(std::string_view name) const {
    const MimeParam* found = nullptr;
    for (const MimeParam& p : params)
      if (p.name == name && (found == nullptr || (p.is_rfc2231 && !found->is_rfc2231))) found = &p;
    return found;
  }
};

// ParamPiece - one name=value as written; RFC 2231 4.1 cuts a long value into sections
struct ParamPiece {
  std::string name;          // without its stars and section number
  int section = -1;          // -1 for a value in one piece
  bool is_extended = false;  // name*= or name*N*=: charset'lang' and %XX (RFC 2231 4)
  std::string text;
};

// lower_stripped - s without white space around it, ASCII letters in lower case
inline std::string lower_stripped(std::string_view s) {
  std::string out;
  for (char c : python_strip(s)) out += ascii_lower(c);
  return out;
}

// param_piece - name and text as ParamPiece: "name*2*" is section 2, extended
inline ParamPiece param_piece(std::string_view name, std::string text) {
  ParamPiece piece{lower_stripped(name), -1, false, std::move(text)};
  std::size_t star = piece.name.find('*');
  if (star == std::string::npos) return piece;
  std::string rest = piece.name.substr(star + 1);
  piece.name.resize(star);
  piece.is_extended = rest.empty() || rest.back() == '*';  // "name*" or "name*N*"
  if (!rest.empty() && piece.is_extended) rest.pop_back();
  if (is_decimal(rest) && rest.size() <= 4) piece.section = std::stoi(rest);
  if (!rest.empty() && piece.section < 0) piece.name += "*" + rest;  // not RFC 2231: as it is
  return piece;
}

// read_param_pieces - the value before the first ";" (lower case) and the name=value pieces
// after it, at most kMimeParamLimit; a quoted value may hold ";" and backslash escapes
inline std::vector<ParamPiece> read_param_pieces(std::string_view s, std::string& value) {
  std::size_t i = std::min(s.find(';'), s.size());
  value = lower_stripped(s.substr(0, i));
  std::vector<ParamPiece> pieces;
  while (i < s.size() && pieces.size() < kMimeParamLimit) {
    std::size_t name_begin = i + 1;
    std::size_t equals = std::min(s.find_first_of("=;", name_begin), s.size());
    i = equals;
    if (equals == s.size() || s[equals] == ';') continue;
    std::size_t at = std::min(s.find_first_not_of(" \t", equals + 1), s.size());
    std::string text;
    if (at < s.size() && s[at] == '"') {
      for (i = at + 1; i < s.size() && s[i] != '"'; ++i) {
        if (s[i] == '\\' && i + 1 < s.size()) ++i;  // a quoted-pair: the next character as is
        text += s[i];
      }
      i = std::min(s.find(';', i), s.size());
    } else {
      i = std::min(s.find(';', at), s.size());
      text = python_strip(s.substr(at, i - at));
    }
    pieces.push_back(param_piece(s.substr(name_begin, equals - name_begin), std::move(text)));
  }
  return pieces;
}

// percent_decoded - RFC 2231's %XX undone; a "%" not followed by two hex digits kept
inline std::string percent_decoded(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    bool is_escape =
        s[i] == '%' && i + 2 < s.size() && hex_value(s[i + 1]) >= 0 && hex_value(s[i + 2]) >= 0;
    out += is_escape ? static_cast<char>(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2])) : s[i];
    if (is_escape) i += 2;
  }
  return out;
}

// join_sections - the sections of one RFC 2231 parameter, in order of their numbers, as one
// UTF-8 value: the charset comes from the first (charset'lang'text), %XX is undone in the
// extended ones; a charset no one knows leaves the bytes, what is not UTF-8 as U+FFFD
inline std::string join_sections(std::vector<const ParamPiece*> sections) {
  std::stable_sort(sections.begin(), sections.end(), [](const ParamPiece* a, const ParamPiece* b) {
    return a->section < b->section;
  });
  std::string charset, bytes;
  for (const ParamPiece* piece : sections) {
    std::string_view text = piece->text;
    if (piece == sections.front() && piece->is_extended) {
      std::size_t quote = text.find('\''), second = text.find('\'', quote + 1);
      if (quote != std::string_view::npos && second != std::string_view::npos) {
        charset = text.substr(0, quote);
        text.remove_prefix(second + 1);
      }
    }
    bytes += piece->is_extended ? percent_decoded(text) : std::string(text);
  }
  std::optional<std::string> value = charset_to_utf8(bytes, charset);
  return value ? *value : replace_invalid_utf8(bytes);
}

// parse_mime_value - a Content-Type or Content-Disposition field (RFC 2045 5.1, RFC 2183,
// RFC 2231) as MimeValue
inline MimeValue parse_mime_value(std::string_view raw) {
  std::string unfolded;
  for (char c : raw)
    if (c != '\r' && c != '\n') unfolded += c;
  MimeValue result;
  std::vector<ParamPiece> pieces = read_param_pieces(unfolded, result.value);
  for (const ParamPiece& piece : pieces) {
    if (piece.section < 0 && !piece.is_extended) {
      result.params.push_back({piece.name, piece.text, false});
      continue;
    }
    if (result.param(piece.name) != nullptr && result.param(piece.name)->is_rfc2231) continue;
    std::vector<const ParamPiece*> sections;
    for (const ParamPiece& other : pieces)
      if (other.name == piece.name && (other.section >= 0 || other.is_extended))
        sections.push_back(&other);
    result.params.push_back({piece.name, join_sections(std::move(sections)), true});
  }
  return result;
}

// MimePart - one part of a message as a mail client sees it (parts()[0] is the message itself)
struct MimePart {
  std::string content_type = "text/plain";  // lower case, as Python's get_content_type()
  std::string charset;                      // the charset parameter, "" when there is none
  std::string boundary;                     // of a multipart, "" when there is none
  std::string start;                        // of a multipart/related: its root's Content-ID
  std::string transfer_encoding;            // lower case, "" when there is none (7bit)
  std::string disposition;                  // lower case: "inline", "attachment", or ""
  std::optional<std::string> filename;      // decoded, from Content-Disposition or type's name
  std::optional<std::string> content_id;    // as written: "<id@host>"
  std::size_t body_begin = 0;               // the body as it stands in the message data
  std::size_t body_end = 0;
  std::size_t depth = 0;              // 0 for the message, 1 for its parts, and so on
  std::vector<std::size_t> children;  // of a multipart: indices into MimeTree::parts()
  bool is_multipart() const { return content_type.compare(0, 10, "multipart/") == 0; }
};

// MimeTree - the MIME structure of one message (RFC 2045, 2046): its header fields and its
// parts, in the order they stand. Each multipart's lines are read once for its boundary, so
// reading costs at most kMimeDepthLimit passes over the message; a multipart deeper than that
// is a part whose own parts are not read, and past kMimePartLimit parts no more are read.
class MimeTree {
 public:
  explicit MimeTree(std::string_view data) : data_(data) { read_part(0, data.size(), 0, false); }

  const std::vector<MimeHeader>& headers() const { return headers_; }
  const std::vector<MimePart>& parts() const { return parts_; }
  const MimePart& part(std::size_t index) const { return parts_[index]; }
  std::string_view body(const MimePart& part) const {
    return data_.substr(part.body_begin, part.body_end - part.body_begin);
  }
  // header - the message's first field of that name, decoded; nothing when it has none
  std::optional<std::string> header(std::string_view name) const {
    return decoded_header(headers_, name);
  }
  // is_complete - false when a cap left a multipart's parts unread
  bool is_complete() const { return is_complete_; }

 private:
  // read_part - the part in data_[begin, end): its header fields, then its own parts
  std::size_t read_part(std::size_t begin, std::size_t end, std::size_t depth, bool is_digest) {
    std::size_t index = parts_.size();
    parts_.emplace_back();
    std::vector<MimeHeader> own;
    std::vector<MimeHeader>& headers = index == 0 ? headers_ : own;
    std::size_t body = read_header_block(data_, begin, end, headers);
    MimePart& part = parts_[index];
    part.body_begin = body, part.body_end = end, part.depth = depth;
    if (is_digest) part.content_type = "message/rfc822";  // RFC 2046 5.1.5
    describe(part, headers);
    if (part.is_multipart() && !part.boundary.empty()) read_children(index);
    return index;
  }

  // describe - what a part's Content-* fields say of it
  static void describe(MimePart& part, const std::vector<MimeHeader>& headers) {
    std::optional<std::string> name;
    if (const MimeHeader* field = find_header(headers, "content-type")) {
      MimeValue type = parse_mime_value(field->raw);
      // Python: a type that is not "type/subtype" is text/plain, whatever the default
      bool is_type = std::count(type.value.begin(), type.value.end(), '/') == 1;
      part.content_type = is_type ? type.value : "text/plain";
      auto param = [&](const char* key) {
        const MimeParam* p = type.param(key);
        return p ? p->value : std::string();
      };
      part.charset = param("charset"), part.start = param("start");
      part.boundary = python_strip(param("boundary"));  // Python: get_boundary().rstrip()
      if (const MimeParam* p = type.param("name")) name = filename_text(*p);
    }
    if (const MimeHeader* field = find_header(headers, "content-transfer-encoding"))
      part.transfer_encoding = lower_stripped(decode_header_text(field->raw));
    if (const MimeHeader* field = find_header(headers, "content-disposition")) {
      MimeValue disposition = parse_mime_value(field->raw);
      part.disposition = disposition.value;
      if (const MimeParam* p = disposition.param("filename")) part.filename = filename_text(*p);
    }
    if (!part.filename) part.filename = name;
    if (const MimeHeader* field = find_header(headers, "content-id"))
      part.content_id = std::string(python_strip(decode_header_text(field->raw)));
  }

  // filename_text - a file name as Python's get_filename() gives it: RFC 2231 decoded, or
  // with encoded words decoded (not standard, but what Outlook and others write), stripped
  static std::string filename_text(const MimeParam& param) {
    return std::string(
        python_strip(param.is_rfc2231 ? param.value : decode_header_text(param.value)));
  }

  // read_children - the parts of the multipart parts_[index], each read as a part
  void read_children(std::size_t index) {
    if (parts_[index].depth >= kMimeDepthLimit) {
      is_complete_ = false;
      return;
    }
    bool is_digest = parts_[index].content_type == "multipart/digest";
    for (auto [begin, end] : split_multipart(parts_[index])) {
      if (parts_.size() >= kMimePartLimit) {
        is_complete_ = false;
        return;
      }
      std::size_t child = read_part(begin, end, parts_[index].depth + 1, is_digest);
      parts_[index].children.push_back(child);
    }
  }

  // split_multipart - where the parts of a multipart's body are (RFC 2046 5.1.1): between
  // its delimiter lines, each without the line end before the next delimiter; the preamble
  // and the epilogue left out. With no close delimiter the last part runs to the end, as in
  // Python's feedparser; with no delimiter at all there are no parts.
  std::vector<std::pair<std::size_t, std::size_t>> split_multipart(const MimePart& part) const {
    std::vector<std::pair<std::size_t, std::size_t>> ranges;
    std::size_t part_begin = std::string_view::npos;
    for (std::size_t at = part.body_begin; at < part.body_end;) {
      LineSpan line = line_at(data_, at, part.body_end);
      bool is_close = false;
      if (is_delimiter(line.text, part.boundary, is_close)) {
        if (part_begin != std::string_view::npos) ranges.emplace_back(part_begin, at);
        if (is_close || ranges.size() > kMimePartLimit) return without_line_ends(ranges);
        part_begin = line.next;
      }
      at = line.next;
    }
    if (part_begin != std::string_view::npos) ranges.emplace_back(part_begin, part.body_end);
    return without_line_ends(ranges);
  }

  // is_delimiter - is the line "--boundary", or the close delimiter "--boundary--", with only
  // spaces and tabs after it (RFC 2046 5.1.1 transport padding)?
  static bool is_delimiter(std::string_view line, std::string_view boundary, bool& is_close) {
    if (line.size() < boundary.size() + 2 || line.compare(0, 2, "--") != 0 ||
        line.compare(2, boundary.size(), boundary) != 0)
      return false;
    line.remove_prefix(boundary.size() + 2);
    is_close = line.compare(0, 2, "--") == 0;
    if (is_close) line.remove_prefix(2);
    return line.find_first_not_of(" \t") == std::string_view::npos;
  }

  // without_line_ends - each range without the line end it ends with (it belongs to the
  // delimiter that follows, RFC 2046 5.1.1)
  std::vector<std::pair<std::size_t, std::size_t>> without_line_ends(
      std::vector<std::pair<std::size_t, std::size_t>> ranges) const {
    for (auto& [begin, end] : ranges) {
      if (end > begin && data_[end - 1] == '\n') --end;
      if (end > begin && data_[end - 1] == '\r') --end;
    }
    return ranges;
  }

  std::string_view data_;
  std::vector<MimeHeader> headers_;  // the message's own; a part's are read and let go
  std::vector<MimePart> parts_;
  bool is_complete_ = true;
};

// DecodedBody - a text part's body: UTF-8 when is_decoded; else the bytes as the transfer
// encoding gave them (a charset neither the tables nor iconv know), or nothing (a part past
// kMimeDecodedLimit)
struct DecodedBody {
  std::string text;
  bool is_decoded = true;
};

// transfer_decode - a body with its Content-Transfer-Encoding undone (RFC 2045 6), into the
// sink; 7bit, 8bit, binary and encodings no one knows are taken as they are, as Python does
inline void transfer_decode(std::string_view body, std::string_view encoding, ByteSink& sink) {
  if (encoding == "base64") return decode_base64_loose(body, sink);
  if (encoding == "quoted-printable") return decode_quoted_printable(body, sink);
  if (sink.out != nullptr) sink.out->append(body);
  sink.size += body.size();
}

// decoded_size - a part's size once its transfer encoding is undone, counted without a copy
inline std::size_t decoded_size(const MimeTree& tree, const MimePart& part) {
  ByteSink counter;
  transfer_decode(tree.body(part), part.transfer_encoding, counter);
  return counter.size;
}

// decode_text_body - a text part's body as UTF-8 (Python's get_content()). `budget` is what
// is left of kMimeDecodedLimit, counted in raw bytes (undoing a transfer encoding never makes
// a body longer; its UTF-8 is at most 3 times as long); a larger part is not decoded.
inline DecodedBody decode_text_body(const MimeTree& tree, const MimePart& part,
                                    std::size_t& budget) {
  std::string_view body = tree.body(part);
  if (body.size() > budget) return {"", false};
  budget -= body.size();
  std::string bytes;
  ByteSink sink{&bytes};
  transfer_decode(body, part.transfer_encoding, sink);
  if (charset_kind(part.charset) == Charset::Utf8 && is_valid_utf8(bytes))
    return {std::move(bytes), true};  // as it is: no second copy of a big body
  std::optional<std::string> text = charset_to_utf8(bytes, part.charset);
  if (!text) return {std::move(bytes), false};
  return {std::move(*text), true};
}

// related_root - the root part of a multipart/related (RFC 2387 3.2): the one its start
// parameter names, else the first; nothing when it has no parts
inline std::optional<std::size_t> related_root(const MimeTree& tree, const MimePart& related) {
  if (related.children.empty()) return std::nullopt;
  for (std::size_t child : related.children)
    if (!related.start.empty() && tree.part(child).content_id == related.start) return child;
  return related.children.front();
}

// find_body - Python's get_body((subtype,)) from the part at index: the first text/SUBTYPE
// part that is not an attachment, looking into multiparts, in a multipart/related into its
// root only
inline std::optional<std::size_t> find_body(const MimeTree& tree, std::size_t index,
                                            std::string_view type) {
  const MimePart& part = tree.part(index);
  if (part.disposition == "attachment") return std::nullopt;
  if (part.content_type == type) return index;
  if (!part.is_multipart()) return std::nullopt;
  if (part.content_type == "multipart/related") {
    std::optional<std::size_t> root = related_root(tree, part);
    return root ? find_body(tree, *root, type) : std::nullopt;
  }
  for (std::size_t child : part.children)
    if (std::optional<std::size_t> found = find_body(tree, child, type)) return found;
  return std::nullopt;
}

// MailAttachment - a part a mail client lists as a file
struct MailAttachment {
  std::optional<std::string> filename;
  std::string content_type;
  std::size_t size = 0;  // decoded bytes
  std::optional<std::string> content_id;
  std::string disposition;  // "attachment", "inline", or "" when the part says nothing
};

// AttachmentFinder - the attachments of a message: Python's iter_attachments() of each
// multipart, and again inside every multipart it passes over (the body's) or yields.
// differs from Python's email: iter_attachments() reads the top multipart only, so it does
// not list an image inside multipart/related inside multipart/alternative, nor the part of a
// message that is not multipart (a bare PDF); both are listed here.
class AttachmentFinder {
 public:
  explicit AttachmentFinder(const MimeTree& tree) : tree_(tree) {}

  std::vector<MailAttachment> find() {
    const MimePart& message = tree_.part(0);
    if (message.is_multipart()) {
      look_into(0);
    } else if (!find_body(tree_, 0, "text/plain") && !find_body(tree_, 0, "text/html")) {
      add(0);
    }
    return std::move(found_);
  }

 private:
  // look_into - the attachments of the multipart at index (Python's iter_attachments)
  void look_into(std::size_t index) {
    const MimePart& part = tree_.part(index);
    if (part.content_type == "multipart/alternative") {  // each part is the body in a form
      for (std::size_t child : part.children)
        if (tree_.part(child).is_multipart()) look_into(child);
      return;
    }
    std::optional<std::size_t> root;
    if (part.content_type == "multipart/related") root = related_root(tree_, part);
    std::vector<std::string> seen;  // kinds of body already passed over once
    for (std::size_t child : part.children) {
      const MimePart& p = tree_.part(child);
      bool is_body = root ? child == *root : is_body_kind(p) && !contains(seen, p.content_type);
      if (is_body && !root) seen.push_back(p.content_type);
      if (is_body && !p.is_multipart()) continue;
      if (p.is_multipart() && !p.children.empty()) {
        look_into(child);
      } else {
        add(child);
      }
    }
  }

  // is_body_kind - what Python's iter_attachments() takes for the body the first time
  static bool is_body_kind(const MimePart& p) {
    static const char* const kKinds[] = {"text/plain", "text/html", "multipart/related",
                                         "multipart/alternative"};
    return p.disposition != "attachment" &&
           std::find(std::begin(kKinds), std::end(kKinds), p.content_type) != std::end(kKinds);
  }
  static bool contains(const std::vector<std::string>& list, const std::string& item) {
    return std::find(list.begin(), list.end(), item) != list.end();
  }

  void add(std::size_t index) {
    const MimePart& p = tree_.part(index);
    found_.push_back(
        {p.filename, p.content_type, decoded_size(tree_, p), p.content_id, p.disposition});
  }

  const MimeTree& tree_;
  std::vector<MailAttachment> found_;
};

// LinkList - links in the order found, each once, at most kMimeLinkLimit
class LinkList {
 public:
  void add(std::string_view url) {
    if (links_.size() < kMimeLinkLimit && seen_.emplace(url).second) links_.emplace_back(url);
  }
  std::vector<std::string> take() { return std::move(links_); }

 private:
  std::vector<std::string> links_;
  std::unordered_set<std::string> seen_;
};

// is_http_at - does an http:// or https:// URL (any case) start at s[i]?
inline bool is_http_at(std::string_view s, std::size_t i) {
  auto is_prefix = [&](std::string_view scheme) {
    if (s.size() - i < scheme.size() + 1) return false;  // and one character after it
    for (std::size_t k = 0; k < scheme.size(); ++k)
      if (ascii_lower(s[i + k]) != scheme[k]) return false;
    return true;
  };
  return is_prefix("http://") || is_prefix("https://");
}

// url_end - where the URL that starts at text[i] ends: at white space, a control character
// or one of <>"' (RFC 3986 appendix C: what delimits a URL in text), then without the
// punctuation that ends a sentence, and without a ")" it did not open
inline std::size_t url_end(std::string_view text, std::size_t i) {
  std::size_t end = i;
  long open = 0;  // "(" less ")" in text[i, end)
  for (; end < text.size(); ++end) {
    char c = text[end];
    if (static_cast<unsigned char>(c) <= ' ' || c == 0x7F || std::strchr("<>\"'", c)) break;
    open += c == '(' ? 1 : c == ')' ? -1 : 0;
  }
  for (; end > i; --end) {
    char last = text[end - 1];
    if (last == ')' && open < 0) {
      ++open;
    } else if (std::strchr(".,;:!?", last) == nullptr) {
      break;
    }
  }
  return end;
}

// find_text_links - every http and https URL in plain text
inline void find_text_links(std::string_view text, LinkList& links) {
  for (std::size_t i = 0; i < text.size(); ++i) {
    bool is_word_start = i == 0 || !is_ascii_alnum(text[i - 1]);
    if (!is_word_start || ascii_lower(text[i]) != 'h' || !is_http_at(text, i)) continue;
    std::size_t end = url_end(text, i);
    if (end > text.find("//", i) + 2) links.add(text.substr(i, end - i));
    i = std::max(i, end);
  }
}

// entity_code_point - the character an HTML entity's name stands for ("amp", "#38", "#x26"):
// the few an href holds, and numbers (U+FFFD for one that is no character); 0 for others
inline std::uint32_t entity_code_point(std::string_view name) {
  static const std::pair<const char*, std::uint32_t> kNames[] = {
      {"amp", '&'}, {"lt", '<'}, {"gt", '>'}, {"quot", '"'}, {"apos", '\''}, {"nbsp", 0xA0}};
  for (const auto& [known, value] : kNames)
    if (name == known) return value;
  if (name.size() < 2 || name[0] != '#') return 0;
  bool is_hex = name[1] == 'x' || name[1] == 'X';
  std::string digits(name.substr(is_hex ? 2 : 1));
  char* stop = nullptr;
  unsigned long n = std::strtoul(digits.c_str(), &stop, is_hex ? 16 : 10);
  if (digits.empty() || *stop != '\0' || !is_ascii_alnum(digits[0])) return 0;
  return n == 0 || n > 0x10FFFF || (n >= 0xD800 && n <= 0xDFFF) ? 0xFFFD : n;
}

// decode_html_entities - the entities entity_code_point knows as characters; others as written
inline std::string decode_html_entities(std::string_view s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    std::size_t semi = s[i] == '&' ? s.substr(i, 12).find(';') : std::string_view::npos;
    std::uint32_t cp =
        semi == std::string_view::npos ? 0 : entity_code_point(s.substr(i + 1, semi - 1));
    if (cp == 0) {
      out += s[i];
    } else {
      append_utf8(out, cp);
      i += semi;
    }
  }
  return out;
}

inline bool is_html_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f';
}

// attribute_value - the value of an attribute after its "=" at html[i] (quoted or not), and
// where the tag goes on after it
inline std::pair<std::string_view, std::size_t> attribute_value(std::string_view html,
                                                                std::size_t i) {
  for (++i; i < html.size() && is_html_space(html[i]);) ++i;
  if (i < html.size() && (html[i] == '"' || html[i] == '\'')) {
    std::size_t end = std::min(html.find(html[i], i + 1), html.size());
    return {html.substr(i + 1, end - i - 1), std::min(end + 1, html.size())};
  }
  std::size_t end = i;
  while (end < html.size() && !is_html_space(html[end]) && html[end] != '>') ++end;
  return {html.substr(i, end - i), end};
}

// tag_end - where the tag whose name starts at html[i] ends, with each href in it added to
// links when it is an http or https URL (entities decoded, white space around taken off, as a
// browser does)
inline std::size_t tag_end(std::string_view html, std::size_t i, LinkList& links) {
  while (i < html.size() && !is_html_space(html[i]) && html[i] != '>') ++i;  // the tag's name
  while (i < html.size() && html[i] != '>') {
    std::size_t name = i;
    while (i < html.size() && !is_html_space(html[i]) && html[i] != '>' && html[i] != '=') ++i;
    std::string attribute = lower_stripped(html.substr(name, i - name));
    while (i < html.size() && is_html_space(html[i])) ++i;
    if (i == html.size() || html[i] != '=') continue;  // an attribute with no value
    auto [value, next] = attribute_value(html, i);
    i = next;
    if (attribute != "href") continue;
    std::string url = decode_html_entities(value);
    std::string_view trimmed = python_strip(url);
    if (is_http_at(trimmed, 0)) links.add(trimmed);
  }
  return i;
}

// find_html_links - every http and https URL in an href attribute of HTML, comments skipped
inline void find_html_links(std::string_view html, LinkList& links) {
  for (std::size_t i = html.find('<'); i < html.size(); i = html.find('<', i)) {
    if (html.compare(i, 4, "<!--") == 0) {
      i = html.find("-->", i + 4);
      if (i == std::string_view::npos) return;
      continue;
    }
    i = tag_end(html, i + 1, links);
  }
}

// MailSummary - what a mail client shows of a message; header fields decoded, nothing where
// the message has no such field or part
// differs from Python's email: address fields (from, to, cc, reply_to) and date are given as
// written, decoded; Python's str(msg['from']) writes the addresses again (quotes it does not
// need dropped, comments dropped) and str(msg['date']) the date in its own form.
struct MailSummary {
  std::optional<std::string> subject, from, to, cc, reply_to, date, message_id;
  std::optional<DecodedBody> text;  // the text/plain body (Python's get_body(('plain',)))
  std::optional<DecodedBody> html;  // the text/html body (get_body(('html',)))
  std::vector<MailAttachment> attachments;
  std::vector<std::string> links;  // of the text, then of the HTML's href attributes
  bool is_complete = true;         // false: a cap was reached, or a body's charset was not known
};

// summarize_mail - the MailSummary of a message read into a MimeTree
inline MailSummary summarize_mail(const MimeTree& tree) {
  MailSummary mail;
  mail.subject = tree.header("subject"), mail.from = tree.header("from");
  mail.to = tree.header("to"), mail.cc = tree.header("cc");
  mail.reply_to = tree.header("reply-to"), mail.date = tree.header("date");
  mail.message_id = tree.header("message-id");
  std::size_t budget = kMimeDecodedLimit;
  if (std::optional<std::size_t> text = find_body(tree, 0, "text/plain"))
    mail.text = decode_text_body(tree, tree.part(*text), budget);
  if (std::optional<std::size_t> html = find_body(tree, 0, "text/html"))
    mail.html = decode_text_body(tree, tree.part(*html), budget);
  mail.attachments = AttachmentFinder(tree).find();
  LinkList links;
  if (mail.text && mail.text->is_decoded) find_text_links(mail.text->text, links);
  if (mail.html && mail.html->is_decoded) find_html_links(mail.html->text, links);
  mail.links = links.take();
  mail.is_complete = tree.is_complete() && (!mail.text || mail.text->is_decoded) &&
                     (!mail.html || mail.html->is_decoded);
  return mail;
}

// summarize_mail - the MailSummary of a message as smtpd stores it (Envelope::data)
inline MailSummary summarize_mail(std::string_view data) { return summarize_mail(MimeTree(data)); }

// ==== 11. Message texts ====
// A message is held once, as the channel received it. Everything that goes out is made from
// that copy a chunk at a time (kTextChunk) by a TextSource, so a big message never costs a
// second copy: what a Maildir file or a command gets (FileText), the --json line (JsonText),
// the mbox entry (MboxText), what goes upstream (RelayText). The DebuggingServer print-out is
// made in place instead, as it is the last use of the text. Last, what --match reads of it.
//   TextSource, StringText, read_all; session_header_lines, envelope_header_lines,
//   stored_header_lines; MessageText, LineText; FileText,
//   borrowed; format_debug_message, debug_text; session_json, JsonText, format_json_message;
//   MboxText; RelayText; MatchRule, header_values, message_field, MessageMatcher (--match);
//   ExitStatus, envelope_summary, Expectation (--max-messages, --deadline, --expect-none)

// TextSource - a text made as it is taken, a chunk at a time, so that a big message reaches a
// file, a command, a stream or an upstream server without a second copy of it in memory
class TextSource {
 public:
  virtual ~TextSource() = default;
  // more - append the next part of the text to out, about `want` bytes (a short line more at
  // most); false once all of it has been given
  virtual bool more(std::string& out, std::size_t want) = 0;
};

// StringText - a text already made: handed over whole, and taken over rather than copied when
// the taker has nothing yet
class StringText : public TextSource {
 public:
  explicit StringText(std::string text) : text_(std::move(text)) {}
  bool more(std::string& out, std::size_t) override {
    if (out.empty())
      out.swap(text_);
    else
      out += text_;
    text_.clear();
    return false;
  }

 private:
  std::string text_;
};

// read_all - the whole of a text at once (small texts, and tests)
inline std::string read_all(TextSource& text) {
  std::string out;
  while (text.more(out, kTextChunk)) {
  }
  return out;
}

// session_header_lines - what the session adds to a stored message: "X-Auth-User: NAME" for
// a client that logged in with AUTH (the name is one printable line: Channel::log_in), and
// "X-TLS: VERSION CIPHER" for one that came through TLS
inline std::string session_header_lines(const Envelope& envelope) {
  std::string lines;
  if (envelope.auth_user && !envelope.auth_user->empty())
    lines += "X-Auth-User: " + *envelope.auth_user + "\n";
  if (envelope.tls && !envelope.tls->empty()) lines += "X-TLS: " + *envelope.tls + "\n";
  return lines;
}

// envelope_header_lines - what a store writes first, so the stored file alone says who the
// message was for (a Bcc recipient is in no header): "Return-Path: <sender>" ("<>" for the
// null sender) and one "Delivered-To: <recipient>" per recipient, as Postfix's local
// delivery and Dovecot write them
inline std::string envelope_header_lines(const Envelope& envelope) {
  std::string lines =
      "Return-Path: <" + (envelope.mailfrom == "<>" ? std::string() : envelope.mailfrom) + ">\n";
  for (const std::string& rcpt : envelope.rcpttos) lines += "Delivered-To: <" + rcpt + ">\n";
  return lines;
}

// stored_header_lines - the lines --maildir and --mbox write before a message
inline std::string stored_header_lines(const Envelope& envelope) {
  return envelope_header_lines(envelope) + session_header_lines(envelope);
}

// MessageText - a TextSource over one message held once, shared with whoever else needs it:
// `head`, then the lines `before` (each ended by "\n") and the message's data as the kind of
// text (a subclass) makes them, a chunk at a time, then `tail`
class MessageText : public TextSource {
 public:
  bool more(std::string& out, std::size_t want) final {
    std::size_t goal = out.size() + want;
    if (stage_ == Stage::Head) {
      out += std::exchange(head_, std::string());
      stage_ = Stage::Body;
    }
    while (stage_ == Stage::Body && out.size() < goal)
      if (!body(out, goal)) stage_ = Stage::Tail;
    if (stage_ == Stage::Tail && out.size() < goal) {
      out += tail_;
      stage_ = Stage::Done;
    }
    return stage_ != Stage::Done;
  }

 protected:
  MessageText(std::shared_ptr<const Envelope> message, std::string head, std::string before,
              std::string tail)
      : message_(std::move(message)),
        head_(std::move(head)),
        before_(std::move(before)),
        tail_(std::move(tail)) {}

  // body - append more of the body, up to about `goal` bytes in out; false once all is in
  virtual bool body(std::string& out, std::size_t goal) = 0;

  const Envelope& message() const { return *message_; }
  // part - where the body reads now: the lines before the data, then the data (the lines
  // before end in "\n", so no line runs from one part into the next)
  std::string_view part() const { return is_in_data_ ? message_->data : before_; }
  bool is_last_part() const { return is_in_data_; }
  void next_part() {
    is_in_data_ = true;
    at_ = 0;
  }
  std::size_t at_ = 0;  // where the body reads in part()

 private:
  enum class Stage { Head, Body, Tail, Done };
  std::shared_ptr<const Envelope> message_;
  std::string head_;
  std::string before_;
  std::string tail_;
  bool is_in_data_ = false;
  Stage stage_ = Stage::Head;
};

// LineText - a MessageText whose body is made line by line: each line of the parts, ended as
// line_ends() says, goes through start_line() (what comes before its text) and end_line()
// (what ends it); a long line is copied a chunk at a time
class LineText : public MessageText {
 protected:
  using MessageText::MessageText;

  // line_ends - the characters that end a line: "\n", or "\r\n" for CR, LF and CRLF alike
  virtual const char* line_ends() const = 0;
  virtual void start_line(std::string& out, std::string_view line) = 0;
  // end_line - is_last: the text after the data's last line end (possibly empty)
  virtual void end_line(std::string& out, bool is_last) = 0;

 private:
  bool body(std::string& out, std::size_t goal) final {
    std::string_view text = part();
    if (!is_in_line_) {
      if (at_ == text.size() && !is_last_part()) {  // the lines before end here: no tail line
        next_part();
        return true;
      }
      line_end_ = find_line_end(text);
      start_line(out, text.substr(at_, line_stop(text) - at_));
      is_in_line_ = true;
    }
    std::size_t n = std::min(line_stop(text) - at_, goal > out.size() ? goal - out.size() : 0);
    out.append(text.data() + at_, n);
    at_ += n;
    if (at_ < line_stop(text)) return true;
    is_in_line_ = false;
    bool is_last = line_end_ == std::string_view::npos;
    end_line(out, is_last);
    if (is_last) return false;
    at_ = line_end_ + (text.compare(line_end_, 2, "\r\n") == 0 ? 2 : 1);
    return true;
  }

  // find_line_end - the next line end from at_ (line_ends() has one or two characters): a
  // plain scan, as find_first_of looks each byte up in its set one by one, several times
  // slower on a message of short lines
  std::size_t find_line_end(std::string_view text) const {
    const char* ends = line_ends();
    if (ends[1] == '\0') return text.find(ends[0], at_);
    auto it = std::find_if(text.begin() + static_cast<std::ptrdiff_t>(at_), text.end(),
                           [ends](char c) { return c == ends[0] || c == ends[1]; });
    return it == text.end() ? std::string_view::npos : static_cast<std::size_t>(it - text.begin());
  }

  std::size_t line_stop(std::string_view text) const {
    return line_end_ == std::string_view::npos ? text.size() : line_end_;
  }

  bool is_in_line_ = false;
  std::size_t line_end_ = 0;  // of the line being copied, or npos for the last
};

// FileText - the message as a file (--maildir) or a command's input (--exec, Mailman 2)
// holds it: the lines before it, then its data, its lines joined with "\n", so one "\n" ends
// the last line (a message whose last line is empty ends in "\n\n")
class FileText : public MessageText {
 public:
  FileText(std::shared_ptr<const Envelope> message, std::string before)
      : MessageText(std::move(message), "", std::move(before), "\n") {}

 private:
  bool body(std::string& out, std::size_t goal) override {
    std::string_view text = part();
    std::size_t n = std::min(text.size() - at_, goal - out.size());
    out.append(text.data() + at_, n);
    at_ += n;
    if (at_ < text.size()) return true;
    if (is_last_part()) return false;
    next_part();
    return true;
  }
};

// borrowed - an envelope for a text read before the caller's own envelope goes (a store
// writes it at once): shared with nobody, and never deleted by the text
inline std::shared_ptr<const Envelope> borrowed(const Envelope& envelope) {
  return std::shared_ptr<const Envelope>(std::shared_ptr<const Envelope>(), &envelope);
}

// format_debug_message - DebuggingServer's print-out of one message, X-Peer after the headers
// (and after it the session's own lines, session_header_lines)
// differs from smtpd.py: lines are written as the bytes they are, not as Python's b'...' repr.
// It works on the message text in place (it is usually the last use of it), so printing a
// message costs little more memory than the message itself.
inline std::string format_debug_message(Envelope envelope) {
  std::string head = "---------- MESSAGE FOLLOWS ----------\n";
  if (!envelope.mail_options.empty())
    head += "mail options: " + python_list_repr(envelope.mail_options) + "\n";
  if (!envelope.rcpt_options.empty())
    head += "rcpt options: " + python_list_repr(envelope.rcpt_options) + "\n\n";
  std::string& text = envelope.data;
  std::size_t to = 0;  // line ends as bytes.splitlines() finds them ("\r\n", "\r", "\n") -> "\n"
  for (std::size_t from = 0; from < text.size(); ++from, ++to) {
    bool is_crlf = text[from] == '\r' && from + 1 < text.size() && text[from + 1] == '\n';
    text[to] = text[from] == '\r' ? '\n' : text[from];
    if (is_crlf) ++from;
  }
  text.resize(to);
  if (!text.empty() && text.back() != '\n') text += '\n';
  std::size_t blank = text.empty() ? std::string::npos : text[0] == '\n' ? 0 : text.find("\n\n");
  if (blank != std::string::npos && blank != 0) ++blank;  // the empty line after that "\n"
  if (blank != std::string::npos)                         // none if the message has no empty line
    text.insert(blank, "X-Peer: " + envelope.peer + "\n" + session_header_lines(envelope));
  text.insert(0, head);
  text += "------------ END MESSAGE ------------\n";
  return std::move(text);
}

// session_json - with AUTH offered, ", "auth_user": NAME" (null for a client that did not log
// in), and with TLS on, ", "tls": "VERSION CIPHER"" (null for a plain session); nothing
// otherwise, so without those options the line has Python's fields only
inline std::string session_json(const Envelope& envelope) {
  auto key = [](const char* name, const std::optional<std::string>& value) {
    if (!value) return std::string();
    return ", \"" + std::string(name) +
           "\": " + (value->empty() ? std::string("null") : json_string(*value));
  };
  return key("auth_user", envelope.auth_user) + key("tls", envelope.tls);
}

// JsonText - --json: one line holding process_message's arguments; the data as text when it
// is UTF-8, else as base64, and data_encoding says which
class JsonText : public MessageText {
 public:
  explicit JsonText(std::shared_ptr<const Envelope> message)
      : JsonText(message, is_valid_utf8(message->data)) {}

 private:
  JsonText(std::shared_ptr<const Envelope> message, bool is_text)  // the data read once
      : MessageText(message, head_for(*message), "", tail_for(is_text)), is_text_(is_text) {}

  static std::string head_for(const Envelope& e) {
    return "{\"peer\": " + json_string(e.peer) + ", \"mailfrom\": " + json_string(e.mailfrom) +
           ", \"rcpttos\": " + json_list(e.rcpttos) +
           ", \"mail_options\": " + json_list(e.mail_options) +
           ", \"rcpt_options\": " + json_list(e.rcpt_options) + session_json(e) +
           ", \"size\": " + std::to_string(e.data.size()) + ", \"data\": \"";
  }
  static std::string tail_for(bool is_text) {
    return std::string("\", \"data_encoding\": \"") + (is_text ? "utf-8" : "base64") + "\"}\n";
  }

  // body - the data a chunk at a time: whole UTF-8 sequences, or whole 3-byte base64 groups
  bool body(std::string& out, std::size_t goal) override {
    std::string_view data = message().data;
    std::size_t end = std::min(data.size(), at_ + std::max<std::size_t>(goal - out.size(), 3));
    if (is_text_) {
      while (end < data.size() && (static_cast<unsigned char>(data[end]) & 0xC0) == 0x80) ++end;
      json_escape_into(out, data.substr(at_, end - at_));
    } else {
      if (end < data.size()) end -= (end - at_) % 3;
      base64_encode_into(out, data.substr(at_, end - at_));
    }
    at_ = end;
    return at_ < data.size();
  }

  bool is_text_;
};

// format_json_message - the --json line for a message (StreamPrinter's format)
inline std::unique_ptr<TextSource> format_json_message(Envelope envelope) {
  return std::make_unique<JsonText>(std::make_shared<const Envelope>(std::move(envelope)));
}

// debug_text - DebuggingServer's print-out as StreamPrinter's format
inline std::unique_ptr<TextSource> debug_text(Envelope envelope) {
  return std::make_unique<StringText>(format_debug_message(std::move(envelope)));
}

// MboxText - an mbox entry: "From SENDER DATE", the message (the envelope and session lines first:
// stored_header_lines) with one more '>' before each line that matches ^>*From  (the mboxrd rule,
// so a reader can undo it exactly) and "\n" after every line, the last one included, then the empty
// line that ends the entry. The null sender <> is written MAILER-DAEMON, as mail systems do; white
// space and control characters in a (quoted) address become '_', so the line stays one line of two
// fields.
class MboxText : public LineText {
 public:
  MboxText(std::shared_ptr<const Envelope> message, std::int64_t unix_seconds)
      : LineText(message, from_line(*message, unix_seconds), stored_header_lines(*message), "\n") {}

 private:
  static std::string from_line(const Envelope& envelope, std::int64_t unix_seconds) {
    std::string sender = envelope.mailfrom == "<>" || envelope.mailfrom.empty()
                             ? std::string("MAILER-DAEMON")
                             : envelope.mailfrom;
    for (char& c : sender)
      if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7F) c = '_';
    return "From " + sender + " " + format_asctime_utc(unix_seconds) + "\n";
  }
  const char* line_ends() const override { return "\n"; }
  void start_line(std::string& out, std::string_view line) override {
    std::size_t arrows = line.find_first_not_of('>');
    if (arrows != std::string_view::npos && line.substr(arrows, 5) == "From ") out += '>';
  }
  void end_line(std::string& out, bool) override { out += '\n'; }
};

// RelayText - the message as it goes upstream: the lines `before` it (Mailman's added
// headers), "X-Peer: <client ip>" before the first empty line (or at the end if there is
// none), as smtpd.py's PureProxy inserts it; CRLF line ends; dot-stuffing redone (RFC 5321
// 4.5.2); the final ".".
// differs from smtpd.py: a bare CR or bare LF from the client ends a line here, as CRLF does
// (a CR right before a line end merges with it), so the upstream sees no CR or LF outside a
// CRLF and a "." after one is stuffed: no "<LF>.<LF>" can end the message early there (SMTP
// smuggling, RFC 5321 2.3.8; Postfix's smtpd_forbid_bare_newline = normalize).
class RelayText : public LineText {
 public:
  explicit RelayText(std::shared_ptr<const Envelope> message, std::string before = "")
      : LineText(std::move(message), "", std::move(before), ".\r\n") {}

 private:
  const char* line_ends() const override { return "\r\n"; }
  void start_line(std::string& out, std::string_view line) override {
    if (line.empty()) add_peer(out);
    if (!line.empty() && line[0] == '.') out += '.';
  }
  void end_line(std::string& out, bool is_last) override {
    out += "\r\n";
    if (is_last) add_peer(out);
  }
  void add_peer(std::string& out) {
    if (!std::exchange(is_peer_added_, true)) out += "X-Peer: " + message().peer + "\r\n";
  }

  bool is_peer_added_ = false;
};

// Matching, for --match FIELD=PATTERN: a message matches when every rule holds, and a rule
// holds when its shell-style pattern (glob_match, as --reject's) takes any value of its field.
//   MatchField, MatchRule, header_values, message_field, MessageMatcher

enum class MatchField { From, Rcpt, Subject, Header, Text };

struct MatchRule {
  MatchField field;
  std::string header;   // MatchField::Header: the header's name
  std::string pattern;  // shell-style, ASCII letters without regard to case
};

// header_values - the values of every header `name` (any case) in a message's header section,
// as the mail reader reads that section (read_header_block): unfolded (RFC 5322 2.2.3), the
// white space around each value taken off
inline std::vector<std::string> header_values(std::string_view data, std::string_view name) {
  std::vector<MimeHeader> headers;
  read_header_block(data, 0, data.size(), headers);
  std::vector<std::string> values;
  for (const MimeHeader& header : headers) {
    if (!is_field_name(header.name, name)) continue;
    std::string value;
    for (char c : header.raw)
      if (c != '\r' && c != '\n') value += c;
    values.emplace_back(python_strip(value));
  }
  return values;
}

// message_field - the values a --match rule looks at: the envelope's sender, its recipients,
// or from the message the Subject, any header NAME (each field of that name, its encoded
// words decoded), or the text a mail client would show (the reader's text/plain body, else
// its text/html one)
inline std::vector<std::string> message_field(const Envelope& envelope, const MatchRule& rule) {
  auto decoded = [&](std::string_view name) {
    std::vector<std::string> values = header_values(envelope.data, name);
    for (std::string& value : values) value = decode_header_text(value);
    return values;
  };
  switch (rule.field) {
    case MatchField::From: return {envelope.mailfrom};
    case MatchField::Rcpt: return envelope.rcpttos;
    case MatchField::Subject: return decoded("Subject");
    case MatchField::Header: return decoded(rule.header);
    case MatchField::Text: break;
  }
  MailSummary mail = summarize_mail(envelope.data);
  if (mail.text) return {mail.text->text};
  if (mail.html) return {mail.html->text};
  return {""};
}

// MessageMatcher - the --match rules, all of which a message must meet (none: every message)
class MessageMatcher {
 public:
  void add(MatchRule rule) { rules_.push_back(std::move(rule)); }
  bool empty() const { return rules_.empty(); }
  bool matches(const Envelope& envelope) const {
    return std::all_of(rules_.begin(), rules_.end(), [&](const MatchRule& rule) {
      std::vector<std::string> values = message_field(envelope, rule);
      return std::any_of(values.begin(), values.end(),
                         [&](const std::string& value) { return glob_match(rule.pattern, value); });
    });
  }

 private:
  std::vector<MatchRule> rules_;
};

// The numbers a script tests for come first: 1 for a test assertion that failed, 2 for a bad
// command line (as getopt-based tools and Python's argparse use it), 3 for a deadline passed.
// differs from smtpd.py: it exits 1 for a bad command line and for every failure to start.
enum ExitStatus {
  kExitOk = 0,
  kExitMatched = 1,     // --expect-none: a matching message arrived
  kExitUsage = 2,       // a bad command line
  kExitDeadline = 3,    // --deadline passed before --max-messages matching messages came
  kExitLoopFailed = 4,  // poll() failed while serving
  kExitCannotListen = 5,
  kExitPrivileges = 6,
};

// envelope_summary - what Expectation needs of a message once the mode has taken it: the
// envelope, whether it matched, and the Subject line (not the rest of the data)
inline Envelope envelope_summary(const Envelope& envelope) {
  Envelope summary;
  summary.mailfrom = envelope.mailfrom;
  summary.rcpttos = envelope.rcpttos;
  summary.is_matching = envelope.is_matching;
  std::vector<std::string> subject = header_values(envelope.data, "Subject");
  if (!subject.empty()) summary.data = "Subject: " + subject.front();
  return summary;
}

// Expectation - what a test waits for, counted the same by the server and by --wait: `wanted`
// matching messages (0: no number), or under --expect-none not one, by the deadline. It says
// when the wait is over, the exit status, and the one line that explains it on stderr.
class Expectation {
 public:
  Expectation(std::uint64_t wanted, bool expect_none, long long deadline_ms)
      : wanted_(wanted), expect_none_(expect_none), deadline_ms_(deadline_ms) {}

  // on_message - a message arrived (the server accepted it, or --wait found it); true when it
  // ends the wait: the last one wanted, or under --expect-none the first that matches
  bool on_message(const Envelope& envelope) {
    if (!envelope.is_matching) return ++others_, false;
    ++matching_;
    if (expect_none_ && !has_failed()) failure_ = about(envelope);
    return expect_none_ || (wanted_ != 0 && matching_ == wanted_);
  }
  void on_deadline() { is_deadline_passed_ = true; }

  bool has_failed() const { return !failure_.empty(); }
  bool is_deadline_passed() const { return is_deadline_passed_; }
  std::uint64_t matching() const { return matching_; }

  // exit_status - 1 when a message came that --expect-none forbids, 3 when the deadline
  // passed before the wanted messages came (0 under --expect-none), else 0
  int exit_status() const {
    if (has_failed()) return kExitMatched;
    return is_deadline_passed_ && !expect_none_ ? kExitDeadline : kExitOk;
  }

  // outcome - the line for stderr (without "smtpd: "), or "" when there is nothing to say:
  // "deadline: 1 of 2 matching messages in 30 s (4 others arrived)"
  std::string outcome() const {
    if (has_failed()) return "--expect-none: a matching message arrived: " + failure_;
    if (!is_deadline_passed_) return "";
    std::uint64_t counted = wanted_ != 0 ? wanted_ : matching_;  // "1 of 2 messages"
    std::string count = std::to_string(matching_) + " of " + std::to_string(wanted_);
    if (wanted_ == 0) count = std::to_string(matching_);
    if (expect_none_) count = "no", counted = 1;
    return "deadline: " + count + " matching message" + (counted == 1 ? "" : "s") + " in " +
           seconds_text(deadline_ms_) + " s (" + std::to_string(others_) +
           (others_ == 1 ? " other" : " others") + " arrived)";
  }

  // about - a message in a few words: "from <a@x.test> to <b@y.test>, subject "Hi""
  static std::string about(const Envelope& envelope) {
    std::string text = "from <" + (envelope.mailfrom == "<>" ? "" : envelope.mailfrom) + "> to ";
    for (std::size_t i = 0; i < envelope.rcpttos.size(); ++i)
      text += (i > 0 ? ", <" : "<") + envelope.rcpttos[i] + ">";
    std::vector<std::string> subject = header_values(envelope.data, "Subject");
    text += subject.empty() ? ", no subject" : ", subject \"" + subject.front() + "\"";
    return printable(text).substr(0, kReasonLimit);
  }

 private:
  std::uint64_t wanted_;
  bool expect_none_;
  long long deadline_ms_;
  std::uint64_t matching_ = 0;
  std::uint64_t others_ = 0;
  bool is_deadline_passed_ = false;
  std::string failure_;  // --expect-none: about() the first matching message
};

// ==== 12. Local delivery ====
// SMTPServer and DebuggingServer: each message goes first to the --exec command, if any, which
// may refuse it, then to the outputs in order (--maildir, --mbox, the print-out on stdout). The
// client hears 250 only once every one of them has the message; an output that fails gets it a
// 451. Standard output and error are queues the loop never waits on.
//   OutputQueue, standard_output, standard_error, log_line; StreamPrinter; MessageOutput,
//   write_text, maildir_unique_name, MaildirStore, MboxStore; RecipientsFile, ChildRun,
//   CommandRun; not_stored_reply, DeliveringServer, SinkServer, DebuggingServer;
//   read_stored_message, MaildirReader (smtpd --wait)

// OutputQueue - stdout or stderr, written without ever stopping the loop. On a
// pipe nobody reads, text waits here: trace lines (log_line, -d) up to kTraceBacklog, past it
// dropped and counted; a print-out of a message whole (made a chunk at a time as the stream
// takes it), and whoever waits on it is told once it is written. The loop polls the stream while
// text waits (Server::watch_outputs); on a file or terminal every write completes at once.
class OutputQueue {
 public:
  using Written = std::function<void(const std::string& error)>;  // "" when written
  explicit OutputQueue(int fd) : fd_(fd) {}

  void make_nonblocking() { is_nonblocking_ = set_output_nonblocking(fd_); }
  bool is_nonblocking() const { return is_nonblocking_; }
  bool has_pending() const { return !chunks_.empty(); }
  int fd() const { return fd_; }

  // trace - a line that may be lost rather than waited for
  void trace(std::string text) {
    if (queued_ + text.size() > kTraceBacklog) {
      ++dropped_unsaid_;
      return;
    }
    push(std::move(text), nullptr, nullptr);
  }

  // print - text that must be written whole; `written` is called from a later flush (or now)
  std::uint64_t print(std::unique_ptr<TextSource> text, Written written) {
    return push(std::string(), std::move(text), std::move(written));
  }

  // forget - whoever waits on print `id` is gone: no call, and text not begun is not written
  void forget(std::uint64_t id) {
    for (auto it = chunks_.begin(); it != chunks_.end(); ++it) {
      if (it->id != id) continue;
      it->written_to = nullptr;
      if (it->has_begun) return;
      queued_ -= it->text.size();
      chunks_.erase(it);
      return;
    }
  }

  // flush - write what the stream takes now, never waiting
  void flush() {
    while (!chunks_.empty()) {
      Chunk& c = chunks_.front();
      if (c.done == c.text.size() && c.rest) {
        make_more(c);
        continue;
      }
      long n = write_output(fd_, c.text.data() + c.done, c.text.size() - c.done);
      if (n < 0 && would_block(errno)) return;
      if (n > 0) c.has_begun = true;
      std::string error;
      if (n < 0)
        error = std::string("cannot write to standard ") + (fd_ == 1 ? "output: " : "error: ") +
                std::strerror(errno);
      if (n >= 0) c.done += static_cast<std::size_t>(n);
      if (error.empty() && (c.done < c.text.size() || c.rest)) continue;
      Written written = std::move(c.written_to);
      queued_ -= c.text.size();
      chunks_.pop_front();
      if (written) written(error);
    }
    if (dropped_unsaid_ != 0) {
      std::string note = "smtpd: " + std::to_string(std::exchange(dropped_unsaid_, 0)) +
                         " trace lines dropped: standard error was not read\n";
      push(std::move(note), nullptr, nullptr);
    }
  }

  // drain - at exit: wait (at most max_ms) for what is queued to leave
  void drain(int max_ms) {
    for (int waited = 0; waited < max_ms && has_pending(); waited += 10) {
      flush();
      if (has_pending()) sleep_ms(10);
    }
  }

 private:
  struct Chunk {
    std::string text;                  // what is to be written now
    std::unique_ptr<TextSource> rest;  // and what is still to be made after it, if any
    std::size_t done = 0;              // bytes of text already written
    bool has_begun = false;            // any of it written: it must be finished
    std::uint64_t id = 0;
    Written written_to;
  };

  std::uint64_t push(std::string text, std::unique_ptr<TextSource> rest, Written written) {
    queued_ += text.size();
    chunks_.push_back(
        Chunk{std::move(text), std::move(rest), 0, false, ++last_id_, std::move(written)});
    std::uint64_t id = last_id_;
    flush();
    return id;
  }

  // make_more - the next part of a print-out, once what was made before is written
  void make_more(Chunk& c) {
    queued_ -= c.text.size();
    c.text.clear();
    c.done = 0;
    if (!c.rest->more(c.text, kTextChunk)) c.rest.reset();
    queued_ += c.text.size();
  }

  int fd_;
  bool is_nonblocking_ = false;
  std::deque<Chunk> chunks_;
  std::size_t queued_ = 0;  // bytes in chunks_
  std::uint64_t last_id_ = 0;
  std::uint64_t dropped_unsaid_ = 0;  // trace lines dropped and not yet reported
};

inline OutputQueue& standard_output() {
  static OutputQueue queue(1);
  return queue;
}
inline OutputQueue& standard_error() {
  static OutputQueue queue(2);
  return queue;
}

// log_line - "smtpd: text" on stderr; dropped (and counted) rather than waited for
inline void log_line(const std::string& text) { standard_error().trace("smtpd: " + text + "\n"); }

// StreamPrinter - each message, formatted, on a stream (stdout) through its OutputQueue; the
// 250 waits until it is written. A reader that does not read for timeout_ms (--timeout) gets
// the client 451 instead, and a print-out not yet begun is not written.
class StreamPrinter {
 public:
  using Format = std::unique_ptr<TextSource> (*)(Envelope);    // may take the text over
  using Done = std::function<void(const std::string& error)>;  // "" once printed
  StreamPrinter(OutputQueue& out, Format format, long long timeout_ms)
      : out_(out), format_(format), timeout_ms_(timeout_ms) {}

  // Job - one print-out on its way; destroyed, it no longer calls back
  class Job {
   public:
    Job(Reactor& reactor, OutputQueue& out) : reactor_(reactor), out_(out) {}
    ~Job() {
      reactor_.cancel_timer(timer_);
      if (id_ != 0) out_.forget(id_);
    }
    Job(const Job&) = delete;
    Job& operator=(const Job&) = delete;

   private:
    friend class StreamPrinter;
    void end(const std::string& error) {
      reactor_.cancel_timer(std::exchange(timer_, 0));
      if (done_) std::exchange(done_, nullptr)(error);
    }
    Reactor& reactor_;
    OutputQueue& out_;
    std::uint64_t id_ = 0;
    Reactor::TimerId timer_ = 0;
    Done done_;
  };

  std::unique_ptr<Job> print(Reactor& reactor, Envelope envelope, Done done) {
    auto job = std::make_unique<Job>(reactor, out_);
    job->done_ = std::move(done);
    Job* self = job.get();
    job->timer_ = reactor.start_timer(timeout_ms_, [self] {
      self->timer_ = 0;
      self->out_.forget(std::exchange(self->id_, 0));
      self->end("standard output is not being read");
    });
    std::uint64_t id = out_.print(format_(std::move(envelope)), [self](const std::string& error) {
      self->id_ = 0;
      self->end(error);
    });
    if (self->done_) self->id_ = id;  // else it was written at once, and `done` has run
    return job;
  }

 private:
  OutputQueue& out_;
  Format format_;
  long long timeout_ms_;
};

// MessageOutput - one place a message goes; deliver() is true only once the message is
// safely there, and otherwise says why in error ("cannot write /x/y: No space left on device")
class MessageOutput {
 public:
  virtual ~MessageOutput() = default;
  virtual bool deliver(const Envelope& envelope, std::string& error) = 0;
};

// write_text - all of a text to a file, a chunk at a time
inline bool write_text(File& file, TextSource& text, std::string& error) {
  std::string chunk;
  for (bool has_more = true; has_more;) {
    chunk.clear();
    has_more = text.more(chunk, kTextChunk);
    if (!file.write_all(chunk, error)) return false;
  }
  return true;
}

// maildir_unique_name - "<seconds>.M<usec>P<pid>Q<count>.<host>", the Maildir naming of
// cr.yp.to/proto/maildir.html, with '/' and ':' in the host name written \057 and \072
inline std::string maildir_unique_name(std::int64_t seconds, long usec, long pid,
                                       std::uint64_t count, std::string_view host) {
  std::string name = std::to_string(seconds) + ".M" + std::to_string(usec) + "P" +
                     std::to_string(pid) + "Q" + std::to_string(count) + ".";
  for (char c : host) {
    if (c == '/')
      name += "\\057";
    else if (c == ':')
      name += "\\072";
    else
      name += c;
  }
  return name;
}

// make_directories - mkdir -p: path and any missing parents. Errors on the parents are
// ignored; the last mkdir (or the file written below it) reports the real problem.
inline bool make_directories(const std::string& path, std::string& error) {
  for (std::size_t at = path.find_first_of(kPathSeparators, 1); at != std::string::npos;
       at = path.find_first_of(kPathSeparators, at + 1)) {
    std::string ignored;
    make_directory(path.substr(0, at), ignored);
  }
  return make_directory(path, error);
}

// MaildirStore - --maildir DIR: written to tmp/, synced, renamed into new/, new/ synced.
// The directories are made (again) for every message, so a Maildir removed while the server
// runs comes back. No name comes from the message: only time, pid, a counter and the host.
// The file starts with stored_header_lines (Return-Path, Delivered-To, the session's).
class MaildirStore : public MessageOutput {
 public:
  explicit MaildirStore(std::string dir) : dir_(std::move(dir)), host_(getfqdn()) {}

  // make_maildir - DIR and its tmp, new and cur, where missing
  static bool make_maildir(const std::string& dir, std::string& error) {
    if (!make_directories(dir, error)) return false;
    for (const char* sub : {"/tmp", "/new", "/cur"})
      if (!make_directory(dir + sub, error)) return false;
    return true;
  }

  bool deliver(const Envelope& envelope, std::string& error) override {
    if (!make_maildir(dir_, error)) return false;
    std::int64_t now = unix_time_us();
    std::string name = maildir_unique_name(now / 1000000, static_cast<long>(now % 1000000),
                                           process_id(), ++count_, host_);
    std::string tmp = dir_ + "/tmp/" + name;
    FileText text(borrowed(envelope), stored_header_lines(envelope));
    if (!write_synced(tmp, text, error)) return false;
    if (!rename_file(tmp, dir_ + "/new/" + name, error)) {
      remove_file(tmp);
      return false;
    }
    // If this sync fails the message is in new/ all the same; the 451 that follows makes the
    // client send it again, which is better than a 250 for a message a crash could lose.
    return sync_directory(dir_ + "/new", error);
  }

 private:
  // write_synced - a new file with the text, on disk when this returns true
  static bool write_synced(const std::string& path, TextSource& text, std::string& error) {
    File file;
    if (!file.create_new(path, error)) return false;
    if (write_text(file, text, error) && file.sync(error) && file.close(error)) return true;
    remove_file(path);
    return false;
  }

  std::string dir_;
  std::string host_;
  std::uint64_t count_ = 0;  // messages named by this process: the Q part of the name
};

// MboxStore - --mbox FILE: each message appended under an exclusive lock and synced. A write
// that fails half-way is cut off again, so the mbox never holds half a message.
class MboxStore : public MessageOutput {
 public:
  explicit MboxStore(std::string path) : path_(std::move(path)) {}
  bool deliver(const Envelope& envelope, std::string& error) override {
    MboxText entry(borrowed(envelope), unix_time_us() / 1000000);
    File file;
    std::int64_t size_before = 0;
    if (!file.open_append(path_, error) || !file.lock(kMboxLockWaitMs, error) ||
        !file.size(size_before, error))
      return false;
    if (write_text(file, entry, error) && file.sync(error)) return file.close(error);
    file.truncate(size_before);
    return false;
  }

 private:
  std::string path_;
};

// RecipientsFile - SMTPD_RCPTTOS_FILE: the recipients, one a line, in a new file under
// $TMPDIR (or /tmp) that only we can read, removed when the run ends. No length limit applies
// to a file, so a command can see 10,000 recipients.
class RecipientsFile {
 public:
  RecipientsFile() = default;
  ~RecipientsFile() { remove(); }
  RecipientsFile(const RecipientsFile&) = delete;
  RecipientsFile& operator=(const RecipientsFile&) = delete;

  bool create(const std::vector<std::string>& rcpttos, std::string& error) {
    remove();
    const char* dir = std::getenv("TMPDIR");
    std::int64_t now = unix_time_us();
    path_ = std::string(dir != nullptr && *dir != '\0' ? dir : "/tmp") + "/smtpd-rcpttos." +
            maildir_unique_name(now / 1000000, static_cast<long>(now % 1000000), process_id(),
                                ++count_, "txt");
    std::string text;
    for (const std::string& rcpt : rcpttos) text += rcpt + "\n";
    File file;
    if (file.create_new(path_, error) && file.write_all(text, error) && file.close(error))
      return true;
    remove();
    return false;
  }
  void remove() {
    if (!path_.empty()) remove_file(std::exchange(path_, ""));
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  static inline std::uint64_t count_ = 0;  // files named by this process
};

// ChildRun - one child process inside the loop: `sh -c command` with extra environment
// variables, its input written to its standard input a chunk at a time as it takes it, its
// output read (the first kExecOutputLimit bytes kept), and killed at the timeout. What the
// outcome means is its user's business (CommandRun for --exec, MailmanProxy's wrappers).
class ChildRun {
 public:
  using Environment = std::vector<std::pair<std::string, std::string>>;
  // Outcome - how a run ended: not started (error says why), stopped at the timeout, or
  // exited with exit_code after printing output
  struct Outcome {
    bool has_started = false;
    bool has_timed_out = false;
    int exit_code = -1;
    std::string output;
    std::string error;
  };
  using Finished = std::function<void(const Outcome&)>;

  ChildRun(Reactor& reactor, const std::string& command, long long timeout_ms)
      : reactor_(reactor), command_(command), timeout_ms_(timeout_ms) {}
  ~ChildRun() { stop(); }
  ChildRun(const ChildRun&) = delete;
  ChildRun& operator=(const ChildRun&) = delete;

  // run - the command with `input` on its standard input; `finished` is called once, later
  // or at once
  void run(std::unique_ptr<TextSource> input, const Environment& environment, Finished finished) {
    finished_ = std::move(finished);
    input_ = std::move(input);
    std::string error;
    if (!spawn_shell(command_, environment, child_, error)) {
      outcome_.error = error;
      return finish();
    }
    outcome_.has_started = is_running_ = true;
    timer_ = reactor_.start_timer(timeout_ms_, [this] { on_timeout(); });
    reactor_.watch(child_.to_child, POLLOUT, [this](short) { write_input(); });
    reactor_.watch(child_.from_child, POLLIN, [this](short) { read_output(); });
    wait_for_exit();
  }

 private:
  // write_input - the input a chunk at a time, as the command takes it
  void write_input() {
    for (;;) {
      if (written_ == chunk_.size()) {
        if (!input_) break;
        chunk_.clear();
        written_ = 0;
        if (!input_->more(chunk_, kExecPipeChunk)) input_.reset();
        continue;
      }
      PipeResult r = write_pipe(child_.to_child, chunk_.data() + written_,
                                std::min(chunk_.size() - written_, kExecPipeChunk));
      if (r.status == PipeResult::Status::WouldBlock) return;
      if (r.status == PipeResult::Status::End) break;  // it does not read it all: its business
      written_ += r.bytes;
    }
    close_input();
  }

  void close_input() {
    input_.reset();  // the message, for the part that was not written
    chunk_ = std::string();
    written_ = 0;
    if (child_.to_child == kInvalidSocket) return;
    reactor_.release(child_.to_child, close_pipe);
    child_.to_child = kInvalidSocket;
  }

  // read_output - what the command printed so far; its end closes the pipe
  void read_output() {
    static char buffer[kExecPipeChunk];
    for (;;) {
      PipeResult r = read_pipe(child_.from_child, buffer, sizeof buffer);
      if (r.status == PipeResult::Status::WouldBlock) return;
      if (r.status == PipeResult::Status::End) break;
      if (outcome_.output.size() < kExecOutputLimit) outcome_.output.append(buffer, r.bytes);
    }
    close_output();
  }

  void close_output() {
    if (child_.from_child == kInvalidSocket) return;
    reactor_.release(child_.from_child, close_pipe);
    child_.from_child = kInvalidSocket;
  }

  // wait_for_exit - look for the exit status until it comes. The exit, not the end of the
  // output, ends the run: a background child may keep the output open long after.
  void wait_for_exit() {
    int exit_code = 0;
    if (!reap_child(child_, exit_code)) {
      reap_timer_ = reactor_.start_timer(kExecReapPollMs, [this] {
        reap_timer_ = 0;
        wait_for_exit();
      });
      return;
    }
    is_running_ = false;
    if (child_.from_child != kInvalidSocket) read_output();  // what it printed before exiting
    stop();
    outcome_.exit_code = exit_code;
    finish();
  }

  void on_timeout() {
    timer_ = 0;
    kill_child(child_);
    stop();
    outcome_.has_timed_out = true;
    finish();
  }

  // stop - no more events from this run; a command still running is killed and reaped
  void stop() {
    reactor_.cancel_timer(std::exchange(timer_, 0));
    reactor_.cancel_timer(std::exchange(reap_timer_, 0));
    close_input();
    close_output();
    if (is_running_) {
      int exit_code;
      kill_child(child_);
      // SIGKILL is quick; the wait is bounded all the same
      for (int i = 0; i < kKillWaitRounds && !reap_child(child_, exit_code); ++i)
        sleep_ms(kExecReapPollMs);
      is_running_ = false;
    }
  }

  void finish() {
    if (finished_) std::exchange(finished_, nullptr)(outcome_);
  }

  Reactor& reactor_;
  std::string command_;
  long long timeout_ms_;
  ChildProcess child_;
  bool is_running_ = false;
  std::unique_ptr<TextSource> input_;  // what is still to be made of the input
  std::string chunk_;                  // the part of it being written
  std::size_t written_ = 0;            // bytes of chunk_ written
  Outcome outcome_;
  Reactor::TimerId timer_ = 0;
  Reactor::TimerId reap_timer_ = 0;
  Finished finished_;
};

// CommandRun - one run of the --exec command for one message, inside the loop: the message
// goes to its standard input, the envelope into SMTPD_* variables, and its exit status and
// first line of output become the reply (smtpd.py's process_message, as a program). This is
// the policy; a ChildRun runs the command.
//   exit 0, no reply code printed   -> "" (250 OK)
//   exit 0, first line "NNN text"   -> that reply, NNN from 200 to 599
//   any other exit, or the timeout  -> 451, so the client keeps the message and retries
class CommandRun {
 public:
  using Done = std::function<void(const std::string& reply)>;

  CommandRun(Reactor& reactor, const std::string& command, long long timeout_ms)
      : child_(reactor, command, timeout_ms), timeout_ms_(timeout_ms) {}

  // start - run the --exec command for this message; `done` gets the client's reply, once,
  // later or at once
  void start(std::shared_ptr<const Envelope> message, Done done) {
    const Envelope& envelope = *message;
    std::string error;
    auto environment = environment_for(envelope);
    if (!rcpttos_file_.create(envelope.rcpttos, error))
      return done(cannot_run("cannot write the recipients to a file: " + error));
    environment.emplace_back("SMTPD_RCPTTOS_FILE", rcpttos_file_.path());
    long long timeout_ms = timeout_ms_;
    auto input = std::make_unique<FileText>(message, session_header_lines(envelope));
    child_.run(std::move(input), environment,  // as --maildir writes it
               [this, done, timeout_ms](const ChildRun::Outcome& outcome) {
                 rcpttos_file_.remove();
                 if (!outcome.has_started) return done(cannot_run(outcome.error));
                 if (outcome.has_timed_out) return done(reply_exec_timed_out(timeout_ms));
                 done(reply_for(outcome.exit_code, outcome.output));
               });
  }

  // environment_for - the SMTPD_* variables the command gets for a message (the recipients
  // file's comes on top); SMTPD_RCPTTOS is left out when it would be longer than
  // kExecVariableLimit, as the file has them all
  static ChildRun::Environment environment_for(const Envelope& e) {
    auto joined = [](const std::vector<std::string>& items) {
      std::string out;
      for (const std::string& item : items) out += (out.empty() ? "" : " ") + item;
      return out;
    };
    ChildRun::Environment environment{{"SMTPD_PEER", e.peer},
                                      {"SMTPD_MAILFROM", e.mailfrom},
                                      {"SMTPD_RCPTTOS", joined(e.rcpttos)},
                                      {"SMTPD_MAIL_OPTIONS", joined(e.mail_options)},
                                      {"SMTPD_RCPT_OPTIONS", joined(e.rcpt_options)}};
    if (environment[2].second.size() > kExecVariableLimit)
      environment.erase(environment.begin() + 2);
    if (e.auth_user && !e.auth_user->empty())
      environment.emplace_back("SMTPD_AUTH_USER", *e.auth_user);
    if (e.tls && !e.tls->empty()) environment.emplace_back("SMTPD_TLS", *e.tls);
    return environment;
  }

  // reply_for - the reply for an exit status and what the command printed. Only the first
  // line counts: "550-first" becomes "550 first", so the client never waits for more lines;
  // a code that is not a final reply (1xx, 3xx) is the command's mistake: 451.
  static std::string reply_for(int exit_code, const std::string& output) {
    if (exit_code != 0) return reply_exec_failed(exit_code);
    std::string line = output.substr(0, output.find('\n'));
    if (!line.empty() && line.back() == '\r') line.pop_back();
    int code = reply_code(line);
    if (code == 0) return "";
    if (code / 100 == 1 || code / 100 == 3) return reply_exec_not_final(line.substr(0, 3));
    if (line.size() > 3) line[3] = ' ';
    return printable(line).substr(0, kReplyLineLimit);
  }

 private:
  static std::string cannot_run(const std::string& why) {
    log_line("cannot run the --exec command: " + why);
    return reply_exec_cannot_run(why);
  }

  RecipientsFile rcpttos_file_;  // before child_, so a command still running goes first
  ChildRun child_;
  long long timeout_ms_;
};

// not_stored_reply - the 451 for a message an output could not keep, with its reason
inline std::string not_stored_reply(const std::string& reason) {
  return kReplyNotStored + printable(reason).substr(0, kReasonLimit);
}

using MessageOutputs = std::vector<std::unique_ptr<MessageOutput>>;

// DeliveringServer - SMTPServer and DebuggingServer: each message goes first to the --exec
// command, if any, which may refuse it; then to the outputs in order. The client hears 250
// once all of them have it; the first output that fails gets the client a 451 (it retries),
// the reason on stderr, and the outputs after it are not tried.
class DeliveringServer : public ServerMode {
 public:
  struct Hook {
    std::string command;  // --exec; empty for none
    long long timeout_ms = kExecTimeoutMs;
  };

  DeliveringServer(MessageOutputs outputs, Hook hook, std::unique_ptr<StreamPrinter> printer = {})
      : outputs_(std::move(outputs)), hook_(std::move(hook)), printer_(std::move(printer)) {}

  std::unique_ptr<ModeSession> open_session(Reactor& reactor, const std::string&) override {
    return std::make_unique<DeliverySession>(*this, reactor);
  }
  // keeps_data - a sink with no output and no command throws the text away: never store it
  bool keeps_data() const override {
    return !outputs_.empty() || !hook_.command.empty() || printer_ != nullptr;
  }

  // store - the message to every output; "" once all have it, else the 451 to send
  std::string store(const Envelope& envelope) {
    for (auto& output : outputs_) {
      std::string error;
      if (!output->deliver(envelope, error)) {
        log_line("could not store a message from " + envelope.peer + ": " + error);
        return not_stored_reply(error);
      }
    }
    return "";
  }

 private:
  class DeliverySession : public ModeSession {
   public:
    DeliverySession(DeliveringServer& mode, Reactor& reactor) : mode_(mode), reactor_(reactor) {}

    void on_message(Envelope envelope, Verdict verdict) override {
      if (mode_.hook_.command.empty()) return keep(envelope, "", verdict);
      auto message = std::make_shared<Envelope>(std::move(envelope));
      reactor_.dispose(std::move(run_));  // a finished run: its verdict may have led here
      run_ = std::make_unique<CommandRun>(reactor_, mode_.hook_.command, mode_.hook_.timeout_ms);
      run_->start(message, [this, message, verdict](const std::string& reply) {
        if (!is_accepting(reply)) return verdict(reply);
        keep(*message, reply, verdict);
      });
    }

   private:
    // keep - the stores, then the print-out (of a message that meets the --match rules); the
    // verdict is `reply` once all have it
    void keep(Envelope& envelope, const std::string& reply, const Verdict& verdict) {
      std::string refusal = mode_.store(envelope);
      if (!refusal.empty() || !mode_.printer_ || !envelope.is_matching)
        return verdict(refusal.empty() ? reply : refusal);
      reactor_.dispose(std::move(printing_));  // a finished job: its verdict may have led here
      printing_ = mode_.printer_->print(reactor_, std::move(envelope),
                                        [reply, verdict](const std::string& error) {
                                          if (error.empty()) return verdict(reply);
                                          log_line("could not print a message: " + error);
                                          verdict(not_stored_reply(error));
                                        });
    }

    DeliveringServer& mode_;
    Reactor& reactor_;
    std::unique_ptr<CommandRun> run_;
    std::unique_ptr<StreamPrinter::Job> printing_;
  };

  MessageOutputs outputs_;
  Hook hook_;
  std::unique_ptr<StreamPrinter> printer_;  // stdout: DebuggingServer, or SMTPServer --json
};

// SinkServer - SMTPServer: accepts every message; keeps it only where outputs say (--maildir,
// --mbox, --json), so with none it is discarded
// differs from smtpd.py: its SMTPServer.process_message raises NotImplementedError and drops
// the connection; on the command line "override process_message" is --exec.
class SinkServer : public DeliveringServer {
 public:
  explicit SinkServer(MessageOutputs outputs = {}, Hook hook = {},
                      std::unique_ptr<StreamPrinter> printer = {})
      : DeliveringServer(std::move(outputs), std::move(hook), std::move(printer)) {}
};

// DebuggingServer - prints each message on stdout, after the other outputs (so a printed
// message is already stored), written before the client hears 250; --json changes the format
class DebuggingServer : public DeliveringServer {
 public:
  explicit DebuggingServer(std::unique_ptr<StreamPrinter> printer, MessageOutputs outputs = {},
                           Hook hook = {})
      : DeliveringServer(std::move(outputs), std::move(hook), std::move(printer)) {}
};

// Reading a Maildir back, for smtpd --wait DIR: the messages a MaildirStore (ours, or another
// smtpd's) put there, each once. Only new/ and cur/ are read: a file appears there by a rename
// from tmp/ once it is whole, so nothing half-written is ever read; a file that a mail reader
// moves from new/ to cur/ meanwhile (adding ":2,FLAGS" to its name) is the same message.
//   read_stored_message, MaildirReader

// read_stored_message - a stored file as an envelope: the sender and recipients from its
// Return-Path and Delivered-To lines (envelope_header_lines), the rest as the data, without
// the final "\n" FileText adds; the peer is not stored, so it is ""
inline Envelope read_stored_message(std::string_view text) {
  Envelope envelope;
  for (;;) {
    std::size_t end = text.find('\n');
    std::string_view line = text.substr(0, end);
    auto address = [&](std::string_view tag) {
      return std::string(line.substr(tag.size() + 1, line.size() - tag.size() - 2));
    };
    bool is_envelope = end != std::string_view::npos && line.size() >= 2 && line.back() == '>';
    if (is_envelope && line.rfind("Return-Path: <", 0) == 0) {
      envelope.mailfrom = address("Return-Path: ");
      if (envelope.mailfrom.empty()) envelope.mailfrom = "<>";
    } else if (is_envelope && line.rfind("Delivered-To: <", 0) == 0) {
      envelope.rcpttos.push_back(address("Delivered-To: "));
    } else {
      break;
    }
    text.remove_prefix(end + 1);
  }
  if (!text.empty() && text.back() == '\n') text.remove_suffix(1);
  envelope.data = std::string(text);
  return envelope;
}

// MaildirReader - the messages of a Maildir not taken before, oldest name first (the names
// start with the time)
class MaildirReader {
 public:
  explicit MaildirReader(std::string dir) : dir_(std::move(dir)) {}

  // skip_present - the messages there now count as taken (--new-only)
  void skip_present() {
    for (const auto& [key, path] : unseen()) seen_.insert(key);
  }

  // take_new - the text of each message not taken before; one that cannot be read now (it
  // was being moved to cur/) is taken at a later call
  std::vector<std::string> take_new() {
    std::vector<std::string> texts;
    for (const auto& [key, path] : unseen()) {
      std::string text, error;
      if (!read_whole_file(path, text, error)) continue;
      seen_.insert(key);
      texts.push_back(std::move(text));
    }
    return texts;
  }

 private:
  // unseen - (key, path) of each file in new/ and cur/ not taken, by name; the key is the
  // name without the ":2,FLAGS" a reader adds
  std::vector<std::pair<std::string, std::string>> unseen() const {
    std::vector<std::pair<std::string, std::string>> found;
    for (const char* sub : {"/new/", "/cur/"}) {
      for (const std::string& name : list_directory(dir_ + sub)) {
        std::string key = name.substr(0, name.find(':'));
        if (name[0] != '.' && seen_.count(key) == 0) found.emplace_back(key, dir_ + sub + name);
      }
    }
    std::sort(found.begin(), found.end());
    found.erase(std::unique(found.begin(), found.end(),
                            [](const auto& a, const auto& b) { return a.first == b.first; }),
                found.end());
    return found;
  }

  std::string dir_;
  std::set<std::string> seen_;  // keys of the messages taken
};

// ==== 13. SMTP client ====
// The client side of SMTP, for the relays. UpstreamClient speaks on a non-blocking socket in
// the loop (connect, commands and the message out, replies in, a timeout on every wait); what
// it sends waits in an UpstreamOutbox and what it hears is read by a ReplyParser, both pure.
// UpstreamSession is one session with a server we hand mail to, over SMTP or LMTP; an
// UpstreamProbe learns at start what the upstream offers, and UpstreamOffer keeps our EHLO to it.
//   UpstreamReply, UpstreamSettings, UpstreamOffer, ReplyParser, trace_goodbye, UpstreamOutbox,
//   UpstreamClient, UpstreamSession, UpstreamProbe

// UpstreamReply - one reply from the upstream server; code 0 means none came (the connection
// failed, closed or timed out) and text says why
struct UpstreamReply {
  int code = 0;
  std::string text;  // all its lines, CRLF between them, none after the last
  bool is_positive() const { return code >= 200 && code < 300; }
};

struct UpstreamSettings {
  std::string role = "upstream server";  // what it is to us, for 451 texts
  std::string tag = "upstream";          // the same in the -d trace
  std::string name;                      // "host:port", for messages
  std::vector<SocketAddress> addresses;  // tried in order, as smtplib does
  std::string fqdn;                      // our name in EHLO/HELO/LHLO, as in our greeting
  long long connect_timeout_ms = kConnectTimeoutMs;
  long long reply_timeout_ms = kReplyTimeoutMs;
  std::function<void(const std::string&)> trace;  // -d: the upstream dialogue (may be empty)
};

// UpstreamOffer - what an upstream's EHLO reply offered of the extensions a client may use,
// learned by a relay at start and at each session, so its own EHLO offers no more (a client
// such as Postfix can then downgrade 8-bit mail, or keep a message too big, itself)
struct UpstreamOffer {
  bool is_known = false;  // no EHLO reply seen yet: offer what we offer anyway
  bool has_8bitmime = false;
  bool has_smtputf8 = false;
  std::uint64_t size_limit = 0;  // its SIZE; 0 for none, or no fixed limit

  // shape - a client's channel offers only what the upstream takes too
  void shape(ChannelConfig& config) const {
    if (!is_known) return;
    config.offer_8bitmime = has_8bitmime;
    config.enable_smtputf8 = config.enable_smtputf8 && has_smtputf8;
    std::uint64_t& ours = config.data_size_limit;
    if (size_limit != 0) ours = ours == 0 ? size_limit : std::min(ours, size_limit);
  }
};

// ReplyParser - an upstream's replies from the bytes it sends: feed() takes them as they come,
// next() gives one complete reply at a time, or says that one is malformed or too long. A
// line ends at LF (a CR before it is dropped); a reply is lines "NNN-text" ending in a line
// "NNN text" or "NNN", every one with the same code (RFC 5321 4.2.1), and with the line still
// arriving at most kUpstreamReplyLimit bytes and kUpstreamReplyLines lines. A bad reply is
// the end: the parser stays there, and problem() says why ("sent a malformed reply: ...").
// It is apart from UpstreamClient, which only moves the bytes, so that tests and fuzz_upstream
// drive it with no socket and no loop.
class ReplyParser {
 public:
  enum class Status { Reply, NeedMore, Malformed, TooLong };

  void feed(std::string_view bytes) {
    if (problem_.empty()) in_.append(bytes.data(), bytes.size());
  }

  // next - the next complete reply into `reply`, if the bytes fed so far hold one
  Status next(UpstreamReply& reply) {
    if (!problem_.empty()) return status_;
    while (std::optional<std::string> line = take_line(in_)) {
      // Every line of a multiline reply carries the same code: a "125-" line inside a 250
      // reply would reach our client as is. A CR or other control character inside a line
      // would too (both found by fuzz_upstream): that is as malformed as a missing code.
      bool is_other_code = !reply_.text.empty() && reply_.text.compare(0, 3, *line, 0, 3) != 0;
      if (reply_code(*line) == 0 || is_other_code || has_control_character(*line, true))
        return bad(Status::Malformed,
                   "sent a malformed reply: " + printable(line->substr(0, kQuotedLineLimit)));
      if (!reply_.text.empty()) reply_.text += "\r\n";
      reply_.text += *line;
      if (reply_.text.size() > kUpstreamReplyLimit) return bad(Status::TooLong, too_long());
      if (++lines_ > kUpstreamReplyLines)
        return bad(Status::TooLong,
                   "sent a reply of more than " + std::to_string(kUpstreamReplyLines) + " lines");
      if (line->size() > 3 && (*line)[3] == '-') continue;
      reply_.code = reply_code(*line);
      lines_ = 0;
      reply = std::exchange(reply_, UpstreamReply{});
      return Status::Reply;
    }
    if (in_.size() + reply_.text.size() > kUpstreamReplyLimit)
      return bad(Status::TooLong, too_long());
    return Status::NeedMore;
  }

  // problem - why the reply was bad, after Malformed or TooLong; "" before
  const std::string& problem() const { return problem_; }

  void clear() { *this = ReplyParser(); }

  // take_line - the first complete line of `in`, taken out of it, without its LF or CRLF
  static std::optional<std::string> take_line(std::string& in) {
    std::size_t end = in.find('\n');
    if (end == std::string::npos) return std::nullopt;
    std::string line = in.substr(0, end);
    in.erase(0, end + 1);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    return line;
  }

 private:
  Status bad(Status status, std::string why) {
    status_ = status;
    problem_ = std::move(why);
    in_.clear();
    reply_ = UpstreamReply{};
    return status;
  }

  static std::string too_long() {
    return "sent a reply longer than " + std::to_string(kUpstreamReplyLimit) + " bytes";
  }

  std::string in_;       // bytes not yet taken as lines
  UpstreamReply reply_;  // the lines of a multiline reply so far
  std::size_t lines_ = 0;
  Status status_ = Status::NeedMore;
  std::string problem_;
};

// trace_goodbye - watch `socket` after QUIT: trace the reply to it under -d (each line as it
// comes, malformed or not), and close the socket at its last line, at the end of the
// connection or after `timeout_ms`. The loop owns the watcher, so the client can go at once.
inline void trace_goodbye(Reactor& reactor, socket_t socket, std::string prefix,
                          std::function<void(const std::string&)> trace, long long timeout_ms) {
  struct Goodbye {
    socket_t socket = kInvalidSocket;
    std::string prefix;
    std::function<void(const std::string&)> trace;
    std::string in;
    Reactor::TimerId timer = 0;
    ~Goodbye() {
      if (socket != kInvalidSocket) close_socket(socket);
    }
  };
  auto goodbye = std::make_shared<Goodbye>();  // built in place: a copy would close it
  goodbye->socket = socket;
  goodbye->prefix = std::move(prefix);
  goodbye->trace = std::move(trace);
  auto end = [&reactor, goodbye] {
    reactor.cancel_timer(goodbye->timer);
    reactor.unwatch(goodbye->socket);
  };
  reactor.watch(goodbye->socket, POLLIN, [goodbye, end](short) {
    char buffer[1024];
    auto n = recv(goodbye->socket, buffer, sizeof buffer, 0);
    if (n < 0 && would_block(last_socket_error())) return;
    if (n > 0) goodbye->in.append(buffer, static_cast<std::size_t>(n));
    while (std::optional<std::string> line = ReplyParser::take_line(goodbye->in)) {
      goodbye->trace(goodbye->prefix + " -> " + printable(*line));
      if (line->size() < 4 || (*line)[3] != '-') return end();
    }
    if (n <= 0 || goodbye->in.size() > kUpstreamReplyLimit) end();
  });
  goodbye->timer = reactor.start_timer(timeout_ms, [goodbye, end] {
    goodbye->trace(goodbye->prefix + " did not answer QUIT");
    end();
  });
}

// UpstreamOutbox - what a client still has to send upstream: command lines, and a message made
// a chunk at a time as the socket takes it. A command queued while a message is still going
// out waits for its end (the upstream may answer the message before it has all of it).
class UpstreamOutbox {
 public:
  using MessageMade = std::function<void(std::size_t bytes)>;

  void add(const std::string& command) { (message_ ? after_message_ : out_) += command; }
  void add(std::unique_ptr<TextSource> message) {
    message_ = std::move(message);
    message_bytes_ = 0;
  }

  // pending - the bytes to send next, the message's next chunk made once the others are out
  // (and `made` told its size once it is all made); empty when nothing is left to send
  std::string_view pending(const MessageMade& made) {
    while (sent_ == out_.size()) {
      out_.clear();
      sent_ = 0;
      if (!message_) break;
      bool has_more = message_->more(out_, kUpstreamSendChunk);
      message_bytes_ += out_.size();
      if (has_more) continue;
      message_.reset();
      out_ += std::exchange(after_message_, std::string());
      made(message_bytes_);
    }
    return std::string_view(out_).substr(sent_);
  }

  void sent(std::size_t bytes) { sent_ += bytes; }
  bool is_empty() const { return sent_ == out_.size() && !message_; }
  void clear() { *this = UpstreamOutbox(); }

 private:
  std::string out_;                      // to send: commands, or a part of the message
  std::size_t sent_ = 0;                 // bytes of out_ sent
  std::unique_ptr<TextSource> message_;  // the rest of the message, still to be made
  std::size_t message_bytes_ = 0;        // bytes of it made so far
  std::string after_message_;            // commands to send once the message has been made
};

// UpstreamClient - the client side of SMTP on a non-blocking socket in the loop: connect,
// send one command (or the message text), wait for its reply or replies (LMTP answers the
// message once per recipient, RFC 2033 4.2), and so on. One question at a time; every wait
// has a timeout. It never blocks and never calls a handler after its end.
class UpstreamClient {
 public:
  using ReplyHandler = std::function<void(const UpstreamReply&)>;
  using RepliesHandler = std::function<void(std::vector<UpstreamReply>)>;

  UpstreamClient(Reactor& reactor, const UpstreamSettings& settings)
      : reactor_(reactor), settings_(settings) {}
  ~UpstreamClient() { close(); }
  UpstreamClient(const UpstreamClient&) = delete;
  UpstreamClient& operator=(const UpstreamClient&) = delete;

  // open - connect to the first address that answers; the greeting is the first reply
  void open(ReplyHandler on_greeting) {
    expect(1, [on_greeting](std::vector<UpstreamReply> replies) { on_greeting(replies[0]); });
    connect_to(0);
  }

  // send - a command line out; the handler gets the reply
  void send(std::string command, ReplyHandler on_reply) {
    RepliesHandler one = [on_reply](std::vector<UpstreamReply> replies) { on_reply(replies[0]); };
    if (!is_connected(1, one)) return;
    if (settings_.trace)
      settings_.trace(settings_.tag + " " + settings_.name + " <- " +
                      printable(command.substr(0, command.size() - 2)));
    outbox_.add(command);
    await(1, std::move(one));
  }

  // send - the message out, made a chunk at a time as the socket takes it, then `count`
  // replies; those that never come are code 0
  void send(std::unique_ptr<TextSource> message, std::size_t count, RepliesHandler on_replies) {
    if (!is_connected(count, on_replies)) return;
    outbox_.add(std::move(message));
    await(count, std::move(on_replies));
  }

  // quit - say goodbye without waiting for the answer, then close; with -d the answer is
  // still traced, by a watcher the loop owns (see trace_goodbye)
  void quit() {
    if (socket_ != kInvalidSocket && !is_connecting_ && outbox_.is_empty()) {
      static const char kQuit[] = "QUIT\r\n";
      if (settings_.trace) settings_.trace(settings_.tag + " " + settings_.name + " <- QUIT");
      ::send(socket_, kQuit, sizeof kQuit - 1, kSendFlags);
      if (settings_.trace) {
        trace_goodbye(reactor_, std::exchange(socket_, kInvalidSocket),
                      settings_.tag + " " + settings_.name, settings_.trace,
                      settings_.reply_timeout_ms);
      }
    }
    close();
  }

  bool is_open() const { return socket_ != kInvalidSocket && !is_connecting_; }

 private:
  // is_connected - whether there is a connection; if not, the handler hears code 0 now
  bool is_connected(std::size_t count, const RepliesHandler& handler) {
    if (socket_ != kInvalidSocket) return true;
    UpstreamReply none{0, failure_.empty() ? "not connected" : failure_};
    handler(std::vector<UpstreamReply>(count, none));
    return false;
  }

  // await - `count` replies for what was just queued, within the reply timeout

  void await(std::size_t count, RepliesHandler on_replies) {
    expect(count, std::move(on_replies));
    arm_timer(settings_.reply_timeout_ms, "did not reply within the reply timeout");
    flush();
  }

  void expect(std::size_t count, RepliesHandler on_replies) {
    waiting_ = std::move(on_replies);
    expected_ = count;
    got_.clear();
  }

  void connect_to(std::size_t index) {
    close_socket_only();
    if (index >= settings_.addresses.size()) return fail("cannot connect: " + failure_);
    address_index_ = index;
    std::string error;
    socket_ = start_connect(settings_.addresses[index], error);
    if (socket_ == kInvalidSocket) {
      failure_ = error;
      return connect_to(index + 1);
    }
    is_connecting_ = true;
    reactor_.watch(socket_, POLLOUT, [this](short revents) { on_ready(revents); });
    arm_timer(settings_.connect_timeout_ms, "");
  }

  void on_ready(short revents) {
    if (is_connecting_) return on_connect_ready();
    if (revents & (POLLIN | POLLHUP | POLLERR)) read_replies();
    if (socket_ != kInvalidSocket && (revents & POLLOUT)) flush();
  }

  void on_connect_ready() {
    int err = connect_error(socket_);
    if (err != 0) {
      failure_ = socket_error_text(err);
      return connect_to(address_index_ + 1);
    }
    is_connecting_ = false;
    arm_timer(settings_.reply_timeout_ms, "sent no greeting within the reply timeout");
    update_watch();
  }

  void update_watch() {
    if (socket_ == kInvalidSocket) return;
    short events = POLLIN;
    if (!outbox_.is_empty()) events |= POLLOUT;
    reactor_.set_events(socket_, events);
  }

  // flush - send what the socket takes now; the end of the message is traced with its size
  void flush() {
    auto made = [this](std::size_t bytes) {
      if (settings_.trace)
        settings_.trace(settings_.tag + " " + settings_.name + " <- (message, " +
                        std::to_string(bytes) + " bytes)");
    };
    for (std::string_view bytes; !(bytes = outbox_.pending(made)).empty();) {
      auto n = ::send(socket_, bytes.data(),
                      static_cast<int>(std::min(bytes.size(), kUpstreamSendChunk)), kSendFlags);
      if (n > 0) {
        outbox_.sent(static_cast<std::size_t>(n));
        continue;
      }
      int err = last_socket_error();
      if (n < 0 && would_block(err)) break;
      return fail("failed while sending: " + socket_error_text(err));
    }
    update_watch();
  }

  // read_replies - one read per turn of the loop, so an upstream that writes without end
  // cannot keep the loop from other clients and from the timer that ends its reply
  void read_replies() {
    char buffer[kUpstreamReadChunk];
    auto n = recv(socket_, buffer, sizeof buffer, 0);
    if (n > 0) {
      parser_.feed(std::string_view(buffer, static_cast<std::size_t>(n)));
      return take_replies();
    }
    int err = n < 0 ? last_socket_error() : 0;
    if (n < 0 && would_block(err)) return;
    fail(n == 0 ? "closed the connection" : "failed: " + socket_error_text(err));
  }

  // take_replies - each complete reply to whoever waits, until a handler closes this client
  // or a reply is bad
  void take_replies() {
    UpstreamReply reply;
    for (;;) {
      ReplyParser::Status status = parser_.next(reply);
      if (status == ReplyParser::Status::NeedMore) return;
      if (status != ReplyParser::Status::Reply) return fail(std::string(parser_.problem()));
      if (!deliver(reply)) return;
    }
  }

  // deliver - hand a reply to whoever waits, once all the replies it waits for are in; an
  // unasked one is a 421 or nonsense: hang up
  bool deliver(const UpstreamReply& reply) {
    reactor_.cancel_timer(std::exchange(timer_, 0));
    if (settings_.trace)
      settings_.trace(settings_.tag + " " + settings_.name + " -> " + printable(reply.text));
    if (!waiting_) {
      fail("said " + printable(reply.text.substr(0, kQuotedLineLimit)) + " unasked");
      return false;
    }
    got_.push_back(reply);
    if (got_.size() < expected_) {
      arm_timer(settings_.reply_timeout_ms, "did not reply within the reply timeout");
      return true;
    }
    RepliesHandler handler = std::exchange(waiting_, nullptr);
    bool was_open = socket_ != kInvalidSocket;
    handler(std::exchange(got_, {}));  // may send the next command, or close this client
    return was_open && socket_ != kInvalidSocket;
  }

  void arm_timer(long long ms, const std::string& what) {
    reactor_.cancel_timer(timer_);
    timer_ = reactor_.start_timer(ms, [this, what] {
      timer_ = 0;
      if (is_connecting_) {
        failure_ = "timed out";
        return connect_to(address_index_ + 1);
      }
      fail(what);
    });
  }

  // fail - the end of this connection; whoever waits gets code 0 for each reply still due
  void fail(const std::string& why) {
    if (settings_.trace) settings_.trace(settings_.tag + " " + settings_.name + " " + why);
    failure_ = why;
    close();
    if (!waiting_) return;
    std::vector<UpstreamReply> replies = std::exchange(got_, {});
    replies.resize(std::max(expected_, replies.size()), UpstreamReply{0, why});
    std::exchange(waiting_, nullptr)(std::move(replies));
  }

  void close_socket_only() {
    if (socket_ == kInvalidSocket) return;
    reactor_.release(socket_, close_socket);
    socket_ = kInvalidSocket;
    is_connecting_ = false;
  }

  void close() {
    close_socket_only();
    reactor_.cancel_timer(std::exchange(timer_, 0));
    outbox_.clear();
    parser_.clear();
  }

  Reactor& reactor_;
  const UpstreamSettings& settings_;
  socket_t socket_ = kInvalidSocket;
  bool is_connecting_ = false;
  std::size_t address_index_ = 0;
  Reactor::TimerId timer_ = 0;
  UpstreamOutbox outbox_;  // what is still to be sent
  ReplyParser parser_;     // the replies in what the upstream sent
  RepliesHandler waiting_;
  std::size_t expected_ = 0;        // replies waiting_ wants
  std::vector<UpstreamReply> got_;  // those of them already in
  std::string failure_;             // why the last attempt failed
};

// UpstreamSession - one session with a server we hand mail to, over SMTP (EHLO, falling back
// to HELO) or LMTP (LHLO, RFC 2033): opened and greeted at the first MAIL, MAIL with those of
// the client's parameters the server understands (RSET first when a transaction is open),
// RCPT, and DATA with one reply per accepted recipient under LMTP. Every step ends in the
// reply the client should hear: the server's own, or a 451 that says what went wrong.
class UpstreamSession {
 public:
  enum class Greeting { Ehlo, Lhlo };
  using Done = std::function<void(const std::string& reply)>;
  using DoneAll = std::function<void(const std::vector<std::string>& replies)>;

  UpstreamSession(Reactor& reactor, const UpstreamSettings& settings, Greeting greeting,
                  UpstreamOffer* learned = nullptr)
      : reactor_(reactor), settings_(settings), greeting_(greeting), learned_(learned) {}
  ~UpstreamSession() {
    if (client_) client_->quit();
  }
  UpstreamSession(const UpstreamSession&) = delete;
  UpstreamSession& operator=(const UpstreamSession&) = delete;

  // mail - MAIL FROM, after opening and greeting the session if it is not open
  void mail(const MailRequest& mail, Done done) {
    with_session([this, mail, done](const std::string& failure) {
      if (!failure.empty()) return done(failure);
      std::string refusal;
      std::string command = mail_command(mail, refusal);
      if (!refusal.empty()) return done(refusal);
      auto send_mail = [this, command, done] {
        client_->send(command, [this, done](const UpstreamReply& reply) {
          in_transaction_ = reply.is_positive();
          done(relayed(reply, "MAIL"));
        });
      };
      if (!in_transaction_) return send_mail();
      client_->send("RSET\r\n", [this, send_mail, done](const UpstreamReply& reply) {
        if (!reply.is_positive()) return done(relayed(reply, "RSET"));
        in_transaction_ = false;
        send_mail();
      });
    });
  }

  void rcpt(const std::string& address, Done done) {
    if (!is_ready()) return done(lost());
    client_->send("RCPT TO:<" + address + ">\r\n",
                  [this, done](const UpstreamReply& reply) { done(relayed(reply, "RCPT")); });
  }

  // data - DATA, then the message (RelayText's form); `count` replies come back, 1 under
  // SMTP, one per accepted recipient under LMTP
  void data(std::unique_ptr<TextSource> payload, std::size_t count, DoneAll done) {
    if (!is_ready()) return done(std::vector<std::string>(count, lost()));
    // held in a shared_ptr, as the callback must be copyable
    auto message = std::make_shared<std::unique_ptr<TextSource>>(std::move(payload));
    client_->send("DATA\r\n", [this, message, count, done](const UpstreamReply& go_ahead) {
      if (go_ahead.code != 354)
        return done(std::vector<std::string>(count, relayed(go_ahead, "DATA")));
      client_->send(std::move(*message), count, [this, done](std::vector<UpstreamReply> replies) {
        in_transaction_ = false;
        std::vector<std::string> texts;
        for (const UpstreamReply& reply : replies) texts.push_back(relayed(reply, "the message"));
        done(texts);
      });
    });
  }

  bool is_ready() const { return client_ && client_->is_open() && is_greeted_; }

  // open - connect and greet now (a relay learns its upstream's extensions at start)
  void open(std::function<void(const std::string& failure)> then) { with_session(std::move(then)); }

  bool offers(const char* keyword) const {
    return std::find(extensions_.begin(), extensions_.end(), keyword) != extensions_.end();
  }

 private:
  // with_session - an open, greeted session, or the 451 that says why not
  void with_session(std::function<void(const std::string& failure)> then) {
    if (is_ready()) return then("");
    if (client_) client_->quit();
    reactor_.dispose(std::move(client_));  // its reply may have led here
    client_ = std::make_unique<UpstreamClient>(reactor_, settings_);
    is_greeted_ = false;
    in_transaction_ = false;
    client_->open([this, then](const UpstreamReply& greeting) {
      if (!greeting.is_positive()) return then(unavailable(greeting));
      greet(greeting_ == Greeting::Lhlo ? "LHLO " : "EHLO ", then);
    });
  }

  // greet - EHLO, falling back to HELO when the upstream does not know EHLO; or LHLO
  void greet(const char* verb, std::function<void(const std::string& failure)> then) {
    client_->send(verb + settings_.fqdn + "\r\n", [this, verb, then](const UpstreamReply& reply) {
      bool is_ehlo = std::strcmp(verb, "EHLO ") == 0;
      if (is_ehlo && reply.code >= 500) return greet("HELO ", then);
      if (!reply.is_positive()) return then(unavailable(reply));
      bool is_helo = std::strcmp(verb, "HELO ") == 0;
      extensions_.clear();
      size_limit_ = 0;
      if (!is_helo) read_extensions(reply.text);
      is_greeted_ = true;
      if (learned_) {
        *learned_ = UpstreamOffer{true, offers("8BITMIME"), offers("SMTPUTF8"), size_limit_};
      }
      then("");
    });
  }

  // read_extensions - the keywords of an EHLO or LHLO reply, and the SIZE limit (RFC 1870)
  void read_extensions(const std::string& text) {
    std::size_t start = text.find("\r\n");  // the first line is the upstream's name
    while (start != std::string::npos) {
      start += 2;
      std::size_t end = text.find("\r\n", start);
      std::string line = text.substr(start, end == std::string::npos ? end : end - start);
      std::vector<std::string> words = python_split(line.size() > 4 ? line.substr(4) : "");
      if (!words.empty()) extensions_.push_back(ascii_upper(words[0]));
      bool has_size = words.size() > 1 && extensions_.back() == "SIZE";
      if (has_size && is_decimal(words[1]) && words[1].size() < 19)
        size_limit_ = std::stoull(words[1]);
      start = end;
    }
  }

  // mail_command - MAIL FROM with the client's parameters the upstream understands;
  // a parameter it cannot honour refuses the mail (RFC 6152 3, RFC 6531 3.2)
  std::string mail_command(const MailRequest& mail, std::string& refusal) const {
    std::string command = "MAIL FROM:<" + (mail.address == "<>" ? "" : mail.address) + ">";
    for (const std::string& option : mail.options) {
      std::string key = option.substr(0, option.find('='));
      if (key == "SIZE" && offers("SIZE")) command += " " + option;
      if (key == "BODY" && offers("8BITMIME")) command += " " + option;
      if (option == "BODY=8BITMIME" && !offers("8BITMIME"))
        refusal = reply_upstream_no_8bit(settings_.role);
      if (key == "SMTPUTF8" && offers("SMTPUTF8")) command += " SMTPUTF8";
      if (key == "SMTPUTF8" && !offers("SMTPUTF8"))
        refusal = reply_upstream_no_smtputf8(settings_.role);
    }
    return command + "\r\n";
  }

  // relayed - the upstream's reply for the client; no reply at all becomes a 451, and so
  // does a 421: the upstream is going away, but this client's session with us is not
  std::string relayed(const UpstreamReply& reply, const char* step) {
    if (reply.code == 0 || reply.code == 421) {
      is_greeted_ = false;  // the next MAIL opens a new upstream session
      in_transaction_ = false;
    }
    if (reply.code == 0) return unavailable(reply);
    if (reply.code == 421) return reply_upstream_closed(settings_.role, settings_.name, reply.text);
    if (reply.code >= 200 && reply.code < 600 && reply.code / 100 != 3) return reply.text;
    return reply_upstream_unexpected(settings_.role, step, reply.text);
  }

  std::string unavailable(const UpstreamReply& reply) const {
    if (reply.code == 0) return reply_upstream_failed(settings_.role, settings_.name, reply.text);
    return reply_upstream_refused(settings_.role, settings_.name, reply.text);
  }

  std::string lost() const { return reply_upstream_lost(settings_.role, settings_.name); }

  Reactor& reactor_;
  const UpstreamSettings& settings_;
  Greeting greeting_;
  UpstreamOffer* learned_;  // where a relay keeps what its upstream offers; may be null
  std::uint64_t size_limit_ = 0;
  std::unique_ptr<UpstreamClient> client_;
  bool is_greeted_ = false;
  bool in_transaction_ = false;
  std::vector<std::string> extensions_;  // EHLO/LHLO keywords, upper-cased
};

// UpstreamProbe - one session opened at start only to learn what the upstream offers; it
// says goodbye as soon as it has (or has failed), and is let go before the loop ends
class UpstreamProbe {
 public:
  void start(Reactor& reactor, const UpstreamSettings& settings, UpstreamOffer& offer) {
    reactor_ = &reactor;
    session_ = std::make_unique<UpstreamSession>(reactor, settings, UpstreamSession::Greeting::Ehlo,
                                                 &offer);
    session_->open([this](const std::string&) { reactor_->dispose(std::move(session_)); });
  }
  void stop() { session_.reset(); }

 private:
  Reactor* reactor_ = nullptr;
  std::unique_ptr<UpstreamSession> session_;
};

// ==== 14. Relays ====
// PureProxy relays each client's transaction to the upstream step by step and answers with the
// upstream's own replies. MailmanProxy hands list mail to Mailman (3 over LMTP, 2 through its
// mail wrapper) and relays the rest as PureProxy does.
//   PureProxy; list_headers, MailmanTarget, mailman2_target, MailmanProxy

// PureProxy - relays each client's transaction to the upstream server step by step, and
// answers the client with the upstream's own replies: MAIL, each RCPT and the end of DATA.
// When the upstream cannot be reached or fails, the client hears 451 and keeps its mail.
// differs from smtpd.py: Python relays with a blocking client (every other client waits),
// then answers 250 whatever the upstream said, so refused mail is dropped; on Python 3 it
// fails on every message before answering.
class PureProxy : public ServerMode {
 public:
  explicit PureProxy(UpstreamSettings settings) : settings_(std::move(settings)) {}
  bool asks_envelope() const override { return true; }
  std::unique_ptr<ModeSession> open_session(Reactor& reactor, const std::string&) override {
    return std::make_unique<RelaySession>(reactor, settings_, offer_);
  }
  void start(Reactor& reactor) override { probe_.start(reactor, settings_, offer_); }
  void stop() override { probe_.stop(); }
  void shape(ChannelConfig& config) const override { offer_.shape(config); }

 private:
  class RelaySession : public ModeSession {
   public:
    RelaySession(Reactor& reactor, const UpstreamSettings& settings, UpstreamOffer& offer)
        : upstream_(reactor, settings, UpstreamSession::Greeting::Ehlo, &offer) {}

    void on_mail(const MailRequest& mail, Verdict verdict) override {
      upstream_.mail(mail, std::move(verdict));
    }
    void on_rcpt(const std::string& rcpt, Verdict verdict) override {
      upstream_.rcpt(rcpt, std::move(verdict));
    }
    void on_message(Envelope envelope, Verdict verdict) override {
      auto message = std::make_shared<const Envelope>(std::move(envelope));
      upstream_.data(std::make_unique<RelayText>(message), 1,
                     [verdict](const std::vector<std::string>& replies) { verdict(replies[0]); });
    }

   private:
    UpstreamSession upstream_;
  };

  UpstreamSettings settings_;
  UpstreamOffer offer_;
  UpstreamProbe probe_;
};

// list_headers - the header lines put before the message as Mailman gets it: Python's
// MailmanProxy added From: and Date: when missing, as Mailman needs them and MTAs add them;
// Message-ID: too, as Mailman files and threads by it. The date is RFC 5322's, where Python
// used ctime().
inline std::string list_headers(const std::string& data, const std::string& mailfrom,
                                const std::string& our_name, std::int64_t unix_us) {
  // the header lines: up to the first empty line, all of a message that has none; looked at
  // in place, as a message of 100 MB may have no empty line
  std::string_view head(data);
  head = head.substr(0, head.rfind('\n', 0) == 0 ? 0 : head.find("\n\n"));
  auto lacks = [head](std::string_view name) {  // NAME: at the start of a line, in any case
    for (std::size_t at = 0; at != std::string_view::npos;) {
      if (ascii_upper(head.substr(at, name.size())) == name) return false;
      at = head.find('\n', at);
      if (at != std::string_view::npos) ++at;
    }
    return true;
  };
  std::string added;
  if (lacks("FROM:") && mailfrom != "<>") added += "From: " + mailfrom + "\n";
  if (lacks("DATE:")) added += "Date: " + format_rfc5322_date_utc(unix_us / 1000000) + "\n";
  if (lacks("MESSAGE-ID:")) {
    static std::uint64_t count = 0;
    added += "Message-ID: <" +
             maildir_unique_name(unix_us / 1000000, static_cast<long>(unix_us % 1000000),
                                 process_id(), ++count, our_name) +
             ">\n";
  }
  return added;
}

// MailmanTarget - a recipient Mailman 2 takes: its wrapper's COMMAND and LIST arguments
struct MailmanTarget {
  std::string command;  // post, admin, bounces, confirm, join, leave, owner, request, ...
  std::string list;
  bool operator==(const MailmanTarget& o) const { return command == o.command && list == o.list; }
};

// mailman2_target - whether a Mailman 2 installation in `home` takes this recipient: its local
// part, lower-cased, is LIST or LIST-COMMAND and home/lists/LIST has a config.pck or config.db
// (Mailman 2's Utils.list_exists; a list literally named "a-request" wins over a's -request).
// The list name holds only Mailman's ACCEPTABLE_LISTNAME_CHARACTERS, so it never leaves lists/.
inline std::optional<MailmanTarget> mailman2_target(const std::string& home,
                                                    const std::string& rcpt) {
  static const char* const kWrapperCommands[] = {"admin",   "bounces",   "confirm",
                                                 "join",    "leave",     "owner",
                                                 "request", "subscribe", "unsubscribe"};
  std::string local = rcpt.substr(0, rcpt.rfind('@'));
  for (char& c : local) c = ascii_lower(c);
  auto is_list = [&home](const std::string& name) {
    if (name.empty() || name == "." || name == "..") return false;
    for (char c : name)
      if (!is_ascii_alnum(c) && std::strchr("-+_.=", c) == nullptr) return false;
    std::string dir = home + "/lists/" + name + "/";
    return path_exists(dir + "config.pck") || path_exists(dir + "config.db");
  };
  if (is_list(local)) return MailmanTarget{"post", local};
  std::size_t dash = local.rfind('-');
  if (dash == std::string::npos) return std::nullopt;
  std::string command = local.substr(dash + 1);
  for (const char* known : kWrapperCommands)
    if (command == known && is_list(local.substr(0, dash)))
      return MailmanTarget{command, local.substr(0, dash)};
  return std::nullopt;
}

// MailmanProxy - list mail to Mailman, the rest relayed as PureProxy relays it. Mailman 3 is
// asked at each RCPT over LMTP whether the address is its own; Mailman 2 is looked up in its
// lists/ directory. Whatever is not Mailman's goes to the upstream with the upstream's own
// verdicts. At the final dot the upstream gets the message first and Mailman only once the
// upstream has it, so that one permanent refusal rarely leaves the other side with a copy;
// the client hears 250 only when every destination has the message, 4xx when any of them
// failed for now (a retry may duplicate; nothing is lost). The man page has the whole table.
// differs from smtpd.py: Python spoke a Mailman 2.0 API that no longer exists, took only
// LIST, -admin, -owner, -request, -join and -leave, and answered 250 whatever happened.
class MailmanProxy : public ServerMode {
 public:
  struct Options {
    UpstreamSettings relay;  // the upstream server
    UpstreamSettings lmtp;   // Mailman 3's LMTP runner (unused with home)
    std::string home;        // --mailman-home: Mailman 2's prefix; empty for Mailman 3
    long long wrapper_timeout_ms = kExecTimeoutMs;
    std::string our_name;  // for the Message-ID we add
  };

  explicit MailmanProxy(Options options) : options_(std::move(options)) {}
  bool asks_envelope() const override { return true; }
  std::unique_ptr<ModeSession> open_session(Reactor& reactor, const std::string&) override {
    return std::make_unique<MailmanSession>(reactor, options_, offer_);
  }
  void start(Reactor& reactor) override { probe_.start(reactor, options_.relay, offer_); }
  void stop() override { probe_.stop(); }
  void shape(ChannelConfig& config) const override { offer_.shape(config); }

  // wrapper_command - Mailman 2's mail wrapper as the MTA's pipe alias runs it
  static std::string wrapper_command(const std::string& home, const MailmanTarget& target) {
    return shell_quote(home + "/mail/mailman") + " " + target.command + " " + target.list;
  }

  // wrapper_reply - the wrapper's exit status as a verdict: 0 delivered, 1 no such list (its
  // scripts' "list not found"), anything else, or no exit in time, a failure for now
  static std::string wrapper_reply(const ChildRun::Outcome& outcome, const std::string& what) {
    if (!outcome.has_started)
      return "451 Error: cannot run Mailman 2's " + what + ": " + outcome.error;
    if (outcome.has_timed_out)
      return "451 Error: Mailman 2's " + what + " did not finish in time; try again later";
    if (outcome.exit_code == 0) return "";
    if (outcome.exit_code == 1)
      return "550 5.1.1 Error: Mailman 2's " + what + " found no such list";
    return "451 Error: Mailman 2's " + what + " failed (exit status " +
           std::to_string(outcome.exit_code) + "); try again later";
  }

 private:
  class MailmanSession : public ModeSession {
   public:
    MailmanSession(Reactor& reactor, const Options& options, UpstreamOffer& offer)
        : reactor_(reactor),
          options_(options),
          relay_(reactor, options.relay, UpstreamSession::Greeting::Ehlo, &offer),
          lmtp_(reactor, options.lmtp, UpstreamSession::Greeting::Lhlo) {}

    // on_mail - the sender is taken here and given to each destination at its first RCPT
    void on_mail(const MailRequest& mail, Verdict verdict) override {
      mail_ = mail;
      has_relay_mail_ = has_lmtp_mail_ = false;
      relay_accepted_ = lmtp_accepted_ = 0;
      targets_.clear();
      verdict("");
    }

    void on_rcpt(const std::string& rcpt, Verdict verdict) override {
      if (options_.home.empty()) return ask_mailman(rcpt, std::move(verdict));
      std::optional<MailmanTarget> target = mailman2_target(options_.home, rcpt);
      if (!target) return relay(rcpt, std::move(verdict));
      if (std::find(targets_.begin(), targets_.end(), *target) == targets_.end())
        targets_.push_back(*target);
      verdict("");
    }

    // on_message - the upstream first, then Mailman, then one reply for all
    void on_message(Envelope envelope, Verdict verdict) override {
      auto message = std::make_shared<Envelope>(std::move(envelope));
      if (relay_accepted_ == 0) return to_mailman(message, "", verdict);
      relay_.data(std::make_unique<RelayText>(message), 1,
                  [this, message, verdict](const std::vector<std::string>& replies) {
                    if (replies[0][0] != '2') return verdict(replies[0]);  // nobody has it
                    to_mailman(message, replies[0], verdict);
                  });
    }

   private:
    // ask_mailman - Mailman 3 at RCPT: 2xx it is Mailman's, 5xx it is not (relay it), and
    // anything else a 4xx, never a relay of what may be a list address
    void ask_mailman(const std::string& rcpt, Verdict verdict) {
      auto ask = [this, rcpt, verdict] {
        lmtp_.rcpt(rcpt, [this, rcpt, verdict](const std::string& reply) {
          if (reply[0] == '2') return ++lmtp_accepted_, verdict(reply);
          if (reply[0] == '5') return relay(rcpt, verdict);
          verdict(for_now(reply));
        });
      };
      if (has_lmtp_mail_) return ask();
      lmtp_.mail(mail_for_mailman(), [this, ask, verdict](const std::string& reply) {
        if (reply[0] != '2') return verdict(for_now(reply));
        has_lmtp_mail_ = true;
        ask();
      });
    }

    // mail_for_mailman - the sender as Mailman 3 gets it. Its LMTP runner offers no SMTPUTF8;
    // as the final delivery agent it reads UTF-8 headers all the same, so the parameter is
    // left out rather than refusing the mail (RFC 6531 3.4 asks of relays, not of delivery).
    MailRequest mail_for_mailman() const {
      MailRequest mail = mail_;
      mail.options.erase(std::remove(mail.options.begin(), mail.options.end(), "SMTPUTF8"),
                         mail.options.end());
      mail.smtputf8 = false;
      return mail;
    }

    // relay - a recipient that is not Mailman's goes upstream, the sender first if need be
    void relay(const std::string& rcpt, Verdict verdict) {
      auto send_rcpt = [this, rcpt, verdict] {
        relay_.rcpt(rcpt, [this, verdict](const std::string& reply) {
          if (reply[0] == '2') ++relay_accepted_;
          verdict(reply);
        });
      };
      if (has_relay_mail_) return send_rcpt();
      relay_.mail(mail_, [this, send_rcpt, verdict](const std::string& reply) {
        if (reply[0] != '2') return verdict(reply);  // the upstream refuses the sender
        has_relay_mail_ = true;
        send_rcpt();
      });
    }

    // to_mailman - the Mailman part of the message, once the upstream (if any) has it: then
    // upstream_reply is its 2xx
    void to_mailman(std::shared_ptr<const Envelope> message, const std::string& upstream_reply,
                    Verdict verdict) {
      if (lmtp_accepted_ == 0 && targets_.empty()) return verdict(upstream_reply);
      bool upstream_has_it = !upstream_reply.empty();
      std::string added =
          list_headers(message->data, message->mailfrom, options_.our_name, unix_time_us());
      auto finish = [upstream_has_it, verdict](const std::vector<std::string>& replies) {
        verdict(one_reply(replies, upstream_has_it));
      };
      if (!options_.home.empty()) return run_wrappers(message, added, 0, {}, finish);
      lmtp_.data(std::make_unique<RelayText>(message, added), lmtp_accepted_, finish);
    }

    // run_wrappers - Mailman 2's wrapper once for each list address, one after the other
    void run_wrappers(std::shared_ptr<const Envelope> message, const std::string& added,
                      std::size_t next, std::vector<std::string> replies,
                      std::function<void(const std::vector<std::string>&)> finish) {
      if (next == targets_.size()) return finish(replies);
      const MailmanTarget& target = targets_[next];
      std::string what = "mail wrapper (" + target.command + " " + target.list + ")";
      reactor_.dispose(std::move(run_));  // a finished run: its end may have led here
      run_ =
          std::make_unique<ChildRun>(reactor_, MailmanProxy::wrapper_command(options_.home, target),
                                     options_.wrapper_timeout_ms);
      run_->run(
          std::make_unique<FileText>(message, added), {},
          [this, message, added, next, replies, finish, what](const ChildRun::Outcome& outcome) {
            std::vector<std::string> so_far = replies;
            so_far.push_back(wrapper_reply(outcome, what));
            run_wrappers(message, added, next + 1, so_far, finish);
          });
    }

    // one_reply - the client's one reply for Mailman's replies: 250 when all accepted; the
    // first 4xx when any failed for now (the client retries); else the first refusal, said
    // to have reached the upstream's recipients when it did
    static std::string one_reply(const std::vector<std::string>& replies, bool upstream_has_it) {
      for (const std::string& reply : replies)
        if (!reply.empty() && reply[0] == '4') return reply;
      for (const std::string& reply : replies) {
        if (is_accepting(reply)) continue;
        if (!upstream_has_it) return reply;
        return reply.substr(0, 3) + " Error: the upstream server took the message, Mailman " +
               "refused it: " + printable(reply).substr(0, 300);
      }
      return "";
    }

    // for_now - Mailman could not say whether an address is its own: a 4xx, whatever it was
    std::string for_now(const std::string& reply) const {
      if (reply[0] == '4') return reply;
      return "451 Error: Mailman's LMTP server " + options_.lmtp.name +
             " cannot tell whether this address is a list's: " + printable(reply).substr(0, 300);
    }

    Reactor& reactor_;
    const Options& options_;
    UpstreamSession relay_;
    UpstreamSession lmtp_;
    MailRequest mail_;
    bool has_relay_mail_ = false;         // the upstream has this transaction's MAIL
    bool has_lmtp_mail_ = false;          // so has Mailman 3
    std::size_t relay_accepted_ = 0;      // recipients the upstream accepted
    std::size_t lmtp_accepted_ = 0;       // recipients Mailman 3 accepted: its replies at the dot
    std::vector<MailmanTarget> targets_;  // Mailman 2's, each once
    std::unique_ptr<ChildRun> run_;
  };

  Options options_;
  UpstreamOffer offer_;  // what the upstream offers; Mailman 3's runner offers 8BITMIME too
  UpstreamProbe probe_;
};

// ==== 15. Transports and TLS ====
// The one door a connection's bytes go through (as cpp-httplib's Stream): plain TCP is
// SocketTransport, and with make TLS=1 a TlsTransport wraps it for STARTTLS and --tls-implicit,
// so every line above the transport is the same for both.
//   Transport, TransportWrapper, SocketTransport; TlsContext, TlsTransport, tls_wrapper,
//   tls_error_text (make TLS=1 only); kHasTls

// Transport - the one door a connection's bytes go through (as cpp-httplib's Stream), so a
// TLS layer can wrap it and every line above stays the same. Plain TCP is SocketTransport.
class Transport {
 public:
  enum class Status { Ok, WouldBlock, Closed, Failed };  // Closed: the peer sent EOF
  struct Result {
    Status status;
    std::size_t bytes = 0;
    std::string error;  // for Failed
  };
  virtual ~Transport() = default;
  virtual socket_t socket() const = 0;
  virtual Result read_some(char* buffer, std::size_t size) = 0;
  virtual Result write_some(std::string_view bytes) = 0;
  // poll_events - what to poll the socket for when the connection wants to read (POLLIN)
  // and/or write (POLLOUT): TLS may have to read before it can write, and the reverse
  virtual short poll_events(short wanted) const { return wanted; }
  // security - "TLSv1.3 TLS_AES_256_GCM_SHA384" once a TLS handshake is done; "" for none
  virtual std::string security() const { return ""; }
};

// TransportWrapper - puts TLS around a transport (the TLS layer below); empty without TLS
using TransportWrapper = std::function<std::unique_ptr<Transport>(std::unique_ptr<Transport>)>;

// SocketTransport - a connected TCP socket, closed with the transport
class SocketTransport : public Transport {
 public:
  explicit SocketTransport(socket_t s) : socket_(s) {}
  ~SocketTransport() override { close_socket(socket_); }
  SocketTransport(const SocketTransport&) = delete;
  SocketTransport& operator=(const SocketTransport&) = delete;

  socket_t socket() const override { return socket_; }
  Result read_some(char* buffer, std::size_t size) override {
    auto n = recv(socket_, buffer, static_cast<int>(size), 0);
    if (n > 0) return {Status::Ok, static_cast<std::size_t>(n), ""};
    if (n == 0) return {Status::Closed, 0, ""};
    return failure();
  }
  Result write_some(std::string_view bytes) override {
    auto n = send(socket_, bytes.data(), static_cast<int>(bytes.size()), kSendFlags);
    if (n > 0) return {Status::Ok, static_cast<std::size_t>(n), ""};
    return failure();
  }

 private:
  static Result failure() {
    int err = last_socket_error();
    if (would_block(err)) return {Status::WouldBlock, 0, ""};
    return {Status::Failed, 0, socket_error_text(err)};
  }

  socket_t socket_;
};

#ifdef SMTPD_TLS
// The TLS layer (make TLS=1): a TlsTransport wraps a connection's transport for STARTTLS or
// --tls-implicit, on one server context made at start from --tls-cert and --tls-key, or from
// a throwaway self-signed certificate (--tls). OpenSSL works the socket itself; each read or
// write says what it waits for, and poll_events passes that on to the loop.
//   TlsContext (from_files, self_signed), TlsTransport, tls_error_text
constexpr bool kHasTls = true;

// tls_error_text - OpenSSL's reason for the last failure, and the error queue emptied
inline std::string tls_error_text(const char* fallback) {
  unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return fallback;
  char text[256];
  ERR_error_string_n(code, text, sizeof text);
  return text;
}

class TlsContext {
 public:
  ~TlsContext() { SSL_CTX_free(ctx_); }
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;
  SSL_CTX* get() const { return ctx_; }

  // from_files - PEM certificate chain and key; throws std::runtime_error with the reason
  static std::shared_ptr<TlsContext> from_files(const std::string& cert, const std::string& key) {
    auto context = std::shared_ptr<TlsContext>(new TlsContext());
    SSL_CTX* ctx = context->ctx_;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert.c_str()) != 1)
      throw std::runtime_error("cannot use --tls-cert " + cert + ": " + tls_error_text("?"));
    if (SSL_CTX_use_PrivateKey_file(ctx, key.c_str(), SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1)
      throw std::runtime_error("cannot use --tls-key " + key + ": " + tls_error_text("?"));
    return context;
  }

  // self_signed - a new P-256 key and a certificate for HOST, localhost, 127.0.0.1 and ::1,
  // valid from an hour ago for kSelfSignedDays, made in memory and never written anywhere
  static std::shared_ptr<TlsContext> self_signed(const std::string& host) {
    auto context = std::shared_ptr<TlsContext>(new TlsContext());
    std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(make_key(), EVP_PKEY_free);
    std::unique_ptr<X509, decltype(&X509_free)> cert(X509_new(), X509_free);
    if (!key || !cert) throw std::runtime_error("cannot make a key: " + tls_error_text("?"));
    X509_set_version(cert.get(), 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cert.get()),
                     static_cast<long>(unix_time_us() & 0x7FFFFFFF));
    X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
    X509_gmtime_adj(X509_getm_notAfter(cert.get()), 86400L * kSelfSignedDays);
    X509_set_pubkey(cert.get(), key.get());
    X509_NAME* name = X509_get_subject_name(cert.get());
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
                               reinterpret_cast<const unsigned char*>(host.c_str()), -1, -1, 0);
    X509_set_issuer_name(cert.get(), name);
    std::string names = "DNS:localhost,IP:127.0.0.1,IP:::1";
    if (host != "localhost") names += ",DNS:" + host;
    X509V3_CTX v3;
    X509V3_set_ctx_nodb(&v3);
    X509V3_set_ctx(&v3, cert.get(), cert.get(), nullptr, nullptr, 0);
    X509_EXTENSION* san = X509V3_EXT_conf_nid(nullptr, &v3, NID_subject_alt_name, names.c_str());
    bool is_made = san != nullptr && X509_add_ext(cert.get(), san, -1) == 1 &&
                   X509_sign(cert.get(), key.get(), EVP_sha256()) > 0 &&
                   SSL_CTX_use_certificate(context->ctx_, cert.get()) == 1 &&
                   SSL_CTX_use_PrivateKey(context->ctx_, key.get()) == 1;
    X509_EXTENSION_free(san);
    if (!is_made)
      throw std::runtime_error("cannot make a self-signed certificate: " + tls_error_text("?"));
    return context;
  }

 private:
  // TLS 1.2 and 1.3 only; a client that closes without close_notify just ends the session
  TlsContext() : ctx_(SSL_CTX_new(TLS_server_method())) {
    if (ctx_ == nullptr) throw std::runtime_error("cannot start TLS: " + tls_error_text("?"));
    SSL_CTX_set_min_proto_version(ctx_, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx_, SSL_OP_NO_RENEGOTIATION | kIgnoreUnexpectedEof);
  }

  static EVP_PKEY* make_key() {
    EVP_PKEY* key = nullptr;
    EVP_PKEY_CTX* pctx = EVP_PKEY_CTX_new_id(EVP_PKEY_EC, nullptr);
    if (pctx != nullptr && EVP_PKEY_keygen_init(pctx) == 1 &&
        EVP_PKEY_CTX_set_ec_paramgen_curve_nid(pctx, NID_X9_62_prime256v1) == 1)
      EVP_PKEY_keygen(pctx, &key);
    EVP_PKEY_CTX_free(pctx);
    return key;
  }

#ifdef SSL_OP_IGNORE_UNEXPECTED_EOF
  static constexpr std::uint64_t kIgnoreUnexpectedEof = SSL_OP_IGNORE_UNEXPECTED_EOF;
#else
  static constexpr std::uint64_t kIgnoreUnexpectedEof = 0;  // OpenSSL 1.1.1 has no such error
#endif
  SSL_CTX* ctx_;
};

// TlsTransport - the server side of TLS over another transport's socket. The handshake runs
// inside the first reads and writes (so the greeting of --tls-implicit waits for it).
class TlsTransport : public Transport {
 public:
  TlsTransport(std::unique_ptr<Transport> inner, std::shared_ptr<TlsContext> context)
      : inner_(std::move(inner)), context_(std::move(context)), ssl_(SSL_new(context_->get())) {
    if (ssl_ == nullptr) return;
    SSL_set_fd(ssl_, static_cast<int>(inner_->socket()));
    SSL_set_accept_state(ssl_);
    SSL_set_mode(ssl_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  }
  ~TlsTransport() override {
    if (ssl_ != nullptr && SSL_is_init_finished(ssl_)) SSL_shutdown(ssl_);  // one try, no wait
    SSL_free(ssl_);
    ERR_clear_error();
  }
  TlsTransport(const TlsTransport&) = delete;
  TlsTransport& operator=(const TlsTransport&) = delete;

  socket_t socket() const override { return inner_->socket(); }

  // read_some - decrypted bytes, as many as fit: records already read must not wait in
  // OpenSSL's buffer, where poll cannot see them
  Result read_some(char* buffer, std::size_t size) override {
    if (ssl_ == nullptr) return {Status::Failed, 0, "cannot start TLS"};
    std::size_t total = 0;
    while (total < size) {
      ERR_clear_error();
      int n = SSL_read(ssl_, buffer + total,
                       static_cast<int>(std::min<std::size_t>(size - total, 1 << 30)));
      if (n <= 0) {
        Result r = outcome(n, read_waits_for_);
        if (total == 0) return r;
        break;  // the bytes first; an end or error comes again with the next read
      }
      total += static_cast<std::size_t>(n);
    }
    read_waits_for_ = 0;
    return {Status::Ok, total, ""};
  }

  Result write_some(std::string_view bytes) override {
    if (ssl_ == nullptr) return {Status::Failed, 0, "cannot start TLS"};
    ERR_clear_error();
    int n = SSL_write(ssl_, bytes.data(),
                      static_cast<int>(std::min<std::size_t>(bytes.size(), 1 << 30)));
    if (n <= 0) return outcome(n, write_waits_for_);
    write_waits_for_ = 0;
    return {Status::Ok, static_cast<std::size_t>(n), ""};
  }

  short poll_events(short wanted) const override {
    short events = 0;
    if (wanted & POLLIN) events |= read_waits_for_ != 0 ? read_waits_for_ : POLLIN;
    if (wanted & POLLOUT) events |= write_waits_for_ != 0 ? write_waits_for_ : POLLOUT;
    return events;
  }

  std::string security() const override {
    if (ssl_ == nullptr || !SSL_is_init_finished(ssl_)) return "";
    return std::string(SSL_get_version(ssl_)) + " " + SSL_get_cipher_name(ssl_);
  }

 private:
  // outcome - a read or write that gave nothing: wait for the socket, the end, or a failure
  Result outcome(int n, short& waits_for) {
    int err = SSL_get_error(ssl_, n);
    waits_for = err == SSL_ERROR_WANT_READ ? POLLIN : err == SSL_ERROR_WANT_WRITE ? POLLOUT : 0;
    if (waits_for != 0) return {Status::WouldBlock, 0, ""};
    if (err == SSL_ERROR_ZERO_RETURN) return {Status::Closed, 0, ""};
    if (err == SSL_ERROR_SYSCALL && ERR_peek_error() == 0) {
      int sys = last_socket_error();
      if (n == 0 || sys == 0) return {Status::Closed, 0, ""};
      return {Status::Failed, 0, socket_error_text(sys)};
    }
    return {Status::Failed, 0, "TLS: " + tls_error_text("protocol error")};
  }

  std::unique_ptr<Transport> inner_;
  std::shared_ptr<TlsContext> context_;
  SSL* ssl_;
  short read_waits_for_ = 0;   // what the last read waited for: POLLIN, POLLOUT, or 0
  short write_waits_for_ = 0;  // the same for the last write
};

// tls_wrapper - the TransportWrapper for a context
inline TransportWrapper tls_wrapper(std::shared_ptr<TlsContext> context) {
  return [context](std::unique_ptr<Transport> inner) -> std::unique_ptr<Transport> {
    return std::make_unique<TlsTransport>(std::move(inner), context);
  };
}
#else
constexpr bool kHasTls = false;  // built without TLS: the TLS options say to use make TLS=1
#endif

// ==== 16. Server ====
// SMTP on the reactor, one thread and non-blocking sockets. The Acceptor watches the listeners,
// each client is a Connection (its Transport, its Channel, its ModeSession), and ExitPolicy
// decides when the server ends by itself. A slow client, or a slow upstream, only ever holds
// up the clients it serves.
//   StartError, Listener, listen_everywhere, open_listeners; ServerOptions; ExitPolicy;
//   ConnectionContext, Connection (serve, read_some, ask, on_verdict, settle, write_some,
//   close); TurnAway; Acceptor; Server (run, on_accepted, add_client, begin_shutdown)

class StartError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Listener - one listening socket and the address it is bound to, as "127.0.0.1:8025"
struct Listener {
  socket_t socket;
  std::string bound;
  std::uint16_t port;
};

// listen_at - a non-blocking listening socket at one address; kInvalidSocket and err when
// that fails. With several listeners an IPv6 one takes IPv6 only, so [::] beside 0.0.0.0 works.
inline socket_t listen_at(const SocketAddress& at, bool is_one_of_several, int& err) {
  socket_t s = socket(at.family, SOCK_STREAM, 0);
  if (s == kInvalidSocket) return err = last_socket_error(), kInvalidSocket;
  set_close_on_exec(s);
  int on = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, reinterpret_cast<const char*>(&on), sizeof on);
  if (at.family == AF_INET6 && is_one_of_several)
    setsockopt(s, IPPROTO_IPV6, IPV6_V6ONLY, reinterpret_cast<const char*>(&on), sizeof on);
  if (bind(s, reinterpret_cast<const sockaddr*>(&at.storage), at.length) != 0 ||
      listen(s, kListenBacklog) != 0 || !set_nonblocking(s)) {
    err = last_socket_error();
    close_socket(s);
    return kInvalidSocket;
  }
  return s;
}

// bound_address - where a socket is bound: "127.0.0.1:8025" or "[::1]:8025", and the port
inline std::pair<std::string, std::uint16_t> bound_address(socket_t s) {
  SocketAddress bound;
  bound.length = sizeof bound.storage;
  getsockname(s, reinterpret_cast<sockaddr*>(&bound.storage), &bound.length);
  auto [host, port] = numeric_address(reinterpret_cast<sockaddr*>(&bound.storage), bound.length);
  return {format_endpoint(host, port), static_cast<std::uint16_t>(port)};
}

// with_port - the address with another port
inline SocketAddress with_port(SocketAddress address, std::uint16_t port) {
  if (address.family == AF_INET6)
    reinterpret_cast<sockaddr_in6*>(&address.storage)->sin6_port = htons(port);
  else
    reinterpret_cast<sockaddr_in*>(&address.storage)->sin_port = htons(port);
  return address;
}

// listen_everywhere - a listener at each address, all on one port: the given one, or for port
// 0 the one the kernel picks for the first address (picked again when another address has it
// taken). An address this machine lacks (IPv6 turned off) is left out, unless it is the
// first; any other failure is a StartError naming the address.
inline std::vector<Listener> listen_everywhere(const std::vector<SocketAddress>& addresses,
                                               const std::string& name, std::uint16_t port) {
  for (int attempt = 0; attempt < kPortAttempts; ++attempt) {
    std::vector<Listener> listeners;
    std::uint16_t chosen = port;
    int err = 0;
    const SocketAddress* failed = nullptr;
    for (const SocketAddress& address : addresses) {
      socket_t s = listen_at(with_port(address, chosen), addresses.size() > 1, err);
      if (s == kInvalidSocket && !listeners.empty() && address_unavailable(err)) continue;
      if (s == kInvalidSocket) {
        failed = &address;
        break;
      }
      auto [text, bound_port] = bound_address(s);
      listeners.push_back({s, text, bound_port});
      chosen = bound_port;
    }
    if (failed == nullptr) return listeners;
    for (const Listener& l : listeners) close_socket(l.socket);
    if (port == 0 && !listeners.empty() && address_in_use(err)) continue;  // another port
    auto [host, ignored] =
        numeric_address(reinterpret_cast<const sockaddr*>(&failed->storage), failed->length);
    std::string where = format_endpoint(host, chosen);
    throw StartError("cannot listen on " + where + (where == name ? "" : " (" + name + ")") + ": " +
                     socket_error_text(err) +
                     (address_in_use(err) ? " (another server is using this port)" : ""));
  }
  throw StartError("cannot find a port that is free on every address of " + name);
}

// open_listeners - listen on every address the host resolves to, in the resolver's order
// differs from smtpd.py: Python listens on the first address only, so with localhost
// resolving to ::1 first a client of 127.0.0.1 was refused.
inline std::vector<Listener> open_listeners(const Endpoint& where) {
  std::string error;
  std::vector<SocketAddress> resolved = resolve_endpoint(where, error);
  if (resolved.empty()) throw StartError("cannot resolve " + where.host + ": " + error);
  std::vector<SocketAddress> addresses;  // without repeats (/etc/hosts may list one twice)
  for (const SocketAddress& a : resolved) {
    bool is_repeat = std::any_of(addresses.begin(), addresses.end(), [&](const SocketAddress& b) {
      return a.length == b.length && std::memcmp(&a.storage, &b.storage, a.length) == 0;
    });
    if (!is_repeat) addresses.push_back(a);
  }
  return listen_everywhere(addresses, format_endpoint(where.host, where.port), where.port);
}

// ServerOptions - the loop's settings; channel is shared read-only by every connection
struct ServerOptions {
  ChannelConfig channel;                             // fqdn, -s, -u, --max-recipients, ...
  TransportWrapper wrap_in_tls;                      // --tls...: how TLS starts; empty: none
  bool is_tls_implicit = false;                      // --tls-implicit: TLS from the first byte
  bool debug = false;                                // -d
  std::uint64_t max_messages = 0;                    // --max-messages: 0 for no limit
  long long idle_exit_ms = 0;                        // --idle-exit: 0 for never
  long long command_timeout_ms = kCommandTimeoutMs;  // --timeout
  std::size_t max_clients = 0;                       // --max-clients: 0 for no limit
  MessageMatcher matcher;                            // --match: which messages count
  long long deadline_ms = 0;                         // --deadline: 0 for none
  bool expect_none = false;                          // --expect-none
};

// ExitPolicy - when the server ends by itself, and how it stops. --max-messages N: after the
// N-th delivered message that meets the --match rules (its 250 queued) no new clients are
// taken; the sessions still open may go on (and send more) until they quit, for at most
// kDrainGraceMs, then hear 421. --expect-none ends the same way after the first matching
// message, with status 1. --idle-exit SECONDS: the loop ends once no client has been connected
// for that long, counted from the start or from when the last client left. SIGTERM/SIGINT and
// --deadline (begin_shutdown): no new clients; idle sessions hear 421 at once, those in a
// transaction get kShutdownGraceMs to finish. The counting is the Expectation's.
class ExitPolicy {
 public:
  using Task = std::function<void()>;
  // stop_accepting is called once, when the message limit is reached or shutdown begins
  ExitPolicy(Reactor& reactor, const ServerOptions& options, Task stop_accepting)
      : reactor_(reactor),
        expectation_(options.max_messages, options.expect_none, options.deadline_ms),
        idle_exit_ms_(options.idle_exit_ms),
        stop_accepting_(std::move(stop_accepting)) {
    on_clients(0);
    if (options.deadline_ms > 0)
      deadline_timer_ = reactor_.start_timer(options.deadline_ms, [this] {
        deadline_timer_ = 0;
        if (!is_stopping()) expectation_.on_deadline();  // Server::run then begins the shutdown
      });
  }
  ~ExitPolicy() {
    for (Reactor::TimerId timer : {idle_timer_, drain_timer_, shutdown_timer_, deadline_timer_})
      reactor_.cancel_timer(timer);
  }
  ExitPolicy(const ExitPolicy&) = delete;
  ExitPolicy& operator=(const ExitPolicy&) = delete;

  // on_clients - a client came or went; `count` are connected now
  void on_clients(std::size_t count) {
    clients_ = count;
    if (is_stopping() && count == 0) is_due_ = true;
    reactor_.cancel_timer(std::exchange(idle_timer_, 0));
    if (count == 0 && idle_exit_ms_ > 0)
      idle_timer_ = reactor_.start_timer(idle_exit_ms_, [this] { is_due_ = true; });
  }

  // on_delivered - one more message accepted with 2xx (its data may be gone: only the
  // envelope, whether it matched and its subject count); the last one wanted, or under
  // --expect-none the first that matches, stops accepting
  void on_delivered(const Envelope& envelope) {
    if (!expectation_.on_message(envelope) || is_stopping()) return;
    is_draining_ = true;
    stop(kDrainGraceMs, drain_timer_);
  }

  // begin_shutdown - SIGTERM/SIGINT: stop accepting, and end once the sessions have
  void begin_shutdown() {
    if (is_shutting_down_) return;
    is_shutting_down_ = true;
    stop(kShutdownGraceMs, shutdown_timer_);  // a drain under way keeps its own end too
  }

  bool is_draining() const { return is_draining_; }  // the message limit is reached
  bool is_shutting_down() const { return is_shutting_down_; }
  bool is_due() const { return is_due_; }  // time to end the loop
  bool is_deadline_passed() const { return expectation_.is_deadline_passed(); }
  std::uint64_t delivered() const { return expectation_.matching(); }
  int exit_status() const { return expectation_.exit_status(); }
  std::string outcome() const { return expectation_.outcome(); }  // "" or a line for stderr
  // closing_reason - what the sessions still open at the end hear after "421 <fqdn>"
  const char* closing_reason() const {
    return is_shutting_down_ ? kClosingShutdown : kClosingLimitReached;
  }

 private:
  // stop - no new clients; the end comes when the last one leaves, or after grace_ms
  void stop(int grace_ms, Reactor::TimerId& timer) {
    timer = reactor_.start_timer(grace_ms, [this] { is_due_ = true; });
    if (clients_ == 0) is_due_ = true;
    if (stop_accepting_) std::exchange(stop_accepting_, nullptr)();
  }
  bool is_stopping() const { return is_draining_ || is_shutting_down_; }

  Reactor& reactor_;
  Expectation expectation_;  // --max-messages, --match, --deadline, --expect-none
  long long idle_exit_ms_;   // 0 for never
  Task stop_accepting_;
  std::size_t clients_ = 0;
  bool is_draining_ = false;
  bool is_shutting_down_ = false;
  bool is_due_ = false;
  Reactor::TimerId idle_timer_ = 0;
  Reactor::TimerId drain_timer_ = 0;     // the end of the drain after the message limit
  Reactor::TimerId shutdown_timer_ = 0;  // the end of the shutdown grace
  Reactor::TimerId deadline_timer_ = 0;  // --deadline
};

// ConnectionContext - what every connection of a server shares: the reactor, our name, the
// --timeout, how TLS starts, -d, the --match rules, and the exit policy that counts deliveries
// and says when the server is stopping
struct ConnectionContext {
  Reactor& reactor;
  ExitPolicy& exit;
  const MessageMatcher& matcher;  // --match: which messages are printed and counted
  std::string fqdn;
  long long command_timeout_ms;
  TransportWrapper wrap_in_tls;  // STARTTLS; empty without TLS
  bool is_debug;
  void trace(const std::string& text) const {
    if (is_debug) log_line(text);
  }
};

// Connection - one client, which does its own I/O (as OpenSMTPD's smtp_session): it moves
// bytes between its transport and its channel, hands the channel's questions to its mode
// session, and keeps the client's time. A question is asked once, right after the bytes or the
// answer that raised it; a verdict (given at once or later) reaches the channel in a deferred
// task, so nothing here calls itself back. It ends through close(), which stops its events at
// once; the server destroys it after the current callbacks, so a verdict that comes in between
// finds it closed.
class Connection {
 public:
  using Closed = std::function<void()>;
  Connection(const ConnectionContext& context, std::unique_ptr<Transport> transport,
             std::shared_ptr<const ChannelConfig> config, std::string peer_ip,
             std::unique_ptr<ModeSession> session)
      : context_(context),
        transport_(std::move(transport)),
        channel_(std::move(config), std::move(peer_ip)),
        session_(std::move(session)) {}
  ~Connection() { session_.reset(); }  // first, while the socket number is still ours
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // start - watch the socket and send the greeting; on_closed runs when the connection ends
  void start(Closed on_closed) {
    on_closed_ = std::move(on_closed);
    context_.reactor.watch(transport_->socket(), 0, [this](short revents) { serve(revents); });
    settle();
  }

  // settle - write what is queued, close when the conversation is over, else poll for what
  // the connection waits on. While the mode decides and more of the client's commands wait
  // behind the question, the replies wait too, so a pipelined group is answered in one write
  // (RFC 2920 3.2 asks servers to send them together). At shutdown an idle session hears 421.
  void settle() {
    bool is_waiting = channel_.question() != Channel::Question::None;
    bool is_holding =
        is_waiting && channel_.has_unread_input() && channel_.output().size() < kOutputBacklog;
    if (!is_closed_ && !is_holding) write_some();
    if (is_closed_) return;
    is_waiting = channel_.question() != Channel::Question::None;
    bool is_done = channel_.is_closing() || (is_input_closed_ && !is_waiting);
    if (is_done && channel_.output().empty()) return close("");
    if (context_.exit.is_shutting_down() && channel_.is_idle())
      return say_and_close(kClosingShutdown, "");
    watch_time();
    short events = 0;
    if (!is_input_closed_ && channel_.wants_input()) events |= POLLIN;
    if (!channel_.output().empty() && !is_holding) events |= POLLOUT;
    context_.reactor.set_events(transport_->socket(), transport_->poll_events(events));
  }

  // close_with - the server is ending: queue this reply (a 421); flush() sends it
  void close_with(const std::string& reply) {
    if (!is_closed_ && !channel_.is_closing()) channel_.close_with(reply);
  }

  // flush - one try to send what is queued; true while some of it still waits
  bool flush() {
    if (is_closed_ || channel_.output().empty()) return false;
    write_some();
    return !is_closed_ && !channel_.output().empty();
  }

  bool is_closed() const { return is_closed_; }

 private:
  // serve - the socket is ready
  void serve(short revents) {
    short read_events = transport_->poll_events(POLLIN) | POLLHUP | POLLERR;
    if ((revents & read_events) && read_some()) ask();
    settle();
  }

  // read_some - true when bytes went to the channel
  bool read_some() {
    static char buffer[kReadChunk];
    if (is_input_closed_ || !channel_.wants_input()) return false;
    Transport::Result r = transport_->read_some(buffer, sizeof buffer);
    switch (r.status) {
      case Transport::Status::Ok:
        if (channel_.is_plain_text()) channel_.set_security(transport_->security());
        channel_.feed(std::string_view(buffer, r.bytes));
        return true;
      case Transport::Status::WouldBlock: return false;
      case Transport::Status::Failed: close("failed: " + r.error); return false;
      case Transport::Status::Closed:
        // The client may still wait for replies to what it sent (a half-close after QUIT).
        // A message not finished with "." was never answered 250, so nothing is lost.
        context_.trace(channel_.peer + " closed its side of the connection");
        is_input_closed_ = true;
        return false;
    }
    return false;
  }

  // ask - hand the channel's question, if it has one, to the mode (the verdict comes to
  // on_verdict); STARTTLS starts once its 220 has been written
  void ask() {
    Verdict verdict = [this](const std::string& reply) { on_verdict(reply); };
    switch (channel_.question()) {
      case Channel::Question::Mail: return session_->on_mail(channel_.mail_request(), verdict);
      case Channel::Question::Rcpt: return session_->on_rcpt(channel_.pending_address(), verdict);
      case Channel::Question::Message: {
        Envelope message = channel_.take_message();
        message.is_matching = context_.matcher.matches(message);
        auto counted_as = std::make_shared<const Envelope>(envelope_summary(message));
        ExitPolicy& exit = context_.exit;
        Verdict counted = [&exit, verdict, counted_as](const std::string& reply) {
          if (is_accepting(reply)) exit.on_delivered(*counted_as);
          verdict(reply);
        };
        return session_->on_message(std::move(message), counted);
      }
      case Channel::Question::StartTls: is_tls_due_ = true; return;
      case Channel::Question::None: return;
    }
  }

  // on_verdict - the mode answered, now or later. The channel takes the answer after the
  // current callbacks: the answer may raise the next question (pipelined commands), asked
  // then, and what the verdict set off (the listeners closing at the message limit) is done
  // before the reply leaves.
  void on_verdict(const std::string& reply) {
    if (is_closed_) return;  // the client is gone; the connection only waits to be destroyed
    context_.reactor.defer([this, reply] {
      if (is_closed_) return;
      channel_.answer(reply);
      ask();
      settle();
    });
  }

  // start_tls - the 220 to STARTTLS is out: TLS from the next byte, and the session anew
  void start_tls() {
    is_tls_due_ = false;
    transport_ = context_.wrap_in_tls(std::move(transport_));
    channel_.restart_in_tls();
  }

  // watch_time - --timeout: the client has that long for each command line (bytes alone do
  // not count, so trickling does not help) and, in DATA, between two reads; the whole of DATA
  // has kDataDeadlineFactor times as long. Time spent waiting for the mode is not the client's.
  void watch_time() {
    Reactor& reactor = context_.reactor;
    long long ms = context_.command_timeout_ms;
    bool is_in_data = channel_.is_in_data();
    if (!is_in_data) reactor.cancel_timer(std::exchange(data_timer_, 0));
    if (is_in_data && data_timer_ == 0)
      data_timer_ = reactor.start_timer(ms * kDataDeadlineFactor, [this] {
        data_timer_ = 0;
        say_and_close(kClosingTimeout, "took too long over DATA");
      });
    if (command_timer_ != 0 && progress_seen_ == channel_.progress()) return;
    progress_seen_ = channel_.progress();
    if (command_timer_ != 0) return reactor.restart_timer(command_timer_, ms);
    command_timer_ = reactor.start_timer(ms, [this] {
      command_timer_ = 0;
      if (channel_.question() != Channel::Question::None) return watch_time();
      say_and_close(kClosingTimeout, "timed out");
    });
  }

  // say_and_close - "421 <fqdn> <text>" and close, whether or not the client reads it
  void say_and_close(const char* text, const std::string& why) {
    if (is_closed_) return;
    channel_.close_with(reply_closing(context_.fqdn, text));
    write_some();
    if (!is_closed_) close(why);
  }

  void write_some() {
    const std::string& out = channel_.output();
    if (out.empty()) return;
    Transport::Result r = transport_->write_some(out);
    if (r.status == Transport::Status::WouldBlock) return;
    if (r.status != Transport::Status::Ok) return close("failed: " + r.error);
    channel_.consume_output(r.bytes);
    if (is_tls_due_ && channel_.output().empty()) start_tls();
  }

  // close - no more events now; the server destroys it after the current callbacks
  void close(const std::string& why) {
    if (!why.empty()) context_.trace(channel_.peer + " " + why);
    is_closed_ = true;
    context_.reactor.cancel_timer(std::exchange(command_timer_, 0));
    context_.reactor.cancel_timer(std::exchange(data_timer_, 0));
    context_.reactor.unwatch(transport_->socket());
    if (on_closed_) std::exchange(on_closed_, nullptr)();
  }

  const ConnectionContext& context_;
  std::unique_ptr<Transport> transport_;
  Channel channel_;
  std::unique_ptr<ModeSession> session_;
  Closed on_closed_;
  bool is_input_closed_ = false;        // the client sent EOF; finish what it asked, then close
  bool is_closed_ = false;              // no more events; destroyed after the current callbacks
  bool is_tls_due_ = false;             // STARTTLS was answered: TLS once the 220 is written
  Reactor::TimerId command_timer_ = 0;  // --timeout for the command (or DATA read) awaited
  Reactor::TimerId data_timer_ = 0;     // --timeout times kDataDeadlineFactor for all of DATA
  std::uint64_t progress_seen_ = 0;     // channel_.progress() when command_timer_ last started
};

// TurnAway - --max-clients: a client over the limit hears "421 ... too many connections" and
// is closed, and the listener goes on. In plain text that is one send on a fresh socket, which
// its buffer takes. Under --tls-implicit a client expects TLS from the first byte and would
// take a plain 421 for a TLS error, not for a reason to come back later: the handshake is
// finished and the 421 sent inside TLS, bounded by kTurnAwayHandshakes and kTurnAwayTimeoutMs.
class TurnAway {
 public:
  TurnAway(Reactor& reactor, TransportWrapper wrap_in_tls)
      : reactor_(reactor), wrap_in_tls_(std::move(wrap_in_tls)) {}
  TurnAway(const TurnAway&) = delete;
  TurnAway& operator=(const TurnAway&) = delete;

  // refuse - say the reply (one line, CRLF included) on this new client's socket, then close
  void refuse(socket_t s, const std::string& reply) {
    if (!wrap_in_tls_) {
      (void)!send(s, reply.data(), static_cast<int>(reply.size()), kSendFlags);
      return close_socket(s);
    }
    if (farewells_.size() >= kTurnAwayHandshakes) return close_socket(s);
    auto transport = wrap_in_tls_(std::make_unique<SocketTransport>(s));
    auto place = farewells_.insert(farewells_.end(), Farewell{std::move(transport), reply, 0});
    place->timer = reactor_.start_timer(kTurnAwayTimeoutMs, [this, place] {
      place->timer = 0;
      end(place);
    });
    reactor_.watch(s, place->transport->poll_events(POLLOUT),
                   [this, place](short) { write_some(place); });
  }

 private:
  struct Farewell {
    std::unique_ptr<Transport> transport;  // TLS over the client's socket
    std::string unsent;                    // what is left of the 421
    Reactor::TimerId timer;
  };
  using Place = std::list<Farewell>::iterator;

  // write_some - the handshake runs inside the first writes; the end comes after the 421
  void write_some(Place place) {
    Transport::Result r = place->transport->write_some(place->unsent);
    if (r.status == Transport::Status::Ok) place->unsent.erase(0, r.bytes);
    if (r.status == Transport::Status::WouldBlock)
      return reactor_.set_events(place->transport->socket(),
                                 place->transport->poll_events(POLLOUT));
    if (r.status != Transport::Status::Ok || place->unsent.empty()) end(place);
  }

  // end - no more events; the farewell goes after the current callbacks (one of its own may
  // be running)
  void end(Place place) {
    reactor_.cancel_timer(std::exchange(place->timer, 0));
    reactor_.unwatch(place->transport->socket());
    reactor_.defer([this, place] { farewells_.erase(place); });
  }

  Reactor& reactor_;
  TransportWrapper wrap_in_tls_;  // --tls-implicit only; empty: the 421 goes in plain text
  std::list<Farewell> farewells_;
};

// Acceptor - the listeners, each one more watched socket. A client that arrives becomes a
// non-blocking socket with TCP_NODELAY, handed to on_client. Out of descriptors, the
// listeners rest for kAcceptPauseMs instead of spinning, and the failure is logged once per
// episode rather than once per turn.
class Acceptor {
 public:
  using ClientHandler = std::function<void(socket_t s, const std::string& ip, unsigned port)>;
  using Count = std::function<std::size_t()>;

  Acceptor(Reactor& reactor, std::vector<socket_t> listeners, ClientHandler on_client,
           Count clients)
      : reactor_(reactor),
        listeners_(std::move(listeners)),
        on_client_(std::move(on_client)),
        clients_(std::move(clients)) {
    for (socket_t listener : listeners_)
      reactor_.watch(listener, POLLIN, [this, listener](short) { accept_clients(listener); });
  }
  ~Acceptor() {
    reactor_.cancel_timer(pause_timer_);
    for (socket_t listener : listeners_) close_socket(listener);
  }
  Acceptor(const Acceptor&) = delete;
  Acceptor& operator=(const Acceptor&) = delete;

  // close - no new clients from now on
  void close() {
    reactor_.cancel_timer(std::exchange(pause_timer_, 0));
    for (socket_t listener : listeners_) reactor_.release(listener, close_socket);
    listeners_.clear();
  }

 private:
  void accept_clients(socket_t listener) {
    for (int n = 0; n < kAcceptBurst; ++n) {
      struct sockaddr_storage addr {};
      socklen_t len = sizeof addr;
      socket_t s = accept(listener, reinterpret_cast<sockaddr*>(&addr), &len);
      if (s == kInvalidSocket) return accept_failed(last_socket_error());
      is_failing_ = false;
      set_close_on_exec(s);
      if (!set_nonblocking(s)) {
        close_socket(s);
        continue;
      }
      int on = 1;  // replies are small and the client waits for each one
      setsockopt(s, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&on), sizeof on);
      auto [ip, port] = numeric_address(reinterpret_cast<sockaddr*>(&addr), len);
      on_client_(s, ip, port);
    }
  }

  void accept_failed(int err) {
    if (would_block(err)) return;
    if (out_of_descriptors(err)) pause();
    if (!is_failing_)
      log_line("accept failed: " + socket_error_text(err) + " (" + std::to_string(clients_()) +
               " clients connected); retrying");
    is_failing_ = true;
  }

  void pause() {
    if (pause_timer_ != 0) return;
    for (socket_t listener : listeners_) reactor_.set_events(listener, 0);
    pause_timer_ = reactor_.start_timer(kAcceptPauseMs, [this] {
      pause_timer_ = 0;
      for (socket_t listener : listeners_) reactor_.set_events(listener, POLLIN);
    });
  }

  Reactor& reactor_;
  std::vector<socket_t> listeners_;  // empty once closed
  ClientHandler on_client_;
  Count clients_;                     // how many are connected, for the log
  Reactor::TimerId pause_timer_ = 0;  // out of descriptors: the listeners rest until it fires
  bool is_failing_ = false;
};

// Server - SMTP on the reactor: the Acceptor hands it each new client, which becomes a
// Connection with the channel settings as the mode shapes them and a session with the mode;
// the server counts them, and ends them all when the exit policy says so.
class Server {
 public:
  Server(std::vector<socket_t> listeners, const ServerOptions& options, ServerMode& mode)
      : channel_(channel_config(options, mode)),
        is_tls_implicit_(options.is_tls_implicit),
        mode_(mode),
        acceptor_(
            reactor_, std::move(listeners),
            [this](socket_t s, const std::string& ip, unsigned port) { on_accepted(s, ip, port); },
            [this] { return connections_.size(); }),
        exit_(reactor_, options, [this] { stop_accepting(); }),
        context_{reactor_,
                 exit_,
                 options.matcher,
                 channel_->fqdn,
                 options.command_timeout_ms,
                 options.wrap_in_tls,
                 options.debug},
        max_clients_(options.max_clients),
        turn_away_(reactor_, options.is_tls_implicit ? options.wrap_in_tls : TransportWrapper()) {
    mode_.start(reactor_);
  }
  ~Server() {
    mode_.stop();
    reactor_.run_deferred();  // ends of connections first: they hold places in connections_
    connections_.clear();
  }
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  // run - serve until a stop is requested or the exit policy says so, then give queued
  // replies a moment to leave; false when the loop itself failed, with the reason in error()
  bool run() {
    while (!exit_.is_due()) {
      bool is_stop_asked = g_stop_requested || exit_.is_deadline_passed();
      if (is_stop_asked && !exit_.is_shutting_down()) begin_shutdown();
      watch_outputs();
      if (!reactor_.turn(kPollWakeMs)) return false;
    }
    if (exit_.is_draining() || exit_.is_shutting_down()) close_remaining();
    flush_before_exit();
    return true;
  }

  const std::string& error() const { return reactor_.error(); }
  const ExitPolicy& exit_policy() const { return exit_; }

 private:
  // channel_for_client - the channel settings as the mode shapes them now (a relay's EHLO
  // follows what its upstream offers), shared while that stays the same
  std::shared_ptr<const ChannelConfig> channel_for_client() {
    ChannelConfig shaped = *channel_;
    mode_.shape(shaped);
    bool is_same = shaped_ && shaped.offer_8bitmime == shaped_->offer_8bitmime &&
                   shaped.enable_smtputf8 == shaped_->enable_smtputf8 &&
                   shaped.data_size_limit == shaped_->data_size_limit;
    if (!is_same) shaped_ = std::make_shared<const ChannelConfig>(std::move(shaped));
    return shaped_;
  }

  // channel_config - what every connection's channel shares: the options, the mode's wish
  // to decide MAIL and RCPT, the -d trace
  static std::shared_ptr<const ChannelConfig> channel_config(const ServerOptions& options,
                                                             const ServerMode& mode) {
    auto config = std::make_shared<ChannelConfig>(options.channel);
    config->ask_envelope = mode.asks_envelope();
    config->keep_data = mode.keeps_data() || !options.matcher.empty();  // --match reads it
    if (options.debug) config->trace = [](const std::string& line) { log_line(line); };
    return config;
  }

  // -- Accepting: the Acceptor hands over each new client --

  void on_accepted(socket_t s, const std::string& ip, unsigned port) {
    context_.trace("connection from " + format_endpoint(ip, port));
    if (is_full()) return turn_away(s, format_endpoint(ip, port));
    add_client(std::make_unique<SocketTransport>(s), ip);
  }

  // is_full, turn_away - --max-clients: a client over the limit hears 421 (TurnAway)
  bool is_full() const { return max_clients_ != 0 && connections_.size() >= max_clients_; }
  void turn_away(socket_t s, const std::string& who) {
    context_.trace(who + " turned away: " + std::to_string(connections_.size()) +
                   " clients connected");
    turn_away_.refuse(s, reply_closing(channel_->fqdn, kClosingTooMany) + "\r\n");
  }

  void add_client(std::unique_ptr<Transport> transport, const std::string& ip) {
    if (is_tls_implicit_) transport = context_.wrap_in_tls(std::move(transport));
    Connection& c = connections_.emplace_back(context_, std::move(transport), channel_for_client(),
                                              ip, mode_.open_session(reactor_, ip));
    exit_.on_clients(connections_.size());
    c.start([this, place = std::prev(connections_.end())] {
      reactor_.defer([this, place] {
        connections_.erase(place);
        exit_.on_clients(connections_.size());
      });
    });
  }

  // stop_accepting - the message limit is reached, or shutdown began: no new clients
  void stop_accepting() {
    if (!exit_.is_shutting_down())
      context_.trace("message limit reached (" + std::to_string(exit_.delivered()) +
                     "); no new clients, exiting when the open sessions end");
    acceptor_.close();
  }

  // watch_outputs - stdout and stderr are polled while text waits for their reader
  void watch_outputs() {
    for (OutputQueue* out : {&standard_output(), &standard_error()}) {
      if (!out->is_nonblocking()) continue;
      if (out->has_pending())
        reactor_.watch(out->fd(), POLLOUT, [out](short) { out->flush(); });
      else
        reactor_.unwatch(out->fd());
    }
  }

  // -- Ending --

  // begin_shutdown - SIGTERM/SIGINT: no new clients; idle sessions hear 421 now, those in
  // DATA or waiting for its verdict when they are done, or when the grace is over
  void begin_shutdown() {
    context_.trace("stopping: no new clients; open transactions get " +
                   seconds_text(kShutdownGraceMs) + " s to finish");
    exit_.begin_shutdown();
    for (Connection& c : connections_)
      if (!c.is_closed()) c.settle();
  }

  // close_remaining - after the message limit or the shutdown grace, a 421 to the sessions
  // that are still open; a message not finished is not kept, and was never answered 250
  void close_remaining() {
    std::string reply = reply_closing(channel_->fqdn, exit_.closing_reason());
    for (Connection& c : connections_) c.close_with(reply);
  }

  // flush_before_exit - give queued replies (a 250 already earned) a moment to leave
  void flush_before_exit() {
    for (int round = 0; round < kExitFlushRounds; ++round) {
      bool is_pending = false;
      for (Connection& c : connections_) is_pending = c.flush() || is_pending;
      if (!is_pending) break;
      sleep_ms(kExitFlushPauseMs);
    }
  }

  PollReactor reactor_;  // first: destroyed last, after everything that uses it
  std::shared_ptr<const ChannelConfig> channel_;
  std::shared_ptr<const ChannelConfig> shaped_;  // channel_ as the mode last shaped it
  bool is_tls_implicit_;                         // --tls-implicit: TLS from the first byte
  ServerMode& mode_;
  Acceptor acceptor_;
  ExitPolicy exit_;
  ConnectionContext context_;  // shared by every connection
  std::list<Connection> connections_;
  std::size_t max_clients_;  // --max-clients: 0 for no limit
  TurnAway turn_away_;       // the clients over max_clients_
};

// ==== 17. Command line ====
// smtpd.py's options and positional addresses. Each option is one OptionRow, which feeds
// cxxopts, --help and the parse into Settings; complete_settings then adds what the start
// needs, and nothing changes the Settings after. Errors are one line and exit status 2
// (kExitUsage); ExitStatus lists every status the program ends with.
//   ModeKind, Settings, OptionArgument, OptionRow, CommandLine (ExitStatus is in section 11);
//   parse_endpoint, parse_mode, parse_size, parse_seconds, parse_count, parse_path,
//   load_auth_users, parse_refusal, parse_match, parse_reject_seed (one value each);
//   option_rows (checks: check_local_delivery, check_mailman, set_mailman_home), build_options,
//   help_text, apply_options, finish_tls, parse_command_line;
//   complete_settings (resolve_upstreams, configure_tls, seed_refusals), make_mode, PortFile,
//   serve; print_now, wait_for_mail (--wait); run_smtpd (the start, in order)

enum class ModeKind { Sink, Debugging, PureProxy, MailmanProxy };

// Settings - everything the command line decides, each value in the struct of the part that
// uses it (one name, one path): the loop and the channel, the upstream, the --exec hook.
// parse_command_line fills it from the options; complete_settings adds what the start needs
// (our name, resolved upstreams, the TLS context, seeded refusals); nothing changes it after.
struct Settings {
  bool setuid = true;
  ModeKind mode = ModeKind::Debugging;
  Endpoint local;
  Endpoint remote;
  ServerOptions server;       // -d, -s, -u, --max-recipients, --max-messages, --match, --idle-exit,
                              // --timeout, --max-clients
  UpstreamSettings upstream;  // --connect-timeout, --reply-timeout; complete_settings resolves it
  DeliveringServer::Hook exec;               // --exec, --exec-timeout
  std::string maildir;                       // --maildir: empty for none
  std::string mbox;                          // --mbox: empty for none
  bool json = false;                         // --json
  std::string port_file;                     // --port-file: empty for none
  bool background = false;                   // --background
  std::string wait_dir;                      // --wait: the Maildir to wait on; empty: serve
  bool new_only = false;                     // --new-only
  std::vector<Refusals::Rule> refusals;      // --reject, in the order given
  std::optional<std::uint64_t> reject_seed;  // --reject-seed, or the one seed_refusals drew
  std::string tls_cert, tls_key;             // --tls-cert, --tls-key: empty for self-signed
  Endpoint mailman_lmtp;                     // --mailman-lmtp: Mailman 3's LMTP runner
  std::string mailman_home;        // --mailman-home: Mailman 2's prefix; empty for Mailman 3
  UpstreamSettings lmtp_upstream;  // complete_settings: mailman_lmtp resolved, for Mailman 3
};

// UsageError - a bad command line: one line on stderr, exit status 2 (kExitUsage). The text quotes
// what was typed, so its control characters are escaped as -d traces escape them: a CR or LF in an
// argument cannot start a line of its own.
class UsageError : public std::runtime_error {
 public:
  explicit UsageError(const std::string& what) : std::runtime_error(printable(what)) {}
};

// parse_endpoint - "host:port" or "[v6]:port"; port 0 asks the kernel for a free port
// differs from smtpd.py: IPv6 addresses are accepted in brackets, and a missing host is an
// error rather than an address Python would hand to getaddrinfo as ''.
inline Endpoint parse_endpoint(const std::string& spec, const char* which) {
  Endpoint e;
  std::string port_text;
  auto bad = [&](const std::string& why) {
    return UsageError("bad " + std::string(which) + " address '" + spec + "': " + why);
  };
  if (!spec.empty() && spec[0] == '[') {
    std::size_t close = spec.find(']');
    if (close == std::string::npos || close + 1 >= spec.size() || spec[close + 1] != ':')
      throw bad("expected [ADDRESS]:PORT");
    e.host = spec.substr(1, close - 1);
    port_text = spec.substr(close + 2);
  } else {
    std::size_t colon = spec.find(':');
    if (colon == std::string::npos) throw bad("expected HOST:PORT");
    if (spec.find(':', colon + 1) != std::string::npos)
      throw bad("write an IPv6 address in brackets, as [::1]:PORT");
    e.host = spec.substr(0, colon);
    port_text = spec.substr(colon + 1);
  }
  if (e.host.empty()) throw bad("missing host (use 0.0.0.0 or [::] for every address)");
  if (!is_decimal(port_text) || port_text.size() > 5 || std::stoul(port_text) > 65535)
    throw bad("port must be a number from 0 to 65535");
  e.port = static_cast<std::uint16_t>(std::stoul(port_text));
  return e;
}

// parse_mode - smtpd.py class names (with or without "smtpd."), or our short names
inline ModeKind parse_mode(std::string name) {
  if (name.rfind("smtpd.", 0) == 0) name = name.substr(6);
  struct Row {
    const char* python_name;
    const char* short_name;
    ModeKind kind;
  };
  static const Row rows[] = {
      {"SMTPServer", "sink", ModeKind::Sink},
      {"DebuggingServer", "debug", ModeKind::Debugging},
      {"PureProxy", "proxy", ModeKind::PureProxy},
      {"MailmanProxy", "mailman", ModeKind::MailmanProxy},
  };
  for (const Row& row : rows)
    if (name == row.python_name || name == row.short_name) return row.kind;
  throw UsageError("unknown class '" + name +
                   "': use SMTPServer, DebuggingServer, PureProxy or MailmanProxy");
}

inline const char* mode_name(ModeKind kind) {
  switch (kind) {
    case ModeKind::Sink: return "SMTPServer";
    case ModeKind::Debugging: return "DebuggingServer";
    case ModeKind::PureProxy: return "PureProxy";
    case ModeKind::MailmanProxy: return "MailmanProxy";
  }
  return "?";
}

// parse_size - a whole number of bytes, 0 for no limit
inline std::uint64_t parse_size(const std::string& text) {
  if (!is_decimal(text) || text.size() > 18) throw UsageError("invalid size: " + text);
  return std::stoull(text);
}

// parse_seconds - a positive number of seconds (fractions allowed) as milliseconds
inline long long parse_seconds(const std::string& text, const std::string& option) {
  std::size_t dot = text.find('.');
  bool is_number = is_decimal(text.substr(0, dot)) &&
                   (dot == std::string::npos || is_decimal(text.substr(dot + 1)));
  double seconds = is_number ? std::strtod(text.c_str(), nullptr) : 0;
  if (!is_number || !(seconds > 0) || seconds > 86400)
    throw UsageError("invalid " + option + ": " + text +
                     " (expected seconds, more than 0 and at most 86400)");
  return std::max(1LL, static_cast<long long>(seconds * 1000));
}

// parse_count - a whole number for --max-messages, --max-recipients, --max-clients or
// --idle-exit; nine digits at most, so seconds still fit in milliseconds
inline std::uint64_t parse_count(const std::string& text, const std::string& option) {
  if (!is_decimal(text) || text.size() > 9)
    throw UsageError("invalid " + option + ": '" + text + "' (expected a whole number)");
  return std::stoull(text);
}

// parse_path - the argument of --maildir, --mbox, --auth-file and the like: not empty
inline std::string parse_path(const std::string& path, const std::string& option) {
  if (path.empty()) throw UsageError(option + " needs a path");
  return path;
}

// split_python_lines - bytes.splitlines(): ends at "\n", "\r" or "\r\n", no empty tail
inline std::vector<std::string_view> split_python_lines(std::string_view data) {
  std::vector<std::string_view> lines;
  std::size_t start = 0;
  while (start < data.size()) {
    std::size_t end = data.find_first_of("\r\n", start);
    if (end == std::string_view::npos) {
      lines.push_back(data.substr(start));
      break;
    }
    lines.push_back(data.substr(start, end - start));
    start = end + ((data[end] == '\r' && end + 1 < data.size() && data[end + 1] == '\n') ? 2 : 1);
  }
  return lines;
}

// parse_auth_users - the lines "user:password" of an --auth-file (the password is all after
// the first ':'); empty lines and lines starting with '#' are skipped
inline AuthUsers parse_auth_users(const std::string& text, const std::string& path) {
  AuthUsers users;
  std::size_t number = 0;
  for (std::string_view line : split_python_lines(text)) {
    ++number;
    if (line.empty() || line[0] == '#') continue;
    std::size_t colon = line.find(':');
    if (colon == 0 || colon == std::string_view::npos)
      throw UsageError("--auth-file " + path + " line " + std::to_string(number) +
                       ": expected user:password");
    users[std::string(line.substr(0, colon))] = std::string(line.substr(colon + 1));
  }
  if (users.empty()) throw UsageError("--auth-file " + path + " holds no user:password line");
  return users;
}

// load_auth_users - read and parse an --auth-file, at start (before privileges are dropped)
inline std::shared_ptr<const AuthUsers> load_auth_users(const std::string& path) {
  std::string text, error;
  if (!read_whole_file(path, text, error)) throw UsageError(error + " (--auth-file)");
  return std::make_shared<const AuthUsers>(parse_auth_users(text, path));
}

// is_refusal_reply - "4xx text" or "5xx text" (or the bare code), printable ASCII, one line
inline bool is_refusal_reply(const std::string& reply) {
  bool is_code = reply_code(reply) >= 400 && (reply.size() == 3 || reply[3] == ' ');
  return is_code && reply.size() <= kReplyLineLimit &&
         std::all_of(reply.begin(), reply.end(), [](char c) { return c >= 0x20 && c < 0x7F; });
}

// parse_refusal - --reject STAGE:PATTERN=REPLY. The reply starts at the first '=' followed by
// a 4xx or 5xx code, so a pattern may hold '=' (as in SRS addresses).
inline Refusals::Rule parse_refusal(const std::string& spec) {
  auto bad = [&](const std::string& why) {
    return UsageError(
        "bad --reject '" + spec + "': " + why +
        " (expected STAGE:PATTERN=REPLY, as rcpt:*@bounce.test=550 5.1.1 no such user)");
  };
  static const std::pair<const char*, Refusals::Stage> kStages[] = {
      {"connect", Refusals::Stage::Connect},
      {"helo", Refusals::Stage::Helo},
      {"mail", Refusals::Stage::Mail},
      {"rcpt", Refusals::Stage::Rcpt},
      {"data", Refusals::Stage::Data}};
  std::size_t colon = spec.find(':');
  std::string stage = colon == std::string::npos ? spec : spec.substr(0, colon);
  auto found = std::find_if(std::begin(kStages), std::end(kStages),
                            [&](const auto& row) { return stage == row.first; });
  if (found == std::end(kStages)) throw bad("STAGE must be connect, helo, mail, rcpt or data");
  std::size_t equals = colon;
  do {
    equals = spec.find('=', equals + 1);
  } while (equals != std::string::npos && !is_refusal_reply(spec.substr(equals + 1)));
  if (equals == std::string::npos)
    throw bad("REPLY must be a 4xx or 5xx code and printable text of at most " +
              std::to_string(kReplyLineLimit) + " bytes");
  Refusals::Rule rule{found->second, spec.substr(colon + 1, equals - colon - 1), -1,
                      spec.substr(equals + 1)};
  if (rule.pattern.empty()) throw bad("PATTERN is empty (use * for every one)");
  std::string number = rule.pattern.substr(0, rule.pattern.size() - 1);
  std::size_t dot = number.find('.');
  bool is_percent = rule.pattern.back() == '%' && is_decimal(number.substr(0, dot)) &&
                    (dot == std::string::npos || is_decimal(number.substr(dot + 1)));
  if (is_percent) rule.percent = std::strtod(number.c_str(), nullptr);
  if (is_percent && rule.percent > 100) throw bad("a share of the time is at most 100%");
  return rule;
}

// parse_match - --match FIELD=PATTERN, FIELD one of from, rcpt, subject, header:NAME, text;
// the pattern is all after the first '=', so it may hold '=' itself
inline MatchRule parse_match(const std::string& spec) {
  auto bad = [&](const std::string& why) {
    return UsageError("bad --match '" + spec + "': " + why +
                      " (expected FIELD=PATTERN, as rcpt=*@example.com or subject=*welcome*)");
  };
  static const std::pair<const char*, MatchField> kFields[] = {{"from", MatchField::From},
                                                               {"rcpt", MatchField::Rcpt},
                                                               {"subject", MatchField::Subject},
                                                               {"text", MatchField::Text}};
  std::size_t equals = spec.find('=');
  if (equals == std::string::npos) throw bad("no '='");
  std::string field = spec.substr(0, equals);
  MatchRule rule{MatchField::Header, "", spec.substr(equals + 1)};
  auto found = std::find_if(std::begin(kFields), std::end(kFields),
                            [&](const auto& row) { return field == row.first; });
  if (found != std::end(kFields)) {
    rule.field = found->second;
  } else if (field.rfind("header:", 0) == 0 && field.size() > 7 &&
             std::all_of(field.begin() + 7, field.end(),
                         [](char c) { return c > ' ' && c < 0x7F; })) {
    rule.header = field.substr(7);
  } else {
    throw bad("FIELD must be from, rcpt, subject, header:NAME or text");
  }
  if (rule.pattern.empty()) throw bad("PATTERN is empty (use * for any value)");
  return rule;
}

// OptionArgument - an option as given: its name as the user writes it ("--timeout") and its
// argument ("" for a flag)
struct OptionArgument {
  std::string option;
  std::string value;
};

// check_local_delivery - --maildir, --mbox, --json and --exec deliver here, so not in a relay
inline void check_local_delivery(const Settings& s) {
  if (s.mode == ModeKind::PureProxy || s.mode == ModeKind::MailmanProxy)
    throw UsageError(
        "--maildir, --mbox, --json and --exec work with SMTPServer and "
        "DebuggingServer, not with " +
        std::string(mode_name(s.mode)));
}

// local_output_path - the path of --maildir or --mbox, for a mode that delivers here
inline std::string local_output_path(const OptionArgument& given, const Settings& s) {
  std::string path = parse_path(given.value, given.option);
  check_local_delivery(s);
  return path;
}

// check_mailman - --mailman-lmtp and --mailman-home say which Mailman MailmanProxy asks
inline void check_mailman(const Settings& s) {
  if (s.mode != ModeKind::MailmanProxy)
    throw UsageError("--mailman-lmtp and --mailman-home work with MailmanProxy only");
}

// set_mailman_home - --mailman-home DIR: a Mailman 2 with its mail wrapper, instead of Mailman 3
inline void set_mailman_home(const std::string& dir, Settings& s) {
  s.mailman_home = parse_path(dir, "--mailman-home");
  check_mailman(s);
  if (!s.mailman_lmtp.host.empty())
    throw UsageError("use --mailman-lmtp (Mailman 3) or --mailman-home (Mailman 2), not both");
  if (!kCanRunCommands) throw UsageError("--mailman-home is not available on this system yet");
  while (s.mailman_home.size() > 1 && s.mailman_home.back() == '/') s.mailman_home.pop_back();
  if (!path_exists(s.mailman_home + "/mail/mailman"))
    throw UsageError("--mailman-home " + s.mailman_home + ": no mail wrapper " + s.mailman_home +
                     "/mail/mailman");
}

// parse_reject_seed - --reject-seed N: any whole number that fits in 64 bits
inline std::uint64_t parse_reject_seed(const std::string& seed) {
  if (!is_decimal(seed) || seed.size() > 19)
    throw UsageError("invalid --reject-seed: '" + seed + "' (expected a whole number)");
  return std::stoull(seed);
}

// finish_tls - what the --tls... options say together: STARTTLS unless --tls-implicit, and
// only in a build with TLS and with both of --tls-cert and --tls-key, or neither
inline void finish_tls(Settings& s) {
  ChannelConfig& channel = s.server.channel;
  channel.offer_starttls = channel.records_tls && !s.server.is_tls_implicit;
  if (channel.records_tls && !kHasTls)
    throw UsageError("this smtpd is built without TLS: rebuild it with make TLS=1 to use --tls");
  if (s.tls_cert.empty() != s.tls_key.empty())
    throw UsageError("--tls-cert and --tls-key go together");
}

// OptionRow - one option, declared once: its names and argument for cxxopts, its help text
// (which README.md and smtpd.1 repeat, as the tests check) and what it does to Settings
struct OptionRow {
  char short_name;         // 's' for -s, or 0 for none
  const char* long_name;   // "size" for --size
  const char* value_name;  // the argument in --help ("LIMIT"), or nullptr for a flag
  std::string help;
  void (*apply)(const OptionArgument& given, Settings& s);  // nullptr: --help and --version
  bool is_repeatable = false;  // applied once each time it is given, in order (--reject)
};

// option_rows - the option table, in the order --help lists them and the parse applies them.
// -c comes early, so the rows after it may check the mode.
inline const std::vector<OptionRow>& option_rows() {
  using Arg = const OptionArgument&;
  static const std::vector<OptionRow> rows = {
      // smtpd.py's own options
      {'n', "nosetuid", nullptr,
       "Do not change to user nobody after binding (only done when started as root).",
       [](Arg, Settings& s) { s.setuid = false; }},
      {'V', "version", nullptr, "Print the version and exit.", nullptr},
      {'c', "class", "CLASS",
       "Server mode: DebuggingServer (debug; the default), SMTPServer (sink), "
       "PureProxy (proxy) or MailmanProxy (mailman).",
       [](Arg a, Settings& s) { s.mode = parse_mode(a.value); }},
      {'s', "size", "LIMIT",
       "Largest message accepted, in bytes, announced with SIZE in EHLO; 0 means no "
       "limit (default " +
           std::to_string(kDataSizeDefault) + ").",
       [](Arg a, Settings& s) { s.server.channel.data_size_limit = parse_size(a.value); }},
      {'u', "smtputf8", nullptr, "Enable the SMTPUTF8 extension (RFC 6531).",
       [](Arg, Settings& s) { s.server.channel.enable_smtputf8 = true; }},
      // how long PureProxy and MailmanProxy wait for the servers they relay to
      {0, "connect-timeout", "SECONDS",
       "PureProxy: seconds to wait for the upstream server to accept the "
       "connection (default " +
           seconds_text(kConnectTimeoutMs) + "); MailmanProxy: the upstream and Mailman.",
       [](Arg a, Settings& s) {
         s.upstream.connect_timeout_ms = parse_seconds(a.value, a.option);
       }},
      {0, "reply-timeout", "SECONDS",
       "PureProxy: seconds to wait for each reply of the upstream server "
       "(default " +
           seconds_text(kReplyTimeoutMs) + "); MailmanProxy: of the upstream and of Mailman.",
       [](Arg a, Settings& s) { s.upstream.reply_timeout_ms = parse_seconds(a.value, a.option); }},
      // the trace on stderr, and where messages go besides the mode's print-out
      {'d', "debug", nullptr, "Trace the SMTP dialogue and connections on stderr.",
       [](Arg, Settings& s) { s.server.debug = true; }},
      {0, "maildir", "DIR",
       "Also deliver each message into the Maildir DIR (made with tmp, new and cur "
       "if missing), synced before the 250 reply.",
       [](Arg a, Settings& s) { s.maildir = local_output_path(a, s); }},
      {0, "mbox", "FILE",
       "Also append each message to FILE in mboxrd format, locked, synced before the "
       "250 reply.",
       [](Arg a, Settings& s) { s.mbox = local_output_path(a, s); }},
      {0, "json", nullptr,
       "Print each message as one line of JSON instead of the DebuggingServer layout; "
       "SMTPServer prints it too.",
       [](Arg, Settings& s) {
         s.json = true;
         check_local_delivery(s);
       }},
      // --exec and its time limit
      {0, "exec", "COMMAND",
       "Run COMMAND with sh -c for each message, the message on its standard input and "
       "the envelope in SMTPD_* variables; exit 0 accepts (or its first output line "
       "is the reply), anything else gives 451.",
       [](Arg a, Settings& s) {
         check_local_delivery(s);
         s.exec.command = a.value;
         if (s.exec.command.empty()) throw UsageError("--exec needs a command");
         if (!kCanRunCommands) throw UsageError("--exec is not available on this system yet");
       }},
      {0, "exec-timeout", "SECONDS",
       "Seconds the --exec command (or Mailman 2's mail wrapper) may run before "
       "it is killed and the client gets 451 (default " +
           seconds_text(kExecTimeoutMs) + ").",
       [](Arg a, Settings& s) { s.exec.timeout_ms = parse_seconds(a.value, a.option); }},
      // counts and timeouts for clients, messages and the whole run
      {0, "max-messages", "N",
       "Exit with status 0 once N messages are delivered and the open "
       "sessions have ended (after at most " +
           seconds_text(kDrainGraceMs) + " s more); 0 means no limit (the default).",
       [](Arg a, Settings& s) { s.server.max_messages = parse_count(a.value, a.option); }},
      {0, "match", "FIELD=PATTERN",
       "Count toward --max-messages, and print, only the messages whose FIELD (from, rcpt, "
       "subject, header:NAME or text) the shell-style PATTERN matches, case-insensitively; "
       "repeatable, every rule must hold. Every message is still answered and stored.",
       [](Arg a, Settings& s) { s.server.matcher.add(parse_match(a.value)); }, true},
      {0, "deadline", "SECONDS",
       "Exit with status 3 after SECONDS unless --max-messages matching messages came first "
       "(status 0), saying on stderr how many came; open sessions hear 421 first, as at "
       "SIGTERM.",
       [](Arg a, Settings& s) { s.server.deadline_ms = parse_seconds(a.value, a.option); }},
      {0, "expect-none", nullptr,
       "With --deadline, expect no matching message: one that comes is answered and printed, "
       "and smtpd exits with status 1 once the open sessions end, naming it on stderr; none "
       "by the deadline is status 0.",
       [](Arg, Settings& s) { s.server.expect_none = true; }},
      {0, "max-clients", "N",
       "Most clients connected at once; one more hears 421 and is closed; 0 means no "
       "limit (the default).",
       [](Arg a, Settings& s) { s.server.max_clients = parse_count(a.value, a.option); }},
      {0, "timeout", "SECONDS",
       "Seconds a client has for each command, and in DATA between two reads, before it "
       "hears 421 and is closed (default " +
           std::to_string(kCommandTimeoutMs / 1000) + "); the whole message gets " +
           std::to_string(kDataDeadlineFactor) + " times as long.",
       [](Arg a, Settings& s) { s.server.command_timeout_ms = parse_seconds(a.value, a.option); }},
      {0, "max-recipients", "N",
       "Most recipients in one message; further RCPT commands get 452 (default " +
           std::to_string(kMaxRecipientsDefault) + "); 0 means no limit.",
       [](Arg a, Settings& s) {
         s.server.channel.max_recipients = parse_count(a.value, a.option);
       }},
      {0, "idle-exit", "SECONDS",
       "Exit with status 0 when no client has been connected for SECONDS; 0 means "
       "never (the default).",
       [](Arg a, Settings& s) {
         s.server.idle_exit_ms = 1000 * static_cast<long long>(parse_count(a.value, a.option));
       }},
      // smtpd --wait: a query on the Maildir of a server already running
      {0, "wait", "DIR",
       "Do not serve: wait until --max-messages (default 1) messages in the Maildir DIR "
       "meet the --match rules, print them as the server would and exit 0; --deadline and "
       "--expect-none work as for the server.",
       [](Arg a, Settings& s) { s.wait_dir = parse_path(a.value, a.option); }},
      {0, "new-only", nullptr, "With --wait, count only the messages that arrive after it started.",
       [](Arg, Settings& s) { s.new_only = true; }},
      // starting from a script: where it listens, and not in the foreground
      {0, "port-file", "FILE",
       "Once every address listens, write the port (the first address's) and a newline to "
       "FILE, atomically; it is removed at exit.",
       [](Arg a, Settings& s) { s.port_file = parse_path(a.value, a.option); }},
      {0, "background", nullptr,
       "Once listening, go on in the background and print SMTPD_PORT=N and SMTPD_PID=N on "
       "stdout for eval; a stdout or stderr on a pipe goes to /dev/null (POSIX only).",
       [](Arg, Settings& s) {
         if (!kCanDetach) throw UsageError("--background is not available on this system");
         s.background = true;
       }},
      // the opt-in ESMTP extensions AUTH and PIPELINING
      {0, "auth", nullptr,
       "Offer AUTH PLAIN and LOGIN (RFC 4954) and accept any user name and password; "
       "the user name is recorded with each message.",
       [](Arg, Settings& s) { s.server.channel.offer_auth = true; }},
      {0, "auth-file", "FILE",
       "Offer AUTH as --auth does, but accept only the user:password lines of FILE; "
       "other logins get 535 5.7.8.",
       [](Arg a, Settings& s) {
         s.server.channel.offer_auth = true;
         s.server.channel.auth_users = load_auth_users(parse_path(a.value, a.option));
       }},
      {0, "auth-required", nullptr,
       "Answer MAIL with 530 5.7.0 until the client has logged in with AUTH (offers AUTH "
       "as --auth does unless --auth-file is given).",
       [](Arg, Settings& s) {
         s.server.channel.auth_required = s.server.channel.offer_auth = true;
       }},
      {0, "pipelining", nullptr,
       "Announce PIPELINING (RFC 2920) in EHLO; the replies to a group of pipelined "
       "commands go out together.",
       [](Arg, Settings& s) { s.server.channel.offer_pipelining = true; }},
      {0, "enhanced-status-codes", nullptr,
       "Announce ENHANCEDSTATUSCODES (RFC 2034) in EHLO and put the RFC 3463 code after the "
       "reply code of every reply but those to EHLO and HELO, as 250 2.1.5 OK.",
       [](Arg, Settings& s) { s.server.channel.enhanced_status_codes = true; }},
      {0, "chunking", nullptr,
       "Announce CHUNKING (RFC 3030) in EHLO and accept BDAT: the message in chunks of a "
       "stated size, without dot-stuffing, as well as with DATA.",
       [](Arg, Settings& s) { s.server.channel.offer_chunking = true; }},
      // refusals on purpose, for testing clients
      {0, "reject", "STAGE:PATTERN=REPLY",
       "Answer REPLY (4xx or 5xx) at STAGE (connect, helo, mail, rcpt or data) when the "
       "shell-style PATTERN matches the client IP, HELO name, sender or a recipient, or N% "
       "of the time when PATTERN is N%; repeatable, the first match wins.",
       [](Arg a, Settings& s) { s.refusals.push_back(parse_refusal(a.value)); }, true},
      {0, "reject-seed", "N",
       "Seed for the N% rules of --reject, so a run refuses the same commands again "
       "(default: a new seed at each start).",
       [](Arg a, Settings& s) { s.reject_seed = parse_reject_seed(a.value); }},
      // which Mailman MailmanProxy asks
      {0, "mailman-lmtp", "HOST:PORT",
       "MailmanProxy: the LMTP runner of Mailman 3, asked at each RCPT whether the "
       "address is a list's (default 127.0.0.1:8024).",
       [](Arg a, Settings& s) {
         check_mailman(s);
         s.mailman_lmtp = parse_endpoint(a.value, "Mailman LMTP");
       }},
      {0, "mailman-home", "DIR",
       "MailmanProxy: use the Mailman 2 installed in DIR instead (its lists/ and "
       "mail/mailman wrapper).",
       [](Arg a, Settings& s) { set_mailman_home(a.value, s); }},
      // STARTTLS and SMTPS; finish_tls checks them together
      {0, "tls", nullptr,
       "Offer STARTTLS (RFC 3207) with a throwaway self-signed certificate made at start, "
       "unless --tls-cert and --tls-key are given (TLS needs a build with make TLS=1).",
       [](Arg, Settings& s) { s.server.channel.records_tls = true; }},
      {0, "tls-cert", "FILE",
       "Offer STARTTLS with the PEM certificate (chain) in FILE; needs --tls-key.",
       [](Arg a, Settings& s) {
         s.tls_cert = parse_path(a.value, a.option);
         s.server.channel.records_tls = true;
       }},
      {0, "tls-key", "FILE", "The PEM private key for --tls-cert.",
       [](Arg a, Settings& s) {
         s.tls_key = parse_path(a.value, a.option);
         s.server.channel.records_tls = true;
       }},
      {0, "tls-implicit", nullptr,
       "Serve SMTPS instead: TLS from the first byte, as on port 465 (implies --tls).",
       [](Arg, Settings& s) { s.server.is_tls_implicit = s.server.channel.records_tls = true; }},
      {0, "tls-required", nullptr,
       "Answer MAIL and AUTH with 530 5.7.0 until the client has started TLS (implies --tls).",
       [](Arg, Settings& s) {
         s.server.channel.tls_required = s.server.channel.records_tls = true;
       }},
      {'h', "help", nullptr, "Print this help and exit.", nullptr},
  };
  return rows;
}

// build_options - the cxxopts table: every row, in one unnamed group (a named group would put
// a heading into --help), then the positional addresses
inline cxxopts::Options build_options() {
  cxxopts::Options options(
      "smtpd", std::string(kVersion) + " - an SMTP server for tests, debugging and relaying");
  options.custom_help("[options]");
  options.positional_help("[localhost:localport [remotehost:remoteport]]");
  cxxopts::OptionAdder add = options.add_options();
  for (const OptionRow& row : option_rows()) {
    std::string names = row.long_name;
    if (row.short_name != 0) names = std::string(1, row.short_name) + "," + names;
    if (row.value_name == nullptr)
      add(names, row.help);
    else
      add(names, row.help, cxxopts::value<std::string>(), row.value_name);
  }
  add("addresses", "", cxxopts::value<std::vector<std::string>>());
  options.parse_positional({"addresses"});
  return options;
}

inline std::string help_text(cxxopts::Options& options) {
  return options.help() + "\nDefaults: " + kDefaultLocal + " to listen on, " + kDefaultRemote +
         " as the upstream.\n"
         "Addresses are HOST:PORT or [IPV6]:PORT; port 0 picks a free port, shown on stderr\n"
         "as 'listening on HOST:PORT'. See man smtpd for modes, outputs and exit statuses.\n";
}

// apply_options - each given option's row on s, in table order (the last value of an option
// given twice, except a repeatable one, which is applied for each value in turn)
inline void apply_options(const cxxopts::ParseResult& result, Settings& s) {
  for (const OptionRow& row : option_rows()) {
    if (row.apply == nullptr || result.count(row.long_name) == 0) continue;
    std::string option = std::string("--") + row.long_name;
    if (row.value_name == nullptr) {
      row.apply({option, ""}, s);
    } else if (!row.is_repeatable) {
      row.apply({option, result[row.long_name].as<std::string>()}, s);
    } else {
      for (const cxxopts::KeyValue& argument : result.arguments())
        if (argument.key() == row.long_name) row.apply({option, argument.value()}, s);
    }
  }
}

struct CommandLine {
  std::optional<Settings> settings;  // empty when --help or --version was answered
  std::string text_for_stdout;       // the help or version text
};

// parse_command_line - argv to Settings; throws UsageError with a one-line reason
inline CommandLine parse_command_line(int argc, const char* const* argv) {
  cxxopts::Options options = build_options();
  cxxopts::ParseResult result;
  try {
    result = options.parse(argc, argv);
  } catch (const std::exception& e) {
    // cxxopts quotes names with U+2018/U+2019; a one-line error should be plain ASCII
    std::string text = e.what();
    for (const char* quote : {"\xe2\x80\x98", "\xe2\x80\x99"})
      for (std::size_t at; (at = text.find(quote)) != std::string::npos;) text.replace(at, 3, "'");
    throw UsageError(text);
  }
  if (result.count("help")) return {std::nullopt, help_text(options)};
  if (result.count("version")) return {std::nullopt, std::string(kVersion) + "\n"};
  Settings s;
  apply_options(result, s);
  finish_tls(s);
  if (s.server.expect_none && s.server.deadline_ms == 0)
    throw UsageError("--expect-none needs --deadline: the time after which no mail is success");
  if (s.mailman_lmtp.host.empty())  // no --mailman-lmtp: parse_endpoint never leaves it empty
    s.mailman_lmtp = parse_endpoint(kDefaultMailmanLmtp, "Mailman LMTP");
  std::vector<std::string> addresses;
  if (result.count("addresses")) addresses = result["addresses"].as<std::vector<std::string>>();
  if (addresses.size() > 2) {
    std::string all;
    for (const std::string& a : addresses) all += (all.empty() ? "" : ", ") + a;
    throw UsageError("invalid arguments: " + all + " (expected at most LOCAL and REMOTE)");
  }
  s.local = parse_endpoint(addresses.size() > 0 ? addresses[0] : kDefaultLocal, "local");
  s.remote = parse_endpoint(addresses.size() > 1 ? addresses[1] : kDefaultRemote, "remote");
  return {s, ""};
}

// resolved - an upstream's addresses, resolved once at start so the loop never waits for a
// name lookup; throws StartError when the name does not resolve
inline UpstreamSettings resolved(UpstreamSettings upstream, const Endpoint& where) {
  upstream.name = format_endpoint(where.host, where.port);
  std::string error;
  upstream.addresses = resolve_endpoint(where, error);
  if (upstream.addresses.empty())
    throw StartError("cannot resolve the " + upstream.role + " " + where.host + ": " + error);
  return upstream;
}

// resolve_upstreams - a relay's upstream, and MailmanProxy's LMTP runner of Mailman 3, as the
// loop uses them: resolved, named, traced with -d
inline void resolve_upstreams(Settings& s) {
  if (s.mode != ModeKind::PureProxy && s.mode != ModeKind::MailmanProxy) return;
  s.upstream.fqdn = s.server.channel.fqdn;
  if (s.server.debug) s.upstream.trace = [](const std::string& line) { log_line(line); };
  s.upstream = resolved(s.upstream, s.remote);
  if (s.mode != ModeKind::MailmanProxy || !s.mailman_home.empty()) return;
  UpstreamSettings lmtp = s.upstream;
  lmtp.role = "Mailman LMTP server";
  lmtp.tag = "mailman";
  s.lmtp_upstream = resolved(lmtp, s.mailman_lmtp);
}

// configure_tls - the TLS context for --tls...: from the files, or self-signed for our name
inline void configure_tls([[maybe_unused]] Settings& s) {
#ifdef SMTPD_TLS
  if (!s.server.channel.records_tls) return;
  try {
    auto context = s.tls_cert.empty() ? TlsContext::self_signed(s.server.channel.fqdn)
                                      : TlsContext::from_files(s.tls_cert, s.tls_key);
    s.server.wrap_in_tls = tls_wrapper(std::move(context));
  } catch (const std::runtime_error& e) {
    throw UsageError(e.what());
  }
#endif
}

// seed_refusals - the --reject rules with their random source. Without --reject-seed the
// seed comes from the system's random source and the clock, and is kept in reject_seed, so
// -d can print it and a run worth repeating can be.
inline void seed_refusals(Settings& s) {
  if (s.refusals.empty()) return;
  if (!s.reject_seed)
    s.reject_seed = (static_cast<std::uint64_t>(std::random_device{}()) << 32) ^
                    static_cast<std::uint64_t>(unix_time_us());
  s.server.channel.refusals = std::make_shared<Refusals>(s.refusals, *s.reject_seed);
}

// complete_settings - the parsed Settings with what the start needs besides: our name, the
// upstreams resolved (StartError if one does not resolve), the TLS context (UsageError if its
// files will not do), the --reject rules seeded. Nothing changes the Settings after this.
inline Settings complete_settings(Settings s) {
  s.server.channel.fqdn = getfqdn();
  resolve_upstreams(s);
  configure_tls(s);
  seed_refusals(s);
  return s;
}

// make_stores - the --maildir and --mbox outputs, in that order
inline MessageOutputs make_stores(const Settings& s) {
  MessageOutputs stores;
  if (!s.maildir.empty()) stores.push_back(std::make_unique<MaildirStore>(s.maildir));
  if (!s.mbox.empty()) stores.push_back(std::make_unique<MboxStore>(s.mbox));
  return stores;
}

// make_mode - the ServerMode for complete Settings. The stores come before the printer, so a
// message on stdout is already in the files.
inline std::unique_ptr<ServerMode> make_mode(const Settings& s) {
  StreamPrinter::Format format = s.json ? format_json_message : debug_text;
  auto printer =
      std::make_unique<StreamPrinter>(standard_output(), format, s.server.command_timeout_ms);
  switch (s.mode) {  // no default: -Wswitch names a ModeKind left out
    case ModeKind::Sink: {
      MessageOutputs outputs = make_stores(s);
      if (!s.json) printer.reset();
      return std::make_unique<SinkServer>(std::move(outputs), s.exec, std::move(printer));
    }
    case ModeKind::PureProxy: return std::make_unique<PureProxy>(s.upstream);
    case ModeKind::MailmanProxy: {
      MailmanProxy::Options options;
      options.relay = s.upstream;
      options.lmtp = s.lmtp_upstream;
      options.home = s.mailman_home;
      options.wrapper_timeout_ms = s.exec.timeout_ms;
      options.our_name = s.server.channel.fqdn;
      return std::make_unique<MailmanProxy>(std::move(options));
    }
    case ModeKind::Debugging: break;
  }
  return std::make_unique<DebuggingServer>(std::move(printer), make_stores(s), s.exec);
}

// warn_if_open_relay - a relay reachable from other hosts relays for anyone who connects
inline void warn_if_open_relay(const Settings& s, const std::string& bound) {
  bool is_relay = s.mode == ModeKind::PureProxy || s.mode == ModeKind::MailmanProxy;
  if (!is_relay || is_loopback_host(s.local.host)) return;
  log_line("warning: " + std::string(mode_name(s.mode)) + " on " + bound +
           " relays mail from anyone who can connect: this can make an open relay");
}

// prepare_outputs - make the Maildir at start (so an empty one is there to look at), as the
// user we now run as; a failure is only logged: each message tries again, with 451 meanwhile
inline void prepare_outputs(const Settings& s) {
  std::string error;
  if (!s.maildir.empty() && !MaildirStore::make_maildir(s.maildir, error))
    log_line(error + "; messages get 451 until it can be made");
}

// mailman_text - where MailmanProxy finds Mailman, for the -d start line
inline std::string mailman_text(const Settings& s) {
  if (s.mode != ModeKind::MailmanProxy) return "";
  if (!s.mailman_home.empty()) return "; Mailman 2 in " + s.mailman_home;
  return "; Mailman 3 LMTP at " + format_endpoint(s.mailman_lmtp.host, s.mailman_lmtp.port);
}

// PortFile - --port-file: the port and a newline, written to a temporary file renamed into
// place (a reader never sees half of it), removed when this goes
class PortFile {
 public:
  PortFile() = default;
  ~PortFile() {
    if (!path_.empty()) remove_file(path_);
  }
  PortFile(const PortFile&) = delete;
  PortFile& operator=(const PortFile&) = delete;

  bool write(const std::string& path, unsigned port, std::string& error) {
    std::string tmp = path + ".tmp." + std::to_string(process_id());
    File file;
    bool is_written = file.create_new(tmp, error) &&
                      file.write_all(std::to_string(port) + "\n", error) && file.close(error) &&
                      rename_file(tmp, path, error);
    if (!is_written) remove_file(tmp);
    if (is_written) path_ = path;
    return is_written;
  }
  void forget() { path_.clear(); }  // another process owns the file now

 private:
  std::string path_;
};

// serve - from complete Settings: listen, drop privileges, serve until the end; the exit status
inline int serve(const Settings& settings) {
  std::unique_ptr<ServerMode> mode = make_mode(settings);
  install_stop_handlers();
  raise_descriptor_limit();
  binary_stdout();
  std::vector<Listener> listeners;
  try {
    listeners = open_listeners(settings.local);
  } catch (const StartError& e) {
    log_line(e.what());
    return kExitCannotListen;
  }
  if (settings.setuid && running_as_root()) {
    std::string error;
    if (!drop_privileges(error)) {
      for (const Listener& l : listeners) close_socket(l.socket);
      log_line(error);
      return kExitPrivileges;
    }
  }
  prepare_outputs(settings);
  PortFile port_file;
  std::string error;
  if (!settings.port_file.empty() &&
      !port_file.write(settings.port_file, listeners.front().port, error)) {
    for (const Listener& l : listeners) close_socket(l.socket);
    log_line(error);
    return kExitCannotListen;
  }
  if (settings.server.debug && settings.server.channel.refusals)
    log_line("--reject-seed " + std::to_string(*settings.reject_seed));
  // One "listening on" line, as scripts expect; the other addresses after it
  std::string bound = listeners.front().bound;
  std::fprintf(stderr, "listening on %s\n", bound.c_str());
  for (std::size_t i = 1; i < listeners.size(); ++i)
    std::fprintf(stderr, "also listening on %s\n", listeners[i].bound.c_str());
  std::fflush(stderr);
  if (settings.background) {
    long pid = detach(error);
    if (pid != 0) {  // the parent (or fork failed): the child owns the listeners and the file
      port_file.forget();
      if (pid < 0) log_line(error);
      if (pid > 0) std::printf("SMTPD_PORT=%u\nSMTPD_PID=%ld\n", listeners.front().port, pid);
      return pid > 0 ? kExitOk : kExitCannotListen;
    }
  }
  standard_output().make_nonblocking();  // from here on the loop never waits for a reader
  standard_error().make_nonblocking();
  warn_if_open_relay(settings, bound);
  if (settings.server.debug)
    log_line(std::string(mode_name(settings.mode)) + " started; remote address " +
             format_endpoint(settings.remote.host, settings.remote.port) + mailman_text(settings));
  std::vector<socket_t> sockets_to_watch;
  for (const Listener& l : listeners) sockets_to_watch.push_back(l.socket);
  Server server(std::move(sockets_to_watch), settings.server, *mode);
  bool is_ok = server.run();
  if (!is_ok) log_line(server.error());
  std::string outcome = server.exit_policy().outcome();  // --deadline, --expect-none
  if (!outcome.empty()) log_line(outcome);
  standard_output().drain(kOutputDrainMs);  // every print-out was written before its 250;
  standard_error().drain(kOutputDrainMs);   // this is what is left of the trace
  return is_ok ? server.exit_policy().exit_status() : kExitLoopFailed;
}

// print_now - a message on stdout at once, in the DebuggingServer layout or as --json
inline void print_now(const Envelope& envelope, bool json) {
  std::string text =
      json ? read_all(*format_json_message(envelope)) : format_debug_message(envelope);
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

// wait_for_mail - smtpd --wait DIR: look at the Maildir every kWaitPollMs until the
// Expectation is met (status 0), a message --expect-none forbids is found (1, at once: no
// session to wait for) or the deadline passes (3, or 0 under --expect-none). Each matching
// message is printed as it is found. A DIR not there yet is waited for like an empty one.
inline int wait_for_mail(const Settings& s) {
  const ServerOptions& o = s.server;
  Expectation expectation(o.max_messages == 0 ? 1 : o.max_messages, o.expect_none, o.deadline_ms);
  MaildirReader maildir(s.wait_dir);
  if (s.new_only) maildir.skip_present();
  auto start = std::chrono::steady_clock::now();
  binary_stdout();
  for (bool is_over = false; !is_over;) {
    for (const std::string& text : maildir.take_new()) {
      Envelope envelope = read_stored_message(text);
      envelope.is_matching = o.matcher.matches(envelope);
      if (envelope.is_matching) print_now(envelope, s.json);
      if ((is_over = expectation.on_message(envelope))) break;
    }
    long long waited = std::chrono::duration_cast<std::chrono::milliseconds>(
                           std::chrono::steady_clock::now() - start)
                           .count();
    if (is_over) break;
    if (o.deadline_ms > 0 && waited >= o.deadline_ms) {
      expectation.on_deadline();
      break;
    }
    long long pause = kWaitPollMs;
    if (o.deadline_ms > 0) pause = std::min(pause, o.deadline_ms - waited);
    sleep_ms(static_cast<int>(pause));
  }
  std::string outcome = expectation.outcome();
  if (!outcome.empty()) std::fprintf(stderr, "smtpd: %s\n", outcome.c_str());
  return expectation.exit_status();
}

// run_smtpd - the whole program: the command line, complete_settings, then serve (or
// wait_for_mail for --wait); returns the exit status
inline int run_smtpd(int argc, const char* const* argv) {
  open_standard_descriptors();  // first: before anything can make a socket or open a file
  [[maybe_unused]] SocketRuntime sockets;
  std::optional<Settings> settings;
  try {
    CommandLine cl = parse_command_line(argc, argv);
    if (!cl.settings) {
      std::fputs(cl.text_for_stdout.c_str(), stdout);
      return kExitOk;
    }
    if (!cl.settings->wait_dir.empty()) return wait_for_mail(*cl.settings);
    settings = complete_settings(std::move(*cl.settings));
  } catch (const UsageError& e) {
    log_line(e.what());
    return kExitUsage;
  } catch (const StartError& e) {
    log_line(e.what());
    return kExitCannotListen;
  }
  return serve(*settings);
}

// ==== 18. main ====

#ifndef SMTPD_NO_MAIN
int main(int argc, char** argv) { return run_smtpd(argc, argv); }
#endif
