"""The calibration policy the runtime reads: per resolution a read rule, and per image the scans it implies.

A rule is one of the calibration's policy *families*: ``count`` (every image reads the same number of scans at
that resolution), ``ssim`` (the paper's: the fewest scans whose SSIM against the full decode reaches a threshold,
from the quality index) or ``full`` (every scan: what a resolution gets when the data cannot certify a shorter
read). Written by the calibration search (:mod:`dynres.study.calibrate`); read by the dataset, the evaluation and
the engine, which only call ``policy.scans(key, resolution)`` (the ``ScanPolicy`` protocol).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynres.errors import ConfigError
from dynres.policy.quality import QualityIndex

POLICY_VERSION = 2
FAMILIES = ("count", "ssim", "full")


@dataclass(frozen=True)
class ReadRule:
    """How many scans to read at one resolution: ``count`` (``value`` scans for every image), ``ssim`` (``value``
    is the SSIM threshold) or ``full`` (no value)."""

    family: str
    value: float | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError("family", f"unknown policy family {self.family!r}; one of {', '.join(FAMILIES)}")
        if self.family == "count" and (self.value is None or int(self.value) != self.value or self.value < 1):
            raise ConfigError("count", f"a scan count must be a whole number >= 1, got {self.value}")
        if self.family == "ssim" and (self.value is None or not 0 <= self.value <= 1):
            raise ConfigError("ssim", f"an SSIM threshold must be in [0, 1], got {self.value}")

    def label(self) -> str:
        if self.family == "count":
            return f"{int(self.value)} scans"
        return f"SSIM >= {self.value:.4f}" if self.family == "ssim" else "every scan"

    def to_dict(self) -> dict:
        return {"family": self.family, "value": self.value}


def rule_counts(rule: ReadRule, resolution: int, num_scans: np.ndarray, index: QualityIndex | None = None,
                rows: np.ndarray | None = None) -> np.ndarray:
    """Scans per image (``num_scans`` gives each image's total; ``rows`` its rows in ``index``) under ``rule``."""
    if rule.family == "full":
        return np.asarray(num_scans, dtype=np.int64)
    if rule.family == "count":
        return np.minimum(int(rule.value), np.asarray(num_scans)).astype(np.int64)
    if index is None:
        raise ConfigError("ssim", "an SSIM rule needs the store's quality index (`dynres index quality STORE`)")
    return index.fewest_scans(float(rule.value), resolution, rows).astype(np.int64)


@dataclass
class CalibrationPolicy:
    """Rules per resolution + the resulting scan counts per image of one store, with provenance.

    ``scans(key, r)`` answers the ``ScanPolicy`` protocol. An image the policy does not list (a new upload) reads
    its rule's count under a ``count`` rule (the rule needs no per-image index) and every scan otherwise; a
    resolution without a rule reads every scan. Neither costs accuracy the calibration did not account for.
    """

    rules: dict[int, ReadRule]
    keys: tuple[str, ...]
    counts: np.ndarray  # (N, len(rules)) scans per image and resolution, resolution order = sorted rules
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # a plain number is an SSIM threshold, as in version-1 policies (the API took thresholds before rules)
        self.rules = {int(r): v if isinstance(v, ReadRule) else ReadRule("ssim", float(v))
                      for r, v in self.rules.items()}
        if np.shape(self.counts) != (len(self.keys), len(self.rules)):
            raise ConfigError("counts", f"need one row per key and one column per resolution, "
                                        f"{(len(self.keys), len(self.rules))}, got {np.shape(self.counts)}")
        self.resolutions = tuple(sorted(self.rules))
        self._rows = {k: i for i, k in enumerate(self.keys)}
        self._cols = {r: j for j, r in enumerate(self.resolutions)}

    @property
    def thresholds(self) -> dict[int, float]:
        """The SSIM thresholds of the resolutions under an ``ssim`` rule."""
        return {r: float(rule.value) for r, rule in self.rules.items() if rule.family == "ssim"}

    def scans(self, key: str, resolution: int) -> int | None:
        i, j = self._rows.get(key), self._cols.get(resolution)
        if j is None:
            return None
        if i is None:
            rule = self.rules[resolution]
            return int(rule.value) if rule.family == "count" else None
        return int(self.counts[i, j])

    @classmethod
    def from_rules(cls, rules: Mapping[int, ReadRule], keys: tuple[str, ...], num_scans: np.ndarray,
                   index: QualityIndex | None = None, provenance: dict | None = None) -> CalibrationPolicy:
        """Apply ``rules`` to every image (``num_scans`` per key; ``index`` rows in ``keys`` order for SSIM)."""
        res = sorted(rules)
        counts = np.stack([rule_counts(rules[r], r, num_scans, index) for r in res], axis=1) if res else \
            np.zeros((len(keys), 0), dtype=np.int64)
        return cls(dict(rules), tuple(keys), counts.astype(np.int64), dict(provenance or {}))

    @classmethod
    def from_index(cls, thresholds: dict[int, float], index: QualityIndex, provenance: dict | None = None
                   ) -> CalibrationPolicy:
        """SSIM thresholds applied to every image of a quality index: the fewest scans with SSIM >= t(r)."""
        rules = {r: ReadRule("ssim", float(t)) for r, t in thresholds.items()}
        return cls.from_rules(rules, index.keys, index.num_scans, index, provenance)

    def to_dict(self) -> dict:
        return {"version": POLICY_VERSION, "rules": {str(r): self.rules[r].to_dict() for r in self.resolutions},
                "thresholds": {str(r): t for r, t in sorted(self.thresholds.items())},
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
    if not isinstance(data, dict) or not ("rules" in data or "thresholds" in data):
        raise ConfigError(path, "not a dynres calibration policy")
    if data.get("version", 0) > POLICY_VERSION:
        raise ConfigError(path, f"policy version {data['version']} is newer than this dynres ({POLICY_VERSION})")
    try:
        if "rules" in data:  # version 2
            rules = {int(r): ReadRule(v["family"], v.get("value")) for r, v in data["rules"].items()}
        else:  # version 1: SSIM thresholds only
            rules = {int(r): ReadRule("ssim", float(t)) for r, t in data["thresholds"].items()}
        keys = tuple(data["keys"])
        counts = np.asarray(data["counts"], dtype=np.int64).reshape(len(keys), len(rules))
        if list(data.get("resolutions", sorted(rules))) != sorted(rules):
            raise ValueError("resolutions do not match the rules")
    except (KeyError, TypeError, ValueError, ConfigError) as err:
        raise ConfigError(path, f"malformed policy: {err}") from None
    return CalibrationPolicy(rules, keys, counts, data.get("provenance", {}))
