"""run_inference dispatches to an engine by name; write_inference writes the predictions and their summary record."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from dynres.errors import ConfigError
from dynres.model.checkpoint import ModelMeta, save_checkpoint
from dynres.model.nets import create_model
from dynres.runtime.engine import EngineSpec, PipelineConfig
from dynres.runtime.infer import run_inference, write_inference
from pipeline_fixtures import make_store


def test_an_unknown_engine_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match="local, ray"):
        run_inference(EngineSpec("unused", "unused.pt"), "spark")


def test_local_inference_of_the_first_keys_and_its_records(tmp_path):
    store = make_store(tmp_path)
    torch.manual_seed(0)
    model = save_checkpoint(create_model("resnet_tiny", 2), ModelMeta("resnet_tiny", ("cat", "dog"), 48),
                            tmp_path / "b.pt")
    spec = EngineSpec(str(store.root), str(model), config=PipelineConfig(batch_size=4, resolution=48))
    result = run_inference(spec, "local", limit=3, progress=False)
    assert [p.key for p in result.predictions] == store.keys[:3]
    out = write_inference(result, spec, tmp_path / "run" / "preds.parquet")
    assert [r["key"] for r in pq.read_table(out).to_pylist()] == store.keys[:3]
    record = json.loads((tmp_path / "run" / "preds.json").read_text())
    assert record["summary"]["images"] == 3 and record["spec"] == str(spec)
    assert "- images: 3" in (tmp_path / "run" / "preds.md").read_text()


def test_the_ray_engine_needs_an_output_to_write_its_predictions_to():
    with pytest.raises(ConfigError, match="output"):
        run_inference(EngineSpec("unused", "unused.pt"), "ray")


def test_a_ray_result_gets_its_summary_record_and_no_second_parquet(tmp_path):
    from dynres.runtime.engine import InferenceResult

    result = InferenceResult([], {"images": 2, "engine": "ray", "output": "s3://bucket/preds"})
    write_inference(result, EngineSpec("store", "b.pt"), tmp_path / "preds.parquet")
    assert not (tmp_path / "preds.parquet").exists()  # the Ray workers wrote theirs under the output URI
    assert json.loads((tmp_path / "preds.json").read_text())["summary"]["output"] == "s3://bucket/preds"
