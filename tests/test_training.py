"""`libero-eval train`: the flow-matching objective learns, checkpoints load as policies, training resumes."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from libero_eval.config import resolve_checkpoint
from libero_eval.learning import commands
from libero_eval.learning.dataset import DATASET_FILE, MANIFEST_FILE, DatasetError, load_datasets, load_demos
from libero_eval.learning.training import (TrainError, TrainSettings, flow_matching_loss, init_from_checkpoint,
                                           quantile_stats, read_metrics, train)
from libero_eval.trained_on import read_trained_on
from policies.pi05.configuration import small
from policies.pi05.modeling import Pi05Model
from policies.pi05.stages import Pi05Inputs
from policies.serving.policy import Pi05Policy


def write_dataset(root, episodes=2, frames=6, size=112, held_out=1, seed=0, labels=False):
    """A dataset in the record-demos format with synthetic content (images encode the episode)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / DATASET_FILE).write_text(json.dumps({"tasks": {"libero_spatial": [0]}, "trials": list(range(episodes)),
                                                 "held_out": list(range(episodes - held_out, episodes)),
                                                 "image_size": size, "every": 1, "max_steps": None}))
    rows = []
    for k in range(episodes):
        steps = frames + 3
        actions = rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
        actions[:, 6] = np.sign(actions[:, 6])
        rel = f"libero_spatial/task00/trial{k:02d}.npz"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        extra = {"labels": np.clip(actions + 0.5, -1, 1)} if labels else {}  # DART: labels differ from what ran
        np.savez_compressed(root / rel, actions=actions, sim_states=np.zeros((steps + 1, 4)), **extra,
                            frame_steps=np.arange(frames, dtype=np.int32),
                            images=rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8),
                            wrist_images=rng.integers(0, 255, (frames, size, size, 3), dtype=np.uint8),
                            states=rng.normal(size=(frames, 8)).astype(np.float32), prompt=np.array("put the bowl on the plate"))
        split = "held_out" if k >= episodes - held_out else "train"
        rows.append({"suite": "libero_spatial", "task_id": 0, "trial": k, "split": split, "success": True,
                     "steps": steps, "frames": frames, "file": rel, "expert_s": 0.0, "render_s": 0.0})
    (root / MANIFEST_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_load_demos_builds_chunks_held_still_past_the_end(tmp_path):
    root = write_dataset(tmp_path / "d", episodes=2, frames=6)
    samples = load_demos(root, "train", horizon=10, image_size=112)
    assert len(samples) == 6 and samples.episodes == 1
    assert samples.images.shape == (6, 2, 112, 112, 3)
    with np.load(root / "libero_spatial/task00/trial00.npz") as z:
        acts = z["actions"]
    np.testing.assert_array_equal(samples.chunks[0, :9], acts[:9])
    last = samples.chunks[5]  # frame 5 of a 9-step episode: 4 real actions, then hold
    np.testing.assert_array_equal(last[:4], acts[5:9])
    np.testing.assert_array_equal(last[4:, :6], 0.0)
    np.testing.assert_array_equal(last[4:, 6], acts[-1, 6])
    with pytest.raises(DatasetError, match="have 112 px images; the model takes 64 px"):
        load_demos(root, "train", horizon=10, image_size=64)


def test_dart_demos_train_on_the_expert_labels_and_datasets_concatenate(tmp_path):
    clean = write_dataset(tmp_path / "clean", episodes=2, frames=6)
    dart = write_dataset(tmp_path / "dart", episodes=3, frames=5, held_out=0, seed=1, labels=True)
    samples = load_demos(dart, "train", horizon=10, image_size=112)
    with np.load(dart / "libero_spatial/task00/trial00.npz") as z:
        labels, ran = z["labels"], z["actions"]
    assert not np.array_equal(labels, ran)
    np.testing.assert_array_equal(samples.chunks[0, :8], labels[:8])  # targets: what the expert wanted
    np.testing.assert_array_equal(samples.all_actions[: len(labels)], labels)  # norm stats: the same

    both = load_datasets(f"{clean}, {dart}", "train", horizon=10, image_size=112)
    assert len(both) == 6 + 15 and both.episodes == 1 + 3 and len(both.prompts) == len(both)
    assert both.images.shape[0] == both.chunks.shape[0] == both.states.shape[0] == 21
    held = load_datasets(f"{clean},{dart}", "held_out", horizon=10, image_size=112)  # only clean has held-out
    assert held.episodes == 1
    with pytest.raises(DatasetError, match="no demo dataset given"):
        load_datasets(" , ", "train", horizon=10, image_size=112)



def test_train_command_reports_bad_arguments_before_training(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="libero-eval")
    commands.add_train_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--demos", str(tmp_path / "none"), "--out", str(tmp_path / "run"), "--no-progress"])
    assert commands.run_train(args) == 2
    assert "libero-eval train: error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--steps", "0"])  # cli_common.positive
    assert "expected a positive integer, got 0" in capsys.readouterr().err


def test_quantile_stats_widen_constant_dimensions():
    x = np.stack([np.linspace(-1, 1, 101), np.full(101, 0.5)], axis=1)
    stats = quantile_stats(x)
    assert stats["q99"][1] - stats["q01"][1] == pytest.approx(1e-2)
    assert stats["q01"][0] == pytest.approx(-0.98)


