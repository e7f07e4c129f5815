"""Every figure of a run, each drawn by one function from a record: the stage that computes a record and the report
that reads it back call the same function, so a figure is defined once. Each function writes a PNG to ``path``
and returns it."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    """pyplot on the Agg backend (no display here), imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, **savefig) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and free it; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **savefig)
    _pyplot().close(fig)
    return path


def kernel_groups(rows: list[dict]) -> dict[tuple[str, int], list[dict]]:
    """Kernel rows by (model, batch), in the order they were measured."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["batch"]), []).append(row)
    return groups


def calibration_sweep(points: list[dict], path: Path) -> Path:
    """Figure 6: accuracy change vs relative bytes read, one curve per resolution and policy family (solid: one
    scan count for every image; dashed: SSIM thresholds; records without a family are SSIM sweeps)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    colours = {r: f"C{i}" for i, r in enumerate(sorted({p["resolution"] for p in points}))}
    labelled = set()
    for (r, family) in sorted({(p["resolution"], p.get("family", "ssim")) for p in points}):
        pts = sorted((p for p in points if p["resolution"] == r and p.get("family", "ssim") == family),
                     key=lambda p: p["relative_bytes"])
        ax.plot([p["relative_bytes"] for p in pts], [p["acc_change"] for p in pts],
                "o-" if family == "count" else "s--", ms=3, color=colours[r],
                label=None if r in labelled else f"{r}")
        labelled.add(r)
    ax.set_xlabel("relative bytes read (1.0 = whole file)")
    ax.set_ylabel("top-1 accuracy change (points)")
    ax.set_title("Storage calibration: scan counts (solid), SSIM thresholds (dashed)")
    ax.legend(title="resolution", fontsize=7)
    fig.tight_layout()
    return _save(fig, path, dpi=120)


