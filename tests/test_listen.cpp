// test_listen.cpp - where the server listens: every address a host name resolves to, all on
// one port (listen_everywhere, called directly), then the built binary given localhost:0.
//
// All cases are in the test suite "listen":   tests/run_tests -ts='listen'
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace listening {

TEST_SUITE_BEGIN("listen");

// address_of - the one SocketAddress of a numeric IP address (port 0)
inline SocketAddress address_of(const std::string& ip) {
  std::string error;
  std::vector<SocketAddress> found = resolve_endpoint(Endpoint{ip, 0}, error);
  REQUIRE_MESSAGE(found.size() == 1, ip << ": " << error);
  return found.front();
}

// accepts_connections - a TCP connection to HOST:PORT completes (the kernel accepts it for a
// listening socket; no loop runs here to greet it)
inline bool accepts_connections(const std::string& host, int port) {
  try {
    Client::connect(host, port, nullptr, milliseconds(2000));
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

TEST_CASE("listen_everywhere binds every address on one port, port 0 too") {
  REQUIRE_MESSAGE(have_ipv6_loopback(), "this test needs the IPv6 loopback ::1");
  std::vector<SocketAddress> addresses{address_of("127.0.0.1"), address_of("::1"),
                                       address_of("127.0.0.2")};
  std::vector<Listener> listeners = listen_everywhere(addresses, "test:0", 0);
  REQUIRE(listeners.size() == 3);
  std::string port = listeners[0].bound.substr(listeners[0].bound.rfind(':') + 1);
  CHECK(listeners[0].bound == "127.0.0.1:" + port);
  CHECK(listeners[1].bound == "[::1]:" + port);
  CHECK(listeners[2].bound == "127.0.0.2:" + port);
  for (const char* host : {"127.0.0.1", "::1", "127.0.0.2"}) {
    INFO(host);
    CHECK(accepts_connections(host, std::stoi(port)));
  }
  SUBCASE("a fixed port taken on one of the addresses: a StartError naming that address") {
    std::vector<SocketAddress> again{address_of("127.0.0.3"), address_of("127.0.0.2")};
    auto fixed = static_cast<std::uint16_t>(std::stoi(port));
    std::string message;
    try {
      listen_everywhere(again, "both", fixed);
    } catch (const StartError& e) {
      message = e.what();
    }
    CHECK(starts_with(message, "cannot listen on 127.0.0.2:" + port + " (both): "));
  }
  SUBCASE("port 0 taken by someone else on a later address: another port is found") {
    std::vector<SocketAddress> again{address_of("127.0.0.2"), address_of("127.0.0.1")};
    std::vector<Listener> second = listen_everywhere(again, "test:0", 0);
    REQUIRE(second.size() == 2);
    CHECK(second[0].bound.substr(second[0].bound.rfind(':')) ==
          second[1].bound.substr(second[1].bound.rfind(':')));
    for (const Listener& l : second) close_socket(l.socket);
  }
  for (const Listener& l : listeners) close_socket(l.socket);
}

TEST_CASE("an address this machine lacks is left out, unless it is the first") {
  std::vector<SocketAddress> addresses{address_of("127.0.0.1"), address_of("192.0.2.1")};
  std::vector<Listener> listeners = listen_everywhere(addresses, "test:0", 0);
  CHECK(listeners.size() == 1);
  for (const Listener& l : listeners) close_socket(l.socket);
  std::vector<SocketAddress> reversed{address_of("192.0.2.1"), address_of("127.0.0.1")};
  CHECK_THROWS_AS(listen_everywhere(reversed, "test:0", 0), StartError);
}

// resolved_hosts - the numeric addresses `name` resolves to, in the resolver's order, each once
inline std::vector<std::string> resolved_hosts(const std::string& name) {
  std::string error;
  std::vector<std::string> hosts;
  for (const SocketAddress& a : resolve_endpoint(Endpoint{name, 0}, error)) {
    auto [host, ignored] = numeric_address(reinterpret_cast<const sockaddr*>(&a.storage), a.length);
    if (std::find(hosts.begin(), hosts.end(), host) == hosts.end()) hosts.push_back(host);
  }
  REQUIRE_MESSAGE(!hosts.empty(), name << " does not resolve: " << error);
  return hosts;
}

TEST_CASE("smtpd localhost:0 listens on just the addresses localhost resolves to, a line each") {
  std::vector<std::string> hosts = resolved_hosts("localhost");
  auto srv = start_smtpd({}, "localhost:0");
  INFO("localhost resolves to " << hosts.size() << " address(es); stderr: " << srv.stderr_text());
  // the lines are printed together, before the first client is served
  REQUIRE(srv.child.wait_output(srv.child.err, [&](const std::string& text) {
    return count(text, "listening on ") >= hosts.size();
  }));
  std::vector<std::string> want;
  for (const std::string& host : hosts)
    want.push_back((want.empty() ? "listening on " : "also listening on ") +
                   format_endpoint(host, static_cast<unsigned>(srv.port())));
  CHECK(lines_of(srv.stderr_text()) == want);
  for (const std::string& host : hosts) {
    CAPTURE(host);
    Client c = Client::connect(host, srv.port(), &srv);
    CHECK(starts_with(c.read_reply(), "220 "));
  }
  // and nowhere else: the loopback of a family localhost does not resolve to stays closed
  std::vector<std::string> others{"127.0.0.1"};
  if (have_ipv6_loopback()) others.push_back("::1");
  for (const std::string& other : others) {
    if (std::find(hosts.begin(), hosts.end(), other) != hosts.end()) continue;
    CAPTURE(other);
    CHECK_FALSE(accepts_connections(other, srv.port()));
  }
}

TEST_SUITE_END();

}  // namespace listening
}  // namespace smtpd_test
