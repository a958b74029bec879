"""Counts, paths and advice, in the sentences users read."""

import os


def counted(n: int, noun: str) -> str:
    """``counted(1, "cell")`` is "1 cell", ``counted(1200, "cell")`` is "1,200 cells",
    ``counted(2, "class")`` is "2 classes"."""
    return f"{n:,} {noun}{'' if n == 1 else 'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


def first_few(items, shown: int = 5) -> str:
    """The first ``shown`` of ``items`` joined by commas, then ", ..." where there were more."""
    items = [str(item) for item in items]
    return ", ".join(items[:shown]) + (", ..." if len(items) > shown else "")


# after a file that could not be replaced: the usual cause on Windows, where an open file is locked
OPEN_ELSEWHERE = " If it is open in another program (a spreadsheet, say), close it there and try again."


def shown(path: str | os.PathLike) -> str:
    """``path`` as text every output takes: the bytes of a name that are not UTF-8 (a Windows
    share mounted without it: ``caf\\xe9.jpg``) escaped, not kept as lone surrogates, which no
    CSV or terminal encodes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
