"""`libero-eval serve`: openpi's websocket protocol in front of the serving core, talked to with the real
`openpi-client` from PyPI (and, for the malformed messages openpi's client cannot send, a raw websockets
client). The served actions equal the in-process engine's for the same variant and seed; sessions follow
episode marks, prompts and state jumps; bad input gets an error reply naming it and the server keeps serving.
"""
from __future__ import annotations

import argparse
import threading

import msgpack
import numpy as np
import pytest
import websockets.exceptions
import websockets.sync.client
from openpi_client import msgpack_numpy
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from libero_eval import openpi_wire as wire
from libero_eval.config import ConfigError, load_config
from libero_eval.serve import STEP_MOVE_M, EpisodeTracker, ServeOptions, build, make_server, serving_in_thread
from policies.serving.engine import Request
from policies.serving.model import make_engine

PROMPT = "pick up the black bowl between the plate and the ramekin and place it on the plate"
POLICIES = ["none", "fixed_window:window=3", "adaptive:pixel_mae=5", "attention_drift", "vla_cache",
            "none:num_steps=5,solver=heun"]


def _observation(i: int, prompt: str = PROMPT, position: float = 0.0) -> dict:
    rng = np.random.default_rng(i)
    return {"observation/image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
            "observation/state": np.array([position, 0, 1.0, 0, 0, 0, 0.02, -0.02], np.float32),
            "prompt": prompt}


def _args(policy: str | None = None, **kw) -> argparse.Namespace:
    base = dict(config=None, overrides=["model.kind=tiny"], variant=None, policy=policy, checkpoint=None,
                host="127.0.0.1", port=0, api_key=None, insecure=False, max_message_mb=8.0, threads=None)
    return argparse.Namespace(**{**base, **kw})


def _tiny_server(policy: str = "none", **kw):
    config, variant, options = build(_args(policy, **kw))
    config.model.kind = "tiny"
    return config, variant, make_server(config, variant, options)


@pytest.mark.parametrize("policy", POLICIES)
def test_openpi_client_gets_the_in_process_actions_for_every_cache_policy(policy):
    config, variant, server = _tiny_server(policy)
    frames = [_observation(i) for i in range(4)]
    engine = make_engine(config.model, [variant])  # the same variant, in process
    engine.open("local", variant, 1234)
    expected = [engine.infer_batch([Request("local", dict(f))])[0] for f in frames]
    with serving_in_thread(server) as port:
        client = WebsocketClientPolicy(host="127.0.0.1", port=port)
        assert client.get_server_metadata()["variant"]["label"] == variant.label
        replies = [client.infer({**f, wire.EPISODE_KEY: "ep0", wire.SEED_KEY: 1234}) for f in frames]
    for reply, local in zip(replies, expected):
        assert reply["actions"].shape == local.actions.shape and reply["actions"].dtype == np.float32
        np.testing.assert_array_equal(reply["actions"], local.actions)
        record = reply[wire.REPLY_KEY]
        assert (record["decision"], record["reason"]) == (local.record.decision, local.record.reason)
        assert record["seed"] == 1234 and record["session"] == "connection0/session0"
    assert [r[wire.REPLY_KEY]["new_session"] for r in replies] == ["episode_marked", None, None, None]


def test_sessions_follow_marks_prompts_and_state_jumps():
    tracker = EpisodeTracker(replan_steps=5)
    obs = lambda prompt=PROMPT, x=0.0: {"prompt": prompt, "observation/state": np.array([x, 0, 1, 0, 0, 0, 0, 0])}  # noqa: E731
    assert tracker.next(obs(), {})[1] == "first_request"
    assert tracker.next(obs(x=0.9 * 5 * STEP_MOVE_M), {}) is None  # five control steps can move this far
    assert tracker.next(obs(x=0.9 * 5 * STEP_MOVE_M + 0.5), {})[1] == "state_jump"  # a reset
    assert tracker.next(obs(prompt="open the drawer", x=0.5 + 0.9 * 5 * STEP_MOVE_M), {})[1] == "prompt_changed"
    first_seed = tracker.next(obs(), {})  # back to the first prompt (and a jump): its second session
    assert first_seed[0] != EpisodeTracker().next(obs(), {})[0]  # a fresh stream, not the first one's again
    # marked clients: a new id is a new session with the seed they pass, whatever the state does
    marked = EpisodeTracker()
    assert marked.next(obs(), {wire.EPISODE_KEY: "a", wire.SEED_KEY: 7}) == (7, "episode_marked")
    assert marked.next(obs(x=3.0), {wire.EPISODE_KEY: "a"}) is None
    assert marked.next(obs(), {wire.EPISODE_KEY: "b", wire.SEED_KEY: 8}) == (8, "episode_marked")
    assert marked.next(obs(), {})[1] == "episode_unmarked"


