"""Prompt distributions for fine-tuning: files, built-in sets, a deterministic train/eval split.

A prompt is its text and its *fields*: the other keys of its .jsonl line (e.g. ``class``, read by the
classifier rewards), passed to every reward with the prompt.

* ``load_prompts(path)``: ``.txt`` — one prompt per line, blank lines and ``#`` comments ignored;
  ``.jsonl`` — one JSON object per line with a non-empty string ``prompt`` and any other fields.
* built-in sets (``builtin_prompts(name)``, or ``resolve_prompts(name)`` where a file is also accepted):
  ``digits`` — the embedded digits model's ten canonical prompts (the model's own caption template and number
  words, from its ``adjointdpm.json``: "a handwritten digit zero" … "nine"), field ``class`` = the digit;
  ``simple-animals`` — DDPO's 45 simple-animal prompts (the bare animal names, as DDPO prompts with them).
* ``split_prompts(prompts, eval_fraction, seed)``: a fixed random split (the same for the same seed, on every
  platform: Python's seeded Mersenne Twister), each part kept in the original order.
* ``draw_prompts(prompts, n, generator)``: n prompts drawn uniformly with replacement by a torch generator (so
  a resumed run that restores the generator draws the same prompts).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

DATA = Path(__file__).resolve().parent
BUILTIN = ("digits", "simple-animals")


class PromptError(ValueError):
    """A prompt file or set cannot be used as given; ``str(err)`` is one line naming the fix."""


@dataclass(frozen=True)
class Prompt:
    text: str
    fields: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"prompt": self.text, **self.fields}


def _read_txt(path: Path) -> list[Prompt]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [Prompt(line) for line in lines if line and not line.startswith("#")]


def _read_jsonl(path: Path) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be an object like "
                              '{"prompt": "a cat", "class": 3}') from None
        if not isinstance(row, dict):
            raise PromptError(f"{path}:{number}: a JSON {type(row).__name__}, not an object with a \"prompt\" key")
        text = row.pop("prompt", None)
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"{path}:{number}: no non-empty string \"prompt\" (keys: {', '.join(row) or 'none'})")
        prompts.append(Prompt(text.strip(), row))
    return prompts


def load_prompts(path) -> list[Prompt]:
    """The prompts of a .txt or .jsonl file (see the module docstring); one-line errors otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PromptError(f"prompt file {path} does not exist (give a .txt or .jsonl file, or a built-in set: "
                          f"{', '.join(BUILTIN)})")
    if not path.is_file():
        raise PromptError(f"prompt file {path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise PromptError(f"prompt file {path}: use .txt (one prompt per line) or .jsonl (one {{\"prompt\": ...}} per line)")
    try:
        prompts = _read_txt(path) if suffix == ".txt" else _read_jsonl(path)
    except UnicodeDecodeError:
        raise PromptError(f"prompt file {path} is not UTF-8 text") from None
    if not prompts:
        raise PromptError(f"prompt file {path} holds no prompts (blank lines and # comments are skipped)")
    return prompts


def digit_prompts(settings: dict | None = None) -> list[Prompt]:
    """The digits model's ten canonical prompts, field ``class`` = the digit and ``word`` its number word.

    ``settings``: a model folder's adjointdpm.json (default: the embedded model's), whose ``words`` and first
    ``caption_templates`` entry name the digits."""
    if settings is None:
        from ..components import EMBEDDED_MODEL

        settings = json.loads((EMBEDDED_MODEL / "adjointdpm.json").read_text())
    words, templates = settings.get("words"), settings.get("caption_templates")
    if not words or not templates:
        raise PromptError("the digit prompts need a digits model's settings (its adjointdpm.json words and "
                          "caption_templates)")
    return [Prompt(templates[0].format(word), {"class": digit, "word": word}) for digit, word in enumerate(words)]


def simple_animal_prompts() -> list[Prompt]:
    """DDPO's 45 simple-animal prompts (shipped as package data)."""
    return _read_txt(DATA / "simple_animals.txt")


def builtin_prompts(name: str) -> list[Prompt]:
    if name == "digits":
        return digit_prompts()
    if name == "simple-animals":
        return simple_animal_prompts()
    raise PromptError(f"no built-in prompt set {name!r}: use one of {', '.join(BUILTIN)}, or a .txt / .jsonl file")


def resolve_prompts(source) -> list[Prompt]:
    """``--prompts``: a built-in set's name, or a prompt file."""
    if str(source) in BUILTIN and not Path(str(source)).exists():
        return builtin_prompts(str(source))
    return load_prompts(source)


def split_prompts(prompts: Sequence[Prompt], eval_fraction: float = 0.2,
                  seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval): ⌈eval_fraction · n⌉ prompts, at least one, held out by a seeded shuffle; both non-empty."""
    prompts = list(prompts)
    if not 0 < eval_fraction < 1:
        raise PromptError(f"eval fraction {eval_fraction}: give a number strictly between 0 and 1")
    if len(prompts) < 2:
        raise PromptError(f"{len(prompts)} prompt(s) cannot be split into training and evaluation prompts: give "
                          "at least 2, or give the evaluation prompts separately")
    order = list(range(len(prompts)))
    random.Random(int(seed)).shuffle(order)
    n_eval = min(len(prompts) - 1, max(1, math.ceil(len(prompts) * eval_fraction)))
    held = set(order[:n_eval])
    return ([p for i, p in enumerate(prompts) if i not in held], [p for i, p in enumerate(prompts) if i in held])


def draw_prompts(prompts: Sequence[Prompt], n: int, generator: torch.Generator | None = None) -> list[Prompt]:
    """n prompts drawn uniformly with replacement (deterministic given the generator's state)."""
    if not prompts:
        raise PromptError("no prompts to draw from")
    index = torch.randint(len(prompts), (int(n),), generator=generator)
    return [prompts[int(i)] for i in index]


def texts_and_fields(prompts: Sequence[Prompt]) -> tuple[list[str], list[dict]]:
    """The rewards' inputs: the prompt texts and their fields."""
    return [p.text for p in prompts], [dict(p.fields) for p in prompts]


__all__ = ["BUILTIN", "Prompt", "PromptError", "builtin_prompts", "digit_prompts", "draw_prompts", "load_prompts",
           "resolve_prompts", "simple_animal_prompts", "split_prompts", "texts_and_fields"]
