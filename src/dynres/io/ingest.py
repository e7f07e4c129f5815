"""``ingest``: turn an ImageFolder tree into a progressive-JPEG store, in parallel, resumably, atomically.

A JPEG source is transcoded losslessly (:mod:`dynres.io.transcode`: a full read decodes to exactly its pixels); any
other image, and a JPEG that cannot be, is re-encoded at ``quality``. Each manifest row says which (``lossless``) and
why (``reason``); the report counts images per reason; a missing jpegtran is logged once, never silent.

Crash safety, in order of events:
  1. every image is written to a temporary name in its final folder, then renamed (never half a file);
  2. the main process appends each finished record to ``STORE/.ingest/journal.jsonl`` (flushed per line);
  3. the manifest is written last, once the images are synced to disk: temporary file, fsync, ``os.replace``,
     fsync of the folder;
  4. then the journal, stray temporaries and images no longer in the manifest are removed.
A store without ``manifest.parquet`` refuses to open, so a kill at any point leaves either no manifest or
a complete one. Before a file that an existing manifest references is rewritten, that manifest is removed.
Re-running verifies what the journal (or an existing manifest) lists — same encoder settings, same source
size and mtime, stored file size and sha256 — and re-encodes only the rest. One ingest at a time writes a store
(``.ingest.lock``, released by the system if the process dies), and a non-empty folder that holds no store is
refused: step 4 deletes what the manifest does not list. Which sources become which stored files:
:mod:`dynres.io.sources`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from dynres._ui import track
from dynres.errors import BadImageError, ConfigError, StoreError
from dynres.io.format import (
    CLASSES_KEY,
    CONFIG_KEY,
    FORMAT_VERSION,
    IMAGES,
    LAYOUT_KEY,
    MANIFEST,
    REASON_REQUESTED,
    REASON_ROTATED,
    REPORT,
    SCHEMA,
    VERSION_KEY,
    reason_rule,
)
from dynres.io.jpeg import (
    DEFAULT_MAX_PIXELS,
    check_scan_script,
    encode_progressive,
    load_error_reason,
    load_rgb,
    parse_scans,
    prefix_crc32s,
)
from dynres.io.layout import read_script, script_for_source, store_layout
from dynres.io.sources import Task, plan
from dynres.io.transcode import Transcoder, fallback_notice, find_transcoder, source_bytes

log = logging.getLogger(__name__)

JOURNAL = ".ingest/journal.jsonl"
LOCK = ".ingest.lock"  # held by the one ingest writing a store


@dataclass(frozen=True)
class IngestConfig:
    """How sources become stored files. ``lossless``: transcode JPEG sources (False: re-encode every image at
    ``quality``). ``workers``: processes (0: every core; 1: in this process). ``scans``: a jpegtran scan-script
    file; None = libjpeg's default script."""

    lossless: bool = True
    quality: int = 90
    max_side: int | None = None
    workers: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    scans: str | None = None
    chunksize: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.quality <= 100:
            raise ConfigError("quality", f"must be in 1..100, got {self.quality}")
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError("max_side", f"must be positive, got {self.max_side}")
        if self.workers < 0:
            raise ConfigError("workers", f"must be >= 0, got {self.workers}")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", f"must be positive, got {self.max_pixels}")
        if self.chunksize < 1:
            raise ConfigError("chunksize", f"must be positive, got {self.chunksize}")

    def fingerprint(self) -> dict:
        """The settings that determine the stored bytes: a resumed ingest reuses files only if they match."""
        script = None
        if self.scans is not None:
            script = hashlib.sha256(Path(self.scans).read_bytes()).hexdigest()
        return {"lossless": self.lossless, "quality": self.quality, "max_side": self.max_side,
                "scan_script_sha256": script}


@dataclass(frozen=True)
class IngestReport:
    """What one ``ingest`` call did. ``images_per_s`` counts newly encoded images over the whole call; ``lossless``,
    ``reasons`` (images per reason rule, :func:`dynres.io.format.reason_rule`) and the byte counts cover the
    manifest. ``transcoder``: the lossless route used (``jpegtran``, ``mozjpeg``; None: none available or wanted)."""

    store: str
    ingested: int
    reused: int
    skipped: list[tuple[str, str]]
    images: int  # rows in the manifest
    bytes: int  # stored bytes in total
    seconds: float
    images_per_s: float
    lossless: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    source_bytes: int = 0
    transcoder: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped"] = [{"file": f, "reason": r} for f, r in self.skipped]
        return d


