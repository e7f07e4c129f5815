"""Reading a store: exact prefixes, exact byte accounting, ranged HTTP reads, integrity and open errors."""

import functools
import http.server
import io
import pickle
import re
import shutil
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import dynres
from dynres.errors import ChecksumError, KeyNotFoundError, StoreError
from dynres.io.format import FORMAT_VERSION
from dynres.io.ingest import IngestConfig, ingest
from dynres.io.store import Store, open_store


def make_tree(root, names=("cat/IMG 001.png", "cat/ünïcode é.jpg", "dog/a.png", "dog/sub/b.webp", "dog/c.bmp")):
    rng = np.random.default_rng(1)
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        y, x = np.mgrid[0:48, 0:64]
        img = np.stack([x * 4, y * 5, (x * y + 40 * i) % 256], -1) + rng.normal(0, 8, (48, 64, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return root


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    base = tmp_path_factory.mktemp("store")
    ingest(make_tree(base / "src"), base / "store", IngestConfig(workers=1), progress=False)
    return base / "store"


@pytest.fixture
def store(store_dir):
    return open_store(store_dir)


def file_bytes(store: Store, key: str) -> bytes:
    with open(store.location(key), "rb") as f:
        return f.read()


def test_a_store_lists_keys_labels_and_records(store):
    assert isinstance(store, dynres.Store) and len(store) == 5
    assert store.classes == ["cat", "dog"]
    assert store.keys == ["cat/IMG 001", "cat/ünïcode é", "dog/a", "dog/c", "dog/sub/b"]
    assert [store.label(k) for k in store.keys] == [0, 0, 1, 1, 1]
    rec = store.record("dog/sub/b")
    assert rec["class_name"] == "dog" and rec["source"] == "dog/sub/b.webp" and (rec["width"], rec["height"]) == (64, 48)
    assert store.num_scans("dog/a") == 10 and store.scan_ends("dog/a")[-1] == store.size("dog/a")


def test_full_read_is_the_file_and_partial_read_is_its_prefix_plus_eoi(store):
    for key in store.keys:
        data = file_bytes(store, key)
        ends = store.scan_ends(key)
        assert store.read(key) == data and store.read(key, scans=99) == data
        assert store.read(key, scans=3) == data[: ends[2]] + b"\xff\xd9"
        Image.open(io.BytesIO(store.read(key, scans=1))).load()


def test_bytes_read_counts_exactly_what_was_fetched(store):
    key = "cat/IMG 001"
    ends = store.scan_ends(key)
    store.read(key, scans=2)
    assert store.bytes_read == ends[1] == store.prefix_size(key, 2)
    store.read(key, scans=5)  # only the missing range [end2, end5) is fetched
    assert store.bytes_read == ends[4]
    store.read(key, scans=3)  # already cached
    assert store.bytes_read == ends[4]
    store.read(key)
    assert store.bytes_read == ends[-1] == store.size(key)
    store.reset_stats()
    assert store.bytes_read == 0 and store.reads == 0


def test_the_prefix_cache_is_bounded(store_dir):
    store = open_store(store_dir, cache_entries=2)
    a, b, c = store.keys[:3]
    for key in (a, b, c):  # a is evicted by c
        store.read(key, scans=1)
    before = store.bytes_read
    store.read(c, scans=2)
    assert store.bytes_read - before == store.prefix_size(c, 2) - store.prefix_size(c, 1)
    before = store.bytes_read
    store.read(a, scans=2)
    assert store.bytes_read - before == store.prefix_size(a, 2)


def test_concurrent_reads_from_threads_are_correct(store):
    jobs = [(k, s) for k in store.keys for s in (1, 4, None)] * 3
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: store.read(*job), jobs))
    for (key, scans), data in zip(jobs, results):
        full = file_bytes(store, key)
        assert data == (full if scans is None else full[: store.scan_ends(key)[scans - 1]] + b"\xff\xd9")


