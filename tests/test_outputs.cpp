// test_outputs.cpp - the message outputs (--maildir, --mbox, --json) and exiting by itself
// (--max-messages, --idle-exit).
//
// First the formatting functions of smtpd.cpp, called directly (JSON strings, base64, the
// mbox date and quoting, Maildir names, the order of outputs and the 451). Then the built
// binary end to end, with real readers: Python's mailbox module reads the Maildir and the
// mbox back, jq parses the JSON, and tests/use-in-ci.sh runs the README's CI example.
// Every wait is bounded; everything listens on 127.0.0.1.
#include <dirent.h>
#include <doctest/doctest.h>

#include <cctype>
#include <climits>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>

#include "test_support.hpp"

namespace smtpd_test {
namespace outputs {

// ==== Unit tests of the formatting functions ====

TEST_CASE("json_string escapes quotes, backslashes and control characters") {
  CHECK(json_string("") == "\"\"");
  CHECK(json_string("plain text") == "\"plain text\"");
  CHECK(json_string("say \"hi\" \\ bye") == "\"say \\\"hi\\\" \\\\ bye\"");
  CHECK(json_string("a\nb\rc\td") == "\"a\\nb\\rc\\td\"");
  CHECK(json_string(std::string("\x01\x1f\x7f", 3)) == "\"\\u0001\\u001f\\u007f\"");
  CHECK(json_string(std::string("nul\0x", 5)) == "\"nul\\u0000x\"");
  SUBCASE("UTF-8 stays as it is; bytes that are not UTF-8 become U+FFFD") {
    CHECK(json_string("caf\xc3\xa9 \xe2\x9c\x93") == "\"caf\xc3\xa9 \xe2\x9c\x93\"");
    CHECK(json_string("caf\xe9!") == "\"caf\\ufffd!\"");
    CHECK(json_string("\xed\xa0\x80") == "\"\\ufffd\\ufffd\\ufffd\"");  // a surrogate
  }
  CHECK(json_list({}) == "[]");
  CHECK(json_list({"a", "b\"c"}) == "[\"a\", \"b\\\"c\"]");
}

TEST_CASE("base64_encode follows RFC 4648") {
  // The test vectors of RFC 4648 section 10.
  CHECK(base64_encode("") == "");
  CHECK(base64_encode("f") == "Zg==");
  CHECK(base64_encode("fo") == "Zm8=");
  CHECK(base64_encode("foo") == "Zm9v");
  CHECK(base64_encode("foob") == "Zm9vYg==");
  CHECK(base64_encode("fooba") == "Zm9vYmE=");
  CHECK(base64_encode("foobar") == "Zm9vYmFy");
  CHECK(base64_encode(std::string("\x00\xff\xfe\x80", 4)) == "AP/+gA==");
  CHECK(base64_encode(std::string(57, '\xff')).size() == 76);  // no line breaks
  CHECK(base64_encode(std::string(57, '\xff')).find('\n') == std::string::npos);
}

TEST_CASE("format_asctime_utc writes dates as Python's time.asctime(time.gmtime(t))") {
  // Expected values from Python 3.
  CHECK(format_asctime_utc(0) == "Thu Jan  1 00:00:00 1970");
  CHECK(format_asctime_utc(1795929000) == "Sun Nov 29 05:10:00 2026");
  CHECK(format_asctime_utc(951782400) == "Tue Feb 29 00:00:00 2000");
  CHECK(format_asctime_utc(4107542399) == "Sun Feb 28 23:59:59 2100");
  CHECK(format_asctime_utc(-86400) == "Wed Dec 31 00:00:00 1969");
}

// json_of - the --json line for an envelope
inline std::string json_of(const Envelope& e) {
  return made([&] { return JsonText(std::make_shared<const Envelope>(e)); });
}

TEST_CASE("JsonText: one line, text when UTF-8, else base64") {
  Envelope e;
  e.peer = "127.0.0.1";
  e.mailfrom = "a@example.com";
  e.rcpttos = {"b@example.com", "c@example.com"};
  e.mail_options = {"SIZE=42", "BODY=8BITMIME"};
  e.data = "Subject: \"hi\"\n\nbody\ttab";
  CHECK(json_of(e) ==
        "{\"peer\": \"127.0.0.1\", \"mailfrom\": \"a@example.com\", "
        "\"rcpttos\": [\"b@example.com\", \"c@example.com\"], "
        "\"mail_options\": [\"SIZE=42\", \"BODY=8BITMIME\"], \"rcpt_options\": [], "
        "\"size\": 23, \"data\": \"Subject: \\\"hi\\\"\\n\\nbody\\ttab\", "
        "\"data_encoding\": \"utf-8\"}\n");
  e.rcpttos = {"b@example.com"};
  e.mail_options.clear();
  e.mailfrom = "<>";
  e.data = "caf\xe9";
  CHECK(json_of(e) ==
        "{\"peer\": \"127.0.0.1\", \"mailfrom\": \"<>\", \"rcpttos\": [\"b@example.com\"], "
        "\"mail_options\": [], \"rcpt_options\": [], \"size\": 4, \"data\": \"Y2Fm6Q==\", "
        "\"data_encoding\": \"base64\"}\n");
  SUBCASE("made in chunks, no UTF-8 sequence or base64 group is cut") {
    e.data = "caf\xc3\xa9 \xe2\x82\xac\xf0\x9f\x98\x80 \"q\"\r\n\x01";
    CHECK(json_of(e).find(", \"data\": " + json_string(e.data) + ", ") != std::string::npos);
    e.data = "\xff\xfe 0123456789 \x80";
    CHECK(json_of(e).find(", \"data\": \"" + base64_encode(e.data) + "\", ") != std::string::npos);
  }
}

// mbox_entry - MboxText's entry for an envelope at a time
inline std::string mbox_entry(const Envelope& e, std::int64_t unix_seconds) {
  return made([&] { return MboxText(std::make_shared<const Envelope>(e), unix_seconds); });
}

// mboxrd_quoted - the message part of an mbox entry: its From line and last line left out
inline std::string mboxrd_quoted(const std::string& data) {
  Envelope e;
  e.mailfrom = "a@b";
  e.data = data;
  std::string entry = mbox_entry(e, 0);
  const std::string head = "From a@b Thu Jan  1 00:00:00 1970\n" + stored_envelope("a@b", {});
  REQUIRE(starts_with(entry, head));
  REQUIRE(entry.back() == '\n');
  return entry.substr(head.size(), entry.size() - head.size() - 1);
}

TEST_CASE("MboxText adds one '>' to lines matching ^>*From  and ends every line") {
  CHECK(mboxrd_quoted("From here") == ">From here\n");
  CHECK(mboxrd_quoted(">From here") == ">>From here\n");
  CHECK(mboxrd_quoted(">>>From x\nFrom y\nx From z") == ">>>>From x\n>From y\nx From z\n");
  SUBCASE("lines that only look alike stay as they are") {
    CHECK(mboxrd_quoted("From:a@b\nFROM x\nfrom x\n From x\n>From\n>>") ==
          "From:a@b\nFROM x\nfrom x\n From x\n>From\n>>\n");
  }
  SUBCASE("line ends") {
    CHECK(mboxrd_quoted("") == "\n");
    CHECK(mboxrd_quoted("a") == "a\n");
    CHECK(mboxrd_quoted("a\n") == "a\n\n");  // a message whose last line is empty
    CHECK(mboxrd_quoted("a\n\nFrom b") == "a\n\n>From b\n");
  }
}

TEST_CASE("MboxText: From line with the sender and date, quoted text, empty line") {
  Envelope e;
  e.mailfrom = "a@example.com";
  e.data = "Subject: x\n\nFrom me";
  e.rcpttos = {"b@example.com", "c@example.com"};
  const std::string from = "From a@example.com Sun Nov 29 05:10:00 2026\n";
  const std::string envelope = stored_envelope("a@example.com", e.rcpttos);
  CHECK(mbox_entry(e, 1795929000) == from + envelope + "Subject: x\n\n>From me\n\n");
  e.auth_user = "From alice";  // the session's lines come next, quoted as well
  CHECK(mbox_entry(e, 1795929000) ==
        from + envelope + "X-Auth-User: From alice\nSubject: x\n\n>From me\n\n");
  e.auth_user.reset();
  e.mailfrom = "<>";
  CHECK(starts_with(mbox_entry(e, 0), "From MAILER-DAEMON Thu Jan  1 00:00:00 1970\n"));
  e.mailfrom = "\"two words\ttab\"@example.com";
  CHECK(starts_with(mbox_entry(e, 0),
                    "From \"two_words_tab\"@example.com Thu Jan  1 00:00:00 1970\n"));
}

TEST_CASE("maildir_unique_name: time, pid, counter and the host with / and : escaped") {
  CHECK(maildir_unique_name(1795929000, 123456, 4242, 7, "mail.example") ==
        "1795929000.M123456P4242Q7.mail.example");
  CHECK(maildir_unique_name(1, 0, 2, 3, "a/b:c") == "1.M0P2Q3.a\\057b\\072c");
}

TEST_CASE("FileText: the lines before, then the data, and one \\n after its last line") {
  CHECK(made([] { return FileText(message_with("a\nb"), ""); }) == "a\nb\n");
  CHECK(made([] { return FileText(message_with("a\n"), ""); }) == "a\n\n");
  CHECK(made([] { return FileText(message_with(""), ""); }) == "\n");
  CHECK(made([] { return FileText(message_with("a"), "X-A: 1\nX-B: 2\n"); }) ==
        "X-A: 1\nX-B: 2\na\n");
}

// FakeOutput - records the messages it was given; fails when told to.
struct FakeOutput : MessageOutput {
  FakeOutput(std::vector<std::string>& log, std::string name, bool fails)
      : log_(log), name_(std::move(name)), fails_(fails) {}
  bool deliver(const Envelope& envelope, std::string& error) override {
    log_.push_back(name_ + ":" + envelope.data);
    if (fails_) error = name_ + " is full";
    return !fails_;
  }
  std::vector<std::string>& log_;
  std::string name_;
  bool fails_;
};

TEST_CASE("outputs run in order; the first failure answers 451 and stops the rest") {
  std::vector<std::string> log;
  Envelope e;
  e.peer = "127.0.0.1";
  e.data = "msg";
  auto one_and_two = [&](bool one_fails) {
    MessageOutputs outputs;
    outputs.push_back(std::make_unique<FakeOutput>(log, "one", one_fails));
    outputs.push_back(std::make_unique<FakeOutput>(log, "two", false));
    return outputs;
  };
  SUBCASE("all succeed: 250") {
    SinkServer sink(one_and_two(false));
    CHECK(sink.store(e) == "");
    CHECK(log == std::vector<std::string>{"one:msg", "two:msg"});
  }
  SUBCASE("the first fails: 451 with its reason, the second is not tried") {
    SinkServer sink(one_and_two(true));
    CHECK(sink.store(e) == "451 Error: could not store the message: one is full");
    CHECK(log == std::vector<std::string>{"one:msg"});
  }
  SUBCASE("no outputs: a plain sink") {
    SinkServer sink;
    CHECK(sink.store(e) == "");
  }
  CHECK(not_stored_reply("bad\r\nline") ==
        "451 Error: could not store the message: bad\\x0d\\x0aline");
  CHECK(not_stored_reply(std::string(1000, 'x')).size() == std::strlen(kReplyNotStored) + 400);
}

TEST_CASE("command line: --maildir, --mbox, --json, --max-messages, --idle-exit") {
  Settings plain = *parse_args({}).settings;
  CHECK(plain.maildir == "");
  CHECK(plain.mbox == "");
  CHECK_FALSE(plain.json);
  CHECK(plain.server.max_messages == 0);
  CHECK(plain.server.idle_exit_ms == 0);
  Settings s = *parse_args({"--maildir", "/tmp/md", "--mbox", "/tmp/mb", "--json", "--max-messages",
                            "3", "--idle-exit", "10"})
                    .settings;
  CHECK(s.maildir == "/tmp/md");
  CHECK(s.mbox == "/tmp/mb");
  CHECK(s.json);
  CHECK(s.server.max_messages == 3);
  CHECK(s.server.idle_exit_ms == 10000);
  CHECK_THROWS_AS(parse_args({"--max-messages", "-1"}), UsageError);
  CHECK_THROWS_AS(parse_args({"--max-messages", "three"}), UsageError);
  CHECK_THROWS_AS(parse_args({"--idle-exit", "1.5"}), UsageError);
  CHECK_THROWS_AS(parse_args({"--idle-exit", "9999999999"}), UsageError);
  CHECK_THROWS_AS(parse_args({"--maildir", ""}), UsageError);
  CHECK_THROWS_AS(parse_args({"--mbox", ""}), UsageError);
}

// ==== Helpers for the end-to-end tests ====

inline unsigned file_mode(const std::string& path) {
  struct stat info {};
  if (::stat(path.c_str(), &info) != 0) return 0;
  return static_cast<unsigned>(info.st_mode & 07777);
}

// hex - bytes as lower-case hex, as Python's bytes.hex() writes them.
inline std::string hex(const std::string& bytes) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (char ch : bytes) {
    unsigned char c = static_cast<unsigned char>(ch);
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

// The messages the readers must get back byte for byte: "From " and ">From " in bodies,
// lines starting with dots, a message whose last line is empty, non-ASCII text.
inline std::vector<std::string> tricky_messages() {
  return {
      "From: a@example.com\nSubject: one\n\nFrom the start of a line.\n>From quoted once.\n"
      "..x\n.\n>>From twice\nlast line\n",
      "Subject: two\n\nFrom here\n\n",
      "Subject: three\n\ncaf\xc3\xa9 \xe2\x9c\x93\n.leading dot\n",
  };
}

// kReadMaildir - python3 -c script: argv[1] is a Maildir; prints each message's bytes in hex.
constexpr const char* kReadMaildir = R"PY(
import mailbox, sys
box = mailbox.Maildir(sys.argv[1], create=False)
for key in box.keys():
    print(box.get_bytes(key).hex())
)PY";

// kReadMbox - python3 -c script: argv[1] is an mbox; prints each message's From line, a tab,
// and its bytes in hex after undoing the mboxrd quoting (one '>' less on ^>+From ).
constexpr const char* kReadMbox = R"PY(
import mailbox, re, sys
box = mailbox.mbox(sys.argv[1], create=False)
for key in box.keys():
    data = re.sub(rb'(?m)^>(>*From )', rb'\1', box.get_bytes(key))
    print(box.get_message(key).get_from(), data.hex(), sep='\t')
)PY";

// kHoldLock - python3 -c script: takes an fcntl write lock on argv[1] (as mutt or Python's
// mailbox would), says "locked", holds it for argv[2] seconds.
constexpr const char* kHoldLock = R"PY(
import fcntl, sys, time
f = open(sys.argv[1], 'ab')
fcntl.lockf(f, fcntl.LOCK_EX)
print('locked', flush=True)
time.sleep(float(sys.argv[2]))
)PY";

