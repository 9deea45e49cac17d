#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server for the test suite (the shared-job-store tests) and
# prints the line that points the tests at it:
#
#   eval "$(scripts/test-postgres.sh)"     # exports DSPO_TEST_POSTGRES_URL
#
# The cluster lives under ${PGTEST_DIR:-/tmp/dspo-pgtest}, listens on 127.0.0.1:${PGTEST_PORT:-55432}
# with trust authentication, and is reused if it is already running. Needs Debian's
# postgresql package (initdb and pg_ctl); as root it runs the server as the postgres user,
# which PostgreSQL requires.
set -euo pipefail
DIR=${PGTEST_DIR:-/tmp/dspo-pgtest}
PORT=${PGTEST_PORT:-55432}
BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
[ -n "$BIN" ] || BIN=$(dirname "$(command -v initdb)")
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
if ! as_pg "$BIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; then
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres: "$DIR"
  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    as_pg "$BIN/initdb" -D "$DIR/data" -U postgres --auth=trust -E UTF8 >"$DIR/initdb.log" 2>&1
  fi
  as_pg "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
    -o "-p $PORT -k $DIR -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off" start >/dev/null
fi
echo "export DSPO_TEST_POSTGRES_URL=postgres://postgres@127.0.0.1:$PORT/postgres"
