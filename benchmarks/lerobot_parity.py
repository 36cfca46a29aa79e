"""Parity of policies.pi05 with LeRobot 0.6.1's PI05 on a tiny random model (a script, not a CI test).

LeRobot 0.6.1 needs Python >= 3.12 and transformers 5.4-5.5, so the reference runs in its own venv:

    /root/.pyenv/versions/3.12.1/bin/python -m venv /tmp/lerobot-venv
    /tmp/lerobot-venv/bin/pip install "lerobot[pi]==0.6.1"
    .venv/bin/python benchmarks/lerobot_parity.py --lerobot-python /tmp/lerobot-venv/bin/python

Stage 1 (`reference`, in the LeRobot venv) builds PI05 with tiny sizes as pi05_spec.md section G describes
(patched `get_gemma_config` and PaliGemma config, projector replaced by Linear(vision, text), parameters
re-randomised; `lm_head` and `embed_tokens` drawn separately, as LeRobot 0.6.1 keeps them untied), saves
`policy.state_dict()` (the LeRobot `model.` layout) and seeded inputs with safetensors, and records
`sample_actions` and one velocity evaluation. Stage 2 (`compare`, in this repo's venv) loads the weights
with our checkpoint loader into the matching `Pi05Config`, runs the same inputs and noise, and writes
benchmarks/results/lerobot_parity.json with the max |difference|.

Two action comparisons are reported, because the samplers' time grids differ by design (spec C, J.7):
`actions_default` uses our API (openpi's accumulated t += dt), `actions_same_grid` feeds our velocity
the LeRobot grid t = 1 + k*dt, isolating the model.

Real-time chunking (`rtc`): for each prefix schedule x inference delay in RTC_CASES, LeRobot's PI05 with
`RTCConfig(enabled=True, ...)` samples a chunk guided towards a seeded leftover ([B, 5, 7], the robot's
unpadded actions as LeRobot's action queue holds them) with `sample_actions(..., inference_delay=d,
prev_chunk_left_over=leftover)`; ours builds the same guidance through the serving path
(policies/serving/rtc.py `plan_guidance` from a session's chunk in flight) and denoises with it, on both
grids as above.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The tiny sizes, shared by both stages (LeRobot forces SigLIP mlp 4304 and vocab 257,152).
VISION = {"width": 32, "depth": 2, "num_heads": 2, "mlp_dim": 4304}
VLM = {"width": 64, "depth": 2, "mlp_dim": 128, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16}
EXPERT = {"width": 32, "depth": 2, "mlp_dim": 64, "num_heads": 8, "num_kv_heads": 1, "head_dim": 16}
HORIZON, TOKENS, BATCH, STEPS, SEED = 10, 48, 2, 10, 0
# RTC: (LeRobot schedule, inference delay, max guidance weight); leftover of LEFTOVER actions, LeRobot's
# default execution_horizon (10, clipped to the leftover)
RTC_CASES = [("LINEAR", 1, 10.0), ("LINEAR", 3, 10.0), ("EXP", 1, 5.0), ("EXP", 3, 5.0), ("ZEROS", 2, 10.0),
             ("ONES", 4, 10.0)]
LEFTOVER, RTC_HORIZON = 5, 10


def reference(out_dir: Path) -> None:
    """Runs under LeRobot 0.6.1: build, randomise, save weights + inputs + LeRobot outputs."""
    import lerobot
    import torch
    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.policies.pi05 import modeling_pi05
    from lerobot.policies.pi05.configuration_pi05 import PI05Config
    from safetensors.torch import save_file
    from transformers.models.auto import CONFIG_MAPPING

    sizes = {"gemma_2b": VLM, "gemma_300m": EXPERT}
    modeling_pi05.get_gemma_config = lambda variant: modeling_pi05.GemmaConfig(
        **{k: sizes[variant][k] for k in ("width", "depth", "mlp_dim", "num_heads", "num_kv_heads", "head_dim")})

    def tiny_paligemma_config():
        config = CONFIG_MAPPING["paligemma"]()
        config.vision_config.hidden_size = VISION["width"]
        config.vision_config.num_hidden_layers = VISION["depth"]
        config.vision_config.num_attention_heads = VISION["num_heads"]
        return config

    modeling_pi05.CONFIG_MAPPING = {"paligemma": tiny_paligemma_config, "gemma": CONFIG_MAPPING["gemma"]}

    config = PI05Config(device="cpu", dtype="float32", chunk_size=HORIZON, n_action_steps=HORIZON,
                        tokenizer_max_length=TOKENS, empty_cameras=1)
    config.input_features = {
        "observation.images.image": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)),
        "observation.images.image2": PolicyFeature(FeatureType.VISUAL, (3, 224, 224)),
        "observation.state": PolicyFeature(FeatureType.STATE, (8,)),
    }
    config.output_features = {"action": PolicyFeature(FeatureType.ACTION, (7,))}
    policy = modeling_pi05.PI05Policy(config).eval()
    paligemma = policy.model.paligemma_with_expert.paligemma
    paligemma.model.multi_modal_projector.linear = torch.nn.Linear(VISION["width"], VLM["width"])

    gen = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(policy.named_parameters(), key=lambda kv: kv[0]):
            if p.ndim == 1 and ("layernorm" in name or name.endswith("norm.weight")) and "layer_norm" not in name:
                value = torch.randn(p.shape, generator=gen) * 0.1  # Gemma RMSNorm offsets (1 + w)
            elif "layer_norm" in name and name.endswith("weight"):
                value = 1 + torch.randn(p.shape, generator=gen) * 0.1
            elif p.ndim == 1 or "embed" in name or "lm_head" in name:
                value = torch.randn(p.shape, generator=gen) * 0.02
            else:
                value = torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:]))
            p.copy_(value)
    state = {k: v.detach().contiguous().clone() for k, v in policy.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))

    images = torch.rand(BATCH, 3, 3, 224, 224, generator=gen) * 2 - 1
    image_masks = torch.tensor([[True, True, False]] * BATCH)
    image_masks[1, 1] = False
    tokens = torch.randint(0, 257_152, (BATCH, TOKENS), generator=gen)
    token_masks = torch.arange(TOKENS)[None] < torch.tensor([[20], [33]])
    noise = torch.randn(BATCH, HORIZON, 32, generator=gen)
    model = policy.model
    with torch.no_grad():
        img_list = [images[:, i] for i in range(3)]
        mask_list = [image_masks[:, i] for i in range(3)]
        actions = model.sample_actions(img_list, mask_list, tokens, token_masks, noise=noise.clone(), num_steps=STEPS)
        # one velocity evaluation at t = 1, as in sample_actions
        prefix_embs, prefix_pad, prefix_att = model.embed_prefix(img_list, mask_list, tokens, token_masks)
        att_4d = modeling_pi05.prepare_attention_masks_4d(modeling_pi05.make_att_2d_masks(prefix_pad, prefix_att))
        positions = torch.cumsum(prefix_pad, dim=1) - 1
        model.paligemma_with_expert.paligemma.model.language_model.config._attn_implementation = "eager"
        _, past = model.paligemma_with_expert.forward(attention_mask=att_4d, position_ids=positions,
                                                      past_key_values=None, inputs_embeds=[prefix_embs, None],
                                                      use_cache=True)
        velocity = model.denoise_step(prefix_pad, past, noise.clone(), torch.ones(BATCH))
    leftover = torch.randn(BATCH, LEFTOVER, 7, generator=gen)
    rtc = {}
    from lerobot.configs import RTCAttentionSchedule
    from lerobot.policies.rtc.configuration_rtc import RTCConfig
    for schedule, delay, beta in RTC_CASES:
        policy.config.rtc_config = RTCConfig(enabled=True, prefix_attention_schedule=RTCAttentionSchedule[schedule],
                                             max_guidance_weight=beta, execution_horizon=RTC_HORIZON)
        policy.init_rtc_processor()
        with torch.no_grad():
            rtc[f"rtc_{schedule}_{delay}"] = model.sample_actions(
                img_list, mask_list, tokens, token_masks, noise=noise.clone(), num_steps=STEPS,
                inference_delay=delay, prev_chunk_left_over=leftover.clone()).contiguous()
    save_file({"images": images, "image_masks": image_masks, "tokens": tokens, "token_masks": token_masks,
               "noise": noise, "actions": actions.contiguous(), "velocity_t1": velocity.contiguous(),
               "leftover": leftover, **rtc},
              str(out_dir / "io.safetensors"))
    (out_dir / "reference.json").write_text(json.dumps({
        "lerobot": lerobot.__version__, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "python": platform.python_version(),
        "num_state_dict_entries": len(state),
        "params": sum(p.numel() for p in policy.parameters()),
        "lm_head_is_embed_tokens": paligemma.lm_head.weight is paligemma.model.language_model.embed_tokens.weight,
    }))


def compare(out_dir: Path, result_path: Path) -> dict:
    """Runs in this repo's venv: load the LeRobot weights with our loader and compare outputs."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import load_file

    from policies.pi05.checkpoint import build_model
    from policies.pi05.configuration import GemmaConfig, Pi05Config, SiglipConfig
    from policies.pi05.stages import Pi05Inputs

    config = Pi05Config(name="lerobot_tiny", vision=SiglipConfig(**VISION), vlm=GemmaConfig(**VLM),
                        action_expert=GemmaConfig(**EXPERT), action_horizon=HORIZON, max_token_len=TOKENS,
                        discrete_state_input=True)
    model, report = build_model(config, out_dir / "model.safetensors", dtype="float32")
    io = load_file(str(out_dir / "io.safetensors"))
    inputs = Pi05Inputs(io["images"], io["image_masks"], io["tokens"], io["token_masks"])
    noise = io["noise"]
    with torch.no_grad():
        actions = model.sample_actions(inputs, noise, num_steps=STEPS)
        prefix = model.embed_prefix(*inputs.__dict__.values())
        kv = model.compute_prefix_kv(prefix)
        velocity, _ = model.predict_velocity(kv, prefix.pad_mask, noise, torch.tensor(1.0))
        dt, x = -1.0 / STEPS, noise  # LeRobot's grid: t = 1 + k * dt (computed in float64, cast to float32)
        for k in range(STEPS):
            v, _ = model.predict_velocity(kv, prefix.pad_mask, x, torch.tensor(1.0 + k * dt, dtype=torch.float32))
            x = x + dt * v
    ref = io["actions"]
    rtc = _compare_rtc(model, kv, prefix.pad_mask, noise, io)
    result = {
        "reference": json.loads((out_dir / "reference.json").read_text()),
        "ours": {"torch": torch.__version__, "python": platform.python_version(), "layout": report.layout,
                 "tensors_loaded": report.num_tensors, "embedding_source": report.embedding_source},
        "sizes": {"vision": VISION, "vlm": VLM, "expert": EXPERT, "horizon": HORIZON, "tokens": TOKENS,
                  "batch": BATCH, "num_steps": STEPS, "dtype": "float32"},
        "max_abs_action": float(ref.abs().max()),
        "max_abs_diff": {
            "velocity_t1": float((velocity - io["velocity_t1"]).abs().max()),
            "actions_same_grid": float((x - ref).abs().max()),
            "actions_default": float((actions - ref).abs().max()),
        },
        "rtc": rtc,
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=2))
    return result


