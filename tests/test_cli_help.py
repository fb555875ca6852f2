"""Docs and help that stand alone: nothing points at files outside the repository (a development
machine's shared folders, notes that only exist beside it), every local link in the README
resolves, every `rice` command's --help renders with help for every option (and its default),
names the public sources a user needs, and every `python -m tools.*` generator answers --help."""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.settings import Settings
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


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every command and nested subcommand (e.g. `gallery export`), by its words after `rice`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from _commands(child, (*path, name))


def _help(words: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """`rice WORDS --help` as printed, whitespace folded (wrapping depends on the terminal)."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*words, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Options of `parser` whose help, as printed, is empty or leaves out a real default."""
    formatter = parser._get_formatter()
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        shown = formatter._expand_help(action) if action.help else ""
        default = action.default
        real_default = action.option_strings and default not in (None, "", [], argparse.SUPPRESS) and not isinstance(default, bool)
        if not shown.strip() or (real_default and "default" not in shown):
            out.append(f"{'/'.join(action.option_strings) or action.dest}: {shown!r}")
    return out


def test_every_option_of_every_command_has_help_and_its_default() -> None:
    missing = {" ".join(words): _undocumented(parser) for words, parser in _commands(build_parser())}
    assert {k: v for k, v in missing.items() if v} == {}


def test_help_names_what_a_new_user_needs(capsys: pytest.CaptureFixture[str]) -> None:
    fields = Settings.model_fields
    serve = _help(["serve"], capsys)
    assert f"RICE_HOST, else {fields['host'].default}" in serve and f"RICE_PORT, else {fields['port'].default}" in serve
    recognize = _help(["recognize"], capsys)
    assert "--url URL the service's base URL (default: http://127.0.0.1:8000)" in recognize and "request_id" in recognize
    ingest = _help(["ingest"], capsys)
    assert "images named by SKU" in ingest and "a single image file" in ingest
    assert 'a JSON object such as {"name": "Cola"}' in ingest  # the CSV form is shown, and said to be the CSV form
    assert "https://github.com/marcusklasson/GroceryStoreDataset" in _help(["grocery-check"], capsys)
    assert "https://github.com/marcusklasson/GroceryStoreDataset" in _help(["livebench"], capsys)
    assert "https://github.com/adxcreative/RICE" in _help(["lpr4m"], capsys)
    assert "https://github.com/adxcreative/RICE" in _help(["import-checkpoint"], capsys)
    train = _help(["train"], capsys)
    assert "OpenAI CLIP's public ViT-B-32.pt" in train and "https://github.com/openai/CLIP" in train
    assert "--device DEVICE torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)" in train
    readme = (ROOT / "README.md").read_text()
    assert "https://github.com/adxcreative/RICE" in readme and "openai/CLIP" in readme  # the sources the help repeats


GENERATORS = ["democatalog", "clipsynth", "livescene", "mediafuzz", "longclip", "grocery_clips"]


@pytest.mark.parametrize("module", GENERATORS)
def test_generators_answer_help(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    main: Callable[[list[str]], object] = importlib.import_module(f"tools.{module}").main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m tools.{module}") and not OUTSIDE.search(out)
    body = " ".join(out.split())
    assert len(body) > 400  # says what it is for, not only the usage line
    if module in ("democatalog", "clipsynth", "livescene", "mediafuzz"):
        doc = importlib.import_module(f"tools.{module}").__doc__
        assert doc and " ".join(doc.split()[:6]) in body  # the module's own account of itself
        assert "a library, nothing to run" in body
        assert main([]) == 0 and capsys.readouterr().out == ""  # as before: nothing happens without --help
    if module == "longclip":
        assert "--products 12 --distractors 0 --seed 0 films exactly the catalog `rice demo` ingests" in body


def test_every_generator_option_has_help_and_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    shown: list[argparse.ArgumentParser] = []
    monkeypatch.setattr(argparse.ArgumentParser, "print_help", lambda self, file=None: shown.append(self))
    for module in ("longclip", "grocery_clips"):
        with pytest.raises(SystemExit):
            importlib.import_module(f"tools.{module}").main(["--help"])
    assert len(shown) == 2 and [_undocumented(p) for p in shown] == [[], []]
