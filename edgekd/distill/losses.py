"""The distillation losses, each a small ``nn.Module`` whose docstring gives its formula and paper:
KD soft targets (Hinton et al. 2015), FitNets hints (Romero et al. 2015), relational KD (Park et
al. 2019), attention transfer (Zagoruyko & Komodakis 2017).
"""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F


def soft_targets(teacher_logits: list[torch.Tensor], weights: list[float], temperature: float) -> torch.Tensor:
    """Weighted average of the teachers' softened distributions: sum_i w_i softmax(z_i / T), sum w = 1.

    Averaging probabilities (not logits) is the multi-teacher ensemble of Hinton et al. §2 and of
    "Efficient Knowledge Distillation from an Ensemble of Teachers" (Fukuda et al. 2017).
    """
    total = float(sum(weights))
    probs = [w / total * F.softmax(z.float() / temperature, dim=1) for z, w in zip(teacher_logits, weights)]
    return torch.stack(probs).sum(0)


class KDLoss(nn.Module):
    """Hinton KD: ``alpha * T^2 * KL(p_t || softmax(z_s/T)) + (1-alpha) * CE(z_s, y)``.

    ``p_t`` is the teacher's ``softmax(z_t/T)`` (or a weighted average over teachers). The T^2
    keeps the soft term's gradient, ``T * (softmax(z_s/T) - p_t)``, on the same scale as the hard
    term's whatever T is (Hinton, Vinyals & Dean 2015, §2). KL is averaged over the batch.
    """

    def __init__(self, temperature: float, alpha: float):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def soft(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(p_t || softmax(z_s/T))``, batch mean: the only term an unlabeled image can give."""
        t = self.temperature
        log_q = F.log_softmax(student_logits.float() / t, dim=1)
        return F.kl_div(log_q, teacher_probs, reduction="batchmean") * (t * t)

    def terms(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        hard = F.cross_entropy(student_logits.float(), labels)
        return {"kd": self.alpha * self.soft(student_logits, teacher_probs), "ce": (1.0 - self.alpha) * hard}

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(student_logits, teacher_probs, labels).values())


class MutualLoss(nn.Module):
    """Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018, "Deep Mutual Learning"):
    K peers learn together, each from the labels and from the others' predictions, no teacher.

    ``L_k = (1-alpha) * CE(z_k, y) + alpha * T^2 * 1/(K-1) * sum_{l != k} KL(p_l || q_k)``, with
    ``q_k = softmax(z_k/T)`` and ``p_l = softmax(z_l/T)`` held constant in peer k's term. The sum
    over k is minimised in one backward pass: each peer's gradient is that of its own ``L_k`` (the
    paper alternates peer updates; updating all at once is the usual simultaneous variant). At
    alpha=0.5, T=1 the two terms weigh 1:1 as in the paper.
    """

    def __init__(self, temperature: float, alpha: float):
        super().__init__()
        self.temperature = temperature
        self.alpha = alpha

    def terms(self, logits: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        t, k = self.temperature, len(logits)
        log_q = [F.log_softmax(z.float() / t, dim=1) for z in logits]
        targets = [lq.detach().exp() for lq in log_q]
        ce = sum(F.cross_entropy(z.float(), labels) for z in logits)
        kl = sum(F.kl_div(log_q[i], targets[j], reduction="batchmean") for i in range(k) for j in range(k) if i != j) * (t * t) / (k - 1)
        return {"mutual": self.alpha * kl, "ce": (1.0 - self.alpha) * ce}

    def forward(self, logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        return sum(self.terms(logits, labels).values())


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two (N, C, H, W) maps to the smaller of their spatial sizes by adaptive average pooling.

    A 64-px teacher and a 28-px student give maps of different sizes; pooling the larger one
    (rather than upsampling the smaller) compares the same image regions without inventing detail.
    """
    h, w = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
    if a.shape[-2:] != (h, w):
        a = F.adaptive_avg_pool2d(a, (h, w))
    if b.shape[-2:] != (h, w):
        b = F.adaptive_avg_pool2d(b, (h, w))
    return a, b


