// test_chunking.cpp - CHUNKING and BDAT (RFC 3030, --chunking): first the pure channel, then
// a real sender, Perl's Net::SMTP (bdat, bdatlast), against the server over a socket.
//
// All cases are in the test suite "chunking":   tests/run_tests -ts='chunking'
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace chunking {

TEST_SUITE_BEGIN("chunking");

// ==== The channel ====

inline ChannelConfig chunking_config(std::uint64_t size = 0) {
  ChannelConfig config = test_config(size);
  config.offer_chunking = true;
  return config;
}

// ready - a session with a sender and a recipient, waiting for the message
inline Session ready(ChannelConfig config = chunking_config()) {
  Session s(std::move(config));
  s.send("EHLO c\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n");
  return s;
}

TEST_CASE("without --chunking BDAT is unknown and EHLO is Python's; with it, CHUNKING is said") {
  Session plain;
  CHECK(plain.send("EHLO c\r\n") == "250-test.example\r\n250-8BITMIME\r\n250 HELP\r\n");
  CHECK(plain.send("BDAT 0 LAST\r\n") == "500 Error: command \"BDAT\" not recognized\r\n");
  Session s(chunking_config());
  CHECK(s.send("EHLO c\r\n") == "250-test.example\r\n250-8BITMIME\r\n250-CHUNKING\r\n250 HELP\r\n");
  CHECK(s.send("HELP BDAT\r\n") == "250 Syntax: BDAT size [LAST]\r\n");
}

TEST_CASE("BDAT chunks are joined into one message, byte for byte, dots and all") {
  Session s = ready();
  CHECK(s.send("BDAT 14\r\nSubject: hi\r\n\r") == "250 14 octets received\r\n");
  // the CRLF split across two chunks, a lone "." line and a dot at a line start stay as sent
  CHECK(s.send("BDAT 16\r\n\n.\r\n..two\r\nend\r\n") == "250 30 octets received\r\n");
  CHECK(s.send("BDAT 0 LAST\r\n").empty());  // the mode decides
  Envelope e = s.deliver();
  CHECK(e.data == "Subject: hi\n\n.\n..two\nend");
  CHECK(e.mailfrom == "a@example.com");
  CHECK(s.take() == "250 OK\r\n");
  CHECK(s.send("NOOP\r\n") == "250 OK\r\n");
}

TEST_CASE("a message sent with BDAT reads the same as one sent with DATA") {
  const std::string text = "From: a@example.com\r\nSubject: same\r\n\r\nline 1\r\nline 2\r\n";
  Session by_data = ready();
  by_data.send("DATA\r\n" + text + ".\r\n");
  Session by_bdat = ready();
  by_bdat.send("BDAT " + std::to_string(text.size()) + " LAST\r\n" + text);
  CHECK(by_bdat.deliver().data == by_data.deliver().data);
  Session no_line_end = ready();  // BDAT may end without a CRLF; a lone CR is kept
  no_line_end.send("BDAT 6 LAST\r\nx\r\ny\rz");
  CHECK(no_line_end.deliver().data == "x\ny\rz");
}

TEST_CASE("a refused BDAT is read to its end and thrown away, so the session stays in step") {
  Session s(chunking_config());
  CHECK(s.send("BDAT 12\r\nQUIT\r\nQUIT\r\nNOOP\r\n") ==
        "503 Error: send HELO first\r\n250 OK\r\n");
  s.send("EHLO c\r\n");
  CHECK(s.send("BDAT 6 LAST\r\nRSET\r\nNOOP\r\n") == "503 Error: need RCPT command\r\n250 OK\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\nBDAT 4 LAST\r\nQUIT") ==
        "250 OK\r\n503 Error: need RCPT command\r\n");
  CHECK_FALSE(s.channel.is_closing());
}

TEST_CASE("DATA after BDAT in one transaction is 503; RSET drops a partial message") {
  Session s = ready();
  CHECK(s.send("BDAT 3\r\nabc") == "250 3 octets received\r\n");
  CHECK(s.send("DATA\r\n") == "503 Error: DATA after BDAT in one transaction\r\n");
  CHECK(s.send("RSET\r\n") == "250 OK\r\n");
  s.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
  CHECK(s.send("BDAT 3 LAST\r\nxyz").empty());
  CHECK(s.deliver().data == "xyz");  // nothing of "abc"
  CHECK(s.take() == "250 OK\r\n");
  s.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
  CHECK(s.send("DATA\r\n") == "354 End data with <CR><LF>.<CR><LF>\r\n");  // a new transaction
}

TEST_CASE("past -s a BDAT message gets 552 once the sum passes it; later chunks get 503") {
  Session s = ready(chunking_config(10));
  CHECK(s.send("BDAT 6\r\n123456") == "250 6 octets received\r\n");
  CHECK(s.send("BDAT 6\r\n789012BDAT 2 LAST\r\nxyNOOP\r\n") ==
        "552 Error: Too much mail data\r\n503 Error: need RCPT command\r\n250 OK\r\n");
  s.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
  CHECK(s.send("BDAT 10 LAST\r\n1234567890").empty());  // exactly the limit is fine
  CHECK(s.deliver().data == "1234567890");
}

