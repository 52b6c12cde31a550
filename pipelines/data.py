"""The mixed instruction dataset on Ray Data (`agenttuning data CONFIG`).

    read → validate → render/tokenize/mask (+ n-gram contamination score) → materialize
    → [driver, metadata only] reject counts, exact-duplicate removal, η-mix plan, global
      best-fit-decreasing packing plan, seeded row order
    → emit planned sample copies → group into packed rows → sort by row → Parquet + manifest.json

Tokens only ever move through Ray Data; the driver sees per-record metadata (ids, lengths, hashes).
Same config and seed → byte-identical shards.

    agenttuning data preview CONFIG    # a rendered sample per source, supervised spans in ⟦…⟧
"""

import functools
import json
import logging
import os
import shutil
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np
from omegaconf import DictConfig

from agenttuning.chat import (
    IGNORE_INDEX,
    ChatError,
    labels_from_offsets,
    load_tokenizer,
    normalize_messages,
    preview,
    render,
    tokenizer_fingerprint,
)
from agenttuning.cluster import ray_session
from agenttuning.config import ConfigError, SourceConfig, to_dict, to_object
from agenttuning.models import ensure_model
from agenttuning.sources import iter_local, iter_text, read_source, resolve, to_messages
from pipelines import mixing

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model', 'data', 'train')  # what `--help` lists (train: data.size_by=schedule)

GROUP_ID = {"agent": 0, "general": 1}


@functools.lru_cache(maxsize=4)
def _tokenizer(name_or_path: str, chat_template: str, trust_remote_code: bool):
    # Cached per worker process: Ray reuses workers, so each loads the tokenizer once.
    return load_tokenizer(name_or_path, chat_template, trust_remote_code)


