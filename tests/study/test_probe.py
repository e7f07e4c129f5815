"""The backbone probe as a scale-model candidate on a finished chain: training features only from the shard
backbone that did not see the image, the probe's GFLOPs charged once and its answer reused at its resolution, and
the candidate beside the scale model in ``dynres bench scale``."""

import json
import shutil

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from dynres.bench.scale import ScaleBenchConfig
from dynres.model.checkpoint import load_checkpoint
from dynres.model.nets import gflops
from dynres.model.probe import ProbeConfig, ProbeHead, probe_pass
from dynres.model.train import TrainConfig
from dynres.study.chain import ChainConfig, run_accuracy_chain
from dynres.study.dynamic import DynamicConfig
from dynres.study.probe import probe_crop_rows, probe_record, probe_views, train_probe_data
from dynres.study.scale import ScaleConfig, fold_dir, shard_split
from dynres.study.scale_compare import compare_scale_targets
from dynres.study.static import EvalConfig
from tiny_store import MemoryStore

CROPS = (0.5, 1.0)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A finished tiny accuracy chain with two shard backbones (every training image labelled)."""
    root = tmp_path_factory.mktemp("probe")
    cfg = ChainConfig(backbone=TrainConfig(resolution=32, epochs=1, batch_size=8),
                      scale=ScaleConfig(folds=2, crops=CROPS, epochs=1, batch_size=8, arch="resnet_micro"),
                      eval=EvalConfig(crops=CROPS))
    train, val = MemoryStore(per_class=4), MemoryStore(per_class=2, offset=50)
    run_accuracy_chain(train, val, root / "run", cfg, progress=False)
    return root, train, val


def test_each_training_image_is_probed_by_the_shard_backbone_that_did_not_train_on_it(chain):
    root, train, _ = chain
    scale_dir = root / "run" / "scale"
    labels = pq.read_table(scale_dir / "scale_labels.parquet")
    grid = sorted(set(labels.column("resolution").to_pylist()))
    data = train_probe_data(train, labels, scale_dir, grid, CROPS, 16, None, progress=False)
    shards = shard_split(train, train.keys, 2, seed=0)  # the chain's split: fold f trained on every shard but f
    assert {k for k, _ in data["pairs"]} == set(train.keys)
    for (key, _), source in zip(data["pairs"], data["sources"]):
        fold = next(f for f, shard in enumerate(shards) if key in shard)
        assert source == fold_dir(scale_dir, 0, fold) / "model.pt"
    models = [load_checkpoint(fold_dir(scale_dir, 0, f) / "model.pt")[0] for f in range(2)]
    for f, model in enumerate(models):
        idx = [i for i, (k, _) in enumerate(data["pairs"]) if k in shards[f]]
        views = probe_views(train, [data["pairs"][i] for i in idx], 16, CROPS, None, False)
        assert torch.allclose(probe_pass(model, views)[0], data["logits"][idx], atol=1e-5)
        assert not torch.allclose(probe_pass(models[1 - f], views)[0], data["logits"][idx], atol=1e-3)
    # the head learns that same backbone's answers (its labels' row)
    right = {(k, c, r): ok for k, c, r, ok in zip(*(labels.column(n).to_pylist()
                                                    for n in ("key", "crop", "resolution", "correct")))}
    expected = [[float(right[(k, c, r)]) for r in grid] for k, c in data["pairs"]]
    assert data["targets"].tolist() == expected


def test_the_probe_is_charged_once_and_free_when_its_resolution_is_chosen():
    grid, cost = [16, 32], np.array([1.0, 4.0])
    p = np.array([[0.9, 0.1], [0.2, 0.8]])  # image 0 -> 16 (the probe's), image 1 -> 32
    ok = np.array([[True, False], [False, True]])
    static = [{"crop": 1.0, "resolution": 32, "accuracy": 50.0, "gflops": 4.0}]
    cfg = DynamicConfig(lambdas=(0.0, 10.0), plot=False)
    reused = probe_crop_rows(1.0, p, ok, grid, cost, 0, 1.0, static, cfg)
    assert reused["dynamic"][0]["gflops"] == pytest.approx(1.0 + (0.0 + 4.0) / 2)
    assert reused["dynamic"][0]["accuracy"] == 100.0 and reused["summary"][0]["probe_reused_pct"] == 50.0
    assert reused["cost_aware"][1]["gflops"] == pytest.approx(1.0)  # a large λ: every image keeps the probe's answer
    assert reused["summary"][0]["iso_cost_accuracy"] == 100.0  # λ = 0 costs 3 < 4 GFLOPs
    elsewhere = probe_crop_rows(1.0, p, ok, grid, cost, None, 0.5, static, cfg)  # probe off the grid: no reuse
    assert elsewhere["dynamic"][0]["gflops"] == pytest.approx(0.5 + (1.0 + 4.0) / 2)


def test_the_answer_at_the_probe_resolution_is_the_probes_own(chain):
    root, _, val = chain
    run = root / "run"
    backbone = run / "backbone" / "model.pt"
    grid = json.loads((run / "scale" / "scale.json").read_text())["grid"]
    cfg = ProbeConfig(topk=2)
    head = ProbeHead(5, len(grid))
    with torch.no_grad():
        head.net.weight.zero_()
        head.net.bias.copy_(torch.tensor([10.0] + [-10.0] * (len(grid) - 1)))  # always the probe resolution
    # a static table that is wrong where the probe is right (and right where it is wrong) at the probe's
    # resolution: the served answer must follow the probe, AUC and the oracle the table
    eval_dir = root / "flipped-eval"
    shutil.copytree(run / "eval", eval_dir, dirs_exist_ok=True)
    table = pq.read_table(eval_dir / "static_images.parquet")
    at_probe = pc.equal(table.column("resolution"), grid[0])
    flipped = pc.if_else(at_probe, pc.invert(table.column("correct")), table.column("correct"))
    pq.write_table(table.set_column(table.schema.get_field_index("correct"), "correct", flipped),
                   eval_dir / "static_images.parquet")
    rec = probe_record(backbone, head, cfg, val, eval_dir, grid, grid[0], None,
                       EvalConfig(grid=tuple(grid), crops=CROPS), progress=False)
    flipped_acc = {c: 100 * float(np.mean([not ok for ok, r, cc in zip(*(table.column(n).to_pylist() for n in (
        "correct", "resolution", "crop"))) if r == grid[0] and cc == c])) for c in CROPS}
    model, _ = load_checkpoint(backbone)
    for c, row in zip(CROPS, rec["dynamic"]):
        pairs = [(k, c) for k in val.keys]
        logits, _ = probe_pass(model, probe_views(val, pairs, grid[0], CROPS, None, False))
        right = logits.argmax(1).numpy() == np.array([val.label(k) for k in val.keys])
        assert row["accuracy"] == pytest.approx(100 * right.mean())
        assert abs(row["accuracy"] - flipped_acc[c]) > 1  # ... not the table's
        assert row["gflops"] == pytest.approx(gflops(model, grid[0]))  # one pass, nothing more
    assert rec["probe_reuse"] and {a["crop"] for a in rec["auc"]} == set(CROPS)


def test_probes_are_judged_beside_the_scale_model_in_the_bench(chain):
    root, train, val = chain
    payload = compare_scale_targets(train, val, root / "run", root / "bench",
                                    ScaleBenchConfig(targets=("correct",), probes=("softmax-linear", "pooled-mlp")),
                                    progress=False)
    names = {r["target"] for r in payload["rows"]}
    assert names == {"correct", "probe-softmax-linear", "probe-pooled-mlp"}
    assert payload["probe_gflops"]["probe-softmax-linear"] > 0
    assert all(r["probe_reused_pct"] is not None for r in payload["rows"] if r["target"].startswith("probe"))
    saved = torch.load(root / "bench" / "probe-pooled-mlp-seed0" / "probe_head.pt", weights_only=True)
    assert saved["config"]["head"] == "mlp" and saved["grid"] == payload["grid"]
    assert "Probe candidates" in (root / "bench" / "bench_scale.md").read_text()