TEST_CASE("BDAT sizes that cannot be read get 501; LAST is the only word after the size") {
  Session s = ready();
  for (const char* bad : {"BDAT", "BDAT x", "BDAT -1", "BDAT 1e3", "BDAT 99999999999999999999",
                          "BDAT 3 FIRST", "BDAT 3 LAST more", "BDAT +3"}) {
    CAPTURE(bad);
    CHECK(s.send(std::string(bad) + "\r\n") == "501 Syntax: BDAT size [LAST]\r\n");
  }
  CHECK(s.send("bdat 2 last\r\nok").empty());
  CHECK(s.deliver().data == "ok");
}

TEST_CASE("pipelined BDAT chunks with commands between them are answered in order") {
  Session s(chunking_config());
  CHECK(s.send("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 5\r\nhello"
               "NOOP\r\nBDAT 7\r\n world\nRCPT TO:<e@f>\r\nBDAT 0 LAST\r\nQUIT\r\n")
            .find("250 OK\r\n250 OK\r\n250 5 octets received\r\n250 OK\r\n"
                  "250 12 octets received\r\n250 OK\r\n") != std::string::npos);
  Envelope e = s.deliver();
  CHECK(e.data == "hello world\n");
  CHECK(e.rcpttos == std::vector<std::string>{"c@d", "e@f"});
  CHECK(s.take() == "250 OK\r\n221 Bye\r\n");
}

TEST_CASE("a BDAT message goes through --reject data rules and the mode's verdict") {
  ChannelConfig config = chunking_config();
  config.refusals = std::make_shared<Refusals>(
      std::vector<Refusals::Rule>{{Refusals::Stage::Data, "*@c.test", -1, "554 no thanks"}}, 1);
  Session s(config);
  CHECK(s.send("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@c.test>\r\nBDAT 1 LAST\r\nz")
            .find("554 no thanks\r\n") != std::string::npos);
  s.send("MAIL FROM:<a@b>\r\nRCPT TO:<x@d.test>\r\nBDAT 1 LAST\r\nz");
  s.deliver("451 try later");
  CHECK(s.take() == "451 try later\r\n");
}

// ==== A real sender: Perl's Net::SMTP ====

// kNetSmtpBdat - perl script; argv: port. Sends one message in two BDAT chunks, the last
// with bdatlast, and prints each reply code. Net::SMTP 3.14 turns its bdat on only in
// mail(..., Bits => 'binary'), which needs BINARYMIME as well (smtpd does not offer it), so
// the script sets the flag that call would set; bdat and bdatlast then run as they are.
constexpr const char* kNetSmtpBdat = R"PL(
use strict; use Net::SMTP;
my $smtp = Net::SMTP->new('127.0.0.1', Port => $ARGV[0], Timeout => 10) or die "connect: $@";
print "chunking\n" if defined $smtp->supports('CHUNKING');
$smtp->mail('sender@example.com') or die 'MAIL ' . $smtp->message;
${*$smtp}{'net_smtp_chunking'} = 1;
$smtp->to('rcpt@example.com') or die 'RCPT ' . $smtp->message;
$smtp->bdat("Subject: sent with BDAT\r\n\r\n.first line\r\n") or die 'BDAT ' . $smtp->message;
print $smtp->code, "\n";
$smtp->bdatlast("second line\r\n") or die 'BDAT LAST ' . $smtp->message;
print $smtp->code, "\n";
$smtp->quit;
)PL";

TEST_CASE("Net::SMTP sends with bdat and bdatlast; the print-out is the message as sent") {
  auto srv = start_smtpd({"--chunking", "-d"});
  auto r =
      run_command({require_tool("perl", "perl"), "-e", kNetSmtpBdat, std::to_string(srv.port())});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(r.out == "chunking\n250\n250\n");
  REQUIRE(srv.wait_stdout(kEnd));
  CHECK(srv.stdout_text() ==
        std::string(kFollows) +
            "Subject: sent with BDAT\nX-Peer: 127.0.0.1\n\n.first line\nsecond line\n" + kEnd);
  REQUIRE(srv.wait_stderr("<- BDAT 13 LAST\n"));
  CHECK(srv.stderr_text().find("<- BDAT 40\n") != std::string::npos);
}

TEST_CASE("--timeout runs while a chunk's octets are read: a stalled BDAT hears 421") {
  auto srv = start_smtpd({"--chunking", "--timeout", "1"});
  Client c = srv.connect();
  REQUIRE(starts_with(c.read_reply(), "220 "));
  REQUIRE(starts_with(c.command("EHLO c"), "250-"));
  REQUIRE(c.command("MAIL FROM:<a@example.com>") == "250 OK");
  REQUIRE(c.command("RCPT TO:<b@example.com>") == "250 OK");
  REQUIRE(c.send("BDAT 100 LAST\r\nonly part of it"));
  Deadline deadline(milliseconds(5000));
  std::string reply = c.read_reply(milliseconds(5000));
  CHECK(starts_with(reply, "421 "));
  CHECK(reply.find(" Error: timeout exceeded") != std::string::npos);
  CHECK(c.wait_closed());
  CHECK_FALSE(deadline.expired());
}

TEST_SUITE_END();

}  // namespace chunking
}  // namespace smtpd_test
