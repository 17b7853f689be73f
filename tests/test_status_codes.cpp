// test_status_codes.cpp - ENHANCEDSTATUSCODES (RFC 2034, RFC 3463; --enhanced-status-codes):
// the channel's replies with and without it, then a real client (swaks) over a socket.
//
// All cases are in the test suite "status-codes":   tests/run_tests -ts='status-codes'
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace status_codes {

TEST_SUITE_BEGIN("status-codes");

inline ChannelConfig coded_config() {
  ChannelConfig config = test_config(100);
  config.enhanced_status_codes = true;
  return config;
}

TEST_CASE("after EHLO every reply but EHLO's and the 3xx carries its RFC 3463 code") {
  Session s(coded_config());
  CHECK(s.send("EHLO c\r\n") ==
        "250-test.example\r\n250-SIZE 100\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
        "250 HELP\r\n");
  CHECK(s.send("RCPT TO:<b@example.com>\r\n") == "503 5.5.1 Error: need MAIL command\r\n");
  CHECK(s.send("MAIL FROM:<a\x01@example.com>\r\n") ==
        "501 5.1.7 Error: control characters are not allowed in an address\r\n");
  CHECK(s.send("MAIL FROM:<a@example.com> BODY=9BIT\r\n") ==
        "501 5.5.4 Error: BODY can only be one of 7BIT, 8BITMIME\r\n");
  CHECK(s.send("MAIL FROM:<a@example.com> SIZE=1000\r\n") ==
        "552 5.3.4 Error: message size exceeds fixed maximum message size\r\n");
  CHECK(s.send("MAIL FROM:<a@example.com> FOO=1\r\n") ==
        "555 5.5.4 MAIL FROM parameters not recognized or not implemented\r\n");
  CHECK(s.send("MAIL FROM:<a@example.com>\r\n") == "250 2.1.0 OK\r\n");
  CHECK(s.send("RCPT TO:<b\x01@example.com>\r\n") ==
        "501 5.1.3 Error: control characters are not allowed in an address\r\n");
  CHECK(s.send("RCPT TO:<b@example.com>\r\n") == "250 2.1.5 OK\r\n");
  CHECK(s.send("DATA\r\n") == "354 End data with <CR><LF>.<CR><LF>\r\n");
  CHECK(s.send("Subject: x\r\n\r\nhi\r\n.\r\n").empty());
  s.deliver();
  CHECK(s.take() == "250 2.0.0 OK\r\n");
  CHECK(s.send("NOOP\r\nRSET\r\nFOO\r\nEXPN x\r\nVRFY <a@b>\r\nHELP\r\n") ==
        "250 2.0.0 OK\r\n250 2.0.0 OK\r\n500 5.5.2 Error: command \"FOO\" not recognized\r\n"
        "502 5.5.1 EXPN not implemented\r\n"
        "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        "250 2.0.0 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + std::string(200, 'x') + "\r\n.\r\n")
            .find("552 5.3.4 Error: Too much mail data\r\n") != std::string::npos);
  CHECK(s.send("QUIT\r\n") == "221 2.0.0 Bye\r\n");
}

TEST_CASE("a verdict keeps a code it has; one without gets its class, a 250 what it answers") {
  ChannelConfig config = coded_config();
  config.ask_envelope = true;  // MAIL and RCPT wait for the mode, as for a relay
  Session s(config);
  s.send("EHLO c\r\nMAIL FROM:<a@b>\r\n");
  s.channel.answer("250 Ok from upstream");
  CHECK(s.take() == "250 2.1.0 Ok from upstream\r\n");
  s.send("RCPT TO:<x@d>\r\n");
  s.channel.answer("550 5.1.1 no such user");
  CHECK(s.take() == "550 5.1.1 no such user\r\n");
  s.send("RCPT TO:<y@d>\r\n");
  s.channel.answer("450 mailbox busy");
  CHECK(s.take() == "450 4.0.0 mailbox busy\r\n");
  s.send("RCPT TO:<z@d>\r\n");
  s.channel.answer("");
  CHECK(s.take() == "250 2.1.5 OK\r\n");
  s.send("DATA\r\nx\r\n.\r\n");
  s.take();
  s.deliver("451 try again later");
  CHECK(s.take() == "451 4.3.0 try again later\r\n");
  s.channel.close_with(reply_closing("test.example", kClosingShutdown));
  CHECK(s.take() == "421 4.3.2 test.example Error: shutting down; try again later\r\n");
}

TEST_CASE("no codes before EHLO, after HELO, or without the option: replies stay Python's") {
  Session before(coded_config());
  CHECK(before.send("MAIL FROM:<a@b>\r\n") == "503 Error: send HELO first\r\n");
  CHECK(before.send("HELO c\r\nMAIL FROM:<a@b>\r\nFOO\r\n") ==
        "250 test.example\r\n250 OK\r\n500 Error: command \"FOO\" not recognized\r\n");
  Session plain;
  CHECK(plain.send("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nQUIT\r\n") ==
        "250-test.example\r\n250-8BITMIME\r\n250 HELP\r\n250 OK\r\n250 OK\r\n221 Bye\r\n");
}

TEST_CASE("has_enhanced_code and with_enhanced_code read and write RFC 3463's form") {
  CHECK(has_enhanced_code("250 2.1.0 OK"));
  CHECK(has_enhanced_code("550 5.7.1"));
  CHECK(has_enhanced_code("451 4.123.456 busy"));
  CHECK_FALSE(has_enhanced_code("250 OK"));
  CHECK_FALSE(has_enhanced_code("250 2.1 OK"));
  CHECK_FALSE(has_enhanced_code("250 2.1234.0 OK"));
  CHECK_FALSE(has_enhanced_code("250 1.2.3.4 x"));
  CHECK(with_enhanced_code("550", ReplyTo::Rcpt) == "550 5.0.0");
  CHECK(with_enhanced_code("334 VXNlcm5hbWU6", ReplyTo::Other) == "334 VXNlcm5hbWU6");
  CHECK(with_enhanced_code("250-first", ReplyTo::Other) == "250-first");
  CHECK(with_enhanced_code("250 HELP", ReplyTo::Hello) == "250 HELP");
}

TEST_CASE("swaks over a socket reads the codes; the session is what it is without them") {
  auto srv = start_smtpd({"-c", "sink", "--enhanced-status-codes"});
  auto r = swaks(srv);
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(r.out.find("<-  250-ENHANCEDSTATUSCODES") != std::string::npos);
  CHECK(r.out.find("<-  250 2.1.0 OK") != std::string::npos);
  CHECK(r.out.find("<-  250 2.1.5 OK") != std::string::npos);
  CHECK(r.out.find("<-  250 2.0.0 OK") != std::string::npos);
  CHECK(r.out.find("<-  221 2.0.0 Bye") != std::string::npos);
}

TEST_SUITE_END();

}  // namespace status_codes
}  // namespace smtpd_test
