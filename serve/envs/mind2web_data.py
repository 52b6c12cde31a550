"""Mind2Web records: reading (local files or the Hugging Face hub), validation, candidate ranks.

Record format (``osunlp/Mind2Web``, unchanged): ``annotation_id``, ``website``, ``domain``,
``subdomain``, ``confirmed_task``, ``action_reprs`` (one line per step, e.g.
``"[button]  Search -> CLICK"``) and ``actions``, one per step, each with ``action_uid``,
``cleaned_html``, ``operation`` (``{"op": "CLICK"|"TYPE"|"SELECT", "original_op", "value"}``),
``pos_candidates`` / ``neg_candidates`` (``{"tag", "backend_node_id", "attributes": <JSON
string>, ...}``). ``raw_html`` is dropped on reading (unused, and most of a record's size).

Candidate ranks (AgentBench's evaluation): Mind2Web's candidate generator (a DeBERTa ranker)
scores every candidate; its output ``scores_all_data.pkl`` (on the hub beside the data) maps
``"<annotation_id>_<action_uid>"`` to ``{backend_node_id: score}`` and ``{backend_node_id:
rank}``. A candidate may also carry its ``rank`` in the record itself.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

log = logging.getLogger(__name__)

OPS = ("CLICK", "TYPE", "SELECT")
SPLITS = ("train", "test_task", "test_website", "test_domain")  # Mind2Web's
HUB_ID = "osunlp/Mind2Web"
_IDS = re.compile(r'backend_node_id="([^"]*)"')


class RecordError(ValueError):
    """A record (or one of its steps) cannot be used; the message names the field."""


@dataclass
class Step:
    """One action of a task: the page, the gold operation and the candidate elements."""

    index: int
    action_uid: str
    html: str
    op: str
    value: str
    pos: List[str]  # gold element ids present in the page
    neg: List[str]  # other candidate ids present in the page
    previous: List[str]  # gold action_reprs of the earlier steps
    repr: str  # this step's own action_repr
    # Candidate id -> the candidate generator's rank, for the candidates ranked within the top k
    # (the others are left out to save memory); None when no rank is known for this step.
    ranks: Optional[Dict[str, int]] = None

    @property
    def gold_action(self) -> str:
        """AgentBench's target action string: ``OP`` or ``OP value`` (value's first line)."""
        if self.op == "CLICK":
            return "CLICK"
        return f"{self.op} {self.value.split(chr(10))[0].strip()}".strip()


@dataclass
class Record:
    """A Mind2Web task: instruction and steps."""

    annotation_id: str
    task: str
    website: str
    domain: str
    split: str
    steps: List[Step]
    step_errors: Dict[int, str]  # step index -> why that step cannot be posed


def _candidate_id(cand: Any, where: str) -> str:
    if not isinstance(cand, dict):
        raise RecordError(f"{where}: a candidate is not an object")
    cid = cand.get("backend_node_id")
    if cid is None and isinstance(cand.get("attributes"), str):
        try:
            cid = json.loads(cand["attributes"]).get("backend_node_id")
        except (json.JSONDecodeError, AttributeError):
            cid = None
    if cid is None:
        raise RecordError(f"{where}: a candidate has no backend_node_id")
    return str(cid)


def _step(action: Any, index: int, reprs: List[str], ranks: Dict[str, Dict[str, int]],
          aid: str) -> Step:
    where = f"actions[{index}]"
    if not isinstance(action, dict):
        raise RecordError(f"{where} is not an object")
    html = action.get("cleaned_html")
    if not isinstance(html, str) or not html.strip():
        raise RecordError(f"{where}.cleaned_html is missing or empty")
    operation = action.get("operation")
    if not isinstance(operation, dict) or operation.get("op") not in OPS:
        raise RecordError(f"{where}.operation.op must be one of {OPS}, got "
                          f"{operation.get('op') if isinstance(operation, dict) else operation!r}")
    uid = str(action.get("action_uid", index))
    in_page = set(_IDS.findall(html))
    lists = {}
    for key in ("pos_candidates", "neg_candidates"):
        cands = action.get(key)
        if not isinstance(cands, list):
            raise RecordError(f"{where}.{key} is missing or not a list")
        ids = [_candidate_id(c, f"{where}.{key}") for c in cands]
        lists[key] = [i for i in dict.fromkeys(ids) if i in in_page]
    known = ranks.get(f"{aid}_{uid}")
    step_ranks = dict(known) if known is not None else None
    for cand in action["pos_candidates"] + action["neg_candidates"]:
        if isinstance(cand, dict) and cand.get("rank") is not None:  # ranks inside the record
            step_ranks = step_ranks if step_ranks is not None else {}
            step_ranks.setdefault(_candidate_id(cand, where), int(cand["rank"]))
    gold = set(lists["pos_candidates"])
    return Step(index=index, action_uid=uid, html=html, op=operation["op"],
                value=str(operation.get("value") or ""), pos=lists["pos_candidates"],
                neg=[i for i in lists["neg_candidates"] if i not in gold],
                previous=list(reprs[:index]), repr=reprs[index], ranks=step_ranks)


def parse_record(rec: Any, split: str, ranks: Optional[Dict[str, Dict[str, int]]] = None) -> Record:
    """A validated Record; RecordError for problems of the whole record. Problems of single
    steps are kept in ``step_errors`` (the step-per-episode mode can still use the others)."""
    if not isinstance(rec, dict):
        raise RecordError("record is not a JSON object")
    aid = rec.get("annotation_id")
    if not isinstance(aid, str) or not aid:
        raise RecordError("field 'annotation_id' is missing")
    missing = [k for k in ("confirmed_task", "actions", "action_reprs") if k not in rec]
    if missing:
        raise RecordError(f"lacks field(s) {missing}")
    actions, reprs = rec["actions"], rec["action_reprs"]
    if not isinstance(actions, list) or not actions:
        raise RecordError("'actions' is empty or not a list")
    if not isinstance(reprs, list) or len(reprs) != len(actions):
        raise RecordError(f"'action_reprs' must list one line per action ({len(actions)}), got "
                          f"{len(reprs) if isinstance(reprs, list) else type(reprs).__name__}")
    steps: List[Step] = []
    errors: Dict[int, str] = {}
    for i, action in enumerate(actions):
        try:
            steps.append(_step(action, i, [str(r) for r in reprs], ranks or {}, aid))
        except RecordError as exc:
            errors[i] = str(exc)
    return Record(annotation_id=aid, task=str(rec["confirmed_task"]), website=str(rec.get("website", "")),
                  domain=str(rec.get("domain", "")), split=str(rec.get("split") or split),
                  steps=steps, step_errors=errors)


# ---------------------------------------------------------------------- reading


def _json_records(path: str) -> Iterator[Any]:
    """Records of a JSON array / single-object file or of a JSON-lines file."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RecordError(f"{path}:{lineno}: neither a JSON file nor JSON lines: {exc}") from None
        data = rows
    for rec in data if isinstance(data, list) else [data]:
        if isinstance(rec, dict):
            rec.pop("raw_html", None)
            for action in rec.get("actions") or []:
                if isinstance(action, dict):
                    action.pop("raw_html", None)
        yield rec


