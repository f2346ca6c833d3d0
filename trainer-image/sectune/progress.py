"""Progress of long stages (scoring, generation, probes) for whoever listens: the CLI turns it
into progress bars with counts and ETA; with no listener it costs nothing.

    for start in batches("scoring labels", len(prompts), batch_size):
        ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Listener = Callable[[str, int, int], None]
"""Called with (what, done, total) as work advances; done == total when it ends."""

_listener: ContextVar[Listener | None] = ContextVar("sectune_progress", default=None)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def batches(what: str, total: int, batch_size: int) -> Iterator[int]:
    """range(0, total, batch_size), announcing how many items are done after each batch."""
    listener = _listener.get()
    for start in range(0, total, batch_size):
        yield start
        if listener is not None:
            listener(what, min(start + batch_size, total), total)
