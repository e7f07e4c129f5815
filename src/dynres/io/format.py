"""The store's on-disk format, shared by the writer (:mod:`dynres.io.ingest`) and the reader (:mod:`dynres.io.store`).

Layout::

    STORE/manifest.parquet        one row per image (see SCHEMA); written last, atomically
    STORE/ingest_report.json      counts, seconds and every skipped source file with its reason
    STORE/images/<class>/<name>.jpg
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST = "manifest.parquet"
VERSION_KEY = b"dynres.format_version"
CLASSES_KEY = b"dynres.classes"
CONFIG_KEY = b"dynres.ingest_config"

SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # source path relative to SRC, posix, without extension
        ("path", pa.string()),  # stored file relative to the store root
        ("label", pa.int64()),  # index into the sorted class folder names
        ("class_name", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("size", pa.int64()),  # file bytes
        ("scan_ends", pa.list_(pa.int64())),  # offset just past each scan; the last = size
        ("scan_crc32", pa.list_(pa.int64())),  # crc32 of file[:scan_ends[i]]: partial reads verify too
        ("sha256", pa.string()),  # of the whole file
        ("source", pa.string()),  # source file relative to SRC, with extension
        ("source_size", pa.int64()),  # with source_mtime_ns: lets a resumed ingest spot changed sources
        ("source_mtime_ns", pa.int64()),
    ]
)

IMAGES = "images"
REPORT = "ingest_report.json"
