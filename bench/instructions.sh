#!/usr/bin/env bash
# graywire benchmark: user-space instructions per transaction, graywire against PgBouncer, counted
# by valgrind's callgrind. Unlike CPU time on a shared machine, the count barely moves between
# runs, so it shows small changes to the proxy's own code. See bench/README.md.
#
#   bench/instructions.sh
#
# Environment: WORKLOADS CLIENTS TRANSACTIONS GRAYWIRE_BIN PGBOUNCER_BIN PG_BINDIR KEEP_TMP
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
    cat <<'EOF'
Usage: bench/instructions.sh [--help]

Starts a throwaway PostgreSQL, then graywire and PgBouncer one after the other under valgrind
--tool=callgrind, runs a fixed number of pgbench transactions through each, and prints the
user-space instructions each proxy executed per transaction (counters zeroed after a warm-up,
read after the run). Kernel time, the larger part of a proxy's CPU, is not counted: for that,
and for throughput, use bench/pgbench.sh.

Environment (defaults in brackets):
  WORKLOADS      space-separated subset of: select-simple select-extended select-prepared
                 tpcb churn
                 [select-simple churn]
  CLIENTS        pgbench clients [4]
  TRANSACTIONS   transactions per client (churn: connections per client) [500; churn 150]
  GRAYWIRE_BIN   graywire binary [cargo build --release -p graywire]
  PGBOUNCER_BIN  pgbouncer binary, or none to measure graywire only [pgbouncer on PATH;
                 none if missing]
  PG_BINDIR      PostgreSQL bin directory [pg_config --bindir, else newest /usr/lib/postgresql/*/bin]
  KEEP_TMP       1: keep the temporary directory (configs, logs, callgrind files) [0]
Needs valgrind (apt-get install valgrind).
EOF
}
for arg in "$@"; do
    case "$arg" in
        -h | --help) usage; exit 0 ;;
        *) echo "instructions.sh: unknown argument: $arg (try --help)" >&2; exit 64 ;;
    esac
done

die() { echo "instructions.sh: error: $*" >&2; exit 1; }
log() { echo "instructions.sh: $*" >&2; }

WORKLOADS=${WORKLOADS:-select-simple churn}
CLIENTS=${CLIENTS:-4}
KEEP_TMP=${KEEP_TMP:-0}
[[ $CLIENTS =~ ^[1-9][0-9]*$ ]] || die "CLIENTS must be a positive whole number, not '$CLIENTS'"
[[ -z ${TRANSACTIONS:-} || $TRANSACTIONS =~ ^[1-9][0-9]*$ ]] ||
    die "TRANSACTIONS must be a positive whole number, not '$TRANSACTIONS'"
for w in $WORKLOADS; do
    case "$w" in
        select-simple | select-extended | select-prepared | tpcb | churn) ;;
        *) die "unknown workload '$w' in WORKLOADS" ;;
    esac
done
if ! command -v valgrind >/dev/null || ! command -v callgrind_control >/dev/null; then
    die "valgrind is not installed (apt-get install valgrind)"
fi

if [[ -z ${PG_BINDIR:-} ]]; then
    if command -v pg_config >/dev/null && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        PG_BINDIR=$(pg_config --bindir)
    else
        PG_BINDIR=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    fi
fi
[[ -n $PG_BINDIR && -x $PG_BINDIR/initdb && -x $PG_BINDIR/pgbench ]] ||
    die "PostgreSQL server binaries not found (install postgresql, or set PG_BINDIR)"
PGBOUNCER_BIN=${PGBOUNCER_BIN:-$(command -v pgbouncer || echo none)}
if [[ $PGBOUNCER_BIN == none ]]; then
    log "no pgbouncer: only graywire is measured"
    PGBOUNCER_BIN=
elif [[ ! -x $PGBOUNCER_BIN ]]; then
    die "PGBOUNCER_BIN '$PGBOUNCER_BIN' is not an executable (or set PGBOUNCER_BIN=none)"
fi

if [[ -z ${GRAYWIRE_BIN:-} ]]; then
    log "building graywire (cargo build --release -p graywire)"
    (cd "$REPO_DIR" && cargo build --release -q -p graywire) || die "cargo build failed"
    GRAYWIRE_BIN=$REPO_DIR/target/release/graywire
fi
[[ -x $GRAYWIRE_BIN ]] || die "GRAYWIRE_BIN '$GRAYWIRE_BIN' is not an executable"

# PostgreSQL and PgBouncer refuse to run as root: run them as postgres then.
RUN_AS=()
if [[ $(id -u) == 0 ]]; then
    id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user to run PostgreSQL"
    RUN_AS=(runuser -u postgres --)
fi

TMP=$(mktemp -d /tmp/graywire-instructions.XXXXXX)
chmod 755 "$TMP"
[[ ${#RUN_AS[@]} -gt 0 ]] && chown postgres: "$TMP"
PG_STARTED=0
PROXY_PID=
VG_PID=
stop_proxy() {
    local p
    for p in $VG_PID $PROXY_PID; do kill "$p" 2>/dev/null || true; done
    [[ -z $PROXY_PID ]] || wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=
    VG_PID=
}
cleanup() {
    stop_proxy
    if [[ $PG_STARTED == 1 ]]; then
        "${RUN_AS[@]}" "$PG_BINDIR/pg_ctl" -D "$TMP/data" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [[ $KEEP_TMP == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
}
trap cleanup EXIT

# Loopback ports outside the kernel's ephemeral range (an outgoing connection's local port, or
# one in TIME_WAIT, would make a bind fail), not in /proc/net/tcp, not handed out before.
PORT_LO=20000
PORT_HI=60999
if read -r eph_lo eph_hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null; then
    if ((eph_lo > 12000)); then
        PORT_LO=10000; PORT_HI=$((eph_lo - 1))
    elif ((eph_hi < 63000)); then
        PORT_LO=$((eph_hi + 1)); PORT_HI=65000
    fi
fi
USED_PORTS=" "
free_port() {
    local p
    for _ in $(seq 500); do
        p=$((PORT_LO + (RANDOM * 32768 + RANDOM) % (PORT_HI - PORT_LO + 1)))
        [[ $USED_PORTS == *" $p "* ]] && continue
        grep -qs -- "$(printf ':%04X ' "$p")" /proc/net/tcp /proc/net/tcp6 && continue
        USED_PORTS+="$p "
        printf -v "$1" '%s' "$p"
        return 0
    done
    die "no free loopback port found"
}

free_port PG_PORT
log "PostgreSQL ($PG_BINDIR) on 127.0.0.1:$PG_PORT"
"${RUN_AS[@]}" "$PG_BINDIR/initdb" -D "$TMP/data" -U postgres --auth=trust >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
cat >>"$TMP/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP'
fsync = off                      # benchmark only: unsafe for real data
synchronous_commit = off
EOF
"${RUN_AS[@]}" "$PG_BINDIR/pg_ctl" -D "$TMP/data" -l "$TMP/postgres.log" -w -t 60 start >/dev/null ||
    { cat "$TMP/postgres.log" >&2; die "PostgreSQL did not start"; }
PG_STARTED=1
"$PG_BINDIR/pgbench" -i -q -s 1 -h 127.0.0.1 -p "$PG_PORT" -U postgres postgres >"$TMP/init.log" 2>&1 ||
    { cat "$TMP/init.log" >&2; die "pgbench -i failed"; }

free_port GW_PORT
free_port GW_ADMIN_PORT
cat >"$TMP/graywire.toml" <<EOF
[listener]
address = "127.0.0.1:$GW_PORT"

[admin]
address = "127.0.0.1:$GW_ADMIN_PORT"

[backend]
user = "postgres"
password = "unused: the bench node trusts loopback"

[pool]
mode = "session"
size = $((CLIENTS + 4))

[runtime]
worker_threads = 1

[[users]]
name = "postgres"
auth = "trust"

[[nodes]]
name = "pg1"
host = "127.0.0.1"
port = $PG_PORT
EOF
free_port PB_PORT
cat >"$TMP/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres user=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $PB_PORT
unix_socket_dir =
auth_type = trust
auth_file = $TMP/userlist.txt
pool_mode = session
default_pool_size = $((CLIENTS + 4))
logfile = $TMP/pgbouncer.log
log_connections = 0
log_disconnections = 0
ignore_startup_parameters = extra_float_digits
EOF
printf '"postgres" ""\n' >"$TMP/userlist.txt"
[[ ${#RUN_AS[@]} -gt 0 ]] && chown postgres: "$TMP/pgbouncer.ini" "$TMP/userlist.txt"

workload_args() {
    case "$1" in
        select-simple) echo "-S -M simple" ;;
        select-extended) echo "-S -M extended" ;;
        select-prepared) echo "-S -M prepared" ;;
        tpcb) echo "-M simple" ;;
        churn) echo "-S -C -M simple" ;;
    esac
}

# pgbench through a proxy on $1; prints transactions done.
run_pgbench() {
    local port=$1 count=$2 args
    read -r -a args <<<"$(workload_args "$WL")"
    "$PG_BINDIR/pgbench" "${args[@]}" -n -c "$CLIENTS" -j 1 -t "$count" \
        -h 127.0.0.1 -p "$port" -U postgres postgres >"$TMP/pgbench.out" 2>&1 ||
        { cat "$TMP/pgbench.out" >&2; die "pgbench through port $port failed"; }
    sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$TMP/pgbench.out"
}

# Starts a proxy under callgrind, warms it up, counts one run; sets RESULT to the instructions
# per transaction. Args: name port command...
measure() {
    local name=$1 port=$2 out=$TMP/callgrind.$1.$WL
    shift 2
    "${RUN_AS_PROXY[@]}" valgrind --tool=callgrind --callgrind-out-file="$out" "$@" \
        >"$TMP/$name.stdout" 2>&1 &
    PROXY_PID=$!
    local up=0
    for _ in $(seq 120); do
        if "$PG_BINDIR/psql" -X -h 127.0.0.1 -p "$port" -U postgres -Atc 'SELECT 1' postgres \
            >/dev/null 2>&1; then up=1; break; fi
        kill -0 "$PROXY_PID" 2>/dev/null || break
        sleep 1
    done
    [[ $up == 1 ]] || { tail -n 20 "$TMP/$name.stdout" >&2; die "$name did not start under valgrind"; }
    # The process callgrind runs in (the launcher may be runuser): the newest that matches.
    VG_PID=$(pgrep -f -- "--callgrind-out-file=$out" | sort -n | tail -n 1)
    [[ -n $VG_PID ]] || die "cannot find the valgrind process of $name"
    run_pgbench "$port" 20 >/dev/null
    "${RUN_AS_PROXY[@]}" callgrind_control -z "$VG_PID" >/dev/null 2>&1
    local finished
    finished=$(run_pgbench "$port" "$COUNT")
    "${RUN_AS_PROXY[@]}" callgrind_control -d "$VG_PID" >/dev/null 2>&1
    stop_proxy
    # The dump after zeroing is the newest part file: its total is the run's.
    local part ir
    part=$(ls -t "$out".* 2>/dev/null | head -n 1)
    [[ -n $part ]] || die "no callgrind dump for $name"
    ir=$(sed -n 's/^summary: \([0-9]*\)/\1/p' "$part" | head -n 1)
    [[ -n $ir && -n $finished && $finished -gt 0 ]] || die "could not read the count for $name"
    RESULT=$((ir / finished))
}

printf '\n%-16s %-12s %12s %16s\n' workload target transactions "instructions/tx"
for WL in $WORKLOADS; do
    if [[ $WL == churn ]]; then COUNT=${TRANSACTIONS:-150}; else COUNT=${TRANSACTIONS:-500}; fi
    RUN_AS_PROXY=()
    measure graywire "$GW_PORT" "$GRAYWIRE_BIN" run --config "$TMP/graywire.toml"
    gw=$RESULT
    printf '%-16s %-12s %12s %16s\n' "$WL" graywire "$((COUNT * CLIENTS))" "$gw"
    if [[ -n $PGBOUNCER_BIN ]]; then
        RUN_AS_PROXY=("${RUN_AS[@]}")
        measure pgbouncer "$PB_PORT" "$PGBOUNCER_BIN" "$TMP/pgbouncer.ini"
        pb=$RESULT
        printf '%-16s %-12s %12s %16s\n' "$WL" pgbouncer "$((COUNT * CLIENTS))" "$pb"
        awk -v g="$gw" -v p="$pb" -v w="$WL" \
            'BEGIN { printf "%-16s %-12s %12s %16.2f\n", w, "gw/pgbouncer", "", g / p }'
    fi
done
