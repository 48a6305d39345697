#!/usr/bin/env bash
# graywire benchmark: pgbench against a throwaway PostgreSQL primary directly, through graywire
# and through PgBouncer, interleaved round by round. See bench/README.md.
#
#   bench/pgbench.sh            # full run (DURATION=15 ROUNDS=3)
#   bench/pgbench.sh --quick    # smoke run (DURATION=3 ROUNDS=1)
#
# Environment: DURATION ROUNDS CLIENTS JOBS SCALE WARMUP WORKLOADS RESULTS_DIR GRAYWIRE_BIN
#              GW_THREADS TX_TARGETS CONTROL ORDER SEED
#              PGBOUNCER_BIN PG_BINDIR CHURN_EXTRAS KEEP_TMP (see --help).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)

usage() {
    cat <<'EOF'
Usage: bench/pgbench.sh [--quick] [--help]
       bench/pgbench.sh --pool CSV...

Starts a throwaway PostgreSQL primary, graywire and PgBouncer on free loopback ports, runs
pgbench workloads against each (interleaved, in a new order every round), prints median TPS, the ratio to
direct and the proxies' CPU microseconds per transaction, and writes raw numbers as CSV.

Options:
  --quick        smoke run: DURATION=3 ROUNDS=1 WARMUP=1 (unless set in the environment)
  --pool CSV...  runs nothing: prints the paired table (graywire and the control against
                 PgBouncer, round by round, with intervals) pooled over the rounds of earlier
                 runs' CSV files
  -h, --help     this text

Environment (defaults in brackets):
  DURATION       seconds per pgbench run [15]
  ROUNDS         rounds per workload; each round runs every target once [3]
  CLIENTS        pgbench clients (-c) [16]
  JOBS           pgbench threads (-j) [2]
  SCALE          pgbench scale factor for -i [10]
  WARMUP         seconds of select-only warm-up per target before measuring, 0 to skip [5]
  WORKLOADS      space-separated subset of:
                 select-simple select-extended select-prepared tpcb churn  [all five]
  CHURN_EXTRAS   1: churn also runs direct-trust (no auth), graywire and PgBouncer in
                 transaction mode [1]
  TX_TARGETS     1: every workload also runs graywire and PgBouncer in transaction mode [0]
  CONTROL        1: every workload also runs a second PgBouncer, configured like the first
                 (target pgbouncer-b), and the report shows how often it comes out ahead of
                 the first: the share of graywire-against-PgBouncer comparisons that noise
                 alone can decide [0]
  ORDER          the order of the targets within a round: shuffle (a random permutation every
                 round, so no target always runs right after another) or rotate (the same
                 cycle, shifted by one each round) [shuffle]
  SEED           seed of the shuffle; the report prints it, so a run's order can be repeated
                 [from the clock]
  RESULTS_DIR    where the CSV and the report go [bench/results]
  GRAYWIRE_BIN   use this graywire binary instead of `cargo build --release -p graywire`
  GW_THREADS     graywire's runtime.worker_threads: 1 single-threaded like PgBouncer, 0 one
                 per core [1]
  PGBOUNCER_BIN  pgbouncer binary [pgbouncer on PATH; installed with apt-get if root]
  PG_BINDIR      PostgreSQL bin directory [pg_config --bindir, else newest /usr/lib/postgresql/*/bin]
  KEEP_TMP       1: keep the temporary directory (data dir, configs, logs) for inspection [0]
EOF
}

# paired_table: graywire against PgBouncer round by round. Runs of the same round are minutes
# apart at most, so their ratio cancels slow drift of the machine; the counts show how often
# graywire came out ahead, which medians over few rounds hide. Each median ratio comes with a
# distribution-free confidence interval (order statistics of the per-round ratios, binomial
# coverage of at least 90 %), and a verdict: "ahead" or "behind" when the whole interval is on
# one side of parity, "even" when it holds 1 (the difference is inside the run's noise).
# paired_table CSV...: several runs' files pool their rounds (each round is still paired
# within its own run); the control section appears when the files have pgbouncer-b rounds.
paired_table() {
    awk -F, -v wls="${WORKLOADS:-select-simple select-extended select-prepared tpcb churn}" '
        function sort(a, n,   i, j, v) { for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j >= 1 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v } }
        function median(a, n) { if (n == 0) return ""; sort(a, n); return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
        # ci_rank(k): the largest j with P(Binomial(k, 1/2) < j) <= 5 %, so that the j-th
        # smallest and j-th largest of k ratios bound their median with >= 90 % confidence;
        # 0 when k is too small for any interval (k < 5).
        function ci_rank(k,   j, c, p, cdf) {
            cdf = 0; p = 0.5 ^ k; c = 1
            for (j = 0; j < k; j++) {
                cdf += c * p
                if (cdf > 0.05) return j
                c = c * (k - j) / (j + 1)
            }
            return 0
        }
        # interval(a, k): "median [lo..hi]" of the k values in a (sorted by median()).
        function interval(a, k,   m, j) {
            m = median(a, k); j = ci_rank(k)
            if (j == 0) { LO = ""; HI = ""; return sprintf("%.3f", m) }
            LO = a[j]; HI = a[k + 1 - j]
            return sprintf("%.3f [%.3f..%.3f]", m, LO, HI)
        }
        # verdict(higher_is_better): where the last interval lies against parity.
        function verdict(up) {
            if (LO == "") return "n/a"
            if (LO + 0 > 1) return up ? "ahead" : "behind"
            if (HI + 0 < 1) return up ? "behind" : "ahead"
            return "even"
        }
        FNR > 1 && $10 == "ok" {
            r = FILENAME "#" $3
            if (!(r in seen)) { seen[r] = 1; rounds[++nr] = r }
            tps[$2, $5, r] = $11 + 0; cpu[$2, $5, r] = $18
            if ($5 == "pgbouncer-b") control = 1
        }
        function pair(w, g, p, label,   i, r, k, nc, wt, wc, rt, rc, ti, tv, ci, cv) {
            k = 0; wt = 0; wc = 0; nc = 0
            for (i = 1; i <= nr; i++) {
                r = rounds[i]
                if (!((w, g, r) in tps) || !((w, p, r) in tps) || tps[w, p, r] <= 0) continue
                rt[++k] = tps[w, g, r] / tps[w, p, r]
                if (tps[w, g, r] >= tps[w, p, r]) wt++
                if (cpu[w, g, r] != "" && cpu[w, p, r] + 0 > 0) {
                    rc[++nc] = cpu[w, g, r] / cpu[w, p, r]
                    if (cpu[w, g, r] + 0 <= cpu[w, p, r] + 0) wc++
                }
            }
            if (k == 0) return
            ti = interval(rt, k); tv = verdict(1)
            if (tv != "n/a") HAVE[label] = 1
            if (nc) { ci = interval(rc, nc); cv = verdict(0) } else { ci = "n/a"; cv = "n/a" }
            printf "  %-16s %6d %8s %8s   %-24s %-7s %-24s %s\n", label, k, wt "/" k, (nc ? wc "/" nc : "n/a"), ti, tv, ci, cv
            if (tv == "behind" || cv == "behind") BEHIND[label] = 1
        }
        function header(who) {
            printf "  %-16s %6s %8s %8s   %-24s %-7s %-24s %s\n", "workload", "rounds", "TPS >=", "CPU <=", who " TPS (90% CI)", "TPS", who " CPU (90% CI)", "CPU"
        }
        END {
            header("gw/pgb")
            nw = split(wls, w, " ")
            for (i = 1; i <= nw; i++) {
                pair(w[i], "graywire", "pgbouncer", w[i])
                pair(w[i], "graywire-tx", "pgbouncer-tx", "  (transaction)")
            }
            nb = 0; nh = 0
            for (i = 1; i <= nw; i++) { if (w[i] in BEHIND) nb++; if (w[i] in HAVE) nh++ }
            if (nh) printf "\n  graywire is behind PgBouncer beyond the noise of these rounds (TPS or CPU) on %d of %d workload(s) in session mode\n", nb, nh
            else printf "\n  no intervals: a workload needs at least 5 rounds for one\n"
            if (control) {
                delete BEHIND
                printf "\n  control: the second PgBouncer (pgbouncer-b) in place of graywire, against the first\n"
                header("b/pgb")
                for (i = 1; i <= nw; i++) pair(w[i], "pgbouncer-b", "pgbouncer", w[i])
            }
        }' "$@"
}

QUICK=0
if [[ ${1:-} == --pool ]]; then
    shift
    (($# > 0)) || { echo "pgbench.sh: --pool needs at least one CSV file" >&2; exit 64; }
    for f in "$@"; do
        [[ -r $f ]] || { echo "pgbench.sh: cannot read $f" >&2; exit 64; }
        head -n 1 "$f" | grep -q '^timestamp,workload,round,' ||
            { echo "pgbench.sh: $f is not a pgbench.sh CSV" >&2; exit 64; }
    done
    echo "== paired by round, pooled over $# run(s): graywire against PgBouncer in the same round =="
    paired_table "$@"
    exit 0
fi
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "pgbench.sh: unknown argument: $arg (try --help)" >&2; exit 64 ;;
    esac
done
if [[ $QUICK == 1 ]]; then
    DURATION=${DURATION:-3}
    ROUNDS=${ROUNDS:-1}
    WARMUP=${WARMUP:-1}
fi
DURATION=${DURATION:-15}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-16}
JOBS=${JOBS:-2}
SCALE=${SCALE:-10}
WARMUP=${WARMUP:-5}
WORKLOADS=${WORKLOADS:-select-simple select-extended select-prepared tpcb churn}
CHURN_EXTRAS=${CHURN_EXTRAS:-1}
TX_TARGETS=${TX_TARGETS:-0}
CONTROL=${CONTROL:-0}
RESULTS_DIR=${RESULTS_DIR:-$SCRIPT_DIR/results}
KEEP_TMP=${KEEP_TMP:-0}
ORDER=${ORDER:-shuffle}
SEED=${SEED:-$(($(date +%s) % 32768))}

die() { echo "pgbench.sh: error: $*" >&2; exit 1; }
log() { echo "pgbench.sh: $*" >&2; }

[[ $CONTROL == 0 || $CONTROL == 1 ]] || die "CONTROL must be 0 or 1, not '$CONTROL'"
[[ $ORDER == shuffle || $ORDER == rotate ]] || die "ORDER must be shuffle or rotate, not '$ORDER'"
[[ $SEED =~ ^[0-9]+$ ]] || die "SEED must be a whole number, not '$SEED'"
for v in DURATION ROUNDS CLIENTS JOBS SCALE WARMUP; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, not '${!v}'"
done
((DURATION > 0)) || die "DURATION must be at least 1"
((ROUNDS > 0)) || die "ROUNDS must be at least 1"
((CLIENTS > 0)) || die "CLIENTS must be at least 1"
((JOBS > 0 && JOBS <= CLIENTS)) || die "JOBS must be between 1 and CLIENTS"
((SCALE > 0)) || die "SCALE must be at least 1"
for w in $WORKLOADS; do
    case "$w" in
        select-simple | select-extended | select-prepared | tpcb | churn) ;;
        *) die "unknown workload '$w' in WORKLOADS" ;;
    esac
done

# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------
IS_ROOT=0
[[ $(id -u) == 0 ]] && IS_ROOT=1

if [[ -z ${PG_BINDIR:-} ]]; then
    if command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/postgres" ]]; then
        PG_BINDIR=$(pg_config --bindir)
    else
        PG_BINDIR=""
        while IFS= read -r d; do
            if [[ -x $d/postgres ]]; then PG_BINDIR=$d; fi
        done < <(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V)
    fi
fi
[[ -n $PG_BINDIR && -x $PG_BINDIR/postgres && -x $PG_BINDIR/initdb ]] ||
    die "no PostgreSQL server binaries found (PG_BINDIR='${PG_BINDIR}'; looked at PG_BINDIR, pg_config --bindir, /usr/lib/postgresql/*/bin); install them with: apt-get install -y postgresql-15"
for b in pgbench psql; do
    [[ -x $PG_BINDIR/$b ]] || die "$PG_BINDIR/$b is missing; install: apt-get install -y postgresql-15 postgresql-client-15"
done
PGBENCH=$PG_BINDIR/pgbench
PSQL=$PG_BINDIR/psql

if [[ -z ${PGBOUNCER_BIN:-} ]]; then
    if ! command -v pgbouncer >/dev/null 2>&1; then
        [[ $IS_ROOT == 1 ]] || die "pgbouncer is not installed; as root: apt-get install -y pgbouncer"
        log "installing pgbouncer (apt-get install -y pgbouncer)"
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y -q pgbouncer >&2; then
            if ! { apt-get update -q >&2 && apt-get install -y -q pgbouncer >&2; }; then
                die "apt-get install pgbouncer failed"
            fi
        fi
    fi
    PGBOUNCER_BIN=$(command -v pgbouncer || true)
    [[ -n $PGBOUNCER_BIN ]] || PGBOUNCER_BIN=/usr/sbin/pgbouncer
fi
[[ -x $PGBOUNCER_BIN ]] || die "pgbouncer binary '$PGBOUNCER_BIN' is not executable"

GW_THREADS=${GW_THREADS:-1}
[[ $GW_THREADS =~ ^[0-9]+$ ]] || die "GW_THREADS must be a whole number, got '$GW_THREADS'"
if [[ -z ${GRAYWIRE_BIN:-} ]]; then
    command -v cargo >/dev/null 2>&1 || die "cargo not found; build graywire or set GRAYWIRE_BIN"
    log "building graywire: cargo build --release -p graywire"
    (cd "$REPO_DIR" && cargo build --release -p graywire >&2) || die "cargo build --release -p graywire failed"
    GRAYWIRE_BIN=$REPO_DIR/target/release/graywire
fi
[[ -x $GRAYWIRE_BIN ]] || die "graywire binary '$GRAYWIRE_BIN' is not executable"

CLK_TCK=$(getconf CLK_TCK)
[[ $CLK_TCK =~ ^[0-9]+$ && $CLK_TCK -gt 0 ]] || die "getconf CLK_TCK gave '$CLK_TCK'"

# A prefix that runs a command as the PostgreSQL OS user when we are root (postgres and
# pgbouncer refuse root). setpriv execs the command, so $! of a backgrounded call is the server's
# own PID; the servers' pid files are read anyway, in case runuser (which forks) is used.
PG_OS_USER=postgres
PG_RUN=()
if [[ $IS_ROOT == 1 ]]; then
    if command -v setpriv >/dev/null 2>&1; then
        PG_RUN=(setpriv "--reuid=$PG_OS_USER" "--regid=$PG_OS_USER" --init-groups --)
    else
        PG_RUN=(runuser -u "$PG_OS_USER" --)
    fi
fi
as_pg() { "${PG_RUN[@]}" "$@"; }
if [[ $IS_ROOT == 1 ]]; then
    id "$PG_OS_USER" >/dev/null 2>&1 ||
        die "running as root needs a '$PG_OS_USER' OS user (apt-get install -y postgresql-15 creates it)"
fi

# ---------------------------------------------------------------------------------------------
# Temporary directory, processes and cleanup
# ---------------------------------------------------------------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/graywire-bench.XXXXXX")
chmod 755 "$TMP"
[[ $IS_ROOT == 1 ]] && chown "$PG_OS_USER:" "$TMP"
STARTED_PIDS=()   # in start order: the server processes themselves
PID_NAMES=()
PID_SIGNALS=()    # the signal that stops each one quickly
PID_LAUNCHERS=()  # the PID that $! gave (the same unless runuser forked)

cleanup() {
    local rc=$? i pid n
    trap - EXIT INT TERM
    for ((i = ${#STARTED_PIDS[@]} - 1; i >= 0; i--)); do
        pid=${STARTED_PIDS[i]}
        if kill -0 "$pid" 2>/dev/null; then
            kill "-${PID_SIGNALS[i]}" "$pid" 2>/dev/null || true
            for ((n = 0; n < 100; n++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            if kill -0 "$pid" 2>/dev/null; then
                log "${PID_NAMES[i]} (pid $pid) did not stop within 10 s of SIG${PID_SIGNALS[i]}; sending SIGKILL"
                kill -KILL "$pid" 2>/dev/null || true
            fi
        fi
        if [[ ${PID_LAUNCHERS[i]} != "$pid" ]] && kill -0 "${PID_LAUNCHERS[i]}" 2>/dev/null; then
            kill -TERM "${PID_LAUNCHERS[i]}" 2>/dev/null || true
        fi
        wait "${PID_LAUNCHERS[i]}" 2>/dev/null || true
    done
    if [[ $KEEP_TMP == 1 ]]; then
        log "keeping $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# remember_pid PID NAME SIGNAL: stop PID with SIGNAL on exit.
remember_pid() { STARTED_PIDS+=("$1"); PID_NAMES+=("$2"); PID_SIGNALS+=("$3"); PID_LAUNCHERS+=("$1"); }
# real_pid NAME PID: the server's own PID (from its pid file) replaces its launcher's.
real_pid() {
    local i
    for ((i = 0; i < ${#STARTED_PIDS[@]}; i++)); do
        if [[ ${PID_NAMES[i]} == "$1" ]]; then STARTED_PIDS[i]=$2; fi
    done
}

# free_port VAR: a loopback TCP port that no socket uses, outside the kernel's ephemeral range
# (where outgoing connections, e.g. the churn run's, take their local ports), distinct from the
# ones handed out before.
USED_PORTS=" "
PORT_LO=20000
PORT_HI=60999
if read -r eph_lo eph_hi </proc/sys/net/ipv4/ip_local_port_range 2>/dev/null; then
    if ((eph_lo > 12000)); then
        PORT_LO=10000; PORT_HI=$((eph_lo - 1))
    elif ((eph_hi < 63000)); then
        PORT_LO=$((eph_hi + 1)); PORT_HI=65000
    fi
fi
port_in_use() {
    local hex
    hex=$(printf ':%04X ' "$1")
    grep -qs -- "$hex" /proc/net/tcp /proc/net/tcp6
}
free_port() {
    local p i
    for ((i = 0; i < 500; i++)); do
        p=$((PORT_LO + (RANDOM * 32768 + RANDOM) % (PORT_HI - PORT_LO + 1)))
        [[ $USED_PORTS == *" $p "* ]] && continue
        port_in_use "$p" && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            printf -v "$1" '%s' "$p"
            return 0
        fi
    done
    die "found no free loopback port"
}

# wait_for SECONDS WHAT PID LOG CMD...: poll CMD until it succeeds, PID dies, or time runs out.
wait_for() {
    local secs=$1 what=$2 pid=$3 logf=$4 deadline
    shift 4
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ! kill -0 "$pid" 2>/dev/null; then
            log "$what exited during start-up; last lines of $logf:"
            tail -n 30 "$logf" >&2 || true
            die "$what did not start"
        fi
        if ((SECONDS >= deadline)); then
            log "$what not ready after ${secs}s; last lines of $logf:"
            tail -n 30 "$logf" >&2 || true
            die "$what did not become ready"
        fi
        sleep 0.2
    done
}

# proc_cpu PID: "utime stime" in clock ticks, for all threads of the process.
proc_cpu() {
    local stat f
    stat=$(<"/proc/$1/stat") || return 1
    stat=${stat##*) }   # the command name may contain spaces; fields restart after ")"
    read -r -a f <<<"$stat"
    echo "${f[11]} ${f[12]}"   # fields 14 and 15 of /proc/PID/stat
}

# ---------------------------------------------------------------------------------------------
# PostgreSQL
# ---------------------------------------------------------------------------------------------
PG_SUPERUSER=postgres
PG_PASSWORD="bench-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
PGDATA=$TMP/data
free_port PG_PORT
printf '%s\n' "$PG_PASSWORD" >"$TMP/pwfile"
chmod 600 "$TMP/pwfile"
[[ $IS_ROOT == 1 ]] && chown "$PG_OS_USER:" "$TMP/pwfile"

log "initdb ($PG_BINDIR) into $PGDATA"
as_pg "$PG_BINDIR/initdb" -D "$PGDATA" -U "$PG_SUPERUSER" --pwfile="$TMP/pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$TMP/initdb.log" 2>&1 ||
    as_pg "$PG_BINDIR/initdb" -D "$PGDATA" -U "$PG_SUPERUSER" --pwfile="$TMP/pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C >"$TMP/initdb.log" 2>&1 ||
    { cat "$TMP/initdb.log" >&2; die "initdb failed"; }
rm -f "$TMP/pwfile"
cat >>"$PGDATA/postgresql.conf" <<EOF

# graywire bench (bench/pgbench.sh)
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$TMP'
max_connections = 200
shared_buffers = 128MB
password_encryption = 'scram-sha-256'
fsync = off                      # benchmark only: unsafe for real data
full_page_writes = off           # benchmark only
synchronous_commit = off         # benchmark only
log_min_messages = warning
logging_collector = off
EOF
# A superuser that may connect without a password, for the "direct-trust" churn target.
{ echo "host all bench_direct 127.0.0.1/32 trust"; cat "$PGDATA/pg_hba.conf"; } >"$TMP/pg_hba.conf"
cat "$TMP/pg_hba.conf" >"$PGDATA/pg_hba.conf"
PG_LOG=$TMP/postgres.log
: >"$PG_LOG"
[[ $IS_ROOT == 1 ]] && chown "$PG_OS_USER:" "$PG_LOG"
"${PG_RUN[@]}" "$PG_BINDIR/postgres" -D "$PGDATA" >>"$PG_LOG" 2>&1 &
PG_PID=$!
remember_pid "$PG_PID" postgres INT   # SIGINT: fast shutdown
pg_ok() { PGPASSWORD=$PG_PASSWORD PGCONNECT_TIMEOUT=2 "$PSQL" -X -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres -Atc 'SELECT 1'; }
wait_for 60 postgres "$PG_PID" "$PG_LOG" pg_ok
PG_PID=$(head -n 1 "$PGDATA/postmaster.pid")
real_pid postgres "$PG_PID"
PG_VERSION=$(PGPASSWORD=$PG_PASSWORD "$PSQL" -X -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres -Atc 'SHOW server_version')
log "PostgreSQL $PG_VERSION on 127.0.0.1:$PG_PORT (pid $PG_PID)"

PGPASSWORD=$PG_PASSWORD "$PSQL" -X -q -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" -d postgres \
    -v ON_ERROR_STOP=1 -c 'CREATE DATABASE bench' -c 'CREATE ROLE bench_direct LOGIN SUPERUSER' >&2
log "pgbench -i -s $SCALE (directly)"
PGPASSWORD=$PG_PASSWORD "$PGBENCH" -i -q -s "$SCALE" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_SUPERUSER" bench \
    >"$TMP/pgbench-init.log" 2>&1 || { cat "$TMP/pgbench-init.log" >&2; die "pgbench -i failed"; }

# ---------------------------------------------------------------------------------------------
# graywire
# ---------------------------------------------------------------------------------------------
free_port GW_PORT
free_port GW_ADMIN_PORT
GW_CONF=$TMP/graywire.toml
GW_LOG=$TMP/graywire.log
cat >"$GW_CONF" <<EOF
[listener]
address = "127.0.0.1:$GW_PORT"
max_client_connections = 1000

[admin]
address = "127.0.0.1:$GW_ADMIN_PORT"

[backend]
user = "$PG_SUPERUSER"
password = "$PG_PASSWORD"

[pool]
mode = "session"
size = $((CLIENTS + 4))

[shutdown]
timeout = "2s"

[runtime]
worker_threads = $GW_THREADS

[[nodes]]
name = "pg1"
host = "127.0.0.1"
port = $PG_PORT

[[users]]
name = "bench"
auth = "trust"

# The same clients in transaction mode (the graywire-tx target).
[[users]]
name = "bench_tx"
auth = "trust"
pool_mode = "transaction"
EOF
chmod 600 "$GW_CONF"
NO_COLOR=1 "$GRAYWIRE_BIN" run --config "$GW_CONF" >"$GW_LOG" 2>&1 &
GW_PID=$!
remember_pid "$GW_PID" graywire TERM
gw_ok() { PGCONNECT_TIMEOUT=2 "$PSQL" -X -h 127.0.0.1 -p "$GW_PORT" -U bench -d bench -Atc 'SELECT 1'; }
wait_for 60 graywire "$GW_PID" "$GW_LOG" gw_ok
GW_VERSION=$("$GRAYWIRE_BIN" --version 2>/dev/null || echo unknown)
log "graywire ($GW_VERSION) on 127.0.0.1:$GW_PORT (pid $GW_PID)"

# ---------------------------------------------------------------------------------------------
# PgBouncer: database "bench" in session mode (the main comparison, like graywire today) and
# "bench_tx" in transaction mode (churn only). Clients are trusted; the server password is in
# the connection string.
# ---------------------------------------------------------------------------------------------
PB_POOL_SIZE=$((CLIENTS + 4))
printf '"bench" ""\n' >"$TMP/userlist.txt"
chmod 600 "$TMP/userlist.txt"
[[ $IS_ROOT == 1 ]] && chown "$PG_OS_USER:" "$TMP/userlist.txt"
pb_db() {
    echo "$1 = host=127.0.0.1 port=$PG_PORT dbname=bench user=$PG_SUPERUSER password=$PG_PASSWORD pool_mode=$2"
}
# start_pgbouncer NAME: starts one PgBouncer with its files at $TMP/NAME.*; sets STARTED_PB_PORT
# and STARTED_PB_PID (the server's own PID, from its pid file).
start_pgbouncer() {
    local name=$1 port conf=$TMP/$1.ini pidfile=$TMP/$1.pid stderr=$TMP/$1.stderr launch
    free_port port
    cat >"$conf" <<EOF
[databases]
$(pb_db bench session)
$(pb_db bench_tx transaction)

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $TMP/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = $PB_POOL_SIZE
max_db_connections = 0
logfile = $TMP/$name.log
pidfile = $pidfile
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
ignore_startup_parameters = extra_float_digits
EOF
    chmod 600 "$conf"
    [[ $IS_ROOT == 1 ]] && chown "$PG_OS_USER:" "$conf"
    "${PG_RUN[@]}" "$PGBOUNCER_BIN" "$conf" >"$stderr" 2>&1 &
    launch=$!
    remember_pid "$launch" "$name" TERM   # SIGTERM: immediate shutdown (SIGINT waits for clients)
    STARTED_PB_PORT=$port
    wait_for 60 "$name" "$launch" "$stderr" pb_ok
    STARTED_PB_PID=$launch
    if [[ -s $pidfile ]]; then
        STARTED_PB_PID=$(tr -d ' \n' <"$pidfile")
        real_pid "$name" "$STARTED_PB_PID"
    fi
    log "$PB_VERSION as $name on 127.0.0.1:$port (pid $STARTED_PB_PID)"
}
pb_ok() { PGCONNECT_TIMEOUT=2 "$PSQL" -X -h 127.0.0.1 -p "$STARTED_PB_PORT" -U bench -d bench -Atc 'SELECT 1'; }
PB_VERSION=$("$PGBOUNCER_BIN" --version 2>/dev/null | head -n 1 || echo unknown)
start_pgbouncer pgbouncer
PB_PORT=$STARTED_PB_PORT PB_PID=$STARTED_PB_PID PB_LOG=$TMP/pgbouncer.log
# The control: a second PgBouncer, configured like the first. How often it comes out ahead of the
# first shows how much of a graywire-against-PgBouncer difference the machine's noise alone makes.
PB2_PORT="" PB2_PID=""
if [[ $CONTROL == 1 ]]; then
    start_pgbouncer pgbouncer-b
    PB2_PORT=$STARTED_PB_PORT PB2_PID=$STARTED_PB_PID
fi

# ---------------------------------------------------------------------------------------------
# Results files
# ---------------------------------------------------------------------------------------------
mkdir -p "$RESULTS_DIR"
STAMP=$(date +%Y%m%d-%H%M%S)
CSV=$RESULTS_DIR/pgbench-$STAMP.csv
REPORT=$RESULTS_DIR/pgbench-$STAMP.txt
FAIL_DIR=$RESULTS_DIR/pgbench-$STAMP-failures
echo "timestamp,workload,round,position,target,pool_mode,clients,jobs,duration_s,status,tps,transactions,failed,latency_avg_ms,proxy_utime_ticks,proxy_stime_ticks,clk_tck,proxy_cpu_us_per_tx,proxy_user_us_per_tx,proxy_sys_us_per_tx" >"$CSV"
: >"$REPORT"
say() { printf '%s\n' "$*" | tee -a "$REPORT"; }

GIT_REV=$(git -C "$REPO_DIR" rev-parse --short HEAD 2>/dev/null || echo "no commit")
GIT_DIRTY=""
if [[ -n $(git -C "$REPO_DIR" status --porcelain 2>/dev/null | head -n 1) ]]; then GIT_DIRTY=" (dirty tree)"; fi

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
# Idle CPU of each proxy (graywire's health checks, timers) over a few seconds, for reference.
IDLE_SECS=3
read -r gu0 gs0 < <(proc_cpu "$GW_PID")
read -r pu0 ps0 < <(proc_cpu "$PB_PID")
sleep "$IDLE_SECS"
read -r gu1 gs1 < <(proc_cpu "$GW_PID")
read -r pu1 ps1 < <(proc_cpu "$PB_PID")
GW_IDLE_MS=$(awk -v d=$((gu1 + gs1 - gu0 - gs0)) -v t="$CLK_TCK" -v s="$IDLE_SECS" 'BEGIN { printf "%.1f", d * 1000 / t / s }')
PB_IDLE_MS=$(awk -v d=$((pu1 + ps1 - pu0 - ps0)) -v t="$CLK_TCK" -v s="$IDLE_SECS" 'BEGIN { printf "%.1f", d * 1000 / t / s }')

say "graywire pgbench benchmark, $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
say "  machine     : $(nproc) CPUs, $(uname -sr); pgbench, postgres and the proxy share these CPUs"
say "  graywire    : $GW_VERSION, $GRAYWIRE_BIN, git $GIT_REV$GIT_DIRTY; pool mode session; worker_threads=$GW_THREADS (0 = one per core); client auth trust; backend scram-sha-256"
say "  pgbouncer   : $PB_VERSION; pool_mode=session for all main comparisons (matches graywire);"
say "                auth_type=trust, default_pool_size=$PB_POOL_SIZE, log_connections=0, server_reset_query default (DISCARD ALL)"
[[ $CONTROL == 1 ]] && say "  control     : pgbouncer-b, a second PgBouncer configured like the first (CONTROL=1)"
say "  postgresql  : $PG_VERSION, throwaway primary; fsync=off, full_page_writes=off, synchronous_commit=off"
say "                (benchmark only: unsafe), shared_buffers=128MB, max_connections=200"
say "  direct      : pgbench over TCP loopback to postgres as superuser with scram-sha-256"
say "  pgbench     : -c $CLIENTS -j $JOBS -T $DURATION -n, scale $SCALE, $ROUNDS round(s), order: $ORDER (SEED=$SEED)"
say "  load avg    : $LOAD_START (1/5/15 min) before the runs; anything else busy on the machine skews TPS"
say "  proxy idle  : graywire ${GW_IDLE_MS} ms CPU/s, pgbouncer ${PB_IDLE_MS} ms CPU/s (included in the per-transaction figures)"
say "  raw numbers : $CSV"
say ""

# ---------------------------------------------------------------------------------------------
# Running pgbench
# ---------------------------------------------------------------------------------------------
workload_args() {
    case "$1" in
        select-simple) echo "-S -M simple" ;;
        select-extended) echo "-S -M extended" ;;
        select-prepared) echo "-S -M prepared" ;;
        tpcb) echo "-M simple" ;;
        churn) echo "-S -C -M simple" ;;
    esac
}
workload_title() {
    case "$1" in
        select-simple) echo "select-only, simple protocol (-S -M simple)" ;;
        select-extended) echo "select-only, extended protocol (-S -M extended)" ;;
        select-prepared) echo "select-only, prepared statements (-S -M prepared)" ;;
        tpcb) echo "TPC-B-like read/write, the pgbench default (-M simple)" ;;
        churn) echo "connection churn: select-only with a new connection per transaction (-S -C)" ;;
    esac
}
targets_for() {
    local control=""
    [[ $CONTROL == 1 ]] && control=" pgbouncer-b"
    if [[ $1 == churn && $CHURN_EXTRAS == 1 ]]; then
        echo "direct direct-trust graywire pgbouncer$control graywire-tx pgbouncer-tx"
    elif [[ $TX_TARGETS == 1 ]]; then
        echo "direct graywire pgbouncer$control graywire-tx pgbouncer-tx"
    else
        echo "direct graywire pgbouncer$control"
    fi
}
pool_mode_of() {
    case "$1" in
        direct | direct-trust) echo "-" ;;
        graywire | pgbouncer | pgbouncer-b) echo "session" ;;
        graywire-tx | pgbouncer-tx) echo "transaction" ;;
    esac
}