def ingest(
    src_dir: str | os.PathLike, store_dir: str | os.PathLike, config: IngestConfig | None = None, progress: bool = True
) -> IngestReport:
    """Store every image under ``src_dir`` (ImageFolder layout) in a store at ``store_dir``: JPEGs transcoded
    losslessly where they can be, everything else re-encoded (each row's ``lossless`` and ``reason`` say which).

    Bad files are skipped and listed in the report (and ``STORE/ingest_report.json``); configuration
    problems raise. With ``workers != 1`` a script calling this needs the usual
    ``if __name__ == "__main__":`` guard (worker processes are started with forkserver/spawn).
    """

    cfg = config or IngestConfig()
    t0 = time.perf_counter()
    src, store_dir = _check_dirs(Path(src_dir), Path(store_dir), cfg)
    transcoder = _transcoder(cfg)
    fingerprint = {**cfg.fingerprint(), "transcoder": transcoder and transcoder.name}
    classes, tasks, skipped = plan(src)
    store_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(store_dir):
        records, reused = _encode_journaled(store_dir, tasks, skipped, cfg, transcoder, fingerprint, progress)
        rows = [records[t.key] for t in tasks if t.key in records]
        stored = {r["class_name"] for r in rows}
        empty = "no image of this class could be stored: it stays a class, with nothing to learn from"
        skipped.extend((f"{c}/", empty) for c in classes if c not in stored)
        seconds = time.perf_counter() - t0
        report = IngestReport(
            store=str(store_dir), ingested=len(records) - reused, reused=reused, skipped=skipped, images=len(rows),
            bytes=sum(r["size"] for r in rows), seconds=seconds,
            images_per_s=(len(records) - reused) / max(seconds, 1e-9),
            lossless=sum(bool(r["lossless"]) for r in rows), source_bytes=sum(r["source_size"] for r in rows),
            reasons=dict(Counter(reason_rule(r["reason"]) for r in rows if r["reason"]).most_common()),
            transcoder=transcoder and transcoder.name,
        )
        _write_store(store_dir, report, rows, classes, fingerprint, store_layout(cfg.scans, report.transcoder))
    return report


