"""A bounded load test of `libero-eval serve`: N concurrent openpi clients (the real openpi-client), each
on its own connection and its own marked episode, send R requests each on 127.0.0.1 and wait for every
answer. Reports what was sent, answered and refused (nothing may be lost), round-trip latency percentiles
per request, throughput, and the batch sizes the serving core formed. The server runs in this process
(serving_in_thread), the clients in threads, so client and server share the machine's cores: the numbers
are this machine's, CPU-bound, and say how batching behaves under load, not what a GPU serves.

Writes benchmarks/results/serve_load.json and serve_load.md.

Run: .venv/bin/python -m benchmarks.bench_serve [--clients 16] [--requests 20] [--policy none] [--model checkpoint]
"""
from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch
from openpi_client.websocket_client_policy import WebsocketClientPolicy

from libero_eval.config import load_config
from libero_eval.config import parse_policy_entry
from libero_eval.serve import SHIPPED_CHECKPOINT, ServeOptions, make_server, serving_in_thread

ROOT = Path(__file__).resolve().parents[1]


def observation(client: int, i: int) -> dict:
    rng = np.random.default_rng(1000 * client + i)
    return {"observation/image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
            "observation/wrist_image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
            "observation/state": rng.normal(size=8).astype(np.float32) * 0.01,
            "prompt": "pick up the black bowl between the plate and the ramekin and place it on the plate",
            "libero_eval/episode": f"client{client}", "libero_eval/seed": client}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--policy", default="none", help="as `libero-eval serve --policy`")
    parser.add_argument("--model", default="checkpoint", choices=("checkpoint", "tiny"),
                        help="checkpoint: the shipped small Pi0.5 (default); tiny: random weights")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_load")
    args = parser.parse_args()
    overrides = ["model.kind=tiny"] if args.model == "tiny" else ["model.kind=checkpoint",
                                                                  f"model.checkpoint={SHIPPED_CHECKPOINT}"]
    config = load_config(None, [*overrides, f"policies=[{json.dumps(parse_policy_entry(args.policy))}]"])
    (variant,) = config.variants()
    server = make_server(config, variant, ServeOptions(port=0))
    latencies: list[list[float]] = [[] for _ in range(args.clients)]
    failures: list[str] = []
    with serving_in_thread(server) as port:
        clients = [WebsocketClientPolicy(host="127.0.0.1", port=port) for _ in range(args.clients)]
        go = threading.Barrier(args.clients)

        def run(c: int) -> None:
            go.wait()
            for i in range(args.requests):
                t0 = time.perf_counter()
                try:
                    reply = clients[c].infer(observation(c, i))
                    assert reply["actions"].shape[1] == 7
                except Exception as exc:  # counted, never hidden
                    failures.append(f"client {c} request {i}: {type(exc).__name__}: {exc}")
                    continue
                latencies[c].append((time.perf_counter() - t0) * 1e3)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    every = np.array([x for per in latencies for x in per])
    stats = server.core.batcher.stats()
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "model": server.metadata["model"], "variant": variant.label, "clients": args.clients,
        "requests_per_client": args.requests, "sent": args.clients * args.requests, "answered": int(every.size),
        "refused_or_failed": len(failures), "failures": failures[:10], "wall_s": round(wall, 2),
        "throughput_per_s": round(every.size / wall, 2),
        "round_trip_ms": {q: round(float(np.percentile(every, int(q[1:]))), 1) for q in ("p50", "p90", "p95", "p99")}
        | {"max": round(float(every.max()), 1)},
        "max_batch": config.ray.max_batch, "batch_wait_ms": config.ray.batch_wait_ms,
        "batches": stats["batches"], "mean_batch": round(stats["mean_batch_size"], 2),
        "batch_sizes": stats["batch_sizes"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rt = result["round_trip_ms"]
    md = ["| clients x requests | answered | failed | wall s | req/s | p50 ms | p95 ms | p99 ms | max ms | mean batch |",
          "|---|---|---|---|---|---|---|---|---|---|",
          f"| {args.clients} x {args.requests} | {result['answered']} / {result['sent']} | {len(failures)} | "
          f"{result['wall_s']} | {result['throughput_per_s']} | {rt['p50']} | {rt['p95']} | {rt['p99']} | {rt['max']} | "
          f"{result['mean_batch']} |", "",
          f"{result['model']}, variant {variant.label}, max_batch {result['max_batch']}, batch_wait_ms "
          f"{result['batch_wait_ms']}, batch sizes {result['batch_sizes']}; {result['machine']}.",
          "Command: `.venv/bin/python -m benchmarks.bench_serve` (server and clients in one process on this machine)."]
    args.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if result["answered"] == result["sent"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
