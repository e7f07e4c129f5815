"""cli.study: `dynres run` prints every effective setting before it starts and the verdict when it ends."""

from __future__ import annotations

from typer.testing import CliRunner

from dynres.cli.app import app


def test_run_prints_the_effective_settings_first_and_the_verdict_last(tmp_path, monkeypatch):
    from dynres.study import demo

    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    (tmp_path / "run.toml").write_text('data = "data"\nout = "o"\n[scale]\nfolds = 3\n[dynamic]\nscans = 2\n')
    seen = []

    def fake_run_study(cfg):  # the stages themselves are the study's tests
        seen.append(cfg)
        return {"wall_s": 1.0, "verdict": {"serving": "o/serving.json",
                                           "health": {"warnings": ["at chance: check the [backbone] recipe"],
                                                      "scale_auc": {"min": 0.5, "max": 0.6}},
                                           "crops": [
            {"crop": 0.25, "mode": "static", "reason": "less accurate: dynamic 20% vs static 30% ([dynamic] rules)"}]}}

    monkeypatch.setattr(demo, "run_study", fake_run_study)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "run.toml")], terminal_width=300)
    assert result.exit_code == 0, result.output
    out = result.output
    assert seen and seen[0].chain.scale.folds == 3
    assert out.index("Effective settings") < out.index("crop 0.25: static")
    assert "folds=3" in out and "cheap=false" in out  # the file's setting and the default it leaves
    assert "warning: dynamic.scans = 2" in out and "o/serving.json" in out
    assert out.index("warning: at chance") < out.index("crop 0.25: static")  # the backbone's health first
    # run-file sections in messages are printed as written, not taken for rich markup and dropped
    assert "check the [backbone] recipe" in out and "30% ([dynamic] rules)" in out
    assert "the scale model's AUC on the validation images: 0.50–0.60" in out  # why static, where it is
