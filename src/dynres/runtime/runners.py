"""What turns uint8 images into logits (:class:`Runner`: eager PyTorch or the tuned kernels of
:mod:`dynres.runtime.kernels`), and the scale model's stage with the choice rule it applies."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dynres.errors import ConfigError
from dynres.model.checkpoint import load_checkpoint, scale_probs
from dynres.model.nets import gflops, to_input


def choose(probs: np.ndarray, cost: np.ndarray, lam: float | None,
           bias: np.ndarray | Sequence[float] | None = None) -> np.ndarray:
    """Index of the chosen resolution per row: argmax p + b (``lam`` None) or argmax p + b - lam * cost/max(cost).

    ``bias`` b is a per-resolution additive term (None: zero, the paper's rule and the cost-aware one exactly). A
    large b at one resolution makes the rule that static resolution, so the family reaches the best static one as a
    limit (:mod:`dynres.study.bias` fits it from the training labels)."""
    score = probs if bias is None else probs + np.asarray(bias, dtype=np.float64)[None, :]
    if lam is None:
        return score.argmax(1)
    return (score - lam * (cost / cost.max())[None, :]).argmax(1)


def recalibrated_probs(logits: torch.Tensor, recalibration: Sequence[Sequence[float]]) -> np.ndarray:
    """p(r) = σ(a_r·z_r + c_r) of a sigmoid scale model's logits z: its p(r) recalibrated per resolution to the
    deployed backbone's chance of being right there (Platt scaling; :mod:`dynres.study.recalibrate` fits (a, c))."""
    coef = torch.as_tensor(recalibration, dtype=torch.float64)
    return torch.sigmoid(logits.double() * coef[:, 0] + coef[:, 1]).numpy()


def recalibration_pairs(value) -> tuple[tuple[float, float], ...]:
    """A recalibration as the declared tuple of finite (a, c) pairs, from any sequence of pairs (a JSON list from
    serving.json, a flag's tuple): the one check every path to :class:`ScaleStage` goes through."""
    try:
        pairs = tuple((float(a), float(c)) for a, c in value)
    except (TypeError, ValueError):
        raise ConfigError("recalibration", f"need (a, c) pairs, one per grid resolution, got {value!r}") from None
    if not pairs or not all(math.isfinite(v) for pair in pairs for v in pair):
        raise ConfigError("recalibration", f"need finite (a, c) pairs, one per grid resolution, got {value!r}")
    return pairs


# --- runners: uint8 images -> logits ----------------------------------------------------------------------------


class Runner(Protocol):
    """``runner(images, resolution) -> logits`` for a uint8 (N, 3, R, R) batch; what the pipeline calls."""

    def __call__(self, images: torch.Tensor, resolution: int) -> torch.Tensor: ...


class EagerRunner:
    """Plain PyTorch: any batch size, any resolution."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval()

    def __call__(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(to_input(images))

    def warm(self, resolutions: Sequence[int]) -> None:
        """Nothing to build for eager PyTorch."""


def batch_ladder(batch: int) -> tuple[int, ...]:
    """Tuned batch sizes a runner cuts a batch into, largest first: ``batch``, 4 and 1. Dynamic resolution splits
    a batch over several resolutions, so per-resolution pieces are often small; without the middle size they would
    run one image at a time."""
    return tuple(sorted({batch, min(batch, 4), 1}, reverse=True))


class KernelRunner:
    """Tuned kernels from :func:`dynres.runtime.kernels.load`, built lazily per (resolution, batch size).

    Tuned kernels are shape-specialized, so a batch is cut greedily into pieces of the ladder's sizes (largest
    first); a remainder smaller than the smallest size above 1 is padded to it when it fills more than half of it,
    else it runs on batch-1 kernels. The ladder is ``batches`` if given, else the sizes up to ``batch`` that the
    tuning cache holds for that resolution (a service allowing batches of 8 uses the 4s and 1s tuned for a
    16/4/1 pipeline instead of an untuned 8), else :func:`batch_ladder`.
    """

    def __init__(self, model: torch.nn.Module, batch: int = 8, threads: int = 2, cache_dir: Path | None = None,
                 batches: Sequence[int] | None = None):
        self.model, self.threads, self.cache_dir, self.batch = model.eval(), threads, cache_dir, batch
        self._fixed = tuple(sorted(set(batches) | {1}, reverse=True)) if batches else None
        self._ladders: dict[int, tuple[int, ...]] = {}
        self._kernels: dict[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] = {}

    def ladder(self, resolution: int) -> tuple[int, ...]:
        """The batch sizes a batch at ``resolution`` is cut into, largest first (always ending in 1)."""
        if self._fixed:
            return self._fixed
        if resolution not in self._ladders:
            from dynres.runtime import kernels

            tuned = kernels.tuned_batches(self.model, resolution, self.threads, range(1, self.batch + 1),
                                          self.cache_dir)
            sizes = set(tuned) if tuned else set(batch_ladder(self.batch))
            self._ladders[resolution] = tuple(sorted(sizes | {1}, reverse=True))
        return self._ladders[resolution]

    def kernel(self, resolution: int, batch: int) -> Callable[[torch.Tensor], torch.Tensor]:
        if (resolution, batch) not in self._kernels:
            from dynres.runtime import kernels

            # the engines' decode threads share the cores: ORT winners run without spinning worker threads
            self._kernels[resolution, batch] = kernels.load(self.model, resolution, batch, self.threads,
                                                            self.cache_dir, spinning=False)
        return self._kernels[resolution, batch]

    def warm(self, resolutions: Sequence[int]) -> None:
        """Build every kernel ``resolutions`` may need now, so no timed run pays for loading them."""
        for r in resolutions:
            for b in self.ladder(r):
                self.kernel(r, b)

    def __call__(self, images: torch.Tensor, resolution: int) -> torch.Tensor:
        x, out, i, ladder = to_input(images), [], 0, self.ladder(resolution)
        with torch.inference_mode():
            for b in ladder[:-1]:
                while len(x) - i >= b:
                    out.append(self.kernel(resolution, b)(x[i : i + b]))
                    i += b
            tail, smallest = x[i:], (ladder[-2] if len(ladder) > 1 else 1)
            if smallest > 1 and len(tail) * 2 > smallest:
                pad = torch.zeros(smallest - len(tail), *tail.shape[1:])
                out.append(self.kernel(resolution, smallest)(torch.cat([tail, pad]))[: len(tail)])
            else:
                out += [self.kernel(resolution, 1)(tail[j : j + 1]) for j in range(len(tail))]
        return torch.cat(out) if out else torch.zeros(0)


def make_runner(model: torch.nn.Module, kernels: str = "eager", batch: int = 8, threads: int = 2,
                cache_dir: Path | None = None) -> Runner:
    """``kernels="eager"`` or ``"tuned"`` (the cached winners of ``dynres tune``; eager where none is cached)."""
    if kernels == "eager":
        return EagerRunner(model)
    if kernels == "tuned":
        return KernelRunner(model, batch, threads, cache_dir)
    raise ConfigError("kernels", f"unknown kernel choice {kernels!r} (eager, tuned)")


# --- the scale model ---------------------------------------------------------------------------------------------


@dataclass
class ScaleStage:
    """The scale model with what choosing needs: its input resolution and prefix, the backbone's grid and costs."""

    runner: Runner
    resolution: int
    grid: tuple[int, ...]
    costs: tuple[float, ...]  # backbone cost per grid resolution, in the unit the choice rule expects
    scans: int | None = None  # the prefix it reads (None: the policy's scans at its resolution)
    bias: tuple[float, ...] | None = None  # per grid resolution, added to p(r) by the rule (None: zero)
    activation: str = "sigmoid"  # the checkpoint's map from logits to p(r) (dynres.model.checkpoint.scale_probs)
    # per grid resolution (a, c): p(r) = σ(a·logit + c) instead (recalibrated_probs; None: the checkpoint's p)
    recalibration: tuple[tuple[float, float], ...] | None = None

    def __post_init__(self) -> None:
        if self.bias is not None and len(self.bias) != len(self.grid):
            raise ConfigError("bias", f"need one value per grid resolution {list(self.grid)}, got {list(self.bias)}")
        if self.recalibration is not None:
            self.recalibration = recalibration_pairs(self.recalibration)
            if len(self.recalibration) != len(self.grid):
                raise ConfigError("recalibration", f"need one (a, c) per grid resolution {list(self.grid)}, got "
                                                   f"{len(self.recalibration)}")
            if self.activation != "sigmoid":
                raise ConfigError("recalibration", f"a {self.activation} scale head's p(r) is not a per-resolution "
                                                   "probability: only a sigmoid head is recalibrated")

    def choose(self, images: torch.Tensor, lam: float | None) -> tuple[list[int], np.ndarray]:
        """Chosen resolution per image and the scale model's p(backbone right at r) matrix.

        The rule is :func:`choose`: argmax p(r) + b(r) - lam * cost(r)/max cost; ``lam=None`` or 0 with no bias is
        the paper's argmax p(r)."""
        logits = self.runner(images, self.resolution)
        probs = (scale_probs(logits, self.activation).numpy() if self.recalibration is None
                 else recalibrated_probs(logits, self.recalibration))
        picks = choose(probs, np.asarray(self.costs, dtype=np.float64), lam, self.bias)
        return [self.grid[int(i)] for i in picks], probs


def load_scale(checkpoint: str | Path, backbone: torch.nn.Module, kernels: str = "eager", batch: int = 8,
               threads: int = 2, scans: int | None = None, bias: Sequence[float] | None = None,
               recalibration: Sequence[Sequence[float]] | None = None) -> ScaleStage:
    """A scale-model checkpoint (task ``scale``) with the backbone's GFLOPs per grid resolution as costs; ``bias``:
    the choice rule's per-resolution term (:func:`choose`); ``recalibration``: (a, c) per grid resolution
    (:func:`recalibrated_probs`)."""
    model, meta = load_checkpoint(checkpoint)
    if meta.task != "scale":
        raise ConfigError(checkpoint, f"not a scale model (task {meta.task!r})")
    costs = tuple(gflops(backbone, r) for r in meta.grid)
    return ScaleStage(make_runner(model, kernels, batch, threads), meta.train_resolution, tuple(meta.grid), costs,
                      scans if scans is not None else meta.scans, None if bias is None else tuple(map(float, bias)),
                      meta.activation, recalibration)
