"""The LIBERO side: suite/task registry, env factory (headless GL, lazy camera rendering), the openpi
observation protocol, init states, success, and video frames.

`tasks` never imports `libero_eval` or `policies`: it hands out observation dicts (see policies/base.py for
the keys) and takes 7-d actions.
"""
