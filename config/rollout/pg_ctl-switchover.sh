#!/bin/sh
# graywire rollout --switchover-cmd for streaming-replication clusters run with pg_ctl (no
# Patroni): a planned switchover that loses nothing.
#
#   pg_ctl-switchover.sh OLD_DATA_DIR NEW_DATA_DIR NEW_HOST NEW_PORT [OTHER_STANDBY_DATA_DIR...]
#
# e.g. --switchover-cmd 'config/rollout/pg_ctl-switchover.sh {data_dir} {candidate_data_dir}
#       {candidate_host} {candidate_port} {standby_data_dirs}'
#
# 1. a fast shutdown of the old primary (its WAL senders hand every record, up to the shutdown
#    checkpoint, to the standbys before it exits);
# 2. wait until the new primary has replayed that checkpoint, then promote it;
# 3. the other standbys stream from the new primary (primary_conninfo, reloaded);
# 4. the old primary starts again as a standby of the new one (standby.signal), on the same
#    build and options as before.
# graywire holds writes at their transaction boundaries meanwhile (the old primary is drained).
# Every node is reached on its Unix socket as the OS user that owns its data directory (root
# switches to it); PGUSER may name the database superuser (default: that OS user's name).
set -eu

if [ $# -lt 4 ]; then
    echo "usage: $0 OLD_DATA_DIR NEW_DATA_DIR NEW_HOST NEW_PORT [OTHER_STANDBY_DATA_DIR...]" >&2
    exit 64
fi
if [ "$(id -u)" = 0 ]; then
    owner=$(stat -c %U "$1")
    # Through stdin: the owner may not be able to read this file where it lies.
    exec runuser -u "$owner" -- sh -s -- "$@" <"$0"
fi
cd /
old=$1
new=$2
new_host=$3
new_port=$4
shift 4

fail() {
    echo "switchover: $*" >&2
    exit 1
}

# The program that runs a node, from its postmaster.opts; its directory has pg_ctl.
bindir_of() {
    dirname "$(head -n 1 "$1/postmaster.opts" | cut -d' ' -f1)"
}
opts_of() {
    sed -n '1s/^[^"]* "/"/p' "$1/postmaster.opts"
}
# Line 4 of postmaster.pid is the port, line 5 the socket directory.
pid_line() {
    sed -n "${2}p" "$1/postmaster.pid"
}
psql_bin=$(command -v psql || echo /usr/lib/postgresql/15/bin/psql)
sql() {
    PGCONNECT_TIMEOUT=5 "$psql_bin" -X -A -t -q -v ON_ERROR_STOP=1 \
        -h "$(pid_line "$1" 5)" -p "$(pid_line "$1" 4)" -d postgres -c "$2"
}
# The conninfo $1 with host and port replaced and application_name dropped (the walreceiver
# then uses cluster_name). Handles keywords written as plain words, as `pg_basebackup -R`
# writes them (host=… port=…), not quoted values that contain spaces.
repoint() {
    printf '%s\n' "$1" | sed -E \
        -e "s/(^| )host=[^ ]*/\1host=$new_host/" \
        -e "s/(^| )port=[^ ]*/\1port=$new_port/" \
        -e "s/(^| )application_name=[^ ]*//"
}
sql_quote() {
    printf '%s' "$1" | sed "s/'/''/g"
}

for d in "$old" "$new" "$@"; do
    [ -f "$d/postmaster.pid" ] || fail "$d is not running (no postmaster.pid)"
done
[ "$(sql "$new" 'SELECT pg_is_in_recovery()')" = t ] || fail "$new is not a standby"
[ "$(sql "$old" 'SELECT pg_is_in_recovery()')" = f ] || fail "$old is not a primary"
upstream=$(sql "$new" 'SHOW primary_conninfo')
[ -n "$upstream" ] || fail "$new has no primary_conninfo"
old_bindir=$(bindir_of "$old")
old_opts=$(opts_of "$old")

echo "stopping the old primary $old"
"$old_bindir/pg_ctl" -D "$old" -m fast -w -t 120 stop
checkpoint=$("$old_bindir/pg_controldata" "$old" | sed -n 's/^Latest checkpoint location: *//p')
[ -n "$checkpoint" ] || fail "cannot read the shutdown checkpoint of $old"
echo "waiting for $new to replay the shutdown checkpoint $checkpoint"
i=0
until [ "$(sql "$new" "SELECT pg_last_wal_replay_lsn() >= '$checkpoint'::pg_lsn")" = t ]; do
    i=$((i + 1))
    [ $i -le 600 ] || fail "$new did not replay $checkpoint within 60s; $old is stopped"
    sleep 0.1
done
echo "promoting $new"
"$(bindir_of "$new")/pg_ctl" -D "$new" -w -t 60 promote

for d in "$@"; do
    conninfo=$(repoint "$(sql "$d" 'SHOW primary_conninfo')")
    echo "repointing $d to $new_host:$new_port"
    sql "$d" "ALTER SYSTEM SET primary_conninfo = '$(sql_quote "$conninfo")'"
    sql "$d" 'SELECT pg_reload_conf()' >/dev/null
done

echo "starting $old as a standby of $new_host:$new_port"
conninfo=$(repoint "$upstream")
auto=$old/postgresql.auto.conf
grep -v '^primary_conninfo' "$auto" >"$auto.tmp" || true
printf "primary_conninfo = '%s'\n" "$(sql_quote "$conninfo")" >>"$auto.tmp"
mv "$auto.tmp" "$auto"
touch "$old/standby.signal"
"$old_bindir/pg_ctl" -D "$old" -l "$(dirname "$old")/$(basename "$old").log" -o "$old_opts" \
    -w -t 300 start
echo "switchover done: $new is the primary"
