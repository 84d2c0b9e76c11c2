"""Domain adaptation terms: Maximum Mean Discrepancy between the features of labeled (source) and
unlabeled (target) images, marginal and class-conditional, added to the task loss:

    L = L_task + lambda * MMD^2(phi(X_s), phi(X_t))

- :func:`mmd2`: the multi-kernel Gaussian MMD of Long, Cao, Wang & Jordan, "Learning Transferable
  Features with Deep Adaptation Networks" (DAN, ICML 2015): ``k = 1/U sum_u k_u``, Gaussian kernels
  ``k_u(a, b) = exp(-|a - b|^2 / (s_u * sigma^2))`` whose widths are multiples ``s_u`` of the
  batch's mean squared pairwise distance ``sigma^2`` (held constant, no gradient), equal weights
  (DAN learns them; equal weights are the common choice). The estimator is the biased (V-statistic)
  one of Gretton, Borgwardt, Rasch, Schoelkopf & Smola, "A Kernel Two-Sample Test" (JMLR 2012, eq. 5):

      MMD_b^2 = 1/m^2 sum_ij k(x_i, x_j) + 1/n^2 sum_ij k(y_i, y_j) - 2/(mn) sum_ij k(x_i, y_j)

  which is never negative and exactly 0 for identical samples (the unbiased U-statistic drops the
  diagonal and can go below zero, a poor thing to minimise with small batches).
- :func:`class_conditional_mmd2`: Joint Distribution Adaptation (Long, Wang, Ding, Sun & Yu,
  "Transfer Feature Learning with Joint Distribution Adaptation", ICCV 2013): the mean over classes
  c of ``MMD^2(phi(X_s | y=c), phi(X_t | y_hat=c))``, with the target's pseudo-labels ``y_hat``
  from the teacher (in distillation) or the model itself (fine-tuning the teacher, JDA's
  iterative refinement); classes with fewer than 2 images on either side are left out.
- :class:`MMDLoss` combines them for a ``phi`` of (N, C, H, W) maps (pooled over space) or (N, C) vectors.

The data source is :class:`edgekd.data.unlabeled.UnlabeledFeed`; the labeled and the unlabeled
batches go through the network in one forward pass, so BatchNorm sees both domains.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from edgekd.config import MMDConfig


def gaussian_kernels(a: torch.Tensor, b: torch.Tensor, bandwidths: list[float], sigma2: torch.Tensor) -> torch.Tensor:
    """``1/U sum_u exp(-|a_i - b_j|^2 / (s_u * sigma2))`` for every pair: an (len(a), len(b)) matrix."""
    d2 = torch.cdist(a, b).pow(2)
    return sum(torch.exp(-d2 / (s * sigma2)) for s in bandwidths) / len(bandwidths)


def mean_squared_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The base width sigma^2: the mean squared distance over all pairs of the joint sample (no gradient)."""
    z = torch.cat([x, y]).detach()
    n = len(z)
    return (torch.cdist(z, z).pow(2).sum() / max(1, n * n - n)).clamp_min(1e-8)


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: list[float], sigma2: torch.Tensor | None = None) -> torch.Tensor:
    """Biased multi-kernel MMD^2 between samples ``x`` (m, d) and ``y`` (n, d) (Gretton et al. 2012, eq. 5)."""
    x, y = x.float(), y.float()
    if sigma2 is None:
        sigma2 = mean_squared_distance(x, y)
    kxx = gaussian_kernels(x, x, bandwidths, sigma2).mean()
    kyy = gaussian_kernels(y, y, bandwidths, sigma2).mean()
    kxy = gaussian_kernels(x, y, bandwidths, sigma2).mean()
    return (kxx + kyy - 2 * kxy).clamp_min(0.0)


def class_conditional_mmd2(x: torch.Tensor, y: torch.Tensor, labels_x: torch.Tensor, labels_y: torch.Tensor, bandwidths: list[float]) -> torch.Tensor:
    """Mean over the classes present (>= 2 images) on both sides of MMD^2 within the class (JDA)."""
    sigma2 = mean_squared_distance(x.float(), y.float())  # one width for every class: the classes' terms are comparable
    terms = []
    for c in torch.unique(labels_x):
        xs, ys = x[labels_x == c], y[labels_y == c]
        if len(xs) >= 2 and len(ys) >= 2:
            terms.append(mmd2(xs, ys, bandwidths, sigma2))
    return torch.stack(terms).mean() if terms else x.sum() * 0.0


def pooled(feature: torch.Tensor) -> torch.Tensor:
    """phi as vectors: a (N, C, H, W) map averaged over space, anything else flattened."""
    return feature.float().mean((2, 3)) if feature.ndim == 4 else feature.float().flatten(1)


class MMDLoss(nn.Module):
    """``weight * (MMD^2(phi_s, phi_t) [+ class-conditional MMD^2])`` (DAN; JDA with ``cfg.conditional``)."""

    def __init__(self, cfg: MMDConfig):
        super().__init__()
        self.cfg = cfg

    def terms(self, source: torch.Tensor, target: torch.Tensor, source_labels: torch.Tensor, target_pseudo: torch.Tensor | None) -> dict[str, torch.Tensor]:
        s, t = pooled(source), pooled(target)
        parts = {"mmd": self.cfg.weight * mmd2(s, t, self.cfg.bandwidths)}
        if self.cfg.conditional and target_pseudo is not None:
            parts["mmd_class"] = self.cfg.weight * class_conditional_mmd2(s, t, source_labels.to(s.device), target_pseudo.to(s.device), self.cfg.bandwidths)
        return parts
