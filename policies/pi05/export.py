"""ONNX export of the three Pi0.5 stages, each with a dynamic batch axis, for TensorRT engines.

    vision        images [B, N, 3, S, S]                         -> image_tokens [B, N, P, W_vlm]
    prefix        embeddings [B, Tp, W_vlm], pad_mask [B, Tp]    -> prefix_keys, prefix_values [L, B, H_kv, Tp, D]
    denoise_step  x_t [B, H, A], t [], prefix_keys, prefix_values,
                  prefix_mask [B, Tp]                            -> velocity [B, H, A]

plus two variants for the cache policies that read attention: `prefix_attention` (also prefix_attention
[n, B, H, Tp, Tp], the maps of the listed VLM layers) and `denoise_step_attention` (also action_attention
[n, B, H, H_act, Tp], action queries over the prefix keys). Maps cost compute and memory, so the plain
stages stay map-free and the backend picks a variant per request.

The graphs are traced from the model's own stage methods (`embed_images`, `compute_prefix_kv`,
`predict_velocity`) by the dynamo exporter, so there is no second implementation of the math to keep in
sync. K/V are stacked over layers: one binding per direction instead of 2 x depth. Text embedding and the
prefix assembly stay in PyTorch (a gather and a concat); the partial prefix pass (VLA-Cache token reuse)
drops a data-dependent token set per layer and stays in PyTorch too. `stages.json` beside the files
records shapes, layers and the model config, so an engine directory says what it was built from.

    python -m policies.pi05.export --out engines/tiny            # tiny random model, all stages, checked
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from policies.pi05.checkpoint import build_model, read_checkpoint_dir
from policies.pi05.configuration import tiny
from policies.pi05.modeling import Pi05Model
from policies.pi05.stages import Prefix, PrefixKV, resolve_layers

STAGES = ("vision", "prefix", "prefix_attention", "denoise_step", "denoise_step_attention")
MANIFEST = "stages.json"
OPSET = 18  # what TensorRT 10's ONNX parser reads; the dynamo exporter's default
# onnxruntime (CPU, float32) against PyTorch eager on the same inputs: the graphs are the same math, so
# only reassociation in fused kernels differs (measured ~1e-6 on the tiny model, tests/test_pi05_onnx.py)
FLOAT32_TOLERANCE = 1e-4
ONNX_EXTRA_HINT = 'pip install -e ".[onnx]"'
EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to an external data file (protobuf's 2 GiB limit)


def require_onnx() -> None:
    """Fail with the extra to install when the exporter's dependencies are missing."""
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: install the `onnx` extra ({ONNX_EXTRA_HINT}); "
                          "it pins versions that keep numpy 1.26")


# --------------------------------------------------------------------------------------------------------
# The stages as modules (what the exporter traces)


class VisionStage(nn.Module):
    """SigLIP + projector for every camera slot (`Pi05Model.embed_images`)."""

    def __init__(self, model: Pi05Model) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        # images: [B, N, 3, S, S] float32 in [-1, 1] -> [B, N, P, W_vlm]
        return self.model.embed_images(images)


def bidirectional_prefix(embeddings: Tensor, pad_mask: Tensor) -> Prefix:
    """A Prefix from its embeddings and pad mask (pi05's prefix is bidirectional; segments unused here)."""
    return Prefix(embeddings=embeddings, pad_mask=pad_mask, ar_mask=torch.zeros_like(pad_mask),
                  positions=torch.cumsum(pad_mask.to(torch.int64), dim=1) - 1, segments={})


class PrefixStage(nn.Module):
    """The VLM prefix pass (`compute_prefix_kv`), K/V stacked over layers, plus maps of `attention_layers`."""

    def __init__(self, model: Pi05Model, attention_layers: Sequence[int] = ()) -> None:
        super().__init__()
        self.model = model
        self.attention_layers = tuple(sorted(resolve_layers(list(attention_layers), model.config.vlm.depth)))

    def forward(self, embeddings: Tensor, pad_mask: Tensor) -> tuple[Tensor, ...]:
        # embeddings: [B, Tp, W]; pad_mask: [B, Tp] bool -> keys, values [L, B, H_kv, Tp, D] (+ maps [n, B, H, Tp, Tp])
        kv = self.model.compute_prefix_kv(bidirectional_prefix(embeddings, pad_mask),
                                          return_attention=list(self.attention_layers) or False)
        out = (torch.stack(kv.keys), torch.stack(kv.values))
        if self.attention_layers:
            out += (torch.stack([kv.attention[i] for i in self.attention_layers]),)
        return out


