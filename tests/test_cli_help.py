"""Docs and help that stand alone: nothing points at files outside the repository (a development
machine's shared folders, notes that only exist beside it), every local link in the README
resolves, and every `rice` command's --help renders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tools.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|\bRICE\.md\b|/work/|shared/data")


def _texts() -> dict[str, str]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    sources = [p for pkg in ("model", "index", "pipeline", "service", "tools") for p in sorted((ROOT / pkg).rglob("*.py"))]
    console = sorted((ROOT / "service" / "console").glob("*.*"))
    return {str(p.relative_to(ROOT)): p.read_text() for p in files + sources + console if p.suffix != ".png"}


def test_no_references_outside_the_repository() -> None:
    found = [f"{name}: {m.group(0)}" for name, text in _texts().items() for m in OUTSIDE.finditer(text)]
    assert found == []


def test_readme_local_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)\)", readme)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert local and [link for link in local if not (ROOT / link).exists()] == []
    assert "https://github.com/marcusklasson/GroceryStoreDataset" in readme and "$GROCERY_ROOT" in readme


def _subcommands() -> list[str]:
    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sorted(actions[0].choices)  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", _subcommands())
def test_every_help_renders_and_stands_alone(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([command, "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: rice " + command) and not OUTSIDE.search(text)