// ==== Maildir ====

TEST_CASE("--maildir: Python's mailbox.Maildir reads every message back byte for byte") {
  std::string python = require_tool("python3", "python3");
  TempDir tmp;
  std::string maildir = tmp / "deep/er/mail";  // parents are made too
  auto srv = start_smtpd({"-c", "sink", "--maildir", maildir});
  // The empty Maildir is there before any message.
  CHECK(list_dir(maildir) == std::vector<std::string>{"cur", "new", "tmp"});
  Client c = greeted_client(srv);
  std::vector<std::string> sent = tricky_messages();
  for (const auto& m : sent) CHECK(send_mail(c, m) == "250 OK");
  CHECK(c.command("QUIT") == "221 Bye");

  // The files are there as soon as the client has its 250s.
  std::vector<std::string> names = list_dir(maildir + "/new");
  REQUIRE(names.size() == sent.size());
  CHECK(list_dir(maildir + "/tmp").empty());
  CHECK(list_dir(maildir + "/cur").empty());
  const std::regex name_pattern(R"(\d+\.M\d+P)" + std::to_string(srv.child.pid()) +
                                R"(Q[123]\.[^/:]+)");
  for (const auto& name : names) {
    CHECK_MESSAGE(std::regex_match(name, name_pattern), "file name " << name);
    CHECK(file_mode(maildir + "/new/" + name) == 0600);
  }
  CHECK(file_mode(maildir) == 0700);

  auto r = run_command({python, "-c", kReadMaildir, maildir});
  INFO(r.describe());
  REQUIRE(r.ok());
  std::vector<std::string> got = lines_of(r.out), want;
  for (const auto& m : sent) want.push_back(hex(stored_envelope() + m));
  std::sort(got.begin(), got.end());
  std::sort(want.begin(), want.end());
  CHECK(got == want);
  CHECK(srv.stdout_text() == "");  // a sink prints nothing without --json
}

