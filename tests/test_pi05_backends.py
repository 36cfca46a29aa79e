"""Execution backends of the Pi0.5 stages: option validation with clear errors, the engine runs every stage
through its backend, torch.compile matches eager within ACTION_TOLERANCE["compile"] on CPU (stage by stage
and end to end, attention callbacks and the eager fallback of the partial pass included), and the tensorrt
backend and engine builder fail with messages that name what to install or do."""
from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch
import torch._inductor.config as inductor_config

from launch.build_engines import parse_precisions, resolve_precision
from libero_eval.config import ConfigError, load_config
from policies.serving.model import ModelConfig, make_engine
from policies.cache.base import PrefixLayout
from policies.cache.signals import PrefixAttentionStats
from policies.pi05.backends import (
    ACTION_TOLERANCE,
    BACKENDS,
    BackendError,
    BackendOptions,
    CompiledBackend,
    Pi05Backend,
    _stacked,
)
from policies.pi05.stages import TokenReuse
from policies.pi05.tensorrt import TensorRTBackend, make_backend
from tests.cache_helpers import engine, moved, run_session, variant
from tests.pi05_helpers import observation, random_inputs, random_model, random_noise, small_config

# ---- options and errors


@pytest.mark.parametrize("options, message", [
    (dict(backend="onnx"), r"backend 'onnx' is not one of: eager, compile, tensorrt"),
    (dict(backend="compile", compile_mode="fastest"),
     r"compile_mode 'fastest' is not one of: default, reduce-overhead, max-autotune, max-autotune-no-cudagraphs"),
    (dict(backend="tensorrt"), r"backend 'tensorrt' needs engine_dir"),
    (dict(cuda_graphs="yes"), r"cuda_graphs must be true or false, got 'yes'"),
])
def test_bad_options_name_the_value_and_the_choices(options, message):
    with pytest.raises(ValueError, match=message):
        BackendOptions(**options)


def test_config_model_section_validates_the_backend():
    assert load_config(None, ["model.backend=compile", "model.compile_mode=max-autotune"]).model.backend == "compile"
    with pytest.raises(ConfigError, match=r"model\.backend 'trt' is not one of: eager, compile, tensorrt"):
        load_config(None, ["model.backend=trt"])
    with pytest.raises(ConfigError, match=r"model\.compile_mode 'O3' is not one of"):
        load_config(None, ["model.compile_mode=O3"])
    assert BackendOptions.from_model_section({"kind": "tiny", "seed": 0, "backend": "eager"}) == BackendOptions()
    assert set(BACKENDS) == {"eager", "compile", "tensorrt"}


def test_tensorrt_without_the_package_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    model = random_model(small_config())
    with pytest.raises(ImportError, match=r'install the `tensorrt` extra \(pip install -e "\.\[tensorrt\]"\)'):
        make_backend(model, BackendOptions(backend="tensorrt", engine_dir=str(tmp_path)))


