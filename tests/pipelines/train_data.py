"""Synthetic packed training data in exactly the data job's output format (manifest + Parquet shards).

Samples are learnable (the response counts upwards token by token), so a few steps of the tiny
model visibly reduce the loss. Used by the training tests and the throughput benchmark.
"""

import json
import os
from typing import List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def make_sample(rng: np.random.Generator, bos: int, lo: int, hi: int) -> Tuple[List[int], List[int]]:
    """(input_ids, labels): BOS + random prompt (no loss) + counting response (loss)."""
    p, r = int(rng.integers(3, 9)), int(rng.integers(4, 12))
    prompt = rng.integers(lo, hi, size=p).tolist()
    start = int(rng.integers(lo, hi))
    resp = [lo + (start - lo + i) % (hi - lo) for i in range(r)]
    return [bos] + prompt + resp, [-100] * (1 + p) + resp


def write_packed_data(out_dir: str, tokenizer, fingerprint: str, num_rows: int = 64, max_seq_len: int = 64,
                      rows_per_shard: int = 32, seed: int = 0, agent_fraction: float = 0.3) -> str:
    """Pack samples greedily into rows of max_seq_len; write part-*.parquet + manifest.json."""
    rng = np.random.default_rng(seed)
    pad = tokenizer.pad_token_id
    lo, hi = 10, min(len(tokenizer), 200)
    rows, n_agent, n_samples, real = [], 0, 0, 0
    while len(rows) < num_rows:
        ids, labels, pos, groups = [], [], [], []
        while True:
            s_ids, s_labels = make_sample(rng, tokenizer.bos_token_id, lo, hi)
            if len(ids) + len(s_ids) > max_seq_len:
                break
            g = 0 if rng.random() < agent_fraction else 1  # group_ids: 0 = agent, 1 = general
            n_agent += g == 0
            n_samples += 1
            ids += s_ids
            labels += s_labels
            pos += list(range(len(s_ids)))
            groups += [g] * len(s_ids)
        real += len(ids)
        fill = max_seq_len - len(ids)
        rows.append({"input_ids": ids + [pad] * fill, "labels": labels + [-100] * fill,
                     "position_ids": pos + [0] * fill, "group_ids": groups + [-1] * fill})
    os.makedirs(out_dir, exist_ok=True)
    for i in range(0, num_rows, rows_per_shard):
        chunk = rows[i:i + rows_per_shard]
        table = pa.table({k: pa.array([r[k] for r in chunk], type=pa.list_(pa.int32())) for k in chunk[0]})
        pq.write_table(table, os.path.join(out_dir, f"part-{i // rows_per_shard:05d}.parquet"))
    manifest = {
        "max_seq_len": max_seq_len, "pad_token_id": pad, "num_rows": num_rows, "seed": seed,
        "tokenizer": {"name_or_path": tokenizer.name_or_path, "fingerprint": fingerprint},
        "eta_target": agent_fraction, "eta_actual": n_agent / max(n_samples, 1),
        "packing_efficiency": real / (num_rows * max_seq_len),
        "sources": {"synthetic": {"samples": n_samples}}, "rejected": {},
    }
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return out_dir
