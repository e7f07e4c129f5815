"""`bench ray`: synthesized stores behave as the real one, the driver's memory is sampled, and a whole run on a tiny
store writes every table (throughput, driver memory, requests against a loopback S3 server) into its record."""

from __future__ import annotations

import json
import time

import pytest

from dynres.bench.ray import RayBenchConfig, driver_rss, run_bench_ray, synthesize_store
from dynres.errors import ConfigError
from dynres.io.store import open_store
from pipeline_fixtures import make_store, save_tiny_checkpoints


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-ray")
    make_store(root, per_class=4)
    save_tiny_checkpoints(root)
    return root


def test_a_synthesized_store_repeats_the_images_under_new_keys(root, tmp_path):
    store = open_store(root / "store")
    big = open_store(synthesize_store(str(root / "store"), 19, tmp_path / "big"))
    assert len(big) == 19 and big.keys[:8] == store.keys and big.keys[8] == f"{store.keys[0]}#1"
    assert big.read(big.keys[8], 2) == store.read(store.keys[0], 2)
    assert big.label(big.keys[18]) == store.label(store.keys[2])


def test_a_synthesized_policy_reads_each_repeated_image_as_its_original(root, tmp_path):
    import numpy as np

    from dynres.bench.ray import synthesize_policy
    from dynres.policy.calibration import CalibrationPolicy, ReadRule, load_policy

    store = open_store(root / "store")
    counts = np.array([[1 + i % 3, 2] for i in range(len(store.keys))])
    CalibrationPolicy({32: ReadRule("ssim", 0.9), 64: ReadRule("count", 2)}, tuple(store.keys), counts).save(
        tmp_path / "p.json")
    big = load_policy(synthesize_policy(str(tmp_path / "p.json"), str(root / "store"), 19, tmp_path / "big.json"))
    for i in range(19):
        key = store.keys[i % 8] + ("" if i < 8 else f"#{i // 8}")
        assert big.scans(key, 32) == counts[i % 8, 0] and big.scans(key, 64) == 2


def test_driver_rss_sees_a_peak_that_is_gone_by_the_end():
    import mmap

    with driver_rss(0.01) as memory:
        block = mmap.mmap(-1, 64 << 20)  # 64 MB of fresh pages (an allocator may reuse resident ones), touched
        block.write(b"\x01" * (64 << 20))
        time.sleep(0.2)
        block.close()
    assert memory["rss_peak_mb"] - memory["rss_start_mb"] >= 50
    assert memory["rss_growth_mb"] == memory["rss_peak_mb"] - memory["rss_start_mb"]


@pytest.mark.parametrize("bad", [dict(images=-1), dict(actors=()), dict(actors=(0,)), dict(memory_images=(0,)),
                                 dict(layouts=()), dict(layouts=("fused", "pipelined")), dict(worker_niceness=20)])
def test_a_bad_bench_config_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        RayBenchConfig(**bad)


@pytest.mark.slow
def test_bench_ray_records_throughput_driver_memory_and_requests(root, tmp_path):
    pytest.importorskip("ray")
    pytest.importorskip("moto.server", reason="moto[server] (the dev extra) serves S3 on loopback")
    cfg = RayBenchConfig(images=12, actors=(1, 2), batch_size=2, ray_batch=2, memory_images=(24,), s3_images=6,
                         num_cpus=2)
    run_bench_ray(str(root / "store"), str(root / "b.pt"), str(root / "s.pt"), tmp_path, cfg=cfg, progress=False)
    record = json.loads((tmp_path / "bench_ray.json").read_text())
    modes = [r["mode"] for r in record["throughput"]]
    assert modes == ["local", "ray fused, 1 actor", "ray fused, 2 actors", "ray split, 1 actor per stage",
                     "ray split, 2 actors per stage"]
    local, one, two, split_one, split_two = record["throughput"]
    # 12 images from a store of 8: its images repeated under new keys, every engine on the same 12
    assert all(r["images"] == 12 and r["accuracy"] == pytest.approx(local["accuracy"]) for r in record["throughput"])
    assert one["actors_seen"] == {"scale": 1, "backbone": 1} and two["actors_seen"] == {"scale": 2, "backbone": 2}
    assert split_two["actors_seen"] == {"scale": 2, "backbone": 2} and split_two["ray"]["layout"] == "split"
    assert two["ray"]["layout"] == "fused" and two["ray"]["worker_niceness"] == 0
    ratios = record["ratios"]
    assert ratios["ray fused, 2 actors"]["vs_local"] == pytest.approx(two["steady_images_per_s"] / local["images_per_s"])
    assert ratios["ray split, 2 actors per stage"]["vs_first_ray_row"] == pytest.approx(
        split_two["steady_images_per_s"] / split_one["steady_images_per_s"])  # against its own layout's first row
    assert [r["images"] for r in record["driver_memory"]] == [24]
    assert all(r["rss_peak_mb"] >= r["rss_start_mb"] > 0 for r in record["throughput"] + record["driver_memory"])
    requests = {r["mode"]: r for r in record["requests"]}
    assert all(r["images"] == 6 for r in requests.values())
    assert requests["local dynamic, fetch-ahead"]["requests_per_image"] == 1.0
    assert requests["local dynamic, read-ahead"]["requests_per_image"] == 1.0
    assert requests["ray fused dynamic, fetch-ahead"]["requests_per_image"] == 1.0
    assert requests["ray split dynamic, fetch-ahead"]["requests_per_image"] == 1.0
    plain, mid, ahead = (requests[m] for m in ("local dynamic", "local dynamic, fetch-ahead @48 px",
                                                "local dynamic, fetch-ahead"))
    assert 1 <= mid["requests_per_image"] <= plain["requests_per_image"]  # a margin up to the median resolution's
    assert plain["bytes_per_image"] <= mid["bytes_per_image"] <= ahead["bytes_per_image"]
    for row in requests.values():  # the store's count is the server's (the manifest reads aside)
        assert row["server_gets_per_image"] == row["requests_per_image"]
    # the Ray engine costs the local engine's requests and bytes: the prefix it hands over is not fetched again
    for layout in ("fused", "split"):
        for a in ("local dynamic", "local dynamic, fetch-ahead"):
            b = a.replace("local", f"ray {layout}")
            assert requests[a]["requests_per_image"] == requests[b]["requests_per_image"] >= 1
            assert requests[a]["bytes_per_image"] == requests[b]["bytes_per_image"]
    markdown = (tmp_path / "bench_ray.md").read_text()
    assert "Requests/image" in markdown and "ray fused, 24 images" in markdown
