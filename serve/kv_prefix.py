"""Prefix reuse for the HF batching engine: the KV of finished sequences, kept to skip the prefill
of the prompt tokens a new request shares with one of them.

An agent episode's turn k+1 prompt is its turn k prompt + the reply + the observation, and the
episodes of one task share the instructions, so most prompt tokens of an evaluation or rollout
have been seen before. vLLM caches prefixes by blocks; this engine keeps whole sequences (its KV
rows are per request), least recently used first out, under a byte budget.
"""

from collections import OrderedDict
from typing import Any, List, Optional, Sequence, Tuple

KV = List[Tuple[Any, Any]]  # per layer (K, V), each [1, H, T, D]


def shared_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit`."""
    n = 0
    limit = min(limit, len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


class PrefixCache:
    """Finished sequences' token ids and KV (one row each), bounded by `max_bytes` of KV and
    `max_entries` (each lookup compares the prompt with every entry)."""

    def __init__(self, max_bytes: int = 512 << 20, max_entries: int = 64):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.entries: "OrderedDict[int, Tuple[List[int], KV, int]]" = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.reused_tokens = 0
        self._next = 0

    def put(self, ids: List[int], kv: KV) -> None:
        """Keep a sequence (`kv` covers exactly `ids`); evicts the least recently used beyond the budget."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes or not ids:
            return
        self.entries[self._next] = (list(ids), kv, size)
        self._next += 1
        self.bytes += size
        while self.bytes > self.max_bytes or len(self.entries) > self.max_entries:
            _, (_, _, freed) = self.entries.popitem(last=False)
            self.bytes -= freed

    def lookup(self, prompt: Sequence[int], min_tokens: int = 16) -> Optional[Tuple[int, KV]]:
        """(n, KV of the first n tokens) of the entry sharing the longest prefix with `prompt`, at
        least `min_tokens` long and leaving at least one prompt token to run (its logits are needed)."""
        best, best_key = 0, None
        for key, (ids, _, _) in self.entries.items():
            n = shared_prefix(ids, prompt, len(prompt) - 1)
            if n > best:
                best, best_key = n, key
        if best_key is None or best < min_tokens:
            return None
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.reused_tokens += best
        kv = self.entries[best_key][1]
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in kv]

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0
