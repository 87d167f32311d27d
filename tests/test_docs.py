"""The docs' examples run as written: every `l2s` command line names real commands and options, and the
README's Python walk-through runs (slow: it extracts, trains and generates on the embedded model)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer.main
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
    options = _options(sub)
    for opt in (w.split("=")[0] for w in words if w.startswith("--")):
        assert opt in options, f"{where}: option {opt} is not an option of `l2s {' '.join(sub[:1])}`"


def _options(sub: list[str]) -> set[str]:
    """Every option name of the command ``sub`` names (``--x`` and ``--no-x`` of flags, and ``--help``), exactly
    as the CLI parses them: a doc's ``--out`` must be an option, not the prefix of ``--out-dir``."""
    cmd = typer.main.get_command(app)
    for word in sub[:2]:
        group = getattr(cmd, "commands", None)
        if not group or word not in group:
            break
        cmd = group[word]
    return {"--help"} | {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_option_check_is_exact() -> None:
    """An option is one of the command's, not the prefix of one: `l2s extract` has ``--layers``, not ``--layer``
    (a substring check of the help text passed ``--layer`` there); subcommands' options are their own."""
    assert "--layers" in _options(["extract"]) and "--layer" not in _options(["extract"])
    assert {"--layer", "--gate", "--no-gate", "--help"} <= _options(["train"]) and "--layers" not in _options(["train"])
    assert "--gt" in _options(["score", "chair"]) and "--gt" not in _options(["score"])


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
