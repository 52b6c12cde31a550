"""Loading the typed configuration: schema defaults ← YAML file ← dotted overrides, validated.

The schema (dataclasses, enums, one-line meanings) is ``agenttuning.schema``. Unknown keys, wrong
types and bad values fail here, before any Ray work, naming the key. Overrides address list items
by index or, for lists of named items (``data.sources``, ``eval.tasks``, ``collect.tasks``), by
name: ``data.sources.sharegpt.path=...``. Jobs hand sections to workers and deployments as typed
dataclasses (:func:`to_object`).
"""

import logging
import os
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agenttuning import paths
from agenttuning.schema import *  # noqa: F401,F403 — the section classes, for `from agenttuning.config import X`
from agenttuning.schema import AGENTLM_SYSTEM_PROMPT, RUN_STAGES, Config  # noqa: F401 — re-exported

log = logging.getLogger(__name__)

# `${data:agentbench/dbbench_dev.jsonl}`: a file shipped in the repo's data/ folder (or under
# $AGENTTUNING_DATA_DIR), whatever the current directory.
if not OmegaConf.has_resolver("data"):
    getattr(OmegaConf, "register_resolver", OmegaConf.register_new_resolver)("data", paths.data_file)


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


def _fail(where: str, exc: OmegaConfBaseException) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    msg = (getattr(exc, "msg", None) or str(exc)).splitlines()[0]
    return ConfigError(f"{where}: config key '{key}': {msg}")


