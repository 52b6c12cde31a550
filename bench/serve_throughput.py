"""Model-server throughput with and without continuous batching, and evaluation concurrency.

1. Generated tokens/s of the OpenAI-compatible server (serve.llm HF backend behind
   serve.openai_api, a real HTTP server on 127.0.0.1) at client concurrency 1/4/16, with
   batching (``max_batch_size=16``) against the same server without batching
   (``max_batch_size=1``, one request at a time) — the baseline, measured in the same run.
   Clients: the official ``openai`` async client, greedy, fixed ``max_tokens``; tokens are the
   server-reported ``usage.completion_tokens``.
2. Evaluation wall time of the DBBench dev suite (``pipelines.evaluate`` through Ray Serve:
   rollout deployment + model deployment, tiny model policy) at concurrency 8 against serial
   (concurrency 1), the same deployment for both.

    python bench/serve_throughput.py [--model PATH] [--requests 32] [--max-tokens 48] [--db-limit 60]

Last line: RESULT batching_ratio_c16=<batched/unbatched tokens/s> eval_speedup_c8=<x>
"""

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PROMPTS = ["List the files in the current directory.", "How many rows does the table have?",
           "Find the largest value in column price.", "Explain what a SQL JOIN does, step by step."]


async def _load(base_url: str, concurrency: int, n_requests: int, max_tokens: int) -> Dict[str, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        async with sem:
            r = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}],
                max_tokens=max_tokens, temperature=0)
            tokens += r.usage.completion_tokens

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n_requests)))
    wall = time.perf_counter() - t0
    await client.close()
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def bench_batching(model: str, n_requests: int, max_tokens: int, threads: int) -> Dict[str, Dict[str, float]]:
    from serve.llm import HFBackend
    from serve.openai_api import build_openai_app, run_local_server

    out: Dict[str, Dict[str, float]] = {}
    for label, width in (("unbatched", 1), ("batched", 16)):
        backend = HFBackend(model, model_id="bench", max_batch_size=width, torch_threads=threads)
        with run_local_server(build_openai_app(backend)) as url:
            asyncio.run(_load(url, 2, 4, 8))  # warm-up
            for c in (1, 4, 16):
                # Same total work per point; at least 2 waves of the concurrency.
                r = asyncio.run(_load(url, c, max(n_requests, 2 * c), max_tokens))
                out[f"{label}_c{c}"] = r
                print(f"{label:9s} concurrency {c:2d}: {r['tokens_per_s']:8.1f} tokens/s "
                      f"({r['tokens']} tokens in {r['wall_s']:.2f}s)", flush=True)
        backend.engine.close()
    return out


def bench_eval(model: str, db_limit: int, out_dir: str) -> Dict[str, float]:
    import yaml

    import ray
    from ray import serve

    from agenttuning.config import load_config
    from agenttuning.paths import data_file
    from pipelines.evaluate import main as evaluate
    from serve.openai_api import free_port

    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", num_cpus=2, include_dashboard=False,
             log_to_driver=False)
    walls = {}
    try:
        for i, conc in enumerate((8, 1)):
            doc = {"model": {"name_or_path": model},
                   "serve": {"num_cpus": 0, "torch_threads": 1, "port": free_port(), "max_batch_size": 8,
                             "rollout": {"num_cpus": 0, "max_ongoing_requests": 16}},
                   "wandb": {"mode": "disabled"},
                   "eval": {"output_dir": os.path.join(out_dir, f"c{conc}"), "concurrency": conc, "plot": False,
                            "deploy": i == 0, "teardown": False, "resume": False,
                            "tasks": [{"name": "db", "env": "db", "limit": db_limit,
                                       "path": data_file("agentbench/dbbench_dev.jsonl")}],
                            "policies": {"tiny": {"kind": "model", "max_tokens": 48}}}}
            path = os.path.join(out_dir, f"c{conc}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(doc, f)
            report = evaluate(load_config(path))
            walls[conc] = report["wall_s"]
            print(f"eval DB dev ({report['policies']['tiny']['tasks']['db']['n']} episodes) concurrency {conc}: "
                  f"{walls[conc]:.2f}s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"wall_c8_s": walls[8], "wall_serial_s": walls[1], "speedup_c8": walls[1] / walls[8]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: build the tiny Llama)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of the server")
    ap.add_argument("--db-limit", type=int, default=60)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = tempfile.mkdtemp(prefix="serve_bench_")
    model = args.model
    if model is None:
        from agenttuning.config import TinyModelConfig
        from agenttuning.models import build_tiny_model

        model = build_tiny_model(os.path.join(tmp, "tiny"), TinyModelConfig(enabled=True))
    try:
        tput = bench_batching(model, args.requests, args.max_tokens, args.threads)
        ev = bench_eval(model, args.db_limit, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {c: tput[f"batched_c{c}"]["tokens_per_s"] / tput[f"unbatched_c{c}"]["tokens_per_s"] for c in (1, 4, 16)}
    for c, r in ratios.items():
        print(f"batched/unbatched tokens/s at concurrency {c:2d}: {r:.2f}x")
    print(f"eval DB dev: concurrency 8 vs serial: {ev['speedup_c8']:.2f}x "
          f"({ev['wall_serial_s']:.1f}s -> {ev['wall_c8_s']:.1f}s)")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "serve_throughput.json"), "w") as f:
        json.dump({"throughput": tput, "batching_ratios": ratios, "eval": ev, "args": vars(args),
                   "cpus": os.cpu_count()}, f, indent=2)
    print(f"RESULT batching_ratio_c16={ratios[16]:.2f} eval_speedup_c8={ev['speedup_c8']:.2f}")


if __name__ == "__main__":
    main()
