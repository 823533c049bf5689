"""The alert rules: the PrometheusRule and the plain rule file are the same rules, both pass
``promtool check rules``, and ``promtool test rules`` exercises every alert (fires on the
series that should fire it, silent on the others, ``for:`` respected).

``daemonset/alerts/nodediag.rules.yaml`` is the source; after editing it, regenerate the
PrometheusRule with ``.venv/bin/python tests/test_alerts.py``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "daemonset" / "alerts" / "nodediag.rules.yaml"
RULES_TESTS = REPO / "daemonset" / "alerts" / "nodediag.rules.test.yaml"
PROMETHEUS_RULE = REPO / "daemonset" / "prometheusrule.yaml"
RUNBOOKS = REPO / "docs" / "runbooks"

PROMETHEUS_RULE_HEADER = """\
# GENERATED from daemonset/alerts/nodediag.rules.yaml by `python tests/test_alerts.py`:
# edit that file, not this one (tests/test_alerts.py checks the two are the same rules).
# kube-prometheus-stack's Prometheus picks up PrometheusRules labelled with its release
# (`release: <name>`) unless ruleSelector is empty: add that label in an overlay if needed.
"""


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the PromQL expressions) as ``|-`` blocks, as in the rule file."""


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_BlockDumper.add_representer(str, _str)


def prometheus_rule_text() -> str:
    """The PrometheusRule manifest for the plain rule file's groups."""
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "nodediag",
            "namespace": "nodediag",
            "labels": {"app.kubernetes.io/name": "nodediag"},
        },
        "spec": load_yaml(RULES),
    }
    return PROMETHEUS_RULE_HEADER + yaml.dump(rule, Dumper=_BlockDumper, sort_keys=False, width=100)


def alerts() -> list[dict[str, Any]]:
    return [r for g in load_yaml(RULES)["groups"] for r in g["rules"] if "alert" in r]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        import realkernel

        realkernel.skip_or_fail("promtool not installed (Debian package prometheus)")
    return path


def test_prometheus_rule_spec_equals_the_rule_file() -> None:
    manifest = load_yaml(PROMETHEUS_RULE)
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == load_yaml(RULES), (
        "daemonset/prometheusrule.yaml is stale: run `.venv/bin/python tests/test_alerts.py`"
    )
    assert PROMETHEUS_RULE.read_text() == prometheus_rule_text()


def test_alerts_are_named_labelled_and_documented() -> None:
    found = alerts()
    names = [a["alert"] for a in found]
    assert len(names) == len(set(names))
    required = {
        "NodediagInvisibleOOMKill",
        "NodediagNodeProcessOOMKill",
        "NodediagDNSDropRule",
        "NodediagDNSPacketsDropped",
        "NodediagVXLANChecksumOffload",
        "NodediagDNSProbeFailing",
        "NodediagAgentDown",
        "NodediagCollectorFailing",
    }
    assert required <= set(names)
    for alert in found:
        name = alert["alert"]
        assert re.fullmatch(r"Nodediag[A-Z][A-Za-z]+", name), name
        assert alert["labels"]["severity"] in {"info", "warning", "critical"}, name
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook_url"].endswith(f"/docs/runbooks/{name}.md"), name
        runbook = RUNBOOKS / f"{name}.md"
        assert runbook.is_file(), f"missing runbook {runbook}"
        text = runbook.read_text()
        for section in ("## Meaning", "## Confirm", "## Fix"):
            assert section in text, f"{runbook}: no {section!r}"
    assert {p.stem for p in RUNBOOKS.glob("*.md")} >= set(names)


def test_promtool_checks_both_rule_files(tmp_path: Path) -> None:
    binary = promtool()
    spec = tmp_path / "prometheusrule-spec.yaml"
    spec.write_text(yaml.safe_dump(load_yaml(PROMETHEUS_RULE)["spec"]))
    for path in (RULES, spec):
        result = subprocess.run(
            [binary, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_cover_every_alert() -> None:
    tests = load_yaml(RULES_TESTS)
    assert tests["rule_files"] == ["nodediag.rules.yaml"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert fired == names, f"alerts never shown to fire: {names - fired}"
    assert silent == names, f"alerts never shown to stay silent: {names - silent}"


def test_promtool_test_rules() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULES_TESTS.name],
        cwd=RULES_TESTS.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("alert", [a["alert"] for a in alerts() if "for" in a])
def test_for_clause_is_respected_by_a_unit_test(alert: str) -> None:
    """An alert with ``for:`` has a unit test showing it silent before ``for`` has passed."""
    rule = next(a for a in alerts() if a["alert"] == alert)
    hold = _seconds(rule["for"])
    tests = load_yaml(RULES_TESTS)["tests"]
    early = [
        check
        for case in tests
        for check in case.get("alert_rule_test", [])
        if check["alertname"] == alert
        and not check.get("exp_alerts")
        and 0 < _seconds(check["eval_time"]) < hold
    ]
    assert early, f"{alert}: no unit test showing it silent within its for: {rule['for']}"


def _seconds(duration: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)([smh])", duration))


if __name__ == "__main__":
    PROMETHEUS_RULE.write_text(prometheus_rule_text())
    sys.stdout.write(f"wrote {PROMETHEUS_RULE}\n")
