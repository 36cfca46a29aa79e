"""The sweep driver's state machine without Ray: `SweepDriver` runs against a small discrete-event stand-in
for Ray (actors run their calls in order on a simulated clock; killing an actor fails what it had queued).
Worker queues, losses and replacements, dropped slots, deadlines, replica probes and timeouts are checked
here in milliseconds; the same paths run for real in tests/test_cluster.py and tests/test_faults.py."""
from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import ray

from libero_eval import dispatch, driver
from libero_eval.config import ConfigError, load_config
from libero_eval.driver import SweepDriver, SweepOutcome
from libero_eval.specs import EpisodeResult, infra_error
from libero_eval.store import ResultStore
from libero_eval.sweep import plan_episodes

EPISODE_S = 10.0
LAG = 0.05  # a call reaches its actor this long after it is made


class Ref:
    def __init__(self, ready_at: float, value=None, error: BaseException | None = None):
        self.ready_at, self.value, self.error = ready_at, value, error


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


class Actor:
    """A stand-in actor: `name.remote(...)` calls run in submission order, each taking `cost(name, args)`
    simulated seconds (math.inf: never returns), answered by `answer(name, args)` (an exception: raised)."""

    def __init__(self, sim: "Sim", kind: str, index: int, options: dict):
        self.sim, self.kind, self.index, self.options = sim, kind, index, options
        self.free_at = sim.clock.now
        self.refs: list[Ref] = []
        self.dead = False
        self.calls: list[tuple[str, tuple]] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of each `run`

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return types.SimpleNamespace(remote=lambda *args: self.call(name, args))

    def call(self, name: str, args: tuple) -> Ref:
        self.calls.append((name, args))
        if self.dead:
            return Ref(self.sim.clock.now, error=ray.exceptions.RayActorError(error_msg="the actor is dead"))
        start = max(self.sim.clock.now + LAG, self.free_at)
        cost = self.sim.cost(self, name, args)
        self.free_at = start + cost
        if name == "run":
            self.spans.append((start, self.free_at))
        value, error = None, None
        try:
            value = self.sim.answer(self, name, args)
        except Exception as exc:
            error = exc
        ref = Ref(self.free_at, value, error)
        self.refs.append(ref)
        return ref

    def kill(self, queued_first: bool = False) -> None:
        """Dead now: what it was running or had queued fails (Ray does not order those failures; with
        `queued_first` the driver sees the queued ones' first)."""
        self.dead, self.killed_at = True, self.sim.clock.now
        failing = [ref for ref in self.refs if ref.ready_at > self.sim.clock.now]
        for n, ref in enumerate(reversed(failing) if queued_first else failing):
            ref.ready_at, ref.value = self.sim.clock.now + 1e-6 * n, None
            ref.error = ray.exceptions.RayActorError(error_msg="the actor died unexpectedly")


