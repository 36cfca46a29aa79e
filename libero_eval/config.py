"""Sweep configuration: YAML + dotted command-line overrides, built into the components' own typed configs
(env: tasks.env.EnvConfig, episode: libero_eval.episode.EpisodeConfig, model: policies.serving.model.
ModelConfig, each variant: policies.serving.variants.PolicyVariant), all validated once, at load, before
anything expensive starts; actors receive those objects.

    name: smoke
    suites: {libero_spatial: [0, 1]}     # task ids per suite, or "all"
    trials: 2                            # trials 0..1, or an explicit list [0, 5, 7]
    max_steps: 20                        # cap per episode; null = the protocol's max steps per suite
    policies:                            # labelled variants; a list value expands into several
      - {name: none}
      - {name: adaptive, window: 3, pixel_mae: [6.0, 7.0]}   # -> adaptive_pixel_mae6.0_window3, ..._mae7.0_...

Overrides: `trials=3`, `ray.num_workers=1`, `suites={libero_object: [0]}` (values are parsed as YAML).
"""
from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from libero_eval.episode import EpisodeConfig
from libero_eval.execution import check_latency_name, check_prices_vjp
from policies.serving.latency import LatencyError
from policies.serving.model import ModelConfig
from policies.serving.variants import SERVED, PolicyVariant
from tasks import layout, registry
from tasks.env import EnvConfig


class ConfigError(ValueError):
    """A config that cannot run; the message names the key, the bad value and what was expected."""


@dataclasses.dataclass
class RayConfig:
    address: str | None = None  # null: start a local Ray on 127.0.0.1
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    policy_actor_cpus: float = 0.5  # the CPU fallback's share; on a GPU the actor takes num_gpus=1
    max_batch: int = 8
    batch_wait_ms: float = 5.0
    max_retries: int = 2  # infrastructure failures (worker died, GL, OOM) retried per episode
    # policy actors serving the model: auto = one per GPU when they take GPUs (libero_eval/cluster.py), else one;
    # each episode stays on one replica (its cache session lives there), new episodes go to the least loaded
    policy_replicas: int | str = "auto"
    ship_code: bool = True  # with `address`: the project's code reaches the nodes as Ray's working_dir
    policy_timeout_s: float = 300.0  # a policy call unanswered this long: the replica is unavailable (retried)
    start_timeout_s: float = 120.0  # a rollout worker not placed and started this long is dropped
    # episodes handed to each rollout worker at once: 1 = one at a time; 2 = the next one waits in the worker's
    # own queue and starts without a round trip through the driver (no gain measured on one machine: README)
    worker_queue: int = 1


@dataclasses.dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline | online | disabled
    project: str = "libero-eval"
    entity: str | None = None
    videos: str = "all"  # all | failures | first:<k> per task


@dataclasses.dataclass
class SweepConfig:
    name: str = "sweep"
    suites: dict[str, Any] = dataclasses.field(default_factory=lambda: {"libero_spatial": [0]})
    trials: Any = 1
    # repeats of every (task, init state): repeat r has its own env seed and noise stream, the same for every
    # variant, so repeats stay paired (more pairs than the 10 held-out init states per task)
    repeats: int = 1
    max_steps: int | None = None
    # how frames are priced (policies/serving/latency.py): calibrated (measured once per run directory on the
    # serving device), measured (the actor's wall time; not deterministic), or a profile in configs/latency/
    latency: str = "calibrated"
    policies: list[dict[str, Any]] = dataclasses.field(default_factory=lambda: [{"name": "none"}])
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    episode: EpisodeConfig = dataclasses.field(default_factory=EpisodeConfig)
    env: EnvConfig = dataclasses.field(default_factory=EnvConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)

    # -- derived ---------------------------------------------------------------------------------

    def task_list(self) -> list[tuple[str, int]]:
        out = []
        for suite, tasks in self.suites.items():
            ids = range(registry.num_tasks(suite)) if tasks == "all" else tasks
            out.extend((suite, int(t)) for t in ids)
        return out

    def trial_list(self) -> list[int]:
        return list(range(self.trials)) if isinstance(self.trials, int) else [int(t) for t in self.trials]

    def variants(self) -> list[PolicyVariant]:
        """The typed variants, built (and so validated) from the entries as written; cheap: no model. The
        execution axis (timing, latency, fallback) defaults to the sweep's episode.timing, latency, ..."""
        return expand_variants(self.policies, self.execution_defaults())

    def execution_defaults(self) -> dict[str, Any]:
        return {"timing": self.episode.timing, "latency": self.latency, "fallback": self.episode.fallback,
                "execution": self.episode.execution}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Sections that change what an episode does; the others (ray, wandb) only change how the sweep runs, so a