@contextlib.contextmanager
def _exclusive(store_dir: Path) -> Iterator[None]:
    """Hold the store's ingest lock: a second ingest into it (whose cleanup would delete the first one's files and
    journal) fails at once, named. Released by the operating system if this process dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(store_dir / LOCK, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(store_dir, "another ingest is writing this store; wait for it to finish") from None
        yield


def _transcoder(cfg: IngestConfig) -> Transcoder | None:
    """The lossless route for this ingest, with one log line when it is not jpegtran."""
    transcoder = find_transcoder() if cfg.lossless else None
    notice = fallback_notice(transcoder, cfg.quality) if cfg.lossless else None
    if notice:
        log.warning(notice)
    return transcoder


def _check_dirs(src: Path, store_dir: Path, cfg: IngestConfig) -> tuple[Path, Path]:
    """Fail before any work: a missing source, a store inside it, a scan script that cannot be applied."""
    if not src.is_dir():
        raise StoreError(src, "source directory not found")
    if store_dir.resolve().is_relative_to(src.resolve()) or src.resolve().is_relative_to(store_dir.resolve()):
        raise ConfigError(store_dir, f"the store and the source tree {src} must not hold one another")
    if store_dir.is_dir() and any(store_dir.iterdir()) and not any(
            (store_dir / name).exists() for name in (MANIFEST, JOURNAL, REPORT, LOCK)):
        # ingest deletes what its manifest does not list: a folder of other files is not one to write a store in
        raise ConfigError(store_dir, "exists, is not empty and holds no dynres store: give a new or empty folder")
    if cfg.scans is not None:
        check_scan_script(cfg.scans)
        read_script(cfg.scans)  # and lossless: every coefficient reaches bit 0 (libjpeg accepts scripts that drop bits)
    return src, store_dir


def _encode_journaled(store_dir: Path, tasks: list[Task], skipped: list[tuple[str, str]], cfg: IngestConfig,
                      transcoder: Transcoder | None, fingerprint: dict, progress: bool) -> tuple[dict[str, dict], int]:
    """Records by key for every task that yields one, and how many of them were reused; each new record is journaled
    as it arrives, and each failure appended to ``skipped``."""
    manifest = store_dir / MANIFEST
    previous, manifest_paths = _previous_records(manifest, store_dir / JOURNAL, fingerprint, CONFIG_KEY)
    # manifest_paths is None when an existing manifest has other settings or is unreadable
    records: dict[str, dict] = {}
    todo: list[Task] = []
    for task in tasks:
        rec = previous.get(task.key)
        if rec is not None and _reusable(store_dir, task, rec):
            records[task.key] = {**rec, "label": task.label, "class_name": task.class_name}
        else:
            todo.append(task)
    reused = len(records)
    journal = _open_journal(store_dir / JOURNAL, fingerprint)
    try:
        if manifest.exists() and (manifest_paths is None or any(t.path in manifest_paths for t in todo)):
            for rec in records.values():  # journal what is reused, so a crash from here on loses no work
                journal.write(json.dumps(rec, ensure_ascii=False) + "\n")
            journal.flush()
            manifest.unlink()  # about to rewrite files it references (or its settings differ): no longer complete
        for task, result in track(_encode_all(todo, store_dir, cfg, transcoder), len(todo), "ingest", progress):
            if isinstance(result, str):
                skipped.append((task.source, result))
                continue
            records[task.key] = result
            journal.write(json.dumps(result, ensure_ascii=False) + "\n")
            journal.flush()
    finally:
        journal.close()
    return records, reused


def _write_store(store_dir: Path, report: IngestReport, rows: list[dict], classes: list[str],
                 fingerprint: dict, layout: dict) -> None:
    """The report, then the manifest (atomically: the store is complete from here), then the journal and any file
    the manifest no longer references go. ``layout``: the scan layout the store records (:mod:`dynres.io.layout`)."""
    _atomic_write(store_dir / REPORT, json.dumps(report.to_dict(), indent=1, ensure_ascii=False).encode())
    metadata = {
        VERSION_KEY: str(FORMAT_VERSION).encode(),
        CLASSES_KEY: json.dumps(classes, ensure_ascii=False).encode(),
        CONFIG_KEY: json.dumps(fingerprint).encode(),
        LAYOUT_KEY: json.dumps(layout).encode(),
        b"dynres.created": datetime.now(timezone.utc).isoformat().encode(),
    }
    if hasattr(os, "sync"):  # every image on disk before a manifest says the store is complete (a power cut)
        os.sync()
    _write_parquet_atomic(pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata(metadata)), store_dir / MANIFEST)
    _cleanup(store_dir, {r["path"] for r in rows})


# --------------------------------------------------------------------------- resume


def _previous_records(manifest: Path, journal: Path, fingerprint: dict, config_key: bytes) -> tuple[dict, set | None]:
    """Records a resumed ingest may reuse (same encoder settings), and the paths an existing manifest
    references (None: it has other settings or cannot be read, so it must go before any file is written)."""
    records: dict[str, dict] = {}
    manifest_paths: set[str] | None = set()
    if manifest.exists():
        try:
            table = pq.read_table(manifest)
            meta = table.schema.metadata or {}
            if json.loads(meta.get(config_key, b"null")) == fingerprint:
                rows = table.to_pylist()
                manifest_paths = {r["path"] for r in rows}
                records.update((r["key"], r) for r in rows)
            else:
                manifest_paths = None
        except Exception:  # noqa: BLE001 - an unreadable manifest is not reused, only replaced
            manifest_paths = None
    if journal.exists():
        with open(journal, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if lines and _parse_line(lines[0]) == {"fingerprint": fingerprint}:
            for line in lines[1:]:
                rec = _parse_line(line)  # a SIGKILL may leave a partial last line: ignored
                if rec and "key" in rec:
                    records[rec["key"]] = rec
    return records, manifest_paths


def _parse_line(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _open_journal(path: Path, fingerprint: dict):
    """Append to a journal with these settings, or start a new one."""
    path.parent.mkdir(exist_ok=True)
    header = json.dumps({"fingerprint": fingerprint})
    if path.exists():
        with open(path, encoding="utf-8") as f:
            if f.readline().rstrip("\n") == header:
                return open(path, "a", encoding="utf-8")
    f = open(path, "w", encoding="utf-8")
    f.write(header + "\n")
    f.flush()
    return f


def _reusable(store_dir: Path, task: Task, rec: dict) -> bool:
    if (rec.get("source"), rec.get("path"), rec.get("source_size"), rec.get("source_mtime_ns")) != (
        task.source, task.path, task.source_size, task.source_mtime_ns,
    ):
        return False
    try:
        data = (store_dir / task.path).read_bytes()
    except OSError:
        return False
    return len(data) == rec.get("size") and hashlib.sha256(data).hexdigest() == rec.get("sha256")


# --------------------------------------------------------------------------- encoding


def _encode_all(todo: list[Task], store_dir: Path, cfg: IngestConfig, transcoder: Transcoder | None,
                encode: Callable | None = None) -> Iterator[tuple[Task, dict | str]]:
    """(task, record or skip reason) in task order; processes when workers > 1. A worker that dies (the OOM
    killer, a crash inside a decoder) costs a fresh pool: the first unfinished task is then encoded alone, in a
    pool of its own, and skipped, named, if it kills that worker too; the rest go on."""
    encode = encode or _encode_one
    args = [(t, str(store_dir), cfg, transcoder) for t in todo]
    workers = cfg.workers or os.cpu_count() or 1
    if workers == 1 or len(todo) <= 1:
        yield from zip(todo, map(encode, args))
        return
    start = 0
    while start < len(todo):
        pool = _pool(workers)
        try:
            for i, result in enumerate(pool.map(encode, args[start:], chunksize=cfg.chunksize), start):
                start = i + 1
                yield todo[i], result
        except BrokenProcessPool:
            yield todo[start], _alone(encode, args[start])
            start += 1
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: drop queued work, keep the journal


def _pool(workers: int) -> ProcessPoolExecutor:
    # forkserver: never fork a parent that may hold torch/OpenMP threads
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker)


def _alone(encode: Callable, arg: tuple) -> dict | str:
    """``encode(arg)`` in a worker of its own: its result, or why it was skipped when it kills that worker."""
    pool = _pool(1)
    try:
        return pool.submit(encode, arg).result()
    except BrokenProcessPool:
        return "its worker process died encoding it (out of memory, or a crash inside a decoder)"
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _init_worker() -> None:
    """Workers ignore Ctrl-C (the parent alone stops, cancels queued work and leaves the journal intact) and exit
    as soon as the parent dies: a SIGKILLed ingest leaves no pool behind (the forkserver follows its children)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True, name="exit-with-parent").start()


