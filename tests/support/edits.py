"""Edited copies of a row, as rows get copied between files: what the data audit's leakage
check must still find."""

from __future__ import annotations

EDITS = ("one word replaced", "words appended", "upper case, periods removed")


def edited_copy(text: str, how: int) -> str:
    """`text` edited the way EDITS[how] says."""
    words = text.split()
    if how == 0:
        words[len(words) // 2] = "redacted"
    elif how == 1:
        words.append("(observed 2024)")
    else:
        return text.upper().replace(".", "")
    return " ".join(words)
