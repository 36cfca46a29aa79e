"""Build TensorRT engines for the policy actor's `tensorrt` backend from the exported ONNX stages.

    python -m launch.build_engines --out engines/tiny                       # tiny random model: export + build
    python -m launch.build_engines --checkpoint /ckpt/pi05_libero --out engines/pi05_libero \\
        --precision fp16 prefix=fp8 prefix_attention=fp8 --max-batch 8      # the users' production split

Steps: export the stages (policies/pi05/export.py) unless --onnx points at an export; for FP8 / INT8
stages, quantize the ONNX with NVIDIA ModelOpt (explicit Q/DQ: TensorRT 10 builds FP8 only from Q/DQ
graphs, and implicit INT8 calibration is deprecated); build one engine per stage with one optimization
profile over the batch axis (min 1, opt --opt-batch, max --max-batch) and a timing cache shared by every
build and kept across runs (--timing-cache), so a rebuild after a small change skips most kernel timing.
A precision the GPU cannot run (FP8 below compute capability 8.9, BF16 below 8.0, INT8 below 7.5) falls
back to FP16, and engines.json says so: it records, per stage, the engine file, the requested and the
built precision, the profile shapes of every input, the output shapes, the attention layers, the
TensorRT version and the GPU, next to the engines; the backend refuses engines built for another config.

Needs the `tensorrt` extra (pip install -e ".[tensorrt]") and an NVIDIA GPU; FP8/INT8 also need
`nvidia-modelopt[onnx]`. UNVERIFIED on the development machines (no GPU, no TensorRT wheels there).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from policies.pi05.export import (  # noqa: E402
    STAGES,
    StageSpec,
    example_inputs,
    export_stages,
    load_model,
    read_manifest,
)
from policies.pi05.tensorrt import ENGINE_MANIFEST, import_tensorrt  # noqa: E402

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")
# the oldest compute capability whose tensor cores run each precision (fp32 runs everywhere)
MIN_CAPABILITY = {"fp32": (0, 0), "fp16": (6, 0), "bf16": (8, 0), "int8": (7, 5), "fp8": (8, 9)}
QUANTIZED = ("fp8", "int8")


def parse_precisions(items: Sequence[str], stages: Sequence[str]) -> dict[str, str]:
    """["fp16", "prefix=fp8"] -> {stage: precision}: a bare value sets every stage, stage=value one."""
    out = dict.fromkeys(stages, "fp16")
    for item in items:
        stage, _, value = item.rpartition("=")
        if value not in PRECISIONS:
            raise ValueError(f"precision {value!r} in {item!r} is not one of: {', '.join(PRECISIONS)}")
        if stage and stage not in STAGES:
            raise ValueError(f"stage {stage!r} in {item!r} is not one of: {', '.join(STAGES)}")
        for name in [stage] if stage else stages:
            out[name] = value
    return {name: out[name] for name in stages}


def resolve_precision(requested: str, capability: tuple[int, int]) -> tuple[str, str | None]:
    """(precision to build, why it differs from the request or None) on a GPU of `capability`."""
    if capability >= MIN_CAPABILITY[requested]:
        return requested, None
    needed = ".".join(map(str, MIN_CAPABILITY[requested]))
    have = ".".join(map(str, capability))
    return "fp16", f"{requested} needs compute capability >= {needed}, this GPU has {have}"


def has_qdq(onnx_path: Path) -> bool:
    """Whether the graph holds Q/DQ nodes (explicit quantization)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node)


def quantize(onnx_path: Path, spec: StageSpec, precision: str, out_path: Path, calibration_batches: int) -> Path:
    """Q/DQ nodes for `precision` by ModelOpt's ONNX post-training quantization, calibrated on seeded
    synthetic inputs (for real use, calibrate on recorded observations: range statistics drive FP8 scales)."""
    try:
        from modelopt.onnx.quantization import quantize as modelopt_quantize
    except ImportError as exc:
        raise ImportError(f"{precision} engines need Q/DQ nodes in the ONNX, added by NVIDIA ModelOpt: "
                          "pip install 'nvidia-modelopt[onnx]'") from exc
    batches = [example_inputs(spec, batch=1, seed=seed) for seed in range(calibration_batches)]
    calibration = {t.name: np.concatenate([b[i].numpy() for b in batches])
                   for i, t in enumerate(spec.inputs) if "batch" in t.shape}
    modelopt_quantize(onnx_path=str(onnx_path), quantize_mode=precision, calibration_data=calibration,
                      output_path=str(out_path))
    return out_path


