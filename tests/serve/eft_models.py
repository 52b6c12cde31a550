"""Three tiny Llamas sharing the tiny model's tokenizer, for the EFT server tests."""

import pathlib
import shutil
from typing import Dict

import torch


def save_variant(src: pathlib.Path, out: pathlib.Path, *, layers=None, hidden=None, vocab=None, noise=0.0,
                 seed=0) -> pathlib.Path:
    """A Llama beside the tiny one (same tokenizer files): resized (random) or a perturbed copy."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.manual_seed(seed)
    if layers or hidden or vocab:
        cfg = base.config
        cfg.num_hidden_layers = layers or cfg.num_hidden_layers
        cfg.hidden_size = hidden or cfg.hidden_size
        cfg.intermediate_size = 2 * cfg.hidden_size
        cfg.vocab_size = vocab or cfg.vocab_size
        cfg.initializer_range = 0.2
        model = LlamaForCausalLM(cfg)
    else:
        model = base
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn_like(p))
    model.save_pretrained(out)
    for f in src.iterdir():
        if "token" in f.name or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    return out


def build_trio(tiny_model_dir: pathlib.Path, root: pathlib.Path) -> Dict[str, str]:
    """large_base (3 layers, wider, random), small_base (a perturbed copy), small_ft (the tiny model)."""
    return {
        "large_base": str(save_variant(tiny_model_dir, root / "large", layers=3, hidden=96, seed=1)),
        "small_base": str(save_variant(tiny_model_dir, root / "base", noise=0.3, seed=2)),
        "small_ft": str(tiny_model_dir),
        "root": root,
    }
