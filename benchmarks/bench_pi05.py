"""Per-stage latency and FLOPs of Pi0.5 inference (vision, prefix, one denoise step, full denoise, total),
per execution backend (policies/pi05/backends.py: eager, compile, tensorrt).

    python benchmarks/bench_pi05.py                          # tiny on CPU (+ pi05_libero bf16 if a GPU is present)
    python benchmarks/bench_pi05.py --config pi05_libero --device cuda --dtype bfloat16 --batch-sizes 1 4 16
    python benchmarks/bench_pi05.py --checkpoint /ckpt/pi05_libero --device cuda   # real weights
    python -m benchmarks.bench_pi05 --backends eager compile --batch-sizes 1 4 --threads 1 \
        --out benchmarks/results/bench_pi05_backends_cpu.json
    python -m benchmarks.bench_pi05 --config pi05_libero --device cuda --backends eager compile tensorrt \
        --compile-mode max-autotune --engine-dir engines/pi05_libero

Backends: every row also carries `setup_s` (torch.compile's compilation, CUDA graph capture, engine loading:
the first calls at that batch size, excluded from the latencies) and `max_abs_diff_vs_eager`, the largest
|actions - eager actions| on the same inputs and noise, checked against ACTION_TOLERANCE[backend]
(`within_tolerance`); a backend that cannot run here (tensorrt without the extra or a GPU) is reported
as skipped with the reason. FLOPs are counted on eager only (the same math on every backend).

Latency: median (and min) over `--repeats` runs after `--warmup` runs, with a device sync before every
clock read; the inputs are synthetic (2 cameras present + 1 masked, half-full prompt). FLOPs: counted by
`torch.utils.flop_counter` (2 x MACs, matmuls/convs/attention), per batch; the pi05_libero counts are also
computed on the meta device (no memory) so they are reported even without a GPU. Writes a table to stdout
and JSON to benchmarks/results/bench_pi05_<device>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from policies.pi05.backends import (  # noqa: E402
    ACTION_TOLERANCE,
    BACKENDS,
    COMPILE_MODES,
    BackendOptions,
    Pi05Backend,
)
from policies.pi05.tensorrt import make_backend  # noqa: E402
from policies.pi05.checkpoint import build_model, read_checkpoint_dir  # noqa: E402
from policies.pi05.configuration import Pi05Config  # noqa: E402
from policies.pi05.modeling import Pi05Model, count_parameters  # noqa: E402
from policies.pi05.timing import stage_functions, synthetic_inputs, time_stages  # noqa: E402

STAGES = ("vision", "prefix", "denoise_step", "denoise", "total")
SHORT = {"vision": "vision", "prefix": "prefix", "denoise_step": "step", "denoise": "denoise", "total": "total"}


def count_flops(fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
    out = {}
    for name, fn in fns.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        out[name] = counter.get_total_flops() / 1e9
    return out


def random_model(config: Pi05Config, device: torch.device, dtype: torch.dtype) -> Pi05Model:
    """Random weights without a CPU detour: timings do not depend on the values (full size: 3.6 B params)."""
    with torch.device("meta"):
        model = Pi05Model(config)
    model.set_precision(dtype)
    model.to_empty(device=device)
    model.tie_weights()
    if config.name == "tiny" or device.type == "cpu":
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
    else:
        gen = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def make_backends(model: Pi05Model, names: list[str], compile_mode: str,
                  engine_dir: str | None) -> tuple[dict[str, Pi05Backend], dict[str, str]]:
    """The requested backends over `model`, and {name: why skipped} for those that cannot run here."""
    backends, skipped = {}, {}
    for name in names:
        try:
            options = BackendOptions(backend=name, compile_mode=compile_mode, engine_dir=engine_dir)
            backends[name] = make_backend(model, options)
        except (ImportError, RuntimeError, ValueError) as exc:
            skipped[name] = str(exc)
            print(f"skip backend {name}: {exc}", flush=True)
    return backends, skipped


def bench(model: Pi05Model, label: str, batch_sizes: list[int], warmup: int, repeats: int,
          backends: dict[str, Pi05Backend] | None = None) -> list[dict[str, Any]]:
    device = next(model.parameters()).device
    dtype = str(next(model.vlm.parameters()).dtype).removeprefix("torch.")
    params = count_parameters(model)
    unused = model.paligemma_with_expert.gemma_expert.lm_head.weight.numel()
    backends = backends or {"eager": Pi05Backend(model)}
    runs = []
    for batch in batch_sizes:
        inputs, noise = synthetic_inputs(model.config, batch, device)
        reference = None
        for name, backend in backends.items():
            with torch.inference_mode():
                setup_before = backend.setup_s
                start = time.perf_counter()
                actions = backend.sample_actions(inputs, noise)  # first call: compilation / capture
                first_call_s = time.perf_counter() - start
                fns = stage_functions(backend, inputs, noise)
                flops = count_flops(fns) if name == "eager" else None
                latency = time_stages(fns, device, warmup, repeats)
                if reference is None and name == "eager":
                    reference = actions
            diff = None if reference is None else float((actions - reference).abs().max())
            run = {"config": label, "backend": name, "device": str(device), "dtype": dtype, "batch": batch,
                   "params": params, "params_used": params - unused,
                   "prefix_tokens": model.config.num_prefix_tokens, "num_steps": model.config.num_steps,
                   "latency": latency, "gflop": flops, "setup_s": round(backend.setup_s - setup_before, 3),
                   "first_call_s": round(first_call_s, 3), "max_abs_diff_vs_eager": diff,
                   "tolerance": ACTION_TOLERANCE[name],
                   "within_tolerance": None if diff is None else diff <= ACTION_TOLERANCE[name],
                   "backend_state": backend.describe()}
            runs.append(run)
            cells = "  ".join(f"{latency[s]['median_ms']:10.2f}" for s in STAGES)
            gflop = "  ".join(f"{flops[s]:10.3f}" for s in STAGES) if flops else ""
            diff_cell = "-" if diff is None else f"{diff:.1e}"
            print(f"{label:>12} {name:>8} {str(device):>6} {dtype:>8} {batch:>5}  {cells}  {run['setup_s']:8.1f}"
                  f"  {diff_cell:>9}   {gflop}", flush=True)
    return runs


def meta_flops(config: Pi05Config, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """FLOP counts of a full-size config on the meta device: no memory, no time."""
    with torch.device("meta"):
        model = Pi05Model(config)
    out = []
    for batch in batch_sizes:
        inputs, noise = synthetic_inputs(config, batch, "meta")
        fns = stage_functions(model, inputs, noise)
        out.append({"config": config.name, "batch": batch, "gflop": count_flops(fns),
                    "params": count_parameters(model)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=["tiny", "pi05_libero"], action="append",
                        help="default: tiny on CPU, plus pi05_libero when a GPU is present")
    parser.add_argument("--checkpoint", type=Path, help="benchmark a checkpoint directory instead of random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--backends", nargs="+", default=["eager"], choices=BACKENDS,
                        help="execution backends to compare (eager is always run first, as the reference)")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES)
    parser.add_argument("--engine-dir", default=None, help="tensorrt: the directory launch/build_engines.py wrote")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    backend_names = ["eager"] + [b for b in args.backends if b != "eager"]

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.device(args.device).type == "cuda"
    header = f"{'config':>12} {'backend':>8} {'device':>6} {'dtype':>8} {'batch':>5}  "
    header += "  ".join(f"{SHORT[s] + '_ms':>10}" for s in STAGES)
    header += f"  {'setup_s':>8}  {'max|d|':>9}   " + "  ".join(f"{SHORT[s] + '_GF':>10}" for s in STAGES)
    print(header)
    runs: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    if args.checkpoint:
        info = read_checkpoint_dir(args.checkpoint)
        dtype = args.dtype or ("bfloat16" if gpu else "float32")
        model, _ = build_model(info.config, info.weights, device=args.device, dtype=dtype)
        backends, skipped = make_backends(model, backend_names, args.compile_mode, args.engine_dir)
        runs += bench(model, info.config.name, args.batch_sizes, args.warmup, args.repeats, backends)
    else:
        configs = args.config or (["tiny", "pi05_libero"] if gpu else ["tiny"])
        for name in configs:
            config = Pi05Config.from_name(name)
            device = torch.device("cpu") if name == "tiny" and args.config is None else torch.device(args.device)
            dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" and name != "tiny" else "float32")
            model = random_model(config, device, getattr(torch, dtype_name))
            backends, skipped_here = make_backends(model, backend_names, args.compile_mode, args.engine_dir)
            skipped.update({f"{name}/{k}": v for k, v in skipped_here.items()})
            runs += bench(model, name, args.batch_sizes, args.warmup, args.repeats, backends)
            del model, backends
    full_flops = meta_flops(Pi05Config.from_name("pi05_libero"), args.batch_sizes)
    for entry in full_flops:
        print(f"pi05_libero GFLOP at batch {entry['batch']:>2} (meta device): "
              + ", ".join(f"{k} {v:.1f}" for k, v in entry["gflop"].items()))
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "settings": {"warmup": args.warmup, "repeats": args.repeats, "batch_sizes": args.batch_sizes,
                     "backends": backend_names, "compile_mode": args.compile_mode, "engine_dir": args.engine_dir},
        "tolerance": {name: ACTION_TOLERANCE[name] for name in backend_names},
        "skipped_backends": skipped,
        "runs": runs,
        "pi05_libero_meta_flops": full_flops,
    }
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_pi05_{'cuda' if gpu else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
