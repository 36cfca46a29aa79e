"""What every `libero-eval` subcommand's parser shares: argparse type checkers, subparser creation, and the
one way a command reports a usage error. Imported by `libero_eval.cli` and by each command module that adds a
subparser (`libero_eval.learning.commands`, ...); it imports nothing of the project, so it never closes a cycle.
"""
from __future__ import annotations

import argparse
import sys


def parse_int_list(text: str, what: str) -> list[int] | str:
    """'0,2,5-7' -> [0, 2, 5, 6, 7]; 'all' stays 'all' (the caller knows how many there are)."""
    if text == "all":
        return "all"
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"bad {what} list {text!r}: expected comma-separated integers or ranges like 0,2,5-7, or 'all'"
            ) from None
    return out


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_command(sub, name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A subparser whose epilog (examples) keeps its line breaks."""
    return sub.add_parser(name, help=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)


def fail(command: str, exc: BaseException | str) -> int:
    """Report a bad argument or input found after parsing (`libero-eval <command>: error: ...` on stderr) and
    return the exit status for it, 2, as argparse does for its own errors."""
    print(f"libero-eval {command}: error: {exc}", file=sys.stderr)
    return 2
