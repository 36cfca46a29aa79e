#!/usr/bin/env bash
# Idempotent setup: Debian packages for headless EGL rendering, a virtualenv at .venv,
# `pip install -e ".[dev]"`, and LIBERO's config file written without a prompt.
# Re-running it is cheap: every step checks whether it is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=${LIBERO_EVAL_VENV:-$ROOT/.venv}

say() { printf '[setup] %s\n' "$*"; }

# 1. Debian packages: Mesa's software EGL (MuJoCo renders through it on CPU machines), and chromium (the
#    report test renders report.html headless).
need_apt=()
for pkg in libegl1 libegl-mesa0 libgl1-mesa-dri libglvnd0 libgles2 chromium; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: ${need_apt[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    say "WARNING: missing Debian packages ${need_apt[*]} (need root + apt-get); rendering may fail"
  fi
fi

# 2. Virtualenv.
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtualenv at $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"

# 3. The package and its dependencies (skipped when the installed set already matches setup.cfg).
stamp="$VENV/.libero_eval_installed"
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing libero-eval and dependencies into $VENV (first time: a few minutes, ~2.5 GB)"
  "$VPY" -m pip install -q --upgrade "pip>=24" "setuptools>=68" wheel
  # torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
  "$VPY" -m pip install -q "torch==2.13.0"
  "$VPY" -m pip install -q -e ".[dev]"
  "$VPY" -m pip check
  echo "$want" > "$stamp"
else
  say "python packages up to date"
fi

# 4. LIBERO's config file (paths to its bundled assets), written without the interactive prompt.
"$VPY" -m tasks.libero_config --quiet
say "ready: $VENV"
