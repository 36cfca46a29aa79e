"""The policy actor's engine: many episode sessions served by one process, requests answered in batches.

Ray-free on purpose (the Ray actor in libero_eval.ray_sweep only adds the asyncio batching loop and
transport), so the engine is testable and usable without a cluster.

A *variant* is a labelled policy configuration (e.g. `{name: fixed_window, window: 3}` labelled
`fixed_window_window3`); a *session* is one episode served under one variant. Sessions are opened with the
episode's paired seed, closed explicitly at episode end, and expire when a worker dies (close_stale).
"""
from __future__ import annotations

import abc
import dataclasses
import time
from typing import Any, Callable

from policies.base import ActionChunk, Policy, PolicyError


class SessionLost(PolicyError):
    """A request for a session the engine does not hold (the policy actor restarted, or it expired)."""


@dataclasses.dataclass(frozen=True)
class PolicyVariant:
    label: str
    name: str
    params: tuple[tuple[str, Any], ...] = ()  # sorted (key, value) pairs: hashable, order-free

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)

    @classmethod
    def make(cls, label: str, name: str, params: dict[str, Any] | None = None) -> "PolicyVariant":
        return cls(label=label, name=name, params=tuple(sorted((params or {}).items())))


@dataclasses.dataclass
class Request:
    session_id: str
    observation: dict[str, Any]
    enqueued_at: float = dataclasses.field(default_factory=time.perf_counter)


class Engine(abc.ABC):
    """Serves sessions. `infer_batch` answers every request (a result or an exception per request)."""

    @abc.abstractmethod
    def open(self, session_id: str, variant: PolicyVariant, seed: int) -> None: ...

    @abc.abstractmethod
    def infer_batch(self, requests: list[Request]) -> list[ActionChunk | BaseException]: ...

    @abc.abstractmethod
    def close(self, session_id: str) -> None: ...

    @abc.abstractmethod
    def sessions(self) -> list[str]: ...

    def close_stale(self, keep: set[str]) -> list[str]:
        """Close every session not in `keep` (their workers died); returns the closed ids."""
        stale = [s for s in self.sessions() if s not in keep]
        for s in stale:
            self.close(s)
        return stale


class PerSessionEngine(Engine):
    """One Policy object per session, requests served one by one (policies with no shared model to batch:
    hold, scripted experts). `factory(variant)` builds the session's policy."""

    def __init__(self, factory: Callable[[PolicyVariant], Policy]):
        self.factory = factory
        self._sessions: dict[str, Policy] = {}

    def open(self, session_id: str, variant: PolicyVariant, seed: int) -> None:
        if session_id in self._sessions:
            self.close(session_id)  # a retried episode reopens its session from scratch
        policy = self.factory(variant)
        policy.reset(session_id, seed)
        self._sessions[session_id] = policy

    def infer_batch(self, requests: list[Request]) -> list[ActionChunk | BaseException]:
        out: list[ActionChunk | BaseException] = []
        for req in requests:
            policy = self._sessions.get(req.session_id)
            if policy is None:
                out.append(SessionLost(f"no open session {req.session_id!r}"))
                continue
            try:
                out.append(policy.infer(req.observation))
            except Exception as exc:  # one bad request never fails the others
                out.append(exc)
        return out

    def close(self, session_id: str) -> None:
        policy = self._sessions.pop(session_id, None)
        if policy is not None:
            policy.end_episode(session_id)

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def describe(self, session_id: str) -> dict[str, Any]:
        return self._sessions[session_id].describe()
