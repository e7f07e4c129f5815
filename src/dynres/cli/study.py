"""``dynres demo`` (the whole study on the built-in data), ``dynres run`` (the same stages from a run file) and
``dynres report`` (the report from a run's records)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

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
    console.print(f"[green]demo finished in {summary['wall_s']:.0f} s[/green]; summary: "
                  f"{escape(str(out / 'summary.json'))}", markup=True)


def run(
    config: Path = typer.Argument(..., help="TOML or YAML run file (docs/run-config.md)."),
    force: bool = typer.Option(StudyConfig.force, "--force", help=FORCE_HELP),
) -> None:
    """The demo's stages on your own ImageFolder data and architecture, from a config file."""
    from dataclasses import replace

    from dynres.study.demo import run_study
    from dynres.study.runfile import load_study_config
    from dynres.study.summary import study_settings

    cfg = replace(load_study_config(config), force=force)
    print_settings(study_settings(cfg), config)
    summary = run_study(cfg)
    print_verdict(summary.get("verdict"))
    console.print(f"[green]run finished in {summary['wall_s']:.0f} s[/green]; report: "
                  f"{escape(str(cfg.out / 'report.html'))}", markup=True)


def settings_table(settings: dict, source: Path):
    """The effective settings as one rich table: a row per section, what the file set, what the preset chose
    (where it differs from the dataclass's default) and the defaults."""
    from rich.table import Table

    table = Table(title=f"Effective settings ({source}; also in RUN/run_config.json)", title_justify="left")
    for head in ("section", "from the file", "preset", "defaults"):
        table.add_column(head, overflow="fold")
    sections: dict[str, dict[str, list[str]]] = {}
    for row in settings["rows"]:
        section, _, name = row["setting"].rpartition(".")
        text = f"{name}={_short(row['value'])}"
        sections.setdefault(section or "run", {}).setdefault(row["source"], []).append(text)
    for section, by_source in sections.items():
        table.add_row(section, *(", ".join(by_source.get(src, [])) for src in ("file", "preset", "default")))
    return table


def _short(value) -> str:
    """A setting's value as the table shows it: TOML's spelling, a long list by its ends and length."""
    if value is None or isinstance(value, bool):
        return "none" if value is None else str(value).lower()
    if isinstance(value, list) and len(value) > 8:
        return f"[{value[0]}, …, {value[-1]}] ({len(value)} values)"
    return str(value)


def print_settings(settings: dict, source: Path) -> None:
    console.print(settings_table(settings, source))
    for warning in settings["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}", markup=True)


def print_verdict(verdict: dict | None) -> None:
    """One line per crop: what the run recommends and the held-out evidence."""
    if not verdict:
        return
    for warning in (verdict.get("health") or {}).get("warnings", []):
        console.print(f"[bold yellow]warning:[/bold yellow] {escape(warning)}", markup=True)
    for row in verdict["crops"]:
        console.print(f"crop {row['crop']:g}: [bold]{row['mode']}[/bold] — {escape(row['reason'])}", markup=True)
    auc = (verdict.get("health") or {}).get("scale_auc")
    if auc and any(row["mode"] == "static" for row in verdict["crops"]):
        console.print(f"the scale model's AUC on the validation images: {auc['min']:.2f}–{auc['max']:.2f} (0.5: a "
                      "coin), how well it tells where the backbone will be right; a more accurate backbone raises it")
    console.print(f"serving configuration: {verdict['serving']}")


def report(run_dir: Path = typer.Argument(..., help="A run directory with summary.json.")) -> None:
    """Render RUN_DIR/report.html and report.md from the run's records."""
    from dynres.report.document import build_report

    html_path, md_path = build_report(run_dir)
    console.print(f"wrote {html_path} and {md_path}")
