// test_mailman.cpp - MailmanProxy end to end: a client, ./smtpd -c MailmanProxy, a REAL
// Mailman 3 (Debian's mailman3, started here on loopback ports with a throwaway
// configuration and stopped afterwards) and an upstream; then Mailman 2's path with a
// stand-in wrapper, as Mailman 2 is no longer packaged.
//
// Mailman 3 starts slowly (10-60 s), so one instance serves every Mailman 3 case: a shared
// fixture made at the first case that needs it and stopped when the test run ends. Its
// outgoing SMTP server is our own smtpd (-c SMTPServer --json), so each message Mailman sends
// is one JSON line to look at; the upstream is another such smtpd, or smtp-sink for faults.
//
//   Fixtures: Mailman3 (the shared instance), JsonSink, StandInMailman2
//   Helpers:  send_message, has_message
#include <doctest/doctest.h>

#include <fstream>
#include <memory>

#include "test_support.hpp"

namespace smtpd_test {
namespace mailman {

TEST_SUITE_BEGIN("mailman");

constexpr const char* kList = "test@example.com";
constexpr const char* kMember = "alice@example.org";
constexpr const char* kMailmanOk = "250 Ok";  // Mailman 3.3's LMTP runner at RCPT
constexpr const char* kAllHaveIt = "250 OK";  // the proxy's one reply when every destination did

// JsonSink - our own SMTPServer on 127.0.0.1: a fixed port (Mailman's configuration names it)
// or a free one; every message it takes is one JSON line on its stdout.
class JsonSink {
 public:
  explicit JsonSink(int port = 0) {
    ignore_sigpipe();
    server = ServerProcess::launch(
        {"-n", "-c", "SMTPServer", "--json", "127.0.0.1:" + std::to_string(port)});
  }
  std::string address() const { return server.address(); }
  std::vector<std::string> messages() { return lines_of(server.stdout_text()); }

  ServerProcess server;
};

// has_message - one of the sink's messages has every needle in its JSON line
inline bool has_message(JsonSink& sink, const std::vector<std::string>& needles) {
  for (const std::string& line : sink.messages()) {
    bool all = true;
    for (const std::string& n : needles) all = all && line.find(n) != std::string::npos;
    if (all) return true;
  }
  return false;
}

inline std::string json_rcpts(const std::vector<std::string>& rcpts) {
  std::string out = "\"rcpttos\": [";
  for (std::size_t i = 0; i < rcpts.size(); ++i) out += (i ? ", \"" : "\"") + rcpts[i] + "\"";
  return out + "]";
}

// Mailman3 - tests/mailman3/start-mailman3.sh with list test@example.com, member alice,
// outgoing mail to `outgoing`; stop-mailman3.sh when the test run ends.
class Mailman3 {
 public:
  Mailman3() {
    lmtp_port_ = free_port();
    dir_ = "/tmp/smtpd-mailman3-" + std::to_string(::getpid());
    for (int attempt = 0; attempt < 3 && !outgoing; ++attempt) {
      try {
        outgoing = std::make_unique<JsonSink>(free_port());
      } catch (const std::exception&) {
        // the free port was taken meanwhile
      }
    }
    REQUIRE_MESSAGE(outgoing, "could not start the sink for Mailman's outgoing mail");
    auto start = Clock::now();
    CommandResult r =
        run_command({"bash", "tests/mailman3/start-mailman3.sh", "--dir", dir_, "--no-sink",
                     "--list", kList, "--member", kMember, "--timeout", "150",
                     std::to_string(lmtp_port_), std::to_string(outgoing->server.port())},
                    milliseconds(200000));
    start_seconds_ = std::chrono::duration<double>(Clock::now() - start).count();
    is_started_ = r.ok();
    REQUIRE_MESSAGE(is_started_,
                    "Mailman 3 did not start (is mailman3 installed? make deps "
                    "installs it as root): "
                        << r.describe());
  }
  ~Mailman3() {
    if (!dir_.empty())
      run_command({"bash", "tests/mailman3/stop-mailman3.sh", dir_}, milliseconds(60000));
  }

  std::string lmtp() const { return "127.0.0.1:" + std::to_string(lmtp_port_); }
  double start_seconds() const { return start_seconds_; }
  bool is_started() const { return is_started_; }

