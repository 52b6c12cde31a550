"""Evaluation scores, rule-based error analysis and the report files (json, markdown, PNG).

Scores: a task's score is the mean episode reward; its success rate the fraction of episodes
with reward >= the task's ``success_threshold``. A category's overall score is the weighted
average of its task scores, ``sum(w_t * s_t) / sum(w_t)``, with ``w_t = eval.weights[t]`` when
given, else ``1 / eval.reference_scores[t]`` (the mean score of a reference pool of models, as
AgentTuning/AgentBench normalise), else 1 (plain average); the weights used are reported.

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


def task_weights(tasks: List[str], weights: Dict[str, float], reference: Dict[str, float]) -> Dict[str, float]:
    return {t: float(weights[t]) if t in weights else (1.0 / reference[t] if t in reference else 1.0) for t in tasks}


def category_scores(per_task: Dict[str, Dict[str, Any]], categories: Dict[str, str],
                    weights: Dict[str, float], reference: Dict[str, float]) -> Dict[str, Dict[str, Any]]:
    """Weighted overall score per category over the tasks that have a score."""
    out = {}
    for cat in sorted(set(categories.values())):
        tasks = [t for t, c in categories.items() if c == cat and t in per_task and per_task[t]["n"] > 0]
        if not tasks:  # nothing scored (e.g. general tasks for the expert): no overall, not a 0
            continue
        w = task_weights(tasks, weights, reference)
        total = sum(w.values())
        score = sum(w[t] * per_task[t]["score"] for t in tasks) / total if total else 0.0
        out[cat] = {"score": score, "tasks": tasks, "weights": w}
    return out


def write_markdown(report: Dict[str, Any], path: str) -> None:
    pols = list(report["policies"])
    lines = [f"# Evaluation report\n", f"Policies: {', '.join(pols)}. Scores are mean rewards (0–1).\n"]
    lines.append("## Overall by category\n")
    cats = sorted({c for p in pols for c in report["policies"][p]["categories"]})
    lines.append("| category | " + " | ".join(pols) + " |")
    lines.append("|---|" + "---|" * len(pols))
    for c in cats:
        row = [f"{report['policies'][p]['categories'][c]['score']:.3f}" if c in report["policies"][p]["categories"]
               else "–" for p in pols]
        lines.append(f"| {c} | " + " | ".join(row) + " |")
    lines.append("\n## Tasks\n")
    lines.append("| task | category | " + " | ".join(f"{p} score | {p} success | {p} n" for p in pols) + " |")
    lines.append("|---|---|" + "---|---|---|" * len(pols))
    for t, cat in report["categories"].items():
        cells = []
        for p in pols:
            s = report["policies"][p]["tasks"].get(t)
            cells += [f"{s['score']:.3f}", f"{s.get('success_rate', s['score']):.3f}", f"{s['n']}"] if s else ["–"] * 3
        lines.append(f"| {t} | {cat} | " + " | ".join(cells) + " |")
    lines.append("\n## Error analysis (unsuccessful episodes, labels by rule)\n")
    for p in pols:
        for t, s in report["policies"][p]["tasks"].items():
            if "errors" not in s:
                continue
            errs = ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "none"
            miss = f"; missing {s['missing']}" if s.get("missing") else ""
            lines.append(f"- **{p} / {t}**: statuses {s['status_counts']}; errors: {errs}; "
                         f"mean turns {s['mean_turns']:.1f}{miss}")
    for t, why in sorted((report.get("skipped") or {}).items()):
        for tid, reason in why.items():
            lines.append(f"- skipped {t} task {tid}: {reason}")
    if report.get("failures"):
        lines.append(f"- {len(report['failures'])} episodes failed (not scored; a re-run completes them)")
    lines.append("\n## Weights\n")
    for p in pols[:1]:
        for c, v in report["policies"][p]["categories"].items():
            lines.append(f"- {c}: " + ", ".join(f"{t} × {w:.3g}" for t, w in v["weights"].items()))
    lines.append(f"\nTrajectories: `{report['trajectories']}`\n")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def write_plot(report: Dict[str, Any], path: str) -> Optional[str]:
    """Grouped bars: task scores and category overall scores, one bar per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = list(report["policies"])
    labels = list(report["categories"]) + sorted({c for p in pols for c in report["policies"][p]["categories"]})
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels) * max(1, len(pols)) / 2), 4))
    width = 0.8 / max(1, len(pols))
    for i, p in enumerate(pols):
        r = report["policies"][p]
        vals = [r["tasks"].get(l, r["categories"].get(l, {})).get("score", 0.0) for l in labels]
        ax.bar([x + i * width for x in range(len(labels))], vals, width, label=p)
    ax.set_xticks([x + width * (len(pols) - 1) / 2 for x in range(len(labels))])
    n_tasks = len(report["categories"])
    ax.set_xticklabels([l if i < n_tasks else f"{l} (overall)" for i, l in enumerate(labels)], rotation=30, ha="right")
    ax.set_ylabel("score")
    ax.set_title("Evaluation: task scores and category overall")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_json(report: Dict[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=False)
