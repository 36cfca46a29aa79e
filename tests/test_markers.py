"""The marker rules of tests/conftest.py hold: a test not marked `slow` that creates a LIBERO env or starts
Ray fails and names itself (even when the code under test swallows the error), a slow one may, and `gpu`
tests are skipped without CUDA. Checked on a small inner pytest run that loads tests/conftest.py."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

INNER = '''
import pytest

from tasks.env import LiberoEnv


def test_env_free():
    assert LiberoEnv.__name__ == "LiberoEnv"  # naming the class is fine; creating one is not


def test_creates_env():
    LiberoEnv(None)


def test_swallows_the_failure():
    try:
        LiberoEnv(None)
    except BaseException:  # the guard's failure is recorded before it is raised
        pass


def test_starts_ray():
    import ray

    ray.init(num_cpus=1)


@pytest.fixture
def env_fixture():
    return LiberoEnv(None)


def test_through_a_fixture(env_fixture):
    pass


@pytest.mark.slow
def test_slow_may_create_env():
    with pytest.raises(AttributeError, match="lazy_render"):  # the real __init__ runs (and stops early)
        LiberoEnv(None, config=object())


@pytest.mark.gpu
def test_needs_cuda():
    import torch

    assert torch.cuda.is_available()
'''


def _outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        status, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status, message = tag, (node.get("message") or "") + (node.text or "")
                break
        out[case.get("name")] = (status, message)
    return out


def test_marker_rules_are_enforced(tmp_path):
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER))
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider", "-c",
         str(ROOT / "setup.cfg"), "--rootdir", str(tmp_path), "-q", f"--junitxml={junit}", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert junit.exists(), proc.stdout + proc.stderr
    got = _outcomes(junit)
    report = proc.stdout[-4000:]
    assert got["test_env_free"][0] == "passed", report
    assert got["test_slow_may_create_env"][0] == "passed", report
    for name, what in [("test_creates_env", "creates a LIBERO env"), ("test_swallows_the_failure", "creates a LIBERO env"),
                       ("test_starts_ray", "starts Ray (ray.init)"), ("test_through_a_fixture", "creates a LIBERO env")]:
        status, message = got[name]
        assert status in ("failure", "error"), (name, report)
        assert f"test_inner.py::{name} is not marked slow but it {what}" in message, (name, message)
    import torch

    assert got["test_needs_cuda"][0] == ("passed" if torch.cuda.is_available() else "skipped"), report
    if not torch.cuda.is_available():
        assert "needs CUDA" in got["test_needs_cuda"][1]
