#!/usr/bin/env bash
# run.sh -- run the doctest suite, then the man-page check, and end with one plain line
#   N passed, M failed
# (doctest's test cases, plus one for the man page). Exit status 0 only if nothing failed.
#
# usage: tests/run.sh [TEST_BINARY [DOCTEST_OPTIONS...]]      (default tests/run_tests)
#
# Run from the project root (make test does). Environment:
#   SMTPD_BIN           the smtpd the end-to-end tests start (default ./smtpd)
#   SMTPD_TEST_TIMEOUT  seconds the test binary may run (default 900); on time-out its whole
#                       process group, servers it started included, is killed
#   SMTPD_MAN_PAGE      the page to check with `man --warnings` (default man/smtpd.1; empty: skip)

set -u

bin=${1:-tests/run_tests}
[ $# -gt 0 ] && shift
export SMTPD_BIN=${SMTPD_BIN:-./smtpd}
limit=${SMTPD_TEST_TIMEOUT:-900}
page=${SMTPD_MAN_PAGE-man/smtpd.1}

passed=0 failed=0 skipped=0
fail() { echo "FAILED: $*"; failed=$((failed + 1)); }

# ---- 1. the doctest binary ----
log=$(mktemp)
trap 'rm -f "$log"' EXIT
case $bin in */*) ;; *) bin=./$bin ;; esac
# timeout (without --foreground) kills the whole process group when time runs out.
timeout -k 10 "$limit" "$bin" --reporters=console "$@" </dev/null 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

summary=$(grep -a '^\[doctest\] test cases:' "$log" | tail -n 1)
re='test cases: *([0-9]+) *\| *([0-9]+) passed *\| *([0-9]+) failed *\|( *([0-9]+) skipped)?'
if [[ $summary =~ $re ]]; then
    passed=${BASH_REMATCH[2]} failed=${BASH_REMATCH[3]} skipped=${BASH_REMATCH[5]:-0}
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
        echo "note: $bin was stopped after ${limit}s (SMTPD_TEST_TIMEOUT)"
    fi
    if [ "${BASH_REMATCH[1]}" = 0 ]; then
        fail "$bin ran no test case"
    elif [ "$status" != 0 ] && [ "$failed" = 0 ]; then
        fail "$bin exited with status $status after its summary (sanitizer report at exit?)"
    fi
elif [ "$status" = 124 ] || [ "$status" = 137 ]; then
    fail "$bin timed out after ${limit}s"
else
    fail "$bin ended with status $status before printing its summary"
fi

# ---- 2. the man page: `man --warnings` must print nothing on stderr ----
if [ -n "$page" ]; then
    if [ ! -f "$page" ]; then
        fail "man page $page is missing"
    elif ! command -v man >/dev/null 2>&1; then
        fail "man page check: no man command (install man-db)"
    else
        warnings=$(MANWIDTH=80 man --warnings -l "$page" 2>&1 >/dev/null)
        mstatus=$?
        if [ "$mstatus" != 0 ] || [ -n "$warnings" ]; then
            printf '%s\n' "$warnings"
            fail "man --warnings -l $page (status $mstatus)"
        else
            echo "man page check: $page formats with no warnings"
            passed=$((passed + 1))
        fi
    fi
fi

if [ "$skipped" != 0 ]; then
    echo "$passed passed, $failed failed, $skipped skipped"
else
    echo "$passed passed, $failed failed"
fi
[ "$failed" = 0 ]