TEST_CASE("--maildir: no file name comes from the message") {
  TempDir tmp;
  std::string maildir = tmp / "mail";
  auto srv = start_smtpd({"-c", "sink", "--maildir", maildir});
  Client c = greeted_client(srv);
  CHECK(send_mail(c, "Subject: ../../escape\nMessage-ID: <../x/y@z>\n\nbody\n",
                  "<../../../tmp/x@example.com>") == "250 OK");
  CHECK(list_dir(tmp.path()) == std::vector<std::string>{"mail"});
  CHECK(list_dir(maildir) == std::vector<std::string>{"cur", "new", "tmp"});
  auto names = list_dir(maildir + "/new");
  REQUIRE(names.size() == 1);
  CHECK(names[0].find("escape") == std::string::npos);
  CHECK(names[0].find("..") == std::string::npos);
  CHECK(names[0].find('/') == std::string::npos);
}

// ==== mbox ====

TEST_CASE("--mbox: Python's mailbox.mbox reads every message back byte for byte") {
  std::string python = require_tool("python3", "python3");
  TempDir tmp;
  std::string mbox = tmp / "mail.mbox";
  auto srv = start_smtpd({"-c", "sink", "--mbox", mbox});
  Client c = greeted_client(srv);
  std::vector<std::string> sent = tricky_messages();
  std::vector<std::string> senders = {"a@example.com", "", "c@example.com"};  // "" is <>
  for (std::size_t i = 0; i < sent.size(); ++i)
    CHECK(send_mail(c, sent[i], "<" + senders[i] + ">") == "250 OK");
  CHECK(c.command("QUIT") == "221 Bye");
  CHECK(file_mode(mbox) == 0600);

  std::string text = read_file(mbox);
  CHECK(text.find("\n>From the start of a line.\n>>From quoted once.\n") != std::string::npos);
  CHECK(text.find("\n>>>From twice\n") != std::string::npos);

  auto r = run_command({python, "-c", kReadMbox, mbox});
  INFO(r.describe());
  REQUIRE(r.ok());
  std::vector<std::string> lines = lines_of(r.out);
  REQUIRE(lines.size() == sent.size());
  const std::regex date(
      R"( (Mon|Tue|Wed|Thu|Fri|Sat|Sun) [A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d \d{4})");
  for (std::size_t i = 0; i < sent.size(); ++i) {
    auto tab = lines[i].find('\t');
    REQUIRE(tab != std::string::npos);
    std::string from = lines[i].substr(0, tab);
    std::string sender = senders[i].empty() ? "MAILER-DAEMON" : senders[i];
    CHECK(starts_with(from, sender + " "));
    CHECK_MESSAGE(std::regex_match(from.substr(sender.size()), date), "From line: " << from);
    CHECK(lines[i].substr(tab + 1) == hex(stored_envelope(senders[i]) + sent[i]));
  }
}

