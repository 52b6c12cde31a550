"""GPU path of the training job: bf16, ZeRO-3, flash attention. Skipped by default (-m gpu)."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_train import _cfg, _jsonl, _run, data_dir  # noqa: E402,F401

pytestmark = pytest.mark.gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_bf16_zero3_one_gpu_worker(ray_local, tiny_model_dir, data_dir, tmp_path):  # noqa: F811
    result = _run(ray_local, _cfg(tiny_model_dir, data_dir, tmp_path, "scaling.use_gpu=true", "scaling.num_workers=1",
                                  "scaling.resources_per_worker={GPU: 1, CPU: 1}", "train.zero_stage=3",
                                  "train.precision=bf16", "train.max_steps=6", "train.warmup_steps=0",
                                  "train.save_every=6", "train.log_every=1"))
    metrics = _jsonl(tmp_path / "tiny-cpu" / "metrics.jsonl")
    assert all(m["mfu"] is not None and m["mfu"] > 0 for m in metrics)
    cfg = json.loads((tmp_path / "tiny-cpu" / "checkpoint_000006" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" or cfg.get("torch_dtype") == "bfloat16"
    assert result.checkpoint is not None


@needs_cuda
def test_flash_attention_packed_loss_equals_separate(tiny_model_dir):
    pytest.importorskip("flash_attn")
    from transformers import AutoModelForCausalLM

    from test_train_utils import _row, _samples
    from pipelines.train_utils import packed_forward

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    samples = [(a.cuda(), b.cuda(), g) for a, b, g in _samples()]
    with torch.no_grad():
        packed = packed_forward(model, {k: v.cuda() for k, v in _row(samples).items()})
        separate = sum(packed_forward(model, {k: v.cuda() for k, v in _row([s], pad_to=len(s[0])).items()})["sum_ce"]
                       for s in samples)
    torch.testing.assert_close(packed["sum_ce"], separate, rtol=2e-2, atol=2e-2)
