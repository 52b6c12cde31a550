"""Draws docs/img/architecture.png (the layers and the data flow of docs/architecture.md).

    python docs/architecture_diagram.py
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

LAYERS = [  # (y, colour, title, modules)
    (3.0, "#dbe9f6", "pipelines/  — jobs (Ray Data, Ray Train, Ray Tune; use the Serve apps)",
     "run · collect · general · data · train · eval · sweep · episodes"),
    (2.0, "#e3f1dc", "serve/  — Ray Serve apps (never import the jobs)",
     "llm (OpenAI API) · eft · env_server · rollout · lifecycle"),
    (1.0, "#fbeed7", "serve/envs/  — environments (plain Python, no Ray)",
     "os · db · kg · alfworld · webshop · mind2web · sciworld · miniwob · webarena · hotpotqa · rewoo · dcg"),
    (0.0, "#eeeeee", "agenttuning/  — ground (imports neither jobs nor Serve apps)",
     "schema/config · chat + masks · sources · models · console · cluster · cli · paths"),
]
FLOW = ["task files (data/)", "collect: teacher rollouts", "AgentInstruct jsonl", "data: mix η, pack",
        "Parquet rows", "train: DeepSpeed", "HF checkpoint", "eval: serve + episodes", "report.json/md/png"]

fig, ax = plt.subplots(figsize=(13, 6.2))
for y, colour, title, mods in LAYERS:
    ax.add_patch(FancyBboxPatch((0.2, y + 0.12), 8.6, 0.76, boxstyle="round,pad=0.02", fc=colour, ec="#555555"))
    ax.text(0.4, y + 0.62, title, fontsize=11, weight="bold", va="center")
    ax.text(0.4, y + 0.32, mods, fontsize=8.8, va="center", family="monospace")
for y in (3.0, 2.0, 1.0):  # dependencies point down only
    ax.add_patch(FancyArrowPatch((8.45, y + 0.12), (8.45, y - 0.12), arrowstyle="-|>", mutation_scale=14, color="#333333"))
ax.text(8.6, 2.0, "imports\n(one way)", fontsize=8, va="center")
for i, step in enumerate(FLOW):  # the data flow, right column
    yy = 3.75 - i * 0.44
    ax.add_patch(FancyBboxPatch((9.4, yy - 0.16), 3.3, 0.32, boxstyle="round,pad=0.02",
                                fc="#ffffff" if i % 2 == 0 else "#f5f5f5", ec="#777777"))
    ax.text(11.05, yy, step, fontsize=9, ha="center", va="center")
    if i:
        ax.add_patch(FancyArrowPatch((11.05, yy + 0.28), (11.05, yy + 0.16), arrowstyle="-|>", mutation_scale=10))
ax.text(11.05, 4.05, "data flow", fontsize=11, weight="bold", ha="center")
ax.set_xlim(0, 13)
ax.set_ylim(-0.1, 4.25)
ax.axis("off")
fig.tight_layout()
fig.savefig("docs/img/architecture.png", dpi=110)
print("docs/img/architecture.png")
