"""Execution backends for the Pi0.5 stages the policy actor runs: eager PyTorch, torch.compile, TensorRT.

A backend offers the model's stage API (`embed_prefix`, `compute_prefix_kv`, `denoise`, `sample_actions`)
with the same signatures and values, so `Pi05Engine` (policies/serving/pi05.py) and every cache path run unchanged on any
of them. What a backend cannot accelerate runs the model's own eager method and is counted in
`fallbacks` (reported by `describe()`):
  * the partial prefix pass (VLA-Cache token reuse): each layer drops a data-dependent token set;
  * tensorrt: attention layers the exported variants do not return (see policies/pi05/export.py).

    eager     the model's methods; the reference every other backend is tested against.
    compile   torch.compile of the vision tower, the prefix pass and the denoising step (mode configurable).
              On CUDA with `cuda_graphs`, the whole denoising loop (every step, the Euler updates) is
              captured once per (batch, prefix length, steps, schedule, solver) as one CUDA graph, so a
              reuse frame is one graph replay plus the input copies.
    tensorrt  engines built by launch/build_engines.py from the exported ONNX stages; the same CUDA graph
              capture of the loop around the TensorRT step. Needs the `tensorrt` extra and a GPU; the
              engine runner is in policies/pi05/tensorrt.py.

Tolerances against eager on the same inputs (float32): compile ACTION_TOLERANCE["compile"] (inductor
fuses and reorders float reductions), tensorrt ACTION_TOLERANCE["tensorrt"] (FP16 engines; FP8 prefix
engines need a success-rate check, not a tolerance).
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from policies.pi05.modeling import Pi05Model
from policies.pi05.rtc import Guidance
from policies.pi05.stages import (
    AttentionCallback,
    AttentionLayers,
    DenoiseResult,
    Pi05Inputs,
    Prefix,
    PrefixKV,
    TokenReuse,
    resolve_layers,
)

BACKENDS = ("eager", "compile", "tensorrt")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# torch.compile modes whose own CUDA graphs would nest inside the backend's capture of the denoising loop
_WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
# max |actions - eager actions| on the same inputs (normalised action units), asserted in the tests / bench
ACTION_TOLERANCE = {"eager": 0.0, "compile": 1e-4, "tensorrt": 5e-2}


class BackendError(RuntimeError):
    """A backend that cannot run here (missing extra, no GPU, engines that do not match the model)."""


@dataclasses.dataclass(frozen=True)
class BackendOptions:
    """The `model.backend*` settings of a sweep config.

    compile_mode: torch.compile's mode. cuda_graphs: capture the denoising loop as one CUDA graph per
    shape (CUDA only; compile and tensorrt). engine_dir: the directory launch/build_engines.py wrote.
    """

    backend: str = "eager"
    compile_mode: str = "default"
    cuda_graphs: bool = True
    engine_dir: str | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of: {', '.join(BACKENDS)}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {self.compile_mode!r} is not one of: {', '.join(COMPILE_MODES)}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.backend == "tensorrt" and not self.engine_dir:
            raise ValueError("backend 'tensorrt' needs engine_dir: the directory launch/build_engines.py wrote")

    @classmethod
    def from_model_section(cls, section: dict[str, Any]) -> BackendOptions:
        """The options among a sweep config's `model` section (other keys ignored, missing ones default)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name: section[name] for name in names if name in section})


# --------------------------------------------------------------------------------------------------------
# eager, and the routing every backend shares


PrefixOutputs = tuple[tuple[Tensor, ...], tuple[Tensor, ...], dict[int, Tensor]]  # keys, values, {layer: map}


