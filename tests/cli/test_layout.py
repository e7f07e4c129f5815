"""``dynres layout`` end to end on a tiny ImageFolder, then ``dynres ingest --scans`` with the script it chose: the
store records that layout."""

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from dynres.cli.app import app
from dynres.io.store import open_store
from dynres.model.checkpoint import ModelMeta, save_checkpoint
from dynres.model.nets import create_model
from tiny_store import MemoryStore

pytestmark = pytest.mark.skipif(shutil.which("jpegtran") is None, reason="custom scan scripts need jpegtran")


def source(tmp_path):
    mem = MemoryStore(per_class=2)
    for key in mem.keys:
        path = tmp_path / "src" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(mem.read(key))
    torch.manual_seed(0)
    ckpt = save_checkpoint(create_model("resnet_tiny", 3), ModelMeta("resnet_tiny", tuple(mem.classes), 32),
                           tmp_path / "b.pt")
    return tmp_path / "src", ckpt


def test_layout_then_ingest_with_the_chosen_script(tmp_path):
    src, ckpt = source(tmp_path)
    out = tmp_path / "layout"
    r = CliRunner().invoke(app, ["layout", str(src), "--model", str(ckpt), "--out", str(out), "--sample", "6",
                                 "--candidates", "sa-planes", "--resolutions", "24,32", "--workers", "1",
                                 "--backend", "eager", "--crop", "1.0"])
    assert r.exit_code == 0, r.output
    record = json.loads((out / "layout.json").read_text())
    assert [c["name"] for c in record["candidates"]] == ["libjpeg", "sa-planes"] and record["grid"] == [24, 32]
    assert record["images"] == 6 and record["config"]["crop"] == 1.0
    r = CliRunner().invoke(app, ["ingest", str(src), str(tmp_path / "store"), "--workers", "1",
                                 "--scans", str(out / "layout.scans")])
    assert r.exit_code == 0, r.output
    layout = open_store(tmp_path / "store").layout
    assert layout["name"] == record["chosen"] and layout["sha256"] == record["candidates"][
        [c["name"] for c in record["candidates"]].index(record["chosen"])]["sha256"]


@pytest.mark.parametrize("args, message", [
    (["--candidates", "no-such-layout"], "no-such-layout"),
    (["--sample", "1"], "sample"),
])
def test_bad_settings_are_one_line_errors(tmp_path, args, message):
    src, ckpt = source(tmp_path)
    r = CliRunner().invoke(app, ["layout", str(src), "--model", str(ckpt), "--out", str(tmp_path / "o"), *args])
    assert r.exit_code != 0 and message in str(r.exception)


def test_a_source_that_is_neither_a_store_nor_an_image_folder_is_named(tmp_path):
    _, ckpt = source(tmp_path)
    r = CliRunner().invoke(app, ["layout", str(tmp_path / "missing"), "--model", str(ckpt), "--out",
                                 str(tmp_path / "o"), "--candidates", "spectral"])
    assert r.exit_code != 0 and "missing" in str(r.exception) and "ImageFolder" in str(r.exception)
