"""A small word-level CLIP tokenizer and text encoder for the embedded model.

The tokenizer is an ordinary ``transformers.CLIPTokenizer`` (byte-level BPE with the ``</w>``
end-of-word suffix) whose ``vocab.json`` / ``merges.txt`` we write ourselves: every single letter and
digit (with and without ``</w>``, so any lowercase text still tokenizes, letter by letter), and a
merge chain ``w0 w1 -> w0w1, w0w1 w2 -> w0w1w2, ...`` for each word of ``WORDS``, so that each of
those words is exactly one token. ``build_tokenizer`` checks that property after building.

The vocabulary holds all ten number words, including "eight" and "nine", which never occur in a
training caption: their embedding rows stay at their random initialisation, which is the
"vocabulary gap" that vocabulary expansion (textual inversion) has to close.

The text encoder is a ``transformers.CLIPTextModel`` (causal transformer, last hidden state fed to
the UNet's cross-attention, exactly as in Stable Diffusion), only much smaller.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from .data import WORDS as NUMBER_WORDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16
WORDS = (
    "a", "an", "the", "of", "in", "and", "with", "handwritten", "digit", "number", "drawing",
    "picture", "photo", "image", "small", "large", "bold", "thin", "white", "black", "style",
) + NUMBER_WORDS


def _pieces(word: str) -> list[str]:
    return list(word[:-1]) + [word[-1] + "</w>"]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Plain BPE: repeatedly merge the adjacent pair of lowest rank."""
    seg = _pieces(word)
    while len(seg) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(seg, seg[1:]))]
        r, i = min(pairs)
        if r == float("inf"):
            break
        seg = seg[:i] + [seg[i] + seg[i + 1]] + seg[i + 2:]
    return seg


def vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and ordered BPE merges making each word of ``words`` one token.

    For each word in turn, BPE is run with the merges so far; while the word is still several
    pieces, the merge of its first two pieces is appended with the highest rank. A merge of highest
    rank only fires when no other merge applies, so it never changes a word already reduced to one
    token.
    """
    tokens: list[str] = [BOS, EOS]
    for ch in string.ascii_lowercase + string.digits + ".,!?'-":
        tokens += [ch, ch + "</w>"]
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        while len(seg := _bpe(w, ranks)) > 1:
            ranks[(seg[0], seg[1])] = len(ranks)
            if seg[0] + seg[1] not in tokens:
                tokens.append(seg[0] + seg[1])
    merges = sorted(ranks, key=ranks.get)
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: str | Path) -> None:
    """Write vocab.json, merges.txt and the configs of a CLIPTokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    cfg = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True,
        "bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}, indent=2))


def load_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def build_tokenizer(folder: str | Path):
    """Write the tokenizer to ``folder``, load it back and check every word is a single token."""
    write_tokenizer(folder)
    tok = load_tokenizer(folder)
    for w in WORDS:
        ids = tok(w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"word {w!r} tokenizes into {tok.convert_ids_to_tokens(ids)}, not one token")
    return tok


def text_config(vocab_size: int, hidden_size: int = 64, layers: int = 2, heads: int = 4):
    from transformers import CLIPTextConfig

    vocab, _ = vocab_and_merges()
    return CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=MAX_LENGTH,
        projection_dim=hidden_size, hidden_act="quick_gelu", attention_dropout=0.0, dropout=0.0,
        bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab[EOS],
    )


def build_text_encoder(vocab_size: int, seed: int, hidden_size: int = 64):
    """A freshly initialised (seeded) small CLIPTextModel."""
    import torch
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(text_config(vocab_size, hidden_size))
