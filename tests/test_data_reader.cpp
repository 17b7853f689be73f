// test_data_reader.cpp - DataReader, the message text after DATA's 354, on its own: the end
// of data, dot-unstuffing, sizes as smtpd.py counts them, the size limit, and bytes that come
// split at every place.
#include <doctest/doctest.h>

#include "test_support.hpp"

namespace smtpd_test {
namespace data_reader {

TEST_SUITE_BEGIN("data-reader");

// Read - what a reader made of some input, fed whole or in pieces of `piece` bytes
struct Read {
  bool is_ended = false;
  std::size_t used = 0;    // bytes of the input the reader took, the end line included
  std::string text;        // take_text()
  std::uint64_t size = 0;  // size() at the end
  bool is_too_big = false;
};

// read - feed `input` as a channel does: unused bytes stay and come again with the next piece
inline Read read(std::string_view input, std::size_t piece = 0, std::uint64_t limit = 0,
                 bool keeps_text = true) {
  DataReader reader(limit, keeps_text);
  Read r;
  std::string pending;
  std::size_t given = 0;
  while (!r.is_ended && given < input.size()) {
    std::size_t n = piece == 0 ? input.size() - given : std::min(piece, input.size() - given);
    pending.append(input.substr(given, n));
    given += n;
    std::size_t used = reader.take(pending, r.is_ended);
    pending.erase(0, used);
  }
  r.used = given - pending.size();
  r.size = reader.size();
  r.is_too_big = reader.is_too_big();
  r.text = reader.take_text();
  return r;
}

TEST_CASE("DataReader: the line \".\" ends the message; the text has \\n line ends") {
  Read r = read("Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n");
  CHECK(r.is_ended);
  CHECK(r.used == std::string("Subject: hi\r\n\r\nbody\r\n.\r\n").size());  // QUIT is left
  CHECK(r.text == "Subject: hi\n\nbody");
  CHECK(r.size == std::string("Subject: hi\r\n\r\nbody").size());
}

TEST_CASE("DataReader: a leading dot is taken off, and counts in the size as smtpd.py counts") {
  Read r = read("..hidden\r\n...\r\n.x\r\n.\r\n");
  CHECK(r.is_ended);
  CHECK(r.text == ".hidden\n..\nx");
  // smtpd.py's num_bytes counts the line as sent, the stuffed dot included
  CHECK(r.size == std::string("..hidden\r\n...\r\n.x").size());
}

TEST_CASE("DataReader: an empty message, and a \".\" right after 354") {
  Read r = read(".\r\n");
  CHECK(r.is_ended);
  CHECK(r.text.empty());
  CHECK(r.size == 0);
  Read blank = read("\r\n.\r\n");
  CHECK(blank.is_ended);
  CHECK(blank.text.empty());  // one empty line: its "\n" is the one before the dot
}

TEST_CASE("DataReader: \".\" inside a line, a bare LF or a bare CR does not end the message") {
  CHECK_FALSE(read("a\n.\nb\r\n").is_ended);
  CHECK_FALSE(read("a\r.\rb\r\n").is_ended);
  CHECK_FALSE(read("a.\r\n. \r\n").is_ended);
  Read r = read("a\n.\nb\r\n.\r\n");
  CHECK(r.is_ended);
  CHECK(r.text == "a\n.\nb");  // bare line ends are kept as they came
}

TEST_CASE("DataReader: the same result whatever the pieces the bytes come in") {
  std::string input = "From: a@b\r\n\r\n..one\r\n\r\n.\r.\n.two\r\nend\r\n.\r\nNOOP\r\n";
  Read whole = read(input);
  REQUIRE(whole.is_ended);
  for (std::size_t piece = 1; piece <= 9; ++piece) {
    CAPTURE(piece);
    Read r = read(input, piece);
    CHECK(r.is_ended);
    CHECK(r.used == whole.used);
    CHECK(r.text == whole.text);
    CHECK(r.size == whole.size);
  }
}

TEST_CASE("DataReader: what might begin the end line or a CRLF waits for more bytes") {
  DataReader reader(0, true);
  bool is_ended = false;
  CHECK(reader.take("line\r", is_ended) == 4);  // the CR may be half of a CRLF
  CHECK(reader.take("\r\n.", is_ended) == 2);   // "." may be the end line
  CHECK(reader.take(".\r", is_ended) == 0);
  CHECK_FALSE(is_ended);
  CHECK(reader.take(".\r\n", is_ended) == 3);
  CHECK(is_ended);
  CHECK(reader.take_text() == "line");
}

TEST_CASE("DataReader: past the limit bytes are counted, not kept, and is_too_big says so") {
  std::string line(100, 'x');
  std::string input;
  for (int i = 0; i < 10; ++i) input += line + "\r\n";
  std::uint64_t size = input.size() - 2;  // 1018
  Read fits = read(input + ".\r\n", 0, size);
  CHECK_FALSE(fits.is_too_big);
  CHECK(fits.size == size);
  CHECK(fits.text.size() == size - 9);  // CRLF stored as "\n"
  Read over = read(input + ".\r\n", 7, size - 1);
  CHECK(over.is_ended);
  CHECK(over.is_too_big);
  CHECK(over.size == size);
  CHECK(over.text.empty());
}

TEST_CASE("DataReader: a reader that keeps no text only counts; reset starts over") {
  Read r = read("some text\r\n.\r\n", 0, 0, false);
  CHECK(r.is_ended);
  CHECK(r.size == 9);
  CHECK(r.text.empty());
  DataReader reader(0, true);
  bool is_ended = false;
  reader.take("half a mess", is_ended);
  reader.reset();
  CHECK(reader.size() == 0);
  CHECK(reader.take(".\r\n", is_ended) == 3);  // at a line start again
  CHECK(is_ended);
}

TEST_SUITE_END();

}  // namespace data_reader
}  // namespace smtpd_test
