#!/usr/bin/env bash
# The main job on the embedded default: install what is missing, then run capped closed-loop LIBERO
# episodes on CPU and print the summary. Outputs land in runs/demo (results.jsonl, videos/*.mp4).
# Rerunning resumes (finished episodes are skipped); delete runs/demo to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl}
export PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
exec .venv/bin/libero-eval run --suite libero_spatial --tasks 0,1 --trials 2 --max-steps 40 \
  --policy hold --out "${DEMO_OUT:-runs/demo}" "$@"
