// test_wait.cpp - waiting for the right message from a script: --match, --deadline,
// --expect-none, --port-file, --background, the envelope in stored mail, smtpd --wait DIR,
// and the README's recipes for them.
//
// First the pure parts of smtpd.cpp called directly (header_values, message_field,
// parse_match); then the built binary end to end with real clients (swaks, Python's smtplib)
// and real readers (jq). Every wait is bounded; everything listens on 127.0.0.1.
#include <doctest/doctest.h>

#include <climits>
#include <fstream>
#include <regex>
#include <thread>

#include "test_support.hpp"

namespace smtpd_test {
namespace wait {

TEST_SUITE_BEGIN("wait");

// envelope_of - an envelope from a@example.com to `rcpts` holding `data` (lines joined by \n)
inline Envelope envelope_of(std::string data, std::vector<std::string> rcpts = {"b@example.com"}) {
  Envelope e;
  e.peer = "127.0.0.1";
  e.mailfrom = "a@example.com";
  e.rcpttos = std::move(rcpts);
  e.data = std::move(data);
  return e;
}

// ==== --match: the rules, called directly ====

TEST_CASE("header_values unfolds headers, ignores case and stops at the empty line") {
  std::string data =
      "Subject: first\n line\nX-Tag:  one  \nx-tag: two\n\tmore\nTo: b@example.com\n\n"
      "X-Tag: in the body\n";
  CHECK(header_values(data, "Subject") == std::vector<std::string>{"first line"});
  CHECK(header_values(data, "X-TAG") == std::vector<std::string>{"one", "two\tmore"});
  CHECK(header_values(data, "Cc").empty());
  CHECK(header_values("\nSubject: body only\n", "Subject").empty());
  CHECK(header_values("Subject: no body", "subject") == std::vector<std::string>{"no body"});
}

TEST_CASE("message_field gives each --match field its values") {
  Envelope e = envelope_of("Subject: Hello =?utf-8?q?w?=\nX-Id: 42\n\nline 1\nline 2",
                           {"b@example.com", "c@other.test"});
  auto field = [&](const std::string& spec) { return message_field(e, parse_match(spec)); };
  CHECK(field("from=*") == std::vector<std::string>{"a@example.com"});
  CHECK(field("rcpt=*") == std::vector<std::string>{"b@example.com", "c@other.test"});
  CHECK(field("subject=*") == std::vector<std::string>{"Hello w"});  // encoded words decoded
  CHECK(field("header:x-id=*") == std::vector<std::string>{"42"});
  CHECK(field("text=*") == std::vector<std::string>{"line 1\nline 2"});
  // a first line that is not a header is the body, as Python's email reads it
  CHECK(message_field(envelope_of("no headers at all"), parse_match("text=*")) ==
        std::vector<std::string>{"no headers at all"});
  CHECK(message_field(envelope_of("\nonly a body"), parse_match("text=*")) ==
        std::vector<std::string>{"only a body"});
}

TEST_CASE("--match reads subject, headers and text decoded, as a mail client shows them") {
  Envelope e = envelope_of(
      "Subject: =?utf-8?b?R3LDvMOfZQ==?= aus =?iso-8859-1?q?K=F6ln?=\n"
      "X-Tag: =?utf-8?q?caf=C3=A9?=\nMIME-Version: 1.0\n"
      "Content-Type: multipart/alternative; boundary=b\n\n--b\n"
      "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
      "Reset: https://app.example.org/reset?token=3Dabc123\n--b\n"
      "Content-Type: text/html\n\n<p>html</p>\n--b--\n");
  auto field = [&](const std::string& spec) { return message_field(e, parse_match(spec)); };
  CHECK(field("subject=*") == std::vector<std::string>{"Gr\xc3\xbc\xc3\x9f"
                                                       "e aus K\xc3\xb6ln"});
  CHECK(field("header:x-tag=*") == std::vector<std::string>{"caf\xc3\xa9"});
  REQUIRE(field("text=*").size() == 1);
  CHECK(starts_with(field("text=*")[0], "Reset: https://app.example.org/reset?token=abc123"));
  MessageMatcher matcher;
  matcher.add(parse_match("text=*token=abc123*"));
  matcher.add(
      parse_match("subject=gr\xc3\xbc\xc3\x9f"
                  "e*"));
  CHECK(matcher.matches(e));
  Envelope html_only = envelope_of("Content-Type: text/html\n\n<b>only html</b>");
  CHECK(message_field(html_only, parse_match("text=*")) ==
        std::vector<std::string>{"<b>only html</b>"});
}

TEST_CASE("MessageMatcher: every rule must hold, each on any value, without regard to case") {
  Envelope e = envelope_of("Subject: Your Reset Link\n\nClick https://x.test/r?t=1\n",
                           {"b@example.com", "carol@wanted.test"});
  auto matches = [&](std::vector<std::string> specs) {
    MessageMatcher m;
    for (const std::string& spec : specs) m.add(parse_match(spec));
    return m.matches(e);
  };
  CHECK(matches({}));
  CHECK(matches({"rcpt=*@WANTED.test"}));
  CHECK(matches({"rcpt=carol@*", "subject=*reset*", "text=*https://x.test/r?t=1*"}));
  CHECK_FALSE(matches({"rcpt=carol@*", "subject=*welcome*"}));
  CHECK_FALSE(matches({"from=b@example.com"}));
  CHECK_FALSE(matches({"header:X-Missing=*"}));
}

TEST_CASE("parse_match takes FIELD=PATTERN and refuses anything else") {
  MatchRule rule = parse_match("header:X-Id=a=b*");
  CHECK(rule.field == MatchField::Header);
  CHECK(rule.header == "X-Id");
  CHECK(rule.pattern == "a=b*");
  for (const char* bad : {"rcpt", "to=x", "rcpt=", "header:=x", "header:a b=x", "=x"}) {
    CAPTURE(bad);
    CHECK_THROWS_AS(parse_match(bad), UsageError);
  }
  auto r = run_smtpd({"--match", "to=x"});
  check_one_error_line(r, kExitUsage);
  CHECK(r.err.find("bad --match 'to=x'") != std::string::npos);
}

// ==== --match end to end ====

TEST_CASE("--match: only matching messages are printed and counted; every one is stored") {
  TempDir tmp;
  auto srv =
      start_smtpd({"-c", "sink", "--maildir", tmp / "md", "--json", "--match", "rcpt=*@wanted.test",
                   "--match", "subject=*reset*", "--max-messages", "1"});
  CHECK(swaks(srv, {"--to", "x@other.test", "--header", "Subject: reset"}).ok());
  CHECK(swaks(srv, {"--to", "y@wanted.test", "--header", "Subject: welcome"}).ok());
  CHECK(srv.child.running());
  CHECK(srv.stdout_text() == "");
  CHECK(list_dir(tmp / "md/new").size() == 2);  // matching never refuses or drops mail
  auto sent = swaks(srv, {"--to", "z@WANTED.test", "--header", "Subject: Your RESET link"});
  CHECK(sent.ok());
  auto st = srv.child.wait_exit(milliseconds(4000));
  INFO(st.describe() << "; stderr: " << srv.child.err.text());
  CHECK(st.exited);
  CHECK(st.code == 0);
  CHECK(list_dir(tmp / "md/new").size() == 3);
  auto lines = lines_of(srv.child.out.text());
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].find("\"rcpttos\": [\"z@WANTED.test\"]") != std::string::npos);
}

