// test_message_text.cpp - a message made a chunk at a time on its way out (so a large one
// costs little memory): what follows a message upstream waits until the whole of it has gone,
// even when the upstream answers before the message ends.
//
//   Fixture: EarlyAnswerer (a StandInUpstream that answers the message after its first bytes)
#include <doctest/doctest.h>

#include <atomic>

#include "test_support.hpp"

namespace smtpd_test {
namespace message_text {

TEST_SUITE_BEGIN("message-text");

// EarlyAnswerer - an upstream that answers "250 early" once 256 KiB of the message are in,
// then reads nothing until the test says the proxy has taken its next command in, then reads
// the rest. It keeps the lines of the message and the first command after it; each connection
// serves a sink's dialogue otherwise.
class EarlyAnswerer {
 public:
  EarlyAnswerer() {
    server_.start([this](StandInUpstream::Connection& c) { talk(c); },
                  StandInUpstream::Serving::OneAtATime, milliseconds(60000));
  }

  std::string address() const { return server_.address(); }
  void next_command_taken() { is_next_taken_ = true; }
  bool is_done() const { return is_done_; }
  bool has_command_after() const { return has_command_after_; }
  // what the upstream got: the message's lines (once is_done()) and the first command after
  // it (once has_command_after()), as the upstream's thread writes them before saying so
  const std::vector<std::string>& message_lines() const { return lines_; }
  const std::string& command_after() const { return command_after_; }

 private:
  void talk(StandInUpstream::Connection& c) {
    c.say("220 early ESMTP");
    bool has_message = false;
    while (std::optional<std::string> line = c.read_line()) {
      std::string verb = line->substr(0, 4);
      if (has_message && !has_command_after_) {
        command_after_ = *line;
        has_command_after_ = true;
      }
      if (verb == "QUIT") return c.say("221 Bye");
      if (verb != "DATA") {
        c.say(verb == "EHLO" ? "250 early" : "250 ok");
        continue;
      }
      c.say("354 go ahead");
      read_message(c);
      has_message = true;
    }
  }

  void read_message(StandInUpstream::Connection& c) {
    std::size_t bytes = 0;
    bool has_answered = false;
    while (std::optional<std::string> line = c.read_line()) {
      if (*line == ".") break;
      lines_.push_back(*line);
      bytes += line->size() + 2;
      if (has_answered || bytes < 256 * 1024) continue;
      c.say("250 early");
      has_answered = true;
      wait_until([&] { return is_next_taken_ || c.stopping(); }, milliseconds(30000));
    }
    is_done_ = true;
  }

  std::vector<std::string> lines_;
  std::string command_after_;
  std::atomic<bool> is_next_taken_{false};
  std::atomic<bool> is_done_{false};
  std::atomic<bool> has_command_after_{false};
  StandInUpstream server_;  // last: it stops before the members talk() uses
};

TEST_CASE("a command after a message the upstream answered early goes after the whole message") {
  ignore_sigpipe();
  EarlyAnswerer upstream;
  auto proxy = ServerProcess::launch(
      {"-n", "-d", "-c", "PureProxy", "--reply-timeout", "10", "127.0.0.1:0", upstream.address()});
  auto c = proxy.connect();
  REQUIRE(starts_with(c.read_reply(), "220 "));
  REQUIRE(starts_with(c.command("EHLO client.example"), "250"));
  REQUIRE(starts_with(c.command("MAIL FROM:<a@example.com>"), "250"));
  REQUIRE(starts_with(c.command("RCPT TO:<b@example.com>"), "250"));
  REQUIRE(starts_with(c.command("DATA"), "354"));
  // 24 MB: more than loopback's socket buffers and one chunk of the message hold, so most
  // of it is still to be made when the upstream answers
  const std::string line = std::string(97, 'x') + "\r\n";
  std::string message = "Subject: early\r\n\r\n";
  while (message.size() < 24u * 1000 * 1000) message += line;
  REQUIRE(c.send(message + ".\r\n", milliseconds(30000)));
  REQUIRE(c.read_reply(milliseconds(30000)) == "250 early");
  REQUIRE(c.send("MAIL FROM:<second@example.com>\r\n"));
  // -d traces each command line the proxy reads: once this one is traced, it waits at the proxy
  REQUIRE(proxy.wait_stderr("<- MAIL FROM:<second@example.com>", milliseconds(30000)));
  upstream.next_command_taken();
  std::string reply = c.read_reply(milliseconds(30000));
  REQUIRE(wait_until([&] { return upstream.is_done(); }, milliseconds(30000)));
  const std::vector<std::string>& got = upstream.message_lines();
  std::size_t mail_lines = 0;
  for (const std::string& l : got) mail_lines += l.find("MAIL FROM:") != std::string::npos;
  CHECK(mail_lines == 0);
  CHECK(got.size() == count(message, "\r\n") + 1);  // and X-Peer
  REQUIRE(upstream.has_command_after());
  CHECK(upstream.command_after() == "MAIL FROM:<second@example.com>");
  CHECK(reply == "250 ok");
  CHECK(c.command("QUIT") == "221 Bye");
}

TEST_SUITE_END();

}  // namespace message_text
}  // namespace smtpd_test
