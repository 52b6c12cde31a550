"""Fine-tuning job (driver): Ray Train TorchTrainer + DeepSpeed ZeRO over the data job's packed rows.

`agenttuning train CONFIG [k=v ...]` or `python -m pipelines.train CONFIG`; also through
`ray job submit --working-dir . -- python -m pipelines.train CONFIG`. See docs/training.md.
The driver checks everything it can before any worker starts (data, tokenizer, resume point),
hands the workers a typed :class:`~pipelines.train_worker.TrainJob`, and shows a progress bar from
rank 0's progress file; the worker loop is ``pipelines.train_worker``.
"""

import json
import logging
import os
import threading
from typing import Any, Dict, Optional

from omegaconf import DictConfig

from agenttuning import tracking
from agenttuning.chat import load_tokenizer, tokenizer_fingerprint
from agenttuning.cluster import check_fits, pending_watch, ray_session
from agenttuning.config import ConfigError, to_object
from agenttuning.console import progress
from agenttuning.models import ensure_model
from pipelines.train_utils import COLUMNS, check_tokenizer, parquet_files, read_manifest
from pipelines.train_worker import (  # noqa: F401 — list_checkpoints/STATE_FILE: public for the run job and tests
    PROGRESS_FILE,
    STATE_FILE,
    WORKERS_FILE,
    TrainJob,
    is_local,
    list_checkpoints,
    run_dir,
    train_loop_per_worker,
)

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model', 'train', 'scaling', 'wandb')  # what `--help` lists


# ----------------------------------------------------------------------------- driver


def prepare(cfg: DictConfig) -> TrainJob:
    """Driver-side checks before any worker starts; returns what the workers receive."""

    model, t = to_object(cfg.model), to_object(cfg.train)
    manifest = read_manifest(t.data_dir)
    files = parquet_files(t.data_dir)
    model_path = ensure_model(cfg)
    tok = load_tokenizer(model_path, model.chat_template, model.trust_remote_code)
    check_tokenizer(manifest, t.data_dir, model_path, tokenizer_fingerprint(tok))
    num_rows = int(manifest.get("num_rows") or 0)
    if num_rows < t.global_batch_size:
        raise ConfigError(f"config key 'train.global_batch_size': {t.global_batch_size} rows per step but "
                          f"{t.data_dir} holds only {num_rows} rows")
    if is_local(t.output_dir):
        t.output_dir = os.path.abspath(t.output_dir)
    if t.resume_from == "none" and is_local(t.output_dir) and list_checkpoints(run_dir(t)):
        # Ray Train restores a run directory's latest checkpoint by itself; starting over silently
        # inside it would mix two runs.
        raise ConfigError(f"config key 'train.resume_from': none, but {run_dir(t)} already has checkpoints; "
                          "use resume_from=auto or another train.run_name / train.output_dir")
    if t.resume_from not in ("auto", "none"):
        if is_local(t.resume_from):
            t.resume_from = os.path.abspath(t.resume_from)
        if is_local(t.resume_from) and not os.path.isfile(os.path.join(t.resume_from, STATE_FILE)):
            raise ConfigError(f"config key 'train.resume_from': {t.resume_from} is not a training checkpoint "
                              f"(no {STATE_FILE})")
    model.name_or_path = os.path.abspath(model_path) if os.path.isdir(model_path) else model_path
    w = cfg.wandb
    run = tracking.resolve(str(w.mode), w.project, w.group or t.run_name, "train", w.name or t.run_name, list(w.tags))
    return TrainJob(model=model, train=t, scaling=to_object(cfg.scaling), wandb=to_object(cfg.wandb),
                    files=[os.path.abspath(f) for f in files], num_rows=num_rows,
                    seq_len=int(manifest.get("max_seq_len") or 0), tracking=run)