TEST_CASE("--match with DebuggingServer prints only the matching message, in its layout") {
  auto srv = start_smtpd({"--match", "from=*@app.test"});
  CHECK(smtplib(srv).out == "sent\n");  // from app@example.com: not printed
  CHECK(swaks(srv, {"--from", "app@app.test", "--header", "Subject: hi", "--body", "x"}).ok());
  CHECK(srv.wait_stdout(kEnd));
  std::string out = srv.stdout_text();
  CHECK(count(out, kFollows) == 1);
  CHECK(out.find("Subject: hi\n") != std::string::npos);
  CHECK(out.find("from smtplib") == std::string::npos);
  CHECK(srv.stop().code == 0);
}

// ==== --deadline and --expect-none ====

TEST_CASE("Expectation counts matching messages and others, and names the outcome") {
  Envelope wanted = envelope_of("Subject: Reset\n\nbody", {"b@example.com", "c@example.com"});
  Envelope other = envelope_of("");
  other.is_matching = false;
  SUBCASE("two wanted, one came by the deadline: status 3") {
    Expectation e(2, false, 30000);
    CHECK_FALSE(e.on_message(wanted));
    for (int i = 0; i < 4; ++i) CHECK_FALSE(e.on_message(other));
    e.on_deadline();
    CHECK(e.exit_status() == kExitDeadline);
    CHECK(e.outcome() == "deadline: 1 of 2 matching messages in 30 s (4 others arrived)");
  }
  SUBCASE("the wanted number came: 0, nothing to say") {
    Expectation e(1, false, 30000);
    CHECK(e.on_message(wanted));
    CHECK(e.exit_status() == kExitOk);
    CHECK(e.outcome() == "");
  }
  SUBCASE("--expect-none: the first matching message fails it") {
    Expectation e(0, true, 1500);
    CHECK_FALSE(e.on_message(other));
    CHECK(e.on_message(wanted));
    CHECK(e.exit_status() == kExitMatched);
    CHECK(e.outcome() ==
          "--expect-none: a matching message arrived: from <a@example.com> to <b@example.com>, "
          "<c@example.com>, subject \"Reset\"");
  }
  SUBCASE("--expect-none: none by the deadline is 0") {
    Expectation e(0, true, 1500);
    CHECK_FALSE(e.on_message(other));
    e.on_deadline();
    CHECK(e.exit_status() == kExitOk);
    CHECK(e.outcome() == "deadline: no matching message in 1.5 s (1 other arrived)");
  }
}

