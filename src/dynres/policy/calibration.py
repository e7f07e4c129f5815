"""The calibration policy the runtime reads: per resolution an SSIM threshold, and per image the scans it implies.

Written by the calibration search (:mod:`dynres.study.calibrate`); read by the dataset, the evaluation and the
engine, which only call ``policy.scans(key, resolution)`` (the ``ScanPolicy`` protocol).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynres.errors import ConfigError
from dynres.policy.quality import QualityIndex

POLICY_VERSION = 1


@dataclass
class CalibrationPolicy:
    """Thresholds per resolution + the resulting scan counts per image of one store, with provenance.

    ``scans(key, r)`` answers the ``ScanPolicy`` protocol; an image or resolution the policy does not cover reads
    every scan (None), which never costs accuracy.
    """

    thresholds: dict[int, float]
    keys: tuple[str, ...]
    counts: np.ndarray  # (N, len(thresholds)) scans per image and resolution, resolution order = sorted thresholds
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if np.shape(self.counts) != (len(self.keys), len(self.thresholds)):
            raise ConfigError("counts", f"need one row per key and one column per resolution, "
                                        f"{(len(self.keys), len(self.thresholds))}, got {np.shape(self.counts)}")
        self.resolutions = tuple(sorted(self.thresholds))
        self._rows = {k: i for i, k in enumerate(self.keys)}
        self._cols = {r: j for j, r in enumerate(self.resolutions)}

    def scans(self, key: str, resolution: int) -> int | None:
        i, j = self._rows.get(key), self._cols.get(resolution)
        return None if i is None or j is None else int(self.counts[i, j])

    @classmethod
    def from_index(cls, thresholds: dict[int, float], index: QualityIndex, provenance: dict | None = None
                   ) -> CalibrationPolicy:
        """Apply thresholds to every image of a quality index: the fewest scans with SSIM >= t(r)."""
        res = sorted(thresholds)
        counts = np.stack([index.fewest_scans(thresholds[r], r) for r in res], axis=1) if res else \
            np.zeros((len(index.keys), 0), dtype=np.int64)
        return cls(dict(thresholds), index.keys, counts.astype(np.int64), dict(provenance or {}))

    def to_dict(self) -> dict:
        return {"version": POLICY_VERSION, "thresholds": {str(r): t for r, t in sorted(self.thresholds.items())},
                "provenance": self.provenance, "resolutions": list(self.resolutions), "keys": list(self.keys),
                "counts": self.counts.tolist()}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        tmp.replace(path)
        return path


def load_policy(path: str) -> CalibrationPolicy:
    """Read a policy file from a local path or any fsspec URL."""
    import fsspec

    try:
        with fsspec.open(str(path), "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise ConfigError(path, "policy file not found (run `dynres calibrate STORE --model CKPT`)") from None
    except (OSError, ValueError) as err:
        raise ConfigError(path, f"unreadable policy file: {err}") from None
    if not isinstance(data, dict) or "thresholds" not in data:
        raise ConfigError(path, "not a dynres calibration policy")
    if data.get("version", 0) > POLICY_VERSION:
        raise ConfigError(path, f"policy version {data['version']} is newer than this dynres ({POLICY_VERSION})")
    try:
        thresholds = {int(r): float(t) for r, t in data["thresholds"].items()}
        keys = tuple(data["keys"])
        counts = np.asarray(data["counts"], dtype=np.int64).reshape(len(keys), len(thresholds))
        if list(data.get("resolutions", sorted(thresholds))) != sorted(thresholds):
            raise ValueError("resolutions do not match the thresholds")
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(path, f"malformed policy: {err}") from None
    return CalibrationPolicy(thresholds, keys, counts, data.get("provenance", {}))
