"""``--resume`` and ``--merge`` of the benchmark scripts: stored runs come back with where they were measured."""

import argparse
import importlib.machinery
import json
import sys
import types

import pytest

from benchmarks import common

SETTINGS = {"lr": 1e-3, "epochs": 12}


def store(results, name, rows, command, settings=SETTINGS, resumed_from=(), machine="cpu box"):
    data = {"command": command, "git_sha": "abc", "date": "2026-01-01", "machine": machine, "settings": settings}
    (results / f"{name}.json").write_text(json.dumps({**data, "resumed_from": list(resumed_from), "rows": rows}))


def test_a_merged_lane_joins_the_runs_and_every_invocation_is_credited(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    first = {"command": "first", "git_sha": "a", "date": "d", "runs": 1}
    store(tmp_path, "grid", [{"seed": 0}, {"seed": 1}], "second", resumed_from=[first])
    store(tmp_path, "lane", [{"seed": 2}, {"seed": 3}], "lane")
    runs, earlier = common.earlier_runs("grid", "rows", SETTINGS, merge=["lane"])
    assert [r["seed"] for r in runs] == [0, 1, 2, 3]
    assert [(e["command"], e["runs"]) for e in earlier] == [("first", 1), ("second", 1), ("lane", 2)]


def test_the_report_names_the_machine_each_earlier_invocation_ran_on(tmp_path, monkeypatch):
    # The report's own Machine line is the rewriting invocation's; runs measured elsewhere say where.
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    store(tmp_path, "grid", [{"seed": 0}], "grid", machine="gpu box")
    store(tmp_path, "lane", [{"seed": 1}], "lane", machine="laptop")
    runs, earlier = common.earlier_runs("grid", "rows", SETTINGS, merge=["lane"])
    assert [e["machine"] for e in earlier] == ["gpu box", "laptop"]
    report = common.write_results("grid", runs, "body", extra={"resumed_from": earlier}).read_text()
    assert "measured earlier by `grid` (git abc, finished 2026-01-01, on gpu box)" in report
    assert "measured earlier by `lane` (git abc, finished 2026-01-01, on laptop)" in report


def test_a_lane_measured_under_other_settings_or_missing_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    store(tmp_path, "grid", [{"seed": 0}], "grid")
    store(tmp_path, "lane", [{"seed": 1}], "lane", settings={**SETTINGS, "epochs": 6})
    with pytest.raises(SystemExit, match=r"other settings.*'epochs': \(6, 12\)"):
        common.earlier_runs("grid", "rows", SETTINGS, merge=["lane"])
    with pytest.raises(SystemExit, match="does not exist"):
        common.earlier_runs("grid", "rows", SETTINGS, merge=["absent"])
    assert common.earlier_runs("absent", "rows", SETTINGS) == ([], [])  # nothing stored yet: start afresh


def test_merged_lanes_that_overlap_are_refused_and_merge_needs_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    store(tmp_path, "grid", [{"variant": "ours", "seed": 0}], "grid")
    store(tmp_path, "lane", [{"variant": "ours", "seed": 1}, {"variant": "ours", "seed": 0}], "lane")
    parser = argparse.ArgumentParser()
    common.add_resume_arguments(parser, "grid")

    def by_run(run):
        return run["variant"], run["seed"]

    one_lane = common.resumed_runs(parser.parse_args(["--resume"]), "rows", SETTINGS)[0]
    assert list(common.index_runs(one_lane, by_run)) == [("ours", 0)]
    both = common.resumed_runs(parser.parse_args(["--resume", "--merge", "lane"]), "rows", SETTINGS)[0]
    with pytest.raises(SystemExit, match=r"\('ours', 0\) is stored twice"):
        common.index_runs(both, by_run)
    with pytest.raises(SystemExit, match="--merge needs --resume"):
        common.resumed_runs(parser.parse_args(["--merge", "lane"]), "rows", SETTINGS)
    assert common.resumed_runs(parser.parse_args([]), "rows", SETTINGS) == ([], [])  # a fresh run keeps nothing


def test_the_command_names_the_module_or_the_script_that_ran(monkeypatch):
    # A script run by path, or a pytest-xdist worker's `python -c`, has a __main__ without a module spec.
    main = types.ModuleType("__main__")
    main.__spec__ = None
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["benchmarks/decoding.py", "--parts", "memory"])
    assert common.command() == "python benchmarks/decoding.py --parts memory"
    main.__spec__ = importlib.machinery.ModuleSpec("benchmarks.decoding", None)
    assert common.command() == "python -m benchmarks.decoding --parts memory"
