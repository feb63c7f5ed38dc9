"""The model folder's tokenizer as GGUF vocabulary keys, so that llama.cpp tokenizes text as transformers does:
WordPiece (llama.cpp's ``bert`` tokenizer) and byte-level BPE (``gpt2``, with GPT-2's or Llama 3's
pre-tokenizer). Read from ``tokenizer.json`` (no code runs from the folder); any other tokenizer is refused in
one line that names it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_opt.errors import TechniqueError

#: The largest tokenizer.json read.
MAX_TOKENIZER_BYTES = 64 * 2**20
#: Llama 3's pre-tokenizer split pattern (llama.cpp's ``llama-bpe``).
LLAMA3_SPLIT = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}"
#: GGUF token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED = 1, 2, 3, 4, 5


@dataclass
class Vocab:
    """What the GGUF file says of the tokenizer."""

    model: str  # llama.cpp's tokenizer kind: bert, gpt2
    pre: str  # its pre-tokenizer
    tokens: list[str]
    types: list[int]


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    """The tokenizer of ``folder`` (its ``tokenizer.json``), padded with unused tokens up to the model's
    ``n_vocab`` rows of embeddings."""
    from model_opt.modelio import read_regular

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise TechniqueError(f"{folder.name} has no tokenizer.json, and a GGUF file carries its tokenizer",
                             "save the model's fast tokenizer into the folder (tokenizer.save_pretrained)")
    try:
        spec = json.loads(read_regular(path, MAX_TOKENIZER_BYTES))
        kind = spec["model"]["type"]
    except Exception as exc:
        raise TechniqueError(f"{folder.name}/tokenizer.json cannot be read ({type(exc).__name__})",
                             "save the tokenizer again with tokenizer.save_pretrained") from None
    if kind == "WordPiece":
        vocab = _wordpiece(spec)
    elif kind == "BPE" and (spec.get("decoder") or {}).get("type") == "ByteLevel":
        vocab = _byte_level_bpe(spec)
    else:
        decoder = (spec.get("decoder") or {}).get("type", "no")
        raise TechniqueError(f"the tokenizer of {folder.name} is {kind} with a {decoder} decoder, which model-opt does "
                             "not write to GGUF (it writes WordPiece and byte-level BPE)",
                             "convert this model with llama.cpp's convert_hf_to_gguf.py")
    if len(vocab.tokens) > n_vocab:
        raise TechniqueError(f"the tokenizer has {len(vocab.tokens)} tokens and the model only {n_vocab} embeddings",
                             "give the folder the tokenizer the model was trained with")
    for index in range(len(vocab.tokens), n_vocab):
        vocab.tokens.append(f"[PAD{index}]")
        vocab.types.append(UNUSED)
    return vocab


def _by_id(spec: dict[str, Any]) -> tuple[list[str], set[int]]:
    """Every token by id (the model's vocabulary and the added tokens), and the ids of special tokens."""
    table: dict[int, str] = {int(i): t for t, i in spec["model"]["vocab"].items()}
    special = set()
    for added in spec.get("added_tokens") or []:
        table[int(added["id"])] = added["content"]
        if added.get("special"):
            special.add(int(added["id"]))
    if sorted(table) != list(range(len(table))):
        raise TechniqueError("the tokenizer's token ids have gaps", "save the tokenizer again with "
                             "tokenizer.save_pretrained")
    return [table[i] for i in range(len(table))], special


def _wordpiece(spec: dict[str, Any]) -> Vocab:
    """BERT's WordPiece as llama.cpp reads it: word starts marked with U+2581, continuations without ``##``."""
    tokens, special = _by_id(spec)
    unknown = spec["model"].get("unk_token", "[UNK]")
    types = [UNKNOWN if t == unknown else CONTROL if i in special else NORMAL for i, t in enumerate(tokens)]

    def phantom(token: str, kind: int) -> str:
        if kind != NORMAL or (token.startswith("[") and token.endswith("]")):
            return token
        return token[2:] if token.startswith("##") else "\u2581" + token

    return Vocab("bert", "default", [phantom(t, k) for t, k in zip(tokens, types, strict=True)], types)


def _byte_level_bpe(spec: dict[str, Any]) -> Vocab:
    """GPT-2-style byte-level BPE (its merges are written by :func:`special_ids`); the pre-tokenizer must be
    GPT-2's or Llama 3's."""
    tokens, special = _by_id(spec)
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    patterns = [((p.get("pattern") or {}).get("Regex") or "") for p in parts if p.get("type") == "Split"]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        name = "gpt-2"
    elif patterns and patterns[0].startswith(LLAMA3_SPLIT):
        name = "llama-bpe"
    else:
        raise TechniqueError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}) is not GPT-2's or "
                             "Llama 3's, the ones model-opt writes to GGUF",
                             "convert this model with llama.cpp's convert_hf_to_gguf.py")
    types = [CONTROL if i in special else NORMAL for i in range(len(tokens))]
    return Vocab("gpt2", name, tokens, types)


def special_ids(folder: Path, writer: Any, n_vocab: int, merges: bool) -> None:
    """The special tokens (bos, eos, unk, sep, pad...) from the folder's tokenizer files, and the merges."""
    import gguf

    gguf.SpecialVocab(folder, load_merges=merges, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
