"""The CLIP tokenizer that ships with sdjax, so single-file checkpoints load offline.

Single files carry no tokenizer. SD 1.x (OpenAI CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14)
both use OpenAI's BPE merges, ``assets/clip/bpe_simple_vocab_16e6.txt.gz`` (MIT, see the
LICENSE beside it). CLIP derives its 49408-token vocabulary from those merges: the 256 byte
symbols, the same with the end-of-word marker ``</w>``, one token per merge of the first
48894, then ``<|startoftext|>`` and ``<|endoftext|>``. We write that as the ``vocab.json`` /
``merges.txt`` pair transformers' ``CLIPTokenizer`` reads.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BPE_FILE = Path(__file__).resolve().parent.parent / "assets" / "clip" / \
    "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49408 - 2 * 256 - 2


def byte_alphabet() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable latin-1 bytes map
    to themselves, the rest to code points from 256 up), in byte order."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def clip_byte_symbols() -> list[str]:
    """The 256 byte symbols in CLIP's vocabulary order: bytes that are printable latin-1 map
    to themselves and come first, the others map to code points from 256 up and follow;
    that is, ordered by code point."""
    return sorted(byte_alphabet(), key=ord)


def write_vocabulary(folder: str | Path, symbols: Sequence[str],
                     merges: Sequence[tuple[str, str]], *, pad_token: str = EOS,
                     model_max_length: int = 77) -> int:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json for
    ``CLIPTokenizer.from_pretrained(folder)``: the vocabulary is ``symbols``, the same with
    ``</w>``, one token per merge, then the two special tokens. Returns its size."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = list(symbols) + [c + "</w>" for c in symbols] + [a + b for a, b in merges]
    vocab = list(dict.fromkeys(vocab)) + [BOS, EOS]
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)},
                                                  ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": model_max_length, "do_lower_case": True,
         "tokenizer_class": "CLIPTokenizer", **special}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return len(vocab)


def clip_merges() -> list[tuple[str, str]]:
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    # Line 0 is the version header; CLIP uses the next NUM_MERGES lines.
    return [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]


def write_clip_vocabulary(folder: str | Path, *, pad_token: str = EOS) -> Path:
    """The bundled CLIP tokenizer files in ``folder`` (SD 2.x pads with ``!``)."""
    write_vocabulary(folder, clip_byte_symbols(), clip_merges(), pad_token=pad_token)
    return Path(folder)


def bundled_clip_tokenizer(pad_token: str = EOS):
    """transformers' CLIPTokenizer over the bundled vocabulary, built without the network."""
    from transformers import CLIPTokenizer
    with tempfile.TemporaryDirectory(prefix="sdjax-clip-") as d:
        return CLIPTokenizer.from_pretrained(str(write_clip_vocabulary(d, pad_token=pad_token)))
