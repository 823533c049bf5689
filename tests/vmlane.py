"""The VM lane: Debian's own kernel (``linux-image-amd64``, unpacked, never installed) booted
under qemu with a busybox initramfs, running tests inside on cgroup v2.

The guest shares the host's root filesystem read-only over 9p (so the project and its
virtualenv run there unchanged), gets tmpfs for the writable directories and one writable
9p export, the *lane directory*: the host writes ``lane.env`` (the command) into it, the
guest writes its results back. No network (``-nic none``).

Build products are cached under ``$NODEDIAG_VM_CACHE`` (default ``/var/cache/nodediag-vm``).
Import as ``import vmlane`` (like ``realkernel``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Accel = Literal["kvm", "tcg"]

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
INIT_SCRIPT = HERE / "vm" / "init"
CACHE = Path(os.environ.get("NODEDIAG_VM_CACHE", "/var/cache/nodediag-vm"))
KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"
#: Modules the guest loads (dependencies are added from each module's own .modinfo).
GUEST_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
#: cgroup v2 only, with the memory controller; no swap exists in the guest. A ring buffer
#: large enough that /dev/kmsg keeps every record of the run (for ``scan`` and vectors).
KERNEL_CMDLINE = (
    "console=ttyS0 panic=-1 quiet loglevel=4 log_buf_len=8M cgroup_no_v1=all "
    "systemd.unified_cgroup_hierarchy=1 rdinit=/init"
)
INIT_MARKER = "nodediag-vm: init started"
LANE_MOUNT = "/run/nodediag-vm/lane"


@dataclass(frozen=True)
class GuestKernel:
    """An unpacked kernel package: its ``vmlinuz`` and ``lib/modules/<release>``."""

    package: str  # e.g. linux-image-6.1.0-57-amd64
    version: str  # the Debian package version
    vmlinuz: Path
    modules: Path

    @property
    def release(self) -> str:
        return self.modules.name


def _run(argv: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr}")
    return result.stdout


def _apt_cache(*args: str) -> str:
    """``apt-cache ARGS``; once after ``apt-get update`` when the package lists lack it."""
    try:
        return _run(["apt-cache", *args])
    except RuntimeError:
        _run(["apt-get", "update", "-qq"])
        return _run(["apt-cache", *args])


def kernel_package_name(meta: str = KERNEL_META_PACKAGE) -> str:
    """The versioned image package the meta package depends on (apt's view)."""
    out = _apt_cache("depends", meta)
    for line in out.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
        if match:
            return match.group(1)
    raise RuntimeError(f"apt-cache depends {meta}: no linux-image-* dependency in:\n{out}")


def fetch_kernel(cache: Path = CACHE) -> GuestKernel:
    """``apt-get download`` the kernel package and ``dpkg-deb -x`` it (cached)."""
    package = kernel_package_name()
    version = _apt_cache("show", "--no-all-versions", package)
    version = re.search(r"^Version: (\S+)", version, re.M).group(1)  # type: ignore[union-attr]
    root = cache / f"{package}_{version}"
    if not (root / ".unpacked").exists():
        downloads = cache / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        os.chmod(downloads, 0o755)
        debs = list(downloads.glob(f"{package}_*.deb"))
        if not debs:
            _run(["apt-get", "download", "-q", package], cwd=downloads)
            debs = list(downloads.glob(f"{package}_*.deb"))
        shutil.rmtree(root, ignore_errors=True)
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        for deb in debs:
            deb.unlink()
        (root / ".unpacked").touch()
        for old in cache.glob("linux-image-*"):  # an earlier kernel (Debian point release)
            if old != root:
                shutil.rmtree(old, ignore_errors=True)
    [vmlinuz] = (root / "boot").glob("vmlinuz-*")
    [modules] = (root / "lib" / "modules").iterdir()
    return GuestKernel(package, version, vmlinuz, modules)


def module_files(modules: Path) -> dict[str, Path]:
    """Module name (``-`` as ``_``) → its .ko file."""
    return {p.name[:-3].replace("-", "_"): p for p in modules.glob("kernel/**/*.ko")}


def module_depends(ko: Path) -> list[str]:
    """The ``depends=`` of a module's .modinfo section (what depmod reads; the package
    ships no modules.dep, depmod makes it at install)."""
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", ko.read_bytes())
    names = match.group(1).decode().replace("-", "_").split(",") if match else []
    return [name for name in names if name]


def module_load_order(modules: Path, wanted: tuple[str, ...] = GUEST_MODULES) -> list[Path]:
    """``wanted`` and everything they depend on, dependencies first."""
    files = module_files(modules)
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name not in files:
            raise RuntimeError(f"module {name} is not in {modules}")
        for dependency in module_depends(files[name]):
            visit(dependency)
        order.append(name)

    for name in wanted:
        visit(name)
    return [files[name] for name in order]


def _cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A ``newc`` cpio archive of (name, mode, data); symlinks carry their target as data."""
    out = io.BytesIO()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\x00"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out.write(b"070701" + b"".join(b"%08X" % f for f in fields) + encoded)
        out.write(b"\x00" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\x00" * (-len(data) % 4))
    return out.getvalue()


def build_initramfs(kernel: GuestKernel, cache: Path = CACHE) -> Path:
    """busybox-static, the init script and the guest modules, as a gzipped cpio (cached
    by the kernel and the init script's content)."""
    init = INIT_SCRIPT.read_bytes()
    stamp = f"{kernel.package}_{kernel.version}_{hashlib.sha256(init).hexdigest()[:12]}"
    target = cache / f"initramfs_{stamp}.cpio.gz"
    if target.exists():
        return target
    for old in cache.glob("initramfs_*"):
        old.unlink(missing_ok=True)
    directory, regular, executable = 0o040755, 0o100644, 0o100755
    entries: list[tuple[str, int, bytes]] = [
        (name, directory, b"") for name in ("bin", "dev", "proc", "sys", "modules", "newroot")
    ]
    entries += [("bin/busybox", executable, BUSYBOX.read_bytes()), ("init", executable, init)]
    order = module_load_order(kernel.modules)
    entries += [(f"modules/{ko.stem}.ko", regular, ko.read_bytes()) for ko in order]
    entries.append(("modules/order", regular, "".join(f"{ko.stem}\n" for ko in order).encode()))
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(gzip.compress(_cpio_newc(entries), compresslevel=6))
    partial.rename(target)
    return target


@dataclass(frozen=True)
class LaneRun:
    """What one boot did: the accelerator, timings and the lane directory it wrote."""

    accel: Accel
    boot_seconds: float  # qemu start → the guest's init ran
    total_seconds: float  # qemu start → qemu exit
    exit_status: int | None  # the lane command's exit status (None: it never finished)
    lane: Path
    console: str
    kvm_note: str  # why KVM was not used, or ""


def kvm_usable() -> str:
    """Empty when /dev/kvm can be opened read-write, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"/dev/kvm: {e.strerror}"
    os.close(fd)
    return ""


def qemu_argv(
    kernel: GuestKernel, initramfs: Path, lane: Path, accel: Accel, memory_mib: int, cpus: int
) -> list[str]:
    cpu = ["-accel", "kvm", "-cpu", "host"] if accel == "kvm" else ["-accel", "tcg", "-cpu", "max"]
    return [
        QEMU, *cpu, "-m", str(memory_mib), "-smp", str(cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-nic", "none", "-serial", "stdio",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
        "-append", KERNEL_CMDLINE,
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,"
                   "multidevs=remap,id=hostroot",
        "-virtfs", f"local,path={lane},mount_tag=lane,security_model=none,id=lane",
        # The project again on its own: a checkout under /tmp, /run or /var/log would be
        # hidden by the guest's tmpfs mounts there.
        "-virtfs", f"local,path={PROJECT},mount_tag=project,security_model=none,readonly=on,"
                   "multidevs=remap,id=project",
    ]  # fmt: skip


def boot(
    kernel: GuestKernel,
    initramfs: Path,
    lane: Path,
    command: str,
    *,
    accel: Accel,
    timeout: float,
    boot_timeout: float,
    memory_mib: int = 1024,
    cpus: int = 2,
) -> LaneRun:
    """Boot once and run ``command`` (``sh -c`` in the guest, cwd ``/``). Returns when qemu
    exits; raises TimeoutError when the guest's init does not start within
    ``boot_timeout`` (qemu is killed) or the whole run exceeds ``timeout``."""
    (lane / "lane.env").write_text(
        f"LANE_COMMAND={shlex.quote(command)}\nLANE_ACCEL={accel}\n"
        f"LANE_PROJECT={shlex.quote(str(PROJECT))}\n"
    )
    for stale in ("exit-status", "init-failed"):
        (lane / stale).unlink(missing_ok=True)
    argv = qemu_argv(kernel, initramfs, lane, accel, memory_mib, cpus)
    console_path = lane / f"console-{accel}.log"
    started = time.monotonic()
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
        )
    try:
        booted = _wait_console(proc, console_path, INIT_MARKER, started + boot_timeout)
        if booted is None:
            raise TimeoutError(
                f"{accel}: the guest's init did not start within {boot_timeout:.0f}s:\n"
                + _tail(console_path)
            )
        try:
            proc.wait(timeout=max(1.0, started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(
                f"the VM ran longer than {timeout:.0f}s:\n{_tail(console_path)}"
            ) from e
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    total = time.monotonic() - started
    status_file = lane / "exit-status"
    status = int(status_file.read_text()) if status_file.exists() else None
    console_text = console_path.read_text(errors="replace")
    return LaneRun(accel, booted - started, total, status, lane, console_text, "")


def _wait_console(
    proc: subprocess.Popen[bytes], console: Path, marker: str, deadline: float
) -> float | None:
    """The monotonic time ``marker`` appeared on the console; None on deadline or exit."""
    while time.monotonic() < deadline:
        if marker in console.read_text(errors="replace"):
            return time.monotonic()
        if proc.poll() is not None:
            return None
        time.sleep(0.05)
    return None


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_lane(
    lane: Path,
    command: str,
    *,
    timeout: float = 900,
    kvm_boot_timeout: float = 10,
    tcg_boot_timeout: float = 120,
    cache: Path = CACHE,
) -> LaneRun:
    """Build (cached), then boot: KVM first when /dev/kvm opens, TCG when KVM is unusable
    or its guest does not reach init within ``kvm_boot_timeout`` (nested virtualization
    can accept the VM and hang it)."""
    kernel = fetch_kernel(cache)
    initramfs = build_initramfs(kernel, cache)
    note = kvm_usable()
    if not note:
        try:
            return boot(
                kernel, initramfs, lane, command,
                accel="kvm", timeout=timeout, boot_timeout=kvm_boot_timeout,
            )  # fmt: skip
        except TimeoutError as e:
            if "did not start within" not in str(e):
                raise
            note = f"KVM guest did not reach init within {kvm_boot_timeout:.0f}s"
    run = boot(
        kernel, initramfs, lane, command,
        accel="tcg", timeout=timeout, boot_timeout=tcg_boot_timeout,
    )  # fmt: skip
    return LaneRun(
        run.accel, run.boot_seconds, run.total_seconds, run.exit_status, run.lane,
        run.console, note,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    """``vmlane.py build``: fetch the kernel and build the initramfs (prints their paths);
    ``vmlane.py run LANE_DIR COMMAND``: boot once and run COMMAND in the guest."""
    if argv[:1] == ["build"] and len(argv) == 1:
        kernel = fetch_kernel()
        print(kernel.vmlinuz)
        print(build_initramfs(kernel))
        return 0
    if argv[:1] == ["run"] and len(argv) == 3:
        run = run_lane(Path(argv[1]), argv[2])
        print(
            f"accel={run.accel} {run.kvm_note} boot={run.boot_seconds:.1f}s "
            f"total={run.total_seconds:.1f}s exit={run.exit_status}"
        )
        return 0 if run.exit_status == 0 else 1
    print("usage: vmlane.py build | vmlane.py run LANE_DIR COMMAND", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
