// test_pipelining.cpp - --pipelining (RFC 2920): EHLO announces PIPELINING only when asked; a
// proxy answers a pipelined group together; swaks really pipelines against it, and a client
// that does not (Postfix's smtp-source) is served as before.
//
// All cases are in the test suite "pipelining":   tests/run_tests -ts='pipelining'
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace pipelining {

TEST_SUITE_BEGIN("pipelining");

TEST_CASE("--pipelining makes EHLO announce PIPELINING (AUTH stays unknown); off by default") {
  CHECK_FALSE(settings_of({}).server.channel.offer_pipelining);
  ChannelConfig config = test_config();
  config.offer_pipelining = settings_of({"--pipelining"}).server.channel.offer_pipelining;
  Session s(config);
  CHECK(s.send("EHLO c\r\n") ==
        "250-test.example\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 HELP\r\n");
  CHECK(s.send("AUTH LOGIN\r\n") == "500 Error: command \"AUTH\" not recognized\r\n");
}

// first_read_after - send one pipelined group in a single write and return what comes back in
// the first read after the first byte arrives
inline std::string first_read_after(Client& c, const std::string& group) {
  REQUIRE(c.send(group));
  pollfd p{c.fd(), POLLIN, 0};
  REQUIRE(::poll(&p, 1, static_cast<int>(kWait.count())) == 1);
  c.poll_once();
  return c.pending();
}

TEST_CASE("--pipelining: a proxy answers a pipelined group in one write") {
  auto upstream = start_smtpd({"-c", "sink"});
  auto proxy = start_proxy(upstream.address(), {"--pipelining"});
  Client c = proxy.connect();
  read_greeting(c);
  CHECK(c.command("EHLO app").find("250-PIPELINING") != std::string::npos);
  // Each MAIL and RCPT waits for the upstream's verdict, one after the other; the replies wait
  // with them until the group is answered.
  std::string replies = first_read_after(
      c,
      "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n"
      "DATA\r\n");
  CHECK(replies == "250 OK\r\n250 OK\r\n250 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
  CHECK(c.command("Subject: x\r\n\r\nbody\r\n.") == "250 OK");
}

TEST_CASE("swaks --pipeline sends MAIL, RCPT and DATA at once to --pipelining; the mail arrives") {
  auto srv = start_smtpd({"-c", "sink", "--json", "--pipelining"});
  auto r = swaks(srv, {"--pipeline"});
  INFO(r.describe());
  CHECK(r.ok());
  // swaks shows what it sent (" -> ") and heard ("<-  "): all three commands, then the replies
  CHECK(r.out.find(" -> MAIL FROM:<app@example.com>\n -> RCPT TO:<user@example.com>\n"
                   " -> DATA\n<-  250 OK\n<-  250 OK\n<-  354 ") != std::string::npos);
  REQUIRE(srv.wait_stdout("\n"));
  CHECK(count(srv.stdout_text(), "\"rcpttos\": [\"user@example.com\"]") == 1);
}

// smtp_source - Postfix's smtp-source: N messages over S sessions (it never pipelines)
inline CommandResult smtp_source(const ServerProcess& srv, int messages, int sessions) {
  std::string path = "/usr/sbin/smtp-source";
  if (::access(path.c_str(), X_OK) != 0) path = require_tool("smtp-source", "postfix");
  return run_command(
      {path, "-c", "-m", std::to_string(messages), "-s", std::to_string(sessions), "-l", "500",
       "-f", "app@example.com", "-t", "user@example.com", srv.address()},
      milliseconds(30000));
}

TEST_CASE("--pipelining: smtp-source, which waits for each reply, gets all 40 messages through") {
  auto srv = start_smtpd({"-c", "sink", "--json", "--pipelining", "-d"});
  auto r = smtp_source(srv, 40, 4);
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(srv.wait_stdout("\n", 40));
  CHECK(count(srv.stdout_text(), "\"mailfrom\": \"app@example.com\"") == 40);
}

TEST_SUITE_END();

}  // namespace pipelining
}  // namespace smtpd_test
