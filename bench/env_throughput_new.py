"""The six newer environments through the env server: expert episodes/s over HTTP at concurrency 8
against the same episodes run in-process serially (the baseline), in one run.

Offline instances, as the tests build them: KG on the test graph in pyoxigraph, WebShop on the test
catalogue, Mind2Web on the hand-built records, ReWOO's HotpotQA questions, the card game (games the
expert wins), WebArena on the local test shop in headless Chromium. Uses the episode drivers of
``bench/env_throughput.py`` and ``measure`` of ``bench/env_throughput_heldout.py``.

    python bench/env_throughput_new.py [--episodes 24] [--envs kg,webshop,mind2web,rewoo,dcg,webarena]

Last line: RESULT kg_speedup_c8=<x> kg_http_speedup_c8=<x> ... : episodes/s at c8 over HTTP relative to
the in-process serial baseline, and relative to the same server at c1 (concurrency's own gain)
"""

import argparse
import importlib.util
import json
import os
import pathlib
import sys
import tempfile
from typing import Dict

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE), str(REPO / "tests" / "serve" / "envs")]

from env_throughput_heldout import measure  # noqa: E402


RESULTS = HERE / "results"
SITE = REPO / "tests" / "serve" / "envs" / "webarena_site"


def specs(names, tmp: pathlib.Path, concurrency: int, shop_url: str) -> Dict[str, Dict[str, dict]]:
    out: Dict[str, Dict[str, dict]] = {}
    if "kg" in names:
        import kg_testgraph
        import kg_testonto

        records = kg_testgraph.load_records()
        onto = kg_testonto.derive_ontology(records)
        graph = kg_testgraph.build(records, onto)
        nt = graph.write_nt(tmp / "kg.nt")
        # The std tasks the test graph holds and whose gold actions AgentBench's rules accept (the
        # others end unsolved by design, tests/serve/envs/test_kg.py), so every episode is the same work.
        solvable = [rec for (split, idx), rec in sorted(records.items())
                    if split == "std" and (split, idx) in graph.held
                    and kg_testgraph.agentbench_static_failure(rec, onto) is None]
        (tmp / "kg_std_solvable.json").write_text(json.dumps(solvable))
        out["kg"] = {"kg": {"path": str(tmp / "kg_std_solvable.json"),
                            "options": {"graph_file": str(nt), "ontology": "store"}}}
    if "webshop" in names:
        import webshop_testshop

        out["webshop"] = {"webshop": {"path": str(webshop_testshop.write(tmp / "webshop")),
                                      "options": {"noun_tagger": "content_words"}}}
    if "mind2web" in names:
        out["mind2web"] = {"mind2web": {"path": str(REPO / "tests/serve/envs/mind2web_data"), "options": {}}}
    if "rewoo" in names:
        out["rewoo"] = {"rewoo": {"path": None, "options": {}}}
    if "dcg" in names:
        out["dcg"] = {"dcg": {"path": None, "options": {"split": "dev"}}}
    if "webarena" in names:
        out["webarena"] = {"webarena": {"path": str(SITE / "tasks.json"), "options": {
            "sites": {"shopping": shop_url}, "auth_dir": str(SITE / "auth"), "gold_actions": str(SITE / "gold_actions.json"),
            "max_browsers": concurrency, "settle_s": 0, "html_wait_s": 0}}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=24)
    ap.add_argument("--envs", default="kg,webshop,mind2web,rewoo,dcg,webarena")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--replicas", type=int, default=2)
    args = ap.parse_args()
    names = [n for n in args.envs.split(",") if n]
    import ray

    spec_mod = importlib.util.spec_from_file_location("webarena_site", SITE / "shop.py")
    site = importlib.util.module_from_spec(spec_mod)
    spec_mod.loader.exec_module(site)
    server, shop_url = site.serve()
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=False)
    out = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name, spec in specs(names, pathlib.Path(tmp), args.concurrency, shop_url).items():
                episodes = args.episodes if name != "webarena" else min(args.episodes, 12)
                out[name] = measure(name, spec, episodes, args.concurrency, args.replicas, http_c1=True)
    finally:
        ray.shutdown()
        server.shutdown()
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "env_throughput_new.json", "w") as f:
        json.dump({"concurrency": args.concurrency, "cpus": os.cpu_count(), **out}, f, indent=1)
    c = args.concurrency
    # speedup_c8: over HTTP at c8 vs the same episodes in-process, serial (no HTTP, no Ray: these
    # offline instances step in microseconds, so this mostly prices the transport);
    # http_speedup_c8: c8 vs c1 on the same env server (what concurrency itself buys).
    print("RESULT " + " ".join(f"{n}_speedup_c{c}={r['speedup']:.2f} {n}_http_speedup_c{c}={r['speedup_vs_http_c1']:.2f}"
                               for n, r in out.items()))


if __name__ == "__main__":
    main()
