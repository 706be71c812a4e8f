"""argparse value types shared by the command line and the settings that declare their own flags."""

from __future__ import annotations

import argparse
import re
from datetime import datetime, timedelta


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


def until(text: str, now: datetime | None = None) -> datetime:
    """A moment to stop starting work: ``HH:MM`` (its next occurrence: an hour already past today is
    tomorrow's) or an ISO date and time (``2026-12-04T18:30``), local time, not past."""
    now = now or datetime.now()
    if re.fullmatch(r"\d{1,2}:\d{2}", text):
        hour, minute = (int(x) for x in text.split(":"))
        if hour > 23 or minute > 59:
            raise argparse.ArgumentTypeError(f"{text!r}: not a time of day")
        moment = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        return moment if moment > now else moment + timedelta(days=1)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HH:MM or a date and time, e.g. "
                                         f"2026-12-04T18:30") from None
    if moment.tzinfo is not None:
        moment = moment.astimezone().replace(tzinfo=None)
    if moment <= now:
        raise argparse.ArgumentTypeError(f"{text!r} is past (now {now:%Y-%m-%d %H:%M})")
    return moment
