// test_refusals.cpp - scripted refusals (--reject STAGE:PATTERN=REPLY or STAGE:N%=REPLY, and
// --reject-seed): glob_match and the rules in the pure channel, the command line, then end to
// end with swaks and Python's smtplib, which must hear the scripted replies.
//
// All cases are in the test suite "refusals":   tests/run_tests -ts='refusals'
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace refusals {

TEST_SUITE_BEGIN("refusals");

// ==== The channel ====

TEST_CASE("glob_match is fnmatch: * ? [set] [!set], letters without case") {
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

TEST_CASE("--reject refuses at each stage; the first matching rule wins") {
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

TEST_CASE("--reject N% draws from the seed: the same seed, the same refusals") {
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

TEST_CASE("--reject STAGE:PATTERN=REPLY is parsed, in order, and checked") {
  Settings s = settings_of({"--reject", "rcpt:*@bounce.test=550 5.1.1 no such user, sorry",
                            "--reject", "rcpt:12.5%=451 4.3.0 try again later", "--reject",
                            "mail:srs=a=b@x=553", "--reject-seed", "99"});
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
    CHECK_THROWS_AS(settings_of({"--reject", bad}), UsageError);
  }
  CHECK_THROWS_AS(settings_of({"--reject-seed", "-1"}), UsageError);
  CHECK_FALSE(settings_of({}).reject_seed.has_value());
}

TEST_CASE("a bad --reject is one line on stderr: a CR or LF in it is shown as \\x0d, \\x0a") {
  auto r = run_command({smtpd_bin(), "-n", "--reject",
                        "bogus\r\nsmtpd: listening on 127.0.0.1:25\n=550 no", "127.0.0.1:0"});
  INFO(r.describe());
  CHECK(r.status.code == kExitUsage);
  CHECK(count(r.err, "\n") == 1);
  CHECK(starts_with(r.err,
                    "smtpd: bad --reject 'bogus\\x0d\\x0asmtpd: listening on 127.0.0.1:25\\x0a"
                    "=550 no': "));
  CHECK(r.err.find('\r') == std::string::npos);
}

// ==== End to end, with real clients ====

TEST_CASE("--reject end to end: swaks and smtplib hear the scripted reply at each stage") {
  SUBCASE("rcpt: swaks hears the scripted 550; other recipients get through") {
    auto srv = start_smtpd({"--reject", "rcpt:*@bounce.test=550 5.1.1 no such user"});
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
    auto srv = start_smtpd({"--reject", "connect:127.0.0.1=421 4.3.2 closed for maintenance"});
    auto r = smtplib(srv);
    CHECK(r.out == "SMTPConnectError 421\n");
  }
  SUBCASE("data: the message is refused after its text and neither printed nor stored") {
    TempDir dir;
    auto srv =
        start_smtpd({"--maildir", dir / "md", "--reject", "data:*=554 5.6.0 content refused"});
    auto r = smtplib(srv);
    CHECK(r.out == "SMTPDataError 554\n");
    srv.stop();
    CHECK(srv.child.out.text() == "");
    CHECK(list_dir(dir / "md/new").empty());
  }
}

TEST_CASE("--reject 'rcpt:50%' with --reject-seed refuses the same messages each run") {
  auto run = [](const std::string& seed) {
    auto srv = start_smtpd(
        {"-c", "sink", "--reject", "rcpt:50%=451 4.3.0 try again later", "--reject-seed", seed});
    std::string pattern;
    for (int i = 0; i < 12; ++i) {
      auto r = smtplib(srv);
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

TEST_SUITE_END();

}  // namespace refusals
}  // namespace smtpd_test
