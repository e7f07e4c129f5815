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

from dynres import __version__
from dynres._ui import console, enabled
from dynres.records import machine_info


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
    force: bool = False

    @property
    def n_workers(self) -> int:
        return self.workers or len(os.sched_getaffinity(0))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
                self._say(f"[{n}/{self.total}] {name}: up to date (cached {rec['seconds']:.1f} s)")
                self.records[name] = rec
                return rec["outputs"]
        self._say(f"[{n}/{self.total}] {name} …")
        t0 = time.perf_counter()
        outputs = fn()
        rec = {"name": name, "key": key, "inputs": inputs, "outputs": outputs, "seconds": time.perf_counter() - t0}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=2, default=str))
        os.replace(tmp, path)
        self.records[name] = rec
        self._say(f"[{n}/{self.total}] {name}: done in {rec['seconds']:.1f} s")
        return outputs

    def _say(self, msg: str) -> None:
        if enabled():
            console.print(f"[bold cyan]{msg}[/bold cyan]")
        else:
            print(msg, flush=True)


def run_study(config: StudyConfig) -> dict:
    """synth → ingest → bench io (grows with the later stages). Returns the summary record."""
    from dynres.bench import IOBenchConfig, run_bench_io
    from dynres.store import IngestConfig, ingest

    out = Path(config.out)
    study = Study(config, total_stages=3)

    if config.data is None:
        from dynres.synth import SynthConfig, synth

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
            result[split] = {"store": str(out / "store" / split), "ingested": rep.ingested,
                             "skipped": len(rep.skipped), "images_per_s": rep.images_per_s}
        return result

    stores = study.stage("ingest", {"workers": config.n_workers}, make_stores, after=("data",))

    io_cfg = IOBenchConfig(images=config.io_images, repeats=config.io_repeats)

    def io() -> dict:
        res = run_bench_io(stores["val"]["store"], out / "bench", io_cfg, src=data_dir / "val")
        return {"json": str(out / "bench" / "bench_io.json")} | {"ingest_images_per_s": res["ingest"]["images_per_s"]}

    study.stage("bench_io", {"io": asdict(io_cfg)}, io, after=("ingest",))

    summary = {
        "wall_s": time.perf_counter() - study.t0,
        "machine": machine_info(),
        "stages": {name: {"seconds": rec["seconds"], "outputs": rec["outputs"]} for name, rec in study.records.items()},
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    os.replace(tmp, out / "summary.json")
    return summary
