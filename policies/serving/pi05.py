"""`Pi05Engine`: many episode sessions, each with its own cache state, served in batches from one shared
Pi0.5 model (the policy actor's engine; Ray-free; sessions and model-free variants: `engine.Engine`).

A session holds its cache state as values (`CacheState`: the last full frame's prefix K/V, its images and
attention maps); one cache policy object per variant, bound to the model's layout once, only decides.

`infer_batch(requests)`, one answer per request, in order:
  1. preprocess each observation (Pi05Processor) into a Frame;
  2. each session's policy decides full / reuse / partial from the session's state (cheap; `decide`);
  3. vision (embed_prefix) once for every full and partial request; one batched prefix pass per group of
     full requests with the same attention needs; partial passes (vla_cache) one at a time, since each
     drops its own token set; reuse requests skip both and take their session's stored K/V;
  4. denoising for the whole batch, grouped by (num_steps, schedule, solver, action-attention layers, RTC
     guidance settings), every request with its own paired noise sample_noise(episode seed, inference index);
     `execution: rtc` sessions are guided towards the chunk still executing (policies/serving/rtc.py), which
     the session holds as a value like its K/V;
  5. postprocess, update each session's policy, build the records;
  6. shadow mode: the full path for every non-full request with the same noise, settings and guidance, timed apart
     (`latency_ms.shadow`, excluded from `total`); it never touches actions or session state.
A request's actions do not depend on the batch it rode in: on CPU they are bit-identical to batch size 1
(max |difference| measured 0.0, tests/test_engine_batching.py; the model computes the flow-time condition
once per batch so no [B, W] matmul changes kernel with B). GPU kernels may round differently by batch
shape: run that test where a GPU is lent. `total` is the wall time of the batch call that served the
request; the records also carry `batch_size` and `queue_wait_ms` (from the request's enqueue time, set by
whoever queued it, e.g. the policy actor's batcher, to the start of the batch).
"""
from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from policies.base import ActionChunk, InferenceRecord, PolicyError
from policies.cache import make_cache_policy
from policies.cache.base import AttentionNeeds, CachePolicy, CacheState, Decision, Frame, FrameOutputs, PrefixLayout
from policies.cache.signals import PrefixAttentionStats, cosine, l2
from policies.pi05.backends import Pi05Backend
from policies.pi05.modeling import Pi05Model
from policies.pi05.processing import Pi05Processor
from policies.pi05.sampling import EVALUATIONS_PER_STEP
from policies.pi05.rtc import Guidance
from policies.pi05.stages import Pi05Inputs, Prefix, PrefixKV
from policies.serving.engine import Engine, Request, batch_info
from policies.serving.latency import LatencyProfile, RealtimeClock, calibrate
from policies.serving.noise import sample_noise
from policies.serving.rtc import ChunkInFlight, GuidancePlan, clock_delay, frozen_deviation, plan_guidance, query_step
from policies.serving.variants import DenoiseSettings, PolicyVariant, RTCSettings

EXECUTED_STEPS = 5  # actions of a chunk executed before the next query (the LIBERO protocol's replan_steps)


@dataclasses.dataclass
class Session:
    """One episode under one Pi0.5 variant: its paired seed, its cache state and the next inference index."""

    variant: PolicyVariant
    seed: int
    policy: CachePolicy  # shared by every session of the variant; decides from `state`
    state: CacheState
    denoise: DenoiseSettings  # resolved: num_steps set
    index: int = 0
    clock: RealtimeClock | None = None  # execution rtc: prices this session's frames before they run
    chunk: ChunkInFlight | None = None  # execution rtc: the chunk being executed (the next one's guide)

    @property
    def rtc(self) -> bool:
        return self.variant.execution.execution == "rtc"


@dataclasses.dataclass
class _Row:
    """One request in flight through `infer_batch`."""

    position: int
    session: Session
    inputs: Pi05Inputs  # batch 1
    frame: Frame
    decision: Decision
    latency: dict[str, float]
    prefix: Prefix | None = None  # batch 1, full and partial rows
    prefix_kv: PrefixKV | None = None
    prefix_mask: Tensor | None = None
    entropy: dict[int, float] = dataclasses.field(default_factory=dict)
    relevance: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    denoise_attention: dict[int, Tensor] = dataclasses.field(default_factory=dict)
    actions: np.ndarray | None = None  # [H, 7] unnormalised
    model_actions: Tensor | None = None  # [H, A] normalised (execution rtc: the next query's guide)
    rtc: GuidancePlan | None = None  # execution rtc
    shadow: dict[str, float] = dataclasses.field(default_factory=dict)  # deviation from the full path