def _exit_with(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # ready when the parent process has ended
    os.kill(os.getpid(), signal.SIGKILL)  # nothing of this worker's is worth finishing: its results have no reader


def _encode_one(arg: tuple[Task, str, IngestConfig, Transcoder | None]) -> dict | str:
    """Store one source and write it atomically; a record for the manifest, or the reason it was skipped."""
    task, store_dir, cfg, transcoder = arg
    try:
        data, reason = None, f"{REASON_REQUESTED} (lossless=False)"
        if cfg.lossless:  # a JPEG source: transcoded if it can be, else the reason it cannot
            source = Path(task.source_abs).read_bytes()
            data, reason = source_bytes(source, task.source, transcoder, max_side=cfg.max_side,
                                        max_pixels=cfg.max_pixels, scans=script_for_source(cfg.scans, source))
        lossless = data is not None and not reason.startswith(REASON_ROTATED)
        if data is None:
            img = load_rgb(task.source_abs, max_pixels=cfg.max_pixels, max_side=cfg.max_side)
            data = encode_progressive(img, cfg.quality, cfg.scans)
        layout = parse_scans(data, task.source)
    except ConfigError:
        raise
    except BadImageError as err:
        return err.reason
    except Exception as err:  # noqa: BLE001 - one undecodable file must never stop a long ingest
        return load_error_reason(err)
    if not layout.progressive:
        return "encoder produced a non-progressive JPEG"
    data = data[: layout.scan_ends[-1]]
    out = os.path.join(store_dir, *task.path.split("/"))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, out)
    return {
        "key": task.key, "path": task.path, "label": task.label, "class_name": task.class_name,
        "width": layout.width, "height": layout.height, "size": len(data), "scan_ends": list(layout.scan_ends),
        "scan_crc32": prefix_crc32s(data, layout.scan_ends), "sha256": hashlib.sha256(data).hexdigest(),
        "source": task.source, "source_size": task.source_size, "source_mtime_ns": task.source_mtime_ns,
        "lossless": lossless, "reason": reason,
    }


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported (Windows): the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(table, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _cleanup(store_dir: Path, keep: set[str]) -> None:
    """Remove the journal, stray temporaries and images no longer in the manifest."""
    journal = store_dir / JOURNAL
    if journal.exists():
        journal.unlink()
    try:
        journal.parent.rmdir()
    except OSError:
        pass
    images = store_dir / IMAGES
    for dirpath, _, filenames in os.walk(images):
        for fname in filenames:
            full = os.path.join(dirpath, fname)
            if Path(full).relative_to(store_dir).as_posix() not in keep:
                os.unlink(full)
