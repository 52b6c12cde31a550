"""ALFWorld and MiniWoB++ throughput through the env server: expert episodes/s over HTTP at
concurrency 8 against the same episodes run in-process serially (the baseline), in one run.

Uses the episode drivers of ``bench/env_throughput.py`` (same HTTP session protocol, same
warm-up, same expert check), on ALFWorld's 20 AgentBench dev games and on MiniWoB++ tasks with a
scripted solver (``serve.envs.miniwob_expert.SOLVERS``), ``--replicas`` env-server replicas.
``bench/env_throughput.py`` runs this too and appends the two keys to its RESULT line.

    python bench/env_throughput_heldout.py [--alfworld-episodes 16] [--miniwob-episodes 48]

Last line: RESULT alfworld_speedup_c8=<x> miniwob_speedup_c8=<y>
"""

import argparse
import json
import os
import socket
import sys
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from env_throughput import jobs_for, over_http, serial  # noqa: E402

from serve.envs.miniwob_expert import SOLVERS  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def specs_for(concurrency: int) -> Dict[str, Dict[str, dict]]:
    """Per environment: served specs with a backend pool as large as the concurrency."""
    return {
        "alfworld": {"alfworld": {"path": None, "options": {"max_engines": concurrency}}},
        "miniwob": {"miniwob": {"path": None, "options": {
            "task_names": sorted(SOLVERS), "episodes_per_task": 10, "max_browsers": concurrency}}},
    }


def measure(name: str, spec: Dict[str, dict], episodes: int, concurrency: int,
            replicas: int = 2, http_c1: bool = False) -> Dict[str, float]:
    """Serial in-process episodes/s, then over HTTP at ``concurrency`` on a fresh env server
    with ``replicas`` replicas (ALFWorld's engine is GIL-bound: processes, not threads, scale it)."""
    from ray import serve

    from serve.env_server import EnvServer

    jobs = jobs_for(spec, episodes)
    base_eps = serial(spec, jobs)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        opts = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0}}
        serve.run(EnvServer.options(**opts).bind(spec, concurrency + 8, 600.0),
                  name=f"bench_{name}", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        over_http(base, jobs[:concurrency], concurrency)  # warm-up: start every pooled backend
        http_eps = over_http(base, jobs, concurrency)
        # The same server one episode at a time: concurrency's own gain, HTTP cost on both sides.
        c1_eps = over_http(base, jobs, 1) if http_c1 else None
    finally:
        serve.shutdown()
    print(f"{name}: serial in-process {base_eps:.2f} episodes/s, env server ({replicas} replicas) c{concurrency} "
          f"{http_eps:.2f} episodes/s ({http_eps / base_eps:.2f}x serial; {len(jobs)} episodes)")
    out = {"serial_eps": base_eps, "http_eps": http_eps, "speedup": http_eps / base_eps,
           "episodes": len(jobs), "replicas": replicas}
    if c1_eps:
        out.update(http_c1_eps=c1_eps, speedup_vs_http_c1=http_eps / c1_eps)
        print(f"{name}: env server c1 {c1_eps:.2f} episodes/s; c{concurrency} / c1 = {http_eps / c1_eps:.2f}x")
    return out


def heldout_speedups(alfworld_episodes: int, miniwob_episodes: int, concurrency: int = 8,
                     replicas: int = 2) -> Dict[str, Dict[str, float]]:
    """Both measurements on the running Ray (no Serve app may be running)."""
    specs = specs_for(concurrency)
    out = {"alfworld": measure("alfworld", specs["alfworld"], alfworld_episodes, concurrency, replicas),
           "miniwob": measure("miniwob", specs["miniwob"], miniwob_episodes, concurrency, replicas)}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "env_throughput_heldout.json"), "w") as f:
        json.dump({"concurrency": concurrency, "cpus": os.cpu_count(), **out}, f, indent=1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--alfworld-episodes", type=int, default=16)
    ap.add_argument("--miniwob-episodes", type=int, default=48)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2, help="env-server replicas (default: 2 = CPUs here)")
    args = ap.parse_args()
    import ray

    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    try:
        out = heldout_speedups(args.alfworld_episodes, args.miniwob_episodes, args.concurrency, args.replicas)
    finally:
        ray.shutdown()
    c = args.concurrency
    print(f"RESULT alfworld_speedup_c{c}={out['alfworld']['speedup']:.2f} "
          f"miniwob_speedup_c{c}={out['miniwob']['speedup']:.2f}")


if __name__ == "__main__":
    main()
