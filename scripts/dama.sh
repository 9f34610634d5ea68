#!/usr/bin/env bash
# The two commands of the README, on a fresh machine with Python 3.11+:
#   scripts/dama.sh demo [--exit-after-demo]  start the service, run the demo DAMA job through its API, keep serving
#   scripts/dama.sh test [PYTEST ARGS]        lint, type-check and run the whole test suite
# Each creates (or reuses) a virtualenv in .venv and installs what the project needs, torch included.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DAMA_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# torch 2.14.1 + torchvision 0.29.1: the Qwen2-VL processors need torchvision. Override for another build,
# e.g. DAMA_TORCH_SPEC="torch==2.13.0" (no Qwen2-VL) or a CUDA build from PyTorch's own index (README).
TORCH_SPEC="${DAMA_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
EXTRAS="${DAMA_EXTRAS:-engine,service,dev}"

bootstrap() {
    "$PYTHON" - <<'PY' || { echo "error: Python >= 3.11 is required (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    local stamp="$VENV/.dama-install-stamp"
    local want
    want="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/dama.sh" | sha256sum | cut -d' ' -f1) $TORCH_SPEC $EXTRAS"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "==> installing into $VENV (torch: $TORCH_SPEC; extras: $EXTRAS)"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        # shellcheck disable=SC2086
        "$VENV/bin/python" -m pip install -q $TORCH_SPEC
        "$VENV/bin/python" -m pip install -q -e "$ROOT[$EXTRAS]"
        echo "$want" > "$stamp"
    fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
    demo)
        bootstrap
        cd "$ROOT"
        exec "$VENV/bin/dama" serve --demo "$@"
        ;;
    test)
        bootstrap
        cd "$ROOT"
        "$VENV/bin/ruff" check .
        "$VENV/bin/ruff" format --check .
        "$VENV/bin/mypy"
        # pytest exits 5 when it collects no test: that must fail, never pass silently.
        set +e
        # Two pytest-xdist workers (the machine's 2 cores; DAMA_TEST_WORKERS=0 runs in one process): each has its
        # own Postgres and Redis databases, and they build the proving ground once between them (tests/conftest.py).
        "$VENV/bin/python" -m pytest -n "${DAMA_TEST_WORKERS:-2}" "$@"
        rc=$?
        set -e
        if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
        exit "$rc"
        ;;
    *)
        echo "usage: scripts/dama.sh demo [--exit-after-demo] | scripts/dama.sh test [PYTEST ARGS]" >&2
        exit 2
        ;;
esac
