"""One closed-loop LIBERO episode, following openpi's examples/libero/main.py.

1. policy.reset(episode key, paired seed); env.reset: a hard reset in the scene layout of env.seeding, then
   set_init_state(init_states[trial])
2. 10 settle steps with the dummy action (done is not checked, as in openpi)
3. until done or max_steps policy actions: when a query is due, build the observation (tasks.protocol)
   and query the policy; sync: execute the first `replan_steps` actions of the chunk; realtime: the chunk
   arrives its modelled delay later (libero_eval/execution.py)
4. success = the env's done flag at any step

Outcomes: success; failure (max_steps, or `env_exception`: the simulator raised under the policy's
actions); error (anything outside the episode's control: env reset, rendering, the policy crashing).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from policies.base import IMAGE_KEY, PRIVILEGED_KEY, PROMPT_KEY, STATE_KEY, STEP_KEY, WRIST_IMAGE_KEY, Policy
from policies.serving.variants import EXECUTIONS, ExecutionSettings
from tasks import protocol, registry
from tasks.env import LiberoEnv, RenderError
from tasks.video import VideoWriter, closing_card, hud_frame, signal_text

from libero_eval.execution import ChunkExecutor, LatencyModel, frame_cost_us
from libero_eval.observations import save_observations
from libero_eval.specs import EpisodeResult, EpisodeSpec
from libero_eval.store import INFRA_REASONS

VIDEO_MODES = ("query", "every_step", "none")
PARTIAL_VIDEO = ".partial.mp4"  # a video being written; renamed to <stem>.mp4 when its episode has an outcome


def video_paths(run_dir: str | Path, spec: EpisodeSpec) -> tuple[Path, Path]:
    """(final, partial) paths of an episode's video. One name per episode: an attempt that is retried (an
    infrastructure error) leaves no video, a killed one only its partial file, which the next attempt
    replaces or `ResultStore.prune_videos` removes."""
    final = Path(run_dir) / "videos" / f"{spec.file_stem}.mp4"
    return final, final.with_name(spec.file_stem + PARTIAL_VIDEO)


def finish_video(writer: VideoWriter, partial: Path, final: Path, keep: bool) -> bool:
    """Close the writer, then rename the partial video to its final name (keep) or delete it. False when
    no video results (not kept, or no frame was ever written: imageio then creates no file)."""
    try:
        writer.close()
        if keep and partial.exists():
            os.replace(partial, final)
            return True
        partial.unlink(missing_ok=True)
    except OSError as exc:  # the episode's result still counts; a missing video is logged
        logging.getLogger("libero_eval").warning("video %s not finished: %s", final, exc)
    return False



@dataclasses.dataclass
class EpisodeConfig:
    """The `episode` section of a sweep: how each episode runs and what it records."""

    replan_steps: int = protocol.REPLAN_STEPS  # actions of each chunk executed before the next query
    num_steps_wait: int = protocol.NUM_STEPS_WAIT  # settle steps with the dummy action after the init state
    video: str = "query"  # query: one frame per policy query (no extra renders) | every_step: full fps | none
    video_wrist: bool = True  # wrist camera side by side with agentview
    video_fps: int = 10
    shadow: bool = False  # the policy actor also computes the full path per frame and records the deviation
    # save each query's observation to <run_dir>/observations/<file stem>.npz (input of `libero-eval replay`)
    record_observations: bool = False
    # the default execution of every variant (a variant may set its own: `timing: [sync, realtime]`):
    # sync = the simulator waits for the policy; realtime = chunks arrive ceil(cost x 20 Hz) steps late
    # (libero_eval/execution.py); fallback = what runs when the robot has no action left (realtime);
    # execution (realtime) = naive | rtc (real-time chunking: each chunk inpaints the one still executing)
    timing: str = "sync"
    fallback: str = "hold"
    execution: str = "naive"

    def __post_init__(self) -> None:
        if self.video not in VIDEO_MODES:
            raise ValueError(f"video: expected one of {VIDEO_MODES}, got {self.video!r}")
        if self.execution not in EXECUTIONS:  # rtc with sync timing is refused per variant (a variant may set timing)
            raise ValueError(f"execution: expected one of {', '.join(EXECUTIONS)}, got {self.execution!r}")
        ExecutionSettings(timing=self.timing, fallback=self.fallback)  # checks both (its messages name the key)
        for name in ("replan_steps", "num_steps_wait", "video_fps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")


def hud_lines(spec: EpisodeSpec, record: dict | None, env_step: int, realtime: bool) -> list[str]:
    """The three HUD lines of a video frame (tasks/video.py) after query `record` (None: settling)."""
    episode = f"{spec.suite} t{spec.task_id} trial {spec.trial}"
    if record is None:
        return [f"step {env_step}  settle", spec.policy_label, episode]
    delay = f"  +{record['delay_steps']} late" if realtime else ""
    signal = signal_text(record)
    return [f"step {env_step}  q{record['index']} {record['decision'].upper()} {record['reason']}{delay}",
            spec.policy_label + (f"  {signal}" if signal else ""), episode]


def closing_lines(spec: EpisodeSpec, task, status: str, reason: str, steps: int) -> list[str]:
    return [f"{reason} at step {steps}", spec.policy_label, f"{spec.suite} task {spec.task_id} trial {spec.trial}",
            str(task.language)[:60]]


def policy_observation(raw_obs: dict, prompt: str, privileged: dict | None = None, images: bool = True) -> dict:
    """The observation dict a policy receives (keys: policies.base, the contract) from a raw LIBERO
    observation processed by openpi's protocol (tasks.protocol); `images=False` leaves the cameras out
    (policies that never read them: no render needed)."""
    obs = {STATE_KEY: protocol.state_vector(raw_obs), PROMPT_KEY: str(prompt)}
    if images:
        if protocol.AGENTVIEW not in raw_obs or protocol.WRIST not in raw_obs:
            raise KeyError("camera images missing from this step's observation: with lazy rendering, images exist "
                           "only on steps announced with env.expect_observation()")
        obs[IMAGE_KEY] = protocol.model_image(raw_obs[protocol.AGENTVIEW])
        obs[WRIST_IMAGE_KEY] = protocol.model_image(raw_obs[protocol.WRIST])
    if privileged is not None:
        obs[PRIVILEGED_KEY] = privileged
    return obs


class PolicyUnavailable(RuntimeError):
    """The policy could not be reached (its actor died or restarted, the session was lost): the
    infrastructure's failure, not the policy's; the episode ends as `policy_unavailable` and is retried."""


class _EpisodeError(Exception):
    """Internal: ends the episode as an error with `reason`."""

    def __init__(self, reason: str, exc: BaseException):
        super().__init__(reason)
        self.reason = reason
        self.exc = exc


def _policy_reason(exc: BaseException) -> str:
    return "policy_unavailable" if isinstance(exc, PolicyUnavailable) else "policy_error"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def run_episode(
    spec: EpisodeSpec,
    env: LiberoEnv,
    policy: Policy,
    settings: EpisodeConfig | None = None,
    run_dir: str | Path | None = None,
    execution: ExecutionSettings | None = None,
    latency: LatencyModel | None = None,
) -> EpisodeResult:
    """Run one episode and return its result; never raises for anything the episode itself does.

    `execution`: the variant's timing and fallback (default: settings.timing / settings.fallback);
    `latency`: prices each query (`cost_ms` in its record; realtime delays); None: no cost is recorded
    (realtime then runs every chunk with no delay)."""
    settings = settings or EpisodeConfig()
    execution = execution or ExecutionSettings(timing=settings.timing, fallback=settings.fallback)
    t_start = time.perf_counter()
    task = env.task
    records: list[dict] = []
    steps = 0
    writer: VideoWriter | None = None
    video_rel: str | None = None
    status, reason, error = "failure", "max_steps", None
    last_record = None
    recorded: list[tuple[int, dict]] = []  # (env step, observation) per query, when recording

    def frame(raw_obs, env_step: int) -> None:
        images = [protocol.model_image(raw_obs[protocol.AGENTVIEW])]
        if settings.video_wrist:
            images.append(protocol.model_image(raw_obs[protocol.WRIST]))
        lines = hud_lines(spec, last_record, env_step, execution.timing == "realtime")
        writer.append(hud_frame(images, lines, last_record["decision"] if last_record else None))

    def close_video() -> None:
        """The scene at the last step (a success between two queries is seen) and a closing card."""
        try:
            frame(env.observe_state(env.get_sim_state()), steps)
            card = closing_card(writer.width, writer.height, status, closing_lines(spec, task, status, reason, steps))
            for _ in range(settings.video_fps):  # one second
                writer.append(card)
        except Exception as exc:  # the episode's result stands without its last frames
            logging.getLogger("libero_eval").warning("closing frames of %s not written: %s", spec.key, exc)

    video_on = settings.video != "none" and run_dir is not None
    # recorded observations feed `libero-eval replay` (image-reading cache policies): they always carry images
    needs_images = getattr(policy, "needs_images", True) or settings.record_observations
    needs_privileged = getattr(policy, "needs_privileged", False)

    def images_at(step: int) -> bool:
        """Is the observation of policy step `step` rendered? Always for policies that look; for the others
        only for a query-mode video frame every `replan_steps` steps (image-free policies query each step)."""
        return needs_images or (video_on and settings.video == "query" and step % settings.replan_steps == 0)

    counters_before = dataclasses.replace(env.counters, render_steps=[])
    outcome = False  # True once the episode has a result; an interrupt (KeyboardInterrupt, ...) leaves it False
    final_video = partial_video = None
    try:
        try:
            policy.reset(spec.key, spec.seed)
        except Exception as exc:
            raise _EpisodeError(_policy_reason(exc), exc) from exc
        try:
            init_state = registry.init_state(spec.suite, spec.task_id, spec.trial)
            env.set_render_every_step(settings.video == "every_step")
            env.reset(spec.seed, init_state, trial=spec.trial)
            if images_at(0):
                env.expect_observation(settings.num_steps_wait)
            raw = None
            for _ in range(settings.num_steps_wait):
                raw, _ = env.step(protocol.DUMMY_ACTION)
        except Exception as exc:
            raise _EpisodeError("env_error", exc) from exc

        if video_on:
            final_video, partial_video = video_paths(run_dir, spec)
            writer = VideoWriter(partial_video, fps=settings.video_fps)

        executor = ChunkExecutor(execution, settings.replan_steps, env.control_hz)
        done = False
        while steps < spec.max_steps:
            if executor.query_due(steps):
                try:
                    privileged = env.privileged() if needs_privileged else None
                except Exception as exc:
                    raise _EpisodeError("env_error", exc) from exc
                obs = policy_observation(raw, task.language, privileged, images=needs_images)
                obs[STEP_KEY] = steps
                if settings.record_observations:
                    recorded.append((steps, obs))
                try:
                    chunk = policy.infer(obs)
                except Exception as exc:
                    raise _EpisodeError(_policy_reason(exc), exc) from exc
                last_record = chunk.record.to_dict()
                last_record["env_step"] = steps
                cost_us = frame_cost_us(last_record, latency) if latency is not None else 0
                if latency is not None:
                    last_record["cost_ms"] = cost_us / 1000
                records.append(last_record)
                next_query = executor.issue(steps, chunk.actions, cost_us, last_record)
                guided = (last_record.get("extra") or {}).get("rtc")
                if guided is not None and guided["delay_steps"] != last_record["delay_steps"]:
                    raise RuntimeError(f"RTC guided query {len(records) - 1} for a delay of {guided['delay_steps']} "
                                       f"steps but its chunk arrives {last_record['delay_steps']} steps late: the "
                                       "policy actor and this worker price frames differently")
                if writer is not None and settings.video == "query" and protocol.AGENTVIEW in raw:
                    frame(raw, steps)
                if next_query < spec.max_steps and images_at(next_query):  # never render past the last step
                    env.expect_observation(next_query - steps)
            action, _fallback = executor.action(steps)
            try:
                raw, done = env.step(action)
            except RenderError as exc:
                raise _EpisodeError("render_error", exc) from exc
            except Exception as exc:  # the simulator failed under the policy's action: the policy pays
                steps += 1
                status, reason, error = "failure", "env_exception", _describe(exc)
                break
            steps += 1
            if writer is not None and settings.video == "every_step":
                frame(raw, steps)
            if done:
                status, reason = "success", "done"
                break
        if writer is not None:
            close_video()
        outcome = True
    except _EpisodeError as exc:
        status, reason = "error", exc.reason
        error = _describe(exc.exc) + "\n" + "".join(traceback.format_exception(exc.exc)[-3:])
        outcome = True
    except Exception as exc:  # a bug of ours: still one stored result, never a silent loss
        status, reason = "error", "internal_error"
        error = _describe(exc) + "\n" + traceback.format_exc()
        outcome = True
    finally:
        if writer is not None:
            # an infrastructure error is retried or re-run, an interrupted episode has no result: no video
            keep = outcome and not (status == "error" and reason in INFRA_REASONS)
            if finish_video(writer, partial_video, final_video, keep):
                video_rel = str(final_video.relative_to(run_dir))
        if recorded and run_dir is not None:
            try:
                save_observations(Path(run_dir) / "observations" / f"{spec.file_stem}.npz", spec, recorded)
            except OSError as exc:  # the episode's result still counts; the missing recording is logged
                logging.getLogger("libero_eval").warning("observations of %s not saved: %s", spec.key, exc)
        try:
            policy.end_episode(spec.key)
        except Exception:
            pass

    c = env.counters
    env_stats = {
        "steps": c.steps - counters_before.steps,
        "renders": c.renders - counters_before.renders,
        "skipped_renders": c.skipped_renders - counters_before.skipped_renders,
        "step_s": round(c.step_s - counters_before.step_s, 4),
        "render_s": round(c.render_s - counters_before.render_s, 4),
        "reset_s": round(c.reset_s - counters_before.reset_s, 4),
    }
    return EpisodeResult(
        key=spec.key,
        suite=spec.suite,
        task_id=spec.task_id,
        task_name=task.name,
        trial=spec.trial,
        repeat=spec.repeat,
        policy_label=spec.policy_label,
        seed=spec.seed,
        status=status,
        success=status == "success",
        reason=reason,
        steps=steps,
        wall_s=round(time.perf_counter() - t_start, 3),
        error=error,
        video=video_rel,
        video_frames=writer.frames if video_rel is not None else 0,
        records=records,
        env_stats=env_stats,
        policy=policy.describe(),
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
