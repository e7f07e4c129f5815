"""`dynres report RUN_DIR`: the paper's tables and figures, rendered from a run's records (never recomputed).

Input is ``RUN_DIR/summary.json`` (the schema `dynres demo` and `dynres run` write; see docs/summary-schema.md)
plus the optional detail records it points to. Output: ``RUN_DIR/report.html`` (self-contained, PNGs embedded),
``RUN_DIR/report.md`` and the PNGs under ``RUN_DIR/figures/``. A section whose record is missing says so.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dynres.errors import DynresError  # noqa: E402
from dynres.records import markdown_table  # noqa: E402


class Section:
    """One titled block: prose, Markdown tables and figures; rendered to both Markdown and HTML."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[tuple[str, object]] = []

    def text(self, s: str) -> None:
        self.parts.append(("text", s))

    def table(self, rows: list[dict], columns: list[str], headers: list[str] | None = None) -> None:
        self.parts.append(("table", (rows, columns, headers or columns)))

    def figure(self, name: str, fig) -> None:
        self.parts.append(("figure", (name, fig)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:,.2f}"
    return "" if v is None else str(v)


def _save(fig, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def render(sections: list[Section], out_dir: Path, title: str) -> tuple[str, str]:
    """Markdown and HTML for ``sections``; figures go to ``out_dir/figures``."""
    md, body = [f"# {title}", ""], []
    for sec in sections:
        md += [f"## {sec.title}", ""]
        body.append(f"<h2>{html.escape(sec.title)}</h2>")
        for kind, item in sec.parts:
            if kind == "text":
                md += [item, ""]
                body.append(f"<p>{html.escape(item)}</p>")
            elif kind == "table":
                rows, cols, heads = item
                md += [markdown_table(rows, cols, heads), ""]
                th = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
                trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>"
                              for r in rows)
                body.append(f"<table><tr>{th}</tr>{trs}</table>")
            else:
                name, fig = item
                png = _save(fig, out_dir / "figures" / f"{name}.png")
                md += [f"![{name}](figures/{name}.png)", ""]
                body.append(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}h2{margin-top:2em}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>")
    return "\n".join(md), page


def _by(rows: list[dict], key: str) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    return dict(sorted(groups.items()))


def section_overview(s: dict) -> Section:
    sec = Section("Run")
    m = s.get("machine", {})
    sec.text(f"Wall time {s.get('wall_s', 0):.0f} s on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), "
             f"Python {m.get('python', '?')}.")
    sec.table([{"library": k, "version": v} for k, v in m.get("versions", {}).items()], ["library", "version"])
    return sec


def section_static(s: dict) -> Section:
    sec = Section("Accuracy and GFLOPs per resolution and crop (Table I, Figures 8/9)")
    static, dynamic, oracle = s.get("static", []), s.get("dynamic", []), s.get("oracle", [])
    if not static:
        sec.text("No static evaluation in this run.")
        return sec
    crops = sorted({r["crop"] for r in static})
    table = []
    for res, rows in _by(static, "resolution").items():
        row = {"resolution": res, "gflops": rows[0]["gflops"]}
        row |= {f"acc@{r['crop']}": r["accuracy"] for r in rows}
        table.append(row)
    sec.text("GFLOPs are FlopCounterMode counts (2 x multiply-accumulates; the paper quotes MACs). Accuracy: top-1 %, "
             "crops are area fractions of the shorter-side square.")
    sec.table(table, ["resolution", "gflops"] + [f"acc@{c}" for c in crops])
    fig, axes = plt.subplots(1, len(crops), figsize=(4 * len(crops), 3.4), sharey=True, squeeze=False)
    for ax, crop in zip(axes[0], crops):
        pts = sorted((r for r in static if r["crop"] == crop), key=lambda r: r["gflops"])
        ax.plot([p["gflops"] for p in pts], [p["accuracy"] for p in pts], "o-", label="static", color="tab:blue")
        for p in pts:
            ax.annotate(str(p["resolution"]), (p["gflops"], p["accuracy"]), fontsize=7, xytext=(2, 2),
                        textcoords="offset points")
        dyn = [d for d in dynamic if d["crop"] == crop]
        plain = [d for d in dyn if d.get("lambda") in (None, 0, 0.0)]
        swept = sorted((d for d in dyn if d.get("lambda") not in (None,)), key=lambda d: d["gflops"])
        if swept:
            ax.plot([d["gflops"] for d in swept], [d["accuracy"] for d in swept], "s--", ms=3, color="tab:orange",
                    label="dynamic, cost-aware λ sweep")
        if plain:
            ax.plot([plain[0]["gflops"]], [plain[0]["accuracy"]], "*", ms=14, color="tab:red", label="dynamic")
        for o in (o for o in oracle if o["crop"] == crop):
            ax.axhline(o["accuracy"], color="gray", ls=":", label="oracle")
        ax.set_title(f"crop {crop:.0%}")
        ax.set_xlabel("GFLOPs / image")
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    axes[0][-1].legend(handles.values(), handles.keys(), fontsize=7, loc="lower right")
    sec.figure("accuracy_vs_gflops", fig)
    plain_rows = [d for d in dynamic if d.get("lambda") is None]
    if plain_rows:
        sec.table(plain_rows, ["crop", "accuracy", "gflops", "read_savings"],
                  ["crop", "dynamic accuracy %", "GFLOPs (scale model included)", "read savings"])
    if s.get("dynamic_summary"):
        sec.text("Best static resolution per crop vs the dynamic pipeline, and the cheapest cost-aware point "
                 "(argmax p(r) − λ·cost(r)) within 0.5 points of the best static accuracy.")
        sec.table(s["dynamic_summary"], ["crop", "best_static_resolution", "best_static_accuracy",
                                         "best_static_gflops", "dynamic_accuracy", "dynamic_gflops", "lambda",
                                         "cost_aware_accuracy", "cost_aware_gflops", "cost_aware_savings_pct"],
                  ["crop", "best static res", "acc %", "GFLOPs", "dynamic acc %", "GFLOPs", "λ", "cost-aware acc %",
                   "GFLOPs", "GFLOPs saved %"])
        if any(r.get("iso_cost_accuracy") is not None for r in s["dynamic_summary"]):
            sec.text("At the best static resolution's cost: the most accurate λ whose mean GFLOPs (scale model "
                     "included) do not exceed the best static resolution's.")
            sec.table(s["dynamic_summary"], ["crop", "best_static_accuracy", "iso_cost_lambda", "iso_cost_accuracy",
                                             "iso_cost_gflops"],
                      ["crop", "best static acc %", "λ", "dynamic acc %", "GFLOPs"])
    if oracle:
        sec.table(oracle, ["crop", "accuracy"], ["crop", "oracle accuracy %"])
    return sec


def section_kernels(s: dict) -> Section:
    sec = Section("Resolution-specialized kernels (Table II, Figure 7)")
    rows = s.get("kernels", [])
    if not rows:
        sec.text("No kernel tuning in this run.")
        return sec
    for model, mrows in _by(rows, "model").items():
        backends = sorted({r["backend"] for r in mrows})
        table = []
        for res, rr in _by(mrows, "resolution").items():
            row = {"resolution": res} | {r["backend"]: r["latency_ms"] for r in rr}
            if row.get("eager") and row.get("tuned"):
                row["speedup"] = row["eager"] / row["tuned"]
            table.append(row)
        sec.text(f"{model}: median latency (ms), batch 1.")
        sec.table(table, ["resolution"] + backends + ["speedup"], ["res"] + backends + ["tuned vs eager"])
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for b in backends:
            pts = sorted((r for r in mrows if r["backend"] == b and r.get("gflops_per_s")), key=lambda r: r["resolution"])
            if pts:
                ax.plot([p["resolution"] for p in pts], [p["gflops_per_s"] for p in pts], "o-", label=b)
        if s.get("gemm_gflops_per_s"):
            ax.axhline(s["gemm_gflops_per_s"], color="gray", ls=":", label="fp32 GEMM peak")
        ax.set_xlabel("resolution")
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"{model}: throughput per backend")
        ax.legend(fontsize=7)
        sec.figure(f"kernels_{model}", fig)
    return sec


