"""Throughput of the Ray Train + DeepSpeed job against a plain single-process PyTorch loop.

    python bench/train_throughput.py [--steps 40] [--seq 256] [--batch 4] [--zero 0]

Same tiny Llama, same packed rows, same step count, same loss (global token mean), one thread per
trainer. Ours: 1 Ray Train worker (1 CPU) with DeepSpeed; baseline: the loop below; TRL's
SFTTrainer too when `trl` is importable. Steady-state tokens/s excludes the first logged window
(start-up); the job's start-up time is printed separately.
Last line: RESULT overhead_vs_plain=<ours_step_time/plain_step_time - 1> ...
"""

import argparse
import json
import logging
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests", "pipelines"))  # the synthetic packed-data writer

log = logging.getLogger("bench.train_throughput")


def plain_loop(model_dir: str, data_dir: str, steps: int, batch: int, lr: float) -> float:
    """Tokens/s of a single-process loop over the same rows (after one warm-up step)."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from pipelines.train_utils import lr_lambda, packed_forward

    torch.set_num_threads(1)
    table = pq.read_table([os.path.join(data_dir, f) for f in sorted(os.listdir(data_dir)) if f.endswith(".parquet")])
    cols = {k: torch.tensor(table.column(k).to_pylist(), dtype=torch.long)
            for k in ("input_ids", "labels", "position_ids", "group_ids")}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, 0, 0.1))
    n_rows = cols["input_ids"].shape[0]
    tokens, t0 = 0, None
    for step in range(steps):
        if step == 1:
            t0, tokens = time.perf_counter(), 0
        idx = torch.arange(step * batch, (step + 1) * batch) % n_rows
        b = {k: v[idx] for k, v in cols.items()}
        out = packed_forward(model, b)
        (out["sum_ce"] / out["n_sup"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        tokens += int((b["group_ids"] >= 0).sum())
    return tokens / (time.perf_counter() - t0)


def ours(model_dir: str, data_dir: str, out: str, steps: int, batch: int, lr: float, zero: int,
         log_every: int = 10):
    """(steady tokens/s, wall seconds incl. start-up) of pipelines.train with one worker."""
    import ray

    from pipelines import train
    from agenttuning.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "train_tiny_cpu.yaml"), [
        f"model.name_or_path={model_dir}", "model.tiny.enabled=false", f"train.data_dir={data_dir}",
        f"train.output_dir={out}", f"train.max_steps={steps}", f"train.global_batch_size={batch}",
        f"train.micro_batch_size={batch}", "train.warmup_steps=0", f"train.lr={lr}", f"train.zero_stage={zero}",
        f"train.log_every={log_every}", f"train.save_every={steps}", "scaling.num_workers=1",
        "scaling.resources_per_worker={CPU: 1}", "wandb.mode=disabled"])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        train.main(cfg)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    metrics = [json.loads(line) for line in open(os.path.join(out, "tiny-cpu", "metrics.jsonl"))]
    # Skip the first window (start-up, first batch) and the last (checkpoint save).
    steady = [m["tokens_per_s"] for m in metrics if log_every < m["step"] < steps]
    # Harmonic mean of per-step rates = total tokens / total time for equal-sized steps.
    return len(steady) / sum(1.0 / r for r in steady), wall


def trl_baseline() -> str:
    try:
        import trl  # noqa: F401
    except ImportError:
        return "not installed (skipped)"
    return "installed but not wired for packed position_ids rows (skipped)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rows", type=int, default=0, help="packed rows; 0 = one epoch (steps × batch)")
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    # One epoch by default: each new epoch restarts the Ray Data read, a fixed cost that a real run
    # (2000 steps over one pass) pays rarely but that would dominate a 60-step benchmark.
    args.rows = args.rows or args.steps * args.batch
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from agenttuning.chat import load_tokenizer, tokenizer_fingerprint
    from agenttuning.config import TinyModelConfig
    from agenttuning.models import build_tiny_model
    from train_data import write_packed_data

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        model_dir = build_tiny_model(os.path.join(tmp, "model"), TinyModelConfig(enabled=True))
        tok = load_tokenizer(model_dir)
        data_dir = write_packed_data(os.path.join(tmp, "data"), tok, tokenizer_fingerprint(tok),
                                     num_rows=args.rows, max_seq_len=args.seq)
        plain = plain_loop(model_dir, data_dir, args.steps, args.batch, args.lr)
        mine, wall = ours(model_dir, data_dir, os.path.join(tmp, "out"), args.steps, args.batch, args.lr, args.zero)
    overhead = plain / mine - 1.0  # = ours_step_time / plain_step_time - 1
    print(f"plain PyTorch loop : {plain:10.1f} tokens/s")
    print(f"Ray Train+DeepSpeed: {mine:10.1f} tokens/s (ZeRO-{args.zero}, 1 worker; job wall {wall:.1f}s incl. start-up)")
    print(f"TRL SFTTrainer     : {trl_baseline()}")
    print(f"ratio ours/plain   : {mine / plain:.3f}")
    print(f"RESULT overhead_vs_plain={overhead:.4f} ours_tokens_per_s={mine:.1f} plain_tokens_per_s={plain:.1f} "
          f"job_wall_s={wall:.1f}")


if __name__ == "__main__":
    main()
