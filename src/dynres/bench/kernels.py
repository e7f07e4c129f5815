"""``dynres bench kernels`` and the kernels stage: tune models over resolutions (compute), write the record
``kernels.json`` (record), then the Markdown in Table II layout and Figure 7 from that record (render)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from torch import nn

from dynres.records import cpu_model, write_records
from dynres.report.figures import kernel_groups, kernel_throughput
from dynres.runtime.backends import gemm_gflops, measure_limits
from dynres.runtime.kernels import TuneConfig, tune

FLOPS_NOTE = "gflops = FlopCounterMode total (2 x MACs, conv + matmul)"


def run_bench_kernels(models: dict[str, nn.Module], config: TuneConfig, out_dir: Path, *,
                   extra: Sequence[TuneConfig] = (), progress: bool = True) -> dict:
    """Measure the machine limits, tune every model on ``config`` (and each ``extra`` grid, e.g. a
    throughput-mode batch size at low resolutions), then write kernels.json/.md/-fig7.png.
    Returns ``{rows, limits, paths}``."""
    rows, limits, meta = tune_models(models, config, extra=extra, progress=progress)
    paths = write_report(rows, limits, out_dir, meta)
    return {"rows": rows, "limits": limits, "paths": paths}


# --- compute ----------------------------------------------------------------------------------------------------

def tune_models(models: dict[str, nn.Module], config: TuneConfig, *, extra: Sequence[TuneConfig] = (),
                progress: bool = True) -> tuple[list[dict], dict, dict]:
    """(rows, limits, meta): every model tuned on each grid, between two measurements of the machine's limits."""
    limits = measure_limits(config.threads)
    rows: list[dict] = []
    tune_seconds = []  # wall time per model and grid, cache hits included: what tuning costs a user
    for name, model in models.items():
        for cfg in (config, *extra):
            start = time.perf_counter()
            rows += tune(model, cfg, model_name=name, gemm_peak=limits["gemm_gflops_per_s"], progress=progress)
            tune_seconds.append({"model": name, "resolutions": cfg.resolutions, "batch_sizes": cfg.batch_sizes,
                                 "seconds": time.perf_counter() - start})
    # the same GEMM again: on a shared machine the limit itself drifts, and the two bracket it
    limits["gemm_gflops_per_s_after"] = gemm_gflops(config.threads)[0]
    meta = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "extra_grids": [{"resolutions": c.resolutions, "batch_sizes": c.batch_sizes} for c in extra],
            "tune_seconds": tune_seconds}
    return rows, limits, meta


# --- record -----------------------------------------------------------------------------------------------------

def write_report(rows: list[dict], limits: dict, out_dir: Path, meta: dict | None = None) -> dict[str, Path]:
    """The record first (kernels.json), then Markdown in Table II layout and the Figure 7 plot, rendered from it.
    Returns the paths under ``json``, ``md`` and ``png``."""
    out_dir = Path(out_dir)
    png = out_dir / "kernels-fig7.png"
    record = {"meta": meta or {}, "limits": limits, "flops_note": FLOPS_NOTE, "rows": rows}
    json_path, md_path = write_records(out_dir, "kernels", record, render_markdown(record, png.name))
    kernel_throughput(record, png)
    return {"json": json_path, "md": md_path, "png": png}


# --- render -----------------------------------------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def render_markdown(record: dict, png_name: str) -> str:
    """The record as Markdown: the machine limits and tuning times, then per (model, batch) the latency table
    (Table II layout) and the GFLOP/s table behind Figure 7 (``png_name``)."""
    lines = _header(record)
    for (model_name, batch), rows in kernel_groups(record["rows"]).items():
        lines += _latency_table(model_name, batch, rows)
        lines += _throughput_table(rows, png_name)
        notes = sorted({f"{r['backend']}: {r['reason']}" for r in rows if r["status"] not in ("ok",)})
        lines += [""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _header(record: dict) -> list[str]:
    limits = record["limits"]
    lines = [f"# Kernel tuning ({cpu_model()})", "",
             f"Machine limits measured in this run: fp32 GEMM **{_fmt(limits.get('gemm_gflops_per_s'))} GFLOP/s**"
             f", FMA ceiling **{_fmt(limits.get('fma_gflops_per_s'))} GFLOP/s** "
             f"({limits.get('threads')} threads; GEMM again after tuning: "
             f"{_fmt(limits.get('gemm_gflops_per_s_after'))} GFLOP/s; % of peak uses the first). "
             "GFLOPs count 2 x MACs. Latency = median of alternated runs; "
             "± is the interquartile range (machine shared, timings noisy).", ""]
    for t in record["meta"].get("tune_seconds", []):
        lines.append(f"- tuning {t['model']} at {len(t['resolutions'])} resolutions x batch {t['batch_sizes']}: "
                     f"{t['seconds']:.0f} s (cache hits included)")
    return lines + [""]


def _backends(rows: list[dict]) -> list[str]:
    """The backends measured, in order, without the ``tuned`` row (its own column)."""
    return [b for b in dict.fromkeys(r["backend"] for r in rows) if b != "tuned"]


def _latency_table(model_name: str, batch: int, rows: list[dict]) -> list[str]:
    backends = _backends(rows)
    by = {(r["resolution"], r["backend"]): r for r in rows}
    lines = [f"## {model_name}, batch {batch}: latency ms (Table II layout)", "",
             "| res | GFLOP | " + " | ".join(backends) + " | tuned (backend) | eager / tuned | % GEMM peak |",
             "|---" * (len(backends) + 5) + "|"]
    for res in sorted({r["resolution"] for r in rows}):
        cells = []
        for b in backends:
            r = by.get((res, b))
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(f"{r['latency_ms']:.1f} ± {_fmt(r['latency_iqr_ms'])}")
            else:
                cells.append(r["status"])
        tuned, eager = by.get((res, "tuned")), by.get((res, "eager"))
        speed = eager["latency_ms"] / tuned["latency_ms"] if tuned and eager and eager["latency_ms"] else None
        lines.append(f"| {res} | {_fmt(tuned and tuned['gflops'], '.2f')} | " + " | ".join(cells) +
                     f" | {_fmt(tuned and tuned['latency_ms'])} ({tuned and tuned['chosen']}) | "
                     f"{_fmt(speed, '.2f')}x | {_fmt(tuned and tuned['fraction_of_gemm_peak'] * 100, '.0f')}% |")
    return lines


def _throughput_table(rows: list[dict], png_name: str) -> list[str]:
    backends = _backends(rows)
    by = {(r["resolution"], r["backend"]): r for r in rows}
    lines = ["", f"GFLOP/s per backend (Figure 7, [{png_name}]({png_name})):", "",
             "| res | " + " | ".join(backends) + " | tuned |", "|---" * (len(backends) + 2) + "|"]
    for res in sorted({r["resolution"] for r in rows}):
        cells = [_fmt(by.get((res, b), {}).get("gflops_per_s")) for b in backends + ["tuned"]]
        lines.append(f"| {res} | " + " | ".join(cells) + " |")
    return lines
