"""Fixtures for tests against real kernel components (memory cgroups, journald) and a
real containerd + runc.

A fixture skips only when what it needs is really absent (not root, no memory cgroup
controller, no journald binary, no ``unshare``, no containerd/ctr/runc); with ``$CI`` set
it fails instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pytest
import realcontainerd
import realkernel

if TYPE_CHECKING:
    import imagelab


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


@pytest.fixture(scope="session")
def containerd() -> Iterator[realcontainerd.Containerd]:
    """A real containerd (runc runtime, cgroupfs driver) on a private socket, root and state
    dir, with the local busybox image imported (``containerd.image``). Shared by the whole
    session: a test that stops it must start it again (see ``Containerd.stop/start``)."""
    _require_root()
    missing = realcontainerd.missing_binaries()
    if missing:
        realkernel.skip_or_fail(f"not installed: {', '.join(missing)} (Debian containerd, runc)")
    if not realcontainerd.BUSYBOX.exists():
        realkernel.skip_or_fail(f"no {realcontainerd.BUSYBOX} (Debian busybox-static)")
    try:
        realkernel.memory_cgroup_root()
    except RuntimeError as e:
        realkernel.skip_or_fail(str(e))
    with realcontainerd.Containerd() as cd:
        realcontainerd.import_busybox_image(cd)
        yield cd


@pytest.fixture
def k8s_container(
    containerd: realcontainerd.Containerd,
) -> Iterator[Callable[..., realcontainerd.RunningContainer]]:
    """Factory: ``k8s_container(**kwargs)`` is :func:`realcontainerd.run_container` on the
    session's containerd (busybox image, ``sleep 3600`` init, 32 MiB limit by default);
    the containers and their cgroups are removed after the test."""
    started: list[realcontainerd.RunningContainer] = []
    before = set(containerd.cgroup_prefixes)

    def make(**kwargs: Any) -> realcontainerd.RunningContainer:
        container = realcontainerd.run_container(containerd, **kwargs)
        started.append(container)
        return container

    try:
        yield make
    finally:
        errors: list[str] = []
        if not containerd.running:
            containerd.start()  # a test that stopped it and failed before restarting
        for container in reversed(started):
            try:
                container.remove()
            except Exception as e:  # remove the others all the same
                errors.append(f"{container.container_id}: {e}")
        for prefix in sorted(containerd.cgroup_prefixes - before):
            try:
                realcontainerd.remove_cgroup_tree(prefix)
                containerd.cgroup_prefixes.discard(prefix)
            except Exception as e:  # the session's cleanup tries again
                errors.append(str(e))
        if errors:
            raise RuntimeError("k8s_container cleanup: " + "; ".join(errors))


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> imagelab.Image:
    """The image as shipped, built once per session by scripts/build-image."""
    import imagelab

    imagelab.require_tools()
    return imagelab.build_image(tmp_path_factory.mktemp("image"))
