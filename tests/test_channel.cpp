// test_channel.cpp - the channel as a pure state machine: bytes in, replies and messages out.
// No sockets here. Expected replies are smtpd.py 3.11's, byte for byte, except where the
// man page's COMPATIBILITY section says we follow RFC 5321 instead.
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace {

using smtpd_test::made;
using smtpd_test::message_with;
using smtpd_test::parse_args;
using smtpd_test::Session;
using smtpd_test::test_config;

const char* const kEhloNoSize = "250-test.example\r\n250-8BITMIME\r\n250 HELP\r\n";

}  // namespace

TEST_CASE("the greeting names the host and the program") {
  Session s;
  CHECK(s.greeting == "220 test.example smtpd 1.0.0\r\n");
  CHECK(s.channel.smtp_state == Channel::State::Command);
  CHECK(s.channel.seen_greeting.empty());
  CHECK(s.channel.fqdn == "test.example");
  CHECK(s.channel.peer == "192.0.2.7");
}

TEST_CASE("HELO answers 250 with the host name and records the greeting") {
  Session s;
  CHECK(s.send("HELO client.example\r\n") == "250 test.example\r\n");
  CHECK(s.channel.seen_greeting == "client.example");
  CHECK_FALSE(s.channel.extended_smtp);
}

TEST_CASE("EHLO lists the extensions") {
  SUBCASE("without a size limit there is no SIZE line") {
    Session s;
    CHECK(s.send("EHLO c\r\n") == kEhloNoSize);
    CHECK(s.channel.extended_smtp);
  }
  SUBCASE("with a size limit and SMTPUTF8") {
    Session s(test_config(1000, true));
    CHECK(s.send("ehlo c\r\n") ==
          "250-test.example\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 HELP\r\n");
  }
}

TEST_CASE("HELO and EHLO without a host name answer 501") {
  Session s;
  CHECK(s.send("HELO\r\n") == "501 Syntax: HELO hostname\r\n");
  CHECK(s.send("EHLO \r\n") == "501 Syntax: EHLO hostname\r\n");
  CHECK(s.channel.seen_greeting.empty());
}

TEST_CASE("a second HELO resets the transaction like RSET (RFC 5321 4.1.4)") {
  Session s;
  s.send("HELO a\r\nMAIL FROM:<x@y>\r\nRCPT TO:<z@y>\r\n");
  CHECK(s.channel.rcpttos.size() == 1);
  CHECK(s.send("EHLO b\r\n") == kEhloNoSize);
  CHECK(s.channel.mailfrom.empty());
  CHECK(s.channel.rcpttos.empty());
  CHECK(s.channel.seen_greeting == "b");
  CHECK(s.send("HELO c\r\n") == "250 test.example\r\n");
  CHECK_FALSE(s.channel.extended_smtp);
}

TEST_CASE("an empty line answers 500 bad syntax") {
  Session s;
  CHECK(s.send("\r\n") == "500 Error: bad syntax\r\n");
}

TEST_CASE("an unknown verb is named in the 500 reply, upper-cased") {
  Session s;
  CHECK(s.send("frob x\r\n") == "500 Error: command \"FROB\" not recognized\r\n");
}

TEST_CASE("commands that are not valid UTF-8 answer 500, and the session goes on") {
  Session s;
  CHECK(s.send("HELO \xff\xfe\r\n") == "500 Error: command is not valid UTF-8\r\n");
  CHECK(s.send("NOOP\r\n") == "250 OK\r\n");
}