def test_an_openpi_style_loop_gets_a_session_per_episode():
    """As openpi's examples/libero/main.py drives its policy: one connection for all episodes, a query every
    5 steps, no episode marks; here two tasks of two episodes each, and the robot reset between episodes."""
    _, _, server = _tiny_server("fixed_window:window=3")
    reasons = []
    with serving_in_thread(server) as port:
        client = WebsocketClientPolicy(host="127.0.0.1", port=port)
        for prompt in (PROMPT, "open the top drawer and put the bowl inside"):
            for _ in range(2):
                for query in range(4):  # the arm moves 3 cm per step, 5 steps per query; then a reset
                    reply = client.infer(_observation(query, prompt, position=0.15 * query))
                    assert reply["actions"].shape == (10, 7)
                    reasons.append((reply[wire.REPLY_KEY]["new_session"], reply[wire.REPLY_KEY]["decision"]))
                client.reset()  # openpi's client: a no-op
    starts = [r for r, _ in reasons if r is not None]
    assert starts == ["first_request", "state_jump", "prompt_changed", "state_jump"]
    assert [d for _, d in reasons[:4]] == ["full", "reuse", "reuse", "full"]  # window 3 within an episode
    assert all(d == "full" for r, d in reasons if r is not None)  # every episode starts with a full frame


def _raw(port: int, message, api_key: str | None = None):
    headers = {"Authorization": f"Api-Key {api_key}"} if api_key else None
    with websockets.sync.client.connect(f"ws://127.0.0.1:{port}", additional_headers=headers, max_size=None) as ws:
        msgpack_numpy.unpackb(ws.recv())  # the metadata
        ws.send(message)
        return ws.recv()


def _healthz(port: int) -> str:
    import urllib.request  # a plain HTTP GET: this check only

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as reply:
        return reply.read().decode().strip()


def _array(dtype: str, shape: list, data: bytes) -> dict:
    return {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}


def test_malformed_messages_get_an_error_naming_the_problem_and_the_server_goes_on():
    _, _, server = _tiny_server(max_message_mb=1.0)
    good = _observation(0)
    packed = msgpack_numpy.packb
    image = lambda **kw: packed({**good, "observation/image": kw["value"]})  # noqa: E731
    cases = {
        b"\xc1\xc1 not msgpack": "not a msgpack message",
        "a text frame": "expected a binary msgpack message",
        packed({"prompt": PROMPT}): "missing key(s) observation/state",
        image(value=np.zeros((128, 128, 3), np.uint8)): "observation/image: expected a uint8 array of shape [224, 224, 3]",
        image(value=np.zeros((224, 224, 3), np.float32)): "got float32 [224, 224, 3]",
        msgpack.packb({**{k: v for k, v in good.items() if k != "observation/state"},
                       "observation/state": _array("|O", [8], b"\0" * 64)}, default=msgpack_numpy.pack_array):
            "array dtype '|O' is not accepted",
        packed({**good, "observation/state": np.array(list("abcdefgh"))}): "array dtype '<U1' is not accepted",
        msgpack.packb({**{k: v for k, v in good.items() if k != "observation/state"},
                       "observation/state": _array("<f4", [8], b"\0" * 31)}, default=msgpack_numpy.pack_array):
            "needs 32 bytes, got 31",
        packed({**good, "observation/state": np.full(8, np.nan, np.float32)}): "expected 8 finite numbers",
        packed({**good, "padding": np.zeros(3 << 19, np.uint8)}): "exceeds this server's cap of 1048576 bytes",
        packed({**good, "state": {b"__npgeneric__": True, b"data": 300, b"dtype": "|u1"}}):
            "300 does not fit a numpy scalar of dtype |u1",
        msgpack.packb({**{k: v for k, v in good.items() if k != "observation/state"},
                       "observation/state": _array("<f4", [1, 1, 1, 1, 8], b"\0" * 32)}, default=msgpack_numpy.pack_array):
            "at most 4 ints",
    }
    with serving_in_thread(server) as port:
        for message, expected in cases.items():
            reply = _raw(port, message)
            assert isinstance(reply, str) and expected in reply, (expected, reply)
        # far over the cap (more than 1 MiB): websockets closes the connection, naming the reason
        with pytest.raises(websockets.exceptions.ConnectionClosedError, match="1009 \\(message too big\\)"):
            _raw(port, packed({**good, "padding": np.zeros(3 << 20, np.uint8)}))
        assert _healthz(port) == "OK"
        # one connection keeps working after an error; openpi's client raises the error text
        client = WebsocketClientPolicy(host="127.0.0.1", port=port)
        with pytest.raises(RuntimeError, match="missing key"):
            client.infer({"prompt": PROMPT})
        assert client.infer(good)["actions"].shape == (10, 7)
        # and others are served meanwhile: four clients at once
        shapes, threads = [], []
        for i in range(4):
            def one(i=i):
                shapes.append(WebsocketClientPolicy(host="127.0.0.1", port=port).infer(_observation(i))["actions"].shape)
            threads.append(threading.Thread(target=one))
            threads[-1].start()
        for t in threads:
            t.join(60)
        assert shapes == [(10, 7)] * 4
    assert server.errors == len(cases) + 1


