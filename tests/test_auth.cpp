// test_auth.cpp - AUTH PLAIN and LOGIN (--auth, --auth-file, --auth-required): first in the
// pure channel and the command line, then end to end with the clients applications use:
// swaks, curl and Python's smtplib. AUTH is off by default, and the first case checks that
// then nothing changes.
//
// All cases are in the test suite "auth":   tests/run_tests -ts='auth'
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace auth {

TEST_SUITE_BEGIN("auth");

// ==== The channel ====

inline std::shared_ptr<const AuthUsers> alice_only() {
  return std::make_shared<const AuthUsers>(AuthUsers{{"alice", "s3cret:pw"}});
}

TEST_CASE("without --auth or --pipelining AUTH is unknown, and EHLO and HELP are Python's") {
  Session s;
  CHECK(s.send("EHLO c\r\n") == "250-test.example\r\n250-8BITMIME\r\n250 HELP\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("a", "b") + "\r\n") ==
        "500 Error: command \"AUTH\" not recognized\r\n");
  CHECK(s.send("HELP\r\n") ==
        "250 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY\r\n");
  CHECK(s.send("HELP AUTH\r\n") ==
        "501 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n") ==
        "250 OK\r\n250 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
  CHECK_FALSE(s.deliver().auth_user.has_value());
}

TEST_CASE("--auth: EHLO announces AUTH PLAIN LOGIN after PIPELINING, and HELP AUTH its syntax") {
  ChannelConfig config = auth_config();
  config.offer_pipelining = true;
  Session s(config);
  CHECK(s.send("EHLO c\r\n") ==
        "250-test.example\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n"
        "250 HELP\r\n");
  CHECK(s.send("HELP AUTH\r\n") == "250 Syntax: AUTH mechanism [initial-response]\r\n");
}

TEST_CASE("AUTH PLAIN and LOGIN log in; the user name goes with the message") {
  Session s(auth_config());
  s.send("EHLO c\r\n");
  SUBCASE("PLAIN with an initial response") {
    CHECK(s.send("AUTH PLAIN " + auth_plain("bob", "pw") + "\r\n") ==
          "235 2.7.0 Authentication successful\r\n");
  }
  SUBCASE("PLAIN after an empty challenge, mechanism in lower case") {
    CHECK(s.send("auth plain\r\n") == "334 \r\n");
    CHECK(s.send(auth_plain("bob", "pw") + "\r\n") == "235 2.7.0 Authentication successful\r\n");
  }
  SUBCASE("PLAIN with the authorization identity equal to the user") {
    CHECK(s.send("AUTH PLAIN " + auth_plain("bob", "pw", "bob") + "\r\n") ==
          "235 2.7.0 Authentication successful\r\n");
  }
  SUBCASE("LOGIN asks Username: and Password:") {
    CHECK(s.send("AUTH LOGIN\r\n") == "334 VXNlcm5hbWU6\r\n");
    CHECK(s.send(base64_encode("bob") + "\r\n") == "334 UGFzc3dvcmQ6\r\n");
    CHECK(s.send(base64_encode("pw") + "\r\n") == "235 2.7.0 Authentication successful\r\n");
  }
  SUBCASE("LOGIN with the user name as initial response (smtplib does this)") {
    CHECK(s.send("AUTH LOGIN " + base64_encode("bob") + "\r\n") == "334 UGFzc3dvcmQ6\r\n");
    CHECK(s.send(base64_encode("pw") + "\r\n") == "235 2.7.0 Authentication successful\r\n");
  }
  CHECK(s.channel.auth_user == "bob");
  CHECK(s.send("AUTH PLAIN " + auth_plain("eve", "x") + "\r\n") ==
        "503 5.5.1 Error: already authenticated\r\n");
  CHECK(s.send("RSET\r\nEHLO again\r\n").find("250 HELP") != std::string::npos);
  CHECK(s.channel.auth_user == "bob");  // a new EHLO does not log out (RFC 4954 says nothing)
  s.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n");
  Envelope e = s.deliver();
  REQUIRE(e.auth_user.has_value());
  CHECK(*e.auth_user == "bob");
}

TEST_CASE("AUTH answers 535 to wrong credentials, 501 to bad base64 or a cancel, 503 and 504") {
  Session s(auth_config(alice_only()));
  CHECK(s.send("AUTH PLAIN " + auth_plain("alice", "s3cret:pw") + "\r\n") ==
        "503 Error: send HELO first\r\n");
  s.send("EHLO c\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("alice", "wrong") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("mallory", "s3cret:pw") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("alice", "s3cret:pw", "bob") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN not*base64\r\n") == "501 5.5.2 Cannot decode response\r\n");
  CHECK(s.send("AUTH PLAIN " + base64_encode("no-nul-here") + "\r\n") ==
        "501 5.5.2 Cannot decode response\r\n");
  CHECK(s.send("AUTH LOGIN\r\n*\r\n") ==
        "334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication cancelled\r\n");
  CHECK(s.send("AUTH CRAM-MD5\r\n") == "504 5.5.4 Unrecognized authentication type\r\n");
  CHECK(s.send("AUTH\r\n") == "501 Syntax: AUTH mechanism [initial-response]\r\n");
  CHECK(s.send("AUTH PLAIN a b\r\n") == "501 Syntax: AUTH mechanism [initial-response]\r\n");
  CHECK(s.channel.auth_user.empty());
  CHECK(s.send("MAIL FROM:<a@b>\r\nAUTH PLAIN " + auth_plain("alice", "s3cret:pw") + "\r\n") ==
        "250 OK\r\n503 5.5.1 Error: MAIL transaction in progress\r\n");
  CHECK(s.send("RSET\r\nAUTH PLAIN " + auth_plain("alice", "s3cret:pw") + "\r\n") ==
        "250 OK\r\n235 2.7.0 Authentication successful\r\n");
}

