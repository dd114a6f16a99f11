#!/usr/bin/env bash
# Starts a throwaway MLflow tracking server for the tracking tests (tests/mlflow_server.rs) and
# provides the Python that tests/tensorboard_read.rs needs, both from one pinned venv.
#
#   scripts/start-mlflow.sh start VENV_DIR PORT DATA_DIR   # prints the server PID (last line)
#   scripts/start-mlflow.sh stop DATA_DIR                  # stops the server started there
#
# Then: PEFT_WIT_TEST_MLFLOW_URI=http://127.0.0.1:PORT PEFT_WIT_TEST_PYTHON=VENV_DIR/bin/python
# Env: PYTHON (interpreter for the venv, default python3), MLFLOW_START_TIMEOUT (s, default 60).
set -euo pipefail

MLFLOW_PIN="mlflow==3.17.2"
TENSORBOARD_PIN="tensorboard==2.21.0"

die() { echo "start-mlflow.sh: $*" >&2; exit 1; }

ensure_venv() {
    local venv=$1
    if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" - <<'PY' 2>/dev/null; then
import importlib.metadata as m, sys
sys.exit(0 if (m.version("mlflow"), m.version("tensorboard")) == ("3.17.2", "2.21.0") else 1)
PY
        return
    fi
    echo "creating $venv with $MLFLOW_PIN $TENSORBOARD_PIN" >&2
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$MLFLOW_PIN" "$TENSORBOARD_PIN" >&2
}

start() {
    local venv=$1 port=$2 data=$3
    ensure_venv "$venv"
    mkdir -p "$data/artifacts"
    data=$(cd "$data" && pwd)
    [[ -f "$data/mlflow.pid" ]] && kill -0 "$(cat "$data/mlflow.pid")" 2>/dev/null &&
        die "a server from $data is already running (pid $(cat "$data/mlflow.pid"))"
    # No background job runner: the tests need only tracking and artifacts, and CI has 2 cores.
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$venv/bin/mlflow" server \
        --host 127.0.0.1 --port "$port" --workers 1 \
        --backend-store-uri "sqlite:///$data/mlflow.db" \
        --artifacts-destination "$data/artifacts" \
        >"$data/server.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" >"$data/mlflow.pid"
    local timeout=${MLFLOW_START_TIMEOUT:-60} start=$SECONDS
    until "$venv/bin/python" -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)" \
        "http://127.0.0.1:$port/health" 2>/dev/null; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS - start >= timeout)); then
            tail -n 30 "$data/server.log" >&2
            stop "$data"
            die "mlflow server on port $port not healthy after $((SECONDS - start)) s"
        fi
        sleep 0.5
    done
    echo "mlflow server healthy on http://127.0.0.1:$port after $((SECONDS - start)) s" >&2
    echo "$pid"
}

stop() {
    local data=$1 pid
    [[ -f "$data/mlflow.pid" ]] || return 0
    pid=$(cat "$data/mlflow.pid")
    rm -f "$data/mlflow.pid"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    # setsid made the server its own process group: kill what is left of it.
    kill -KILL -- "-$pid" 2>/dev/null || true
}

case "${1:-}" in
start) (($# == 4)) || die "usage: $0 start VENV_DIR PORT DATA_DIR"; start "$2" "$3" "$4" ;;
stop) (($# == 2)) || die "usage: $0 stop DATA_DIR"; stop "$2" ;;
*) die "usage: $0 start VENV_DIR PORT DATA_DIR | stop DATA_DIR" ;;
esac
