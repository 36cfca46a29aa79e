#!/usr/bin/env bash
# Install what is missing (launch/setup.sh, idempotent), then run the test suite on real LIBERO.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -m "not slow"` for the fast tests only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl}
export PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
export WANDB_MODE=${WANDB_MODE:-offline}
start=$(date +%s)
set +e
.venv/bin/python -m pytest -ra --durations=15 "$@"
rc=$?
set -e
echo "[test] pytest exit code $rc after $(( $(date +%s) - start )) s"
if [ "$rc" -eq 5 ]; then
  echo "[test] no tests were collected: treating as failure" >&2
  exit 1
fi
exit "$rc"
