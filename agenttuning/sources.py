"""Data sources: AgentInstruct, ShareGPT and OpenAI-messages records from local files or the hub.

Every record becomes a row ``{source, group, sid, origin, raw, reject}``: ``raw`` is the record's
JSON text (kept so a rejected record is written out unchanged), ``origin`` is ``file:line`` (or
``hub-id[split]#row``), ``sid`` a stable 64-bit id (source index << 40 | record index) used for
deterministic mixing, and ``reject`` a reason when the record is already known to be bad
(malformed JSON, invalid UTF-8). Conversion to chat messages and its validation happen in
``to_messages``, called by the data job's tokenize stage.
"""

import glob
import json
import logging
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Tuple

from agenttuning.chat import ChatError
from agenttuning.config import ConfigError

log = logging.getLogger(__name__)

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Speaker names seen in the wild → our roles. ShareGPT dumps use human/gpt (and a few others).
_ROLE_ALIASES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
    "bing": "assistant", "model": "assistant",
    "system": "system",
}


class SourceError(ConfigError):
    """A data source that cannot be read (raised before any Ray work starts)."""


def resolve(src) -> Tuple[str, List[str]]:
    """('files', [paths]) for local data or ('hub', [hub_id]); SourceError naming the path otherwise."""
    path = src.path
    if os.path.isfile(path):
        return "files", [path]
    if os.path.isdir(path):
        files = sorted(
            f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True) if f.endswith(DATA_EXTENSIONS)
        )
        if src.split:  # hub-style folders keep one split per file: data/<split>-00000-of-00001.parquet
            files = [f for f in files if os.path.basename(f).startswith(src.split)]
        if not files:
            raise SourceError(
                f"source '{src.name}': no {'/'.join(DATA_EXTENSIONS)} files"
                + (f" for split '{src.split}'" if src.split else "")
                + f" under {path}"
            )
        return "files", files
    if _HUB_ID.match(path) and not path.endswith(DATA_EXTENSIONS):
        return "hub", [path]
    raise SourceError(
        f"source '{src.name}': path '{path}' does not exist (expected a local .jsonl/.json/.parquet "
        "file or folder, or a hub id such as THUDM/AgentInstruct)"
    )


def iter_file(path: str, data: bytes) -> Iterator[Tuple[str, str, str]]:
    """(origin, raw JSON text, reject reason or '') for each record of one file's bytes."""
    if path.endswith(".parquet"):
        import io

        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(io.BytesIO(data)).to_pylist()):
            yield f"{path}#{i}", json.dumps(rec, ensure_ascii=False, default=str), ""
        return
    if path.endswith(".json"):
        try:
            recs = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            yield f"{path}", data[:2000].decode("utf-8", "replace"), f"malformed_json: {exc}"
            return
        for i, rec in enumerate(recs if isinstance(recs, list) else [recs]):
            yield f"{path}#{i}", json.dumps(rec, ensure_ascii=False), ""
        return
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield f"{path}:{lineno}", line.decode("utf-8", "replace"), f"invalid_utf8: {exc}"
            continue
        # JSON is parsed (and malformed lines rejected) by the parallel tokenize stage, not here:
        # one file is one read task, and parsing twice would serialise the whole corpus.
        yield f"{path}:{lineno}", text, ""


def _row(src, sid: int, origin: str, raw: str, reject: str) -> Dict[str, Any]:
    return {"source": src.name, "group": src.group, "sid": sid, "origin": origin, "raw": raw, "reject": reject}


def read_source(src, src_idx: int):
    """A Ray Dataset of raw record rows for one source (local files or a hub dataset)."""
    import ray

    kind, paths = resolve(src)
    if kind == "hub":
        import datasets

        hf = datasets.load_dataset(paths[0], split=src.split or "train")
        if src.limit:
            hf = hf.select(range(min(src.limit, len(hf))))
        name = f"{paths[0]}[{src.split or 'train'}]"
        hf = hf.map(lambda rec, i: {"_raw": json.dumps(rec, ensure_ascii=False, default=str), "_i": i},
                    with_indices=True, remove_columns=hf.column_names)
        return ray.data.from_huggingface(hf).map(
            lambda r: _row(src, (src_idx << 40) | int(r["_i"]), f"{name}#{r['_i']}", r["_raw"], "")
        )

    # One task per file keeps line numbers exact (for the rejects file) and the order stable.
    files = ray.data.read_binary_files(paths, include_paths=True, shuffle=None)

    def explode(row: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
        # sid = source | file | record index: unique and stable whatever order tasks finish in.
        base = (src_idx << 40) | (paths.index(row["path"]) << 28)
        for i, (origin, raw, reject) in enumerate(iter_file(row["path"], row["bytes"])):
            yield _row(src, base | i, origin, raw, reject)

    ds = files.flat_map(explode)
    return ds.limit(src.limit) if src.limit else ds


def iter_local(src, limit: Optional[int] = None) -> Iterator[Tuple[str, str, str]]:
    """Records of a local source without Ray (used by `data preview`)."""
    kind, paths = resolve(src)
    if kind == "hub":
        raise SourceError(f"source '{src.name}': preview reads local files only")
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            for rec in iter_file(p, f.read()):
                yield rec
                n += 1
                if limit and n >= limit:
                    return


def iter_text(paths: List[str]) -> Iterator[str]:
    """Every string in the given files: lines of .txt (skipping '# ' comments), and every string
    value, however nested, of .jsonl/.json records. Used for tokenizer corpora and decontamination."""
    for p in paths:
        with open(p, encoding="utf-8") as f:
            if not p.endswith((".jsonl", ".json")):
                yield from (line for line in f if not line.startswith("# "))
                continue
            recs = [json.loads(line) for line in f if line.strip()] if p.endswith(".jsonl") else json.load(f)
            stack = list(recs if isinstance(recs, list) else [recs])
            while stack:
                x = stack.pop()
                if isinstance(x, str):
                    yield x
                elif isinstance(x, dict):
                    stack.extend(x.values())
                elif isinstance(x, list):
                    stack.extend(x)


def to_messages(fmt: str, record: Any) -> List[Dict[str, Any]]:
    """Chat messages of one record; ChatError(reason) for missing fields and unknown roles."""
    if fmt == "openai":
        msgs = record.get("messages") if isinstance(record, dict) else record
        if not isinstance(msgs, list):
            raise ChatError("missing_field", "expected a 'messages' list (or a list of {role, content})")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ChatError("missing_field", f"messages[{i}] lacks 'role' or 'content'")
            out.append({"role": m["role"], "content": m["content"], **({"loss": m["loss"]} if "loss" in m else {})})
        return out
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ChatError("missing_field", "expected a 'conversations' list")
    out = []
    for i, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ChatError("missing_field", f"conversations[{i}] lacks 'from' or 'value'")
        role = _ROLE_ALIASES.get(str(turn["from"]).lower())
        if role is None:
            raise ChatError("unknown_role", f"conversations[{i}].from = {turn['from']!r}")
        msg = {"role": role, "content": turn["value"]}
        if fmt == "agentinstruct" and "loss" in turn and turn["loss"] is not None:
            msg["loss"] = bool(turn["loss"])
        out.append(msg)
    return out