def load_config(path: Optional[str] = None, overrides: Optional[List[str]] = None) -> DictConfig:
    """Schema defaults ← YAML file ← dotted overrides; validated; read-only result.

    Raises ConfigError naming the offending key for unknown keys, wrong types and bad values.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise _fail(path, exc) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = by_name(cfg, key.strip())
        try:
            # update() (unlike merge of a dotlist) can address list items: data.sources.0.weight=2
            OmegaConf.update(cfg, key, yaml.safe_load(raw) if raw else None, merge=True)
        except OmegaConfBaseException as exc:
            raise _fail(f"override '{item}'", exc) from None
        except (TypeError, yaml.YAMLError) as exc:
            raise ConfigError(f"override '{item}': config key '{key}': {exc}") from None
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _fail(path or "config", exc) from None
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def by_name(cfg: DictConfig, key: str) -> str:
    """``data.sources.sharegpt.path`` → ``data.sources.3.path``: list items with a ``name`` are
    addressed by it, so a reordered config cannot silently change which item an override hits."""
    parts, node = key.split("."), cfg
    for i, part in enumerate(parts):
        if isinstance(node, ListConfig) and not part.lstrip("-").isdigit():
            names = [getattr(x, "name", None) if isinstance(x, DictConfig) else None for x in node]
            if part not in names:
                where = ".".join(parts[:i])
                raise ConfigError(f"config key '{key}': no item named {part!r} in '{where}' "
                                  f"(names: {', '.join(str(n) for n in names if n)})")
            parts[i] = str(names.index(part))
        try:
            node = node[int(parts[i])] if isinstance(node, ListConfig) else node.get(parts[i]) if isinstance(node, DictConfig) else None
        except (IndexError, ValueError, OmegaConfBaseException):
            node = None
        if node is None:
            break
    return ".".join(parts)


def with_updates(cfg: DictConfig, updates: Dict[str, Any], merge: bool = True) -> DictConfig:
    """A validated read-only copy of cfg with dotted-key updates (how stages and sweep trials hand on
    derived settings); list items may be addressed by name; the copy keeps the typed schema, so
    updates are type-checked too. merge=False replaces a dict value instead of merging into it."""
    out = cfg.copy()
    OmegaConf.set_readonly(out, False)
    for key, value in updates.items():
        try:
            if not merge:  # empty it first: a typed dict node takes plain dicts only by merging
                OmegaConf.update(out, by_name(out, key), {}, merge=False)
            OmegaConf.update(out, by_name(out, key), value, merge=True)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"config key '{key}': cannot set {value!r}: {str(exc).splitlines()[0]}") from None
    validate(out)
    OmegaConf.set_readonly(out, True)
    return out


def to_object(node: Any) -> Any:
    """A config section as its typed dataclass (what workers and deployments receive)."""
    return OmegaConf.to_object(node)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}, expected one of {', '.join(map(str, allowed))}")


def validate(cfg: DictConfig) -> None:
    """Value checks that types alone cannot express (ranges, enums, cross-field rules)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _check(0.0 < cfg.run.db_test_fraction < 1.0, "run.db_test_fraction", "must be within (0, 1)")
    unknown = sorted(set(cfg.run.stages) - set(RUN_STAGES))
    _check(not unknown, "run.stages", f"unknown {unknown}; stages are {list(RUN_STAGES)}")
    if m.gguf.package or m.gguf.path or m.gguf.file:
        _check(bool(m.gguf.file), "model.gguf.file", "name the .gguf file")
        _check(bool(m.gguf.package) != bool(m.gguf.path), "model.gguf",
               "set exactly one of 'package' (a Python package that ships the file) or 'path' (a directory)")
        _check(not m.tiny.enabled, "model.tiny.enabled", "a model comes from model.gguf or model.tiny, not both")
    _check(0.0 <= d.eta <= 1.0, "data.eta", f"must be within [0, 1], got {d.eta}")
    _check(d.max_seq_len >= 16, "data.max_seq_len", f"must be >= 16, got {d.max_seq_len}")
    _check(d.num_samples is None or d.num_samples > 0, "data.num_samples", "must be positive")
    _check(d.rows_per_shard > 0, "data.rows_per_shard", "must be positive")
    dc = d.decontamination
    _check(dc.ngram >= 1, "data.decontamination.ngram", "must be >= 1")
    _check(0.0 <= dc.threshold <= 1.0, "data.decontamination.threshold", "must be within [0, 1]")
    names = set()
    for i, src in enumerate(d.sources):
        k = f"data.sources.{i}"
        _check(src.name not in names, f"{k}.name", f"duplicate source name {src.name!r}")
        names.add(src.name)
        _check(src.weight > 0, f"{k}.weight", f"must be > 0, got {src.weight}")
    _one_of(t.zero_stage, "train.zero_stage", (0, 1, 2, 3))
    _check(cfg.scaling.num_workers >= 1, "scaling.num_workers", "must be >= 1")
    es = cfg.envs.server
    _check(es.max_sessions >= 1, "envs.server.max_sessions", "must be >= 1")
    _check(es.idle_timeout_s > 0, "envs.server.idle_timeout_s", "must be > 0")
    _check(es.num_replicas >= 1, "envs.server.num_replicas", "must be >= 1")
    _check(0 < cfg.serve.port < 65536, "serve.port", f"not a TCP port: {cfg.serve.port}")
    _validate_policy(cfg.run.eval_policy, "run.eval_policy")
    _validate_serve_eval(cfg.serve, cfg.eval)
    _validate_collect(cfg.collect)
    _validate_eft(cfg.eft)
    _validate_general(cfg.general)
    _validate_train(t, cfg.scaling)


