"""Chat messages, rendering with Hugging Face chat templates, and token-level loss masks.

Used alike by the data job (training samples), the model server (prompts) and rollouts.

Masking rule (AgentTuning): exactly the tokens of assistant turns whose ``loss`` is not false are
supervised — the turn's content *and* its end-of-turn token (e.g. ``</s>``), never the role markers
(``[INST]``, ``[/INST]``) nor system/user text. Spans are found on the rendered text, so any HF chat
template works: an assistant turn's span is what rendering ``messages[:i+1]`` adds beyond rendering
``messages[:i]`` with the generation prompt. Tokens are mapped to spans with the fast tokenizer's
character offsets, so the first token of every answer is supervised (no off-by-one).
The default format is Llama-2-chat (AgentLM's), rendered by a direct Python fast path that is tested
to match its Jinja template byte for byte.
"""

import hashlib
import json
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from agenttuning.config import AGENTLM_SYSTEM_PROMPT

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")

# Llama-2-chat as Meta/HF define it: BOS + "[INST] " + user + " [/INST]", then " " + answer + " " + EOS;
# the system prompt is folded into the first user turn inside <<SYS>> markers. Contents are stripped.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system_message = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message | length > 0 %}"
    "{% set content = '<<SYS>>\\n' + system_message.strip() + '\\n<</SYS>>\\n\\n' + message['content'].strip() %}"
    "{% else %}{% set content = message['content'].strip() %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


class ChatError(ValueError):
    """A conversation that cannot be rendered; ``reason`` is a short machine-readable tag."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def normalize_messages(
    messages: Sequence[Dict[str, Any]], system_prompt: Optional[str] = AGENTLM_SYSTEM_PROMPT
) -> List[Dict[str, Any]]:
    """Validate roles/alternation and prepend the system prompt when the conversation has none.

    Raises ChatError with reasons: empty_conversation, unknown_role, bad_content, not_alternating.
    """
    if not messages:
        raise ChatError("empty_conversation", "no messages")
    out: List[Dict[str, Any]] = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ROLES:
            raise ChatError("unknown_role", f"message {i} has role {role!r}; expected one of {ROLES}")
        if not isinstance(m.get("content"), str):
            raise ChatError("bad_content", f"message {i} content is not a string")
        if role == "system" and i != 0:
            raise ChatError("not_alternating", f"system message at position {i}; only the first may be")
        out.append(dict(m))
    if out[0]["role"] != "system" and system_prompt:
        out.insert(0, {"role": "system", "content": system_prompt})
    turns = out[1:] if out[0]["role"] == "system" else out
    if not turns:
        raise ChatError("empty_conversation", "only a system message")
    for i, m in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ChatError("not_alternating", f"turn {i} is {m['role']!r}, expected {expected!r}")
    return out


def load_tokenizer(name_or_path: str, chat_template: str = "llama2", trust_remote_code: bool = False):
    """A fast tokenizer with its chat template chosen and a pad token set.

    chat_template: "llama2" (default), "model" (keep the tokenizer's own), or a Jinja file path.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if not tok.is_fast:
        raise ValueError(f"{name_or_path}: a fast tokenizer is required (character offsets for masks)")
    if chat_template == "llama2":
        tok.chat_template = LLAMA2_CHAT_TEMPLATE
    elif chat_template != "model":
        with open(chat_template, encoding="utf-8") as f:
            tok.chat_template = f.read()
    elif not tok.chat_template:
        raise ValueError(f"{name_or_path} has no chat template; set model.chat_template=llama2 or a file")
    if tok.pad_token is None:
        # Padding positions never carry loss, so reusing EOS (or UNK) as pad is safe.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _render_llama2(tok, messages: List[Dict[str, Any]]) -> Tuple[str, List[Tuple[int, int, bool]]]:
    """Fast path equal to LLAMA2_CHAT_TEMPLATE; returns (text, [(start, end, loss)] per assistant turn)."""
    bos, eos = tok.bos_token or "", tok.eos_token or ""
    system = messages[0]["content"].strip() if messages[0]["role"] == "system" else ""
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    parts: List[str] = []
    spans: List[Tuple[int, int, bool]] = []
    n = 0
    for i, m in enumerate(turns):
        content = m["content"].strip()
        if i == 0 and system:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            piece = f"{bos}[INST] {content} [/INST]"
        else:
            piece = f" {content} {eos}"
            spans.append((n, n + len(piece), m.get("loss") is not False))
        parts.append(piece)
        n += len(piece)
    return "".join(parts), spans


def _render_generic(tok, messages: List[Dict[str, Any]]) -> Tuple[str, List[Tuple[int, int, bool]]]:
    """Any HF chat template: each assistant span is the text its turn adds to the prefix."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans: List[Tuple[int, int, bool]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ChatError(
                "template_not_prefix_stable",
                "the chat template renders a conversation differently from its prefixes; "
                "masks cannot be located — use model.chat_template=llama2 or another template",
            )
        spans.append((len(before), len(upto), m.get("loss") is not False))
    return full, spans


def render(tok, messages: List[Dict[str, Any]]) -> Tuple[str, List[Tuple[int, int, bool]]]:
    """Rendered text and the character spans of assistant turns (start, end, supervised)."""
    if tok.chat_template == LLAMA2_CHAT_TEMPLATE:
        return _render_llama2(tok, messages)
    return _render_generic(tok, messages)


def labels_from_offsets(
    ids: List[int], offsets: Sequence[Tuple[int, int]], spans: List[Tuple[int, int, bool]]
) -> List[int]:
    """Labels for tokenized text: a token is supervised iff its characters lie in a supervised span."""
    labels = [IGNORE_INDEX] * len(ids)
    sup = [(s, e) for s, e, loss in spans if loss]
    j = 0
    for t, (s, e) in enumerate(offsets):
        # Spans are sorted and disjoint; advance past spans that end before this token.
        while j < len(sup) and sup[j][1] <= s:
            j += 1
        if j < len(sup) and e > s and s >= sup[j][0] and e <= sup[j][1]:
            labels[t] = ids[t]
    return labels


def encode_rendered(tok, text: str, spans: List[Tuple[int, int, bool]]) -> Tuple[List[int], List[int]]:
    """Tokenize one rendered conversation into (input_ids, labels)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], labels_from_offsets(enc["input_ids"], enc["offset_mapping"], spans)


