"""The paper's whole study as a chain of cached stages: what `dynres demo` and `dynres run` execute.

data → ingest → accuracy chain → quality index → calibration → guard → kernels → pipeline → I/O benchmark → summary →
report. Each stage is one function below: it computes through the library, and :class:`~dynres.study.stages.Study`
records its outputs (or reuses them when its inputs are unchanged); the summary and the report are rendered from
those records.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dynres.errors import ConfigError
from dynres.io.store import StoreLike, open_store
from dynres.study.stages import Study, digest, read_json, store_key, write_json
from dynres.study.summary import assemble_summary, scale_choices, study_settings

STAGES = 9  # data, ingest, accuracy, quality, calibration, kernels, pipeline, bench_io, report
# the pipeline stage decides what is served on images/s too: where the dynamic and static rows are within 10% after
# 3 timed rounds, it times up to 9 (sub-second runs on two cores spread by ±6%; docs/real-photos.md, session 14)
STUDY_MAX_REPEATS = 9


@dataclass(frozen=True)
class DemoSize:
    """How much built-in data the demo generates; ``quick`` trades statistical power for a short run."""

    classes: int = 10
    train_per_class: int = 240
    val_per_class: int = 60
    min_size: int = 300
    max_size: int = 800


FULL = DemoSize()
QUICK = DemoSize(train_per_class=80, val_per_class=30, min_size=300, max_size=640)


@dataclass(frozen=True)
class StudyConfig:
    out: Path
    data: Path | None = None  # ImageFolder root with train/ and val/; None: the built-in synthetic data set
    size: DemoSize = FULL
    seed: int = 0
    workers: int = 0  # 0: every usable core
    io_images: int = 64
    io_repeats: int = 3
    quick: bool = False
    force: bool = False
    chain: Any = None  # dynres.study.chain.ChainConfig; None: the demo's preset (demo_config)
    calibration: Any = None  # dynres.study.calibrate.CalibrationConfig; None: its defaults
    # the settings a run file set ("seed", "scale.folds", ...): recorded as the file's, the rest as preset/default
    file_settings: tuple[str, ...] = ()

    @property
    def n_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


def demo_study_config(out: Path, *, quick: bool = False, seed: int = 0, workers: int = 0,
                      force: bool = False) -> StudyConfig:
    """``dynres demo``'s settings: the built-in data at :data:`FULL` size, or at :data:`QUICK` size with a smaller
    I/O benchmark sample (a few minutes in all)."""
    io = {"io_images": 32, "io_repeats": 1} if quick else {}
    return StudyConfig(out=out, size=QUICK if quick else FULL, seed=seed, workers=workers, force=force, quick=quick,
                       **io)


def run_study(config: StudyConfig) -> dict:
    """Run (or resume) every stage under ``config.out``; writes ``summary.json`` and the report, returns the
    summary."""
    from dynres.study.calibrate import CalibrationConfig, calibration_keys, split_keys
    from dynres.study.chain import demo_config

    out = Path(config.out)
    study = Study(out, total_stages=STAGES, force=config.force)
    run_config = write_json(out / "run_config.json", study_settings(config))  # before anything runs
    data_dir = data_stage(study, config)
    stores = ingest_stage(study, config, data_dir)
    train_store, val_store = open_store(stores["train"]["store"]), open_store(stores["val"]["store"])
    check_same_classes(train_store, val_store, data_dir)
    chain_cfg = config.chain or demo_config(quick=config.quick, seed=config.seed, pretrained=config.data is None)
    acc = accuracy_stage(study, train_store, val_store, chain_cfg)
    dyn = read_json(out / "accuracy" / "eval" / "dynamic.json")
    dyn.setdefault("tolerance", chain_cfg.dynamic.tolerance)  # records from before the key: the stage's setting
    grid, scale_res = tuple(dyn["grid"]), int(dyn["scale_resolution"])
    cal_cfg = config.calibration or CalibrationConfig()
    quality_stage(study, config, val_store, grid, scale_res, calibration_keys(val_store.keys, cal_cfg)[0])
    held = split_keys(val_store.keys, cal_cfg.holdout_fraction, cal_cfg.seed)[1]  # images calibration never sees
    cal = calibration_stage(study, val_store, train_store, acc, cal_cfg)
    guard = guard_step(study, chain_cfg, val_store, acc, dyn, held, train_store)  # before the pipeline: r*, λ*
    pipe_cfg = _pipeline_config(config, chain_cfg.dynamic.tolerance, guard, chain_cfg.dynamic.lambdas)
    kern = kernels_stage(study, config, acc, grid, scale_res, pipe_cfg.batch_size)
    pipe = pipeline_stage(study, stores["val"]["store"], acc, cal, pipe_cfg, held)
    io = io_stage(study, config, stores["val"]["store"], data_dir, grid)
    verdict = verdict_step(study, guard, stores["val"]["store"], acc, cal, pipe)

    samples = scale_choices(val_store, acc["scale_model"], cal["policy"], held[:: max(1, len(held) // 16)][:16])
    summary = assemble_summary(study, dyn, read_json(cal["json"]), read_json(kern["json"]),
                               read_json(kern["scale_json"]), read_json(pipe["json"]), read_json(io["json"]), samples,
                               verdict=verdict, run_config=read_json(run_config))
    write_json(out / "summary.json", summary)
    report_stage(study, summary)
    return summary


# --- the stages, in order -------------------------------------------------------------------------------------


def data_stage(study: Study, config: StudyConfig) -> Path:
    """The ImageFolder root with train/ and val/: the user's, or the built-in synthetic set generated here."""
    if config.data is not None:
        root = Path(config.data).resolve()
        study.stage("data", {"data": str(root), "files": data_listing(root)}, lambda: {"data": str(config.data)})
        return Path(study.records["data"]["outputs"]["data"])
    from dynres.io.synth import PRETRAIN_SEED, SynthConfig, synth

    if config.seed == PRETRAIN_SEED:
        raise ConfigError("seed", f"{PRETRAIN_SEED} made the images the demo's shipped weights were trained on; "
                                  "pick another seed")
    data_dir = study.dir / "data"
    synth_cfg = SynthConfig(
        classes=config.size.classes, train_per_class=config.size.train_per_class,
        val_per_class=config.size.val_per_class, seed=config.seed, min_size=config.size.min_size,
        max_size=config.size.max_size, workers=config.n_workers,
    )

    def make_data() -> dict:
        rep = synth(data_dir, synth_cfg, progress=True)
        return {"data": str(data_dir), "images": rep.images, "images_per_s": rep.images_per_s}

    study.stage("data", {"synth": asdict(synth_cfg)}, make_data)
    return Path(study.records["data"]["outputs"]["data"])