TEST_CASE("NOOP, RSET and DATA take no argument") {
  Session s;
  CHECK(s.send("NOOP\r\n") == "250 OK\r\n");
  CHECK(s.send("NOOP x\r\n") == "501 Syntax: NOOP\r\n");
  CHECK(s.send("RSET x\r\n") == "501 Syntax: RSET\r\n");
  s.send("HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
  CHECK(s.send("DATA x\r\n") == "501 Syntax: DATA\r\n");
}

TEST_CASE("MAIL, RCPT and DATA before HELO answer 503") {
  Session s;
  CHECK(s.send("MAIL FROM:<a@b>\r\n") == "503 Error: send HELO first\r\n");
  CHECK(s.send("RCPT TO:<a@b>\r\n") == "503 Error: send HELO first\r\n");
  CHECK(s.send("DATA\r\n") == "503 Error: send HELO first\r\n");
}

TEST_CASE("the transaction is checked in order") {
  Session s;
  s.send("HELO a\r\n");
  CHECK(s.send("RCPT TO:<a@b>\r\n") == "503 Error: need MAIL command\r\n");
  CHECK(s.send("DATA\r\n") == "503 Error: need RCPT command\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\n") == "250 OK\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\n") == "503 Error: nested MAIL command\r\n");
  CHECK(s.send("DATA\r\n") == "503 Error: need RCPT command\r\n");
}

TEST_CASE("MAIL syntax errors name the syntax, with parameters after EHLO") {
  Session helo;
  helo.send("HELO a\r\n");
  CHECK(helo.send("MAIL\r\n") == "501 Syntax: MAIL FROM: <address>\r\n");
  CHECK(helo.send("MAIL TO:<a@b>\r\n") == "501 Syntax: MAIL FROM: <address>\r\n");
  CHECK(helo.send("MAIL FROM:<a@b> SIZE=10\r\n") == "501 Syntax: MAIL FROM: <address>\r\n");
  Session ehlo;
  ehlo.send("EHLO a\r\n");
  CHECK(ehlo.send("MAIL FROM:\r\n") ==
        "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]\r\n");
  CHECK(ehlo.send("MAIL FROM:<a@b> =x\r\n") ==
        "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]\r\n");
  CHECK(ehlo.send("MAIL FROM:<a@b> SIZE=\r\n") ==
        "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]\r\n");
}

TEST_CASE("MAIL parameters: BODY, SIZE, SMTPUTF8 and unknown ones") {
  Session s(test_config(1000, false));
  s.send("EHLO a\r\n");
  CHECK(s.send("MAIL FROM:<a@b> BODY=BINARY\r\n") ==
        "501 Error: BODY can only be one of 7BIT, 8BITMIME\r\n");
  CHECK(s.send("MAIL FROM:<a@b> SIZE=1001\r\n") ==
        "552 Error: message size exceeds fixed maximum message size\r\n");
  CHECK(s.send("MAIL FROM:<a@b> SIZE=abc\r\n") ==
        "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]\r\n");
  CHECK(s.send("MAIL FROM:<a@b> SIZE\r\n") ==
        "501 Syntax: MAIL FROM: <address> [SP <mail-parameters>]\r\n");
  CHECK(s.send("MAIL FROM:<a@b> SMTPUTF8\r\n") ==
        "555 MAIL FROM parameters not recognized or not implemented\r\n");
  CHECK(s.send("MAIL FROM:<a@b> size=1000 body=8bitmime\r\n") == "250 OK\r\n");
  CHECK(s.channel.mail_options == std::vector<std::string>{"SIZE=1000", "BODY=8BITMIME"});
  CHECK(s.channel.mailfrom == "a@b");
}

TEST_CASE("SMTPUTF8 is accepted only when enabled, and takes no value") {
  Session s(test_config(0, true));
  s.send("EHLO a\r\n");
  CHECK(s.send("MAIL FROM:<a@b> SMTPUTF8=yes\r\n") == "501 Error: SMTPUTF8 takes no arguments\r\n");
  CHECK(s.send("MAIL FROM:<ñ@b> SMTPUTF8\r\n") == "250 OK\r\n");
  CHECK(s.channel.require_smtputf8);
  CHECK(s.channel.mailfrom == "ñ@b");
}