def test_the_cache_counts_each_cached_prefix_once_when_threads_read_one_key(store):
    """Two threads that miss the cache for one key both cache their prefix; the second replaces the first, and the
    byte count that bounds the cache must say so (else phantom bytes pile up and evict every prefix for good)."""
    key = store.keys[0]
    gate = threading.Barrier(2)
    fetch = store._fetch

    def both_miss_then_fetch(*args):  # both threads are past the cache lookup before either caches
        gate.wait(timeout=10)
        return fetch(*args)

    store._fetch = both_miss_then_fetch
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda s: store.read(key, scans=s), (2, 3)))
    cached = sum(len(v) for v in store._cache.values())  # one prefix: whichever thread cached last
    assert store._cached_bytes == cached and cached in {store.prefix_size(key, s) for s in (2, 3)}


def test_a_pickled_store_is_a_fresh_reader(store):
    store.read(store.keys[0], scans=2)
    copy = pickle.loads(pickle.dumps(store))
    assert copy.bytes_read == 0 and copy.keys == store.keys
    assert copy.read(store.keys[0], scans=2) == store.read(store.keys[0], scans=2)
    assert copy.bytes_read == store.prefix_size(store.keys[0], 2)


def test_unknown_key_and_bad_scan_count(store):
    with pytest.raises(KeyNotFoundError, match="cat/nope: not in store"):
        store.read("cat/nope")
    with pytest.raises(KeyError):
        store.label("cat/nope")
    with pytest.raises(ValueError, match="scans must be >= 1"):
        store.read("dog/a", scans=0)


@pytest.fixture
def copy_of(store_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(store_dir, dst)
    return dst


def test_a_changed_file_fails_its_checksum_naming_key_and_path(copy_of):
    store = open_store(copy_of)
    key = "dog/a"
    ends = store.scan_ends(key)
    path = store.location(key)
    data = bytearray(file_bytes(store, key))
    data[ends[3] + 5] ^= 0x01  # inside scan 5
    with open(path, "wb") as f:
        f.write(data)
    assert store.read(key, scans=4)  # the first four scans are intact
    with pytest.raises(ChecksumError, match=r"dog/a \(.*a\.jpg\): crc32 of the first 5 scans"):
        store.read(key, scans=5)
    with pytest.raises(ChecksumError, match="sha256 does not match"):
        store.read(key)


def test_a_truncated_or_missing_file_is_reported(copy_of):
    store = open_store(copy_of)
    with open(store.location("dog/a"), "r+b") as f:
        f.truncate(store.scan_ends("dog/a")[1])
    with pytest.raises(ChecksumError, match="shorter than the manifest"):
        store.read("dog/a", scans=4)
    (copy_of / store.record("dog/c")["path"]).unlink()
    with pytest.raises(StoreError, match="dog/c.*missing"):
        store.read("dog/c")


def test_opening_a_missing_or_incomplete_store_fails_clearly(copy_of, tmp_path):
    with pytest.raises(StoreError, match="no such store directory"):
        open_store(tmp_path / "nowhere")
    manifest = copy_of / "manifest.parquet"
    data = manifest.read_bytes()
    manifest.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="manifest.parquet: manifest is truncated or corrupt"):
        open_store(copy_of)
    manifest.unlink()
    with pytest.raises(StoreError, match="ingest did not finish"):
        open_store(copy_of)


def test_a_manifest_from_a_newer_format_or_another_tool_is_refused(store_dir, copy_of):
    table = pq.read_table(store_dir / "manifest.parquet")
    meta = dict(table.schema.metadata)
    meta[b"dynres.format_version"] = str(FORMAT_VERSION + 1).encode()
    pq.write_table(table.replace_schema_metadata(meta), copy_of / "manifest.parquet")
    with pytest.raises(StoreError, match=f"newer dynres \\(format version {FORMAT_VERSION + 1} > {FORMAT_VERSION}\\)"):
        open_store(copy_of)
    pq.write_table(table.replace_schema_metadata({}), copy_of / "manifest.parquet")
    with pytest.raises(StoreError, match="not a dynres manifest"):
        open_store(copy_of)


