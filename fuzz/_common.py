"""What every harness shares: seed corpora built from tests/vectors at run time, libFuzzer
defaults, and the atheris hooks.

Nothing here imports the project: a harness imports the project inside
``atheris.instrument_imports()`` so that the imported modules get coverage instrumentation.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO = FUZZ_DIR.parent
VECTORS = REPO / "tests" / "vectors"
CORPUS_ROOT = Path(os.environ.get("NODEDIAG_FUZZ_CORPUS", FUZZ_DIR / "corpus"))
#: Where libFuzzer writes crash-*/timeout-*/oom-* reproducers (one directory per harness).
ARTIFACTS = Path(os.environ.get("NODEDIAG_FUZZ_ARTIFACTS", FUZZ_DIR / "artifacts"))

# `[uptime]` then, with CONFIG_PRINTK_CALLER, `[ T123]`: the prefix of tests/vectors/oom lines.
_DMESG_PREFIX = re.compile(r"^\[\s*\d+\.\d+\](?:\[\s*[TC]\d+\])? ?")

LIBFUZZER_DEFAULTS = (
    # A unit that runs this long is a finding (a quadratic regex, a walk that does not end).
    "-timeout=30",
    "-print_final_stats=1",
)

# Tokens every dictionary gets: characters str.isdigit() and the regex \d accept that int() may
# not (superscripts), decimal digits of other scripts, a BOM, invalid UTF-8, a NUL, CRLF.
GENERIC_TOKENS = (
    "\u00b2".encode(),
    "\u0663".encode(),
    "\uff13".encode(),
    b"\xef\xbb\xbf",
    b"\xff\xfe",
    b"\x00",
    b"\r\n",
    b"99999999999999999999999",
)


def vector_bytes(pattern: str) -> list[bytes]:
    """The files of tests/vectors matching ``pattern`` (a glob relative to it), sorted."""
    return [path.read_bytes() for path in sorted(VECTORS.glob(pattern)) if path.is_file()]


def dmesg_messages(text: str) -> str:
    """tests/vectors/oom text with the ``[uptime]`` prefixes removed: bare kernel messages."""
    return "\n".join(_DMESG_PREFIX.sub("", line) for line in text.splitlines()) + "\n"


def enable_hooks(atheris: object) -> None:
    """Let the fuzzer see inside ``re`` matches and ``str`` comparisons (``startswith``…).

    Must run before the project is imported: its patterns are compiled at import time.
    """
    hooks = getattr(atheris, "enabled_hooks", None)
    if hooks is not None:
        hooks.add("RegEx")
        hooks.add("str")


def workdir(name: str) -> Path:
    """An empty directory for files a harness writes, ``fuzz/corpus/work/<name>``.

    The same one every run, emptied at start: libFuzzer ends the process with ``exit()``,
    so no ``finally`` or ``atexit`` clean-up of a temporary directory would ever run.
    """
    path = CORPUS_ROOT / "work" / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def libfuzzer_argv(
    name: str, seeds: Iterable[bytes], dictionary: Iterable[bytes] = ()
) -> list[str]:
    """``sys.argv`` for ``atheris.Setup``: the defaults above, reproducers written to
    ``fuzz/artifacts/<name>/``, and, when no corpus directory
    or input file is named on the command line, ``fuzz/corpus/<name>`` seeded with ``seeds``
    (created on first use; new inputs libFuzzer finds are added there). ``dictionary`` holds
    tokens for libFuzzer's ``-dict`` (written next to the corpus)."""
    argv = list(sys.argv)
    flags = [arg for arg in argv[1:] if arg.startswith("-")]
    artifacts = ARTIFACTS / name
    for default in (*LIBFUZZER_DEFAULTS, f"-artifact_prefix={artifacts}/"):
        if not any(flag.startswith(default.split("=", 1)[0] + "=") for flag in flags):
            argv.append(default)
            if default.startswith("-artifact_prefix="):
                artifacts.mkdir(parents=True, exist_ok=True)
    tokens = [*dictionary, *GENERIC_TOKENS]
    if not any(flag.startswith("-dict=") for flag in flags):
        CORPUS_ROOT.mkdir(parents=True, exist_ok=True)
        path = CORPUS_ROOT / f"{name}.dict"
        path.write_text("".join(f"{_dict_entry(token)}\n" for token in tokens))
        argv.append(f"-dict={path}")
    if all(arg.startswith("-") for arg in argv[1:]):
        corpus = CORPUS_ROOT / name
        corpus.mkdir(parents=True, exist_ok=True)
        for seed in seeds:
            (corpus / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)
        argv.append(str(corpus))
    return argv


def _dict_entry(token: bytes) -> str:
    """One libFuzzer dictionary line: the token quoted, non-printable bytes as ``\\xNN``."""
    escaped = "".join(
        chr(byte) if 0x20 <= byte < 0x7F and byte not in b'"\\' else f"\\x{byte:02x}"
        for byte in token
    )
    return f'"{escaped}"'