TEST_CASE("a huge SIZE is refused, not overflowed") {
  Session s(test_config(1000));
  s.send("EHLO a\r\n");
  CHECK(s.send("MAIL FROM:<a@b> SIZE=99999999999999999999999\r\n") ==
        "552 Error: message size exceeds fixed maximum message size\r\n");
}

TEST_CASE("the null sender <> is accepted") {
  Session s;
  s.send("HELO a\r\n");
  CHECK(s.send("MAIL FROM:<>\r\n") == "250 OK\r\n");
  CHECK(s.channel.mailfrom == "<>");
}

TEST_CASE("RCPT collects recipients and refuses parameters") {
  Session s;
  s.send("EHLO a\r\nMAIL FROM:<a@b>\r\n");
  CHECK(s.send("RCPT TO:<c@d>\r\n") == "250 OK\r\n");
  CHECK(s.send("rcpt to: e@f\r\n") == "250 OK\r\n");
  CHECK(s.send("RCPT TO:<g@h> NOTIFY=NEVER\r\n") ==
        "555 RCPT TO parameters not recognized or not implemented\r\n");
  CHECK(s.send("RCPT FROM:<g@h>\r\n") ==
        "501 Syntax: RCPT TO: <address> [SP <mail-parameters>]\r\n");
  CHECK(s.channel.rcpttos == std::vector<std::string>{"c@d", "e@f"});
}

TEST_CASE("RSET clears the transaction but keeps the greeting") {
  Session s;
  s.send("HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n");
  CHECK(s.send("RSET\r\n") == "250 OK\r\n");
  CHECK(s.channel.mailfrom.empty());
  CHECK(s.channel.rcpttos.empty());
  CHECK(s.channel.seen_greeting == "a");
}

TEST_CASE("HELP lists the verbs, or the syntax of one") {
  Session s;
  CHECK(s.send("HELP\r\n") ==
        "250 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY\r\n");
  CHECK(s.send("HELP mail\r\n") == "250 Syntax: MAIL FROM: <address>\r\n");
  CHECK(s.send("HELP BOGUS\r\n") ==
        "501 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY\r\n");
  s.send("EHLO a\r\n");
  CHECK(s.send("HELP RCPT\r\n") == "250 Syntax: RCPT TO: <address> [SP <mail-parameters>]\r\n");
}

TEST_CASE("VRFY and EXPN") {
  Session s;
  CHECK(s.send("VRFY\r\n") == "501 Syntax: VRFY <address>\r\n");
  CHECK(s.send("VRFY <a@b>\r\n") ==
        "252 Cannot VRFY user, but will accept message and attempt delivery\r\n");
  CHECK(s.send("VRFY <<x>>\r\n") == "502 Could not VRFY <<x>>\r\n");
  CHECK(s.send("EXPN list\r\n") == "502 EXPN not implemented\r\n");
}

TEST_CASE("QUIT answers 221 and the channel closes, ignoring what follows") {
  Session s;
  CHECK(s.send("QUIT now\r\nNOOP\r\n") == "221 Bye\r\n");
  CHECK(s.channel.is_closing());
  CHECK_FALSE(s.channel.wants_input());
}

TEST_CASE("command lines: 512 bytes, more for MAIL after EHLO with SIZE and SMTPUTF8") {
  std::string local(600, 'a');
  SUBCASE("a line over 512 bytes answers 500") {
    Session s;
    CHECK(s.send("NOOP " + std::string(508, 'x') + "\r\n") == "500 Error: line too long\r\n");
    CHECK(s.send("HELO " + std::string(507, 'x') + "\r\n") == "250 test.example\r\n");
  }
  SUBCASE("MAIL may be 538 bytes with SIZE, 548 with SMTPUTF8 too") {
    Session s(test_config(1000, true));
    s.send("EHLO a\r\n");
    std::string prefix = "MAIL FROM:<";
    std::string addr(548 - prefix.size() - 3, 'a');
    CHECK(s.send(prefix + addr + "@b>\r\n") == "250 OK\r\n");
    s.send("RSET\r\n");
    CHECK(s.send(prefix + addr + "a@b>\r\n") == "500 Error: line too long\r\n");
  }
  SUBCASE("an endless line is dropped as it comes, then refused") {
    Session s;
    for (int i = 0; i < 100; ++i) s.send(std::string(10000, 'x'));
    CHECK(s.channel.unread_input().size() < 1000);
    CHECK(s.send("\r\nNOOP\r\n") == "500 Error: line too long\r\n250 OK\r\n");
  }
}