class Pi05Backend:
    """eager: every stage is the model's own method. It is also the routing of the other backends, which
    override three hooks (`encode_images`, `prefix_pass`, `velocity_predictor`); where a hook returns None
    the model's eager method runs, counted in `fallbacks` by reason."""

    accelerated = False  # eager's own calls are not fallbacks

    def __init__(self, model: Pi05Model, options: BackendOptions | None = None) -> None:
        self.model = model.eval()
        self.options = options or BackendOptions()
        self.device = next(model.parameters()).device
        self.fallbacks: Counter[str] = Counter()  # stage calls that ran eager, by reason
        self.setup_s = 0.0  # time spent compiling / capturing / loading (first calls), reported by describe()
        use_graphs = self.accelerated and self.options.cuda_graphs and self.device.type == "cuda"
        self.graphs = DenoiseGraphs(self) if use_graphs else None

    @property
    def name(self) -> str:
        return self.options.backend

    @property
    def config(self):
        return self.model.config

    # ---- hooks (accelerated backends override them)

    def encode_images(self, images: Tensor) -> Tensor:
        """Vision tower + projector: images [B, N, 3, S, S] -> [B, N, P, W_vlm]."""
        return self.model.embed_images(images)

    def prefix_pass(self, prefix: Prefix, layers: tuple[int, ...]) -> PrefixOutputs | None:
        """The full prefix pass with the maps of `layers`; None = the model's eager pass."""
        return None

    def velocity_predictor(self, prefix_kv: PrefixKV, layers: frozenset[int]) -> Callable | None:
        """A `Pi05Model.predict_velocity` replacement for one denoising run; None = the model's own."""
        return None

    def _fell_back(self, reason: str) -> None:
        if self.accelerated:
            self.fallbacks[reason] += 1

    # ---- stages (the model's stage API)

    def embed_prefix(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor) -> Prefix:
        return self.model.embed_prefix(images, image_masks, tokens, token_masks, encode_images=self.encode_images)

    def compute_prefix_kv(
        self,
        prefix: Prefix,
        return_attention: AttentionLayers = False,
        *,
        reuse: TokenReuse | None = None,
        on_attention: AttentionCallback | None = None,
        callback_layers: AttentionLayers = False,
    ) -> PrefixKV:
        depth = self.config.vlm.depth
        want = resolve_layers(return_attention, depth)
        hooked = resolve_layers(callback_layers, depth) if on_attention is not None else frozenset()
        result = None
        if reuse is None:  # a partial pass drops a data-dependent token set per layer: eager only
            result = self.prefix_pass(prefix, tuple(sorted(want | hooked)))
        if result is None:
            self._fell_back("partial_prefix" if reuse is not None else "prefix_attention_layers")
            return self.model.compute_prefix_kv(prefix, return_attention, reuse=reuse, on_attention=on_attention,
                                                callback_layers=callback_layers)
        keys, values, maps = result
        for layer in sorted(hooked):  # the same order as eager, after the pass rather than during it
            on_attention(layer, maps[layer], None)
        attention = tuple(maps[i] if i in want else None for i in range(depth)) if want else None
        return PrefixKV(keys=keys, values=values, attention=attention)

    def denoise(
        self,
        prefix_kv: PrefixKV,
        prefix_mask: Tensor,
        noise: Tensor,
        num_steps: int | None = None,
        schedule: str = "linear",
        solver: str = "euler",
        return_attention: AttentionLayers = False,
        guidance: Guidance | None = None,
        attention_eval: int | None = None,
    ) -> DenoiseResult:
        """guidance (real-time chunking, policies/pi05/rtc.py) is never captured in a CUDA graph (its target
        changes every call); its `model` jacobian differentiates the step: the model's eager one.
        attention_eval: the one velocity evaluation whose maps are wanted (Pi05Model.denoise); the others
        run this backend's plain step. With CUDA graphs, such a run is the plain run's graph replay (so its
        actions are the plain path's) and the maps one more evaluation, outside the graph, of that
        evaluation's recorded input (`attention_at`)."""
        num_steps = self.config.num_steps if num_steps is None else num_steps
        layers = resolve_layers(return_attention, self.config.action_expert.depth)
        if guidance is None and self.graphs is not None and (not layers or attention_eval is not None):
            result, inputs = self.graphs.run(prefix_kv, prefix_mask, noise, num_steps, schedule, solver)
            if not layers:
                return result
            maps = self.attention_at(prefix_kv, prefix_mask, inputs[attention_eval % len(inputs)], layers)
            return dataclasses.replace(result, attention=(maps,))
        return self.denoise_uncaptured(prefix_kv, prefix_mask, noise, num_steps, schedule, solver, layers, guidance,
                                       attention_eval)

    def attention_at(self, prefix_kv: PrefixKV, prefix_mask: Tensor, evaluation: tuple[Tensor, Tensor],
                     layers: frozenset[int]) -> tuple[Tensor | None, ...]:
        """The maps of `layers` at one velocity evaluation, from its input (x_t, t) as a run recorded it:
        the same step the evaluation ran (Pi05Model.predict_velocity or this backend's), with maps."""
        x_t, t = evaluation
        predict = self.velocity_predictor(prefix_kv, layers)
        if predict is None:
            self._fell_back("denoise_attention_layers")
            predict = self.model.predict_velocity
        _, maps = predict(prefix_kv, prefix_mask, x_t.clone(), t.clone(), sorted(layers))
        return tuple(None if m is None else m.detach() for m in maps)

    def denoise_uncaptured(self, prefix_kv: PrefixKV, prefix_mask: Tensor, noise: Tensor, num_steps: int,
                           schedule: str, solver: str, layers: frozenset[int] = frozenset(),
                           guidance: Guidance | None = None, attention_eval: int | None = None,
                           record: list | None = None) -> DenoiseResult:
        """The model's sampler loop around this backend's denoising step (what the CUDA graph captures).
        `record`: a list that gets each velocity evaluation's input (x_t, t), as copies (static tensors of
        the graph when captured: every replay rewrites them)."""
        predict_attention = None
        if guidance is not None and guidance.jacobian == "model":
            predict = None
            self._fell_back("rtc_vjp")
        elif layers and attention_eval is not None:  # maps at one evaluation: the rest on the plain step
            predict = self.velocity_predictor(prefix_kv, frozenset())
            predict_attention = self.velocity_predictor(prefix_kv, layers)
            if predict_attention is None:
                self._fell_back("denoise_attention_layers")
        else:
            predict = self.velocity_predictor(prefix_kv, layers)
            if predict is None:
                self._fell_back("denoise_attention_layers")
        if record is not None:
            predict = _recording(predict or self.model.predict_velocity, record)
        return self.model.denoise(prefix_kv, prefix_mask, noise, num_steps, schedule, solver,
                                  sorted(layers) or False, predict_velocity=predict, guidance=guidance,
                                  attention_eval=attention_eval, predict_attention=predict_attention)

    def sample_actions(self, inputs: Pi05Inputs, noise: Tensor, num_steps: int | None = None,
                       schedule: str = "linear", solver: str = "euler") -> Tensor:
        """All stages through this backend; normalised actions [B, H, A] float32."""
        prefix = self.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        prefix_kv = self.compute_prefix_kv(prefix)
        return self.denoise(prefix_kv, prefix.pad_mask, noise, num_steps, schedule, solver).actions

    def describe(self) -> dict[str, Any]:
        out = {"backend": self.name, **{k: v for k, v in dataclasses.asdict(self.options).items() if k != "backend"},
               "setup_s": round(self.setup_s, 3), "fallbacks": dict(self.fallbacks)}
        if self.graphs is not None:
            out["cuda_graphs_captured"] = len(self.graphs.entries)
        return out


