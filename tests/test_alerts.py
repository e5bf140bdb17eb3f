"""The alerting rules shipped with the package (daemon/xdplb/alerts/xdplb-rules.yml):
promtool accepts them, their unit tests (tests/alerts/xdplb-rules.test.yml) pass, and
every alert is tested both firing and quiet. A real Prometheus loading them and
evaluating them against lbd's own metrics is in test_observability.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "daemon" / "xdplb" / "alerts" / "xdplb-rules.yml"
RULE_TESTS = REPO / "tests" / "alerts" / "xdplb-rules.test.yml"
PROMTOOL = "/usr/bin/promtool"


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    if not shutil.which(PROMTOOL):
        pytest.fail(f"{PROMTOOL} is missing: `make setup` installs prometheus")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, check=False)


def alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)


def test_promtool_accepts_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names())} rules found" in result.stdout


def test_the_rules_unit_tests_pass():
    result = promtool("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_quiet():
    """An alert test with `exp_alerts: []` is a quiet case; any other, a firing one."""
    text = RULE_TESTS.read_text()
    cases = re.findall(r"alertname: (\w+)\n\s*exp_alerts:(.*)", text)
    firing = {name for name, rest in cases if rest.strip() != "[]"}
    quiet = {name for name, rest in cases if rest.strip() == "[]"}
    names = alert_names()
    assert len(names) == len(set(names)) == 10
    assert firing == set(names) and quiet == set(names)


def test_a_broken_expectation_fails(tmp_path):
    """The unit tests can fail: the same tests expecting another instance do."""
    text = RULE_TESTS.read_text()
    broken = text.replace("{severity: warning, instance: lb1, session: router1}",
                          "{severity: warning, instance: lb2, session: router1}")
    broken = broken.replace("../../daemon/xdplb/alerts/xdplb-rules.yml", str(RULES))
    assert broken.count(str(RULES)) == 1 and "instance: lb2, session" in broken
    (tmp_path / RULE_TESTS.name).write_text(broken)
    result = promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert result.returncode == 1
    assert "FAILED" in result.stdout + result.stderr
    assert "alertname: XdplbBgpSessionDown" in result.stdout + result.stderr