# resumed sweep may change them.
RESULT_SECTIONS = ("suites", "trials", "repeats", "max_steps", "latency", "policies", "model", "episode", "env")


def execution_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """The sweep-level execution defaults of a stored config.yaml (older ones: sync, calibrated, hold)."""
    episode = stored.get("episode") or {}
    return {"timing": episode.get("timing", "sync"), "latency": stored.get("latency", "calibrated"),
            "fallback": episode.get("fallback", "hold"), "execution": episode.get("execution", "naive")}


def parse_policy_entry(text: str, flag: str = "--policy") -> dict[str, Any]:
    """'fixed_window:window=3,num_steps=5' -> {'name': 'fixed_window', 'window': 3, 'num_steps': 5}; values
    parsed as YAML, as a sweep override's are."""
    name, _, rest = text.partition(":")
    entry: dict[str, Any] = {"name": name.strip()}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"{flag} {text!r}: expected NAME:key=value,key=value, got {item!r}")
        entry[key.strip()] = yaml.safe_load(value)
    return entry


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str) and "/" in value:  # a path (a latency profile's YAML): its name, labels are file names
        return Path(value).stem
    return str(value)


def expand_variants(policies: list[dict[str, Any]], defaults: dict[str, Any] | None = None) -> list[PolicyVariant]:
    """Each entry's list-valued parameters expand into their cartesian product; labels name the values.
    `defaults`: the sweep-level values of the general axes (PolicyVariant.make)."""
    variants: list[PolicyVariant] = []
    for i, entry in enumerate(policies):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ConfigError(f"policies[{i}] must be a mapping with a 'name', got {entry!r}")
        entry = dict(entry)
        name = entry.pop("name")
        label = entry.pop("label", None)
        swept = {k: v for k, v in entry.items() if isinstance(v, list)}
        fixed = {k: v for k, v in entry.items() if not isinstance(v, list)}
        keys = sorted(swept)
        for values in itertools.product(*(swept[k] for k in keys)) if keys else [()]:
            params = {**fixed, **dict(zip(keys, values))}
            if label is not None:
                name_part = label + "".join(f"_{k}{_format_value(v)}" for k, v in zip(keys, values))
            else:
                name_part = name + "".join(f"_{k}{_format_value(params[k])}" for k in sorted(params))
            try:
                variants.append(PolicyVariant.make(name_part, name, params, defaults))
            except ValueError as exc:
                raise ConfigError(f"policies[{i}]: {exc}") from None
    bad = [v.label for v in variants if "/" in v.label or not v.label]
    if bad:
        raise ConfigError(f"policy labels name files and W&B runs: expected no '/', got {bad}")
    labels = [v.label for v in variants]
    duplicates = sorted({l for l in labels if labels.count(l) > 1})
    if duplicates:
        raise ConfigError(f"policy labels must be unique, these repeat: {duplicates} (set 'label' to tell them apart)")
    return variants


# -- building and validation ------------------------------------------------------------------------

