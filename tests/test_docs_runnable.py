"""The documentation's runnable Python blocks run as written.

A block is runnable when the line before its opening fence is ``<!-- runnable -->``; every such block of
README.md and docs/*.md is executed in a fresh namespace, in a folder that holds what the blocks name: a
tiny random SD 1.x folder at ``path/to/sd``, README's plug-in loss ``my_loss.py`` and the run ``warm`` of
README's guide command on that folder (``--steps 4``, so the replay is exact).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
BLOCK = re.compile(re.escape(MARKER) + r"\s*\n```python[^\n]*\n(.*?)\n```", re.S)
MY_LOSS = ("def warm(images, *, prompts, indices):\n    r, g, b = images.unbind(1)\n"
           "    return (b - r).mean(dim=(1, 2))\n")


def runnable_blocks() -> list[tuple[str, str]]:
    blocks = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for match in BLOCK.finditer(text):
            line = text[: match.start()].count("\n") + 1
            blocks.append((f"{doc.name}:{line}", match.group(1)))
        assert text.count(MARKER) == len(BLOCK.findall(text)), f"{doc.name}: a runnable marker not before ```python"
    return blocks


BLOCKS = runnable_blocks()


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory):
    from test_tasks_fixtures import build_tiny_latent_model

    from adjointdpm.cli import run

    root = tmp_path_factory.mktemp("docs")
    build_tiny_latent_model(root / "path" / "to" / "sd")
    (root / "my_loss.py").write_text(MY_LOSS)
    code = run(["guide", "--model", str(root / "path" / "to" / "sd"), "--prompt", "a photo",
                "--loss", f"{root / 'my_loss.py'}:warm", "-n", "2", "--iters", "1", "--steps", "4", "--quiet",
                "--out", str(root / "warm")])
    assert code == 0
    return root


def test_readme_marks_its_api_and_replay_blocks_runnable():
    names = " ".join(code for _, code in BLOCKS)
    assert "adpm.sample(unet, x_T" in names and "pipeline_call.json" in names and "replay(" in names


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("where, code", BLOCKS, ids=[w for w, _ in BLOCKS])
def test_runnable_block_runs_as_written(docs_folder, monkeypatch, where, code):
    monkeypatch.chdir(docs_folder)
    namespace = {"__name__": "__doc_block__"}
    exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the documentation's own code