def test_a_store_written_before_the_lossless_columns_opens_reads_and_says_it_was_re_encoded(store_dir, copy_of):
    table = pq.read_table(store_dir / "manifest.parquet")
    old = table.drop_columns(["lossless", "reason"]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(old, copy_of / "manifest.parquet")  # what a version-1 ingest wrote before the columns existed
    store = open_store(copy_of)
    assert store.keys == open_store(store_dir).keys and "lossless" not in pq.read_schema(copy_of / "manifest.parquet")
    for key in store.keys:
        assert store.read(key) == file_bytes(store, key) and store.read(key, scans=2).endswith(b"\xff\xd9")
        rec = store.record(key)
        assert rec["lossless"] is False and rec["reason"] == "re-encoded (stored before lossless ingest)"
    pq.write_table(old.drop_columns(["sha256"]), copy_of / "manifest.parquet")
    with pytest.raises(StoreError, match=r"manifest lacks columns \['sha256'\]"):  # only the new ones may be absent
        open_store(copy_of)


def with_path(manifest: pa.Table, key: str, path: str) -> pa.Table:
    """The manifest with ``key``'s stored path replaced, its schema metadata kept."""
    paths = [path if k == key else p for k, p in zip(manifest["key"].to_pylist(), manifest["path"].to_pylist())]
    table = manifest.set_column(manifest.schema.get_field_index("path"), "path", pa.array(paths, pa.string()))
    return table.replace_schema_metadata(manifest.schema.metadata)


ESCAPES = [("../outside.jpg", "contains '..'"), ("images/dog/../../../etc/passwd", "contains '..'"),
           ("/etc/passwd", "absolute"), ("C:/Windows/win.ini", "has a drive letter"),
           ("images\\..\\..\\x.jpg", "contains '..'"), ("images/D:x.jpg", "has a drive letter"),
           ("\\\\server\\share\\x.jpg", "absolute"), ("", "empty")]


@pytest.mark.parametrize("bad, why", ESCAPES)
def test_a_manifest_path_that_escapes_the_store_is_refused_naming_the_key(store_dir, copy_of, bad, why):
    table = with_path(pq.read_table(store_dir / "manifest.parquet"), "dog/a", bad)
    pq.write_table(table, copy_of / "manifest.parquet")
    for where in (copy_of, f"file://{copy_of}"):
        with pytest.raises(StoreError, match=rf"^dog/a: manifest path .* escapes the store .*\({why}\): refused"):
            open_store(where)


def test_paths_that_stay_inside_the_store_still_open(store_dir, copy_of):
    table = pq.read_table(store_dir / "manifest.parquet")
    stored = table["path"].to_pylist()[table["key"].to_pylist().index("dog/a")]
    pq.write_table(with_path(table, "dog/a", "./" + stored.replace("/", "//")), copy_of / "manifest.parquet")
    assert open_store(copy_of).read("dog/a") == open_store(store_dir).read("dog/a")


# ------------------------------------------------------------------ fsspec URLs


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files with single-range support and records (path, Range header, body bytes) per GET."""

    def do_GET(self):  # noqa: N802
        path = self.translate_path(self.path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        if rng:
            start, end = re.fullmatch(r"bytes=(\d+)-(\d*)", rng).groups()
            body = data[int(start) : int(end) + 1 if end else len(data)]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{int(start) + len(body) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        # recorded before the body goes out: once the client has the bytes, the test may read the log
        self.server.log.append((urllib.parse.unquote(self.path), rng, len(body)))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(store_dir):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(store_dir.parent))
    )
    server.log = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{store_dir.name}", server.log
    server.shutdown()
    server.server_close()


@pytest.mark.network
def test_http_reads_fetch_only_the_ranges_asked_for(store, http_root):
    url, log = http_root
    remote = open_store(url)
    assert [entry[0] for entry in log] == [f"/{store.root.rsplit('/', 1)[-1]}/manifest.parquet"]  # read once
    assert remote.keys == store.keys
    log.clear()
    key = "cat/ünïcode é"  # a space and unicode in the URL
    ends = remote.scan_ends(key)
    assert remote.read(key, scans=2) == store.read(key, scans=2)
    assert remote.read(key, scans=5) == store.read(key, scans=5)
    assert remote.read(key) == file_bytes(store, key)
    assert [(r, n) for _, r, n in log] == [
        (f"bytes=0-{ends[1] - 1}", ends[1]),
        (f"bytes={ends[1]}-{ends[4] - 1}", ends[4] - ends[1]),
        (f"bytes={ends[4]}-{ends[-1] - 1}", ends[-1] - ends[4]),
    ]
    assert log[0][0].endswith("images/cat/ünïcode é.jpg")
    assert remote.bytes_read == sum(n for _, _, n in log) == store.size(key)


@pytest.mark.network
def test_an_http_store_without_manifest_fails_clearly(http_root):
    url, _ = http_root
    with pytest.raises(StoreError, match="ingest did not finish"):
        open_store(url + "-missing")


def in_memory(store_dir, name: str):
    """A copy of the store in fsspec's memory filesystem at ``memory://name``; returns that filesystem."""
    import fsspec

    mem = fsspec.filesystem("memory")
    for path in store_dir.rglob("*"):
        if path.is_file():
            mem.pipe_file(f"/{name}/" + path.relative_to(store_dir).as_posix(), path.read_bytes())
    return mem


def test_any_fsspec_url_works(store_dir):
    mem = in_memory(store_dir, "dynres-test")
    remote = open_store("memory://dynres-test")
    local = open_store(store_dir)
    assert all(remote.read(k, scans=3) == local.read(k, scans=3) for k in local.keys)
    assert remote.bytes_read == local.bytes_read
    mem.rm("/dynres-test", recursive=True)


def test_an_fsspec_store_refuses_a_manifest_path_that_escapes_it(store_dir):
    mem = in_memory(store_dir, "dynres-escape")
    mem.pipe_file("/secret.jpg", b"not the store's")
    table = with_path(pq.read_table(store_dir / "manifest.parquet"), "cat/IMG 001", "../secret.jpg")
    with mem.open("/dynres-escape/manifest.parquet", "wb") as f:
        pq.write_table(table, f)
    try:
        with pytest.raises(StoreError, match=r"^cat/IMG 001: manifest path '\.\./secret\.jpg' escapes the store"):
            open_store("memory://dynres-escape")
    finally:
        mem.rm("/dynres-escape", recursive=True)
        mem.rm("/secret.jpg")


@pytest.mark.network
def test_requests_count_the_gets_the_server_answered(store, http_root):
    url, log = http_root
    remote = open_store(url)
    log.clear()
    key = "dog/a"
    remote.read(key, scans=2)
    remote.read(key, scans=5)  # the missing range only: one more request
    remote.read(key, scans=3)  # in the cache: none
    assert remote.requests == len(log) == 2 and remote.reads == 3
    remote.reset_stats()
    assert remote.requests == 0


def test_a_held_prefix_from_another_reader_is_not_fetched_again(store_dir):
    first, second = open_store(store_dir), open_store(store_dir)
    key = "cat/IMG 001"
    ends = first.scan_ends(key)
    prefix = first.read(key, scans=2)  # as a Ray stage hands it to the next: with its EOI marker
    second.hold(key, prefix)
    assert second.read(key, scans=5) == first.read(key, scans=5)
    assert (second.requests, second.bytes_read) == (1, ends[4] - ends[1])  # only the range the prefix lacks
    whole = open_store(store_dir)
    whole.hold(key, first.read(key))
    assert whole.read(key) == first.read(key) and whole.requests == 0
    with pytest.raises(ValueError, match="not a prefix read"):
        whole.hold(key, prefix[:-3])
