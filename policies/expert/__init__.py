"""A scripted pick-and-place expert that reads privileged simulator state (see `expert.py`)."""
from policies.expert.expert import ExpertPolicy, ExpertError

__all__ = ["ExpertError", "ExpertPolicy"]
