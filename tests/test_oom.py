"""Unit tests of the OOM assembler on real kernel text (tests/vectors/oom, see its README)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors import oom
from collectors.oom import OomAssembler, OomKill, OomVictim, parse_killed_line
from collectors.oom_tasks import TaskRow
from collectors.records import KernelRecord

VECTORS = Path(__file__).parent / "vectors" / "oom"

# `[uptime]` then, with CONFIG_PRINTK_CALLER, `[ T123]`; the message follows one space.
# A task-table row ("[ 1381]     0 …") has no decimal point, so it is never taken for one.
_DMESG_PREFIX = re.compile(r"^\[\s*(?P<uptime>\d+\.\d+)\](?:\[\s*[TC]\d+\])? ?")


def parse_line(line: str) -> KernelRecord:
    """One `dmesg` line as a record; a line without the `[uptime]` prefix is the bare message."""
    match = _DMESG_PREFIX.match(line)
    if match is None:
        return KernelRecord(message=line)
    return KernelRecord(message=line[match.end() :], uptime=float(match["uptime"]))


def load(name: str) -> list[KernelRecord]:
    text = (VECTORS / name).read_text(encoding="utf-8")
    return [parse_line(line) for line in text.splitlines() if line]


def run(records: Iterable[KernelRecord], *, final: bool = True) -> list[OomKill]:
    assembler = OomAssembler()
    kills: list[OomKill] = []
    for record in records:
        kills.extend(assembler.feed(record))
    kills.extend(assembler.flush(final=final))
    assert assembler.idle
    return kills


def victim_fields(victim: OomVictim) -> dict[str, Any]:
    return {
        "pid": victim.pid,
        "comm": victim.comm,
        "uid": victim.uid,
        "total_vm_kb": victim.total_vm_kb,
        "anon_rss_kb": victim.anon_rss_kb,
        "file_rss_kb": victim.file_rss_kb,
        "shmem_rss_kb": victim.shmem_rss_kb,
        "oom_score_adj": victim.oom_score_adj,
    }


def kill_fields(kill: OomKill) -> dict[str, Any]:
    fields = {f"victim.{k}": v for k, v in victim_fields(kill.victim).items()}
    fields.update(
        uptime=kill.uptime,
        constraint=kill.constraint,
        is_global=kill.is_global,
        oom_memcg=kill.oom_memcg,
        task_memcg=kill.task_memcg,
        trigger_comm=kill.trigger_comm,
        trigger_pid=kill.trigger_pid,
        gfp_mask=kill.gfp_mask,
        order=kill.order,
        memcg_usage_kb=kill.memcg_usage_kb,
        memcg_limit_kb=kill.memcg_limit_kb,
        group_memcg=kill.group_memcg,
        group_pids=tuple(v.pid for v in kill.group_victims),
        killed_lines=kill.killed_lines,
        complete=kill.complete,
        n_tasks=None if kill.tasks is None else len(kill.tasks),
    )
    return fields


def assert_kills(kills: Sequence[OomKill], expected: Sequence[dict[str, Any]]) -> None:
    assert len(kills) == len(expected), [k.victim for k in kills]
    for kill, want in zip(kills, expected, strict=True):
        got = kill_fields(kill)
        assert {k: got[k] for k in want} == want


POD_A = (
    "/nodediag-test-a1c606a6/kubepods/burstable/pod3853b58d-76cf-4c49-95d1-c399c97159d5/"
    "ff61180cb329d35883e6b91e4300308df7a905961b663d1f15ef95a976abeff2"
)
VEC_A = (
    "/nodediag-vec-a/kubepods/burstable/pod5b3c1a2e-7f11-4c0e-9d7a-1f2e3d4c5b6a/"
    "3f9e8d7c6b5a49382716a5b4c3d2e1f03f9e8d7c6b5a49382716a5b4c3d2e1f0"
)
VEC_B = "/nodediag-vec-b/kubepods/besteffort/pod0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d/app,v2"
RATE = (
    "/nodediag-test-1bb0e4dc/kubepods/burstable/pod5a2af4a4-854b-4ada-bfd1-f06fbf98ea4b/"
    "d6417d0db1f8da591964a1339be53e05bc607df7ffbdf5d6f44bd4c5ad6b4fff"
)
DOCKER_1 = "/docker/2e088fe462e25e60be1dafafe2c05c47bda1a97978648d10ad2b7484fc0b8f50"
DOCKER_2 = "/docker/6c6fcab8562fd3150854986b78552c732f234fd405b624207b8843528a145e70"
AKS = (
    "/kubepods.slice/kubepods-burstable.slice/"
    "kubepods-burstable-pod10d16a28_60ff_475f_a631_510d9792219f.slice/"
    "cri-containerd-178ec18073cc6ac7be2de8d9869daf162a6349dd056b6535849112c53ec3102a.scope"
)
DEBIAN_GROUP = (
    "/kubepods/burstable/pod3902af1e-8ce1-42e1-a2a5-dc04f4240c4f/"
    "ed9dcd836d0c7e3e379b2387ef5e15e70f1c932dbce0fce685606bb2f4d62036"
)
GROUP_V2 = (
    "/kubepods.slice/kubepods-burstable.slice/"
    "kubepods-burstable-pod7c1e4a52_93b0_4d6e_a1f2_58c9d0e3b4a7.slice/"
    "cri-containerd-5d2c8e1f7a9b3c4d6e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c2d.scope"
)
POD_V1 = "/kubepods/burstable/pod2f9d6c3a-1b4e-4f7a-9c2d-8e5f0a1b3c4d"
LANE_SYSTEMD = (
    "/nodediag-test-ba45e27b/kubepods.slice/kubepods-burstable.slice/"
    "kubepods-burstable-podbe4bf325_81b0_46d8_a822_90b4e8c402f4.slice/"
    "cri-containerd-cae53d08bea11e22a55914e768654e5d6cad170121c0d6147aadffd20721f997.scope"
)
LANE_GROUP = (
    "/nodediag-test-41903c5b/kubepods.slice/kubepods-burstable.slice/"
    "kubepods-burstable-pod2be6d17b_ca80_4c4d_bb6b_894a1e61a734.slice/"
    "cri-containerd-a3d0439de85df4dc93b1b5b33353165177fb388e3f159bdb4e3232a1fb13aa68.scope"
)
LANE_GLOBAL = (
    "/nodediag-test-ae8a0c41/kubepods/burstable/podbd1d56ab-8f16-4d73-9274-b0fa98fb5082/"
    "374b6455cea20e2ce790e620b06cb95f0319d2767aa2a9e2e1b55a8a3192c870"
)
MEMCG = "CONSTRAINT_MEMCG"
NONE = "CONSTRAINT_NONE"

# vector file -> the kills it must yield, in order (only the listed fields are compared).
EXPECTED: dict[str, list[dict[str, Any]]] = {
    # 6.x memcg kill, task table with rss_anon/rss_file/rss_shmem.
    "memcg_6_18_kubepods_this_machine.log": [
        {
            "victim.pid": 6424,
            "victim.comm": "python3",
            "victim.uid": 0,
            "victim.total_vm_kb": 43676,
            "victim.anon_rss_kb": 32384,
            "victim.file_rss_kb": 2988,
            "victim.shmem_rss_kb": 0,
            "victim.oom_score_adj": 0,
            "uptime": 426.176484,
            "trigger_comm": "python3",
            "trigger_pid": 6424,
            "gfp_mask": "0xcc0",
            "order": 0,
            "constraint": MEMCG,
            "is_global": False,
            "oom_memcg": POD_A,
            "task_memcg": POD_A,
            "memcg_usage_kb": 32768,
            "memcg_limit_kb": 32768,
            "n_tasks": 2,
            "group_memcg": None,
            "complete": True,
        }
    ],
    # Two back-to-back kills of a child whose comm has a space and parentheses, the
    # parent sh survives; the second one's cgroup path and cpuset hold commas.
    "memcg_6_18_two_kills_spaces_commas_this_machine.log": [
        {
            "victim.pid": 5973,
            "victim.comm": "my app (v2)",
            "victim.anon_rss_kb": 30464,
            "victim.file_rss_kb": 6772,
            "trigger_comm": "my app (v2)",
            "trigger_pid": 5973,
            "oom_memcg": VEC_A,
            "task_memcg": VEC_A,
            "memcg_limit_kb": 30720,
            "n_tasks": 2,
            "is_global": False,
        },
        {
            "victim.pid": 6019,
            "victim.comm": "my app (v2)",
            "victim.file_rss_kb": 6696,
            "trigger_comm": "my app (v2)",
            "trigger_pid": 6019,
            "oom_memcg": VEC_B,
            "task_memcg": VEC_B,
            "constraint": MEMCG,
            "is_global": False,
            "n_tasks": 2,
        },
    ],
    # One full report, then three kills whose header was ratelimited away.
    "memcg_6_18_ratelimited_this_machine.log": [
        {"victim.pid": 6455, "task_memcg": RATE, "trigger_pid": 6455, "n_tasks": 1},
        *[
            {
                "victim.pid": pid,
                "victim.comm": "python3",
                "task_memcg": None,
                "oom_memcg": None,
                "trigger_comm": None,
                "constraint": MEMCG,
                "is_global": False,
                "complete": True,
                "n_tasks": None,
            }
            for pid in (6458, 6462, 6465)
        ],
    ],
    # pre-5.0 memcg kill (3.13): "Task in … killed as a result of limit of …".
    "legacy_3_13_memcg_cadvisor.log": [
        {
            "victim.pid": 13536,
            "victim.comm": "memorymonster",
            "victim.total_vm_kb": 33558652,
            "victim.anon_rss_kb": 920,
            "victim.file_rss_kb": 452,
            "victim.shmem_rss_kb": None,
            "victim.uid": None,
            "uptime": None,
            "trigger_comm": "memorymonster",
            "trigger_pid": 13536,
            "gfp_mask": "0xd0",
            "constraint": MEMCG,
            "is_global": False,
            "task_memcg": "/mem2",
            "oom_memcg": "/mem2",
            "memcg_usage_kb": 980,
            "memcg_limit_kb": 980,
            "n_tasks": 1,
        }
    ],
    # pre-5.0 global kill: "Out of memory: Kill process … or sacrifice child".
    "legacy_3_13_global_cadvisor.log": [
        {
            "victim.pid": 1532,
            "victim.comm": "badsysprogram",
            "trigger_comm": "badsysprogram",
            "trigger_pid": 1532,
            "constraint": NONE,
            "is_global": True,
            "task_memcg": None,
            "oom_memcg": None,
            "n_tasks": 13,
        }
    ],
    # 4.8: nr_ptes/nr_pmds table, two reports with docker noise and oom_reaper lines.
    "legacy_4_8_docker_two_kills_cadvisor.log": [
        {
            "victim.pid": 1381,
            "victim.shmem_rss_kb": 0,
            "trigger_pid": 1381,
            "gfp_mask": "0x24000c0",
            "task_memcg": DOCKER_1,
            "oom_memcg": DOCKER_1,
            "memcg_usage_kb": 20480,
            "n_tasks": 1,
            "is_global": False,
        },
        {
            "victim.pid": 1667,
            "victim.anon_rss_kb": 248180,
            "trigger_pid": 1667,
            "task_memcg": DOCKER_2,
            "memcg_usage_kb": 307112,
            "memcg_limit_kb": 307200,
            "n_tasks": 1,
        },
    ],
    # 3.10: the kernel chose 24572 but killed its child 28438 ("sacrifice child").
    # The excerpt starts after the header and ends in the next report's header.
    "legacy_3_10_sacrificed_child_k8s56891.log": [
        {
            "victim.pid": 28438,
            "victim.comm": "java",
            "victim.anon_rss_kb": 466160,
            "constraint": MEMCG,
            "is_global": False,
            "task_memcg": None,
        }
    ],
    # RHEL 7 global kill; mems_allowed=0-1 on the cpuset line, victim differs from trigger.
    "global_3_10_rhel7_oomanalyser.log": [
        {
            "victim.pid": 6576,
            "victim.comm": "mysqld",
            "victim.anon_rss_kb": 20629004,
            "trigger_comm": "sed",
            "trigger_pid": 29481,
            "constraint": NONE,
            "is_global": True,
            "n_tasks": 12,
        }
    ],
    # 5.13 global kill: pgtables_bytes table with "(sd-pam)", trigger kworker/0:2, order=-1.
    "global_5_13_ubuntu_oomanalyser.log": [
        {
            "victim.pid": 651,
            "victim.comm": "unattended-upgr",
            "victim.uid": 0,
            "victim.total_vm_kb": 108020,
            "trigger_comm": "kworker/0:2",
            "trigger_pid": 735,
            "order": -1,
            "constraint": NONE,
            "is_global": True,
            "oom_memcg": None,
            "task_memcg": "/system.slice/unattended-upgrades.service",
            "n_tasks": 23,
        }
    ],
    # RHEL 8's 4.18 prints the 5.x form; "process reaper" is a trigger comm with a space.
    "global_4_18_centos8_grep.log": [
        {
            "victim.pid": 2092,
            "victim.comm": "node",
            "trigger_comm": "systemd",
            "task_memcg": "/system.slice/pm2-root.service",
            "is_global": True,
            "n_tasks": 0,
        },
        {
            "victim.pid": 633552,
            "victim.comm": "webpack",
            "victim.uid": 988,
            "trigger_comm": "process reaper",
            "gfp_mask": "0x6200ca",
            "task_memcg": "/system.slice/jenkins.service",
            "constraint": NONE,
            "is_global": True,
        },
        {
            "victim.pid": 11948,
            "trigger_comm": "npm",
            "task_memcg": "/user.slice/user-0.slice/session-1.scope",
        },
    ],
    # 5.0 memory.oom.group kill: one finding, every member once. 5.0 printed
    # CONSTRAINT_NONE for memcg OOMs; oom_memcg= (not global_oom) says it was one.
    "group_5_0_lkml_tetsuo.log": [
        {
            "victim.pid": 9188,
            "victim.comm": "a.out",
            "victim.uid": 0,
            "victim.anon_rss_kb": 10324,
            "uptime": 37.128158,
            "trigger_comm": "a.out",
            "trigger_pid": 9185,
            "constraint": NONE,
            "is_global": False,
            "oom_memcg": "/test1",
            "task_memcg": "/test1",
            "memcg_limit_kb": 51200,
            "group_memcg": "/test1",
            "group_pids": (9188, 1, 9182, 9183, 9184, 9185, 9186, 9187, 9189, 9190, 9191, 9192),
            "complete": True,
        }
    ],
    # Group kill whose chosen victim is printed again as a member (dedup), systemd paths.
    "group_systemd_cgroup_aks_npd.log": [
        {
            "victim.pid": 68061,
            "victim.comm": "stress",
            "victim.oom_score_adj": 872,
            "oom_memcg": "/kubepods.slice",
            "task_memcg": AKS,
            "group_memcg": AKS,
            "group_pids": (68061,),
            "is_global": False,
            "trigger_comm": None,
        }
    ],
    # Global group kill whose oom-kill: lines were cut by the terminal (no ",task=…" tail):
    # the summary is unusable, the Killed lines still make the kills.
    "group_global_6_1_debian_truncated.log": [
        {
            "victim.pid": 10843,
            "victim.comm": "prometheus-conf",
            "victim.uid": 1000,
            "is_global": True,
            "constraint": NONE,
            "task_memcg": None,
            "group_memcg": DEBIAN_GROUP,
            "group_pids": (10843,),
        },
        {
            "victim.pid": 115727,
            "victim.comm": "memory_leak",
            "victim.oom_score_adj": 200,
            "trigger_comm": "tailscaled",
            "trigger_pid": 1241,
            "gfp_mask": "0x140cca",
            "is_global": True,
            "task_memcg": None,
            "group_memcg": None,
        },
    ],
    # --- made by us from the kernel's printk formats (README) ---
    # memory.oom.group on a container (cgroup v2, systemd driver): the chosen victim, then
    # every member (the victim again).
    "made_group_v2_container_limit_6x.log": [
        {
            "victim.pid": 21507,
            "task_memcg": GROUP_V2,
            "oom_memcg": GROUP_V2,
            "group_memcg": GROUP_V2,
            "group_pids": (21507, 21401),
            "n_tasks": 2,
            "complete": True,
        }
    ],
    # Pod-level limits: the table is the pod's (pause / conmon rows included).
    "made_pod_limit_v1_pause_and_victim_6x.log": [
        {"victim.pid": 30517, "oom_memcg": POD_V1, "n_tasks": 2, "complete": True}
    ],
    "made_pod_limit_v1_two_containers_6x.log": [
        {"victim.pid": 30844, "oom_memcg": POD_V1, "n_tasks": 3}
    ],
    "made_pod_limit_v2_crio_conmon_6x.log": [{"victim.pid": 5220, "n_tasks": 4}],
    # 4.14: "Task in", a 4.x table header, "Kill process … or sacrifice child".
    "made_container_limit_child_4_14_v1.log": [
        {"victim.pid": 18230, "trigger_comm": "java", "n_tasks": 2, "constraint": MEMCG}
    ],
    # A report that ended without a kill ("no killable processes"), then 1,625 s later a
    # report whose header was cut: its trigger is unknown (not the earlier report's java)
    # and it is not complete.
    "made_header_cut_after_unfinished_report_6x.log": [
        {
            "victim.pid": 43120,
            "uptime": 5864.683397,
            "trigger_comm": None,
            "trigger_pid": None,
            "n_tasks": None,
            "complete": False,
        }
    ],
    # The later kill pasted first: the file order is not the order in time.
    "made_same_container_pasted_out_of_order_6x.log": [
        {"victim.pid": 7302, "uptime": 1095.021606},
        {"victim.pid": 7201, "uptime": 1000.011924},
    ],
    # "(sd-pam)": parentheses inside the comm; mems_allowed=0-1. The trailing trigger has no
    # summary (cut off): nothing comes of it.
    # 6.1 (Debian, the VM lane) on cgroup v2, systemd layout: "CPU: 0 PID: … Comm: …" stack
    # header, memory.stat as one record (\x0a-escaped), a comm with spaces, colon, parens.
    "memcg_6_1_v2_systemd_vm_lane.log": [
        {
            "victim.pid": 210,
            "victim.comm": "my app: (x)",
            "victim.shmem_rss_kb": 5328,
            "trigger_comm": "my app: (x)",
            "constraint": MEMCG,
            "oom_memcg": LANE_SYSTEMD,
            "task_memcg": LANE_SYSTEMD,
            "memcg_limit_kb": 32768,
            "n_tasks": 2,
            "group_memcg": None,
            "complete": True,
        }
    ],
    # 6.1 group kill of a container whose init is PID 1 of a pid namespace: the selected
    # victim is printed again as a member, the init's death ends the other members first
    # ("OOM victim N (sleep) is already exiting. Skip killing the task": not kills).
    # memory.events counted oom_kill 3 (every Killed line), oom_group_kill 1.
    "group_6_1_v2_pidns_vm_lane.log": [
        {
            "victim.pid": 289,
            "victim.comm": "python3",
            "constraint": MEMCG,
            "task_memcg": LANE_GROUP,
            "group_memcg": LANE_GROUP,
            "group_pids": (289, 285),
            "killed_lines": 3,  # memory.events: oom_kill 3
            "n_tasks": 5,
            "is_global": False,
            "complete": True,
        }
    ],
    # 6.1 global OOM (no swap) whose victim sits in a kubepods cgroup (cgroup v2).
    "global_6_1_v2_kubepods_vm_lane.log": [
        {
            "victim.pid": 296,
            "victim.comm": "python3",
            "victim.anon_rss_kb": 762900,
            "trigger_pid": 296,
            "gfp_mask": "0x140dca",
            "constraint": NONE,
            "is_global": True,
            "oom_memcg": None,
            "task_memcg": LANE_GLOBAL,
            "group_memcg": None,
        }
    ],
    "global_mems_allowed_commas_sd_pam_nfsd_bugzilla.log": [
        {
            "victim.pid": 4503,
            "victim.comm": "(sd-pam)",
            "victim.oom_score_adj": 100,
            "task_memcg": "/user.slice/user-0.slice/user@0.service/init.scope",
            "is_global": True,
        }
    ],
}


def test_every_vector_has_expectations() -> None:
    files = {p.name for p in VECTORS.glob("*.log")} - {"noise.log"}
    assert files == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector(name: str) -> None:
    assert_kills(run(load(name)), EXPECTED[name])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector_with_noise_between_every_line(name: str) -> None:
    noise = load("noise.log")
    mixed: list[KernelRecord] = []
    for i, record in enumerate(load(name)):
        mixed.append(noise[i % len(noise)])
        mixed.append(record)
    assert_kills(run(mixed), EXPECTED[name])


def test_one_assembler_for_all_vectors() -> None:
    # Each file is its own log (several end cut off), so end of input is flushed per file.
    assembler = OomAssembler()
    for name in sorted(EXPECTED):
        kills = [k for r in load(name) for k in assembler.feed(r)]
        kills += assembler.flush(final=True)
        assert assembler.idle
        assert_kills(kills, EXPECTED[name])


def test_cut_off_report_does_not_capture_the_next_one() -> None:
    # A report cut after its body (here: trigger, CPU line, meminfo) is closed by the next
    # trigger instead of taking that report's summary and victim.
    cut = [
        KernelRecord(
            "nfsd invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0"
        ),
        KernelRecord("CPU: 1 PID: 77 Comm: nfsd Not tainted 6.1.0 #1"),
        KernelRecord("memory: usage 51200kB, limit 51200kB, failcnt 272"),
    ]
    name = "memcg_6_18_kubepods_this_machine.log"
    kills = run(cut + list(load(name)))
    assert_kills(kills, EXPECTED[name])
    assert kills[0].trigger_pid != 77


def test_task_table_6x_columns() -> None:
    (kill,) = run(load("memcg_6_18_kubepods_this_machine.log"))
    assert kill.tasks == (
        TaskRow(pid=6423, name="sh", tgid=6423, uid=0, rss_pages=375, oom_score_adj=0),
        TaskRow(pid=6424, name="python3", tgid=6424, uid=0, rss_pages=8843, oom_score_adj=0),
    )


def test_task_table_names_with_spaces_and_parentheses() -> None:
    kills = run(load("memcg_6_18_two_kills_spaces_commas_this_machine.log"))
    assert kills[0].tasks is not None
    assert [(t.pid, t.name, t.rss_pages) for t in kills[0].tasks] == [
        (5968, "sh", 400),
        (5973, "my app (v2)", 9309),
    ]
    ubuntu = run(load("global_5_13_ubuntu_oomanalyser.log"))[0].tasks
    assert ubuntu is not None
    assert TaskRow(857, "(sd-pam)", 857, 1000, 835, 0) in ubuntu
    assert TaskRow(323, "systemd-journal", 323, 0, 2766, -250) in ubuntu


def test_task_table_older_headers() -> None:
    (first, _) = run(load("legacy_4_8_docker_two_kills_cadvisor.log"))  # nr_ptes nr_pmds
    assert first.tasks == (TaskRow(1381, "gunpowder-memho", 1381, 0, 5191, 0),)
    (legacy,) = run(load("legacy_3_13_memcg_cadvisor.log"))  # nr_ptes
    assert legacy.tasks == (TaskRow(13536, "memorymonster", 13536, 275858, 343, 0),)
    (rhel,) = run(load("global_3_10_rhel7_oomanalyser.log"))
    assert rhel.tasks is not None
    assert TaskRow(433, "systemd-udevd", 433, 0, 2, -1000) in rhel.tasks


def test_mems_allowed_with_commas() -> None:
    # Derived from the real 6.18 summary line: only the mems_allowed value is replaced by a
    # non-contiguous node list, which the kernel prints with commas ("%*pbl").
    records = load("memcg_6_18_kubepods_this_machine.log")
    summary = next(i for i, r in enumerate(records) if "oom-kill:" in r.message)
    message = records[summary].message.replace(",mems_allowed=0,", ",mems_allowed=0-1,3,")
    assert ",mems_allowed=0-1,3," in message
    records[summary] = KernelRecord(message, uptime=records[summary].uptime)
    assert_kills(run(records), EXPECTED["memcg_6_18_kubepods_this_machine.log"])


def test_two_concurrent_reports_interleaved() -> None:
    records = load("memcg_6_18_two_kills_spaces_commas_this_machine.log")

    def pick(text: str) -> list[KernelRecord]:
        return [r for r in records if text in r.message]

    trig_a, trig_b = pick("invoked oom-killer")
    sum_a, sum_b = pick("oom-kill:constraint=")
    kill_a, kill_b = pick("Killed process")
    kills = run([trig_a, trig_b, sum_a, sum_b, kill_a, kill_b])
    assert [(k.victim.pid, k.task_memcg, k.oom_memcg) for k in kills] == [
        (5973, VEC_A, VEC_A),
        (6019, VEC_B, VEC_B),
    ]
    assert all(k.trigger_comm == "my app (v2)" and k.complete for k in kills)


def test_report_without_killed_line_is_emitted_incomplete_at_end_of_input() -> None:
    records = [r for r in load("memcg_6_18_kubepods_this_machine.log") if "Killed" not in r.message]
    assembler = OomAssembler()
    assert [k for r in records for k in assembler.feed(r)] == []
    assert assembler.flush() == []  # idle, not end of input: keep waiting
    assert not assembler.idle
    (kill,) = assembler.flush(final=True)
    assert assembler.idle
    assert kill.complete is False
    assert (kill.victim.pid, kill.victim.comm, kill.victim.uid) == (6424, "python3", 0)
    assert kill.victim.anon_rss_kb is None
    assert (kill.task_memcg, kill.trigger_pid, kill.memcg_limit_kb) == (POD_A, 6424, 32768)


def test_report_with_only_trigger_and_stack_yields_nothing() -> None:
    records = load("memcg_6_18_kubepods_this_machine.log")
    end = next(i for i, r in enumerate(records) if r.message.startswith("memory: usage"))
    assembler = OomAssembler()
    assert [k for r in records[:end] for k in assembler.feed(r)] == []
    assert not assembler.idle
    assert assembler.flush(final=True) == []
    assert assembler.idle


def test_lone_killed_line() -> None:
    (line,) = [r for r in load("memcg_6_18_kubepods_this_machine.log") if "Killed" in r.message]
    assembler = OomAssembler()
    assert assembler.feed(line) == []
    assert not assembler.idle  # held: a memory.oom.group line may follow
    (kill,) = assembler.flush()
    assert assembler.idle
    assert kill.task_memcg is None and kill.oom_memcg is None and kill.tasks is None
    assert (kill.victim.pid, kill.constraint, kill.is_global, kill.complete) == (
        6424,
        MEMCG,
        False,
        True,
    )
    assert kill.uptime == 426.176484


def test_oom_reaper_is_never_a_kill() -> None:
    reaper = [
        r
        for name in ("legacy_4_8_docker_two_kills_cadvisor.log", "group_5_0_lkml_tetsuo.log")
        for r in load(name)
        if r.message.startswith("oom_reaper:")
    ]
    assert len(reaper) == 10
    assembler = OomAssembler()
    for record in reaper:
        assert assembler.feed(record) == []
        assert assembler.idle
    assert assembler.flush(final=True) == []


def test_idle_through_a_report() -> None:
    records = load("memcg_6_18_kubepods_this_machine.log")
    assembler = OomAssembler()
    assert assembler.idle
    states = []
    for record in records:
        assert assembler.feed(record) == []
        states.append(assembler.idle)
    assert not any(states)  # open from the trigger line, then held after the Killed line
    assert len(assembler.flush()) == 1
    assert assembler.idle


def test_idle_during_group_kill() -> None:
    assembler = OomAssembler()
    for record in load("group_systemd_cgroup_aks_npd.log"):
        assembler.feed(record)
        assert not assembler.idle
    (kill,) = assembler.flush()
    assert assembler.idle and kill.is_group


def test_next_report_releases_held_kill() -> None:
    records = load("legacy_4_8_docker_two_kills_cadvisor.log")
    second = [i for i, r in enumerate(records) if "invoked oom-killer" in r.message][1]
    assembler = OomAssembler()
    early = [k for r in records[:second] for k in assembler.feed(r)]
    assert early == []  # held until the next OOM line shows it is no group kill
    released = assembler.feed(records[second])
    assert [k.victim.pid for k in released] == [1381]


def test_parse_killed_line_forms() -> None:
    modern = parse_killed_line(
        "Memory cgroup out of memory: Killed process 6019 (my app (v2)) total-vm:221368kB, "
        "anon-rss:30464kB, file-rss:6696kB, shmem-rss:0kB, UID:0 pgtables:132kB oom_score_adj:0"
    )
    assert modern == (
        OomVictim(6019, "my app (v2)", 0, 221368, 30464, 6696, 0, 0),
        False,
    )
    glob = parse_killed_line(
        "Out of memory: Killed process 4503 ((sd-pam)) total-vm:173972kB, anon-rss:0kB, "
        "file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:96kB oom_score_adj:100"
    )
    assert glob is not None and glob[0].comm == "(sd-pam)" and glob[1] is True
    legacy = parse_killed_line(
        "Killed process 1532 (badsysprogram) total-vm:1641388kB, anon-rss:1595164kB, file-rss:76kB"
    )
    assert legacy == (OomVictim(1532, "badsysprogram", None, 1641388, 1595164, 76), None)
    # RHEL 7 (linux-test-project/ltp#1080): ", UID 0," with a space.
    rhel7 = parse_killed_line(
        "Killed process 42452 (memcg_test_1), UID 0, total-vm:7296kB, anon-rss:96kB, "
        "file-rss:164kB, shmem-rss:0kB"
    )
    assert rhel7 == (OomVictim(42452, "memcg_test_1", 0, 7296, 96, 164, 0), None)
    reaper = "oom_reaper: reaped process 1381 (gunpowder-memho), now anon-rss:0kB, file-rss:0kB"
    assert parse_killed_line(reaper) is None


# ---- property tests -------------------------------------------------------------------

REAL_LINES = [r.message for name in sorted(EXPECTED) for r in load(name)]
OOM_LINES = [m for m in REAL_LINES if "oom" in m.lower() or "ill process" in m or "Task" in m]


def _fragments(line: str) -> st.SearchStrategy[str]:
    return st.tuples(
        st.integers(0, len(line)), st.integers(0, len(line)), st.sampled_from([0, 1])
    ).map(lambda t: line[min(t[0], t[1]) : max(t[0], t[1])] if t[2] else line)


_line = st.one_of(
    st.sampled_from(REAL_LINES),
    st.sampled_from(OOM_LINES).flatmap(_fragments),
    st.text(max_size=300),
    st.binary(max_size=300).map(lambda b: b.decode("utf-8", errors="replace")),
    st.sampled_from(OOM_LINES).map(lambda m: m * 200 + "x" * 70_000),  # huge lines
    st.lists(st.sampled_from(OOM_LINES), min_size=2, max_size=4).map("".join),
)


def _backed(message: str) -> bool:
    return "Killed process" in message or "oom-kill:constraint=" in message


def _check_never_raises_never_invents(messages: list[str], final: bool) -> None:
    assembler = OomAssembler()
    kills: list[OomKill] = []
    for message in messages:
        kills.extend(assembler.feed(KernelRecord(message)))
        if len(kills) > sum(map(_backed, messages)):
            break
    kills.extend(assembler.flush(final=final))
    assert len(kills) <= sum(map(_backed, messages))
    if final:
        assert assembler.idle


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_line, max_size=60), st.booleans())
def test_property_arbitrary_text(messages: list[str], final: bool) -> None:
    _check_never_raises_never_invents(messages, final)


@settings(max_examples=200, deadline=None)
@given(st.permutations(OOM_LINES[:80]), st.booleans())
def test_property_real_oom_lines_shuffled(messages: list[str], final: bool) -> None:
    _check_never_raises_never_invents(messages, final)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(REAL_LINES), max_size=120), st.booleans())
def test_property_real_lines_resampled(messages: list[str], final: bool) -> None:
    _check_never_raises_never_invents(messages, final)


def test_overlong_line_is_ignored_quickly() -> None:
    line = load("memcg_6_18_kubepods_this_machine.log")[-1].message
    huge = KernelRecord(line * 500 + "x" * 70_000)
    assembler = OomAssembler()
    assert assembler.feed(huge) == []
    assert assembler.idle


# ---- the fast paths: skipping records, and the per-line work inside a report -------------


def run_all(records: Iterable[KernelRecord], *, final: bool = True) -> list[OomKill]:
    """Every record fed (``run`` without its end-of-input check, for ``final=False``)."""
    assembler = OomAssembler()
    kills = [k for record in records for k in assembler.feed(record)]
    return kills + assembler.flush(final=final)


def run_prefiltered(records: Iterable[KernelRecord], *, final: bool = True) -> list[OomKill]:
    """``run_all`` as a source that skips records by ``prefilter()`` feeds the assembler:
    the words are tested on the raw UTF-8 message, before it is decoded (JournalSource)."""
    assembler = OomAssembler()
    kills: list[OomKill] = []
    for record in records:
        words = assembler.prefilter()
        raw = record.message.encode("utf-8", "surrogatepass")
        if words is not None and not any(w in raw for w in words):
            continue
        kills.extend(assembler.feed(record))
    return kills + assembler.flush(final=final)


def test_prefilter_skips_report_lines_that_change_nothing() -> None:
    # Inside a report only its lines that change it are read; the call trace, registers and
    # memcg stats of this 80-line report are not.
    records = load("memcg_6_18_kubepods_this_machine.log")
    assembler = OomAssembler()
    read = []
    for record in records:
        words = assembler.prefilter()
        if words is None or any(w in record.message.encode() for w in words):
            read.append(record.message.split()[0])
            assembler.feed(record)
    assert read == [
        "python3",  # invoked oom-killer
        "CPU:",
        "oom_kill_process.cold+0x8/0x8a",  # has "oom": read, changes nothing
        "memory:",
        "Tasks",
        "[",
        "[",
        "[",
        "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,"
        f"oom_memcg={POD_A},task_memcg={POD_A},task=python3,pid=6424,uid=0",
        "Memory",
    ]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector_through_prefilter(name: str) -> None:
    records = load(name)
    kills = run_prefiltered(records)
    assert kills == run(records)  # every field, the task tables included
    assert_kills(kills, EXPECTED[name])
    noise = load("noise.log")
    mixed = [r for i, record in enumerate(records) for r in (noise[i % len(noise)], record)]
    assert run_prefiltered(mixed) == run(mixed) == kills


def test_all_vectors_in_one_log_through_prefilter() -> None:
    records = [r for name in sorted(EXPECTED) for r in load(name)]
    for final in (True, False):
        assert run_prefiltered(records, final=final) == run_all(records, final=final)


@st.composite
def _interleaved_vectors(draw: st.DrawFn) -> list[KernelRecord]:
    """Two vectors (or one twice) merged line by line in any order, each in its own order."""
    left = load(draw(st.sampled_from(sorted(EXPECTED))))
    right = load(draw(st.sampled_from(sorted(EXPECTED))))
    picks = draw(st.lists(st.booleans(), max_size=len(left) + len(right)))
    merged: list[KernelRecord] = []
    for pick in picks:
        side = left if (pick and left) or not right else right
        merged.append(side.pop(0))
    return merged + left + right


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_interleaved_vectors(), st.booleans())
def test_property_interleaved_vectors_through_prefilter(
    records: list[KernelRecord], final: bool
) -> None:
    assert run_prefiltered(records, final=final) == run_all(records, final=final)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_line, max_size=60), st.booleans())
def test_property_arbitrary_text_through_prefilter(messages: list[str], final: bool) -> None:
    records = [KernelRecord(m) for m in messages]
    assert run_prefiltered(records, final=final) == run_all(records, final=final)


@settings(max_examples=200, deadline=None)
@given(st.permutations(OOM_LINES[:80]), st.booleans())
def test_property_real_oom_lines_shuffled_through_prefilter(
    messages: list[str], final: bool
) -> None:
    records = [KernelRecord(m) for m in messages]
    assert run_prefiltered(records, final=final) == run_all(records, final=final)


def _reference_row(columns: list[str], pid: int, rest: str) -> TaskRow | None:
    """A task table row read by its header, one dict per row: the straightforward form of
    what the assembler does with the layout it derives once per header."""

    def number(text: str | None) -> int | None:
        try:
            return int(text) if text is not None else None
        except ValueError:
            return None

    values = rest.split(None, len(columns) - 1)
    if not columns or len(values) != len(columns) or columns[-1] != "name":
        return None
    by_name = dict(zip(columns, values, strict=True))
    return TaskRow(
        pid=pid,
        name=by_name["name"],
        tgid=number(by_name.get("tgid")),
        uid=number(by_name.get("uid")),
        rss_pages=number(by_name.get("rss")),
        oom_score_adj=number(by_name.get("oom_score_adj")),
    )


_REAL_HEADERS = sorted({m.split("]", 1)[1] for m in REAL_LINES if re.match(r"\[\s*pid\s*\]", m)})
_COLUMN = st.sampled_from(
    ["uid", "tgid", "total_vm", "rss", "nr_ptes", "swapents", "oom_score_adj", "name", "x"]
)
_TOKEN = st.one_of(
    st.integers(-5000, 10**6).map(str),
    st.text("0123456789-+_abc()", min_size=1, max_size=6),
)
_GAP = st.sampled_from([" ", "  ", "      ", "\t", " \t "])


@st.composite
def _table(draw: st.DrawFn) -> tuple[str, list[tuple[int, str]]]:
    """A header (a real one or made of known and unknown column names) and rows for it
    (mostly fitting it; values that are no numbers; names with spaces)."""
    header = draw(
        st.one_of(
            st.sampled_from(_REAL_HEADERS),
            st.lists(_COLUMN, max_size=9).map(lambda c: " " + " ".join(c)),
        )
    )
    width = max(len(header.split()), 1)
    rows = []
    for pid in draw(st.lists(st.integers(0, 4_194_304), max_size=12)):
        count = draw(st.sampled_from([width, width, width, width - 1, width + 2]))
        tokens = draw(st.lists(_TOKEN, min_size=max(count, 0), max_size=max(count, 0)))
        spaced_name = draw(st.booleans())
        if tokens and spaced_name:
            tokens[-1] += " (with spaces) x"
        rest = ""
        for token in tokens:
            rest += (draw(_GAP) if rest else "") + token
        rows.append((pid, rest))
    return header, rows


@settings(max_examples=300, deadline=None)
@given(_table())
def test_property_task_rows_read_by_their_header(table: tuple[str, list[tuple[int, str]]]) -> None:
    header, rows = table
    lines = [
        "t invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
        "Tasks state (memory values in pages):",
        "[  pid  ]" + header,
        *(f"[{pid:>7}] {rest}" for pid, rest in rows),
        "Memory cgroup out of memory: Killed process 1 (t) total-vm:1kB, anon-rss:1kB",
    ]
    (kill,) = run(KernelRecord(line) for line in lines)
    expected = [_reference_row(header.split(), pid, rest) for pid, rest in rows]
    assert kill.tasks == tuple(row for row in expected if row is not None)


def test_table_header_without_columns() -> None:
    # Garbage, but it must not raise: a header naming no column reads no row.
    kills = run(
        KernelRecord(line)
        for line in (
            "t invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0",
            "[  pid  ]",
            "[      1]  ",
            "[      2] 0 2 t",
            "Memory cgroup out of memory: Killed process 2 (t) total-vm:1kB, anon-rss:1kB",
        )
    )
    assert [k.tasks for k in kills] == [()]


class _CountingPattern:
    """Stands in for a compiled pattern of ``collectors.oom`` and counts its uses."""

    def __init__(self, pattern: re.Pattern[str], name: str, calls: Counter[str]) -> None:
        self._pattern, self._name, self._calls = pattern, name, calls

    def match(self, text: str) -> re.Match[str] | None:
        self._calls[self._name] += 1
        return self._pattern.match(text)

    def search(self, text: str) -> re.Match[str] | None:
        self._calls[self._name] += 1
        return self._pattern.search(text)

    def findall(self, text: str) -> list[Any]:
        self._calls[self._name] += 1
        return self._pattern.findall(text)


def test_report_lines_are_tried_against_their_own_pattern_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An OOM storm is mostly report lines: each one costs a few substring tests, and a
    # pattern only if it starts the way that pattern's lines do. 80 lines, 10 pattern uses.
    calls: Counter[str] = Counter()
    for name, value in vars(oom).items():
        if isinstance(value, re.Pattern):
            monkeypatch.setattr(oom, name, _CountingPattern(value, name, calls))
    assert_kills(
        run(load("memcg_6_18_kubepods_this_machine.log")),
        EXPECTED["memcg_6_18_kubepods_this_machine.log"],
    )
    assert calls == {
        "_TRIGGER": 1,
        "_CPU_LINE": 1,
        "_MEMCG_USAGE": 1,
        "_TABLE_LINE": 3,  # the header and two rows
        "_SUMMARY_HEAD": 1,
        "_SUMMARY_TAIL": 1,
        "_KILLED": 1,
        "_TAIL_FIELD": 1,
    }


def test_lines_with_a_prefix_not_understood_never_become_kills() -> None:
    # A syslog form no reader understood leaves its prefix on every message: none of the
    # report's lines may be read as a kill (a memcg kill once came out as a global OOM
    # whose trigger comm was the whole line); each is counted with its position.
    prefix = "Jan  5 15:19:27 kernel: [ 5864.708440] "
    records = [
        KernelRecord(prefix + r.message, position=f"line {i}")
        for i, r in enumerate(load("memcg_6_18_kubepods_this_machine.log"), start=1)
    ]
    assembler = OomAssembler()
    kills = [k for r in records for k in assembler.feed(r)] + assembler.flush(final=True)
    assert kills == []
    assert assembler.not_understood == 3  # trigger, summary, Killed
    assert assembler.not_understood_positions == ["line 1", "line 79", "line 80"]


def test_trigger_comm_escaped_by_kmsg_is_a_comm() -> None:
    comm = r"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e"  # 9 bytes, escaped in a /dev/kmsg dump
    trigger = f"{comm} invoked oom-killer: gfp_mask=0xcc0(GFP_KERNEL), order=0, oom_score_adj=0"
    records = [KernelRecord(trigger), *load("memcg_6_18_kubepods_this_machine.log")[1:]]
    assert [k.trigger_comm for k in run(records)] == [comm]
