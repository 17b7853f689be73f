// test_main.cpp - the one translation unit of tests/run_tests.
//
// smtpd.cpp is included whole (its main left out by SMTPD_NO_MAIN), so every internal is
// reachable with no extra header; doctest supplies main. Build and run: make test.
// Each test file includes what it needs and compiles right after smtpd.cpp, so the order
// below is only alphabetical.
#define SMTPD_NO_MAIN
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "../smtpd.cpp"
#include "test_auth.cpp"
#include "test_channel.cpp"
#include "test_chunking.cpp"
#include "test_compat.cpp"
#include "test_data_reader.cpp"
#include "test_e2e.cpp"
#include "test_exec.cpp"
#include "test_hostile.cpp"
#include "test_interop.cpp"
#include "test_listen.cpp"
#include "test_loop.cpp"
#include "test_mailman.cpp"
#include "test_message_text.cpp"
#include "test_mime.cpp"
#include "test_outputs.cpp"
#include "test_pipelining.cpp"
#include "test_proxy.cpp"
#include "test_refusals.cpp"
#include "test_reply_parser.cpp"
#include "test_status_codes.cpp"
#include "test_tls.cpp"
#include "test_upstream.cpp"
#include "test_wait.cpp"
