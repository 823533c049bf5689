"""Fuzz the OOM report assembler (collectors/oom.py) and the OOM findings built from it.

Input: kernel messages, one per line (no log-format prefix). Seeds: tests/vectors/oom.
The lines go to ``OomAssembler.feed`` in order; an empty line stands for the live reader
finding the log idle (``flush()``); the end of input is ``flush(final=True)``. Every kill
then becomes a finding the way ``nodediag analyze`` makes it.

Invariants (by design of the assembler, see its module doc):
- nothing raises: the assembler and the findings builder are documented as never raising;
- no more kills than lines that can end one ("Killed process" or an ``oom-kill:`` summary);
- every victim pid is a pid the input names in such a line, a complete kill's victim in a
  "Killed process N" line; group members all come from "Killed process" lines;
- after the final flush the assembler is idle.
"""

from __future__ import annotations

import re
import sys

import _common
import atheris

_common.enable_hooks(atheris)
with atheris.instrument_imports(include=["collectors", "agent"]):
    from agent.oom_findings import OomFindings
    from collectors.oom import MAX_MESSAGE_CHARS, OomAssembler, OomKill
    from collectors.oom_tasks import MAX_TASK_ROWS
    from collectors.records import KernelRecord

# Deliberately looser than the parser's own patterns: any pid the input could mean.
_KILLED_PID = re.compile(r"Killed process (\d+)")
_SUMMARY_PID = re.compile(r"pid=(\d+)")
BUILDER = OomFindings("fuzz-node", live=None)


def _ends_kill(message: str) -> bool:
    return "Killed process" in message or "oom-kill:constraint=" in message


def check_kills(messages: list[str], kills: list[OomKill]) -> None:
    """The invariants of the module doc, for ``kills`` assembled from ``messages``."""
    considered = [m for m in messages if len(m) <= MAX_MESSAGE_CHARS]
    killed = {int(p) for m in considered if "Killed process" in m for p in _KILLED_PID.findall(m)}
    named = killed | {
        int(p) for m in considered if "oom-kill:constraint=" in m for p in _SUMMARY_PID.findall(m)
    }
    assert len(kills) <= sum(map(_ends_kill, considered)), (len(kills), considered)
    for kill in kills:
        assert kill.victim.pid in named, (kill, named)
        if kill.complete:
            assert kill.victim.pid in killed, (kill, killed)
        assert all(v.pid in killed for v in kill.group_victims), kill
        assert kill.tasks is None or len(kill.tasks) <= MAX_TASK_ROWS


def findings(kills: list[OomKill]) -> None:
    for i, kill in enumerate(kills):
        finding = BUILDER.finding(kill, later=kills[i + 1 :])
        assert finding.details["pid"] == kill.victim.pid
        finding.to_json()


def test_one_input(data: bytes) -> None:
    messages = data.decode("utf-8", "replace").split("\n")
    assembler = OomAssembler()
    kills: list[OomKill] = []
    for number, message in enumerate(messages, start=1):
        if not message:
            kills.extend(assembler.flush())
            continue
        assembler.prefilter()
        kills.extend(assembler.feed(KernelRecord(message, uptime=float(number))))
    kills.extend(assembler.flush(final=True))
    assert assembler.idle
    check_kills(messages, kills)
    findings(kills)


def seeds() -> list[bytes]:
    texts = [raw.decode("utf-8", "replace") for raw in _common.vector_bytes("oom/*.log")]
    return [_common.dmesg_messages(text).encode() for text in texts]


DICTIONARY = [
    b" invoked oom-killer: gfp_mask=0x",
    b"Killed process ",
    b"Memory cgroup out of memory: ",
    b"Out of memory: ",
    b"oom-kill:constraint=CONSTRAINT_MEMCG,",
    b",oom_memcg=",
    b",global_oom",
    b",task_memcg=",
    b",task=",
    b",pid=",
    b",uid=",
    b"Tasks state (memory values in pages):",
    b"[  pid  ]",
    b"Task in /",
    b" killed as a result of limit of /",
    b"Kill process ",
    b" score ",
    b"Tasks in /",
    b" are going to be killed due to memory.oom.group set",
    b"memory: usage ",
    b"kB, limit ",
    b"CPU: 0 PID: ",
    b" Comm: ",
    b"total-vm:",
    b"anon-rss:",
    b"UID:",
]


if __name__ == "__main__":
    atheris.Setup(_common.libfuzzer_argv("oom", seeds(), DICTIONARY), test_one_input)
    atheris.Fuzz()
    sys.exit(0)
