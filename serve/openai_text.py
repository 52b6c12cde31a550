"""Token ids → text for the OpenAI layer: stop strings, per-token strings, log-prob formats.

- :class:`StopStringDetokenizer`: incremental detokenization that cuts at the first stop string
  and remembers where each token's text starts (which tokens a cut completion still contains).
- :class:`TokenText`: the text of one token in context. Sentencepiece and byte-level BPE decode a
  token differently at the start of a text (a leading space is dropped or a byte is incomplete),
  so a token's string is ``decode(previous tokens + token) - decode(previous tokens)`` over a short
  window of previous tokens; special tokens keep their literal form (``</s>``).
- Formatting of :class:`serve.openai_api.TokenLogprob` lists in OpenAI's legacy completions format
  (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``) and chat format
  (``content: [{token, logprob, bytes, top_logprobs}]``).
"""

import math
from typing import Any, Dict, List, Optional, Sequence

from serve.openai_schema import LOGPROB_FLOOR, ChatTokenLogprob, ChoiceLogprobs, CompletionLogprobs, TopLogprob


class StopStringDetokenizer:
    """Incremental detokenizer that cuts the text at the first stop string.

    ``push(token_id)`` returns the newly *safe* text: text that can no longer become part of a
    stop string and does not end inside an incomplete UTF-8 sequence. After a stop string
    matches, ``stopped`` is True and no more text is returned. ``starts[i]``: where token i's
    text starts in the decoded completion.
    """

    def __init__(self, tokenizer: Any, stop: List[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: List[int] = []
        self.starts: List[int] = []
        self.emitted = 0  # characters of the decoded text already returned
        self.stopped = False
        self.text = ""

    def _hold_back(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.starts.append(len(self.text.rstrip("\ufffd")))
        self.ids.append(token_id)
        # Re-decoding the whole completion keeps multi-token characters and leading-space rules
        # right for every tokenizer; completions are short, so the cost is small.
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        self.text = text
        if text.endswith("\ufffd"):  # incomplete UTF-8: wait for the next token
            return ""
        safe = len(text) - self._hold_back(text)
        out = text[self.emitted : safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out

    def flush(self) -> str:
        """Text held back at the end of generation (no stop string followed)."""
        if self.stopped:
            return ""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out

    def released(self, final: bool) -> int:
        """How many tokens have text in what was returned so far (all of them once ``final``
        without a stop string; after a cut, those starting before it)."""
        if final and not self.stopped:
            return len(self.ids)
        limit = len(self.text) if self.stopped else self.emitted
        return sum(1 for s in self.starts if s < limit)


class TokenText:
    """Strings of single tokens in context (see the module docstring)."""

    def __init__(self, tokenizer: Any, window: int = 4):
        self.tok, self.window = tokenizer, window

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def pieces(self, context: Sequence[int], candidates: Sequence[int]) -> List[str]:
        """The string of each candidate token if it followed ``context``."""
        ctx = list(context[-self.window:])
        if not ctx:
            return [self._decode([c]) for c in candidates]
        base = self._decode(ctx)
        out = []
        for c in candidates:
            full = self._decode(ctx + [c])
            out.append(full[len(base):] if full.startswith(base) else self._decode([c]))
        return out



def clamp(lp: float) -> float:
    """A log-prob JSON can carry (no -inf / NaN)."""
    return LOGPROB_FLOOR if (lp is None or math.isnan(lp) or lp < LOGPROB_FLOOR) else float(lp)


def legacy_logprobs(entries: Sequence[Any], ids: Sequence[int], context: Sequence[int], text: TokenText,
                    offset: int, into: Optional[CompletionLogprobs] = None) -> CompletionLogprobs:
    """Append tokens ``ids`` (after ``context``) with their entries (``TokenLogprob`` or None) in
    OpenAI's legacy format; ``offset``: the text offset of the first. The chosen token is part of
    its ``top_logprobs`` dict (OpenAI: "up to logprobs+1 elements")."""
    out = into or CompletionLogprobs()
    all_ids = list(context) + list(ids)
    n0 = len(context)
    for i, (tid, e) in enumerate(zip(ids, entries)):
        prev = all_ids[max(0, n0 + i - text.window): n0 + i]  # the window is all a piece needs
        alts = [a for a, _ in e.top] if e is not None else []
        strings = text.pieces(prev, [tid] + alts)
        out.tokens.append(strings[0])
        out.text_offset.append(offset)
        offset += len(strings[0])
        if e is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(clamp(e.logprob))
        top: Dict[str, float] = {}
        for s, (_, lp) in zip(strings[1:], e.top):
            top[s] = max(top.get(s, LOGPROB_FLOOR), clamp(lp))
        top[strings[0]] = max(top.get(strings[0], LOGPROB_FLOOR), clamp(e.logprob))
        out.top_logprobs.append(top)
    return out


def chat_logprobs(entries: Sequence[Any], context: Sequence[int], text: TokenText) -> ChoiceLogprobs:
    """Generated tokens (``TokenLogprob``s after ``context``) in OpenAI's chat format."""
    content = []
    all_ids = list(context) + [e.token_id for e in entries]
    n0 = len(context)
    for i, e in enumerate(entries):
        prev = all_ids[max(0, n0 + i - text.window): n0 + i]
        strings = text.pieces(prev, [e.token_id] + [a for a, _ in e.top])
        top = [TopLogprob(token=s, logprob=clamp(lp), bytes=list(s.encode("utf-8")))
               for s, (_, lp) in zip(strings[1:], e.top)]
        content.append(ChatTokenLogprob(token=strings[0], logprob=clamp(e.logprob),
                                        bytes=list(strings[0].encode("utf-8")), top_logprobs=top))
    return ChoiceLogprobs(content=content)
