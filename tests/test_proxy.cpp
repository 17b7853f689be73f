// test_proxy.cpp - PureProxy end to end: a client, ./smtpd -c PureProxy, and a real upstream.
//
// The upstreams all listen on 127.0.0.1: Postfix's smtp-sink (Debian package postfix) with its
// fault switches and its -d dump of every message it receives, our own DebuggingServer, and a
// small scripted server in threads of this process. Each test checks what the client hears
// and what the upstream got: a message the client got 250 for must be at the upstream byte for
// byte, and the upstream must have accepted nothing the client was not told about.
//
//   Fixtures: ScriptedUpstream, start_debugging (and from test_support.hpp
//             SmtpSink, IdlePort, start_proxy)
//   Helpers:  as_relayed, try_message
#include <dirent.h>
#include <doctest/doctest.h>
#include <pwd.h>

#include <atomic>
#include <cctype>
#include <fstream>
#include <iterator>
#include <thread>

#include "test_support.hpp"

namespace smtpd_test {
namespace proxy {

TEST_SUITE_BEGIN("proxy");

// Replies smtp-sink gives (Postfix 3.x); the proxy must hand them on unchanged.
constexpr const char* kSinkMailOk = "250 2.1.0 Ok";
constexpr const char* kSinkRcptOk = "250 2.1.5 Ok";
constexpr const char* kSinkDataOk = "250 2.0.0 Ok";
constexpr const char* kSinkSoft = "450 4.3.0 Error: command failed";  // -r
constexpr const char* kSinkHard = "500 5.3.0 Error: command failed";  // -f
constexpr const char* kNo8Bit = "554 5.6.3 Error: the upstream server does not accept 8-bit mail";
constexpr const char* kNoUtf8 = "553 5.6.7 Error: the upstream server does not support SMTPUTF8";

// each_sink_refusal - in two subcases, smtp-sink's switch for a soft (-r) and for a hard (-f)
// refusal, and the reply it then gives, which the client must hear.
inline std::pair<std::string, std::string> each_sink_refusal() {
  std::pair<std::string, std::string> refusal;
  SUBCASE("soft (smtp-sink -r): 4xx") { refusal = {"-r", kSinkSoft}; }
  SUBCASE("hard (smtp-sink -f): 5xx") { refusal = {"-f", kSinkHard}; }
  return refusal;
}

// ==== Fixtures ====

// ScriptedUpstream - a minimal SMTP server in threads of this process, on 127.0.0.1, each
// connection served at the same time as the others. It answers as a sink does (220, EHLO with
// 8BITMIME, 250 to MAIL, RCPT and RSET, 354, 250 after ".", 221) except on the first
// connection that sends MAIL, where it never answers again: one upstream session stalled in
// the middle while others go on.
class ScriptedUpstream {
 public:
  ScriptedUpstream() {
    server_.start([this](StandInUpstream::Connection& c) { talk(c); },
                  StandInUpstream::Serving::Concurrently);
  }

  std::string address() const { return server_.address(); }
  int messages() const { return messages_; }      // "." answered 250
  int stalled_mails() const { return stalled_; }  // MAIL commands left unanswered

 private:
  // Session - where one connection's dialogue stands
  struct Session {
    bool in_data = false;
    bool is_stalled = false;
    bool has_quit = false;
  };

  void talk(StandInUpstream::Connection& c) {
    c.say("220 scripted ESMTP");
    Session s;
    while (!s.has_quit) {
      std::optional<std::string> line = c.read_line();
      if (!line) return;  // the peer has closed, or the test is over
      answer(c, s, *line);
    }
  }

  void answer(const StandInUpstream::Connection& c, Session& s, const std::string& line) {
    if (s.is_stalled) return;
    if (s.in_data) {
      if (line == ".") {
        s.in_data = false;
        ++messages_;
        c.say("250 2.0.0 queued");
      }
      return;
    }
    std::string verb = line.substr(0, 4);
    for (char& ch : verb) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    if (verb == "EHLO") return c.say("250-scripted\r\n250 8BITMIME");
    if (verb == "HELO") return c.say("250 scripted");
    if (verb == "MAIL" && !has_stalled_.exchange(true)) {  // not the probe at start
      s.is_stalled = true;
      ++stalled_;
      return;
    }
    if (verb == "MAIL" || verb == "RCPT" || verb == "RSET" || verb == "NOOP")
      return c.say("250 2.0.0 Ok");
    if (verb == "DATA") {
      s.in_data = true;
      return c.say("354 go ahead");
    }
    if (verb == "QUIT") {
      s.has_quit = true;
      return c.say("221 Bye");
    }
    c.say("500 5.5.1 unknown command");
  }