def tokenize_batch(batch, *, model: Dict[str, Any], formats: Dict[str, str], max_seq_len: int,
                   overlong: str, ngram_ref, ngram: int, threshold: float):
    """Ray Data UDF: raw record rows → tokenized samples (or rejects with a reason)."""
    import pyarrow as pa

    tok = _tokenizer(model["name_or_path"], model["chat_template"], model["trust_remote_code"])
    if ngram_ref is not None and not isinstance(ngram_ref, np.ndarray):
        import ray

        ngram_ref = ray.get(ngram_ref)
    rows = batch.to_pylist()
    texts, spans, owners = [], [], []
    for i, r in enumerate(rows):
        r.update(input_ids=[], labels=[], n_tokens=0, n_sup=0, truncated=False, hash=0, overlap=0.0)
        if r["reject"]:
            continue
        try:
            record = json.loads(r["raw"])
        except json.JSONDecodeError as exc:
            r["reject"] = f"malformed_json: {exc}"
            continue
        try:
            msgs = normalize_messages(to_messages(formats[r["source"]], record), model["system_prompt"])
            if msgs[-1]["role"] != "assistant":
                raise ChatError("no_final_assistant", "the conversation does not end with an assistant turn")
            text, sp = render(tok, msgs)
        except ChatError as exc:
            r["reject"] = str(exc)
            continue
        body = "\n".join(m["content"] for m in msgs if m["role"] != "system")
        r["hash"] = mixing.stable_hash64(json.dumps([[m["role"], m["content"]] for m in msgs], ensure_ascii=False))
        if ngram_ref is not None and len(ngram_ref):
            r["overlap"] = mixing.overlap_fraction(body, ngram_ref, ngram)
            if r["overlap"] > threshold:
                r["reject"] = f"contaminated: {r['overlap']:.0%} of words in {ngram}-grams of evaluation data"
                continue
        texts.append(text)
        spans.append(sp)
        owners.append(i)
    if texts:
        # One batched call: the fast tokenizer parallelises in Rust.
        enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        for i, ids, offs, sp in zip(owners, enc["input_ids"], enc["offset_mapping"], spans):
            r = rows[i]
            labels = labels_from_offsets(ids, offs, sp)
            if len(ids) > max_seq_len:
                if overlong == "reject":
                    r["reject"] = f"overlong: {len(ids)} tokens > max_seq_len {max_seq_len}"
                    continue
                ids, labels, r["truncated"] = ids[:max_seq_len], labels[:max_seq_len], True
            n_sup = sum(1 for x in labels if x != IGNORE_INDEX)
            if n_sup == 0:
                r["reject"] = ("overlong: no supervised token within max_seq_len" if r["truncated"]
                               else "no_supervised_tokens: every assistant turn has loss: false")
                continue
            r.update(input_ids=ids, labels=labels, n_tokens=len(ids), n_sup=n_sup)
    for r in rows:
        if not r["reject"]:
            r["raw"] = ""  # valid records carry tokens; raw text is kept for rejects only
    schema = pa.schema([
        ("source", pa.string()), ("group", pa.string()), ("sid", pa.int64()), ("origin", pa.string()),
        ("raw", pa.string()), ("reject", pa.string()), ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())), ("n_tokens", pa.int32()), ("n_sup", pa.int32()),
        ("truncated", pa.bool_()), ("hash", pa.int64()), ("overlap", pa.float32()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def emit_copies(batch, *, plan_ref, rows_per_shard: int):
    """Ray Data UDF: each planned sample once per (row, position) it was assigned to."""
    import pyarrow as pa
    import ray

    plan: Dict[int, List[List[int]]] = ray.get(plan_ref) if not isinstance(plan_ref, dict) else plan_ref
    take, rows, pos = [], [], []
    for i, sid in enumerate(batch.column("sid").to_pylist()):
        for row, p in plan.get(sid, ()):
            take.append(i)
            rows.append(row)
            pos.append(p)
    # Arrow take: token lists are copied in C++, never through Python objects.
    out = batch.select(["group", "input_ids", "labels"]).take(pa.array(take, type=pa.int64()))
    rows_a = np.asarray(rows, dtype=np.int64)
    return out.append_column("row", pa.array(rows_a)).append_column(
        "shard", pa.array(rows_a // rows_per_shard)).append_column("pos", pa.array(np.asarray(pos, dtype=np.int32)))


def write_shard(group: Dict[str, np.ndarray], *, out: str, max_seq_len: int, pad_id: int) -> Dict[str, np.ndarray]:
    """Ray Data UDF (map_groups by shard): pack this shard's rows and write them as one Parquet file.

    position_ids restart at 0 at each sample; group_ids mark agent(0)/general(1)/padding(-1); each
    sample's first label is -100 so no loss crosses a sample boundary. Rows are in plan order and
    the file is written in one row group, so a rerun writes byte-identical files.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    shard = int(group["shard"][0])
    rows = np.unique(group["row"])  # sorted
    n_rows = len(rows)
    ids = np.full((n_rows, max_seq_len), pad_id, dtype=np.int32)
    labels = np.full((n_rows, max_seq_len), IGNORE_INDEX, dtype=np.int32)
    pos_ids = np.zeros((n_rows, max_seq_len), dtype=np.int32)
    gids = np.full((n_rows, max_seq_len), -1, dtype=np.int8)
    n_samples = np.zeros(n_rows, dtype=np.int32)
    fill = np.zeros(n_rows, dtype=np.int64)
    row_index = np.searchsorted(rows, group["row"])
    for k in np.lexsort((group["pos"], group["row"])):  # by row, then position in row
        r, n = row_index[k], fill[row_index[k]]
        x = np.asarray(group["input_ids"][k], dtype=np.int32)
        y = np.asarray(group["labels"][k], dtype=np.int32).copy()
        y[0] = IGNORE_INDEX
        ids[r, n : n + len(x)], labels[r, n : n + len(x)] = x, y
        pos_ids[r, n : n + len(x)] = np.arange(len(x), dtype=np.int32)
        gids[r, n : n + len(x)] = GROUP_ID[str(group["group"][k])]
        fill[r] += len(x)
        n_samples[r] += 1
    table = pa.table({
        "input_ids": ArrowTensorArray.from_numpy(ids), "labels": ArrowTensorArray.from_numpy(labels),
        "position_ids": ArrowTensorArray.from_numpy(pos_ids), "group_ids": ArrowTensorArray.from_numpy(gids),
        "num_samples": n_samples, "num_tokens": fill.astype(np.int32),
    })
    name = f"part-{shard:05d}.parquet"
    # On a multi-node cluster output_dir must be shared storage (NFS/EFS/Filestore) seen by all nodes.
    pq.write_table(table, os.path.join(out, name), row_group_size=n_rows)
    return {"shard": np.array([shard]), "rows": np.array([n_rows]), "tokens": np.array([int(fill.sum())])}


def _check_sources(cfg: DictConfig) -> List[SourceConfig]:
    """Resolve every source before Ray starts: a missing path fails here, naming it."""
    if not cfg.data.sources:
        raise ConfigError("config key 'data.sources': no data sources configured")
    sources = list(to_object(cfg.data.sources))
    for s in sources:
        resolve(s)
    groups = {s.group for s in sources}
    if cfg.data.repeat_warning <= 0:
        raise ConfigError(f"config key 'data.repeat_warning': must be > 0, got {cfg.data.repeat_warning}")
    if cfg.data.eta > 0 and "agent" not in groups:
        raise ConfigError(f"config key 'data.eta': {cfg.data.eta} > 0 but no source has group 'agent'")
    if cfg.data.eta < 1 and "general" not in groups:
        raise ConfigError(f"config key 'data.eta': {cfg.data.eta} < 1 but no source has group 'general'")
    return sources


def _reference_ngrams(cfg: DictConfig) -> Optional[np.ndarray]:
    """n-gram hashes of every string in the evaluation files named by data.decontamination.paths."""
    dc = cfg.data.decontamination
    if not dc.enabled or not dc.paths:
        return None
    files: List[str] = []
    for p in dc.paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith((".json", ".jsonl", ".txt")))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ConfigError(f"config key 'data.decontamination.paths': {p} does not exist")
    ref = mixing.reference_ngrams(iter_text(files), dc.ngram)
    log.info("decontamination: %d distinct %d-grams from %d evaluation files", len(ref), dc.ngram, len(files))
    return ref


def plan(meta, sources: List[SourceConfig], cfg: DictConfig) -> Dict[str, Any]:
    """Dedup, η-mix and packing plan from per-record metadata (a pandas DataFrame).

    The output size is data.num_samples, else set by data.size_by: every agent (or general)
    sample once, or (schedule) enough samples to fill train.max_steps × train.global_batch_size
    packed rows — samples per row measured by packing a pilot mix of the same sources, then
    corrected on the real plan. Groups in data.natural_groups use every record equally often.
    """
    d = cfg.data
    valid = meta[meta["reject"] == ""].sort_values("sid", kind="stable")
    dup = valid.duplicated("hash", keep="first") if d.dedup else np.zeros(len(valid), dtype=bool)
    dup_sids = set(valid.loc[dup, "sid"].tolist())
    valid = valid[~dup]
    avail = {s.name: valid[valid["source"] == s.name] for s in sources}
    counts = {s.name: len(avail[s.name]) for s in sources}
    groups = {s.name: str(s.group) for s in sources}
    n_group = {g: sum(n for s, n in counts.items() if groups[s] == g) for g in GROUP_ID}
    natural = [str(g) for g in d.natural_groups]

    def build(total: int):
        want = {"agent": int(round(d.eta * total))}
        want["general"] = total - want["agent"]
        for g in GROUP_ID:
            if want[g] and not n_group[g]:
                raise ConfigError(f"config key 'data.eta': the mix needs {want[g]} '{g}' samples but none are valid")
        targets = mixing.mix_targets(counts, groups, {s.name: s.weight for s in sources}, natural, d.eta, total)
        # Every selected copy of a sample becomes one packing item.
        items_sid, items_len = [], []
        for idx, s in enumerate(sources):
            a = avail[s.name]
            copies = mixing.choose_copies(len(a), targets.get(s.name, 0), np.random.default_rng([d.seed, idx]))
            items_sid.append(np.repeat(a["sid"].to_numpy(), copies))
            items_len.append(np.repeat(a["n_tokens"].to_numpy(), copies))
        sids = np.concatenate(items_sid) if items_sid else np.zeros(0, np.int64)
        lens = np.concatenate(items_len) if items_len else np.zeros(0, np.int64)
        bins = mixing.pack_best_fit_decreasing(lens.tolist(), d.max_seq_len) if d.pack else [[i] for i in range(len(sids))]
        return targets, sids, lens, bins

    rows_target = None
    if d.num_samples is not None:
        targets, sids, lens, bins = build(d.num_samples)
    elif d.size_by == "schedule":
        rows_target = cfg.train.max_steps * cfg.train.global_batch_size
        # Pilot: the default mix (every agent sample once) measures samples per packed row.
        targets, sids, lens, bins = build(mixing.default_total(n_group["agent"], n_group["general"], d.eta, "agent"))
        for _ in range(3):  # the first estimate, then up to two corrections on the real plan
            if not bins or abs(len(bins) - rows_target) <= max(1, 0.002 * rows_target):
                break
            total = int(round(rows_target * len(sids) / len(bins)))
            if total == len(sids):
                break
            targets, sids, lens, bins = build(total)
    else:
        targets, sids, lens, bins = build(mixing.default_total(n_group["agent"], n_group["general"], d.eta, str(d.size_by)))
    # Seeded global shuffle of rows: row r gets number perm[r].
    perm = np.random.default_rng([d.seed, 1 << 20]).permutation(len(bins))
    assign: Dict[int, List[List[int]]] = {}
    for b, members in enumerate(bins):
        for pos, item in enumerate(members):
            assign.setdefault(int(sids[item]), []).append([int(perm[b]), pos])
    return {"targets": targets, "assign": assign, "num_rows": len(bins), "dup_sids": dup_sids, "items": (sids, lens),
            "valid": counts, "rows_target": rows_target}


def _write_rejects(rejects_ds, path: str) -> Counter:
    """Stream rejected records into one jsonl file; counts by reason."""
    counts: Counter = Counter()
    with open(path, "w", encoding="utf-8") as f:
        for r in rejects_ds.iter_rows():
            reason, _, detail = r["reject"].partition(": ")
            counts[reason] += 1
            f.write(json.dumps({"source": r["source"], "origin": r["origin"], "reason": reason,
                                "detail": detail, "record": r["raw"]}, ensure_ascii=False) + "\n")
    return counts


def main(cfg: DictConfig) -> Dict[str, Any]:
    """Build the dataset described by cfg.data; returns the manifest (also written to output_dir)."""
    import ray

    t0 = time.time()
    d = cfg.data
    sources = _check_sources(cfg)
    model_path = ensure_model(cfg)
    tok = load_tokenizer(model_path, cfg.model.chat_template, cfg.model.trust_remote_code)
    ref = _reference_ngrams(cfg)
    final = os.path.abspath(d.output_dir)
    if os.path.isdir(final) and os.listdir(final) and not d.overwrite:
        raise ConfigError(f"config key 'data.output_dir': {final} is not empty (set data.overwrite=true)")
    # Written in a sibling folder and renamed into place at the end: a job killed at any moment
    # never leaves a folder that a training job would read as a complete dataset.
    out = f"{final}.partial"
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)

    with ray_session():
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # determinism: same input order every run
        ctx.target_max_block_size = 16 * 1024 * 1024  # smaller blocks → tokenization runs in parallel
        model = {"name_or_path": model_path, "chat_template": cfg.model.chat_template,
                 "trust_remote_code": cfg.model.trust_remote_code, "system_prompt": cfg.model.system_prompt}
        raw = read_source(sources[0], 0)
        for i, s in enumerate(sources[1:], start=1):
            raw = raw.union(read_source(s, i))
        tokenized = raw.map_batches(
            tokenize_batch, batch_size=256, batch_format="pyarrow",
            fn_kwargs=dict(model=model, formats={s.name: s.format for s in sources}, max_seq_len=d.max_seq_len,
                           overlong=d.overlong, ngram_ref=ray.put(ref) if ref is not None else None,
                           ngram=d.decontamination.ngram, threshold=d.decontamination.threshold),
        ).materialize()
        meta = tokenized.select_columns(["source", "sid", "reject", "hash", "n_tokens", "n_sup", "truncated"]).to_pandas()
        p = plan(meta, sources, cfg)
        # The only all-to-all step: samples meet the other samples of their output shard.
        written = (
            tokenized.filter(expr="reject == ''")
            .map_batches(emit_copies, batch_format="pyarrow",
                         fn_kwargs={"plan_ref": ray.put(p["assign"]), "rows_per_shard": d.rows_per_shard})
            .groupby("shard")
            .map_groups(write_shard, batch_format="numpy",
                        fn_kwargs={"out": out, "max_seq_len": d.max_seq_len, "pad_id": tok.pad_token_id})
        )
        n_written = sum(r["rows"] for r in written.iter_rows()) if p["num_rows"] else 0
        if n_written != p["num_rows"]:
            raise RuntimeError(f"wrote {n_written} rows but planned {p['num_rows']}")
        rejected = _write_rejects(tokenized.filter(expr="reject != ''"), os.path.join(out, "rejects.jsonl"))
        if p["dup_sids"]:
            rejected["duplicate"] = len(p["dup_sids"])
            dups = tokenized.filter(lambda r, s=frozenset(p["dup_sids"]): r["sid"] in s)
            with open(os.path.join(out, "rejects.jsonl"), "a", encoding="utf-8") as f:
                for r in dups.select_columns(["source", "origin", "sid"]).iter_rows():
                    f.write(json.dumps({"source": r["source"], "origin": r["origin"], "reason": "duplicate",
                                        "detail": "exact duplicate of an earlier record", "record": None}) + "\n")
    if p["num_rows"] == 0:
        raise ConfigError(f"config key 'data.sources': no valid samples to write (see {out}/rejects.jsonl)")
    manifest = _manifest(cfg, sources, meta, p, rejected, tok, model_path, out)
    for name, ep in manifest["repeated"].items():
        v = manifest["sources"][name]
        log.warning("source %s: each of its %d records is used %.1f times on average (%d samples; "
                    "data.repeat_warning = %g): repetition this high risks memorising it", name, v["valid"], ep,
                    v["samples"], d.repeat_warning)
    manifest["rejects_file"] = os.path.join(final, "rejects.jsonl")
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    _publish(out, final)
    log.info("data job finished in %.1fs", time.time() - t0)
    _summary(manifest, final)
    return manifest


def _publish(staged: str, final: str) -> None:
    """Replace ``final`` by the complete ``staged`` folder (two renames; the old one is removed after)."""
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


def _manifest(cfg, sources, meta, p, rejected, tok, model_path, out) -> Dict[str, Any]:
    d = cfg.data
    sids, lens = p["items"]
    sup_by_sid = dict(zip(meta["sid"].tolist(), meta["n_sup"].tolist()))
    src_of = {i: s for i, s in enumerate(sources)}
    per_src: Dict[str, Dict[str, Any]] = {}
    for i, s in src_of.items():
        m = meta[meta["source"] == s.name]
        sel = (sids >> 40) == i
        per_src[s.name] = {
            "group": s.group, "format": s.format, "path": s.path, "weight": s.weight,
            "records": int(len(m)), "rejected": int((m["reject"] != "").sum()) + int(sum(1 for x in p["dup_sids"] if x >> 40 == i)),
            "truncated": int(m["truncated"].sum()), "target": int(p["targets"].get(s.name, 0)),
            "samples": int(sel.sum()), "tokens": int(lens[sel].sum()),
            "supervised_tokens": int(sum(sup_by_sid[int(x)] for x in sids[sel])),
            # Unique valid records, and how often each is used in the output on average (epochs).
            "valid": int(p["valid"][s.name]), "epochs": round(mixing.epochs(int(sel.sum()), p["valid"][s.name]), 4),
            "natural": str(s.group) in [str(g) for g in d.natural_groups],
        }
    n_agent = sum(v["samples"] for v in per_src.values() if v["group"] == "agent")
    n_total = int(len(sids))
    tokens = int(lens.sum())
    shards = sorted(f for f in os.listdir(out) if f.startswith("part-"))
    return {
        "format_version": 1,
        "columns": ["input_ids", "labels", "position_ids", "group_ids", "num_samples", "num_tokens"],
        "group_ids": {"agent": 0, "general": 1, "padding": -1},
        "tokenizer": {"name_or_path": model_path, "fingerprint": tokenizer_fingerprint(tok),
                      "chat_template": cfg.model.chat_template, "vocab_size": len(tok)},
        "pad_token_id": tok.pad_token_id,
        "max_seq_len": d.max_seq_len, "seed": d.seed, "packed": d.pack,
        "eta_target": d.eta, "eta_actual": (n_agent / n_total) if n_total else 0.0,
        "num_samples": n_total, "num_rows": p["num_rows"], "num_tokens": tokens,
        "num_supervised_tokens": sum(v["supervised_tokens"] for v in per_src.values()),
        "size_by": "num_samples" if d.num_samples is not None else str(d.size_by),
        "natural_groups": [str(g) for g in d.natural_groups],
        # size_by=schedule: the rows the training schedule consumes (train.max_steps × train.global_batch_size).
        "rows_target": p["rows_target"],
        "samples_per_row": n_total / p["num_rows"] if p["num_rows"] else 0.0,
        "repeat_warning": d.repeat_warning,
        "repeated": {k: v["epochs"] for k, v in per_src.items() if v["epochs"] > d.repeat_warning},
        "packing_efficiency": tokens / (p["num_rows"] * d.max_seq_len) if p["num_rows"] else 0.0,
        "sources": per_src,
        "rejected": dict(sorted(rejected.items())), "rejected_total": int(sum(rejected.values())),
        "rejects_file": os.path.join(out, "rejects.jsonl"),
        "shards": shards, "config": to_dict(cfg.data),
    }


def _summary(m: Dict[str, Any], out: str) -> None:
    print(f"data: {m['num_samples']} samples ({m['num_tokens']} tokens, {m['num_supervised_tokens']} supervised) "
          f"in {m['num_rows']} rows of {m['max_seq_len']}; eta {m['eta_actual']:.4f} (target {m['eta_target']}); "
          f"packing efficiency {m['packing_efficiency']:.4f}; rejected {m['rejected_total']} {m['rejected']}")
    target = f" (schedule: {m['rows_target']} rows)" if m.get("rows_target") else ""
    print("samples (× each record) by source: " + ", ".join(
        f"{k} {v['samples']} (×{v['epochs']:.2f})" for k, v in m["sources"].items())
        + f"; {m['samples_per_row']:.2f} samples per row{target}")
    print(f"outputs: {out}/ (manifest.json, {len(m['shards'])} parquet shards, rejects.jsonl)")


def preview_main(cfg: DictConfig, n: int = 1) -> None:
    """Print n rendered samples per source with supervised token runs marked ⟦…⟧."""

    tok = load_tokenizer(ensure_model(cfg), cfg.model.chat_template, cfg.model.trust_remote_code)
    for s in _check_sources(cfg):
        shown = 0
        for origin, raw, reject in iter_local(s):
            if reject:
                continue
            try:
                text = preview(tok, to_messages(s.format, json.loads(raw)), cfg.model.system_prompt)
            except (ChatError, json.JSONDecodeError):
                continue
            print(f"===== {s.name} ({s.group}) {origin} — supervised tokens in ⟦…⟧ =====\n{text}\n")
            shown += 1
            if shown >= n:
                break


# `agenttuning data preview CONFIG [k=v ...]`: a rendered sample per source, supervised tokens marked.
SUBCOMMANDS = {"preview": preview_main}


if __name__ == "__main__":
    from agenttuning.cli import run_job

    sys.exit(run_job("pipelines.data", sys.argv[1:]))