def test_flow_matching_loss_learns_a_fixed_chunk():
    """40 steps on one observation drive the loss well below its start (the objective and its gradients
    reach every stage: vision, prefix, action expert)."""
    torch.manual_seed(0)
    config = small()
    model = Pi05Model(config).init_random_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = Pi05Inputs(torch.rand(2, 2, 3, 112, 112) * 2 - 1, torch.ones(2, 2, dtype=torch.bool),
                        torch.randint(1, 700, (2, 64)), torch.ones(2, 64, dtype=torch.bool))
    actions = torch.zeros(2, 10, 32)
    actions[..., :7] = torch.linspace(-0.8, 0.8, 7)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(40):
        loss = flow_matching_loss(model, inputs, actions, 4, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight"] is not None
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_train_exports_a_loadable_checkpoint_and_resumes(tmp_path):
    root = write_dataset(tmp_path / "d", episodes=3, frames=4)
    out = tmp_path / "run"
    s = TrainSettings(demos=str(root), out=str(out), steps=3, batch_size=4, log_every=1, eval_every=3, save_every=3)
    result = train(s, progress=False)
    assert result["step"] == 3 and result["train_frames"] == 8
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any("val_action_l1" in r for r in rows)
    assert (out / "curve.png").stat().st_size > 1000

    policy = Pi05Policy.from_checkpoint(out / "checkpoint")
    assert policy.model.config == small()
    trained = read_trained_on(out / "checkpoint")  # the train-split init states, for the sweep's warning
    assert trained == {"libero_spatial": {0: {0, 1}}}  # 3 episodes, the last one held out
    policy.reset("e", 7)
    rng = np.random.default_rng(0)
    obs = {"observation/image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),  # the protocol's size
           "observation/wrist_image": rng.integers(0, 255, (224, 224, 3), dtype=np.uint8),
           "observation/state": np.zeros(8, np.float32), "prompt": "put the bowl on the plate"}
    chunk = policy.infer(obs)
    assert chunk.actions.shape == (10, 7) and np.isfinite(chunk.actions).all()

    before = torch.load(out / "train_state.pt", weights_only=False)["model"]
    train(TrainSettings(**{**s.__dict__, "steps": 5}), progress=False)
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["step"] == 5
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3, 4, 5]
    name = next(iter(before))
    assert not torch.equal(before[name], state["model"][name])

    with pytest.raises(TrainError, match="preset='small'"):
        train(TrainSettings(**{**s.__dict__, "preset": "tiny", "steps": 6}), progress=False)

    # fine-tuning: --init starts from the checkpoint's weights; the norm stats are the demos' own
    fresh = Pi05Model(small()).init_random_weights(5)
    init_from_checkpoint(fresh, str(out / "checkpoint"))
    exported = Pi05Policy.from_checkpoint(out / "checkpoint").model.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in fresh.state_dict().items())
    other = write_dataset(tmp_path / "d2", episodes=3, frames=4, seed=3)
    ft = train(TrainSettings(demos=str(other), out=str(tmp_path / "ft"), init=str(out / "checkpoint"), steps=1,
                             batch_size=2, log_every=1, eval_every=1, save_every=1, lr=1e-12, warmup=1, ema=0.0),
               progress=False)
    assert ft["step"] == 1
    tuned = torch.load(tmp_path / "ft" / "train_state.pt", weights_only=False)
    name = "paligemma_with_expert.gemma_expert.model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(tuned["model"][name], exported[name], atol=1e-8, rtol=0)  # lr ~0: still the init
    assert not np.allclose(tuned["norm"]["actions"]["q99"], state["norm"]["actions"]["q99"])  # d2's stats
    with pytest.raises(TrainError, match="--init .*not the 'tiny' preset"):
        train(TrainSettings(demos=str(root), out=str(tmp_path / "ft2"), init=str(out / "checkpoint"), preset="tiny",
                            steps=1), progress=False)
    with pytest.raises(TrainError, match="not a loadable checkpoint"):
        train(TrainSettings(demos=str(root), out=str(tmp_path / "ft3"), init=str(tmp_path), steps=1), progress=False)


def test_the_shipped_small_checkpoint_loads_and_acts():
    """policies/pi05/assets/pi05_small_spatial01 (configs/smoke.yaml's model): weights, config, norm stats and
    tokenizer load through the same path as any checkpoint, and a LIBERO observation gives a finite chunk."""
    path = resolve_checkpoint("policies/pi05/assets/pi05_small_spatial01")
    assert path is not None and (path / "model.safetensors").stat().st_size < 20e6
    policy = Pi05Policy.from_checkpoint(path)
    assert policy.model.config == small()
    assert policy.processor.normalizer.state.mode == "quantiles"
    policy.reset("libero_spatial/0/40", 3)
    obs = {"observation/image": np.full((224, 224, 3), 120, np.uint8),
           "observation/wrist_image": np.full((224, 224, 3), 90, np.uint8),
           "observation/state": np.array([-0.07, 0.25, 1.0, 3.14, 0.0, -0.09, 0.02, -0.02], np.float32),
           "prompt": "pick up the black bowl between the plate and the ramekin and place it on the plate"}
    actions = policy.infer(obs).actions
    assert actions.shape == (10, 7) and np.isfinite(actions).all()
    assert np.abs(actions).max() < 3  # unnormalised with the demos' quantiles: expert actions live in [-1, 1]
