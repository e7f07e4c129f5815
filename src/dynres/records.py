"""Results are records first (JSON, Parquet), renderings second (Markdown, HTML, plots).

Every command that measures something writes ``NAME.json`` + ``NAME.md`` through :func:`write_records`, with the
machine it ran on, so the report and CI dashboards read numbers instead of recomputing them.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """CPU, usable cores and library versions: what a number measured here depends on."""
    libs = ["dynres", "torch", "torchvision", "pillow", "numpy", "onnxruntime", "openvino", "apache-tvm"]
    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: v for name in libs if (v := _version(name))},
    }


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def markdown_table(rows: Sequence[dict], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured Markdown table; floats are shown with up to 3 significant decimals."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1 else f"{v:,.2f}".rstrip("0").rstrip(".")
        return "" if v is None else str(v)

    head = list(headers or columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_records(out_dir: str | Path, name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``name.json`` (with ``machine`` and ``created`` added) and ``name.md`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(), **payload}
    paths = (out / f"{name}.json", out / f"{name}.md")
    for path, text in zip(paths, (json.dumps(payload, indent=2, default=str), markdown.rstrip() + "\n")):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return paths
