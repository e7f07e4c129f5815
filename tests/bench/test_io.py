"""`bench io` on a tiny store: the record holds every resolution's rates, the bytes each scan count reads and the
ingest rate, and the Markdown is rendered from that record."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dynres.bench.io import IOBenchConfig, render_markdown, run_bench_io
from dynres.errors import ConfigError
from pipeline_fixtures import make_store


def test_bench_io_records_decode_rates_bytes_per_scan_and_ingest(tmp_path):
    store = make_store(tmp_path, per_class=3)
    cfg = IOBenchConfig(resolutions=(32, 64), images=4, repeats=1, workers=1)
    result = run_bench_io(str(store.root), tmp_path / "out", cfg, src=tmp_path / "src", progress=False)
    record = json.loads((tmp_path / "out" / "bench_io.json").read_text())
    assert json.loads(json.dumps(result)) == {k: v for k, v in record.items() if k not in ("created", "machine")}

    assert set(record) == {"created", "machine", "store", "config", "workers", "decode", "bytes_per_scan",
                           "mean_file_bytes", "bytes", "ingest"}
    assert record["config"] == {"resolutions": [32, 64], "images": 4, "repeats": 1, "crop_side": 0.875, "workers": 1,
                                "seed": 0}
    assert record["workers"] == 1
    assert [row["resolution"] for row in record["decode"]] == [32, 64]
    for row in record["decode"]:
        for mode in ("one_core", "all_cores"):
            fast, base = row[f"dct_scaled_{mode}_images_per_s"], row[f"baseline_{mode}_images_per_s"]
            assert fast > 0 and base > 0
            assert row[f"speedup_{mode}"] == pytest.approx(fast / base)

    sizes = [store.size(k) for k in store.keys]
    assert record["mean_file_bytes"] == pytest.approx(np.mean(sizes))
    scans = record["bytes_per_scan"]
    assert [r["scans"] for r in scans] == list(range(1, max(store.num_scans(k) for k in store.keys) + 1))
    assert scans[0]["mean_bytes"] == pytest.approx(np.mean([store.prefix_size(k, 1) for k in store.keys]))
    assert all(a["mean_bytes"] <= b["mean_bytes"] for a, b in zip(scans, scans[1:]))  # more scans, more bytes
    assert 0 < scans[0]["fraction_of_file"] < 1 and scans[-1]["fraction_of_file"] == pytest.approx(1.0)
    assert scans[-1]["mean_bytes"] == pytest.approx(record["mean_file_bytes"])  # every scan: the whole file

    source_bytes = sum(store.record(k)["source_size"] for k in store.keys)
    assert record["bytes"] == {"store_bytes": sum(sizes), "source_bytes": source_bytes,
                               "store_over_source": pytest.approx(sum(sizes) / source_bytes),
                               "lossless_images": sum(store.record(k)["lossless"] for k in store.keys), "images": 6}
    assert record["ingest"]["images"] == len(store.keys) and record["ingest"]["images_per_s"] > 0
    markdown = (tmp_path / "out" / "bench_io.md").read_text()
    assert markdown == render_markdown(record).rstrip() + "\n"  # rendered from the record, nothing else
    assert "| 32 |" in markdown and "Ingest: 6 images" in markdown and "Store bytes / source bytes: " in markdown


def test_without_a_source_tree_there_is_no_ingest_row(tmp_path):
    store = make_store(tmp_path, per_class=2)
    result = run_bench_io(str(store.root), tmp_path / "out", IOBenchConfig(resolutions=(32,), images=2, repeats=1,
                                                                           workers=1), progress=False)
    assert "ingest" not in result and "Ingest" not in render_markdown(result)


@pytest.mark.parametrize("bad", [{"images": 0}, {"repeats": 0}, {"resolutions": ()}, {"crop_side": 1.5}, {"workers": -1}])
def test_a_bad_io_bench_config_is_refused(bad):
    with pytest.raises(ConfigError):
        IOBenchConfig(**bad)


def test_the_bench_io_command_maps_its_flags_to_the_config(tmp_path):
    """`dynres bench io` end to end on a tiny store, flags included (a wrong keyword would fail here)."""
    from typer.testing import CliRunner

    from dynres.cli import app

    store = make_store(tmp_path, per_class=3)
    res = CliRunner().invoke(app, ["bench", "io", str(store.root), "--out", str(tmp_path / "out"), "--images", "4",
                                   "--repeats", "1", "--resolutions", "32", "--crop", "0.75", "--workers", "1"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "out" / "bench_io.json").read_text())
    assert record["config"]["crop_side"] == 0.75 and record["config"]["images"] == 4
    assert [row["resolution"] for row in record["decode"]] == [32]
