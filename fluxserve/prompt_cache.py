"""An LRU cache of a stack's text-encoder outputs, for clients that send one prompt with several seeds.

The embeddings depend on the prompt alone (not the seed, steps, guidance or size), so a repeated prompt can skip
CLIP and T5. The cache keeps the very tensors the encoders returned, on the stack's device: the denoising loop only
reads them (diffusers' FluxPipeline passes given `prompt_embeds` through `encode_prompt` unchanged, and the
transformer's first use of them is a projection into new tensors; a CUDA-graph stack copies them into its own
buffers), so a hit gives the same image, bit for bit, as a miss. Bounded by entries and by bytes, since each
FLUX.1-dev entry holds 4 MiB of GPU memory (512 T5 tokens x 4096 in bf16). Off unless the model's
`prompt_cache_entries` parameter is set. Not thread-safe: one cache per `StackPipeline`, which Triton calls serially.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

ENTRIES_PARAMETER = "prompt_cache_entries"
MIB_PARAMETER = "prompt_cache_mib"
DEFAULT_ENTRIES = 0  # off
DEFAULT_MIB = 256
MAX_ENTRIES = 10_000
MAX_MIB = 65_536

Embeddings = tuple[torch.Tensor, ...]


class PromptCache:
    """Prompt text -> embeddings, at most `max_entries` of them and `max_bytes` in all (the tensors' nbytes);
    the least recently used go first. Counts hits, misses and evictions for the model's telemetry."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1:
            raise ValueError(f"a prompt cache holds at least one entry, got max_entries={max_entries}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Embeddings] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @classmethod
    def from_parameters(cls, parameters: dict[str, str]) -> PromptCache | None:
        """The cache the model's config parameters ask for, None when off (`prompt_cache_entries` 0, the default);
        a ValueError names a bad parameter and its allowed range."""
        entries = _integer_parameter(parameters, ENTRIES_PARAMETER, DEFAULT_ENTRIES, 0, MAX_ENTRIES)
        mib = _integer_parameter(parameters, MIB_PARAMETER, DEFAULT_MIB, 1, MAX_MIB)
        return cls(entries, mib * 2**20) if entries else None

    def __contains__(self, prompt: str) -> bool:
        """Whether the prompt is cached; neither counted nor refreshed."""
        return prompt in self._entries

    def get(self, prompt: str) -> Embeddings | None:
        """The prompt's embeddings, now the most recently used (a hit), or None (a miss)."""
        embeddings = self._entries.get(prompt)
        if embeddings is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(prompt)
        return embeddings

    def put(self, prompt: str, embeddings: Embeddings) -> None:
        """Keep the tensors themselves (no copies), evicting the least recently used entries to make room. An entry
        larger than the whole byte bound is not kept, and evicts nothing."""
        size = _nbytes(embeddings)
        if size > self.max_bytes:
            return
        replaced = self._entries.pop(prompt, None)
        if replaced is not None:
            self.bytes -= _nbytes(replaced)
        while len(self._entries) >= self.max_entries or self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)
            self.evictions += 1
        self._entries[prompt] = embeddings
        self.bytes += size

    def stats(self) -> dict[str, int]:
        """What it holds and what it counted since the load."""
        return {"entries": len(self._entries), "bytes": self.bytes, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


def _nbytes(embeddings: Embeddings) -> int:
    return sum(tensor.nbytes for tensor in embeddings)


def _integer_parameter(parameters: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    """Model parameter `name` as an integer in [low, high] (`default` when absent or blank)."""
    text = parameters.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"parameter '{name}' must be an integer in [{low}, {high}], got {text!r}") from None
    if not low <= value <= high:
        raise ValueError(f"parameter '{name}' must be an integer in [{low}, {high}], got {value}")
    return value
