// test_upstream.cpp - a hostile upstream: an upstream server that never ends
// its reply, as fast as it can or a line at a time, must neither grow smtpd's memory nor stall
// other clients nor outlast --reply-timeout; the client hears 451 and keeps its mail.
//
//   Fixture: EndlessReplier (a StandInUpstream serving "220-..." lines forever on 127.0.0.1)
#include <doctest/doctest.h>

#include <atomic>
#include <thread>

#include "test_support.hpp"

namespace smtpd_test {
namespace upstream {

TEST_SUITE_BEGIN("upstream");

// EndlessReplier - an upstream that answers every connection with "220-" lines and never a
// last line: as fast as the socket takes them (flood) or one every 50 ms (drip). Each
// connection stops by itself when the peer closes, after 256 MiB, or after 60 s (the
// stand-in server's lifetime).
class EndlessReplier {
 public:
  enum class Pace { Flood, Drip };

  explicit EndlessReplier(Pace pace) : pace_(pace) {
    // one connection at a time is enough here
    server_.start([this](StandInUpstream::Connection& c) { talk(c); });
  }

  std::string address() const { return server_.address(); }
  std::size_t bytes_sent() const { return sent_; }

 private:
  void talk(const StandInUpstream::Connection& c) {
    const std::string line =
        "220-endless " + std::string(490, 'x') + "\r\n";  // 132 lines pass 64 KiB
    std::string chunk;
    while (chunk.size() < 64 * 1024) chunk += line;
    const std::string& unit = pace_ == Pace::Flood ? chunk : line;
    std::size_t total = 0;
    while (!c.stopping() && total < (256u << 20)) {
      pollfd p{c.fd(), POLLOUT, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      if (p.revents & (POLLERR | POLLHUP)) break;
      ssize_t n = ::send(c.fd(), unit.data(), unit.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) continue;
      if (n <= 0) break;
      total += static_cast<std::size_t>(n);
      sent_ += static_cast<std::size_t>(n);
      if (pace_ == Pace::Drip) std::this_thread::sleep_for(milliseconds(50));
    }
  }

  Pace pace_;
  std::atomic<std::size_t> sent_{0};
  StandInUpstream server_;  // last: it stops before the members talk() uses
};

TEST_CASE("an upstream reply that never ends gives 451, bounded memory, and other clients go on") {
  ignore_sigpipe();
  SUBCASE("a flood of 220- lines: 451 at once, well before --reply-timeout") {
    EndlessReplier upstream(EndlessReplier::Pace::Flood);
    auto proxy = start_proxy(upstream.address(), {"--reply-timeout", "20"});
    Client c = greeted_client(proxy);
    auto start = Clock::now();
    REQUIRE(c.send("MAIL FROM:<a@example.com>\r\n"));
    // Meanwhile another client is greeted and served: the loop is not stuck in one read.
    auto other = proxy.connect();
    CHECK(starts_with(other.read_reply(milliseconds(3000)), "220 "));
    CHECK(other.command("NOOP", milliseconds(3000)) == "250 OK");
    std::string reply = c.read_reply(milliseconds(15000));
    CHECK(reply == "451 Error: upstream server " + upstream.address() +
                       " sent a reply longer than 65536 bytes; try again later");
    CHECK(seconds_since(start) < 10);
    long kib = rss_kb(proxy.child.pid());
    REQUIRE(kib > 0);  // read from /proc
    MESSAGE("smtpd resident after the flood: " << kib << " KiB; upstream sent "
                                               << upstream.bytes_sent() << " bytes");
    CHECK(kib < 64 * 1024);
    CHECK(c.command("QUIT") == "221 Bye");
  }
  SUBCASE("a drip of 220- lines: 451 when --reply-timeout ends the whole reply") {
    EndlessReplier upstream(EndlessReplier::Pace::Drip);
    auto proxy = start_proxy(upstream.address(), {"--reply-timeout", "2"});
    Client c = greeted_client(proxy);
    auto start = Clock::now();
    std::string reply = c.command("MAIL FROM:<a@example.com>", milliseconds(15000));
    CHECK(reply == "451 Error: upstream server " + upstream.address() +
                       " sent no greeting within the reply timeout; try again later");
    double took = seconds_since(start);
    CHECK(took >= 1.9);
    CHECK(took < 12);  // the probe at start may hold the one-at-a-time upstream for 2 s first
  }
}

TEST_CASE("an upstream reply of too many short lines gives 451") {
  ignore_sigpipe();
  // 201 lines of "220-x" are far below the byte limit, above the line limit.
  StandInUpstream server(4);
  // each connection (the proxy's probe at start, then the client's session) hears the lines
  server.start([](StandInUpstream::Connection& c) {
    std::string lines;
    for (int i = 0; i < 201; ++i) lines += "220-x\r\n";
    c.say(lines + "220 done");
    c.receive();  // until smtpd hangs up
  });
  std::string upstream = server.address();
  {
    auto proxy = start_proxy(upstream);
    Client c = greeted_client(proxy);
    CHECK(c.command("MAIL FROM:<a@example.com>", milliseconds(10000)) ==
          "451 Error: upstream server " + upstream +
              " sent a reply of more than 200 lines; try again later");
  }
}

TEST_SUITE_END();

}  // namespace upstream
}  // namespace smtpd_test
