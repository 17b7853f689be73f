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
//   3. Platform layer        (the only place that knows Winsock from BSD sockets)
//   4. Small utilities       (strings as Python sees them, logging)
//   5. Addresses             (the part of Python's email address parser that smtpd uses)
//   6. Replies               (every reply text, named)
//   7. SMTP channel          (the pure state machine: bytes in, replies and messages out)
//   8. Server modes          (SMTPServer sink, DebuggingServer printer)
//   9. Event loop            (listener, connections, poll)
//  10. Command line          (options, addresses, validation)
//  11. main                  (left out when SMTPD_NO_MAIN is defined, for the unit tests)

// ==== 1. Includes ====

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#ifdef _WIN32
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <winsock2.h>
#include <ws2tcpip.h>
#include <windows.h>
#include <direct.h>
#include <fcntl.h>
#include <io.h>
#include <process.h>
#include <sys/stat.h>
#else
#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>
#endif

#include <cxxopts.hpp>

// ==== 2. Limits and defaults ====
// Every tunable, with its unit and where the number comes from. Runtime options take their
// defaults from here, and their help texts name these values.

constexpr const char* kVersion = "smtpd 1.0.0";
constexpr std::size_t kCommandSizeLimit = 512;  // smtpd.py command_size_limit; RFC 5321 4.5.3.1.4
constexpr std::size_t kSizeParamExtra = 26;     // smtpd.py: MAIL may grow by 26 with SIZE (RFC 1870)
constexpr std::size_t kSmtpUtf8Extra = 10;      // smtpd.py: MAIL may grow by 10 with SMTPUTF8
constexpr std::size_t kLongestCommand = kCommandSizeLimit + kSizeParamExtra + kSmtpUtf8Extra;
constexpr std::uint64_t kDataSizeDefault = 33554432;  // smtpd.py DATA_SIZE_DEFAULT (32 MiB)
constexpr const char* kDefaultLocal = "localhost:8025";  // smtpd.py's default local address
constexpr const char* kDefaultRemote = "localhost:25";   // smtpd.py's default upstream
constexpr std::size_t kReadChunk = 64 * 1024;            // bytes read from a socket at once
constexpr std::size_t kInputBacklog = 256 * 1024;   // unprocessed input before we stop reading
constexpr std::size_t kOutputBacklog = 256 * 1024;  // unsent replies before we stop reading
constexpr int kListenBacklog = 128;  // smtpd.py uses 5; a burst of test clients needs more
constexpr int kAcceptBurst = 64;     // connections accepted per loop turn, so reads still run
constexpr int kPollWakeMs = 1000;    // longest poll() sleep; signals usually wake it sooner
constexpr int kAcceptPauseMs = 250;  // out of file descriptors: wait this long before accepting
constexpr int kDrainGraceMs = 5000;  // --max-messages: time open sessions get to finish; then 421
constexpr int kMboxLockWaitMs = 5000;  // --mbox: longest wait for another program's lock. The loop
                                       // has one thread, so a longer wait would stall every client;
                                       // past it the client gets 451 and retries.
constexpr int kLockRetryMs = 10;       // --mbox: pause between two attempts to take the lock
constexpr std::size_t kReasonLimit = 400;  // bytes of an error in a 451 reply; RFC 5321 4.5.3.1.5
                                           // allows 512 per reply line

// ==== 3. Platform layer ====
// Sockets, poll, signals and synced files differ between Windows and POSIX; the difference
// stops here. Nothing below this section spells closesocket, WSAGetLastError, errno for
// sockets, fsync, or _WIN32.
//   socket_t, kInvalidSocket, close_socket, poll_sockets, last_socket_error, would_block,
//   set_nonblocking, socket_error_text, SocketRuntime, install_stop_handlers, drop_privileges,
//   File, make_directory, rename_file, remove_file, sync_directory, process_id

#ifdef _WIN32
using socket_t = SOCKET;
using pollfd_t = WSAPOLLFD;
constexpr socket_t kInvalidSocket = INVALID_SOCKET;
constexpr int kSendFlags = 0;

// close_socket - release a socket handle
inline void close_socket(socket_t s) { closesocket(s); }

// poll_sockets - WSAPoll; with no sockets it fails on Windows, so sleep instead
inline int poll_sockets(pollfd_t* fds, std::size_t n, int timeout_ms) {
  if (n == 0) {
    Sleep(static_cast<DWORD>(timeout_ms));
    return 0;
  }
  return WSAPoll(fds, static_cast<ULONG>(n), timeout_ms);
}
inline int last_socket_error() { return WSAGetLastError(); }
inline bool would_block(int err) { return err == WSAEWOULDBLOCK || err == WSAEINTR; }
inline bool interrupted(int err) { return err == WSAEINTR; }
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
inline bool out_of_descriptors(int err) { return err == WSAEMFILE || err == WSAENOBUFS; }

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
  g_stop_requested = true;
  return TRUE;
}
// install_stop_handlers - Ctrl-C and console close end the loop cleanly
inline void install_stop_handlers() { SetConsoleCtrlHandler(on_console_event, TRUE); }
inline bool running_as_root() { return false; }
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
inline bool would_block(int err) { return err == EAGAIN || err == EWOULDBLOCK || err == EINTR; }
inline bool interrupted(int err) { return err == EINTR; }
inline bool set_nonblocking(socket_t s) {
  int flags = fcntl(s, F_GETFL, 0);
  return flags >= 0 && fcntl(s, F_SETFL, flags | O_NONBLOCK) == 0;
}
inline std::string socket_error_text(int err) { return std::strerror(err); }
inline bool address_in_use(int err) { return err == EADDRINUSE; }
inline bool out_of_descriptors(int err) {
  return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

struct SocketRuntime {};

std::atomic<bool> g_stop_requested{false};
extern "C" inline void on_stop_signal(int) { g_stop_requested = true; }

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

// Files, for the Maildir and mbox outputs: a message counts as kept only once it is on disk,
// so they need fsync, an atomic rename, a whole-file lock and a directory sync. File is a
// descriptor that closes itself; every call returns false with "what PATH: reason" in error.
//   File (create_new, open_append, write_all, sync, lock, size, truncate, close),
//   make_directory, rename_file, remove_file, sync_directory, process_id, kPathSeparators

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
    Sleep(kLockRetryMs);
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
    ::poll(nullptr, 0, kLockRetryMs);
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

inline bool File::create_new(const std::string& path, std::string& error) {
  return open(path, kCreateNewFlags, error);
}
inline bool File::open_append(const std::string& path, std::string& error) {
  return open(path, kAppendFlags, error);
}

// ==== 4. Small utilities ====
// Python's str methods as smtpd.py uses them (strip, split, upper, isalnum, isdigit), a UTF-8
// check, Python's repr of a str for the "mail options:" line, JSON strings, base64, the
// asctime date of mbox "From " lines, wall-clock time, and host-name lookup.

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

// printable - bytes made safe for a one-line log or error message
inline std::string printable(std::string_view s) {
  std::string out;
  for (char ch : s) {
    unsigned char c = static_cast<unsigned char>(ch);
    if (c < 0x20 || c == 0x7F) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += ch;
    }
  }
  return out;
}

// json_string - s as a JSON string (RFC 8259 section 7): quotes, backslashes and control
// characters escaped; bytes that are not UTF-8 become U+FFFD, so the output always parses
inline std::string json_string(std::string_view s) {
  std::string out = "\"";
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
  return out + "\"";
}

// json_list - a list of strings as a JSON array: ["a", "b"], spaced as Python's json.dumps
inline std::string json_list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (std::size_t i = 0; i < items.size(); ++i) out += (i > 0 ? ", " : "") + json_string(items[i]);
  return out + "]";
}