def data_listing(root: Path) -> str:
    """What a user's data folder is keyed on: the sources ingest would store from train/ and val/ (links followed
    as ingest follows them), by path, size and modification time (what ingest's resume compares), and what it would
    skip, so that an image added, removed or edited re-runs ingest. Later stages key on the stores' contents
    (:func:`~dynres.study.stages.store_key`), so a file merely touched costs a quick ingest, no training."""
    from dynres.io.sources import plan

    h = hashlib.sha256()
    for split in ("train", "val"):
        classes, tasks, skipped = plan(root / split)
        h.update(json.dumps([split, classes, [(t.source, t.source_size, t.source_mtime_ns) for t in tasks],
                             skipped]).encode())
    return h.hexdigest()[:16]


def check_same_classes(train: StoreLike, val: StoreLike, data_dir: Path) -> None:
    """Refuse, before any training, splits that name different classes: the backbone learns train/'s, and
    val/'s labels are indices into val/'s own list."""
    if list(train.classes) == list(val.classes):
        return
    only = {split: sorted(set(a) - set(b)) for split, a, b in (("train/", train.classes, val.classes),
                                                              ("val/", val.classes, train.classes))}
    raise ConfigError(data_dir, "train/ and val/ must hold the same class folders; "
                      + "; ".join(f"only in {split}: {', '.join(names)}" for split, names in only.items() if names))