TEST_CASE("a CRLF split across two reads still ends the line") {
  Session s;
  CHECK(s.send("NOOP\r") == "");
  CHECK(s.send("\nNOOP\r\n") == "250 OK\r\n250 OK\r\n");
}

TEST_CASE("a whole message: dot-unstuffing, CRLF to LF, and the envelope") {
  Session s;
  s.send("EHLO a\r\nMAIL FROM:<a@b> BODY=8BITMIME\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\n");
  CHECK(s.send("DATA\r\n") == "354 End data with <CR><LF>.<CR><LF>\r\n");
  CHECK(s.channel.smtp_state == Channel::State::Data);
  CHECK(s.send("Subject: x\r\n\r\n..leading dot\r\n.\r\n") == "");
  CHECK(s.channel.has_message());
  CHECK_FALSE(s.channel.wants_input());
  Envelope e = s.deliver();
  CHECK(e.peer == "192.0.2.7");
  CHECK(e.mailfrom == "a@b");
  CHECK(e.rcpttos == std::vector<std::string>{"c@d", "e@f"});
  CHECK(e.mail_options == std::vector<std::string>{"BODY=8BITMIME"});
  CHECK(e.data == "Subject: x\n\n.leading dot");
  CHECK(s.take() == "250 OK\r\n");
  CHECK(s.channel.smtp_state == Channel::State::Command);
  CHECK(s.channel.mailfrom.empty());
  CHECK(s.channel.rcpttos.empty());
}

TEST_CASE("the mode's reply is sent instead of 250 OK") {
  Session s;
  s.send("HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n");
  s.deliver("451 try later");
  CHECK(s.take() == "451 try later\r\n");
}

TEST_CASE("a dot alone right after 354 ends an empty message (RFC 5321 4.1.1.4)") {
  Session s;
  s.send("HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n.\r\n");
  CHECK(s.deliver().data == "");
}

TEST_CASE("end of data is found however the bytes are split") {
  std::string dialogue =
      "HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
      "one\r\n.two\r\n..\r\n.\r\r\n\r\n.x\r\n.\r\nNOOP\r\n";
  for (std::size_t piece = 1; piece <= 7; ++piece) {
    CAPTURE(piece);
    Session s;
    std::string replies;
    for (std::size_t i = 0; i < dialogue.size(); i += piece) {
      replies += s.send(dialogue.substr(i, piece));
      if (s.channel.has_message()) {
        CHECK(s.deliver().data == "one\ntwo\n.\n\r\n\nx");
        replies += s.take();
      }
    }
    CHECK(replies ==
          "250 test.example\r\n250 OK\r\n250 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
          "250 OK\r\n250 OK\r\n");
  }
}

TEST_CASE("commands pipelined behind DATA wait until the message is decided") {
  Session s;
  s.send("HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\nMAIL FROM:<e@f>\r\n");
  CHECK(s.channel.has_message());
  CHECK(s.channel.mailfrom == "a@b");  // the second MAIL is not read yet
  s.deliver();
  CHECK(s.take() == "250 OK\r\n250 OK\r\n");
  CHECK(s.channel.mailfrom == "e@f");
}