  // shared - the one instance, started at the first call; stopped at exit
  static Mailman3& shared() {
    static std::unique_ptr<Mailman3> instance;
    if (!instance) {
      instance = std::make_unique<Mailman3>();
      MESSAGE("Mailman 3 started in " << instance->start_seconds() << " s");
    }
    REQUIRE(instance->is_started());
    return *instance;
  }

  std::unique_ptr<JsonSink> outgoing;

 private:
  int lmtp_port_ = 0;
  std::string dir_;
  double start_seconds_ = 0;
  bool is_started_ = false;
};

// start_mailman_proxy - ./smtpd -n -c MailmanProxy [options] 127.0.0.1:0 UPSTREAM
inline ServerProcess start_mailman_proxy(const std::string& upstream,
                                         std::vector<std::string> options) {
  ignore_sigpipe();
  std::vector<std::string> args{"-n", "-c", "MailmanProxy"};
  args.insert(args.end(), options.begin(), options.end());
  args.insert(args.end(), {"127.0.0.1:0", upstream});
  return ServerProcess::launch(args);
}

// Transaction - the replies of one message: MAIL, each RCPT, DATA and the final dot
struct Transaction {
  std::string mail;
  std::vector<std::string> rcpts;
  std::string data;
  std::string end;
};

// send_message - EHLO once per client is the caller's; MAIL, every RCPT (refused ones too),
// and DATA with the text when at least one RCPT got 250
inline Transaction send_message(Client& c, const std::string& from,
                                const std::vector<std::string>& to, const std::string& text) {
  Transaction t;
  t.mail = c.command("MAIL FROM:<" + from + ">", milliseconds(30000));
  bool any = false;
  for (const std::string& rcpt : to) {
    t.rcpts.push_back(c.command("RCPT TO:<" + rcpt + ">", milliseconds(30000)));
    any = any || starts_with(t.rcpts.back(), "250");
  }
  if (!starts_with(t.mail, "250") || !any) return t;
  t.data = c.command("DATA");
  if (t.data != kDataReply) return t;
  if (!c.send(on_the_wire(text))) return t;
  t.end = c.command(".", milliseconds(60000));
  return t;
}

inline std::string text_with_subject(const std::string& from, const std::string& subject) {
  return "From: " + from + "\nTo: " + kList + "\nSubject: " + subject + "\nMessage-ID: <" +
         subject + "@example.org>\n\n" + subject + "\n";
}

TEST_CASE("MailmanProxy with a real Mailman 3: list mail to Mailman, the rest upstream") {
  Mailman3& mm = Mailman3::shared();
  JsonSink& member_inbox = *mm.outgoing;
  JsonSink upstream;
  auto proxy = start_mailman_proxy(upstream.address(), {"-d", "--mailman-lmtp", mm.lmtp()});
  auto c = proxy.connect();
  greet(c);

  SUBCASE("a member's post goes out to the member through Mailman, and not upstream") {
    Transaction t = send_message(c, kMember, {kList}, text_with_subject(kMember, "post-1"));
    CHECK(t.mail == "250 OK");
    CHECK(t.rcpts == std::vector<std::string>{kMailmanOk});
    CHECK(t.end == kAllHaveIt);
    CHECK(wait_until(
        [&] {
          return has_message(member_inbox, {"\"mailfrom\": \"test-bounces@example.com\"",
                                            json_rcpts({kMember}), "Subject: [Test] post-1"});
        },
        milliseconds(60000)));
    CHECK(upstream.messages().empty());
  }

  SUBCASE("-request, -join and -leave reach Mailman, and its replies reach the sender") {
    const std::string carol = "carol@example.net";
    Transaction help = send_message(c, kMember, {"test-request@example.com"},
                                    "From: " + std::string(kMember) +
                                        "\nSubject: help\nMessage-ID: <req-1@example.org>\n\n"
                                        "help\n");
    CHECK(help.rcpts == std::vector<std::string>{kMailmanOk});
    CHECK(help.end == kAllHaveIt);
    Transaction join = send_message(
        c, carol, {"test-join@example.com"},
        "From: " + carol + "\nSubject: join\nMessage-ID: <join-1@example.net>\n\njoin\n");
    CHECK(join.end == kAllHaveIt);
    Transaction leave = send_message(c, kMember, {"test-leave@example.com"},
                                     "From: " + std::string(kMember) +
                                         "\nSubject: leave\nMessage-ID: <leave-1@example.org>\n\n");
    CHECK(leave.end == kAllHaveIt);
    CHECK(wait_until(
        [&] {
          return has_message(member_inbox,
                             {json_rcpts({kMember}), "The results of your email command"});
        },
        milliseconds(60000)));
    CHECK(wait_until(
        [&] {
          return has_message(member_inbox, {json_rcpts({carol}), "confirm"});
        },
        milliseconds(60000)));
    CHECK(wait_until(
        [&] {
          return has_message(member_inbox, {json_rcpts({kMember}), "confirm", "leave"}) ||
                 has_message(member_inbox, {json_rcpts({kMember}), "confirm", "unsubscri"});
        },
        milliseconds(60000)));
    CHECK(upstream.messages().empty());
  }

  SUBCASE("one message to the list and an outside address reaches both") {
    const std::string bob = "bob@outside.example";
    Transaction t = send_message(c, kMember, {kList, bob}, text_with_subject(kMember, "both-1"));
    CHECK(t.rcpts == std::vector<std::string>{kMailmanOk, "250 OK"});
    CHECK(t.end == kAllHaveIt);
    CHECK(wait_until([&] { return has_message(upstream, {json_rcpts({bob}), "both-1"}); }));
    CHECK(upstream.messages().size() == 1);
    CHECK(wait_until(
        [&] {
          return has_message(member_inbox, {json_rcpts({kMember}), "Subject: [Test] both-1"});
        },
        milliseconds(60000)));
    // SMTPD_MAILMAN_TRANSCRIPT=FILE keeps what went where, for a reader of this test's run
    if (const char* path = std::getenv("SMTPD_MAILMAN_TRANSCRIPT")) {
      std::ofstream out(path);
      out << "--- proxy -d: the client, Mailman (LMTP) and the upstream ---\n"
          << proxy.stderr_text() << "--- Mailman's outgoing mail, at the sink ---\n";
      for (const std::string& line : member_inbox.messages())
        if (line.find("both-1") != std::string::npos) out << line << "\n";
      out << "--- the upstream ---\n";
      for (const std::string& line : upstream.messages()) out << line << "\n";
    }
  }

  SUBCASE("an unknown list, another domain and -admin (not Mailman 3's) go upstream") {
    std::vector<std::string> others = {"nolist@example.com", "test@other.example",
                                       "test-admin@example.com"};
    Transaction t = send_message(c, kMember, others, text_with_subject(kMember, "unknown-1"));
    CHECK(t.rcpts == std::vector<std::string>{"250 OK", "250 OK", "250 OK"});
    CHECK(t.end == "250 OK");
    CHECK(wait_until([&] { return has_message(upstream, {json_rcpts(others), "unknown-1"}); }));
  }

  SUBCASE("an upstream that refuses at the final dot: the client hears it, Mailman gets nothing") {
    std::string fault, want;
    SUBCASE("for good (smtp-sink -f .)") {
      fault = "-f";
      want = "500 5.3.0 Error: command failed";
    }
    SUBCASE("for now (smtp-sink -r .)") {
      fault = "-r";
      want = "450 4.3.0 Error: command failed";
    }
    SmtpSink sink({fault, "."});
    auto faulty = start_mailman_proxy(sink.address(), {"--mailman-lmtp", mm.lmtp()});
    auto f = faulty.connect();
    greet(f);
    std::string subject = "refused" + fault;
    Transaction t = send_message(f, kMember, {kList, "bob@outside.example"},
                                 text_with_subject(kMember, subject));
    CHECK(t.rcpts == std::vector<std::string>{kMailmanOk, "250 2.1.5 Ok"});
    CHECK(t.end == want);
    // Mailman was never given the message: a post of the same member made afterwards comes
    // out, the refused one does not.
    Transaction after =
        send_message(f, kMember, {kList}, text_with_subject(kMember, "after" + fault));
    CHECK(after.end == kAllHaveIt);
    CHECK(wait_until([&] { return has_message(member_inbox, {"after" + fault}); },
                     milliseconds(60000)));
    CHECK_FALSE(has_message(member_inbox, {subject}));
  }

  CHECK(c.command("QUIT") == "221 Bye");
}

TEST_CASE("MailmanProxy: Mailman 3 not listening gives 4xx at RCPT, never a relay") {
  JsonSink upstream;
  IdlePort nothing(IdlePort::Closed);  // nothing accepts there: Mailman stopped
  std::string lmtp = nothing.address();
  auto proxy = start_mailman_proxy(upstream.address(), {"--mailman-lmtp", lmtp});
  auto c = proxy.connect();
  greet(c);
  CHECK(c.command("MAIL FROM:<a@example.org>") == "250 OK");
  std::string reply = c.command("RCPT TO:<test@example.com>");
  CHECK(starts_with(reply, "451 Error: Mailman LMTP server " + lmtp + " cannot connect: "));
  CHECK(c.command("DATA") == "503 Error: need RCPT command");
  CHECK(upstream.messages().empty());
}

// StandInMailman2 - a stand-in for a Mailman 2 installation (Mailman 2 is no longer packaged):
// lists/ with lists "test" (config.pck), "dev.team" (config.db), "gone" and "broken", and a
// mail/mailman script that records its arguments and standard input under calls/ and exits
// 1 for "gone" (Mailman's "list not found"), 75 for "broken", else 0.
class StandInMailman2 {
 public:
  StandInMailman2() {
    for (const char* list : {"test", "dev.team", "gone", "broken"})
      REQUIRE(make_dirs(dir_.path() + "/lists/" + list));
    touch(dir_.path() + "/lists/test/config.pck");
    touch(dir_.path() + "/lists/dev.team/config.db");
    touch(dir_.path() + "/lists/gone/config.pck");
    touch(dir_.path() + "/lists/broken/config.pck");
    REQUIRE(make_dirs(dir_.path() + "/mail"));
    REQUIRE(make_dirs(dir_.path() + "/calls"));
    std::string script = dir_.path() + "/mail/mailman";
    std::ofstream(script) << "#!/bin/sh\n"
                             "# stand-in for Mailman 2's mail wrapper: record, then exit\n"
                             "n=$(ls '"
                          << dir_.path()
                          << "/calls' | grep -c args)\n"
                             "echo \"$@\" > '"
                          << dir_.path()
                          << "/calls/'$n.args\n"
                             "cat > '"
                          << dir_.path()
                          << "/calls/'$n.stdin\n"
                             "case $2 in gone) exit 1;; broken) exit 75;; esac\n"
                             "exit 0\n";
    REQUIRE(::chmod(script.c_str(), 0755) == 0);
  }