class DenoiseStepStage(nn.Module):
    """One velocity evaluation of the action expert against stacked prefix K/V (`predict_velocity`)."""

    def __init__(self, model: Pi05Model, attention_layers: Sequence[int] = ()) -> None:
        super().__init__()
        self.model = model
        self.attention_layers = tuple(sorted(resolve_layers(list(attention_layers),
                                                            model.config.action_expert.depth)))

    def forward(self, x_t: Tensor, t: Tensor, prefix_keys: Tensor, prefix_values: Tensor,
                prefix_mask: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        # x_t: [B, H, A]; t: [] float32 (one flow time for the batch); prefix_keys/values: [L, B, H_kv, Tp, D];
        # prefix_mask: [B, Tp] bool -> velocity [B, H, A] (+ maps [n, B, H, H_act, Tp])
        prefix_kv = PrefixKV(keys=tuple(prefix_keys.unbind(0)), values=tuple(prefix_values.unbind(0)))
        v_t, maps = self.model.predict_velocity(prefix_kv, prefix_mask, x_t, t,
                                                return_attention=list(self.attention_layers) or False)
        if self.attention_layers:
            return v_t, torch.stack([maps[i] for i in self.attention_layers])
        return v_t


# --------------------------------------------------------------------------------------------------------
# Shapes and example inputs


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, shape with "batch" for the dynamic axis, dtype name."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "batch" else int(d) for d in self.shape)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    attention_layers: tuple[int, ...] = ()

    @property
    def filename(self) -> str:
        return f"{self.name}.onnx"

    def to_dict(self) -> dict[str, Any]:
        def specs(tensors: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:  # JSON types, as read back
            return [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in tensors]

        return {"file": self.filename, "inputs": specs(self.inputs), "outputs": specs(self.outputs),
                "attention_layers": list(self.attention_layers)}

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> StageSpec:
        def specs(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t["name"], tuple(t["shape"]), t["dtype"]) for t in items)

        return cls(name, specs(data["inputs"]), specs(data["outputs"]), tuple(data.get("attention_layers", ())))


def stage_specs(model: Pi05Model, prefix_attention_layers: Sequence[int] | bool = True,
                denoise_attention_layers: Sequence[int] | bool = True) -> dict[str, StageSpec]:
    """The I/O of every stage for `model`'s config (attention variants only when layers are given)."""
    cfg = model.config
    n, s, p = cfg.num_cameras, cfg.vision.image_size, cfg.vision.num_patches
    tp, depth, kv_heads, d = cfg.num_prefix_tokens, cfg.vlm.depth, cfg.vlm.num_kv_heads, cfg.vlm.head_dim
    heads, h, a = cfg.vlm.num_heads, cfg.action_horizon, cfg.action_dim
    dtype = str(model.vlm.compute_dtype).removeprefix("torch.")
    kv = (TensorSpec("prefix_keys", (depth, "batch", kv_heads, tp, d), dtype),
          TensorSpec("prefix_values", (depth, "batch", kv_heads, tp, d), dtype))
    vision = StageSpec("vision", (TensorSpec("images", ("batch", n, 3, s, s), "float32"),),
                       (TensorSpec("image_tokens", ("batch", n, p, cfg.vlm.width), dtype),))
    prefix_in = (TensorSpec("embeddings", ("batch", tp, cfg.vlm.width), dtype),
                 TensorSpec("pad_mask", ("batch", tp), "bool"))
    step_in = (TensorSpec("x_t", ("batch", h, a), "float32"), TensorSpec("t", (), "float32"), *kv,
               TensorSpec("prefix_mask", ("batch", tp), "bool"))
    velocity = TensorSpec("velocity", ("batch", h, a), "float32")
    specs = {"vision": vision, "prefix": StageSpec("prefix", prefix_in, kv),
             "denoise_step": StageSpec("denoise_step", step_in, (velocity,))}
    prefix_layers = tuple(sorted(resolve_layers(prefix_attention_layers, depth)))
    if prefix_layers:
        maps = TensorSpec("prefix_attention", (len(prefix_layers), "batch", heads, tp, tp), "float32")
        specs["prefix_attention"] = StageSpec("prefix_attention", prefix_in, (*kv, maps), prefix_layers)
    step_layers = tuple(sorted(resolve_layers(denoise_attention_layers, cfg.action_expert.depth)))
    if step_layers:
        maps = TensorSpec("action_attention", (len(step_layers), "batch", heads, h, tp), "float32")
        specs["denoise_step_attention"] = StageSpec("denoise_step_attention", step_in, (velocity, maps), step_layers)
    return specs


def stage_module(model: Pi05Model, spec: StageSpec) -> nn.Module:
    if spec.name == "vision":
        return VisionStage(model)
    if spec.name.startswith("prefix"):
        return PrefixStage(model, spec.attention_layers)
    return DenoiseStepStage(model, spec.attention_layers)


def example_inputs(spec: StageSpec, batch: int, seed: int = 0,
                   device: torch.device | str = "cpu") -> tuple[Tensor, ...]:
    """Seeded inputs of the stage's shapes: images in [-1, 1]; pad masks with the last eighth of the tokens
    masked (and the first quarter too in rows after the first, so rows differ); flow time 0.7; other
    tensors ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in spec.inputs:
        shape = t.concrete(batch)
        if t.dtype == "bool":
            mask = torch.ones(shape, dtype=torch.bool)
            mask[..., -max(1, shape[-1] // 8):] = False
            if batch > 1:
                mask[1:, : shape[-1] // 4] = False  # other rows: another pattern (first camera absent)
            out.append(mask)
        elif t.name == "t":
            out.append(torch.tensor(0.7, dtype=torch.float32))
        elif t.name == "images":
            out.append(torch.rand(shape, generator=gen) * 2 - 1)
        else:
            out.append(torch.randn(shape, generator=gen).to(getattr(torch, t.dtype)))
    return tuple(x.to(device) for x in out)


# --------------------------------------------------------------------------------------------------------
# Export and check


def export_stage(model: Pi05Model, spec: StageSpec, path: Path, opset: int = OPSET) -> Path:
    """One stage to ONNX with the dynamo exporter; the batch axis is dynamic (traced at batch 2)."""
    require_onnx()
    from torch.export import Dim  # the exporter's API, loaded with the onnx extra's code path only

    batch = Dim("batch", min=1, max=1024)
    module = stage_module(model, spec).eval()
    args = example_inputs(spec, batch=2, device=next(model.parameters()).device)
    dynamic = {t.name: ({t.shape.index("batch"): batch} if "batch" in t.shape else None) for t in spec.inputs}
    # protobuf caps a file at 2 GiB: full-size weights go to <file>.data beside it (TensorRT reads both)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_exporter_logs():
        warnings.simplefilter("ignore", (FutureWarning, UserWarning, DeprecationWarning))
        program = torch.onnx.export(module, args, input_names=[t.name for t in spec.inputs],
                                    output_names=[t.name for t in spec.outputs], dynamic_shapes=dynamic,
                                    opset_version=opset, dynamo=True, external_data=external, verbose=False)
        program.save(str(path), external_data=external)
    return path


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter logs a warning per missing torchvision op on every export; none of them apply here."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_stages(model: Pi05Model, out_dir: str | Path, stages: Sequence[str] = STAGES,
                  prefix_attention_layers: Sequence[int] | bool = True,
                  denoise_attention_layers: Sequence[int] | bool = True, opset: int = OPSET) -> dict[str, Any]:
    """Export `stages` into out_dir and write the manifest (stages.json); returns the manifest."""
    out_dir = Path(out_dir)
    specs = stage_specs(model, prefix_attention_layers, denoise_attention_layers)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; expected some of {', '.join(STAGES)}")
    manifest: dict[str, Any] = {"config": model.config.to_dict(), "opset": opset, "torch": torch.__version__,
                                "stages": {}}
    for name in stages:
        if name not in specs:
            continue  # an attention variant with no layers requested
        start = time.perf_counter()
        export_stage(model, specs[name], out_dir / specs[name].filename, opset)
        manifest["stages"][name] = {**specs[name].to_dict(), "export_s": round(time.perf_counter() - start, 2)}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(directory: str | Path) -> tuple[dict[str, Any], dict[str, StageSpec]]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export the stages first (python -m policies.pi05.export)")
    manifest = json.loads(path.read_text())
    return manifest, {name: StageSpec.from_dict(name, data) for name, data in manifest["stages"].items()}


class OnnxRuntimeStage:
    """An exported stage run by onnxruntime on the CPU, with the TensorRT stage's call convention (named
    torch tensors in and out), so the `tensorrt` backend's routing can run on machines without a GPU."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort  # optional: the `onnx` extra

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, Tensor]) -> dict[str, Tensor]:
        arrays = {name: feeds[name].detach().cpu().numpy() for name in self.inputs}
        return {name: torch.from_numpy(x) for name, x in zip(self.outputs, self.session.run(self.outputs, arrays),
                                                                  strict=True)}