TEST_CASE("--expect-none without --deadline, or a bad --deadline, is a bad command line") {
  check_one_error_line(run_smtpd({"--expect-none"}), kExitUsage);
  check_one_error_line(run_smtpd({"--deadline", "0"}), kExitUsage);
  check_one_error_line(run_smtpd({"--deadline", "soon"}), kExitUsage);
}

TEST_CASE("--deadline: too few matching messages exit 3 with one line; idle sessions hear 421") {
  auto before = Clock::now();
  auto srv = start_smtpd(
      {"-c", "sink", "--match", "rcpt=*@wanted.test", "--max-messages", "2", "--deadline", "1.5"});
  CHECK(swaks(srv, {"--to", "a@wanted.test"}).ok());
  CHECK(swaks(srv, {"--to", "a@other.test"}).ok());
  Client idle = srv.connect();
  std::string fqdn = read_greeting(idle);
  CHECK(idle.read_reply(milliseconds(4000)) ==
        "421 " + fqdn + " Error: shutting down; try again later");
  auto st = srv.child.wait_exit(milliseconds(4000));
  double took = seconds_since(before);
  CHECK(st.exited);
  CHECK(st.code == kExitDeadline);
  CHECK(took > 1.4);
  CHECK(took < 4);
  CHECK(lines_of(srv.child.err.text()).back() ==
        "smtpd: deadline: 1 of 2 matching messages in 1.5 s (1 other arrived)");
}

TEST_CASE("--deadline: the wanted messages before it exit 0 at once, with nothing said") {
  auto srv = start_smtpd({"-c", "sink", "--max-messages", "1", "--deadline", "20"});
  CHECK(swaks(srv).ok());
  auto st = srv.child.wait_exit(milliseconds(4000));
  CHECK(st.exited);
  CHECK(st.code == kExitOk);
  CHECK(srv.child.err.text().find("deadline") == std::string::npos);
}

