"""Files generated from code into the repository (CRDs, dashboards): write them, or check that
the committed ones are what the code renders."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(files: dict[str, str], directories: list[Path], check: bool, what: str) -> int:
    """Write each file into every directory, or (check) list the stale ones and return 1."""
    stale = []
    for directory in directories:
        for name, text in files.items():
            path = directory / name
            if check:
                if not path.exists() or path.read_text() != text:
                    stale.append(str(path))
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"Wrote {path}")
    if stale:
        print(f"{what}; run `make`: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0
