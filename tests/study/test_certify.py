"""The certified search on made-up predictions: fixed-sequence walks, criteria, the family that saves most."""

import numpy as np
import pytest

from dynres.policy.calibration import ReadRule
from dynres.study.certify import Certification, Pool, certify_resolution, walk


class _Store:
    """Five scans of 100 bytes per image; label 0 everywhere."""

    def label(self, key):
        return 0

    def num_scans(self, key):
        return 5

    def prefix_size(self, key, scans):
        return 100 * min(scans, 5)

    def size(self, key):
        return 500


class _Preds:
    """One resolution (32), one crop; ``answer(key, scans)`` gives the predicted class."""

    def __init__(self, answer):
        self.store, self.grid, self.answer = _Store(), (32,), answer

    def predict(self, keys, scans):
        return np.array([[[self.answer(k, int(s)) for k, s in zip(keys, scans)]]])


def pool(answer, n=20, index=None):
    return Pool("test", _Preds(answer), [f"k{i:03d}" for i in range(n)], index)


def test_the_walk_stops_at_the_first_failure_even_if_a_cheaper_rule_would_pass():
    """4 scans lose image k000; 3 scans and fewer lose nothing: a walk from the full read must not skip ahead."""
    p = pool(lambda k, s: 1 if (k == "k000" and s == 4) else 0)
    result = walk([p], "count", 32, Certification("lost", 0.0, None), None)
    assert result["rule"] == ReadRule("full").to_dict() and len(result["steps"]) == 1


def test_a_lucky_gain_buys_a_loss_under_net_only():
    """Short reads turn k000 wrong and k001 right: the net accuracy is unchanged, but k000 was lost."""
    p = pool(lambda k, s: {"k000": int(s < 5), "k001": int(s == 5)}.get(k, 0))
    net = walk([p], "count", 32, Certification("net", 0.0, None), None)
    lost = walk([p], "count", 32, Certification("lost", 0.0, None), None)
    flips = walk([p], "count", 32, Certification("flips", 0.0, None), None)
    assert net["rule"] == {"family": "count", "value": 1} and net["read_savings"] == pytest.approx(0.8)
    assert lost["rule"]["family"] == flips["rule"]["family"] == "full"


def test_a_bound_is_harder_to_pass_than_the_point_estimate():
    p = pool(lambda k, s: 0, n=50)  # shorter reads never change an answer
    point = walk([p], "count", 32, Certification("flips", 0.5, None), None)
    bound = walk([p], "count", 32, Certification("flips", 0.5, 0.05), 0.05)
    assert point["rule"]["value"] == 1  # nothing ever flips
    assert bound["rule"]["family"] == "full"  # but 50 images cannot bound a rate by 0.5%
    assert bound["steps"][0]["bound"] == pytest.approx(100 * (1 - 0.05 ** (1 / 50)))


def test_pooled_images_that_flip_less_than_the_deployed_backbones_do_not_certify_it():
    """The judges never flip; the deployed backbone's own pool flips 8 of 40 under any shorter read. Pooled, 8 of
    2,040 is within a 0.5-point target, but the pools contradict the assumption the bound needs, so the full read
    stays; with a deployed pool that flips like the judges, the same rule is certified."""
    cert = Certification("flips", 0.5, None)
    judges = pool(lambda k, s: 0, n=2000)
    flaky = pool(lambda k, s: int(s < 5 and k < "k008"), n=40)
    refused = walk([flaky, judges], "count", 32, cert, None)
    assert refused["rule"]["family"] == "full"
    step = refused["steps"][0]
    assert step["bound"] < 0.5 and step["assumption_p"] < 1e-6 and step["pool_flips"][0]["flipped"] == 8
    steady = walk([pool(lambda k, s: 0, n=40), judges], "count", 32, cert, None)
    assert steady["rule"] == {"family": "count", "value": 1} and steady["steps"][-1]["assumption_p"] == 1.0


class _Index:
    """SSIM reaches any threshold with 2 scans."""

    def __init__(self, keys):
        self.rows = {k: i for i, k in enumerate(keys)}

    def fewest_scans(self, t, resolution, rows):
        return np.full(len(rows), 2)


def test_the_family_that_saves_most_wins_and_needs_an_index_to_be_judged():
    keys = [f"k{i:03d}" for i in range(20)]
    answer = lambda k, s: int(s < 2)  # noqa: E731 -- one scan is wrong everywhere, two are enough
    with_index = pool(answer, index=_Index(keys))
    result = certify_resolution([with_index], 32, ("count", "ssim"), Certification("lost", 0.0, None))
    count, ssim = result["families"]
    assert count["rule"] == {"family": "count", "value": 2} and ssim["rule"]["family"] == "ssim"
    assert count["read_savings"] == ssim["read_savings"] == pytest.approx(0.6)
    assert result["family"] == "count"  # a tie goes to the family listed first
    alone = certify_resolution([pool(answer)], 32, ("ssim", "count"), Certification("lost", 0.0, None))
    assert alone["families"][0]["skipped"] and alone["family"] == "count"


def test_nothing_certified_reads_every_scan_and_reports_the_images_a_certificate_needs():
    result = certify_resolution([pool(lambda k, s: int(s < 5))], 32, ("count",), Certification("lost", 0.05, 0.05))
    assert result["rule"] == {"family": "full", "value": None} and result["read_savings"] == 0.0
    assert result["images_needed_without_events"] > 5000 and result["bound"] is None


class _EndAnswers:
    """Stands in for the scale model's read judged by the pipeline's end answers: fewer than ``need`` scans change
    the chosen resolution of every image, and the end answer with it."""

    def __init__(self, need):
        self.need = need

    def judge(self, rule, resolution):
        wrong = 20 if rule.family == "count" and rule.value < self.need else 0
        return {"lost": np.array([wrong]), "gained": np.array([0]), "flipped": np.array([wrong]), "n": 20,
                "read": 100.0 * 20 * min(rule.value or 5, 5), "size": 500.0 * 20}


