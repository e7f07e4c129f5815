"""The train / eval commands end to end on a real (tiny) store: ingest → train backbone → train scale → eval."""

import json

from typer.testing import CliRunner

from dynres.cli.app import app
from tiny_store import MemoryStore


def _store(tmp_path, split, per_class, offset):
    mem = MemoryStore(per_class=per_class, offset=offset)
    for key in mem.keys:
        path = tmp_path / "src" / split / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(mem.read(key))
    store = tmp_path / "store" / split
    result = CliRunner().invoke(app, ["ingest", str(tmp_path / "src" / split), str(store), "--workers", "1"])
    assert result.exit_code == 0, result.output
    return str(store)


def test_train_and_eval_commands(tmp_path):
    train, val = _store(tmp_path, "train", 4, 0), _store(tmp_path, "val", 2, 50)
    run = CliRunner().invoke
    r = run(app, ["train", "backbone", train, "--out", str(tmp_path / "bb"), "--resolution", "32", "--epochs", "1",
                  "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    r = run(app, ["train", "scale", train, "--out", str(tmp_path / "scale"), "--folds", "2", "--cheap",
                  "--resolution", "32", "--backbone-epochs", "1", "--epochs", "1", "--batch-size", "8",
                  "--crops", "0.56,1.0"])
    assert r.exit_code == 0, r.output
    r = run(app, ["eval", "static", str(tmp_path / "bb"), val, "--out", str(tmp_path / "eval"), "--crops", "0.56,1.0"])
    assert r.exit_code == 0, r.output
    r = run(app, ["eval", "dynamic", str(tmp_path / "bb"), str(tmp_path / "scale" / "scale_model"), val,
                  "--out", str(tmp_path / "eval"), "--crops", "0.56,1.0"])
    assert r.exit_code == 0, r.output
    dynamic = json.loads((tmp_path / "eval" / "dynamic.json").read_text())
    assert dynamic["grid"] == [16, 24, 32, 40, 48, 56, 64] and len(dynamic["summary"]) == 2
    assert dynamic["images"] == 6
    # calibration's held-out table takes the static evaluation's full reads when told where they are
    r = run(app, ["calibrate", val, "--model", str(tmp_path / "bb" / "model.pt"), "--out", str(tmp_path / "cal"),
                  "--families", "count", "--resolutions", "16,32", "--crops", "0.56,1.0", "--holdout", "0.5",
                  "--static-eval", str(tmp_path / "eval" / "static.json"), "--batch-size", "4"])
    assert r.exit_code == 0, r.output
    calibration = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert calibration["heldout_full_reads_from"] == str(tmp_path / "eval" / "static.json")

    # a missing checkpoint is a DynresError naming the file (the CLI's main() prints it as one line)
    r = run(app, ["eval", "static", str(tmp_path / "nope.pt"), val])
    assert r.exit_code != 0 and "nope.pt" in str(r.exception) and "not found" in str(r.exception)