def ingest_stage(study: Study, config: StudyConfig, data_dir: Path) -> dict:
    """One store per split under ``RUN/store``; skipped files are named (a few here, all in ingest_report.json)."""
    from dynres.io.ingest import IngestConfig, ingest

    def make_stores() -> dict:
        result = {}
        for split in ("train", "val"):
            store = study.dir / "store" / split
            rep = ingest(data_dir / split, store, IngestConfig(workers=config.n_workers))
            if rep.skipped:
                shown = "; ".join(f"{name}: {reason}" for name, reason in rep.skipped[:3])
                more = f"; {len(rep.skipped) - 3} more" if len(rep.skipped) > 3 else ""
                study.say(f"{split}: skipped {len(rep.skipped)} file(s) ({shown}{more}); all listed in "
                          f"{store / 'ingest_report.json'}", style="yellow")
            result[split] = {"store": str(store), "ingested": rep.images, "skipped": len(rep.skipped),
                             "images_per_s": rep.images_per_s}
        return result

    # what decides the stored bytes, not how many processes made them
    return study.stage("ingest", {"ingest": IngestConfig().fingerprint()}, make_stores, after=("data",))


def accuracy_stage(study: Study, train_store: StoreLike, val_store: StoreLike, chain_cfg: Any) -> dict:
    """Backbone, static grid, scale labels and model, dynamic evaluation (:mod:`dynres.study.chain`)."""
    from dynres.study.chain import chain_settings, run_accuracy_chain

    return study.stage("accuracy", {"chain": chain_settings(chain_cfg), "stores": store_key(train_store, val_store)},
                       lambda: run_accuracy_chain(train_store, val_store, study.dir / "accuracy", chain_cfg))


def quality_stage(study: Study, config: StudyConfig, val_store: StoreLike, grid: tuple[int, ...],
                  scale_res: int, keys: list[str]) -> dict:
    """The quality index of the validation store's calibration images (``keys``) at the grid and the scale
    model's resolution: the SSIM search looks at nothing else, and calibration extends the index to the other
    images only if it certifies an SSIM rule."""
    from dynres.policy.quality import QualityConfig, build_quality_index

    q_cfg = QualityConfig(resolutions=tuple(sorted({*grid, scale_res})), workers=config.n_workers)
    inputs = {"quality": {k: v for k, v in asdict(q_cfg).items() if k != "workers"},
              "index": q_cfg.fingerprint(), "keys": digest(keys), "store": store_key(val_store)}  # index format too
    return study.stage("quality", inputs, lambda: build_quality_index(val_store, q_cfg, progress=True, keys=keys))


def calibration_stage(study: Study, val_store: StoreLike, train_store: StoreLike, acc: dict, cal_cfg: Any) -> dict:
    """The read policy, calibrated on the validation store's hashed calibration split and on the training images
    the chain's shard backbones did not see."""
    from dynres.errors import ConfigError
    from dynres.study.calibrate import calibrate, judges_from_record

    out = study.dir / "calibration"

    def calibration() -> dict:
        judges = []
        if cal_cfg.judge_images:
            try:
                judges = judges_from_record(train_store, acc["scale"])
            except ConfigError as err:  # scale labels given from a file: no shard backbones to judge with
                study.say(f"calibration without shard judges: {err}", style="yellow")
        rec = calibrate(val_store, acc["backbone"], out, cal_cfg, scale_model=acc["scale_model"], judges=judges,
                        static_eval=acc["static"])
        return {"policy": rec["policy"], "json": str(out / "calibration.json")}

    return study.stage("calibration", {"calibration": asdict(cal_cfg)}, calibration, after=("accuracy", "quality"))


def _pipeline_config(config: StudyConfig, tolerance: float, guard: dict, lambdas: Any) -> Any:
    """The pipeline benchmark's settings: the guard's crop, r* and λ* (chosen on the selection split, so nothing
    is chosen on the held-out images it times: :func:`dynres.study.verdict.pipeline_point`); its tolerance (which
    dynamic variant the ratios use) is the run's ``[dynamic] tolerance``; close rows are timed longer
    (:data:`STUDY_MAX_REPEATS`)."""
    from dynres.bench.pipeline import PipelineBenchConfig
    from dynres.study.verdict import pipeline_point

    return PipelineBenchConfig(workers=config.n_workers, images=200 if config.quick else 0, tolerance=tolerance,
                               max_repeats=STUDY_MAX_REPEATS, **pipeline_point(guard, lambdas))


