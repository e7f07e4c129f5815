"""The paper's whole study as a chain of cached stages: what `dynres demo` and `dynres run` execute.

Each stage records its inputs' hash and its outputs in ``RUN/stages/NAME.json``. Re-running skips a stage whose
inputs (its own settings plus the records of the stages it depends on) are unchanged, so an interrupted or
repeated run resumes where it stopped; changing a setting re-runs that stage and everything downstream.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dynres._ui import console, enabled
from dynres.records import machine_info
from dynres.version import __version__


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
    chain: Any = None  # dynres.accuracy.ChainConfig; None: the demo's preset
    calibration: Any = None  # dynres.calibrate.CalibrationConfig; None: its defaults

    @property
    def n_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(_by_content(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def _by_content(obj: Any) -> Any:
    """Weight files named by an ``init`` setting count by their content, not their path: the same demo run from
    another checkout (its bundled weights elsewhere) is the same run."""
    if isinstance(obj, dict):
        return {k: _weights_hash(v) if k == "init" and v else _by_content(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_by_content(v) for v in obj]
    return obj


def _weights_hash(path: Any) -> str:
    from dynres.errors import CheckpointError
    from dynres.model.checkpoint import checkpoint_digest

    try:
        return "sha256:" + checkpoint_digest(path)
    except CheckpointError:  # not there (yet): the stage will say so; its name is all there is to key on
        return str(path)


class Study:
    """Runs named stages in order, skipping those whose recorded inputs match."""

    def __init__(self, config: StudyConfig, total_stages: int):
        self.config = config
        self.dir = Path(config.out)
        self.records: dict[str, dict] = {}
        self.total = total_stages
        self.t0 = time.perf_counter()

    def stage(self, name: str, inputs: dict, fn: Callable[[], dict], after: tuple[str, ...] = ()) -> dict:
        key = _digest({"version": __version__, "inputs": inputs, "after": [self.records[a]["key"] for a in after]})
        path = self.dir / "stages" / f"{name}.json"
        n = len(self.records) + 1
        if path.exists() and not self.config.force:
            try:
                rec = json.loads(path.read_text())
            except json.JSONDecodeError:
                rec = {}
            if rec.get("key") == key:
                self.say(f"[{n}/{self.total}] {name}: up to date (cached {rec['seconds']:.1f} s)")
                self.records[name] = rec
                return rec["outputs"]
        self.say(f"[{n}/{self.total}] {name} …")
        t0 = time.perf_counter()
        outputs = fn()
        rec = {"name": name, "key": key, "inputs": inputs, "outputs": outputs, "seconds": time.perf_counter() - t0}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2, default=str))
        os.replace(tmp, path)
        self.records[name] = rec
        self.say(f"[{n}/{self.total}] {name}: done in {rec['seconds']:.1f} s")
        return outputs

    def say(self, msg: str, style: str = "bold cyan") -> None:
        if enabled():
            console.print(msg, style=style, markup=False, highlight=False)
        else:
            print(msg, flush=True)


def _read(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def run_study(config: StudyConfig) -> dict:
    """data → ingest → accuracy chain → quality index → calibration → kernels → pipeline → io → summary → report."""
    from dynres.io.ingest import IngestConfig, ingest
    from dynres.io.store import open_store

    out = Path(config.out)
    study = Study(config, total_stages=9)

    if config.data is None:
        from dynres.io.synth import PRETRAIN_SEED, SynthConfig, synth

        if config.seed == PRETRAIN_SEED:
            from dynres.errors import ConfigError

            raise ConfigError("seed", f"{PRETRAIN_SEED} made the images the demo's shipped weights were trained on; "
                                      "pick another seed")

        data_dir = out / "data"
        synth_cfg = SynthConfig(
            classes=config.size.classes, train_per_class=config.size.train_per_class,
            val_per_class=config.size.val_per_class, seed=config.seed, min_size=config.size.min_size,
            max_size=config.size.max_size, workers=config.n_workers,
        )

        def make_data() -> dict:
            rep = synth(data_dir, synth_cfg, progress=True)
            return {"data": str(data_dir), "images": rep.images, "images_per_s": rep.images_per_s}

        study.stage("data", {"synth": asdict(synth_cfg)}, make_data)
    else:
        study.stage("data", {"data": str(Path(config.data).resolve())}, lambda: {"data": str(config.data)})
    data_dir = Path(study.records["data"]["outputs"]["data"])

    def make_stores() -> dict:
        result = {}
        for split in ("train", "val"):
            rep = ingest(data_dir / split, out / "store" / split, IngestConfig(workers=config.n_workers))
            if rep.skipped:  # a few named here; every one in the store's ingest_report.json
                shown = "; ".join(f"{name}: {reason}" for name, reason in rep.skipped[:3])
                more = f"; {len(rep.skipped) - 3} more" if len(rep.skipped) > 3 else ""
                study.say(f"{split}: skipped {len(rep.skipped)} file(s) ({shown}{more}); all listed in "
                          f"{out / 'store' / split / 'ingest_report.json'}", style="yellow")
            result[split] = {"store": str(out / "store" / split), "ingested": rep.images,
                             "skipped": len(rep.skipped), "images_per_s": rep.images_per_s}
        return result

    stores = study.stage("ingest", {"workers": config.n_workers}, make_stores, after=("data",))
    train_store, val_store = open_store(stores["train"]["store"]), open_store(stores["val"]["store"])

    from dynres.study.chain import demo_config, run_accuracy_chain

    chain_cfg = config.chain or demo_config(quick=config.quick, seed=config.seed, pretrained=config.data is None)

    def accuracy() -> dict:
        return run_accuracy_chain(train_store, val_store, out / "accuracy", chain_cfg)

    acc = study.stage("accuracy", {"chain": asdict(chain_cfg)}, accuracy, after=("ingest",))
    dyn = _read(out / "accuracy" / "eval" / "dynamic.json")
    grid = tuple(dyn["grid"])
    scale_res = int(dyn["scale_resolution"])

    from dynres.policy.quality import QualityConfig, build_quality_index

    q_cfg = QualityConfig(resolutions=tuple(sorted({*grid, scale_res})), workers=config.n_workers)
    study.stage("quality", {"quality": asdict(q_cfg), "index": q_cfg.fingerprint()},  # index format included
                lambda: build_quality_index(val_store, q_cfg, progress=True), after=("ingest",))

    from dynres.study.calibrate import CalibrationConfig, calibrate, split_keys

    cal_cfg = config.calibration or CalibrationConfig()
    held = split_keys(val_store.keys, cal_cfg.holdout_fraction, cal_cfg.seed)[1]  # images calibration never sees

    def calibration() -> dict:
        rec = calibrate(val_store, acc["backbone"], out / "calibration", cal_cfg, scale_model=acc["scale_model"])
        return {"policy": rec["policy"], "json": str(out / "calibration" / "calibration.json")}

    cal = study.stage("calibration", {"calibration": asdict(cal_cfg)}, calibration, after=("accuracy", "quality"))

    from dynres.bench.kernels import run_and_report
    from dynres.bench.pipeline import PipelineBenchConfig, run_bench_pipeline
    from dynres.model.checkpoint import load_checkpoint
    from dynres.runtime.kernels import TuneConfig

    pipe_cfg = PipelineBenchConfig(workers=config.n_workers, images=200 if config.quick else 0)
    # the pipeline cuts batches down a ladder of sizes (full, 4, 1): every size gets tuned kernels
    from dynres.runtime.runners import batch_ladder

    batches = tuple(sorted(batch_ladder(pipe_cfg.batch_size)))
    tune_cfg = TuneConfig(resolutions=grid, batch_sizes=batches, runs=10 if config.quick else 20)

    def kernels() -> dict:
        models = {"backbone": load_checkpoint(acc["backbone"])[0]}
        scale_cfg = TuneConfig(resolutions=(scale_res,), batch_sizes=batches, runs=tune_cfg.runs)
        rec = run_and_report(models, tune_cfg, out / "kernels")
        rec_scale = run_and_report({"scale": load_checkpoint(acc["scale_model"])[0]}, scale_cfg,
                                   out / "kernels" / "scale")
        return {"json": str(out / "kernels" / "kernels.json"), "scale_json": str(rec_scale["paths"]["json"]),
                "gemm_gflops_per_s": rec["limits"]["gemm_gflops_per_s"]}

    kern = study.stage("kernels", {"tune": {k: v for k, v in asdict(tune_cfg).items() if k != "cache_dir"}},
                       kernels, after=("accuracy",))

    def pipeline() -> dict:
        run_bench_pipeline(stores["val"]["store"], acc["backbone"], acc["scale_model"], out / "pipeline",
                           policy=cal["policy"], cfg=pipe_cfg, keys=held)
        return {"json": str(out / "pipeline" / "pipeline.json")}

    pipe = study.stage("pipeline", {"pipeline": asdict(pipe_cfg)}, pipeline, after=("calibration", "kernels"))

    from dynres.bench.io import IOBenchConfig, run_bench_io

    io_cfg = IOBenchConfig(resolutions=grid, images=config.io_images, repeats=config.io_repeats)

    def io() -> dict:
        run_bench_io(stores["val"]["store"], out / "bench", io_cfg, src=data_dir / "val")
        return {"json": str(out / "bench" / "bench_io.json")}

    io_rec = study.stage("bench_io", {"io": asdict(io_cfg)}, io, after=("ingest",))

    samples = scale_choices(val_store, acc["scale_model"], cal["policy"], held[:: max(1, len(held) // 16)][:16])
    summary = assemble_summary(study, dyn, _read(cal["json"]), _read(kern["json"]), _read(kern["scale_json"]),
                               _read(pipe["json"]), _read(io_rec["json"]), samples)
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "summary.json")

    from dynres.report.document import build_report

    study.stage("report", {"summary": _digest(summary)}, lambda: {"html": str(build_report(out)[0])})
    return summary


def _kernel_rows(record: dict, model: str) -> list[dict]:
    rows = [r for r in record["rows"] if r.get("batch", 1) == 1 and r.get("latency_ms") is not None]
    return [{"model": model, "resolution": r["resolution"], "backend": r["backend"],
             "latency_ms": r["latency_ms"], "gflops_per_s": r.get("gflops_per_s")} for r in rows]


def assemble_summary(study: Study, dyn: dict, cal: dict, kern: dict, kern_scale: dict, pipe: dict, io: dict,
                     samples: list[dict]) -> dict:
    """The fixed summary schema (docs/summary-schema.md) from each stage's own records."""
    savings = {r["crop"]: r["read_savings"] for r in cal.get("dynamic", [])}
    dynamic = [{"crop": r["crop"], "accuracy": r["accuracy"], "gflops": r["gflops"],
                "read_savings": savings.get(r["crop"]), "lambda": r.get("lambda")}
               for r in dyn["dynamic"] + dyn.get("cost_aware", [])]
    calibration = [{k: r[k] for k in ("resolution", "crop", "acc_full", "acc_calibrated", "read_savings")}
                   for r in cal["calibration"]]
    return {
        "wall_s": time.perf_counter() - study.t0,
        "machine": machine_info(),
        "stages": {name: {"seconds": rec["seconds"], "outputs": rec["outputs"]} for name, rec in study.records.items()},
        "static": [{k: r[k] for k in ("crop", "resolution", "accuracy", "gflops")} for r in dyn["static"]],
        "dynamic": dynamic,
        "oracle": [{"crop": r["crop"], "accuracy": r["accuracy"]} for r in dyn["oracle"]],
        "dynamic_summary": dyn.get("summary", []),
        "calibration": calibration,
        "calibration_target": cal.get("target", 0.05),
        "calibration_sweep": cal.get("calibration_sweep", []),
        "kernels": _kernel_rows(kern, "backbone") + _kernel_rows(kern_scale, "scale"),
        "gemm_gflops_per_s": kern.get("limits", {}).get("gemm_gflops_per_s"),
        "pipeline": {m: {k: pipe["pipeline"][m].get(k) for k in
                         ("images_per_s", "accuracy", "bytes_per_image", "p50_ms", "p99_ms")}
                     for m in pipe["pipeline"]},
        "pipeline_ratios": pipe.get("ratios", {}),
        "io": {"decode": io["decode"], "bytes_per_scan": io["bytes_per_scan"], "ingest": io.get("ingest")},
        "samples": samples,
    }


