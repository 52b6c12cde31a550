"""Training maths without Ray: packed attention, loss normalisation, schedule, DeepSpeed config, checks."""

import copy
import dataclasses

import pytest
import torch

from agenttuning.config import ConfigError, load_config, to_object
from pipelines.train_utils import (
    IGNORE, backward_scale, check_tokenizer, deepspeed_config, lr_lambda, packed_forward, shifted_targets,
    worker_rows,
)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    return model


def _samples():
    g = torch.Generator().manual_seed(1)
    out = []
    for n, p, grp in ((9, 4, 0), (13, 6, 1), (7, 2, 0)):
        ids = torch.randint(10, 500, (n,), generator=g)
        labels = ids.clone()
        labels[:p] = IGNORE
        out.append((ids, labels, grp))
    return out


def _row(samples, pad_to=36, restart=True):
    ids = torch.cat([s[0] for s in samples])
    labels = torch.cat([s[1] for s in samples])
    pos = torch.cat([torch.arange(len(s[0])) for s in samples]) if restart else torch.arange(len(ids))
    groups = torch.cat([torch.full((len(s[0]),), s[2]) for s in samples])
    fill = pad_to - len(ids)
    return {"input_ids": torch.cat([ids, torch.zeros(fill, dtype=torch.long)])[None],
            "labels": torch.cat([labels, torch.full((fill,), IGNORE)])[None],
            "position_ids": torch.cat([pos, torch.zeros(fill, dtype=torch.long)])[None],
            "group_ids": torch.cat([groups, torch.full((fill,), -1)])[None]}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_separate_loss(tiny, attn):
    tiny.set_attn_implementation(attn)
    samples = _samples()
    with torch.no_grad():
        packed = packed_forward(tiny, _row(samples))
        separate = [packed_forward(tiny, _row([s], pad_to=len(s[0]))) for s in samples]
        leaky = packed_forward(tiny, _row(samples, restart=False))
    tiny.set_attn_implementation("sdpa")
    sum_sep = sum(r["sum_ce"] for r in separate)
    assert int(packed["n_sup"]) == sum(int(r["n_sup"]) for r in separate) == (9 - 4) + (13 - 6) + (7 - 2)
    torch.testing.assert_close(packed["sum_ce"], sum_sep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed["group_ce"], sum(r["group_ce"] for r in separate), rtol=1e-5, atol=1e-5)
    # Control: one continuous sequence lets samples attend to each other and changes the loss.
    assert abs(float(leaky["sum_ce"] - sum_sep)) > 1e-3


def test_targets_never_cross_sample_boundaries():
    row = _row(_samples())
    tgt = shifted_targets(row["labels"], row["position_ids"])
    starts = (row["position_ids"][0] == 0).nonzero().flatten().tolist()
    for s in starts[1:]:
        assert tgt[0, s - 1] == IGNORE  # last token of a sample does not predict the next sample
    assert tgt[0, 0] == row["labels"][0, 1]


def test_global_normalisation_is_independent_of_workers_and_accumulation(tiny):
    """Σ over (workers × micro-batches) of backward_scale-weighted sums, averaged over workers as
    DeepSpeed does, equals the gradient of the global token mean for any factorisation."""
    rows = [_row(_samples()[i:i + 1 + i % 2], pad_to=24) for i in range(2)] + [_row(_samples()[1:], pad_to=24)] * 2
    params = [p for p in tiny.parameters() if p.requires_grad]

    def grads(world: int, gas: int):
        tiny.zero_grad()
        n_sup = sum(int((shifted_targets(r["labels"], r["position_ids"]) != IGNORE).sum()) for r in rows)
        for rank in range(world):
            for i in range(gas):
                r = packed_forward(tiny, rows[i * world + rank])
                (r["sum_ce"] * backward_scale(world, n_sup) / world).backward()  # ÷ world: DP averaging
        return [p.grad.clone() for p in params]

    ref = grads(1, 4)
    for world, gas in ((2, 2), (4, 1)):
        for a, b in zip(ref, grads(world, gas)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # And it is the mean over tokens, not the mean of per-row means (rows differ in supervised tokens).
    tiny.zero_grad()
    cat = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    out = packed_forward(tiny, cat)
    (out["sum_ce"] / out["n_sup"]).backward()
    torch.testing.assert_close(ref[0], params[0].grad, rtol=1e-5, atol=1e-7)
    tiny.zero_grad()


def test_lr_schedule_warmup_then_cosine():
    fn = lr_lambda(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert fn(10) == pytest.approx(1.0) and fn(55) == pytest.approx(0.55)
    assert fn(100) == pytest.approx(0.1) and fn(500) == pytest.approx(0.1)


def test_worker_rows_take_the_rank_slice_of_every_group():
    import numpy as np

    batch = {"input_ids": np.array([np.arange(4) + 10 * i for i in range(7)], dtype=object)}
    assert [r[0] for r in worker_rows(batch, rank=1, micro=1, world=2)["input_ids"].tolist()] == [10, 30, 50]
    assert [r[0] for r in worker_rows(batch, rank=1, micro=2, world=3)["input_ids"].tolist()] == [20, 30]
    assert worker_rows(batch, rank=0, micro=4, world=2)["input_ids"].shape[0] == 0  # no complete group


def test_deepspeed_config_from_ours():
    cfg = load_config(None, ["scaling.num_workers=4", "train.global_batch_size=64", "train.micro_batch_size=2",
                             "train.zero_stage=3"])
    t = to_object(cfg.train)
    ds = deepspeed_config(t, use_gpu=False, world_size=4)
    assert ds["gradient_accumulation_steps"] == 8 and ds["train_batch_size"] == 64
    assert ds["zero_optimization"]["stage"] == 3 and not ds["bf16"]["enabled"] and "optimizer" not in ds
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]
    gpu = deepspeed_config(dataclasses.replace(t, offload_optimizer="cpu"), use_gpu=True, world_size=4)
    assert gpu["bf16"]["enabled"] and gpu["optimizer"]["type"] == "AdamW"
    assert gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("overrides, key", [
    (["scaling.num_workers=3", "train.global_batch_size=64"], "train.global_batch_size"),
    (["train.global_batch_size=6", "train.micro_batch_size=4"], "train.global_batch_size"),
    (["train.zero_stage=2", "train.offload_param=cpu", "scaling.use_gpu=true"], "train.offload_param"),
    (["train.zero_stage=3", "train.offload_param=cpu"], "train.offload_param"),
    (["train.zero_stage=0", "train.offload_optimizer=cpu", "scaling.use_gpu=true"], "train.offload_optimizer"),
    (["train.zero_stage=3", "train.offload_param=nvme", "scaling.use_gpu=true"], "train.offload_param"),
    (["train.precision=bf16"], "train.precision"),
    (["train.attn_implementation=flash_attention_2"], "train.attn_implementation"),
    (["train.zero_stage=4"], "train.zero_stage"),
    (["train.warmup_steps=5000"], "train.warmup_steps"),
])
def test_bad_train_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, overrides)


def test_tokenizer_mismatch_is_refused():
    manifest = {"tokenizer": {"name_or_path": "other-model", "fingerprint": "abc"}}
    with pytest.raises(ConfigError, match="other-model.*rebuild the data"):
        check_tokenizer(manifest, "d", "m", "def")
    check_tokenizer(copy.deepcopy(manifest), "d", "m", "abc")
    with pytest.raises(ConfigError, match="no tokenizer fingerprint"):
        check_tokenizer({}, "d", "m", "abc")
