"""Fixtures for tests against real kernel components (memory cgroups, journald).

A fixture skips only when what it needs is really absent (not root, no memory cgroup
controller, no journald binary, no ``unshare``); with ``$CI`` set it fails instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import realkernel


def _require_root() -> None:
    if os.geteuid() != 0:
        realkernel.skip_or_fail("needs root")


@pytest.fixture(scope="session")
def journald() -> Iterator[realkernel.JournaldHandle]:
    """A running systemd-journald that has ingested /dev/kmsg (started if none runs;
    stopped at session end only if this fixture started it)."""
    _require_root()
    if not realkernel.journald_pids() and not realkernel.JOURNALD_BINARY.exists():
        realkernel.skip_or_fail(f"no systemd-journald running and no {realkernel.JOURNALD_BINARY}")
    if not os.path.exists("/dev/kmsg"):
        realkernel.skip_or_fail("no /dev/kmsg")
    try:
        import systemd.journal  # noqa: F401
    except ImportError:
        realkernel.skip_or_fail("systemd-python (systemd.journal) is not installed")
    handle = realkernel.ensure_journald()
    try:
        yield handle
    finally:
        if handle.started:
            handle.stop()


@pytest.fixture
def throwaway_container() -> Iterator[Callable[..., realkernel.ThrowawayContainer]]:
    """Factory: ``throwaway_container(qos=..., driver=..., limit_bytes=...)`` returns an
    entered :class:`realkernel.ThrowawayContainer`; all are cleaned up after the test."""
    _require_root()
    try:
        realkernel.memory_cgroup_root()
    except RuntimeError as e:
        realkernel.skip_or_fail(str(e))
    if shutil.which("unshare") is None:
        realkernel.skip_or_fail("unshare (util-linux) not found")

    with ExitStack() as stack:

        def make(*args: Any, **kwargs: Any) -> realkernel.ThrowawayContainer:
            return stack.enter_context(realkernel.ThrowawayContainer(*args, **kwargs))

        yield make