def _build(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'} must be a mapping, got {type(data).__name__}: {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {path or 'config'}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value or {}, f"{path}.{key}" if path else key)
        else:
            kwargs[key] = _check_type(value, hint, f"{path}.{key}" if path else key)
    try:
        return cls(**kwargs)
    except ValueError as exc:  # a section's own check; its message starts with the field name
        if isinstance(exc, ConfigError) or not path:
            raise
        raise ConfigError(f"{path}.{exc}") from None


def _check_type(value: Any, hint: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is Any or option is type(None) and value is None:
            return value
        base = typing.get_origin(option) or option
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(base, type) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)).replace("NoneType", "null") for o in options)
    raise ConfigError(f"{path}: expected {expected}, got {type(value).__name__} {value!r}")


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. ray.num_workers=1)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from None
        out.append((key.strip(), value))
    return out


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SweepConfig:
    """YAML file (or none: the defaults) + overrides -> a validated SweepConfig."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping at the top level, got {type(data).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    config = _build(SweepConfig, data, "")
    validate(config)
    return config


def validate(config: SweepConfig) -> None:
    """What the sections' own types cannot check alone: suites, tasks, trials, the checkpoint path, Ray's
    sizes, W&B's mode, and every variant (typed once here)."""
    if not config.name or "/" in config.name:
        raise ConfigError(f"name must be a non-empty string without '/', got {config.name!r}")
    if not isinstance(config.suites, dict) or not config.suites:
        raise ConfigError(f"suites must map suite names to task lists, got {config.suites!r}")
    for suite, tasks in config.suites.items():
        try:
            registry.check_suite(suite)
        except registry.TaskSpecError as exc:
            raise ConfigError(f"suites: {exc}") from None
        if tasks != "all":
            if not isinstance(tasks, list) or not tasks:
                raise ConfigError(f"suites.{suite}: expected a non-empty list of task ids or 'all', got {tasks!r}")
            for t in tasks:
                try:
                    registry.check_task(suite, t)
                except registry.TaskSpecError as exc:
                    raise ConfigError(f"suites.{suite}: {exc}") from None
    trials = config.trials
    if isinstance(trials, bool) or not (isinstance(trials, int) or isinstance(trials, list)):
        raise ConfigError(f"trials: expected a count or a list of trial indices, got {trials!r}")
    trial_list = config.trial_list()
    if not trial_list or len(set(trial_list)) != len(trial_list):
        raise ConfigError(f"trials: expected at least one trial and no repeats, got {trials!r}")
    for k in trial_list:
        if not 0 <= k < registry.NUM_INIT_STATES:
            raise ConfigError(f"trials: trial {k} does not exist: expected 0..{registry.NUM_INIT_STATES - 1}")
    if config.env.seeding == "openpi":
        gaps = layout.missing([(s, t, k) for s, t in config.task_list() for k in trial_list])
        if gaps:
            shown = ", ".join(f"{s} task {t} trial {k}" for s, t, k in gaps[:3]) + (" ..." if len(gaps) > 3 else "")
            raise ConfigError(f"env.seeding: openpi needs openpi's layout of every planned episode; the table "
                              f"(tasks/data/openpi_layouts.json) lacks {len(gaps)}: {shown}. Build them with "
                              f"`libero-eval layout-table --suites {gaps[0][0]}` or set env.seeding: per_episode")
    if isinstance(config.repeats, bool) or not isinstance(config.repeats, int) or config.repeats < 1:
        raise ConfigError(f"repeats: expected a positive integer (episodes per task and init state), got {config.repeats!r}")
    if config.max_steps is not None and config.max_steps < 1:
        raise ConfigError(f"max_steps: expected a positive integer or null, got {config.max_steps}")
    if config.model.kind == "checkpoint":
        path = resolve_checkpoint(config.model.checkpoint)
        if path is None:
            raise ConfigError(f"model.checkpoint: expected an existing checkpoint directory (absolute, relative to "
                              f"the current directory or to the repository), got {config.model.checkpoint!r}")
        config.model.checkpoint = str(path)  # absolute: Ray actors may run in another directory
    r = config.ray
    if r.num_workers < 1 or r.max_batch < 1 or r.batch_wait_ms < 0 or r.max_retries < 0 or r.cpus_per_worker <= 0:
        raise ConfigError(f"ray: num_workers, max_batch >= 1, batch_wait_ms, max_retries >= 0, cpus_per_worker > 0; got {r}")
    if isinstance(r.worker_queue, bool) or not isinstance(r.worker_queue, int) or r.worker_queue < 1:
        raise ConfigError(f"ray.worker_queue: expected a positive integer (episodes handed to a worker at once), "
                          f"got {r.worker_queue!r}")
    if r.policy_replicas != "auto" and (not isinstance(r.policy_replicas, int) or r.policy_replicas < 1):
        raise ConfigError(f"ray.policy_replicas: expected a positive integer or auto (one per GPU), got "
                          f"{r.policy_replicas!r}")
    if r.policy_timeout_s <= 0 or r.start_timeout_s <= 0:
        raise ConfigError(f"ray.policy_timeout_s and ray.start_timeout_s: expected seconds > 0, got "
                          f"{r.policy_timeout_s!r} and {r.start_timeout_s!r}")
    if config.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode: expected offline, online or disabled, got {config.wandb.mode!r}")
    _check_served(config)
    for variant in config.variants():  # builds (and so validates) every variant
        try:
            check_latency_name(variant.execution.latency)
            if variant.execution.execution == "rtc" and variant.rtc.rtc_jacobian == "model":
                check_prices_vjp(variant.execution.latency)
        except LatencyError as exc:
            raise ConfigError(f"latency ({variant.label}): {exc}") from None


