"""`OpenpiServerEngine`: the engine of `model.kind: openpi_server`. Its sessions are connections to a policy
served over openpi's websocket protocol (openpi's `serve_policy.py`, or `libero-eval serve`), through the
real `openpi_client.websocket_client_policy.WebsocketClientPolicy`. The sweep's policy actor runs it like
any engine: one session (one connection) per episode, a batch's requests sent concurrently.

What a session knows depends on the server (its metadata on connect):
- `libero-eval serve`: each request carries the episode's id and paired seed (openpi_wire's EPISODE_KEY,
  SEED_KEY) and the env step, and the reply carries the frame's record (decision, reason, signals, compute),
  so results equal the in-process ones for the same variant and seeds.
- any other server: only openpi's LIBERO keys are sent (extra keys could break its input transforms);
  every frame is recorded as a full frame of a Pi0.5 with 10 denoising steps (`extra.compute`, what a named
  latency profile prices) and `remote_noise` says the noise is the server's own, not the episode's seed.
`latency_ms.total` is the round trip (what `latency: measured` bills); the server's own time, when it
reports one, is kept beside it.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from policies.base import (
    IMAGE_KEY,
    PROMPT_KEY,
    STATE_KEY,
    STEP_KEY,
    WRIST_IMAGE_KEY,
    ActionChunk,
    InferenceRecord,
    PolicyError,
)
from policies.serving.engine import Engine, Request, SessionLost, batch_info
from policies.serving.latency import RealtimeClock
from policies.serving.variants import PolicyVariant

OPENPI_KEYS = (IMAGE_KEY, WRIST_IMAGE_KEY, STATE_KEY, PROMPT_KEY)
# Optional request keys a libero-eval server reads, and its reply's record key (libero_eval/openpi_wire.py)
EPISODE_KEY = "libero_eval/episode"  # str or int: a new value starts a new session (a new episode)
SEED_KEY = "libero_eval/seed"  # int >= 0: that episode's paired seed (noise stream)
REPLY_KEY = "libero_eval"  # in replies: the frame's record (decision, reason, signals, cost); clients ignore it
SERVER_ERROR = "Error in inference server"  # how openpi-client raises a server's text reply (RuntimeError)
# a foreign server's frame, for a named profile to price: Pi0.5's three camera slots, the whole prefix, 10 steps
FULL_FRAME_COMPUTE = {"vision_images": 3, "prefix_token_layers": 1, "prefix_token_layers_full": 1, "velocity_evals": 10}


class ServerUnavailable(SessionLost):
    """The server cannot be reached or dropped the connection: an infrastructure failure (the episode is
    retried), unlike an error the server answers (a PolicyError: the episode's outcome)."""


def connect(url: str, api_key_env: str | None = None):
    """An openpi-client connection (it receives the server's metadata on connect); ServerUnavailable if the
    server cannot be reached or refuses us (e.g. a 401 for a wrong key)."""
    # openpi-client: only sweeps against a served policy load it
    from openpi_client.websocket_client_policy import WebsocketClientPolicy

    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise PolicyError(f"model.api_key_env: the environment variable {api_key_env} is not set")
    try:
        return WebsocketClientPolicy(host=url, api_key=api_key)
    except Exception as exc:  # refused, unreachable, a 401 (wrong key): the server is not usable
        raise ServerUnavailable(f"cannot connect to the openpi server at {url}: {type(exc).__name__}: {exc}") from exc


def disconnect(client) -> None:
    try:
        client._ws.close()  # openpi-client keeps its connection private and has no close()
    except Exception:
        pass


def server_metadata(url: str, api_key_env: str | None = None) -> dict[str, Any]:
    """Connect once and return the server's metadata (what it serves); ServerUnavailable if it cannot."""
    client = connect(url, api_key_env)
    try:
        return dict(client.get_server_metadata() or {})
    finally:
        disconnect(client)


def describe_server(metadata: dict[str, Any]) -> str:
    """One line for the sweep's start: what the server serves, and what that means for pairing."""
    if metadata.get("server") == "libero-eval":
        variant = metadata.get("variant") or {}
        return (f"libero-eval serve: {variant.get('label', '?')} on {metadata.get('model', '?')}; episodes carry "
                "their paired seeds and the server's per-frame records")
    return ("a foreign openpi server: its noise is its own, so episodes are not paired by seed (paired tests "
            "against other runs compare different noise); every frame is recorded as a full Pi0.5 frame")


class RemoteSession:
    def __init__(self, seed: int, client):
        self.session_id: str = ""  # set by OpenpiServerEngine.open
        self.seed, self.client = seed, client
        self.metadata: dict[str, Any] = client.get_server_metadata() or {}
        self.ours = self.metadata.get("server") == "libero-eval"
        self.index = 0


class OpenpiServerEngine(Engine):
    needs_warm_up = False  # the model is the server's: nothing here to warm, and no request sent for it

    def __init__(self, url: str, api_key_env: str | None = None, timeout_s: float = 300.0,
                 max_concurrency: int = 16):
        super().__init__()
        self.url = url
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.label = f"openpi_server:{url}"
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="openpi-client")

    def _open_model(self, variant: PolicyVariant, seed: int, clock: RealtimeClock | None = None) -> Any:
        return RemoteSession(seed, connect(self.url, self.api_key_env))

    def open(self, session_id: str, variant: PolicyVariant, seed: int, clock: RealtimeClock | None = None) -> None:
        super().open(session_id, variant, seed, clock)
        self._sessions[session_id].session_id = session_id

    def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if isinstance(session, RemoteSession):
            disconnect(session.client)

    def _request(self, session: RemoteSession, observation: dict[str, Any]) -> dict[str, Any]:
        sent = {k: observation[k] for k in OPENPI_KEYS if k in observation}
        if session.ours:
            sent.update({EPISODE_KEY: session.session_id, SEED_KEY: session.seed})
            if STEP_KEY in observation:
                sent[STEP_KEY] = int(observation[STEP_KEY])
        t0 = time.perf_counter()
        reply = session.client.infer(sent)
        reply["_round_trip_ms"] = (time.perf_counter() - t0) * 1e3
        return reply

    def _chunk(self, session: RemoteSession, reply: dict[str, Any]) -> ActionChunk:
        if "actions" not in reply:
            raise PolicyError(f"the server's reply has no 'actions' (keys: {sorted(reply)})")
        actions = np.asarray(reply["actions"], dtype=np.float32)
        round_trip = reply["_round_trip_ms"]
        server_timing = reply.get("server_timing") or {}
        remote = {"server": session.metadata.get("server", "openpi"), "server_timing": server_timing}
        if session.ours and isinstance(reply.get(REPLY_KEY), dict):
            theirs = reply[REPLY_KEY]
            latency = {**theirs.get("latency_ms", {}), "server_total": theirs.get("latency_ms", {}).get("total"),
                       "total": round_trip}
            extra = dict(theirs.get("extra") or {})
            served_in = {k: extra.pop(k) for k in ("batch_size", "queue_wait_ms") if k in extra}  # the server's batch
            record = InferenceRecord(theirs.get("index", session.index), theirs["decision"], theirs["reason"],
                                     dict(theirs.get("signals") or {}), latency,
                                     {**extra, "remote": {**remote, "session": theirs.get("session"), **served_in}})
        else:
            record = InferenceRecord(session.index, "full", "remote", {}, {"total": round_trip},
                                     {"compute": dict(FULL_FRAME_COMPUTE), "remote": remote, "remote_noise": True})
        session.index += 1
        return ActionChunk(actions, record)

    def _infer_model(self, items: list[tuple[int, Request, Any]], batch_size: int, started: float
                     ) -> list[ActionChunk | BaseException]:
        """Every request of the batch on its own connection, concurrently; a failing one fails alone."""
        futures = [self._pool.submit(self._request, session, request.observation) for _, request, session in items]
        out: list[ActionChunk | BaseException] = []
        for (_, request, session), future in zip(items, futures):
            try:
                reply = future.result(timeout=self.timeout_s)
            except Exception as exc:
                if isinstance(exc, RuntimeError) and str(exc).startswith(SERVER_ERROR):  # the server's answer
                    out.append(PolicyError(f"openpi server {self.url}: {exc}"))
                    continue
                # the connection dropped (the server died or restarted) or no answer within timeout_s
                disconnect(session.client)
                why = f"no answer within {self.timeout_s:g} s" if isinstance(exc, TimeoutError) else type(exc).__name__
                out.append(ServerUnavailable(f"openpi server {self.url}: {why}: {exc}"))
                continue
            try:
                chunk = self._chunk(session, reply)
                chunk.record.extra.update(batch_info(batch_size, started, request))
                out.append(chunk)
            except Exception as exc:  # a reply that is not an action chunk
                out.append(exc if isinstance(exc, PolicyError) else PolicyError(f"openpi server {self.url}: {exc}"))
        return out
