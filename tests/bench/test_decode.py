"""`bench decode` on a tiny store: every binding is in the record (measured, or with the reason it is not), every
cell has each binding's time and whether its pixels equal Pillow's, and dynres's decoder is compared with the fastest
binding that gives Pillow's pixels."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import dynres.bench.decode as bench_decode
from dynres.bench.decode import BINDINGS, Binding, DecodeBenchConfig, render_markdown, run_bench_decode
from dynres.cli.app import app
from dynres.errors import ConfigError
from pipeline_fixtures import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("bench-decode"), per_class=2)


def test_the_record_has_every_binding_and_the_pixel_equality_column(store, tmp_path):
    cfg = DecodeBenchConfig(images=3, repeats=1, scans=(1, 0), scales=(1, 8))
    result = run_bench_decode(str(store.root), tmp_path, cfg, progress=False)
    record = json.loads((tmp_path / "bench_decode.json").read_text())
    assert json.loads(json.dumps(result)) == {k: v for k, v in record.items() if k not in ("created", "machine")}
    assert (tmp_path / "bench_decode.md").read_text() == render_markdown(record) + "\n"

    assert set(record["bindings"]) == {b.name for b in BINDINGS}
    for name, info in record["bindings"].items():
        assert info["available"] or info["reason"], name  # measured, or says why not
    assert record["bindings"]["simplejpeg"]["available"] and record["decoder"]["name"] == "simplejpeg"
    assert record["images"] == 3

    measured = {n for n, b in record["bindings"].items() if b["available"]}
    cells = {(r["mode"], r["scans"], r["scale"]) for r in record["rows"]}
    assert cells == {(m, k, s) for m in ("RGB", "L") for k in (1, "all") for s in (1, 8)}
    for mode, scans, scale in cells:
        rows = {r["binding"]: r for r in record["rows"] if (r["mode"], r["scans"], r["scale"]) == (mode, scans, scale)}
        scaling = {n for n in measured if scale in record["bindings"][n]["scales"]}
        assert set(rows) == scaling | {"dynres"}
        assert all(r["ms"] > 0 and isinstance(r["equal_to_pillow"], bool) for r in rows.values())
        assert rows["pillow"]["equal_to_pillow"] and rows["simplejpeg"]["equal_to_pillow"]
        assert rows["dynres"]["equal_to_pillow"]  # what dynres serves is Pillow's pixels

    summary = {(r["mode"], r["scans"], r["scale"]): r for r in record["summary"]}
    assert set(summary) == cells
    for (mode, scans, scale), s in summary.items():
        equal = [r for r in record["rows"] if (r["mode"], r["scans"], r["scale"]) == (mode, scans, scale)
                 and r["equal_to_pillow"] and r["binding"] != "dynres"]
        assert s["fastest_ms"] == min(r["ms"] for r in equal)
        assert s["dynres_vs_fastest"] == pytest.approx(s["dynres_ms"] / s["fastest_ms"])
    for row in record["rows"]:
        read = [store.prefix_size(k, None if row["scans"] == "all" else row["scans"]) for k in record["keys"]]
        eoi = 0 if row["scans"] == "all" else 2  # a prefix is read with an EOI marker appended
        assert row["mean_bytes"] == pytest.approx(sum(read) / len(read) + eoi)


def test_a_binding_that_does_not_load_is_recorded_with_its_reason(store, tmp_path, monkeypatch):
    def broken():
        raise ImportError("No module named 'fastjpeg'")

    monkeypatch.setattr(bench_decode, "BINDINGS", (*BINDINGS, Binding("fastjpeg", "fastjpeg", broken)))
    cfg = DecodeBenchConfig(images=1, repeats=1, scans=(1,), scales=(2,), modes=("RGB",))
    record = run_bench_decode(str(store.root), tmp_path, cfg, progress=False)
    assert record["bindings"]["fastjpeg"] == {"version": None, "scales": [1, 2, 4, 8], "note": "", "available": False,
                                              "reason": "ImportError: No module named 'fastjpeg'"}
    assert "fastjpeg" not in {r["binding"] for r in record["rows"]}
    assert "No module named 'fastjpeg'" in render_markdown(record)


def test_the_command_writes_the_record(store, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["bench", "decode", str(store.root), "--out", str(out), "--images", "1",
                                   "--repeats", "1", "--scans", "2", "--scales", "4", "--modes", "L"])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "bench_decode.json").read_text())
    assert record["config"]["scans"] == [2] and record["config"]["modes"] == ["L"]
    assert "fastest equal" in res.output


@pytest.mark.parametrize("bad", [dict(scales=(3,)), dict(modes=("CMYK",)), dict(scans=()), dict(images=0)])
def test_config_is_validated(bad):
    with pytest.raises(ConfigError):
        DecodeBenchConfig(**bad)
