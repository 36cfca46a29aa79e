"""Shared fixtures. Real LIBERO envs are expensive (~6 s to create, ~1.5 GB): share them per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def spatial_env():
    """libero_spatial task 0, default config (lazy rendering, hard reset), shared by the session."""
    from tasks import registry
    from tasks.env import LiberoEnv

    env = LiberoEnv(registry.get_task("libero_spatial", 0))
    yield env
    env.close()
