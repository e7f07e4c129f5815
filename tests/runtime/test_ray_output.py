"""The Ray engine's summary, computed from written prediction files: exact sums, the actors seen, and a steady
rate over the span the actors worked (no Ray needed)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynres.runtime.ray_output import SCHEMA, summarize_output


def _rows(n: int, started: float, finished: float, actor: str, requests: int = 1) -> list[dict]:
    return [{"key": f"{actor}-{i}", "label": "cat", "top5_classes": ["cat", "dog"], "top5_probs": [0.9, 0.1],
             "resolution": 112, "lam": 0.0, "bytes_read": 100, "file_bytes": 400, "latency_ms": 5.0,
             "started_at": started, "finished_at": finished, "requests": requests, "bytes_fetched": 100,
             "scale_actor": actor, "backbone_actor": actor, "scale_ms": 1.0, "backbone_ms": 3.0} for i in range(n)]


def test_the_steady_rate_spans_the_first_call_start_to_the_last_batch_end(tmp_path):
    # two actors' calls ending together: a rate between batch *ends* would see almost no span (10 images in
    # 0.01 s); the actors worked from t=100 to t=102 for 20 images
    pq.write_table(pa.Table.from_pylist(_rows(10, 100.0, 101.99, "a"), SCHEMA), tmp_path / "a.parquet")
    pq.write_table(pa.Table.from_pylist(_rows(10, 100.5, 102.0, "b", requests=2), SCHEMA), tmp_path / "b.parquet")
    s = summarize_output(str(tmp_path), wall_s=10.0, lam=0.0, batch_rows=7)  # several record batches
    assert s["images"] == 20 and s["images_per_s"] == 2.0
    assert s["steady_images_per_s"] == pytest.approx(20 / 2.0)
    assert s["requests"] == 30 and s["requests_per_image"] == 1.5 and s["bytes_per_image"] == 100
    assert s["accuracy"] == 100.0 and s["actors_seen"] == {"scale": 2, "backbone": 2}
    assert s["work_s"] == {"scale_actors": pytest.approx(0.02), "backbone_actors": pytest.approx(0.06)}
