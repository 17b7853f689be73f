// fuzz_upstream.cpp - libFuzzer target for the proxy's client side: arbitrary bytes as all
// that an upstream server ever says (greeting, EHLO, MAIL, RCPT, DATA and end-of-data
// replies) must never crash UpstreamClient's reply parser or UpstreamSession, and every step
// must end in a reply fit for our client: one or more lines "NNN text" (NNN from 200 to 599),
// CRLF between them and no other CR or LF, called exactly once.
//
// The upstream is the other end of a Unix socket pair reached through the real connect path
// (an abstract-namespace address, so no file is made); the bytes are written at once and the
// socket shut, so the client sees them in whatever reads the kernel gives. A small Reactor
// polls the socket and fires timers early, so every timeout path runs too.
//
//   make fuzz                 (runs every fuzz/fuzz_*.cpp target in turn)
#define SMTPD_NO_MAIN
#include <sys/un.h>

#include "../smtpd.cpp"

namespace {

// FuzzReactor - watches and timers; run() polls the watched sockets and, when none is ready,
// fires the earliest timer at once
class FuzzReactor : public Reactor {
 public:
  void watch(socket_t s, short events, ReadyHandler on_ready) override {
    watches_[s] = {events, std::move(on_ready)};
  }
  void set_events(socket_t s, short events) override { watches_[s].first = events; }
  void unwatch(socket_t s) override { watches_.erase(s); }
  void release(socket_t s, void (*close)(socket_t)) override {
    unwatch(s);
    defer([s, close] { close(s); });
  }
  TimerId start_timer(long long delay_ms, Task on_expiry) override {
    timers_[++last_id_] = {delay_ms, std::move(on_expiry)};
    return last_id_;
  }
  void restart_timer(TimerId id, long long delay_ms) override {
    auto it = timers_.find(id);
    if (it != timers_.end()) it->second.first = delay_ms;
  }
  void cancel_timer(TimerId id) override { timers_.erase(id); }
  void defer(Task task) override { deferred_.push_back(std::move(task)); }

  // run - until nothing is watched, no timer and no deferred task is left, or `turns` turns
  void run(int turns) {
    for (int turn = 0; turn < turns; ++turn) {
      if (!deferred_.empty()) {
        std::vector<Task> tasks;
        tasks.swap(deferred_);
        for (Task& task : tasks) task();
        continue;
      }
      if (watches_.empty() && timers_.empty()) break;
      std::vector<pollfd> fds;
      for (const auto& [s, w] : watches_)
        if (w.first != 0) fds.push_back({s, w.first, 0});
      if (!fds.empty() && ::poll(fds.data(), fds.size(), 0) > 0) {
        for (const pollfd& p : fds) {
          auto it = watches_.find(p.fd);
          if (p.revents == 0 || it == watches_.end()) continue;
          ReadyHandler handler = it->second.second;  // it may unwatch itself
          handler(p.revents);
        }
        continue;
      }
      if (timers_.empty()) break;
      auto first = std::min_element(timers_.begin(), timers_.end(), [](auto& a, auto& b) {
        return a.second.first < b.second.first;
      });
      Task handler = std::move(first->second.second);
      timers_.erase(first);
      handler();
    }
  }

 private:
  std::map<socket_t, std::pair<short, ReadyHandler>> watches_;
  std::map<TimerId, std::pair<long long, Task>> timers_;
  std::vector<Task> deferred_;
  TimerId last_id_ = 0;
};

// is_client_reply - one or more reply lines, CRLF between them, codes 200 to 599
bool is_client_reply(const std::string& reply) {
  std::size_t start = 0;
  for (;;) {
    std::size_t end = reply.find("\r\n", start);
    std::string_view line(reply.data() + start,
                          (end == std::string::npos ? reply.size() : end) - start);
    if (line.size() < 3 || !is_decimal(line.substr(0, 3)) || line[0] < '2' || line[0] > '5')
      return false;
    if (line.find_first_of("\r\n") != std::string_view::npos) return false;
    if (end == std::string::npos) return true;
    start = end + 2;
  }
}

void check_reply(const std::string& reply, int& answered) {
  ++answered;
  if (is_client_reply(reply)) return;
  std::fprintf(stderr, "not a reply for the client: %s\n", python_repr(reply).c_str());
  __builtin_trap();
}

// the listening end, made once: an abstract Unix socket named after our pid
socket_t listener(SocketAddress& address) {
  static socket_t s = kInvalidSocket;
  static SocketAddress bound;
  if (s == kInvalidSocket) {
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    std::string name = "smtpd-fuzz-upstream-" + std::to_string(::getpid());
    std::memcpy(un.sun_path + 1, name.data(), name.size());
    bound.family = AF_UNIX;
    bound.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
    std::memcpy(&bound.storage, &un, sizeof un);
    s = ::socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || ::bind(s, reinterpret_cast<const sockaddr*>(&bound.storage), bound.length) != 0 ||
        ::listen(s, 16) != 0)
      __builtin_trap();
  }
  address = bound;
  return s;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  bool lmtp = (data[0] & 1) != 0;
  std::size_t recipients = 1 + (data[0] >> 1) % 3;
  UpstreamSettings settings;
  settings.name = "fuzz";
  settings.fqdn = "fuzz.example";
  socket_t ears = listener(settings.addresses.emplace_back());

  FuzzReactor reactor;
  int asked = 0, answered = 0;
  {
    UpstreamSession session(
        reactor, settings,
        lmtp ? UpstreamSession::Greeting::Lhlo : UpstreamSession::Greeting::Ehlo);
    ++asked;
    session.mail(MailRequest{"a@example.org", {"SIZE=10", "BODY=8BITMIME"}, false},
                 [&](const std::string& reply) { check_reply(reply, answered); });
    socket_t server = ::accept(ears, nullptr, nullptr);
    if (server < 0) __builtin_trap();
    // up to 200 kB fits the socket buffer; larger inputs are cut, not blocked on
    std::size_t sent = 0;
    ::fcntl(server, F_SETFL, O_NONBLOCK);
    while (sent < size - 1) {
      auto n = ::send(server, data + 1 + sent, size - 1 - sent, MSG_NOSIGNAL);
      if (n <= 0) break;
      sent += static_cast<std::size_t>(n);
    }
    ::shutdown(server, SHUT_WR);
    reactor.run(64);
    for (std::size_t i = 0; i < recipients; ++i) {
      ++asked;
      session.rcpt("r" + std::to_string(i) + "@example.org",
                   [&](const std::string& reply) { check_reply(reply, answered); });
      reactor.run(64);
    }
    ++asked;
    Envelope message;
    message.data = "Subject: x\n\nbody";
    message.peer = "192.0.2.1";
    session.data(std::make_unique<RelayText>(std::make_shared<const Envelope>(message)),
                 lmtp ? recipients : 1, [&](const std::vector<std::string>& replies) {
                   if (replies.size() != (lmtp ? recipients : 1)) __builtin_trap();
                   for (const std::string& reply : replies) check_reply(reply, answered);
                   answered -= static_cast<int>(replies.size()) - 1;
                 });
    reactor.run(64);
    ::close(server);
  }
  reactor.run(64);
  if (answered != asked) __builtin_trap();  // every step answered once, none twice
  return 0;
}
