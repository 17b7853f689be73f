// fuzz_upstream.cpp - libFuzzer target for the proxy's client side: arbitrary bytes as all
// that an upstream server ever says, read by ReplyParser (no socket, no loop), must never
// crash it, and every reply it gives must be fit to relay to our client: lines "NNN-text" and
// a last "NNN text" or "NNN", one code from 100 to 599, CRLF between them and no other control
// character but tab, within kUpstreamReplyLimit bytes and kUpstreamReplyLines lines. A bad
// reply is the end: the parser says why and says the same ever after.
//
// After the first byte comes what the upstream says. It is fed whole, then (unless the first
// byte is 0) in pieces of 1 to 64 bytes, their sizes drawn from the first byte; both give the
// same replies and the same end, but for one case: a line still arriving is too long as soon
// as it passes the bound (its CR counted too), before its end could show it malformed or,
// short of that one CR, within the bound. So where in pieces a reply is too long, the replies
// before it are the first of those fed whole.
//
//   make fuzz                 (runs every fuzz/fuzz_*.cpp target in turn)
#define SMTPD_NO_MAIN
#include "../smtpd.cpp"

namespace {

void fail(const char* why, const std::string& text) {
  std::fprintf(stderr, "%s: %s\n", why, python_repr(text).c_str());
  __builtin_trap();
}

// check_reply - one reply as UpstreamClient hands it on
void check_reply(const UpstreamReply& reply) {
  if (reply.code < 100 || reply.code > 599) fail("code out of range", reply.text);
  if (reply.text.size() > kUpstreamReplyLimit) fail("reply too long", reply.text);
  std::size_t start = 0, lines = 0;
  for (;;) {
    std::size_t end = reply.text.find("\r\n", start);
    std::string_view line(reply.text.data() + start,
                          (end == std::string::npos ? reply.text.size() : end) - start);
    ++lines;
    if (reply_code(line) != reply.code) fail("a line with another code", reply.text);
    if (has_control_character(line, true)) fail("a control character", reply.text);
    bool is_last = end == std::string::npos;
    bool is_continued = line.size() > 3 && line[3] == '-';
    if (is_continued == is_last) fail("a reply that ends in the wrong place", reply.text);
    if (is_last) break;
    start = end + 2;
  }
  if (lines > kUpstreamReplyLines) fail("too many lines", reply.text);
}

struct Parsed {
  std::vector<UpstreamReply> replies;
  ReplyParser::Status status = ReplyParser::Status::NeedMore;
  std::string problem;
};

// take - the replies the parser has now, each checked; false once one is bad
bool take(ReplyParser& parser, Parsed& p) {
  UpstreamReply reply;
  while ((p.status = parser.next(reply)) == ReplyParser::Status::Reply) {
    check_reply(reply);
    p.replies.push_back(reply);
  }
  return p.status == ReplyParser::Status::NeedMore;
}

// parse - feed `input` whole (seed 0) or in pieces of 1 to 64 bytes, their sizes drawn from
// `seed`, taking the replies after each; then check that a bad reply is bad for good
Parsed parse(std::string_view input, unsigned seed) {
  ReplyParser parser;
  Parsed p;
  std::minstd_rand sizes(seed);
  std::string_view rest = input;
  bool is_good = true;
  while (is_good && !rest.empty()) {
    std::size_t n = std::min<std::size_t>(seed == 0 ? rest.size() : 1 + sizes() % 64, rest.size());
    parser.feed(rest.substr(0, n));
    rest.remove_prefix(n);
    is_good = take(parser, p);
  }
  p.problem = parser.problem();
  if (is_good == !p.problem.empty()) fail("a problem without a bad reply, or none", p.problem);
  if (!is_good) {
    parser.feed("250 OK\r\n");
    UpstreamReply reply;
    if (parser.next(reply) != p.status || parser.problem() != p.problem)
      fail("a bad reply forgotten", p.problem);
  }
  return p;
}

bool same_replies(const std::vector<UpstreamReply>& a, const std::vector<UpstreamReply>& b,
                  std::size_t count) {
  for (std::size_t i = 0; i < count; ++i)
    if (a[i].code != b[i].code || a[i].text != b[i].text) return false;
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 1) return 0;
  std::string_view input(reinterpret_cast<const char*>(data) + 1, size - 1);
  Parsed whole = parse(input, 0);
  if (data[0] == 0) return 0;
  Parsed pieces = parse(input, data[0]);  // minstd_rand takes 1 to 255 as they are
  if (pieces.status == ReplyParser::Status::TooLong) {
    if (pieces.replies.size() > whole.replies.size() ||
        !same_replies(pieces.replies, whole.replies, pieces.replies.size()))
      fail("other replies in pieces", pieces.problem);
    return 0;
  }
  if (pieces.status != whole.status || pieces.problem != whole.problem ||
      pieces.replies.size() != whole.replies.size() ||
      !same_replies(pieces.replies, whole.replies, whole.replies.size()))
    fail("in pieces another end", pieces.problem + " / " + whole.problem);
  return 0;
}
