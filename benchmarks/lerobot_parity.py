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
    save_file({"images": images, "image_masks": image_masks, "tokens": tokens, "token_masks": token_masks,
               "noise": noise, "actions": actions.contiguous(), "velocity_t1": velocity.contiguous()},
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
    }
    result_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(result, indent=2))
    return result


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
    print(f"max |action| {result['max_abs_action']:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
