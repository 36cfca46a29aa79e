"""Sweep configs: schema, overrides, variant expansion, and bad input rejected before Ray starts."""
from pathlib import Path

import pytest

from libero_eval.config import ConfigError, diff_configs, expand_variants, load_config
from libero_eval.sweep import plan_episodes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_smoke_config_plans_2_tasks_x_2_trials_x_3_variants():
    config = load_config(CONFIGS / "smoke.yaml")
    labels = [v.label for v in config.variants()]
    assert labels == ["none", "fixed_window_window2", "adaptive_pixel_mae6.5_window3"]
    specs = plan_episodes(config)
    assert len(specs) == 12 and len({s.key for s in specs}) == 12
    assert {s.max_steps for s in specs} == {220}  # the full protocol
    # paired seeds: the same (suite, task, trial) has the same seed under every variant
    by_pair = {}
    for s in specs:
        by_pair.setdefault((s.suite, s.task_id, s.trial), set()).add(s.seed)
    assert all(len(seeds) == 1 for seeds in by_pair.values())


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_validates(name, tmp_path):
    import yaml

    raw = yaml.safe_load((CONFIGS / name).read_text())
    model = raw.get("model", {})
    if model.get("kind") == "checkpoint" and not model.get("checkpoint"):  # per-suite configs: checkpoint on the CLI
        with pytest.raises(ValueError, match="model.checkpoint: expected an existing checkpoint directory"):
            load_config(CONFIGS / name)
        config = load_config(CONFIGS / name, [f"model.checkpoint={tmp_path}"])
        assert config.max_steps is None and len(config.trial_list()) == 50 and len(config.task_list()) == 10
    else:
        load_config(CONFIGS / name)


def test_parameter_lists_expand_into_labelled_variants():
    variants = expand_variants([{"name": "none", "num_steps": [5, 10], "solver": ["euler", "heun"]},
                                {"name": "none", "label": "base"}])
    assert [v.label for v in variants] == ["none_num_steps5_solvereuler", "none_num_steps5_solverheun",
                                           "none_num_steps10_solvereuler", "none_num_steps10_solverheun", "base"]
    assert variants[1].param_dict == {"num_steps": 5, "solver": "heun"}


def test_overrides_are_typed_and_dotted():
    config = load_config(CONFIGS / "smoke.yaml", ["trials=[3, 4]", "ray.num_workers=1", "max_steps=null",
                                                 "suites={libero_object: [5]}"])
    assert config.trial_list() == [3, 4] and config.ray.num_workers == 1 and config.max_steps is None
    assert config.task_list() == [("libero_object", 5)]
    assert {s.max_steps for s in plan_episodes(config)} == {280}  # the protocol's, for libero_object