class Sim:
    """The parts of Ray the driver uses, on a simulated clock."""

    exceptions = ray.exceptions

    def __init__(self, cpus: float = 3.0):
        self.clock = Clock()
        self.cpus = cpus
        self.node_list: list[dict] = []  # ray.nodes()
        self.workers: list[Actor] = []
        self.replicas: list[Actor] = []
        self.episode_cost = lambda actor, spec: EPISODE_S
        self.start_cost = lambda actor: 1.0
        self.replica_load_s = 0.01  # a replica's constructor (the model load)
        self.replica_node = "0" * 56  # where the replicas are placed
        self.replica_down = lambda actor, now: False  # policy_unavailable answers and failed pings
        self.events: list[tuple[float, object]] = []  # (at, fn): run once the clock passes `at`

    # what the driver calls
    def cluster_resources(self) -> dict:
        return {"CPU": self.cpus, "GPU": sum(n["Resources"].get("GPU", 0) for n in self.node_list if n["Alive"])}

    def nodes(self) -> list[dict]:
        return self.node_list

    def get(self, ref: Ref, timeout: float | None = None):
        self.advance(ref.ready_at if timeout is None else min(ref.ready_at, self.clock.now + timeout))
        if ref.ready_at > self.clock.now:
            raise ray.exceptions.GetTimeoutError("timed out")
        if ref.error is not None:
            raise ref.error
        return ref.value

    def wait(self, refs: list[Ref], num_returns: int = 1, timeout: float | None = None):
        first = min(refs, key=lambda r: r.ready_at)
        horizon = self.clock.now + (timeout if timeout is not None else math.inf)
        if first.ready_at <= horizon:
            self.advance(first.ready_at)
            return [first], [r for r in refs if r is not first]
        self.advance(horizon)
        return [], refs

    def kill(self, actor: Actor, no_restart: bool = True) -> None:
        actor.kill()

    def advance(self, to: float) -> None:
        for at, fn in sorted(self.events, key=lambda e: e[0]):
            if at <= to and at >= self.clock.now:
                self.clock.now = at
                self.events.remove((at, fn))
                fn()
        self.clock.now = max(self.clock.now, to)

    # the actors' behaviour
    def cost(self, actor: Actor, name: str, args: tuple) -> float:
        if actor.kind == "worker" and name == "run":
            return self.episode_cost(actor, args[0])
        if actor.kind == "worker" and name == "describe":
            return self.start_cost(actor)
        if actor.kind == "replica" and name == "pid":
            return self.replica_load_s
        return 0.01

    def answer(self, actor: Actor, name: str, args: tuple):
        if actor.kind == "replica":
            if name == "ping" and self.replica_down(actor, self.clock.now):
                raise ray.exceptions.RayActorError(error_msg="The actor is restarting.")
            return {"describe": {"device": "cpu", "backend": "none", "threads": 1, "torch": "-", "warmup_ms": 0,
                                 "host": "sim", "node_ip": "127.0.0.1", "node_id": self.replica_node},
                    "stats": {"requests": 0, "batches": 0}}.get(name)
        if name == "describe":
            return {"node_id": "n" * 12, "host": "sim", "node_ip": "127.0.0.1", "render_device": "cpu"}
        spec, attempt, _latency, k = args
        if self.replica_down(self.replicas[k], self.clock.now):
            return infra_error(spec, "policy_unavailable", RuntimeError("replica restarting"), attempt).to_dict(), {}
        result = EpisodeResult(key=spec.key, suite=spec.suite, task_id=spec.task_id, task_name="t", trial=spec.trial,
                               policy_label=spec.policy_label, seed=spec.seed, status="failure", success=False,
                               reason="max_steps", steps=spec.max_steps, wall_s=EPISODE_S, attempt=attempt,
                               env_stats={"reset_s": 1.0, "step_s": 8.0})
        return result.to_dict(), {}

    def actor_class(self, kind: str):
        sim = self

        class Factory:
            @staticmethod
            def options(**opts):
                def remote(*args):
                    pool = sim.workers if kind == "worker" else sim.replicas
                    actor = Actor(sim, kind, len(pool), opts)
                    actor.args = args
                    pool.append(actor)
                    return actor
                return types.SimpleNamespace(remote=remote)
        return Factory


@pytest.fixture
def sim(monkeypatch):
    s = Sim()
    monkeypatch.setattr(driver, "ray", s)
    monkeypatch.setattr(driver, "time", s.clock)
    monkeypatch.setattr(dispatch, "time", s.clock)
    monkeypatch.setattr(driver, "PolicyActor", s.actor_class("replica"))
    monkeypatch.setattr(driver, "RolloutWorker", s.actor_class("worker"))
    return s


def sweep(tmp_path: Path, *overrides: str):
    """A driver over 12 hold episodes (2 tasks x 6 init states), its store and outcome."""
    config = load_config(None, ["policies=[{name: hold}]", "suites={libero_spatial: [0, 1]}", "trials=6",
                                "max_steps=20", "wandb.enabled=false", "latency=measured", "ray.worker_queue=2",
                                *overrides])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    store = ResultStore(run_dir)
    todo = plan_episodes(config)
    outcome = SweepOutcome(run_dir, [], len(todo), 0, 0, 0.0, {})
    d = SweepDriver(config, run_dir, store, todo, len(todo), outcome, False, False, None, None)
    return d, store, outcome


def stored_once(store: ResultStore, n: int) -> list[EpisodeResult]:
    rows = store.load()
    assert len(rows) == n and len({r.key for r in rows}) == n
    assert all(r.status == "failure" for r in rows)
    return rows


def attempts(run_dir: Path) -> list[dict]:
    path = run_dir / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_each_worker_gets_its_next_episode_ahead_and_the_last_ones_never_queue(sim, tmp_path):
    d, store, outcome = sweep(tmp_path, "ray.num_workers=2")
    d.run()
    stored_once(store, 12)
    runs = [[args[0].key for name, args in w.calls if name == "run"] for w in sim.workers]
    assert sorted(sum(runs, [])) == sorted(r.key for r in store.load())
    assert [len(r) for r in runs] == [6, 6]
    # each episode started the moment its predecessor ended (no round trip through the driver), except the
    # last one: with fewer episodes left than workers it went to a worker with nothing queued
    for w in sim.workers:
        gaps = [start - end for (_, end), (start, _) in zip(w.spans, w.spans[1:])]
        assert gaps[:-1] == [0.0] * 4 and gaps[-1] in (0.0, pytest.approx(LAG)), w.spans
    assert sorted(w.spans[-1][0] - w.spans[-2][1] for w in sim.workers) == [0.0, pytest.approx(LAG)]
    # each worker kept to its task (its env is reused)
    assert all(len({k.split("/")[2] for k in r}) == 1 for r in runs)
    assert outcome.ran == 12 and outcome.retries == 0


