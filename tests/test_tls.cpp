// test_tls.cpp - STARTTLS and SMTPS (--tls, --tls-implicit, --tls-required, --tls-cert,
// --tls-key): the channel's part in both builds (it needs no OpenSSL), then, in a build with
// TLS (make TLS=1), end to end with swaks, curl and Python's smtplib and ssl; a build without
// TLS refuses the options.
//
// All cases are in the test suite "tls":   tests/run_tests -ts='tls'
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace tls {

TEST_SUITE_BEGIN("tls");

// ==== STARTTLS in the channel (both builds: the channel needs no OpenSSL) ====

inline ChannelConfig tls_config(bool required = false) {
  ChannelConfig config = auth_config();
  config.offer_starttls = true;
  config.records_tls = true;
  config.tls_required = required;
  return config;
}

TEST_CASE("STARTTLS answers 220, drops what was pipelined after it, and the session restarts") {
  Session s(tls_config());
  CHECK(s.send("EHLO c\r\n") ==
        "250-test.example\r\n250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n250-STARTTLS\r\n"
        "250 HELP\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("bob", "pw") + "\r\n").substr(0, 3) == "235");
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

TEST_CASE("--tls-required: MAIL and AUTH answer 530 before STARTTLS; AUTH is hidden") {
  Session s(tls_config(true));
  CHECK(s.send("EHLO c\r\n") == "250-test.example\r\n250-8BITMIME\r\n250-STARTTLS\r\n250 HELP\r\n");
  CHECK(s.send("MAIL FROM:<a@b>\r\n") == "530 5.7.0 Must issue a STARTTLS command first\r\n");
  CHECK(s.send("AUTH PLAIN " + auth_plain("bob", "pw") + "\r\n") ==
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

TEST_CASE("swaks logs in after STARTTLS (--tls) and talks SMTPS (--tlsc); --json has the TLS") {
  auto srv = start_smtpd({"-c", "sink", "--json", "--tls", "--auth"});
  auto r = swaks(srv, {"--tls", "--auth", "LOGIN", "--auth-user", "gina", "--auth-password", "pw"});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(r.out.find("<-  220 2.0.0 Ready to start TLS") != std::string::npos);
  CHECK(r.out.find("=== TLS started with cipher TLSv1.") != std::string::npos);
  CHECK(r.out.find("<~  235 2.7.0 Authentication successful") != std::string::npos);
  REQUIRE(srv.wait_stdout("\n"));
  CHECK(srv.stdout_text().find("\"auth_user\": \"gina\", \"tls\": \"TLSv1.3 TLS_") !=
        std::string::npos);
  auto smtps = start_smtpd({"-c", "sink", "--json", "--tls-implicit"});
  auto tlsc = swaks(smtps, {"--tlsc"});
  INFO(tlsc.describe());
  CHECK(tlsc.ok());
  CHECK(tlsc.out.find("<~  220 ") != std::string::npos);  // the greeting came through TLS
  REQUIRE(smtps.wait_stdout("\n"));
  CHECK(smtps.stdout_text().find("\"tls\": \"TLSv1.3 TLS_") != std::string::npos);
}

TEST_CASE("curl --ssl-reqd and smtps:// trust --tls-cert and --tls-key; a key as cert exits 1") {
  TempDir dir;
  auto made = run_command({require_tool("openssl", "openssl"), "req", "-x509", "-newkey", "ec",
                           "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj",
                           "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout",
                           dir / "key.pem", "-out", dir / "cert.pem"});
  INFO(made.describe());
  REQUIRE(made.ok());
  TempFile message("Subject: curl over TLS\r\n\r\nHello.\r\n");
  auto starttls = start_smtpd({"--tls-cert", dir / "cert.pem", "--tls-key", dir / "key.pem"});
  auto r = curl_send("smtp://" + starttls.address(), message.path(),
                     {"--ssl-reqd", "--cacert", dir / "cert.pem"});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(starttls.wait_stdout("X-Peer: 127.0.0.1\nX-TLS: TLSv1.3 TLS_"));
  auto implicit =
      start_smtpd({"--tls-implicit", "--tls-cert", dir / "cert.pem", "--tls-key", dir / "key.pem"});
  auto s =
      curl_send("smtps://" + implicit.address(), message.path(), {"--cacert", dir / "cert.pem"});
  INFO(s.describe());
  CHECK(s.ok());
  CHECK(implicit.wait_stdout("X-TLS: TLSv1.3"));
  auto bad = run_command({smtpd_bin(), "-n", "--tls-cert", dir / "key.pem", "--tls-key",
                          dir / "key.pem", "127.0.0.1:0"});
  CHECK(bad.status.code == kExitUsage);
  CHECK(starts_with(bad.err, "smtpd: cannot use --tls-cert " + dir / "key.pem" + ": "));
  CHECK(count(bad.err, "\n") == 1);
}

TEST_CASE("smtplib sends after starttls and login, or over SMTP_SSL; --tls-required wants TLS") {
  TempDir dir;
  auto srv =
      start_smtpd({"-c", "sink", "--tls-required", "--auth-required", "--maildir", dir / "md"});
  auto r = smtplib_tls(srv, "starttls", "hana");
  INFO(r.describe());
  CHECK(starts_with(r.out, "sent TLSv1."));
  auto files = list_dir(dir / "md/new");
  REQUIRE(files.size() == 1);
  std::string text = read_file(dir / "md/new/" + files[0]);
  CHECK(starts_with(text, stored_envelope("app@example.com", {"user@example.com"}) +
                              "X-Auth-User: hana\nX-TLS: TLSv1.3 TLS_"));
  auto refused = smtplib_tls(srv, "plain");
  CHECK(refused.out == "SMTPSenderRefused 530\n");
  auto smtps = start_smtpd({"-c", "sink", "--tls-implicit", "--auth"});
  auto ssl = smtplib_tls(smtps, "smtps", "ivan");
  INFO(ssl.describe());
  CHECK(starts_with(ssl.out, "sent TLSv1."));
}

TEST_CASE("--tls-required end to end: EHLO hides AUTH; AUTH and MAIL answer 530 before STARTTLS") {
  auto srv = start_smtpd({"--tls-required", "--auth"});
  Client c = srv.connect();
  read_greeting(c);
  std::string ehlo = c.command("EHLO client");
  CHECK(ehlo.find("250-STARTTLS") != std::string::npos);
  CHECK(ehlo.find("AUTH") == std::string::npos);
  CHECK(c.command("AUTH PLAIN " + auth_plain("mallory", "pw")) ==
        "530 5.7.0 Must issue a STARTTLS command first");
  CHECK(c.command("MAIL FROM:<a@example.com>") == "530 5.7.0 Must issue a STARTTLS command first");
}

TEST_CASE("PureProxy takes STARTTLS and AUTH from its client; the upstream sees neither") {
  auto upstream = start_smtpd({"-d"});
  auto proxy = start_proxy(upstream.address(), {"--tls", "--auth"});
  TempFile message("Subject: via the proxy\r\n\r\nHello.\r\n");
  auto r = curl_send("smtp://" + proxy.address(), message.path(),
                     {"--ssl-reqd", "-k", "--user", "kim:pw"});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(upstream.wait_stdout(kEnd));
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

TEST_CASE("over a socket, commands pipelined after STARTTLS are dropped, not run inside TLS") {
  auto srv = start_smtpd({"--tls"});
  auto r = run_command(
      {require_tool("python3", "python3"), "-c", kPipelinedStartTls, std::to_string(srv.port())});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(r.out ==
        "220\n220 2.0.0 Ready to start TLS\n503 Error: send HELO first\n250 HELP\n221 Bye\n");
}

// kTurnedAwayInTls - python3 -c script; argv: port. One SMTPS client stays; a second hears
// the --max-clients 421 inside TLS; 64 silent clients hold the handshakes a server gives the
// turned away, so one more is closed without a word, and a silent one is closed in time.
constexpr const char* kTurnedAwayInTls = R"PY(
import socket, ssl, sys, time
port = int(sys.argv[1])
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
def first_line():
    t = context.wrap_socket(socket.create_connection(('127.0.0.1', port), timeout=10))
    return t, t.makefile('rb').readline().decode().rstrip('\r\n')
kept, greeting = first_line()
print(greeting[:4])
refused, refusal = first_line()
print(refusal)
silent = [socket.create_connection(('127.0.0.1', port), timeout=30) for _ in range(64)]
# the server accepts in the order of arrival, so these 64 are in before the next one
extra = socket.create_connection(('127.0.0.1', port), timeout=5)
print('extra closed' if extra.recv(1) == b'' else 'extra answered')
start = time.monotonic()
print('silent closed' if silent[0].recv(1) == b'' else 'silent answered',
      'within 15 s' if time.monotonic() - start < 15 else 'late')
kept.sendall(b'QUIT\r\n')
print(kept.makefile('rb').readline().decode().rstrip('\r\n')[:4])
)PY";

TEST_CASE("--tls-implicit --max-clients 1: the client over the limit hears 421 inside TLS") {
  auto srv = start_smtpd({"--tls-implicit", "--max-clients", "1"});
  auto r = run_command(
      {require_tool("python3", "python3"), "-c", kTurnedAwayInTls, std::to_string(srv.port())});
  INFO(r.describe());
  CHECK(r.ok());
  auto lines = lines_of(r.out);
  REQUIRE(lines.size() == 5);
  CHECK(lines[0] == "220 ");
  CHECK(starts_with(lines[1], "421 "));
  CHECK(lines[1].find(" Error: too many connections; try again later") != std::string::npos);
  CHECK(lines[2] == "extra closed");
  CHECK(lines[3] == "silent closed within 15 s");
  CHECK(lines[4] == "221 ");
}
#else
TEST_CASE("a build without TLS answers a TLS option with one line and status 2") {
  for (const char* option : {"--tls", "--tls-implicit", "--tls-required"}) {
    auto r = run_command({smtpd_bin(), "-n", option, "127.0.0.1:0"});
    INFO(r.describe());
    CHECK(r.status.code == kExitUsage);
    CHECK(r.err ==
          "smtpd: this smtpd is built without TLS: rebuild it with make TLS=1 to use --tls\n");
  }
}
#endif

TEST_SUITE_END();

}  // namespace tls
}  // namespace smtpd_test