def _validate_train(t: DictConfig, s: DictConfig) -> None:
    """Train/scaling checks: everything that would otherwise fail only after workers started."""
    for key in ("max_steps", "global_batch_size", "micro_batch_size", "log_every", "save_every", "num_to_keep"):
        _check(t[key] >= 1, f"train.{key}", f"must be >= 1, got {t[key]}")
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be within [0, 1]")
    _check(0 <= t.warmup_steps < t.max_steps, "train.warmup_steps", "must be within [0, train.max_steps)")
    _check(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    _check(t.max_failures >= -1, "train.max_failures", "must be >= -1 (-1 = unlimited)")
    _check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "train.adam_betas",
           "must be two numbers in [0, 1)")
    per_step = s.num_workers * t.micro_batch_size
    _check(t.global_batch_size % per_step == 0, "train.global_batch_size",
           f"{t.global_batch_size} is not divisible by scaling.num_workers × train.micro_batch_size = {per_step}")
    _check(s.use_gpu or t.precision in ("auto", "fp32"), "train.precision",
           f"{t.precision} needs scaling.use_gpu=true (CPU training runs in fp32)")
    _check(s.use_gpu or t.attn_implementation != "flash_attention_2", "train.attn_implementation",
           "flash_attention_2 needs scaling.use_gpu=true")
    _check(t.offload_param == "none" or t.zero_stage == 3, "train.offload_param",
           f"parameter offload needs train.zero_stage=3, got {t.zero_stage}")
    _check(t.offload_optimizer == "none" or t.zero_stage >= 1, "train.offload_optimizer",
           "optimizer offload needs train.zero_stage >= 1")
    for key in ("offload_optimizer", "offload_param"):
        _check(t[key] == "none" or s.use_gpu, f"train.{key}", "offload needs scaling.use_gpu=true")
        _check(t[key] != "nvme" or bool(t.nvme_path), f"train.{key}", "nvme offload needs train.nvme_path")
    _check(t.stop_after_steps is None or 1 <= t.stop_after_steps <= t.max_steps, "train.stop_after_steps",
           "must be within [1, train.max_steps]")
    _check(bool(t.run_name) and "/" not in t.run_name, "train.run_name", "must be a non-empty name without '/'")


def _validate_serve_eval(s: DictConfig, e: DictConfig) -> None:
    """serve / eval sections (serve.llm, serve.rollout, pipelines.evaluate)."""
    for key in ("max_batch_size", "default_max_tokens", "num_replicas", "max_ongoing_requests"):
        _check(s[key] >= 1, f"serve.{key}", f"must be >= 1, got {s[key]}")
    _check(s.num_cpus >= 0 and s.num_gpus >= 0, "serve.num_cpus", "resources must be >= 0")
    if s.autoscaling is not None:
        a = s.autoscaling
        _check(1 <= a.min_replicas <= a.max_replicas, "serve.autoscaling.min_replicas",
               "must satisfy 1 <= min_replicas <= max_replicas")
    _check(s.rollout.num_replicas >= 1, "serve.rollout.num_replicas", "must be >= 1")
    _check(e.concurrency >= 1, "eval.concurrency", f"must be >= 1, got {e.concurrency}")
    _check(e.max_retries >= 0, "eval.max_retries", "must be >= 0")
    for name, p in e.policies.items():
        _validate_policy(p, f"eval.policies.{name}")
    names = set()
    for i, t in enumerate(list(e.tasks) + list(e.general)):
        _check(t.name not in names, f"eval task {i}.name", f"duplicate task name {t.name!r}")
        names.add(t.name)
    _validate_general_tasks(e.general)
    for task, v in e.reference_scores.items():
        _check(v > 0, f"eval.reference_scores.{task}", f"must be > 0, got {v}")
    _check(e.paper_table is None or os.path.isfile(e.paper_table), "eval.paper_table",
           f"{e.paper_table} does not exist (the shipped one: ${{data:paper/agenttuning_main_table.json}})")


def _validate_policy(p: DictConfig, k: str) -> None:
    _check(p.kind != "openai" or bool(p.base_url and p.model), f"{k}.base_url",
           "an openai policy needs base_url and model")
    _check(p.temperature >= 0, f"{k}.temperature", "must be >= 0")
    _check(p.max_tokens >= 1, f"{k}.max_tokens", "must be >= 1")
    _check(p.max_retries >= 0 and p.timeout_s > 0, f"{k}.max_retries", "retries >= 0, timeout_s > 0")
    _check(0 < p.backoff_s <= p.backoff_max_s, f"{k}.backoff_s", "must satisfy 0 < backoff_s <= backoff_max_s")


def _validate_eft(e: DictConfig) -> None:
    """eft section (serve.eft); model paths are checked by the eft job itself."""
    _check(e.beta >= 0, "eft.beta", f"must be >= 0, got {e.beta}")
    _check(0 <= e.speculative_k <= 64, "eft.speculative_k", f"must be within [0, 64], got {e.speculative_k}")
    _check(e.num_cpus >= 0 and e.num_gpus >= 0, "eft.num_cpus", "resources must be >= 0")
    _check(e.max_ongoing_requests >= 1 and e.max_sessions >= 1, "eft.max_sessions", "must be >= 1")


