// test_compat.cpp - the differences from Python 3.11's smtpd that the man page lists under
// COMPATIBILITY, each checked on the channel against what Python does, and is_loopback_host
// (which decides whether PureProxy warns of an open relay). Python's behaviour, as seen from
// `python3 -m smtpd -n -c DebuggingServer` on a loopback port, is quoted in each case.
//
// All cases are in the test suite "compat":   tests/run_tests -ts='compat'
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace compat {

TEST_SUITE_BEGIN("compat");

// ascii_only - every byte below 0x80
inline bool ascii_only(const std::string& text) {
  return std::all_of(text.begin(), text.end(),
                     [](char ch) { return static_cast<unsigned char>(ch) < 0x80; });
}

// Python: "220 HOST Python SMTP proxy version 0.3"
TEST_CASE("compat: the greeting names smtpd and its version, not Python's proxy") {
  Session s;
  CHECK(s.greeting == "220 test.example " + std::string(kVersion) + "\r\n");
  CHECK(starts_with(kVersion, "smtpd "));
  CHECK(s.greeting.find("Python") == std::string::npos);
}

// Python: "ma\u0131l FROM:<a@b>" (dotless i) is "MAIL" to str.upper() and gets 250 OK.
TEST_CASE("compat: verbs are upper-cased by ASCII rules only") {
  Session s;
  s.send("EHLO a\r\n");
  CHECK(s.send("ma\xc4\xb1l FROM:<a@b>\r\n") ==
        "500 Error: command \"MA\\xc4\\xb1L\" not recognized\r\n");
  CHECK(s.channel.mailfrom.empty());
  CHECK(s.send("mail from:<a@b>\r\n") == "250 OK\r\n");  // ASCII case is still ignored
}

// Python: the reply to "F\u00d6\u00d6 bar" fails to encode as ASCII; the connection drops.
TEST_CASE("compat: a valid UTF-8 but non-ASCII verb gets 500 and the session goes on") {
  Session s;
  CHECK(s.send("F\xc3\x96\xc3\x96 bar\r\n") ==
        "500 Error: command \"F\\xc3\\x96\\xc3\\x96\" not recognized\r\n");
  CHECK(s.send("NOOP\r\n") == "250 OK\r\n");
}

// Python: "MAIL FROM:<a@b> SIZE" raises AttributeError ('bool' has no isdigit); it drops.
TEST_CASE("compat: SIZE without a value gets 501 and the session goes on") {
  Session s(test_config(1000));
  s.send("EHLO a\r\n");
  CHECK(s.send("MAIL FROM:<a@b> SIZE\r\n") ==
        "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]\r\n");
  CHECK(s.channel.mailfrom.empty());
  CHECK(s.send("MAIL FROM:<a@b> SIZE=10\r\n") == "250 OK\r\n");
}

// Python: after "RCPT TO:<e@f>" (250) and "RCPT TO:<c@d> FOO=bar" (555), the message's
// rcpt_options are ['FOO=BAR'] and DebuggingServer prints "rcpt options: ['FOO=BAR']".
TEST_CASE("compat: RCPT parameters refused with 555 are not kept for the message") {
  Session s;
  s.send("EHLO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<e@f>\r\n");
  CHECK(s.send("RCPT TO:<c@d> FOO=bar\r\n") ==
        "555 RCPT TO parameters not recognized or not implemented\r\n");
  CHECK(s.send("DATA\r\nhi\r\n.\r\n") == "354 End data with <CR><LF>.<CR><LF>\r\n");
  Envelope e = s.deliver();
  CHECK(e.rcpttos == std::vector<std::string>{"e@f"});
  CHECK(e.rcpt_options.empty());
  CHECK(s.take() == "250 OK\r\n");
}

// Python encodes a reply as ASCII unless the transaction is SMTPUTF8, so a non-ASCII echo
// drops its connection; here the bytes are escaped as \xNN, and so are control characters.
TEST_CASE("compat: a reply that echoes part of a command is ASCII unless SMTPUTF8") {
  SUBCASE("outside an SMTPUTF8 transaction, also with -u") {
    for (bool utf8 : {false, true}) {
      CAPTURE(utf8);
      Session s(test_config(0, utf8));
      std::string replies = s.send("EHLO a\r\n");
      CHECK(s.send("VRFY <<caf\xc3\xa9>>\r\n") == "502 Could not VRFY <<caf\\xc3\\xa9>>\r\n");
      CHECK(s.send("F\x01O\r\n") == "500 Error: command \"F\\x01O\" not recognized\r\n");
      for (const char* line : {"\xe2\x9c\x93\r\n", "x\xc3\xa9 y\r\n", "VRFY \xc3\xa9\r\n"})
        replies += s.send(line);
      CHECK(ascii_only(replies));
    }
  }
  SUBCASE("in an SMTPUTF8 transaction the echo is UTF-8, as in Python") {
    Session s(test_config(0, true));
    REQUIRE(s.send("EHLO a\r\nMAIL FROM:<a@b> SMTPUTF8\r\n").find("250 OK\r\n") !=
            std::string::npos);
    CHECK(s.send("VRFY <<caf\xc3\xa9>>\r\n") == "502 Could not VRFY <<caf\xc3\xa9>>\r\n");
    CHECK(s.send("F\xc3\x96\xc3\x96\r\n") ==
          "500 Error: command \"F\xc3\x96\xc3\x96\" not recognized\r\n");
    CHECK(s.send("RSET\r\n") == "250 OK\r\n");  // the transaction ends: ASCII again
    CHECK(s.send("F\xc3\x96\xc3\x96\r\n") ==
          "500 Error: command \"F\\xc3\\x96\\xc3\\x96\" not recognized\r\n");
  }
}

TEST_CASE("compat: over a real socket a non-ASCII verb is answered in ASCII, then served") {
  auto srv = start_smtpd();
  Client c = greeted_client(srv);
  CHECK(c.command("F\xc3\x96\xc3\x96 bar") ==
        "500 Error: command \"F\\xc3\\x96\\xc3\\x96\" not recognized");
  CHECK(c.command("NOOP") == "250 OK");
}

TEST_CASE("is_loopback_host: 127.0.0.0/8 as a dotted quad, ::1 and localhost only") {
  for (const char* host : {"127.0.0.1", "127.1.2.3", "127.255.255.255", "::1", "localhost"})
    CHECK_MESSAGE(is_loopback_host(host), host);
  for (const char* host :
       {"127.example.net", "127.0.0.1.example.net", "127.0.0", "127.0.0.1.", "127.0.0.256",
        "127..0.1", "1270.0.0.1", "128.0.0.1", "0.0.0.0", "", "::", "localhost.example.net"})
    CHECK_MESSAGE(!is_loopback_host(host), host);
}

TEST_SUITE_END();

}  // namespace compat
}  // namespace smtpd_test
