#!/bin/sh
# Start smtpd on a free port, send three mails with curl, let smtpd exit by
# itself after the third, then check the Maildir.
set -eu
work=$(mktemp -d)
: >"$work/smtpd.err"          # there before smtpd's redirect, so sed can always read it

smtpd -n -c sink --maildir "$work/mail" --max-messages 3 --idle-exit 60 \
      127.0.0.1:0 2>"$work/smtpd.err" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT

port=
for _ in $(seq 50); do        # wait up to 5 s for "listening on 127.0.0.1:PORT"
    port=$(sed -n 's/^listening on .*:\([0-9]*\)$/\1/p' "$work/smtpd.err")
    [ -n "$port" ] && break
    sleep 0.1
done
[ -n "$port" ] || { cat "$work/smtpd.err" >&2; exit 1; }
echo "smtpd is listening on port $port"

for n in 1 2 3; do
    printf 'Subject: test %s\r\n\r\nMail number %s.\r\n' "$n" "$n" >"$work/msg.txt"
    curl -sS --url "smtp://127.0.0.1:$port" \
         --mail-from ci@example.org --mail-rcpt dev@example.org \
         --upload-file "$work/msg.txt"
done

status=0
wait "$pid" || status=$?      # smtpd exits by itself after the third mail
echo "smtpd exited with status $status"
[ "$status" -eq 0 ]

set -- "$work"/mail/new/*
echo "$# messages in the Maildir"
[ "$#" -eq 3 ]
grep -h '^Subject:' "$@" | sort
