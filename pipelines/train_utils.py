"""Pure helpers of the training job (no Ray here): loss, schedule, DeepSpeed config, data checks.

Kept apart from `pipelines.train` so they can be unit-tested in one process and reused by the
throughput benchmark's plain-PyTorch baseline.
"""

import json
import logging
import math
import os
import zlib
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from agenttuning.config import ConfigError
from agenttuning.schema import TrainConfig

log = logging.getLogger(__name__)

IGNORE = -100
GROUPS = ("agent", "general")  # group_ids 0 and 1 in the data job's output
COLUMNS = ("input_ids", "labels", "position_ids", "group_ids")

# Dense bf16 peak of common accelerators (TFLOP/s), for the MFU estimate.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


# ----------------------------------------------------------------------------- loss


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Next-token targets for a packed row: target[t] = labels[t+1], never across samples.

    A position whose successor starts a new packed sample (position_ids == 0) gets IGNORE, so the
    last token of one sample is never trained to predict the first token of the next.
    labels, position_ids: [B, T] → [B, T]
    """
    nxt = labels[:, 1:].clone()  # [B, T-1]
    nxt[position_ids[:, 1:] == 0] = IGNORE
    pad = torch.full_like(labels[:, :1], IGNORE)
    return torch.cat([nxt, pad], dim=1)


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy in fp32 (0 where target is IGNORE). logits [B, T, V] → [B, T]."""
    b, t, v = logits.shape
    ce = F.cross_entropy(logits.float().reshape(b * t, v), targets.reshape(b * t), ignore_index=IGNORE,
                         reduction="none")
    return ce.view(b, t)