def _compare_rtc(model, kv, mask, noise, io) -> dict:
    """Each RTC case through our serving path's guidance, on our grid and on LeRobot's."""
    import torch

    from policies.pi05.rtc import guided_velocity
    from policies.serving.rtc import ChunkInFlight, plan_guidance
    from policies.serving.variants import RTCSettings
    from policies.pi05.rtc import Guidance

    out = {}
    step = HORIZON - LEFTOVER  # a query LEFTOVER actions before the end of the chunk in flight
    for schedule, delay, beta in RTC_CASES:
        settings = RTCSettings(rtc_schedule=schedule.lower(), rtc_max_guidance=beta, rtc_horizon=RTC_HORIZON)
        plans = []
        for row in range(BATCH):
            chunk = torch.zeros(HORIZON, 32)
            chunk[:step] = torch.randn(step, 32)  # already executed: must not matter
            chunk[step:, :7] = io["leftover"][row]
            chunk[step:, 7:] = torch.randn(LEFTOVER, 25)  # the model's padding dims: LeRobot never sees them
            plans.append(plan_guidance(settings, ChunkInFlight(chunk, 0), step, lambda guided: delay, HORIZON, 32))
        guidance = Guidance.concat([p.guidance for p in plans])
        with torch.no_grad():
            ours = model.denoise(kv, mask, noise, STEPS, guidance=guidance).actions
            dt, x = -1.0 / STEPS, noise
            for k in range(STEPS):
                t = torch.tensor(1.0 + k * dt, dtype=torch.float32)
                v = guided_velocity(lambda y: model.predict_velocity(kv, mask, y, t)[0], x, float(t), guidance)
                x = x + dt * v
        ref = io[f"rtc_{schedule}_{delay}"]
        out[f"{schedule.lower()}_d{delay}_beta{beta:g}"] = {
            "same_grid": float((x - ref).abs().max()), "default": float((ours - ref).abs().max()),
            "guidance_effect": float((ref - io["actions"]).abs().max()),  # how far RTC moved LeRobot's chunk
            "weights": [round(float(w), 4) for w in plans[0].guidance.weights[0, :, 0]]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", nargs="?", choices=["all", "reference", "compare"], default="all")
    parser.add_argument("--dir", type=Path, default=None, help="exchange directory (default: a temp dir)")
    parser.add_argument("--lerobot-python", default="/tmp/lerobot-venv/bin/python")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lerobot_parity.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.stage == "reference":
            reference(work)
            return
        if args.stage == "all":
            subprocess.run([args.lerobot_python, str(Path(__file__).resolve()), "reference", "--dir", str(work)],
                           check=True)
        result = compare(work, args.out)
    print(json.dumps(result["max_abs_diff"], indent=2))
    for case, diff in result["rtc"].items():
        print(f"rtc {case}: same grid {diff['same_grid']:.2e}, default grid {diff['default']:.2e} "
              f"(guidance moved the chunk by up to {diff['guidance_effect']:.3f}); weights {diff['weights']}")
    print(f"max |action| {result['max_abs_action']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