def section_calibration(s: dict) -> Section:
    sec = Section("Storage calibration (Tables III/IV, Figure 6)")
    rows = s.get("calibration", [])
    if not rows:
        sec.text("No calibration in this run.")
        return sec
    target = s.get("calibration_target", 0.05)
    flagged = [r | {"flag": "LOSS > target" if r["acc_full"] - r["acc_calibrated"] > target + 1e-9 else ""}
               for r in rows]
    sec.text(f"Accuracy (%) reading every scan vs the calibrated prefix; read savings = 1 − bytes read / file bytes. "
             f"Target loss ≤ {target} points.")
    sec.table(flagged, ["resolution", "crop", "acc_full", "acc_calibrated", "read_savings", "flag"],
              ["res", "crop", "full reads", "calibrated", "read savings", ""])
    sweep = s.get("calibration_sweep", [])
    if sweep:
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for res, pts in _by(sweep, "resolution").items():
            pts = sorted(pts, key=lambda p: p["relative_bytes"])
            ax.plot([p["relative_bytes"] for p in pts], [p["acc_change"] for p in pts], "o-", ms=3, label=str(res))
        ax.set_xlabel("relative bytes read (1.0 = whole file)")
        ax.set_ylabel("accuracy change (points)")
        ax.legend(title="resolution", fontsize=7)
        sec.figure("calibration_sweep", fig)
    return sec


