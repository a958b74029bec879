"""Counts, and advice, in the sentences users read."""


def counted(n: int, noun: str) -> str:
    """``counted(1, "cell")`` is "1 cell", ``counted(1200, "cell")`` is "1,200 cells",
    ``counted(2, "class")`` is "2 classes"."""
    return f"{n:,} {noun}{'' if n == 1 else 'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


# after a file that could not be replaced: the usual cause on Windows, where an open file is locked
OPEN_ELSEWHERE = " If it is open in another program (a spreadsheet, say), close it there and try again."
