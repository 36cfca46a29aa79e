"""Shared fixtures and the marker rules.

Markers (setup.cfg): `slow` creates a LIBERO env or starts Ray; `gpu` needs CUDA and is skipped without it.
`-m "not slow"` is the env-free suite, and that is checked, not trusted: a test not marked slow that creates
a `tasks.env.LiberoEnv` or calls `ray.init` (in this process; subprocesses are not watched) fails, naming
itself. Real LIBERO envs are expensive (~6 s to create, ~1.5 GB): share them per session (`spatial_env`).
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

# ---- gpu: skipped without CUDA


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not _cuda_available():  # torch is imported only when some test needs CUDA
        skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
        for item in gpu_items:
            item.add_marker(skip)


# ---- slow: only slow tests may create LIBERO envs or start Ray

_current: dict[str, pytest.Item | None] = {"item": None}
_violations: dict[str, list[str]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["item"] = item  # fixtures (setup), the test (call) and finalizers (teardown)
    try:
        yield
    finally:
        _current["item"] = None
        _violations.pop(item.nodeid, None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A violation fails the phase it happened in, even when the code under test swallowed the exception
    (an env error caught and stored as a result, say)."""
    outcome = yield
    report = outcome.get_result()
    found = _violations.pop(item.nodeid, None)
    if found and not report.failed:
        report.outcome = "failed"
        report.longrepr = _message(item, found[0])


def _message(item: pytest.Item, what: str) -> str:
    return (f"{item.nodeid} is not marked slow but {what}: mark it @pytest.mark.slow (it then leaves the "
            f'env-free `-m "not slow"` suite) or keep it env-free')


def _guard(owner, name: str, what: str):
    """Wrap owner.name so that a call from a test not marked slow records a violation and fails it; returns
    the undo."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def guarded(*args, **kwargs):
        item = _current["item"]
        if item is not None and item.get_closest_marker("slow") is None:
            _violations.setdefault(item.nodeid, []).append(what)
            pytest.fail(_message(item, what), pytrace=False)  # a BaseException: `except Exception` lets it by
        return original(*args, **kwargs)

    setattr(owner, name, guarded)
    return lambda: setattr(owner, name, original)


@pytest.fixture(scope="session", autouse=True)
def slow_guard():
    """Installed before any other fixture of the session (autouse, session scope)."""
    from tasks.env import LiberoEnv

    undo = [_guard(LiberoEnv, "__init__", "it creates a LIBERO env (tasks.env.LiberoEnv)")]
    try:
        import ray
    except ImportError:
        pass
    else:
        undo.append(_guard(ray, "init", "it starts Ray (ray.init)"))
    yield
    for u in reversed(undo):
        u()


# ---- shared fixtures


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The CPU is shared with LIBERO simulations; one torch thread keeps timings and runs steady."""
    import torch  # after the slow guard's setup: conftest itself stays light to import

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def spatial_env():
    """libero_spatial task 0, default config (lazy rendering, hard reset), shared by the session."""
    from tasks import registry
    from tasks.env import LiberoEnv

    env = LiberoEnv(registry.get_task("libero_spatial", 0))
    yield env
    env.close()


@pytest.fixture(scope="module")
def ray_session():
    """Ray started by the module's tests (sweep.init_ray) is shut down when the module ends."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()