TEST_CASE("--expect-none: a matching message is answered and printed, then exit 1 naming it") {
  auto srv = start_smtpd({"-c", "sink", "--json", "--match", "rcpt=*@secret.test", "--deadline",
                          "20", "--expect-none"});
  CHECK(swaks(srv, {"--to", "x@other.test"}).ok());  // not matching: nothing happens
  Client c = greeted_client(srv);
  REQUIRE(send_wire(c, crlf("Subject: leaked\n\nbody\n"), "<app@example.com>",
                    {"b@example.com", "boss@secret.test"}) == "250 OK");
  CHECK(srv.wait_stdout("boss@secret.test"));  // printed before the 250
  CHECK_FALSE(wait_until([&] { return !srv.child.running(); }, milliseconds(500)));  // open
  CHECK(c.command("QUIT") == "221 Bye");
  auto st = srv.child.wait_exit(milliseconds(4000));
  CHECK(st.exited);
  CHECK(st.code == kExitMatched);
  auto lines = lines_of(srv.child.out.text());
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].find("boss@secret.test") != std::string::npos);
  CHECK(lines_of(srv.child.err.text()).back() ==
        "smtpd: --expect-none: a matching message arrived: from <app@example.com> to "
        "<b@example.com>, <boss@secret.test>, subject \"leaked\"");
}

TEST_CASE("--expect-none: no matching message by the deadline exits 0") {
  auto srv = start_smtpd(
      {"-c", "sink", "--match", "rcpt=*@secret.test", "--deadline", "1", "--expect-none"});
  CHECK(smtplib(srv).out == "sent\n");
  auto st = srv.child.wait_exit(milliseconds(4000));
  CHECK(st.exited);
  CHECK(st.code == kExitOk);
  CHECK(lines_of(srv.child.err.text()).back() ==
        "smtpd: deadline: no matching message in 1 s (1 other arrived)");
}

// ==== --port-file and --background ====

TEST_CASE("--port-file holds the port and a newline while the server runs, then is removed") {
  TempDir tmp;
  auto srv = start_smtpd({"--port-file", tmp / "port"});
  CHECK(read_file(tmp / "port") == std::to_string(srv.port()) + "\n");
  CHECK(list_dir(tmp.path()) == std::vector<std::string>{"port"});  // no temporary file left
  CHECK(srv.stop().code == kExitOk);
  CHECK(list_dir(tmp.path()).empty());
  SUBCASE("a port file that cannot be written is one line and status 5") {
    check_one_error_line(run_smtpd({"-n", "--port-file", tmp / "no/such/dir", "127.0.0.1:0"}),
                         kExitCannotListen);
  }
}

// Detached - a server started with --background: killed (SIGKILL) when this goes, as it is
// not our child
struct Detached {
  pid_t pid = 0;
  ~Detached() {
    if (pid > 0) ::kill(pid, SIGKILL);
  }
};

TEST_CASE("--background: the command returns at once with SMTPD_PORT and SMTPD_PID") {
  TempDir tmp;
  auto before = Clock::now();
  auto r = run_smtpd({"-n", "-c", "sink", "--maildir", tmp / "md", "--port-file", tmp / "port",
                      "--background", "127.0.0.1:0"});  // its stdout and stderr are pipes
  CHECK(seconds_since(before) < 3);
  INFO(r.describe());
  REQUIRE(r.ok());
  std::smatch m;
  REQUIRE(std::regex_match(r.out, m, std::regex("SMTPD_PORT=([0-9]+)\nSMTPD_PID=([0-9]+)\n")));
  Detached server{static_cast<pid_t>(std::stoi(m[2]))};
  CHECK(read_file(tmp / "port") == m.str(1) + "\n");
  CHECK(::getsid(server.pid) == server.pid);  // a session of its own
  auto client = Client::connect("127.0.0.1", std::stoi(m[1]));
  greet(client);
  CHECK(send_mail(client, "Subject: in the background\n\nbody\n") == "250 OK");
  CHECK(list_dir(tmp / "md/new").size() == 1);
  CHECK(::kill(server.pid, SIGTERM) == 0);
  CHECK(wait_until([&] { return list_dir(tmp.path()) == std::vector<std::string>{"md"}; },
                   milliseconds(4000)));  // it removed its port file on the way out
}

TEST_CASE("--background: a port in use is said before detaching, with the usual status") {
  IdlePort busy(IdlePort::Silent);
  auto r = run_smtpd({"-n", "--background", busy.address()});
  check_one_error_line(r, kExitCannotListen);
}

// ==== The envelope in stored mail ====