  std::string home() const { return dir_.path(); }

  // calls - "ARGS" of each run, in order
  std::vector<std::string> calls() const {
    std::vector<std::string> out;
    for (std::size_t i = 0;; ++i) {
      std::ifstream in(dir_.path() + "/calls/" + std::to_string(i) + ".args");
      std::string line;
      if (!in || !std::getline(in, line)) return out;
      out.push_back(line);
    }
  }
  std::string input(std::size_t i) const {
    std::ifstream in(dir_.path() + "/calls/" + std::to_string(i) + ".stdin", std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  }

 private:
  static void touch(const std::string& path) { std::ofstream(path) << ""; }
  static bool make_dirs(const std::string& path) {
    std::string error;
    return ::make_directories(path, error);
  }
  TempDir dir_;
};

TEST_CASE("MailmanProxy with Mailman 2 (a stand-in wrapper): lists by lists/, the rest upstream") {
  StandInMailman2 mm2;
  JsonSink upstream;
  auto proxy = start_mailman_proxy(upstream.address(), {"--mailman-home", mm2.home()});
  auto c = proxy.connect();
  greet(c);

  SUBCASE("a post, -request, -owner and a config.db list run the wrapper; others go upstream") {
    std::vector<std::string> to = {"test@example.com",       "Test-Request@lists.example",
                                   "test-owner@x.example",   "dev.team-admin@example.com",
                                   "test-bogus@example.com", "nobody@example.com"};
    Transaction t = send_message(c, "a@example.org", to, "Subject: hi\n\nbody\n");
    CHECK(t.rcpts == std::vector<std::string>(6, "250 OK"));
    CHECK(t.end == "250 OK");
    CHECK(mm2.calls() ==
          std::vector<std::string>{"post test", "request test", "owner test", "admin dev.team"});
    std::string in = mm2.input(0);
    CHECK(starts_with(in, "From: a@example.org\nDate: "));
    CHECK(in.find("\nMessage-ID: <") != std::string::npos);
    CHECK(in.find("\nSubject: hi\n\nbody\n") != std::string::npos);
    CHECK(wait_until([&] {
      return has_message(upstream, {json_rcpts({"test-bogus@example.com", "nobody@example.com"})});
    }));
  }

  SUBCASE("headers already there are kept, not added twice") {
    Transaction t = send_message(c, "a@example.org", {"test@example.com"},
                                 "From: A <a@example.org>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n"
                                 "Message-Id: <x@y>\n\nbody\n");
    CHECK(t.end == "250 OK");
    CHECK(mm2.input(0) ==
          "From: A <a@example.org>\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-Id: <x@y>\n\n"
          "body\n");
  }

  SUBCASE("a wrapper that says 'no such list' gives 550; any other failure 451") {
    Transaction gone = send_message(c, "a@example.org", {"gone@example.com"}, "x\n");
    CHECK(gone.end == "550 5.1.1 Error: Mailman 2's mail wrapper (post gone) found no such list");
    Transaction broken = send_message(c, "a@example.org", {"broken-request@example.com"}, "x\n");
    CHECK(broken.end ==
          "451 Error: Mailman 2's mail wrapper (request broken) failed (exit status 75); try "
          "again later");
    CHECK(upstream.messages().empty());
  }

  SUBCASE("names that could leave lists/ are never lists") {
    Transaction t = send_message(c, "a@example.org", {"\"../test\"@example.com"}, "x\n");
    CHECK(t.end == "250 OK");
    CHECK(mm2.calls().empty());
    CHECK(wait_until([&] { return upstream.messages().size() == 1; }));
  }
  CHECK(c.command("QUIT") == "221 Bye");
}

TEST_CASE("list_headers: From:, Date: and Message-ID: where the header lines lack them") {
  const std::int64_t t = 1795929000LL * 1000000;  // Sun, 29 Nov 2026 05:10:00 +0000
  CHECK(list_headers("from: x@y\nDATE: d\nmessage-id: <m>\n\nbody", "a@b", "h", t) == "");
  std::string all = list_headers("Subject: s\n\nFrom: in the body", "a@b", "h.example", t);
  CHECK(starts_with(all, "From: a@b\nDate: Sun, 29 Nov 2026 05:10:00 +0000\nMessage-ID: <"));
  CHECK(all.find("h.example>\n") != std::string::npos);
  // a message without an empty line is all header lines; one starting with one has none
  CHECK(list_headers("X: 1\nFrom: x@y\nDate: d\nMessage-Id: <m>", "a@b", "h", t) == "");
  CHECK(starts_with(list_headers("\nFrom: x@y", "a@b", "h", t), "From: a@b\n"));
  CHECK(starts_with(list_headers("", "<>", "h", t), "Date: "));  // no From: for <>
  CHECK(starts_with(list_headers("X-From: x@y\n\n", "a@b", "h", t), "From: a@b\n"));
}

TEST_CASE("-c MailmanProxy, smtpd.MailmanProxy and mailman start a MailmanProxy") {
  for (const char* name : {"MailmanProxy", "smtpd.MailmanProxy", "mailman"}) {
    CAPTURE(name);
    auto proxy = ServerProcess::launch({"-n", "-d", "-c", name, "127.0.0.1:0", "127.0.0.1:1"});
    CHECK(
        proxy.wait_stderr("smtpd: MailmanProxy started; remote address 127.0.0.1:1; Mailman 3 "
                          "LMTP at 127.0.0.1:8024\n"));
  }
}

TEST_CASE("MailmanProxy options: both Mailmen, or either without MailmanProxy, exit 2") {
  auto run = [](std::vector<std::string> args) {
    args.insert(args.begin(), smtpd_bin());
    return run_command(args);
  };
  CommandResult both = run({"-c", "MailmanProxy", "--mailman-home", "/tmp", "--mailman-lmtp",
                            "127.0.0.1:8024", "127.0.0.1:0"});
  CHECK(both.status.code == kExitUsage);
  CHECK(both.err ==
        "smtpd: use --mailman-lmtp (Mailman 3) or --mailman-home (Mailman 2), not "
        "both\n");
  CommandResult other = run({"-c", "PureProxy", "--mailman-lmtp", "127.0.0.1:8024"});
  CHECK(other.status.code == kExitUsage);
  CHECK(other.err == "smtpd: --mailman-lmtp and --mailman-home work with MailmanProxy only\n");
  CommandResult no_wrapper = run({"-c", "MailmanProxy", "--mailman-home", "/nonexistent"});
  CHECK(no_wrapper.status.code == kExitUsage);
  CHECK(no_wrapper.err ==
        "smtpd: --mailman-home /nonexistent: no mail wrapper /nonexistent/mail/mailman\n");
}

TEST_SUITE_END();

}  // namespace mailman
}  // namespace smtpd_test