TEST_CASE("AUTH answers 535 to a user name that would break a header line") {
  Session s(auth_config());
  s.send("EHLO c\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("x\r\nBcc: victim@example.com", "pw") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("", "pw") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("\xff\xfe", "pw") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("j\xc3\xb6rg", "pw") + "\r\n") ==
        "235 2.7.0 Authentication successful\r\n");
}

TEST_CASE("AUTH answers 535 to a user name with C1 controls or Unicode line separators") {
  Session s(auth_config());
  s.send("EHLO c\r\n");
  // U+0085 (NEL), U+009F, U+2028 and U+2029 end a line for readers that split on Unicode
  // line breaks, so "eve<NEL>Bcc: x" would be a second header line there
  const std::string nel = "\xc2\x85", c1_last = "\xc2\x9f", c1_first = "\xc2\x80";
  const std::string line_separator = "\xe2\x80\xa8", paragraph_separator = "\xe2\x80\xa9";
  for (const std::string& name : {"eve" + nel + "Bcc: x@evil.example", "a" + c1_last, c1_first,
                                  "a" + line_separator + "b", "a" + paragraph_separator + "b"}) {
    CAPTURE(printable(name));
    CHECK(s.send("AUTH PLAIN " + auth_plain(name, "pw") + "\r\n") ==
          "535 5.7.8 Authentication credentials invalid\r\n");
  }
  // their neighbours are ordinary text: U+00A0 (no-break space) and U+2027, U+202A
  CHECK(s.send("AUTH PLAIN " + auth_plain("a\xc2\xa0\xe2\x80\xa7\xe2\x80\xaa", "pw") + "\r\n") ==
        "235 2.7.0 Authentication successful\r\n");
  CHECK(s.channel.auth_user == "a\xc2\xa0\xe2\x80\xa7\xe2\x80\xaa");
}