TEST_CASE("--maildir and --mbox start each message with Return-Path and Delivered-To") {
  TempDir tmp;
  auto srv = start_smtpd({"-c", "sink", "--maildir", tmp / "md", "--mbox", tmp / "mb"});
  Client c = greeted_client(srv);
  // The Bcc recipient is in no header: only the envelope says the message was for it.
  CHECK(send_wire(c, crlf("To: b@example.com\nSubject: s\n\nbody\n"), "<>",
                  {"b@example.com", "hidden@bcc.test"}) == "250 OK");
  const std::string stored =
      "Return-Path: <>\nDelivered-To: <b@example.com>\n"
      "Delivered-To: <hidden@bcc.test>\nTo: b@example.com\nSubject: s\n\n"
      "body\n";
  auto names = list_dir(tmp / "md/new");
  REQUIRE(names.size() == 1);
  CHECK(read_file(tmp / "md/new/" + names[0]) == stored);
  std::string mbox = read_file(tmp / "mb");
  CHECK(starts_with(mbox, "From MAILER-DAEMON "));
  CHECK(mbox.substr(mbox.find('\n') + 1) == stored + "\n");
}

// ==== smtpd --wait DIR ====

TEST_CASE("read_stored_message reads the envelope back from a stored file") {
  Envelope e = read_stored_message(
      "Return-Path: <a@example.com>\nDelivered-To: <b@example.com>\nDelivered-To: <c@x.test>\n"
      "X-Auth-User: u\nSubject: s\n\nbody\n");
  CHECK(e.mailfrom == "a@example.com");
  CHECK(e.rcpttos == std::vector<std::string>{"b@example.com", "c@x.test"});
  CHECK(e.data == "X-Auth-User: u\nSubject: s\n\nbody");
  CHECK(read_stored_message("Return-Path: <>\n\nx\n").mailfrom == "<>");
  CHECK(read_stored_message("Subject: no envelope\n").data == "Subject: no envelope");
}

// start_wait - smtpd --wait with these arguments, running
inline Child start_wait(std::vector<std::string> args) {
  args.insert(args.begin(), {smtpd_bin(), "--wait"});
  return Child::spawn(args);
}

TEST_CASE("--wait: the first matching message, found as it arrives, printed as --json; exit 0") {
  TempDir tmp;
  auto srv = start_smtpd({"-c", "sink", "--maildir", tmp / "md"});
  Child waiting =
      start_wait({tmp / "md", "--match", "rcpt=*@bcc.test", "--deadline", "10", "--json"});
  CHECK(swaks(srv, {"--to", "x@other.test"}).ok());
  CHECK_FALSE(wait_until([&] { return !waiting.running(); }, milliseconds(700)));
  Client c = greeted_client(srv);
  CHECK(send_wire(c, crlf("To: b@example.com\nSubject: hi\n\nbody\n"), "<a@example.com>",
                  {"b@example.com", "hidden@bcc.test"}) == "250 OK");
  auto st = waiting.wait_exit(milliseconds(3000));
  CHECK(st.exited);
  CHECK(st.code == kExitOk);
  waiting.pump();
  auto lines = lines_of(waiting.out.text());
  REQUIRE(lines.size() == 1);
  CHECK(lines[0] ==
        "{\"peer\": \"\", \"mailfrom\": \"a@example.com\", \"rcpttos\": [\"b@example.com\", "
        "\"hidden@bcc.test\"], \"mail_options\": [], \"rcpt_options\": [], \"size\": 35, "
        "\"data\": \"To: b@example.com\\nSubject: hi\\n\\nbody\", \"data_encoding\": \"utf-8\"}");
  CHECK(waiting.err.text() == "");
}