def _split_of_file(path: str, default: str) -> str:
    parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return parent if parent in SPLITS else default


def local_files(path: str, split: Optional[str]) -> List[Tuple[str, str]]:
    """``[(file, split)]`` for a file, a glob, or a folder (its ``*.json``/``*.jsonl``, or its
    split sub-folders ``train``/``test_task``/...; ``split`` picks one)."""
    if os.path.isfile(path):
        return [(path, split or _split_of_file(path, "test"))]
    if os.path.isdir(path):
        subs = [s for s in SPLITS if os.path.isdir(os.path.join(path, s))]
        if subs:
            if split is not None and split not in subs:
                raise FileNotFoundError(f"{path} has no split folder {split!r} (has {subs})")
            out: List[Tuple[str, str]] = []
            for sub in [split] if split else subs:
                out.extend(local_files(os.path.join(path, sub), sub))
            return out
        files = sorted(glob.glob(os.path.join(path, "*.json")) + glob.glob(os.path.join(path, "*.jsonl")))
        if not files:
            raise FileNotFoundError(f"no *.json / *.jsonl files in {path}")
        name = os.path.basename(os.path.abspath(path))
        return [(f, split or (name if name in SPLITS else "test")) for f in files]
    files = sorted(glob.glob(path))
    if not files:
        raise FileNotFoundError(f"{path}: no such file, folder or glob match")
    return [(f, split or _split_of_file(f, "test")) for f in files]


