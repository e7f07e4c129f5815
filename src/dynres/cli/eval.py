"""``dynres eval static`` (Table I: accuracy x GFLOPs per resolution and crop) and ``dynres eval dynamic`` (the
scale model against every static resolution and the oracle)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynres._ui import console
from dynres.cli.options import join, parse_list
from dynres.study.dynamic import DynamicConfig
from dynres.study.static import EvalConfig

app = typer.Typer(no_args_is_help=True, help="Static and dynamic accuracy vs GFLOPs.")


@app.command("static")
def eval_static_cmd(
    checkpoint: Path = typer.Argument(..., help="Backbone checkpoint (model.pt or its folder)."),
    store: str = typer.Argument(..., help="Evaluation store (directory or fsspec URL)."),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="static.json/.md + static_images.parquet."),
    grid: Optional[str] = typer.Option(None, help="Resolutions (default: the paper's ratios around train res)."),
    crops: str = typer.Option(join(EvalConfig.crops), help="Center-crop areas."),
    exact: bool = typer.Option(EvalConfig.exact, "--exact", help="Decode every view (default: one decode per image)."),
    limit: Optional[int] = typer.Option(EvalConfig.limit, help="Only the first N images."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Read calibrated prefixes (`dynres calibrate`)."),
    backend: str = typer.Option(EvalConfig.backend,
                                help="Run the model on 'ort' (ONNX Runtime), 'eager' PyTorch, or 'auto'."),
) -> None:
    """Top-1 accuracy and GFLOPs for every resolution x crop (Table I layout)."""
    from dynres.io.store import open_store
    from dynres.study.static import run_static

    scans = None
    if policy:
        from dynres.policy.calibration import load_policy

        scans = load_policy(policy)
    cfg = EvalConfig(parse_list(grid, int, "--grid"), parse_list(crops, float, "--crops"), exact=exact, limit=limit,
                     backend=backend)
    result = run_static(checkpoint, open_store(store), out, cfg, scans=scans)
    for row in result["best"]:
        console.print(f"crop {row['crop']:.2f}: best static {row['resolution']} px, {row['accuracy']:.1f}%")
    console.print(f"wrote {out / 'static.md'}")


@app.command("dynamic")
def eval_dynamic_cmd(
    backbone: Path = typer.Argument(..., help="Backbone trained on the full train set."),
    scale_model: Path = typer.Argument(..., help="Scale model checkpoint (from `dynres train scale`)."),
    store: str = typer.Argument(..., help="Evaluation store."),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="dynamic.json/.md/.png (reuses static results here)."),
    crops: str = typer.Option(join(EvalConfig.crops), help="Center-crop areas."),
    scans: Optional[int] = typer.Option(DynamicConfig.scans,
                                        help="Scans the scale model reads (default: its checkpoint's)."),
    cost_json: Optional[Path] = typer.Option(None, help="JSON {resolution: latency} for the cost-aware rule."),
    limit: Optional[int] = typer.Option(EvalConfig.limit, help="Only the first N images."),
) -> None:
    """Scale model + backbone vs every static resolution and the oracle; cost-aware λ sweep."""
    from dynres.io.store import open_store
    from dynres.study.dynamic import load_cost_table, run_dynamic

    cfg = DynamicConfig(scans=scans, cost_table=load_cost_table(cost_json) if cost_json else None)
    result = run_dynamic(backbone, scale_model, open_store(store), out, cfg,
                         EvalConfig(crops=parse_list(crops, float, "--crops"), limit=limit))
    for s in result["summary"]:
        savings = s["cost_aware_savings_pct"]
        console.print(f"crop {s['crop']:.2f}: best static {s['best_static_resolution']} px "
                      f"{s['best_static_accuracy']:.1f}% {s['best_static_gflops']:.3f} GF | dynamic "
                      f"{s['dynamic_accuracy']:.1f}% {s['dynamic_gflops']:.3f} GF | cost-aware λ={s['lambda']} "
                      f"{savings if savings is None else round(savings)}% fewer GF")
    console.print(f"wrote {out / 'dynamic.md'} and {out / 'dynamic.png'}")