// base64_encode - RFC 4648 section 4, with padding and no line breaks
inline std::string base64_encode(std::string_view bytes) {
  static const char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  out.reserve((bytes.size() + 2) / 3 * 4);
  for (std::size_t i = 0; i < bytes.size(); i += 3) {
    std::size_t n = std::min<std::size_t>(3, bytes.size() - i);
    std::uint32_t group = 0;
    for (std::size_t k = 0; k < 3; ++k)
      group = (group << 8) | (k < n ? static_cast<unsigned char>(bytes[i + k]) : 0u);
    for (std::size_t k = 0; k < 4; ++k)
      out += k <= n ? kAlphabet[(group >> (18 - 6 * k)) & 0x3F] : '=';
  }
  return out;
}

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

// unix_time_us - microseconds since 1970 by the wall clock (for names and dates in files)
inline std::int64_t unix_time_us() {
  using namespace std::chrono;
  return duration_cast<microseconds>(system_clock::now().time_since_epoch()).count();
}

// host_name - gethostname(), "localhost" if it fails
inline std::string host_name() {
  char name[256] = {0};
  if (gethostname(name, sizeof name - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

// fully_qualified_hostname - socket.getfqdn() in spirit: the canonical name of this host
inline std::string fully_qualified_hostname() {
  std::string host = host_name();
  if (host.find('.') != std::string::npos) return host;
  struct addrinfo hints {};
  hints.ai_flags = AI_CANONNAME;
  hints.ai_family = AF_UNSPEC;
  struct addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &found) == 0 && found != nullptr) {
    if (found->ai_canonname != nullptr && std::strchr(found->ai_canonname, '.') != nullptr)
      host = found->ai_canonname;
    freeaddrinfo(found);
  }
  return host;
}

// log_line - one line on stderr, prefixed with the program name
inline void log_line(const std::string& text) {
  std::fprintf(stderr, "smtpd: %s\n", text.c_str());
  std::fflush(stderr);
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

  // parse_angle_or_spec - smtpd.py _getaddr on a non-empty argument
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
        bool only_spaces_follow = std::all_of(pieces.begin() + static_cast<long>(i), pieces.end(),
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
    bool needs = std::any_of(local.begin(), local.end(),
                             [](char c) { return c != '.' && is_atom_end(c); });
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
// Every reply the channel sends, as smtpd.py words it, so code and tests share one spelling.
// Replies that carry a value are built where they are sent.

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
constexpr const char* kReplyMailParams =
    "555 MAIL FROM parameters not recognized or not implemented";
constexpr const char* kReplyRcptParams =
    "555 RCPT TO parameters not recognized or not implemented";
constexpr const char* kReplyVrfyCannot =
    "252 Cannot VRFY user, but will accept message and attempt delivery";
constexpr const char* kReplyExpn = "502 EXPN not implemented";
constexpr const char* kMailParamsSyntax = " [SP <mail-parameters>]";
// Our own replies, for what smtpd.py never had to say:
constexpr const char* kReplyNotStored = "451 Error: could not store the message: ";  // + reason
constexpr const char* kClosingLimitReached = "closing: message limit reached";  // 421 <fqdn> ...

// ==== 7. SMTP channel ====
// The protocol of one client connection as a pure state machine: feed() takes the bytes the
// client sent, output() holds the replies to send, and a finished message waits in
// take_message() until the mode's verdict comes back through finish_message(). No sockets, no
// clock, no printing: tests and fuzzers drive it directly. State names follow smtpd.py's
// SMTPChannel (smtp_state, seen_greeting, mailfrom, rcpttos, received_data, fqdn, peer).
//   Channel::feed, output, consume_output, has_message, take_message, finish_message,
//   close_with, wants_input, is_closing; one cmd_* handler per verb, listed in kCommands.

struct ChannelConfig {
  std::string fqdn = "localhost";               // name in the greeting and in EHLO
  std::uint64_t data_size_limit = kDataSizeDefault;  // 0: no limit, no SIZE in EHLO
  bool enable_smtputf8 = false;                 // -u: announce and accept SMTPUTF8
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
};

class Channel {
 public:
  // The states are smtpd.py's COMMAND and DATA, plus two of ours: Waiting while the mode
  // decides on a finished message, Closing after QUIT once the reply is queued.
  enum class State { Command, Data, Waiting, Closing };

  Channel(ChannelConfig config, std::string peer);

  void feed(std::string_view bytes);
  const std::string& output() const { return output_; }
  void consume_output(std::size_t n) { output_.erase(0, n); }
  bool has_message() const { return smtp_state == State::Waiting; }
  Envelope take_message();
  void finish_message(const std::string& reply);
  void close_with(const std::string& reply);
  bool wants_input() const;
  bool is_closing() const { return smtp_state == State::Closing; }

  // Transaction state, public so tests can look at it as Python's tests do.
  State smtp_state = State::Command;
  std::string seen_greeting;              // HELO/EHLO argument; empty before the greeting
  bool extended_smtp = false;             // EHLO (rather than HELO) was the greeting
  std::string mailfrom;                   // empty: no MAIL yet (Python's None)
  std::vector<std::string> rcpttos;
  std::vector<std::string> mail_options;
  std::vector<std::string> rcpt_options;
  bool require_smtputf8 = false;
  std::string received_data;              // the message being received, unstuffed
  std::string received_lines;             // input bytes not yet processed as a whole line
  const std::string fqdn;
  const std::string peer;

  static const char* to_string(State state);

 private:
  using Arg = std::optional<std::string>;  // None when the verb had no space after it
  struct Command {
    const char* verb;
    void (Channel::*handler)(const Arg&);
    const char* syntax;  // HELP text; nullptr for verbs HELP does not list
  };
  static const Command kCommands[];

  void push(const std::string& reply);
  void enter_state(State to);
  void set_post_data_state();
  void set_rset_state();
  void process_input();
  bool process_command_bytes();
  bool process_data_bytes();
  void append_data(std::string_view bytes);
  void end_of_data();
  void handle_command_line(std::string_view line, std::size_t size);
  std::size_t command_size_limit(const std::string& verb) const;
  std::string syntax_error(const char* verb_syntax) const;
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
  void cmd_expn(const Arg& arg);

  ChannelConfig config_;
  std::string output_;
  std::size_t input_pos_ = 0;     // processed prefix of received_lines
  std::size_t dropped_bytes_ = 0;  // bytes of an overlong command line thrown away
  std::uint64_t data_bytes_ = 0;   // raw DATA bytes so far, counted as smtpd.py's num_bytes
  bool data_too_big_ = false;      // data_bytes_ already passed the limit: stop storing
  bool at_line_start_ = true;      // in DATA: the next byte begins a line
};

// kCommands - the protocol's index, in the order HELP lists the verbs
const Channel::Command Channel::kCommands[] = {
    {"EHLO", &Channel::cmd_ehlo, "EHLO hostname"},
    {"HELO", &Channel::cmd_helo, "HELO hostname"},
    {"MAIL", &Channel::cmd_mail, "MAIL FROM: <address>"},
    {"RCPT", &Channel::cmd_rcpt, "RCPT TO: <address>"},
    {"DATA", &Channel::cmd_data, "DATA"},
    {"RSET", &Channel::cmd_rset, "RSET"},
    {"NOOP", &Channel::cmd_noop, "NOOP"},
    {"QUIT", &Channel::cmd_quit, "QUIT"},
    {"VRFY", &Channel::cmd_vrfy, "VRFY <address>"},
    {"HELP", &Channel::cmd_help, nullptr},
    {"EXPN", &Channel::cmd_expn, nullptr},
};

Channel::Channel(ChannelConfig config, std::string peer_address)
    : fqdn(config.fqdn), peer(std::move(peer_address)), config_(std::move(config)) {
  push("220 " + fqdn + " " + kVersion);
}

const char* Channel::to_string(State state) {
  switch (state) {
    case State::Command: return "COMMAND";
    case State::Data: return "DATA";
    case State::Waiting: return "WAITING";
    case State::Closing: return "CLOSING";
  }
  return "?";
}

// push - queue one reply line
void Channel::push(const std::string& reply) {
  if (config_.trace) config_.trace(peer + " -> " + printable(reply));
  output_ += reply;
  output_ += "\r\n";
}

// enter_state - every state change goes through here, so -d can explain a session
void Channel::enter_state(State to) {
  if (config_.trace && to != smtp_state)
    config_.trace(peer + " state " + to_string(smtp_state) + " -> " + to_string(to));
  smtp_state = to;
}

// set_post_data_state - smtpd.py _set_post_data_state: back to commands, transaction cleared
void Channel::set_post_data_state() {
  enter_state(State::Command);
  mailfrom.clear();
  rcpttos.clear();
  rcpt_options.clear();
  require_smtputf8 = false;
  data_bytes_ = 0;
  data_too_big_ = false;
  at_line_start_ = true;
}

// set_rset_state - smtpd.py _set_rset_state: everything but the greeting
void Channel::set_rset_state() {
  set_post_data_state();
  received_data.clear();
}

// wants_input - false while the mode decides, after QUIT, or when the client is far ahead
bool Channel::wants_input() const {
  if (smtp_state == State::Waiting || smtp_state == State::Closing) return false;
  return received_lines.size() - input_pos_ < kInputBacklog && output_.size() < kOutputBacklog;
}

void Channel::feed(std::string_view bytes) {
  received_lines.append(bytes.data(), bytes.size());
  process_input();
}

// process_input - handle every whole line (or data bytes) received so far
void Channel::process_input() {
  bool progress = true;
  while (progress && input_pos_ < received_lines.size()) {
    if (smtp_state == State::Command)
      progress = process_command_bytes();
    else if (smtp_state == State::Data)
      progress = process_data_bytes();
    else
      progress = false;
  }
  received_lines.erase(0, input_pos_);
  input_pos_ = 0;
}

// process_command_bytes - one command line if a whole one is here; bound an overlong one
bool Channel::process_command_bytes() {
  std::size_t end = received_lines.find("\r\n", input_pos_);
  if (end == std::string::npos) {
    // Keep just enough to tell "too long" from "fine"; count the rest and drop it. The
    // last byte stays: it may be the CR of a CRLF split across two reads.
    std::size_t have = received_lines.size() - input_pos_;
    if (have > kLongestCommand + 2) {
      dropped_bytes_ += have - 1;
      input_pos_ = received_lines.size() - 1;
    }
    return false;
  }
  std::string_view line(received_lines.data() + input_pos_, end - input_pos_);
  std::size_t size = dropped_bytes_ + line.size();
  std::string copy(line);  // the handler may append to received_lines' neighbours
  input_pos_ = end + 2;
  dropped_bytes_ = 0;
  handle_command_line(copy, size);
  return true;
}

// process_data_bytes - message text: dot-unstuffing and end-of-data, one line at a time
// (RFC 5321 4.5.2). Bytes are stored as they arrive, so memory follows the size limit.
bool Channel::process_data_bytes() {
  const std::string& in = received_lines;
  if (at_line_start_ && in[input_pos_] == '.') {
    std::string_view rest(in.data() + input_pos_, in.size() - input_pos_);
    if (rest.size() < 3 && std::string_view(".\r\n").substr(0, rest.size()) == rest)
      return false;  // could still be the end-of-data line
    if (rest.substr(0, 3) == ".\r\n") {
      input_pos_ += 3;
      end_of_data();
      return true;
    }
    data_bytes_ += 1;  // the stuffed dot counts, as in smtpd.py's num_bytes
    input_pos_ += 1;
  }
  at_line_start_ = false;
  std::size_t end = in.find("\r\n", input_pos_);
  if (end == std::string::npos) {
    std::size_t stop = in.size();
    if (in.back() == '\r') stop -= 1;  // maybe half of a CRLF
    append_data(std::string_view(in.data() + input_pos_, stop - input_pos_));
    input_pos_ = stop;
    return false;
  }
  append_data(std::string_view(in.data() + input_pos_, end - input_pos_));
  append_data("\r\n");
  input_pos_ = end + 2;
  at_line_start_ = true;
  return true;
}

// append_data - count message bytes; store them (CRLF as "\n") until the limit is passed
void Channel::append_data(std::string_view bytes) {
  data_bytes_ += bytes.size();
  std::uint64_t limit = config_.data_size_limit;
  // The CRLF before the final dot is not message data, so the count may run 2 over.
  if (limit != 0 && data_bytes_ > limit + 2 && !data_too_big_) {
    data_too_big_ = true;
    received_data.clear();
    received_data.shrink_to_fit();
  }
  if (data_too_big_) return;
  if (bytes == "\r\n")
    received_data += '\n';
  else
    received_data.append(bytes.data(), bytes.size());
}

// end_of_data - the lone dot arrived: refuse an oversized message or hand it to the mode
void Channel::end_of_data() {
  std::uint64_t size = data_bytes_ >= 2 ? data_bytes_ - 2 : 0;
  if (!received_data.empty()) received_data.pop_back();  // the "\n" of the last CRLF
  if (config_.data_size_limit != 0 && size > config_.data_size_limit) {
    push(kReplyTooMuchData);
    // differs from smtpd.py: Python stays in DATA state here and reads the next commands
    // as message text; RFC 5321 4.1.1.4 returns the session to command state.
    set_rset_state();
    return;
  }
  enter_state(State::Waiting);
}

Envelope Channel::take_message() {
  Envelope envelope;
  envelope.peer = peer;
  envelope.mailfrom = mailfrom;
  envelope.rcpttos = rcpttos;
  envelope.mail_options = mail_options;
  envelope.rcpt_options = rcpt_options;
  envelope.data = std::move(received_data);
  envelope.smtputf8 = require_smtputf8;
  received_data.clear();
  return envelope;
}

// finish_message - the mode's verdict; an empty reply means "250 OK", as in smtpd.py
void Channel::finish_message(const std::string& reply) {
  if (smtp_state != State::Waiting) return;
  set_post_data_state();
  push(reply.empty() ? std::string(kReplyOk) : reply);
  process_input();
}

// close_with - the server is going away: send this reply (a 421) and close after it, in
// whatever state the session was (RFC 5321 3.8 allows 421 at any time)
void Channel::close_with(const std::string& reply) {
  push(reply);
  enter_state(State::Closing);
}

// command_size_limit - 512, and for MAIL after EHLO room for SIZE= and SMTPUTF8
// differs from smtpd.py: Python keeps this table in the class, shared by all connections, and
// clears it whenever a client connects; here each connection has its own.
std::size_t Channel::command_size_limit(const std::string& verb) const {
  if (!extended_smtp || verb != "MAIL") return kCommandSizeLimit;
  std::size_t limit = kCommandSizeLimit;
  if (config_.data_size_limit != 0) limit += kSizeParamExtra;
  if (config_.enable_smtputf8) limit += kSmtpUtf8Extra;
  return limit;
}

// handle_command_line - smtpd.py found_terminator in COMMAND state
void Channel::handle_command_line(std::string_view line, std::size_t size) {
  if (config_.trace) config_.trace(peer + " <- " + printable(line.substr(0, 200)));
  if (line.empty()) return push(kReplyBadSyntax);
  // differs from smtpd.py: Python's decode raises and drops the connection.
  if (size <= line.size() && !is_valid_utf8(line)) return push(kReplyNotUtf8);
  std::size_t space = line.find(' ');
  std::string verb = ascii_upper(line.substr(0, space));
  Arg arg;
  if (space != std::string_view::npos) arg = std::string(python_strip(line.substr(space + 1)));
  if (size > command_size_limit(verb)) return push(kReplyLineTooLong);
  for (const Command& command : kCommands) {
    if (verb == command.verb) return (this->*command.handler)(arg);
  }
  push("500 Error: command \"" + verb + "\" not recognized");
}

inline bool has_text(const std::optional<std::string>& arg) { return arg && !arg->empty(); }

void Channel::cmd_helo(const Arg& arg) { greet(arg, false); }
void Channel::cmd_ehlo(const Arg& arg) { greet(arg, true); }

// greet - HELO and EHLO
// differs from smtpd.py: a second HELO/EHLO resets the transaction like RSET and is answered
// again (RFC 5321 4.1.4), where Python answers "503 Duplicate HELO/EHLO".
void Channel::greet(const Arg& arg, bool extended) {
  if (!has_text(arg)) return push(extended ? "501 Syntax: EHLO hostname" : "501 Syntax: HELO hostname");
  set_rset_state();
  seen_greeting = *arg;
  extended_smtp = extended;
  if (!extended) return push("250 " + fqdn);
  push("250-" + fqdn);
  if (config_.data_size_limit != 0) push("250-SIZE " + std::to_string(config_.data_size_limit));
  push("250-8BITMIME");
  if (config_.enable_smtputf8) push("250-SMTPUTF8");
  push("250 HELP");
}

void Channel::cmd_noop(const Arg& arg) { push(has_text(arg) ? "501 Syntax: NOOP" : kReplyOk); }

void Channel::cmd_quit(const Arg&) {  // the argument is ignored, as in smtpd.py
  push(kReplyBye);
  enter_state(State::Closing);
}

// cmd_help - the syntax of one verb, or the list of verbs, from kCommands
void Channel::cmd_help(const Arg& arg) {
  std::string list;
  for (const Command& command : kCommands) {
    if (command.syntax == nullptr) continue;
    list += list.empty() ? "" : " ";
    list += command.verb;
  }
  if (!has_text(arg)) return push("250 Supported commands: " + list);
  std::string verb = ascii_upper(*arg);
  for (const Command& command : kCommands) {
    if (command.syntax == nullptr || verb != command.verb) continue;
    std::string text = std::string("250 Syntax: ") + command.syntax;
    if (extended_smtp && (verb == "MAIL" || verb == "RCPT")) text += kMailParamsSyntax;
    return push(text);
  }
  push("501 Supported commands: " + list);
}

void Channel::cmd_vrfy(const Arg& arg) {
  if (!has_text(arg)) return push("501 Syntax: VRFY <address>");
  std::optional<ParsedAddress> parsed = parse_address(*arg);
  if (parsed && !parsed->address.empty()) return push(kReplyVrfyCannot);
  push("502 Could not VRFY " + *arg);
}

// syntax_error - "501 Syntax: MAIL FROM: <address>", with the parameters part after EHLO
std::string Channel::syntax_error(const char* verb_syntax) const {
  std::string text = std::string("501 Syntax: ") + verb_syntax;
  return extended_smtp ? text + kMailParamsSyntax : text;
}

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
  if (!parsed || parsed->address.empty() || (!extended_smtp && !parsed->rest.empty())) {
    push(syntax);
    return std::nullopt;
  }
  return parsed;
}

void Channel::cmd_mail(const Arg& arg) {
  if (seen_greeting.empty()) return push(kReplySendHeloFirst);
  std::string syntax = syntax_error("MAIL FROM: <address>");
  std::optional<ParsedAddress> parsed = address_argument(arg, "FROM:", syntax);
  if (!parsed) return;
  if (!mailfrom.empty()) return push(kReplyNestedMail);
  mail_options = python_split(ascii_upper(parsed->rest));
  if (!check_mail_params(syntax)) return;
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
  if (config_.enable_smtputf8) {
    auto smtputf8 = take("SMTPUTF8");
    if (smtputf8 && *smtputf8) return push(kReplySmtpUtf8Arg), false;
    if (smtputf8) require_smtputf8 = true;
  }
  auto size = take("SIZE");
  if (size) {
    // differs from smtpd.py: a bare SIZE with no value crashes Python; here it is a syntax error
    if (!*size || !is_decimal(**size)) return push(syntax), false;
    std::uint64_t limit = config_.data_size_limit;
    bool too_big = (*size)->size() > 19 || std::stoull(**size) > limit;
    if (limit != 0 && too_big) return push(kReplySizeExceeded), false;
  }
  if (!params->empty()) return push(kReplyMailParams), false;
  return true;
}

void Channel::cmd_rcpt(const Arg& arg) {
  if (seen_greeting.empty()) return push(kReplySendHeloFirst);
  if (mailfrom.empty()) return push(kReplyNeedMail);
  std::string syntax = syntax_error("RCPT TO: <address>");
  std::optional<ParsedAddress> parsed = address_argument(arg, "TO:", syntax);
  if (!parsed) return;
  std::vector<std::string> options = python_split(ascii_upper(parsed->rest));
  auto params = parse_params(options);
  if (!params) return push(syntax);
  if (!params->empty()) return push(kReplyRcptParams);  // no RCPT parameter is known
  rcpttos.push_back(parsed->address);
  push(kReplyOk);
}

void Channel::cmd_rset(const Arg& arg) {
  if (has_text(arg)) return push("501 Syntax: RSET");
  set_rset_state();
  push(kReplyOk);
}

void Channel::cmd_data(const Arg& arg) {
  if (seen_greeting.empty()) return push(kReplySendHeloFirst);
  if (rcpttos.empty()) return push(kReplyNeedRcpt);
  if (has_text(arg)) return push("501 Syntax: DATA");
  received_data.clear();
  data_bytes_ = 0;
  data_too_big_ = false;
  // differs from smtpd.py: Python waits for CRLF "." CRLF, so a "." right after 354 does not
  // end an empty message there; here every line is checked (RFC 5321 4.1.1.4).
  at_line_start_ = true;
  enter_state(State::Data);
  push(kReplyStartData);
}

void Channel::cmd_expn(const Arg&) { push(kReplyExpn); }

// ==== 8. Server modes ====
// What happens to a finished message: the -c CLASS of smtpd.py. A mode returns the reply for
// the end of DATA: empty for "250 OK", or a whole reply line (process_message's string).
// A mode that cannot keep a message answers 4xx, so the client keeps it and retries.
// SMTPServer and DebuggingServer hand each message to a list of outputs (--maildir, --mbox,
// the printer on stdout), in order; the 250 comes only once every one of them has it.
//   ServerMode, MessageOutput, StreamPrinter, MaildirStore, MboxStore, DeliveringServer,
//   SinkServer (SMTPServer), DebuggingServer, format_debug_message, format_json_message,
//   maildir_unique_name, format_mbox_entry, not_stored_reply

class ServerMode {
 public:
  virtual ~ServerMode() = default;
  virtual std::string process_message(const Envelope& envelope) = 0;
};

// MessageOutput - one place a message goes; deliver() is true only once the message is
// safely there, and otherwise says why in error ("cannot write /x/y: No space left on device")
class MessageOutput {
 public:
  virtual ~MessageOutput() = default;
  virtual bool deliver(const Envelope& envelope, std::string& error) = 0;
};

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

// format_debug_message - DebuggingServer's print-out of one message, X-Peer after the headers
// differs from smtpd.py: lines are written as the bytes they are, not as Python's b'...' repr.
inline std::string format_debug_message(const Envelope& envelope) {
  std::string out = "---------- MESSAGE FOLLOWS ----------\n";
  if (!envelope.mail_options.empty())
    out += "mail options: " + python_list_repr(envelope.mail_options) + "\n";
  if (!envelope.rcpt_options.empty())
    out += "rcpt options: " + python_list_repr(envelope.rcpt_options) + "\n\n";
  bool in_headers = true;
  for (std::string_view line : split_python_lines(envelope.data)) {
    if (in_headers && line.empty()) {
      out += "X-Peer: " + envelope.peer + "\n";  // none if the message has no empty line
      in_headers = false;
    }
    out.append(line.data(), line.size());
    out += '\n';
  }
  out += "------------ END MESSAGE ------------\n";
  return out;
}

// format_json_message - --json: one line holding process_message's arguments; the data as
// text when it is UTF-8, else as base64, and data_encoding says which
inline std::string format_json_message(const Envelope& envelope) {
  bool is_text = is_valid_utf8(envelope.data);
  return "{\"peer\": " + json_string(envelope.peer) +
         ", \"mailfrom\": " + json_string(envelope.mailfrom) +
         ", \"rcpttos\": " + json_list(envelope.rcpttos) +
         ", \"mail_options\": " + json_list(envelope.mail_options) +
         ", \"rcpt_options\": " + json_list(envelope.rcpt_options) +
         ", \"size\": " + std::to_string(envelope.data.size()) + ", \"data\": " +
         (is_text ? json_string(envelope.data) : "\"" + base64_encode(envelope.data) + "\"") +
         ", \"data_encoding\": \"" + (is_text ? "utf-8" : "base64") + "\"}\n";
}

// StreamPrinter - each message, formatted, on a stream (stdout); flushed before the 250
class StreamPrinter : public MessageOutput {
 public:
  using Format = std::string (*)(const Envelope&);
  StreamPrinter(std::FILE* out, Format format) : out_(out), format_(format) {}
  bool deliver(const Envelope& envelope, std::string& error) override {
    std::string text = format_(envelope);
    errno = 0;
    bool is_written = std::fwrite(text.data(), 1, text.size(), out_) == text.size();
    if (std::fflush(out_) == 0 && is_written) return true;
    error = std::string("cannot write to standard output: ") +
            (errno != 0 ? std::strerror(errno) : "write error");
    std::clearerr(out_);
    return false;
  }

 private:
  std::FILE* out_;
  Format format_;
};

// message_file_text - the message as a file holds it: data is its lines joined with "\n",
// so one "\n" ends the last line (a message whose last line is empty ends in "\n\n")
inline std::string message_file_text(const std::string& data) { return data + "\n"; }

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
class MaildirStore : public MessageOutput {
 public:
  explicit MaildirStore(std::string dir) : dir_(std::move(dir)), host_(host_name()) {}

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
    if (!write_synced(tmp, message_file_text(envelope.data), error)) return false;
    if (!rename_file(tmp, dir_ + "/new/" + name, error)) {
      remove_file(tmp);
      return false;
    }
    // If this sync fails the message is in new/ all the same; the 451 that follows makes the
    // client send it again, which is better than a 250 for a message a crash could lose.
    return sync_directory(dir_ + "/new", error);
  }

 private:
  // write_synced - a new file with these bytes, on disk when this returns true
  static bool write_synced(const std::string& path, std::string_view text, std::string& error) {
    File file;
    if (!file.create_new(path, error)) return false;
    if (file.write_all(text, error) && file.sync(error) && file.close(error)) return true;
    remove_file(path);
    return false;
  }

  std::string dir_;
  std::string host_;
  std::uint64_t count_ = 0;  // messages named by this process: the Q part of the name
};

// mboxrd_quote - one more '>' before each line that matches ^>*From  (the mboxrd rule, so a
// reader can undo it exactly), and "\n" after every line, the last one included
inline std::string mboxrd_quote(std::string_view data) {
  std::string out;
  out.reserve(data.size() + 64);
  std::size_t start = 0;
  do {
    std::size_t end = data.find('\n', start);
    std::string_view line = data.substr(start, end == std::string_view::npos ? end : end - start);
    std::size_t arrows = line.find_first_not_of('>');
    if (arrows != std::string_view::npos && line.substr(arrows, 5) == "From ") out += '>';
    out.append(line.data(), line.size());
    out += '\n';
    start = end == std::string_view::npos ? data.size() + 1 : end + 1;
  } while (start <= data.size());
  return out;
}

// format_mbox_entry - "From SENDER DATE", the quoted message, and the empty line that ends it.
// The null sender <> is written MAILER-DAEMON, as mail systems do; white space and control
// characters in a (quoted) address become '_', so the line stays one line of two fields.
inline std::string format_mbox_entry(const Envelope& envelope, std::int64_t unix_seconds) {
  std::string sender = envelope.mailfrom == "<>" || envelope.mailfrom.empty()
                           ? std::string("MAILER-DAEMON")
                           : envelope.mailfrom;
  for (char& c : sender)
    if (static_cast<unsigned char>(c) <= 0x20 || c == 0x7F) c = '_';
  return "From " + sender + " " + format_asctime_utc(unix_seconds) + "\n" +
         mboxrd_quote(envelope.data) + "\n";
}

// MboxStore - --mbox FILE: each message appended under an exclusive lock and synced. A write
// that fails half-way is cut off again, so the mbox never holds half a message.
class MboxStore : public MessageOutput {
 public:
  explicit MboxStore(std::string path) : path_(std::move(path)) {}
  bool deliver(const Envelope& envelope, std::string& error) override {
    std::string entry = format_mbox_entry(envelope, unix_time_us() / 1000000);
    File file;
    std::int64_t size_before = 0;
    if (!file.open_append(path_, error) || !file.lock(kMboxLockWaitMs, error) ||
        !file.size(size_before, error))
      return false;
    if (file.write_all(entry, error) && file.sync(error)) return file.close(error);
    file.truncate(size_before);
    return false;
  }

 private:
  std::string path_;
};

// not_stored_reply - the 451 for a message an output could not keep, with its reason
inline std::string not_stored_reply(const std::string& reason) {
  return kReplyNotStored + printable(reason).substr(0, kReasonLimit);
}

using MessageOutputs = std::vector<std::unique_ptr<MessageOutput>>;

// DeliveringServer - a mode that hands each message to its outputs in order and answers
// 250 once all of them have it; the first that fails gets the client a 451 (the client
// retries), the reason on stderr, and the outputs after it are not tried.
class DeliveringServer : public ServerMode {
 public:
  explicit DeliveringServer(MessageOutputs outputs) : outputs_(std::move(outputs)) {}
  std::string process_message(const Envelope& envelope) override {
    for (auto& output : outputs_) {
      std::string error;
      if (!output->deliver(envelope, error)) {
        log_line("could not store a message from " + envelope.peer + ": " + error);
        return not_stored_reply(error);
      }
    }
    // The --exec hook (issue 4) is to run here, after the outputs: it decides the reply, and
    // runs without blocking the loop, so it needs the asynchronous hooks of the event loop.
    return "";
  }

 protected:
  void add_output(std::unique_ptr<MessageOutput> output) { outputs_.push_back(std::move(output)); }

 private:
  MessageOutputs outputs_;
};

// SinkServer - SMTPServer: accepts every message; keeps it only where outputs say (--maildir,
// --mbox, --json), so with none it is discarded
// differs from smtpd.py: its SMTPServer.process_message raises NotImplementedError and drops
// the connection; on the command line "override process_message" can only mean a sink.
class SinkServer : public DeliveringServer {
 public:
  explicit SinkServer(MessageOutputs outputs = {}) : DeliveringServer(std::move(outputs)) {}
};

// DebuggingServer - prints each message on a stream, after the other outputs (so a printed
// message is already stored), flushed before the client hears 250; --json changes the format
class DebuggingServer : public DeliveringServer {
 public:
  explicit DebuggingServer(std::FILE* out, MessageOutputs outputs = {},
                           StreamPrinter::Format format = format_debug_message)
      : DeliveringServer(std::move(outputs)) {
    add_output(std::make_unique<StreamPrinter>(out, format));
  }
};

// ==== 9. Event loop ====
// One thread, non-blocking sockets and poll(): a listener, and a Connection per client that
// pairs a socket with its Channel. Each turn polls every socket, accepts new clients, reads
// what is there into channels, hands finished messages to the mode, and writes what it can.
// A client that does not read its replies or is slow only waits for itself. The loop also
// ends by itself after --max-messages or --idle-exit; the poll timeout wakes it in time.
//   Listener, open_listener, Connection, Server::run, count_delivery, is_time_to_exit,
//   close_remaining, wake_ms

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

class StartError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// open_listener - bind and listen on the first address the host resolves to (as smtpd.py)
inline socket_t open_listener(const Endpoint& where, std::string& bound_text) {
  struct addrinfo hints {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  struct addrinfo* found = nullptr;
  std::string port = std::to_string(where.port);
  int rc = getaddrinfo(where.host.c_str(), port.c_str(), &hints, &found);
  if (rc != 0 || found == nullptr)
    throw StartError("cannot resolve " + where.host + ": " + gai_strerror(rc));
  std::unique_ptr<struct addrinfo, void (*)(struct addrinfo*)> guard(found, freeaddrinfo);
  socket_t s = socket(found->ai_family, found->ai_socktype, found->ai_protocol);
  if (s == kInvalidSocket)
    throw StartError("cannot create a socket: " + socket_error_text(last_socket_error()));
  int on = 1;
  setsockopt(s, SOL_SOCKET, SO_REUSEADDR, reinterpret_cast<const char*>(&on), sizeof on);
  std::string target = format_endpoint(where.host, where.port);
  if (bind(s, found->ai_addr, static_cast<socklen_t>(found->ai_addrlen)) != 0) {
    int err = last_socket_error();
    close_socket(s);
    throw StartError("cannot listen on " + target + ": " + socket_error_text(err) +
                     (address_in_use(err) ? " (another server is using this port)" : ""));
  }
  if (listen(s, kListenBacklog) != 0 || !set_nonblocking(s)) {
    int err = last_socket_error();
    close_socket(s);
    throw StartError("cannot listen on " + target + ": " + socket_error_text(err));
  }
  struct sockaddr_storage bound {};
  socklen_t len = sizeof bound;
  getsockname(s, reinterpret_cast<sockaddr*>(&bound), &len);
  auto [host, bound_port] = numeric_address(reinterpret_cast<sockaddr*>(&bound), len);
  bound_text = format_endpoint(host, bound_port);
  return s;
}

// Connection - one client: its socket, its channel, and whether it has hung up
struct Connection {
  Connection(socket_t s, ChannelConfig config, std::string peer_ip)
      : socket(s), channel(std::move(config), std::move(peer_ip)) {}
  ~Connection() { close_socket(socket); }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  socket_t socket;
  Channel channel;
  bool is_dead = false;  // hung up, failed, or done after QUIT: close at the end of the turn
};

struct ServerOptions {
  ChannelConfig channel;
  bool debug = false;
  std::uint64_t max_messages = 0;          // --max-messages: 0 for no limit
  std::chrono::milliseconds idle_exit{0};  // --idle-exit: 0 for never
};

class Server {
 public:
  Server(socket_t listener, ServerOptions options, ServerMode& mode)
      : listener_(listener), options_(std::move(options)), mode_(mode) {}
  ~Server() {
    if (listener_ != kInvalidSocket) close_socket(listener_);
  }

  // run - serve until a stop is requested or a limit says to exit (--max-messages,
  // --idle-exit); finishes queued replies before returning
  void run() {
    std::vector<pollfd_t> fds;
    idle_since_ = Clock::now();
    while (!g_stop_requested && !is_time_to_exit()) {
      fds.clear();
      int wait_ms = wake_ms();
      long long pause_left = accept_paused_until_ms_ - now_ms();
      if (pause_left > 0) wait_ms = static_cast<int>(std::min<long long>(wait_ms, pause_left));
      if (is_listening())
        fds.push_back(pollfd_t{listener_, static_cast<short>(pause_left > 0 ? 0 : POLLIN), 0});
      std::size_t first = fds.size();  // the connections follow the listener, while it is open
      for (auto& c : connections_) fds.push_back(pollfd_t{c->socket, events_for(*c), 0});
      int ready = poll_sockets(fds.data(), fds.size(), wait_ms);
      if (ready < 0) {
        int err = last_socket_error();
        if (interrupted(err)) continue;
        throw StartError("poll failed: " + socket_error_text(err));
      }
      // Connections accepted this turn come after the polled ones and wait for the next turn.
      std::size_t polled = connections_.size();
      for (std::size_t i = 0; i < polled; ++i) serve(*connections_[i], fds[first + i].revents);
      // serve() may have closed the listener (the message limit): then fds[0] is stale
      if (first > 0 && is_listening() && (fds[0].revents & POLLIN)) accept_clients();
      close_dead();
    }
    if (is_draining_) close_remaining();
    flush_before_exit();
  }

  std::size_t connection_count() const { return connections_.size(); }

 private:
  short events_for(const Connection& c) const {
    short events = 0;
    if (c.channel.wants_input()) events |= POLLIN;
    if (!c.channel.output().empty()) events |= POLLOUT;
    return events;
  }

  void trace(const std::string& text) const {
    if (options_.debug) log_line(text);
  }

  void accept_clients() {
    for (int n = 0; n < kAcceptBurst; ++n) {
      struct sockaddr_storage addr {};
      socklen_t len = sizeof addr;
      socket_t s = accept(listener_, reinterpret_cast<sockaddr*>(&addr), &len);
      if (s == kInvalidSocket) {
        int err = last_socket_error();
        if (would_block(err)) return;
        // Out of descriptors the listener stays readable: pause instead of spinning, and
        // say so once per episode rather than once per turn.
        if (out_of_descriptors(err)) accept_paused_until_ms_ = now_ms() + kAcceptPauseMs;
        if (!is_accept_failing_)
          log_line("accept failed: " + socket_error_text(err) + " (" +
                   std::to_string(connections_.size()) + " clients connected); retrying");
        is_accept_failing_ = true;
        return;
      }
      is_accept_failing_ = false;
      if (!set_nonblocking(s)) {
        close_socket(s);
        continue;
      }
      int on = 1;  // replies are small and the client waits for each one
      setsockopt(s, IPPROTO_TCP, TCP_NODELAY, reinterpret_cast<const char*>(&on), sizeof on);
      auto [ip, port] = numeric_address(reinterpret_cast<sockaddr*>(&addr), len);
      trace("connection from " + format_endpoint(ip, port));
      ChannelConfig config = options_.channel;
      if (options_.debug) config.trace = [](const std::string& line) { log_line(line); };
      connections_.push_back(std::make_unique<Connection>(s, std::move(config), ip));
      write_some(*connections_.back());  // the greeting
    }
  }

  // serve - one polled connection: read, let the mode judge messages, write
  void serve(Connection& c, short revents) {
    if (c.is_dead) return;
    if (revents & (POLLIN | POLLHUP | POLLERR)) read_some(c);
    deliver_messages(c);
    if (!c.is_dead && !c.channel.output().empty()) write_some(c);
    if (c.channel.is_closing() && c.channel.output().empty()) c.is_dead = true;
  }

  void read_some(Connection& c) {
    static char buffer[kReadChunk];
    if (!c.channel.wants_input()) {
      // Not reading now; still notice a hang-up so a dead client does not linger.
      return;
    }
    auto n = recv(c.socket, buffer, sizeof buffer, 0);
    if (n > 0) {
      c.channel.feed(std::string_view(buffer, static_cast<std::size_t>(n)));
      return;
    }
    int err = n < 0 ? last_socket_error() : 0;
    if (n < 0 && would_block(err)) return;
    trace(c.channel.peer + (n == 0 ? " closed the connection" : " failed: " + socket_error_text(err)));
    c.is_dead = true;  // a message not finished with "." was never answered 250: drop it
  }

  void deliver_messages(Connection& c) {
    while (!c.is_dead && c.channel.has_message()) {
      Envelope envelope = c.channel.take_message();
      std::string reply = mode_.process_message(envelope);
      c.channel.finish_message(reply);
      if (reply.empty() || reply[0] == '2') count_delivery();
    }
  }

  void write_some(Connection& c) {
    const std::string& out = c.channel.output();
    if (out.empty()) return;
    auto n = send(c.socket, out.data(), static_cast<int>(out.size()), kSendFlags);
    if (n > 0) {
      c.channel.consume_output(static_cast<std::size_t>(n));
      return;
    }
    int err = last_socket_error();
    if (n < 0 && would_block(err)) return;
    trace(c.channel.peer + " failed: " + socket_error_text(err));
    c.is_dead = true;
  }

  void close_dead() {
    bool had_clients = !connections_.empty();
    auto dead = [](const std::unique_ptr<Connection>& c) { return c->is_dead; };
    connections_.erase(std::remove_if(connections_.begin(), connections_.end(), dead),
                       connections_.end());
    if (had_clients && connections_.empty()) idle_since_ = Clock::now();
  }

  // -- Exiting by itself: --max-messages N and --idle-exit SECONDS --
  // After the N-th delivered message (its 250 queued) the listener closes; the sessions still
  // open may go on (and send more) until they quit, for at most kDrainGraceMs, then get a 421.
  // With --idle-exit the loop ends once no client has been connected for that long, counted
  // from the start or from when the last client left.

  bool is_listening() const { return listener_ != kInvalidSocket; }

  // count_delivery - one more message accepted with 2xx; at the limit, stop accepting
  void count_delivery() {
    ++messages_delivered_;
    if (options_.max_messages == 0 || messages_delivered_ < options_.max_messages) return;
    if (is_draining_) return;
    trace("message limit reached (" + std::to_string(messages_delivered_) +
          "); no new clients, exiting when the open sessions end");
    close_socket(listener_);
    listener_ = kInvalidSocket;
    is_draining_ = true;
    drain_deadline_ = Clock::now() + std::chrono::milliseconds(kDrainGraceMs);
  }

  // is_time_to_exit - after the limit, all sessions done or their grace over; or no client
  // for --idle-exit
  bool is_time_to_exit() const {
    auto now = Clock::now();
    if (is_draining_) return connections_.empty() || now >= drain_deadline_;
    return options_.idle_exit.count() > 0 && connections_.empty() &&
           now - idle_since_ >= options_.idle_exit;
  }

  // close_remaining - after the limit, a 421 to the sessions that are still open
  void close_remaining() {
    std::string reply = "421 " + options_.channel.fqdn + " " + kClosingLimitReached;
    for (auto& c : connections_)
      if (!c->is_dead && !c->channel.is_closing()) c->channel.close_with(reply);
  }

  // wake_ms - the poll timeout: kPollWakeMs, or less when a deadline above comes sooner
  int wake_ms() const {
    auto now = Clock::now();
    auto wake = now + std::chrono::milliseconds(kPollWakeMs);
    if (is_draining_) wake = std::min(wake, drain_deadline_);
    if (options_.idle_exit.count() > 0 && connections_.empty())
      wake = std::min(wake, idle_since_ + options_.idle_exit);
    auto ms = std::chrono::ceil<std::chrono::milliseconds>(wake - now).count();
    return static_cast<int>(std::max<long long>(0, ms));
  }

  // flush_before_exit - give queued replies (a 250 already earned) a moment to leave
  void flush_before_exit() {
    for (int turn = 0; turn < 20; ++turn) {
      bool pending = false;
      for (auto& c : connections_) {
        if (!c->is_dead && !c->channel.output().empty()) {
          write_some(*c);
          pending = pending || !c->channel.output().empty();
        }
      }
      if (!pending) break;
      pollfd_t none{};
      poll_sockets(&none, 0, 50);
    }
    connections_.clear();
  }

  static long long now_ms() {
    using namespace std::chrono;
    return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
  }

  using Clock = std::chrono::steady_clock;

  socket_t listener_;  // kInvalidSocket once the message limit closed it
  long long accept_paused_until_ms_ = 0;
  bool is_accept_failing_ = false;
  ServerOptions options_;
  ServerMode& mode_;
  std::vector<std::unique_ptr<Connection>> connections_;
  std::uint64_t messages_delivered_ = 0;
  bool is_draining_ = false;          // the message limit is reached; the listener is closed
  Clock::time_point drain_deadline_;  // open sessions get a 421 when this passes
  Clock::time_point idle_since_;      // start, or when the last client left
};

// ==== 10. Command line ====
// smtpd.py's options and positional addresses, parsed with cxxopts, checked, and turned into
// one Settings value. Errors are one line and exit status 1 (kExitUsage).
//   parse_endpoint, parse_mode, parse_command_line

enum ExitStatus { kExitOk = 0, kExitUsage = 1, kExitCannotListen = 2, kExitPrivileges = 3 };

enum class ModeKind { Sink, Debugging, PureProxy, MailmanProxy };

struct Settings {
  bool setuid = true;
  bool debug = false;
  bool enable_smtputf8 = false;
  std::uint64_t size_limit = kDataSizeDefault;
  ModeKind mode = ModeKind::Debugging;
  Endpoint local;
  Endpoint remote;
  std::string maildir;                  // --maildir: empty for none
  std::string mbox;                     // --mbox: empty for none
  bool json = false;                    // --json
  std::uint64_t max_messages = 0;       // --max-messages: 0 for no limit
  std::uint64_t idle_exit_seconds = 0;  // --idle-exit: 0 for never
};

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
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

// parse_count - a whole number for --max-messages or --idle-exit; nine digits at most, so
// seconds still fit in milliseconds
inline std::uint64_t parse_count(const std::string& text, const char* option) {
  if (!is_decimal(text) || text.size() > 9)
    throw UsageError("invalid " + std::string(option) + ": '" + text +
                     "' (expected a whole number)");
  return std::stoull(text);
}

// parse_path - the argument of --maildir or --mbox, which must not be empty
inline std::string parse_path(const cxxopts::ParseResult& result, const char* option) {
  if (!result.count(option)) return "";
  std::string path = result[option].as<std::string>();
  if (path.empty()) throw UsageError("--" + std::string(option) + " needs a path");
  return path;
}

struct CommandLine {
  std::optional<Settings> settings;  // empty when --help or --version was answered
  std::string text_for_stdout;       // the help or version text
};

// build_options - the option table; the help texts are the ones README.md and smtpd.1 repeat
inline cxxopts::Options build_options() {
  cxxopts::Options options("smtpd", std::string(kVersion) +
                                        " - an SMTP server for tests, debugging and relaying");
  options.custom_help("[options]");
  options.positional_help("[localhost:localport [remotehost:remoteport]]");
  options.add_options()
      ("n,nosetuid", "Do not change to user nobody after binding (only done when started as root).")
      ("V,version", "Print the version and exit.")
      ("c,class", "Server mode: DebuggingServer (debug; the default), SMTPServer (sink), "
                  "PureProxy (proxy) or MailmanProxy (mailman).",
       cxxopts::value<std::string>(), "CLASS")
      ("s,size", "Largest message accepted, in bytes, announced with SIZE in EHLO; 0 means no "
                 "limit (default 33554432).",
       cxxopts::value<std::string>(), "LIMIT")
      ("u,smtputf8", "Enable the SMTPUTF8 extension (RFC 6531).")
      ("d,debug", "Trace the SMTP dialogue and connections on stderr.")
      ("maildir", "Also deliver each message into the Maildir DIR (made with tmp, new and cur "
                  "if missing), synced before the 250 reply.",
       cxxopts::value<std::string>(), "DIR")
      ("mbox", "Also append each message to FILE in mboxrd format, locked, synced before the "
               "250 reply.",
       cxxopts::value<std::string>(), "FILE")
      ("json", "Print each message as one line of JSON instead of the DebuggingServer layout; "
               "SMTPServer prints it too.")
      ("max-messages", "Exit with status 0 once N messages are delivered and the open "
                       "sessions have ended (after at most " +
                           std::to_string(kDrainGraceMs / 1000) +
                           " s more); 0 means no limit (the default).",
       cxxopts::value<std::string>(), "N")
      ("idle-exit", "Exit with status 0 when no client has been connected for SECONDS; 0 means "
                    "never (the default).",
       cxxopts::value<std::string>(), "SECONDS")
      ("h,help", "Print this help and exit.")
      ("addresses", "", cxxopts::value<std::vector<std::string>>());
  options.parse_positional({"addresses"});
  return options;
}

inline std::string help_text(cxxopts::Options& options) {
  return options.help() +
         "\nDefaults: localhost:8025 to listen on, localhost:25 as the upstream.\n"
         "Addresses are HOST:PORT or [IPV6]:PORT; port 0 picks a free port, shown on stderr\n"
         "as 'listening on HOST:PORT'. See man smtpd for modes, outputs and exit statuses.\n";
}

// parse_command_line - argv to Settings; throws UsageError with a one-line reason
inline CommandLine parse_command_line(int argc, const char* const* argv) {
  cxxopts::Options options = build_options();
  cxxopts::ParseResult result;
  try {
    result = options.parse(argc, argv);
  } catch (const std::exception& e) {
    throw UsageError(e.what());
  }
  if (result.count("help")) return {std::nullopt, help_text(options)};
  if (result.count("version")) return {std::nullopt, std::string(kVersion) + "\n"};
  Settings s;
  s.setuid = result.count("nosetuid") == 0;
  s.debug = result.count("debug") > 0;
  s.enable_smtputf8 = result.count("smtputf8") > 0;
  if (result.count("size")) s.size_limit = parse_size(result["size"].as<std::string>());
  if (result.count("class")) s.mode = parse_mode(result["class"].as<std::string>());
  s.maildir = parse_path(result, "maildir");
  s.mbox = parse_path(result, "mbox");
  s.json = result.count("json") > 0;
  if (result.count("max-messages"))
    s.max_messages = parse_count(result["max-messages"].as<std::string>(), "--max-messages");
  if (result.count("idle-exit"))
    s.idle_exit_seconds = parse_count(result["idle-exit"].as<std::string>(), "--idle-exit");
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

// make_stores - the --maildir and --mbox outputs, in that order
inline MessageOutputs make_stores(const Settings& s) {
  MessageOutputs stores;
  if (!s.maildir.empty()) stores.push_back(std::make_unique<MaildirStore>(s.maildir));
  if (!s.mbox.empty()) stores.push_back(std::make_unique<MboxStore>(s.mbox));
  return stores;
}

// make_mode - the ServerMode for a Settings; modes not yet built are refused by name. The
// stores come before the printer, so a message on stdout is already in the files.
inline std::unique_ptr<ServerMode> make_mode(const Settings& s) {
  StreamPrinter::Format format = s.json ? format_json_message : format_debug_message;
  switch (s.mode) {
    case ModeKind::Sink: {
      MessageOutputs outputs = make_stores(s);
      if (s.json) outputs.push_back(std::make_unique<StreamPrinter>(stdout, format));
      return std::make_unique<SinkServer>(std::move(outputs));
    }
    case ModeKind::Debugging:
      return std::make_unique<DebuggingServer>(stdout, make_stores(s), format);
    case ModeKind::PureProxy:
    case ModeKind::MailmanProxy: break;
  }
  throw UsageError(std::string(mode_name(s.mode)) + " is not implemented yet");
}

// prepare_outputs - make the Maildir at start (so an empty one is there to look at), as the
// user we now run as; a failure is only logged: each message tries again, with 451 meanwhile
inline void prepare_outputs(const Settings& s) {
  std::string error;
  if (!s.maildir.empty() && !MaildirStore::make_maildir(s.maildir, error))
    log_line(error + "; messages get 451 until it can be made");
}

// run_smtpd - the whole program after argument parsing; returns the exit status
inline int run_smtpd(int argc, const char* const* argv) {
  Settings settings;
  std::unique_ptr<ServerMode> mode;
  try {
    CommandLine cl = parse_command_line(argc, argv);
    if (!cl.settings) {
      std::fputs(cl.text_for_stdout.c_str(), stdout);
      return kExitOk;
    }
    settings = *cl.settings;
    mode = make_mode(settings);
  } catch (const UsageError& e) {
    log_line(e.what());
    return kExitUsage;
  }
  [[maybe_unused]] SocketRuntime sockets;
  install_stop_handlers();
  std::string bound;
  socket_t listener;
  try {
    listener = open_listener(settings.local, bound);
  } catch (const StartError& e) {
    log_line(e.what());
    return kExitCannotListen;
  }
  if (settings.setuid && running_as_root()) {
    std::string error;
    if (!drop_privileges(error)) {
      close_socket(listener);
      log_line(error);
      return kExitPrivileges;
    }
  }
  prepare_outputs(settings);
  ServerOptions options;
  options.channel.fqdn = fully_qualified_hostname();
  options.channel.data_size_limit = settings.size_limit;
  options.channel.enable_smtputf8 = settings.enable_smtputf8;
  options.debug = settings.debug;
  options.max_messages = settings.max_messages;
  options.idle_exit = std::chrono::seconds(settings.idle_exit_seconds);
  std::fprintf(stderr, "listening on %s\n", bound.c_str());
  std::fflush(stderr);
  if (settings.debug)
    log_line(std::string(mode_name(settings.mode)) + " started; remote address " +
             format_endpoint(settings.remote.host, settings.remote.port));
  Server server(listener, std::move(options), *mode);
  try {
    server.run();
  } catch (const StartError& e) {
    log_line(e.what());
    return kExitCannotListen;
  }
  std::fflush(stdout);
  return kExitOk;
}

// ==== 11. main ====

#ifndef SMTPD_NO_MAIN
int main(int argc, char** argv) { return run_smtpd(argc, argv); }
#endif