@pytest.mark.parametrize("overrides, message", [
    (["suites={libero_spacial: [0]}"], "unknown suite 'libero_spacial'"),
    (["suites={libero_spatial: [10]}"], "task 10 does not exist in libero_spatial"),
    (["trials=[0, 50]"], "trial 50 does not exist: expected 0..49"),
    (["policies=[{name: fixed_windw}]"], "unknown policy 'fixed_windw'"),
    (["policies=[{name: none, window: 3}]"], "policy 'none' has no parameter 'window'; valid parameters: execution, fallback, latency, "
                                          "num_steps, rtc_horizon, rtc_jacobian, rtc_max_guidance, rtc_schedule, "
                                          "schedule, solver, timing"),
    (["policies=[{name: none, solver: ralston}]"], "solver 'ralston': expected one of euler, midpoint, heun"),
    (["ray.num_wrkers=3"], r"unknown key\(s\) \['num_wrkers'\] in ray"),
    (["ray.num_workers=two"], "ray.num_workers: expected int, got str 'two'"),
    (["model.kind=checkpoint", "model.checkpoint=/nonexistent"], "expected an existing checkpoint directory"),
    (["trials"], "must look like key=value"),
    (["env.resolution=10"], r"env.resolution: expected an integer camera size in 32..1024 pixels, got 10"),
    (["episode.video=gif"], r"episode.video: expected one of \('query', 'every_step', 'none'\), got 'gif'"),
    (["episode.replan_steps=0"], "episode.replan_steps: expected >= 1, got 0"),
    (["model.device=tpu"], "model.device: expected one of auto, cpu, cuda, got 'tpu'"),
    (["model.kind=onnx"], "model.kind: expected one of tiny, checkpoint, openpi_server, got 'onnx'"),
])
def test_bad_configs_fail_with_the_key_and_value(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(CONFIGS / "smoke.yaml", overrides)


def test_malformed_yaml_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsuites: {libero_spatial: [0\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_diff_configs_names_what_differs_in_result_sections_only():
    a = load_config(CONFIGS / "smoke.yaml").to_dict()
    b = load_config(CONFIGS / "smoke.yaml", ["max_steps=30", "ray.num_workers=1"]).to_dict()
    assert diff_configs(a, b) == ["max_steps: stored None, now 30"]


def test_a_stored_config_from_before_a_new_option_still_resumes():
    """Options added later (e.g. model.backend) count as their default in a config stored without them."""
    new = load_config(CONFIGS / "smoke.yaml").to_dict()
    old = {**new, "model": {k: v for k, v in new["model"].items() if k not in ("backend", "compile_mode")}}
    assert diff_configs(old, new) == []
    changed = load_config(CONFIGS / "smoke.yaml", ["model.backend=compile"]).to_dict()
    assert diff_configs(old, changed) == ["model.backend: stored 'eager', now 'compile'"]


def test_cli_sweep_rejects_bad_config_before_ray(capsys, monkeypatch):
    import libero_eval.cluster as cluster
    from libero_eval import cli

    monkeypatch.setattr(cluster, "init_ray", lambda *a: pytest.fail("Ray started for a bad config"))
    assert cli.main(["sweep", str(CONFIGS / "smoke.yaml"), "policies=[{name: cache_me}]"]) == 2
    assert "unknown policy 'cache_me'" in capsys.readouterr().err


def test_sections_are_the_components_own_typed_configs():
    from libero_eval.episode import EpisodeConfig
    from policies.serving.model import ModelConfig
    from policies.serving.variants import DenoiseSettings
    from tasks.env import EnvConfig

    config = load_config(CONFIGS / "smoke.yaml", ["policies=[{name: adaptive, window: 3, num_steps: 5}]"])
    assert type(config.env) is EnvConfig and type(config.episode) is EpisodeConfig
    assert type(config.model) is ModelConfig
    (variant,) = config.variants()
    assert variant.policy.window == 3 and variant.denoise == DenoiseSettings(num_steps=5)
    assert variant.needs_images and not variant.needs_privileged


def test_repeats_are_paired_across_variants_and_repeat_zero_keeps_todays_seeds():
    """Repeat r of a (task, init state) has its own seed (env and noise), the same for every variant;
    repeat 0 keeps the seed and key episodes had before repeats existed; pairs count repeats apart."""
    from libero_eval.seeding import episode_seed  # the seed and pairing helpers: this test only
    from libero_eval.specs import EpisodeResult
    from libero_eval.sweep import plan_episodes
    from libero_eval.sweep_summary import policy_rows

    config = load_config(None, ["suites={libero_spatial: [0]}", "trials=[40, 41]", "repeats=2", "model.kind=tiny",
                                "policies=[{name: none}, {name: fixed_window, window: 2}]"])
    specs = plan_episodes(config)
    assert len(specs) == 2 * 2 * 2
    by = {(s.policy_label, s.trial, s.repeat): s for s in specs}
    for trial in (40, 41):
        r0, r1 = by[("none", trial, 0)], by[("none", trial, 1)]
        assert r0.seed == episode_seed("libero_spatial", 0, trial) and r0.key == f"none/libero_spatial/task00/trial{trial}"
        assert r1.seed != r0.seed and r1.key.endswith("/rep1") and r1.file_stem.endswith("__rep1")
        for repeat in (0, 1):  # the same seed for every variant: paired
            assert by[("fixed_window_window2", trial, repeat)].seed == by[("none", trial, repeat)].seed
    results = [EpisodeResult(key=s.key, suite=s.suite, task_id=s.task_id, task_name="", trial=s.trial, repeat=s.repeat,
                             policy_label=s.policy_label, seed=s.seed, status="success" if s.repeat else "failure",
                             success=bool(s.repeat), reason="done" if s.repeat else "max_steps", steps=1, wall_s=0.0,
                             policy={"name": s.policy_label.split("_window")[0]})
               for s in specs if not (s.policy_label != "none" and s.repeat == 1)]
    rows = {r["policy"]: r for r in policy_rows(results, "none")}
    assert rows["fixed_window_window2"]["pairs"] == 2  # repeat 1 has no partner: pairs are by repeat too
    with pytest.raises(ConfigError, match="repeats: expected a positive integer"):
        load_config(None, ["repeats=0"])


def test_the_policy_actor_is_placed_from_the_clusters_resources_not_the_drivers():
    """model.device against what the Ray cluster offers (logical resources: no real GPU needed): cpu never
    reserves a GPU, auto takes one when the cluster has one, cuda on a cluster without one is refused."""
    from libero_eval.cluster import policy_placement  # the cluster module loads Ray: this test only

    def config(device: str, *extra: str):
        return load_config(None, ["model.kind=tiny", f"model.device={device}", *extra])

    gpu_cluster, cpu_cluster = {"CPU": 16.0, "GPU": 8.0}, {"CPU": 4.0}
    opts, line = policy_placement(config("auto"), gpu_cluster)
    assert opts == {"num_gpus": 1, "num_cpus": 1} and "one GPU each" in line and "8 GPUs" in line
    assert policy_placement(config("cpu"), gpu_cluster)[0] == {"num_cpus": 0.5}  # no GPU reserved
    assert policy_placement(config("auto"), cpu_cluster)[0] == {"num_cpus": 0.5}
    with pytest.raises(ConfigError, match="model.device: cuda, but the Ray cluster has 4 CPUs and 0 GPUs"):
        policy_placement(config("cuda"), cpu_cluster)
    assert policy_placement(config("cuda"), gpu_cluster)[0]["num_gpus"] == 1
    assert "num_gpus" not in policy_placement(config("auto", "policies=[{name: hold}]"), gpu_cluster)[0]