class Pi05Engine(Engine):
    """Sessions of every Pi0.5 variant (cache policy + denoising knobs) and of model-free variants."""

    def __init__(
        self,
        model: Pi05Model,
        processor: Pi05Processor,
        *,
        shadow: bool = False,
        executed_steps: int = EXECUTED_STEPS,
        label: str = "pi05",
        backend: Pi05Backend | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval()
        # every stage runs through the backend (eager: the model's own methods; compile; tensorrt)
        self.stages = backend if backend is not None else Pi05Backend(model)
        self.processor = processor
        self.config = model.config
        self.layout = PrefixLayout.from_config(model.config)
        self.device = next(model.parameters()).device
        self.shadow = shadow
        self.executed_steps = executed_steps
        self.label = label
        self._bound: dict[str, tuple[CachePolicy, DenoiseSettings]] = {}  # variant label ->

    # ---- sessions

    def bind(self, variant: PolicyVariant) -> tuple[CachePolicy, DenoiseSettings]:
        """The variant's cache policy on this model and its resolved denoising settings, checked against the
        model once (layers in range, the attention step within the denoising loop)."""
        if variant.label not in self._bound:
            denoise = variant.denoise.resolved(self.config.num_steps)
            policy = make_cache_policy(variant.name, variant.policy, self.layout)
            needs = policy.needs
            evaluations = denoise.num_steps * EVALUATIONS_PER_STEP[denoise.solver]
            if needs.denoise and not -evaluations <= needs.denoise_eval < evaluations:
                raise PolicyError(f"policy {variant.label!r}: attention_step {needs.denoise_eval} out of range for "
                                  f"{evaluations} velocity evaluations ({denoise.num_steps} {denoise.solver} steps)")
            self._bound[variant.label] = policy, denoise
        return self._bound[variant.label]

    def _open_model(self, variant: PolicyVariant, seed: int, clock: RealtimeClock | None = None) -> Session:
        policy, denoise = self.bind(variant)
        session = Session(variant, seed, policy, policy.new_state(), denoise, clock=clock)
        if session.rtc:
            clock_delay(clock, variant.label)  # refuses an RTC session without a clock now, not at its 2nd query
        return session

    def session_bytes(self, session_id: str) -> int:
        """Memory a session holds (stored K/V, images, maps); 0 for model-free sessions."""
        session = self.session(session_id)
        return session.state.nbytes() if isinstance(session, Session) else 0

    def describe(self, session_id: str) -> dict[str, Any]:
        session = self.session(session_id)
        if not isinstance(session, Session):
            return session.describe()
        return {"name": session.variant.name, "label": session.variant.label, "model": self.label,
                **session.variant.param_dict, **dataclasses.asdict(session.denoise)}

    def calibrate(self, repeats: int = 5) -> LatencyProfile:
        """Per-stage times of this model on its device at batch 1 (what `calibrated` latency prices)."""
        return calibrate(self.stages, self.config, self.device, repeats=repeats)

    # ---- serving

    def infer_batch(self, requests: list[Request]) -> list[ActionChunk | BaseException]:
        with torch.inference_mode():
            return super().infer_batch(requests)

    def _infer_model(self, items: list[tuple[int, Request, Session]], batch_size: int, started: float
                     ) -> list[ActionChunk | BaseException]:
        clock = self._clock
        t_start = clock()
        results: list[ActionChunk | BaseException | None] = [None] * len(items)
        rows: list[_Row] = []
        for position, (_, request, session) in enumerate(items):
            try:
                rows.append(self._admit(position, request, session))
            except Exception as exc:  # one bad request never fails the others
                results[position] = exc
        try:
            self._compute(rows)
        except Exception as exc:  # a failed model pass fails every request still in flight
            for row in rows:
                results[row.position] = exc
            return results  # type: ignore[return-value]
        total_ms = (clock() - t_start) * 1e3
        for row in rows:
            row.latency["total"] = total_ms
            self._finish(row)
        if self.shadow:
            self._shadow(rows)
        for row in rows:
            record = self._record(row)
            record.extra.update(batch_info(batch_size, started, items[row.position][1]))
            results[row.position] = ActionChunk(row.actions, record)
            row.session.index += 1
            if row.rtc is not None:  # the next query's guide: this chunk, issued at this query's step
                row.session.chunk = ChunkInFlight(row.model_actions, row.rtc.step)
        return results  # type: ignore[return-value]

    def _admit(self, position: int, request: Request, session: Session) -> _Row:
        """Preprocess and decide (no model call)."""
        clock = self._clock
        t0 = clock()
        inputs, states = self.processor.prepare([request.observation], self.device)
        frame = Frame(index=session.index, images=inputs.images[0], image_mask=inputs.image_masks[0],
                      state=states[0].astype(np.float32))
        t1 = clock()
        decision = session.policy.decide(frame, session.state)
        plan = None
        if session.rtc:
            delay = clock_delay(session.clock, session.variant.label)
            plan = plan_guidance(session.variant.rtc, session.chunk, query_step(request.observation),
                                 lambda guided: delay(self._frame_compute(decision, session, guided)),
                                 self.config.action_horizon, self.config.action_dim)
        t2 = clock()
        latency = {"preprocess": (t1 - t0) * 1e3, "decide": (t2 - t1) * 1e3, "vision": 0.0, "prefix": 0.0}
        return _Row(position, session, inputs, frame, decision, latency, rtc=plan)

    def _compute(self, rows: list[_Row]) -> None:
        clock = self._clock
        # vision for every full and partial row, in one batch
        vision_rows = [r for r in rows if r.decision.kind != "reuse"]
        if vision_rows:
            t0 = clock()
            prefix = self._embed([r.inputs for r in vision_rows])
            elapsed = (clock() - t0) * 1e3
            for j, row in enumerate(vision_rows):
                row.prefix = _take(prefix, [j])
                row.latency["vision"] = elapsed
        # prefix: batched per attention-needs group (full); one by one (partial)
        full_groups: dict[AttentionNeeds, list[_Row]] = defaultdict(list)
        for row in rows:
            if row.decision.kind == "full":
                full_groups[_prefix_needs(row.decision.needs)].append(row)
        for needs, group in full_groups.items():
            self._prefix_pass(group, needs)
        for row in rows:
            if row.decision.kind == "partial":
                self._prefix_pass([row], _prefix_needs(row.decision.needs))
            elif row.decision.kind == "reuse":
                row.prefix_kv, row.prefix_mask = row.session.state.reuse_kv()
        # denoising for the whole batch, grouped by what the loop computes
        denoise_groups: dict[tuple, list[_Row]] = defaultdict(list)
        for row in rows:
            layers = tuple(sorted(row.decision.needs.denoise_layers))
            evaluation = row.decision.needs.denoise_eval if layers else None
            denoise_groups[(row.session.denoise.key, layers, evaluation, _guidance_key(row))].append(row)
        for (_, layers, _, _), group in denoise_groups.items():
            self._denoise(group, layers)

    def _prefix_pass(self, group: list[_Row], needs: AttentionNeeds) -> None:
        clock = self._clock
        t0 = clock()
        prefix = _cat_prefix([r.prefix for r in group])
        stats = None
        if needs.prefix:
            stats = PrefixAttentionStats(prefix.pad_mask, self.layout.text_start, needs.prefix_entropy,
                                         needs.prefix_relevance)
        plan = group[0].decision.plan  # partial passes come one row at a time
        prefix_kv = self.stages.compute_prefix_kv(prefix, reuse=plan, on_attention=stats,
                                                  callback_layers=sorted(stats.layers) if stats else False)
        for j, row in enumerate(group):
            row.prefix_kv = prefix_kv if len(group) == 1 else prefix_kv.select([j])
            row.prefix_mask = row.prefix.pad_mask
            if stats is not None:
                row.entropy = {layer: float(v[j]) for layer, v in stats.entropy.items()}
                row.relevance = {layer: v[j] for layer, v in stats.relevance.items()}
        self._sync()
        elapsed = (clock() - t0) * 1e3
        for row in group:
            row.latency["prefix"] = elapsed

    def _denoise(self, group: list[_Row], layers: tuple[int, ...]) -> None:
        clock = self._clock
        t0 = clock()
        settings = group[0].session.denoise
        prefix_kv = group[0].prefix_kv if len(group) == 1 else PrefixKV.concat([r.prefix_kv for r in group])
        mask = torch.cat([r.prefix_mask for r in group])
        noise = torch.cat([self._noise(r.session, r.session.index) for r in group]).to(self.device)
        result = self.stages.denoise(prefix_kv, mask, noise, settings.num_steps, settings.schedule, settings.solver,
                                     return_attention=list(layers) if layers else False,
                                     guidance=_guidance(group),  # maps at the one evaluation the policy reads
                                     attention_eval=group[0].decision.needs.denoise_eval if layers else None)
        actions = self.processor.postprocess(result.actions)  # [B, H, 7]
        for j, row in enumerate(group):
            row.actions = actions[j]
            row.model_actions = result.actions[j]
            if layers:
                maps = result.attention[0]  # the only evaluation with maps
                row.denoise_attention = {layer: maps[layer][j] for layer in layers}
        self._sync()
        elapsed = (clock() - t0) * 1e3
        for row in group:
            row.latency["denoise"] = elapsed

    def _finish(self, row: _Row) -> None:
        """Hand the frame's outputs to its policy (after every row of the batch succeeded)."""
        outputs = FrameOutputs(prefix_kv=row.prefix_kv, prefix_mask=row.prefix_mask, prefix_entropy=row.entropy,
                               prefix_relevance=row.relevance, denoise_attention=row.denoise_attention)
        row.session.policy.update(row.frame, row.decision, outputs, row.session.state)

    def _shadow(self, rows: list[_Row]) -> None:
        """The full path (same noise, same denoising knobs) for every row that did not run it."""
        clock = self._clock
        t0 = clock()
        others = [r for r in rows if r.decision.kind != "full"]
        reference: dict[int, np.ndarray] = {}
        if others:
            prefix = self._embed([r.inputs for r in others])
            prefix_kv = self.stages.compute_prefix_kv(prefix)
            groups: dict[tuple, list[int]] = defaultdict(list)
            for j, row in enumerate(others):
                groups[(row.session.denoise.key, _guidance_key(row))].append(j)
            for members in groups.values():
                settings = others[members[0]].session.denoise
                noise = torch.cat([self._noise(others[j].session, others[j].session.index) for j in members])
                result = self.stages.denoise(prefix_kv.select(members), prefix.pad_mask[members], noise.to(self.device),
                                             settings.num_steps, settings.schedule, settings.solver,
                                             guidance=_guidance([others[j] for j in members]))
                for j, actions in zip(members, self.processor.postprocess(result.actions), strict=True):
                    reference[others[j].position] = actions
        self._sync()
        elapsed = (clock() - t0) * 1e3
        exact = {"shadow_cos": 1.0, "shadow_l2": 0.0, "shadow_cos_executed": 1.0, "shadow_l2_executed": 0.0}
        n = self.executed_steps
        for row in rows:
            if row.decision.kind == "full":  # its actions are the full path's, with the same noise
                row.latency["shadow"], row.shadow = 0.0, dict(exact)
                continue
            executed, full = torch.from_numpy(row.actions), torch.from_numpy(reference[row.position])
            row.latency["shadow"] = elapsed
            row.shadow = {"shadow_cos": cosine(executed, full), "shadow_l2": l2(executed, full),
                          "shadow_cos_executed": cosine(executed[:n], full[:n]),
                          "shadow_l2_executed": l2(executed[:n], full[:n])}

    def _record(self, row: _Row) -> InferenceRecord:
        d = row.decision
        compute = self._frame_compute(d, row.session, row.rtc is not None and row.rtc.guidance is not None)
        signals = {k: float(v) for k, v in d.signals.items()}
        signals["prefix_skipped"] = 1.0 - compute["prefix_token_layers"] / compute["prefix_token_layers_full"]
        signals.update(row.shadow)
        extra = {**d.extra, "thresholds": dict(d.thresholds), "prompt_tokens": int(row.inputs.token_masks.sum()),
                 "compute": compute}
        if row.rtc is not None:
            extra["rtc"] = row.rtc.describe()
            deviation = frozen_deviation(row.model_actions, row.rtc)
            if deviation is not None:
                signals["rtc_frozen_dev"] = deviation
        latency = {k: round(v, 4) for k, v in row.latency.items()}
        return InferenceRecord(index=row.session.index, decision=d.kind, reason=d.reason, signals=signals,
                               latency_ms=latency, extra=extra)

    def _frame_compute(self, decision: Decision, session: Session, guided: bool = False) -> dict[str, int]:
        """What this frame itself ran, whatever it shared a batch with (shadow work not counted): camera
        images through the vision tower (every slot, the padded one too, as openpi does), prefix token-layers
        computed out of a full pass's (reuse 0, partial the plan's), velocity evaluations of the loop, and
        (RTC guided by the model jacobian) the evaluations that also ran a VJP."""
        denoise = session.denoise
        full = self.layout.depth * self.layout.num_tokens
        if decision.kind == "full":
            token_layers = full
        elif decision.kind == "reuse":
            token_layers = 0
        else:
            token_layers = sum(decision.plan.tokens_per_layer(self.layout.num_tokens))
        evals = denoise.num_steps * EVALUATIONS_PER_STEP[denoise.solver]
        if decision.needs.denoise_layers and not guided and getattr(self.stages, "graphs", None) is not None:
            evals += 1  # the CUDA-graph path: the plain loop's replay, then the read evaluation again with maps
        vjp = guided and session.variant.rtc.rtc_jacobian == "model"
        return {"vision_images": 0 if decision.kind == "reuse" else self.layout.num_cameras,
                "prefix_token_layers": token_layers, "prefix_token_layers_full": full,
                "velocity_evals": evals, **({"vjp_evals": evals} if vjp else {})}

    # ---- helpers

    def _embed(self, inputs: Sequence[Pi05Inputs]) -> Prefix:
        batch = _cat_inputs(inputs)
        prefix = self.stages.embed_prefix(batch.images, batch.image_masks, batch.tokens, batch.token_masks)
        self._sync()
        return prefix

    def _noise(self, session: Session, index: int) -> Tensor:
        return sample_noise(session.seed, index, (1, self.config.action_horizon, self.config.action_dim))

    def _clock(self) -> float:
        self._sync()
        return time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


_PREFIX_TENSORS = ("embeddings", "pad_mask", "ar_mask", "positions")  # the batched fields of a Prefix


def _prefix_needs(needs: AttentionNeeds) -> AttentionNeeds:
    """The part of a decision's needs that changes the prefix pass (the denoise part is grouped later)."""
    return AttentionNeeds(prefix_entropy=needs.prefix_entropy, prefix_relevance=needs.prefix_relevance)


def _guidance_key(row: _Row) -> RTCSettings | None:
    """Rows denoised together share their guidance settings (guided rows) or have none."""
    return row.session.variant.rtc if row.rtc is not None and row.rtc.guidance is not None else None


def _guidance(group: Sequence[_Row]) -> Guidance | None:
    """The batched guidance of a denoising group (rows of one `_guidance_key`)."""
    if _guidance_key(group[0]) is None:
        return None
    return Guidance.concat([r.rtc.guidance for r in group])


def _cat_inputs(parts: Sequence[Pi05Inputs]) -> Pi05Inputs:
    if len(parts) == 1:
        return parts[0]
    fields = [f.name for f in dataclasses.fields(Pi05Inputs)]
    return Pi05Inputs(**{name: torch.cat([getattr(p, name) for p in parts]) for name in fields})


def _take(prefix: Prefix, rows: list[int]) -> Prefix:
    """Rows of a batched prefix (copies)."""
    index = torch.as_tensor(rows, device=prefix.embeddings.device)
    return Prefix(**{name: getattr(prefix, name).index_select(0, index) for name in _PREFIX_TENSORS},
                  segments=prefix.segments)


def _cat_prefix(parts: Sequence[Prefix]) -> Prefix:
    if len(parts) == 1:
        return parts[0]
    return Prefix(**{name: torch.cat([getattr(p, name) for p in parts]) for name in _PREFIX_TENSORS},
                  segments=parts[0].segments)
