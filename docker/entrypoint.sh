#!/bin/sh
# Entrypoint of the medwsol images: check what the container needs, then hand over with exec.
#
#   medwsol-entrypoint [ARGS...]                 medwsol ARGS (default --help); the commands that write data
#                                               (run, prepare, train, evaluate, infer, export, benchmark) first
#                                               check that the data folder is mounted and writable
#   medwsol-entrypoint mlflow-server [ARGS...]  the MLflow tracking server on PostgreSQL (compose service 'mlflow');
#                                               the database password comes from POSTGRES_PASSWORD and never
#                                               appears on a command line
#   medwsol-entrypoint dask|mlflow|python|sh|bash ARGS...   that program (compose services 'scheduler', 'worker')
#
# Every problem is one line on stderr naming the setting and the fix, exit code 2; never a traceback.
# Settings (environment): MEDWSOL_DATA_DIR (/work/data), MEDWSOL_RUNS_DIR (/work/runs), MEDWSOL_ALLOW_EPHEMERAL=1
# (skip the mount check for a throwaway try), POSTGRES_{USER,PASSWORD,DB,HOST,PORT}, MLFLOW_ARTIFACTS_DESTINATION,
# MLFLOW_PORT, MLFLOW_WORKERS, MLFLOW_SERVER_ALLOWED_HOSTS. MEDWSOL_MOUNTINFO names the mount table (tests only).
set -eu

die() {
    printf 'error: %s\n' "$*" >&2
    exit 2
}

data_dir=${MEDWSOL_DATA_DIR:-/work/data}
runs_dir=${MEDWSOL_RUNS_DIR:-/work/runs}
mountinfo=${MEDWSOL_MOUNTINFO:-/proc/self/mountinfo}

# The source ("root" field) of the mount at $1, or nothing when $1 is not a mount point.
mount_root() {
    [ -r "$mountinfo" ] || return 0
    awk -v dir="$1" '$5 == dir { root = $4 } END { if (root != "") print root }' "$mountinfo"
}

check_mounted() {  # $1 = folder, $2 = command name
    [ "${MEDWSOL_ALLOW_EPHEMERAL:-0}" = 1 ] && return 0
    root=$(mount_root "$1")
    if [ -z "$root" ]; then
        die "$1 is not a mounted folder, so 'medwsol $2' would leave its data inside this container; fix: mount one (docker run -v /host/folder:$1 ..., compose mounts the 'data' volume) or set MEDWSOL_ALLOW_EPHEMERAL=1 for a throwaway try"
    fi
    if printf '%s\n' "$root" | grep -Eq '/volumes/[0-9a-f]{64}/_data$'; then
        die "$1 is an anonymous volume (the image's VOLUME, created because nothing was mounted there), so 'medwsol $2' would leave its data in a volume without a name; fix: mount a folder or a named volume (docker run -v /host/folder:$1 ...) or set MEDWSOL_ALLOW_EPHEMERAL=1 for a throwaway try"
    fi
}

check_writable() {  # $1 = folder
    [ -d "$1" ] || return 0
    [ -w "$1" ] || die "$1 is not writable by uid $(id -u); fix: chown the host folder to $(id -u):$(id -g), or start the container with --user \"\$(id -u):\$(id -g)\" (compose: user: in compose.yaml)"
}

mlflow_server() {
    [ -n "${POSTGRES_PASSWORD:-}" ] || die "POSTGRES_PASSWORD is not set (no docker/.env, or no password in it); fix: cp docker/.env.example docker/.env, set POSTGRES_PASSWORD there and start from docker/ with 'docker compose up' (docker run: -e POSTGRES_PASSWORD=...)"
    artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-/work/mlartifacts}
    [ -d "$artifacts" ] || die "MLFLOW_ARTIFACTS_DESTINATION=$artifacts does not exist; fix: mount the artifact volume there (compose: mlartifacts:$artifacts)"
    check_writable "$artifacts"
    # The store URI travels in the environment (mlflow server reads MLFLOW_BACKEND_STORE_URI), not in argv where
    # ps and docker inspect would show the password; user and password are percent-encoded.
    MLFLOW_BACKEND_STORE_URI=$(python -c 'import os, urllib.parse as u
q = lambda k, d: u.quote(os.environ.get(k) or d, safe="")
print("postgresql+psycopg://%s:%s@%s:%s/%s" % (q("POSTGRES_USER", "mlflow"), q("POSTGRES_PASSWORD", ""),
      os.environ.get("POSTGRES_HOST") or "db", os.environ.get("POSTGRES_PORT") or "5432", q("POSTGRES_DB", "mlflow")))') \
        || die "could not build the PostgreSQL URI from POSTGRES_*; fix: check POSTGRES_USER, POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB in docker/.env"
    export MLFLOW_BACKEND_STORE_URI
    port=${MLFLOW_PORT:-5000}
    # MLflow's own default (localhost, private IPv4 ranges) plus the compose service name 'mlflow'; a lab that opens
    # the UI by host name adds it with MLFLOW_SERVER_ALLOWED_HOSTS (docker/.env).
    default_hosts='mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*,10.*,192.168.*,172.1[6-9].*,172.2[0-9].*,172.3[01].*'
    exec mlflow server \
        --host 0.0.0.0 --port "$port" \
        --workers "${MLFLOW_WORKERS:-2}" \
        --allowed-hosts "${MLFLOW_SERVER_ALLOWED_HOSTS:-$default_hosts}" \
        --serve-artifacts --artifacts-destination "$artifacts" \
        "$@"
}

[ "$#" -gt 0 ] || set -- --help

case $1 in
    mlflow-server)
        shift
        mlflow_server "$@"
        ;;
    dask | mlflow | python | python3 | sh | bash)
        exec "$@"
        ;;
    run | prepare | train | evaluate | infer | export | benchmark)
        check_mounted "$data_dir" "$1"
        check_writable "$data_dir"
        check_writable "$runs_dir"
        exec medwsol "$@"
        ;;
    *)
        exec medwsol "$@"
        ;;
esac
