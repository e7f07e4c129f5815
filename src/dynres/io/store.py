"""The progressive-JPEG store: ordinary ``.jpg`` files plus one Parquet manifest, read scan by scan.

The layout is :mod:`dynres.io.format`'s (written by :func:`dynres.io.ingest.ingest`). A read of the first k scans
fetches only ``file[:scan_ends[k-1]]`` and appends an EOI marker, so a low-resolution decode costs a fraction of the
bytes. Reading more scans of a key already partly read fetches only the missing range (a small LRU of prefixes).
Local directories are read with plain files; any other fsspec URL (HTTP, S3, memory, ...) with ranged ``cat_file``
calls. Every manifest path must stay inside the store: one that is absolute, has a drive or contains ``..`` is
refused when the store opens.

Per-resolution quality data is not here: it lives in a sibling ``quality.parquet`` keyed by ``key``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import zlib
from collections import OrderedDict
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynres.errors import ChecksumError, KeyNotFoundError, StoreError
from dynres.io.format import CLASSES_KEY, FORMAT_VERSION, LAYOUT_KEY, LEGACY_COLUMNS, MANIFEST, SCHEMA, VERSION_KEY
from dynres.io.jpeg import EOI

__all__ = ["FORMAT_VERSION", "SCHEMA", "Store", "StoreLike", "open_store"]


@runtime_checkable
class StoreLike(Protocol):
    """What the rest of dynres needs of a store: keys and labels, scan layout, hashes and prefix reads.

    :class:`Store` is the implementation; anything else passed as ``store`` (a test's in-memory store) must pass
    the same contract test (``tests/io/test_store_contract.py``). ``bytes_read`` counts bytes fetched from
    storage: a read of k scans fetches at most ``prefix_size(key, k)`` bytes, and the EOI marker appended to a
    partial read is not a read.
    """

    keys: list[str]
    classes: list[str]
    bytes_read: int

    def label(self, key: str) -> int: ...

    def sha256(self, key: str) -> str: ...

    def num_scans(self, key: str) -> int: ...

    def scan_ends(self, key: str) -> list[int]: ...

    def size(self, key: str) -> int: ...

    def prefix_size(self, key: str, scans: int | None = None) -> int: ...

    def read(self, key: str, scans: int | None = None) -> bytes: ...


def open_store(
    path_or_url: str | os.PathLike, *, cache_entries: int = 256, cache_bytes: int = 64 << 20, verify: bool = True
) -> "Store":
    """Open a store from a local directory or any fsspec URL; the manifest is read once, here."""
    root = os.fspath(path_or_url)
    if "://" in root and not root.startswith("file://"):
        import fsspec

        fs, fs_root = fsspec.core.url_to_fs(root)
        name = f"{root.rstrip('/')}/{MANIFEST}"
        try:
            data = fs.cat_file(f"{fs_root.rstrip('/')}/{MANIFEST}")
        except FileNotFoundError:
            raise StoreError(name, _MISSING) from None
        except OSError as err:
            raise StoreError(name, f"cannot read the manifest: {err}") from err
        table = _parse_manifest(pa.BufferReader(data), name)
        return Store(fs_root, table, fs, cache_entries=cache_entries, cache_bytes=cache_bytes, verify=verify)
    root = root.removeprefix("file://")
    if not os.path.isdir(root):
        raise StoreError(root, "no such store directory")
    name = os.path.join(root, MANIFEST)
    if not os.path.isfile(name):
        raise StoreError(name, _MISSING)
    table = _parse_manifest(name, name)
    return Store(root, table, None, cache_entries=cache_entries, cache_bytes=cache_bytes, verify=verify)


_MISSING = "no manifest: ingest did not finish (re-run `dynres ingest SRC STORE` to resume) or this is not a store"


def _parse_manifest(source: Any, name: str) -> pa.Table:
    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError) as err:
        raise StoreError(name, f"manifest is truncated or corrupt ({err})") from err
    meta = table.schema.metadata or {}
    if VERSION_KEY not in meta:
        raise StoreError(name, "not a dynres manifest (no dynres.format_version in its metadata)")
    try:
        version = int(meta[VERSION_KEY])
    except ValueError:
        raise StoreError(name, f"unreadable format version {meta[VERSION_KEY]!r}") from None
    if version > FORMAT_VERSION:
        raise StoreError(
            name, f"written by a newer dynres (format version {version} > {FORMAT_VERSION}); upgrade dynres to read it"
        )
    missing = [f.name for f in SCHEMA if f.name not in table.column_names and f.name not in LEGACY_COLUMNS]
    if missing:
        raise StoreError(name, f"manifest lacks columns {missing}")
    for column, value in LEGACY_COLUMNS.items():  # a store written before the column existed: what it means there
        if column not in table.column_names:
            field = SCHEMA.field(column)
            table = table.append_column(field, pa.array([value] * table.num_rows, field.type))
    return table


# A path escapes when it is empty or absolute, or when, read as POSIX or as Windows, a component is ``..`` or starts
# with a drive (``C:``: Windows' path join drops everything before it). A backslash alone is kept: ingest writes class
# folder names as they are, and on POSIX a backslash is an ordinary character.
_ESCAPING = r"^$|^[/\\]|(^|[/\\])\.\.([/\\]|$)|(^|[/\\])[A-Za-z]:"


def _refuse_escaping_paths(root: str, manifest: pa.Table) -> None:
    """Raise StoreError naming the first key whose manifest path could name a file outside the store."""
    paths = manifest.column("path")
    bad = pc.match_substring_regex(paths, _ESCAPING).fill_null(True)
    if not pc.any(bad).as_py():
        return
    i = pc.index(bad, True).as_py()
    key, path = manifest.column("key")[i].as_py(), paths[i].as_py()
    if not path:
        why = "empty"
    elif path[0] in "/\\":
        why = "absolute"
    elif ".." in re.split(r"[/\\]", path):
        why = "contains '..'"
    else:
        why = "has a drive letter"
    raise StoreError(key, f"manifest path {path!r} escapes the store {root} ({why}): refused")


def _flat_lists(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """A list column as (offsets, values) numpy arrays: compact for millions of rows, cheap to pickle."""
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(arr) == 0:
        return np.zeros(1, np.int64), np.zeros(0, np.int64)
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    values = np.asarray(arr.values, dtype=np.int64)
    return offsets, values


class Store:
    """Read-only view of an ingested store. Use :func:`open_store` rather than the constructor.

    Thread-safe; picklable (a copy, e.g. in each DataLoader worker, starts with an empty cache and
    zeroed counters). ``bytes_read`` counts bytes actually fetched from storage; the EOI marker
    appended to a partial read is not a read. ``requests`` counts the storage requests that fetched them (one
    ranged GET, or one seek + read of a local file, per fetch): against an object store each costs a round trip
    and a fee whatever its size, so the engines report both per image.
    """

    def __init__(
        self, root: str, manifest: pa.Table, fs: Any = None, *, cache_entries: int = 256,
        cache_bytes: int = 64 << 20, verify: bool = True,
    ):
        self.root = root
        self.manifest = manifest
        self.verify = verify
        self.cache_entries, self.cache_bytes = cache_entries, cache_bytes
        self._fs = fs  # None: a local directory
        self.classes: list[str] = json.loads(manifest.schema.metadata.get(CLASSES_KEY, b"[]"))
        self.keys: list[str] = manifest.column("key").to_pylist()
        self._index = {k: i for i, k in enumerate(self.keys)}
        if len(self._index) != len(self.keys):
            raise StoreError(root, "manifest has duplicate keys")
        _refuse_escaping_paths(root, manifest)
        self._paths: list[str] = manifest.column("path").to_pylist()
        self._sha: list[str] = manifest.column("sha256").to_pylist()
        self._labels = manifest.column("label").to_numpy()
        self._sizes = manifest.column("size").to_numpy()
        self._end_off, self._end_val = _flat_lists(manifest.column("scan_ends"))
        self._crc_off, self._crc_val = _flat_lists(manifest.column("scan_crc32"))
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached_bytes = 0
        self.bytes_read = 0
        self.reads = 0
        self.requests = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for name in ("_lock", "_cache", "_cached_bytes", "bytes_read", "reads", "requests"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def __repr__(self) -> str:
        return f"Store({self.root!r}, images={len(self)}, classes={len(self.classes)})"

    # ---------------------------------------------------------------- metadata (no I/O)

    def _row(self, key: str) -> int:
        try:
            return self._index[key]
        except KeyError:
            raise KeyNotFoundError(key, f"not in store {self.root}") from None

    def record(self, key: str) -> dict:
        """The manifest row of ``key`` as a dict."""
        return self.manifest.slice(self._row(key), 1).to_pylist()[0]

    def label(self, key: str) -> int:
        return int(self._labels[self._row(key)])

    def size(self, key: str) -> int:
        return int(self._sizes[self._row(key)])

    def sha256(self, key: str) -> str:
        """The stored file's SHA-256 (from the manifest: nothing is read)."""
        return self._sha[self._row(key)]

    def scan_ends(self, key: str) -> list[int]:
        i = self._row(key)
        return self._end_val[self._end_off[i] : self._end_off[i + 1]].tolist()

    def num_scans(self, key: str) -> int:
        i = self._row(key)
        return int(self._end_off[i + 1] - self._end_off[i])

    def prefix_size(self, key: str, scans: int | None = None) -> int:
        """Bytes a ``read(key, scans)`` fetches from a cold cache (EOI marker excluded)."""
        ends = self.scan_ends(key)
        return ends[-1] if scans is None or scans >= len(ends) else ends[_check_scans(scans) - 1]

    def location(self, key: str) -> str:
        """The stored file's local path or URL."""
        rel = self._paths[self._row(key)]
        if self._fs is None:
            return os.path.join(self.root, *rel.split("/"))
        return f"{self.root.rstrip('/')}/{rel}"

    @property
    def layout(self) -> dict | None:
        """The scan layout the ingest wrote (:func:`dynres.io.layout.store_layout`: ``name``, ``sha256``,
        ``script``, ``libjpeg_default``), or None for a store ingested before layouts were recorded."""
        raw = (self.manifest.schema.metadata or {}).get(LAYOUT_KEY)
        return json.loads(raw) if raw else None

    @property
    def filesystem(self) -> Any:
        """The fsspec filesystem holding the store (a local one for a directory), with :attr:`root`: files kept
        beside the manifest (the quality index) are read and written through it."""
        if self._fs is not None:
            return self._fs
        import fsspec

        return fsspec.filesystem("file")

    # ---------------------------------------------------------------- reads

    def read(self, key: str, scans: int | None = None) -> bytes:
        """The first ``scans`` scans of ``key`` as a decodable JPEG (``None`` or >= num_scans: the file).

        A full read is byte-identical to the stored file and checked against its sha256; a partial
        read is ``file[:scan_ends[k-1]] + FFD9`` and checked against the crc32 of that prefix.
        """
        i = self._row(key)
        ends = self._end_val[self._end_off[i] : self._end_off[i + 1]]
        full = scans is None or scans >= len(ends)
        k = len(ends) if full else _check_scans(scans)
        end = int(ends[k - 1])
        with self._lock:
            cached = self._cache.pop(key, b"")
            if cached:
                self._cached_bytes -= len(cached)
        fetched = 0
        if len(cached) >= end:
            data = cached[:end]
        else:
            new = self._fetch(key, i, len(cached), end)
            fetched = len(new)
            data = cached + new
        if self.verify:
            self._check(key, i, data, k, full)
        keep = data if len(data) > len(cached) else cached
        with self._lock:
            self.bytes_read += fetched
            self.reads += 1
            self.requests += 1 if fetched else 0
            if not full and len(keep) <= self.cache_bytes:  # a full read has nothing left to fetch
                # another thread's read of the same key may have cached a prefix meanwhile: replace it, uncounted
                self._cached_bytes += len(keep) - len(self._cache.pop(key, b""))
                self._cache[key] = keep
                while len(self._cache) > self.cache_entries or self._cached_bytes > self.cache_bytes:
                    self._cached_bytes -= len(self._cache.popitem(last=False)[1])
        return data if full else data + EOI

    def hold(self, key: str, data: bytes) -> None:
        """Take ``data``, the result of an earlier :meth:`read` of ``key`` (in another process, say: a Ray stage's
        prefix handed to the next stage), as a cached prefix: a later read fetches only what it lacks. Nothing is
        fetched or checked here; the next read checks the prefix it returns as usual."""
        ends = self.scan_ends(key)
        n = len(data)
        if n not in ends and n - len(EOI) in ends and data.endswith(EOI):  # a partial read: drop its EOI marker
            data = data[: n - len(EOI)]
        elif n not in ends:
            raise ValueError(f"{key}: {n} bytes are not a prefix read of it (no scan ends there)")
        with self._lock:
            old = self._cache.pop(key, b"")
            keep = data if len(data) >= len(old) else old
            self._cached_bytes += len(keep) - len(old)
            self._cache[key] = keep
            while len(self._cache) > self.cache_entries or self._cached_bytes > self.cache_bytes:
                self._cached_bytes -= len(self._cache.popitem(last=False)[1])

    def reset_stats(self) -> None:
        """Zero ``bytes_read``, ``reads`` and ``requests`` and drop cached prefixes."""
        with self._lock:
            self._cache.clear()
            self._cached_bytes = 0
            self.bytes_read = 0
            self.reads = 0
            self.requests = 0

    def _fetch(self, key: str, i: int, start: int, end: int) -> bytes:
        where = self.location(key)
        try:
            if self._fs is None:
                with open(where, "rb") as f:
                    f.seek(start)
                    data = f.read(end - start)
            else:
                data = self._fs.cat_file(where, start=start, end=end)
        except FileNotFoundError:
            raise StoreError(f"{key} ({where})", "stored file is missing") from None
        except OSError as err:
            raise StoreError(f"{key} ({where})", f"cannot read: {err}") from err
        if len(data) > end - start:
            # a server that ignores Range sends the whole file: keep the accounting honest
            raise StoreError(where, f"storage ignored the byte range {start}-{end} and sent {len(data)} bytes")
        if len(data) < end - start:
            raise ChecksumError(
                f"{key} ({where})", f"file is shorter than the manifest says ({start + len(data)} < {end} bytes)"
            )
        return data

    def _check(self, key: str, i: int, data: bytes, k: int, full: bool) -> None:
        if full:
            ok = hashlib.sha256(data).hexdigest() == self._sha[i]
            what = "sha256"
        else:
            ok = zlib.crc32(data) == int(self._crc_val[self._crc_off[i] + k - 1])
            what = f"crc32 of the first {k} scans"
        if not ok:
            raise ChecksumError(f"{key} ({self.location(key)})",
                                f"{what} does not match the manifest (file changed or corrupt)")


def _check_scans(scans: int) -> int:
    if int(scans) < 1:
        raise ValueError(f"scans must be >= 1 (or None for the whole file), got {scans}")
    return int(scans)
