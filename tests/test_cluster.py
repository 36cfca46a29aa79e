"""Sweeps on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a head and two
worker nodes, logical CPUs and GPUs), joined through `ray.address` with the project's code shipped as
Ray's working_dir: actors land on several nodes, the driver alone writes the run directory, a worker node
removed mid-sweep loses nothing, a resume on a smaller cluster runs with the workers that fit, replicas
are placed on logical GPUs, and a replica given a GPU without CUDA fails loudly."""
from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from libero_eval import driver
from libero_eval.config import ConfigError, load_config
from libero_eval.sweep import run_sweep
from tests.test_faults import assert_nothing_lost, attempts, on_thread, wait_for

pytestmark = pytest.mark.slow
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture
def make_cluster():
    """A local multi-node Ray cluster (the caller adds the nodes); Ray is shut down around it."""
    if ray.is_initialized():
        ray.shutdown()
    made: list[Cluster] = []

    def make(head_cpus: int, *nodes: dict) -> tuple[Cluster, list]:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus})
        added = [c.add_node(**node) for node in nodes]
        c.wait_for_nodes()
        made.append(c)
        return c, added

    yield make
    if ray.is_initialized():
        ray.shutdown()
    for c in made:
        c.shutdown()


class _Spy:
    """Records the constructor arguments of every RolloutWorker the sweep creates (the real actor runs)."""

    def __init__(self, real):
        self.real, self.args = real, []

    def options(self, **opts):
        real = self.real.options(**opts)
        spy = self

        class _Remote:
            def remote(self, *args, **kwargs):
                spy.args.append((args, kwargs))
                return real.remote(*args, **kwargs)

        return _Remote()


def test_a_worker_node_removed_mid_sweep_loses_nothing_and_the_driver_alone_writes(make_cluster, tmp_path,
                                                                                   monkeypatch):
    c, nodes = make_cluster(1, {"num_cpus": 2}, {"num_cpus": 2})
    out = tmp_path / "multinode"
    config = load_config(CONFIGS / "hold_smoke.yaml", [
        "trials=3", "max_steps=30", f"ray.address={c.address}", "ray.start_timeout_s=60", "episode.video=query"])
    spy = _Spy(driver.RolloutWorker)
    monkeypatch.setattr(driver, "RolloutWorker", spy)
    removed: dict = {}
    joins = []

    def remove_a_worker_node(workers, policy_actor):
        def run():
            wait_for(lambda: (out / "results.jsonl").exists() and len((out / "results.jsonl").read_text().splitlines()) >= 2,
                     300, "two stored results", 0.2)
            replica_node = ray.get(policy_actor.describe.remote(), timeout=30)["node_id"]
            by_node = {n.node_id: n for n in nodes}
            for w in list(workers):
                node_id = ray.get(w.describe.remote(), timeout=30)["node_id"]
                if node_id in by_node and node_id != replica_node:
                    removed["node"] = node_id
                    c.remove_node(by_node[node_id], allow_graceful=False)  # its raylet and actors die now
                    return node_id
            raise AssertionError("no rollout worker on a worker node without the replica")

        joins.append(on_thread(run))

    outcome = run_sweep(config, out, progress=False, on_start=remove_a_worker_node)
    joins[0](timeout=120)
    rows = assert_nothing_lost(out, config)
    assert len(rows) == 6 and outcome.not_run == 0
    retried = attempts(out)
    assert retried and {a["reason"] for a in retried} <= {"worker_died", "policy_unavailable"}, retried
    nodes_used = {r.env_stats["node"] for r in outcome.results}
    assert len(nodes_used) >= 2 and removed["node"][:12] in nodes_used  # actors on several nodes
    assert outcome.utilisation["episodes"] == 6 and len(outcome.utilisation["workers"]) == 2
    # rollout workers were never given the run directory: nothing they were constructed with names it
    assert spy.args and all(str(out) not in repr(a) and str(out).encode() not in pickle.dumps(a) for a in spy.args)
    # the driver wrote every file, atomically: no temporary names left
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.partial.mp4"))


