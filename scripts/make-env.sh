#!/bin/sh
# Write the secrets docker-compose.yml needs into .env, once. Run it before the first `docker compose up`.
#   scripts/make-env.sh [FILE]     (default: .env next to docker-compose.yml)
# A value already in FILE is never changed: Label Studio takes LABEL_STUDIO_USER_TOKEN and PostgreSQL takes
# LS_DB_PASSWORD only when their volumes are first created, so a new value later would lock the backend out.
# Missing names are appended with fresh random values; FILE is readable by its owner only (mode 600).
# An existing deployment without .env: write its current token and passwords into FILE first, then run this.
set -eu
FILE=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.env"}

random_hex() {  # $1 random bytes as hex
  od -An -N"$1" -tx1 /dev/urandom | tr -d ' \n'
}

umask 077
touch "$FILE"
chmod 600 "$FILE"
added=""
add() {  # add NAME VALUE, unless NAME is already set in FILE
  if ! grep -q "^$1=" "$FILE"; then
    # keep the file line-based even if its last line lacks a newline
    if [ -s "$FILE" ] && [ "$(tail -c1 "$FILE" | od -An -c | tr -d ' ')" != '\n' ]; then echo >> "$FILE"; fi
    echo "$1=$2" >> "$FILE"
    added="$added $1"
  fi
}

add LABEL_STUDIO_USERNAME admin@example.com
add LABEL_STUDIO_PASSWORD "$(random_hex 12)"
add LABEL_STUDIO_USER_TOKEN "$(random_hex 20)"  # 40 hex characters: Label Studio's legacy token length
add BASIC_AUTH_USER freeal
add BASIC_AUTH_PASS "$(random_hex 16)"
add LS_DB_PASSWORD "$(random_hex 16)"

if [ -n "$added" ]; then
  echo "$FILE: added$added (existing values kept)"
else
  echo "$FILE: complete, nothing changed"
fi
echo "Label Studio login: LABEL_STUDIO_USERNAME / LABEL_STUDIO_PASSWORD (in $FILE)"
echo "Connect Model URL: http://<BASIC_AUTH_USER>:<BASIC_AUTH_PASS>@freeal:9090 with the pair from $FILE" \
     "(in the URL: Label Studio's \"Use basic auth\" switch does not cover the webhook it adds for the model)"