def read_local(path: str, split: Optional[str]) -> Iterator[Tuple[Any, str]]:
    """``(record, split)`` pairs from local files."""
    for file, file_split in local_files(path, split):
        for rec in _json_records(file):
            yield rec, file_split


def read_hub(repo: str, split: Optional[str], zip_password: Optional[str] = None,
             cache_dir: Optional[str] = None) -> Iterator[Tuple[Any, str]]:
    """Records from the hub (clusters; never called by the offline tests).

    ``train`` is the dataset's default split (``datasets.load_dataset``). The test splits ship
    as ``test.zip`` in the same dataset repository (password-protected against crawling; the
    password is in Mind2Web's README): it is downloaded once, extracted into ``cache_dir``
    (default: beside the download) and read like a local folder.
    """
    split = split or "test_task"
    try:
        if split == "train":
            from datasets import load_dataset  # heavy; only on this path

            for rec in load_dataset(repo, split="train"):
                rec = dict(rec)
                rec.pop("raw_html", None)
                yield rec, "train"
            return
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(repo, "test.zip", repo_type="dataset")
        target = cache_dir or archive + ".d"
        if not os.path.isdir(target):
            password = zip_password or os.environ.get("MIND2WEB_ZIP_PASSWORD")
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(target, pwd=password.encode() if password else None)
    except Exception as exc:  # noqa: BLE001 — network, hub and archive errors alike: say what to do
        raise RecordError(f"hub dataset {repo} (split {split}): {type(exc).__name__}: {exc}; without hub "
                          f"access, download the data and pass its folder (docs/env_mind2web.md)") from exc
    folders = [root for root, _, _ in os.walk(target) if os.path.basename(root) == split]
    if not folders:
        raise FileNotFoundError(f"{archive}: no folder {split!r} inside (extracted to {target})")
    yield from read_local(folders[0], split)


# ---------------------------------------------------------------------- candidate ranks


class _RankUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy scalars/arrays only: a scores file is data, and an
    arbitrary pickle could run code."""

    ALLOWED = {
        ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("collections", "OrderedDict"), ("collections", "defaultdict"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"scores file: refusing to load {module}.{name}")


def load_ranks(path: str, below: int) -> Dict[str, Dict[str, int]]:
    """``{"<annotation_id>_<action_uid>": {backend_node_id: rank}}`` from Mind2Web's
    ``scores_all_data.pkl`` (``{"scores": ..., "ranks": ...}``) or a JSON file of that shape,
    keeping only ranks ``< below`` (the rest play no part and would cost gigabytes)."""
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    else:
        with open(path, "rb") as fh:
            data = _RankUnpickler(fh).load()
    if not isinstance(data, dict) or not isinstance(data.get("ranks"), dict):
        raise RecordError(f"scores file {path}: expected a mapping with a 'ranks' mapping")
    return {str(k): {str(c): int(r) for c, r in v.items() if int(r) < below} for k, v in data["ranks"].items()}


def hub_file(spec: str) -> str:
    """``owner/name:file`` on the hub (a dataset repository) -> local cached path."""
    from huggingface_hub import hf_hub_download

    repo, _, name = spec.partition(":")
    return hf_hub_download(repo, name, repo_type="dataset")
