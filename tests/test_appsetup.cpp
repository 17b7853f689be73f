// test_appsetup.cpp - what application test setups need (issue 10): AUTH, PIPELINING and
// --reject, first in the pure channel and the command line, then end to end with the clients
// applications use: swaks, curl, Python's smtplib and Postfix's smtp-source. Every feature is
// off by default, and the first cases check that then nothing changes.
//
// All cases are in the test suite "appsetup":   tests/run_tests -ts='appsetup'
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace appsetup {

const char* const kEhloNoSize = "250-test.example\r\n250-8BITMIME\r\n250 HELP\r\n";

TEST_SUITE_BEGIN("appsetup");

// ==== The channel ====

inline ChannelConfig auth_config(std::shared_ptr<const AuthUsers> users = nullptr,
                                 bool required = false) {
  ChannelConfig config = test_config();
  config.offer_auth = true;
  config.auth_users = std::move(users);
  config.auth_required = required;
  return config;
}

inline std::shared_ptr<const AuthUsers> alice_only() {
  return std::make_shared<const AuthUsers>(AuthUsers{{"alice", "s3cret:pw"}});
}

inline std::string plain(const std::string& user, const std::string& password,
                         const std::string& authzid = "") {
  return base64_encode(authzid + std::string(1, '\0') + user + std::string(1, '\0') + password);
}

TEST_CASE("appsetup: without the options AUTH is unknown, and EHLO and HELP are Python's") {
  Session s;
  CHECK(s.send("EHLO c\r\n") == kEhloNoSize);
  CHECK(s.send("AUTH PLAIN " + plain("a", "b") + "\r\n") ==
        "500 Error: command \"AUTH\" not recognized\r\n");
  CHECK(s.send("HELP\r\n") ==
        "250 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY\r\n");
  CHECK(s.send("HELP AUTH\r\n") ==
        "501 Supported commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n") ==
        "250 OK\r\n250 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
  CHECK_FALSE(s.deliver().auth_user.has_value());
}

TEST_CASE("appsetup: EHLO announces PIPELINING and AUTH PLAIN LOGIN when asked, HELP lists AUTH") {
  ChannelConfig config = auth_config();
  config.offer_pipelining = true;
  Session s(config);
  CHECK(s.send("EHLO c\r\n") ==
        "250-test.example\r\n250-8BITMIME\r\n250-PIPELINING\r\n250-AUTH PLAIN LOGIN\r\n"
        "250 HELP\r\n");
  CHECK(s.send("HELP AUTH\r\n") == "250 Syntax: AUTH mechanism [initial-response]\r\n");
  ChannelConfig only_pipelining = test_config();
  only_pipelining.offer_pipelining = true;
  Session p(only_pipelining);
  CHECK(p.send("EHLO c\r\n") ==
        "250-test.example\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 HELP\r\n");
  CHECK(p.send("AUTH LOGIN\r\n") == "500 Error: command \"AUTH\" not recognized\r\n");
}

TEST_CASE("appsetup: AUTH PLAIN and LOGIN log in; the user name goes with the message") {
  Session s(auth_config());
  s.send("EHLO c\r\n");
  SUBCASE("PLAIN with an initial response") {
    CHECK(s.send("AUTH PLAIN " + plain("bob", "pw") + "\r\n") ==
          "235 2.7.0 Authentication successful\r\n");
  }
  SUBCASE("PLAIN after an empty challenge, mechanism in lower case") {
    CHECK(s.send("auth plain\r\n") == "334 \r\n");
    CHECK(s.send(plain("bob", "pw") + "\r\n") == "235 2.7.0 Authentication successful\r\n");
  }
  SUBCASE("PLAIN with the authorization identity equal to the user") {
    CHECK(s.send("AUTH PLAIN " + plain("bob", "pw", "bob") + "\r\n") ==
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
  CHECK(s.send("AUTH PLAIN " + plain("eve", "x") + "\r\n") ==
        "503 5.5.1 Error: already authenticated\r\n");
  CHECK(s.send("RSET\r\nEHLO again\r\n").find("250 HELP") != std::string::npos);
  CHECK(s.channel.auth_user == "bob");  // a new EHLO does not log out (RFC 4954 says nothing)
  s.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n");
  Envelope e = s.deliver();
  REQUIRE(e.auth_user.has_value());
  CHECK(*e.auth_user == "bob");
}

TEST_CASE("appsetup: AUTH refusals: wrong password, bad base64, cancel, order, unknown mechanism") {
  Session s(auth_config(alice_only()));
  CHECK(s.send("AUTH PLAIN " + plain("alice", "s3cret:pw") + "\r\n") ==
        "503 Error: send HELO first\r\n");
  s.send("EHLO c\r\n");
  CHECK(s.send("AUTH PLAIN " + plain("alice", "wrong") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + plain("mallory", "s3cret:pw") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + plain("alice", "s3cret:pw", "bob") + "\r\n") ==
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
  CHECK(s.send("MAIL FROM:<a@b>\r\nAUTH PLAIN " + plain("alice", "s3cret:pw") + "\r\n") ==
        "250 OK\r\n503 5.5.1 Error: MAIL transaction in progress\r\n");
  CHECK(s.send("RSET\r\nAUTH PLAIN " + plain("alice", "s3cret:pw") + "\r\n") ==
        "250 OK\r\n235 2.7.0 Authentication successful\r\n");
}

TEST_CASE("appsetup: a user name that would break a header line is refused") {
  Session s(auth_config());
  s.send("EHLO c\r\n");
  CHECK(s.send("AUTH PLAIN " + plain("x\r\nBcc: victim@example.com", "pw") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + plain("", "pw") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + plain("\xff\xfe", "pw") + "\r\n") ==
        "535 5.7.8 Authentication credentials invalid\r\n");
  CHECK(s.send("AUTH PLAIN " + plain("j\xc3\xb6rg", "pw") + "\r\n") ==
        "235 2.7.0 Authentication successful\r\n");
}

TEST_CASE("appsetup: --auth-required answers MAIL with 530 until AUTH succeeded") {
  Session s(auth_config(alice_only(), true));
  s.send("EHLO c\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\n") == "530 5.7.0 Authentication required\r\n");
  CHECK(s.send("RCPT TO:<c@d>\r\n") == "503 Error: need MAIL command\r\n");
  CHECK(s.send("AUTH LOGIN " + base64_encode("alice") + "\r\n" + base64_encode("s3cret:pw") +
               "\r\nMAIL FROM:<a@b>\r\n") ==
        "334 UGFzc3dvcmQ6\r\n235 2.7.0 Authentication successful\r\n250 OK\r\n");
}

TEST_CASE("appsetup: -d never shows a password, only AUTH and the mechanism") {
  std::vector<std::string> trace;
  ChannelConfig config = auth_config();
  config.trace = [&](const std::string& line) { trace.push_back(line); };
  Session s(config);
  std::string secret = plain("bob", "hunter2");
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

TEST_CASE("appsetup: base64_decode takes RFC 4648 text with padding and nothing else") {
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

TEST_CASE("appsetup: glob_match is fnmatch: * ? [set] [!set], letters without case") {
  CHECK(glob_match("*@bounce.test", "x@bounce.test"));
  CHECK(glob_match("*@bounce.test", "X@Bounce.TEST"));
  CHECK_FALSE(glob_match("*@bounce.test", "x@bounce.test.org"));
  CHECK(glob_match("*", ""));
  CHECK(glob_match("*", "anything"));
  CHECK(glob_match("a?c", "abc"));
  CHECK_FALSE(glob_match("a?c", "ac"));
  CHECK(glob_match("user[0-9]@*", "user7@x"));
  CHECK_FALSE(glob_match("user[!0-9]@*", "user7@x"));
  CHECK(glob_match("user[!0-9]@*", "userx@x"));
  CHECK(glob_match("[]]x", "]x"));
  CHECK(glob_match("a[b", "a[b"));  // no closing bracket: a plain '['
  CHECK(glob_match("127.0.0.*", "127.0.0.1"));
  CHECK_FALSE(glob_match("127.0.0.*", "::1"));
  CHECK(glob_match("*a*b*c", "xxaxxbxxc"));
  CHECK_FALSE(glob_match("*a*b*c", "xxaxxcxxb"));
}

TEST_CASE("appsetup: --reject refuses at each stage; the first matching rule wins") {
  auto config_with = [](std::vector<Refusals::Rule> rules) {
    ChannelConfig config = test_config();
    config.refusals = std::make_shared<Refusals>(std::move(rules), 1);
    return config;
  };
  using Stage = Refusals::Stage;
  SUBCASE("connect: the reply instead of the greeting, then the end") {
    Session s(config_with({{Stage::Connect, "192.0.2.*", -1, "421 4.3.2 not now"}}));
    CHECK(s.greeting == "421 4.3.2 not now\r\n");
    CHECK(s.channel.is_closing());
    Session other(config_with({{Stage::Connect, "10.*", -1, "554 no"}}));
    CHECK(starts_with(other.greeting, "220 "));
  }
  SUBCASE("helo: the greeting is not recorded") {
    Session s(config_with({{Stage::Helo, "*.spam", -1, "550 5.7.1 go away"}}));
    CHECK(s.send("EHLO host.spam\r\n") == "550 5.7.1 go away\r\n");
    CHECK(s.channel.seen_greeting.empty());
    CHECK(s.send("HELO host.ok\r\n") == "250 test.example\r\n");
  }
  SUBCASE("mail and rcpt: the address as parsed; others go on") {
    Session s(config_with({{Stage::Rcpt, "*@bounce.test", -1, "550 5.1.1 no such user"},
                           {Stage::Rcpt, "*", -1, "451 later"},
                           {Stage::Mail, "<>", -1, "553 no bounces"}}));
    s.send("HELO c\r\n");
    CHECK(s.send("MAIL FROM:<>\r\n") == "553 no bounces\r\n");
    CHECK(s.channel.mailfrom.empty());
    CHECK(s.send("MAIL FROM:<a@b>\r\nRCPT TO:<Who@Bounce.Test>\r\nRCPT TO:<c@d>\r\n") ==
          "250 OK\r\n550 5.1.1 no such user\r\n451 later\r\n");
    CHECK(s.channel.rcpttos.empty());
  }
  SUBCASE("data: after the final dot, against every recipient; the mode never sees it") {
    Session s(config_with({{Stage::Data, "spam@*", -1, "554 5.7.1 content refused"}}));
    CHECK(s.send("HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<ok@x>\r\nRCPT TO:<spam@x>\r\nDATA\r\n"
                 "hello\r\n.\r\nNOOP\r\n") ==
          "250 test.example\r\n250 OK\r\n250 OK\r\n250 OK\r\n"
          "354 End data with <CR><LF>.<CR><LF>\r\n554 5.7.1 content refused\r\n250 OK\r\n");
    CHECK_FALSE(s.channel.has_message());
    CHECK(s.channel.mailfrom.empty());
    CHECK(s.channel.received_data().empty());
  }
}

TEST_CASE("appsetup: --reject N% draws from the seed: the same seed, the same refusals") {
  auto run = [](std::uint64_t seed) {
    ChannelConfig config = test_config();
    config.refusals = std::make_shared<Refusals>(
        std::vector<Refusals::Rule>{{Refusals::Stage::Rcpt, "", 30, "451 4.3.0 try again later"}},
        seed);
    Session s(config);
    s.send("HELO c\r\nMAIL FROM:<a@b>\r\n");
    std::string pattern;
    for (int i = 0; i < 200; ++i) pattern += s.send("RCPT TO:<r@x>\r\n")[0] == '4' ? 'x' : '.';
    return pattern;
  };
  std::string first = run(42);
  CHECK(first == run(42));
  CHECK(first != run(43));
  auto refused = std::count(first.begin(), first.end(), 'x');
  CHECK(refused > 30);  // 60 expected of 200
  CHECK(refused < 90);
  SeededRandom never(7), always(7);
  for (int i = 0; i < 1000; ++i) {
    CHECK_FALSE(never.chance(0));
    CHECK(always.chance(100));
  }
}

// ==== The command line ====

inline Settings parse(std::vector<std::string> args) {
  std::vector<const char*> argv;
  for (const std::string& a : args) argv.push_back(a.c_str());
  return *parse_args(argv).settings;
}

TEST_CASE("appsetup: --reject STAGE:PATTERN=REPLY is parsed, in order, and checked") {
  Settings s = parse({"--reject", "rcpt:*@bounce.test=550 5.1.1 no such user, sorry", "--reject",
                      "rcpt:12.5%=451 4.3.0 try again later", "--reject", "mail:srs=a=b@x=553",
                      "--reject-seed", "99"});
  REQUIRE(s.refusals.size() == 3);
  CHECK(s.refusals[0].stage == Refusals::Stage::Rcpt);
  CHECK(s.refusals[0].pattern == "*@bounce.test");
  CHECK(s.refusals[0].percent < 0);
  CHECK(s.refusals[0].reply == "550 5.1.1 no such user, sorry");  // commas stay
  CHECK(s.refusals[1].percent == 12.5);
  CHECK(s.refusals[1].reply == "451 4.3.0 try again later");
  CHECK(s.refusals[2].stage == Refusals::Stage::Mail);
  CHECK(s.refusals[2].pattern == "srs=a=b@x");
  CHECK(s.refusals[2].reply == "553");
  CHECK(s.reject_seed == std::optional<std::uint64_t>(99));
  for (const char* bad :
       {"rcpt:*@x", "rcpt:*=250 fine", "rcpt:*=55 short", "rcpt:*=550x", "bounce:*=550 no",
        "rcpt=550 no", "rcpt:=550 no", "rcpt:101%=451 no", "rcpt:*=550 tab\there"}) {
    INFO(bad);
    CHECK_THROWS_AS(parse({"--reject", bad}), UsageError);
  }
  CHECK_THROWS_AS(parse({"--reject-seed", "-1"}), UsageError);
  CHECK_FALSE(parse({}).reject_seed.has_value());
}

TEST_CASE("appsetup: --auth, --auth-file, --auth-required and --pipelining on the command line") {
  Settings none = parse({});
  CHECK_FALSE(none.server.channel.offer_auth);
  CHECK_FALSE(none.server.channel.offer_pipelining);
  CHECK(parse({"--auth"}).server.channel.offer_auth);
  CHECK(parse({"--pipelining"}).server.channel.offer_pipelining);
  Settings required = parse({"--auth-required"});
  CHECK(required.server.channel.offer_auth);
  CHECK(required.server.channel.auth_required);
  CHECK(required.server.channel.auth_users == nullptr);
  TempFile file("# test users\nalice:pw:with:colons\r\n\nbob:\n");
  Settings from_file = parse({"--auth-file", file.path()});
  CHECK(from_file.server.channel.offer_auth);
  REQUIRE(from_file.server.channel.auth_users != nullptr);
  CHECK(*from_file.server.channel.auth_users ==
        AuthUsers{{"alice", "pw:with:colons"}, {"bob", ""}});
  TempFile broken("alice:pw\nno colon here\n");
  CHECK_THROWS_WITH_AS(parse({"--auth-file", broken.path()}),
                       ("--auth-file " + broken.path() + " line 2: expected user:password").c_str(),
                       UsageError);
  TempFile empty("# nobody\n");
  CHECK_THROWS_AS(parse({"--auth-file", empty.path()}), UsageError);
  CHECK_THROWS_AS(parse({"--auth-file", "/nonexistent/users"}), UsageError);
}

// ==== End to end, with real clients ====

// start - smtpd -n OPTIONS 127.0.0.1:0 (DebuggingServer unless -c says otherwise), listening
inline ServerProcess start(std::vector<std::string> options) {
  ignore_sigpipe();
  options.insert(options.begin(), "-n");
  options.push_back("127.0.0.1:0");
  return ServerProcess::launch(options);
}

// swaks - swaks against the server with these extra switches, bounded
inline CommandResult swaks(const ServerProcess& srv, std::vector<std::string> extra) {
  std::vector<std::string> argv{require_tool("swaks", "swaks"),
                                "--server",
                                "127.0.0.1",
                                "--port",
                                std::to_string(srv.port()),
                                "--from",
                                "app@example.com",
                                "--to",
                                "user@example.com",
                                "--timeout",
                                "10"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  return run_command(argv);
}

// kSmtplibScript - python3 -c script; argv: port, user ("" for no login), password, recipient.
// Prints "sent", or the exception's class and SMTP code and exits 1.
constexpr const char* kSmtplibScript = R"PY(
import smtplib, sys
port, user, password, rcpt = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
try:
    with smtplib.SMTP('127.0.0.1', port, timeout=10) as s:
        if user:
            s.login(user, password)
        s.sendmail('app@example.com', [rcpt], b'Subject: from smtplib\r\n\r\nHello.\r\n')
    print('sent')
except smtplib.SMTPException as e:
    print(type(e).__name__, getattr(e, 'smtp_code', ''))
    sys.exit(1)
)PY";

inline CommandResult smtplib(const ServerProcess& srv, const std::string& user,
                             const std::string& password,
                             const std::string& rcpt = "user@example.com") {
  return run_command({require_tool("python3", "python3"), "-c", kSmtplibScript,
                      std::to_string(srv.port()), user, password, rcpt});
}

TEST_CASE("appsetup: swaks --auth PLAIN and LOGIN with --auth-file; the print-out names the user") {
  TempFile users("alice:wonderland\n");
  auto srv = start({"--auth-file", users.path()});
  for (const char* mechanism : {"PLAIN", "LOGIN"}) {
    INFO(mechanism);
    auto r = swaks(srv, {"--auth", mechanism, "--auth-user", "alice", "--auth-password",
                         "wonderland", "--body", std::string("via ") + mechanism});
    INFO(r.describe());
    CHECK(r.ok());
    CHECK(r.out.find("<-  250-AUTH PLAIN LOGIN") != std::string::npos);
    CHECK(r.out.find("<-  235 2.7.0 Authentication successful") != std::string::npos);
  }
  CHECK(srv.wait_stdout("------------ END MESSAGE ------------\n", 2));
  CHECK(count(srv.stdout_text(), "X-Peer: 127.0.0.1\nX-Auth-User: alice\n\nvia ") == 2);
  auto wrong = swaks(srv, {"--auth", "PLAIN", "--auth-user", "alice", "--auth-password", "nope"});
  INFO(wrong.describe());
  CHECK(wrong.status.exited);
  CHECK(wrong.status.code != 0);
  CHECK(wrong.out.find("<** 535 5.7.8 Authentication credentials invalid") != std::string::npos);
  srv.stop();
  CHECK(count(srv.child.out.text(), "MESSAGE FOLLOWS") == 2);  // the refused one is not there
}

// curl_send - curl uploads FILE to URL (smtp:// or smtps://) from app@ to user@example.com
inline CommandResult curl_send(const std::string& url, const std::string& file,
                               std::vector<std::string> extra = {}) {
  std::vector<std::string> argv{
      require_tool("curl", "curl"), "-sS", "--max-time", "10", "--url", url};
  for (const char* option : {"--mail-from", "app@example.com", "--mail-rcpt", "user@example.com"})
    argv.push_back(option);
  argv.insert(argv.end(), {"--upload-file", file});
  argv.insert(argv.end(), extra.begin(), extra.end());
  return run_command(argv);
}

TEST_CASE("appsetup: curl --user logs in; --json records auth_user, null without a login") {
  auto srv = start({"-c", "sink", "--json", "--auth"});
  TempFile message("Subject: from curl\r\n\r\nHello.\r\n");
  std::string url = "smtp://127.0.0.1:" + std::to_string(srv.port());
  auto send = [&](std::vector<std::string> extra) { return curl_send(url, message.path(), extra); };
  auto r = send({"--user", "carol:pass word"});
  INFO(r.describe());
  CHECK(r.ok());
  auto anonymous = send({});
  INFO(anonymous.describe());
  CHECK(anonymous.ok());
  REQUIRE(srv.wait_stdout("\n", 2));
  auto lines = lines_of(srv.stdout_text());
  REQUIRE(lines.size() == 2);
  CHECK(lines[0].find(", \"auth_user\": \"carol\", \"size\": ") != std::string::npos);
  CHECK(lines[1].find(", \"auth_user\": null, \"size\": ") != std::string::npos);
}

TEST_CASE("appsetup: smtplib login with --auth-required; no login gets 530; Maildir header") {
  TempDir dir;
  auto srv = start({"-c", "sink", "--auth-required", "--maildir", dir / "md"});
  auto refused = smtplib(srv, "", "");
  INFO(refused.describe());
  CHECK(refused.out == "SMTPSenderRefused 530\n");
  auto r = smtplib(srv, "dave", "any password");
  INFO(r.describe());
  CHECK(r.out == "sent\n");
  auto files = list_dir(dir / "md/new");
  REQUIRE(files.size() == 1);
  CHECK(read_file(dir / "md/new/" + files[0]) ==
        "X-Auth-User: dave\nSubject: from smtplib\n\nHello.\n");
}

TEST_CASE("appsetup: --exec gets SMTPD_AUTH_USER and the header; --mbox has the header too") {
  TempDir dir;
  write_file(dir / "hook.sh", "printf '%s|' \"${SMTPD_AUTH_USER-unset}\" >>'" + dir / "seen" +
                                  "'; head -n 1 >>'" + dir / "seen" + "'\n");
  auto srv = start(
      {"-c", "sink", "--auth", "--mbox", dir / "mbox", "--exec", "sh '" + dir / "hook.sh" + "'"});
  auto r = smtplib(srv, "erin", "pw");
  INFO(r.describe());
  CHECK(r.out == "sent\n");
  auto anonymous = smtplib(srv, "", "");
  CHECK(anonymous.out == "sent\n");
  CHECK(read_file(dir / "seen") == "erin|X-Auth-User: erin\nunset|Subject: from smtplib\n");
  std::string mbox = read_file(dir / "mbox");
  CHECK(mbox.find("\nX-Auth-User: erin\nSubject: from smtplib\n\nHello.\n\n") != std::string::npos);
  CHECK(count(mbox, "X-Auth-User") == 1);
}

TEST_CASE("appsetup: PureProxy with --auth: the user name goes nowhere upstream") {
  auto upstream = start({"-d"});
  auto proxy = ServerProcess::launch({"-n", "-c", "PureProxy", "--auth-required", "127.0.0.1:0",
                                      "127.0.0.1:" + std::to_string(upstream.port())});
  auto r = smtplib(proxy, "frank", "pw");
  INFO(r.describe());
  CHECK(r.out == "sent\n");
  CHECK(upstream.wait_stdout("------------ END MESSAGE ------------\n"));
  CHECK(upstream.stdout_text().find("frank") == std::string::npos);
  CHECK(upstream.stdout_text().find("X-Auth-User") == std::string::npos);
  CHECK(upstream.stderr_text().find("AUTH") == std::string::npos);
  CHECK(upstream.stderr_text().find("<- MAIL FROM:<app@example.com>") != std::string::npos);
}

TEST_CASE("appsetup: --reject with swaks and smtplib: refused recipients, sessions, messages") {
  SUBCASE("rcpt: swaks hears the scripted 550; other recipients get through") {
    auto srv = start({"--reject", "rcpt:*@bounce.test=550 5.1.1 no such user"});
    auto refused = swaks(srv, {"--to", "someone@Bounce.Test"});
    INFO(refused.describe());
    CHECK(refused.status.code != 0);
    CHECK(refused.out.find("<** 550 5.1.1 no such user") != std::string::npos);
    auto r = swaks(srv, {"--to", "someone@example.com"});
    INFO(r.describe());
    CHECK(r.ok());
    srv.stop();
    CHECK(count(srv.child.out.text(), "MESSAGE FOLLOWS") == 1);
  }
  SUBCASE("connect: smtplib gets the 421 instead of a greeting") {
    auto srv = start({"--reject", "connect:127.0.0.1=421 4.3.2 closed for maintenance"});
    auto r = smtplib(srv, "", "");
    CHECK(r.out == "SMTPConnectError 421\n");
  }
  SUBCASE("data: the message is refused after its text and neither printed nor stored") {
    TempDir dir;
    auto srv = start({"--maildir", dir / "md", "--reject", "data:*=554 5.6.0 content refused"});
    auto r = smtplib(srv, "", "");
    CHECK(r.out == "SMTPDataError 554\n");
    srv.stop();
    CHECK(srv.child.out.text() == "");
    CHECK(list_dir(dir / "md/new").empty());
  }
}

TEST_CASE("appsetup: --reject 'rcpt:50%' with --reject-seed refuses the same messages each run") {
  auto run = [](const std::string& seed) {
    auto srv = start(
        {"-c", "sink", "--reject", "rcpt:50%=451 4.3.0 try again later", "--reject-seed", seed});
    std::string pattern;
    for (int i = 0; i < 12; ++i) {
      auto r = smtplib(srv, "", "");
      pattern += r.out == "sent\n" ? '.' : r.out == "SMTPRecipientsRefused \n" ? 'x' : '?';
    }
    return pattern;
  };
  std::string first = run("2026");
  INFO(first);
  CHECK(first == run("2026"));
  CHECK(first.find('?') == std::string::npos);
  CHECK(first.find('x') != std::string::npos);
  CHECK(first.find('.') != std::string::npos);
}

// group_reply - send one pipelined group in a single write and read what comes back in the
// first read after the first byte arrives
inline std::string first_read_after(Client& c, const std::string& group) {
  REQUIRE(c.send(group));
  pollfd p{c.fd(), POLLIN, 0};
  REQUIRE(::poll(&p, 1, 5000) == 1);
  c.poll_once();
  return c.pending();
}

TEST_CASE("appsetup: --pipelining: a proxy answers a pipelined group in one write") {
  auto upstream = start({"-c", "sink"});
  auto proxy = ServerProcess::launch({"-n", "-c", "PureProxy", "--pipelining", "127.0.0.1:0",
                                      "127.0.0.1:" + std::to_string(upstream.port())});
  Client c = proxy.connect();
  REQUIRE(starts_with(c.read_reply(), "220 "));
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

// smtp_source - Postfix's smtp-source: N messages over S sessions, pipelining when offered
inline CommandResult smtp_source(const ServerProcess& srv, int messages, int sessions) {
  std::string path = "/usr/sbin/smtp-source";
  if (::access(path.c_str(), X_OK) != 0) path = require_tool("smtp-source", "postfix");
  return run_command({path, "-c", "-m", std::to_string(messages), "-s", std::to_string(sessions),
                      "-l", "500", "-f", "app@example.com", "-t", "user@example.com",
                      "127.0.0.1:" + std::to_string(srv.port())},
                     milliseconds(30000));
}

TEST_CASE("appsetup: smtp-source pipelines against --pipelining; every message arrives") {
  auto srv = start({"-c", "sink", "--json", "--pipelining", "-d"});
  auto r = smtp_source(srv, 40, 4);
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(srv.wait_stdout("\n", 40));
  CHECK(count(srv.stdout_text(), "\"mailfrom\": \"app@example.com\"") == 40);
}

// ==== Both loopbacks: every address of the listening host ====

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

TEST_CASE("appsetup: listen_everywhere binds every address on one port, port 0 too") {
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

TEST_CASE("appsetup: an address this machine lacks is left out, unless it is the first") {
  std::vector<SocketAddress> addresses{address_of("127.0.0.1"), address_of("192.0.2.1")};
  std::vector<Listener> listeners = listen_everywhere(addresses, "test:0", 0);
  CHECK(listeners.size() == 1);
  for (const Listener& l : listeners) close_socket(l.socket);
  std::vector<SocketAddress> reversed{address_of("192.0.2.1"), address_of("127.0.0.1")};
  CHECK_THROWS_AS(listen_everywhere(reversed, "test:0", 0), StartError);
}

TEST_CASE("appsetup: smtpd localhost:0 listens on every address localhost resolves to") {
  std::string error;
  std::vector<SocketAddress> resolved = resolve_endpoint(Endpoint{"localhost", 0}, error);
  REQUIRE(!resolved.empty());
  ignore_sigpipe();
  auto srv = ServerProcess::launch({"-n", "localhost:0"});
  CHECK(srv.wait_stderr(resolved.size() > 1 ? "also listening on" : "listening on"));
  std::vector<std::string> lines = lines_of(srv.stderr_text());
  REQUIRE(!lines.empty());
  CHECK(starts_with(lines[0], "listening on "));
  for (std::size_t i = 0; i < resolved.size(); ++i) {
    auto [host, ignored] = numeric_address(reinterpret_cast<const sockaddr*>(&resolved[i].storage),
                                           resolved[i].length);
    std::string line = (i == 0 ? "listening on " : "also listening on ") +
                       format_endpoint(host, static_cast<unsigned>(srv.port()));
    INFO(srv.stderr_text());
    REQUIRE(i < lines.size());
    CHECK(lines[i] == line);
    Client c = Client::connect(host, srv.port(), &srv);
    CHECK(starts_with(c.read_reply(), "220 "));
  }
  MESSAGE("localhost resolves to " << resolved.size() << " address(es) here");
}

// ==== STARTTLS in the channel (both builds: the channel needs no OpenSSL) ====

inline ChannelConfig tls_config(bool required = false) {
  ChannelConfig config = auth_config();
  config.offer_starttls = true;
  config.records_tls = true;
  config.tls_required = required;
  return config;
}

TEST_CASE("appsetup: STARTTLS: 220, pipelined input discarded, the session starts over") {
  Session s(tls_config());
  CHECK(s.send("EHLO c\r\n") ==
        "250-test.example\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n"
        "250 HELP\r\n");
  CHECK(s.send("AUTH PLAIN " + plain("bob", "pw") + "\r\n").substr(0, 3) == "235");
  CHECK(s.send("STARTTLS x\r\n") == "501 Syntax: STARTTLS\r\n");
  CHECK(s.send("STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<x@y>\r\n") ==
        "220 2.0.0 Ready to start TLS\r\n");
  CHECK(s.channel.question() == Channel::Question::StartTls);
  CHECK_FALSE(s.channel.wants_input());
  s.channel.set_security("TLSv1.3 TEST");
  s.channel.restart_in_tls();
  CHECK(s.channel.question() == Channel::Question::None);
  CHECK(s.channel.seen_greeting.empty());
  CHECK(s.channel.auth_user.empty());  // RFC 3207 4.2: forget what the client said before
  CHECK(s.send("MAIL FROM:<a@b>\r\n") == "503 Error: send HELO first\r\n");
  CHECK(s.send("EHLO c\r\n") ==
        "250-test.example\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n250 HELP\r\n");
  CHECK(s.send("STARTTLS\r\n") == "503 5.5.1 Error: TLS already active\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n").substr(0, 14) ==
        "250 OK\r\n250 OK");
  Envelope e = s.deliver();
  CHECK(e.tls == std::optional<std::string>("TLSv1.3 TEST"));
  CHECK(session_header_lines(e) == "X-TLS: TLSv1.3 TEST\n");
}

TEST_CASE("appsetup: --tls-required: MAIL and AUTH answer 530 before STARTTLS; AUTH is hidden") {
  Session s(tls_config(true));
  CHECK(s.send("EHLO c\r\n") == "250-test.example\r\n250-8BITMIME\r\n250-STARTTLS\r\n250 HELP\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\n") == "530 5.7.0 Must issue a STARTTLS command first\r\n");
  CHECK(s.send("AUTH PLAIN " + plain("bob", "pw") + "\r\n") ==
        "530 5.7.0 Must issue a STARTTLS command first\r\n");
  CHECK(s.channel.auth_user.empty());
  Session plain_session(tls_config());
  plain_session.send("HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nx\r\n.\r\n");
  CHECK(plain_session.deliver().tls == std::optional<std::string>(""));  // JSON: "tls": null
}

#ifdef SMTPD_TLS
// ==== TLS end to end (make TLS=1) ====

// kTlsScript - python3 -c script; argv: port, mode (starttls, smtps, plain), user ("" for
// none). Sends one message with smtplib, certificates unchecked (the server's is throwaway).
constexpr const char* kTlsScript = R"PY(
import smtplib, ssl, sys
port, mode, user = int(sys.argv[1]), sys.argv[2], sys.argv[3]
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
try:
    if mode == 'smtps':
        s = smtplib.SMTP_SSL('127.0.0.1', port, timeout=10, context=context)
    else:
        s = smtplib.SMTP('127.0.0.1', port, timeout=10)
        if mode == 'starttls':
            s.starttls(context=context)
    if user:
        s.login(user, 'pw')
    s.sendmail('app@example.com', ['user@example.com'], b'Subject: tls\r\n\r\nHello.\r\n')
    version = s.sock.version() if hasattr(s.sock, 'version') else 'plain'
    s.quit()
    print('sent', version)
except smtplib.SMTPException as e:
    print(type(e).__name__, getattr(e, 'smtp_code', ''))
    sys.exit(1)
)PY";

inline CommandResult smtplib_tls(const ServerProcess& srv, const std::string& mode,
                                 const std::string& user = "") {
  return run_command({require_tool("python3", "python3"), "-c", kTlsScript,
                      std::to_string(srv.port()), mode, user});
}

TEST_CASE("appsetup: TLS: swaks --tls with AUTH, swaks --tlsc against --tls-implicit") {
  auto srv = start({"-c", "sink", "--json", "--tls", "--auth"});
  auto r = swaks(srv, {"--tls", "--auth", "LOGIN", "--auth-user", "gina", "--auth-password", "pw"});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(r.out.find("<-  220 2.0.0 Ready to start TLS") != std::string::npos);
  CHECK(r.out.find("=== TLS started with cipher TLSv1.") != std::string::npos);
  CHECK(r.out.find("<~  235 2.7.0 Authentication successful") != std::string::npos);
  REQUIRE(srv.wait_stdout("\n"));
  CHECK(srv.stdout_text().find("\"auth_user\": \"gina\", \"tls\": \"TLSv1.3 TLS_") !=
        std::string::npos);
  auto smtps = start({"-c", "sink", "--json", "--tls-implicit"});
  auto tlsc = swaks(smtps, {"--tlsc"});
  INFO(tlsc.describe());
  CHECK(tlsc.ok());
  CHECK(tlsc.out.find("<~  220 ") != std::string::npos);  // the greeting came through TLS
  REQUIRE(smtps.wait_stdout("\n"));
  CHECK(smtps.stdout_text().find("\"tls\": \"TLSv1.3 TLS_") != std::string::npos);
}

TEST_CASE("appsetup: TLS: curl --ssl-reqd and smtps:// with a certificate from files") {
  TempDir dir;
  auto made = run_command({require_tool("openssl", "openssl"), "req", "-x509", "-newkey", "ec",
                           "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj",
                           "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
                           dir / "key.pem", "-out", dir / "cert.pem"});
  INFO(made.describe());
  REQUIRE(made.ok());
  TempFile message("Subject: curl over TLS\r\n\r\nHello.\r\n");
  auto starttls = start({"--tls-cert", dir / "cert.pem", "--tls-key", dir / "key.pem"});
  auto r = curl_send("smtp://127.0.0.1:" + std::to_string(starttls.port()), message.path(),
                     {"--ssl-reqd", "--cacert", dir / "cert.pem"});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(starttls.wait_stdout("X-Peer: 127.0.0.1\nX-TLS: TLSv1.3 TLS_"));
  auto implicit =
      start({"--tls-implicit", "--tls-cert", dir / "cert.pem", "--tls-key", dir / "key.pem"});
  auto s = curl_send("smtps://127.0.0.1:" + std::to_string(implicit.port()), message.path(),
                     {"--cacert", dir / "cert.pem"});
  INFO(s.describe());
  CHECK(s.ok());
  CHECK(implicit.wait_stdout("X-TLS: TLSv1.3"));
  auto bad = run_command({smtpd_bin(), "-n", "--tls-cert", dir / "key.pem", "--tls-key",
                          dir / "key.pem", "127.0.0.1:0"});
  CHECK(bad.status.code == 1);
  CHECK(starts_with(bad.err, "smtpd: cannot use --tls-cert " + dir / "key.pem" + ": "));
  CHECK(count(bad.err, "\n") == 1);
}

TEST_CASE("appsetup: TLS: smtplib starttls + login, SMTP_SSL, and plain text refused") {
  TempDir dir;
  auto srv = start({"-c", "sink", "--tls-required", "--auth-required", "--maildir", dir / "md"});
  auto r = smtplib_tls(srv, "starttls", "hana");
  INFO(r.describe());
  CHECK(starts_with(r.out, "sent TLSv1."));
  auto files = list_dir(dir / "md/new");
  REQUIRE(files.size() == 1);
  std::string text = read_file(dir / "md/new/" + files[0]);
  CHECK(starts_with(text, "X-Auth-User: hana\nX-TLS: TLSv1.3 TLS_"));
  auto refused = smtplib_tls(srv, "plain");
  CHECK(refused.out == "SMTPSenderRefused 530\n");
  auto smtps = start({"-c", "sink", "--tls-implicit", "--auth"});
  auto ssl = smtplib_tls(smtps, "smtps", "ivan");
  INFO(ssl.describe());
  CHECK(starts_with(ssl.out, "sent TLSv1."));
}

TEST_CASE("appsetup: TLS: AUTH without TLS under --tls-required answers 530, no login happens") {
  auto srv = start({"--tls-required", "--auth"});
  Client c = srv.connect();
  REQUIRE(starts_with(c.read_reply(), "220 "));
  std::string ehlo = c.command("EHLO client");
  CHECK(ehlo.find("250-STARTTLS") != std::string::npos);
  CHECK(ehlo.find("AUTH") == std::string::npos);
  CHECK(c.command("AUTH PLAIN " + plain("mallory", "pw")) ==
        "530 5.7.0 Must issue a STARTTLS command first");
  CHECK(c.command("MAIL FROM:<a@example.com>") == "530 5.7.0 Must issue a STARTTLS command first");
}

TEST_CASE("appsetup: TLS: PureProxy takes STARTTLS and AUTH; the upstream sees plain text only") {
  auto upstream = start({"-d"});
  auto proxy = ServerProcess::launch({"-n", "-c", "PureProxy", "--tls", "--auth", "127.0.0.1:0",
                                      "127.0.0.1:" + std::to_string(upstream.port())});
  TempFile message("Subject: via the proxy\r\n\r\nHello.\r\n");
  auto r = curl_send("smtp://127.0.0.1:" + std::to_string(proxy.port()), message.path(),
                     {"--ssl-reqd", "-k", "--user", "kim:pw"});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(upstream.wait_stdout("------------ END MESSAGE ------------\n"));
  CHECK(upstream.stdout_text().find("Subject: via the proxy\n") != std::string::npos);
  CHECK(upstream.stdout_text().find("X-TLS") == std::string::npos);
  CHECK(upstream.stdout_text().find("X-Auth-User") == std::string::npos);
  CHECK(upstream.stderr_text().find("STARTTLS") == std::string::npos);
  CHECK(upstream.stderr_text().find("AUTH") == std::string::npos);
}

// kPipelinedStartTls - python3 -c script; argv: port. Sends STARTTLS with MAIL and RCPT in the
// same write (RFC 3207 forbids it: the server must discard them), then TLS, EHLO and RCPT.
constexpr const char* kPipelinedStartTls = R"PY(
import socket, ssl, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)
f = s.makefile('rb')
def reply():
    lines = []
    while True:
        line = f.readline().decode()
        lines.append(line.rstrip('\r\n'))
        if line[3:4] != '-':
            return '|'.join(lines)
print(reply().split(' ')[0])
s.sendall(b'EHLO c\r\n'); reply()
s.sendall(b'STARTTLS\r\nMAIL FROM:<evil@example.com>\r\nRCPT TO:<x@example.com>\r\n')
print(reply())
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
t = context.wrap_socket(s)
f = t.makefile('rb')
t.sendall(b'RCPT TO:<x@example.com>\r\n'); print(reply())
t.sendall(b'EHLO c\r\n'); print(reply().split('|')[-1])
t.sendall(b'QUIT\r\n'); print(reply())
)PY";

TEST_CASE("appsetup: TLS: commands pipelined after STARTTLS are discarded") {
  auto srv = start({"--tls"});
  auto r = run_command(
      {require_tool("python3", "python3"), "-c", kPipelinedStartTls, std::to_string(srv.port())});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(r.out ==
        "220\n220 2.0.0 Ready to start TLS\n503 Error: send HELO first\n250 HELP\n221 Bye\n");
}
#else
TEST_CASE("appsetup: a build without TLS answers a TLS option with one line and status 1") {
  for (const char* option : {"--tls", "--tls-implicit", "--tls-required"}) {
    auto r = run_command({smtpd_bin(), "-n", option, "127.0.0.1:0"});
    INFO(r.describe());
    CHECK(r.status.code == 1);
    CHECK(r.err ==
          "smtpd: this smtpd is built without TLS: rebuild it with make TLS=1 to use --tls\n");
  }
}
#endif

TEST_SUITE_END();

}  // namespace appsetup
}  // namespace smtpd_test