def kernels_stage(study: Study, config: StudyConfig, acc: dict, grid: tuple[int, ...], scale_res: int,
                  batch_size: int) -> dict:
    """Tuned kernels for the backbone over the grid and for the scale model at its resolution, at every batch size
    the pipeline cuts its batches into (:func:`~dynres.runtime.runners.batch_ladder`)."""
    from dynres.bench.kernels import run_bench_kernels
    from dynres.model.checkpoint import load_checkpoint
    from dynres.runtime.kernels import TuneConfig
    from dynres.runtime.runners import batch_ladder

    out = study.dir / "kernels"
    batches = tuple(sorted(batch_ladder(batch_size)))
    tune_cfg = TuneConfig(resolutions=grid, batch_sizes=batches, runs=10 if config.quick else 20)

    def kernels() -> dict:
        models = {"backbone": load_checkpoint(acc["backbone"])[0]}
        scale_cfg = TuneConfig(resolutions=(scale_res,), batch_sizes=batches, runs=tune_cfg.runs)
        rec = run_bench_kernels(models, tune_cfg, out)
        rec_scale = run_bench_kernels({"scale": load_checkpoint(acc["scale_model"])[0]}, scale_cfg, out / "scale")
        return {"json": str(out / "kernels.json"), "scale_json": str(rec_scale["paths"]["json"]),
                "gemm_gflops_per_s": rec["limits"]["gemm_gflops_per_s"]}

    return study.stage("kernels", {"tune": {k: v for k, v in asdict(tune_cfg).items() if k != "cache_dir"}},
                       kernels, after=("accuracy",))


def pipeline_stage(study: Study, store_path: str, acc: dict, cal: dict, pipe_cfg: Any, held: list[str]) -> dict:
    """The pipeline benchmark on the images calibration never saw, at the guard's crop, r* and λ* (``pipe_cfg``)."""
    from dynres.bench.pipeline import run_bench_pipeline

    out = study.dir / "pipeline"

    def pipeline() -> dict:
        run_bench_pipeline(store_path, acc["backbone"], acc["scale_model"], out, policy=cal["policy"], cfg=pipe_cfg,
                           keys=held)
        return {"json": str(out / "pipeline.json")}

    return study.stage("pipeline", {"pipeline": asdict(pipe_cfg)}, pipeline, after=("calibration", "kernels"))


def io_stage(study: Study, config: StudyConfig, store_path: str, data_dir: Path, grid: tuple[int, ...]) -> dict:
    """The I/O benchmark (decode per resolution, bytes per scan) of the validation store."""
    from dynres.bench.io import IOBenchConfig, run_bench_io

    io_cfg = IOBenchConfig(resolutions=grid, images=config.io_images, repeats=config.io_repeats)
    out = study.dir / "bench"

    def io() -> dict:
        run_bench_io(store_path, out, io_cfg, src=data_dir / "val")
        return {"json": str(out / "bench_io.json")}

    return study.stage("bench_io", {"io": asdict(io_cfg)}, io, after=("ingest",))


