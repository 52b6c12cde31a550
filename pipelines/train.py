"""Fine-tuning job: Ray Train TorchTrainer + DeepSpeed ZeRO over the data job's packed Parquet rows.

`agenttuning train CONFIG [k=v ...]` or `python -m pipelines.train CONFIG`; also through
`ray job submit --working-dir . -- python -m pipelines.train CONFIG`. See docs/training.md.

Data order: every worker streams the same ordered dataset and keeps its slice of each
(micro_batch · world_size)-row group (`worker_rows`), so optimizer step s always covers rows
[s·G, (s+1)·G) of the epoch (G = global batch) whatever the worker count or accumulation; resuming
skips exactly the rows already consumed.
"""

import functools
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from omegaconf import DictConfig

from agenttuning.config import ConfigError, to_dict
from pipelines.train_utils import (
    COLUMNS, GROUPS, IGNORE, backward_scale, check_tokenizer, deepspeed_config, flops_per_token,
    lr_lambda, packed_forward, parquet_files, peak_memory_gb, peak_tflops, precision, read_manifest,
    row_digest, shifted_targets, worker_rows,
)

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model', 'train', 'scaling', 'wandb')  # what `--help` lists

STATE_FILE = "trainer_state.json"
DS_DIR = "deepspeed"  # DeepSpeed engine state (optimizer, scheduler) inside a checkpoint
DS_TAG = "state"
WORKERS_FILE = "workers.json"  # rank → node id / ip / hostname / pid of the latest (re)start
PROGRESS_FILE = "progress.json"  # rank 0's latest step, read by the driver's progress bar


def _is_local(path: str) -> bool:
    return "://" not in path


def run_dir(cfg_train: Dict[str, Any]) -> str:
    return os.path.join(cfg_train["output_dir"], cfg_train["run_name"])


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


# ----------------------------------------------------------------------------- driver


def prepare(cfg: DictConfig) -> Dict[str, Any]:
    """Driver-side checks before any worker starts; returns the plain config for the workers."""
    from agenttuning.chat import load_tokenizer, tokenizer_fingerprint
    from agenttuning.models import ensure_model

    conf = to_dict(cfg)
    t = conf["train"]
    manifest = read_manifest(t["data_dir"])
    files = parquet_files(t["data_dir"])
    model_path = ensure_model(cfg)
    tok = load_tokenizer(model_path, cfg.model.chat_template, cfg.model.trust_remote_code)
    check_tokenizer(manifest, t["data_dir"], model_path, tokenizer_fingerprint(tok))
    num_rows = int(manifest.get("num_rows") or 0)
    if num_rows < t["global_batch_size"]:
        raise ConfigError(f"config key 'train.global_batch_size': {t['global_batch_size']} rows per step but "
                          f"{t['data_dir']} holds only {num_rows} rows")
    if _is_local(t["output_dir"]):
        t["output_dir"] = os.path.abspath(t["output_dir"])
    resume = t["resume_from"]
    if resume == "none" and _is_local(t["output_dir"]) and list_checkpoints(run_dir(t)):
        # Ray Train restores a run directory's latest checkpoint by itself; starting over silently
        # inside it would mix two runs.
        raise ConfigError(f"config key 'train.resume_from': none, but {run_dir(t)} already has checkpoints; "
                          "use resume_from=auto or another train.run_name / train.output_dir")
    if resume not in ("auto", "none"):
        if _is_local(resume):
            resume = t["resume_from"] = os.path.abspath(resume)
        if _is_local(resume) and not os.path.isfile(os.path.join(resume, STATE_FILE)):
            raise ConfigError(f"config key 'train.resume_from': {resume} is not a training checkpoint "
                              f"(no {STATE_FILE})")
    conf["model"]["name_or_path"] = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
    conf["_files"] = [os.path.abspath(f) for f in files]
    conf["_num_rows"] = num_rows
    conf["_seq_len"] = int(manifest.get("max_seq_len") or 0)
    conf["_wandb_mode"] = _wandb_mode(cfg.wandb.mode)
    return conf


