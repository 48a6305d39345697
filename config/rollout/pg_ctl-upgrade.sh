#!/bin/sh
# graywire rollout --upgrade-cmd for nodes run with pg_ctl: restarts one node on another build
# of the same PostgreSQL major version (a minor upgrade, or a downgrade). A fast shutdown, then
# a start with NEW_BINDIR's programs and the options the node last started with (its
# postmaster.opts, as `pg_ctl restart` reuses them). A node that is not running is just started.
#
#   pg_ctl-upgrade.sh DATA_DIR NEW_BINDIR [LOG_FILE]
#
# e.g. --upgrade-cmd 'config/rollout/pg_ctl-upgrade.sh {data_dir} /usr/lib/postgresql/15/bin'
# after `apt-get install postgresql-15=15.20-…` on that node's machine (through ssh for a remote
# node). Run as root, it switches to the owner of DATA_DIR. Exit status: 0 when the node runs
# on the new build, non-zero with the reason otherwise.
set -eu

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
    echo "usage: $0 DATA_DIR NEW_BINDIR [LOG_FILE]" >&2
    exit 64
fi
data_dir=$1
bindir=$2
log=${3:-$(dirname "$data_dir")/$(basename "$data_dir").log}

if [ ! -f "$data_dir/PG_VERSION" ]; then
    echo "$data_dir is not a PostgreSQL data directory (no PG_VERSION)" >&2
    exit 2
fi
if [ "$(id -u)" = 0 ]; then
    owner=$(stat -c %U "$data_dir")
    # Through stdin: the owner may not be able to read this file where it lies.
    exec runuser -u "$owner" -- sh -s -- "$@" <"$0"
fi
cd /
for program in postgres pg_ctl; do
    if [ ! -x "$bindir/$program" ]; then
        echo "no $program program in $bindir" >&2
        exit 2
    fi
done
opts_file=$data_dir/postmaster.opts
if [ ! -f "$opts_file" ]; then
    echo "$opts_file is missing: start the node once with pg_ctl or postgres first" >&2
    exit 2
fi
# postmaster.opts: the program, then each argument in double quotes. Keep the arguments.
opts=$(sed -n '1s/^[^"]* "/"/p' "$opts_file")

echo "before: $(head -n 1 "$opts_file" | cut -d' ' -f1)"
if "$bindir/pg_ctl" -D "$data_dir" status >/dev/null 2>&1; then
    "$bindir/pg_ctl" -D "$data_dir" -m fast -w -t 120 stop
else
    echo "$data_dir: not running; starting it"
fi
"$bindir/pg_ctl" -D "$data_dir" -l "$log" -o "$opts" -w -t 300 start
echo "after: $("$bindir/postgres" --version)"