def check_stage(model: Pi05Model, spec: StageSpec, path: Path, batch: int, seed: int = 0) -> float:
    """Max |onnxruntime (CPU) - PyTorch eager| over every output of the stage at `batch`."""
    args = example_inputs(spec, batch, seed)
    device = next(model.parameters()).device
    with torch.no_grad():
        expected = stage_module(model, spec)(*(x.to(device) for x in args))
    expected = tuple(x.cpu() for x in (expected if isinstance(expected, tuple) else (expected,)))
    got = OnnxRuntimeStage(path)({t.name: x for t, x in zip(spec.inputs, args, strict=True)})
    worst = 0.0
    for t, want in zip(spec.outputs, expected, strict=True):
        have = got[t.name]
        if tuple(have.shape) != tuple(want.shape):
            raise AssertionError(f"{spec.name}.{t.name}: onnxruntime shape {tuple(have.shape)} != torch "
                                 f"{tuple(want.shape)}")
        worst = max(worst, float((have.double() - want.double()).abs().max()))
    return worst


def check_stages(model: Pi05Model, out_dir: str | Path, batches: Sequence[int] = (1, 3)) -> dict[str, dict[int, float]]:
    """{stage: {batch: max abs diff}} of every exported stage against eager PyTorch."""
    _, specs = read_manifest(out_dir)
    return {name: {b: check_stage(model, spec, Path(out_dir) / spec.filename, b) for b in batches}
            for name, spec in specs.items()}


