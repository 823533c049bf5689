"""One lock for importing pyroute2.

pyroute2 is imported lazily (its package import loads ~160 modules, ~23 MiB RSS) and from
more than one thread: the periodic collectors and the VXLAN link watch. Two threads importing
parts of it at the same time can deadlock in the import system (``_DeadlockError`` on a
module lock, seen as the firewall collector crashing on an agent's first run). So every lazy
import of pyroute2, or of our modules that import it at module level, happens inside
:func:`pyroute2_imports`, which loads the package whole under one lock first.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCK = threading.RLock()


@contextmanager
def pyroute2_imports() -> Iterator[None]:
    """Hold the lock (reentrant) with the pyroute2 package loaded, for the imports inside."""
    with _LOCK:
        import pyroute2  # type: ignore[import-untyped]  # noqa: F401

        yield
