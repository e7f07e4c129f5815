"""The kernels benchmark: the record (kernels.json) first, then Table II in Markdown and Figure 7 from it."""

import json
import warnings

import torch
from torch import nn

from dynres.bench.kernels import render_markdown, write_report
from dynres.runtime.kernels import TuneConfig, tune

LIMITS = {"threads": 1, "gemm_gflops_per_s": 100.0, "fma_gflops_per_s": None}


def tuned_rows(tmp_path) -> list[dict]:
    """The tuner's rows for a tiny conv net at 32 px, eager against channels-last."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 5)).eval()
    cfg = TuneConfig(resolutions=(32,), batch_sizes=(1,), threads=1, warmup=1, runs=3, min_runs=3,
                     backends=("eager", "channels_last"), cache_dir=tmp_path / "cache")
    return tune(net, cfg, gemm_peak=100.0, progress=False)


def test_report_has_table_ii_and_figure_7(tmp_path):
    rows = tuned_rows(tmp_path)
    paths = write_report(rows, LIMITS, tmp_path / "out")
    record = json.loads(paths["json"].read_text())
    assert record["rows"] == json.loads(json.dumps(rows)) and record["limits"]["gemm_gflops_per_s"] == 100.0
    md = paths["md"].read_text()
    assert "Table II" in md and "| eager | channels_last |" in md
    assert paths["png"].stat().st_size > 1000


def test_markdown_says_why_a_backend_has_no_latency(tmp_path):
    rows = tuned_rows(tmp_path)
    rejected = {**rows[0], "backend": "liar", "status": "rejected", "latency_ms": None, "gflops_per_s": None,
                "reason": "rel. error 1.00e-02 > tolerance 1e-04"}
    md = render_markdown({"meta": {}, "limits": LIMITS, "rows": rows + [rejected]}, "fig.png")
    header = next(line for line in md.splitlines() if line.startswith("| res | GFLOP |"))
    assert header.split(" | ")[2:5] == ["eager", "channels_last", "liar"]
    row = next(line for line in md.splitlines() if line.startswith("| 32 | "))
    assert row.split(" | ")[4] == "rejected"
    assert "- liar: rel. error 1.00e-02 > tolerance 1e-04" in md
    assert "[fig.png](fig.png)" in md


def test_cli_tune_writes_records(tmp_path):
    from typer.testing import CliRunner

    from dynres.cli.app import app

    args = ["tune", "--arch", "resnet_tiny", "--num-classes", "3", "--resolutions", "32", "--backends", "eager",
            "--threads", "1", "--runs", "2", "--warmup", "1", "--cache-dir", str(tmp_path / "c"),
            "--out", str(tmp_path / "out")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "kernels.json").read_text())
    assert {r["backend"] for r in record["rows"]} == {"eager", "tuned"}
    assert record["limits"]["gemm_gflops_per_s"] > 0
