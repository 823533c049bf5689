"""The agent's small persistent state: where to resume the kernel log, written atomically."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class StateFile:
    """A JSON document replaced atomically (write, fsync, rename), so a crash leaves
    either the old or the new version, never a torn one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            log.warning("ignoring unreadable state file %s: %s", self.path, error)
            return {}
        if not isinstance(data, dict):
            log.warning(
                "ignoring state file %s: a JSON %s, not an object", self.path, type(data).__name__
            )
            return {}
        return data

    def save(self, data: dict[str, Any], *, durable: bool = True) -> None:
        """``durable=False`` skips the fsync: the rename still replaces the file atomically
        for readers and survives the process being killed, not a machine crash."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state-")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(data, handle)
                handle.flush()
                if durable:
                    os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
