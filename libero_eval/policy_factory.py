"""Build a Policy from its name and options (the CLI's and the configs' entry point to policies/)."""
from __future__ import annotations

from typing import Any

from policies.base import Policy

POLICY_NAMES = ("hold",)


class PolicySpecError(ValueError):
    pass


def make_policy(name: str, **options: Any) -> Policy:
    if name == "hold":
        from policies.simple import HoldPolicy

        return HoldPolicy(**options)
    raise PolicySpecError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
