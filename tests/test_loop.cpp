// test_loop.cpp - the reactor under the server: deferred tasks, timers, released sockets and
// a failing poll, driven directly over socket pairs (no server process).
#include <doctest/doctest.h>

namespace loop_test {

// SocketPair - two connected local sockets, closed unless released to a reactor
struct SocketPair {
  SocketPair() { REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0); }
  ~SocketPair() {
    for (int fd : fds)
      if (fd >= 0) ::close(fd);
  }
  int fds[2] = {-1, -1};
};

bool is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

}  // namespace loop_test

TEST_CASE("reactor: deferred tasks run after the current callbacks, in the order given") {
  loop_test::SocketPair pair;
  PollReactor reactor;
  std::vector<std::string> log;
  reactor.watch(pair.fds[0], POLLIN, [&](short) {
    reactor.defer([&] {
      log.push_back("first");
      reactor.defer([&] { log.push_back("deferred by first"); });
    });
    reactor.defer([&] { log.push_back("second"); });
    log.push_back("handler done");
  });
  REQUIRE(::write(pair.fds[1], "x", 1) == 1);
  REQUIRE(reactor.turn(1000));
  CHECK(log == std::vector<std::string>{"handler done", "first", "second", "deferred by first"});
}

TEST_CASE("reactor: timers fire earliest first; restarted ones move, cancelled ones never fire") {
  PollReactor reactor;
  std::vector<std::string> log;
  Reactor::TimerId late = reactor.start_timer(60 * 1000, [&] { log.push_back("late"); });
  reactor.start_timer(30, [&] { log.push_back("30 ms"); });
  Reactor::TimerId cancelled = reactor.start_timer(10, [&] { log.push_back("cancelled"); });
  reactor.cancel_timer(cancelled);
  reactor.cancel_timer(0);  // "no timer": nothing happens
  reactor.restart_timer(late, 0);
  auto start = std::chrono::steady_clock::now();
  for (int turn = 0; turn < 50 && log.size() < 2; ++turn) REQUIRE(reactor.turn(100));
  CHECK(log == std::vector<std::string>{"late", "30 ms"});
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
}

TEST_CASE("reactor: a released socket gets no more events and closes after the callbacks") {
  // Both sockets are readable in the same turn; whichever handler runs first releases the
  // other, whose event of this turn must then not be handed out.
  loop_test::SocketPair pair;
  PollReactor reactor;
  int runs = 0;
  int released = -1;
  bool was_open_in_turn = false;
  int fresh = -1;
  auto release_other = [&](int other) {
    return [&, other](short) {
      ++runs;
      reactor.release(other, close_socket);
      released = other;
      was_open_in_turn = loop_test::is_open(other);
      fresh = ::socket(AF_INET, SOCK_STREAM, 0);  // may not take the released number
      ::close(fresh);
    };
  };
  reactor.watch(pair.fds[0], POLLIN, release_other(pair.fds[1]));
  reactor.watch(pair.fds[1], POLLIN, release_other(pair.fds[0]));
  REQUIRE(::write(pair.fds[0], "x", 1) == 1);
  REQUIRE(::write(pair.fds[1], "x", 1) == 1);
  REQUIRE(reactor.turn(1000));
  CHECK(runs == 1);
  CHECK(was_open_in_turn);
  CHECK(fresh != released);
  CHECK_FALSE(loop_test::is_open(released));
  for (int& fd : pair.fds)
    if (fd == released) fd = -1;  // the reactor closed it
}

TEST_CASE("reactor: dispose destroys an object only after the current callbacks") {
  loop_test::SocketPair pair;
  PollReactor reactor;
  struct Probe {
    explicit Probe(bool& gone) : is_gone(gone) {}
    ~Probe() { is_gone = true; }
    bool& is_gone;
  };
  bool gone = false;
  bool gone_in_handler = true;
  auto probe = std::make_unique<Probe>(gone);
  reactor.watch(pair.fds[0], POLLIN, [&](short) {
    reactor.dispose(std::move(probe));
    gone_in_handler = gone;
  });
  REQUIRE(::write(pair.fds[1], "x", 1) == 1);
  REQUIRE(reactor.turn(1000));
  CHECK_FALSE(gone_in_handler);
  CHECK(gone);
}

TEST_CASE("reactor: a poll that fails ends the turn with the reason") {
  // poll() refuses more entries than the open-files limit (EINVAL): watch more socket numbers
  // than a lowered soft limit allows, then put the limit back.
  struct rlimit saved {};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  struct rlimit lowered = saved;
  lowered.rlim_cur = 16;
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &lowered) == 0);
  PollReactor reactor;
  for (int i = 0; i < 32; ++i) reactor.watch(100000 + i, POLLIN, [](short) {});
  bool ok = reactor.turn(0);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &saved) == 0);
  CHECK_FALSE(ok);
  CHECK(reactor.error() == "poll failed: " + socket_error_text(EINVAL));
}

TEST_CASE("the channels of one server share one read-only config; the greeting host is its fqdn") {
  ChannelConfig options;
  options.fqdn = "shared.example";
  auto config = std::make_shared<const ChannelConfig>(options);
  Channel first(config, "192.0.2.1");
  Channel second(config, "192.0.2.2");
  CHECK(&first.fqdn == &config->fqdn);
  CHECK(&second.fqdn == &config->fqdn);
  CHECK(config.use_count() == 3);
  CHECK(first.output() == "220 shared.example " + std::string(kVersion) + "\r\n");
}

TEST_CASE("server: a failing poll ends run() with the reason") {
  Endpoint local;
  local.host = "127.0.0.1";
  std::vector<Listener> listeners = open_listeners(local);
  REQUIRE(listeners.size() == 1);
  SinkServer sink;
  Server server({listeners[0].socket}, ServerOptions{}, sink);
  // poll() refuses more entries than the open-files limit: with a soft limit of 0, even the
  // listener alone is too many.
  struct rlimit saved {};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  struct rlimit none = saved;
  none.rlim_cur = 0;
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &none) == 0);
  bool ok = server.run();
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &saved) == 0);
  CHECK_FALSE(ok);
  CHECK(server.error() == "poll failed: " + socket_error_text(EINVAL));
}