def main(cfg: DictConfig):
    """Build and run the TorchTrainer; returns the ray.train.Result."""

    job = prepare(cfg)
    with ray_session():  # RAY_ADDRESS (ray job submit), this process's instance, or a local one
        result = _fit(job)
    ckpt = result.checkpoint.path if result.checkpoint else None
    last = _last_metrics(job)
    if last:
        log.info("last step %d: loss %.4f, %.0f tokens/s", last["step"], last["loss"], last["tokens_per_s"])
    print(f"training finished: last checkpoint {ckpt} (run directory {job.run_dir})")
    return result


def _last_metrics(job: TrainJob) -> Optional[Dict[str, Any]]:
    path = os.path.join(job.run_dir, "metrics.jsonl")
    if not job.local or not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def _watch_progress(job: TrainJob, stop: threading.Event) -> None:
    """Driver-side progress bar from rank 0's progress file (workers' logs stay in Ray's folder)."""

    path = os.path.join(job.run_dir, PROGRESS_FILE)
    t = job.train
    end = min(t.max_steps, t.stop_after_steps or t.max_steps)
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


# CPUs kept free for the Ray Data tasks that list and read the training rows (file listing takes a
# whole CPU): without them a CPU cluster whose workers hold every CPU waits forever.
DATA_READ_CPUS = 1.0


def worker_resources(job: TrainJob) -> Dict[str, float]:
    """Resources per worker: the configured ones, else one GPU (GPU runs) or a CPU share that leaves
    room for Ray Data's reads on a CPU cluster — with the worker's torch threads raised to match,
    so a 2-CPU laptop runs the default 2-worker config without hand-tuned fractions."""
    import ray

    s, t = job.scaling, job.train
    if s.resources_per_worker:
        return dict(s.resources_per_worker)
    if s.use_gpu or s.autoscaling:
        return {"CPU": 1.0, **({"GPU": 1.0} if s.use_gpu else {})}
    total = float(ray.cluster_resources().get("CPU", 0.0))
    per = min(1.0, max(0.1, (total - DATA_READ_CPUS) / s.num_workers))
    if per < 1.0:
        if t.torch_threads is None:
            t.torch_threads = max(1, int(total // s.num_workers))
        log.info("training: %d workers × %.2f CPU on a %g-CPU cluster (%.1f CPU left for data reads; "
                 "%d torch threads each; scaling.resources_per_worker overrides)", s.num_workers, per, total,
                 DATA_READ_CPUS, t.torch_threads)
    return {"CPU": round(per, 3)}


def _fit(job: TrainJob):
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t, s = job.train, job.scaling
    resources = worker_resources(job)
    check_fits([dict(resources) for _ in range(s.num_workers)], f"training ({s.num_workers} workers × {resources})",
               "scaling.num_workers / scaling.resources_per_worker / scaling.use_gpu", str(s.placement_strategy),
               s.autoscaling)
    if job.local:
        try:
            os.remove(os.path.join(job.run_dir, PROGRESS_FILE))
        except FileNotFoundError:
            pass
    # Small read tasks: on a 2-CPU laptop the training workers hold every CPU.
    ds = ray.data.read_parquet(job.files, columns=list(COLUMNS), num_cpus=0.1)
    ds.context.enable_progress_bars = False  # per-worker bars flood job logs
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     placement_strategy=str(s.placement_strategy)),
        run_config=RunConfig(
            name=t.run_name, storage_path=t.output_dir,
            failure_config=FailureConfig(max_failures=t.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=t.num_to_keep),
        ),
        datasets={"train": ds},
        # Not split: each worker reads the ordered stream and keeps its own slice (see train_worker).
        dataset_config=DataConfig(datasets_to_split=[], execution_options=ExecutionOptions(preserve_order=True)),
    )
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(job, stop), daemon=True)
    if job.local:
        watcher.start()
    try:
        with pending_watch(s.pending_timeout_s, "training", "scaling.num_workers / scaling.resources_per_worker"):
            return trainer.fit()
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=5)


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.train", sys.argv[1:]))