  std::atomic<int> messages_{0};
  std::atomic<int> stalled_{0};
  std::atomic<bool> has_stalled_{false};
  StandInUpstream server_;  // last: it stops before the counters go
};

// start_debugging - our DebuggingServer on 127.0.0.1:0, the proxy's upstream in a chain.
inline ServerProcess start_debugging(std::vector<std::string> options = {}) {
  options.insert(options.begin(), {"-c", "DebuggingServer"});
  return start_smtpd(options);
}

// ==== Helpers ====

// as_relayed - the same message as the proxy must hand it on, "\n" line ends, unstuffed:
// "X-Peer: <peer>" before the first empty line, or as the last line when there is none.
inline std::string as_relayed(const std::string& text, const std::string& peer = "127.0.0.1") {
  std::string out;
  bool added = false;
  for (const std::string& line : lines_of(text)) {
    if (!added && line.empty()) {
      out += "X-Peer: " + peer + "\n";
      added = true;
    }
    out += line + "\n";
  }
  if (!added) out += "X-Peer: " + peer + "\n";
  return out;
}

// try_message - try_wire with a message written with "\n" line ends, MAIL parameters,
// sender and recipient.
inline Outcome try_message(Client& c, const std::string& text, const std::string& mail_params = "",
                           const std::string& from = "a@example.com",
                           const std::string& to = "b@example.com") {
  std::string mail = "<" + from + ">" + (mail_params.empty() ? "" : " " + mail_params);
  return try_wire(c, on_the_wire(text), mail, {to});
}

// The message the byte-for-byte tests send: headers, dot lines (stuffed on the wire),
// UTF-8 and a Latin-1 byte, trailing blanks, a second empty line.
constexpr const char* kEightBitMessage =
    "From: a@example.com\n"
    "To: b@example.com\n"
    "Subject: relay \xc3\xa9t\xc3\xa9\n"
    "\n"
    "first line\n"
    ".a line that starts with a dot\n"
    ".\n"
    "..two dots\n"
    "Gr\xc3\xbc\xc3\x9f"
    "e, 20 \xe2\x82\xac and a Latin-1 byte: caf\xe9\n"
    "trailing blanks   \n"
    "\n"
    "last line\n";

// ==== Tests ====

TEST_CASE("a relayed message arrives at smtp-sink byte for byte, with X-Peer added") {
  SmtpSink sink;
  auto proxy = start_proxy(sink.address());
  Client c = greeted_client(proxy);

  SUBCASE("8BITMIME body with dot lines; SIZE dropped, as smtp-sink does not offer it") {
    Outcome o = try_message(c, kEightBitMessage, "BODY=8BITMIME SIZE=400");
    CHECK(o.mail == kSinkMailOk);
    CHECK(o.rcpt == kSinkRcptOk);
    CHECK(o.end == kSinkDataOk);
    CHECK(c.command("QUIT") == "221 Bye");
    REQUIRE(wait_until([&] { return sink.dump_count() == 1; }));
    CHECK(sink.messages() == std::vector<std::string>{as_relayed(kEightBitMessage) + "\n"});
    std::string dump = sink.dumps().at(0);
    CHECK(SmtpSink::header(dump, "X-Mail-Args") == "<a@example.com> BODY=8BITMIME");
    CHECK(SmtpSink::header(dump, "X-Rcpt-Args") == "<b@example.com>");
    CHECK(SmtpSink::header(dump, "X-Client-Proto") == "ESMTP");  // EHLO, not HELO
  }
  SUBCASE("a message with no empty line gets X-Peer as its last line") {
    const std::string text = "Subject: no body\nX-Other: yes\n";
    CHECK(try_message(c, text).end == kSinkDataOk);
    CHECK(c.command("QUIT") == "221 Bye");
    REQUIRE(wait_until([&] { return sink.dump_count() == 1; }));
    CHECK(sink.messages() == std::vector<std::string>{as_relayed(text) + "\n"});
  }
  SUBCASE("three messages in one session (RSET upstream between them) all arrive") {
    std::vector<std::string> sent;
    int accepted = 0;
    for (int i = 0; i < 3; ++i) {
      sent.push_back("Subject: number " + std::to_string(i) + "\n\n.body " + std::to_string(i) +
                     "\n");
      accepted += try_message(c, sent.back()).accepted();
      if (i == 1) CHECK(c.command("RSET") == "250 OK");  // a client RSET between, too
    }
    CHECK(accepted == 3);
    CHECK(c.command("QUIT") == "221 Bye");
    REQUIRE(wait_until([&] { return sink.dump_count() == 3; }));
    std::vector<std::string> want;
    for (const std::string& s : sent) want.push_back(as_relayed(s) + "\n");
    std::vector<std::string> got = sink.messages();
    std::sort(want.begin(), want.end());
    std::sort(got.begin(), got.end());
    CHECK(got == want);
  }
}

TEST_CASE("five clients at once through one proxy: every 250 is a message at smtp-sink") {
  constexpr int kClients = 5;
  SmtpSink sink;
  auto proxy = start_proxy(sink.address());
  std::vector<Client> clients;
  for (int i = 0; i < kClients; ++i) {
    clients.push_back(proxy.connect());
    greet(clients.back());
  }
  // Every session's MAIL opens its own upstream session; all are open at once.
  for (auto& c : clients) REQUIRE(c.command("MAIL FROM:<a@example.com>") == kSinkMailOk);
  for (auto& c : clients) REQUIRE(c.command("RCPT TO:<b@example.com>") == kSinkRcptOk);
  for (auto& c : clients) REQUIRE(c.command("DATA") == kDataReply);
  int accepted = 0;
  for (int i = 0; i < kClients; ++i) {
    REQUIRE(clients[i].send(on_the_wire("Subject: client " + std::to_string(i) + "\n\nbody\n")));
    accepted += clients[i].command(".") == kSinkDataOk;
  }
  for (auto& c : clients) CHECK(c.command("QUIT") == "221 Bye");
  CHECK(accepted == kClients);
  CHECK(wait_until([&] { return sink.dump_count() == static_cast<std::size_t>(kClients); }));
  std::vector<std::string> got = sink.messages();
  for (int i = 0; i < kClients; ++i) {
    std::string want = as_relayed("Subject: client " + std::to_string(i) + "\n\nbody\n") + "\n";
    CHECK_MESSAGE(std::count(got.begin(), got.end(), want) == 1, "client " << i);
  }
}

TEST_CASE("a refused RCPT is refused to the client right then, with the upstream's reply") {
  auto [fault, want] = each_sink_refusal();
  SmtpSink sink({fault, "rcpt"});
  auto proxy = start_proxy(sink.address());
  Client c = greeted_client(proxy);
  Outcome o = try_message(c, "Subject: refused\n\nbody\n");
  CHECK(o.mail == kSinkMailOk);
  CHECK(o.rcpt == want);
  CHECK(c.command("DATA") == "503 Error: need RCPT command");
  // The transaction stays open at the upstream until it is reset; the next MAIL resets it.
  CHECK(c.command("RSET") == "250 OK");
  Outcome again = try_message(c, "Subject: refused again\n\nbody\n");
  CHECK(again.mail == kSinkMailOk);  // not "503 nested MAIL": the proxy sent RSET first
  CHECK(again.rcpt == want);
  CHECK(c.command("QUIT") == "221 Bye");
  // No 250 for a message, and nothing left at the upstream once the sessions are over.
  CHECK(wait_until([&] { return sink.dump_count() == 0; }));
}

TEST_CASE("a refused end of DATA is the client's final reply, never a 250") {
  auto [fault, want] = each_sink_refusal();
  SmtpSink sink({fault, "."});
  auto proxy = start_proxy(sink.address());
  Client c = greeted_client(proxy);
  int accepted = 0;
  for (int i = 0; i < 2; ++i) {
    Outcome o = try_message(c, "Subject: refused at the end\n\nbody\n");
    CHECK(o.mail == kSinkMailOk);
    CHECK(o.rcpt == kSinkRcptOk);
    CHECK(o.end == want);
    accepted += o.accepted();
  }
  CHECK(c.command("QUIT") == "221 Bye");
  CHECK(accepted == 0);
  // smtp-sink keeps the text of a message it then refuses: both reached it and were refused
  // there (the upstream accepted 0, as many as the client got 250 for).
  CHECK(wait_until([&] { return sink.dump_count() == 2; }));
}

TEST_CASE("an upstream that drops the connection gives the client 4xx, never 250") {
  struct Drop {
    std::vector<std::string> switches;
    std::string at;       // where the client hears about it
    std::size_t reached;  // messages whose text reached smtp-sink
  } drop{};
  SUBCASE("disconnect at RCPT (-q rcpt)") { drop = {{"-q", "rcpt"}, "rcpt", 0}; }
  SUBCASE("421 at RCPT (-Q rcpt)") { drop = {{"-Q", "rcpt"}, "rcpt", 0}; }
  SUBCASE("disconnect at DATA (-q data)") { drop = {{"-q", "data"}, "end", 0}; }
  SUBCASE("421 at DATA (-Q data)") { drop = {{"-Q", "data"}, "end", 0}; }
  SUBCASE("disconnect after the text, at . (-q .)") { drop = {{"-q", "."}, "end", 2}; }
  const std::vector<std::string>& switches = drop.switches;
  const std::string& at = drop.at;
  SmtpSink sink(switches);
  auto proxy = start_proxy(sink.address());
  Client first = greeted_client(proxy);
  Client second;  // after a 421, a new client (see the 421 test case below)
  int accepted = 0;
  for (int i = 0; i < 2; ++i) {  // the second transaction needs a new upstream session
    CAPTURE(i);
    if (i == 1 && switches[0] == "-Q") {
      second = proxy.connect();
      greet(second);
    }
    Client& c = second.is_open() ? second : first;
    Outcome o = try_message(c, "Subject: dropped\n\nbody\n");
    CHECK(o.mail == kSinkMailOk);
    std::string reply = at == "rcpt" ? o.rcpt : o.end;
    CHECK_MESSAGE(starts_with(reply, "4"), "reply: " << reply);
    if (starts_with(reply, "451")) {  // "closed the connection", or a reset if it was quicker
      CHECK(starts_with(reply, "451 Error: upstream server " + sink.address() + " "));
      CHECK(reply.substr(reply.size() - 17) == "; try again later");
    }
    accepted += o.accepted();
    if (at == "rcpt") CHECK(c.command("RSET") == "250 OK");
  }
  CHECK(first.command("QUIT") == "221 Bye");
  if (second.is_open()) CHECK(second.command("QUIT") == "221 Bye");
  CHECK(accepted == 0);
  CHECK(wait_until([&] { return sink.dump_count() == drop.reached; }));
}

// An upstream 421 ends that upstream session only: the client hears 451 (it keeps its mail
// and its session with us), and its next MAIL opens a new upstream session.
TEST_CASE("after an upstream 421 the client gets 451 and its next MAIL a new upstream session") {
  SmtpSink sink({"-Q", "rcpt"});
  auto proxy = start_proxy(sink.address());
  Client c = greeted_client(proxy);
  // Pipelined, so the proxy has the next MAIL in hand as soon as the 421 arrives.
  REQUIRE(
      c.send("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nRSET\r\n"
             "MAIL FROM:<a@example.com>\r\nQUIT\r\n"));
  CHECK(c.read_reply() == kSinkMailOk);
  CHECK(c.read_reply() == "451 Error: upstream server " + sink.address() +
                              " closed the session (421 4.0.0 Server closing connection); "
                              "try again later");
  CHECK(c.read_reply() == "250 OK");
  CHECK(c.read_reply() == kSinkMailOk);
  CHECK(c.read_reply() == "221 Bye");
}

TEST_CASE("an upstream without ESMTP (smtp-sink -e) is greeted with HELO; 8-bit mail gets 554") {
  SmtpSink sink({"-e"});
  auto proxy = start_proxy(sink.address());
  Client c = greeted_client(proxy);
  CHECK(c.command("MAIL FROM:<a@example.com> BODY=8BITMIME") == kNo8Bit);
  const std::string text = "Subject: plain old SMTP\n\n.dot\n";
  Outcome o = try_message(c, text);
  CHECK(o.mail == kSinkMailOk);
  CHECK(o.end == kSinkDataOk);
  CHECK(c.command("QUIT") == "221 Bye");
  REQUIRE(wait_until([&] { return sink.dump_count() == 1; }));
  CHECK(SmtpSink::header(sink.dumps().at(0), "X-Client-Proto") == "SMTP");  // HELO, not EHLO
  CHECK(sink.messages() == std::vector<std::string>{as_relayed(text) + "\n"});
}

TEST_CASE("a whole pipelined session in one write is relayed in order") {
  SmtpSink sink;
  auto proxy = start_proxy(sink.address());
  auto c = proxy.connect();
  read_greeting(c);
  REQUIRE(
      c.send("EHLO pipe.example\r\n"
             "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" +
             on_the_wire("Subject: one\n\n.first\n") +
             ".\r\n"
             "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n" +
             on_the_wire("Subject: two\n\n.second\n") + ".\r\nQUIT\r\n"));
  CHECK(starts_with(c.read_reply(), "250-"));
  int accepted = 0;
  for (int i = 0; i < 2; ++i) {
    CHECK(c.read_reply() == kSinkMailOk);
    CHECK(c.read_reply() == kSinkRcptOk);
    CHECK(c.read_reply() == kDataReply);
    std::string end = c.read_reply();
    CHECK(end == kSinkDataOk);
    accepted += end == kSinkDataOk;
  }
  CHECK(c.read_reply() == "221 Bye");
  CHECK(c.wait_closed());
  CHECK(wait_until([&] { return sink.dump_count() == static_cast<std::size_t>(accepted); }));
  std::vector<std::string> got = sink.messages();
  std::sort(got.begin(), got.end());
  CHECK(got == std::vector<std::string>{as_relayed("Subject: one\n\n.first\n") + "\n",
                                        as_relayed("Subject: two\n\n.second\n") + "\n"});
}

TEST_CASE("a client that hangs up while its upstream is slow does not disturb the proxy") {
  IdlePort silent(IdlePort::Silent);  // every upstream session waits for a greeting
  std::string upstream = silent.address();
  auto proxy = start_proxy(upstream, {"--reply-timeout", "1"});
  {
    Client quitter = greeted_client(proxy);
    REQUIRE(quitter.send("MAIL FROM:<a@example.com>\r\n"));
    quitter.reset();
  }
  {
    Client closer = greeted_client(proxy);
    REQUIRE(closer.send("MAIL FROM:<a@example.com>\r\nQUIT\r\n"));
    ::shutdown(closer.fd(), SHUT_WR);  // half-close: the replies are still owed
    CHECK(starts_with(closer.read_reply(milliseconds(8000)), "451 Error: upstream server "));
    CHECK(closer.read_reply() == "221 Bye");
    CHECK(closer.wait_closed());
  }
  Client c = greeted_client(proxy);
  CHECK(c.command("MAIL FROM:<a@example.com>", milliseconds(8000)) ==
        "451 Error: upstream server " + upstream +
            " sent no greeting within the reply timeout; try again later");
  CHECK(c.command("QUIT") == "221 Bye");
  auto st = proxy.stop();
  CHECK(st.exited);
  CHECK(st.code == 0);
}

TEST_CASE("a dead upstream (nothing listening) gives 451 at MAIL, and the proxy stays up") {
  IdlePort dead(IdlePort::Closed);
  std::string upstream = dead.address();
  auto proxy = start_proxy(upstream);
  Client c = greeted_client(proxy);
  for (int i = 0; i < 2; ++i) {  // each MAIL tries again
    std::string reply = c.command("MAIL FROM:<a@example.com>");
    CHECK(starts_with(reply, "451 Error: upstream server " + upstream + " cannot connect: "));
    CHECK(reply.find("refused") != std::string::npos);
    CHECK(reply.substr(reply.size() - 17) == "; try again later");
    CHECK(c.command("RCPT TO:<b@example.com>") == "503 Error: need MAIL command");
  }
  CHECK(c.command("QUIT") == "221 Bye");
  auto other = proxy.connect();
  CHECK(starts_with(other.read_reply(), "220 "));
}

TEST_CASE("an upstream that does not answer in time gives 451 after the timeout") {
  std::unique_ptr<SmtpSink> sink;
  std::unique_ptr<IdlePort> idle;
  std::string upstream, option, why;
  SUBCASE("smtp-sink -W mail:4 with --reply-timeout 1: MAIL") {
    sink = std::make_unique<SmtpSink>(std::vector<std::string>{"-W", "mail:4"});
    upstream = sink->address();
    option = "--reply-timeout";
    why = "did not reply within the reply timeout";
  }
  SUBCASE("a listener that never accepts, --reply-timeout 1: no greeting") {
    idle = std::make_unique<IdlePort>(IdlePort::Silent);
    upstream = idle->address();
    option = "--reply-timeout";
    why = "sent no greeting within the reply timeout";
  }
  SUBCASE("a listener whose backlog is full, --connect-timeout 1: no connection") {
    idle = std::make_unique<IdlePort>(IdlePort::Full);
    upstream = idle->address();
    option = "--connect-timeout";
    why = "cannot connect: timed out";
  }
  auto proxy = start_proxy(upstream, {option, "1"});
  Client c = greeted_client(proxy);
  auto start = Clock::now();
  std::string reply = c.command("MAIL FROM:<a@example.com>", milliseconds(8000));
  double took = seconds_since(start);
  CHECK(reply == "451 Error: upstream server " + upstream + " " + why + "; try again later");
  CHECK(took >= 0.9);
  CHECK(took < 3.0);
  CHECK(c.command("QUIT") == "221 Bye");
}

TEST_CASE("a stalled upstream session slows only its own client") {
  // Both clients go through one proxy to one upstream; only the upstream session opened for
  // client A stalls (at MAIL). Client B's whole transaction must finish while A still waits,
  // and A then hears 451 when its --reply-timeout (3 s) runs out.
  ScriptedUpstream upstream;
  auto proxy = start_proxy(upstream.address(), {"--reply-timeout", "3"});
  Client a = greeted_client(proxy);
  auto a_start = Clock::now();
  REQUIRE(a.send("MAIL FROM:<a@example.com>\r\n"));
  REQUIRE(wait_until([&] { return upstream.stalled_mails() == 1; }));

  auto b_start = Clock::now();
  Client b = greeted_client(proxy);
  Outcome o = try_message(b, "Subject: from B\n\nbody\n");
  double b_took = seconds_since(b_start);
  CHECK(o.mail == "250 2.0.0 Ok");
  CHECK(o.end == "250 2.0.0 queued");
  CHECK(b_took < 1.5);
  CHECK(b.command("QUIT") == "221 Bye");
  a.poll_once();
  CHECK_MESSAGE(a.pending() == "", "A was answered while its upstream stalled");

  std::string a_reply = a.read_reply(milliseconds(8000));
  double a_took = seconds_since(a_start);
  CHECK(a_reply == "451 Error: upstream server " + upstream.address() +
                       " did not reply within the reply timeout; try again later");
  CHECK(a_took >= 2.9);
  CHECK(a_took < 6.0);
  CHECK(a.command("QUIT") == "221 Bye");
  CHECK(upstream.messages() == static_cast<int>(o.accepted()));  // B's one message
}

TEST_CASE("a chain: the message DebuggingServer prints behind the proxy is the one sent") {
  auto downstream = start_debugging();
  auto proxy = start_proxy(downstream.address());
  Client c = greeted_client(proxy);
  const std::string text = "From: a@example.com\nSubject: chained\n\nfirst\n.dot\n.\n..two\nlast\n";
  // The proxy's X-Peer goes before the first empty line; DebuggingServer adds its own there.
  const std::string headers = "From: a@example.com\nSubject: chained\nX-Peer: 127.0.0.1\n";
  const std::string body = "first\n.dot\n.\n..two\nlast\n";
  const std::string printed =
      std::string(kFollows) + headers + "X-Peer: 127.0.0.1\n\n" + body + kEnd;
  int accepted = 0;
  SUBCASE("three messages") {
    for (int i = 0; i < 3; ++i) {
      Outcome o = try_message(c, text);
      CHECK(o.mail == "250 OK");
      CHECK(o.rcpt == "250 OK");
      CHECK(o.end == "250 OK");
      accepted += o.accepted();
    }
    CHECK(downstream.wait_stdout(kFollows, 3));
    CHECK(downstream.stdout_text() == printed + printed + printed);
  }
  SUBCASE("SIZE and BODY go on, as DebuggingServer offers both") {
    Outcome o = try_message(c, text, "SIZE=100 BODY=8BITMIME");
    CHECK(o.end == "250 OK");
    accepted += o.accepted();
    CHECK(downstream.wait_stdout(kEnd));
    CHECK(downstream.stdout_text() == std::string(kFollows) +
                                          "mail options: ['SIZE=100', 'BODY=8BITMIME']\n" +
                                          headers + "X-Peer: 127.0.0.1\n\n" + body + kEnd);
  }
  CHECK(c.command("QUIT") == "221 Bye");
  CHECK(downstream.stop().code == 0);
  CHECK(count(downstream.child.out.text(), kFollows) == static_cast<std::size_t>(accepted));
}

TEST_CASE("BODY=8BITMIME to an upstream without 8BITMIME (smtp-sink -8) gets 554") {
  SmtpSink sink({"-8"});
  auto proxy = start_proxy(sink.address());
  Client c = greeted_client(proxy);
  CHECK(c.command("MAIL FROM:<a@example.com> BODY=8BITMIME") == kNo8Bit);
  CHECK(c.command("RCPT TO:<b@example.com>") == "503 Error: need MAIL command");
  // A 7-bit message still goes through.
  Outcome o = try_message(c, "Subject: seven bits\n\nplain\n");
  CHECK(o.end == kSinkDataOk);
  CHECK(c.command("QUIT") == "221 Bye");
  REQUIRE(wait_until([&] { return sink.dump_count() == 1; }));
  CHECK(sink.messages() ==
        std::vector<std::string>{as_relayed("Subject: seven bits\n\nplain\n") + "\n"});
}

TEST_CASE("-u with PureProxy: SMTPUTF8 passes when the upstream offers it, else 553") {
  const std::string from = "j\xc3\xbcrgen@example.com";
  const std::string to = "b\xc3\xa9@example.com";
  const std::string text =
      "Subject: gr\xc3\xbc\xc3\x9f"
      "e\n\nUTF-8 all the way\n";
  SUBCASE("upstream: DebuggingServer -u") {
    auto downstream = start_debugging({"-u"});
    auto proxy = start_proxy(downstream.address(), {"-u"});
    auto c = proxy.connect();
    CHECK(greet(c).find("\n250-SMTPUTF8\n") != std::string::npos);
    Outcome o = try_message(c, text, "SMTPUTF8", from, to);
    CHECK(o.mail == "250 OK");
    CHECK(o.rcpt == "250 OK");
    CHECK(o.end == "250 OK");
    CHECK(c.command("QUIT") == "221 Bye");
    CHECK(downstream.wait_stdout(kEnd));
    CHECK(downstream.stdout_text() == std::string(kFollows) + "mail options: ['SMTPUTF8']\n" +
                                          "Subject: gr\xc3\xbc\xc3\x9f"
                                          "e\nX-Peer: 127.0.0.1\n"
                                          "X-Peer: 127.0.0.1\n\nUTF-8 all the way\n" +
                                          kEnd);
  }
  SUBCASE("upstream: DebuggingServer without -u") {
    auto downstream = start_debugging();
    auto proxy = start_proxy(downstream.address(), {"-u"});
    Client c = greeted_client(proxy);
    std::string ehlo = c.command("EHLO client.example");
    // Before the proxy has learned what the upstream offers its EHLO offers SMTPUTF8 (-u), and
    // the upstream's refusal is the reply; afterwards SMTPUTF8 is not offered, and not taken.
    bool is_offered = ehlo.find("\n250-SMTPUTF8\n") != std::string::npos;
    CHECK(c.command("MAIL FROM:<" + from + "> SMTPUTF8") ==
          (is_offered ? kNoUtf8 : "555 MAIL FROM parameters not recognized or not implemented"));
    CHECK(c.command("QUIT") == "221 Bye");
    CHECK(downstream.stop().code == 0);
    CHECK(downstream.child.out.text() == "");
  }
}

// ehlo_once_learned - the proxy's EHLO reply once it differs from its first one (the proxy
// learns what its upstream offers at start), or the first one after 5 s
inline std::string ehlo_once_learned(ServerProcess& proxy, const std::string& before) {
  std::string ehlo = before;
  Deadline deadline(kWait);
  while (ehlo == before && !deadline.expired()) {
    std::this_thread::sleep_for(milliseconds(50));
    auto c = proxy.connect();
    ehlo = greet(c);
  }
  return ehlo;
}

TEST_CASE("the proxy's EHLO offers 8BITMIME, SMTPUTF8 and SIZE only as far as its upstream does") {
  SUBCASE("smtp-sink -8 (no 8BITMIME), with -u: neither 8BITMIME nor SMTPUTF8") {
    SmtpSink sink({"-8"});
    auto proxy = start_proxy(sink.address(), {"-u"});
    auto c = proxy.connect();
    std::string first = greet(c);
    std::string ehlo =
        ehlo_once_learned(proxy, first.find("8BITMIME") == std::string::npos ? "" : first);
    CHECK(ehlo.find("8BITMIME") == std::string::npos);
    CHECK(ehlo.find("SMTPUTF8") == std::string::npos);
    CHECK(ehlo.find("\n250-SIZE 33554432\n") != std::string::npos);  // smtp-sink has no SIZE
  }
  SUBCASE("DebuggingServer -u -s 1000: its SIZE, 8BITMIME and SMTPUTF8") {
    auto downstream = start_debugging({"-u", "-s", "1000"});
    auto proxy = start_proxy(downstream.address(), {"-u"});
    auto c = proxy.connect();
    std::string first = greet(c);
    std::string ehlo =
        ehlo_once_learned(proxy, first.find("SIZE 1000\n") == std::string::npos ? first : "");
    CHECK(ehlo.find("\n250-SIZE 1000\n250-8BITMIME\n250-SMTPUTF8\n") != std::string::npos);
    CHECK(c.command("MAIL FROM:<a@example.com> SIZE=2000") ==
          "552 Error: message size exceeds fixed maximum message size");
  }
}

TEST_CASE("-d traces the upstream's QUIT and its reply") {
  SmtpSink sink;
  auto proxy = start_proxy(sink.address(), {"-d"});
  {
    auto c = proxy.connect();
    greet(c);
    CHECK(c.command("MAIL FROM:<a@example.com>") == kSinkMailOk);
    CHECK(c.command("QUIT") == "221 Bye");
  }
  CHECK(proxy.wait_stderr("upstream " + sink.address() + " <- QUIT\n"));
  CHECK(proxy.wait_stderr("upstream " + sink.address() + " -> 221 Bye\n"));
}

TEST_CASE("a proxy listening beyond loopback warns of an open relay; on 127.0.0.1 it does not") {
  IdlePort dead(IdlePort::Closed);
  std::string upstream = dead.address();
  SUBCASE("0.0.0.0:0") {
    ignore_sigpipe();
    auto proxy = ServerProcess::launch({"-n", "-c", "PureProxy", "0.0.0.0:0", upstream});
    CHECK(proxy.wait_stderr("open relay\n"));
    CHECK(proxy.stderr_text() ==
          proxy.listening_line() +
              "\nsmtpd: warning: PureProxy on 0.0.0.0:" + std::to_string(proxy.port()) +
              " relays mail from anyone who can connect: this can make "
              "an open relay\n");
  }
  SUBCASE("127.0.0.1:0") {
    auto proxy = start_proxy(upstream);
    Client c = greeted_client(proxy);
    CHECK(c.command("QUIT") == "221 Bye");
    CHECK(proxy.stop().code == 0);
    CHECK(proxy.child.err.text() == proxy.listening_line() + "\n");
  }
}

TEST_CASE("bad --reply-timeout and --connect-timeout values exit 2 with one line") {
  std::string option, value;
  SUBCASE("--reply-timeout 0") { option = "--reply-timeout", value = "0"; }
  SUBCASE("--reply-timeout -1") { option = "--reply-timeout", value = "-1"; }
  SUBCASE("--reply-timeout abc") { option = "--reply-timeout", value = "abc"; }
  SUBCASE("--reply-timeout 5s") { option = "--reply-timeout", value = "5s"; }
  SUBCASE("--reply-timeout ''") { option = "--reply-timeout", value = ""; }
  SUBCASE("--reply-timeout nan") { option = "--reply-timeout", value = "nan"; }
  SUBCASE("--reply-timeout 1e9") { option = "--reply-timeout", value = "1e9"; }
  SUBCASE("--connect-timeout 0") { option = "--connect-timeout", value = "0"; }
  SUBCASE("--connect-timeout x") { option = "--connect-timeout", value = "x"; }
  INFO("smtpd -n -c PureProxy " << option << " '" << value << "'");
  auto r = run_smtpd({"-n", "-c", "PureProxy", option, value, "127.0.0.1:0", "127.0.0.1:25"});
  check_one_error_line(r, kExitUsage);
  CHECK(r.err.find(option) != std::string::npos);
}

TEST_CASE("an upstream host that does not resolve exits 5 with one line") {
  // A resolver with no network may take a while to give up; still bounded.
  auto r = run_smtpd({"-n", "-c", "PureProxy", "127.0.0.1:0", "no-such-host.invalid:25"},
                     milliseconds(30000));
  check_one_error_line(r, kExitCannotListen);
  CHECK(r.err.find("no-such-host.invalid") != std::string::npos);
}

TEST_CASE("complete_settings names us, resolves the upstreams and seeds --reject, once at start") {
  Settings parsed = settings_of(
      {"-c", "MailmanProxy", "--reject", "rcpt:*=550", "127.0.0.1:0", "127.0.0.1:2525"});
  CHECK(parsed.upstream.addresses.empty());  // parsing looks nothing up
  CHECK(parsed.server.channel.refusals == nullptr);
  const Settings s = complete_settings(parsed);
  CHECK(!s.server.channel.fqdn.empty());
  CHECK(s.upstream.fqdn == s.server.channel.fqdn);
  CHECK(s.upstream.name == "127.0.0.1:2525");
  CHECK(!s.upstream.addresses.empty());
  CHECK(!s.upstream.trace);  // no -d
  CHECK(s.lmtp_upstream.name == "127.0.0.1:8024");
  CHECK(s.lmtp_upstream.role == "Mailman LMTP server");
  CHECK(s.lmtp_upstream.fqdn == s.server.channel.fqdn);
  CHECK(!s.lmtp_upstream.addresses.empty());
  CHECK(s.server.channel.refusals != nullptr);
  CHECK(s.reject_seed.has_value());  // drawn once, kept so that -d can print it
  CHECK(make_mode(s)->asks_envelope());

  Settings seeded =
      complete_settings(settings_of({"--reject", "rcpt:*=550", "--reject-seed", "7"}));
  CHECK(seeded.reject_seed == std::optional<std::uint64_t>(7));
  CHECK(seeded.server.channel.refusals != nullptr);
  Settings plain = complete_settings(settings_of({"-d", "127.0.0.1:0", "127.0.0.1:2525"}));
  CHECK(plain.server.channel.refusals == nullptr);
  CHECK(plain.upstream.addresses.empty());  // no relay: nothing to resolve
  CHECK_FALSE(make_mode(plain)->asks_envelope());
  Settings proxy =
      complete_settings(settings_of({"-d", "-c", "proxy", "127.0.0.1:0", "127.0.0.1:26"}));
  CHECK(proxy.upstream.name == "127.0.0.1:26");
  CHECK(proxy.upstream.trace);  // -d traces the upstream dialogue
  CHECK(proxy.lmtp_upstream.addresses.empty());
  CHECK(make_mode(proxy)->asks_envelope());
  CHECK_FALSE(complete_settings(settings_of({"-c", "sink"})).server.wrap_in_tls);
}

TEST_CASE("--help shows the two PureProxy timeouts with their defaults") {
  auto r = run_smtpd({"--help"});
  INFO(r.describe());
  CHECK(r.ok());
  std::string help;  // with each run of blanks and newlines as one space: cxxopts wraps lines
  for (char ch : r.out)
    if (!(std::isspace(static_cast<unsigned char>(ch)) && !help.empty() && help.back() == ' '))
      help += std::isspace(static_cast<unsigned char>(ch)) ? ' ' : ch;
  CHECK(help.find("--connect-timeout SECONDS PureProxy: seconds to wait for the upstream server "
                  "to accept the connection (default 30); MailmanProxy: the upstream and "
                  "Mailman.") != std::string::npos);
  CHECK(help.find("--reply-timeout SECONDS PureProxy: seconds to wait for each reply of the "
                  "upstream server (default 120); MailmanProxy: of the upstream and of "
                  "Mailman.") != std::string::npos);
}

TEST_SUITE_END();

}  // namespace proxy
}  // namespace smtpd_test
