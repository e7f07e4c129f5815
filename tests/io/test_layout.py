"""Scan layouts: the candidate scripts are valid, lossless for colour and grayscale sources, identified by their scans;
libjpeg's candidate is exactly what ``jpegtran -progressive`` writes; a store records the layout it was written with,
and a store from before that record still opens."""

import io
import shutil
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dynres.errors import ConfigError
from dynres.io.format import LAYOUT_KEY, MANIFEST
from dynres.io.ingest import IngestConfig, ingest
from dynres.io.layout import (
    CANDIDATES,
    DEFAULT_LAYOUT,
    LIBJPEG,
    ScanScript,
    candidate,
    describe_layout,
    parse_script,
    read_script,
    require_jpegtran,
)
from dynres.io.store import open_store
from jpeg_samples import jpeg_bytes

needs_jpegtran = pytest.mark.skipif(shutil.which("jpegtran") is None,
                                    reason="custom scan scripts need libjpeg-turbo's jpegtran (libjpeg-turbo-progs)")


def picture(seed: int, mode: str = "RGB", size=(80, 56)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 3, y * 4, (x + y) * 2], -1) + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).convert(mode)


SOURCES = {  # name: JPEG source (baseline, as cameras and the synthetic data write them)
    "c420": jpeg_bytes(picture(1)),
    "c444": jpeg_bytes(picture(2), subsampling=0),
    "gray": jpeg_bytes(picture(3, "L")),
}


def source_tree(root):
    for name, data in SOURCES.items():
        (root / "a").mkdir(parents=True, exist_ok=True)
        (root / "a" / f"{name}.jpg").write_bytes(data)
    return root


def test_libjpegs_candidate_is_the_script_jpegtran_progressive_writes_for_colour_and_gray(tmp_path):
    jpegtran = require_jpegtran()
    script = CANDIDATES[LIBJPEG]
    assert len(script.scans) == 10 and len(script.gray().scans) == 6  # shared/REFERENCE.md: 10 colour, 6 gray scans
    for name in ("c420", "gray"):
        components = 1 if name == "gray" else 3
        path = script.for_components(components).write(tmp_path / f"{name}.txt")
        by_script = subprocess.run([jpegtran, "-copy", "none", "-optimize", "-scans", str(path)],
                                   input=SOURCES[name], capture_output=True, check=True).stdout
        default = subprocess.run([jpegtran, "-copy", "none", "-optimize", "-progressive"],
                                 input=SOURCES[name], capture_output=True, check=True).stdout
        assert by_script == default


@needs_jpegtran
@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_every_candidate_stores_colour_and_gray_sources_losslessly_and_the_store_records_it(tmp_path, name):
    script = CANDIDATES[name]
    path = script.write(tmp_path / "layout.scans")
    ingest(source_tree(tmp_path / "src"), tmp_path / "store", IngestConfig(scans=str(path), workers=1),
           progress=False)
    store = open_store(tmp_path / "store")
    for key in store.keys:
        stem = key.split("/")[-1]
        assert store.record(key)["lossless"] and store.record(key)["reason"] == ""
        full = np.asarray(Image.open(io.BytesIO(store.read(key))))
        assert np.array_equal(full, np.asarray(Image.open(io.BytesIO(SOURCES[stem]))))  # pixel-identical
        expected = script.gray() if stem == "gray" else script
        assert store.num_scans(key) == len(expected.scans)
        Image.open(io.BytesIO(store.read(key, scans=1))).load()  # a one-scan prefix decodes
    assert store.layout["name"] == name and store.layout["sha256"] == script.sha256
    assert store.layout["libjpeg_default"] == (name == LIBJPEG)


def test_a_store_without_a_script_records_libjpegs_default_and_an_old_store_still_opens(tmp_path):
    ingest(source_tree(tmp_path / "src"), tmp_path / "store", IngestConfig(workers=1), progress=False)
    store = open_store(tmp_path / "store")
    assert store.layout["name"] == DEFAULT_LAYOUT and store.layout["libjpeg_default"]
    assert store.layout["sha256"] == CANDIDATES[LIBJPEG].sha256
    table = pq.read_table(tmp_path / "store" / MANIFEST)  # a manifest written before layouts were recorded
    meta = {k: v for k, v in table.schema.metadata.items() if k != LAYOUT_KEY}
    pq.write_table(table.replace_schema_metadata(meta), tmp_path / "store" / MANIFEST)
    old = open_store(tmp_path / "store")
    assert old.layout is None
    assert all(old.read(k) for k in old.keys)
    assert describe_layout(store.layout) == f"{DEFAULT_LAYOUT} ({CANDIDATES[LIBJPEG].sha256[:12]})"
    assert describe_layout(None).startswith("not recorded")  # what `dynres bench io` prints for an old store