def test_at_the_scale_models_resolution_a_rule_must_also_keep_the_pipelines_answers():
    p = pool(lambda k, s: 0)  # the backbone at this resolution never minds a short read
    cert = Certification("lost", 0.0, None)
    alone = walk([p], "count", 32, cert, None)
    with_scale = walk([p], "count", 32, cert, None, scale_read=[_EndAnswers(need=3)])
    assert alone["rule"]["value"] == 1
    assert with_scale["rule"] == {"family": "count", "value": 3}
    assert with_scale["stopped_at"]["label"] == "2 scans" and "scale_read" in with_scale["steps"][0]


class _Drawn:
    """A fresh sample of ``n`` images whose true loss rate at k scans is ``rates[k]`` (no gains)."""

    def __init__(self, rates, n, rng):
        self.draws = {k: int(rng.binomial(n, p)) for k, p in rates.items()}
        self.n = n

    def judge(self, rule, resolution):
        lost = self.draws[int(rule.value)]
        return {"lost": np.array([lost]), "gained": np.array([0]), "flipped": np.array([lost]), "n": self.n,
                "read": 100.0 * self.n * rule.value, "size": 500.0 * self.n}


def test_the_chosen_rule_keeps_the_true_loss_within_the_target_at_least_one_minus_delta_of_the_time():
    """True loss rates per scan count straddle the target (0.5 points); over many calibrations, the walk's choice
    must lose more than the target in at most delta of them."""
    from dynres.study.certify import family_ladder

    rates = {5: 0.0, 4: 0.001, 3: 0.004, 2: 0.006, 1: 0.02}  # 5 scans: the full read
    rng = np.random.default_rng(0)
    cert, bad, trials, chosen_counts = Certification("lost", 0.5, 0.1), 0, 300, []

    class Ladder:  # family_ladder reads num_scans.max()
        num_scans = np.array([5])

    assert [r.value for r in family_ladder("count", [Ladder()])] == [4, 3, 2, 1]
    for _ in range(trials):
        drawn = _Drawn(rates, 1500, rng)
        drawn.num_scans = np.array([5])
        chosen = walk([drawn], "count", 32, cert, cert.delta)["rule"]
        true = 0.0 if chosen["family"] == "full" else rates[int(chosen["value"])]
        bad += true > cert.target / 100
        chosen_counts.append(chosen["value"])
    assert bad / trials <= cert.delta
    assert chosen_counts.count(3) > trials // 10  # the test is not vacuous: the walk often goes as far as allowed


def test_lanes_give_each_key_the_rows_one_call_gives_it(models):
    """Predictions in side-by-side lanes (a part of the keys each, one model thread) are those of one predict_grid
    call, row for row under each key: a lane that mixed up its keys' rows, or a view whose prediction depended on
    the batch around it, fails (the probabilities differ per image)."""
    from dynres.model.checkpoint import load_checkpoint
    from dynres.study.certify import predict_lanes
    from dynres.study.static import GridModel, predict_grid

    store, backbone, _ = models
    run = GridModel(load_checkpoint(backbone)[0], "auto", threads=1)
    assert run.backend == "ort"  # lanes run ONNX Runtime only (eager PyTorch runs as one call)
    keys = list(store.keys)
    scans = {k: 1 + i % store.num_scans(k) for i, k in enumerate(keys)}  # a different prefix per image
    one = predict_grid(run, store, keys, (16, 32), (0.5, 1.0), scans=scans, batch_size=4, progress=False)
    lanes = predict_lanes(run, store, keys, (16, 32), (0.5, 1.0), scans=scans, batch_size=2, count=3)

    def rows(table):
        return sorted(zip(*(table.column(n).to_pylist() for n in ("key", "crop", "resolution", "pred", "prob"))))

    assert len({r[4] for r in rows(one)}) > len(keys)  # the rows tell the images apart
    assert rows(lanes) == rows(one)


def test_lanes_export_a_module_once_and_stop_at_the_first_failure(models, monkeypatch):
    """A plain module runs as one ONNX Runtime model shared by every lane (no lane falls back to eager), and a
    corrupt image stops the pieces of work that have not started instead of waiting for all of them."""
    import threading

    from dynres.errors import BadImageError
    from dynres.model.checkpoint import load_checkpoint
    from dynres.study.certify import predict_lanes

    store, backbone, _ = models
    keys = list(store.keys) * 4  # 36 keys: pieces of 2 over 2 lanes
    module = load_checkpoint(backbone)[0]
    from dynres.study import static

    built = []

    class Counted(static.GridModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self.backend)

    monkeypatch.setattr(static, "GridModel", Counted)
    table = predict_lanes(module, store, keys[:6], (16,), (1.0,), batch_size=2, count=2)
    assert table.num_rows == 6 and built == ["ort"]  # one export, shared by both lanes

    reads, lock = [], threading.Lock()

    class Failing:
        def __getattr__(self, name):
            return getattr(store, name)

        def read(self, key, scans=None):
            with lock:
                reads.append(key)
                first = len(reads) == 1
            if first:
                raise BadImageError(key, "corrupt")
            threading.Event().wait(0.02)  # the others are slow: the failure is seen while most are queued
            return store.read(key, scans=scans)

    with pytest.raises(BadImageError, match="corrupt"):
        predict_lanes(module, Failing(), keys, (16,), (1.0,), batch_size=2, count=2)
    assert len(reads) < len(keys) // 2  # the pieces not started were cancelled
