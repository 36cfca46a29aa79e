"""`libero-eval serve`: one configured variant (any cache policy, denoising settings, backend) over openpi's
websocket policy protocol, so an unmodified `openpi_client.websocket_client_policy.WebsocketClientPolicy`,
and openpi's own LIBERO example around it, gets its action chunks from libero-eval's cached Pi0.5 paths.

Every connection is a client; its requests go through the same serving core as the Ray policy actor
(policies/serving/core.py), so concurrent connections are batched together. Each connection holds one
cache session at a time; when a new one starts is `EpisodeTracker`'s rule (README "Serving over openpi's
protocol"). Replies carry `actions` [H, 7] as openpi's clients expect, `server_timing`, and the frame's
record (decision, reason, signals, cost) under `libero_eval`, which openpi's clients ignore. A bad
message gets a text reply naming the problem (openpi's client raises it) and the connection stays open.

Binds to 127.0.0.1 unless told otherwise; another address needs an API key (clients send
`Authorization: Api-Key <key>`) or an explicit --insecure.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http import HTTPStatus
from typing import Any

import numpy as np
import torch
import websockets.asyncio.server as ws_server
import websockets.exceptions

from libero_eval import openpi_wire as wire
from libero_eval.cli_common import fail
from libero_eval.config import ConfigError, SweepConfig, load_config, parse_policy_entry
from policies.base import PROMPT_KEY, STATE_KEY, PolicyError
from policies.serving.core import ServingCore
from policies.serving.model import make_engine
from policies.serving.variants import PolicyVariant

log = logging.getLogger("libero_eval")

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SHIPPED_CHECKPOINT = "policies/pi05/assets/pi05_small_spatial01"
API_KEY_ENV = "LIBERO_EVAL_API_KEY"
# Measured (README): the largest end-effector move of one LIBERO control step under saturating actions was
# 0.0615 m; a client runs at most replan_steps steps between two queries.
STEP_MOVE_M = 0.065
HARD_MARGIN = 1 << 20  # bytes over --max-message-mb still read (and answered with an error), not more


@dataclasses.dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    max_message_bytes: int = 8 << 20
    replan_steps: int = 5  # env steps a client runs between queries (openpi's LIBERO example: 5)

    def check(self) -> None:
        if self.host not in LOCAL_HOSTS and not self.api_key and not self.insecure:
            raise ConfigError(f"--host {self.host}: binding to an address other than 127.0.0.1 needs an API key "
                              f"(--api-key or ${API_KEY_ENV}; clients send 'Authorization: Api-Key <key>') or an "
                              "explicit --insecure")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port: expected 0..65535, got {self.port}")


def unmarked_seed(prompt: str, ordinal: int) -> int:
    """The seed of the `ordinal`-th unmarked session with this prompt on a connection (0-based): stable, so
    the same client loop gets the same noise on every run."""
    digest = hashlib.sha256(f"libero-eval/serve/{prompt}/{ordinal}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclasses.dataclass
class EpisodeTracker:
    """When a connection's next request starts a new cache session (a full frame, a fresh noise stream).

    Marked clients send EPISODE_KEY (and SEED_KEY): a new value starts a session with that seed (default
    unmarked_seed). Unmarked clients (openpi's example keeps one connection for all its episodes): a new
    session when the prompt changes, or when the end effector is further from its last query's position
    than `replan_steps` control steps could move it (a reset). No wall-clock rule."""

    replan_steps: int = 5
    episode: Any = None
    prompt: str | None = None
    position: np.ndarray | None = None
    started: int = 0
    per_prompt: Counter = dataclasses.field(default_factory=Counter)

    @property
    def max_move_m(self) -> float:
        return STEP_MOVE_M * self.replan_steps

    def next(self, observation: dict[str, Any], marks: dict[str, Any]) -> tuple[int, str] | None:
        """(seed, why) when this request starts a new session, else None."""
        prompt, position = observation[PROMPT_KEY], observation[STATE_KEY][:3]
        why = None
        if wire.EPISODE_KEY in marks:
            if self.started == 0 or marks[wire.EPISODE_KEY] != self.episode:
                why = "episode_marked"
        elif self.started == 0:
            why = "first_request"
        elif self.episode is not None:
            why = "episode_unmarked"  # the client stopped marking: start afresh rather than guess
        elif prompt != self.prompt:
            why = "prompt_changed"
        elif float(np.linalg.norm(position - self.position)) > self.max_move_m:
            why = "state_jump"
        self.prompt, self.position = prompt, position.copy()
        if why is None:
            return None
        self.episode = marks.get(wire.EPISODE_KEY)
        seed = marks.get(wire.SEED_KEY, unmarked_seed(prompt, self.per_prompt[prompt]))
        self.per_prompt[prompt] += 1
        self.started += 1
        return seed, why


class PolicyServer:
    """openpi's protocol in front of a ServingCore serving one variant."""

    def __init__(self, core: ServingCore, variant: PolicyVariant, options: ServeOptions):
        self.core, self.variant, self.options = core, variant, options
        self.metadata = {"server": "libero-eval", "variant": variant.describe(), "model": getattr(core.engine, "label", "model-free"),
                         "episode_keys": [wire.EPISODE_KEY, wire.SEED_KEY], "reply_key": wire.REPLY_KEY,
                         "max_message_bytes": options.max_message_bytes}
        self._connections = itertools.count()
        self.requests = 0
        self.errors = 0
        self.port: int | None = None

    def _authorize(self, connection, request):
        """websockets' process_request hook: /healthz answers OK; with an API key, a request without the
        right `Authorization: Api-Key <key>` header is refused before the websocket opens."""
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.options.api_key:
            sent = request.headers.get("Authorization", "")
            if not hmac.compare_digest(sent.encode(), f"Api-Key {self.options.api_key}".encode()):
                return connection.respond(HTTPStatus.UNAUTHORIZED,
                                          "missing or wrong API key: send 'Authorization: Api-Key <key>'\n")
        return None

    def _decode(self, message: bytes | str) -> tuple[dict[str, Any], dict[str, Any]]:
        return wire.check_observation(wire.unpack(message, self.options.max_message_bytes), self.variant.needs_images)

    async def _handler(self, websocket) -> None:
        number = next(self._connections)
        tracker = EpisodeTracker(self.options.replan_steps)
        session: str | None = None
        seed: int | None = None
        await websocket.send(wire.pack(self.metadata))
        try:
            async for message in websocket:
                t0 = time.perf_counter()
                try:  # decoded off the event loop: a large message never stalls the other connections
                    observation, marks = await asyncio.get_running_loop().run_in_executor(None, self._decode, message)
                except wire.WireError as exc:
                    self.errors += 1
                    await websocket.send(f"libero-eval serve: bad request: {exc}")
                    continue
                started = tracker.next(observation, marks)
                if started is not None:
                    if session is not None:
                        await self.core.close(session)
                        session = None
                    name = f"connection{number}/session{tracker.started - 1}"
                    try:
                        await self.core.open(name, self.variant.label, started[0])
                    except Exception as exc:  # e.g. a bad seed: answered, the connection stays
                        self.errors += 1
                        tracker.started = 0  # the next request starts a session afresh
                        await websocket.send(f"libero-eval serve: cannot start a session: {type(exc).__name__}: {exc}")
                        continue
                    session, seed = name, started[0]
                try:
                    chunk = await self.core.infer(session, observation)
                except Exception as exc:  # a policy failure answers this request only
                    self.errors += 1
                    await websocket.send(f"libero-eval serve: inference failed: {type(exc).__name__}: {exc}")
                    continue
                self.requests += 1
                record = {**chunk.record.to_dict(), "session": session, "seed": seed,
                          "new_session": None if started is None else started[1]}
                await websocket.send(wire.pack({"actions": chunk.actions, wire.REPLY_KEY: record,
                                                "server_timing": {"infer_ms": (time.perf_counter() - t0) * 1e3}}))
        except websockets.exceptions.ConnectionClosed as exc:  # the client went away without a close frame
            log.info("connection %d closed: %s", number, exc)
        finally:
            if session is not None:
                await self.core.close(session)

    async def serve(self, ready: asyncio.Future | None = None) -> None:
        """Serve until cancelled; `ready` gets the bound port."""
        self.core.start()
        try:
            # one request, one reply: a client needs no queue; messages up to HARD_MARGIN over the cap get a
            # text reply naming the cap, larger ones close the connection (1009, "message too big")
            async with ws_server.serve(self._handler, self.options.host, self.options.port, compression=None,
                                       max_size=self.options.max_message_bytes + HARD_MARGIN, max_queue=2,
                                       process_request=self._authorize) as server:
                self.port = next(iter(server.sockets)).getsockname()[1]
                if ready is not None:
                    ready.set_result(self.port)
                await server.serve_forever()
        finally:
            await self.core.stop()


@contextlib.contextmanager
def serving_in_thread(server: PolicyServer, timeout_s: float = 300.0) -> Iterator[int]:
    """Run `server` on an event loop in a background thread (tests, benchmarks); yields the bound port and
    stops the server on exit."""
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future = concurrent.futures.Future()
    holder: dict[str, Any] = {}

    def target() -> None:
        asyncio.set_event_loop(loop)
        started = loop.create_future()
        started.add_done_callback(lambda f: ready.set_result(f.result()) if not f.exception() else None)
        holder["task"] = loop.create_task(server.serve(started))
        try:
            loop.run_until_complete(holder["task"])
        except BaseException as exc:  # cancelled at exit, or it failed to start
            if not ready.done():
                ready.set_exception(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=target, name="libero-eval-serve", daemon=True)
    thread.start()
    try:
        yield ready.result(timeout_s)
    finally:
        if "task" in holder:
            try:
                loop.call_soon_threadsafe(holder["task"].cancel)
            except RuntimeError:  # the loop already closed: the server had stopped
                pass
        thread.join(timeout_s)
        if thread.is_alive():
            raise RuntimeError(f"libero-eval serve did not stop within {timeout_s:g} s")


# -- the command ------------------------------------------------------------------------------------

def build(args: argparse.Namespace) -> tuple[SweepConfig, PolicyVariant, ServeOptions]:
    """The config, the one variant served and the server options; ConfigError before anything loads."""
    overrides = list(args.overrides)
    if args.config and "=" in args.config and not os.path.exists(args.config):  # no config, only overrides
        args.config, overrides = None, [args.config, *overrides]
    user_model = any(o.startswith(("model.kind=", "model.checkpoint=")) for o in overrides)
    if args.checkpoint:
        overrides += ["model.kind=checkpoint", f"model.checkpoint={args.checkpoint}"]
    elif not args.config and not user_model:  # the default: the shipped small Pi0.5 (overrides still win)
        overrides = ["model.kind=checkpoint", f"model.checkpoint={SHIPPED_CHECKPOINT}", *overrides]
    if args.policy:
        overrides.append(f"policies=[{json.dumps(parse_policy_entry(args.policy))}]")  # a YAML flow mapping
    config = load_config(args.config, overrides)
    variants = config.variants()
    if args.variant is not None:
        chosen = [v for v in variants if v.label == args.variant]
        if not chosen:
            raise ConfigError(f"--variant {args.variant!r}: the config has {', '.join(v.label for v in variants)}")
        variant = chosen[0]
    elif len(variants) == 1:
        variant = variants[0]
    else:
        raise ConfigError(f"the config has {len(variants)} variants: choose one with --variant "
                          f"({', '.join(v.label for v in variants)})")
    if variant.needs_privileged:
        raise ConfigError(f"{variant.label}: reads the simulator's privileged state, which openpi's protocol "
                          "does not carry")
    if variant.execution.execution == "rtc":
        raise ConfigError(f"{variant.label}: execution rtc needs the client's env step and a latency model; serve "
                          "it with execution naive (openpi's clients run chunks naively)")
    options = ServeOptions(args.host, args.port, args.api_key or os.environ.get(API_KEY_ENV), args.insecure,
                           int(args.max_message_mb * (1 << 20)), config.episode.replan_steps)
    options.check()
    return config, variant, options


def make_server(config: SweepConfig, variant: PolicyVariant, options: ServeOptions) -> PolicyServer:
    engine = make_engine(config.model, [variant], shadow=config.episode.shadow,
                         executed_steps=config.episode.replan_steps)
    core = ServingCore(engine, [variant], config.ray.max_batch, config.ray.batch_wait_ms)
    return PolicyServer(core, variant, options)


EXAMPLES = """examples:
  libero-eval serve                                        # the shipped small Pi0.5, policy none, 127.0.0.1:8000
  libero-eval serve --checkpoint /ckpt/pi05_libero --policy fixed_window:window=3 --port 8000
  libero-eval serve configs/small_heldout.yaml --variant adaptive3_mae6.5
  libero-eval serve --host 0.0.0.0 --api-key "$KEY"        # clients: WebsocketClientPolicy(host, 8000, api_key=KEY)

Clients: openpi_client.websocket_client_policy.WebsocketClientPolicy(host="127.0.0.1", port=8000), then
client.infer(observation)["actions"] with openpi's LIBERO keys (observation/image and observation/wrist_image
uint8 [224, 224, 3], observation/state [8], prompt). Optional keys "libero_eval/episode" (any id; a new
value starts a new cache session) and "libero_eval/seed" (that episode's seed). Each reply also carries the
frame's record under "libero_eval". A sweep evaluates a served policy with model.kind: openpi_server.
"""


def add_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser("serve", help="serve one variant over openpi's websocket policy protocol",
                            description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default=None,
                        help="a sweep config whose model and variant to serve (default: the shipped small Pi0.5)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, as for sweep")
    parser.add_argument("--variant", default=None, help="the label of the config's variant to serve")
    parser.add_argument("--policy", default=None, metavar="NAME[:k=v,...]",
                        help="the variant to serve instead of the config's, e.g. fixed_window:window=3")
    parser.add_argument("--checkpoint", default=None, help="Pi0.5 checkpoint directory (model.kind checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", default=8000, type=int, help="port (default 8000; 0: any free port)")
    parser.add_argument("--api-key", default=None, help=f"require 'Authorization: Api-Key <key>' (or ${API_KEY_ENV})")
    parser.add_argument("--insecure", action="store_true", help="allow another --host without an API key")
    parser.add_argument("--threads", default=None, type=int,
                        help="torch CPU threads (default torch's; a sweep's CPU policy actor uses 1: the same number "
                             "gives the same floating-point results as a sweep in process)")
    parser.add_argument("--max-message-mb", default=8.0, type=float,
                        help="largest request accepted, in MiB (default 8; larger ones get an error reply)")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        config, variant, options = build(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        server = make_server(config, variant, options)  # loads the model: a bad checkpoint fails here
    except (ConfigError, ValueError, OSError, PolicyError) as exc:
        return fail("serve", exc)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        task = asyncio.ensure_future(server.serve(ready))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            print(f"libero-eval serve: {variant.label} ({server.metadata['model']}) on ws://{options.host}:{ready.result()}"
                  f"{' (API key required)' if options.api_key else ''}; Ctrl-C to stop", flush=True)
        try:
            await task
        except asyncio.CancelledError:
            pass

    try:
        asyncio.run(main())
    except OSError as exc:  # e.g. the port is taken
        return fail("serve", f"cannot listen on {options.host}:{options.port}: {exc}")
    stats = server.core.batcher.stats()
    print(f"libero-eval serve: stopped after {server.requests} requests ({server.errors} refused), "
          f"{stats['batches']} batches (mean batch {stats['mean_batch_size']:.2f})", file=sys.stderr)
    return 0
