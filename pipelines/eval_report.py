"""Evaluation scores, rule-based error analysis and the report files (json, markdown, PNG).

Scores: a task's ``score`` is the mean episode reward (0–1); its ``success_rate`` the fraction of
episodes with reward >= the task's ``success_threshold``; its ``paper_score`` the number the
paper's column reports, on the paper's scale (0–100; MT-Bench 0–10), computed by the environment
itself (``Env.paper_score``: e.g. SciWorld's mean of per-task means, MiniWoB++'s success rate).

A category's overall score is AgentTuning's: the mean over the category's tasks of
``paper_score_t / W_t``, W_t the task's reference score (the mean score of a reference pool of
models; ``eval.reference_scores``, default the paper's implied values). With the paper's table, a
category missing some of its tasks is reported as ``partial`` and names them. Without a W for
every task, the overall is the plain mean of paper scores / 100, and says so.

Error analysis labels every unsuccessful episode by rule, from its status and its actions:
``invalid_format``, ``invalid_action``, ``turn_limit``, ``context_limit``, ``task_error``,
``repetition`` (the environment ended it), ``wrong_answer`` (completed, reward too low);
and independently of the status ``short_term_repetition`` (the same action in consecutive
turns) and ``long_term_repetition`` (an action that comes back after other actions in
between, i.e. the agent loops), and ``refusal``.
"""

import json
import logging
import re
from collections import Counter
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

FAILURE_STATUSES = ("invalid_format", "invalid_action", "turn_limit", "context_limit", "task_error", "repetition")
_REFUSAL = re.compile(r"\b(I'm sorry|I am sorry|I cannot|I can't|As an AI)\b", re.IGNORECASE)


def agent_actions(episode: Dict[str, Any]) -> List[str]:
    """The agent's own turns (loss: true) of an AgentInstruct-format episode, normalised."""
    return [re.sub(r"\s+", " ", c["value"]).strip() for c in episode.get("conversations", [])
            if c.get("from") == "gpt" and c.get("loss")]


def repetition_labels(actions: List[str]) -> List[str]:
    """``short_term_repetition`` and/or ``long_term_repetition`` found in an action sequence."""
    labels = []
    if any(a == b for a, b in zip(actions, actions[1:])):
        labels.append("short_term_repetition")
    last: Dict[str, int] = {}
    long_term = False
    for pos, action in enumerate(actions):
        if action in last and pos - last[action] > 1:  # came back after other actions: a loop
            long_term = True
            break
        last[action] = pos
    if long_term:
        labels.append("long_term_repetition")
    return labels


def episode_labels(ep: Dict[str, Any], threshold: float) -> List[str]:
    """Error-analysis labels of one episode (empty for a success)."""
    if ep["reward"] >= threshold:
        return []
    labels = [ep["status"]] if ep["status"] in FAILURE_STATUSES else ["wrong_answer"]
    actions = agent_actions(ep)
    labels += repetition_labels(actions)
    if any(_REFUSAL.search(a) for a in actions):
        labels.append("refusal")
    return labels


def task_summary(episodes: List[Dict[str, Any]], threshold: float, expected: int, skipped: int) -> Dict[str, Any]:
    n = len(episodes)
    errors: Counter = Counter()
    for ep in episodes:
        errors.update(episode_labels(ep, threshold))
    return {
        "n": n,
        "expected": expected,
        "missing": max(0, expected - n),
        "skipped": skipped,
        "score": sum(e["reward"] for e in episodes) / n if n else 0.0,
        "success_rate": sum(e["reward"] >= threshold for e in episodes) / n if n else 0.0,
        "status_counts": dict(Counter(e["status"] for e in episodes)),
        "mean_turns": sum(e["turns"] for e in episodes) / n if n else 0.0,
        "errors": dict(errors.most_common()),
        "leading_error": errors.most_common(1)[0][0] if errors else None,
    }


def category_scores(per_task: Dict[str, Dict[str, Any]], categories: Dict[str, str],
                    reference: Dict[str, float], expected: Optional[Dict[str, List[str]]] = None
                    ) -> Dict[str, Dict[str, Any]]:
    """Overall score per category (see the module docstring) over the tasks that have a score.

    ``per_task``: task -> summary with ``n`` and ``paper_score``; ``categories``: task -> category;
    ``reference``: task -> W_t; ``expected``: category -> the tasks a full category has (the paper's).
    """
    out = {}
    for cat in sorted(set(categories.values()) | set(expected or {})):
        tasks = [t for t, c in categories.items() if c == cat and t in per_task and per_task[t].get("n", 0) > 0]
        if not tasks:  # nothing scored (e.g. general tasks for the expert): no overall, not a 0
            continue
        missing = [t for t in (expected or {}).get(cat, []) if t not in tasks]
        no_w = [t for t in tasks if t not in reference]
        if no_w:
            score = sum(per_task[t]["paper_score"] for t in tasks) / len(tasks) / 100.0
            formula = f"mean paper score / 100 (no reference W for {', '.join(no_w)})"
        else:
            score = sum(per_task[t]["paper_score"] / reference[t] for t in tasks) / len(tasks)
            formula = "mean of paper_score / W"
        out[cat] = {"score": score, "tasks": tasks, "reference": {t: reference.get(t) for t in tasks},
                    "formula": formula, "partial": bool(missing), "missing": missing}
    return out


