"""Counts in the sentences users read."""


def counted(n: int, noun: str) -> str:
    """``counted(1, "cell")`` is "1 cell", ``counted(1200, "cell")`` is "1,200 cells"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
