"""--help that states defaults: the `rice` commands and the `python -m tools.*` generators share it."""

from __future__ import annotations

import argparse
import textwrap


class ShowDefaults(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help where it has a real default its help does not state
    (unlike argparse.ArgumentDefaultsHelpFormatter: no "(default: None)", no second default)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        if not action.option_strings or default is None or default is argparse.SUPPRESS or isinstance(default, bool):
            return text
        if default in ("", []) or "default" in text:
            return text
        return text + " (default: %(default)s)"

    def _split_lines(self, text: str, width: int) -> list[str]:
        # never inside a word: a URL or a file name cut in two cannot be copied from the terminal
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)


class RawShowDefaults(ShowDefaults, argparse.RawDescriptionHelpFormatter):
    """A module docstring as the description, as written, and the defaults."""


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Give `parser` and every subcommand's parser ShowDefaults, keeping the formatter each was built with."""
    base: type = parser.formatter_class  # type: ignore[assignment]  # typeshed: a callable; argparse: a class
    if not issubclass(base, ShowDefaults):
        parser.formatter_class = type(f"Defaults{base.__name__}", (ShowDefaults, base), {})  # type: ignore[assignment]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                show_defaults(child)


def library_help(prog: str, doc: str | None, usage: str, argv: list[str] | None = None) -> int:
    """`python -m tools.X [--help]` for a generator that is a library: --help says what it is and how it
    is used; without arguments it does nothing, as it always did."""
    parser = argparse.ArgumentParser(prog=prog, description=doc, epilog=usage, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args(argv)
    return 0
