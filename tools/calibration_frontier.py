"""Every scan count's events at every resolution on a demo run's pools: the data behind docs/calibration.md.

    python tools/calibration_frontier.py runs/demo /tmp/frontier.json   # then --table to print the tables

Pools: the deployed backbone on all of val (calibration and held-out halves), and each shard backbone of the
accuracy chain on the training shard it did not see. Reads each prefix once for every resolution (the static
evaluation's views at crop side 0.875).
"""

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from dynres.io.store import open_store
from dynres.model.checkpoint import load_checkpoint
from dynres.policy.bounds import net_upper
from dynres.policy.calibration import ReadRule
from dynres.study.calibrate import CalibrationConfig, build_pools, judges_from_record
from dynres.study.certify import Pool, ViewPredictions
from dynres.study.static import GridModel


def measure(run: Path, out: Path) -> None:
    val, train = open_store(run / "store" / "val"), open_store(run / "store" / "train")
    # the evaluation grid (the quality index may cover only the calibration images: this table needs every image)
    grid = tuple(json.loads((run / "accuracy" / "eval" / "static.json").read_text())["grid"])
    model, meta = load_checkpoint(run / "accuracy" / "backbone" / "model.pt")
    areas = (0.875**2,)
    deployed = Pool("deployed", ViewPredictions(GridModel(model), val, grid, areas, False, 64), list(val.keys))
    judges = judges_from_record(train, run / "accuracy" / "scale" / "scale.json")
    pools = build_pools(deployed, judges, CalibrationConfig(judge_images=len(train.keys)), grid, areas, meta.classes)
    rows = []
    for k in range(1, max(int(p.num_scans.max()) for p in pools) + 1):
        for p in pools:
            for r in grid:
                j = p.judge(ReadRule("count", k), r)
                rows.append({"pool": "deployed" if p is deployed else "shards", "k": k, "resolution": r,
                             **{f: int(j[f][0]) for f in ("lost", "gained", "flipped")}, "n": j["n"],
                             "read": float(j["read"]), "size": float(j["size"])})
        print(f"{k} scans done", flush=True)
    out.write_text(json.dumps(rows))


def table(path: Path) -> None:
    agg = defaultdict(Counter)
    for r in json.loads(path.read_text()):
        for f in ("lost", "gained", "flipped", "n", "read", "size"):
            agg[(r["pool"], r["k"], r["resolution"])][f] += r[f]
    grid = sorted({r for _, _, r in agg})
    for pool in ("deployed", "shards"):
        print(f"\n{pool} (n = {agg[(pool, 1, grid[0])]['n']}): net loss (points) / flips (%) / 95% net bound")
        print("| scans | savings | " + " | ".join(f"{r} px" for r in grid) + " |")
        print("|---" * (len(grid) + 2) + "|")
        for k in sorted({k for p, k, _ in agg if p == pool})[:-1]:
            cells = []
            for r in grid:
                c = agg[(pool, k, r)]
                cells.append(f"{100 * (c['lost'] - c['gained']) / c['n']:+.2f} / {100 * c['flipped'] / c['n']:.1f} / "
                             f"{100 * net_upper(c['lost'], c['gained'], c['n'], 0.05):.2f}")
            c = agg[(pool, k, grid[0])]
            print(f"| {k} | {1 - c['read'] / c['size']:.0%} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1] == "--table":
        table(Path(sys.argv[2]))
    else:
        measure(Path(sys.argv[1]), Path(sys.argv[2]))