TEST_CASE("--mbox waits for another program's lock before appending") {
  std::string python = require_tool("python3", "python3");
  TempDir tmp;
  std::string mbox = tmp / "locked.mbox";
  auto srv = start_smtpd({"-c", "sink", "--mbox", mbox});
  Child holder = Child::spawn({python, "-c", kHoldLock, mbox, "1"});
  REQUIRE(holder.wait_output(holder.out, [](const std::string& t) { return t == "locked\n"; }));
  Client c = greeted_client(srv);
  auto before = Clock::now();
  CHECK(send_mail(c, "Subject: waited\n\nbody\n") == "250 OK");
  auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - before).count();
  CHECK(waited >= 300);  // the holder kept the lock for about a second after "locked"
  CHECK(waited < 4000);
  CHECK(holder.wait_exit().code == 0);
  CHECK(read_file(mbox).find("\nSubject: waited\n\nbody\n\n") != std::string::npos);
}

// ==== JSON ====

// jq_run - jq with these arguments over a file; REQUIREs success.
inline std::string jq_run(const std::string& jq, std::vector<std::string> args,
                          const std::string& file) {
  args.insert(args.begin(), jq);
  args.push_back(file);
  auto r = run_command(args);
  INFO(r.describe());
  REQUIRE(r.ok());
  return r.out;
}

