"""`Engine`: owns the sessions (one per running episode) and answers a batch of requests, one result or one
exception per request. This base serves model-free variants (hold, the scripted expert), one Policy object
per session; `policies/serving/pi05.py` adds Pi0.5 sessions served in batches from one shared model.

Sessions are opened with the episode's paired seed, closed explicitly at episode end, and expire when a
worker dies (`close_stale`). A request for a session the engine does not hold raises `SessionLost`: the
policy actor restarted, or the session expired; callers treat it as an infrastructure failure.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

from policies.base import ActionChunk, Policy, PolicyError
from policies.serving.latency import RealtimeClock
from policies.serving.variants import MODEL_FREE, PolicyVariant


class SessionLost(PolicyError):
    """A request for a session the engine does not hold (the policy actor restarted, or it expired)."""


@dataclasses.dataclass
class Request:
    session_id: str
    observation: dict[str, Any]
    enqueued_at: float = dataclasses.field(default_factory=time.perf_counter)


def batch_info(batch_size: int, started: float, request: Request) -> dict[str, float]:
    """What every record says about the batch it was served in: its size and this request's queue wait."""
    return {"batch_size": batch_size, "queue_wait_ms": round(max(0.0, started - request.enqueued_at) * 1e3, 3)}


def make_model_free(variant: PolicyVariant) -> Policy:
    """The session policy of a model-free variant, built from its typed config."""
    policy_cls = MODEL_FREE[variant.name][0]
    return policy_cls(**dataclasses.asdict(variant.policy))


class Engine:
    """Model-free sessions; subclasses add model sessions through `_open_model` and `_infer_model`."""

    def __init__(self) -> None:
        self._sessions: dict[str, Any] = {}  # session id -> Policy (model-free) or a subclass's session

    def open(self, session_id: str, variant: PolicyVariant, seed: int, clock: RealtimeClock | None = None) -> None:
        """`clock`: the variant's latency profile and the env's control rate, which `execution: rtc`
        sessions need to know each frame's delay before denoising it (policies/serving/rtc.py)."""
        if seed < 0:
            raise PolicyError(f"episode seed must be >= 0, got {seed}")
        self.close(session_id)  # a retried episode reopens its session from scratch
        if variant.model_free:
            policy = make_model_free(variant)
            policy.reset(session_id, seed)
            self._sessions[session_id] = policy
        else:
            self._sessions[session_id] = self._open_model(variant, int(seed), clock)

    def _open_model(self, variant: PolicyVariant, seed: int, clock: RealtimeClock | None = None) -> Any:
        raise PolicyError(f"policy {variant.label!r} needs a model; this engine serves only model-free policies "
                          f"({', '.join(MODEL_FREE)})")

    def close(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if isinstance(session, Policy):
            session.end_episode(session_id)

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def session_count(self) -> int:
        """Open sessions; safe to read from another thread while the engine serves (one atomic len)."""
        return len(self._sessions)

    def close_stale(self, keep: set[str]) -> list[str]:
        """Close every session not in `keep` (their workers died); returns the closed ids."""
        stale = [s for s in self._sessions if s not in keep]
        for s in stale:
            self.close(s)
        return stale

    def calibrate(self, repeats: int = 5) -> Any:
        """The engine's latency profile at batch 1 (policies/serving/latency.py); None: no model to time."""
        return None

    def session(self, session_id: str) -> Any:
        if session_id not in self._sessions:
            raise SessionLost(f"no open session {session_id!r}")
        return self._sessions[session_id]

    def infer_batch(self, requests: list[Request]) -> list[ActionChunk | BaseException]:
        """Model-free requests are answered one by one, model requests together; a bad request (unknown
        session, two requests of one session, a failing policy) fails alone."""
        started = time.perf_counter()
        results: list[ActionChunk | BaseException | None] = [None] * len(requests)
        model_requests: list[tuple[int, Request, Any]] = []
        seen: set[str] = set()
        for position, request in enumerate(requests):
            try:
                if request.session_id in seen:  # its frames are sequential: the second waits for the first
                    raise PolicyError(f"session {request.session_id!r} has two requests in one batch")
                seen.add(request.session_id)
                session = self.session(request.session_id)
                if isinstance(session, Policy):
                    results[position] = chunk = session.infer(request.observation)
                    chunk.record.extra.update(batch_info(len(requests), started, request))
                else:
                    model_requests.append((position, request, session))
            except Exception as exc:  # one bad request never fails the others
                results[position] = exc
        if model_requests:
            answers = self._infer_model(model_requests, len(requests), started)
            for (position, _, _), answer in zip(model_requests, answers, strict=True):
                results[position] = answer
        return results  # type: ignore[return-value]

    def _infer_model(self, items: list[tuple[int, Request, Any]], batch_size: int, started: float
                     ) -> list[ActionChunk | BaseException]:
        """Answers for the model sessions' requests of a batch of `batch_size` that began being served at
        `started` (perf_counter); items: (position, request, session), in order."""
        raise NotImplementedError
