#!/usr/bin/env bash
# Make sure what the test suite needs is installed and running, then write .cache/services.env.
# Never skips silently: if a service cannot be had, this fails with the reason.
#  - mosquitto: the binary (tests start their own brokers on free ports) and a broker on 127.0.0.1:1883.
#  - PostgreSQL: 127.0.0.1:5432 database `test` if it answers; otherwise our own instance under .cache/pg.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .cache
ENV_FILE=.cache/services.env
: > "$ENV_FILE.tmp"

apt_updated=0
apt_install() {
  if ! command -v apt-get >/dev/null; then
    echo "ensure_services: need Debian packages '$*' but apt-get is not available; install them and retry" >&2
    exit 1
  fi
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    apt_updated=1
  fi
  echo "ensure_services: installing $*" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# --- mosquitto ------------------------------------------------------------------------------------
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || apt_install mosquitto mosquitto-clients
MOSQUITTO_BIN=$(command -v mosquitto || echo /usr/sbin/mosquitto)
if ! port_open 127.0.0.1 1883; then
  echo "ensure_services: starting mosquitto on 127.0.0.1:1883" >&2
  if [ -f /etc/mosquitto/mosquitto.conf ]; then
    "$MOSQUITTO_BIN" -d -c /etc/mosquitto/mosquitto.conf
  else
    "$MOSQUITTO_BIN" -d -p 1883
  fi
  for _ in $(seq 50); do port_open 127.0.0.1 1883 && break; sleep 0.1; done
  port_open 127.0.0.1 1883 || { echo "ensure_services: mosquitto did not start" >&2; exit 1; }
fi
echo "NANOFLEET_TEST_MOSQUITTO_BIN=$MOSQUITTO_BIN" >> "$ENV_FILE.tmp"
echo "NANOFLEET_TEST_MQTT_URL=mqtt://127.0.0.1:1883" >> "$ENV_FILE.tmp"

# --- PostgreSQL -----------------------------------------------------------------------------------
pg_ok() { psql "$1" -tAc 'select 1' >/dev/null 2>&1; }
PG_URL_PSQL="postgresql://postgres@127.0.0.1:5432/test"
if command -v psql >/dev/null && pg_ok "$PG_URL_PSQL"; then
  PG_URL="postgresql+psycopg://postgres@127.0.0.1:5432/test"
elif command -v psql >/dev/null && pg_ok "postgresql://root@127.0.0.1:5432/test"; then
  PG_URL="postgresql+psycopg://root@127.0.0.1:5432/test"
else
  # Our own throw-away cluster, trust auth on a private port, owned by an unprivileged user.
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
  PGBIN=$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
  PGDATA="$PWD/.cache/pg"
  PGPORT=55432
  RUNAS=()
  if [ "$(id -u)" = 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    RUNAS=(runuser -u postgres --)
    chmod o+x "$PWD" "$PWD/.cache" 2>/dev/null || true
  fi
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"; [ "$(id -u)" = 0 ] && chown postgres "$PGDATA"
    "${RUNAS[@]}" "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth=trust >/dev/null
  fi
  if ! port_open 127.0.0.1 $PGPORT; then
    "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$PGDATA" -o "-p $PGPORT -k /tmp -c listen_addresses=127.0.0.1" \
      -l "$PGDATA/server.log" -w start >/dev/null
  fi
  "$PGBIN/psql" -h 127.0.0.1 -p $PGPORT -U postgres -tAc "select 1 from pg_database where datname='test'" \
    | grep -q 1 || "$PGBIN/psql" -h 127.0.0.1 -p $PGPORT -U postgres -c "create database test" >/dev/null
  PG_URL="postgresql+psycopg://postgres@127.0.0.1:$PGPORT/test"
fi
echo "NANOFLEET_TEST_PG_URL=$PG_URL" >> "$ENV_FILE.tmp"

# --- aarch64 emulation (target verification) -----------------------------------------------------
# debootstrap builds the Debian arm64 userland; the tests build the rest of ~/.cache/nanofleet/target on
# first use (aarch64 wheels from PyPI; Debian trixie's static qemu-user 10, fetched with apt-get, since
# this qemu-user-static 7.2 crashes onnxruntime 1.28+ and is only the fallback). docs/target-verification.md
command -v qemu-aarch64-static >/dev/null || apt_install qemu-user-static
command -v debootstrap >/dev/null || apt_install debootstrap

# --- nginx (tests/scale: bundles served from the blob store by a plain web server; each test starts its own) ---
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_install nginx

# --- chromium (dashboard browser tests; Playwright drives Debian's build, never a downloaded one) ---
[ -x /usr/bin/chromium ] || apt_install chromium

mv "$ENV_FILE.tmp" "$ENV_FILE"
echo "ensure_services: ok ($(tr '\n' ' ' < "$ENV_FILE"))" >&2