def build_engine(trt: Any, onnx_path: Path, spec: StageSpec, precision: str, batches: tuple[int, int, int],
                 timing_cache: Any, workspace_gib: float, logger: Any) -> tuple[bytes, Any]:
    """One serialized engine of `spec` at `precision`, profile batches (min, opt, max); the config built."""
    builder = trt.Builder(logger)
    # TensorRT 10 networks are explicit-batch only (the flag is gone); 8.x needs it asked for
    legacy = int(trt.__version__.split(".")[0]) < 10
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH) if legacy else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    flags = {"fp16": ["FP16"], "bf16": ["BF16"], "fp8": ["FP8", "FP16"], "int8": ["INT8", "FP16"], "fp32": []}
    for flag in flags[precision]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for t in spec.inputs:
        if "batch" in t.shape:
            profile.set_shape(t.name, *(t.concrete(b) for b in batches))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {spec.name} at {precision} (see the log above)")
    return bytes(serialized), config


def profile_shapes(spec: StageSpec, batches: tuple[int, int, int]) -> dict[str, Any]:
    return {"inputs": {t.name: {"dtype": t.dtype, "min": t.concrete(batches[0]), "opt": t.concrete(batches[1]),
                                "max": t.concrete(batches[2])} for t in spec.inputs},
            "outputs": {t.name: {"dtype": t.dtype, "shape": list(t.shape)} for t in spec.outputs}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="engine directory (the backend's engine_dir)")
    parser.add_argument("--onnx", type=Path, help="a directory written by policies.pi05.export (default: export "
                                                  "into <out>/onnx first)")
    parser.add_argument("--checkpoint", type=Path, help="checkpoint to export (default: the tiny random model)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed of the tiny random model")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--precision", nargs="+", default=["fp16"],
                        help="fp16 (every stage) and/or stage=precision, e.g. fp16 prefix=fp8; "
                             f"precisions: {', '.join(PRECISIONS)}")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch (the sweep's ray.max_batch)")
    parser.add_argument("--opt-batch", type=int, default=None, help="batch the kernels are tuned for (default: max)")
    parser.add_argument("--timing-cache", type=Path, default=None, help="default: <out>/timing.cache")
    parser.add_argument("--workspace-gib", type=float, default=8.0)
    parser.add_argument("--calibration-batches", type=int, default=16, help="FP8/INT8 calibration samples")
    args = parser.parse_args(argv)

    try:
        trt = import_tensorrt()  # fails first, naming the extra, before any export work
    except ImportError as exc:
        raise SystemExit(str(exc)) from None
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("building TensorRT engines needs an NVIDIA GPU (engines are specific to the GPU they "
                         "are built on)")
    capability = torch.cuda.get_device_capability()
    precisions = parse_precisions(args.precision, args.stages)
    batches = (1, min(args.opt_batch or args.max_batch, args.max_batch), args.max_batch)
    args.out.mkdir(parents=True, exist_ok=True)

    onnx_dir = args.onnx or args.out / "onnx"
    if args.onnx is None:
        model = load_model(args.checkpoint, args.seed)
        export_stages(model, onnx_dir, args.stages)
        del model
    onnx_manifest, specs = read_manifest(onnx_dir)

    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = args.timing_cache or args.out / "timing.cache"
    cache_builder = trt.Builder(logger)  # kept alive with its config while the cache is in use
    cache_config = cache_builder.create_builder_config()
    timing_cache = cache_config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    entries: dict[str, Any] = {}
    for name in args.stages:
        if name not in specs:
            print(f"skip {name}: not in {onnx_dir / 'stages.json'}")
            continue
        spec = specs[name]
        onnx_path = onnx_dir / spec.filename
        requested = precisions[name]
        precision, reason = resolve_precision(requested, capability)
        if precision in QUANTIZED and not has_qdq(onnx_path):
            onnx_path = quantize(onnx_path, spec, precision, args.out / f"{name}.{precision}.onnx",
                                 args.calibration_batches)
        start = time.perf_counter()
        engine, _ = build_engine(trt, onnx_path, spec, precision, batches, timing_cache, args.workspace_gib, logger)
        engine_file = f"{name}.{precision}.engine"
        (args.out / engine_file).write_bytes(engine)
        entries[name] = {"engine": engine_file, "onnx": str(onnx_path), "requested_precision": requested,
                         "precision": precision, "fallback_reason": reason,
                         "attention_layers": list(spec.attention_layers),
                         "build_s": round(time.perf_counter() - start, 1), "bytes": len(engine),
                         **profile_shapes(spec, batches)}
        cache_path.write_bytes(bytes(timing_cache.serialize()))  # after every build: an interrupted run keeps it
        print(f"built {name:>24} {precision:>5} in {entries[name]['build_s']:7.1f} s"
              + (f"  ({reason})" if reason else ""))
    manifest = {"config": onnx_manifest["config"], "tensorrt": trt.__version__, "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name(), "compute_capability": list(capability),
                "host": platform.node(), "batch_profile": dict(zip(("min", "opt", "max"), batches)),
                "timing_cache": str(cache_path), "stages": entries}
    (args.out / ENGINE_MANIFEST).write_text(json.dumps(manifest, indent=2))
    print(f"wrote {args.out / ENGINE_MANIFEST}")


if __name__ == "__main__":
    main()
