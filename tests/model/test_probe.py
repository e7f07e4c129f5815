"""The backbone probe's per-image parts: softmax signals, one pass giving logits and pooled features, a seeded head
that learns p(right at r), and the candidate specs."""

import math

import numpy as np
import pytest
import torch

from dynres.errors import ConfigError
from dynres.model.nets import create_model
from dynres.model.probe import (ProbeConfig, fit_probe_head, parse_probe, predict_probe, probe_features,
                                probe_pass, softmax_features)


def test_softmax_signals_are_confidence_margin_entropy_and_sorted_top_k():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [1 / 3, 1 / 3, 1 / 3]]))
    f = softmax_features(logits, topk=4)
    assert f.shape == (2, 7)
    assert f[0, 0].item() == pytest.approx(0.6) and f[0, 1].item() == pytest.approx(0.3)  # top-1, top1 - top2
    assert f[0, 2].item() == pytest.approx(-sum(p * math.log(p) for p in (0.1, 0.6, 0.3)))
    assert f[0, 3:].tolist() == pytest.approx([0.6, 0.3, 0.1, 0.0])  # 3 classes < top-4: zero-padded
    assert f[1, 1].item() == pytest.approx(0.0) and f[1, 2].item() == pytest.approx(math.log(3))


def test_one_pass_gives_logits_and_the_classifier_input():
    torch.manual_seed(0)
    model = create_model("resnet_micro", 5)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    logits, pooled = probe_pass(model, images, batch_size=2)
    assert logits.shape == (3, 5) and pooled.shape == (3, 64)
    with torch.no_grad():
        assert torch.allclose(model.net.fc(pooled), logits, atol=1e-5)
    cfg = ProbeConfig(features="pooled", topk=3)
    assert probe_features(logits, pooled, cfg).shape == (3, 6 + 64)
    assert probe_features(logits, pooled, ProbeConfig(topk=3)).shape == (3, 6)
    with_classes = probe_features(logits, pooled, ProbeConfig(features="classes", topk=3))
    assert with_classes.shape == (3, 6 + 5) and torch.allclose(with_classes[:, 6:].sum(1), torch.ones(3))


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_the_head_learns_which_resolutions_are_right_and_is_seeded(head):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=gen) * 5 + 3  # unstandardized on purpose: the head standardizes
    y = torch.stack([(x[:, 0] > 3).float(), (x[:, 1] < 3).float()], dim=1)  # right at r0 / r1
    cfg = ProbeConfig(head=head, steps=300, lr=0.05, seed=1)
    h = fit_probe_head(x, y, cfg)
    p = predict_probe(h, x)
    assert p.shape == (400, 2) and ((p > 0.5) == y.numpy().astype(bool)).mean() > 0.9
    again = fit_probe_head(x, y, cfg)
    assert all(torch.equal(a, b) for a, b in zip(h.state_dict().values(), again.state_dict().values()))
    other = predict_probe(fit_probe_head(x, y, ProbeConfig(head=head, steps=300, lr=0.05, seed=2)), x)
    assert not np.array_equal(p, other)


def test_specs_name_features_head_and_resolution():
    cfg = parse_probe("pooled-mlp@48")
    assert (cfg.features, cfg.head, cfg.resolution) == ("pooled", "mlp", 48)
    assert cfg.name == "probe-pooled-mlp@48" and parse_probe(cfg.name) == cfg
    assert parse_probe("softmax-linear").resolution is None
    for bad, field in [("softmax", "probe"), ("logits-linear", "features"), ("softmax-svm", "head"),
                       ("softmax-linear@x", "probe"), ("softmax-linear@8", "resolution")]:
        with pytest.raises(ConfigError, match=field):
            parse_probe(bad)