TEST_CASE("--json: jq parses every line; text is UTF-8, other data base64") {
  std::string jq = require_tool("jq", "jq");
  std::string mode;
  SUBCASE("SMTPServer") { mode = "SMTPServer"; }
  SUBCASE("DebuggingServer") { mode = "DebuggingServer"; }
  CAPTURE(mode);
  auto srv = start_smtpd({"-c", mode, "--json"});
  Client c = greeted_client(srv);
  const std::string text = std::string("Subject: \"quoted\" \\ back\n\ntab\there, ") +
                           "bell\x07, escape\x1b, caf\xc3\xa9 \xe2\x9c\x93\n..x\nFrom y\n";
  const std::string binary = "Subject: latin-1\n\ncaf\xe9 cr\xe8me \xff\xfe\n";
  CHECK(send_mail(c, text) == "250 OK");
  REQUIRE(c.command("MAIL FROM:<> BODY=8BITMIME") == "250 OK");
  REQUIRE(c.command("RCPT TO:<x@example.com>") == "250 OK");
  REQUIRE(c.command("RCPT TO:<y@example.com>") == "250 OK");
  REQUIRE(c.command("DATA") == "354 End data with <CR><LF>.<CR><LF>");
  REQUIRE(c.send(on_the_wire(binary)));
  CHECK(c.command(".") == "250 OK");
  CHECK(c.command("QUIT") == "221 Bye");

  // The line is on stdout, flushed, before the 250.
  std::string out = srv.stdout_text();
  REQUIRE(count(out, "\n") == 2);
  TempFile file(out);
  CHECK(count(jq_run(jq, {"-c", "."}, file.path()), "\n") == 2);
  CHECK(jq_run(jq,
               {"-c",
                "[.peer, .mailfrom, .rcpttos, .mail_options, .rcpt_options, .size, "
                ".data_encoding]"},
               file.path()) ==
        "[\"127.0.0.1\",\"a@example.com\",[\"b@example.com\"],[],[]," +
            std::to_string(text.size() - 1) +
            ",\"utf-8\"]\n"
            "[\"127.0.0.1\",\"<>\",[\"x@example.com\",\"y@example.com\"],[\"BODY=8BITMIME\"],[]," +
            std::to_string(binary.size() - 1) + ",\"base64\"]\n");
  // data is the message without its last "\n", as Envelope::data holds it.
  CHECK(jq_run(jq, {"-j", "select(.data_encoding == \"utf-8\") | .data"}, file.path()) ==
        text.substr(0, text.size() - 1));
  std::string encoded =
      jq_run(jq, {"-j", "select(.data_encoding == \"base64\") | .data"}, file.path());
  TempFile encoded_file(encoded);
  auto decoded = run_command({"base64", "-d", encoded_file.path()});
  INFO(decoded.describe());
  CHECK(decoded.ok());
  CHECK(decoded.out == binary.substr(0, binary.size() - 1));
}

// ==== Outputs together, and outputs that fail ====

TEST_CASE("-c DebuggingServer --maildir --mbox prints and stores each message") {
  TempDir tmp;
  auto srv = start_smtpd({"-c", "DebuggingServer", "--maildir", tmp / "md", "--mbox", tmp / "mb"});
  Client c = greeted_client(srv);
  CHECK(send_mail(c, "Subject: everywhere\n\nbody\n") == "250 OK");
  srv.child.pump();
  CHECK(srv.child.out.text() == printed("Subject: everywhere\n", "body\n"));
  auto names = list_dir(tmp / "md/new");
  REQUIRE(names.size() == 1);
  CHECK(read_file(tmp / "md/new/" + names[0]) ==
        stored_envelope() + "Subject: everywhere\n\nbody\n");
  std::string mbox = read_file(tmp / "mb");
  CHECK(starts_with(mbox, "From a@example.com "));
  CHECK(mbox.substr(mbox.find('\n') + 1) == stored_envelope() + "Subject: everywhere\n\nbody\n\n");
}

