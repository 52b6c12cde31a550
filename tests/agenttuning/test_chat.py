"""Chat rendering and loss masks: exactly the assistant turns with loss != false are supervised."""

import pytest

from agenttuning.chat import (
    IGNORE_INDEX,
    LLAMA2_CHAT_TEMPLATE,
    ChatError,
    _render_generic,
    encode_chat,
    load_tokenizer,
    normalize_messages,
    preview,
    prompt_ids,
    render,
)
from agenttuning.config import AGENTLM_SYSTEM_PROMPT

AGENT_RECORD = [  # AgentInstruct shape: a one-shot demonstration marked loss: false, then the task
    {"role": "user", "content": "You are an OS agent. Example: how many files are in /etc?", "loss": False},
    {"role": "assistant", "content": "Think: count them.\n\nAct: bash\n\n```bash\nls /etc | wc -l\n```", "loss": False},
    {"role": "user", "content": "The output of the OS:\n\n220", "loss": False},
    {"role": "assistant", "content": "Think: done.\n\nAct: answer(220)", "loss": False},
    {"role": "user", "content": "Now, I will start a new problem. How many users are there?"},
    {"role": "assistant", "content": "Think: count lines of /etc/passwd.\n\nAct: bash\n\n```bash\nwc -l < /etc/passwd\n```"},
    {"role": "user", "content": "The output of the OS:\n\n27"},
    {"role": "assistant", "content": "Think: the answer is 27.\n\nAct: answer(27)"},
]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(str(tiny_model_dir))


def supervised_runs(ids, labels):
    """Maximal runs of consecutive supervised positions: [(start, [ids])]."""
    runs, cur, start = [], [], None
    for i, (t, lab) in enumerate(zip(ids, labels)):
        if lab != IGNORE_INDEX:
            assert lab == t, "labels must equal input_ids where supervised (the model shifts)"
            if start is None:
                start = i
            cur.append(t)
        elif cur:
            runs.append((start, cur))
            cur, start = [], None
    if cur:
        runs.append((start, cur))
    return runs


def test_fast_path_matches_jinja_template(tok):
    msgs = normalize_messages(AGENT_RECORD)
    text, _ = render(tok, msgs)
    assert text == tok.apply_chat_template(msgs, tokenize=False)
    assert text.startswith("<s>[INST] <<SYS>>\n" + AGENTLM_SYSTEM_PROMPT + "\n<</SYS>>\n\n")
    generic_text, generic_spans = _render_generic(tok, msgs)
    assert (generic_text, generic_spans) == render(tok, msgs)


def test_mask_supervises_exactly_the_loss_turns(tok):
    ids, labels = encode_chat(tok, AGENT_RECORD)
    runs = supervised_runs(ids, labels)
    expected = [m["content"] for m in AGENT_RECORD if m["role"] == "assistant" and m.get("loss") is not False]
    assert [tok.decode(r) for _, r in runs] == [f" {c} </s>" for c in expected]
    # The end-of-turn token is supervised; no role marker / BOS / user text ever is.
    text, spans = render(tok, normalize_messages(AGENT_RECORD))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    for (s, e), lab, t in zip(enc["offset_mapping"], labels, ids):
        piece = text[s:e]
        if lab != IGNORE_INDEX:
            assert "[INST]" not in piece and "[/INST]" not in piece and t != tok.bos_token_id
    # The first token of every supervised turn is supervised (no off-by-one).
    for s, e, loss in spans:
        first = next(i for i, (a, b) in enumerate(enc["offset_mapping"]) if a >= s and b > a)
        assert (labels[first] != IGNORE_INDEX) == loss
        assert [tok.eos_token_id] == [ids[i] for i, (a, b) in enumerate(enc["offset_mapping"]) if b == e][-1:]


def test_all_turns_supervised_without_loss_flags(tok):
    msgs = [{k: v for k, v in m.items() if k != "loss"} for m in AGENT_RECORD]
    runs = supervised_runs(*encode_chat(tok, msgs))
    assert len(runs) == 4


def test_generic_template_masks(tok):
    chatml = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    tok2 = load_tokenizer(tok.name_or_path)
    tok2.chat_template = chatml
    ids, labels = encode_chat(tok2, AGENT_RECORD, system_prompt=None)
    runs = [tok2.decode(r) for _, r in supervised_runs(ids, labels)]
    expected = [m["content"] for m in AGENT_RECORD if m["role"] == "assistant" and m.get("loss") is not False]
    assert runs == [f"{c}<|end|>\n" for c in expected]


@pytest.mark.parametrize(
    "msgs,reason",
    [
        ([], "empty_conversation"),
        ([{"role": "robot", "content": "x"}], "unknown_role"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "not_alternating"),
        ([{"role": "assistant", "content": "a"}], "not_alternating"),
        ([{"role": "user", "content": None}], "bad_content"),
    ],
)
def test_bad_conversations_raise_with_reason(tok, msgs, reason):
    with pytest.raises(ChatError) as exc:
        encode_chat(tok, msgs)
    assert exc.value.reason == reason


def test_prompt_ids_is_prefix_of_training_rendering(tok):
    ids, _ = encode_chat(tok, AGENT_RECORD)
    p = prompt_ids(tok, AGENT_RECORD[:-1])
    assert ids[: len(p)] == p
    assert tok.decode(p).endswith("[/INST]")
    assert tok.chat_template == LLAMA2_CHAT_TEMPLATE


def test_preview_marks_supervised_spans(tok):
    out = preview(tok, AGENT_RECORD)
    assert out.count("⟦") == 2 and "⟦ Think: the answer is 27.\n\nAct: answer(27) </s>⟧" in out
