"""The `dynres` command line: maps flags to the library's dataclasses and functions, nothing more.

Every library error (``DynresError``) becomes one red line and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from dynres import __version__
from dynres._ui import console
from dynres.errors import DynresError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Dynamic-resolution CNN inference.")
data_app = typer.Typer(no_args_is_help=True, help="Built-in datasets.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (JSON + Markdown records).")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Output folder: train/, val/ (ImageFolder) and objects.parquet."),
    classes: Optional[int] = typer.Option(None, help="Number of classes (default 10, at most 16)."),
    per_class: Optional[int] = typer.Option(None, "--per-class", help="Training images per class (default 300)."),
    val_per_class: Optional[int] = typer.Option(None, help="Validation images per class (default 100)."),
    seed: Optional[int] = typer.Option(None, help="Seed; the same settings give byte-identical files (default 0)."),
    min_size: Optional[int] = typer.Option(None, help="Smallest long image side in px (default 300)."),
    max_size: Optional[int] = typer.Option(None, help="Largest long image side in px (default 800)."),
    quality: Optional[int] = typer.Option(None, help="Baseline JPEG quality (default 90)."),
    workers: Optional[int] = typer.Option(None, help="Processes (default 1); the output does not depend on it."),
) -> None:
    """Generate the built-in data set: objects at scales varying > 6x on photo backgrounds, fine-detail classes."""
    from dynres.synth import SynthConfig, synth

    given = {"classes": classes, "train_per_class": per_class, "val_per_class": val_per_class, "seed": seed,
             "min_size": min_size, "max_size": max_size, "jpeg_quality": quality, "workers": workers}
    report = synth(out, SynthConfig(**{k: v for k, v in given.items() if v is not None}), progress=True)
    console.print(f"wrote {report.images} images ({report.train} train, {report.val} val, {report.classes} classes) "
                  f"and {out / 'objects.parquet'} in {report.seconds:.1f} s ({report.images_per_s:.0f} images/s)")


@bench_app.command("io")
def bench_io_cmd(
    store: str = typer.Argument(..., help="Store directory or fsspec URL."),
    out: Path = typer.Option(Path("runs/bench"), "--out", help="Where bench_io.json/.md go."),
    resolutions: str = typer.Option("112,168,224,280,336,392,448", help="Comma-separated resolutions."),
    images: int = typer.Option(64, help="Images sampled from the store."),
    repeats: int = typer.Option(3, help="Repeats per cell (median reported)."),
    crop: float = typer.Option(0.875, help="Center-crop side ratio."),
    workers: int = typer.Option(0, help="Processes for the all-cores run (0: every core)."),
    src: Optional[Path] = typer.Option(None, help="An ImageFolder tree: also measure ingest images/s on it."),
) -> None:
    """Read+decode speed: DCT-scaled decode vs full decode + torchvision resize; bytes per scan count."""
    from dynres.bench import IOBenchConfig, run_bench_io

    cfg = IOBenchConfig(tuple(int(r) for r in resolutions.split(",")), images, repeats, crop, workers)
    result = run_bench_io(store, out, cfg, src=src)
    for row in result["decode"]:
        console.print(
            f"{row['resolution']:>4}px  1 core: {row['dct_scaled_one_core_images_per_s']:7.1f} vs "
            f"{row['baseline_one_core_images_per_s']:7.1f} img/s ({row['speedup_one_core']:.2f}x)   "
            f"all cores: {row['dct_scaled_all_cores_images_per_s']:7.1f} vs "
            f"{row['baseline_all_cores_images_per_s']:7.1f} img/s ({row['speedup_all_cores']:.2f}x)"
        )
    console.print(f"wrote {out / 'bench_io.json'} and {out / 'bench_io.md'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Run directory (cached stages, records, report)."),
    quick: bool = typer.Option(False, "--quick", help="Smaller data and budgets: a few minutes."),
    workers: int = typer.Option(0, help="Processes for data generation, ingest and decoding (0: every core)."),
    seed: int = typer.Option(0, help="Seed for the built-in data set and training."),
    force: bool = typer.Option(False, "--force", help="Re-run every stage even if cached."),
) -> None:
    """The main job on the built-in data set: synth → ingest → benchmarks (… → report as issues land)."""
    from dynres.study import FULL, QUICK, StudyConfig, run_study

    cfg = StudyConfig(out=out, size=QUICK if quick else FULL, seed=seed, workers=workers, force=force,
                      io_images=32 if quick else 64, io_repeats=1 if quick else 3)
    summary = run_study(cfg)
    console.print(f"[green]demo finished in {summary['wall_s']:.0f} s[/green]; summary: {out / 'summary.json'}")


@app.command()
def ingest(
    src: Path = typer.Argument(..., help="ImageFolder tree: SRC/<class>/<image> (JPEG, PNG, WebP, BMP, TIFF)."),
    store: Path = typer.Argument(..., help="Store directory to create or resume."),
    quality: int = typer.Option(90, help="JPEG quality (1-100)."),
    max_side: Optional[int] = typer.Option(None, "--max-side", help="Cap the long side (pixels)."),
    workers: int = typer.Option(0, help="Processes (0: every core, 1: no subprocesses)."),
    max_pixels: int = typer.Option(89_478_485, "--max-pixels", help="Skip larger images as decompression bombs."),
    scans: Optional[Path] = typer.Option(None, "--scans", help="jpegtran scan-script file (needs `jpegtran`)."),
) -> None:
    """Re-encode an image tree as progressive JPEGs + manifest.parquet (resumable; skipped files listed)."""
    from rich.table import Table

    from dynres.store import IngestConfig
    from dynres.store import ingest as run_ingest

    cfg = IngestConfig(quality=quality, max_side=max_side, workers=workers, max_pixels=max_pixels,
                       scans=str(scans) if scans else None)
    rep = run_ingest(src, store, cfg, progress=True)
    if rep.skipped:
        table = Table("skipped file", "reason", title=f"{len(rep.skipped)} skipped")
        for name, reason in rep.skipped:
            table.add_row(name, reason)
        console.print(table)
    console.print(f"{rep.images} images in {store} ({rep.ingested} encoded, {rep.reused} reused, "
                  f"{len(rep.skipped)} skipped) in {rep.seconds:.1f} s = {rep.images_per_s:.1f} images/s")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory with summary.json.")) -> None:
    """Render RUN_DIR/report.html and report.md from the run's records."""
    from dynres.report import build_report

    html_path, md_path = build_report(run_dir)
    console.print(f"wrote {html_path} and {md_path}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except DynresError as err:
        console.print(f"[red]error:[/red] {err}")
        sys.exit(2)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        console.print("[red]aborted[/red]")
        sys.exit(130)
    except Exception as err:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
