"""The tiny local model: built from config on demand, loadable and usable with no project code."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from agenttuning.config import load_config
from agenttuning.models import ensure_model


def test_ensure_model_builds_hf_folder_once(tmp_path):
    path = tmp_path / "tiny"
    cfg = load_config(None, [f"model.name_or_path={path}", "model.tiny.enabled=true", "model.tiny.vocab_size=512"])
    assert ensure_model(cfg) == str(path)
    mtime = (path / "model.safetensors").stat().st_mtime
    ensure_model(cfg)  # present already: not rebuilt
    assert (path / "model.safetensors").stat().st_mtime == mtime
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert len(tok) == model.config.vocab_size == 512
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>" and tok.bos_token == "<s>"
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == len(ids) + 4 or tok.eos_token_id in out[0, len(ids):].tolist()
    # Every byte is encodable (byte-level BPE): no <unk> for unseen scripts.
    assert tok.unk_token_id not in tok("数据 ✓ ünïcödé", add_special_tokens=False)["input_ids"]
