"""``dynres data synth`` (the built-in data set), ``dynres data photos`` (the real-photo development set) and
``dynres ingest`` (an image tree into a store)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynres._ui import console
from dynres.cli.options import path_text
from dynres.io.ingest import IngestConfig
from dynres.io.photos import GESTURES, PhotosConfig
from dynres.io.synth import CLASSES, SynthConfig

app = typer.Typer(no_args_is_help=True, help="Built-in datasets.")
SYNTH = SynthConfig()  # the defaults the help names; the command passes only the flags given


@app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Output folder: train/, val/ (ImageFolder) and objects.parquet."),
    classes: Optional[int] = typer.Option(
        None, help=f"Number of classes (default {SYNTH.classes}, at most {len(CLASSES)})."),
    per_class: Optional[int] = typer.Option(
        None, "--per-class", help=f"Training images per class (default {SYNTH.train_per_class})."),
    val_per_class: Optional[int] = typer.Option(
        None, help=f"Validation images per class (default {SYNTH.val_per_class})."),
    seed: Optional[int] = typer.Option(
        None, help=f"Seed; the same settings give byte-identical files (default {SYNTH.seed})."),
    min_size: Optional[int] = typer.Option(None, help=f"Smallest long image side in px (default {SYNTH.min_size})."),
    max_size: Optional[int] = typer.Option(None, help=f"Largest long image side in px (default {SYNTH.max_size})."),
    quality: Optional[int] = typer.Option(None, help=f"Baseline JPEG quality (default {SYNTH.jpeg_quality})."),
    workers: Optional[int] = typer.Option(
        None, help=f"Processes (default {SYNTH.workers}, 0: every core); output does not change."),
) -> None:
    """Generate the built-in data set: objects at scales varying > 6x on photo backgrounds, fine-detail classes."""
    from dynres.io.synth import synth

    given = {"classes": classes, "train_per_class": per_class, "val_per_class": val_per_class, "seed": seed,
             "min_size": min_size, "max_size": max_size, "jpeg_quality": quality, "workers": workers}
    report = synth(out, SynthConfig(**{k: v for k, v in given.items() if v is not None}), progress=True)
    console.print(f"wrote {report.images} images ({report.train} train, {report.val} val, {report.classes} classes) "
                  f"and {out / 'objects.parquet'} in {report.seconds:.1f} s ({report.images_per_s:.0f} images/s)",
                  soft_wrap=True, markup=False)


PHOTOS = PhotosConfig()


@app.command("photos")
def data_photos(
    out: Path = typer.Argument(..., help="Output folder: train/, val/ (ImageFolder) and objects.parquet."),
    classes: int = typer.Option(PHOTOS.classes, help=f"Number of classes (hand gestures, at most {len(GESTURES)})."),
    per_class: int = typer.Option(PHOTOS.train_per_class, "--per-class", help="Training images per class."),
    val_per_class: int = typer.Option(PHOTOS.val_per_class, help="Validation images per class."),
    seed: int = typer.Option(PHOTOS.seed, help="Seed; the same settings give byte-identical files."),
    min_size: int = typer.Option(PHOTOS.min_size, help="Smallest long image side in px."),
    max_size: int = typer.Option(PHOTOS.max_size, help="Largest long image side in px."),
    backgrounds: Optional[Path] = typer.Option(None, help="A folder of more background photos (JPEG/PNG)."),
    workers: int = typer.Option(PHOTOS.workers, help="Processes (0: every core); output does not change."),
) -> None:
    """Build the real-photo development set: colour emoji hand gestures (six skin tones each, so not told apart by
    colour) at random scales, positions and turns on real photographs; needs Debian's fonts-noto-color-emoji."""
    from dynres.io.photos import build_photos

    cfg = PhotosConfig(classes=classes, train_per_class=per_class, val_per_class=val_per_class, seed=seed,
                       min_size=min_size, max_size=max_size, backgrounds=path_text(backgrounds), workers=workers)
    report = build_photos(out, cfg, progress=True)
    console.print(f"wrote {report.images} images ({report.train} train, {report.val} val, {report.classes} classes) "
                  f"and {out / 'objects.parquet'} in {report.seconds:.1f} s", soft_wrap=True, markup=False)


def ingest(
    src: Path = typer.Argument(..., help="ImageFolder tree: SRC/<class>/<image> (JPEG, PNG, WebP, BMP, TIFF)."),
    store: Path = typer.Argument(..., help="Store directory to create or resume."),
    lossless: bool = typer.Option(IngestConfig.lossless, "--lossless/--reencode",
                                  help="Transcode JPEG sources losslessly (--reencode: re-encode every image)."),
    quality: int = typer.Option(IngestConfig.quality, help="JPEG quality (1-100) of re-encoded images."),
    max_side: Optional[int] = typer.Option(IngestConfig.max_side, "--max-side", help="Cap the long side (pixels)."),
    workers: int = typer.Option(IngestConfig.workers, help="Processes (0: every core, 1: no subprocesses)."),
    max_pixels: int = typer.Option(IngestConfig.max_pixels, "--max-pixels",
                                   help="Skip larger images as decompression bombs."),
    scans: Optional[Path] = typer.Option(None, "--scans", help="jpegtran scan-script file (needs `jpegtran`)."),
) -> None:
    """Store an image tree as progressive JPEGs + manifest.parquet: JPEGs transcoded losslessly, the rest re-encoded
    (resumable; re-encode reasons counted, skipped files listed)."""
    from rich.table import Table

    from dynres.io.ingest import ingest as run_ingest

    cfg = IngestConfig(lossless=lossless, quality=quality, max_side=max_side, workers=workers, max_pixels=max_pixels,
                       scans=path_text(scans))
    rep = run_ingest(src, store, cfg, progress=True)
    if rep.skipped:
        table = Table("skipped file", "reason", title=f"{len(rep.skipped)} skipped")
        for name, reason in rep.skipped:
            table.add_row(name, reason)
        console.print(table)
    console.print(f"{rep.images} images in {store} ({rep.ingested} encoded, {rep.reused} reused, "
                  f"{len(rep.skipped)} skipped) in {rep.seconds:.1f} s = {rep.images_per_s:.1f} images/s")
    reasons = "; ".join(f"{n} {rule}" for rule, n in rep.reasons.items())
    console.print(f"{rep.lossless} stored losslessly, {rep.images - rep.lossless} re-encoded"
                  f"{' (reasons: ' + reasons + ')' if reasons else ''}; the store is "
                  f"{rep.bytes / max(rep.source_bytes, 1):.3f}x the sources' bytes", soft_wrap=True, markup=False)