def load_paper_table(path: Optional[str]) -> Dict[str, Any]:
    """The paper's table as {categories: {cat: [tasks]}, reference: {task: W}, columns: {model:
    {task or "<cat> overall": score}}}; empty when no table is configured."""
    if not path:
        return {"categories": {}, "reference": {}, "columns": {}}
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    cats = {c: [t for t in tasks if t != "overall"] for c, tasks in table["scores"].items()}
    ref = {t: w for c, ws in table.get("implied_reference_scores", {}).items() if c != "note" for t, w in ws.items()}
    cols: Dict[str, Dict[str, float]] = {m: {} for m in table["models"]}
    for c, tasks in table["scores"].items():
        for t, per_model in tasks.items():
            for m, v in per_model.items():
                cols[m][f"{c} overall" if t == "overall" else t] = v
    return {"categories": cats, "reference": ref, "columns": cols}


def _fmt(v: Any, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def write_markdown(report: Dict[str, Any], path: str) -> None:
    """report.md: overall by category and per task, the evaluated policies beside the paper's columns."""
    pols = list(report["policies"])
    paper = report.get("paper", {}).get("columns", {})
    models = list(paper)
    lines = ["# Evaluation report\n",
             f"Policies: {', '.join(pols)}. Task scores on the paper's scale (0–100; MT-Bench 0–10); "
             "category overall = mean of score / W over the category's tasks (AgentTuning's)."
             + (f" Paper columns: {report['paper']['table']}." if models else "") + "\n"]
    cats = sorted({c for p in pols for c in report["policies"][p]["categories"]})
    lines += ["## Overall by category\n", "| category | " + " | ".join(pols + models) + " |",
              "|---|" + "---|" * (len(pols) + len(models))]
    for c in cats:
        cells = []
        for p in pols:
            v = report["policies"][p]["categories"].get(c)
            cells.append("–" if v is None else f"{v['score']:.2f}" + (" (partial)" if v["partial"] else ""))
        cells += [_fmt(paper[m].get(f"{c} overall")) for m in models]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    for p in pols[:1]:
        for c, v in report["policies"][p]["categories"].items():
            note = f"missing {', '.join(v['missing'])}" if v["missing"] else "complete"
            lines.append(f"\n- {c}: {v['formula']}; {note}; W: "
                         + ", ".join(f"{t} {w:g}" if w else f"{t} –" for t, w in v["reference"].items()))
    head = ["task", "category", "metric"] + [f"{p} (n)" for p in pols] + list(models)
    lines += ["\n## Tasks\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, cat in report["categories"].items():
        metric = next((report["policies"][p]["tasks"][t].get("metric", "") for p in pols
                       if t in report["policies"][p]["tasks"]), "")
        cells = []
        for p in pols:
            s = report["policies"][p]["tasks"].get(t)
            cells.append("–" if not s or "not_applicable" in s else f"{s['paper_score']:.1f} ({s['n']})")
        cells += [_fmt(paper[m].get(t), 1) for m in models]
        lines.append(f"| {t} | {cat} | {metric} | " + " | ".join(cells) + " |")
    lines.append("\n## Error analysis (unsuccessful episodes, labels by rule)\n")
    for p in pols:
        for t, s in report["policies"][p]["tasks"].items():
            if "errors" not in s:
                continue
            errs = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
            miss = f"; missing {s['missing']}" if s.get("missing") else ""
            lines.append(f"- **{p} / {t}**: success {s['success_rate']:.3f}, statuses {s['status_counts']}; "
                         f"errors: {errs}; mean turns {s['mean_turns']:.1f}{miss}")
    for t, why in sorted((report.get("unavailable") or {}).items()):
        lines.append(f"- **{t} not evaluated**: the environment could not start: {why}")
    for t, why in sorted((report.get("skipped") or {}).items()):
        for tid, reason in why.items():
            lines.append(f"- skipped {t} task {tid}: {reason}")
    if report.get("failures"):
        lines.append(f"- {len(report['failures'])} episodes failed (not scored; a re-run completes them)")
    if report.get("episodes_restarted"):
        lines.append(f"- {report['episodes_restarted']} episodes were replayed after a replica or server failure")
    lines.append(f"\nTrajectories: `{report['trajectories']}`\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_plot(report: Dict[str, Any], path: str) -> Optional[str]:
    """Two panels: category overall (policies and the paper's models) and task paper scores
    (policies beside the paper's Llama-2-chat and AgentLM of the smallest size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = list(report["policies"])
    paper = report.get("paper", {}).get("columns", {})
    cats = sorted({c for p in pols for c in report["policies"][p]["categories"]})
    tasks = list(report["categories"])
    ref_models = [m for m in ("llama-2-7b-chat", "agentlm-7b") if m in paper]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.9 * len(tasks) + 6), 4.5),
                             gridspec_kw={"width_ratios": [max(1, len(cats)), max(1, len(tasks))]})

    def bars(ax, labels, series, title, ylabel):
        width = 0.8 / max(1, len(series))
        for i, (name, vals, hatch) in enumerate(series):
            ax.bar([x + i * width for x in range(len(labels))], [v if v is not None else 0 for v in vals], width,
                   label=name, hatch=hatch, alpha=0.85 if hatch else 1.0)
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(labels))])
        ax.set_xticklabels(labels, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylabel(ylabel)

    cat_series = [(p, [report["policies"][p]["categories"].get(c, {}).get("score") for c in cats], None) for p in pols]
    cat_series += [(f"paper {m}", [paper[m].get(f"{c} overall") for c in cats], "//") for m in paper]
    bars(axes[0], cats, cat_series, "overall by category", "score / W (reference pool = 1)")
    task_series = [(p, [report["policies"][p]["tasks"].get(t, {}).get("paper_score") for t in tasks], None) for p in pols]
    task_series += [(f"paper {m}", [paper[m].get(t) for t in tasks], "//") for m in ref_models]
    bars(axes[1], tasks, task_series, "task scores", "paper scale (0–100; MT-Bench 0–10)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(report: Dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