class HintLoss(nn.Module):
    """FitNets hint: ``mean((r(f_s) - f_t)^2)`` with ``r`` a learned 1x1 conv when widths differ.

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets": the regressor ``r`` maps the student's
    guided layer to the teacher's hint layer width; spatial sizes are matched by
    :func:`match_spatial`. The adapter trains with the student and is dropped afterwards.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.adapter = nn.Identity() if student_channels == teacher_channels else nn.Conv2d(student_channels, teacher_channels, 1, bias=False)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        s, t = match_spatial(self.adapter(student_feature.float()), teacher_feature.float())
        return F.mse_loss(s, t)


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    sq = e.pow(2).sum(1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * e @ e.t()).clamp_min(1e-12)
    d = d2.sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


class RKDLoss(nn.Module):
    """Relational KD: ``w_d * L_dist + w_a * L_angle`` on embeddings (Park et al. CVPR 2019).

    ``L_dist = mean_{i!=j} huber(d_s(i,j)/mu_s, d_t(i,j)/mu_t)`` with ``d`` the Euclidean distance and
    ``mu`` the mean distance over pairs; ``L_angle = mean_{i,j,k} huber(cos∠_s(i,j,k), cos∠_t(i,j,k))``
    with ``cos∠(i,j,k) = <(e_i-e_j)/|e_i-e_j|, (e_k-e_j)/|e_k-e_j|>``. Scale- and rotation-invariant,
    so student and teacher embeddings may have different widths. The paper uses w_d=25, w_a=50
    (ratio 1:2, kept here; the overall weight is DistillConfig.relation_weight).
    """

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0):
        super().__init__()
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight

    @staticmethod
    def distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        ds, dt = _pairwise_distances(student.float()), _pairwise_distances(teacher.float())
        off = ~torch.eye(len(ds), dtype=torch.bool, device=ds.device)
        ds = ds / ds[off].mean().clamp_min(1e-12)
        dt = dt / dt[off].mean().clamp_min(1e-12)
        return F.smooth_l1_loss(ds[off], dt[off])

    @staticmethod
    def angle(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        def cosines(e: torch.Tensor) -> torch.Tensor:
            diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # diff[j, i] = (e_i - e_j)/|.|
            return torch.bmm(diff, diff.transpose(1, 2)).reshape(-1)  # [j, i, k] = cos angle at j

        return F.smooth_l1_loss(cosines(student.float()), cosines(teacher.float()))

    def forward(self, student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
        s, t = student_embedding.flatten(1), teacher_embedding.flatten(1)
        return self.distance_weight * self.distance(s, t) + self.angle_weight * self.angle(s, t)


def attention_map(feature: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Spatial attention ``Q = mean_c |A_c|^p`` (N, 1, H, W), before normalisation."""
    return feature.float().abs().pow(p).mean(1, keepdim=True)


class AttentionTransferLoss(nn.Module):
    """Attention transfer: ``beta/2 * mean_{n,k}(Q_s/|Q_s|_2 - Q_t/|Q_t|_2)^2`` (Zagoruyko & Komodakis, ICLR 2017).

    ``Q = mean_c |A_c|^p`` (p=2) flattened per image, as in the authors' code
    (``(at(x) - at(y)).pow(2).mean()`` with beta=1000). Maps of different sizes are matched by
    pooling the attention maps (:func:`match_spatial`) before normalising.
    """

    def __init__(self, p: int = 2, beta: float = 1000.0):
        super().__init__()
        self.p = p
        self.beta = beta

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        qs, qt = match_spatial(attention_map(student_feature, self.p), attention_map(teacher_feature, self.p))
        qs, qt = F.normalize(qs.flatten(1), dim=1), F.normalize(qt.flatten(1), dim=1)
        return self.beta / 2 * (qs - qt).pow(2).mean()