TEST_CASE("an output that fails gives 451, nothing is printed, and the server goes on") {
  TempDir tmp;
  std::string file = tmp / "a-regular-file";
  write_file(file, "not a directory\n");
  std::vector<std::string> options;
  std::string reason;
  SUBCASE("--maildir below a regular file") {
    options = {"--maildir", file + "/maildir"};
    reason = "cannot create directory " + file + "/maildir: Not a directory";
  }
  SUBCASE("--mbox below a regular file") {
    options = {"--mbox", file + "/mail.mbox"};
    reason = "cannot open " + file + "/mail.mbox: Not a directory";
  }
  SUBCASE("--mbox is a directory") {
    options = {"--mbox", tmp.path()};
    reason = "cannot open " + tmp.path() + ": Is a directory";
  }
  options.insert(options.end(), {"-c", "DebuggingServer", "--max-messages", "1"});
  auto srv = start_smtpd(options);
  Client c = greeted_client(srv);
  const std::string reply = "451 Error: could not store the message: " + reason;
  CHECK(send_mail(c, "Subject: lost\n\nbody\n") == reply);
  CHECK(c.command("NOOP") == "250 OK");
  CHECK(send_mail(c, "Subject: lost again\n\nbody\n") == reply);
  CHECK(c.command("QUIT") == "221 Bye");
  // A 451 does not count towards --max-messages: new clients are still served.
  Client other = greeted_client(srv);
  CHECK(other.command("QUIT") == "221 Bye");
  CHECK(srv.child.running());
  CHECK(srv.wait_stderr("smtpd: could not store a message from 127.0.0.1: " + reason + "\n"));
  auto st = srv.stop();
  CHECK(st.code == 0);
  CHECK(srv.child.out.text() == "");  // the printer comes after the failed store
}

// ==== Exiting by itself ====

TEST_CASE("--max-messages 3 exits 0 by itself once the clients are done") {
  TempDir tmp;
  auto srv = start_smtpd({"-c", "sink", "--maildir", tmp / "md", "--max-messages", "3"});
  SUBCASE("three clients, one message each") {
    for (int i = 0; i < 3; ++i) {
      Client c = greeted_client(srv);
      CHECK(send_mail(c, "Subject: " + std::to_string(i) + "\n\nbody\n") == "250 OK");
      CHECK(c.command("QUIT") == "221 Bye");
    }
  }
  SUBCASE("one client, three messages; a new client is refused after the third") {
    Client c = greeted_client(srv);
    for (int i = 0; i < 3; ++i)
      CHECK(send_mail(c, "Subject: " + std::to_string(i) + "\n\nbody\n") == "250 OK");
    CHECK_THROWS(srv.connect(milliseconds(1000)));  // the listener is closed
    CHECK(c.command("NOOP") == "250 OK");           // the open session goes on
    CHECK(c.command("QUIT") == "221 Bye");
  }
  auto st = srv.child.wait_exit(milliseconds(3000));
  INFO(st.describe() << "; stderr: " << srv.child.err.text());
  CHECK(st.exited);
  CHECK(st.code == 0);
  CHECK(list_dir(tmp / "md/new").size() == 3);
}

TEST_CASE("--max-messages: a session still open after the limit waits for its QUIT") {
  auto srv = start_smtpd({"-c", "sink", "--max-messages", "1"});
  auto early = srv.connect();  // connected before the limit, idle
  std::string fqdn = read_greeting(early);
  REQUIRE(starts_with(early.command("EHLO early.example"), "250"));
  Client sender = greeted_client(srv);
  CHECK(send_mail(sender, "Subject: the one\n\nbody\n") == "250 OK");
  CHECK(sender.command("QUIT") == "221 Bye");
  CHECK(sender.wait_closed());
  SUBCASE("it quits: 221, then the server exits 0") {
    CHECK(srv.child.running());
    CHECK(send_mail(early, "Subject: after the limit\n\nbody\n") == "250 OK");
    CHECK(early.command("QUIT") == "221 Bye");
    auto st = srv.child.wait_exit(milliseconds(3000));
    CHECK(st.exited);
    CHECK(st.code == 0);
  }
  SUBCASE("it stays silent: 421 after the grace of 5 s, then the server exits 0") {
    auto before = Clock::now();
    std::string reply = early.read_reply(milliseconds(8000));
    auto waited = std::chrono::duration_cast<milliseconds>(Clock::now() - before).count();
    CHECK(reply == "421 " + fqdn + " closing: message limit reached");
    CHECK(waited > 3500);
    CHECK(waited < 7500);
    CHECK(early.wait_closed());
    auto st = srv.child.wait_exit(milliseconds(3000));
    CHECK(st.exited);
    CHECK(st.code == 0);
  }
}

