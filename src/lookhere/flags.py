"""argparse value types shared by the command line and the settings that declare their own flags."""

from __future__ import annotations

import argparse
import re


def flag(name: str) -> str:
    """The command-line flag of a settings field: ``drop_path`` -> ``--drop-path``."""
    return "--" + name.replace("_", "-")


_SPLIT = re.compile(r"^[\w.-]+(\[[^\[\]]*\])?(\+[\w.-]+(\[[^\[\]]*\])?)*$")


def split_name(text: str) -> str:
    """A split name, optionally sliced and joined as Hugging Face datasets write them."""
    if not _SPLIT.match(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a split name, optionally sliced: test, val, "
                                         f"'train[99%:]', 'test[:500]'")
    return text


def count(text: str) -> int:
    """argparse type of a flag that counts something (>= 1): argparse names the flag in the message."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
