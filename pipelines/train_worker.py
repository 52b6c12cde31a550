"""One Ray Train worker of the fine-tuning job (``pipelines.train`` is the driver).

Everything a worker needs travels in ``train_loop_config["job"]``: a :class:`TrainJob` (the typed
config sections plus what the driver resolved). The loop reads as the recipe it is:

    for each optimizer step:  batch → accumulate (forward/backward per micro-batch, one optimizer
    step) → record (row digests) → progress → log (metrics.jsonl, wandb) → save (checkpoint)

Data order: every worker streams the same ordered dataset and keeps its slice of each
(micro_batch · world_size)-row group (``worker_rows``), so optimizer step s always covers rows
[s·G, (s+1)·G) of the epoch (G = global batch) whatever the worker count or accumulation; resuming
skips exactly the rows already consumed.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from agenttuning import tracking
from agenttuning.chat import load_tokenizer
from agenttuning.config import ConfigError
from agenttuning.models import load_causal_lm
from agenttuning.schema import ModelConfig, ScalingSection, TrainConfig, WandbConfig
from agenttuning.tracking import WandbRun
from pipelines.train_utils import (
    GROUPS,
    IGNORE,
    backward_scale,
    deepspeed_config,
    flops_per_token,
    lr_lambda,
    packed_forward,
    peak_memory_gb,
    peak_tflops,
    precision,
    row_digest,
    shifted_targets,
    worker_rows,
)

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"  # DeepSpeed engine state (optimizer, scheduler) inside a checkpoint
DS_TAG = "state"
WORKERS_FILE = "workers.json"  # rank → node id / ip / hostname / pid of the latest (re)start
PROGRESS_FILE = "progress.json"  # rank 0's latest step, read by the driver's progress bar
CHUNK_ROWS = 256  # rows per Ray Data batch: fewer iterator round trips than one per micro-batch
# Ray Train's controller takes one report per worker every health-check interval (its env var, 2 s
# by default) from a one-slot queue; a report sooner than that blocks the worker until it is taken.
REPORT_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


@dataclass
class TrainJob:
    """What a worker receives: the typed sections and what the driver resolved for them."""

    model: ModelConfig
    train: TrainConfig
    scaling: ScalingSection
    wandb: WandbConfig
    files: List[str]  # the data job's Parquet shards (absolute)
    num_rows: int  # packed rows per epoch
    seq_len: int  # the data job's max_seq_len (for MFU)
    tracking: WandbRun  # wandb mode, stable run id and credentials, decided where the job was started

    @property
    def run_dir(self) -> str:
        return run_dir(self.train)

    @property
    def local(self) -> bool:
        return is_local(self.train.output_dir)


def is_local(path: str) -> bool:
    return "://" not in path


def run_dir(t: TrainConfig) -> str:
    return os.path.join(t.output_dir, t.run_name)


def list_checkpoints(directory: str) -> List[Tuple[int, str]]:
    """(step, path) of the complete checkpoints under a run directory, oldest first."""
    out = []
    if not os.path.isdir(directory):
        return out
    for name in os.listdir(directory):
        state = os.path.join(directory, name, STATE_FILE)
        if name.startswith("checkpoint_") and os.path.isfile(state):
            with open(state, encoding="utf-8") as f:
                out.append((int(json.load(f)["step"]), os.path.join(directory, name)))
    return sorted(out)


# ----------------------------------------------------------------------------- data stream


def micro_batches(shard: Any, job: TrainJob, rank: int, world: int, start_step: int) -> Iterator[Tuple[int, Dict]]:
    """(epoch, this worker's micro-batch) from optimizer step `start_step` on, forever (epochs repeat)."""
    t = job.train
    micro, gas = t.micro_batch_size, t.global_batch_size // (world * t.micro_batch_size)
    steps_per_epoch = job.num_rows // t.global_batch_size
    group = micro * world
    step = start_step
    while True:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        skip, stop = in_epoch * gas, steps_per_epoch * gas
        n = 0
        collate = functools.partial(worker_rows, rank=rank, micro=micro, world=world)
        for chunk in shard.iter_torch_batches(batch_size=group * max(1, CHUNK_ROWS // group),
                                              prefetch_batches=t.prefetch_batches, collate_fn=collate):
            for i in range(0, len(chunk["input_ids"]), micro):
                if n >= skip:
                    yield epoch, {k: v[i:i + micro] for k, v in chunk.items()}
                n += 1
                if n >= stop:
                    break
            if n >= stop:
                break
        step = (epoch + 1) * steps_per_epoch


# ----------------------------------------------------------------------------- engine and checkpoints


def _attn_impl(requested: str, use_gpu: bool) -> str:
    if requested != "auto":
        return requested
    if use_gpu:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def build_engine(job: TrainJob, world: int) -> Tuple[Any, Any, Any]:
    """Model + DeepSpeed engine (AdamW, warmup + cosine) per our config."""
    import deepspeed
    import torch
    from transformers.integrations import HfDeepSpeedConfig

    t, use_gpu = job.train, job.scaling.use_gpu
    if not use_gpu and world == 1:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~60 s of g++ on a
        # fresh install or venv) that a single worker never uses; its compatibility table is the
        # documented place to turn an op off (deepspeed.ops: "edits to it persist").
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # Wrap Ray Train's process group first: zero.Init (ZeRO-3 loading) reads the world size from it.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)
    ds_cfg = deepspeed_config(t, use_gpu, world)
    # ZeRO-3: while this object lives, from_pretrained builds the model partitioned (zero.Init),
    # so a 70B model never exists whole on one worker.
    hf_ds = HfDeepSpeedConfig(ds_cfg) if t.zero_stage == 3 else None
    model = load_causal_lm(job.model.name_or_path, precision(t, use_gpu), device=None,
                           trust_remote_code=job.model.trust_remote_code,
                           attn_implementation=_attn_impl(str(t.attn_implementation), use_gpu))
    model.train()
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = None
    if not use_gpu:
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
    sched = functools.partial(_scheduler, fn=lr_lambda(t.max_steps, t.warmup_steps, t.min_lr_ratio))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched,
                                                   config=ds_cfg, dist_init_required=False)
    return engine, scheduler, hf_ds


def _scheduler(optimizer: Any, fn: Any) -> Any:
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def _complete(path: str) -> bool:
    """All ranks' DeepSpeed files are there (a worker can die while its shard is being persisted)."""
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
            world = int(json.load(f)["world_size"])
        files = os.listdir(os.path.join(path, DS_DIR, DS_TAG))
    except (OSError, ValueError, KeyError):
        return False
    shards = [f for f in files if f.endswith("optim_states.pt")]
    return any(f.endswith("model_states.pt") for f in files) and (not shards or len(shards) >= world)


def resume_source(job: TrainJob) -> Optional[str]:
    """The newest checkpoint among Ray's (restart / restored run) and this run directory's.

    Ray Train registers a checkpoint when its controller next polls the workers; a worker dying
    right after reporting can leave the newest one unregistered, yet complete on storage, so the
    run directory is scanned too. Falls back to train.resume_from=PATH on a fresh run.
    """
    import ray.train

    t = job.train
    ckpt = ray.train.get_checkpoint()
    found = []
    if ckpt is not None and is_local(ckpt.path) and os.path.isfile(os.path.join(ckpt.path, STATE_FILE)):
        with open(os.path.join(ckpt.path, STATE_FILE), encoding="utf-8") as f:
            found.append((int(json.load(f)["step"]), ckpt.path))
    elif ckpt is not None:
        return ckpt.path  # remote storage: trust Ray's bookkeeping
    if job.local:
        found += [(step, path) for step, path in list_checkpoints(job.run_dir) if _complete(path)]
    if found:
        return max(found)[1]
    return None if t.resume_from in ("auto", "none") else t.resume_from


def restore(engine: Any, job: TrainJob) -> int:
    """Load engine + data position from the newest checkpoint (see resume_source); 0 if none."""
    import ray.train

    src = resume_source(job)
    if src is None:
        return 0
    with (_Path(src) if is_local(src) else ray.train.Checkpoint(src).as_directory()) as d:
        engine.load_checkpoint(os.path.join(d, DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        with open(os.path.join(d, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    if state["global_batch_size"] != job.train.global_batch_size:
        raise ConfigError(f"config key 'train.global_batch_size': checkpoint {src} was trained with "
                          f"{state['global_batch_size']}; the data position cannot be carried over")
    log.info("resumed from %s at step %d", src, state["step"])
    return int(state["step"])


class _Path:
    """A local checkpoint folder as the same context manager as a remote checkpoint's copy."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        return None


def save(engine: Any, tokenizer: Any, job: TrainJob, step: int, epoch: int, metrics: Dict[str, Any]) -> None:
    """HF model + tokenizer + DeepSpeed state + data position, reported as a Ray Train checkpoint."""
    import ray.train
    import torch.distributed as dist

    rank, t = dist.get_rank(), job.train
    tmp = tempfile.mkdtemp(prefix=f"agenttuning-ckpt-{rank}-")
    engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG)
    if t.zero_stage == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; full weights on rank 0
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({"step": step, "epoch": epoch, "rows_consumed": step * t.global_batch_size,
                       "global_batch_size": t.global_batch_size, "max_steps": t.max_steps,
                       "world_size": dist.get_world_size(), "metrics": metrics}, f, indent=1)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=f"checkpoint_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)


def init_wandb(job: TrainJob) -> Any:
    """The rank-0 wandb run (None when disabled or unavailable: tracking never stops training)."""
    import dataclasses

    directory = job.run_dir if job.local else tempfile.mkdtemp()
    config = {k: dataclasses.asdict(getattr(job, k)) for k in ("model", "train", "scaling")}
    return tracking.init(job.tracking, directory, config)


def record_placement(rank: int, world: int, start_step: int, path: Optional[str]) -> None:
    """Every worker's node and process, gathered on rank 0 and written to the run's workers.json.

    Rewritten at each (re)start, so it shows where the latest attempt ran (multi-node placement).
    """
    import socket

    import ray
    import ray.train
    import torch.distributed as dist

    ctx = ray.get_runtime_context()
    mine = {"rank": rank, "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "hostname": socket.gethostname(), "pid": os.getpid(),
            "local_rank": ray.train.get_context().get_local_rank()}
    gathered: List[Optional[Dict[str, Any]]] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        log.info("workers: %s", [(w["rank"], w["node_id"][:8], w["pid"]) for w in gathered])
        if path:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump({"start_step": start_step, "world_size": world, "workers": gathered}, f, indent=1)


def write_atomic(path: str, record: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def append_jsonl(path: str, record: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- the loop


class Worker:
    """The state of one worker's run; its methods are the named steps of the training loop."""

    def __init__(self, job: TrainJob) -> None:
        import ray.train
        import torch

        ctx = ray.train.get_context()
        self.job, self.t, self.use_gpu = job, job.train, job.scaling.use_gpu
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        torch.manual_seed(self.t.seed)
        if self.t.torch_threads:
            # Ray caps a worker's intra-op threads at its logical CPUs (OMP_NUM_THREADS); a CPU run whose
            # worker reserves fewer CPUs than it may use (to leave room for Ray Data) raises it here.
            torch.set_num_threads(int(self.t.torch_threads))
        self.device = ray.train.torch.get_device()
        m = job.model
        self.tokenizer = load_tokenizer(m.name_or_path, m.chat_template, m.trust_remote_code)
        t0 = time.perf_counter()
        self.engine, self.scheduler, self._hf_ds = build_engine(job, self.world)
        self.start = restore(self.engine, job)
        log.info("rank %d: engine ready in %.1fs (start step %d)", self.rank, time.perf_counter() - t0, self.start)
        self.end = min(self.t.max_steps, self.t.stop_after_steps or self.t.max_steps)
        self.gas = self.t.global_batch_size // (self.world * self.t.micro_batch_size)
        record_placement(self.rank, self.world, self.start,
                         os.path.join(job.run_dir, WORKERS_FILE) if job.local else None)
        self.wandb = init_wandb(job) if self.rank == 0 else None
        mcfg = self.engine.module.config
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        self.flops_per_token = (flops_per_token(n_params, mcfg.num_hidden_layers, mcfg.hidden_size, job.seq_len)
                                if self.use_gpu else 0)
        self.peak = (peak_tflops(torch.cuda.get_device_name(), self.t.peak_tflops) if self.use_gpu else None)
        self.stream = micro_batches(ray.train.get_dataset_shard("train"), job, self.rank, self.world, self.start)
        self.epoch = 0
        self.last_report = time.perf_counter()
        self._reset_window()

    def _reset_window(self) -> None:
        self.t_last, self.tokens, self.supervised = time.perf_counter(), 0.0, 0.0

    def maybe_fail(self, step: int) -> None:
        """Test hook (train.fail_at_step): the last rank exits abruptly, once."""
        if self.t.fail_at_step == step and self.rank == self.world - 1 and self.job.local:
            marker = os.path.join(self.job.run_dir, f".injected_failure_{step}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                log.warning("injected failure at step %d (rank %d)", step, self.rank)
                os._exit(1)

    def next_batch(self) -> List[Dict[str, Any]]:
        """This worker's ``gas`` micro-batches of the next optimizer step, on its device."""
        mbs = []
        for _ in range(self.gas):
            self.epoch, mb = next(self.stream)
            mbs.append({k: v.to(self.device) for k, v in mb.items()})
        return mbs

    def accumulate(self, mbs: List[Dict[str, Any]]) -> Tuple[Any, float]:
        """Forward/backward of every micro-batch, normalised by the global count of supervised
        targets, then one optimizer step. Returns the all-reduced stats and that count.

        stats: [sum_ce, real tokens, per-group sum_ce ..., per-group targets ...]
        """
        import torch
        import torch.distributed as dist

        n_sup = torch.tensor(float(sum(int((shifted_targets(b["labels"], b["position_ids"]) != IGNORE).sum())
                                       for b in mbs)), device=self.device)
        dist.all_reduce(n_sup)
        scale = backward_scale(self.world, int(n_sup.item()))
        stats = torch.zeros(2 + 2 * len(GROUPS), dtype=torch.float64, device=self.device)
        for b in mbs:
            r = packed_forward(self.engine, b)
            self.engine.backward(r["sum_ce"] * scale, scale_wrt_gas=False)
            self.engine.step()
            real = int((b["group_ids"] >= 0).sum()) if "group_ids" in b else b["input_ids"].numel()
            stats += torch.cat([torch.stack([r["sum_ce"].detach().double(),
                                             torch.tensor(real, device=self.device).double()]),
                                r["group_ce"].double(), r["group_n"].double()])
        dist.all_reduce(stats)
        self.tokens += stats[1].item()
        self.supervised += n_sup.item()
        return stats, n_sup.item()

    def record(self, step: int, mbs: List[Dict[str, Any]]) -> None:
        """train.record_samples: the global row order of the step, as digests, to samples.jsonl."""
        import torch.distributed as dist

        digests = [row_digest(b["input_ids"]) for b in mbs]
        gathered: List[Any] = [None] * self.world
        dist.all_gather_object(gathered, digests)
        if self.rank == 0 and self.job.local:
            rows = [d for i in range(self.gas) for g in gathered for d in g[i]]  # micro-batch, then rank
            append_jsonl(os.path.join(self.job.run_dir, "samples.jsonl"), {"step": step, "epoch": self.epoch, "rows": rows})

    def progress(self, step: int, loss: float) -> None:
        if self.rank == 0 and self.job.local:
            write_atomic(os.path.join(self.job.run_dir, PROGRESS_FILE), {"step": step, "end": self.end, "loss": loss})

    def metrics(self, step: int, stats: Any, n_sup: float) -> Dict[str, Any]:
        """Metrics of the window since the last log line; rank 0 writes them (metrics.jsonl, wandb)."""
        dt = max(time.perf_counter() - self.t_last, 1e-9)
        gn = self.engine.get_global_grad_norm()
        k = len(GROUPS)
        out = {"step": step, "epoch": self.epoch, "loss": stats[0].item() / max(n_sup, 1),
               "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(gn) if gn is not None else None,
               "tokens_per_s": self.tokens / dt, "supervised_tokens_per_s": self.supervised / dt,
               "peak_mem_gb": peak_memory_gb(self.use_gpu)}
        for g, name in enumerate(GROUPS):
            n_g = stats[2 + k + g].item()
            out[f"loss_{name}"] = stats[2 + g].item() / n_g if n_g else None
        if self.peak:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / (self.peak * 1e12 * self.world)
        if self.rank == 0:
            log.info("step %d: %s", step, {key: round(v, 5) if isinstance(v, float) else v for key, v in out.items()})
            if self.job.local:
                append_jsonl(os.path.join(self.job.run_dir, "metrics.jsonl"), out)
            if self.wandb is not None:
                self.wandb.log(out, step=step)
        self._reset_window()
        return out

    def report_due(self) -> bool:
        """Whether this log line also goes to Ray Train (``ray.train.report``): at most once per
        REPORT_INTERVAL_S, else fast steps stall on the controller (~1 s per report at 0.1 s
        steps). Every rank must make the same call (report is a collective), so they agree on the
        slowest rank's clock."""
        import torch
        import torch.distributed as dist

        since = torch.tensor([time.perf_counter() - self.last_report], dtype=torch.float64, device=self.device)
        dist.all_reduce(since, op=dist.ReduceOp.MAX)
        if since.item() < REPORT_INTERVAL_S:
            return False
        self.last_report = time.perf_counter()
        return True

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def train_loop_per_worker(config: Dict[str, Any]) -> None:
    """One Ray Train worker: ``config["job"]`` is the TrainJob the driver prepared."""
    import ray.train

    w = Worker(config["job"])
    t = w.t
    for step in range(w.start + 1, w.end + 1):
        w.maybe_fail(step)
        mbs = w.next_batch()
        stats, n_sup = w.accumulate(mbs)
        if t.record_samples:
            w.record(step, mbs)
        w.progress(step, stats[0].item() / max(n_sup, 1))
        is_save = step % t.save_every == 0 or step == w.end
        if step % t.log_every == 0 or is_save:
            metrics = w.metrics(step, stats, n_sup)
            if is_save:
                save(w.engine, w.tokenizer, w.job, step, w.epoch, metrics)
            elif w.report_due():
                ray.train.report(metrics)
    w.finish()