# pgbench_to TARGET OUTFILE ARGS...: runs pgbench against TARGET (bounded by timeout).
pgbench_to() {
    local target=$1 out=$2 limit
    shift 2
    limit=$((DURATION > WARMUP ? DURATION : WARMUP))
    limit=$((limit + 120))
    case "$target" in
        direct)
            PGPASSWORD=$PG_PASSWORD timeout -k 5 "$limit" "$PGBENCH" -h 127.0.0.1 -p "$PG_PORT" \
                -U "$PG_SUPERUSER" "$@" bench >"$out" 2>&1 ;;
        direct-trust)
            timeout -k 5 "$limit" "$PGBENCH" -h 127.0.0.1 -p "$PG_PORT" -U bench_direct "$@" bench >"$out" 2>&1 ;;
        graywire)
            timeout -k 5 "$limit" "$PGBENCH" -h 127.0.0.1 -p "$GW_PORT" -U bench "$@" bench >"$out" 2>&1 ;;
        graywire-tx)
            timeout -k 5 "$limit" "$PGBENCH" -h 127.0.0.1 -p "$GW_PORT" -U bench_tx "$@" bench >"$out" 2>&1 ;;
        pgbouncer)
            timeout -k 5 "$limit" "$PGBENCH" -h 127.0.0.1 -p "$PB_PORT" -U bench "$@" bench >"$out" 2>&1 ;;
        pgbouncer-tx)
            timeout -k 5 "$limit" "$PGBENCH" -h 127.0.0.1 -p "$PB_PORT" -U bench "$@" bench_tx >"$out" 2>&1 ;;
        pgbouncer-b)
            timeout -k 5 "$limit" "$PGBENCH" -h 127.0.0.1 -p "$PB2_PORT" -U bench "$@" bench >"$out" 2>&1 ;;
    esac
}

