"""Progress of long units: a terminal bar (tqdm) and, where an orchestrator listens, its own
report (the flow publishes a Prefect progress artifact per unit).

A listener is set per thread of execution (a context variable), so units running side by
side in one process each report to their own.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

# called as listener(fraction_done in [0, 1], description)
LISTENER: ContextVar[Callable[[float, str], None] | None] = ContextVar("curate_progress", default=None)
EVERY_S = 2.0  # the listener hears at most this often (and at the end)


@contextmanager
def progress(total: int, desc: str, unit: str = "") -> Iterator[Callable[[int], None]]:
    """`with progress(n, "embed: proxy epochs") as step: ... step(1)`."""
    from tqdm import tqdm

    listener = LISTENER.get()
    done, last = 0, 0.0

    def tell(force: bool = False) -> None:
        nonlocal last
        if listener is not None and total and (force or time.monotonic() - last >= EVERY_S):
            last = time.monotonic()
            listener(min(done / total, 1.0), desc)

    with tqdm(total=total, desc=desc, unit=unit, disable=None) as bar:
        tell(force=True)

        def step(n: int = 1) -> None:
            nonlocal done
            done += n
            bar.update(n)
            tell(force=done >= total)

        yield step
