// fuzz_mime.cpp - libFuzzer target for the mail reader (section 10): arbitrary bytes as a
// stored message must never crash summarize_mail or make it loop, and what it gives must
// hold its promises: decoded fields are UTF-8, every part lies inside the message and within
// the caps, links are http or https URLs, and each link comes once.
//
//   make fuzz                 (clang++ -fsanitize=fuzzer,address,undefined; runs 60 s)
#define SMTPD_NO_MAIN
#include "../smtpd.cpp"

namespace {

void require(bool condition) {
  if (!condition) __builtin_trap();
}

void require_utf8(const std::optional<std::string>& text) {
  if (text) require(is_valid_utf8(*text));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  std::string_view data(reinterpret_cast<const char*>(bytes), size);
  MimeTree tree(data);
  require(!tree.parts().empty() && tree.parts().size() <= kMimePartLimit);
  for (const MimePart& part : tree.parts()) {
    require(part.body_begin <= part.body_end && part.body_end <= data.size());
    require(part.depth <= kMimeDepthLimit);
    require_utf8(part.filename);
    for (std::size_t child : part.children) require(tree.part(child).depth == part.depth + 1);
  }
  MailSummary mail = summarize_mail(data);
  for (const auto* field : {&mail.subject, &mail.from, &mail.to, &mail.cc, &mail.reply_to,
                            &mail.date, &mail.message_id})
    require_utf8(*field);
  for (const auto* body : {&mail.text, &mail.html})
    if (*body && (*body)->is_decoded) require(is_valid_utf8((*body)->text));
  for (const MailAttachment& attachment : mail.attachments) require_utf8(attachment.filename);
  std::unordered_set<std::string> seen;
  for (const std::string& link : mail.links) {
    require(is_http_at(link, 0) && is_valid_utf8(link));
    require(seen.insert(link).second);
  }
  return 0;
}
