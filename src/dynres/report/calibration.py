"""The calibration record as Markdown: Tables III/IV (full vs calibrated reads on held-out images) and the
certified rules, a column per policy family."""

from __future__ import annotations

from collections.abc import Sequence

from dynres.records import markdown_table


def calibration_markdown(record: dict) -> str:
    """Table III/IV layout plus the certified rules, a column per family; cells losing more than the target are
    flagged."""
    target, delta = record["calibration_target"], record.get("delta")
    rows = [r | {"loss": r["acc_full"] - r["acc_calibrated"], "flag": "**LOSS > target**" if r["flag"] else ""}
            for r in record["calibration"] + record.get("dynamic", [])]
    families = record.get("families", [])
    search = [_search_row(s, families) for s in record["search"]]
    columns = ["resolution"] + [f"{f}_{k}" for f in families for k in ("rule", "savings", "bound")] + ["chosen"]
    heads = ["res"] + [h for f in families for h in (f"{f}: rule", f"{f}: savings", f"{f}: bound (points)")] + \
        ["chosen"]
    pools = ", ".join(f"{p['name']} ({p['images']})" for p in record.get("pools", []))
    guarantee = (f"an upper {100 * (1 - delta):g}% confidence bound on the {record.get('criterion')} loss"
                 if delta is not None else f"the measured {record.get('criterion')} loss (no confidence bound)")
    needed = record["search"][0].get("images_needed_without_events") if record["search"] else None
    return "\n".join([
        "# Storage calibration",
        "",
        f"Policy `{record['policy']}`: per resolution, the read rule of the family (`count`: one scan count for "
        f"every image; `ssim`: the fewest scans whose SSIM vs the full decode at crop side {record['crop_side']} "
        f"reaches a threshold) that saves most while {guarantee} stays within {target} points vs reading every "
        f"scan{_at_crops(record)}. Judged on {pools}; the table below is on {record['heldout_images']} held-out "
        "images. Crops are area fractions; read savings = 1 - bytes read / file bytes (identical for every crop).",
        "",
        "## Held-out: full vs calibrated reads",
        "",
        markdown_table(rows, ["resolution", "crop", "acc_full", "acc_calibrated", "loss", "read_savings", "flag"],
                       ["res", "crop", "acc. full reads (%)", "acc. calibrated (%)", "loss (points)",
                        "read savings", ""]),
        "",
        "## Certified rules per family (pooled calibration images)",
        "",
        markdown_table(search, columns, heads),
        "",
        (f"With no event at all, a bound of {target} points needs {needed} images per family at this confidence; "
         "fewer can certify a shorter read only where it wins more answers than it loses (criterion `net`)."
         if needed else ""),
        "",
        "![Figure 6](calibration_sweep.png)",
    ])


def _search_row(certified: dict, families: Sequence[str]) -> dict:
    row = {"resolution": certified["resolution"], "chosen": certified["family"]}
    for walk in certified["families"]:
        f = walk["family"]
        if "skipped" in walk:
            row |= {f"{f}_rule": "n/a", f"{f}_savings": "", f"{f}_bound": ""}
            continue
        bound, stop = walk["bound"], walk.get("stopped_at")
        parts = ([] if bound is None else [f"{bound:.3f}"]) + ([f"next ({stop['label']}): {stop['bound']:.3f}"
                                                                 + _contradicted(stop)] if stop else [])
        row |= {f"{f}_rule": walk["label"], f"{f}_savings": walk["read_savings"], f"{f}_bound": "; ".join(parts)}
    return row


def _contradicted(stop: dict) -> str:
    """Why a step whose bound was within the target failed: its pools contradicted the pooling assumption."""
    from dynres.policy.bounds import ASSUMPTION_ALPHA

    p = stop.get("assumption_p")
    return "" if p is None or p >= ASSUMPTION_ALPHA else f", deployed backbone flips more than the judges (p = {p:.2g})"


def _at_crops(record: dict) -> str:
    crops = record.get("search_crops", [])
    return f", at each of the crop areas {', '.join(f'{c:g}' for c in crops)}" if len(crops) > 1 else ""
