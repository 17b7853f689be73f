// test_interop.cpp - real SMTP clients against the built smtpd binary.
//
// Python's smtplib, curl and swaks each send a message to smtpd on a loopback port; the
// test checks the client reports success (or the refusal we expect) and the message shows
// up on smtpd's stdout. A missing client program is a test FAILURE naming the Debian
// package to install, never a skip: these are the clients users will point at smtpd.
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace interop {

TEST_SUITE_BEGIN("interop");

// kSmtplibSend - python3 -c script; argv: port, mail options (comma-separated or ""),
// sender, message (UTF-8, "\n" line ends, sent with CRLF). os.fsencode gives back the
// argument bytes whatever the locale. Prints "sent" on success; an smtplib exception
// makes it exit 1 with a traceback.
constexpr const char* kSmtplibSend = R"PY(
import os, smtplib, sys
port = int(sys.argv[1])
options = [o for o in sys.argv[2].split(',') if o]
sender = os.fsencode(sys.argv[3]).decode('utf-8')
message = os.fsencode(sys.argv[4]).replace(b'\n', b'\r\n')
with smtplib.SMTP('127.0.0.1', port, timeout=10) as s:
    refused = s.sendmail(sender, ['b@example.com'], message, mail_options=options)
    assert not refused, refused
print('sent')
)PY";

// split_options - (stdout without its "mail options: ..." lines, those lines). Clients such
// as smtplib and curl add SIZE=<n> to MAIL whenever the server announces SIZE, so the
// options line depends on the exact byte count; tests check its parts instead.
inline std::pair<std::string, std::string> split_options(const std::string& out) {
  std::string rest, options;
  for (const auto& line : lines_of(out))
    (starts_with(line, "mail options: ") ? options : rest) += line + "\n";
  return {rest, options};
}

inline CommandResult smtplib_send(const std::string& python, int port, const std::string& options,
                                  const std::string& sender, const std::string& message) {
  return run_command({python, "-c", kSmtplibSend, std::to_string(port), options, sender, message});
}

TEST_CASE("Python smtplib sends a message that smtpd prints") {
  std::string python = require_tool("python3", "python3");
  auto srv = start_smtpd();
  const std::string message =
      "From: a@example.com\nTo: b@example.com\nSubject: from smtplib\n\n"
      "Hello from smtplib.\n.leading dot\n";
  auto r = smtplib_send(python, srv.port(), "", "a@example.com", message);
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(r.out == "sent\n");
  // smtplib dot-stuffs ".leading dot"; smtpd must print it unstuffed.
  CHECK(srv.wait_stdout(kEnd));
  auto [text, options] = split_options(srv.stdout_text());
  // smtplib announces the size of the message as sent (CRLF line ends, before stuffing).
  CHECK(options == "mail options: ['SIZE=" + std::to_string(crlf(message).size()) + "']\n");
  CHECK(text ==
        "---------- MESSAGE FOLLOWS ----------\n"
        "From: a@example.com\nTo: b@example.com\nSubject: from smtplib\n"
        "X-Peer: 127.0.0.1\n\nHello from smtplib.\n.leading dot\n"
        "------------ END MESSAGE ------------\n");
}

TEST_CASE("Python smtplib sends an 8BITMIME UTF-8 body") {
  std::string python = require_tool("python3", "python3");
  const std::string body =
      "Gr\xc3\xbc\xc3\x9f"
      "e aus K\xc3\xb6ln \xe2\x9c\x93";  // Grüße aus Köln ✓
  std::vector<std::string> flags;
  std::string mail_options, sender = "a@example.com", message, printed_part, options_end;
  SUBCASE("BODY=8BITMIME") {
    mail_options = "BODY=8BITMIME";
    message = "Subject: utf-8 body\nContent-Type: text/plain; charset=utf-8\n\n" + body + "\n";
    printed_part = "\n\n" + body + "\n------------ END MESSAGE";
    options_end = "', 'BODY=8BITMIME']\n";
  }
  SUBCASE("SMTPUTF8 with a UTF-8 sender, server started with -u") {
    flags = {"-u"};
    mail_options = "SMTPUTF8,BODY=8BITMIME";
    sender = "j\xc3\xb6rg@example.com";
    message = "Subject: " + body + "\n\n" + body + "\n";
    printed_part = "Subject: " + body + "\nX-Peer: 127.0.0.1\n\n" + body + "\n";
    options_end = "', 'SMTPUTF8', 'BODY=8BITMIME']\n";
  }
  auto srv = start_smtpd(flags);
  auto r = smtplib_send(python, srv.port(), mail_options, sender, message);
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(srv.wait_stdout(kEnd));
  const std::string& out = srv.stdout_text();
  auto options = split_options(out).second;
  CHECK(starts_with(options, "mail options: ['SIZE="));
  CHECK(options.find(options_end) != std::string::npos);
  CHECK(out.find(printed_part) != std::string::npos);
}

TEST_CASE("curl uploads a message that smtpd prints") {
  auto srv = start_smtpd();
  std::vector<std::string> extra;
  std::string file_text;
  SUBCASE("CRLF file") {
    file_text = "Subject: from curl\r\n\r\nHello from curl.\r\n.hidden dot\r\n";
  }
  SUBCASE("LF file with --crlf") {
    file_text = "Subject: from curl\n\nHello from curl.\n.hidden dot\n";
    extra = {"--crlf"};
  }
  TempFile file(file_text);
  auto r = curl_send("smtp://" + srv.address(), file.path(), extra);
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(srv.wait_stdout(kEnd));
  auto [text, options] = split_options(srv.stdout_text());
  // curl announces the size of the file (before any --crlf conversion) in MAIL.
  CHECK(options == "mail options: ['SIZE=" + std::to_string(file_text.size()) + "']\n");
  CHECK(text ==
        "---------- MESSAGE FOLLOWS ----------\n"
        "Subject: from curl\nX-Peer: 127.0.0.1\n\nHello from curl.\n.hidden dot\n"
        "------------ END MESSAGE ------------\n");
}

TEST_CASE("swaks sends a message that smtpd prints") {
  auto srv = start_smtpd();
  auto r = swaks(srv, {"--helo", "swaks.example", "--header", "Subject: from swaks", "--body",
                       "Hello from swaks."});
  INFO(r.describe());
  CHECK(r.ok());
  CHECK(r.out.find("<-  250 OK") != std::string::npos);
  CHECK(srv.wait_stdout(kEnd));
  const std::string& out = srv.stdout_text();
  CHECK(out.find("Subject: from swaks\n") != std::string::npos);
  CHECK(out.find("X-Peer: 127.0.0.1\n\nHello from swaks.\n") != std::string::npos);
  CHECK(count(out, "---------- MESSAGE FOLLOWS ----------\n") == 1);
}

TEST_CASE("swaks sending a large body to smtpd -s 100 is refused with 552") {
  auto srv = start_smtpd({"-s", "100"});
  std::string body;
  for (int i = 0; i < 10; ++i) body += "This line makes the message larger than 100 bytes.\n";
  auto r = swaks(srv, {"--body", body});
  INFO(r.describe());
  CHECK(r.status.exited);
  CHECK(r.status.code != 0);
  CHECK_FALSE(r.status.timed_out);
  CHECK(r.out.find("<** 552 Error: Too much mail data") != std::string::npos);
  CHECK(r.out.find("250-SIZE 100") != std::string::npos);
  srv.stop();
  CHECK(srv.child.out.text() == "");
}

TEST_SUITE_END();

}  // namespace interop
}  // namespace smtpd_test
