// fuzz_address.cpp - libFuzzer target for the address parser (section 5): arbitrary bytes as
// the argument of MAIL, RCPT or VRFY must never crash it, and what it accepts must be sane:
// the normalised address parses again (the relay sends it upstream as <address>), to itself.
//
//   make fuzz                 (runs every fuzz/fuzz_*.cpp target in turn)
#define SMTPD_NO_MAIN
#include "../smtpd.cpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::string_view arg(reinterpret_cast<const char*>(data), size);
  std::optional<ParsedAddress> parsed = parse_address(arg);
  if (!parsed) return 0;
  if (arg.empty() && !parsed->address.empty()) __builtin_trap();
  if (parsed->rest.size() > arg.size()) __builtin_trap();
  // What a channel would accept (valid UTF-8, as command lines must be, and no control
  // character, which could end a line at the upstream) and parses again inside <> must read back as
  // itself. Python's parser does not always read its own output again (""@x comes out as "@x", "a@"
  // followed by a Unicode space as "a@", "a@b." followed by U+0085 as "a@b.", and it refuses all
  // three in
  // <>); we follow Python there, and the upstream answers such an address for itself.
  if (parsed->address.empty() || parsed->address == "<>" || !is_valid_utf8(arg) ||
      has_control_character(arg, true) || has_control_character(parsed->address))
    return 0;
  std::optional<ParsedAddress> again = parse_address("<" + parsed->address + ">");
  if (again && (!again->rest.empty() || again->address != parsed->address)) __builtin_trap();
  return 0;
}
