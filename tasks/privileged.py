"""Privileged simulator state for oracle policies (the scripted expert) — never for learned policies.

`privileged_state(robosuite_env)` returns plain Python/numpy values (picklable: it crosses Ray to the policy
actor) read from the MuJoCo state after the last step:

    goal         [[predicate, object, target], ...]  the bddl (:goal ...), lower-case, e.g.
                 [["on", "akita_black_bowl_1", "plate_1"]] or [["in", "alphabet_soup_1", "basket_1_contain_region"]]
    objects      {name: {"pos": [3], "quat": [4] (x, y, z, w), "aabb_min": [3], "aabb_max": [3]}}
                 world-frame box around the object's collision geoms (objects and fixtures of the scene)
    sites        {name: {"pos": [3], "size": [3]}} the regions named in the goal (e.g. a basket's contain region)
    eef_pos      [3]  robot0_eef_pos (the grip site)
    eef_mat      [3][3] world orientation of the grip site (rotation matrix)
    gripper_qpos [2]
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _names(robosuite_env) -> list[str]:
    names = list(robosuite_env.objects_dict)
    names += [n for n in getattr(robosuite_env, "fixtures_dict", {}) if n not in names]
    return names


def _collision_aabb(sim, root_body: int) -> tuple[np.ndarray, np.ndarray] | None:
    """World AABB of the colliding geoms of every body under `root_body`."""
    m, d = sim.model, sim.data
    bodies = np.flatnonzero(m.body_rootid == root_body)
    if len(bodies) == 0:
        return None
    geoms = np.flatnonzero(np.isin(m.geom_bodyid, bodies) & ((m.geom_contype != 0) | (m.geom_conaffinity != 0)))
    if len(geoms) == 0:
        return None
    aabb = np.asarray(m.geom_aabb).reshape(-1, 6)[geoms]  # [G, 6] centre (3), half sizes (3), geom frame
    xmat = np.asarray(d.geom_xmat)[geoms].reshape(-1, 3, 3)  # [G, 3, 3]
    centre = np.asarray(d.geom_xpos)[geoms] + np.einsum("gij,gj->gi", xmat, aabb[:, :3])
    half = np.einsum("gij,gj->gi", np.abs(xmat), aabb[:, 3:])
    return (centre - half).min(axis=0), (centre + half).max(axis=0)


def privileged_state(robosuite_env) -> dict[str, Any]:
    sim = robosuite_env.sim
    m, d = sim.model, sim.data
    goal = [[str(x).lower() for x in pred] for pred in robosuite_env.parsed_problem["goal_state"]]
    objects: dict[str, dict[str, list[float]]] = {}
    for name in _names(robosuite_env):
        try:
            body = m.body_name2id(f"{name}_main")
        except ValueError:
            continue
        root = int(m.body_rootid[body])
        box = _collision_aabb(sim, root)
        if box is None:
            continue
        wxyz = np.asarray(d.body_xquat[body])
        objects[name] = {
            "pos": d.body_xpos[body].tolist(),
            "quat": [float(wxyz[1]), float(wxyz[2]), float(wxyz[3]), float(wxyz[0])],
            "aabb_min": box[0].tolist(),
            "aabb_max": box[1].tolist(),
        }
    sites: dict[str, dict[str, list[float]]] = {}
    for pred in goal:
        for name in pred[1:]:
            if name in objects:
                continue
            try:
                site = m.site_name2id(name)
            except ValueError:
                continue
            sites[name] = {"pos": d.site_xpos[site].tolist(), "size": np.asarray(m.site_size[site]).tolist()}
    grip = m.site_name2id("gripper0_grip_site")
    eef_mat = np.asarray(d.site_xmat[grip]).reshape(3, 3)
    return {
        "goal": goal,
        "objects": objects,
        "sites": sites,
        "eef_pos": d.site_xpos[grip].tolist(),
        "eef_mat": eef_mat.tolist(),
        "gripper_qpos": [float(d.qpos[m.get_joint_qpos_addr(j)]) for j in robosuite_env.robots[0].gripper.joints],
    }