def section_pipeline(s: dict) -> Section:
    sec = Section("End-to-end pipeline")
    p = s.get("pipeline")
    if not p:
        sec.text("No pipeline benchmark in this run.")
        return sec
    rows = [{"mode": k} | v for k, v in p.items()]
    base = p.get("baseline", {}).get("images_per_s")
    for r in rows:
        r["vs_baseline"] = r["images_per_s"] / base if base else None
    sec.table(rows, ["mode", "images_per_s", "vs_baseline", "accuracy", "bytes_per_image", "p50_ms", "p99_ms"],
              ["mode", "images/s", "× baseline", "accuracy %", "bytes/image", "p50 ms", "p99 ms"])
    return sec


def section_io(s: dict) -> Section:
    sec = Section("Reading and decoding")
    io_ = s.get("io")
    if not io_:
        sec.text("No I/O benchmark in this run.")
        return sec
    sec.table(io_["decode"], ["resolution", "dct_scaled_one_core_images_per_s", "baseline_one_core_images_per_s",
                              "speedup_one_core", "speedup_all_cores"],
              ["res", "DCT-scaled img/s (1 core)", "baseline img/s (1 core)", "speedup 1 core", "speedup all cores"])
    bps = io_["bytes_per_scan"]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["scans"] for r in bps], [r["fraction_of_file"] for r in bps], "o-")
    ax.set_xlabel("scans read")
    ax.set_ylabel("fraction of file bytes")
    ax.set_ylim(0, 1.05)
    sec.figure("bytes_per_scan", fig)
    return sec


def section_samples(s: dict, run_dir: Path) -> Section:
    sec = Section("What the scale model chose")
    samples = s.get("samples", [])
    if not samples:
        sec.text("No per-image choices recorded in this run.")
        return sec
    from PIL import Image

    n = min(len(samples), 16)
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(2.1 * ((n + 1) // 2), 4.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sm in zip(axes.flat, samples[:n]):
        path = Path(sm["path"])
        path = path if path.is_absolute() else run_dir / path
        try:
            ax.imshow(Image.open(path).convert("RGB"))
        except OSError:
            continue
        ax.set_title(f"{sm['resolution']} px\n{sm.get('class_name', '')}", fontsize=7)
    sec.text("Thumbnails of evaluation images with the resolution the scale model picked (crop 75%).")
    sec.figure("scale_choices", fig)
    return sec


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DynresError(path, "no summary.json: run `dynres demo --out DIR` or `dynres run CONFIG` first") from err
    except json.JSONDecodeError as err:
        raise DynresError(path, f"not valid JSON ({err})") from err
    sections = [section_overview(summary), section_static(summary), section_calibration(summary),
                section_kernels(summary), section_pipeline(summary), section_io(summary),
                section_samples(summary, run_dir)]
    md, page = render(sections, run_dir, "dynres report")
    (run_dir / "report.md").write_text(md, encoding="utf-8")
    (run_dir / "report.html").write_text(page, encoding="utf-8")
    return run_dir / "report.html", run_dir / "report.md"