def load_model(checkpoint: str | Path | None, seed: int = 0) -> Pi05Model:
    """The float32 model to export: a checkpoint directory's, or the tiny architecture with seeded weights."""
    if checkpoint is None:
        return Pi05Model(tiny()).init_random_weights(seed).eval()
    info = read_checkpoint_dir(checkpoint)
    return build_model(info.config, info.weights, dtype=torch.float32)[0]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export Pi0.5 stages to ONNX (dynamic batch) and check them "
                                                 "against PyTorch with onnxruntime")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint directory (default: the tiny random model)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed of the tiny random model")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--prefix-attention-layers", type=int, nargs="*", default=None,
                        help="VLM layers whose maps prefix_attention returns (default: all)")
    parser.add_argument("--denoise-attention-layers", type=int, nargs="*", default=None,
                        help="action-expert layers whose maps denoise_step_attention returns (default: all)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison")
    args = parser.parse_args(argv)
    model = load_model(args.checkpoint, args.seed)
    manifest = export_stages(model, args.out, args.stages,
                             True if args.prefix_attention_layers is None else args.prefix_attention_layers,
                             True if args.denoise_attention_layers is None else args.denoise_attention_layers)
    for name, entry in manifest["stages"].items():
        print(f"exported {name:>24} in {entry['export_s']:6.1f} s -> {args.out / entry['file']}")
    if not args.no_check:
        for name, diffs in check_stages(model, args.out).items():
            cells = ", ".join(f"batch {b}: {d:.2e}" for b, d in diffs.items())
            print(f"{name:>24}: max |onnxruntime - torch| {cells}")


if __name__ == "__main__":
    main()