TEST_CASE("--idle-exit 1 exits 0 by itself when no client is connected for a second") {
  SUBCASE("no client at all") {
    auto before = Clock::now();
    auto srv = start_smtpd({"-c", "sink", "--idle-exit", "1"});
    auto st = srv.child.wait_exit(milliseconds(4000));
    auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - before).count();
    INFO(st.describe() << " after " << took << " ms");
    CHECK(st.exited);
    CHECK(st.code == 0);
    CHECK_FALSE(st.timed_out);
    CHECK(took >= 900);
    CHECK(took < 3000);
  }
  SUBCASE("a connected client keeps it running; the clock starts when it leaves") {
    auto srv = start_smtpd({"-c", "sink", "--idle-exit", "1"});
    Client c = greeted_client(srv);
    // connected for 1.5 s, longer than --idle-exit: the server must not end meanwhile
    CHECK_FALSE(wait_until([&] { return !srv.child.running(); }, milliseconds(1500)));
    CHECK(c.command("QUIT") == "221 Bye");
    CHECK(c.wait_closed());
    auto left = Clock::now();
    auto st = srv.child.wait_exit(milliseconds(4000));
    auto took = std::chrono::duration_cast<milliseconds>(Clock::now() - left).count();
    INFO(st.describe() << " " << took << " ms after the client left");
    CHECK(st.exited);
    CHECK(st.code == 0);
    CHECK(took >= 800);
    CHECK(took < 3000);
  }
}

// ==== The README's CI example ====

// readme_ci_script - the sh block of README.md's "Use it in your tests" section.
inline std::string readme_ci_script() {
  std::string readme = read_file("README.md");
  auto section = readme.find("## Use it in your tests");
  if (section == std::string::npos) return "";
  auto start = readme.find("```sh\n", section);
  if (start == std::string::npos) return "";
  start += 6;
  auto end = readme.find("```\n", start);
  return end == std::string::npos ? "" : readme.substr(start, end - start);
}

TEST_CASE("tests/use-in-ci.sh (the README's example) passes, as a CI job would run it") {
  require_tool("curl", "curl");
  std::string script = read_file("tests/use-in-ci.sh");
  REQUIRE_MESSAGE(!script.empty(), "run the tests from the project root");
  CHECK_MESSAGE(readme_ci_script() == script,
                "README.md's 'Use it in your tests' example differs from tests/use-in-ci.sh");
  // The script calls "smtpd" from PATH, as after make install: put the binary under test there.
  TempDir bin;
  char resolved[PATH_MAX];
  REQUIRE(::realpath(smtpd_bin().c_str(), resolved) != nullptr);
  REQUIRE(::symlink(resolved, (bin / "smtpd").c_str()) == 0);
  const char* path = std::getenv("PATH");
  auto r = run_command({"env", "PATH=" + bin.path() + ":" + (path ? path : "/usr/bin:/bin"), "sh",
                        "tests/use-in-ci.sh"},
                       milliseconds(30000));
  INFO(r.describe());
  CHECK(r.ok());
  auto lines = lines_of(r.out);
  REQUIRE(lines.size() == 6);
  CHECK(std::regex_match(lines[0], std::regex("smtpd is listening on port [1-9][0-9]*")));
  CHECK(lines[1] == "smtpd exited with status 0");
  CHECK(lines[2] == "3 messages in the Maildir");
  CHECK(lines[3] == "Subject: test 1");
  CHECK(lines[4] == "Subject: test 2");
  CHECK(lines[5] == "Subject: test 3");
  CHECK(r.err == "");
}

// ==== The same words everywhere ====

// man_text - the man page's text lines joined with spaces, "\-" as "-".
inline std::string man_text() {
  std::string text;
  for (const auto& line : lines_of(read_file("man/smtpd.1"))) {
    if (starts_with(line, ".")) continue;
    text += line + " ";
  }
  for (auto at = text.find("\\-"); at != std::string::npos; at = text.find("\\-", at))
    text.replace(at, 2, "-");
  return text;
}

// has_man_entry - whether the man page gives `--long` an entry of its own: a .TP paragraph
// whose tag line (.B, .BI or .BR) names the option, so `man` shows it as an item
inline bool has_man_entry(const std::string& long_name) {
  const std::string name = "\\-\\-" + std::regex_replace(long_name, std::regex("-"), "\\-");
  std::vector<std::string> lines = lines_of(read_file("man/smtpd.1"));
  for (std::size_t i = 1; i < lines.size(); ++i) {
    const std::string& tag = lines[i];
    std::size_t at = tag.find(name);
    if (lines[i - 1] != ".TP" || !starts_with(tag, ".B") || at == std::string::npos) continue;
    std::size_t end = at + name.size();
    if (end == tag.size() || tag[end] == ' ' || tag[end] == '"') return true;
  }
  return false;
}

