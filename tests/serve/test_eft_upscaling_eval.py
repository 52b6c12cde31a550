"""configs/eval_eft_upscaling.yaml on three tiny models: every β is served as its own EFT app and
evaluated beside the plain small model in one report (the EFT paper's up-scaling evaluation)."""

import json
import pathlib
import sys

from agenttuning.config import load_config

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from eft_models import build_trio  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_eft_upscaling_config_on_tiny_models(ray_local, tiny_model_dir, tmp_path):
    from ray import serve

    from pipelines.evaluate import main
    from serve.openai_api import free_port

    trio = build_trio(tiny_model_dir, tmp_path)
    serve.shutdown()  # a Serve instance keeps its first HTTP port
    cfg = load_config(str(REPO / "configs" / "eval_eft_upscaling.yaml"), [
        f"model.name_or_path={trio['small_ft']}", "model.dtype=auto", f"eft.large_base={trio['large_base']}",
        f"eft.small_base={trio['small_base']}", "eft.placement=colocated", "eft.device=cpu", "eft.dtype=float32",
        "eft.num_cpus=0", "eft.num_gpus=0", "eft.large_num_gpus=null", "eft.speculative_k=2",
        "serve.num_gpus=0", "serve.num_cpus=0", "serve.rollout.num_cpus=0", f"serve.port={free_port()}",
        f"eval.output_dir={tmp_path / 'eval'}", "eval.limit=1", "eval.concurrency=2", "eval.strict=false",
        "eval.tasks=[{name: db, env: db, category: held_in, path: '${data:agentbench/dbbench_dev.jsonl}', "
        "options: {backend: sqlite, max_turns: 2}}]",
        "eval.general.0.limit=1", "eval.general.0.max_tokens=8", "wandb.mode=disabled",
    ] + [f"eval.policies.{p}.max_tokens=8" for p in ("agentlm_7b", "eft_beta_0", "eft_beta_05", "eft_beta_1", "eft_beta_15")])
    report = main(cfg)
    pols = report["policies"]
    assert set(pols) == {"agentlm_7b", "eft_beta_0", "eft_beta_05", "eft_beta_1", "eft_beta_15"}
    for name, p in pols.items():
        assert p["tasks"]["db"]["n"] == 1 and p["tasks"]["gsm8k"]["n"] == 1, (name, p["tasks"])
    # Each β app answered as itself: the trajectories name every policy, and β changes the text.
    eps = [json.loads(line) for line in (tmp_path / "eval" / "trajectories.jsonl").read_text().splitlines()]
    replies = {e["policy"]: e["conversations"][-2]["value"] for e in eps}
    assert set(replies) == set(pols) and len(set(replies.values())) > 1, replies
    serve.shutdown()
