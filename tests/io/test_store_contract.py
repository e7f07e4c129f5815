"""The store contract (``StoreLike``), held by every implementation: the real store, local and over fsspec, and the
tests' in-memory store. Functions across dynres take a ``StoreLike``; what passes here may be handed to them."""

import hashlib
import io
import uuid

import pytest
from PIL import Image

from dynres.io.ingest import IngestConfig, ingest
from dynres.io.jpeg import EOI, parse_scans, scan_prefix
from dynres.io.store import StoreLike, open_store
from tiny_store import MemoryStore


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    """The in-memory store's images, ingested into a real store."""
    src = tmp_path_factory.mktemp("src")
    mem = MemoryStore(per_class=2)
    for key in mem.keys:
        (src / key).parent.mkdir(parents=True, exist_ok=True)
        (src / key).write_bytes(mem.read(key))
    root = tmp_path_factory.mktemp("store") / "s"
    ingest(src, root, IngestConfig(workers=1), progress=False)
    return root


def memory_url(root) -> str:
    import fsspec

    url = f"memory://contract-{uuid.uuid4().hex}"
    fsspec.filesystem("memory").put(str(root), url.removeprefix("memory://"), recursive=True)
    return url


@pytest.fixture(params=["Store", "Store over fsspec", "MemoryStore"])
def store(request, ingested) -> StoreLike:
    """A fresh store of each kind: nothing read yet."""
    if request.param == "MemoryStore":
        return MemoryStore(per_class=2)
    return open_store(ingested if request.param == "Store" else memory_url(ingested))


def test_keys_labels_and_classes(store):
    assert isinstance(store, StoreLike)
    assert store.keys == sorted(set(store.keys)) and len(store.keys) == 6
    assert store.classes == ["class0", "class1", "class2"]
    for key in store.keys:  # the label is the index of the key's class folder
        assert store.classes[store.label(key)] == key.split("/")[0]


def test_scan_layout_is_the_files_own(store):
    for key in store.keys:
        ends = store.scan_ends(key)
        assert store.num_scans(key) == len(ends) > 1 and ends == sorted(set(ends))
        assert ends[-1] == store.size(key) == store.prefix_size(key) == store.prefix_size(key, 99)
        assert ends == list(parse_scans(store.read(key), key).scan_ends)
        assert [store.prefix_size(key, k) for k in range(1, len(ends) + 1)] == ends


def test_a_full_read_is_the_whole_file_with_its_sha256(store):
    for key in store.keys:
        data = store.read(key)
        assert len(data) == store.size(key) and hashlib.sha256(data).hexdigest() == store.sha256(key)
        assert store.read(key, None) == store.read(key, store.num_scans(key)) == store.read(key, 99) == data


def test_a_partial_read_is_a_decodable_prefix_as_scan_prefix_cuts_it(store):
    for key in store.keys:
        full, ends = store.read(key), store.scan_ends(key)
        for k in range(1, len(ends)):
            prefix = store.read(key, k)
            assert prefix == scan_prefix(full, ends, k) == full[: ends[k - 1]] + EOI
            assert len(prefix) == store.prefix_size(key, k) + len(EOI)
            Image.open(io.BytesIO(prefix)).load()


def test_bytes_read_counts_the_prefix_fetched_not_the_eoi(store):
    assert store.bytes_read == 0
    expected = 0
    for i, key in enumerate(store.keys):  # each key read once: nothing is cached yet
        scans = None if i == 0 else 1 + i % store.num_scans(key)
        store.read(key, scans)
        expected += store.prefix_size(key, scans)
        assert store.bytes_read == expected


def test_an_unknown_key_or_a_bad_scan_count_is_refused(store):
    with pytest.raises(KeyError):
        store.read("class0/no-such-image")
    with pytest.raises(ValueError, match="scans must be >= 1"):
        store.read(store.keys[0], 0)
