"""The backbone's own cheap pass as a scale model (issue 18, item 3: "features from the backbone's own cheap
low-resolution pass instead of a second network").

The backbone runs once at a low probe resolution on the view a scale model would read. Its softmax gives a few
confidence signals (:func:`softmax_features`: top-1 probability, top-1 minus top-2, entropy, the sorted top-k
probabilities), optionally followed by its whole softmax vector or its pooled penultimate features (the input of
its last linear layer), and a small head (:class:`ProbeHead`: a per-resolution logistic regression, or a
one-hidden-layer MLP) maps them to p(backbone right at r) over the grid, as the scale model's sigmoid outputs do.
When the rule then picks the probe resolution itself, the probe's prediction is the answer: no second pass (the
study charges it that way).

This module holds what runs per image (features, head, fitting); where the training features come from (the
shard backbones that did not see the image) is :mod:`dynres.study.probe`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dynres.errors import ConfigError
from dynres.model.nets import channels_last, to_input

# softmax signals only; + the whole softmax vector (which class it guesses: some classes come at some scales);
# + the pooled penultimate features
FEATURES = ("softmax", "classes", "pooled")
HEADS = ("linear", "mlp")


@dataclass(frozen=True)
class ProbeConfig:
    """One probe candidate: which features, which head, how it is fitted (full-batch AdamW on BCE, seeded)."""

    features: str = "softmax"
    head: str = "linear"
    resolution: int | None = None  # probe resolution; None: the scale model's input resolution
    topk: int = 5  # sorted top-k probabilities among the softmax signals (fewer classes: zero-padded)
    hidden: int = 32  # the MLP's hidden width
    steps: int = 500  # full-batch optimizer steps (the data are a few thousand rows of a few features)
    lr: float = 0.01
    weight_decay: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ConfigError("features", f"must be one of {list(FEATURES)}, got {self.features!r}")
        if self.head not in HEADS:
            raise ConfigError("head", f"must be one of {list(HEADS)}, got {self.head!r}")
        if self.resolution is not None and self.resolution < 16:
            raise ConfigError("resolution", f"the probe needs >= 16 px, got {self.resolution}")
        for name in ("topk", "hidden", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError("lr", f"need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")

    @property
    def name(self) -> str:
        """The candidate's name in records: ``probe-<features>-<head>[@<resolution>]``."""
        at = f"@{self.resolution}" if self.resolution else ""
        return f"probe-{self.features}-{self.head}{at}"


def parse_probe(spec: str) -> ProbeConfig:
    """``features-head[@resolution]`` (e.g. ``softmax-linear``, ``pooled-mlp@48``) as a :class:`ProbeConfig`."""
    body, _, res = spec.partition("@")
    parts = body.removeprefix("probe-").split("-")
    if len(parts) != 2:
        raise ConfigError("probe", f"need FEATURES-HEAD[@RESOLUTION] (features {list(FEATURES)}, heads "
                                   f"{list(HEADS)}), got {spec!r}")
    try:
        resolution = int(res) if res else None
    except ValueError:
        raise ConfigError("probe", f"the resolution after @ must be an integer, got {spec!r}") from None
    return ProbeConfig(features=parts[0], head=parts[1], resolution=resolution)


def softmax_features(logits: torch.Tensor, topk: int) -> torch.Tensor:
    """(N, 3 + topk): top-1 probability, its lead over the second, entropy (nats), the top-k probabilities."""
    probs = torch.softmax(logits.float(), dim=1)
    top = probs.sort(dim=1, descending=True).values
    second = top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    k = top[:, :topk]
    if k.shape[1] < topk:
        k = torch.cat([k, k.new_zeros(len(k), topk - k.shape[1])], dim=1)
    return torch.cat([top[:, :1], (top[:, 0] - second)[:, None], entropy[:, None], k], dim=1)


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError("probe", "the backbone has no linear classifier layer to read pooled features from")
    return linears[-1]


@torch.no_grad()
def probe_pass(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone on uint8 images: its logits and its pooled penultimate features (its last linear layer's
    input, caught by a forward hook, so one pass gives both)."""
    channels_last(model).eval()
    pooled: list[torch.Tensor] = []
    hook = _last_linear(model).register_forward_hook(lambda _m, inputs, _out: pooled.append(inputs[0].flatten(1)))
    try:
        logits = [model(to_input(images[i:i + batch_size], True)) for i in range(0, len(images), batch_size)]
    finally:
        hook.remove()
    return torch.cat(logits).float(), torch.cat(pooled).float()


def probe_features(logits: torch.Tensor, pooled: torch.Tensor, cfg: ProbeConfig) -> torch.Tensor:
    """The head's input for ``cfg.features`` from one probe pass."""
    signals = softmax_features(logits, cfg.topk)
    if cfg.features == "classes":
        return torch.cat([signals, torch.softmax(logits.float(), dim=1)], dim=1)
    return signals if cfg.features == "softmax" else torch.cat([signals, pooled], dim=1)


class ProbeHead(nn.Module):
    """Standardized features -> one logit per grid resolution (linear, or one hidden ReLU layer)."""

    def __init__(self, features: int, outputs: int, head: str = "linear", hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.net = (nn.Linear(features, outputs) if head == "linear"
                    else nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, outputs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def fit_probe_head(features: torch.Tensor, targets: torch.Tensor, cfg: ProbeConfig) -> ProbeHead:
    """Fit a head on (N, F) features and (N, len(grid)) targets in [0, 1]: BCE, full batch, seeded."""
    torch.manual_seed(cfg.seed)
    head = ProbeHead(features.shape[1], targets.shape[1], cfg.head, cfg.hidden)
    head.mean.copy_(features.mean(0))
    head.std.copy_(features.std(0).clamp_min(1e-6))
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    head.train()
    for _ in range(cfg.steps):
        opt.zero_grad()
        loss_fn(head(features), targets).backward()
        opt.step()
    return head.eval()


@torch.no_grad()
def predict_probe(head: ProbeHead, features: torch.Tensor) -> np.ndarray:
    """p(backbone right at r), (N, len(grid)), as the scale model's :func:`predict_scale` gives it."""
    return torch.sigmoid(head.eval()(features)).numpy()
