"""The sweep's results: one row per trial (swept values, per-category and per-task scores, final
training loss, the data's η) as ``results.json`` and ``results.md``, and ``results.png`` (score per
category against each swept key). Read from the trials' ``result.json`` files only, so a re-run that
skips finished trials still reports all of them."""

import json
import logging
import os
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return json.dumps(v) if isinstance(v, (dict, list)) else str(v)


def _number(v: Any) -> Optional[float]:
    """A swept value as a number for the x axis ("1e-3" from YAML included), else None."""
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def collect_rows(trials: List[Dict[str, Any]], keys: List[str], errors: Dict[str, str]) -> List[Dict[str, Any]]:
    """One row per planned trial, in plan order."""
    rows = []
    for t in trials:
        row: Dict[str, Any] = {"trial": t["id"], "values": {k: t["overrides"].get(k) for k in keys},
                               "baseline": t.get("baseline")}
        path = os.path.join(t["dir"], "result.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                res = json.load(f)
            row.update(status="finished", categories=res["categories"], tasks=res["tasks"], train=res.get("train", {}),
                       data=res.get("data", {}), checkpoint=res.get("checkpoint"), report=res.get("report"))
        else:
            row.update(status=f"failed: {errors[t['id']]}" if t["id"] in errors else "not finished",
                       categories={}, tasks={}, train={}, data={})
        rows.append(row)
    return rows


def _cells(row: Dict[str, Any], keys: List[str]) -> List[str]:
    """The swept values of a row; a baseline's (no training) show its name."""
    if row.get("baseline"):
        return [f"({row['baseline']})"] * len(keys)
    return [_value(row["values"][k]) for k in keys]


def markdown(rows: List[Dict[str, Any]], keys: List[str]) -> str:
    cats = sorted({c for r in rows for c in r["categories"]})
    tasks = sorted({t for r in rows for t in r["tasks"]})
    head = ["trial", *keys, *cats, "train loss", "eta", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial"], *_cells(r, keys)]
        for c in cats:
            s = r["categories"].get(c)
            cells.append(f"{s['score']:.3f}{'*' if s.get('partial') else ''}" if s else "")
        loss, eta = r["train"].get("loss"), r["data"].get("eta_actual")
        cells += [f"{loss:.4f}" if loss is not None else "", f"{eta:.3f}" if eta is not None else "", r["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    out = "\n".join(lines)
    if tasks:
        head = ["trial", *keys, *tasks]
        tl = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            tl.append("| " + " | ".join([r["trial"], *_cells(r, keys)]
                                        + [f"{r['tasks'][t]['score']:.3f}" if t in r["tasks"] else "" for t in tasks]) + " |")
        out += "\n\nPer task (mean episode reward or the task's own metric):\n\n" + "\n".join(tl)
    return out


def plot(rows: List[Dict[str, Any]], keys: List[str], path: str) -> Optional[str]:
    """Score per category against each swept key; one line per category (and per setting of the
    other swept keys, when they vary)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finished = [r for r in rows if r["status"] == "finished" and r["categories"]]
    done = [r for r in finished if not r.get("baseline")]
    baselines = [r for r in finished if r.get("baseline")]
    if not done or not keys:
        return None
    cats = sorted({c for r in done for c in r["categories"]})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [r["values"][key] for r in done]
        numeric = all(_number(v) is not None for v in values)
        ticks = sorted({_value(v) for v in values}) if not numeric else None
        others = [k for k in keys if k != key and len({_value(r["values"][k]) for r in done}) > 1]
        series: Dict[str, List] = {}
        for r in done:
            label_rest = ", ".join(f"{k}={_value(r['values'][k])}" for k in others)
            x = _number(r["values"][key]) if numeric else ticks.index(_value(r["values"][key]))
            for c, s in r["categories"].items():
                series.setdefault(c + (f" ({label_rest})" if label_rest else ""), []).append((x, s["score"]))
        colors = {}
        for label, pts in sorted(series.items()):
            pts.sort()
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
            colors.setdefault(label.split(" (")[0], line.get_color())
        for b in baselines:  # the untrained model: a dashed level per category
            for c, s in sorted(b["categories"].items()):
                ax.axhline(s["score"], ls="--", lw=1, color=colors.get(c, "gray"), label=f"{c} ({b['baseline']})")
        if not numeric:
            ax.set_xticks(range(len(ticks)), ticks)
        else:
            xs = sorted({_number(v) for v in values})
            if xs[0] > 0 and xs[-1] / xs[0] >= 10:
                ax.set_xscale("log")  # learning rates and the like span decades
            if len(xs) <= 8:  # the swept values themselves as ticks
                ax.set_xticks(xs, [f"{x:.3g}" for x in xs])
                ax.minorticks_off()
        ax.set_xlabel(key)
        ax.set_ylabel("overall score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"score per category ({len(cats)} categories, {len(done)} trials)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(trials: List[Dict[str, Any]], keys: List[str], out: str, errors: Dict[str, str],
                  plot_png: bool = True) -> Dict[str, str]:
    """results.json, results.md and (with plot_png) results.png under out; returns their paths."""
    rows = collect_rows(trials, keys, errors)
    paths = {"json": os.path.join(out, "results.json"), "md": os.path.join(out, "results.md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"swept_keys": keys, "trials": rows}, f, indent=1, default=str)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(f"# Sweep results\n\n{len([r for r in rows if r['status'] == 'finished'])}/{len(rows)} trials "
                "finished; category scores are the evaluation report's overall scores (* = partial "
                f"category).\n\n{markdown(rows, keys)}\n")
    if plot_png:
        png = plot(rows, keys, os.path.join(out, "results.png"))
        if png:
            paths["png"] = png
        png = plot_errors(rows, keys, os.path.join(out, "errors.png"))
        if png:
            paths["errors_png"] = png
    return paths


def error_shares(row: Dict[str, Any]) -> Dict[str, float]:
    """The paper's error analysis of one row: the share of its agent episodes carrying each label
    (invalid_format, invalid_action, repetition, turn_limit, ...; an episode can carry several)."""
    n = sum(v.get("n", 0) for v in row["tasks"].values() if "errors" in v)
    counts: Dict[str, int] = {}
    for v in row["tasks"].values():
        for label, k in v.get("errors", {}).items():
            counts[label] = counts.get(label, 0) + k
    return {label: k / n for label, k in sorted(counts.items())} if n else {}


def plot_errors(rows: List[Dict[str, Any]], keys: List[str], path: str) -> Optional[str]:
    """Grouped bars: per error label, the share of agent episodes of each finished row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = {(f"{r['baseline']}" if r.get("baseline") else ", ".join(f"{k}={_value(r['values'][k])}" for k in keys)):
              error_shares(r) for r in rows if r["status"] == "finished"}
    shares = {k: v for k, v in shares.items() if v}
    labels = sorted({lab for v in shares.values() for lab in v})
    if not labels:
        return None
    width = 0.8 / len(shares)
    fig, ax = plt.subplots(figsize=(min(11.0, max(6.0, 0.4 * len(labels) * len(shares))), 4))
    for i, (name, v) in enumerate(shares.items()):
        ax.bar([j + i * width for j in range(len(labels))], [v.get(lab, 0.0) for lab in labels], width, label=name)
    ax.set_xticks([j + width * (len(shares) - 1) / 2 for j in range(len(labels))], labels, rotation=20, ha="right")
    ax.set_ylabel("share of agent episodes")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("error analysis (episodes can carry several labels)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
