"""The docs' examples run as written: every `l2s` command line names real commands and options, and the
README's Python walk-through runs (slow: it extracts, trains and generates on the embedded model)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from learn2steer.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: Path, *langs: str) -> list[str]:
    """The fenced code blocks of a Markdown file whose language is one of ``langs``."""
    out: list[str] = []
    lang: str | None = None
    lines: list[str] = []
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                if lang in langs:
                    out.append("\n".join(lines) + "\n")
                lang = None
        elif lang is not None:
            lines.append(line)
    return out


def _command_lines() -> list[tuple[str, list[str]]]:
    """Every `l2s ...` invocation in a shell block of the docs, with continuation lines joined."""
    out = []
    for path in DOCS:
        for block in _blocks(path, "bash", "sh", ""):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if not re.search(r"(^|[\s/])l2s\s", line) or line.startswith("#"):
                    continue
                words = shlex.split(line)
                for k, w in enumerate(words):
                    if w == "l2s" or w.endswith("/l2s"):
                        out.append((f"{path.name}: {line}", words[k + 1:]))
                        break
    return out


COMMANDS = _command_lines()


def test_the_docs_show_commands() -> None:
    assert len(COMMANDS) >= 10, "the command extraction itself broke"


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w[:80] for w, _ in COMMANDS])
def test_doc_command_names_real_commands_and_options(where: str, argv: list[str]) -> None:
    words = [w for w in argv if w not in ("&&", "|")]
    sub = [w for w in words if not w.startswith("-")][:2]
    helped = CliRunner().invoke(app, [*sub[:2], "--help"] if sub[:1] == ["score"] else [*sub[:1], "--help"])
    assert helped.exit_code == 0, f"{where}: `l2s {' '.join(sub[:1])}` is not a command"
    text = re.sub(r"\x1b\[[0-9;]*m", "", helped.output)
    for opt in (w.split("=")[0] for w in words if w.startswith("--")):
        assert opt in text, f"{where}: option {opt} is not an option of `l2s {' '.join(sub[:1])}`"


@pytest.mark.slow
def test_readme_python_walkthrough_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    blocks = _blocks(ROOT / "README.md", "python")
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert (tmp_path / "runs" / "art" / "l2s" / "model.safetensors").exists()
    answers = namespace["answers"]
    assert isinstance(answers, list) and len(answers) == len(namespace["test_examples"])  # type: ignore[arg-type]