TEST_CASE("too much data answers 552 and returns to command state") {
  Session s(test_config(10));
  s.send("HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n");
  SUBCASE("exactly the limit is accepted") {
    s.send("12345678\r\n.\r\n");  // 8 bytes, plus no CRLF counted before the final dot
    CHECK(s.deliver().data == "12345678");
  }
  SUBCASE("one byte more is refused") {
    CHECK(s.send("12345678901\r\n.\r\n") == "552 Error: Too much mail data\r\n");
    CHECK_FALSE(s.channel.has_message());
    CHECK(s.channel.smtp_state == Channel::State::Command);
    CHECK(s.send("NOOP\r\n") == "250 OK\r\n");
    CHECK(s.send("DATA\r\n") == "503 Error: need RCPT command\r\n");
  }
  SUBCASE("a huge message is not kept in memory") {
    for (int i = 0; i < 200; ++i) s.send(std::string(5000, 'x') + "\r\n");
    CHECK(s.channel.received_data().size() <= 12);
    CHECK(s.send(".\r\n") == "552 Error: Too much mail data\r\n");
  }
}

TEST_CASE("Python's address parser, case by case") {
  // Expected values were produced by Python 3.11's email._header_value_parser as smtpd.py's
  // _getaddr calls it; "refused" rows are the inputs where Python raises.
  struct Row {
    const char* input;
    bool parsed;
    const char* address;
    const char* rest;
  };
  const Row rows[] = {
      {"<foo@bar.com>", true, "foo@bar.com", ""},
      {"foo@bar.com", true, "foo@bar.com", ""},
      {"<foo@bar.com> SIZE=20", true, "foo@bar.com", "SIZE=20"},
      {"<>", true, "<>", ""},
      {"<> SIZE=1", true, "<>", " SIZE=1"},
      {"foo", true, "foo", ""},
      {"<foo>", true, "foo", ""},
      {"\"a b\"@x", true, "\"a b\"@x", ""},
      {"\"ab\"@x", true, "ab@x", ""},
      {"<\"a b\"@x>", true, "\"a b\"@x", ""},
      {"a.b@x", true, "a.b@x", ""},
      {"a..b@x", true, "a..b@x", ""},
      {".a@x", true, ".a@x", ""},
      {"a.@x", true, "a.@x", ""},
      {"<@route:a@x>", true, "a@x", ""},
      {"<@r1,@r2:a@x>", true, "a@x", ""},
      {"a@[1.2.3.4]", true, "a@[1.2.3.4]", ""},
      {"a @ x", true, "a@x", ""},
      {"a(comment)@x", true, "a@x", ""},
      {" <a@x>", true, "a@x", ""},
      {"<a@x", true, "a@x", ""},
      {"<a@x>>", true, "a@x", ">"},
      {"a@x>", true, "a@x", ">"},
      {"<a@ x>", true, "a@x", ""},
      {"<a@x>SIZE=1", true, "a@x", "SIZE=1"},
      {"<a@x> junk", true, "a@x", "junk"},
      {"a@x y", true, "a@x", "y"},
      {"a\"b\"@x", true, "ab@x", ""},
      {"\"a\\\"b\"@x", true, "\"a\\\"b\"@x", ""},
      {"é@x", true, "é@x", ""},
      {"<é@x>", true, "é@x", ""},
      {"a@x(c)", true, "a@x", ""},
      {"<a@x> (c) SIZE=1", true, "a@x", "SIZE=1"},
      {"<>>", true, "<>", ">"},
      {"a b@x", true, "\"a b\"@x", ""},
      {"\"a.b\"@x", true, "a.b@x", ""},
      {"\"a@b\"@x", true, "\"a@b\"@x", ""},
      {"a,b@x", true, "a", ",b@x"},
      {"a;b@x", true, "a", ";b@x"},
      {"a@b,c", true, "a@b", ",c"},
      {"<a@b,c>", true, "a@b", ",c>"},
      {"a  b@x", true, "\"a b\"@x", ""},
      {"a (c) b@x", true, "\"a b\"@x", ""},
      {"a . b@x", true, "a.b@x", ""},
      {"\"a  b\"@x", true, "\"a  b\"@x", ""},
      {"a@ [ 1.2.3.4 ] x", true, "a@[1.2.3.4]", "x"},
      {"a@x . y", true, "a@x.y", ""},
      {"a@x.y z", true, "a@x.y", "z"},
      {"(c)a@x", true, "a@x", ""},
      {"\"a\".\"b\"@x", true, "a.b@x", ""},
      {"a.\"b c\"@x", true, "\"a.b c\"@x", ""},
      {"<a@x>(c)", true, "a@x", ""},
      {"<a@x> x", true, "a@x", "x"},
      {"<a@x>\t y", true, "a@x", "y"},
      {"a\\b@x", true, "\"a\\\\b\"@x", ""},
      {"\"a\"b@x", true, "ab@x", ""},
      {"a@x  ", true, "a@x", ""},
      {"a@(c)x", true, "a@x", ""},
      {"\"\"@x", true, "@x", ""},
      {"<\"\"@x>", true, "\"\"@x", ""},
      {"<a@b>,", true, "a@b", ","},
      {"<@a,@b:c@d>", true, "c@d", ""},
      {"<@a:c>", true, "c", ""},
      {"<,@a:c@d>", true, "c@d", ""},
      {"a@x;", true, "a@x", ";"},
      {"<a@x\x0b>", true, "a@x", ""},
      {"a@[1.2]x", true, "a@[1.2]", "x"},
      {"a(b@x", true, "a", ""},
      {"\"abc@x", true, "\"abc@x\"", ""},
      {"a.b .c@x", true, "a.b.c@x", ""},
      {"<<a@x>>", false, "", ""},
      {"a@x.", false, "", ""},
      {"a@.x", false, "", ""},
      {"@x", false, "", ""},
      {"a@", false, "", ""},
      {"a@@x", false, "", ""},
      {"<", false, "", ""},
      {"a@[x y]", false, "", ""},
      {"a@b..c", false, "", ""},
      {"<@>", false, "", ""},
      {"<@a>", false, "", ""},
      {"<a@b.>", false, "", ""},
      {"eggs@example", true, "eggs@example", ""},
      {"<eggs@example> SIZE=10 BODY=8BITMIME", true, "eggs@example", "SIZE=10 BODY=8BITMIME"},
      {"x@y SMTPUTF8", true, "x@y", "SMTPUTF8"},
      {"<ñ@ü.de>", true, "ñ@ü.de", ""},
      // U+E870 (private use) is kept byte for byte, as Python keeps it; a terminal shows it as
      // nothing, Python's repr as '\ue870' (fuzz/fuzz_address found it)
      {"<a@\xee\xa1\xb0n2_>", true, "a@\xee\xa1\xb0n2_", ""},
      {"a@\xee\xa1\xb0n2_.\xc2\x85", true, "a@\xee\xa1\xb0n2_.", ""},
      {"a@\xee\xa1\xb0n2_.", false, "", ""},
  };
  for (const Row& row : rows) {
    std::string input = row.input, want = row.address;
    CAPTURE(input);
    CAPTURE(want);
    std::optional<ParsedAddress> got = parse_address(row.input);
    REQUIRE(got.has_value() == row.parsed);
    if (!got) continue;
    CHECK(got->address == row.address);
    CHECK(got->rest == row.rest);
  }
}