def scale_choices(val_store, scale_model: str, policy_path: str, keys: list[str], crop: float = 0.75) -> list[dict]:
    """The scale model's pick for a few images, from exactly the prefix the policy lets it read (thumbnails)."""
    from dynres.model.checkpoint import load_checkpoint
    from dynres.policy.calibration import load_policy
    from dynres.study.dynamic import decide

    scale = load_checkpoint(scale_model)
    policy = load_policy(policy_path)
    rows = []
    for key in keys:
        prefix = val_store.read(key, scans=policy.scans(key, scale[1].train_resolution))
        resolution, _ = decide(scale, prefix, crop)
        rows.append({"key": key, "path": val_store.location(key), "resolution": int(resolution),
                     "class_name": val_store.classes[val_store.label(key)]})
    return rows


# --- `dynres run CONFIG`: the same stages on the user's data --------------------------------------------------

_SECTIONS = {"backbone", "scale", "eval", "dynamic", "calibration"}
_TOP = {"data", "out", "seed", "workers", "quick", "io_images", "io_repeats", *_SECTIONS}


def _accepts(tp: Any, value: Any) -> bool:
    """Does a TOML/YAML value (lists already tuples) fit the annotation ``tp``? ``float`` takes ints, ``int`` and
    ``float`` never take booleans, ``tuple[X, ...]`` checks its items."""
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in args)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if isinstance(value, bool) and tp in (int, float):
        return False
    if tp is float:
        return isinstance(value, (int, float))
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_accepts(args[0], v) for v in value)
        return not args or (len(args) == len(value) and all(_accepts(a, v) for a, v in zip(args, value)))
    if origin is not None:  # dict[...] and the like: the container's type only
        return isinstance(value, origin)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _override(obj, section: str, values: dict, source: str):
    """``dataclasses.replace`` that names the file and key of an unknown or ill-typed setting (checked against the
    field's annotation, so settings whose default is None are checked too)."""
    import dataclasses
    import typing

    from dynres.errors import ConfigError

    if not isinstance(values, dict):
        raise ConfigError(source, f"[{section}] must be a table of settings, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        if key not in known:
            raise ConfigError(source, f"unknown setting {section}.{key}; known: {', '.join(sorted(known))}")
        if isinstance(value, list):  # configs hold tuples (frozen, hashable)
            value = values[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        if not _accepts(hints[key], value):
            expected = str(hints[key]).replace("typing.", "") if typing.get_origin(hints[key]) else hints[key].__name__
            raise ConfigError(source, f"{section}.{key} must be {expected}, got {value!r}")
    return dataclasses.replace(obj, **values)


def load_study_config(path: str | Path) -> StudyConfig:
    """Read a TOML or YAML run file (see docs/run-config.md) into a validated :class:`StudyConfig`."""
    from dataclasses import replace

    from dynres.errors import ConfigError
    from dynres.study.chain import chain_grid, demo_config

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except OSError as err:
        raise ConfigError(path, f"cannot read config: {err.strerror}") from err
    except Exception as err:  # tomllib / yaml parse errors carry line numbers in their message
        raise ConfigError(path, f"not valid {'TOML' if path.suffix == '.toml' else 'YAML'}: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(path, "the config must be a mapping of settings")
    unknown = set(raw) - _TOP
    if unknown:
        raise ConfigError(path, f"unknown setting(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(_TOP))}")
    if "data" not in raw or "out" not in raw:
        raise ConfigError(path, "needs `data` (an ImageFolder root with train/ and val/) and `out` (run directory)")
    data = (path.parent / raw["data"]).resolve()
    for split in ("train", "val"):
        if not (data / split).is_dir():
            raise ConfigError(path, f"data: {data / split} is not a directory (expected DATA/train and DATA/val)")
    seed = int(raw.get("seed", 0))
    chain = demo_config(quick=bool(raw.get("quick", False)), seed=seed)
    backbone = _override(chain.backbone, "backbone", dict(raw.get("backbone", {})), str(path))
    scale = _override(replace(chain.scale, backbone=backbone), "scale", dict(raw.get("scale", {})), str(path))
    chain = replace(chain, backbone=backbone, scale=scale,
                    eval=_override(chain.eval, "eval", dict(raw.get("eval", {})), str(path)),
                    dynamic=_override(chain.dynamic, "dynamic", dict(raw.get("dynamic", {})), str(path)))
    from dynres.study.calibrate import CalibrationConfig

    calibration = _override(CalibrationConfig(), "calibration", dict(raw.get("calibration", {})), str(path))
    for section, sub in (("backbone", chain.backbone), ("scale", chain.scale), ("eval", chain.eval),
                         ("calibration", calibration)):
        try:
            sub.check()
        except ConfigError as err:  # the dataclasses know the setting, not the file it came from
            raise ConfigError(path, f"[{section}] {err}") from None
    try:
        chain_grid(chain)
    except ConfigError as err:
        raise ConfigError(path, err.reason) from None
    return StudyConfig(out=(path.parent / raw["out"]).resolve(), data=data, seed=seed,
                       workers=int(raw.get("workers", 0)), quick=bool(raw.get("quick", False)),
                       io_images=int(raw.get("io_images", 64)), io_repeats=int(raw.get("io_repeats", 3)), chain=chain,
                       calibration=calibration)