TEST_CASE("the tenth failed AUTH of a session is answered 421 and the session closes") {
  Session s(auth_config(alice_only()));
  s.send("EHLO c\r\n");
  // every kind of failure counts: wrong passwords, bad base64, a cancel, an unknown mechanism
  CHECK(s.send("AUTH PLAIN " + auth_plain("alice", "guess1") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN not*base64\r\n") == "501 5.5.2 Cannot decode response\r\n");
  CHECK(s.send("AUTH LOGIN\r\n*\r\n") ==
        "334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication cancelled\r\n");
  CHECK(s.send("AUTH CRAM-MD5\r\n") == "504 5.5.4 Unrecognized authentication type\r\n");
  for (int i = 5; i <= 9; ++i)
    CHECK(s.send("AUTH PLAIN " + auth_plain("alice", "guess" + std::to_string(i)) + "\r\n") ==
          "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK_FALSE(s.channel.is_closing());
  // the tenth, even with the right password, and whatever was pipelined after it
  CHECK(s.send("AUTH PLAIN " + auth_plain("alice", "guess10") + "\r\nAUTH PLAIN " +
               auth_plain("alice", "s3cret:pw") + "\r\nNOOP\r\n") ==
        "421 test.example Error: too many failed AUTH attempts\r\n");
  CHECK(s.channel.is_closing());
  CHECK(s.channel.auth_user.empty());
}

TEST_CASE("a successful AUTH after nine failures logs in; the count is per session") {
  Session s(auth_config(alice_only()));
  s.send("EHLO c\r\n");
  for (int i = 1; i <= 9; ++i)
    s.send("AUTH PLAIN " + auth_plain("alice", "guess" + std::to_string(i)) + "\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("alice", "s3cret:pw") + "\r\n") ==
        "235 2.7.0 Authentication successful\r\n");
  Session other(auth_config(alice_only()));
  other.send("EHLO c\r\n");
  CHECK(other.send("AUTH PLAIN " + auth_plain("alice", "x") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
}

TEST_CASE("with AUTH offered a client's own X-Auth-User header becomes X-Original-Auth-User") {
  const std::string message =
      "X-Auth-User: admin\r\nx-auth-user :root\r\nSubject: hi\r\n\r\nX-Auth-User: body text\r\n"
      ".\r\n";
  const std::string renamed =
      "X-Original-Auth-User: admin\nX-Original-Auth-User :root\nSubject: hi\n\n"
      "X-Auth-User: body text";
  SUBCASE("a session that never logged in") {
    Session s(auth_config());
    s.send("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + message);
    Envelope e = s.deliver();
    CHECK(e.data == renamed);
    CHECK(e.auth_user == std::optional<std::string>(""));
  }
  SUBCASE("a session that logged in as bob") {
    Session s(auth_config());
    s.send("EHLO c\r\nAUTH PLAIN " + auth_plain("bob", "pw") +
           "\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + message);
    Envelope e = s.deliver();
    CHECK(e.data == renamed);
    CHECK(e.auth_user == std::optional<std::string>("bob"));
  }
  SUBCASE("without --auth the message is Python's: untouched") {
    Session s;
    s.send("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n" + message);
    CHECK(s.deliver().data ==
          "X-Auth-User: admin\nx-auth-user :root\nSubject: hi\n\nX-Auth-User: body text");
  }
}

TEST_CASE("--auth-required answers MAIL with 530 until AUTH succeeded") {
  Session s(auth_config(alice_only(), true));
  s.send("EHLO c\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\n") == "530 5.7.0 Authentication required\r\n");
  CHECK(s.send("RCPT TO:<c@d>\r\n") == "503 Error: need MAIL command\r\n");
  CHECK(s.send("AUTH LOGIN " + base64_encode("alice") + "\r\n" + base64_encode("s3cret:pw") +
               "\r\nMAIL FROM:<a@b>\r\n") ==
        "334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n250 OK\r\n");
}

TEST_CASE("-d never shows a password, only AUTH and the mechanism") {
  std::vector<std::string> trace;
  ChannelConfig config = auth_config();
  config.trace = [&](const std::string& line) { trace.push_back(line); };
  Session s(config);
  std::string secret = auth_plain("bob", "hunter2");
  CHECK(s.send("EHLO c\r\nAUTH LOGIN\r\nYm9i\r\n*\r\n").find("334 UGFzc3dvcmQ6\r\n") !=
        std::string::npos);
  CHECK(s.send("AUTH PLAIN " + secret + "\r\n") == "235 2.7.0 Authentication successful\r\n");
  std::string all;
  for (const std::string& line : trace) all += line + "\n";
  CHECK(all.find(secret) == std::string::npos);
  CHECK(all.find("Ym9i") == std::string::npos);
  CHECK(all.find("<- AUTH PLAIN\n") != std::string::npos);
  CHECK(all.find("<- (AUTH response, not shown)") != std::string::npos);
}

TEST_CASE("base64_decode takes RFC 4648 text with padding and nothing else") {
  CHECK(base64_decode("") == std::string());
  CHECK(base64_decode("YQ==") == std::string("a"));
  CHECK(base64_decode("YWI=") == std::string("ab"));
  CHECK(base64_decode("YWJj") == std::string("abc"));
  CHECK(base64_decode(base64_encode(std::string("\0\xff\x10z", 4))) ==
        std::string("\0\xff\x10z", 4));
  CHECK_FALSE(base64_decode("YQ"));
  CHECK_FALSE(base64_decode("Y==="));
  CHECK_FALSE(base64_decode("YQ=a"));
  CHECK_FALSE(base64_decode("=QYQ"));
  CHECK_FALSE(base64_decode("YR=="));  // bits left over
  CHECK_FALSE(base64_decode("YW J"));
}

// ==== The command line ====

TEST_CASE("--auth, --auth-required and --auth-file turn AUTH on; a bad --auth-file exits 1") {
  Settings none = settings_of({});
  CHECK_FALSE(none.server.channel.offer_auth);
  CHECK(settings_of({"--auth"}).server.channel.offer_auth);
  Settings required = settings_of({"--auth-required"});
  CHECK(required.server.channel.offer_auth);
  CHECK(required.server.channel.auth_required);
  CHECK(required.server.channel.auth_users == nullptr);
  TempFile file("# test users\nalice:pw:with:colons\r\n\nbob:\n");
  Settings from_file = settings_of({"--auth-file", file.path()});
  CHECK(from_file.server.channel.offer_auth);
  REQUIRE(from_file.server.channel.auth_users != nullptr);
  CHECK(*from_file.server.channel.auth_users ==
        AuthUsers{{"alice", "pw:with:colons"}, {"bob", ""}});
  TempFile broken("alice:pw\nno colon here\n");
  CHECK_THROWS_WITH_AS(settings_of({"--auth-file", broken.path()}),
                       ("--auth-file " + broken.path() + " line 2: expected user:password").c_str(),
                       UsageError);
  TempFile empty("# nobody\n");
  CHECK_THROWS_AS(settings_of({"--auth-file", empty.path()}), UsageError);
  CHECK_THROWS_AS(settings_of({"--auth-file", "/nonexistent/users"}), UsageError);
}

// ==== End to end, with real clients ====

TEST_CASE("swaks --auth PLAIN and LOGIN with --auth-file; the print-out names the user") {
  TempFile users("alice:wonderland\n");
  auto srv = start_smtpd({"--auth-file", users.path()});
  for (const char* mechanism : {"PLAIN", "LOGIN"}) {
    INFO(mechanism);
    auto r = swaks(srv, {"--auth", mechanism, "--auth-user", "alice", "--auth-password",
                         "wonderland", "--body", std::string("via ") + mechanism});
    INFO(r.describe());
    CHECK(r.ok());
    CHECK(r.out.find("<-  250-AUTH PLAIN LOGIN") != std::string::npos);
    CHECK(r.out.find("<-  235 2.7.0 Authentication successful") != std::string::npos);
  }
  CHECK(srv.wait_stdout(kEnd, 2));
  CHECK(count(srv.stdout_text(), "X-Peer: 127.0.0.1\nX-Auth-User: alice\n\nvia ") == 2);
  auto wrong = swaks(srv, {"--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "nope"});
  INFO(wrong.describe());
  CHECK(wrong.status.exited);
  CHECK(wrong.status.code != 0);
  CHECK(wrong.out.find("<** 535 5.7.8 Authentication credentials invalid") != std::string::npos);
  srv.stop();
  CHECK(count(srv.child.out.text(), "MESSAGE FOLLOWS") == 2);  // the refused one is not there
}

TEST_CASE("curl --user logs in; --json records auth_user, null without a login") {
  auto srv = start_smtpd({"-c", "sink", "--json", "--auth"});
  TempFile message("Subject: from curl\r\n\r\nHello.\r\n");
  std::string url = "smtp://" + srv.address();
  auto r = curl_send(url, message.path(), {"--user", "carol:pass word"});
  INFO(r.describe());
  CHECK(r.ok());
  auto anonymous = curl_send(url, message.path());
  INFO(anonymous.describe());
  CHECK(anonymous.ok());
  REQUIRE(srv.wait_stdout("\n", 2));
  auto lines = lines_of(srv.stdout_text());
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].find(", \"auth_user\": \"carol\", \"size\": ") != std::string::npos);
  CHECK(lines[1].find(", \"auth_user\": null, \"size\": ") != std::string::npos);
}

TEST_CASE("--auth-required: smtplib logs in and is stored with X-Auth-User; without, 530") {
  TempDir dir;
  auto srv = start_smtpd({"-c", "sink", "--auth-required", "--maildir", dir / "md"});
  auto refused = smtplib(srv);
  INFO(refused.describe());
  CHECK(refused.out == "SMTPSenderRefused 530\n");
  auto r = smtplib(srv, "dave", "any password");
  INFO(r.describe());
  CHECK(r.out == "sent\n");
  auto files = list_dir(dir / "md/new");
  REQUIRE(files.size() == 1);
  CHECK(read_file(dir / "md/new/" + files[0]) ==
        stored_envelope("app@example.com", {"user@example.com"}) +
            "X-Auth-User: dave\nSubject: from smtplib\n\nHello.\n");
}

TEST_CASE("--exec gets SMTPD_AUTH_USER and the header; --mbox has the header too") {
  Script hook("printf '%s|' \"${SMTPD_AUTH_USER-unset}\" >>\"$D/seen\"; head -n 1 >>\"$D/seen\"\n");
  auto srv =
      start_smtpd({"-c", "sink", "--auth", "--mbox", hook / "mbox", "--exec", hook.command()});
  auto r = smtplib(srv, "erin", "pw");
  INFO(r.describe());
  CHECK(r.out == "sent\n");
  auto anonymous = smtplib(srv);
  CHECK(anonymous.out == "sent\n");
  CHECK(read_file(hook / "seen") == "erin|X-Auth-User: erin\nunset|Subject: from smtplib\n");
  std::string mbox = read_file(hook / "mbox");
  CHECK(mbox.find("\nX-Auth-User: erin\nSubject: from smtplib\n\nHello.\n\n") != std::string::npos);
  CHECK(count(mbox, "X-Auth-User") == 1);
}

TEST_CASE("--auth end to end: the print-out's only X-Auth-User line is the server's") {
  auto srv = start_smtpd({"--auth"});
  auto send_as = [&](const std::string& user) {
    Client c = srv.connect();
    REQUIRE(starts_with(c.read_reply(), "220 "));
    REQUIRE(starts_with(c.command("EHLO c"), "250-"));
    if (!user.empty())
      REQUIRE(c.command("AUTH PLAIN " + auth_plain(user, "pw")) ==
              "235 2.7.0 Authentication successful");
    REQUIRE(c.command("MAIL FROM:<a@example.com>") == "250 OK");
    REQUIRE(c.command("RCPT TO:<b@example.com>") == "250 OK");
    REQUIRE(starts_with(c.command("DATA"), "354 "));
    CHECK(c.command("X-Auth-User: admin\r\nSubject: from " + user + "\r\n\r\nHello.\r\n.") ==
          "250 OK");
  };
  send_as("");
  REQUIRE(srv.wait_stdout("Subject: from \n"));
  send_as("alice");
  REQUIRE(srv.wait_stdout("Subject: from alice\n"));
  std::string out = srv.stdout_text();
  CHECK(count(out, "X-Original-Auth-User: admin\n") == 2);
  CHECK(count(out, "\nX-Auth-User: ") == 1);
  CHECK(out.find("\nX-Auth-User: alice\n") != std::string::npos);
  CHECK(out.find("X-Auth-User: admin") == std::string::npos);
}

TEST_CASE("PureProxy with --auth: the user name goes nowhere upstream") {
  auto upstream = start_smtpd({"-d"});
  auto proxy = start_proxy(upstream.address(), {"--auth-required"});
  auto r = smtplib(proxy, "frank", "pw");
  INFO(r.describe());
  CHECK(r.out == "sent\n");
  CHECK(upstream.wait_stdout(kEnd));
  CHECK(upstream.stdout_text().find("frank") == std::string::npos);
  CHECK(upstream.stdout_text().find("X-Auth-User") == std::string::npos);
  CHECK(upstream.stderr_text().find("AUTH") == std::string::npos);
  CHECK(upstream.stderr_text().find("<- MAIL FROM:<app@example.com>") != std::string::npos);
}

TEST_SUITE_END();

}  // namespace auth
}  // namespace smtpd_test
