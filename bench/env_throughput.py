"""Environment server throughput: expert episodes/s over HTTP at concurrency 1, 8, 32, against
the same episodes run in-process, serially (the baseline), in the same run.

Episodes: the scripted expert on real AgentBench tasks (DBBench dev, OS dev), cycled to
``--episodes``. Each HTTP episode is what an outside agent does: create a session, ask the
expert endpoint, step until done, delete. The in-process baseline calls the same Env objects
directly (no Ray, no HTTP), one episode after another.

    python bench/env_throughput.py [--episodes 64] [--envs db,os] [--db-backend auto]

Last line: RESULT speedup_c8=<x> speedup_c32=<y>   (episodes/s relative to the serial baseline)
"""

import argparse
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import requests  # noqa: E402

import serve.envs as envs  # noqa: E402
from serve.envs.base import data_file  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FILES = {"db": "agentbench/dbbench_dev.jsonl", "os": "agentbench/os_dev.json"}


def env_specs(names: List[str], db_backend: str) -> Dict[str, dict]:
    specs = {n: {"path": data_file(FILES[n]), "options": {}} for n in names}
    if "db" in specs:
        specs["db"]["options"]["backend"] = db_backend
    return specs


def jobs_for(specs: Dict[str, dict], n: int) -> List[Tuple[str, str]]:
    """``n`` (env, task) pairs, round-robin over environments and their tasks."""
    ids = {name: envs.load(name, s["path"], **s["options"]).tasks() for name, s in specs.items()}
    names = sorted(ids)
    return [(names[i % len(names)], ids[names[i % len(names)]][(i // len(names)) % len(ids[names[i % len(names)]])])
            for i in range(n)]


def serial(specs: Dict[str, dict], jobs: List[Tuple[str, str]]) -> float:
    loaded = {name: envs.load(name, s["path"], **s["options"]) for name, s in specs.items()}
    envs.run_episode(loaded[jobs[0][0]], jobs[0][1])  # warm-up (server start, template build)
    t0 = time.perf_counter()
    for name, tid in jobs:
        ep = envs.run_episode(loaded[name], tid)
        if ep.reward != 1.0:
            raise RuntimeError(f"in-process expert failed on {name}/{tid}: {ep.status}")
    dt = time.perf_counter() - t0
    for e in loaded.values():
        e.shutdown()
    return len(jobs) / dt


def http_episode(base: str, name: str, tid: str, session: requests.Session) -> dict:
    r = session.post(f"{base}/envs/{name}/sessions", json={"task_id": tid}, timeout=300)
    r.raise_for_status()
    sid = r.json()["session_id"]
    out: dict = {}
    while not out.get("done"):
        action = session.get(f"{base}/sessions/{sid}/expert", timeout=300).json()["action"]
        resp = session.post(f"{base}/sessions/{sid}/step", json={"action": action}, timeout=300)
        resp.raise_for_status()
        out = resp.json()
    session.delete(f"{base}/sessions/{sid}", timeout=300)
    if out["reward"] != 1.0:
        raise RuntimeError(f"expert failed over HTTP on {name}/{tid}: {out['status']}")
    return out


def over_http(base: str, jobs: List[Tuple[str, str]], concurrency: int) -> float:
    sessions = [requests.Session() for _ in range(concurrency)]

    def worker(k: int) -> None:
        for name, tid in jobs[k::concurrency]:
            http_episode(base, name, tid, sessions[k])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    return len(jobs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=64)
    ap.add_argument("--envs", default="db,os")
    ap.add_argument("--db-backend", default="auto", choices=["auto", "mariadb", "sqlite"])
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--heldout-episodes", default="16,48",
                    help="ALFWorld,MiniWoB episodes for alfworld/miniwob_speedup_c8 (0,0 skips them)")
    args = ap.parse_args()
    names = [n for n in args.envs.split(",") if n]
    specs = env_specs(names, args.db_backend)
    jobs = jobs_for(specs, args.episodes)
    levels = [int(c) for c in args.concurrency.split(",")]

    base_eps = serial(specs, jobs)
    print(f"in-process serial: {base_eps:.2f} episodes/s ({len(jobs)} episodes: {', '.join(names)})")

    import ray
    from ray import serve

    from serve.env_server import EnvServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(EnvServer.options(ray_actor_options={"num_cpus": 0}).bind(specs, max(levels) + 8, 600.0),
                  name="env_bench", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        http_episode(base, *jobs[0], requests.Session())  # warm-up
        rates = {c: over_http(base, jobs, c) for c in levels}
        serve.shutdown()
        n_alf, n_mw = (int(n) for n in args.heldout_episodes.split(","))
        heldout = {}
        if n_alf and n_mw:  # ALFWorld and MiniWoB++ at c8 (bench/env_throughput_heldout.py)
            from env_throughput_heldout import heldout_speedups

            heldout = heldout_speedups(n_alf, n_mw, 8)
    finally:
        serve.shutdown()
        ray.shutdown()
    for c, r in rates.items():
        print(f"env server over HTTP, concurrency {c:>2}: {r:.2f} episodes/s  ({r / base_eps:.2f}x serial)")
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "env_throughput.json"), "w") as f:
        json.dump({"episodes": len(jobs), "envs": names, "db_backend": args.db_backend,
                   "serial_eps": base_eps, "http_eps": rates}, f, indent=1)
    sp = {c: rates[c] / base_eps for c in levels}
    extra = "".join(f" {k}_speedup_c8={v['speedup']:.2f}" for k, v in heldout.items())
    print(f"RESULT speedup_c8={sp.get(8, float('nan')):.2f} speedup_c32={sp.get(32, float('nan')):.2f}{extra}")


if __name__ == "__main__":
    main()
