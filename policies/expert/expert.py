"""Scripted pick-and-place expert on privileged state: an oracle for the harness and a demo source.

It reads the goal (`on obj target` / `in obj region`) and object boxes from `observation["privileged"]`
(tasks.privileged), never the images, and plays phases

    hover -> descend -> close -> lift -> carry -> lower -> release -> retreat

with position control a = clip(gain * error_m, +-vmax) on the OSC delta-pose actions and the gripper held
pointing down at a chosen yaw (reference/scripted_expert.md, measured on this stack). It answers one action
per query (closed loop on every control step) so the episode loop asks again after each step.

Geometry that matters (measured): at yaw 0 the fingers close along world y; the fingertips sit ~1.2 cm below
`robot0_eef_pos`. Bowls are grasped at the rim, centre +- y (r - 1.2 cm), on the side with more clearance;
other objects at the box centre, 3 cm below the top but >= 1.4 cm above the bottom, yawed so the fingers
close across the short side. After the grasp the expert steers the *object* over the target.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from policies.base import ACTION_DIM, PRIVILEGED_KEY, ActionChunk, InferenceRecord, Policy, PolicyError
from policies.expert.geometry import Box, rot_z, rotation_error

FINGERTIP_BELOW_EEF = 0.012
HOVER_HEIGHT = 0.08
CARRY_CLEARANCE = 0.05  # object bottom above the target's top while carrying
CLOSE_STEPS = 12
RELEASE_STEPS = 8
LIFT_CHECK_STEPS = 10
LIFT_MIN_RISE = 0.02
MAX_REGRASPS = 3
FUNNEL_XY_SLACK = 0.004  # funnel approach: xy error (m) tolerated at the grasp height
FUNNEL_YAW_HEIGHT = 0.1  # funnel approach: height (m) kept per radian of yaw error
# per-phase step limits: a phase that has not converged by then moves on (never stuck forever)
PHASE_LIMITS = {"hover": 60, "descend": 40, "close": CLOSE_STEPS, "lift": 40, "carry": 80, "lower": 50,
                "release": RELEASE_STEPS, "retreat": 10_000}


class ExpertError(PolicyError):
    """The expert cannot act on this observation (no privileged state, or a goal it does not handle)."""


@dataclasses.dataclass(frozen=True)
class ExpertParams:
    gain: float = 15.0  # position action per metre of error
    vmax: float = 1.0  # action clip while moving freely
    carry_vmax: float = 0.6  # action clip while holding the object
    yaw_gain: float = 1.5  # rotation action per radian of error
    # carry -> lower once the object is this close (xy, metres) above the target's centre; lowering keeps
    # converging in xy. 0.01 is the validated default; demos use a looser gate (record-demos
    # --place-tolerance), which a learned policy, less precise than 1 cm, can imitate without stalling
    place_tol: float = 0.01
    # 0: gated approaches (hover, then descend once within 1 cm of the hover point; carry at a fixed height,
    # then lower once within place_tol). > 0: funnel approaches, for demonstrations: the height above the
    # grasp point / the place height shrinks with the xy (and yaw) error, `funnel` metres per metre, so the
    # expert's action is a continuous function of the state with one attractor. A gate makes the labels
    # near it a mix of "stay" and "go", and a policy imitating it can stall there (seen at the hover point
    # and above the plate).
    funnel: float = 0.0

    def __post_init__(self) -> None:
        for name in ("gain", "vmax", "carry_vmax", "yaw_gain", "place_tol"):
            if getattr(self, name) <= 0:
                raise ValueError(f"expert {name} must be > 0, got {getattr(self, name)}")
        if self.funnel < 0:
            raise ValueError(f"expert funnel must be >= 0 (0: gated approaches), got {self.funnel}")


class ExpertPolicy(Policy):
    """Pick-and-place oracle; `decision: expert`, `reason` = the phase that produced the action."""

    name = "expert"
    needs_images = False
    needs_privileged = True

    def __init__(self, gain: float = 15.0, vmax: float = 1.0, carry_vmax: float = 0.6, yaw_gain: float = 1.5,
                 place_tol: float = 0.01, funnel: float = 0.0):
        self.params = ExpertParams(gain=gain, vmax=vmax, carry_vmax=carry_vmax, yaw_gain=yaw_gain,
                                   place_tol=place_tol, funnel=funnel)
        self.reset("", 0)

    # -- Policy ------------------------------------------------------------------------------------

    def reset(self, episode_id: str, seed: int) -> None:
        self._index = 0
        self.phase = "hover"
        self._phase_steps = 0
        self._r0: np.ndarray | None = None  # eef orientation at the first query (gripper down, yaw 0)
        self._plan: dict[str, Any] | None = None
        self._regrasps = 0
        self._obj_z_at_close = 0.0
        self._lift_target: np.ndarray | None = None
        self._retreat_target: np.ndarray | None = None

    def infer(self, observation: dict[str, Any]) -> ActionChunk:
        priv = observation.get(PRIVILEGED_KEY)
        if priv is None:
            raise ExpertError("the expert needs observation['privileged'] (tasks.privileged); the episode loop "
                              "adds it for policies with needs_privileged = True")
        action, signals = self._act(priv)
        record = InferenceRecord(index=self._index, decision="expert", reason=self.phase, signals=signals)
        self._index += 1
        return ActionChunk(action[None, :], record)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.params)}

    # -- planning ----------------------------------------------------------------------------------

    def _make_plan(self, priv: dict[str, Any]) -> dict[str, Any]:
        goals = [g for g in priv["goal"] if g[0] in ("on", "in") and len(g) == 3]
        if len(goals) != 1:
            raise ExpertError(f"the expert handles one (on obj target) / (in obj region) goal, got {priv['goal']}")
        pred, obj, target = goals[0]
        if obj not in priv["objects"]:
            raise ExpertError(f"goal object {obj!r} has no privileged state (objects: {sorted(priv['objects'])})")
        if target in priv["objects"]:
            box = Box.of(priv["objects"][target])
            target_xy, target_top = box.centre[:2], box.top
            place_bottom = target_top + 0.01
        elif target in priv["sites"]:
            site = priv["sites"][target]
            owner = next((n for n in priv["objects"] if target.startswith(n)), None)
            target_xy = np.asarray(site["pos"][:2])
            target_top = Box.of(priv["objects"][owner]).top if owner else site["pos"][2] + site["size"][2]
            place_bottom = site["pos"][2] + 0.01
        else:
            raise ExpertError(f"goal target {target!r} is neither an object nor a site of the scene")
        return {"predicate": pred, "object": obj, "target": target, "target_xy": np.asarray(target_xy),
                "target_top": float(target_top), "place_bottom": float(place_bottom)}

    def _grasp(self, priv: dict[str, Any], obj: str) -> tuple[np.ndarray, float]:
        """Fingertip grasp point (world) and yaw for the goal object at its current pose."""
        box = Box.of(priv["objects"][obj])
        others = [Box.of(o) for n, o in priv["objects"].items() if n != obj]
        if "bowl" in obj:
            radius = float(min(box.size[0], box.size[1])) / 2
            candidates = [box.centre + np.array([0.0, s * (radius - 0.012), 0.0]) for s in (1.0, -1.0)]

            def clearance(p: np.ndarray) -> float:
                return min((o.xy_distance(p) for o in others if o.top > box.bottom + 0.01), default=1.0)

            point = max(candidates, key=clearance)
            point[2] = box.top - 0.02
            return point, 0.0
        point = box.centre.copy()
        point[2] = max(box.top - 0.03, box.bottom + 0.014)
        yaw = 0.0 if box.size[1] <= box.size[0] else math.pi / 2  # fingers (world y at yaw 0) across the short side
        return point, yaw

    # -- control -----------------------------------------------------------------------------------

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self._phase_steps = 0

    def _move(self, eef: np.ndarray, r_cur: np.ndarray, target_eef: np.ndarray, vmax: float,
              gripper: float) -> np.ndarray:
        p = self.params
        action = np.zeros(ACTION_DIM, dtype=np.float64)
        action[:3] = np.clip(p.gain * (target_eef - eef), -vmax, vmax)
        r_des = rot_z(self._plan["yaw"]) @ self._r0
        action[3:6] = np.clip(p.yaw_gain * rotation_error(r_des, r_cur), -1.0, 1.0)
        action[6] = gripper
        return action

    def _act(self, priv: dict[str, Any]) -> tuple[np.ndarray, dict[str, float]]:
        eef = np.asarray(priv["eef_pos"], dtype=np.float64)
        r_cur = np.asarray(priv["eef_mat"], dtype=np.float64)
        if self._r0 is None:
            self._r0 = r_cur.copy()
        if self._plan is None:
            self._plan = self._make_plan(priv)
            self._replan_grasp(priv)
        plan = self._plan
        obj_box = Box.of(priv["objects"][plan["object"]])
        self._phase_steps += 1
        over_limit = self._phase_steps > PHASE_LIMITS[self.phase]
        grasp_eef = plan["grasp"] + np.array([0.0, 0.0, FINGERTIP_BELOW_EEF])
        carry_bottom = plan["target_top"] + CARRY_CLEARANCE
        vmax, carry = self.params.vmax, self.params.carry_vmax

        if self.phase == "hover":
            if self.params.funnel > 0:  # descend while aligning: lower the closer it is above the grasp point
                xy_err = float(np.linalg.norm(grasp_eef[:2] - eef[:2]))
                yaw_err = float(np.linalg.norm(rotation_error(rot_z(plan["yaw"]) @ self._r0, r_cur)))
                height = min(HOVER_HEIGHT, self.params.funnel * max(0.0, xy_err - FUNNEL_XY_SLACK)
                             + FUNNEL_YAW_HEIGHT * yaw_err)
                target = grasp_eef + np.array([0.0, 0.0, height])
                if height < FUNNEL_XY_SLACK or over_limit:
                    self._set_phase("descend")
            else:
                target = grasp_eef + np.array([0.0, 0.0, HOVER_HEIGHT])
                if np.linalg.norm(target - eef) < 0.01 or over_limit:
                    self._set_phase("descend")
            return self._move(eef, r_cur, target, vmax, -1.0), {"err_m": float(np.linalg.norm(target - eef))}
        if self.phase == "descend":
            if np.linalg.norm(grasp_eef - eef) < 0.006 or over_limit:
                self._set_phase("close")
                self._obj_z_at_close = obj_box.bottom
            return self._move(eef, r_cur, grasp_eef, 0.5, -1.0), {"err_m": float(np.linalg.norm(grasp_eef - eef))}
        if self.phase == "close":
            if over_limit:
                self._set_phase("lift")
                self._lift_target = eef.copy()
                self._lift_target[2] = max(eef[2] + 0.10, carry_bottom + (eef[2] - obj_box.bottom) + 0.01)
            return self._move(eef, r_cur, grasp_eef, vmax, 1.0), {}
        if self.phase == "lift":
            rise = obj_box.bottom - self._obj_z_at_close
            if self._phase_steps == LIFT_CHECK_STEPS and rise < LIFT_MIN_RISE and self._regrasps < MAX_REGRASPS:
                self._regrasps += 1
                self._replan_grasp(priv)
                self._set_phase("hover")
                return self._move(eef, r_cur, eef + np.array([0.0, 0.0, 0.05]), vmax, -1.0), {"rise_m": rise}
            if abs(self._lift_target[2] - eef[2]) < 0.01 or over_limit:
                self._set_phase("carry")
            return self._move(eef, r_cur, self._lift_target, carry, 1.0), {"rise_m": rise}
        if self.phase in ("carry", "lower"):
            offset = obj_box.centre - eef  # steer the object, as it sits in the hand now
            half_h = obj_box.centre[2] - obj_box.bottom
            xy_err = float(np.linalg.norm(plan["target_xy"] - obj_box.centre[:2]))
            if self.phase == "carry":
                bottom = carry_bottom
                if self.params.funnel > 0:  # lower while converging: at place_tol the goal is the place height
                    bottom = plan["place_bottom"] + min(carry_bottom - plan["place_bottom"], self.params.funnel
                                                        * max(0.0, xy_err - self.params.place_tol))
                goal = np.array([*plan["target_xy"], bottom + half_h])
                if xy_err < self.params.place_tol or over_limit:
                    self._set_phase("lower")
            else:
                goal = np.array([*plan["target_xy"], plan["place_bottom"] + half_h])
                if obj_box.bottom - plan["place_bottom"] < 0.005 or over_limit:
                    self._set_phase("release")
            return self._move(eef, r_cur, goal - offset, carry, 1.0), {"xy_err_m": xy_err}
        if self.phase == "release":
            if over_limit:
                self._set_phase("retreat")
                self._retreat_target = eef + np.array([0.0, 0.0, 0.10])
            return self._move(eef, r_cur, eef, vmax, -1.0), {}
        target = self._retreat_target if self._retreat_target is not None else eef
        return self._move(eef, r_cur, target, vmax, -1.0), {}

    def _replan_grasp(self, priv: dict[str, Any]) -> None:
        point, yaw = self._grasp(priv, self._plan["object"])
        self._plan["grasp"], self._plan["yaw"] = point, yaw
