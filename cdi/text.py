"""Text for people and files from names the file system allows (no heavy imports: tracking uses it too)."""

from __future__ import annotations

import os


def printable_path(path: str | os.PathLike) -> str:
    """`path` as valid UTF-8 text: bytes that are not UTF-8 are shown as backslash escapes (\\xff).

    For messages, tables and JSON: a name with such bytes is legal on Linux, and Python holds it as a
    str with surrogate escapes that no UTF-8 writer accepts.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        return text.decode("utf-8", "backslashreplace")
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file system decoding makes (not U+DC80..U+DCFF)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
