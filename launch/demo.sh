#!/usr/bin/env bash
# The main job on the embedded default: install what is missing, then run a closed-loop LIBERO sweep
# (configs/smoke.yaml: the shipped small trained Pi0.5, 2 tasks x 2 held-out trials x 3 policy variants,
# full protocol) on local Ray and print the summary. Outputs land in runs/smoke (results.jsonl, videos/*.mp4, summary.json).
# Rerunning resumes (finished episodes are skipped); delete runs/smoke to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export MUJOCO_GL=${MUJOCO_GL:-egl}
export PYOPENGL_PLATFORM=${PYOPENGL_PLATFORM:-egl}
exec .venv/bin/libero-eval sweep configs/smoke.yaml --out "${DEMO_OUT:-runs/smoke}" "$@"
