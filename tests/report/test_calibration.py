"""The calibration record rendered: a column per family, where each walk stopped, and the images a bound needs."""

from dynres.report.calibration import calibration_markdown


def test_the_markdown_shows_each_familys_rule_bound_and_where_its_walk_stopped():
    walk = {"family": "count", "label": "9 scans", "read_savings": 0.38, "bound": 0.02,
            "stopped_at": {"label": "8 scans", "bound": 0.31}}
    skipped = {"family": "ssim", "skipped": "no pool has a quality index", "steps": []}
    record = {"policy": "p.json", "crop_side": 0.875, "calibration_target": 0.05, "delta": 0.05, "criterion": "net",
              "families": ["count", "ssim"], "pools": [{"name": "calibration split", "images": 300}],
              "heldout_images": 300, "search_crops": [0.765625],
              "calibration": [{"resolution": 112, "crop": 0.765625, "acc_full": 80.0, "acc_calibrated": 80.0,
                               "read_savings": 0.38, "flag": False}],
              "search": [{"resolution": 112, "family": "count", "families": [walk, skipped],
                          "images_needed_without_events": 7376}]}
    text = calibration_markdown(record)
    assert "| 112 | 9 scans | 0.38 | 0.020; next (8 scans): 0.310 | n/a |" in text
    assert "upper 95% confidence bound on the net loss" in text and "7376 images" in text
    record["delta"] = None
    assert "no confidence bound" in calibration_markdown(record)
