"""The Ray Data engine: pools sized to the cluster, predictions written as Parquet and identical to the local
engine's, requests counted per image; on a local Ray and on a real two-node cluster started by the test."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from dynres.errors import ConfigError
from dynres.runtime.engine import EngineSpec, PipelineConfig, build_engine
from dynres.runtime.ray import RayConfig, plan_pools
from pipeline_fixtures import make_store, save_tiny_checkpoints

# --- sizing: no Ray needed -----------------------------------------------------------------------------------------


def test_pools_autoscale_to_the_cluster_and_fit_it_at_their_largest():
    plan = plan_pools(RayConfig(layout="split"), {"CPU": 16.0})
    assert plan["layout"] == "split"
    assert plan["scale_actors"] == [1, 16] and plan["backbone_actors"] == [1, 16]
    assert 32 * plan["cpus_per_actor"] <= 16 - 0.5  # both pools at their largest, the I/O reserve left free
    assert plan["torch_threads"] == 1


def test_fixed_pools_share_the_cpus_and_run_torch_on_the_cpus_they_hold():
    plan = plan_pools(RayConfig(layout="split", scale_actors=1, backbone_actors=2), {"CPU": 64.0})
    assert plan["scale_actors"] == [1, 1] and plan["backbone_actors"] == [2, 2]
    assert plan["cpus_per_actor"] == 1.0 and plan["torch_threads"] == 1
    assert plan_pools(RayConfig(cpus_per_actor=4), {"CPU": 8})["torch_threads"] == 4
    assert plan_pools(RayConfig(), {"CPU": 8}, torch_threads=3)["torch_threads"] == 3


def test_a_fused_pool_runs_both_models_in_one_actor_holding_more_than_a_core_where_it_can():
    plan = plan_pools(RayConfig(), {"CPU": 2.0})  # CPUs only: fused by default
    assert plan["layout"] == "fused" and plan["scale_actors"] is None and plan["backbone_actors"] == [1, 2]
    one = plan_pools(RayConfig(backbone_actors=1), {"CPU": 2.0})
    assert one["cpus_per_actor"] == 1.5 and one["torch_threads"] == 2  # the local engine's 2 torch threads
    two = plan_pools(RayConfig(backbone_actors=2), {"CPU": 2.0})
    assert two["cpus_per_actor"] == 0.75 and two["torch_threads"] == 1  # two actors share the cores


def test_the_backbone_pool_follows_the_gpus_where_it_asks_for_them():
    plan = plan_pools(RayConfig(num_gpus=0.5, layout="split"), {"CPU": 8.0, "GPU": 2.0})
    assert plan["backbone_actors"] == [1, 4] and plan["gpus_per_backbone_actor"] == 0.5
    assert plan["scale_actors"] == [1, 8]
    assert (8 + 4) * plan["cpus_per_actor"] <= 8 - 0.5  # GPU backbone actors hold CPUs too: both pools fit
    assert plan_pools(RayConfig(num_gpus=0.5), {"CPU": 8.0, "GPU": 2.0})["layout"] == "fused"  # auto
    no_gpus = plan_pools(RayConfig(num_gpus=1, layout="split"), {"CPU": 8.0})
    assert no_gpus["backbone_actors"] == [1, 8] and no_gpus["gpus_per_backbone_actor"] == 0.0
    fused = plan_pools(RayConfig(num_gpus=1, layout="fused"), {"CPU": 8.0, "GPU": 2.0})
    assert fused["backbone_actors"] == [1, 2] and fused["gpus_per_backbone_actor"] == 1
    assert 2 * fused["cpus_per_actor"] <= 8 - 0.5  # both GPU actors' CPUs fit


@pytest.mark.parametrize("layout, actors", [("fused", 1), ("fused", None), ("split", 1)])
def test_no_actor_asks_for_more_cpus_than_the_largest_node_has(layout, actors):
    """Two 1-CPU nodes: an actor of 1.5 CPUs (the cluster's 2 less the reserve) could never be placed."""
    plan = plan_pools(RayConfig(layout=layout, backbone_actors=actors,
                                scale_actors=actors if layout == "split" else None), {"CPU": 2.0},
                      node_cpus=1.0)
    assert plan["cpus_per_actor"] <= 1.0


def test_actors_run_at_the_drivers_priority_unless_told_otherwise():
    assert plan_pools(RayConfig(), {"CPU": 2.0})["worker_niceness"] == 0
    assert plan_pools(RayConfig(worker_niceness=None), {"CPU": 2.0})["worker_niceness"] is None


def test_spread_splits_a_calls_total_over_its_rows_exactly():
    from dynres.runtime.ray_actors import spread

    assert spread(10, 4).tolist() == [3, 3, 2, 2] and spread(0, 3).tolist() == [0, 0, 0]
    assert int(spread(12345, 64).sum()) == 12345


@pytest.mark.parametrize("bad", [dict(scale_actors=0), dict(backbone_actors=-1), dict(num_gpus=-1),
                                 dict(cpus_per_actor=0), dict(batch_size=0), dict(num_cpus=0),
                                 dict(layout="pipelined"), dict(worker_niceness=20), dict(worker_niceness=-1),
                                 dict(layout="fused", scale_actors=2), dict(scale_actors=1)])
def test_a_bad_ray_config_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        RayConfig(**bad)


# --- on Ray --------------------------------------------------------------------------------------------------------

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    make_store(root, per_class=5)
    save_tiny_checkpoints(root)
    return root


def _spec(root: Path, **cfg) -> EngineSpec:
    return EngineSpec(str(root / "store"), str(root / "b.pt"), str(root / "s.pt"),
                      config=PipelineConfig(batch_size=3, lam=0.2, torch_threads=1, **cfg))


def _rows(out: Path) -> list[dict]:
    return sorted(pq.read_table(out).to_pylist(), key=lambda r: r["key"])


def _assert_same_predictions(rows: list[dict], local) -> None:
    names = local.classes
    expected = sorted(local.predictions, key=lambda p: p.key)
    assert [r["key"] for r in rows] == [p.key for p in expected]
    for r, p in zip(rows, expected):
        assert (r["resolution"], r["bytes_read"], r["label"]) == (p.resolution, p.bytes_read, names[p.label])
        assert r["top5_classes"] == [names[i] for i in p.top5]
        assert r["top5_probs"] == pytest.approx(p.top5_probs, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["fused", "split"])
def test_ray_engine_writes_the_local_engines_predictions_and_counts_requests(root, tmp_path, layout):
    from dynres.runtime.ray import run_ray

    ray.shutdown()
    try:
        for cfg in ({}, {"fetch_ahead": True}):
            spec = _spec(root, **cfg)
            local = build_engine(spec).run(progress=False)
            out = tmp_path / ("ahead" if cfg else "plain")
            remote = run_ray(spec, str(out), RayConfig(layout=layout, batch_size=4, num_cpus=2), progress=False)
            _assert_same_predictions(_rows(out), local)
            s, ls = remote.summary, local.summary
            assert remote.predictions == [] and s["output"] == str(out)
            assert (s["images"], s["accuracy"], s["resolution_histogram"]) == (10, ls["accuracy"],
                                                                                ls["resolution_histogram"])
            # the backbone actor fetches only the range the handed-over prefix lacks: the local engine's bytes
            assert (s["bytes_read"], s["requests"]) == (ls["bytes_read"], ls["requests"])
            assert s["ray"]["layout"] == layout and s["ray"]["cluster_cpus"] == 2
            assert s["ray"]["scale_actors"] == ([1, 2] if layout == "split" else None)
            assert s["work_s"]["scale_actors"] > 0 and s["work_s"]["backbone_actors"] > 0
        assert s["requests_per_image"] == 1.0  # fetch-ahead: one request per image
        again = run_ray(_spec(root), str(out), RayConfig(layout=layout, batch_size=4), limit=4, progress=False)
        assert again.summary["images"] == 4 and again.summary["failed"] == 0  # earlier files replaced, not mixed in
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_split_actors_reading_on_one_thread_count_each_images_own_requests(root, tmp_path):
    from dynres.runtime.ray import run_ray

    ray.shutdown()
    try:
        spec = _spec(root, fetch_ahead=True, workers=1)
        run_ray(spec, str(tmp_path / "out"), RayConfig(layout="split", batch_size=4, num_cpus=2), progress=False)
        rows = _rows(tmp_path / "out")
        # fetch-ahead: one request per image, each row its own (threads would share a call's total out evenly)
        assert [r["requests"] for r in rows] == [1] * 10
        assert all(r["bytes_fetched"] > 0 for r in rows)
    finally:
        ray.shutdown()


def test_the_output_must_not_hold_other_files(root, tmp_path):
    from dynres.runtime.ray import run_ray

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="notes.txt"):
        run_ray(_spec(root), str(tmp_path), RayConfig(), progress=False)


