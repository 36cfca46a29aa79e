"""Train a Pi0.5 of this project's architecture on recorded demos: `libero-eval train`.

The objective is Pi0.5's flow matching (openpi `Pi0.compute_loss`): for an action chunk A (normalised,
padded to action_dim), noise e ~ N(0, I) and a flow time t ~ Beta(1.5, 1) * 0.999 + 0.001,

    x_t = t e + (1 - t) A,    u = e - A,    loss = mean || v_theta(x_t, t | prefix) - u ||^2

over the robot's 7 action dimensions. The prefix (images + prompt with the discretised state) runs once per
observation through `embed_prefix` / `compute_prefix_kv`, exactly the inference stages; `noise_per_obs`
noise/time draws then share that prefix K/V (the suffix attends to the prefix, never the reverse, so this is
the same loss as one joint forward, at a fraction of the cost). Every cache path applies to the result
unchanged because the model is the same `Pi05Model`.

Targets are the demos' `labels` (the expert's own actions; in DART demos the executed actions differ).
`--demos` takes several datasets; `--init DIR` fine-tunes from a checkpoint's weights.

Outputs in --out:
  train_state.pt      model, EMA weights, optimiser, step, RNG: `libero-eval train` with the same --out resumes
  checkpoint/         the EMA weights as a loadable checkpoint directory (model.safetensors, pi05_config.json,
                      norm_stats.json, tokenizer.model): `model: {kind: checkpoint, checkpoint: <out>/checkpoint}`
  metrics.jsonl       one line per logged step (train loss, lr) and per evaluation (held-out loss and action error)
  curve.png           the learning curve
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from libero_eval.learning.dataset import DemoSamples, NoEpisodes, load_datasets, trained_init_states
from libero_eval.trained_on import write_trained_on
from policies.pi05.checkpoint import OUR_CONFIG_FILE, WEIGHTS_FILE, save_weights
from policies.pi05.configuration import Pi05Config
from policies.pi05.modeling import Pi05Model
from policies.pi05.processing import TINY_TOKENIZER, FeatureNorm, PromptTokenizer, save_openpi_norm_stats
from policies.pi05.stages import Pi05Inputs
from policies.serving.policy import Pi05Policy

logger = logging.getLogger("libero_eval.train")

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"
MIN_NORM_RANGE = 1e-2  # quantile ranges narrower than this are widened (a near-constant action dimension)


class TrainError(ValueError):
    """Bad training arguments (a resume with another model, a bad --init); a bad or empty dataset raises
    dataset.DatasetError."""


@dataclasses.dataclass
class TrainSettings:
    demos: str  # one dataset directory, or several comma-separated (e.g. clean + DART demos)
    out: str
    init: str | None = None  # start from this checkpoint directory's weights (fine-tuning; norm stats: the demos')
    preset: str = "small"
    steps: int = 3000
    batch_size: int = 32
    noise_per_obs: int = 2  # flow-matching draws sharing one prefix pass
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema: float = 0.995
    shift_px: int = 4  # random image translation (augmentation), pixels at the model's image size
    seed: int = 0
    log_every: int = 25
    eval_every: int = 250
    save_every: int = 250
    threads: int = 0  # 0: torch's default

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "noise_per_obs", "log_every", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.ema < 1:
            raise TrainError(f"ema must be in [0, 1), got {self.ema}")
        if self.lr <= 0:
            raise TrainError(f"lr must be > 0, got {self.lr}")


# --------------------------------------------------------------------------------------------------------
# Model and data (the demos themselves: libero_eval.learning.dataset)


def init_from_checkpoint(model: Pi05Model, directory: str) -> None:
    """Load a checkpoint directory's weights into `model` (same architecture). Norm stats are not taken
    over: they come from the demos being trained on, as always (DART demos widen the rotation dimensions'
    range several-fold; the old stats would put their labels at +-30 and the loss at ~6)."""
    try:
        source = Pi05Policy.from_checkpoint(directory, dtype="float32")
    except Exception as exc:
        raise TrainError(f"--init {directory}: not a loadable checkpoint directory ({exc})") from exc
    try:
        model.load_state_dict(source.model.state_dict())
    except RuntimeError as exc:
        raise TrainError(f"--init {directory}: its model is not the {model.config.name!r} preset being trained "
                         f"({str(exc).splitlines()[0]})") from exc


def quantile_stats(x: np.ndarray) -> dict[str, np.ndarray]:
    """openpi norm stats (mean, std, q01, q99) with near-constant dimensions widened to MIN_NORM_RANGE."""
    q01, q99 = np.quantile(x, 0.01, axis=0), np.quantile(x, 0.99, axis=0)
    narrow = (q99 - q01) < MIN_NORM_RANGE
    mid = (q01 + q99) / 2
    q01 = np.where(narrow, mid - MIN_NORM_RANGE / 2, q01)
    q99 = np.where(narrow, mid + MIN_NORM_RANGE / 2, q99)
    return {"mean": x.mean(0), "std": x.std(0), "q01": q01, "q99": q99}


class Batcher:
    """Turns sample indices into model inputs (augmented images, tokens with the state) and targets."""

    def __init__(self, samples: DemoSamples, config: Pi05Config, tokenizer: PromptTokenizer,
                 state_norm: FeatureNorm, action_norm: FeatureNorm):
        self.samples, self.config = samples, config
        self.images = torch.from_numpy(samples.images)  # shares the samples' memory
        self.norm_chunks = torch.from_numpy(action_norm.normalize(samples.chunks).astype(np.float32))
        norm_states = state_norm.normalize(samples.states)
        encoded = [tokenizer.encode(p, s, config.discrete_state_input) for p, s in zip(samples.prompts, norm_states)]
        self.tokens = torch.from_numpy(np.stack([t for t, _ in encoded]))
        self.token_masks = torch.from_numpy(np.stack([m for _, m in encoded]))

    def __call__(self, index: torch.Tensor, gen: torch.Generator | None, shift_px: int) -> tuple[Pi05Inputs, torch.Tensor]:
        cfg = self.config
        imgs = self.images[index].permute(0, 1, 4, 2, 3).float() / 255.0 * 2.0 - 1.0  # [B, 2, 3, S, S]
        if shift_px and gen is not None:
            imgs = random_shift(imgs, shift_px, gen)
        b = len(index)
        actions = torch.zeros(b, cfg.action_horizon, cfg.action_dim)
        actions[..., : self.norm_chunks.shape[-1]] = self.norm_chunks[index]
        inputs = Pi05Inputs(images=imgs, image_masks=torch.ones(b, imgs.shape[1], dtype=torch.bool),
                            tokens=self.tokens[index], token_masks=self.token_masks[index])
        return inputs, actions


def random_shift(images: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `pad` pixels (edge-replicated), DrQ style."""
    # images: [B, N, C, S, S] -> same shape
    b, n, c, s, _ = images.shape
    flat = images.reshape(b * n, c, s, s)
    padded = torch.nn.functional.pad(flat, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (b * n,), generator=gen)
    dy = torch.randint(0, 2 * pad + 1, (b * n,), generator=gen)
    rows = (dy[:, None] + torch.arange(s)[None, :])  # [BN, S]
    cols = (dx[:, None] + torch.arange(s)[None, :])
    out = padded[torch.arange(b * n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return out.reshape(b, n, c, s, s)


# --------------------------------------------------------------------------------------------------------
# Objective


def sample_time(n: int, gen: torch.Generator) -> torch.Tensor:
    """openpi: Beta(1.5, 1) * 0.999 + 0.001 (more weight near t = 1, the noisy end)."""
    # Beta(a, 1) by inversion: u^(1/a)
    u = torch.rand(n, generator=gen)
    return u.pow(1.0 / 1.5) * 0.999 + 0.001


def flow_matching_loss(model: Pi05Model, inputs: Pi05Inputs, actions: torch.Tensor, noise_per_obs: int,
                       gen: torch.Generator, action_dims: int = 7) -> torch.Tensor:
    # actions: [B, H, A] normalised -> scalar loss
    prefix = model.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
    kv = model.compute_prefix_kv(prefix)
    mask = prefix.pad_mask
    if noise_per_obs > 1:
        rows = torch.arange(actions.shape[0]).repeat_interleave(noise_per_obs)
        kv, mask, actions = kv.select(rows), mask[rows], actions[rows]
    noise = torch.randn(actions.shape, generator=gen)
    t = sample_time(actions.shape[0], gen)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
    target = noise - actions
    v_t, _ = model.predict_velocity(kv, mask, x_t, t)
    return (v_t[..., :action_dims] - target[..., :action_dims]).pow(2).mean()


@torch.no_grad()
def evaluate(model: Pi05Model, batcher: Batcher, action_norm: FeatureNorm, max_samples: int = 128,
             replan: int = 5) -> dict[str, float]:
    """Held-out flow-matching loss (fixed draws) and the error of sampled actions (10 Euler steps) against
    the expert's: mean |a - a*| over the first `replan` actions (the ones an episode executes), raw units."""
    n = min(max_samples, len(batcher.samples))
    index = torch.linspace(0, len(batcher.samples) - 1, n).long()
    gen = torch.Generator().manual_seed(1234)
    inputs, actions = batcher(index, None, 0)
    loss = float(flow_matching_loss(model, inputs, actions, 1, gen))
    noise = torch.randn(actions.shape, generator=gen)
    sampled = model.sample_actions(inputs, noise)[..., :7].numpy()
    raw = action_norm.unnormalize(sampled)
    truth = batcher.samples.chunks[index.numpy()]
    err = np.abs(raw[:, :replan] - truth[:, :replan])
    return {"val_loss": loss, "val_action_l1": float(err[..., :6].mean()),
            "val_gripper_err": float(err[..., 6].mean())}


# --------------------------------------------------------------------------------------------------------
# Loop


def _lr(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def export_checkpoint(model: Pi05Model, config: Pi05Config, norm: dict[str, dict[str, np.ndarray]],
                      directory: Path, demos: str | None = None) -> None:
    """A checkpoint directory `Pi05Policy.from_checkpoint` loads: weights, config, norm stats, tokenizer, and
    (given the demo datasets) the init states it was trained on (libero_eval/trained_on.py)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_weights(model, tmp / WEIGHTS_FILE, layout="openpi")
    (tmp / OUR_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    save_openpi_norm_stats(tmp / "norm_stats.json", norm["state"], norm["actions"])
    shutil.copy(TINY_TOKENIZER, tmp / "tokenizer.model")
    if demos:
        write_trained_on(tmp, trained_init_states(demos), demos)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def train(s: TrainSettings, progress: bool = True) -> dict[str, Any]:
    if s.threads:
        torch.set_num_threads(s.threads)
    config = Pi05Config.from_name(s.preset)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    resume = torch.load(state_path, weights_only=False) if state_path.is_file() else None
    if resume is not None:
        for key in ("preset", "demos", "init"):
            if resume["settings"].get(key) != getattr(s, key):
                raise TrainError(f"{out} holds a run with {key}={resume['settings'].get(key)!r}, not {getattr(s, key)!r}; "
                                 "use another --out to start a new one")

    model = Pi05Model(config).init_random_weights(s.seed)
    if s.init and not resume:
        init_from_checkpoint(model, s.init)  # before the data loads: a bad --init fails fast

    t_load = time.perf_counter()
    train_set = load_datasets(s.demos, "train", config.action_horizon, config.vision.image_size)
    try:
        val_set = load_datasets(s.demos, "held_out", config.action_horizon, config.vision.image_size)
    except NoEpisodes:
        val_set = None
    norm = resume["norm"] if resume else {"state": quantile_stats(train_set.states),
                                          "actions": quantile_stats(train_set.all_actions)}
    state_norm, action_norm = FeatureNorm("quantiles", norm["state"]), FeatureNorm("quantiles", norm["actions"])
    tokenizer = PromptTokenizer(TINY_TOKENIZER, config.max_token_len)
    batcher = Batcher(train_set, config, tokenizer, state_norm, action_norm)
    val_batcher = Batcher(val_set, config, tokenizer, state_norm, action_norm) if val_set else None
    logger.info("demos: %d train frames (%d episodes), %d held-out frames; loaded in %.1f s", len(train_set),
                train_set.episodes, len(val_set) if val_set else 0, time.perf_counter() - t_load)

    ema = Pi05Model(config)
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(s.seed)
    step = 0
    if resume:
        model.load_state_dict(resume["model"])
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["opt"])
        gen.set_state(resume["gen"])
        step = resume["step"]
    else:
        ema.load_state_dict(model.state_dict())
    ema.eval().requires_grad_(False)
    model.train()

    def save() -> None:
        tmp = state_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                    "gen": gen.get_state(), "step": step, "norm": norm, "settings": dataclasses.asdict(s)}, tmp)
        tmp.replace(state_path)
        export_checkpoint(ema, config, norm, out / "checkpoint", s.demos)

    metrics = (out / METRICS_FILE).open("a")
    bar = tqdm(total=s.steps, initial=step, desc="train", unit="step", disable=not progress)
    t0, running = time.perf_counter(), []
    ema_params = list(ema.parameters())
    try:
        while step < s.steps:
            lr = _lr(step, s)
            for group in opt.param_groups:
                group["lr"] = lr
            index = torch.randint(0, len(train_set), (s.batch_size,), generator=gen)
            inputs, actions = batcher(index, gen, s.shift_px)
            loss = flow_matching_loss(model, inputs, actions, s.noise_per_obs, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip))
            opt.step()
            with torch.no_grad():
                decay = min(s.ema, (1 + step) / (10 + step))
                for pe, pm in zip(ema_params, model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            step += 1
            running.append(float(loss.detach()))
            bar.update(1)
            if step % s.log_every == 0 or step == s.steps:
                row = {"step": step, "loss": float(np.mean(running)), "lr": lr, "grad_norm": grad_norm,
                       "wall_s": round(time.perf_counter() - t0, 1)}
                running = []
                bar.set_postfix(loss=f"{row['loss']:.4f}")
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            if val_batcher is not None and (step % s.eval_every == 0 or step == s.steps):
                row = {"step": step, **evaluate(ema, val_batcher, action_norm), "wall_s": round(time.perf_counter() - t0, 1)}
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val")))
            if step % s.save_every == 0 or step == s.steps:
                save()
    finally:
        bar.close()
        metrics.close()
    plot_curve(out)
    return {"step": step, "checkpoint": str(out / "checkpoint"), "train_frames": len(train_set),
            "train_s": round(time.perf_counter() - t0, 1)}


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curve(out: str | Path) -> Path | None:
    """curve.png: training loss and held-out loss / action error against the step."""
    rows = read_metrics(out)
    if not rows:
        return None
    # matplotlib (~1 s to import) only for the curve at the end of a run, not for `libero-eval --help`
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    ax1, ax2 = fig.subplots(1, 2)
    tr = [r for r in rows if "loss" in r]
    va = [r for r in rows if "val_loss" in r]
    ax1.plot([r["step"] for r in tr], [r["loss"] for r in tr], label="train")
    if va:
        ax1.plot([r["step"] for r in va], [r["val_loss"] for r in va], "o-", label="held-out")
        ax2.plot([r["step"] for r in va], [r["val_action_l1"] for r in va], "o-", label="|a - a*| pose dims")
        ax2.plot([r["step"] for r in va], [r["val_gripper_err"] for r in va], "s-", label="|a - a*| gripper")
    ax1.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="loss")
    ax2.set(xlabel="step", ylabel="mean abs error (raw action units)", title="held-out sampled actions")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(out) / "curve.png"
    fig.savefig(path, dpi=110)
    return path