def test_api_key_and_binding_rules():
    with pytest.raises(ConfigError, match="needs an API key"):
        build(_args(host="0.0.0.0"))
    assert build(_args(host="0.0.0.0", insecure=True))[2].insecure
    _, _, server = _tiny_server(api_key="s3cret")
    with serving_in_thread(server) as port:
        with pytest.raises(websockets.exceptions.InvalidStatus, match="401"):
            WebsocketClientPolicy(host="127.0.0.1", port=port)
        with pytest.raises(websockets.exceptions.InvalidStatus, match="401"):
            WebsocketClientPolicy(host="127.0.0.1", port=port, api_key="wrong")
        client = WebsocketClientPolicy(host="127.0.0.1", port=port, api_key="s3cret")
        assert client.infer(_observation(0))["actions"].shape == (10, 7)
        assert isinstance(_raw(port, msgpack_numpy.packb(_observation(1)), api_key="s3cret"), bytes)


def test_serve_refuses_what_it_cannot_serve():
    with pytest.raises(ConfigError, match="privileged state"):
        build(_args("expert"))
    with pytest.raises(ConfigError, match="execution rtc"):
        build(_args("none:timing=realtime,execution=rtc", overrides=["model.kind=tiny", "latency=thor_trt_fp8"]))
    config = load_config("configs/small_heldout.yaml")
    with pytest.raises(ConfigError, match="choose one with --variant"):
        build(_args(config="configs/small_heldout.yaml", overrides=[]))
    label = config.variants()[1].label
    assert build(_args(config="configs/small_heldout.yaml", overrides=[], variant=label))[1].label == label
    with pytest.raises(ConfigError, match="--policy .fixed_window:window.: expected NAME:key=value"):
        build(_args("fixed_window:window"))
    assert ServeOptions().host == "127.0.0.1"


def test_sixteen_concurrent_clients_lose_no_request_and_are_batched_together():
    """The load test of benchmarks/bench_serve.py, bounded and small: every request answered, each client's
    answers in its own session, and the serving core formed batches of several connections."""
    _, _, server = _tiny_server()
    answers: dict[int, list[str]] = {}
    with serving_in_thread(server) as port:
        clients = [WebsocketClientPolicy(host="127.0.0.1", port=port) for _ in range(16)]
        go = threading.Barrier(16)

        def run(c: int) -> None:
            go.wait()
            answers[c] = [clients[c].infer({**_observation(i), wire.EPISODE_KEY: c})[wire.REPLY_KEY]["session"]
                          for i in range(5)]

        threads = [threading.Thread(target=run, args=(c,)) for c in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert sorted(answers) == list(range(16)) and all(len(set(a)) == 1 and len(a) == 5 for a in answers.values())
    assert len({a[0] for a in answers.values()}) == 16  # one session per connection
    stats = server.core.batcher.stats()
    assert stats["requests"] == 80 and stats["max_batch_size"] > 1
