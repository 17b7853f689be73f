// windows_main.cpp - the one translation unit of the Windows test binary (make windows).
//
// The channel, the address parser and the other pure parts are tested here as on Linux; the
// end-to-end tests start processes with POSIX calls, so for Windows tests/windows-smoke.py
// drives the real smtpd.exe over loopback sockets instead.
#define SMTPD_NO_MAIN
#define DOCTEST_CONFIG_IMPLEMENT_WITH_MAIN
#include <doctest/doctest.h>

#include "../smtpd.cpp"
#include "test_channel.cpp"
