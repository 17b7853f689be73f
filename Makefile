# Makefile -- build, test and install smtpd (GNU make).
#
#   make                build ./smtpd            (make CXX=clang++, make STATIC=1 for -static)
#   make TLS=1          build with STARTTLS and SMTPS (OpenSSL, Debian libssl-dev); with
#                       STATIC=1 OpenSSL is linked in too. make TLS=1 test adds the TLS tests.
#   make run            build, then run a DebuggingServer on localhost:8025
#   make test           build ./smtpd and tests/run_tests, run the suite and the man-page check;
#                       the last line is "N passed, M failed".  Doctest options go in TEST_ARGS:
#                       make test TEST_ARGS='-tc="*EHLO*" -s'
#   make test-asan      the same suite under AddressSanitizer + UBSan (smtpd-asan, run_tests_asan)
#   make fuzz           each fuzz/fuzz_*.cpp target under libFuzzer, FUZZ_SECONDS (60) each
#   make install        PREFIX=/usr/local, DESTDIR= : bin/smtpd, share/man/man1/smtpd.1
#   make uninstall
#   make deps           check for everything the build and tests need; on Debian, as root,
#                       apt-get installs what is missing (see tests/ensure-tools.sh)
#   make format-check   clang-format --dry-run over the sources; fails on any difference
#   make bench          the figures of README.md's Performance section, from one run of
#                       bench/report.py (a few minutes, loopback only); BENCH_ARGS for its options
#   make clean
#
# CPPFLAGS, CXXFLAGS, LDFLAGS and LDLIBS from the command line are added after ours.
# Changing CXX, STATIC or those flags rebuilds everything (the .build-flags stamp).

PREFIX  ?= /usr/local
BINDIR  ?= $(PREFIX)/bin
MANDIR  ?= $(PREFIX)/share/man
INSTALL ?= install

STD      := -std=c++17
WARNINGS := -Wall -Wextra -Wpedantic -Werror
SANITIZE = -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
            $(GCC_ASAN_QUIRK)
# GCC 12-14 with -fsanitize=address warn maybe-uninitialized inside <regex> (cxxopts uses it),
# a false positive (GCC bug 105616); clang rejects the option, so add it for GCC only.
GCC_ASAN_QUIRK = $(if $(shell $(CXX) -dM -E -x c++ /dev/null 2>/dev/null | grep __clang__),,\
                   -Wno-maybe-uninitialized)
STATIC_LDFLAGS := $(if $(filter 1 yes on true,$(STATIC)),-static)
# TLS=1: OpenSSL, asked for (and installed by deps) only in this build
TLS_ON       := $(filter 1 yes on true,$(TLS))
TLS_CPPFLAGS := $(if $(TLS_ON),-DSMTPD_TLS)
TLS_LDLIBS   := $(if $(TLS_ON),-lssl -lcrypto)

# iconv(3), for charsets the mail reader has no table for: in the C library on glibc, musl
# and the BSDs, in libiconv on macOS
ICONV_LDLIBS := $(if $(filter Darwin,$(shell uname -s 2>/dev/null)),-liconv)

SMTPD_CXXFLAGS := $(STD) -O2 $(WARNINGS) -pthread
TEST_CXXFLAGS  := $(STD) -g -O1 $(WARNINGS) -pthread