def guard_step(study: Study, chain_cfg: Any, val_store: StoreLike, acc: dict, dyn: dict, held: list[str],
               train_store: StoreLike | None = None) -> dict:
    """The guard (:mod:`dynres.study.verdict`): per crop, dynamic or the best static resolution, chosen on the
    selection split and decided on ``held``, each mode on its own engine's views (:func:`engine_views`). Not a
    stage: it reads the accuracy stage's records (a dynamic record from before the guard gets its per-image p(r)
    computed once); it runs before the pipeline stage, which times its r* and λ*; the biased rules of
    ``chain_cfg.dynamic.rules`` are fitted on ``train_store``'s labels."""
    from dataclasses import replace

    from dynres.model.checkpoint import read_meta
    from dynres.study.bias import guard_rules
    from dynres.study.dynamic import PROBS_FILE, dynamic_record
    from dynres.study.health import split_duplicates
    from dynres.study.verdict import run_guard

    eval_dir = study.dir / "accuracy" / "eval"
    if not (eval_dir / PROBS_FILE).is_file():
        dynamic_record(acc["backbone"], acc["scale_model"], val_store, eval_dir, replace(chain_cfg.dynamic, plot=False),
                       replace(chain_cfg.eval, grid=tuple(dyn["grid"])), probs_path=eval_dir / PROBS_FILE)
    baseline = read_meta(acc["backbone"]).train_resolution  # the pipeline's common baseline
    views = engine_views(eval_dir, acc["backbone"], val_store, dyn.get("scale_scans"), chain_cfg.eval.batch_size)
    return run_guard(eval_dir, dyn, held, chain_cfg.dynamic.lambdas, baseline,
                     **guard_rules(study.dir / "accuracy", chain_cfg.dynamic, train_store), views=views,
                     classes=len(val_store.classes), labels=study.dir / "accuracy" / "scale" / "scale_labels.parquet",
                     recalibrate=chain_cfg.dynamic.recalibrate,
                     duplicates=None if train_store is None else split_duplicates(train_store, val_store))


def engine_views(eval_dir: Path, backbone: str, val_store: StoreLike, scale_scans: int | None, batch_size: int) -> Any:
    """Which tables hold each engine's views (:class:`~dynres.study.verdict.EngineViews`): the static engine
    decodes each view at its own DCT scale; the dynamic engine resizes its backbone view from the scale prefix's one
    decode when that prefix is the whole file (the guard judges full reads), else it reads the rest and decodes it
    as the static engine does. A table the evaluation did not make is made once beside it."""
    from dynres.study.static import views_table
    from dynres.study.verdict import EngineViews

    keys = val_store.keys
    short = () if scale_scans is None else (k for k in keys if scale_scans < val_store.num_scans(k))
    exact_keys = frozenset(short)
    static = views_table(eval_dir, backbone, val_store, True, batch_size)
    dynamic = static if len(exact_keys) == len(keys) else views_table(eval_dir, backbone, val_store, False, batch_size)
    return EngineViews(static, dynamic, exact_keys)


def verdict_step(study: Study, guard: dict, store_path: str, acc: dict, cal: dict, pipe: dict) -> dict:
    """The verdict: the guard, what the pipeline stage serves (:func:`~dynres.study.verdict.served_pipeline`) and
    ``RUN/serving.json`` for `dynres infer` / `serve`; also ``RUN/verdict.json``."""
    from dynres.study.verdict import SERVING_FILE, served_pipeline, serving_config

    serving = serving_config(guard, store_path, acc["backbone"], acc["scale_model"], cal["policy"])
    path = write_json(study.dir / SERVING_FILE, serving)
    verdict = guard | {"pipeline": served_pipeline(guard, read_json(pipe["json"])), "serving": str(path),
                       "default_serving": {k: serving["default"][k] for k in ("crop", "mode", "infer", "serve")}}
    write_json(study.dir / "verdict.json", verdict)
    for warning in (guard.get("health") or {}).get("warnings", []):
        study.say(f"warning: {warning}", style="bold yellow")
    modes = ", ".join(f"{r['crop']:g}: {r['mode']}" + (f" @{r['static_resolution']}" if r["mode"] == "static" else
                                                       f" λ={r['lambda']:g}") for r in guard["crops"])
    study.say(f"verdict (per crop: chosen on {guard['selection_images']} images, decided on "
              f"{guard['held_out_images']} held out): {modes}; pipeline serves {verdict['pipeline']['served']}; "
              f"serving config {path}", style="bold")
    return verdict


def report_stage(study: Study, summary: dict) -> dict:
    """``report.html`` and ``report.md`` rendered from ``summary.json``."""
    from dynres.report.document import build_report

    return study.stage("report", {"summary": digest(summary)}, lambda: {"html": str(build_report(study.dir)[0])})
