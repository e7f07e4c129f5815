"""``dynres index quality`` (the SSIM index beside a store) and ``dynres calibrate`` (the read policy from it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from dynres._ui import console
from dynres.errors import ConfigError
from dynres.cli.options import join, parse_list
from dynres.policy.quality import QualityConfig
from dynres.study.calibrate import CalibrationConfig

index_app = typer.Typer(no_args_is_help=True, help="Per-image indexes stored beside a store's manifest.")


@index_app.command("quality")
def index_quality_cmd(
    store: str = typer.Argument(..., help="Store directory or fsspec URL."),
    resolutions: str = typer.Option(join(QualityConfig.resolutions),
                                    help="Comma-separated resolutions (the backbone grid and the scale model's)."),
    crop_side: float = typer.Option(QualityConfig.crop_side, "--crop",
                                    help="Center-crop side ratio of the compared views."),
    workers: int = typer.Option(QualityConfig.workers, help="Threads (0: every core)."),
    out: Path = typer.Option(Path("runs/index"), "--out", help="Where quality_index.json/.md go."),
    calibration_only: bool = typer.Option(False, "--calibration-only", help="Only the images `dynres calibrate` "
                                          "searches on (its hashed split at --holdout and --seed); calibrate adds "
                                          "the rest if it chooses an SSIM rule."),
    holdout: float = typer.Option(CalibrationConfig.holdout_fraction, help="With --calibration-only: the "
                                  "held-out share calibrate will use."),
    seed: int = typer.Option(CalibrationConfig.seed, help="With --calibration-only: calibrate's split seed."),
    max_images: int = typer.Option(CalibrationConfig.max_images, help="With --calibration-only: calibrate's "
                                   "--max-images."),
    separate: bool = typer.Option(False, "--separate", help="With --calibration-only: STORE is a separate "
                                  "calibration store (calibrate --calib-store): all of it, up to --max-images."),
) -> None:
    """SSIM of every scan prefix vs the full file, per image and resolution → STORE/quality.parquet (resumable)."""
    from dynres.io.store import open_store
    from dynres.policy.quality import build_quality_index, write_quality_record
    from dynres.study.calibrate import calibration_keys

    cfg = QualityConfig(parse_list(resolutions, int, "--resolutions"), crop_side, workers)
    keys = None
    if calibration_only:
        split = CalibrationConfig(holdout_fraction=holdout, seed=seed, max_images=max_images)
        keys = calibration_keys(open_store(store).keys, split, separate=separate)[0]
    rep = build_quality_index(store, cfg, keys=keys)
    write_quality_record(rep, out)
    cost = rep["ms_per_image_per_resolution"]
    console.print(f"indexed {rep['computed']} images ({rep['reused']} reused) in {rep['seconds']:.1f} s; per image "
                  f"per resolution: decode {cost['decode']:.1f} ms, SSIM {cost['ssim']:.1f} ms (one core)")
    console.print(f"wrote {rep['index']} and {out / 'quality_index.json'}")


def calibrate(
    store: str = typer.Argument(..., help="Store (with a quality index) the policy is for."),
    model: Path = typer.Option(..., "--model", help="Backbone checkpoint."),
    out: Path = typer.Option(Path("runs/calibrate"), "--out", help="Records: calibration.json/.md + Figure 6 PNG."),
    policy: Optional[Path] = typer.Option(None, "--policy", help="Policy file (default OUT/policy.json)."),
    calib_store: Optional[str] = typer.Option(
        None, "--calib-store", help="Calibrate on this store (images the backbone never trained on: not its training "
                                    "store); all of STORE is held out."),
    target: float = typer.Option(CalibrationConfig.target, help="Max accuracy loss (points) vs reading every scan."),
    delta: float = typer.Option(CalibrationConfig.delta,
                                help="The loss bound holds at confidence 1 - delta; 0: point estimates, no bound."),
    criterion: str = typer.Option(CalibrationConfig.criterion,
                                  help="net (accuracy drop), lost (answers lost) or flips (label-free)."),
    families: str = typer.Option(join(CalibrationConfig.families), help="Policy families searched: count, ssim."),
    judges: Optional[Path] = typer.Option(
        None, "--judges", help="A scale stage's scale.json: its shard backbones judge the training images they did "
                               "not see (needs --train-store)."),
    train_store: Optional[str] = typer.Option(None, "--train-store", help="The store the shard backbones split."),
    judge_images: int = typer.Option(CalibrationConfig.judge_images, help="Shard-judged images at most."),
    max_images: int = typer.Option(CalibrationConfig.max_images, help="Calibration images at most."),
    holdout: float = typer.Option(CalibrationConfig.holdout_fraction,
                                  help="Share of STORE held out for the report (without --calib-store)."),
    resolutions: Optional[str] = typer.Option(None, help="Comma-separated (default: every indexed resolution)."),
    crops: str = typer.Option(join(CalibrationConfig.crops),
                              help="Crop areas of the held-out table (index crop added)."),
    search_crops: Optional[str] = typer.Option(
        None, help="Crop areas whose lost answers the search also holds to the target (default: the index's only)."),
    batch_size: int = typer.Option(CalibrationConfig.batch_size, help="Inference batch size."),
    seed: int = typer.Option(CalibrationConfig.seed, help="Seed of the hashed split and of the calibration sample."),
    scale_model: Optional[Path] = typer.Option(None, "--scale-model",
                                               help="Also measure the dynamic pipeline (Table III/IV dynamic row)."),
    backend: str = typer.Option(CalibrationConfig.backend,
                                help="Run the model on 'ort' (ONNX Runtime), 'eager' PyTorch, or 'auto'."),
    static_eval: Optional[Path] = typer.Option(
        None, "--static-eval", help="static.json of this model's `dynres eval static` on STORE: the held-out table "
                                    "takes its full reads from it where they are the same predictions."),
) -> None:
    """Certify a read rule per resolution (scan count or SSIM threshold); save the policy; Table III/IV + Figure 6."""
    from dynres.io.store import open_store
    from dynres.policy.calibration import ReadRule
    from dynres.study.calibrate import calibrate as run_calibration
    from dynres.study.calibrate import judges_from_record

    if (judges is None) != (train_store is None):
        raise ConfigError("--judges", "--judges and --train-store go together")
    cfg = CalibrationConfig(target=target, delta=delta, criterion=criterion, judge_images=judge_images,
                            families=parse_list(families, str, "--families"),
                            max_images=max_images, holdout_fraction=holdout, seed=seed,
                            resolutions=parse_list(resolutions, int, "--resolutions"),
                            crops=parse_list(crops, float, "--crops"),
                            search_crops=parse_list(search_crops, float, "--search-crops") or (),
                            batch_size=batch_size, backend=backend)
    shard = judges_from_record(open_store(train_store), judges) if judges is not None else []
    rec = run_calibration(open_store(store), model, out, cfg, open_store(calib_store) if calib_store else None,
                          policy, scale_model, judges=shard, static_eval=static_eval)
    for s in rec["search"]:
        what = "measured loss (no bound: --delta 0)" if rec["delta"] is None else f"{1 - rec['delta']:.0%} loss bound"
        bound = "" if s["bound"] is None else f", {what} {s['bound']:.3f} points"
        console.print(f"{s['resolution']:>4}px  {ReadRule(**s['rule']).label()}{bound}")
    sm = rec["summary"]
    console.print(f"held-out: best resolution {sm['best_resolution']} saves {sm['best_read_savings']:.1%} of bytes; "
                  f"max loss {sm['max_loss']:.3f} points; {sm['cells_over_target']}/{sm['cells']} cells over target")
    if "dynamic_read_savings" in sm:
        console.print(f"dynamic pipeline: read savings {sm['dynamic_read_savings']:.1%} (scale model's read included), "
                      f"loss {sm['dynamic_loss']:.3f} points")
    console.print(f"wrote {rec['policy']} and {out / 'calibration.md'}")