TEST_CASE("--wait counts what is there already, unless --new-only; --deadline exits 3") {
  TempDir tmp;
  auto srv = start_smtpd({"-c", "sink", "--maildir", tmp / "md"});
  CHECK(swaks(srv, {"--header", "Subject: early"}).ok());
  auto r = run_smtpd({"--wait", tmp / "md", "--match", "subject=early"});
  CHECK(r.ok());
  CHECK(count(r.out, kFollows) == 1);
  r = run_smtpd({"--wait", tmp / "md", "--new-only", "--deadline", "1"});
  CHECK(r.status.code == kExitDeadline);
  CHECK(r.out == "");
  CHECK(r.err == "smtpd: deadline: 0 of 1 matching message in 1 s (0 others arrived)\n");
  r = run_smtpd({"--wait", tmp / "md", "--max-messages", "2", "--deadline", "1"});
  CHECK(r.status.code == kExitDeadline);
  CHECK(r.err == "smtpd: deadline: 1 of 2 matching messages in 1 s (0 others arrived)\n");
}

TEST_CASE("--wait --expect-none: a matching message exits 1 at once; none by the deadline 0") {
  TempDir tmp;
  auto srv = start_smtpd({"-c", "sink", "--maildir", tmp / "md"});
  CHECK(swaks(srv, {"--to", "boss@secret.test", "--header", "Subject: oops"}).ok());
  auto r = run_smtpd(
      {"--wait", tmp / "md", "--match", "rcpt=*@secret.test", "--deadline", "5", "--expect-none"});
  CHECK(r.status.code == kExitMatched);
  CHECK(count(r.out, kFollows) == 1);
  CHECK(r.err ==
        "smtpd: --expect-none: a matching message arrived: from <app@example.com> to "
        "<boss@secret.test>, subject \"oops\"\n");
  r = run_smtpd(
      {"--wait", tmp / "md", "--match", "rcpt=*@other.test", "--deadline", "1", "--expect-none"});
  CHECK(r.status.code == kExitOk);
  CHECK(r.out == "");
}

TEST_CASE("--wait reads no half-written file and counts a message moved to cur/ once") {
  TempDir tmp;
  for (const char* sub : {"", "/tmp", "/new", "/cur"}) ::mkdir((tmp / "md" + sub).c_str(), 0700);
  write_file(tmp / "md/tmp/1.M1P1Q1.host", "Return-Path: <a@x.test>\nDelivered-To: <b@x.test>\n");
  Child waiting = start_wait({tmp / "md", "--max-messages", "2", "--deadline", "3", "--json"});
  CHECK_FALSE(wait_until([&] { return !waiting.running(); }, milliseconds(600)));
  {
    std::ofstream more(tmp / "md/tmp/1.M1P1Q1.host", std::ios::app);
    more << "Subject: whole\n\nbody\n";
  }
  REQUIRE(::rename((tmp / "md/tmp/1.M1P1Q1.host").c_str(),
                   (tmp / "md/new/1.M1P1Q1.host").c_str()) == 0);
  CHECK(waiting.wait_output(
      waiting.out, [](const std::string& t) { return t.find('\n') != std::string::npos; },
      milliseconds(2000)));
  // a mail reader moves it to cur/ and marks it seen: the same message, not a second one
  REQUIRE(::rename((tmp / "md/new/1.M1P1Q1.host").c_str(),
                   (tmp / "md/cur/1.M1P1Q1.host:2,S").c_str()) == 0);
  auto st = waiting.wait_exit(milliseconds(5000));
  CHECK(st.code == kExitDeadline);
  waiting.pump();
  auto lines = lines_of(waiting.out.text());
  REQUIRE(lines.size() == 1);
  CHECK(lines[0].find("\"data\": \"Subject: whole\\n\\nbody\"") != std::string::npos);
}

TEST_CASE("--wait is cheap while it waits") {
  TempDir tmp;
  Child waiting = start_wait({tmp / "md", "--deadline", "30"});  // not there yet: waited for
  std::this_thread::sleep_for(milliseconds(300));
  double before = cpu_seconds(waiting.pid());
  std::this_thread::sleep_for(milliseconds(3000));
  double used = cpu_seconds(waiting.pid()) - before;
  MESSAGE("smtpd --wait used " << used << " s of CPU in 3 s of waiting");
  CHECK(before >= 0);
  CHECK(used < 0.1);
  CHECK(waiting.running());
}

// ==== The README's recipes, run as printed ====

