// test_main.cpp - the one translation unit of tests/run_tests.
//
// smtpd.cpp is included whole (its main left out by SMTPD_NO_MAIN), so every internal is
// reachable with no extra header; doctest supplies main. Build and run: make test.
#define SMTPD_NO_MAIN
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "../smtpd.cpp"

// test_support.hpp must follow test_channel.cpp, so the order is kept by hand.
// clang-format off
#include "test_channel.cpp"
#include "test_support.hpp"
#include "test_e2e.cpp"
#include "test_interop.cpp"
#include "test_outputs.cpp"
#include "test_proxy.cpp"
#include "test_exec.cpp"
#include "test_upstream.cpp"
#include "test_hostile.cpp"
#include "test_mailman.cpp"
#include "test_loop.cpp"
// clang-format on
