"""``dynres layout``: score candidate scan layouts by the backbone's accuracy per byte on a sample; the chosen script
is then applied with ``dynres ingest SRC STORE --scans DIR/layout.scans``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynres._ui import console
from dynres.cli.options import join, parse_list
from dynres.io.layout import CANDIDATES
from dynres.study.layout import LayoutConfig


def layout(
    source: str = typer.Argument(..., help="A store (directory or fsspec URL) or an ImageFolder tree to sample."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint (model.pt + model.json)."),
    out: Path = typer.Option(Path("runs/layout"), "--out", help="Where layout.json/.md, the figure and the chosen "
                             "script (layout.scans) go."),
    resolutions: Optional[str] = typer.Option(None, help="Resolution grid, e.g. '56..224:28' (default: 0.5x..2x of "
                                              "the checkpoint's train resolution)."),
    sample: int = typer.Option(LayoutConfig.sample, help="Images sampled (half select, half confirm)."),
    crop: float = typer.Option(LayoutConfig.crop, help="Center-crop area fraction of every view."),
    candidates: str = typer.Option(join(LayoutConfig.candidates), help="Candidate names or scan-script files "
                                   f"(known: {', '.join(CANDIDATES)}); libjpeg's default is always scored."),
    tolerance: float = typer.Option(LayoutConfig.tolerance, help="Top-1 points below the full read that count as "
                                    "its accuracy."),
    seed: int = typer.Option(LayoutConfig.seed, help="Seed of the sample and of its split into halves."),
    workers: int = typer.Option(LayoutConfig.workers, help="Ingest processes per candidate (0: every core)."),
    backend: str = typer.Option(LayoutConfig.backend, help="auto, ort or eager."),
) -> None:
    """Choose a scan layout by the backbone's accuracy per byte (keeps libjpeg's default unless a candidate
    dominates it on held-out images)."""
    from dynres.study.layout import fewest_table, run_layout

    cfg = LayoutConfig(grid=parse_list(resolutions, int, "--resolutions"), crop=crop, sample=sample,
                       candidates=parse_list(candidates, str, "--candidates") or (), tolerance=tolerance, seed=seed,
                       workers=workers, backend=backend)
    payload = run_layout(source, model, out, cfg)
    console.print(fewest_table(payload), markup=False)
    console.print(f"chosen: {payload['chosen']} ({payload['reason']}); script {payload['script_file']}",
                  markup=False)
    console.print(f"wrote {out / 'layout.json'} and {out / 'layout.md'}")
