"""`dynres report RUN_DIR`: the paper's tables and figures, rendered from a run's records (never recomputed).

The report opens with the verdict (what the run recommends per crop and the held-out evidence: the summary's
``verdict``) and the effective settings (``run_config``). Input is ``RUN_DIR/summary.json`` (the schema `dynres demo` and `dynres run` write; see docs/summary-schema.md)
plus, for what the summary does not copy, the records a run keeps: the dynamic evaluation's record that the
summary's ``stages`` lists (Figures 8/9 with the oracle's GFLOPs) and, for a summary without ``dynamic_tolerance``,
the accuracy stage's settings (``RUN_DIR/stages/accuracy.json``). Output: ``RUN_DIR/report.html``
(self-contained, PNGs embedded), ``RUN_DIR/report.md`` and the PNGs under ``RUN_DIR/figures/``, each drawn by its
function in :mod:`dynres.report.figures`, the one the stage that wrote the record calls. A section whose record is
missing says so.
"""

from __future__ import annotations

import base64
import html
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dynres.errors import DynresError
from dynres.records import markdown_table
from dynres.report import figures


class Section:
    """One titled block: prose, Markdown tables and figures; rendered to both Markdown and HTML."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[tuple[str, object]] = []

    def text(self, s: str) -> None:
        self.parts.append(("text", s))

    def table(self, rows: list[dict], columns: list[str], headers: list[str] | None = None) -> None:
        self.parts.append(("table", (rows, columns, headers or columns)))

    def figure(self, path: Path) -> None:
        """A PNG already written (under the report's ``figures/``)."""
        self.parts.append(("figure", Path(path)))


# --- rendering --------------------------------------------------------------------------------------------------

STYLE = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
         "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
         "text-align:right}th{background:#f3f3f3}img{max-width:100%;margin:.5em 0}h2{margin-top:2em}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1 else f"{v:,.2f}"
    return "" if v is None else str(v)


def _html_table(rows: list[dict], cols: list[str], heads: list[str]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{trs}</table>"


def _render_part(kind: str, item, out_dir: Path) -> tuple[str, str]:
    """One part of a section as (Markdown, HTML)."""
    if kind == "text":
        return item, f"<p>{html.escape(item)}</p>"
    if kind == "table":
        return markdown_table(*item), _html_table(*item)
    name = item.stem
    png = base64.b64encode(item.read_bytes()).decode()
    return f"![{name}]({item.relative_to(out_dir).as_posix()})", f'<img alt="{name}" src="data:image/png;base64,{png}">'


def render(sections: list[Section], out_dir: Path, title: str) -> tuple[str, str]:
    """Markdown and HTML for ``sections``; their figures lie under ``out_dir``."""
    md, body = [f"# {title}", ""], []
    for sec in sections:
        md += [f"## {sec.title}", ""]
        body.append(f"<h2>{html.escape(sec.title)}</h2>")
        for kind, item in sec.parts:
            part_md, part_html = _render_part(kind, item, out_dir)
            md += [part_md, ""]
            body.append(part_html)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>")
    return "\n".join(md), page


# --- reading the records ----------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


@dataclass(frozen=True)
class Run:
    """What the sections read: the summary, the run directory and the records the summary points to."""

    summary: dict
    dir: Path

    @property
    def figures(self) -> Path:
        return self.dir / "figures"

    def stage(self, name: str) -> dict:
        """A stage's record (``stages/NAME.json``: its inputs and outputs), or {} when the run has none."""
        return _read_json(self.dir / "stages" / f"{name}.json") or {}

    def dynamic_tolerance(self) -> float | None:
        """The accuracy points the cost-aware choice may give up (DynamicConfig.tolerance): the summary's
        ``dynamic_tolerance``, or for a summary without it the setting the accuracy stage recorded; None when
        neither is there."""
        if self.summary.get("dynamic_tolerance") is not None:
            return self.summary["dynamic_tolerance"]
        settings = self.stage("accuracy").get("inputs", {}).get("chain", {}).get("dynamic", {})
        return settings.get("tolerance")

    def dynamic_record(self) -> dict:
        """Figures 8/9's input: the dynamic evaluation's record (the accuracy stage's output the summary lists), which
        the stage drew its figure from; when it is not at hand, the rows the summary copies (without the oracle's
        GFLOPs)."""
        path = self.summary.get("stages", {}).get("accuracy", {}).get("outputs", {}).get("dynamic")
        if path:  # recorded relative to where the run started; the run directory is where it is now
            for candidate in (self.dir / "accuracy" / "eval" / Path(path).name, Path(path)):
                if (record := _read_json(candidate)) is not None:
                    return record
        s = self.summary
        dynamic = s.get("dynamic", [])
        return {"crops": sorted({r["crop"] for r in s["static"]}), "static": s["static"],
                "dynamic": [d for d in dynamic if d.get("lambda") is None],
                "cost_aware": [d for d in dynamic if d.get("lambda") is not None], "oracle": s.get("oracle", [])}


def _by(rows: list[dict], key: str) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    return dict(sorted(groups.items()))


# --- the sections -----------------------------------------------------------------------------------------------

def _choice(row: dict) -> str:
    """The recommendation in words; a biased rule (the guard's choice with λ) by name."""
    if row["mode"] != "dynamic":
        return f"static {row['static_resolution']} px"
    rule = row.get("rule")
    recal = "recalibrated p, " if row.get("recalibration") is not None else ""
    return f"dynamic ({recal}{rule + ', ' if rule and rule != 'b=0' else ''}λ={row['lambda']:g})"


def _read_savings(s: dict, row: dict) -> str | None:
    """The calibrated reads' savings of the recommended choice at this crop (None: not in the records). For a
    dynamic pick the records hold the calibration's dynamic row at λ=0 only, not at λ*: labelled so."""
    if row["mode"] == "dynamic":
        rows = [d for d in s.get("dynamic", []) if d.get("lambda") is None and d["crop"] == row["crop"]]
    else:
        rows = [c for c in s.get("calibration", []) if c["crop"] == row["crop"]
                and c["resolution"] == row["static_resolution"]]
    value = rows[0].get("read_savings") if rows else None
    if value is None:
        return None
    return f"{_fmt(value)} (dynamic at λ=0)" if row["mode"] == "dynamic" else _fmt(value)


def _views(v: dict) -> str:
    """Which pixels each mode was judged on (records from before each engine's own views: nothing said)."""
    views = v.get("views")
    if not views or views["static"] == views["dynamic"] == "static_images.parquet":
        return ""
    exact = views.get("dynamic_exact_images", 0)
    dyn = ("the static engine's views too (its scale prefix is shorter than the full read)"
           if exact == v["selection_images"] + v["held_out_images"] else "the dynamic engine's decode-once views"
           + (f" ({exact} images: the static engine's, their scale prefix being short)" if exact else ""))
    return f" Each mode is judged on its own engine's pixels: static on the static engine's views, dynamic on {dyn}."


def _learned(health: dict | None) -> str:
    """One sentence on how far above chance the backbones are (:mod:`dynres.study.health`), when none is at it."""
    if not health or not health.get("backbone"):
        return ""
    b, shards = health["backbone"], health.get("shards") or []
    if b.get("at_chance") or any(s.get("at_chance") for s in shards):  # said by the warnings instead
        return ""
    text = (f"The backbones learned this data: best top-1 {b['accuracy']:.1f}% ({round(100 * b['crop'])}% crop, "
            f"{b['resolution']} px) on {b['images']} validation images against chance {health['chance']:.1f}%")
    if shards:
        accs = [s["accuracy"] for s in shards]
        text += f"; the {len(shards)} shard backbones {min(accs):.1f}–{max(accs):.1f}% on the images they label"
    return text + "."


def _recalibration(rows: list[dict], images: int) -> str | None:
    """What recalibrating p(r) did, in words (None: not recalibrated): the slopes say how far the scale model's
    confidence was trusted."""
    coef = [pair for r in rows for pair in r.get("recalibration") or []]
    if not coef:
        return None
    slopes = [a for a, _ in coef]
    return (f"The scale model's p(r) was recalibrated per crop and resolution to the deployed backbone's chance of "
            f"being right there, on the {images} selection images: slopes {min(slopes):.2f}–{max(slopes):.2f} (1: its "
            "confidence taken as it is; below 1: it was overconfident, and its p counts for less against the cost).")


def fill_verdict(sec: Section, run: Run) -> None:
    """One screen: what the run recommends per crop and why, on held-out images, against the best static
    resolution and the common baseline; what the pipeline serves, end to end; how to serve it."""
    s, v = run.summary, run.summary["verdict"]
    for warning in (v.get("health") or {}).get("warnings", []):
        sec.text(f"Warning: {warning}.")
    learned = _learned(v.get("health"))
    if learned:
        sec.text(learned)
    rows = v["crops"]
    auc = (v.get("health") or {}).get("scale_auc")
    if auc and any(r["mode"] == "static" for r in rows):
        sec.text(f"Where static is recommended: the scale model's AUC on the validation images is "
                 f"{auc['min']:.2f}–{auc['max']:.2f} per (crop, resolution) (0.5: no better than a coin), i.e. how "
                 "well it tells, before the backbone runs, where the backbone will be right. A more accurate backbone "
                 "is what raised it, and moved the verdict to dynamic, on real photos (docs/real-photos.md).")
    recal = _recalibration(rows, v["selection_images"])
    if recal:
        sec.text(recal)
    picks = "; ".join(f"{round(100 * r['crop'])}% crop: {_choice(r)}" for r in rows)
    sec.text(f"Recommended on this data: {picks}. Rule: {v['rule']}. r* and λ* chosen on "
             f"{v['selection_images']} validation images; dynamic vs static decided on these "
             f"{v['held_out_images']} held-out images (dynamic must also match r* on the {v['selection_images']}). "
             "Top-1 here counts an image right as the evaluation did, with every scan read; serving.json runs with "
             f"the calibrated policy's reads (the pipeline's top-1 below, at its crop).{_views(v)}")
    table = [{"crop": r["crop"], "choice": _choice(r), "savings": _read_savings(s, r),
              "acc": r.get(f"held_{r['mode']}_accuracy"), "gflops": r.get(f"held_{r['mode']}_gflops")} | r
             for r in rows]
    sec.table(table, ["crop", "choice", "acc", "gflops", "savings", "static_resolution", "selection_static_accuracy",
                      "held_static_accuracy", "held_static_gflops", "lambda", "selection_dynamic_accuracy",
                      "held_dynamic_accuracy", "held_dynamic_gflops", "baseline_resolution", "held_baseline_accuracy",
                      "held_baseline_gflops"],
              ["crop", "recommended", "top-1 %", "GFLOPs", "read savings", "best static px", "selection top-1 %",
               "top-1 %", "GFLOPs", "dynamic λ", "selection top-1 %", "top-1 %", "GFLOPs", "baseline px", "top-1 %",
               "GFLOPs"])
    for r in rows:
        if r["mode"] != "dynamic":
            sec.text(f"{round(100 * r['crop'])}% crop, static: {r['reason']}.")
    splits = [(r["crop"], r["held_discordance"]) for r in rows if r.get("held_discordance")]
    if splits:
        sec.text(f"What the {v['held_out_images']} held-out images can tell apart (images only dynamic got right / "
                 "only static, McNemar's exact p: small means the difference is unlikely to be chance): "
                 + "; ".join(f"{round(100 * c)}% crop {d['dynamic_only']} / {d['static_only']} (p = {d['p_value']:.2g})"
                             for c, d in splits) + ".")
    pipe = v.get("pipeline")
    if pipe:
        served, static, base = (pipe["rows"].get(k, {}) for k in (pipe["served"], "static_tuned", "baseline"))

        def ratio(key: str, other: dict) -> str:
            return f"{served[key] / other[key]:.2f}x" if served.get(key) and other.get(key) else "n/a"

        def num(value: float | None, digits: int = 0) -> str:
            return "n/a" if value is None else f"{value:,.{digits}f}"

        lam = pipe.get("lambda")
        ran = (f"dynamic rows run at λ={lam:g}, static @{pipe['static_resolution']}" if lam is not None
               else f"static @{pipe['static_resolution']}")
        sec.text(f"End to end at the pipeline stage's {round(100 * pipe['crop'])}% crop (held-out images, calibrated "
                 f"reads; {ran}): serving {pipe['served']} ({pipe['reason']}): {num(served.get('images_per_s'))} "
                 f"images/s = "
                 f"{ratio('images_per_s', static)} the best static @{pipe['static_resolution']} and "
                 f"{ratio('images_per_s', base)} the common baseline (eager @{pipe['baseline_resolution']}, full "
                 f"reads); {num(served.get('bytes_per_image'))} bytes/image = {ratio('bytes_per_image', static)} "
                 f"and {ratio('bytes_per_image', base)}; top-1 {num(served.get('accuracy'), 1)}% vs "
                 f"{num(static.get('accuracy'), 1)}% and {num(base.get('accuracy'), 1)}%.")
        dyn_name = pipe.get("dynamic_mode")
        if dyn_name in pipe["rows"] and lam is not None:
            d_row = pipe["rows"][dyn_name]
            sec.text(f"Timed dynamic row ({dyn_name}, λ={lam:g}): {num(d_row.get('images_per_s'))} images/s, top-1 "
                     f"{num(d_row.get('accuracy'), 1)}%, {num(d_row.get('gflops'), 4)} GFLOPs/image vs static "
                     f"{num(static.get('images_per_s'))} images/s, {num(static.get('accuracy'), 1)}%, "
                     f"{num(static.get('gflops'), 4)} GFLOPs/image.")
    if v.get("default_serving"):
        d = v["default_serving"]
        sec.text(f"Serve it ({round(100 * d['crop'])}% crop, {d['mode']}): {d['infer']} — or {d['serve']}. Every "
                 f"crop's configuration: {Path(v['serving']).name}.")
    for warning in (s.get("run_config") or {}).get("warnings", []):
        sec.text(f"Warning: {warning}.")


def fill_settings(sec: Section, run: Run) -> None:
    """Every effective setting, per section: what the run file set, the preset's choices, the defaults."""
    by_section: dict[str, dict[str, list[str]]] = {}
    for row in run.summary["run_config"]["rows"]:
        section, _, name = row["setting"].rpartition(".")
        value = row["value"]
        if isinstance(value, list) and len(value) > 8:  # the λ sweep, the calibration sweep: by their ends
            value = f"[{value[0]}, …, {value[-1]}] ({len(value)} values)"
        by_section.setdefault(section or "run", {}).setdefault(row["source"], []).append(f"{name}={value}")
    sec.table([{"section": k} | {src: ", ".join(v.get(src, [])) for src in ("file", "preset", "default")}
               for k, v in by_section.items()], ["section", "file", "preset", "default"],
              ["section", "from the run file", "preset", "defaults"])


def fill_overview(sec: Section, run: Run) -> None:
    s = run.summary
    m = s.get("machine", {})
    sec.text(f"Wall time {s.get('wall_s', 0):.0f} s on {m.get('cpu', '?')} ({m.get('cores', '?')} cores), "
             f"Python {m.get('python', '?')}.")
    sec.table([{"library": k, "version": v} for k, v in m.get("versions", {}).items()], ["library", "version"])


def fill_static(sec: Section, run: Run) -> None:
    """Table I (accuracy per resolution and crop), Figures 8/9, then the dynamic rows."""
    static = run.summary["static"]
    crops = sorted({r["crop"] for r in static})
    table = [{"resolution": res, "gflops": rows[0]["gflops"]} | {f"acc@{r['crop']}": r["accuracy"] for r in rows}
             for res, rows in _by(static, "resolution").items()]
    sec.text("GFLOPs are FlopCounterMode counts (2 x multiply-accumulates; the paper quotes MACs). Accuracy: top-1 %, "
             "crops are area fractions of the shorter-side square.")
    sec.table(table, ["resolution", "gflops"] + [f"acc@{c}" for c in crops])
    sec.figure(figures.accuracy_vs_gflops(run.dynamic_record(), run.figures / "accuracy_vs_gflops.png"))
    _dynamic_tables(sec, run)


def _dynamic_tables(sec: Section, run: Run) -> None:
    s = run.summary
    plain_rows = [d for d in s.get("dynamic", []) if d.get("lambda") is None]
    if plain_rows:
        sec.table(plain_rows, ["crop", "accuracy", "gflops", "read_savings"],
                  ["crop", "dynamic accuracy %", "GFLOPs (scale model included)", "read savings"])
    summary = s.get("dynamic_summary")
    if summary:
        tolerance = run.dynamic_tolerance()
        within = (f"within {tolerance:g} points" if tolerance is not None
                  else "within the run's tolerance (its accuracy stage record is missing)")
        sec.text("Best static resolution per crop vs the dynamic pipeline, and the cheapest cost-aware point "
                 f"(argmax p(r) − λ·cost(r)) {within} of the best static accuracy.")
        sec.table(summary, ["crop", "best_static_resolution", "best_static_accuracy", "best_static_gflops",
                            "dynamic_accuracy", "dynamic_gflops", "lambda", "cost_aware_accuracy",
                            "cost_aware_gflops", "cost_aware_savings_pct"],
                  ["crop", "best static res", "acc %", "GFLOPs", "dynamic acc %", "GFLOPs", "λ", "cost-aware acc %",
                   "GFLOPs", "GFLOPs saved %"])
        if any(r.get("iso_cost_accuracy") is not None for r in summary):
            sec.text("At the best static resolution's cost: the most accurate λ whose mean GFLOPs (scale model "
                     "included) do not exceed the best static resolution's.")
            sec.table(summary, ["crop", "best_static_accuracy", "iso_cost_lambda", "iso_cost_accuracy",
                                "iso_cost_gflops"],
                      ["crop", "best static acc %", "λ", "dynamic acc %", "GFLOPs"])
    if s.get("oracle"):
        sec.table(s["oracle"], ["crop", "accuracy"], ["crop", "oracle accuracy %"])


def fill_kernels(sec: Section, run: Run) -> None:
    """Table II (batch-1 latency per backend) and Figure 7, per model."""
    limits = {"gemm_gflops_per_s": run.summary.get("gemm_gflops_per_s")}
    for model, mrows in _by(run.summary["kernels"], "model").items():
        backends = sorted({r["backend"] for r in mrows})
        table = []
        for res, rr in _by(mrows, "resolution").items():
            row = {"resolution": res} | {r["backend"]: r["latency_ms"] for r in rr}
            if row.get("eager") and row.get("tuned"):
                row["speedup"] = row["eager"] / row["tuned"]
            table.append(row)
        sec.text(f"{model}: median latency (ms), batch 1.")
        sec.table(table, ["resolution"] + backends + ["speedup"], ["res"] + backends + ["tuned vs eager"])
        record = {"rows": [{"batch": 1} | r for r in mrows], "limits": limits}  # the summary keeps batch 1 only
        sec.figure(figures.kernel_throughput(record, run.figures / f"kernels_{model}.png"))


def fill_calibration(sec: Section, run: Run) -> None:
    """Tables III/IV (accuracy with full vs calibrated reads) and Figure 6."""
    s = run.summary
    target = s.get("calibration_target", 0.05)
    flagged = [r | {"flag": "LOSS > target" if r["acc_full"] - r["acc_calibrated"] > target + 1e-9 else ""}
               for r in s["calibration"]]
    sec.text(f"Accuracy (%) reading every scan vs the calibrated prefix; read savings = 1 − bytes read / file bytes. "
             f"Target loss ≤ {target} points.")
    sec.table(flagged, ["resolution", "crop", "acc_full", "acc_calibrated", "read_savings", "flag"],
              ["res", "crop", "full reads", "calibrated", "read savings", ""])
    if s.get("calibration_sweep"):
        sec.figure(figures.calibration_sweep(s["calibration_sweep"], run.figures / "calibration_sweep.png"))


def fill_pipeline(sec: Section, run: Run) -> None:
    p = run.summary["pipeline"]
    rows = [{"mode": k} | v for k, v in p.items()]
    base = p.get("baseline", {}).get("images_per_s")
    for r in rows:
        r["vs_baseline"] = r["images_per_s"] / base if base else None
    sec.table(rows, ["mode", "images_per_s", "vs_baseline", "accuracy", "bytes_per_image", "p50_ms", "p99_ms"],
              ["mode", "images/s", "× baseline", "accuracy %", "bytes/image", "p50 ms", "p99 ms"])


def fill_io(sec: Section, run: Run) -> None:
    io_ = run.summary["io"]
    sec.table(io_["decode"], ["resolution", "dct_scaled_one_core_images_per_s", "baseline_one_core_images_per_s",
                              "speedup_one_core", "speedup_all_cores"],
              ["res", "DCT-scaled img/s (1 core)", "baseline img/s (1 core)", "speedup 1 core", "speedup all cores"])
    sec.figure(figures.bytes_per_scan(io_["bytes_per_scan"], run.figures / "bytes_per_scan.png"))


def fill_samples(sec: Section, run: Run) -> None:
    samples = [sm | {"path": run.dir / sm["path"]} for sm in run.summary["samples"]]  # relative: to the run dir
    sec.text("Thumbnails of evaluation images with the resolution the scale model picked (crop 75%).")
    sec.figure(figures.scale_choice_thumbnails(samples, run.figures / "scale_choices.png"))


# (title, the summary field it renders or None, what the section says is missing without it, how to fill it)
SECTIONS: tuple[tuple[str, str | None, str, Callable[[Section, Run], None]], ...] = (
    ("Verdict on this data", "verdict", "verdict (a run from before the guard)", fill_verdict),
    ("Settings", "run_config", "record of the effective settings", fill_settings),
    ("Run", None, "", fill_overview),
    ("Accuracy and GFLOPs per resolution and crop (Table I, Figures 8/9)", "static", "static evaluation",
     fill_static),
    ("Storage calibration (Tables III/IV, Figure 6)", "calibration", "calibration", fill_calibration),
    ("Resolution-specialized kernels (Table II, Figure 7)", "kernels", "kernel tuning", fill_kernels),
    ("End-to-end pipeline", "pipeline", "pipeline benchmark", fill_pipeline),
    ("Reading and decoding", "io", "I/O benchmark", fill_io),
    ("What the scale model chose", "samples", "per-image choices recorded", fill_samples),
)


def build_sections(run: Run) -> list[Section]:
    sections = []
    for title, field, missing, fill in SECTIONS:
        sec = Section(title)
        if field is None or run.summary.get(field):
            fill(sec, run)
        else:
            sec.text(f"No {missing} in this run.")
        sections.append(sec)
    return sections


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (and the figures) into ``run_dir``; returns their paths."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DynresError(path, "no summary.json: run `dynres demo --out DIR` or `dynres run CONFIG` first") from err
    except json.JSONDecodeError as err:
        raise DynresError(path, f"not valid JSON ({err})") from err
    md, page = render(build_sections(Run(summary, run_dir)), run_dir, "dynres report")
    (run_dir / "report.md").write_text(md, encoding="utf-8")
    (run_dir / "report.html").write_text(page, encoding="utf-8")
    return run_dir / "report.html", run_dir / "report.md"
