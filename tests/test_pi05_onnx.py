"""ONNX export of the Pi0.5 stages (vision, prefix, one denoising step, and their attention variants):
dynamo-exported graphs with a dynamic batch axis agree with PyTorch under onnxruntime at batch 1 and 3, and
the exported stages, run through the backend that drives TensorRT engines, reproduce eager actions and serve
every cache path of the engine."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("onnx", reason='the `onnx` extra is not installed (pip install -e ".[onnx]")')
pytest.importorskip("onnxscript", reason='the `onnx` extra is not installed (pip install -e ".[onnx]")')
pytest.importorskip("onnxruntime", reason='the `onnx` extra is not installed (pip install -e ".[onnx]")')

import onnx  # noqa: E402

from policies.serving.engine import Request  # noqa: E402
from policies.pi05.backends import (  # noqa: E402
    ACTION_TOLERANCE,
    BackendOptions,
    ExportedStagesBackend,
    Pi05Backend,
)
from policies.pi05.export import (  # noqa: E402
    FLOAT32_TOLERANCE,
    STAGES,
    OnnxRuntimeStage,
    check_stages,
    export_stages,
    read_manifest,
)
from policies.serving.pi05 import Pi05Engine  # noqa: E402
from tests.cache_helpers import moved, processor, variant  # noqa: E402
from tests.pi05_helpers import observation, random_inputs, random_model, random_noise, small_config  # noqa: E402

# onnxruntime vs eager through all stages and 10 Euler steps (float32; measured 2e-6 on this model)
EXPORTED_ACTION_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """small_config (2 layers per expert) exported with every stage; attention variants of all layers."""
    torch.set_num_threads(1)
    model = random_model(small_config())
    out = tmp_path_factory.mktemp("onnx")
    manifest = export_stages(model, out)
    return model, out, manifest


@pytest.fixture(scope="module")
def ort_backend(exported):
    model, out, _ = exported
    _, specs = read_manifest(out)
    stages = {name: OnnxRuntimeStage(out / spec.filename, threads=1) for name, spec in specs.items()}
    return ExportedStagesBackend(model, BackendOptions(backend="tensorrt", engine_dir=str(out)), stages,
                                 {name: spec.attention_layers for name, spec in specs.items()})


def test_every_stage_matches_pytorch_at_batch_1_and_3(exported):
    model, out, _ = exported
    diffs = check_stages(model, out, batches=(1, 3))
    print("max |onnxruntime - torch|:", {k: {b: f"{d:.1e}" for b, d in v.items()} for k, v in diffs.items()})
    assert set(diffs) == set(STAGES)
    worst = {(stage, batch): d for stage, per_batch in diffs.items() for batch, d in per_batch.items()}
    assert max(worst.values()) <= FLOAT32_TOLERANCE, worst


def test_graphs_have_a_dynamic_batch_axis_and_static_other_axes(exported):
    model, out, manifest = exported
    cfg = model.config
    for name, entry in manifest["stages"].items():
        graph = onnx.load(str(out / entry["file"])).graph
        for value, spec in zip(graph.input, entry["inputs"], strict=True):
            assert value.name == spec["name"]
            dims = value.type.tensor_type.shape.dim
            batch_axis = spec["shape"].index("batch") if "batch" in spec["shape"] else None
            for axis, dim in enumerate(dims):
                if axis == batch_axis:
                    assert dim.dim_param and not dim.HasField("dim_value"), (name, value.name)
                else:
                    assert dim.dim_value == spec["shape"][axis], (name, value.name, axis)
    stages = manifest["stages"]
    assert stages["prefix"]["outputs"][0]["shape"] == [cfg.vlm.depth, "batch", cfg.vlm.num_kv_heads,
                                                        cfg.num_prefix_tokens, cfg.vlm.head_dim]
    assert stages["denoise_step"]["inputs"][1] == {"name": "t", "shape": [], "dtype": "float32"}
    assert stages["prefix_attention"]["attention_layers"] == list(range(cfg.vlm.depth))
    assert stages["denoise_step_attention"]["outputs"][1]["shape"] == [
        cfg.action_expert.depth, "batch", cfg.vlm.num_heads, cfg.action_horizon, cfg.num_prefix_tokens]
    assert manifest["config"] == cfg.to_dict()


def test_exported_stages_reproduce_eager_actions(exported, ort_backend):
    model = exported[0]
    eager = Pi05Backend(model)
    for batch in (1, 3):
        inputs, noise = random_inputs(model.config, batch), random_noise(model.config, batch)
        with torch.inference_mode():
            expected = eager.sample_actions(inputs, noise)
            got = ort_backend.sample_actions(inputs, noise)
        assert got.shape == expected.shape == (batch, model.config.action_horizon, model.config.action_dim)
        diff = float((got - expected).abs().max())
        print(f"batch {batch}: max |actions(onnxruntime stages) - actions(eager)| = {diff:.1e}")
        assert diff <= EXPORTED_ACTION_TOLERANCE <= ACTION_TOLERANCE["tensorrt"]
    assert not ort_backend.fallbacks


def test_engine_cache_paths_run_on_exported_stages(exported, ort_backend):
    """Full, reuse, partial (eager fallback) frames and both attention consumers, batched, vs eager."""
    model = exported[0]
    variants = [variant("none"), variant("fixed_window", window=2), variant("attention_drift", drift_threshold=0.02),
                variant("vla_cache", relevance="top_k")]

    def serve(backend):
        eng = Pi05Engine(model, processor(model.config), backend=backend)
        for i, v in enumerate(variants):
            eng.open(v.label, v, 100 + i)
        return [eng.infer_batch([Request(v.label, moved(observation(10 + i), t // 2)) for i, v in enumerate(variants)])
                for t in range(3)]

    expected, got = serve(None), serve(ort_backend)
    decisions = set()
    worst = 0.0
    for frame_expected, frame_got in zip(expected, got, strict=True):
        for want, have in zip(frame_expected, frame_got, strict=True):
            assert not isinstance(have, BaseException), have
            assert (have.record.decision, have.record.reason) == (want.record.decision, want.record.reason)
            decisions.add(have.record.decision)
            worst = max(worst, float(np.abs(have.actions - want.actions).max()))
    assert decisions == {"full", "reuse", "partial"}
    assert worst <= EXPORTED_ACTION_TOLERANCE
    # the partial pass (data-dependent token sets) is the only stage call that ran eager
    assert set(ort_backend.fallbacks) == {"partial_prefix"}


def test_attention_layers_missing_from_the_export_run_eager(exported):
    """A map the exported variant does not return: that pass runs eager (counted), the others stay exported."""
    model, out, _ = exported
    _, specs = read_manifest(out)
    stages = {name: OnnxRuntimeStage(out / spec.filename, threads=1) for name, spec in specs.items()}
    backend = ExportedStagesBackend(model, BackendOptions(backend="tensorrt", engine_dir=str(out)), stages,
                                    {"prefix_attention": (0,), "denoise_step_attention": (1,)})
    inputs, noise = random_inputs(model.config, 2), random_noise(model.config, 2)
    with torch.inference_mode():
        prefix = backend.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        exported_map = backend.compute_prefix_kv(prefix, return_attention=[0])
        eager_map = backend.compute_prefix_kv(prefix, return_attention=[1])
        result = backend.denoise(exported_map, prefix.pad_mask, noise, return_attention=[1])
        reference = model.compute_prefix_kv(prefix, return_attention=[0, 1])
    assert backend.fallbacks == {"prefix_attention_layers": 1}
    assert float((exported_map.attention[0] - reference.attention[0]).abs().max()) <= FLOAT32_TOLERANCE
    assert torch.equal(eager_map.attention[1], reference.attention[1])
    assert len(result.attention) == model.config.num_steps and result.attention[0][0] is None
    assert result.attention[0][1].shape == (2, model.config.vlm.num_heads, model.config.action_horizon,
                                            model.config.num_prefix_tokens)