def encode_chat(
    tok, messages: Sequence[Dict[str, Any]], system_prompt: Optional[str] = AGENTLM_SYSTEM_PROMPT
) -> Tuple[List[int], List[int]]:
    """(input_ids, labels) of a whole conversation; labels are -100 where there is no loss."""
    msgs = normalize_messages(messages, system_prompt)
    text, spans = render(tok, msgs)
    return encode_rendered(tok, text, spans)


def prompt_ids(
    tok, messages: Sequence[Dict[str, Any]], system_prompt: Optional[str] = AGENTLM_SYSTEM_PROMPT
) -> List[int]:
    """Token ids of the conversation plus the generation prompt (what a server feeds the model).

    The conversation must end with a user turn.
    """
    msgs = list(messages)
    if not msgs or msgs[-1].get("role") != "user":
        raise ChatError("not_alternating", "a prompt must end with a user message")
    # Validate as if an assistant reply followed, so alternation rules are the same as training.
    msgs = normalize_messages(msgs + [{"role": "assistant", "content": ""}], system_prompt)[:-1]
    if tok.chat_template == LLAMA2_CHAT_TEMPLATE:
        text, _ = _render_llama2(tok, msgs)
    else:
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def preview(tok, messages: Sequence[Dict[str, Any]], system_prompt: Optional[str] = AGENTLM_SYSTEM_PROMPT) -> str:
    """Rendered conversation with supervised token runs wrapped in ⟦…⟧ (what `data preview` shows)."""
    ids, labels = encode_chat(tok, messages, system_prompt)
    out: List[str] = []
    run: List[int] = []
    supervised = False
    for i, lab in zip(ids, labels):
        if (lab != IGNORE_INDEX) != supervised and run:
            text = tok.decode(run)
            out.append(f"⟦{text}⟧" if supervised else text)
            run = []
        supervised = lab != IGNORE_INDEX
        run.append(i)
    if run:
        text = tok.decode(run)
        out.append(f"⟦{text}⟧" if supervised else text)
    return "".join(out)


def tokenizer_fingerprint(tok) -> str:
    """A short hash of the vocabulary and special tokens: data and model must agree on it."""
    payload = json.dumps(
        {"vocab": sorted(tok.get_vocab().items()), "special": tok.all_special_tokens}, ensure_ascii=False
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]
