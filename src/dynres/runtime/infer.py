"""Batch inference over a store (``dynres infer``): one :class:`~dynres.runtime.engine.EngineSpec` run on the
local engine or on Ray Data (compute), then the predictions Parquet and a summary record beside it (record).

Its own module because the dispatch needs both engines and :mod:`dynres.runtime.ray` builds on the local engine.
The local engine returns its predictions and this module writes them; the Ray engine's workers write theirs to
the output URI themselves (the driver never holds them), so only the summary record is written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from dynres.errors import ConfigError
from dynres.records import write_records
from dynres.runtime.engine import EngineSpec, InferenceResult, build_engine

if TYPE_CHECKING:
    from dynres.runtime.ray import RayConfig

ENGINES = ("local", "ray")


def run_inference(spec: EngineSpec, engine: str = "local", *, limit: int | None = None,
                  ray: RayConfig | None = None, output: str | Path | None = None,
                  progress: bool = True) -> InferenceResult:
    """Predictions for the first ``limit`` keys of ``spec.store`` (None: all) on ``engine``: ``local`` (threads in
    this process) or ``ray`` (Ray Data actor pools, laid out and sized by ``ray``; it writes its predictions as Parquet
    files under ``output``, a directory path or fsspec URI, and returns their summary without the rows)."""
    if engine not in ENGINES:
        raise ConfigError("engine", f"unknown engine {engine!r} ({', '.join(ENGINES)})")
    if limit is not None and limit < 0:
        raise ConfigError("limit", f"need a number of images >= 0, got {limit}")
    if engine == "ray":
        from dynres.runtime.ray import RayConfig, run_ray

        if output is None:
            raise ConfigError("output", "the Ray engine writes its predictions itself: give an output directory")
        return run_ray(spec, output, ray or RayConfig(), limit=limit, progress=progress)
    eng = build_engine(spec)
    return eng.run(eng.store.keys[:limit] if limit else None, progress=progress)


def write_inference(result: InferenceResult, spec: EngineSpec, out: str | Path) -> Path:
    """``out`` (one Parquet row per image; the Ray engine wrote its own, named in its summary's ``output``) and
    the summary record ``out.stem`` + ``.json``/``.md`` beside it."""
    out = Path(out)
    summary = result.summary
    if summary.get("engine") != "ray":
        result.write_parquet(out)
    write_records(out.parent, out.stem, {"spec": str(spec), "summary": summary},
                  "\n".join(f"- {k}: {v}" for k, v in summary.items()))
    return out