def _validate_general(g: DictConfig) -> None:
    """general section (pipelines.general)."""
    for key in ("mmlu_train", "mmlu_eval", "gsm_train", "gsm_eval", "gsm_symbolic_train"):
        _check(g[key] >= 0, f"general.{key}", f"must be >= 0, got {g[key]}")
    _check(g.mmlu_shots >= 0, "general.mmlu_shots", f"must be >= 0, got {g.mmlu_shots}")
    _check(g.humaneval_eval is None or 0 <= g.humaneval_eval <= 164, "general.humaneval_eval",
           "must be within [0, 164] (HumanEval has 164 problems) or null for all")
    _check(0.0 < g.mmlu_eval_fraction < 1.0, "general.mmlu_eval_fraction",
           f"must be within (0, 1), got {g.mmlu_eval_fraction}")
    _check(g.decontamination.ngram >= 1, "general.decontamination.ngram", "must be >= 1")
    _check(0.0 <= g.decontamination.threshold <= 1.0, "general.decontamination.threshold", "must be within [0, 1]")


def _validate_general_tasks(tasks: ListConfig) -> None:
    """eval.general: per-kind fields (pipelines.general_eval)."""
    for i, g in enumerate(tasks):
        k = f"eval.general.{i}"
        _check(g.limit is None or g.limit >= 1, f"{k}.limit", "must be >= 1 or null")
        _check(g.max_tokens >= 1, f"{k}.max_tokens", "must be >= 1")
        if g.kind == "mc":
            _check(g.few_shot is None or g.few_shot >= 0, f"{k}.few_shot", "must be >= 0 (dev questions per subject)")
        if g.kind == "math":
            _check(g.few_shot is None or 0 <= g.few_shot <= 8, f"{k}.few_shot",
                   "must be within [0, 8] (the chain-of-thought exemplars of Wei et al.)")
        if g.kind == "code":
            _check(g.timeout_s > 0, f"{k}.timeout_s", "must be > 0")
            _check(g.sandbox_workers >= 1, f"{k}.sandbox_workers", "must be >= 1")
        if g.kind == "mtbench":
            _check(g.judge.kind == "openai" and bool(g.judge.base_url and g.judge.model), f"{k}.judge",
                   "MT-Bench needs a judge endpoint: judge: {kind: openai, base_url: .../v1, model: NAME}")
            _validate_policy(g.judge, f"{k}.judge")


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    """Plain-Python copy (for Ray `train_loop_config`, manifests and wandb)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _validate_collect(c: DictConfig) -> None:
    """collect section (pipelines.collect)."""
    _check(c.concurrency >= 1, "collect.concurrency", f"must be >= 1, got {c.concurrency}")
    _check(c.max_episode_retries >= 0, "collect.max_episode_retries", "must be >= 0")
    t = c.teacher
    _validate_policy(t, "collect.teacher")
    dc = c.decontamination
    _check(dc.ngram >= 1, "collect.decontamination.ngram", "must be >= 1")
    _check(0.0 <= dc.threshold <= 1.0, "collect.decontamination.threshold", "must be within [0, 1]")
    _check(c.demo.pool >= 1, "collect.demo.pool", "must be >= 1")
    names = set()
    for i, task in enumerate(c.tasks):
        k = f"collect.tasks.{i}"
        _check(task.name not in names, f"{k}.name", f"duplicate task name {task.name!r}")
        _check(bool(task.name) and "/" not in task.name, f"{k}.name", "must be a non-empty file name")
        names.add(task.name)
        ins = task.instructions
        _check(ins.kind != "self_instruct" or t.kind == "openai", f"{k}.instructions.kind",
               "self_instruct needs collect.teacher.kind=openai")
        _check(ins.per_table >= 1 and ins.n >= 1, f"{k}.instructions.per_table", "per_table and n must be >= 1")
        _check(0.0 <= task.reward_threshold <= 1.0, f"{k}.reward_threshold", "must be within [0, 1]")