TEST_CASE("Python string helpers") {
  CHECK(python_strip("  \t a b \x0b\r\n") == "a b");
  CHECK(python_strip("\xc2\xa0x\xe3\x80\x80") == "x");  // U+00A0 and U+3000 are spaces too
  CHECK(python_split(" a  b\tc ") == std::vector<std::string>{"a", "b", "c"});
  CHECK(python_repr("BODY=8BITMIME") == "'BODY=8BITMIME'");
  CHECK(python_repr("it's") == "\"it's\"");
  CHECK(python_list_repr({"A", "B=1"}) == "['A', 'B=1']");
  CHECK(is_valid_utf8("h\xc3\xa9llo"));
  CHECK_FALSE(is_valid_utf8("\xc0\xaf"));      // overlong
  CHECK_FALSE(is_valid_utf8("\xed\xa0\x80"));  // surrogate
}

TEST_CASE("DebuggingServer's layout: options, X-Peer after the headers, raw lines") {
  Envelope e;
  e.peer = "127.0.0.1";
  e.mail_options = {"BODY=8BITMIME"};
  e.data = "From: a\nSubject: b\n\nbody\rline\r\nend";
  CHECK(format_debug_message(e) ==
        "---------- MESSAGE FOLLOWS ----------\n"
        "mail options: ['BODY=8BITMIME']\n"
        "From: a\nSubject: b\nX-Peer: 127.0.0.1\n\nbody\nline\nend\n"
        "------------ END MESSAGE ------------\n");
  e.mail_options.clear();
  e.data = "no body at all";
  CHECK(format_debug_message(e) ==
        "---------- MESSAGE FOLLOWS ----------\nno body at all\n"
        "------------ END MESSAGE ------------\n");
}