def packed_forward(model: torch.nn.Module, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Forward one packed micro-batch; returns loss sums (not means) so callers can normalise globally.

    Attention stays inside each packed sample: we pass position_ids with attention_mask=None and no
    cache, and transformers (>= 4.56 masking_utils) derives a block-diagonal causal mask from the
    restarts (sdpa/eager) or cu_seqlens (flash-attention varlen). Verified by the packed-vs-separate test.
    Logits are computed only where some row has a target (``logits_to_keep``): with loss on assistant
    turns only, most positions have none, and the [B, T, V] logits are the largest activation.
    Returns sum_ce (scalar), n_sup (scalar), and per-group sums/counts [len(GROUPS)].
    """
    targets = shifted_targets(batch["labels"], batch["position_ids"])  # [B, T]
    sup = targets != IGNORE
    keep = sup.any(dim=0).nonzero()[:, 0]  # [K] positions with a target in some row
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                logits_to_keep=keep)
    ce = token_losses(out.logits, targets[:, keep])  # [B, K]
    res = {"sum_ce": ce.sum(), "n_sup": sup.sum()}
    if "group_ids" in batch:
        # The group of a target token is the group of the token it predicts.
        gid = torch.cat([batch["group_ids"][:, 1:], torch.full_like(batch["group_ids"][:, :1], -1)], dim=1)
        res["group_ce"] = torch.stack([(ce * (gid[:, keep] == g)).sum() for g in range(len(GROUPS))]).detach()
        res["group_n"] = torch.stack([((gid == g) & sup).sum() for g in range(len(GROUPS))])
    return res


def backward_scale(world_size: int, n_sup_global: int) -> float:
    """Factor turning a micro-batch's local CE *sum* into the value handed to DeepSpeed's backward.

    Objective per optimizer step: L = Σ_{all workers, all micro-batches} CE / N_sup(global batch).
    DeepSpeed averages gradients over data-parallel ranks (÷ world_size) and we call backward with
    scale_wrt_gas=False, so each micro-batch contributes sum_ce · world_size / N_sup_global.
    """
    return world_size / max(int(n_sup_global), 1)


def lr_lambda(max_steps: int, warmup_steps: int, min_lr_ratio: float):
    """Linear warmup then cosine decay to min_lr_ratio·lr at max_steps (multiplier for LambdaLR)."""

    def fn(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(max_steps - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


# ----------------------------------------------------------------------------- batches


def row_digest(input_ids: torch.Tensor) -> List[int]:
    """A stable 32-bit id per row (crc32 of its tokens) to log which samples a step saw."""
    arr = input_ids.to(torch.int64).cpu().numpy()
    return [zlib.crc32(r.tobytes()) for r in arr]


def worker_rows(batch: Dict[str, Any], rank: int, micro: int, world: int) -> Dict[str, torch.Tensor]:
    """This worker's rows of a batch made of whole (micro · world)-row groups, as int64 tensors.

    Every worker reads the same ordered stream and keeps rows [rank·micro, (rank+1)·micro) of each
    group, so a global step always covers the same rows whatever the worker count and accumulation.
    A trailing incomplete group (end of the data) is dropped. Result: [n_groups · micro, T].
    """
    group = micro * world
    n = len(batch["input_ids"]) // group
    idx = np.array([g * group + rank * micro + j for g in range(n) for j in range(micro)], dtype=np.int64)
    out = {}
    for k in COLUMNS:
        if k in batch:
            v = np.asarray(batch[k])[idx] if n else np.asarray(batch[k])[:0]
            if v.dtype == object:  # Arrow list column → array of arrays
                v = np.stack(list(v)).astype(np.int64) if len(v) else np.zeros((0, 0), dtype=np.int64)
            out[k] = torch.as_tensor(v).to(torch.int64)
    return out


# ----------------------------------------------------------------------------- DeepSpeed


def precision(train: TrainConfig, use_gpu: bool) -> str:
    """fp32 on CPU; bf16 on GPU unless the config says otherwise."""
    p = str(train.precision)
    return ("bf16" if use_gpu else "fp32") if p == "auto" else p


def deepspeed_config(train: TrainConfig, use_gpu: bool, world_size: int) -> Dict[str, Any]:
    """DeepSpeed config assembled from our `train` section (see docs/training.md)."""
    gas = train.global_batch_size // (world_size * train.micro_batch_size)
    prec = precision(train, use_gpu)
    stage = int(train.zero_stage)
    zero: Dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update({"overlap_comm": use_gpu, "contiguous_gradients": True, "reduce_scatter": True})
    if stage == 3:
        zero.update({
            "stage3_gather_16bit_weights_on_model_save": True,  # HF checkpoints need full weights
            "stage3_param_persistence_threshold": 1e5,
            "stage3_prefetch_bucket_size": 5e7,
        })
    for kind in ("optimizer", "param"):
        dev = str(getattr(train, f"offload_{kind}"))
        if dev != "none":
            zero[f"offload_{kind}"] = {"device": dev, "pin_memory": True}
            if dev == "nvme":
                zero[f"offload_{kind}"]["nvme_path"] = train.nvme_path
    cfg: Dict[str, Any] = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW on CPU
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16"},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    if use_gpu:
        # Fused Adam on GPU; DeepSpeed's CPU Adam when the optimizer state is offloaded.
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": train.lr, "betas": list(train.adam_betas), "eps": train.adam_eps,
            "weight_decay": train.weight_decay}}
    return cfg


# ----------------------------------------------------------------------------- data checks


def read_manifest(data_dir: str) -> Dict[str, Any]:
    """The data job's manifest.json; ConfigError naming train.data_dir when it is missing."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.isdir(data_dir):
        raise ConfigError(f"config key 'train.data_dir': directory not found: {data_dir}")
    if not os.path.isfile(path):
        raise ConfigError(f"config key 'train.data_dir': {data_dir} has no manifest.json (not a data job output)")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def manifest_fingerprint(manifest: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """(tokenizer name_or_path, vocabulary fingerprint) recorded by the data job."""
    tok = manifest.get("tokenizer")
    if isinstance(tok, str):
        return tok, None
    if not isinstance(tok, dict):
        return None, None
    fp = next((tok[k] for k in ("fingerprint", "vocab_hash", "hash") if tok.get(k)), None)
    return tok.get("name_or_path"), fp


def check_tokenizer(manifest: Dict[str, Any], data_dir: str, model_path: str, model_fp: str) -> None:
    """Refuse data tokenized with a different vocabulary than the model's."""
    name, fp = manifest_fingerprint(manifest)
    if fp is None:
        raise ConfigError(
            f"config key 'train.data_dir': {data_dir}/manifest.json records no tokenizer fingerprint; "
            "rebuild the data with `agenttuning data`")
    if fp != model_fp:
        raise ConfigError(
            f"config key 'train.data_dir': data in {data_dir} was tokenized with {name!r} (vocab "
            f"fingerprint {fp}) but model.name_or_path={model_path!r} has fingerprint {model_fp}; "
            "rebuild the data with this model's tokenizer")


def parquet_files(data_dir: str) -> List[str]:
    files = sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir)
                   if f.startswith("part-") and f.endswith(".parquet"))
    if not files:
        raise ConfigError(f"config key 'train.data_dir': no part-*.parquet shards in {data_dir}")
    return files


# ----------------------------------------------------------------------------- metrics


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6·N for the dense part + 12·L·H·T for attention (PaLM appendix B)."""
    return 6.0 * n_params + 12.0 * n_layers * hidden * seq_len


def peak_tflops(device_name: str, override: Optional[float]) -> Optional[float]:
    if override:
        return override
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def peak_memory_gb(use_gpu: bool) -> float:
    if use_gpu and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
