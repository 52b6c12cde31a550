"""Build a small model for the embedded default and tests, with no hub access.

A byte-level BPE tokenizer is trained on given text (Llama-2-chat template and the special tokens
<s> </s> <unk> <pad>), and a randomly initialised Llama-architecture model of configured size is
created; both are saved in Hugging Face format, so `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load them with no project code.

    agenttuning build-model CONFIG [model.tiny.hidden_size=128 ...]   # builds into model.name_or_path
"""

import logging
import os
from pathlib import Path

from omegaconf import DictConfig

from pipelines.config import TinyModelConfig
from pipelines.sources import iter_text

log = logging.getLogger(__name__)

DEFAULT_CORPUS = Path(__file__).parent / "assets" / "tiny_corpus.txt"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3 in this order


def build_tokenizer(cfg: TinyModelConfig):
    """Train a byte-level BPE tokenizer and wrap it as a HF fast tokenizer with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pipelines.chat import LLAMA2_CHAT_TEMPLATE

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


def ensure_model(cfg: DictConfig) -> str:
    """Build the tiny model into model.name_or_path when the config asks for it and it is absent."""
    path = cfg.model.name_or_path
    if cfg.model.tiny.enabled and not os.path.isfile(os.path.join(path, "config.json")):
        build_tiny_model(path, TinyModelConfig(**cfg.model.tiny))
    return path


def main(cfg: DictConfig) -> None:
    """`agenttuning build-model CONFIG`: (re)build the tiny model into model.name_or_path."""
    path = build_tiny_model(cfg.model.name_or_path, TinyModelConfig(**cfg.model.tiny))
    print(f"tiny model written to {path}")


if __name__ == "__main__":
    import sys

    from pipelines.cli import run_job

    sys.exit(run_job("pipelines.tiny", sys.argv[1:]))