// recipe_blocks - the code blocks of README.md's "Asserting on mail in a test", in order,
// each as (language, text)
inline std::vector<std::pair<std::string, std::string>> recipe_blocks() {
  std::string readme = read_file("README.md");
  std::size_t at = readme.find("\n## Asserting on mail in a test\n");
  std::size_t end = readme.find("\n## ", at + 1);
  std::vector<std::pair<std::string, std::string>> blocks;
  while (at != std::string::npos && (at = readme.find("\n```", at)) < end) {
    std::size_t language_end = readme.find('\n', at + 4);
    std::size_t close = readme.find("\n```\n", language_end);
    if (close == std::string::npos) break;
    blocks.emplace_back(readme.substr(at + 4, language_end - at - 4),
                        readme.substr(language_end + 1, close - language_end));
    at = close + 4;
  }
  return blocks;
}

// path_with_smtpd - a PATH on which "smtpd" is the binary under test, as after make install
struct PathWithSmtpd {
  PathWithSmtpd() {
    char resolved[PATH_MAX];
    REQUIRE(::realpath(smtpd_bin().c_str(), resolved) != nullptr);
    REQUIRE(::symlink(resolved, (bin / "smtpd").c_str()) == 0);
    const char* path = std::getenv("PATH");
    value = "PATH=" + bin.path() + ":" + (path ? path : "/usr/bin:/bin");
  }
  TempDir bin;
  std::string value;
};

TEST_CASE("README: each recipe of 'Asserting on mail in a test' runs as printed") {
  require_tool("swaks", "swaks");
  require_tool("jq", "jq");
  auto blocks = recipe_blocks();
  REQUIRE(blocks.size() == 4);
  PathWithSmtpd path;
  TempDir tmp;
  // run_bash - block i, a bash script, run with bash; CHECKs that it succeeds
  auto run_bash = [&](std::size_t i) {
    REQUIRE(blocks[i].first == "bash");
    write_file(tmp / "recipe.sh", blocks[i].second);
    auto r = run_command({"env", path.value, "bash", tmp / "recipe.sh"}, milliseconds(30000));
    CHECK_MESSAGE(r.ok(), r.describe());
    return r;
  };
  SUBCASE("bash: --background, then smtpd --wait ... --json | jq") {
    auto r = run_bash(0);
    CHECK(r.out == "https://app.example/reset?t=42\n");
  }
  SUBCASE("bash: --expect-none") {
    auto r = run_bash(1);
    CHECK(r.out == "nothing was sent to example.net\n");
    std::string said = "smtpd: deadline: no matching message in 2 s (1 other arrived)\n";
    CHECK(r.err.size() >= said.size());
    CHECK(r.err.substr(r.err.size() - std::min(r.err.size(), said.size())) == said);
  }
  SUBCASE("a GitHub Actions step, run as its bash shell runs it") {
    REQUIRE(blocks[2].first == "yaml");
    std::string script;
    bool is_in_run = false;
    for (const std::string& line : lines_of(blocks[2].second)) {
      if (is_in_run && starts_with(line, "    ")) script += line.substr(4) + "\n";
      if (line == "  run: |") is_in_run = true;
    }
    REQUIRE(!script.empty());
    write_file(tmp / "step.sh", script);
    auto r = run_command({"env", path.value, "RUNNER_TEMP=" + tmp.path(), "bash", "--noprofile",
                          "--norc", "-eo", "pipefail", tmp / "step.sh"},
                         milliseconds(30000));
    INFO(r.describe());
    CHECK(r.ok());
    CHECK(count(r.out, kFollows) == 1);
  }
  SUBCASE("a pytest fixture with --port-file") {
    REQUIRE(blocks[3].first == "python");
    std::string pytest = require_tool("pytest", "python3-pytest");
    write_file(tmp / "test_recipe.py", blocks[3].second);
    auto r = run_command(
        {"env", path.value, pytest, "-q", "-p", "no:cacheprovider", tmp / "test_recipe.py"},
        milliseconds(60000));
    INFO(r.describe());
    CHECK(r.ok());
    CHECK(r.out.find("1 passed") != std::string::npos);
  }
}

TEST_SUITE_END();

}  // namespace wait
}  // namespace smtpd_test
