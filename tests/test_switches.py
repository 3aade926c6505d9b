"""The TITANS_* environment switches: one table (titans/utils/switches.py) that every reader goes through."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

import titans
from titans.scripts.cli import app
from titans.utils import switches
from titans.utils.switches import SWITCHES, switch_on, switch_table, switch_value, unknown_switches

PACKAGE = Path(titans.__file__).parent
NAME = re.compile(r"TITANS_[A-Z0-9_]*[A-Z0-9]")


def _names_in(paths) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in paths:
        for name in NAME.findall(path.read_text()):
            found.setdefault(name, []).append(str(path))
    return found


def test_every_switch_the_package_names_is_declared_and_every_declared_one_is_read():
    """A name in the source that the table lacks would be read unchecked (and reported as unknown by the CLI); a
    declared name nothing reads is a switch that switches nothing."""
    in_package = _names_in(p for p in PACKAGE.rglob("*.py") if p.name != "switches.py")
    undeclared = sorted(set(in_package) - set(SWITCHES))
    assert not undeclared, f"named in the package but not declared in titans/utils/switches.py: {undeclared}"
    in_tests = _names_in(Path(__file__).parent.glob("*.py"))
    unread = sorted(set(SWITCHES) - set(in_package) - set(in_tests))
    assert not unread, f"declared but read nowhere: {unread}"


def test_no_module_reads_a_switch_around_the_table():
    """Every read goes through switch_value / switch_on (the check and the default live in one place)."""
    direct = re.compile(r"environ(\.get\(|\[)\s*[\"']TITANS_")
    offenders = [str(p) for p in PACKAGE.rglob("*.py") if direct.search(p.read_text())]
    assert not offenders, f"read TITANS_* from os.environ directly: {offenders}"


def test_values_defaults_and_errors():
    env = {"TITANS_TRITON_BWD": " split ", "TITANS_TRITON_SPLIT": "", "TITANS_TRITON_WARPS": "16"}
    assert switch_value("TITANS_TRITON_BWD", env) == "split"  # stripped
    assert switch_value("TITANS_TRITON_SPLIT", env) == "1"  # empty is unset: the default
    assert switch_on("TITANS_TRITON_SPLIT", env) is True
    assert switch_value("TITANS_TRITON_WARPS", env) == "16"
    assert switch_on("TITANS_DEFER_WEIGHT_GRADS", {}) is None  # no default: the reader's choice
    with pytest.raises(ValueError, match=r"TITANS_TRITON_WARPS='12': expected a power of two from 1 to 32"):
        switch_value("TITANS_TRITON_WARPS", {"TITANS_TRITON_WARPS": "12"})
    with pytest.raises(ValueError, match=r"TITANS_WAVEFRONT_PRIORITY='yes': expected 0 or 1"):
        switch_on("TITANS_WAVEFRONT_PRIORITY", {"TITANS_WAVEFRONT_PRIORITY": "yes"})
    with pytest.raises(ValueError, match=r"TITANS_MATMUL_SM_CARVEOUT='-4'"):
        switch_value("TITANS_MATMUL_SM_CARVEOUT", {"TITANS_MATMUL_SM_CARVEOUT": "-4"})
    with pytest.raises(KeyError):
        switch_value("TITANS_NOT_A_SWITCH", {})
    with pytest.raises(KeyError, match="not a 0 / 1 switch"):
        switch_on("TITANS_TRITON_BWD", {})
    for s in SWITCHES.values():  # each default is a value its switch takes
        assert s.default is None or s.accepts(s.default), s.name


def test_readers_use_the_table(monkeypatch):
    """The modules' own readers see the table's defaults and checks."""
    from titans.core.memory import triton_kernels as tk
    from titans.utils.weight_grads import deferral_wanted

    for name in SWITCHES:  # the defaults, whatever the calling environment sets
        monkeypatch.delenv(name, raising=False)
    assert tk.backward_mode() == "auto" and tk._split() is True
    monkeypatch.setenv("TITANS_TRITON_WARPS", "2")
    assert tk._num_warps(64, 128) == 2
    monkeypatch.setenv("TITANS_TRITON_WARPS", "3")
    with pytest.raises(ValueError, match="TITANS_TRITON_WARPS='3'"):
        tk._num_warps(64, 128)
    assert deferral_wanted(True) is True and deferral_wanted(False) is False
    monkeypatch.setenv("TITANS_DEFER_WEIGHT_GRADS", "0")
    assert deferral_wanted(True) is False


def test_unknown_switches_are_found_with_the_nearest_name():
    env = {"TITANS_TRITON_BWDD": "split", "TITANS_TRITON_BWD": "split", "TITANS_SOMETHING": "1", "PATH": "/bin"}
    assert unknown_switches(env) == {"TITANS_SOMETHING": None, "TITANS_TRITON_BWDD": "TITANS_TRITON_BWD"}
    switches._WARNED.discard("TITANS_TRITON_BWDD")
    with pytest.warns(UserWarning, match="TITANS_TRITON_BWDD .* did you mean TITANS_TRITON_BWD"):
        switches.warn_unknown_switches({"TITANS_TRITON_BWDD": "split"})
    told = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once a name and process, through either channel
        switches.warn_unknown_switches({"TITANS_TRITON_BWDD": "split"}, report=told.append)
        switches.warn_unknown_switches({"TITANS_TRITON_BWDD": "split", "TITANS_X": "1"}, report=told.append)
    assert told == ["TITANS_X is set but no titans switch has that name, so it changes nothing; `titans switches` "
                    "lists the ones that exist"]


def test_table_reports_a_rejected_value_instead_of_raising():
    rows = {r["name"]: r for r in switch_table({"TITANS_TRITON_BWD": "sideways", "TITANS_TRITON_SPLIT": "0"})}
    assert set(rows) == set(SWITCHES)
    assert "TITANS_TRITON_BWD='sideways'" in rows["TITANS_TRITON_BWD"]["error"]
    assert rows["TITANS_TRITON_SPLIT"]["set"] == "0" and "error" not in rows["TITANS_TRITON_SPLIT"]
    assert rows["TITANS_TRITON_SAVE_INNER"]["set"] is None and rows["TITANS_TRITON_SAVE_INNER"]["default"] == "auto"


def test_cli_lists_switches_and_warns_about_unknown_ones(monkeypatch):
    for name in [n for n in unknown_switches()]:
        monkeypatch.delenv(name)
    switches._WARNED.discard("TITANS_TRITON_SAVE_INNR")  # once a name and process: as if this were the first
    monkeypatch.setenv("TITANS_TRITON_SAVE_INNR", "1")
    monkeypatch.setenv("TITANS_TRITON_SAVE_INNER", "1")
    r = CliRunner().invoke(app, ["switches", "--json"])
    assert r.exit_code == 0, r.output
    assert "warning: TITANS_TRITON_SAVE_INNR is set but" in r.stderr and "TITANS_TRITON_SAVE_INNER?" in r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["TITANS_TRITON_SAVE_INNER"]["set"] == "1"
    monkeypatch.setenv("TITANS_TRITON_WALK_PARTS", "3")
    r = CliRunner().invoke(app, ["switches"])
    assert r.exit_code == 2 and "error: TITANS_TRITON_WALK_PARTS='3': expected 1, 2, 4 or 8" in r.stderr