proxy_pid_of() {
    case "$1" in
        graywire | graywire-tx) echo "$GW_PID" ;;
        pgbouncer | pgbouncer-tx) echo "$PB_PID" ;;
        pgbouncer-b) echo "$PB2_PID" ;;
        *) echo "" ;;
    esac
}

ERRORS=0
record_failure() {
    local wl=$1 round=$2 target=$3 out=$4 rc=$5
    ERRORS=$((ERRORS + 1))
    mkdir -p "$FAIL_DIR"
    cp "$out" "$FAIL_DIR/$wl-r$round-$target.pgbench.txt"
    log "FAILED: $wl round $round $target (pgbench exit $rc); last lines of its output:"
    tail -n 15 "$out" | sed 's/^/    /' >&2
    if [[ $target == graywire* ]]; then
        log "last lines of graywire's log:"
        tail -n 15 "$GW_LOG" | sed 's/^/    /' >&2
    elif [[ $target == pgbouncer-b ]]; then
        log "last lines of pgbouncer-b's log:"
        tail -n 15 "$TMP/pgbouncer-b.log" | sed 's/^/    /' >&2
    elif [[ $target == pgbouncer* ]]; then
        log "last lines of pgbouncer's log:"
        tail -n 15 "$PB_LOG" | sed 's/^/    /' >&2
    fi
}

