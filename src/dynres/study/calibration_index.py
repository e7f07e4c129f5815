"""The quality index as calibration uses it: computed only where the search looks, extended only when needed.

The SSIM family needs each image's SSIM curve. The search looks at the calibration images alone, and the policy
needs every image of the store only once an SSIM rule has been certified for some resolution (a ``count`` or
``full`` rule needs no per-image data). So calibration loads the index of its calibration images (an index of
just those is enough) and extends the store's index to the rest when, and only when, it materializes an SSIM
rule; the cost of that extension is recorded with the policy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dynres.errors import ConfigError, StoreError
from dynres.io.store import Store, StoreLike
from dynres.policy.calibration import CalibrationPolicy, ReadRule
from dynres.policy.quality import QualityConfig, QualityIndex, build_quality_index, load_quality


def calibration_index(store: StoreLike, keys: Sequence[str], families: Sequence[str], resolutions_given: bool
                      ) -> QualityIndex | None:
    """``store``'s quality index for ``keys``: required by the ssim family (and to know the resolutions when none
    are given); otherwise used when present (its crop side), else None."""
    try:
        return load_quality(store, keys)
    except (StoreError, ConfigError, FileNotFoundError):
        if "ssim" in families or not resolutions_given:
            raise
        return None


def index_config(index: QualityIndex) -> QualityConfig:
    """The config that built ``index`` (its fingerprint's resolutions and crop side), to extend it alike."""
    fingerprint = index.meta.get("config", {})
    return QualityConfig(resolutions=tuple(fingerprint.get("resolutions") or index.resolutions),
                         crop_side=float(fingerprint.get("crop_side", QualityConfig.crop_side)))


def materialize(store: Store, index: QualityIndex | None, rules: dict[int, ReadRule], provenance: dict,
                progress: bool = True) -> tuple[CalibrationPolicy, dict | None]:
    """The policy for every image of ``store`` under ``rules``, and the record of the index extension an SSIM
    rule needed (None: none needed, the store untouched). ``index``: the calibration images' index, whose config
    the extension uses and the store's index must share."""
    keys = tuple(store.keys)
    num_scans = np.array([store.num_scans(k) for k in keys])
    if not any(rule.family == "ssim" for rule in rules.values()):
        return CalibrationPolicy.from_rules(rules, keys, num_scans, None, provenance), None
    if index is None:
        raise ConfigError("ssim", "an SSIM rule needs the store's quality index (`dynres index quality STORE`)")
    try:  # an index of the whole store already there: nothing to compute, and nothing written to the store
        full, extension = load_quality(store, keys), None
    except StoreError:
        extension = build_quality_index(store, index_config(index), progress=progress)  # the images it lacks only
        full = load_quality(store, keys)
    if full.meta.get("config") != index.meta.get("config"):  # thresholds of one SSIM applied to another's numbers
        raise ConfigError("ssim", f"the quality index of {store.root} was built with other settings than the "
                                  f"calibration images' ({full.meta.get('config')} vs {index.meta.get('config')}): "
                                  "rebuild one with the other's `dynres index quality` settings")
    return CalibrationPolicy.from_rules(rules, keys, full.num_scans, full, provenance), extension
