"""A small byte-level BPE vocabulary written in CLIPTokenizer's on-disk format.

The toy model (and the tests' tiny models) need a CLIP tokenizer without downloading OpenAI's
49k-token vocabulary. Like CLIP's, the vocabulary starts with the 256 byte symbols, then the
same symbols with the end-of-word marker ``</w>``, then one token per merge, then the two
special tokens; any text still tokenises (unknown words fall apart into bytes). The merges
are built so that every word of ``words`` becomes exactly one token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sdjax.weights.clip_bpe import EOS, byte_alphabet, write_vocabulary


def bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one (already byte-mapped) word: repeatedly merge the adjacent pair with
    the lowest rank until none of the pairs is a known merge."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = {(a, b) for a, b in zip(parts, parts[1:], strict=False)}
        best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def build_merges(words: Sequence[str]) -> list[tuple[str, str]]:
    """Merges that turn each word into a single token.

    Each new merge is appended last (lowest priority), so it only acts after every earlier
    merge has been exhausted: a word that already ends as one token is never disturbed, and
    a word that earlier merges split unexpectedly gets glued from the pieces it ends up with.
    """
    alphabet = byte_alphabet()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for raw in dict.fromkeys(words):
        word = "".join(alphabet[b] for b in raw.lower().encode("utf-8"))
        if not word:
            continue
        while len(parts := bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def write_clip_tokenizer(folder: str | Path, words: Sequence[str], *,
                         pad_token: str = EOS, model_max_length: int = 77) -> int:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json that
    transformers' ``CLIPTokenizer.from_pretrained(folder)`` reads; returns the vocabulary
    size (what the text encoder's ``vocab_size`` must be)."""
    return write_vocabulary(folder, byte_alphabet(), build_merges(words), pad_token=pad_token,
                            model_max_length=model_max_length)