def test_tensorrt_on_a_cpu_model_says_it_needs_cuda(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(BackendError, match=r"needs the model on a CUDA device, got cpu"):
        TensorRTBackend(random_model(small_config()), BackendOptions(backend="tensorrt", engine_dir=str(tmp_path)))


def test_build_engines_precisions_and_gpu_fallbacks():
    stages = ["vision", "prefix", "denoise_step"]
    assert parse_precisions(["fp16", "prefix=fp8"], stages) == {"vision": "fp16", "prefix": "fp8",
                                                                "denoise_step": "fp16"}
    with pytest.raises(ValueError, match=r"precision 'fp4' in 'prefix=fp4' is not one of: fp32, fp16, bf16, fp8, int8"):
        parse_precisions(["prefix=fp4"], stages)
    with pytest.raises(ValueError, match=r"stage 'text' in 'text=fp16' is not one of"):
        parse_precisions(["text=fp16"], stages)
    assert resolve_precision("fp8", (9, 0)) == ("fp8", None)  # H100
    assert resolve_precision("fp8", (8, 0)) == ("fp16", "fp8 needs compute capability >= 8.9, this GPU has 8.0")
    assert resolve_precision("int8", (8, 6)) == ("int8", None)


# ---- the engine runs its stages through the backend


class CountingBackend(Pi05Backend):
    """eager, counting the stage calls the engine makes."""

    def __init__(self, model):
        super().__init__(model)
        self.calls = {"embed_prefix": 0, "compute_prefix_kv": 0, "denoise": 0}

    def embed_prefix(self, *args, **kwargs):
        self.calls["embed_prefix"] += 1
        return super().embed_prefix(*args, **kwargs)

    def compute_prefix_kv(self, *args, **kwargs):
        self.calls["compute_prefix_kv"] += 1
        return super().compute_prefix_kv(*args, **kwargs)

    def denoise(self, *args, **kwargs):
        self.calls["denoise"] += 1
        return super().denoise(*args, **kwargs)


def test_engine_runs_every_stage_through_its_backend():
    model = random_model(small_config())
    observations = [moved(observation(3), step) for step in range(3)]
    v = variant("fixed_window", window=2)
    default = run_session(engine(model, shadow=True), v, observations)
    eng = engine(model, shadow=True)
    counting = eng.stages = CountingBackend(model)
    through_backend = run_session(eng, v, observations)
    for a, b in zip(default, through_backend, strict=True):
        assert (a.actions == b.actions).all() and a.record.decision == b.record.decision
    # 3 frames: full, reuse, full -> vision 2 + 1 shadow, prefix 2 + 1 shadow, denoise 3 + 1 shadow
    assert counting.calls == {"embed_prefix": 3, "compute_prefix_kv": 3, "denoise": 4}


def test_pi05_engine_builds_the_configured_backend():
    none = [variant("none")]
    eng = make_engine(ModelConfig(kind="tiny", device="cpu", backend="compile", compile_mode="default"), none)
    assert isinstance(eng.stages, CompiledBackend) and eng.label.endswith("@compile")
    assert type(make_engine(ModelConfig(kind="tiny", device="cpu"), none).stages) is Pi05Backend


# ---- torch.compile on CPU (compile time is paid once per module: ~15-40 s on a loaded 2-core CPU)


def one_layer_config():
    """small_config at depth 1 everywhere: compile time is C++ compilation of the generated kernels, about
    proportional to the number of distinct layers' kernels, and one layer exercises every kind of kernel."""
    cfg = small_config()
    return dataclasses.replace(cfg, name="test_one_layer", vision=dataclasses.replace(cfg.vision, depth=1),
                               vlm=dataclasses.replace(cfg.vlm, depth=1),
                               action_expert=dataclasses.replace(cfg.action_expert, depth=1))


@pytest.fixture(scope="module")
def compiled():
    """The one-layer model compiled with one compile thread (a worker pool costs more than it saves on 2
    cores)."""
    torch.set_num_threads(1)
    model = random_model(one_layer_config())
    with inductor_config.patch(compile_threads=1):
        backend = CompiledBackend(model, BackendOptions(backend="compile"))
        with torch.inference_mode():  # inputs made here: no recompile on the dispatch keys of a normal tensor
            inputs, noise = random_inputs(model.config, 2), random_noise(model.config, 2)
            actions = backend.sample_actions(inputs, noise)
            second = backend.sample_actions(inputs, noise)
        yield model, backend, inputs, noise, actions, second


def test_compile_matches_eager_end_to_end(compiled):
    model, backend, inputs, noise, actions, second = compiled
    with torch.inference_mode():
        eager = Pi05Backend(model)
        prefix = eager.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        kv = eager.compute_prefix_kv(prefix)
        expected = eager.denoise(kv, prefix.pad_mask, noise).actions
        got_prefix = backend.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        got_kv = backend.compute_prefix_kv(got_prefix)
    diffs = {
        "image+text embeddings": float((got_prefix.embeddings - prefix.embeddings).abs().max()),
        "prefix K/V": max(float((a - b).abs().max()) for a, b in zip(got_kv.keys + got_kv.values,
                                                                      kv.keys + kv.values, strict=True)),
        "actions": float((actions - expected).abs().max()),
    }
    print(f"compile vs eager (setup {backend.setup_s:.1f} s):", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert actions.shape == (2, model.config.action_horizon, model.config.action_dim)
    assert max(diffs.values()) <= ACTION_TOLERANCE["compile"], diffs
    assert torch.equal(second, actions)  # compiled code is deterministic run to run
    assert backend.setup_s > 0 and not backend.fallbacks
    assert backend.graphs is None  # CPU: no CUDA graph capture


def test_compiled_prefix_serves_attention_callbacks_and_maps(compiled):
    model, backend, inputs, _, _, _ = compiled
    depth = model.config.vlm.depth
    with torch.inference_mode():
        prefix = Pi05Backend(model).embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        results = []
        for stages in (Pi05Backend(model), backend):
            stats = PrefixAttentionStats(prefix.pad_mask, PrefixLayout.from_config(model.config).text_start,
                                         entropy_layers=frozenset(range(depth)), relevance_layers=frozenset({0}))
            kv = stages.compute_prefix_kv(prefix, return_attention=[0], on_attention=stats,
                                          callback_layers=sorted(stats.layers))
            results.append((kv, stats))
    (kv_eager, stats_eager), (kv_compiled, stats_compiled) = results
    assert len(kv_compiled.attention) == depth and kv_compiled.attention[0].shape == kv_eager.attention[0].shape
    assert float((kv_compiled.attention[0] - kv_eager.attention[0]).abs().max()) <= ACTION_TOLERANCE["compile"]
    assert stats_compiled.entropy.keys() == stats_eager.entropy.keys() == set(range(depth))
    for layer in range(depth):
        assert torch.allclose(stats_compiled.entropy[layer], stats_eager.entropy[layer], atol=1e-4)
    assert torch.allclose(stats_compiled.relevance[0], stats_eager.relevance[0], atol=1e-5)


def test_compiled_partial_pass_falls_back_to_eager_exactly(compiled):
    model, backend, inputs, _, _, _ = compiled
    one = random_inputs(model.config, 1)
    with torch.inference_mode():
        eager = Pi05Backend(model)
        prefix = eager.embed_prefix(one.images, one.image_masks, one.tokens, one.token_masks)
        cache = eager.compute_prefix_kv(prefix)
        keep = torch.arange(0, prefix.embeddings.shape[1], 2)
        plan = TokenReuse(cache=cache, active=(keep,))
        expected = eager.compute_prefix_kv(prefix, reuse=plan)
        got = backend.compute_prefix_kv(prefix, reuse=plan)
    assert backend.fallbacks["partial_prefix"] == 1
    assert all(torch.equal(a, b) for a, b in zip(got.keys + got.values, expected.keys + expected.values, strict=True))


class _ReplayStandIn:
    """CPU stand-in for DenoiseGraphs (a CUDA graph replays the recorded loop): the uncaptured loop with the
    evaluation inputs recorded, returned as `DenoiseGraphs.run` returns them."""

    def __init__(self, backend):
        self.backend = backend

    def run(self, kv, mask, noise, num_steps, schedule, solver):
        inputs: list = []
        return self.backend.denoise_uncaptured(kv, mask, noise, num_steps, schedule, solver, record=inputs), inputs


def test_attention_from_a_recorded_evaluation_equals_the_inline_maps(compiled):
    """The CUDA-graph path of attention-reading policies: the plain run (what the graph replays) records each
    evaluation's input, and one more evaluation of the wanted one gives its maps. On CPU, eager and compiled:
    the maps equal those computed inline and the actions are the plain path's, bit for bit. (The graph
    capture itself needs CUDA: not run here.)"""
    model, backend, inputs, noise, _, _ = compiled
    last = model.config.action_expert.depth - 1
    with torch.inference_mode():
        for stages in (Pi05Backend(model), backend):
            prefix = stages.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
            kv = stages.compute_prefix_kv(prefix)
            plain = stages.denoise(kv, prefix.pad_mask, noise)
            inline = stages.denoise(kv, prefix.pad_mask, noise, return_attention=[last], attention_eval=-1)
            record: list = []
            recorded = stages.denoise_uncaptured(kv, prefix.pad_mask, noise, model.config.num_steps, "linear", "euler",
                                                 record=record)
            assert len(record) == model.config.num_steps and torch.equal(recorded.actions, plain.actions)
            maps = stages.attention_at(kv, prefix.pad_mask, record[-1], frozenset({last}))
            assert torch.equal(maps[last], inline.attention[0][last]), stages.name
            stages.graphs = _ReplayStandIn(stages)
            try:
                routed = stages.denoise(kv, prefix.pad_mask, noise, return_attention=[last], attention_eval=-1)
            finally:
                stages.graphs = None
            assert torch.equal(routed.actions, plain.actions)  # the plain path's actions: what `none` executes
            assert len(routed.attention) == 1 and torch.equal(routed.attention[0][last], inline.attention[0][last])


@pytest.mark.gpu  # CUDA graph capture: skipped without CUDA (tests/conftest.py)
def test_cuda_graph_path_of_attention_readers_replays_the_plain_graph():
    """On CUDA: an attention-reading full frame is the plain run's graph replay (its actions bit for bit) and
    its maps match those of the uncaptured loop's read evaluation, replay after replay (static buffers)."""
    model = random_model(one_layer_config()).cuda()
    backend = CompiledBackend(model, BackendOptions(backend="compile"))
    assert backend.graphs is not None
    last = model.config.action_expert.depth - 1
    with torch.inference_mode():
        cpu_inputs = random_inputs(model.config, 2)
        inputs = type(cpu_inputs)(**{f.name: getattr(cpu_inputs, f.name).cuda() for f in dataclasses.fields(cpu_inputs)})
        prefix = backend.embed_prefix(inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks)
        kv = backend.compute_prefix_kv(prefix)
        for seed in (1, 2, 3):
            noise = random_noise(model.config, 2, seed=seed).cuda()
            plain = backend.denoise(kv, prefix.pad_mask, noise)
            routed = backend.denoise(kv, prefix.pad_mask, noise, return_attention=[last], attention_eval=-1)
            assert torch.equal(routed.actions, plain.actions)
            record: list = []
            backend.denoise_uncaptured(kv, prefix.pad_mask, noise, model.config.num_steps, "linear", "euler",
                                       record=record)
            expected = backend.attention_at(kv, prefix.pad_mask, record[-1], frozenset({last}))
            assert torch.allclose(routed.attention[0][last], expected[last], atol=ACTION_TOLERANCE["compile"])


def test_stacked_kv_is_a_view_when_the_layers_came_from_one_tensor():
    stacked = torch.randn(3, 2, 1, 5, 4)
    assert _stacked(stacked.unbind(0)) is stacked  # K/V of an exported prefix: no copy per denoising run
    parts = [torch.randn(2, 1, 5, 4) for _ in range(3)]
    again = _stacked(parts)
    assert again.shape == (3, 2, 1, 5, 4) and torch.equal(again[1], parts[1])
    reordered = _stacked([stacked[0], stacked[2], stacked[1]])  # views of one tensor, not in layer order
    assert reordered.data_ptr() != stacked.data_ptr() and torch.equal(reordered[1], stacked[2])