TEST_SOURCES := $(wildcard tests/*.cpp tests/*.hpp)

# What the build needs, and what the tests need on top (KIND:NAME:DEBIAN_PACKAGE[:OTHER_NAME]).
# man --warnings formats with groff-base's troff (man-db depends on it). smtp-sink, the
# PureProxy tests' upstream, comes with postfix (in /usr/sbin; ensure-tools.sh installs it
# without starting the Postfix daemon). The MailmanProxy tests start a throwaway Mailman 3
# (Debian's mailman3, installed the same way, its own daemon not started).
BUILD_NEEDS := header:cxxopts.hpp:libcxxopts-dev:cxxopts
TEST_NEEDS  := header:doctest/doctest.h:doctest-dev:doctest \
               cmd:python3:python3 cmd:pytest:python3-pytest cmd:curl:curl cmd:swaks:swaks \
               cmd:jq:jq \
               perl:IO-Socket-INET6:libio-socket-inet6-perl \
               cmd:man:man-db cmd:groff:groff-base cmd:smtp-sink:postfix \
               file:/usr/lib/mailman3/bin/master:mailman3
ifneq ($(TLS_ON),)
BUILD_NEEDS += header:openssl/ssl.h:libssl-dev:openssl
TEST_NEEDS  += cmd:openssl:openssl perl:Net-SSLeay:libnet-ssleay-perl
endif
NEEDS := $(BUILD_NEEDS)
ifneq ($(filter deps test test-asan tests/%,$(MAKECMDGOALS)),)
NEEDS += $(TEST_NEEDS)
endif

.PHONY: all deps run test test-asan fuzz windows format-check bench install uninstall clean FORCE
.DEFAULT_GOAL := all

all: smtpd

# One check (and at most one apt-get) per make run, before anything compiles.
deps:
	@CXX='$(CXX)' CPPFLAGS='$(CPPFLAGS)' sh tests/ensure-tools.sh $(NEEDS)

# Rebuild when the compiler or flags change, not only when sources do.
BUILD_ID := $(CXX) | $(STATIC_LDFLAGS) | $(TLS_CPPFLAGS) | $(CPPFLAGS) | $(CXXFLAGS) | $(LDFLAGS) | $(LDLIBS)
.build-flags: FORCE | deps
	@echo '$(BUILD_ID)' | cmp -s - $@ || echo '$(BUILD_ID)' > $@

smtpd: smtpd.cpp .build-flags | deps
	$(CXX) $(SMTPD_CXXFLAGS) $(TLS_CPPFLAGS) $(CPPFLAGS) $(CXXFLAGS) $(STATIC_LDFLAGS) $(LDFLAGS) \
	    smtpd.cpp -o $@ $(TLS_LDLIBS) $(ICONV_LDLIBS) $(LDLIBS)

smtpd-asan: smtpd.cpp .build-flags | deps
	$(CXX) $(TEST_CXXFLAGS) $(SANITIZE) $(TLS_CPPFLAGS) $(CPPFLAGS) $(CXXFLAGS) $(LDFLAGS) \
	    smtpd.cpp -o $@ $(TLS_LDLIBS) $(ICONV_LDLIBS) $(LDLIBS)

# One translation unit: tests/test_main.cpp includes ../smtpd.cpp and the test files.
tests/run_tests: smtpd.cpp $(TEST_SOURCES) .build-flags | deps
	$(CXX) $(TEST_CXXFLAGS) $(TLS_CPPFLAGS) $(CPPFLAGS) $(CXXFLAGS) $(LDFLAGS) \
	    tests/test_main.cpp -o $@ $(TLS_LDLIBS) $(ICONV_LDLIBS) $(LDLIBS)

tests/run_tests_asan: smtpd.cpp $(TEST_SOURCES) .build-flags | deps
	$(CXX) $(TEST_CXXFLAGS) $(SANITIZE) $(TLS_CPPFLAGS) $(CPPFLAGS) $(CXXFLAGS) $(LDFLAGS) \
	    tests/test_main.cpp -o $@ $(TLS_LDLIBS) $(ICONV_LDLIBS) $(LDLIBS)

run: smtpd
	./smtpd -n -c DebuggingServer localhost:8025

test: smtpd tests/run_tests
	SMTPD_BIN=./smtpd bash tests/run.sh tests/run_tests $(TEST_ARGS)

# -fno-sanitize-recover: any report makes the process exit non-zero, so in smtpd-asan it
# fails the test that started it instead of scrolling past.
test-asan: smtpd-asan tests/run_tests_asan
	ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 \
	    SMTPD_BIN=./smtpd-asan bash tests/run.sh tests/run_tests_asan $(TEST_ARGS)

install: smtpd
	$(INSTALL) -d '$(DESTDIR)$(BINDIR)' '$(DESTDIR)$(MANDIR)/man1'
	$(INSTALL) -m 755 smtpd '$(DESTDIR)$(BINDIR)/smtpd'
	$(INSTALL) -m 644 man/smtpd.1 '$(DESTDIR)$(MANDIR)/man1/smtpd.1'

uninstall:
	rm -f '$(DESTDIR)$(BINDIR)/smtpd' '$(DESTDIR)$(MANDIR)/man1/smtpd.1'

# windows: cross-build smtpd.exe and the channel tests with MinGW-w64 (static, so only system
# DLLs are needed), then run both under Wine: the doctest binary, and tests/windows-smoke.py
# against smtpd.exe over loopback. The Debian headers are copied to build-win/inc rather than
# put on the include path, where glibc's headers would shadow MinGW's.
WIN_CXX    ?= x86_64-w64-mingw32-g++-posix
WIN_FLAGS  := $(STD) -Wall -Wextra -Wpedantic -Werror -isystem build-win/inc
WIN_LINK   := -static -static-libgcc -static-libstdc++ -lws2_32
WIN_NEEDS  := header:cxxopts.hpp:libcxxopts-dev:cxxopts header:doctest/doctest.h:doctest-dev:doctest \
              cmd:$(WIN_CXX):g++-mingw-w64-x86-64-posix cmd:wine:wine \
              file:/usr/lib/wine/wine64:wine64 cmd:python3:python3
WINE_ENV   := WINEDEBUG=-all WINEARCH=win64 WINEPREFIX=$(CURDIR)/build-win/wineprefix

build-win/inc/cxxopts.hpp build-win/inc/doctest/doctest.h:
	@CXX='$(CXX)' sh tests/ensure-tools.sh $(WIN_NEEDS)
	mkdir -p build-win/inc/doctest
	cp "$$(printf '#include <cxxopts.hpp>\n' | $(CXX) -std=c++17 -x c++ -E -H - 2>&1 >/dev/null | sed -n 's/^\. //p' | head -n 1)" build-win/inc/
	cp "$$(printf '#include <doctest/doctest.h>\n' | $(CXX) -std=c++17 -x c++ -E -H - 2>&1 >/dev/null | sed -n 's/^\. //p' | head -n 1)" build-win/inc/doctest/

build-win/smtpd.exe: smtpd.cpp build-win/inc/cxxopts.hpp
	$(WIN_CXX) $(WIN_FLAGS) -O2 smtpd.cpp -o $@ $(WIN_LINK)

build-win/run_tests.exe: smtpd.cpp tests/windows_main.cpp tests/test_channel.cpp tests/test_support.hpp \
                         build-win/inc/doctest/doctest.h
	$(WIN_CXX) $(WIN_FLAGS) -O1 tests/windows_main.cpp -o $@ $(WIN_LINK)

windows: build-win/smtpd.exe build-win/run_tests.exe
	@imports=$$(x86_64-w64-mingw32-objdump -p build-win/smtpd.exe | sed -n 's/.*DLL Name: //p' | sort -u | tr '\n' ' '); \
	echo "smtpd.exe imports: $$imports"; \
	for dll in $$imports; do case $$dll in KERNEL32.dll|msvcrt.dll|WS2_32.dll|ADVAPI32.dll|USER32.dll) ;; \
	    *) echo "smtpd.exe needs a DLL a plain Windows lacks: $$dll"; exit 1 ;; esac; done
	$(WINE_ENV) timeout 180 sh -c 'wineboot -i && wineserver -w' >/dev/null 2>&1 || true
	$(WINE_ENV) timeout 300 wine build-win/run_tests.exe </dev/null 2>&1 | tr -d '\r' | tee build-win/run_tests.log
	grep -q '^\[doctest\] Status: SUCCESS!' build-win/run_tests.log
	$(WINE_ENV) timeout 300 python3 tests/windows-smoke.py wine build-win/smtpd.exe
	$(WINE_ENV) wineserver -k 2>/dev/null || true

# fuzz: every fuzz/fuzz_*.cpp target under libFuzzer (clang, libclang-rt-14-dev on Debian),
# FUZZ_SECONDS each (FUZZ_SECONDS=600 for a long run), from the seeds in fuzz/seeds/TARGET;
# the channel, the address parser, the proxy's client side (the upstream's replies) and the
# mail reader (MIME).
# A crash or broken invariant stops a target with a non-zero status, and make fuzz fails.
FUZZ_SECONDS ?= 60
FUZZ_CXX ?= clang++
FUZZ_TARGETS := $(patsubst %.cpp,%,$(wildcard fuzz/fuzz_*.cpp))
fuzz/fuzz_%: fuzz/fuzz_%.cpp smtpd.cpp | deps
	$(FUZZ_CXX) $(STD) -g -O1 -fsanitize=fuzzer,address,undefined $(CPPFLAGS) $< -o $@ $(ICONV_LDLIBS)

fuzz: $(FUZZ_TARGETS)
	@status=0; for target in $(FUZZ_TARGETS); do \
	    corpus=$$(mktemp -d) && cp fuzz/seeds/$$(basename $$target)/* "$$corpus"/ && \
	    echo "== $$target ($(FUZZ_SECONDS) s)" && \
	    ./$$target -max_total_time=$(FUZZ_SECONDS) -max_len=4096 -print_final_stats=1 \
	        "$$corpus" > "$$corpus.log" 2>&1 || status=1; \
	    tail -n 12 "$$corpus.log"; rm -rf "$$corpus" "$$corpus.log"; \
	done; exit $$status

# format-check: the layout .clang-format describes, checked rather than applied
FORMAT_SOURCES := smtpd.cpp $(wildcard tests/*.cpp tests/*.hpp fuzz/*.cpp)
format-check:
	@CXX='$(CXX)' sh tests/ensure-tools.sh cmd:clang-format:clang-format
	clang-format --dry-run --Werror $(FORMAT_SOURCES)

# bench: throughput, CPU per message and memory per idle client of smtpd's modes against
# Postfix's smtp-sink, measured in the same run (bench/report.py); each load is bounded by a
# timeout, the whole by 15 minutes; then the memory one 100 MB message costs in each mode
# (bench/message-memory.py, at most 10 minutes). Not in CI: numbers from a busy machine
# say little.
bench: smtpd
	@CXX='$(CXX)' sh tests/ensure-tools.sh cmd:smtp-sink:postfix cmd:python3:python3
	timeout 900 python3 bench/report.py $(BENCH_ARGS)
	timeout 600 python3 bench/message-memory.py

clean:
	rm -f smtpd smtpd-asan tests/run_tests tests/run_tests_asan .build-flags $(FUZZ_TARGETS)
	rm -rf build build-win