def kernel_throughput(record: dict, path: Path) -> Path:
    """Figure 7: GFLOP/s per resolution per backend, one panel per (model, batch), machine limits as lines.

    ``record``: ``rows`` (model, batch, backend, resolution, gflops_per_s) and ``limits`` (the GEMM peak and FMA
    ceiling, either may be absent)."""
    plt = _pyplot()
    groups = kernel_groups(record["rows"])
    models = list(dict.fromkeys(m for m, _ in groups))
    batches = sorted({b for _, b in groups})
    fig, axes = plt.subplots(len(models), len(batches), figsize=(5 * len(batches), 3.4 * len(models)),
                             squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for (model_name, batch), rows in groups.items():
        ax = axes[models.index(model_name)][batches.index(batch)]
        ax.set_visible(True)
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["resolution"], r["gflops_per_s"]) for r in rows
                         if r["backend"] == backend and r["gflops_per_s"])
            if pts:
                ax.plot(*zip(*pts), marker="o", lw=2.5 if backend == "tuned" else 1,
                        color="black" if backend == "tuned" else None, label=backend)
        for name, style, label in (("gemm_gflops_per_s", "--", "GEMM peak"), ("fma_gflops_per_s", ":", "FMA ceiling")):
            if record["limits"].get(name):
                ax.axhline(record["limits"][name], ls=style, color="gray", lw=1, label=label)
        ax.set(title=f"{model_name}, batch {batch}", xlabel="resolution (px)", ylabel="GFLOP/s")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def accuracy_vs_gflops(p: dict, path: Path) -> Path:
    """Figures 8/9: accuracy vs mean GFLOPs per crop: static curve, dynamic point, cost-aware curve, oracle.

    ``p``: ``crops`` and per-crop rows in ``static``, ``dynamic`` (the argmax rule), ``cost_aware`` (the λ sweep)
    and ``oracle``. A crop without a dynamic or oracle row shows none; an oracle row without ``gflops`` (the
    summary does not copy them) is a horizontal line at its accuracy."""
    plt = _pyplot()
    crops = p["crops"]
    fig, axes = plt.subplots(1, len(crops), figsize=(4 * len(crops), 3.6), squeeze=False)
    for ax, c in zip(axes[0], crops):
        st = sorted((r for r in p["static"] if r["crop"] == c), key=lambda r: r["gflops"])
        ax.plot([r["gflops"] for r in st], [r["accuracy"] for r in st], "o-", color="tab:blue", label="static")
        for r in st:
            ax.annotate(str(r["resolution"]), (r["gflops"], r["accuracy"]), fontsize=7, xytext=(2, -8),
                        textcoords="offset points")
        ca = sorted((r for r in p["cost_aware"] if r["crop"] == c), key=lambda r: r["gflops"])
        ax.plot([r["gflops"] for r in ca], [r["accuracy"] for r in ca], ".--", color="tab:green", alpha=0.7,
                label="dynamic, cost-aware (λ sweep)")
        d = next((r for r in p["dynamic"] if r["crop"] == c), None)
        if d is not None:
            ax.plot([d["gflops"]], [d["accuracy"]], "*", ms=14, color="tab:red", label="dynamic (argmax p)")
        o = next((r for r in p["oracle"] if r["crop"] == c), None)
        if o is not None and o.get("gflops") is not None:
            ax.plot([o["gflops"]], [o["accuracy"]], "D", color="black", label="oracle")
        elif o is not None:
            ax.axhline(o["accuracy"], color="black", ls=":", lw=1, label="oracle")
        ax.set_title(f"{round(100 * c)}% center crop")
        ax.set_xlabel("mean GFLOPs per image")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("top-1 accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def bytes_per_scan(rows: list[dict], path: Path) -> Path:
    """The share of a file's bytes read after each scan (``rows``: scans, fraction_of_file)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r["scans"] for r in rows], [r["fraction_of_file"] for r in rows], "o-")
    ax.set_xlabel("scans read")
    ax.set_ylabel("fraction of file bytes")
    ax.set_ylim(0, 1.05)
    return _save(fig, path, dpi=110, bbox_inches="tight")


def scale_choice_thumbnails(samples: list[dict], path: Path) -> Path:
    """Up to 16 images, each titled with the resolution the scale model chose (``samples``: path, resolution,
    class_name); an image that cannot be opened leaves its cell empty."""
    from PIL import Image

    plt = _pyplot()
    n = min(len(samples), 16)
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(2.1 * ((n + 1) // 2), 4.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, sm in zip(axes.flat, samples[:n]):
        try:
            ax.imshow(Image.open(sm["path"]).convert("RGB"))
        except OSError:
            continue
        ax.set_title(f"{sm['resolution']} px\n{sm.get('class_name', '')}", fontsize=7)
    return _save(fig, path, dpi=110, bbox_inches="tight")


def layout_frontiers(record: dict, path: Path, half: str = "held_out") -> Path:
    """Scan layouts: top-1 vs bytes read (fraction of the libjpeg-default file) at every scan count, one panel per
    resolution, one line per candidate (``record``: ``grid`` and ``candidates``, each with ``name`` and
    ``frontier[half]`` rows of resolution, bytes, top1)."""
    plt = _pyplot()
    grid = record["grid"]
    cols = min(4, len(grid))
    rows = (len(grid) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.flat[len(grid):]:
        ax.axis("off")
    for ax, r in zip(axes.flat, grid):
        for c in record["candidates"]:
            pts = [p for p in c["frontier"][half] if p["resolution"] == r]
            ax.plot([p["bytes"] for p in pts], [p["top1"] for p in pts], "o-", ms=2.5, lw=1, label=c["name"])
        ax.set_title(f"{r} px", fontsize=9)
        ax.set_xlim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("top-1 (%)", fontsize=8)
    for ax in axes[-1, :]:
        ax.set_xlabel("bytes read (default file = 1)", fontsize=8)
    axes.flat[0].legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    return _save(fig, path, dpi=110)