def test_the_hash_is_of_the_scans_so_comments_and_spacing_do_not_change_it(tmp_path):
    script = CANDIDATES["sa-planes"]
    spaced = "# made by hand\n" + script.body().replace(", ", " ,  ").replace(";", " ;  # a comment")
    again = parse_script(spaced, "sa-planes")
    assert again.sha256 == script.sha256 and again.ident == script.ident
    assert read_script(script.write(tmp_path / "s.txt")).name == "sa-planes"  # the name travels in a comment
    assert parse_script(script.body()).name == "custom"
    assert candidate(str(tmp_path / "s.txt")) == script and candidate("spectral") is CANDIDATES["spectral"]
    assert CANDIDATES["libjpeg-split"].sha256 != CANDIDATES[LIBJPEG].sha256


@pytest.mark.parametrize("text, message", [
    ("0: 1-63, 0, 0; 0,1,2: 0-0, 0, 0; 1: 1-63, 0, 0; 2: 1-63, 0, 0;", "come before its DC"),
    ("0,1,2: 0-0, 0, 0; 0,1: 1-63, 0, 0; 2: 1-63, 0, 0;", "exactly one component"),
    ("0,1,2: 0-0, 0, 1; 0,1,2: 0-0, 1, 1; 0: 1-63,0,0; 1: 1-63,0,0; 2: 1-63,0,0;", "Al = Ah - 1"),
    ("0,1,2: 0-0, 0, 0; 0: 1-63, 2, 1; 1: 1-63,0,0; 2: 1-63,0,0;", "coefficient 1 of component 0 is at bit none"),
    ("0,1,2: 0-0, 0, 0; 0: 1-63, 0, 1; 1: 1-63, 0, 0; 2: 1-63, 0, 0;", "never reach bit 0"),  # lossy
    ("0,1,2: 0-0, 0, 0; 0: 1-20, 0, 0; 1: 1-63, 0, 0; 2: 1-63, 0, 0;", "coefficients 21-63 never reach bit 0"),
    ("0,1,2: 0-0, 0, 0; 0: 0-63, 0, 0;", "0-0 (DC) or within 1-63"),
    ("0,1: 0-0, 0, 0; 0: 1-63,0,0; 1: 1-63,0,0;", "1 (gray) or 3 (YCbCr) components"),
    ("0,1,2 0-0 0 0;", "cannot read scan"),
])
def test_invalid_or_lossy_scripts_are_refused_with_the_reason(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_script(text, "bad")


@needs_jpegtran
def test_ingest_refuses_a_lossy_script_before_any_work(tmp_path):
    path = tmp_path / "lossy.txt"
    path.write_text("0,1,2: 0-0, 0, 0; 0: 1-63, 0, 1; 1: 1-63, 0, 0; 2: 1-63, 0, 0;")  # libjpeg accepts this
    with pytest.raises(ConfigError, match="lossy.txt.*never reach bit 0"):
        ingest(source_tree(tmp_path / "src"), tmp_path / "store", IngestConfig(scans=str(path), workers=1),
               progress=False)
    assert not (tmp_path / "store").exists()


def test_custom_scripts_say_what_is_missing_without_libjpeg_turbos_jpegtran(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="libjpeg-turbo's jpegtran.*no jpegtran on PATH"):
        require_jpegtran()


def test_a_script_for_colour_cannot_store_other_component_counts():
    assert CANDIDATES["spectral"].for_components(3) is CANDIDATES["spectral"]
    assert CANDIDATES["spectral"].for_components(1).components == 1
    with pytest.raises(ConfigError, match="4-component"):
        CANDIDATES["spectral"].for_components(4)
    with pytest.raises(ConfigError, match="letters, digits"):
        ScanScript("no spaces", CANDIDATES[LIBJPEG].scans)
