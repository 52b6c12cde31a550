"""Overload behaviour of the environment server and the model server (issue: a good citizen of a
shared cluster). Clients behave like OpenAI's and ours: on 429 they wait ``Retry-After`` and retry.

1. Environment server, one replica: 64 OS + 64 DB expert episodes started at once (128 clients)
   against ``max_sessions=64`` (the cap) and, as the baseline in the same run, against
   ``max_sessions=128`` (no cap reached). Reported: completed episodes, 429s and whether every
   one carried ``Retry-After``, other errors (5xx), wall time, and the peak memory the machine
   used above its idle level while the episodes ran (sandboxes, MariaDB and the replica).
2. Model server (``serve.llm`` on Ray Serve, tiny Llama): 128 concurrent chat requests against a
   bounded queue (``max_ongoing_requests=16``, ``max_queued_requests=32``) and, as the baseline,
   an unbounded one. Reported: completed, 429s with ``Retry-After``, 5xx, peak queue length
   (``num_queued_requests`` as Serve's router counts it is bounded by construction; we report the
   client-side in-flight peak), p50/p99 latency.

    python bench/load.py [--os 64] [--db 64] [--llm-requests 128]

Last line: RESULT env_completed=<n>/<N> env_429=<n> env_5xx=<n> env_peak_mem_mb=<x>
    env_peak_mem_ratio_vs_uncapped=<x> llm_completed=<n>/<N> llm_429=<n> llm_5xx=<n>
    llm_p99_ratio_vs_unbounded=<x>
"""

import argparse
import json
import os
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import psutil  # noqa: E402
import requests  # noqa: E402

