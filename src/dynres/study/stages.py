"""Cached stages: the study's one way of deciding that a recorded result is still valid for its inputs.

A result is recorded as JSON next to its outputs. :func:`recorded` returns that record when it can be read and
a caller's test says it was made from the same inputs, else None (then the caller computes and records again
with :func:`write_json`). :class:`Study` runs the demo's named stages on it: each stage's record in
``RUN/stages/NAME.json`` carries a digest of its inputs (its own settings plus the keys of the stages it depends
on), so an interrupted or repeated run resumes where it stopped and a changed setting re-runs that stage and
everything downstream. The accuracy chain and the dynamic evaluation reuse their records through the same
function.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynres._ui import console, enabled
from dynres.version import __version__


def recorded(path: str | Path, valid: Callable[[dict], bool], force: bool = False) -> dict | None:
    """The JSON record at ``path`` if ``valid(record)`` says it was made from these inputs; None when it is
    missing, unreadable, not an object, made from other inputs, or ``force`` is set."""
    if force:
        return None
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and valid(record) else None


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (a crash leaves the previous file or none, never half of one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)
    return path


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def digest(obj: Any) -> str:
    """A short hash of a JSON-able object (the key a stage's inputs are recorded under)."""
    return hashlib.sha256(json.dumps(_by_content(obj), sort_keys=True, default=str).encode()).hexdigest()[:16]


def store_key(*stores: Any) -> list:
    """Stores' contents as a stage input: each one's classes and every (key, sha256) of its manifest."""
    from dynres.policy.quality import manifest_hash

    return [[list(s.classes), manifest_hash(s)] for s in stores]


def _by_content(obj: Any) -> Any:
    """Weight files named by an ``init`` setting count by their content, not their path: the same demo run from
    another checkout (its bundled weights elsewhere) is the same run."""
    if isinstance(obj, dict):
        return {k: _weights_hash(v) if k == "init" and v else _by_content(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_by_content(v) for v in obj]
    return obj


def _weights_hash(path: Any) -> str:
    from dynres.errors import CheckpointError
    from dynres.model.checkpoint import checkpoint_digest

    try:
        return "sha256:" + checkpoint_digest(path)
    except CheckpointError:  # not there (yet): the stage will say so; its name is all there is to key on
        return str(path)


RUN_DIR = "$RUN"  # a recorded path inside the directory of its record's owner starts so (:func:`portable`)


def portable(obj: Any, root: Path) -> Any:
    """``obj`` with every path inside ``root`` written relative to it (``$RUN/...``): a run directory moved or
    copied elsewhere reads its own files, not those where it was made (:func:`local` reads them back)."""
    if isinstance(obj, dict):
        return {k: portable(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [portable(v, root) for v in obj]
    if isinstance(obj, str):
        for prefix in dict.fromkeys((str(root), str(Path(root).resolve()))):
            if obj == prefix or obj.startswith(prefix + os.sep):
                return RUN_DIR + obj[len(prefix):]
    return obj


def local(obj: Any, root: Path) -> Any:
    """A recorded ``obj`` with its ``$RUN`` paths in ``root`` (:func:`portable`)."""
    if isinstance(obj, dict):
        return {k: local(v, root) for k, v in obj.items()}
    if isinstance(obj, list):
        return [local(v, root) for v in obj]
    if isinstance(obj, str) and (obj == RUN_DIR or obj.startswith(RUN_DIR + os.sep)):
        return str(root) + obj[len(RUN_DIR):]
    return obj


class Study:
    """Runs named stages in order under ``out``, skipping those whose recorded inputs match; ``force`` runs every
    stage again."""

    def __init__(self, out: str | Path, total_stages: int, force: bool = False):
        self.dir = Path(out)
        self.force = force
        self.records: dict[str, dict] = {}
        self.total = total_stages
        self.t0 = time.perf_counter()

    def stage(self, name: str, inputs: dict, fn: Callable[[], dict], after: tuple[str, ...] = ()) -> dict:
        """``fn()``'s outputs, from the stage's record when its inputs and upstream stages are unchanged."""
        key = digest({"version": __version__, "inputs": inputs, "after": [self.records[a]["key"] for a in after]})
        path = self.dir / "stages" / f"{name}.json"
        n = len(self.records) + 1
        rec = recorded(path, lambda r: r.get("key") == key, self.force)
        if rec is not None:
            self.say(f"[{n}/{self.total}] {name}: up to date (cached {rec['seconds']:.1f} s)")
            rec["outputs"] = local(rec["outputs"], self.dir)
            self.records[name] = rec
            return rec["outputs"]
        self.say(f"[{n}/{self.total}] {name} …")
        t0 = time.perf_counter()
        # the old record goes first: fn() rewrites the outputs it names, so a crash midway must not leave it
        # answering for them (set back, the old inputs would read as done)
        path.unlink(missing_ok=True)
        outputs = fn()
        rec = {"name": name, "key": key, "inputs": inputs, "outputs": outputs, "seconds": time.perf_counter() - t0}
        write_json(path, rec | {"outputs": portable(outputs, self.dir)})
        self.records[name] = rec
        self.say(f"[{n}/{self.total}] {name}: done in {rec['seconds']:.1f} s")
        return outputs

    def say(self, msg: str, style: str = "bold cyan") -> None:
        if enabled():
            console.print(msg, style=style, markup=False, highlight=False)
        else:
            print(msg, flush=True)