def _wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    netrc = os.path.expanduser("~/.netrc")
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (
        os.path.isfile(netrc) and "api.wandb.ai" in open(netrc, encoding="utf-8").read())
    return "online" if has_key else "offline"


def main(cfg: DictConfig):
    """Build and run the TorchTrainer; returns the ray.train.Result."""
    from agenttuning.cluster import ray_session

    conf = prepare(cfg)
    with ray_session():  # RAY_ADDRESS (ray job submit), this process's instance, or a local one
        result = _fit(conf)
    ckpt = result.checkpoint.path if result.checkpoint else None
    last = _last_metrics(conf["train"])
    if last:
        log.info("last step %d: loss %.4f, %.0f tokens/s", last["step"], last["loss"], last["tokens_per_s"])
    print(f"training finished: last checkpoint {ckpt} (run directory {run_dir(conf['train'])})")
    return result


def _last_metrics(t: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    path = os.path.join(run_dir(t), "metrics.jsonl")
    if not _is_local(t["output_dir"]) or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def _watch_progress(t: Dict[str, Any], stop: "threading.Event") -> None:
    """Driver-side progress bar from rank 0's progress file (workers' logs stay in Ray's folder)."""
    from agenttuning.console import progress

    path = os.path.join(run_dir(t), PROGRESS_FILE)
    end = min(t["max_steps"], t["stop_after_steps"] or t["max_steps"])
    bar, shown = None, 0
    while not stop.wait(1.0):
        try:
            with open(path, encoding="utf-8") as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if bar is None:  # created on the first step report: the start step of a resumed run is known
            bar = progress(total=end, initial=state["step"] - 1, desc="train steps", unit="step")
            shown = state["step"] - 1
        bar.set_postfix(loss=f"{state['loss']:.3f}", refresh=False)
        bar.update(max(0, state["step"] - shown))
        shown = max(shown, state["step"])
    if bar is not None:
        bar.close()


def _fit(conf: Dict[str, Any]):
    import threading

    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t, s = conf["train"], conf["scaling"]
    if _is_local(t["output_dir"]):
        try:
            os.remove(os.path.join(run_dir(t), PROGRESS_FILE))
        except FileNotFoundError:
            pass
    # Small read tasks: on a 2-CPU laptop the training workers hold every CPU.
    ds = ray.data.read_parquet(conf["_files"], columns=list(COLUMNS), num_cpus=0.1)
    ds.context.enable_progress_bars = False  # per-worker bars flood job logs
    resources = dict(s["resources_per_worker"]) or None
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=conf,
        scaling_config=ScalingConfig(num_workers=s["num_workers"], use_gpu=s["use_gpu"],
                                     resources_per_worker=resources, placement_strategy=s["placement_strategy"]),
        run_config=RunConfig(
            name=t["run_name"], storage_path=t["output_dir"],
            failure_config=FailureConfig(max_failures=t["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=t["num_to_keep"]),
        ),
        datasets={"train": ds},
        # Not split: each worker reads the ordered stream and keeps its own slice (see module doc).
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(t, stop), daemon=True)
    if _is_local(t["output_dir"]):
        watcher.start()
    try:
        return trainer.fit()
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=5)


# ----------------------------------------------------------------------------- worker


CHUNK_ROWS = 256  # rows per Ray Data batch: fewer iterator round trips than one per micro-batch


def _collate(batch: Dict[str, Any], rank: int, micro: int, world: int) -> Dict[str, Any]:
    return worker_rows(batch, rank, micro, world)


def micro_batches(shard, conf: Dict[str, Any], rank: int, world: int, start_step: int) -> Iterator[Tuple[int, Dict]]:
    """(epoch, this worker's micro-batch) from optimizer step `start_step` on, forever (epochs repeat)."""
    t = conf["train"]
    micro, gas = t["micro_batch_size"], t["global_batch_size"] // (world * t["micro_batch_size"])
    steps_per_epoch = conf["_num_rows"] // t["global_batch_size"]
    group = micro * world
    step = start_step
    while True:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        skip, stop = in_epoch * gas, steps_per_epoch * gas
        n = 0
        collate = functools.partial(_collate, rank=rank, micro=micro, world=world)
        for chunk in shard.iter_torch_batches(batch_size=group * max(1, CHUNK_ROWS // group),
                                              prefetch_batches=t["prefetch_batches"], collate_fn=collate):
            for i in range(0, len(chunk["input_ids"]), micro):
                if n >= skip:
                    yield epoch, {k: v[i:i + micro] for k, v in chunk.items()}
                n += 1
                if n >= stop:
                    break
            if n >= stop:
                break
        step = (epoch + 1) * steps_per_epoch


def _attn_impl(requested: str, use_gpu: bool) -> str:
    if requested != "auto":
        return requested
    if use_gpu:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


def _build_engine(conf: Dict[str, Any], world: int):
    """Model + DeepSpeed engine (AdamW, warmup + cosine) per our config."""
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    t, m, use_gpu = conf["train"], conf["model"], conf["scaling"]["use_gpu"]
    # Wrap Ray Train's process group first: zero.Init (ZeRO-3 loading) reads the world size from it.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False)
    ds_cfg = deepspeed_config(t, use_gpu, world)
    prec = precision(t, use_gpu)
    # ZeRO-3: while this object lives, from_pretrained builds the model partitioned (zero.Init),
    # so a 70B model never exists whole on one worker.
    hf_ds = HfDeepSpeedConfig(ds_cfg) if t["zero_stage"] == 3 else None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(
        m["name_or_path"], dtype=dtype, attn_implementation=_attn_impl(t["attn_implementation"], use_gpu),
        trust_remote_code=m["trust_remote_code"])
    model.config.use_cache = False
    if t["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = None
    if not use_gpu:
        optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=tuple(t["adam_betas"]),
                                      eps=t["adam_eps"], weight_decay=t["weight_decay"])
    sched = functools.partial(_scheduler, fn=lr_lambda(t["max_steps"], t["warmup_steps"], t["min_lr_ratio"]))
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=sched,
                                                   config=ds_cfg, dist_init_required=False)
    return engine, scheduler, hf_ds


def _scheduler(optimizer, fn):
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


def _resume_source(conf: Dict[str, Any]) -> Optional[str]:
    """The newest checkpoint among Ray's (restart / restored run) and this run directory's.

    Ray Train registers a checkpoint when its controller next polls the workers; a worker dying
    right after reporting can leave the newest one unregistered, yet complete on storage, so the
    run directory is scanned too. Falls back to train.resume_from=PATH on a fresh run.
    """
    import ray.train

    t = conf["train"]
    ckpt = ray.train.get_checkpoint()
    found = []
    if ckpt is not None and _is_local(ckpt.path) and os.path.isfile(os.path.join(ckpt.path, STATE_FILE)):
        with open(os.path.join(ckpt.path, STATE_FILE), encoding="utf-8") as f:
            found.append((int(json.load(f)["step"]), ckpt.path))
    elif ckpt is not None:
        return ckpt.path  # remote storage: trust Ray's bookkeeping
    if _is_local(t["output_dir"]):
        found += [(step, path) for step, path in list_checkpoints(run_dir(t)) if _complete(path)]
    if found:
        return max(found)[1]
    return None if t["resume_from"] in ("auto", "none") else t["resume_from"]


def _restore(engine, conf: Dict[str, Any]) -> int:
    """Load engine + data position from the newest checkpoint (see _resume_source); 0 if none."""
    src = _resume_source(conf)
    if src is None:
        return 0
    ctx = _nullpath(src) if _is_local(src) else ray_checkpoint_dir(src)
    with ctx as d:
        engine.load_checkpoint(os.path.join(d, DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=True)
        with open(os.path.join(d, STATE_FILE), encoding="utf-8") as f:
            state = json.load(f)
    if state["global_batch_size"] != conf["train"]["global_batch_size"]:
        raise ConfigError(f"config key 'train.global_batch_size': checkpoint {src} was trained with "
                          f"{state['global_batch_size']}; the data position cannot be carried over")
    log.info("resumed from %s at step %d", src, state["step"])
    return int(state["step"])


def ray_checkpoint_dir(uri: str):
    """A local copy of a checkpoint on remote storage (context manager yielding its path)."""
    import ray.train

    return ray.train.Checkpoint(uri).as_directory()


class _nullpath:
    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc) -> None:
        return None


def _save(engine, tokenizer, conf: Dict[str, Any], step: int, epoch: int, metrics: Dict[str, Any]) -> None:
    """HF model + tokenizer + DeepSpeed state + data position, reported as a Ray Train checkpoint."""
    import ray.train
    import torch.distributed as dist

    rank = dist.get_rank()
    tmp = tempfile.mkdtemp(prefix=f"agenttuning-ckpt-{rank}-")
    engine.save_checkpoint(os.path.join(tmp, DS_DIR), tag=DS_TAG)
    if conf["train"]["zero_stage"] == 3:
        state_dict = engine._zero3_consolidated_16bit_state_dict()  # collective; full weights on rank 0
    else:
        state_dict = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        engine.module.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        t = conf["train"]
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({"step": step, "epoch": epoch, "rows_consumed": step * t["global_batch_size"],
                       "global_batch_size": t["global_batch_size"], "max_steps": t["max_steps"],
                       "world_size": dist.get_world_size(), "metrics": metrics}, f, indent=1)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                     checkpoint_dir_name=f"checkpoint_{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)


def _init_wandb(conf: Dict[str, Any]):
    mode = conf["_wandb_mode"]
    if mode == "disabled":
        return None
    try:
        import wandb

        w = conf["wandb"]
        directory = run_dir(conf["train"]) if _is_local(conf["train"]["output_dir"]) else tempfile.mkdtemp()
        os.makedirs(directory, exist_ok=True)
        return wandb.init(project=w["project"], name=w["name"] or conf["train"]["run_name"], tags=w["tags"],
                          config={k: v for k, v in conf.items() if not k.startswith("_")}, mode=mode,
                          dir=directory, resume="allow", settings=wandb.Settings(init_timeout=60))
    except Exception as exc:  # noqa: BLE001 - tracking must never stop training
        log.warning("wandb disabled: %s", exc)
        return None


def train_loop_per_worker(conf: Dict[str, Any]) -> None:
    """One Ray Train worker: everything it needs is in `conf` (the plain config from prepare())."""
    import ray.train
    import torch
    import torch.distributed as dist

    from agenttuning.chat import load_tokenizer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    t, use_gpu = conf["train"], conf["scaling"]["use_gpu"]
    torch.manual_seed(t["seed"])
    if t["torch_threads"]:
        # Ray caps a worker's intra-op threads at its logical CPUs (OMP_NUM_THREADS); a CPU run whose
        # worker reserves fewer CPUs than it may use (to leave room for Ray Data) raises it here.
        torch.set_num_threads(int(t["torch_threads"]))
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(conf["model"]["name_or_path"], conf["model"]["chat_template"],
                               conf["model"]["trust_remote_code"])
    t0 = time.perf_counter()
    engine, scheduler, _hf_ds = _build_engine(conf, world)
    start = _restore(engine, conf)
    log.info("rank %d: engine ready in %.1fs (start step %d)", rank, time.perf_counter() - t0, start)
    end = min(t["max_steps"], t["stop_after_steps"] or t["max_steps"])
    gas = t["global_batch_size"] // (world * t["micro_batch_size"])
    local = t["output_dir"] if _is_local(t["output_dir"]) else None
    rdir = run_dir(t)
    _record_placement(rank, world, start, os.path.join(rdir, WORKERS_FILE) if local else None)
    wb = _init_wandb(conf) if rank == 0 else None
    mcfg = engine.module.config
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    fpt = flops_per_token(n_params, mcfg.num_hidden_layers, mcfg.hidden_size, conf["_seq_len"]) if use_gpu else 0
    peak = peak_tflops(torch.cuda.get_device_name() if use_gpu else "", t["peak_tflops"]) if use_gpu else None
    stream = micro_batches(ray.train.get_dataset_shard("train"), conf, rank, world, start)
    t_last, tok_acc, sup_acc = time.perf_counter(), 0.0, 0.0
    epoch = 0
    for step in range(start + 1, end + 1):
        if t["fail_at_step"] == step and rank == world - 1 and local:
            marker = os.path.join(rdir, f".injected_failure_{step}")
            if not os.path.exists(marker):
                open(marker, "w").close()
                log.warning("injected failure at step %d (rank %d)", step, rank)
                os._exit(1)
        mbs = []
        for _ in range(gas):
            epoch, mb = next(stream)
            mbs.append({k: v.to(device) for k, v in mb.items()})
        # Global count of supervised targets first, so every micro-batch is normalised by it.
        n_sup = torch.tensor(float(sum(int((shifted_targets(b["labels"], b["position_ids"]) != IGNORE).sum())
                                       for b in mbs)), device=device)
        dist.all_reduce(n_sup)
        scale = backward_scale(world, int(n_sup.item()))
        stats = torch.zeros(2 + 2 * len(GROUPS), dtype=torch.float64, device=device)
        for b in mbs:
            r = packed_forward(engine, b)
            engine.backward(r["sum_ce"] * scale, scale_wrt_gas=False)
            engine.step()
            real = int((b["group_ids"] >= 0).sum()) if "group_ids" in b else b["input_ids"].numel()
            stats += torch.cat([torch.stack([r["sum_ce"].detach().double(), torch.tensor(real, device=device).double()]),
                                r["group_ce"].double(), r["group_n"].double()])
        dist.all_reduce(stats)
        tok_acc += stats[1].item()
        sup_acc += n_sup.item()
        if t["record_samples"]:
            digests = [row_digest(b["input_ids"]) for b in mbs]
            gathered = [None] * world
            dist.all_gather_object(gathered, digests)
            if rank == 0 and local:
                # Global row order of the step: micro-batch index, then rank (see worker_rows).
                rows = [d for i in range(gas) for g in gathered for d in g[i]]
                _append(os.path.join(rdir, "samples.jsonl"), {"step": step, "epoch": epoch, "rows": rows})
        if rank == 0 and local:
            _write_atomic(os.path.join(rdir, PROGRESS_FILE),
                          {"step": step, "end": end, "loss": stats[0].item() / max(n_sup.item(), 1)})
        is_save = step % t["save_every"] == 0 or step == end
        if step % t["log_every"] == 0 or is_save:
            now = time.perf_counter()
            dt = max(now - t_last, 1e-9)
            gn = engine.get_global_grad_norm()
            k = len(GROUPS)
            metrics = {
                "step": step, "epoch": epoch, "loss": stats[0].item() / max(n_sup.item(), 1),
                "lr": scheduler.get_last_lr()[0], "grad_norm": float(gn) if gn is not None else None,
                "tokens_per_s": tok_acc / dt, "supervised_tokens_per_s": sup_acc / dt,
                "peak_mem_gb": peak_memory_gb(use_gpu),
            }
            for g, name in enumerate(GROUPS):
                n_g = stats[2 + k + g].item()
                metrics[f"loss_{name}"] = stats[2 + g].item() / n_g if n_g else None
            if peak:
                metrics["mfu"] = metrics["tokens_per_s"] * fpt / (peak * 1e12 * world)
            if rank == 0:
                log.info("step %d: %s", step, {k2: round(v, 5) if isinstance(v, float) else v
                                                for k2, v in metrics.items()})
                if local:
                    _append(os.path.join(rdir, "metrics.jsonl"), metrics)
                if wb is not None:
                    wb.log(metrics, step=step)
            if is_save:
                _save(engine, tokenizer, conf, step, epoch, metrics)
            else:
                ray.train.report(metrics)
            t_last, tok_acc, sup_acc = time.perf_counter(), 0.0, 0.0
    if wb is not None:
        wb.finish()


def _record_placement(rank: int, world: int, start_step: int, path: Optional[str]) -> None:
    """Every worker's node and process, gathered on rank 0 and written to the run's workers.json.

    Rewritten at each (re)start, so it shows where the latest attempt ran (multi-node placement).
    """
    import socket

    import ray
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


def _write_atomic(path: str, record: Dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _append(path: str, record: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.train", sys.argv[1:]))