TEST_CASE("--help, the man page and README.md describe every option in the same words") {
  cxxopts::Options options = build_options();
  std::string readme = read_file("README.md");
  std::string man = man_text();
  REQUIRE(!readme.empty());
  REQUIRE(!man.empty());
  auto r = run_command({smtpd_bin(), "--help"});
  for (const auto& option : options.group_help("").options) {
    if (option.desc.empty()) continue;  // the positional addresses
    CHECK_MESSAGE(readme.find("| " + option.desc + " |") != std::string::npos,
                  "README.md's options table lacks: " << option.desc);
    CHECK_MESSAGE(man.find(option.desc) != std::string::npos, "smtpd.1 lacks: " << option.desc);
    for (const std::string& name : option.l)
      CHECK_MESSAGE(has_man_entry(name), "smtpd.1 has no .TP entry for --" << name);
  }
  for (std::string o :
       {"--maildir DIR", "--mbox FILE", "--json", "--max-messages N", "--idle-exit SECONDS"})
    CHECK_MESSAGE(r.out.find(o) != std::string::npos, "--help does not list " << o);
}

// folded_spaces - text with each run of white space as one space, as cxxopts' wrapping undoes
inline std::string folded_spaces(const std::string& text) {
  std::string folded;
  for (char ch : text) {
    bool is_space = std::isspace(static_cast<unsigned char>(ch)) != 0;
    if (!(is_space && !folded.empty() && folded.back() == ' ')) folded += is_space ? ' ' : ch;
  }
  return folded;
}

TEST_CASE("each option is one row of option_rows, declared, applied and shown in --help from it") {
  cxxopts::Options options = build_options();  // group_help refers into it
  std::vector<cxxopts::HelpOptionDetails> declared;
  for (const auto& option : options.group_help("").options)
    if (!option.desc.empty()) declared.push_back(option);  // not the positional addresses
  const std::vector<OptionRow>& rows = option_rows();
  REQUIRE(declared.size() == rows.size());  // no option declared outside the table
  auto r = run_command({smtpd_bin(), "--help"});
  REQUIRE(r.ok());
  std::string help = folded_spaces(r.out);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const OptionRow& row = rows[i];
    CAPTURE(row.long_name);
    CHECK(declared[i].l == std::vector<std::string>{row.long_name});
    CHECK(declared[i].s == (row.short_name != 0 ? std::string(1, row.short_name) : ""));
    CHECK(declared[i].desc == row.help);
    CHECK(declared[i].arg_help == (row.value_name != nullptr ? row.value_name : ""));
    CHECK(declared[i].is_boolean == (row.value_name == nullptr));
    std::string shown = "--" + std::string(row.long_name) +
                        (row.value_name != nullptr ? " " + std::string(row.value_name) : "") + " " +
                        row.help;
    CHECK_MESSAGE(help.find(shown) != std::string::npos, "--help does not show: " << shown);
    bool is_answered =
        row.long_name == std::string("help") || row.long_name == std::string("version");
    CHECK((row.apply == nullptr) == is_answered);  // every other row changes Settings
    CHECK((!row.is_repeatable || row.value_name != nullptr));
  }
}

// man_exit_statuses - the EXIT STATUS section of the man page: for each status number its
// .TP entry names, the entry's text (lines joined with spaces, font requests dropped)
inline std::map<int, std::string> man_exit_statuses() {
  std::vector<std::string> lines = lines_of(read_file("man/smtpd.1"));
  auto line = std::find(lines.begin(), lines.end(), ".SH EXIT STATUS");
  std::map<int, std::string> statuses;
  std::vector<int> tagged;  // the statuses of the entry being read
  for (++line; line < lines.end() && !starts_with(*line, ".SH"); ++line) {
    if (*line == ".TP" && line + 1 < lines.end()) {
      tagged.clear();
      std::string tag = *++line;
      for (std::smatch m; std::regex_search(tag, m, std::regex("[0-9]+")); tag = m.suffix())
        tagged.push_back(std::stoi(m.str()));
    } else if (starts_with(*line, ".PP")) {
      tagged.clear();
    } else {
      std::string text = std::regex_replace(*line, std::regex("^\\.B[IR]? "), "");
      for (int status : tagged) statuses[status] += (statuses[status].empty() ? "" : " ") + text;
    }
  }
  return statuses;
}

TEST_CASE("the man page's EXIT STATUS gives each status the program ends with its meaning") {
  const std::map<int, std::string> meaning{{kExitOk, "Normal end"},
                                           {kExitMatched, "A message arrived that"},
                                           {kExitUsage, "Bad command line"},
                                           {kExitDeadline, "The deadline passed"},
                                           {kExitCannotListen, "Cannot listen"},
                                           {kExitPrivileges, "Cannot drop privileges"},
                                           {kExitLoopFailed, "The event loop failed"},
                                           {128 + SIGINT, "A second SIGINT"},
                                           {128 + SIGTERM, "A second SIGINT"}};
  std::map<int, std::string> documented = man_exit_statuses();
  auto numbers = [](const std::map<int, std::string>& table) {
    std::string text;
    for (const auto& entry : table) text += std::to_string(entry.first) + " ";
    return text;
  };
  CHECK(numbers(documented) == numbers(meaning));  // none left out, none made up
  for (const auto& [status, words] : meaning) {
    CAPTURE(status);
    CHECK_MESSAGE(starts_with(documented[status], words),
                  "smtpd.1 says for " << status << ": " << documented[status]);
  }
}

}  // namespace outputs
}  // namespace smtpd_test
