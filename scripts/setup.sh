#!/usr/bin/env bash
# Creates ./.venv with the pinned test/demo environment (requirements-test.txt), once.
# Re-running is cheap: it reinstalls only when requirements-test.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
stamp=.venv/.requirements-test.sha256
want=$(sha256sum requirements-test.txt | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] creating .venv with $($PYTHON --version) and the pinned environment (first run: a few minutes)" >&2
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements-test.txt
echo "$want" > "$stamp"
echo "[setup] done" >&2
