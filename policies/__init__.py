"""The policy side: the Policy interface, Pi0.5 (pi05/), cache policies (cache/) and simple policies.

`policies` never imports `libero_eval` or `tasks`: the observation dict (see `base.py`) is the contract.
"""
from policies.base import ActionChunk, InferenceRecord, Policy, PolicyError

__all__ = ["ActionChunk", "InferenceRecord", "Policy", "PolicyError"]
