#!/bin/sh
# ensure-tools.sh -- check that what the build and the tests need is here; on Debian, as
# root, install what is missing.
#
# usage: tests/ensure-tools.sh NEED...
#
#   NEED is KIND:NAME:DEBIAN_PACKAGE[:OTHER_NAME]
#     header  NAME is a header the C++ compiler must find (#include <NAME>), checked by
#             preprocessing it with $CXX $CPPFLAGS (default c++)
#     cmd     NAME is a command that must be on PATH, or in /usr/sbin, /usr/local/sbin or
#             /sbin (where Debian puts tools such as Postfix's smtp-sink, off a user's PATH)
#     perl    NAME is a Perl module that perl must load, written with - for ::
#             (IO-Socket-INET6 for IO::Socket::INET6, as CPAN names distributions)
#   OTHER_NAME is what the package is called elsewhere (Homebrew, vcpkg, ...), for the message.
#
#   e.g. tests/ensure-tools.sh header:cxxopts.hpp:libcxxopts-dev:cxxopts cmd:man:man-db
#
# If anything is missing, we are root, apt-get exists and SMTPD_NO_INSTALL is not 1, it runs
# `apt-get update` once and then one `apt-get install -y` for all missing packages. No service
# is started meanwhile (installing postfix for smtp-sink must not start a mail server) and no
# question is asked (see quiet_install). Whatever is still missing then gets one line each on
# stderr, e.g.
#   smtpd: missing cxxopts.hpp: install the package libcxxopts-dev (Debian) or cxxopts
# and the exit status is 1. Nothing is printed when all is present.

set -u

compiler=${CXX:-c++}

# have KIND NAME: true if the need is met.
have() {
    case $1 in
    header)
        # $compiler and $CPPFLAGS are word-split on purpose ("ccache g++", "-I/opt/include").
        # shellcheck disable=SC2086
        printf '#include <%s>\n' "$2" |
            $compiler ${CPPFLAGS:-} -std=c++17 -x c++ -E -o /dev/null - >/dev/null 2>&1 ;;
    cmd)
        command -v "$2" >/dev/null 2>&1 ||
            [ -x "/usr/sbin/$2" ] || [ -x "/usr/local/sbin/$2" ] || [ -x "/sbin/$2" ] ;;
    perl) perl -M"$(printf '%s' "$2" | sed 's/-/::/g')" -e 1 >/dev/null 2>&1 ;;
    file) [ -e "$2" ] ;;  # an absolute path (a package with no command, such as wine64)
    *)    echo "ensure-tools.sh: unknown kind '$1' (header, cmd, perl or file)" >&2; exit 2 ;;
    esac
}

# missing_needs NEED...: print the needs that are not met, one a line.
missing_needs() {
    for need in "$@"; do
        IFS=: read -r kind name pkg other <<EOF
$need
EOF
        if [ -z "$kind" ] || [ -z "$name" ] || [ -z "$pkg" ]; then
            echo "ensure-tools.sh: bad need '$need' (want KIND:NAME:PACKAGE[:OTHER])" >&2
            exit 2
        fi
        have "$kind" "$name" || echo "$need"
    done
}

# A header can only be looked for with a compiler; say so rather than blame the header.
for need in "$@"; do
    case $need in
    header:*)
        if ! command -v "${compiler%% *}" >/dev/null 2>&1; then
            echo "smtpd: missing C++ compiler '$compiler': install the package g++ or clang (Debian), or set CXX" >&2
            exit 1
        fi
        break ;;
    esac
done

# quiet_install PACKAGE...: apt-get install with no daemon started and no question asked.
# A policy-rc.d that exits 101 tells invoke-rc.d to start nothing while it is in place (a
# policy-rc.d already there is put back afterwards), and the debconf answer keeps postfix
# unconfigured, so it neither asks what kind of mail server this is nor runs as one.
quiet_install() {
    policy=/usr/sbin/policy-rc.d
    saved=
    if [ -e "$policy" ]; then
        saved=$policy.smtpd-saved
        mv "$policy" "$saved" || return 1
    fi
    # Restore on the way out, also when interrupted.
    trap 'rm -f "$policy"; [ -n "$saved" ] && mv "$saved" "$policy"' EXIT
    trap 'exit 130' INT TERM
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" || return 1
    if command -v debconf-set-selections >/dev/null 2>&1; then
        echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections
    fi
    apt-get update -q </dev/null >&2 && apt-get install -y -q "$@" </dev/null >&2
    status=$?
    rm -f "$policy"
    [ -n "$saved" ] && mv "$saved" "$policy"
    trap - EXIT INT TERM
    return $status
}

missing=$(missing_needs "$@") || exit 2
[ -z "$missing" ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && [ "${SMTPD_NO_INSTALL:-0}" != 1 ]; then
    pkgs=$(printf '%s\n' "$missing" | cut -d: -f3 | sort -u | tr '\n' ' ')
    echo "smtpd: installing $pkgs" >&2
    export DEBIAN_FRONTEND=noninteractive
    # A fresh Debian box may have empty package lists: update once, before the first install.
    # shellcheck disable=SC2086
    if quiet_install $pkgs; then
        missing=$(missing_needs "$@") || exit 2
        [ -z "$missing" ] && exit 0
    fi
fi

printf '%s\n' "$missing" | while IFS=: read -r kind name pkg other; do
    [ "$kind" = perl ] && name="Perl module $(printf '%s' "$name" | sed 's/-/::/g')"
    echo "smtpd: missing $name: install the package $pkg (Debian)${other:+ or $other}" >&2
done
exit 1