RUN_NO=0
TOTAL_RUNS=0
for wl in $WORKLOADS; do
    read -r -a ts <<<"$(targets_for "$wl")"
    TOTAL_RUNS=$((TOTAL_RUNS + ROUNDS * ${#ts[@]}))
done

run_one() {
    local wl=$1 round=$2 pos=$3 target=$4 out pid rc=0 u0=0 s0=0 u1=0 s1=0
    local tps="" tx="" failed="" lat="" status cpu="" cu="" cs=""
    local -a args
    read -r -a args <<<"$(workload_args "$wl")"
    out=$TMP/run.out
    pid=$(proxy_pid_of "$target")
    RUN_NO=$((RUN_NO + 1))
    [[ -n $pid ]] && read -r u0 s0 < <(proc_cpu "$pid")
    pgbench_to "$target" "$out" "${args[@]}" -n -T "$DURATION" -c "$CLIENTS" -j "$JOBS" || rc=$?
    [[ -n $pid ]] && read -r u1 s1 < <(proc_cpu "$pid")
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | head -n 1)
    tx=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out" | head -n 1)
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out" | head -n 1)
    lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$out" | head -n 1)
    failed=${failed:-0}
    if [[ $rc == 0 && -n $tps && -n $tx && $tx -gt 0 ]]; then
        status=ok
    else
        status="error-rc$rc"
        record_failure "$wl" "$round" "$target" "$out" "$rc"
    fi
    local du=$((u1 - u0)) ds=$((s1 - s0))
    if [[ -n $pid && -n $tx && ${tx:-0} -gt 0 ]]; then
        read -r cpu cu cs < <(awk -v u="$du" -v s="$ds" -v t="$CLK_TCK" -v n="$tx" \
            'BEGIN { printf "%.2f %.2f %.2f\n", (u + s) * 1e6 / t / n, u * 1e6 / t / n, s * 1e6 / t / n }')
    fi
    if [[ -z $pid ]]; then du=""; ds=""; fi
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ),$wl,$round,$pos,$target,$(pool_mode_of "$target"),$CLIENTS,$JOBS,$DURATION,$status,$tps,$tx,$failed,$lat,$du,$ds,$CLK_TCK,$cpu,$cu,$cs" >>"$CSV"
    local cpu_text=""
    [[ -n $cpu ]] && cpu_text=", proxy ${cpu} us/tx (user ${cu} / sys ${cs})"
    printf '  [%d/%d] %-15s round %d/%d  %-12s %10s tps%s%s\n' "$RUN_NO" "$TOTAL_RUNS" "$wl" "$round" "$ROUNDS" \
        "$target" "${tps:-?}" "$cpu_text" "$([[ $status == ok ]] || echo "  <-- $status")" >&2
}

# workload_table WORKLOAD: the per-target medians of one workload, from the CSV.
workload_table() {
    awk -F, -v wl="$1" -v order="$(targets_for "$1")" '
        function sort(a, n,   i, j, v) { for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j >= 1 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v } }
        function median(a, n) { if (n == 0) return ""; sort(a, n); return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
        NR > 1 && $2 == wl {
            t = $5
            if ($10 != "ok") { err[t]++; next }
            k = ++n[t]; tps[t, k] = $11 + 0; fl[t] += $13
            if ($18 != "") { c = ++nc[t]; cpu[t, c] = $18 + 0; usr[t, c] = $19 + 0; sys[t, c] = $20 + 0 }
        }
        END {
            nt = split(order, tg, " ")
            for (i = 1; i <= nt; i++) {
                t = tg[i]; m = n[t] + 0
                for (k = 1; k <= m; k++) a[k] = tps[t, k]
                med[t] = median(a, m)
                if (m) { sort(a, m); lo[t] = a[1]; hi[t] = a[m] }
                # CPU: the median total, with the user/system split of the same (middle) run(s)
                mc = nc[t] + 0; mcpu[t] = ""
                if (mc) {
                    for (k = 1; k <= mc; k++) idx[k] = k
                    for (x = 2; x <= mc; x++) { v = idx[x]; for (y = x - 1; y >= 1 && cpu[t, idx[y]] > cpu[t, v]; y--) idx[y + 1] = idx[y]; idx[y + 1] = v }
                    if (mc % 2) { p = idx[(mc + 1) / 2]; mcpu[t] = cpu[t, p]; musr[t] = usr[t, p]; msys[t] = sys[t, p] }
                    else { p = idx[mc / 2]; q = idx[mc / 2 + 1]; mcpu[t] = (cpu[t, p] + cpu[t, q]) / 2; musr[t] = (usr[t, p] + usr[t, q]) / 2; msys[t] = (sys[t, p] + sys[t, q]) / 2 }
                }
            }
            printf "  %-13s %-12s %12s %21s %10s   %-34s %s\n", "target", "pool mode", "median TPS", "min..max TPS", "vs direct", "proxy CPU us/tx (user / sys)", "failed tx / errors"
            for (i = 1; i <= nt; i++) {
                t = tg[i]
                mode = (t ~ /^direct/) ? "-" : (t ~ /-tx$/) ? "transaction" : "session"
                if (med[t] == "") { printf "  %-13s %-12s %12s %21s %10s   %-34s %s\n", t, mode, "n/a", "", "", "", "0 / " err[t] + 0; continue }
                ratio = (med["direct"] != "" && med["direct"] > 0) ? sprintf("%.3f", med[t] / med["direct"]) : "n/a"
                cpu_s = (mcpu[t] != "") ? sprintf("%.1f (%.1f / %.1f)", mcpu[t], musr[t], msys[t]) : "-"
                printf "  %-13s %-12s %12.1f %21s %10s   %-34s %s\n", t, mode, med[t], sprintf("%.1f..%.1f", lo[t], hi[t]), ratio, cpu_s, (fl[t] + 0) " / " (err[t] + 0)
            }
        }' "$CSV"
}

summary_table() {
    awk -F, -v wls="$WORKLOADS" '
        function sort(a, n,   i, j, v) { for (i = 2; i <= n; i++) { v = a[i]; for (j = i - 1; j >= 1 && a[j] > v; j--) a[j + 1] = a[j]; a[j + 1] = v } }
        function median(a, n) { if (n == 0) return ""; sort(a, n); return (n % 2) ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
        NR > 1 && $10 == "ok" { k = ++n[$2, $5]; tps[$2, $5, k] = $11 + 0; if ($18 != "") { c = ++nc[$2, $5]; cpu[$2, $5, c] = $18 + 0 } }
        function mtps(w, t,   k, m) { m = n[w, t] + 0; for (k = 1; k <= m; k++) a[k] = tps[w, t, k]; return median(a, m) }
        function mcpu(w, t,   k, m) { m = nc[w, t] + 0; for (k = 1; k <= m; k++) a[k] = cpu[w, t, k]; return median(a, m) }
        function ratio(x, d) { return (x != "" && d != "" && d > 0) ? sprintf("%.3f", x / d) : "n/a" }
        function us(x) { return (x != "") ? sprintf("%.1f", x) : "n/a" }
        END {
            printf "  %-16s %11s %14s %14s %14s %15s %16s\n", "workload", "direct TPS", "graywire/dir", "pgbouncer/dir", "gw/pgbouncer", "graywire us/tx", "pgbouncer us/tx"
            nw = split(wls, w, " ")
            for (i = 1; i <= nw; i++) {
                d = mtps(w[i], "direct"); g = mtps(w[i], "graywire"); p = mtps(w[i], "pgbouncer")
                printf "  %-16s %11s %14s %14s %14s %15s %16s\n", w[i], (d != "") ? sprintf("%.1f", d) : "n/a", ratio(g, d), ratio(p, d), ratio(g, p), us(mcpu(w[i], "graywire")), us(mcpu(w[i], "pgbouncer"))
                if (w[i] == "churn" && n[w[i], "direct-trust"] > 0) {
                    x = mtps(w[i], "direct-trust")
                    printf "  %-16s %11s %14s %14s %14s %15s %16s\n", "  (direct-trust)", sprintf("%.1f", x), ratio(g, x), ratio(p, x), "", "", ""
                }
                if (n[w[i], "pgbouncer-tx"] > 0 || n[w[i], "graywire-tx"] > 0) {
                    gx = mtps(w[i], "graywire-tx"); px = mtps(w[i], "pgbouncer-tx")
                    printf "  %-16s %11s %14s %14s %14s %15s %16s\n", "  (transaction)", "", ratio(gx, d), ratio(px, d), ratio(gx, px), us(mcpu(w[i], "graywire-tx")), us(mcpu(w[i], "pgbouncer-tx"))
                }
            }
        }' "$CSV"
}

# Warm-up: page cache, shared buffers, pools. Not measured.
if ((WARMUP > 0)); then
    log "warm-up: ${WARMUP}s select-only per target"
    for target in direct graywire pgbouncer ${PB2_PORT:+pgbouncer-b}; do
        if ! pgbench_to "$target" "$TMP/warmup.out" -S -n -T "$WARMUP" -c "$CLIENTS" -j "$JOBS"; then
            log "warm-up against $target failed:"
            tail -n 15 "$TMP/warmup.out" | sed 's/^/    /' >&2
        fi
    done
fi

# round_order N ROUND OFFSET: sets ROUND_ORDER to the order of N targets (as indexes) in one
# round. The rotation spreads drift and warm-up over all targets alike; with ORDER=shuffle a
# random permutation on top of it also breaks the fixed cycle, in which each target always
# follows the same one (and inherits what that one leaves behind: backends exiting after
# `direct`, a busier page cache). Not run in a subshell, so $RANDOM's sequence goes on.
round_order() {
    local n=$1 round=$2 offset=$3 i j t
    ROUND_ORDER=()
    for ((i = 0; i < n; i++)); do ROUND_ORDER[i]=$(((i + round - 1 + offset) % n)); done
    [[ $ORDER == shuffle ]] || return 0
    for ((i = n - 1; i > 0; i--)); do
        j=$((RANDOM % (i + 1)))
        t=${ROUND_ORDER[i]}
        ROUND_ORDER[i]=${ROUND_ORDER[j]}
        ROUND_ORDER[j]=$t
    done
}

RANDOM=$SEED
wl_index=0
for wl in $WORKLOADS; do
    read -r -a tgs <<<"$(targets_for "$wl")"
    nt=${#tgs[@]}
    log "workload $wl: $(workload_title "$wl")"
    for ((round = 1; round <= ROUNDS; round++)); do
        round_order "$nt" "$round" "$wl_index"
        for ((p = 0; p < nt; p++)); do
            run_one "$wl" "$round" $((p + 1)) "${tgs[ROUND_ORDER[p]]}"
        done
    done
    say "== $(workload_title "$wl") =="
    say "   pgbench $(workload_args "$wl") -c $CLIENTS -j $JOBS -T $DURATION; median of $ROUNDS round(s)"
    workload_table "$wl" | tee -a "$REPORT"
    if [[ $wl == churn ]]; then
        say "   Note: every pgbench connection is new. direct: pgbench and postgres do a SCRAM exchange and"
        say "   postgres forks a backend per connection; direct-trust: the same without authentication."
        say "   graywire and PgBouncer (client auth trust) keep server connections across client"
        say "   connections, which is the point of a pooler under churn. Both reset a server connection"
        say "   with DISCARD ALL when a client leaves it in session mode; in transaction mode graywire"
        say "   still resets it before another client gets it (no session state leaks), PgBouncer does not."
    fi
    say ""
    wl_index=$((wl_index + 1))
done

say "== summary: median TPS ratios (higher is better) and proxy CPU per transaction (lower is better) =="
summary_table | tee -a "$REPORT"
say ""
say "  ratios < 1 mean slower than connecting directly; on a small machine the proxy competes with"
say "  pgbench and postgres for the CPUs, so the CPU us/tx columns are the more stable comparison."
say ""
say "== paired by round: graywire against PgBouncer in the same round =="
paired_table "$CSV" | tee -a "$REPORT"

sed 's/\x1b\[[0-9;]*m//g' "$GW_LOG" >"$RESULTS_DIR/pgbench-$STAMP-graywire.log"
GW_PROBLEMS=$(grep -cE ' (WARN|ERROR) ' "$RESULTS_DIR/pgbench-$STAMP-graywire.log" || true)
if [[ ${GW_PROBLEMS:-0} -gt 0 ]]; then
    say ""
    say "graywire logged $GW_PROBLEMS WARN/ERROR line(s); the first 10:"
    grep -E ' (WARN|ERROR) ' "$RESULTS_DIR/pgbench-$STAMP-graywire.log" | head -n 10 | sed 's/^/    /' | tee -a "$REPORT"
fi
say "  load average at the end: $(cut -d' ' -f1-3 /proc/loadavg) (at the start: $LOAD_START)"
if [[ $ERRORS -gt 0 ]]; then
    say ""
    say "$ERRORS pgbench run(s) failed; their output is in $FAIL_DIR"
fi
say ""
say "report: $REPORT"
say "csv   : $CSV"
[[ $ERRORS == 0 ]] || exit 2
