"""Value types of command-line options shared by every subcommand (`cdi.cli`)."""

from __future__ import annotations

import argparse

#: Feature access levels: gray (outputs only) and white (also gradients through the model).
ACCESS_LEVELS = ("gray", "white")
#: Seeds go to scikit-learn's random_state (0 to 2**32 - 1) and into the seeded noise.
MAX_SEED = 2**32 - 1


def count(text: str) -> int:
    """Integer option; MLflow passes numeric project parameters as floats such as '2.0'."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    return int(value)


def positive_int(text: str) -> int:
    value = count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def comma_list(text: str) -> list[str]:
    """A comma-separated list (feature names, folders); empty items are dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


__all__ = ["MAX_SEED", "comma_list", "count", "positive_int"]