from agenttuning.paths import data_file  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class MemPeak:
    """Peak of the machine's used memory above the level at start, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.base = psutil.virtual_memory().used
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __enter__(self) -> "MemPeak":
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n429 = self.n429_no_header = self.n5xx = self.other = 0
        self.latencies: List[float] = []
        self.in_flight = self.peak_in_flight = 0

    def add(self, field: str) -> None:
        with self.lock:
            setattr(self, field, getattr(self, field) + 1)

    def status(self, r: requests.Response) -> bool:
        """True: retry after Retry-After; False: done with this response."""
        if r.status_code == 429:
            self.add("n429")
            if "Retry-After" not in r.headers:
                self.add("n429_no_header")
            time.sleep(float(r.headers.get("Retry-After", 1)))
            return True
        if r.status_code >= 500:
            self.add("n5xx")
        elif r.status_code != 200:
            self.add("other")
        return False


def env_episode(base: str, env: str, tid: str, tally: Tally) -> bool:
    s = requests.Session()
    while True:
        r = s.post(f"{base}/envs/{env}/sessions", json={"task_id": tid}, timeout=600)
        if not tally.status(r):
            break
    if r.status_code != 200:
        return False
    sid, out = r.json()["session_id"], {}
    try:
        while not out.get("done"):
            action = s.get(f"{base}/sessions/{sid}/expert", timeout=600).json()["action"]
            r = s.post(f"{base}/sessions/{sid}/step", json={"action": action}, timeout=600)
            if r.status_code != 200:
                tally.status(r)
                return False
            out = r.json()
    finally:
        s.delete(f"{base}/sessions/{sid}", timeout=600)
    return out.get("status") == "completed"


def bench_env(n_os: int, n_db: int, max_sessions: int) -> Dict[str, float]:
    from ray import serve

    import serve.envs as envs
    from serve.env_server import EnvServer

    specs = {"os": {"path": data_file("agentbench/os_dev.json"), "options": {}},
             "db": {"path": data_file("agentbench/dbbench_dev.jsonl"), "options": {}}}
    ids = {n: envs.load(n, s["path"], **s["options"]).tasks() for n, s in specs.items()}
    jobs: List[Tuple[str, str]] = ([("os", ids["os"][i % len(ids["os"])]) for i in range(n_os)]
                                   + [("db", ids["db"][i % len(ids["db"])]) for i in range(n_db)])
    app = EnvServer.options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024).bind(
        specs, max_sessions, 600.0, retry_after_s=2.0)
    serve.run(app, name="load_env", route_prefix="/")
    base = f"http://127.0.0.1:{serve_port}"
    tally = Tally()
    env_episode(base, *jobs[0], tally)  # warm-up: sandbox image, MariaDB schema cache
    tally = Tally()
    with MemPeak() as mem:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as pool:
            done = list(pool.map(lambda j: env_episode(base, *j, tally), jobs))
        wall = time.perf_counter() - t0
    serve.delete("load_env")
    res = {"max_sessions": max_sessions, "episodes": len(jobs), "completed": sum(done), "n429": tally.n429,
           "n429_without_retry_after": tally.n429_no_header, "n5xx": tally.n5xx, "other_errors": tally.other,
           "wall_s": wall, "peak_mem_mb": mem.mb}
    print(f"env server max_sessions={max_sessions}: {res['completed']}/{len(jobs)} completed, {tally.n429} x 429 "
          f"({tally.n429_no_header} without Retry-After), {tally.n5xx} x 5xx, {wall:.1f}s, peak +{mem.mb:.0f} MiB",
          flush=True)
    return res


def llm_request(base: str, i: int, tally: Tally) -> bool:
    body = {"model": "tiny", "messages": [{"role": "user", "content": f"count to {i}"}],
            "max_tokens": 16, "temperature": 0}
    t0 = time.perf_counter()
    with tally.lock:
        tally.in_flight += 1
        tally.peak_in_flight = max(tally.peak_in_flight, tally.in_flight)
    try:
        while True:
            r = requests.post(f"{base}/v1/chat/completions", json=body, timeout=600)
            if not tally.status(r):
                break
    finally:
        with tally.lock:
            tally.in_flight -= 1
    with tally.lock:
        tally.latencies.append(time.perf_counter() - t0)
    return r.status_code == 200


def bench_llm(model: str, n: int, max_queued: int) -> Dict[str, float]:
    from ray import serve

    from agenttuning.config import load_config
    from serve.app import build_llm_app

    cfg = load_config("configs/serve_tiny.yaml", [
        f"model.name_or_path={model}", "model.tiny.enabled=false", "serve.model_id=tiny", "serve.num_cpus=0",
        "serve.max_ongoing_requests=16", f"serve.max_queued_requests={max_queued}", "serve.retry_after_s=1",
        "serve.max_batch_size=8", "serve.torch_threads=1", "serve.autoscaling=null"])
    serve.run(build_llm_app(cfg), name="load_llm", route_prefix="/")
    base = f"http://127.0.0.1:{serve_port}"
    llm_request(base, 0, Tally())  # warm-up
    tally = Tally()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        done = list(pool.map(lambda i: llm_request(base, i, tally), range(n)))
    wall = time.perf_counter() - t0
    serve.delete("load_llm")
    lat = sorted(tally.latencies)
    res = {"max_queued_requests": max_queued, "requests": n, "completed": sum(done), "n429": tally.n429,
           "n429_without_retry_after": tally.n429_no_header, "n5xx": tally.n5xx, "other_errors": tally.other,
           "wall_s": wall, "p50_s": lat[len(lat) // 2], "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}
    print(f"model server max_queued_requests={max_queued}: {res['completed']}/{n} completed, {tally.n429} x 429 "
          f"({tally.n429_no_header} without Retry-After), {tally.n5xx} x 5xx, p50 {res['p50_s']:.1f}s "
          f"p99 {res['p99_s']:.1f}s, {wall:.1f}s", flush=True)
    return res


serve_port = 0


def main() -> None:
    global serve_port
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--os", type=int, default=64)
    ap.add_argument("--db", type=int, default=64)
    ap.add_argument("--llm-requests", type=int, default=128)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import tempfile

    import ray
    from ray import serve

    from agenttuning.models import build_tiny_model
    from agenttuning.schema import TinyModelConfig

    tmp = tempfile.mkdtemp(prefix="load_bench_")
    model = build_tiny_model(os.path.join(tmp, "tiny"), TinyModelConfig(enabled=True))
    serve_port = _port()
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
        env_cap = bench_env(args.os, args.db, 64)
        env_free = bench_env(args.os, args.db, args.os + args.db)
        llm_cap = bench_llm(model, args.llm_requests, 32)
        llm_free = bench_llm(model, args.llm_requests, -1)
    finally:
        serve.shutdown()
        ray.shutdown()
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "load.json"), "w") as f:
        json.dump({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
                   "env_capped": env_cap, "env_uncapped": env_free, "llm_bounded": llm_cap,
                   "llm_unbounded": llm_free}, f, indent=1)
    print(f"RESULT env_completed={env_cap['completed']}/{env_cap['episodes']} env_429={env_cap['n429']} "
          f"env_429_without_retry_after={env_cap['n429_without_retry_after']} env_5xx={env_cap['n5xx']} "
          f"env_peak_mem_mb={env_cap['peak_mem_mb']:.0f} "
          f"env_peak_mem_ratio_vs_uncapped={env_cap['peak_mem_mb'] / max(env_free['peak_mem_mb'], 1):.2f} "
          f"llm_completed={llm_cap['completed']}/{llm_cap['requests']} llm_429={llm_cap['n429']} "
          f"llm_5xx={llm_cap['n5xx']} llm_p99_ratio_vs_unbounded={llm_cap['p99_s'] / llm_free['p99_s']:.2f}")


if __name__ == "__main__":
    main()