# --- a real two-node cluster on this machine -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    """``ray start ... --block``: the node's processes live as long as this one, and go when it is terminated."""
    ray_cli = Path(sys.executable).with_name("ray")
    return subprocess.Popen([str(ray_cli), "start", *args, "--block"], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)


def _processes_under(temp_dir: Path) -> list[int]:
    """PIDs whose command line names ``temp_dir``: every process of the nodes started with it."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(temp_dir).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_for(ready, nodes: list[subprocess.Popen], logs: list[Path], what: str, timeout: float = 120) -> None:
    """Poll ``ready()`` until true; fail at once, with its log, when a node process exits."""
    deadline = time.monotonic() + timeout
    while not ready():
        for node, log in zip(nodes, logs):
            if node.poll() is not None:
                pytest.fail(f"a Ray node exited ({what}): {log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out: {what}")
        time.sleep(0.5)


@pytest.fixture
def two_nodes(tmp_path, monkeypatch):
    """A head and a worker node (1 CPU each) with their own temp dir; yields the address; stops exactly them."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a loopback test cluster: no token to hand around
    temp = Path(tempfile.mkdtemp(prefix="dynres-ray-"))  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = _free_port()
    common = ["--num-cpus", "1", "--temp-dir", str(temp), "--object-store-memory", str(100 << 20),
              "--node-ip-address", "127.0.0.1"]
    logs = [tmp_path / "head.log", tmp_path / "worker.log"]
    nodes = [_ray_start(["--head", "--port", str(port), "--include-dashboard", "false", "--disable-usage-stats",
                         *common], logs[0], env)]
    try:
        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        _wait_for(listening, nodes, logs, "the head's port")
        nodes.append(_ray_start(["--address", f"127.0.0.1:{port}", *common], logs[1], env))
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):  # the worker first, then the head
            node.send_signal(signal.SIGTERM)
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
                node.wait()
        for pid in _processes_under(temp):  # anything that outlived its node: ours by its temp dir, none else
            os.kill(pid, signal.SIGKILL)
    assert not _processes_under(temp)
    shutil.rmtree(temp, ignore_errors=True)


