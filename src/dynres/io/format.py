"""The store's on-disk format, shared by the writer (:mod:`dynres.io.ingest`) and the reader (:mod:`dynres.io.store`).

Layout::

    STORE/manifest.parquet        one row per image (see SCHEMA); written last, atomically
    STORE/ingest_report.json      counts (lossless, re-encoded per reason), seconds, every skipped file with its reason
    STORE/images/<class>/<name>.jpg
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1
MANIFEST = "manifest.parquet"
VERSION_KEY = b"dynres.format_version"
CLASSES_KEY = b"dynres.classes"
CONFIG_KEY = b"dynres.ingest_config"
LAYOUT_KEY = b"dynres.scan_layout"  # the scan layout as JSON (dynres.io.layout.store_layout); absent in older stores
IMAGES = "images"
REPORT = "ingest_report.json"

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
        ("lossless", pa.bool_()),  # the source's DCT coefficients, copied: a full read decodes to its pixels
        ("reason", pa.string()),  # why not lossless (or how, when not by jpegtran); "" for a jpegtran transcode
    ]
)

# Columns a manifest written before they existed lacks, and what a reader fills in: every image of such a store was
# re-encoded. New columns are additive (an older dynres reads a newer manifest and ignores them), so FORMAT_VERSION
# stays 1: a bump would make older readers refuse stores they read correctly.
LEGACY_COLUMNS = {"lossless": False, "reason": "re-encoded (stored before lossless ingest)"}

# A reason is one of these rules, optionally followed by " (detail)": reason_rule() gives the rule back, and the
# ingest report counts images per rule.
REASON_REQUESTED = "re-encoding requested"
REASON_NOT_JPEG = "not a JPEG source"
REASON_MAX_SIDE = "--max-side smaller than the image"
REASON_CMYK = "CMYK/YCCK JPEG"
REASON_ARITHMETIC = "arithmetic-coded JPEG"
REASON_PRECISION = "not an 8-bit JPEG"  # 12-bit
REASON_HIERARCHICAL = "lossless or hierarchical JPEG"
REASON_ORIENTATION = "EXIF orientation not lossless at this size"
REASON_HEADER = "unreadable JPEG header"
REASON_TRANSCODE_FAILED = "jpegtran failed"
REASON_MISSING = "jpegtran missing"
REASON_MOZJPEG = "jpegtran missing: mozjpeg lossless transcode"  # lossless, with mozjpeg's own scan script
# transcoded with the EXIF rotation done on the coefficients (jpegtran -perfect): no generation loss, but the
# rotated image's inverse DCT and chroma upsampling round differently: pixels within a few levels, so not lossless
REASON_ROTATED = "EXIF orientation applied to the DCT coefficients"
REASON_SCANS = "a custom scan script needs jpegtran"


def reason_rule(reason: str) -> str:
    """The rule of a manifest ``reason`` (its text before " (detail)")."""
    return reason.split(" (", 1)[0]
