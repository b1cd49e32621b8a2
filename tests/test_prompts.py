"""Prompts: .txt and .jsonl files (comments, blank lines, fields), one-line errors for missing, empty and
malformed files, the built-in sets (the embedded model's ten digit prompts with their ``class``, DDPO's 45
simple animals), a deterministic train/eval split and deterministic draws."""
from __future__ import annotations

import json

import pytest
import torch

from adjointdpm.prompts import (BUILTIN, Prompt, PromptError, builtin_prompts, digit_prompts, draw_prompts,
                                load_prompts, resolve_prompts, simple_animal_prompts, split_prompts,
                                texts_and_fields)


def test_txt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\n a red apple \n\n  # indented comment\na blue car\n")
    assert load_prompts(path) == [Prompt("a red apple"), Prompt("a blue car")]


def test_jsonl_with_fields(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "a handwritten digit three", "class": 3}, {"prompt": " a cat ", "class": "cat", "tags": ["x"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = load_prompts(path)
    assert prompts == [Prompt("a handwritten digit three", {"class": 3}), Prompt("a cat", {"class": "cat", "tags": ["x"]})]
    texts, fields = texts_and_fields(prompts)
    assert texts == ["a handwritten digit three", "a cat"] and fields[1]["tags"] == ["x"]
    assert prompts[0].to_json() == {"prompt": "a handwritten digit three", "class": 3}


@pytest.mark.parametrize("name, text, words", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "\n# only a comment\n\n", "holds no prompts"),
    ("empty.jsonl", "", "holds no prompts"),
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', "bad.jsonl:2: not valid JSON"),
    ("list.jsonl", '["a cat"]\n', "list.jsonl:1: a JSON list, not an object"),
    ("noprompt.jsonl", '{"text": "a cat", "class": 1}\n', 'noprompt.jsonl:1: no non-empty string "prompt" (keys: text, class)'),
    ("blank.jsonl", '{"prompt": "  "}\n', "no non-empty string"),
    ("prompts.csv", "a,b\n", "use .txt"),
])
def test_bad_files_are_one_line(tmp_path, name, text, words):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(PromptError) as err:
        load_prompts(path)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert isinstance(err.value, ValueError)


def test_digit_prompts_are_the_embedded_models():
    from adjointdpm.embedded.data import prompt_for

    prompts = digit_prompts()
    assert [p.text for p in prompts] == [prompt_for(d) for d in range(10)]
    assert [p.fields["class"] for p in prompts] == list(range(10))
    assert prompts[8].text == "a handwritten digit eight" and prompts[8].fields["word"] == "eight"
    custom = digit_prompts({"words": ["nil", "uno"], "caption_templates": ["the number {}"]})
    assert custom == [Prompt("the number nil", {"class": 0, "word": "nil"}), Prompt("the number uno", {"class": 1, "word": "uno"})]
    with pytest.raises(PromptError, match="digits model's settings"):
        digit_prompts({})


def test_simple_animals():
    animals = simple_animal_prompts()
    texts = [p.text for p in animals]
    assert len(texts) == 45 == len(set(texts))
    assert texts[:3] == ["cat", "dog", "horse"] and texts[-1] == "kangaroo"
    assert all(p.fields == {} for p in animals)


def test_builtin_and_resolve(tmp_path):
    assert set(BUILTIN) == {"digits", "simple-animals"}
    assert resolve_prompts("digits") == builtin_prompts("digits")
    assert len(resolve_prompts("simple-animals")) == 45
    (tmp_path / "p.txt").write_text("x\n")
    assert resolve_prompts(tmp_path / "p.txt") == [Prompt("x")]
    with pytest.raises(PromptError, match="no built-in prompt set 'animals'"):
        builtin_prompts("animals")
    with pytest.raises(PromptError, match="or a built-in set: digits, simple-animals"):
        resolve_prompts("animals")


def test_split_is_deterministic_and_disjoint():
    prompts = simple_animal_prompts()
    train, held = split_prompts(prompts, 0.2, seed=0)
    assert len(held) == 9 and len(train) == 36
    assert {p.text for p in train} | {p.text for p in held} == {p.text for p in prompts}
    assert not {p.text for p in train} & {p.text for p in held}
    order = [p.text for p in prompts]
    assert [p.text for p in held] == sorted((p.text for p in held), key=order.index)  # original order kept
    assert split_prompts(prompts, 0.2, seed=0) == (train, held)
    assert split_prompts(prompts, 0.2, seed=1)[1] != held
    tr, ev = split_prompts(digit_prompts()[:2], 0.9)
    assert len(tr) == len(ev) == 1
    with pytest.raises(PromptError, match="at least 2"):
        split_prompts([Prompt("a")])
    with pytest.raises(PromptError, match="strictly between 0 and 1"):
        split_prompts(prompts, 1.0)


def test_draw_is_deterministic():
    prompts = digit_prompts()
    a = draw_prompts(prompts, 32, torch.Generator().manual_seed(3))
    b = draw_prompts(prompts, 32, torch.Generator().manual_seed(3))
    assert a == b and len(a) == 32 and len({p.text for p in a}) > 1
    with pytest.raises(PromptError):
        draw_prompts([], 2)
