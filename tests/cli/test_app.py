"""The command line's frame: every command is wired, flag defaults are the library dataclasses' own, a library
error is one line and exit code 2, a usage error is click's message."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from dynres.bench.io import IOBenchConfig
from dynres.cli.app import ERROR_EXIT, app, main
from dynres.cli.options import join, parse_list, span
from dynres.io.jpeg import DEFAULT_MAX_PIXELS
from dynres.model.train import TrainConfig
from dynres.paper import DEFAULT_CROP_SIDE, PAPER_CROPS, PAPER_GRID
from dynres.policy.quality import QualityConfig
from dynres.runtime.engine import PipelineConfig
from dynres.runtime.kernels import TuneConfig
from dynres.runtime.serve import ServeConfig
from dynres.study.calibrate import CalibrationConfig
from dynres.study.scale import ScaleConfig
from dynres.study.static import EvalConfig
from dynres.version import __version__

COMMANDS = {"demo", "ingest", "layout", "run", "report", "infer", "serve", "calibrate", "tune", "data", "bench", "train",
            "eval", "index"}


def option(path: str, flag: str):
    """The click parameter behind ``dynres PATH FLAG``."""
    cmd = typer.main.get_command(app)
    for name in path.split():
        cmd = cmd.commands[name]
    return next(p for p in cmd.params if flag in p.opts)


def test_every_command_and_group_is_wired():
    group = typer.main.get_command(app)
    assert set(group.commands) == COMMANDS
    assert set(group.commands["bench"].commands) == {"io", "decode", "pipeline", "serve", "kernels", "ray", "scale"}
    assert set(group.commands["train"].commands) == {"backbone", "scale"}
    assert set(group.commands["eval"].commands) == {"static", "dynamic"}
    assert set(group.commands["index"].commands) == {"quality"}
    assert set(group.commands["data"].commands) == {"synth", "photos"}


@pytest.mark.parametrize("path, flag, expected", [
    ("eval static", "--crops", join(EvalConfig.crops)),
    ("eval dynamic", "--crops", join(EvalConfig.crops)),
    ("eval static", "--backend", EvalConfig.backend),
    ("train scale", "--crops", join(ScaleConfig.crops)),
    ("train scale", "--epochs", ScaleConfig.epochs),
    ("train scale", "--batch-size", TrainConfig.batch_size),
    ("train backbone", "--epochs", TrainConfig.epochs),
    ("train backbone", "--lr", None),
    ("calibrate", "--crops", join(CalibrationConfig.crops)),
    ("calibrate", "--target", CalibrationConfig.target),
    ("ingest", "--max-pixels", DEFAULT_MAX_PIXELS),
    ("infer", "--crop", PipelineConfig.crop_side),
    ("infer", "--batch-size", PipelineConfig.batch_size),
    ("serve", "--max-queue", ServeConfig.max_queue),
    ("bench io", "--crop", IOBenchConfig.crop_side),
    ("bench io", "--resolutions", join(IOBenchConfig.resolutions)),
    ("index quality", "--crop", QualityConfig.crop_side),
    ("tune", "--resolutions", span(TuneConfig.resolutions)),
    ("tune", "--runs", TuneConfig.runs),
    ("bench kernels", "--tolerance", TuneConfig.tolerance),
])
def test_flag_defaults_are_the_dataclass_defaults(path, flag, expected):
    assert option(path, flag).default == expected


def test_the_defaults_read_are_the_papers_settings():
    """What the help shows: the paper's crops and grid, torchvision's crop side, Pillow's pixel limit."""
    assert option("eval static", "--crops").default == "0.25,0.56,0.75,1.0" and EvalConfig.crops == PAPER_CROPS
    assert parse_list(option("tune", "--resolutions").default) == PAPER_GRID == TuneConfig.resolutions
    assert option("infer", "--crop").default == DEFAULT_CROP_SIDE == 0.875
    assert option("ingest", "--max-pixels").default == 89_478_485
    assert "(default 0.003 adamw, 0.1 sgd)" in option("train backbone", "--lr").help
    help_text = CliRunner().invoke(app, ["eval", "static", "--help"], env={"COLUMNS": "200"}).output
    assert f"[default: {join(EvalConfig.crops)}]" in help_text


def test_a_library_error_is_one_line_and_exit_code_2(tmp_path, monkeypatch, capsys):
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    run_file = tmp_path / "run.toml"
    run_file.write_text('data = "data"\nout = "out"\n[backbone]\nepochs = 0\n')
    monkeypatch.setattr(sys, "argv", ["dynres", "run", str(run_file)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == ERROR_EXIT == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "run.toml" in err and "[backbone]" in err and "epochs" in err  # brackets kept, not taken for markup


def test_a_usage_error_keeps_clicks_message_and_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dynres", "eval", "static", "--no-such-flag"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "No such option" in capsys.readouterr().err


def test_the_module_runs_and_does_not_import_torchvision():
    """``python -m dynres.cli`` works, and reading the settings does not import torchvision (a slow start)."""
    code = ("import runpy, sys; sys.argv = ['dynres', '--version']\n"
            "try:\n    runpy.run_module('dynres.cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [__version__, "False"]


def test_no_command_shows_the_help_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["dynres"])
    with pytest.raises(SystemExit):
        main()
    out = capsys.readouterr()
    assert "Usage:" in out.out and "Commands" in out.out and "Traceback" not in out.out + out.err


def test_demo_flags_choose_the_demo_presets(tmp_path, monkeypatch):
    import dynres.study.demo as demo

    seen = []
    monkeypatch.setattr(demo, "run_study", lambda cfg: seen.append(cfg) or {"wall_s": 0.0})
    for args in (["--quick", "--seed", "3"], []):
        result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path), *args])
        assert result.exit_code == 0, result.output
    quick, full = seen
    assert quick.quick and quick.size == demo.QUICK and (quick.io_images, quick.io_repeats) == (32, 1)
    assert quick.seed == 3 and quick.out == tmp_path
    assert not full.quick and full.size == demo.FULL and full.seed == demo.StudyConfig.seed
    assert (full.io_images, full.io_repeats) == (demo.StudyConfig.io_images, demo.StudyConfig.io_repeats)