def test_worker_queue_1_hands_out_one_episode_at_a_time(sim, tmp_path):
    d, store, _ = sweep(tmp_path, "ray.num_workers=2", "ray.worker_queue=1")
    seen = []
    original = d.submit

    def spy(i):
        original(i)
        seen.append(max(len(q) for q in d.queues.values()))
    d.submit = spy
    d.run()
    stored_once(store, 12)
    assert max(seen) == 1
    for w in sim.workers:  # each episode waited for the driver to see the last one end
        assert all(start == pytest.approx(end + LAG) for (_, end), (start, _) in zip(w.spans, w.spans[1:]))


def test_a_killed_worker_retries_its_running_episode_and_hands_out_the_queued_one_without_an_attempt(sim, tmp_path):
    d, store, outcome = sweep(tmp_path, "ray.num_workers=2")
    sim.events.append((25.0, lambda: sim.workers[0].kill()))  # mid-episode 3 of worker 0, episode 4 queued
    d.run()
    rows = stored_once(store, 12)
    lost = attempts(d.run_dir)
    assert [a["reason"] for a in lost] == ["worker_died"]  # one attempt spent: the episode that was running
    retried = {a["key"] for a in lost}
    assert {r.key: r.attempt for r in rows if r.attempt > 1} == {k: 2 for k in retried}
    assert len(sim.workers) == 3 and sim.workers[2].index == 2  # a replacement took the slot
    assert outcome.retries == 1


def test_the_running_episode_spends_an_attempt_whatever_order_the_failures_arrive_in(sim, tmp_path):
    d, store, outcome = sweep(tmp_path, "ray.num_workers=2")
    sim.events.append((25.0, lambda: sim.workers[0].kill(queued_first=True)))
    d.run()
    rows = stored_once(store, 12)
    lost = attempts(d.run_dir)
    assert [a["reason"] for a in lost] == ["worker_died"] and outcome.retries == 1
    running = next(args[0].key for name, args in sim.workers[0].calls if name == "run" and args[0].trial == 2)
    assert lost[0]["key"] == running  # the third episode (20-30 s) was running at 25 s
    assert {r.key: r.attempt for r in rows if r.attempt > 1} == {running: 2}
    closed = [args[0] for name, args in sim.replicas[0].calls if name == "close"]
    assert running in closed  # its session on the replica was closed before the retry


def test_workers_wait_for_a_slow_model_load_without_timing_out(sim, tmp_path):
    sim.replica_load_s = 200.0  # longer than ray.start_timeout_s: the workers' start clock runs from the load
    d, store, _ = sweep(tmp_path, "ray.num_workers=2", "ray.start_timeout_s=30")
    d.run()
    stored_once(store, 12)
    assert len(sim.workers) == 2  # nobody replaced


def test_a_slot_whose_replacements_never_start_is_dropped_and_the_sweep_goes_on(sim, tmp_path):
    d, store, _ = sweep(tmp_path, "ray.num_workers=2", "ray.max_retries=1", "ray.start_timeout_s=30")
    sim.start_cost = lambda actor: math.inf if actor.index >= 2 else 1.0  # no replacement is ever placed
    sim.events.append((15.0, lambda: sim.workers[1].kill()))
    d.run()
    stored_once(store, 12)
    assert len(sim.workers) == 2 + 2  # max_retries + 1 replacements tried, then the slot dropped
    assert d.workers[1] is None and d.alive_workers() == 1
    assert len([c for c in sim.workers[0].calls if c[0] == "run"]) >= 10


def test_a_wedged_worker_is_killed_past_its_deadline_and_its_episode_retried(sim, tmp_path):
    d, store, _ = sweep(tmp_path, "ray.num_workers=2", "ray.policy_timeout_s=10")
    hung = set()

    def cost(actor, spec):
        if actor.index == 0 and not hung:
            hung.add(spec.key)
            return math.inf  # its first episode never returns
        return EPISODE_S
    sim.episode_cost = cost
    d.run()
    stored_once(store, 12)
    deadline = d.episode_deadline_s(plan_episodes(d.config)[0])
    assert deadline == 20 + d.config.episode.num_steps_wait + 2 * 10 + 300
    assert sim.workers[0].dead and [a["key"] for a in attempts(d.run_dir)] == list(hung)
    assert sim.clock.now > deadline


