// test_reply_parser.cpp - ReplyParser, the upstream's replies read from its bytes on their own
// (no socket, no loop): one line and several, whatever the pieces the bytes come in, CRLF and
// bare LF, bad codes and codes that change inside a reply, the bounds on a line and a reply,
// and reply_code, which the --exec command's first line is read with too.
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace reply_parser {

TEST_SUITE_BEGIN("reply-parser");

using Status = ReplyParser::Status;

// Parsed - what a parser made of some input: the replies in order, then how it stopped
struct Parsed {
  std::vector<UpstreamReply> replies;
  Status status = Status::NeedMore;
  std::string problem;
};

// parse - feed `input` whole, or in pieces of `piece` bytes, taking the replies after each
inline Parsed parse(std::string_view input, std::size_t piece = 0) {
  ReplyParser parser;
  Parsed p;
  std::size_t given = 0;
  do {
    std::size_t n = piece == 0 ? input.size() - given : std::min(piece, input.size() - given);
    parser.feed(input.substr(given, n));
    given += n;
    UpstreamReply reply;
    while ((p.status = parser.next(reply)) == Status::Reply) p.replies.push_back(reply);
  } while (p.status == Status::NeedMore && given < input.size());
  p.problem = parser.problem();
  return p;
}

// replies_of - the replies' codes and texts, for comparing a whole list at once
using Replies = std::vector<std::pair<int, std::string>>;
inline Replies replies_of(const Parsed& p) {
  Replies out;
  for (const UpstreamReply& reply : p.replies) out.emplace_back(reply.code, reply.text);
  return out;
}

TEST_CASE("ReplyParser: a one-line reply comes out with its code, and nothing more") {
  Parsed p = parse("250 2.1.0 Ok\r\n");
  CHECK(replies_of(p) == Replies{{250, "250 2.1.0 Ok"}});
  CHECK(p.status == Status::NeedMore);
  CHECK(p.problem == "");
  // a code with no text is a whole reply
  CHECK(replies_of(parse("354\r\n")) == Replies{{354, "354"}});
}

TEST_CASE("ReplyParser: a line without its end waits, and so does a multiline reply") {
  CHECK(parse("250 Ok").replies.empty());
  CHECK(parse("250 Ok\r").replies.empty());
  Parsed p = parse("250-up.example\r\n250-SIZE 1000\r\n");
  CHECK(p.replies.empty());
  CHECK(p.status == Status::NeedMore);
}

TEST_CASE("ReplyParser: a multiline reply is one reply, CRLF between its lines") {
  Parsed p = parse("250-up.example\r\n250-SIZE 1000\r\n250 8BITMIME\r\n");
  CHECK(replies_of(p) == Replies{{250, "250-up.example\r\n250-SIZE 1000\r\n250 8BITMIME"}});
  CHECK(p.status == Status::NeedMore);
  // "NNN" alone ends a multiline reply as "NNN text" does
  CHECK(replies_of(parse("250-a\r\n250\r\n")) == Replies{{250, "250-a\r\n250"}});
}

TEST_CASE("ReplyParser: several replies in one feed come out one at a time, in order") {
  std::string input = "220 up.example ESMTP\r\n250-up.example\r\n250 SIZE\r\n354 go\r\n";
  ReplyParser parser;
  parser.feed(input);
  UpstreamReply reply;
  REQUIRE(parser.next(reply) == Status::Reply);
  CHECK(reply.code == 220);
  CHECK(reply.text == "220 up.example ESMTP");
  REQUIRE(parser.next(reply) == Status::Reply);
  CHECK(reply.code == 250);
  CHECK(reply.text == "250-up.example\r\n250 SIZE");
  REQUIRE(parser.next(reply) == Status::Reply);
  CHECK(reply.code == 354);
  CHECK(reply.text == "354 go");
  CHECK(parser.next(reply) == Status::NeedMore);
  CHECK(reply.text == "354 go");  // untouched when there is none
}

TEST_CASE("ReplyParser: the same replies whatever the pieces the bytes come in") {
  std::string input =
      "220 up.example ESMTP\r\n250-up.example\r\n250-SIZE 1000\r\n250 8BITMIME\n"
      "250 2.1.0 Ok\r\n550-5.1.1 no\r\n550 5.1.1 such user\r\n354 go ahead\n";
  Replies expected{{220, "220 up.example ESMTP"},
                   {250, "250-up.example\r\n250-SIZE 1000\r\n250 8BITMIME"},
                   {250, "250 2.1.0 Ok"},
                   {550, "550-5.1.1 no\r\n550 5.1.1 such user"},
                   {354, "354 go ahead"}};
  for (std::size_t piece : {0, 1, 2, 3, 7, 22}) {
    CAPTURE(piece);
    Parsed p = parse(input, piece);
    CHECK(replies_of(p) == expected);
    CHECK(p.status == Status::NeedMore);
  }
}

TEST_CASE("ReplyParser: a line ends at LF, with or without CR; a CR elsewhere is malformed") {
  CHECK(replies_of(parse("220 hi\n250-a\r\n250 b\n")) ==
        Replies{{220, "220 hi"}, {250, "250-a\r\n250 b"}});
  Parsed inside = parse("250 a\rb\r\n");
  CHECK(inside.replies.empty());
  CHECK(inside.status == Status::Malformed);
  CHECK(inside.problem == "sent a malformed reply: 250 a\\x0db");
  // only one CR goes with the LF
  CHECK(parse("250 a\r\r\n").status == Status::Malformed);
  // a line of CR alone ends no line
  Parsed cr_only = parse("250 a\r250 b\r");
  CHECK(cr_only.replies.empty());
  CHECK(cr_only.status == Status::NeedMore);
  // a tab is text; other control characters are not
  CHECK(replies_of(parse("250 a\tb\r\n")) == Replies{{250, "250 a\tb"}});
  CHECK(parse(std::string("250 a\0b\r\n", 9)).status == Status::Malformed);
  CHECK(parse("250 a\x7f\r\n").status == Status::Malformed);
}

TEST_CASE("ReplyParser: a line without a reply code is malformed, and quoted in the problem") {
  for (const char* line : {"hello", "", "25", "25 x", "2x0 x", "000 none", "099 low", "600 high",
                           "250x", "250_x", " 250 x", "-250 x"}) {
    CAPTURE(line);
    Parsed p = parse(std::string(line) + "\r\n");
    CHECK(p.replies.empty());
    CHECK(p.status == Status::Malformed);
    CHECK(p.problem == "sent a malformed reply: " + printable(line));
  }
  for (const char* line : {"100 x", "199 x", "599 x", "421 bye", "500"}) {
    CAPTURE(line);
    CHECK(replies_of(parse(std::string(line) + "\r\n")) == Replies{{std::atoi(line), line}});
  }
  // the quote is cut at kQuotedLineLimit
  Parsed long_bad = parse(std::string(200, 'x') + "\r\n");
  CHECK(long_bad.problem == "sent a malformed reply: " + std::string(kQuotedLineLimit, 'x'));
}

TEST_CASE("ReplyParser: a code that changes inside a multiline reply is malformed") {
  Parsed p = parse("250-up.example\r\n251 other\r\n");
  CHECK(p.replies.empty());
  CHECK(p.status == Status::Malformed);
  CHECK(p.problem == "sent a malformed reply: 251 other");
  CHECK(parse("250-a\r\n125-b\r\n250 c\r\n").status == Status::Malformed);
  CHECK(parse("250-a\r\n350 c\r\n").status == Status::Malformed);
  // the same code again after the reply ended starts a new reply, as does another code
  CHECK(replies_of(parse("250-a\r\n250 b\r\n251 c\r\n")) ==
        Replies{{250, "250-a\r\n250 b"}, {251, "251 c"}});
}

TEST_CASE("ReplyParser: the replies before a bad line come out first; then it stays bad") {
  ReplyParser parser;
  parser.feed("250 first\r\nnonsense\r\n250 after\r\n");
  UpstreamReply reply;
  REQUIRE(parser.next(reply) == Status::Reply);
  CHECK(reply.text == "250 first");
  CHECK(parser.next(reply) == Status::Malformed);
  CHECK(parser.problem() == "sent a malformed reply: nonsense");
  parser.feed("250 more\r\n");
  CHECK(parser.next(reply) == Status::Malformed);
  CHECK(reply.text == "250 first");
  parser.clear();  // clear starts over
  CHECK(parser.problem() == "");
  CHECK(parser.next(reply) == Status::NeedMore);
  parser.feed("221 bye\r\n");
  REQUIRE(parser.next(reply) == Status::Reply);
  CHECK(reply.text == "221 bye");
}

TEST_CASE("ReplyParser: a line longer than kUpstreamReplyLimit bytes is too long") {
  std::string too_long =
      "sent a reply longer than " + std::to_string(kUpstreamReplyLimit) + " bytes";
  // still arriving: the bytes held count
  std::string open_line = "250 " + std::string(kUpstreamReplyLimit - 4, 'x');
  CHECK(parse(open_line).status == Status::NeedMore);
  CHECK(parse(open_line, 4096).status == Status::NeedMore);
  Parsed over = parse(open_line + "x", 4096);
  CHECK(over.status == Status::TooLong);
  CHECK(over.problem == too_long);
  // complete: the line itself counts, without its CRLF
  Parsed at_limit = parse(open_line + "\r\n");
  REQUIRE(at_limit.replies.size() == 1);
  CHECK(at_limit.replies[0].text.size() == kUpstreamReplyLimit);
  Parsed complete_over = parse(open_line + "x\r\n");
  CHECK(complete_over.replies.empty());
  CHECK(complete_over.status == Status::TooLong);
  CHECK(complete_over.problem == too_long);
}

TEST_CASE("ReplyParser: a reply longer than kUpstreamReplyLimit bytes or lines is too long") {
  std::string too_long =
      "sent a reply longer than " + std::to_string(kUpstreamReplyLimit) + " bytes";
  std::string line = "250-" + std::string(996, 'x') + "\r\n";  // 1000 bytes of text
  std::size_t fit = (kUpstreamReplyLimit + 2) / 1002;          // lines whose text fits
  std::string fits;
  for (std::size_t i = 1; i < fit; ++i) fits += line;
  Parsed p = parse(fits + "250 end\r\n");
  REQUIRE(p.replies.size() == 1);
  CHECK(p.replies[0].text.size() <= kUpstreamReplyLimit);
  for (std::size_t piece : {0, 1000, 16384}) {
    CAPTURE(piece);
    Parsed over = parse(fits + line + line + "250 end\r\n", piece);
    CHECK(over.replies.empty());
    CHECK(over.status == Status::TooLong);
    CHECK(over.problem == too_long);
  }
  // a multiline reply so far plus the line still arriving
  Parsed open = parse(fits + "250 " + std::string(2000, 'y'));
  CHECK(open.status == Status::TooLong);
  CHECK(open.problem == too_long);

  std::string lines;
  for (std::size_t i = 1; i < kUpstreamReplyLines; ++i) lines += "250-x\r\n";
  CHECK(parse(lines + "250 end\r\n").replies.size() == 1);  // kUpstreamReplyLines lines fit
  Parsed many = parse(lines + "250-x\r\n250 end\r\n");
  CHECK(many.replies.empty());
  CHECK(many.status == Status::TooLong);
  CHECK(many.problem ==
        "sent a reply of more than " + std::to_string(kUpstreamReplyLines) + " lines");
  // the count starts again with each reply
  CHECK(parse(lines + "250 end\r\n" + lines + "250 end\r\n").replies.size() == 2);
}

TEST_CASE("ReplyParser::take_line takes one line without its LF or CRLF") {
  std::string in = "a\r\nb\nc";
  CHECK(ReplyParser::take_line(in) == std::optional<std::string>("a"));
  CHECK(ReplyParser::take_line(in) == std::optional<std::string>("b"));
  CHECK(ReplyParser::take_line(in) == std::nullopt);
  CHECK(in == "c");
}

TEST_CASE("reply_code: three digits, the first 1 to 5, then the end, a space or a hyphen") {
  CHECK(reply_code("250 Ok") == 250);
  CHECK(reply_code("250-more") == 250);
  CHECK(reply_code("554") == 554);
  CHECK(reply_code("199 x") == 199);
  CHECK(reply_code("599 x") == 599);
  for (const char* line : {"", "25", "000 x", "099", "600 x", "abc", "250x", "250\t", " 250"}) {
    CAPTURE(line);
    CHECK(reply_code(line) == 0);
  }
}

TEST_SUITE_END();

}  // namespace reply_parser
}  // namespace smtpd_test
