"""Generated AgentInstruct-shaped and ShareGPT-shaped corpora with realistic length mixes.

For tests and benchmarks only (the lengths follow long-tailed distributions like ShareGPT's and
AgentInstruct's; the words are drawn from a fixed list). Deterministic for a given seed.
"""

import json
from typing import Dict, Iterator, List

import numpy as np

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had "
    "by word but not what all were we when your can said there use an each which she do how their if will "
    "up other about out many then them these so some her would make like him into time has look two more "
    "write go see number no way could people my than first water been call who oil its now find long down "
    "day did get come made may part file table select where count answer action thought bash query row"
).split()


def _text(rng: np.random.Generator, mean_log: float, sigma: float, cap: int, scale: float = 1.0) -> str:
    n = int(min(cap * scale, max(1, scale * rng.lognormal(mean_log, sigma))))
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def sharegpt_records(n: int, seed: int = 0, scale: float = 1.0) -> Iterator[Dict]:
    """ShareGPT-like conversations: 1-4 exchanges, long-tailed answer lengths (× scale)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        conv: List[Dict] = []
        for _ in range(int(rng.integers(1, 5))):
            conv.append({"from": "human", "value": _text(rng, 3.0, 1.0, 400, scale)})
            conv.append({"from": "gpt", "value": _text(rng, 4.6, 0.9, 1500, scale)})
        yield {"id": f"sharegpt_{seed}_{i}", "conversations": conv}


def agentinstruct_records(n: int, seed: int = 0, task: str = "os", scale: float = 1.0) -> Iterator[Dict]:
    """AgentInstruct-like trajectories: a loss:false one-shot demonstration, then 2-6 ReAct rounds
    (text lengths × scale)."""
    rng = np.random.default_rng(seed + 10_000)
    for i in range(n):
        conv = [
            {"from": "human", "value": "You are an assistant that will act like a person. " + _text(rng, 4.0, 0.3, 200, scale), "loss": False},
            {"from": "gpt", "value": "OK.", "loss": False},
            {"from": "human", "value": "Example task: " + _text(rng, 3.0, 0.5, 80, scale), "loss": False},
            {"from": "gpt", "value": "Think: " + _text(rng, 2.5, 0.5, 60, scale) + "\n\nAct: bash\n\n```bash\nls\n```", "loss": False},
            {"from": "human", "value": f"Now, I will start a new problem in a new {task} environment: " + _text(rng, 3.2, 0.6, 150, scale)},
        ]
        for _ in range(int(rng.integers(2, 7))):
            conv.append({"from": "gpt", "value": "Think: " + _text(rng, 3.0, 0.6, 120, scale) + "\n\nAct: bash\n\n```bash\n"
                         + _text(rng, 1.5, 0.5, 20, scale) + "\n```"})
            conv.append({"from": "human", "value": "The output of the OS:\n\n" + _text(rng, 3.5, 1.0, 300, scale)})
        conv.append({"from": "gpt", "value": "Think: " + _text(rng, 2.5, 0.5, 60, scale) + "\n\nAct: answer(" + str(i) + ")"})
        yield {"id": f"{task}_{seed}_{i}", "conversations": conv}


def write_jsonl(path: str, records: Iterator[Dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    return n


def main(out_dir: str = "examples/data") -> None:
    """Write the small example files the data quickstart reads (`python -m pipelines.synthetic`)."""
    import os

    os.makedirs(out_dir, exist_ok=True)
    a = write_jsonl(os.path.join(out_dir, "agentinstruct_example.jsonl"), agentinstruct_records(120, seed=0, scale=0.3))
    g = write_jsonl(os.path.join(out_dir, "sharegpt_example.jsonl"), sharegpt_records(600, seed=0, scale=0.3))
    print(f"wrote {a} agent and {g} general example records to {out_dir}/")


if __name__ == "__main__":
    main()
