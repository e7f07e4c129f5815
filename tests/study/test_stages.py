"""study.stages: the one resume mechanism (a record reused while it matches its inputs) and the cached stages."""

import json

import pytest

from dynres.study.stages import Study, digest, recorded, write_json


def test_a_record_is_reused_only_while_it_matches_its_inputs(tmp_path):
    path = tmp_path / "sub" / "result.json"
    same = lambda r: r.get("settings") == {"x": 1}  # noqa: E731
    assert recorded(path, same) is None  # nothing recorded yet
    write_json(path, {"settings": {"x": 1}, "result": 42})
    assert recorded(path, same) == {"settings": {"x": 1}, "result": 42}
    assert recorded(path, lambda r: r.get("settings") == {"x": 2}) is None  # other inputs
    assert recorded(path, same, force=True) is None  # forced: never reused
    assert not list(path.parent.glob("*.tmp"))  # written atomically, nothing left over
    path.write_text('{"settings": {"x": 1}, "res')  # a torn write
    assert recorded(path, same) is None
    path.write_text(json.dumps([1, 2]))  # not a record
    assert recorded(path, same) is None


def test_a_stage_runs_once_and_reruns_when_its_inputs_or_upstream_change(tmp_path):
    calls = []

    def run(settings, seed):
        study = Study(tmp_path, total_stages=2)
        study.stage("a", {"seed": seed}, lambda: calls.append("a") or {"v": seed})
        return study.stage("b", settings, lambda: calls.append("b") or {"ok": True}, after=("a",))

    run({"x": 1}, 0)
    run({"x": 1}, 0)
    assert calls == ["a", "b"]  # second run fully cached
    run({"x": 2}, 0)
    assert calls == ["a", "b", "b"]  # own input changed
    run({"x": 2}, 1)
    assert calls == ["a", "b", "b", "a", "b"]  # upstream changed → downstream reruns


def test_a_forced_study_reruns_every_stage_and_records_it_again(tmp_path):
    calls = []
    for force in (False, False, True):
        Study(tmp_path, total_stages=1, force=force).stage("a", {}, lambda: calls.append(1) or {"n": len(calls)})
    assert len(calls) == 2
    assert json.loads((tmp_path / "stages" / "a.json").read_text())["outputs"] == {"n": 2}


def test_weights_named_by_init_count_by_content_not_path(tmp_path):
    """The demo's bundled weights live wherever the package is installed: moving them must not rerun a stage."""
    calls = []
    here, there = tmp_path / "a" / "w.pt", tmp_path / "b" / "w.pt"
    for path in (here, there):
        path.parent.mkdir()
        path.write_bytes(b"weights")

    def run(init):
        Study(tmp_path / "run", 1).stage("s", {"cfg": {"init": str(init)}}, lambda: calls.append(1) or {})

    run(here)
    run(there)
    assert len(calls) == 1
    assert digest({"init": str(here)}) == digest({"init": str(there)})
    there.write_bytes(b"other weights")
    run(there)
    assert len(calls) == 2


def test_a_crashed_stage_leaves_no_record_so_the_next_run_redoes_it(tmp_path):
    study = Study(tmp_path, total_stages=1)
    with pytest.raises(RuntimeError):
        study.stage("a", {}, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not (tmp_path / "stages" / "a.json").exists()


def test_a_stage_that_crashes_while_rerunning_does_not_leave_its_old_record_answering(tmp_path):
    """The old record names outputs the new run was rewriting: after the crash, the old inputs must run again."""
    Study(tmp_path, total_stages=1).stage("a", {"x": 1}, lambda: {"v": 1})
    with pytest.raises(RuntimeError):
        Study(tmp_path, total_stages=1).stage("a", {"x": 2}, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    calls = []
    Study(tmp_path, total_stages=1).stage("a", {"x": 1}, lambda: calls.append(1) or {"v": 1})
    assert calls == [1]


def test_a_moved_run_directory_reads_its_own_files_not_those_where_it_was_made(tmp_path):
    first = tmp_path / "here"
    Study(first, total_stages=1).stage("a", {}, lambda: {"store": str(first / "store"), "data": "/elsewhere/data",
                                                          "list": [str(first.resolve() / "m.pt")]})
    first.rename(tmp_path / "there")
    calls = []
    out = Study(tmp_path / "there", total_stages=1).stage("a", {}, lambda: calls.append(1) or {})
    assert calls == []  # still up to date
    assert out == {"store": str(tmp_path / "there" / "store"), "data": "/elsewhere/data",
                   "list": [str(tmp_path / "there" / "m.pt")]}
