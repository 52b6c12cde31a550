"""Data pipeline throughput: our full Ray Data job against `datasets.map(batched=True, num_proc=2)`.

Both sides do the same render + tokenize + mask work per record (the baseline calls our
`tokenize_batch` UDF on the same raw rows); ours additionally validates, dedups, mixes, packs,
shuffles and writes Parquet. Tokens/s are over the tokenized (pre-packing) tokens.

    python bench/data_pipeline.py [--samples 200000] [--scale 0.5]

Last line: RESULT ratio=<ours/baseline> packing_efficiency=<x>
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from agenttuning.config import TinyModelConfig, load_config  # noqa: E402
from pipelines.synthetic import agentinstruct_records, sharegpt_records, write_jsonl  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def baseline(path: str, model: dict, max_seq_len: int) -> tuple:
    """datasets.map(batched=True, num_proc=2) running the same per-record work."""
    import datasets
    import pyarrow as pa

    from pipelines.data import tokenize_batch
    from agenttuning.sources import iter_file

    with open(path, "rb") as f:
        rows = [{"source": "g", "group": "general", "sid": i, "origin": o, "raw": raw, "reject": rej}
                for i, (o, raw, rej) in enumerate(iter_file(path, f.read()))]
    ds = datasets.Dataset.from_list(rows)

    def fn(batch):
        t = tokenize_batch(pa.Table.from_pydict(batch), model=model, formats={"g": "sharegpt"},
                           max_seq_len=max_seq_len, overlong="truncate", ngram_ref=None, ngram=10, threshold=0.8)
        return {"n_tokens": t.column("n_tokens").to_pylist(), "input_ids": t.column("input_ids").to_pylist(),
                "labels": t.column("labels").to_pylist()}

    t0 = time.perf_counter()
    out = ds.map(fn, batched=True, batch_size=256, num_proc=2, remove_columns=ds.column_names)
    dt = time.perf_counter() - t0
    return sum(out["n_tokens"]), dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--scale", type=float, default=0.5, help="length scale of generated records")
    ap.add_argument("--max-seq-len", type=int, default=4096)
    args = ap.parse_args()

    import ray

    from pipelines.data import main as data_main
    from agenttuning.models import build_tiny_model

    work = os.path.join(RESULTS, "data_pipeline")
    os.makedirs(work, exist_ok=True)
    model_dir = os.path.join(work, "tiny")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_tiny_model(model_dir, TinyModelConfig())
    n_agent = args.samples // 10
    gen_path, agent_path = os.path.join(work, "sharegpt.jsonl"), os.path.join(work, "agent.jsonl")
    write_jsonl(gen_path, sharegpt_records(args.samples, seed=0, scale=args.scale))
    write_jsonl(agent_path, agentinstruct_records(n_agent, seed=0, scale=args.scale))

    model = {"name_or_path": model_dir, "chat_template": "llama2", "trust_remote_code": False,
             "system_prompt": "You are a helpful, respectful and honest assistant."}
    base_tokens, base_s = baseline(gen_path, model, args.max_seq_len)

    # Ours: general corpus only at eta = 0 would skip mixing; use eta so every general sample is used once.
    eta = n_agent / (n_agent + args.samples)
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", f"data.max_seq_len={args.max_seq_len}", f"data.eta={eta}",
        f"data.output_dir={os.path.join(work, 'out')}", "data.decontamination.enabled=false",
        f"data.sources=[{{name: sharegpt, group: general, format: sharegpt, path: {gen_path}}},"
        f"{{name: agent, group: agent, format: agentinstruct, path: {agent_path}}}]",
    ])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        m = data_main(cfg)
        ours_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    ours_general_tokens = m["sources"]["sharegpt"]["tokens"]
    ours_tps = m["num_tokens"] / ours_s
    base_tps = base_tokens / base_s
    result = {
        "samples": args.samples + n_agent, "scale": args.scale, "max_seq_len": args.max_seq_len,
        "ours_seconds": ours_s, "ours_tokens": m["num_tokens"], "ours_tokens_per_s": ours_tps,
        "baseline": "datasets.map(batched=True, num_proc=2)", "baseline_seconds": base_s,
        "baseline_tokens": base_tokens, "baseline_tokens_per_s": base_tps,
        "general_tokens_check": [ours_general_tokens, base_tokens],
        "ratio": ours_tps / base_tps, "packing_efficiency": m["packing_efficiency"], "num_rows": m["num_rows"],
    }
    with open(os.path.join(RESULTS, "data_pipeline.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    print(f"RESULT ratio={result['ratio']:.3f} packing_efficiency={result['packing_efficiency']:.4f}")


if __name__ == "__main__":
    main()
