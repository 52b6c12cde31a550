"""Typed configuration: one schema (dataclasses) for every job, loaded with OmegaConf.

Every job reads the same root schema, so one YAML file can drive a single stage or the whole
end-to-end run. Values come from, in order: schema defaults, the YAML file, dotted CLI overrides
(``data.eta=0.5``). Unknown keys and wrong types fail here, before any Ray work, naming the key.

Sections are owned by the modules that use them; keep this file free of heavy imports.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

log = logging.getLogger(__name__)

AGENTLM_SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message names the key."""


# ----------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """Locally built model for tests and offline development (no hub access)."""

    enabled: bool = False  # build into model.name_or_path when that folder does not exist yet
    vocab_size: int = 2048
    hidden_size: int = 64
    intermediate_size: int = 176
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 4096
    # Text files (txt / jsonl of any of our data formats) the BPE tokenizer is trained on;
    # empty means the corpus that ships with the package (pipelines/assets/tiny_corpus.txt).
    corpus: List[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class ModelConfig:
    name_or_path: str = "outputs/models/tiny-llama"  # hub id or local HF folder
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # Chat format: "llama2" (AgentLM's Llama-2-chat format, the default), "model" (the
    # tokenizer's own chat template), or a path to a Jinja template file.
    chat_template: str = "llama2"
    system_prompt: str = AGENTLM_SYSTEM_PROMPT
    trust_remote_code: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


# ----------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    name: str = "???"
    group: str = "???"  # agent | general
    format: str = "???"  # agentinstruct | sharegpt | openai
    path: str = "???"  # local file/dir or hub id
    split: Optional[str] = None
    weight: float = 1.0  # relative weight within its group
    limit: Optional[int] = None  # read at most this many records (debugging)


@dataclass
class DecontaminationConfig:
    enabled: bool = True
    # Evaluation data to protect: files (jsonl/json) or env task files; every string in a record
    # contributes n-grams.
    paths: List[str] = field(default_factory=list)
    ngram: int = 10
    threshold: float = 0.8  # a sample is dirty when more than this fraction of its n-grams overlap


@dataclass
class DataConfig:
    sources: List[SourceConfig] = field(default_factory=list)
    eta: float = 0.2  # fraction of output samples from group `agent`
    # Output size in samples; None = every agent sample once (n_agent / eta), or every general
    # sample once when eta == 0.
    num_samples: Optional[int] = None
    max_seq_len: int = 4096
    overlong: str = "truncate"  # truncate | reject
    pack: bool = True
    dedup: bool = True
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)
    seed: int = 0
    output_dir: str = "outputs/data"
    rows_per_shard: int = 2048
    overwrite: bool = True


# ----------------------------------------------------------------------------- train


@dataclass
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: Dict[str, float] = field(default_factory=dict)


@dataclass
class TrainConfig:
    data_dir: str = "outputs/data"
    output_dir: str = "outputs/train"
    max_steps: int = 2000
    global_batch_size: int = 64  # packed rows per optimizer step, over all workers
    micro_batch_size: int = 1  # rows per worker per forward pass
    lr: float = 5e-5
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    zero_stage: int = 2
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"  # auto | sdpa | eager | flash_attention_2
    log_every: int = 10
    save_every: int = 500
    num_to_keep: int = 2
    max_failures: int = 0
    resume_from: str = "auto"  # auto | none | PATH
    seed: int = 0


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online when credentials exist) | online | offline | disabled
    project: str = "agenttuning"
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- root


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    # Sections of other jobs (serve, envs, eval, eft, collect, run) are free-form until their
    # owners type them; they are validated by those jobs.
    serve: Dict[str, Any] = field(default_factory=dict)
    envs: Dict[str, Any] = field(default_factory=dict)
    eval: Dict[str, Any] = field(default_factory=dict)
    eft: Dict[str, Any] = field(default_factory=dict)
    collect: Dict[str, Any] = field(default_factory=dict)
    run: Dict[str, Any] = field(default_factory=dict)


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
        try:
            # update() (unlike merge of a dotlist) can address list items: data.sources.0.weight=2
            OmegaConf.update(cfg, key.strip(), yaml.safe_load(raw) if raw else None, merge=True)
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


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': {msg}")


def _one_of(value: Any, key: str, allowed: tuple) -> None:
    _check(value in allowed, key, f"got {value!r}, expected one of {', '.join(map(str, allowed))}")


def validate(cfg: DictConfig) -> None:
    """Value checks that types alone cannot express (ranges, enums, cross-field rules)."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _one_of(m.dtype, "model.dtype", ("auto", "float32", "bfloat16", "float16"))
    _check(0.0 <= d.eta <= 1.0, "data.eta", f"must be within [0, 1], got {d.eta}")
    _check(d.max_seq_len >= 16, "data.max_seq_len", f"must be >= 16, got {d.max_seq_len}")
    _one_of(d.overlong, "data.overlong", ("truncate", "reject"))
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
        _one_of(src.group, f"{k}.group", ("agent", "general"))
        _one_of(src.format, f"{k}.format", ("agentinstruct", "sharegpt", "openai"))
        _check(src.weight > 0, f"{k}.weight", f"must be > 0, got {src.weight}")
    _one_of(t.zero_stage, "train.zero_stage", (0, 1, 2, 3))
    _one_of(t.offload_optimizer, "train.offload_optimizer", ("none", "cpu", "nvme"))
    _one_of(t.offload_param, "train.offload_param", ("none", "cpu", "nvme"))
    _one_of(cfg.wandb.mode, "wandb.mode", ("auto", "online", "offline", "disabled"))
    _check(cfg.scaling.num_workers >= 1, "scaling.num_workers", "must be >= 1")


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    """Plain-Python copy (for Ray `train_loop_config`, manifests and wandb)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]