TEST_CASE("command line: defaults, classes and addresses") {
  CommandLine plain = parse_args({});
  REQUIRE(plain.settings);
  CHECK(plain.settings->mode == ModeKind::Debugging);
  CHECK(plain.settings->server.channel.data_size_limit == 33554432);
  CHECK(plain.settings->local.host == "localhost");
  CHECK(plain.settings->local.port == 8025);
  CHECK(plain.settings->remote.port == 25);
  CHECK(plain.settings->setuid);
  CommandLine full =
      parse_args({"-n", "-c", "smtpd.SMTPServer", "-s", "0", "-u", "[::1]:0", "h:2525"});
  REQUIRE(full.settings);
  CHECK(full.settings->mode == ModeKind::Sink);
  CHECK(full.settings->server.channel.data_size_limit == 0);
  CHECK(full.settings->server.channel.enable_smtputf8);
  CHECK(full.settings->local.host == "::1");
  CHECK(full.settings->remote.host == "h");
  CHECK(full.settings->remote.port == 2525);
  CHECK(parse_args({"-c", "sink"}).settings->mode == ModeKind::Sink);
  CHECK(parse_args({"--class=debug"}).settings->mode == ModeKind::Debugging);
  CHECK(parse_args({"-c", "proxy"}).settings->mode == ModeKind::PureProxy);
  CHECK_FALSE(parse_args({"--help"}).settings);
  CHECK(parse_args({"-V"}).text_for_stdout == "smtpd 1.0.0\n");
  CHECK_THROWS_AS(parse_args({"-c", "Nope"}), UsageError);
  CHECK_THROWS_AS(parse_args({"-s", "12k"}), UsageError);
  CHECK_THROWS_AS(parse_args({"--bogus"}), UsageError);
  CHECK_THROWS_AS(parse_args({"nocolon"}), UsageError);
  CHECK_THROWS_AS(parse_args({"h:70000"}), UsageError);
  CHECK_THROWS_AS(parse_args({":25"}), UsageError);
  CHECK_THROWS_AS(parse_args({"::1:25"}), UsageError);
  CHECK_THROWS_AS(parse_args({"a:1", "b:2", "c:3"}), UsageError);
}