def _check_served(config: SweepConfig) -> None:
    """model.kind openpi_server evaluates whatever its server serves: only `served` variants, priced by a
    latency model that does not need the model here; a `served` variant needs such a server."""
    variants = config.variants()
    if config.model.kind == "openpi_server":
        others = sorted({v.name for v in variants if v.name != SERVED})
        if others:
            raise ConfigError(f"policies: with model.kind openpi_server the cache policy and denoising are the "
                              f"server's (e.g. `libero-eval serve --policy fixed_window:window=3`), so {', '.join(others)} "
                              "cannot be asked for here; list {name: served} entries (with label, timing, latency, "
                              "fallback) and point model.url at each server")
        calibrated = [v.label for v in variants if v.execution.latency == "calibrated"]
        if calibrated:
            raise ConfigError(f"latency ({', '.join(calibrated)}): calibrated times the model on the policy actor's "
                              "device, and an openpi server's model lives on the server: use latency: measured (the "
                              "round trip) or a named profile (configs/latency/)")
    elif any(v.name == SERVED for v in variants):
        raise ConfigError("policies: `served` evaluates the policy of an openpi-protocol server: set model.kind: "
                          "openpi_server and model.url: ws://host:port")


REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_checkpoint(path: str | None) -> Path | None:
    """A checkpoint directory as given, else relative to the repository (the shipped small Pi0.5 lives in
    policies/pi05/assets/); None when neither exists."""
    if not path:
        return None
    for candidate in (Path(path), REPO_ROOT / path):
        if candidate.is_dir():
            return candidate.resolve()
    return None


# Options added with a default other than what sweeps made before them did: (section, key) -> what they did.
LEGACY_VALUES = {("env", "seeding"): "per_episode"}


def with_defaults(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored config with the fields added since it was written filled in with their defaults (a sweep
    made before a new option existed ran with that option's default, or with its LEGACY_VALUES value)."""
    stored = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}
    for (section, key), value in LEGACY_VALUES.items():
        if isinstance(stored.get(section), dict):
            stored[section].setdefault(key, value)
        elif section not in stored:
            stored[section] = {key: value}
    try:
        return _build(SweepConfig, stored, "").to_dict()
    except (ConfigError, TypeError, ValueError):
        return stored  # a field was removed or renamed: compare as stored, differences get listed


def diff_configs(old: dict[str, Any], new: dict[str, Any], sections=RESULT_SECTIONS) -> list[str]:
    """Human-readable differences between two resolved configs, in the sections that change results."""
    old = with_defaults(old)
    diffs: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else k)
        elif a != b:
            diffs.append(f"{path}: stored {a!r}, now {b!r}")

    for s in sections:
        walk(old.get(s, "<missing>"), new.get(s, "<missing>"), s)
    return diffs
