// fuzz_channel.cpp - libFuzzer target for the SMTP channel: arbitrary bytes, split into
// arbitrary reads, with the mode answering every question, must never crash the channel,
// break its invariants (replies are whole CRLF lines, ASCII unless SMTPUTF8 is on), or let
// its buffers grow past their bounds.
//
//   make fuzz                 (clang++ -fsanitize=fuzzer,address,undefined; runs 60 s)
#define SMTPD_NO_MAIN
#include "../smtpd.cpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  ChannelConfig config;
  config.fqdn = "fuzz.example";
  config.data_size_limit = (data[0] & 1) ? 64 : 0;
  config.enable_smtputf8 = (data[0] & 2) != 0;
  config.ask_envelope = (data[0] & 4) != 0;
  config.offer_chunking = (data[0] & 8) != 0;  // BDAT: octets counted, not lines
  config.enhanced_status_codes = (data[0] & 16) != 0;
  std::size_t chunk = 1 + data[1] % 64;
  Channel channel(config, "192.0.2.1");
  std::string_view input(reinterpret_cast<const char*>(data) + 2, size - 2);
  int turn = 0;
  for (std::size_t at = 0; at < input.size(); at += chunk) {
    channel.feed(input.substr(at, chunk));
    while (channel.question() != Channel::Question::None) {
      if (channel.has_message()) {
        Envelope e = channel.take_message();
        if (config.data_size_limit != 0 && e.data.size() > config.data_size_limit) __builtin_trap();
        (void)format_debug_message(e);
      }
      ++turn;  // a refusal now and then, some with no text at all
      channel.answer(turn % 3 == 0 ? "451 later" : turn % 7 == 0 ? "550" : "");
    }
    const std::string& out = channel.output();
    if (!out.empty() && out.compare(out.size() - 2, 2, "\r\n") != 0) __builtin_trap();
    // Replies are ASCII unless SMTPUTF8 is on, and every CR and LF is part of a line end.
    for (std::size_t i = 0; i < out.size(); ++i) {
      unsigned char c = static_cast<unsigned char>(out[i]);
      if (c >= 0x80 && !config.enable_smtputf8) __builtin_trap();
      if (c == '\r' && (i + 1 == out.size() || out[i + 1] != '\n')) __builtin_trap();
      if (c == '\n' && (i == 0 || out[i - 1] != '\r')) __builtin_trap();
    }
    if (channel.unread_input().size() > kLongestCommand + 2 + chunk &&
        channel.smtp_state == Channel::State::Command)
      __builtin_trap();
    channel.consume_output(out.size());
    if (channel.is_closing()) break;
  }
  return 0;
}