TEST_CASE("with ask_envelope, MAIL and RCPT wait for the mode's verdict") {
  ChannelConfig config = test_config();
  config.ask_envelope = true;
  Session s(config);
  s.send("EHLO a\r\n");
  CHECK(s.send("MAIL FROM:<a@b> BODY=8BITMIME\r\nRCPT TO:<c@d>\r\n") == "");
  CHECK(s.channel.question() == Channel::Question::Mail);
  CHECK(s.channel.pending_address() == "a@b");
  CHECK(s.channel.mailfrom.empty());  // not until the verdict
  s.channel.answer("");
  CHECK(s.channel.mailfrom == "a@b");
  CHECK(s.channel.question() == Channel::Question::Rcpt);  // the pipelined RCPT, in order
  CHECK(s.channel.pending_address() == "c@d");
  s.channel.answer("550 5.1.1 no such user");
  CHECK(s.take() == "250 OK\r\n550 5.1.1 no such user\r\n");
  CHECK(s.channel.rcpttos.empty());
  CHECK(s.send("RCPT TO:<e@f>\r\n") == "");
  s.channel.answer("250 2.1.5 ok");
  CHECK(s.take() == "250 2.1.5 ok\r\n");
  CHECK(s.channel.rcpttos == std::vector<std::string>{"e@f"});
}

TEST_CASE("a refused MAIL leaves no sender behind") {
  ChannelConfig config = test_config(0, true);
  config.ask_envelope = true;
  Session s(config);
  s.send("EHLO a\r\nMAIL FROM:<a@b> SMTPUTF8\r\n");
  CHECK(s.channel.require_smtputf8);
  s.channel.answer("451 upstream away");
  CHECK(s.take() == "451 upstream away\r\n");
  CHECK(s.channel.mailfrom.empty());
  CHECK_FALSE(s.channel.require_smtputf8);
  CHECK(s.send("RCPT TO:<c@d>\r\n") == "503 Error: need MAIL command\r\n");
}

TEST_CASE("a multi-line reply from the mode is sent as it is") {
  ChannelConfig config = test_config();
  config.ask_envelope = true;
  Session s(config);
  s.send("EHLO a\r\nMAIL FROM:<a@b>\r\n");
  s.channel.answer("250-first\r\n250 second");
  CHECK(s.take() == "250-first\r\n250 second\r\n");
}

TEST_CASE("close_with sends its reply and closes, even while a verdict is pending") {
  Session s;
  s.send("HELO a\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n");
  REQUIRE(s.channel.has_message());
  s.channel.close_with("421 test.example closing");
  CHECK(s.take() == "421 test.example closing\r\n");
  CHECK(s.channel.is_closing());
  CHECK(s.channel.question() == Channel::Question::None);
  s.channel.answer("");  // a late verdict changes nothing
  CHECK(s.take() == "");
}

// relayed - RelayText's whole text for data from peer, with the lines `before` it
inline std::string relayed(const std::string& data, const std::string& peer,
                           const std::string& before = "") {
  return made([&] { return RelayText(message_with(data, peer), before); });
}

TEST_CASE("RelayText: X-Peer after the headers, CRLF, dot-stuffing, final dot") {
  CHECK(relayed("Subject: x\n\n.dot\nend", "192.0.2.9") ==
        "Subject: x\r\nX-Peer: 192.0.2.9\r\n\r\n..dot\r\nend\r\n.\r\n");
  CHECK(relayed("no body", "::1") == "no body\r\nX-Peer: ::1\r\n.\r\n");
  CHECK(relayed("", "192.0.2.9") == "X-Peer: 192.0.2.9\r\n\r\n.\r\n");
  SUBCASE("Mailman's added headers go first, as lines of the message") {
    CHECK(relayed("Subject: x\n\nbody", "::1", "From: a@b\nDate: d\n") ==
          "From: a@b\r\nDate: d\r\nSubject: x\r\nX-Peer: ::1\r\n\r\nbody\r\n.\r\n");
    CHECK(relayed("\n.body", "::1", "From: a@b\n") ==
          "From: a@b\r\nX-Peer: ::1\r\n\r\n..body\r\n.\r\n");
    CHECK(relayed("", "::1", "From: a@b\n") == "From: a@b\r\nX-Peer: ::1\r\n\r\n.\r\n");
  }
}