def _recording(predict: Callable, record: list) -> Callable:
    def recorded(kv: PrefixKV, mask: Tensor, x_t: Tensor, t: Tensor, return_attention: AttentionLayers):
        record.append((x_t.clone(), t.clone()))
        return predict(kv, mask, x_t, t, return_attention)

    return recorded


@dataclasses.dataclass
class _GraphEntry:
    graph: Any  # torch.cuda.CUDAGraph
    keys: list[Tensor]  # static inputs, written before every replay
    values: list[Tensor]
    mask: Tensor
    noise: Tensor
    actions: Tensor  # static output, read (cloned) after every replay
    times: tuple[float, ...]
    inputs: list[tuple[Tensor, Tensor]]  # static outputs too: each velocity evaluation's input (x_t, t)


class DenoiseGraphs:
    """The denoising loop (every step and update) captured as one CUDA graph per shape and sampler setting.

    Inputs are copied into the graph's static tensors and the output cloned, so stored K/V (reuse frames)
    are never aliased by a later replay. The flow times are host constants of the capture, which is why
    the sampler settings are part of the key.
    """

    def __init__(self, backend: Pi05Backend) -> None:
        self.backend = backend
        self.entries: dict[tuple, _GraphEntry] = {}

    @torch.inference_mode()  # static tensors are inference tensors: writing them needs inference mode
    def run(self, prefix_kv: PrefixKV, prefix_mask: Tensor, noise: Tensor, num_steps: int, schedule: str,
            solver: str) -> tuple[DenoiseResult, list[tuple[Tensor, Tensor]]]:
        """The result, and each velocity evaluation's input as this replay computed it (valid until the
        next replay of the same entry)."""
        key = (tuple(noise.shape), prefix_kv.num_tokens, prefix_kv.keys[0].dtype, num_steps, schedule, solver)
        entry = self.entries.get(key)
        if entry is None:
            start = time.perf_counter()
            entry = self.entries[key] = self._capture(prefix_kv, prefix_mask, noise, num_steps, schedule, solver)
            self.backend.setup_s += time.perf_counter() - start
        torch._foreach_copy_(entry.keys, list(prefix_kv.keys))
        torch._foreach_copy_(entry.values, list(prefix_kv.values))
        entry.mask.copy_(prefix_mask)
        entry.noise.copy_(noise)
        entry.graph.replay()
        return DenoiseResult(actions=entry.actions.clone(), times=entry.times), entry.inputs

    def _capture(self, prefix_kv: PrefixKV, prefix_mask: Tensor, noise: Tensor, num_steps: int, schedule: str,
                 solver: str) -> _GraphEntry:
        keys = [k.clone() for k in prefix_kv.keys]
        values = [v.clone() for v in prefix_kv.values]
        mask, static_noise = prefix_mask.clone(), noise.to(self.backend.device).clone()
        static_kv = PrefixKV(keys=tuple(keys), values=tuple(values))

        def loop(record: list | None = None) -> DenoiseResult:
            return self.backend.denoise_uncaptured(static_kv, mask, static_noise, num_steps, schedule, solver,
                                                   record=record)

        # warm-up on a side stream (compilation, TensorRT's deferred allocations), then capture (torch docs)
        side = torch.cuda.Stream(self.backend.device)
        side.wait_stream(torch.cuda.current_stream(self.backend.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                loop()
        torch.cuda.current_stream(self.backend.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        inputs: list[tuple[Tensor, Tensor]] = []
        with torch.cuda.graph(graph):
            result = loop(inputs)
        return _GraphEntry(graph, keys, values, mask, static_noise, result.actions, result.times, inputs)


# --------------------------------------------------------------------------------------------------------
# compile


class CompiledBackend(Pi05Backend):
    """torch.compile of each stage (dynamic batch after the second batch size; a recompile per attention
    layer set, which is a constant of the graph)."""

    accelerated = True

    def __init__(self, model: Pi05Model, options: BackendOptions | None = None) -> None:
        options = options or BackendOptions(backend="compile")
        super().__init__(model, options)
        mode = options.compile_mode
        if self.graphs is not None:
            mode = _WITHOUT_CUDAGRAPHS.get(mode, mode)  # one capture of the whole loop instead
        self.mode = mode
        # torch's own CUDA graphs (cudagraph trees) overwrite outputs at the next run: clone what is kept
        self._clone = self.device.type == "cuda" and mode in _WITHOUT_CUDAGRAPHS
        self._vision = torch.compile(model.embed_images, mode=mode)
        self._prefix = torch.compile(_prefix_arrays, mode=mode)
        self._step = torch.compile(model.predict_velocity, mode=mode)
        self._seen: set[tuple] = set()

    def _timed(self, key: tuple, fn: Callable[[], Any]) -> Any:
        """Run fn; the first call per key (shapes, layers) is compilation and is added to setup_s."""
        if key in self._seen:
            return fn()
        start = time.perf_counter()
        out = fn()
        self.setup_s += time.perf_counter() - start
        self._seen.add(key)
        return out

    def encode_images(self, images: Tensor) -> Tensor:
        out = self._timed(("vision", images.shape[0]), lambda: self._vision(images))
        return out.clone() if self._clone else out

    def prefix_pass(self, prefix: Prefix, layers: tuple[int, ...]) -> PrefixOutputs:
        keys, values, maps = self._timed(
            ("prefix", prefix.embeddings.shape[0], layers),
            lambda: self._prefix(self.model, prefix.embeddings, prefix.pad_mask, prefix.ar_mask, prefix.positions,
                                 layers))
        if self._clone:
            keys, values = tuple(k.clone() for k in keys), tuple(v.clone() for v in values)
            maps = tuple(m.clone() for m in maps)
        return keys, values, dict(zip(layers, maps, strict=True))

    def velocity_predictor(self, prefix_kv: PrefixKV, layers: frozenset[int]) -> Callable:
        key = ("step", prefix_kv.batch_size, tuple(sorted(layers)))

        def predict(kv: PrefixKV, mask: Tensor, x_t: Tensor, t: Tensor, return_attention: AttentionLayers):
            v_t, maps = self._timed(key, lambda: self._step(kv, mask, x_t, t, return_attention))
            if self._clone:
                v_t = v_t.clone()
                maps = None if maps is None else tuple(None if m is None else m.clone() for m in maps)
            return v_t, maps

        return predict


def _prefix_arrays(model: Pi05Model, embeddings: Tensor, pad_mask: Tensor, ar_mask: Tensor, positions: Tensor,
                   layers: tuple[int, ...]) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
    """`compute_prefix_kv` on tensors in, tuples out (what torch.compile traces; maps of `layers` only)."""
    prefix = Prefix(embeddings=embeddings, pad_mask=pad_mask, ar_mask=ar_mask, positions=positions, segments={})
    kv = model.compute_prefix_kv(prefix, return_attention=list(layers) or False)
    maps = tuple(kv.attention[i] for i in layers) if layers else ()
    return kv.keys, kv.values, maps


# --------------------------------------------------------------------------------------------------------
# exported stages (TensorRT engines: policies/pi05/tensorrt.py; onnxruntime sessions in the tests)


StageFn = Callable[[dict[str, Tensor]], dict[str, Tensor]]  # named inputs -> named outputs (export.py names)


class ExportedStagesBackend(Pi05Backend):
    """Runs the exported stage graphs (policies/pi05/export.py I/O): TensorRT engines in production,
    onnxruntime sessions in the CPU tests, which is how this routing is verified without a GPU.

    Outputs are cast to the dtypes eager produces (K/V in the VLM's compute dtype), so K/V from any path can
    be stored, concatenated and denoised against by any other (a partial pass runs eager; its K/V feed the
    exported step).
    """

    accelerated = True

    def __init__(self, model: Pi05Model, options: BackendOptions, stages: dict[str, StageFn],
                 attention_layers: dict[str, Sequence[int]]) -> None:
        super().__init__(model, options)
        missing = sorted({"vision", "prefix", "denoise_step"} - set(stages))
        if missing:
            raise BackendError(f"backend {options.backend!r} lacks the stages {missing}")
        self.stages = stages
        self.attention_layers = {name: tuple(sorted(layers)) for name, layers in attention_layers.items()}

    def _variant(self, base: str, layers: Sequence[int]) -> str | None:
        """The stage to run for `layers` of maps: the plain one, its attention variant, or None (eager)."""
        if not layers:
            return base
        name = f"{base}_attention"
        return name if name in self.stages and set(layers) <= set(self.attention_layers.get(name, ())) else None

    def encode_images(self, images: Tensor) -> Tensor:
        return self.stages["vision"]({"images": images})["image_tokens"].to(self.model.vlm.compute_dtype)

    def prefix_pass(self, prefix: Prefix, layers: tuple[int, ...]) -> PrefixOutputs | None:
        name = self._variant("prefix", layers)
        if name is None:
            return None
        out = self.stages[name]({"embeddings": prefix.embeddings, "pad_mask": prefix.pad_mask})
        dtype = self.model.vlm.compute_dtype
        keys, values = out["prefix_keys"].to(dtype), out["prefix_values"].to(dtype)
        exported = self.attention_layers.get(name, ())
        maps = {layer: out["prefix_attention"][exported.index(layer)] for layer in layers}
        return tuple(keys.unbind(0)), tuple(values.unbind(0)), maps

    def velocity_predictor(self, prefix_kv: PrefixKV, layers: frozenset[int]) -> Callable | None:
        name = self._variant("denoise_step", tuple(sorted(layers)))
        if name is None:
            return None
        stage, exported = self.stages[name], self.attention_layers.get(name, ())
        depth = self.config.action_expert.depth
        # stacked once per denoising run (K/V from an exported prefix are views of one tensor: no copy)
        keys, values = _stacked(prefix_kv.keys), _stacked(prefix_kv.values)
        out_dtype = self.model.action_out_proj.weight.dtype

        def predict(kv: PrefixKV, mask: Tensor, x_t: Tensor, t: Tensor, return_attention: AttentionLayers):
            out = stage({"x_t": x_t, "t": t, "prefix_keys": keys, "prefix_values": values, "prefix_mask": mask})
            maps = None
            if layers:
                maps = tuple(out["action_attention"][exported.index(i)] if i in layers else None for i in range(depth))
            return out["velocity"].to(out_dtype), maps

        return predict


def _stacked(tensors: Sequence[Tensor]) -> Tensor:
    """[L, ...] from per-layer tensors; no copy when they are exactly the layers of one [L, ...] tensor, in
    order (the K/V of an exported prefix pass)."""
    full = tensors[0]._base
    if full is not None and full.shape[0] == len(tensors) and all(
            t.shape == full[i].shape and t.stride() == full[i].stride() and t.data_ptr() == full[i].data_ptr()
            for i, t in enumerate(tensors)):
        return full
    return torch.stack(list(tensors))
