"""``dynres demo`` (the whole study on the built-in data), ``dynres run`` (the same stages from a run file) and
``dynres report`` (the report from a run's records)."""

from __future__ import annotations

from pathlib import Path

import typer

from dynres._ui import console
from dynres.study.demo import StudyConfig

FORCE_HELP = ("Run every stage even if its record is up to date; each still reuses its own finished work (stored "
              "images, trained epochs, tuned kernels): delete the run directory to start from nothing.")


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory (cached stages, records, report)."),
    quick: bool = typer.Option(StudyConfig.quick, "--quick", help="Smaller data and budgets: a few minutes."),
    workers: int = typer.Option(StudyConfig.workers,
                                help="Processes for data generation, ingest and decoding (0: every core)."),
    seed: int = typer.Option(StudyConfig.seed, help="Seed for the built-in data set and training."),
    force: bool = typer.Option(StudyConfig.force, "--force", help=FORCE_HELP),
) -> None:
    """The main job on the built-in data set: the whole study (data → … → report) in one cached run."""
    from dynres.study.demo import demo_study_config, run_study

    summary = run_study(demo_study_config(out, quick=quick, seed=seed, workers=workers, force=force))
    console.print(f"[green]demo finished in {summary['wall_s']:.0f} s[/green]; summary: {out / 'summary.json'}")


def run(
    config: Path = typer.Argument(..., help="TOML or YAML run file (docs/run-config.md)."),
    force: bool = typer.Option(StudyConfig.force, "--force", help=FORCE_HELP),
) -> None:
    """The demo's stages on your own ImageFolder data and architecture, from a config file."""
    from dataclasses import replace

    from dynres.study.demo import run_study
    from dynres.study.runfile import load_study_config

    cfg = replace(load_study_config(config), force=force)
    summary = run_study(cfg)
    console.print(f"[green]run finished in {summary['wall_s']:.0f} s[/green]; report: {cfg.out / 'report.html'}")


def report(run_dir: Path = typer.Argument(..., help="A run directory with summary.json.")) -> None:
    """Render RUN_DIR/report.html and report.md from the run's records."""
    from dynres.report.document import build_report

    html_path, md_path = build_report(run_dir)
    console.print(f"wrote {html_path} and {md_path}")