def test_a_hang_late_in_the_sweep_is_killed_one_deadline_after_it_started(sim, tmp_path):
    d, store, _ = sweep(tmp_path, "ray.num_workers=2", "ray.policy_timeout_s=10", "trials=12")  # 24 episodes
    runs = []

    def cost(actor, spec):
        runs.append(actor.index)
        return math.inf if actor.index == 0 and runs.count(0) == 5 else EPISODE_S  # worker 0's fifth hangs
    sim.episode_cost = cost
    d.run()
    stored_once(store, 24)
    hung_start = sim.workers[0].spans[4][0]
    deadline = d.episode_deadline_s(plan_episodes(d.config)[0])
    assert hung_start + deadline <= sim.workers[0].killed_at <= hung_start + deadline + 1.5
    assert [a["reason"] for a in attempts(d.run_dir)] == ["worker_died"]


def test_a_replica_that_fails_is_probed_back_into_rotation(sim, tmp_path):
    d, store, _ = sweep(tmp_path, "ray.num_workers=2")
    sim.replica_down = lambda actor, now: 12.0 <= now < 40.0
    d.run()
    rows = stored_once(store, 12)
    reasons = [a["reason"] for a in attempts(d.run_dir)]
    assert reasons and set(reasons) == {"policy_unavailable"}
    assert any(name == "ping" for name, _ in sim.replicas[0].calls)
    assert d.replicas.state == [dispatch.HEALTHY] and len(rows) == 12


def test_a_replica_not_back_within_its_start_limit_ends_the_sweep_with_results_kept(sim, tmp_path):
    d, store, _ = sweep(tmp_path, "ray.num_workers=2", "ray.max_retries=5")
    sim.replica_down = lambda actor, now: now >= 12.0  # never answers again
    with pytest.raises(ConfigError, match="every policy replica is dead"):
        d.run()
    assert sim.clock.now >= 12.0 + driver.REPLICA_START_S
    kept = store.load()
    assert kept and all(r.status == "failure" for r in kept if r.status != "error")
    assert all(w.dead for w in sim.workers) and all(r.dead for r in sim.replicas)  # nothing left running


def test_render_device_gpu_keeps_workers_to_gpu_nodes_with_room(sim, tmp_path):
    """A CPU-only head and two GPU nodes (3 and 1 CPUs, the replica on the first): three workers go to the GPU
    nodes by the room left beside the replica; when the small node is lost, its worker's replacement finds no
    GPU node with room and the slot is dropped."""
    head, g1, g2 = "0" * 56, "1" * 56, "2" * 56  # Ray's node ids: 28 bytes in hex
    sim.node_list = [{"NodeID": head, "Alive": True, "Resources": {"CPU": 4.0}},
                     {"NodeID": g1, "Alive": True, "Resources": {"CPU": 3.0, "GPU": 1.0}},
                     {"NodeID": g2, "Alive": True, "Resources": {"CPU": 1.0, "GPU": 1.0}}]
    sim.cpus, sim.replica_node = 8.0, g1

    def lose_g2():
        sim.node_list[2]["Alive"] = False
        sim.workers[2].kill()
    sim.events.append((15.0, lose_g2))
    d, store, _ = sweep(tmp_path, "ray.num_workers=4", "env.render_device=gpu")
    assert d.plan.workers == 3 and "GPU nodes (env.render_device: gpu) have 4 CPUs" in d.plan.lines[-1]
    d.run()
    stored_once(store, 12)
    placed = [w.options["scheduling_strategy"] for w in sim.workers]
    assert [(p.node_id, p.soft) for p in placed] == [(g1, False), (g1, False), (g2, False)]
    assert [w.args[-1] for w in sim.workers] == [0, 1, 0]  # each renders on its place on its node: GPU 0, 1, 0
    assert d.workers[2] is None and d.alive_workers() == 2


def test_a_gpu_node_that_does_not_start_its_worker_counts_one_place_fewer(sim, tmp_path):
    g1, g2 = "1" * 56, "2" * 56
    sim.node_list = [{"NodeID": g1, "Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}},
                     {"NodeID": g2, "Alive": True, "Resources": {"CPU": 2.0, "GPU": 1.0}}]
    sim.cpus = 4.0
    sim.start_cost = lambda actor: math.inf if actor.options["scheduling_strategy"].node_id == g2 else 1.0
    d, store, _ = sweep(tmp_path, "ray.num_workers=3", "env.render_device=gpu", "ray.start_timeout_s=30")
    d.run()
    stored_once(store, 12)
    nodes = [w.options["scheduling_strategy"].node_id for w in sim.workers]
    assert nodes[:3] == [g1, g2, g1] and nodes[3:] == [g2]  # g2 missed once: room 1 left there, tried again
    assert d.node_misses == {g2: 2} and d.alive_workers() == 2
