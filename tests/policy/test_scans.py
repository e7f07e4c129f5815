"""Scan policies: every accepted form says how many scans of an image to read at a resolution."""

import pytest

from dynres.policy.scans import ScanPolicy, scans_for


class Halves:
    def scans(self, key: str, resolution: int) -> int | None:
        return None if key == "all" else resolution // 2


@pytest.mark.parametrize("scans, expected", [
    (None, None),  # every scan
    (3, 3),  # the same count for every image
    ({"a": 2}, 2),  # per image, any resolution
    ({"b": 2}, None),  # an image the mapping lacks: every scan
    (lambda key, r: r // 10, 5),  # a function of key and resolution
    (Halves(), 25),  # the ScanPolicy protocol
])
def test_every_form_resolves_for_one_image(scans, expected):
    assert scans_for(scans, "a", 50) == expected


def test_a_policy_object_is_a_scan_policy():
    assert isinstance(Halves(), ScanPolicy) and not isinstance({"a": 1}, ScanPolicy)
    assert scans_for(Halves(), "all", 50) is None