# The driver runs in a fresh interpreter: a driver that already ran Ray jobs on a local cluster in this process (the
# tests above) can wait forever on the new cluster's first Ray Data task.
_DRIVER = """
import json, sys, time
import ray
from dynres.runtime.engine import EngineSpec, PipelineConfig
from dynres.runtime.ray import RayConfig, run_ray

root, out, address, result = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
deadline = time.monotonic() + 120
while ray.cluster_resources().get("CPU", 0) < 2:  # the worker joining
    if time.monotonic() > deadline:
        sys.exit("timed out: the worker joining")
    time.sleep(0.5)
spec = EngineSpec(f"{root}/store", f"{root}/b.pt", f"{root}/s.pt",
                  config=PipelineConfig(batch_size=3, lam=0.2, torch_threads=1))
for layout in ("split", "fused"):
    ray_cfg = RayConfig(layout=layout, scale_actors=2 if layout == "split" else None, backbone_actors=2,
                        batch_size=1, address=address)
    res = run_ray(spec, f"{out}/{layout}", ray_cfg, progress=False)
    json.dump(res.summary, open(f"{result}-{layout}", "w"), default=str)
"""


@pytest.mark.slow
def test_two_actors_per_stage_on_a_two_node_cluster_give_the_local_engines_predictions(root, tmp_path, two_nodes):
    import json

    local = build_engine(_spec(root)).run(progress=False)
    out, result = tmp_path / "preds", tmp_path / "summary.json"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run([sys.executable, "-c", _DRIVER, str(root), str(out), two_nodes, str(result)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(Path(f"{result}-split").read_text())
    rows = _rows(out / "split")
    _assert_same_predictions(rows, local)
    assert summary["ray"]["cpus_per_actor"] == pytest.approx(0.375)  # 4 actors in 2 CPUs less the reserve
    assert len({r["scale_actor"] for r in rows}) > 1 and len({r["backbone_actor"] for r in rows}) > 1
    assert summary["actors_seen"] == {"scale": 2, "backbone": 2}
    nodes = {a.split(":")[0] for r in rows for a in (r["scale_actor"], r["backbone_actor"])}
    assert len(nodes) == 2  # 4 actors of 0.375 CPU do not fit one 1-CPU node
    fused, rows = json.loads(Path(f"{result}-fused").read_text()), _rows(out / "fused")
    _assert_same_predictions(rows, local)
    assert fused["ray"]["cpus_per_actor"] == pytest.approx(0.75) and fused["actors_seen"]["backbone"] == 2
    assert len({r["backbone_actor"].split(":")[0] for r in rows}) == 2  # one fused actor per 1-CPU node