def test_a_resume_on_a_smaller_cluster_runs_with_the_workers_that_fit(make_cluster, tmp_path, capsys):
    """Interrupted on a 4-CPU cluster (3 workers fit beside the replica), resumed after its worker node is
    gone (2 CPUs: 1 worker fits): the resume runs with 1 worker, says so, and stores every episode once."""
    c, (node,) = make_cluster(2, {"num_cpus": 2})
    out = tmp_path / "shrink"
    config = load_config(CONFIGS / "hold_smoke.yaml", [
        "suites={libero_spatial: [0]}", "trials=4", "max_steps=8", f"ray.address={c.address}", "ray.num_workers=4",
        "env.render_device=cpu"])  # Mesa's EGL only, set through each worker's own runtime env

    def interrupt(result):
        raise KeyboardInterrupt  # the driver stopped after its first stored result

    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, out, progress=False, on_result=interrupt)
    first = capsys.readouterr().out
    assert "rollout workers: 3 of ray.num_workers=4 (the cluster has 4 CPUs" in first
    c.remove_node(node)
    c.wait_for_nodes(timeout=90)  # the GCS sees the node dead: the cluster's resources no longer count it
    ray.shutdown()
    outcome = run_sweep(config, out, progress=False)
    printed = capsys.readouterr().out
    assert "resuming" in printed and "rollout workers: 1 of ray.num_workers=4 (the cluster has 2 CPUs" in printed
    assert outcome.ran == 3 and outcome.not_run == 0
    assert "rendering on cpu (Mesa EGL)" in printed
    assert_nothing_lost(out, config)


def test_replicas_on_logical_gpus(make_cluster, tmp_path, capsys):
    """Two fake GPU nodes (num_gpus: logical, no CUDA here). model.device cpu: replicas are planned but take
    no GPU, and serve a sweep. model.device auto: one replica per GPU is planned, each reserves a GPU, and the
    replica fails loudly because its node has no CUDA. env.render_device gpu: every worker runs on a GPU node
    (the head has none), rendering on that node's EGL device 0."""
    c, gpu_nodes = make_cluster(2, {"num_cpus": 2, "num_gpus": 1}, {"num_cpus": 2, "num_gpus": 1})
    base = ["model.kind=tiny", "suites={libero_spatial: [0]}", "trials=2", "max_steps=10", "wandb.enabled=false",
            f"ray.address={c.address}", "policies=[{name: none, num_steps: 2}]", "ray.num_workers=2"]
    config = load_config(None, [*base, "model.device=cpu", "ray.policy_replicas=2"])
    outcome = run_sweep(config, tmp_path / "cpu_replicas", progress=False)
    assert outcome.ran == 2
    replicas = outcome.actor_stats["replicas"]
    assert len(replicas) == 2 and sum(r["requests"] for r in replicas) == outcome.actor_stats["requests"] > 0
    assert all(r["requests"] > 0 for r in replicas)  # two concurrent episodes: one on each replica
    printed = capsys.readouterr().out
    assert "policy replica 1:" in printed and "model on cpu" in printed
    render = load_config(CONFIGS / "hold_smoke.yaml", [
        "trials=3", "max_steps=8", f"ray.address={c.address}", "env.render_device=gpu", "ray.start_timeout_s=30",
        "ray.num_workers=4"])
    outcome = run_sweep(render, tmp_path / "gpu_render", progress=False)
    assert outcome.ran == 6 and outcome.not_run == 0 and len(outcome.utilisation["workers"]) == 3
    assert {r.env_stats["node"] for r in outcome.results} <= {n.node_id[:12] for n in gpu_nodes}
    printed = capsys.readouterr().out
    assert "rollout workers: 3 of ray.num_workers=4 (the cluster's GPU nodes (env.render_device: gpu) have 4 CPUs" in printed
    assert "rendering on gpu 0 of 1 (EGL)" in printed
    auto = load_config(None, [*base, "model.device=auto"])
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="was given a GPU but CUDA is not available"):
        run_sweep(auto, tmp_path / "auto_replicas", progress=False)
    assert time.perf_counter() - t0 < 300
