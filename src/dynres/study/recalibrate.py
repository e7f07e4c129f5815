"""The scale model's p(r) recalibrated to the deployed backbone (issue 18): per resolution, Platt scaling of its
logit, fitted on the guard's selection images.

Why: the scale model learns "the *shard* backbone that did not see this image is right at r" on training images.
The pipeline serves the *deployed* backbone (trained on every shard, so more often right, and not equally more
at every r), and on data where p(r) is mostly image difficulty the scale model's confidence is far from the
truth. The cost-aware rule, argmax_r p(r) − λ·cost(r), compares p across resolutions, so both errors move its
choices. Per resolution r, p'(r) = σ(a_r·logit p(r) + c_r), fitted by logistic regression on the selection
images to whether the deployed backbone was right there (on the dynamic engine's views). It is monotone per r
(the AUC at r is unchanged); it rescales how much each resolution's evidence counts against the others and
against the cost. Platt's smoothed targets ((N₊ + 1)/(N₊ + 2) and 1/(N₋ + 2)) keep the fit finite where a
resolution is right on every selection image, or on none.

Measured with the guard's honest split (docs/scale-candidates.md, "Recalibrated p(r)"): on the mean over crops,
more accurate served results than the anchored rule's on three real-photo runs and the demo, dynamic served more
often.

Serving applies the same map to the scale model's logits (``PipelineConfig.recalibration``,
:func:`dynres.runtime.runners.recalibrated_probs`; ``--recalibration`` on `dynres infer` / `serve`), so one scale
checkpoint and its tuned kernels serve every crop. Rewriting its last layer instead (σ(a·z + c) is the network
with (a·W, a·b + c)) was tried first and dropped: every crop's copy would need its own tuned kernels.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import expit

from dynres.errors import ConfigError
from dynres.runtime.runners import recalibrated_probs

_EPS = 1e-7  # p is clipped to [EPS, 1 - EPS] before its logit: float32 sigmoids saturate


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def _platt(z: np.ndarray, right: np.ndarray) -> tuple[float, float]:
    """(a, c) of σ(a·z + c) by maximum likelihood against Platt's smoothed targets."""
    from scipy.optimize import minimize

    pos = int(right.sum())
    neg = len(right) - pos
    t = np.where(right, (pos + 1) / (pos + 2), 1 / (neg + 2))

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        s = w[0] * z + w[1]
        q = expit(s)
        nll = float(np.sum(np.logaddexp(0, s) - t * s))
        return nll, np.array([np.sum((q - t) * z), np.sum(q - t)])

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


def fit_platt(p: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Per resolution (columns of ``p``, images x grid, sigmoid outputs), the (a, c) that map p to the probability
    that the backbone is right there (``right``, same shape); a (grid x 2) array."""
    p, right = np.asarray(p, dtype=np.float64), np.asarray(right, dtype=bool)
    if p.shape != right.shape or p.ndim != 2 or not len(p):
        raise ConfigError("recalibrate", f"need p and correctness of the same (images x grid) shape, got {p.shape} "
                                         f"and {right.shape}")
    z = logit(p)
    return np.array([_platt(z[:, i], right[:, i]) for i in range(p.shape[1])])


def apply_platt(p: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """p' = σ(a·logit p + c) per resolution: the engines' map (:func:`~dynres.runtime.runners.recalibrated_probs`)
    on the logits recovered from p."""
    return recalibrated_probs(torch.from_numpy(logit(p)), np.asarray(coef, dtype=np.float64))
