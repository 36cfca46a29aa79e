"""Sweeps against a served policy (`model.kind: openpi_server`): against a `libero-eval serve` process they
reproduce the in-process sweep episode for episode (successes, steps, decisions, signals, seeds); against a
foreign openpi server only openpi's keys are sent and the frames say the noise is the server's."""
from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import websockets.asyncio.server
from openpi_client import msgpack_numpy

from libero_eval.config import ConfigError, load_config
from libero_eval.report import write_report
from libero_eval.sweep import run_sweep
from policies.serving.core import WARMUP_OBSERVATION
from policies.serving.engine import Request
from policies.serving.model import ModelConfig, make_engine
from policies.serving.openpi_remote import describe_server, server_metadata
from policies.serving.variants import PolicyVariant
from tests.helpers import read_results

ROOT = Path(__file__).resolve().parents[1]
POLICY = "adaptive:window=3,pixel_mae=6.5"  # the held-out episodes below succeed under it (README table)
COMMON = ["suites={libero_spatial: [0]}", "trials=[42, 43]", "latency=thor_trt_fp8", "ray.num_workers=1",
          "wandb.enabled=false"]


@pytest.fixture()
def served():
    """`libero-eval serve` as its own process (the shipped small Pi0.5, one torch thread as a sweep's CPU
    policy actor has); yields its ws:// address."""
    proc = subprocess.Popen([sys.executable, "-m", "libero_eval.cli", "serve", "--policy", POLICY, "--port", "0",
                             "--threads", "1"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        found = re.search(r"on (ws://127\.0\.0\.1:\d+)", line)
        assert found, line + proc.stdout.read()
        yield found.group(1)
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_a_sweep_against_libero_eval_serve_reproduces_the_in_process_sweep(served, tmp_path):
    local = load_config(None, [*COMMON, "name=inproc", "model.kind=checkpoint",
                               "model.checkpoint=policies/pi05/assets/pi05_small_spatial01",
                               "policies=[{name: adaptive, window: 3, pixel_mae: 6.5, label: adaptive}]"])
    remote = load_config(None, [*COMMON, "name=served", "model.kind=openpi_server", f"model.url={served}",
                                "policies=[{name: served, label: adaptive}]"])
    assert server_metadata(served)["variant"]["name"] == "adaptive"
    run_sweep(local, tmp_path / "inproc", progress=False)
    run_sweep(remote, tmp_path / "served", progress=False)
    ours, theirs = (sorted(read_results(tmp_path / d), key=lambda r: r["key"]) for d in ("inproc", "served"))
    assert [r["key"] for r in ours] == [r["key"] for r in theirs] and len(ours) == 2
    assert all(r["success"] for r in ours)  # a reproduction of successes, not only of failures at max_steps
    for a, b in zip(ours, theirs):
        assert (a["status"], a["steps"], a["seed"]) == (b["status"], b["steps"], b["seed"])
        assert [(q["decision"], q["reason"], q["signals"], q["env_step"], q["cost_ms"]) for q in a["records"]] == \
               [(q["decision"], q["reason"], q["signals"], q["env_step"], q["cost_ms"]) for q in b["records"]]
        assert all(q["extra"]["remote"]["server"] == "libero-eval" for q in b["records"])
    write_report(tmp_path / "served")
    assert "foreign openpi server" not in (tmp_path / "served" / "summary.md").read_text()


@pytest.mark.slow
def test_openpis_libero_example_loop_runs_against_libero_eval_serve(served):
    """The loop of openpi's examples/libero/main.py, unmodified in what it sends: one WebsocketClientPolicy for
    every episode, 10 settling steps, then a query every 5 steps for openpi's LIBERO keys, no episode marks.
    The server starts a session (a full frame) per episode on its own: first request, then the reset's jump."""
    # openpi-client and LIBERO: this test only
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    from tasks import registry
    from tasks.env import EnvConfig, LiberoEnv
    from tasks.protocol import AGENTVIEW, WRIST, model_image, state_vector

    client = WebsocketClientPolicy(host=served)
    task = registry.get_task("libero_spatial", 0)
    starts, queries = [], 0
    with LiberoEnv(task, EnvConfig()) as env:
        for trial in (42, 43):
            raw = env.reset(0, registry.init_state("libero_spatial", 0, trial), observe=True, trial=trial)
            plan: list = []
            for t in range(task.max_steps + 10):
                if t < 10:  # openpi lets objects settle with a do-nothing action first
                    env.expect_observation(1)
                    raw, _ = env.step([0, 0, 0, 0, 0, 0, -1])
                    continue
                if not plan:
                    reply = client.infer({"observation/image": model_image(raw[AGENTVIEW]),
                                          "observation/wrist_image": model_image(raw[WRIST]),
                                          "observation/state": state_vector(raw), "prompt": task.language})
                    queries += 1
                    record = reply["libero_eval"]
                    if record["new_session"] is not None:
                        starts.append((trial, record["new_session"], record["decision"], record["index"]))
                    plan = list(reply["actions"][:5])
                    env.expect_observation(len(plan))
                raw, done = env.step(plan.pop(0))
                if done or env.check_success():
                    break
    assert starts == [(42, "first_request", "full", 0), (43, "state_jump", "full", 0)]
    assert queries > 40


def test_served_variants_need_a_server_and_the_server_keeps_its_cache_policy():
    with pytest.raises(ConfigError, match="cache policy and denoising are the server's"):
        load_config(None, ["model.kind=openpi_server", "model.url=ws://127.0.0.1:1", "latency=measured",
                           "policies=[{name: fixed_window, window: 3}]"])
    with pytest.raises(ConfigError, match="calibrated times the model on the policy actor's device"):
        load_config(None, ["model.kind=openpi_server", "model.url=ws://127.0.0.1:1", "policies=[{name: served}]"])
    with pytest.raises(ConfigError, match="set model.kind: openpi_server and model.url"):
        load_config(None, ["policies=[{name: served}]"])
    with pytest.raises(ConfigError, match="ws://host:port"):
        load_config(None, ["model.kind=openpi_server", "model.url=127.0.0.1:8000", "policies=[{name: served}]"])


def test_an_unreachable_server_fails_the_sweep_before_ray_starts(tmp_path):
    config = load_config(None, ["model.kind=openpi_server", "model.url=ws://127.0.0.1:9", "latency=measured",
                                "policies=[{name: served}]", "wandb.enabled=false"])
    with pytest.raises(ConfigError, match="model.url: cannot connect to the openpi server at ws://127.0.0.1:9"):
        run_sweep(config, tmp_path / "run", progress=False)


def _foreign_server(received: list, ready: threading.Event, port: list):
    """A stand-in for a foreign openpi server (openpi's serve_policy.py speaks the same protocol): metadata
    without libero-eval's marker, zero actions, and its own server_timing."""
    async def handler(ws):
        await ws.send(msgpack_numpy.packb({"policy": "pi05_libero"}))
        async for message in ws:
            received.append(msgpack_numpy.unpackb(message))
            await ws.send(msgpack_numpy.packb({"actions": np.zeros((10, 7)), "server_timing": {"infer_ms": 1.5}}))

    async def main():
        async with websockets.asyncio.server.serve(handler, "127.0.0.1", 0) as server:
            port.append(next(iter(server.sockets)).getsockname()[1])
            ready.set()
            await asyncio.sleep(30)

    asyncio.run(main())


def test_a_foreign_server_gets_openpis_keys_only_and_its_frames_say_so():
    received, ready, port = [], threading.Event(), []
    threading.Thread(target=_foreign_server, args=(received, ready, port), daemon=True).start()
    assert ready.wait(10)
    url = f"ws://127.0.0.1:{port[0]}"
    assert "not paired by seed" in describe_server(server_metadata(url))
    variant = PolicyVariant.make("served", "served", {}, {"latency": "measured"})
    engine = make_engine(ModelConfig(kind="openpi_server", url=url), [variant])
    engine.open("ep", variant, 7)
    (chunk,) = engine.infer_batch([Request("ep", {**WARMUP_OBSERVATION, "env_step": 0})])
    engine.close("ep")
    assert sorted(received[-1]) == ["observation/image", "observation/state", "observation/wrist_image", "prompt"]
    record = chunk.record
    assert chunk.actions.shape == (10, 7) and (record.decision, record.reason) == ("full", "remote")
    assert record.extra["remote_noise"] and record.extra["compute"]["velocity_evals"] == 10
    assert record.extra["remote"]["server_timing"] == {"infer_ms": 1.5} and record.latency_ms["total"] > 0


def test_a_server_that_goes_away_mid_episode_is_an_infrastructure_failure():
    """Stop a real `libero-eval serve` (in a thread) while a session is open on it: the next request fails
    as ServerUnavailable, a SessionLost, which a sweep retries as an infrastructure error (never an outcome)."""
    # the server side: this test only
    import argparse

    from libero_eval.serve import build, make_server, serving_in_thread
    from policies.serving.engine import SessionLost
    from policies.serving.openpi_remote import ServerUnavailable

    args = argparse.Namespace(config=None, overrides=["model.kind=tiny"], variant=None, policy=None, checkpoint=None,
                              host="127.0.0.1", port=0, api_key=None, insecure=False, max_message_mb=8.0, threads=None)
    config, variant, options = build(args)
    config.model.kind = "tiny"
    served = PolicyVariant.make("served", "served", {}, {"latency": "measured"})
    with serving_in_thread(make_server(config, variant, options)) as port:
        engine = make_engine(ModelConfig(kind="openpi_server", url=f"ws://127.0.0.1:{port}"), [served])
        engine.open("ep", served, 3)
        (first,) = engine.infer_batch([Request("ep", dict(WARMUP_OBSERVATION))])
        assert first.record.extra["remote"]["server"] == "libero-eval" and first.record.decision == "full"
    (lost,) = engine.infer_batch([Request("ep", dict(WARMUP_OBSERVATION))])  # the server is gone
    assert isinstance(lost, ServerUnavailable) and isinstance(lost, SessionLost)
    with pytest.raises(ServerUnavailable, match="cannot connect"):
        engine.open("ep2", served, 4)
