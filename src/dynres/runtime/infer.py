"""Batch inference over a store (``dynres infer``): one :class:`~dynres.runtime.engine.EngineSpec` run on the
local engine or on Ray Data (compute), then the predictions Parquet and a summary record beside it (record).

Its own module because the dispatch needs both engines and :mod:`dynres.runtime.ray` builds on the local engine.
"""

from __future__ import annotations

from pathlib import Path

from dynres.errors import ConfigError
from dynres.records import write_records
from dynres.runtime.engine import EngineSpec, InferenceResult, build_engine

ENGINES = ("local", "ray")


def run_inference(spec: EngineSpec, engine: str = "local", *, limit: int | None = None, address: str | None = None,
                  progress: bool = True) -> InferenceResult:
    """Predictions for the first ``limit`` keys of ``spec.store`` (None: all) on ``engine``: ``local`` (threads in
    this process) or ``ray`` (one actor pool per stage; ``address`` of a cluster, default a local Ray)."""
    if engine not in ENGINES:
        raise ConfigError("engine", f"unknown engine {engine!r} ({', '.join(ENGINES)})")
    if engine == "ray":
        from dynres.runtime.ray import run_ray

        return run_ray(spec, limit=limit, address=address, progress=progress)
    eng = build_engine(spec)
    return eng.run(eng.store.keys[:limit] if limit else None, progress=progress)


def write_inference(result: InferenceResult, spec: EngineSpec, out: str | Path) -> Path:
    """``out`` (one Parquet row per image) and the summary record ``out.stem`` + ``.json``/``.md`` beside it."""
    out = Path(out)
    result.write_parquet(out)
    summary = result.summary
    write_records(out.parent, out.stem, {"spec": str(spec), "summary": summary},
                  "\n".join(f"- {k}: {v}" for k, v in summary.items()))
    return out
