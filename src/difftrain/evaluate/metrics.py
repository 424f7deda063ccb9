"""FID, KID, IS and precision/recall from Inception features, as torch-fidelity computes them.

torch-fidelity's metric functions live in modules that import torchvision at the top (see
inception.py), so the formulas are written here once more, line for line with its 0.4.0
release and with its defaults: FID by the eigenvalues of sigma1·sigma2 in float64; KID as
the unbiased MMD² with the cubic polynomial kernel over 100 subsets of 1,000 (fewer when
fewer images are given, recorded in the result); IS over 10 splits of the unbiased logits,
shuffled with seed 2020; precision/recall (Kynkäänniemi et al. 2019) with k = 3, on the
same Inception pool features (torch-fidelity's own default for precision/recall is VGG-16's
fc2 features, as the paper's: our numbers compare with each other, not with ones published
from VGG features).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

KID_SUBSETS, KID_SUBSET_SIZE, KID_DEGREE, KID_COEF0 = 100, 1000, 3, 1.0
IS_SPLITS, IS_SEED = 10, 2020
PRC_NEIGHBOURS = 3
IS_STABLE_SPLIT = 1000  # images a split: below it IS is bounded by the split size (5,000 a split in the usual 50k/10)
FID_STABLE_COUNT = 2048  # below this many images the 2048-d covariance is rank-deficient and FID biased upwards


@dataclass
class Statistics:
    """What FID needs of a set: the mean and covariance of its features (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int

    @classmethod
    def of(cls, features: torch.Tensor) -> "Statistics":
        array = features.double().numpy()
        return cls(array.mean(axis=0), np.cov(array, rowvar=False), len(array))


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """||mu_a - mu_b||² + Tr(Sa + Sb - 2 (Sa Sb)^½); the trace of the root from the eigenvalues of Sa·Sb."""
    diff = a.mu - b.mu
    tr_covmean = np.sum(np.sqrt(np.linalg.eigvals(a.sigma.dot(b.sigma)).astype("complex128")).real)
    return float(diff.dot(diff) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def frechet_distance_of(features: torch.Tensor, reference: Statistics) -> float:
    """`frechet_distance` of a feature set against statistics, by the n x n route when n < d.

    With fewer images than dimensions (64 against 2048 during training), S1 = AᵀA/(n-1) for
    the centred features A, and the non-zero eigenvalues of S1·S2 are those of the symmetric
    n x n matrix A·S2·Aᵀ/(n-1): the same value as the 2048 x 2048 eigenproblem (within 1e-7
    relative of torch-fidelity's, tested) in 0.02 s instead of 3.3 s on a CPU (eval_cost.py),
    and without the rounding a singular S1 leaves in the general eigenvalues.
    """
    n, d = features.shape
    if n > d:
        return frechet_distance(Statistics.of(features), reference)
    array = features.double().numpy()
    mu = array.mean(axis=0)
    centred = array - mu
    eigenvalues = np.linalg.eigvalsh(centred @ reference.sigma @ centred.T / (n - 1))
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    trace = (centred**2).sum() / (n - 1)  # Tr(S1), without building the d x d S1
    diff = mu - reference.mu
    return float(diff.dot(diff) + trace + np.trace(reference.sigma) - 2 * tr_covmean)


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return (x @ y.T / x.shape[1] + KID_COEF0) ** KID_DEGREE


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate of MMD² between two equal-size samples under the polynomial kernel."""
    m = len(x)
    k_xx, k_yy, k_xy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(generated: torch.Tensor, reference: torch.Tensor, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = 2020) -> dict:
    """KID mean and std over random subsets (torch-fidelity's procedure; subset size capped at the set sizes)."""
    x, y = generated.double().numpy(), reference.double().numpy()
    size = min(subset_size, len(x), len(y))
    if size < 2:
        raise ValueError("KID needs at least 2 images on each side")
    rng = np.random.RandomState(seed)
    values = np.array([
        mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
        for _ in range(subsets)
    ])
    # Subsets as large as both sets are the sets themselves, reordered: their spread says nothing (0 up to rounding).
    spread = None if size == len(x) == len(y) else float(values.std())
    return {"mean": float(values.mean()), "std": spread, "subsets": subsets, "subset_size": size}


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int = IS_SEED) -> dict:
    """exp(E[KL(p(y|x) || p(y))]) per split, mean and std over the splits."""
    n = len(logits)
    splits = max(1, min(splits, n))
    logits = logits[np.random.RandomState(seed).permutation(n)].double()
    p, log_p = logits.softmax(dim=1), logits.log_softmax(dim=1)
    scores = []
    for i in range(splits):
        part = slice(i * n // splits, (i + 1) * n // splits)
        q = p[part].mean(dim=0, keepdim=True)
        scores.append((p[part] * (log_p[part] - q.log())).sum(dim=1).mean().exp().item())
    return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "splits": splits}


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, k: int = PRC_NEIGHBOURS) -> dict:
    """Precision: share of generated images inside some reference image's k-NN ball; recall the other way round."""
    generated, reference = generated.float(), reference.float()
    if min(len(generated), len(reference)) <= k:
        raise ValueError(f"precision/recall need more than k = {k} images on each side")
    radius_generated, radius_reference = _kth_radius(generated, k), _kth_radius(reference, k)
    recall = _share_inside(reference, generated, radius_generated)
    precision = _share_inside(generated, reference, radius_reference)
    return {"precision": precision, "recall": recall, "k": k}


PRC_ROWS = 10_000  # rows of a distance matrix at a time, as torch-fidelity: a 50k x 50k one would be 10 GB


def _kth_radius(points: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest other point (itself is the first)."""
    return torch.cat([torch.cdist(points[i:i + PRC_ROWS], points).kthvalue(k + 1, dim=1).values
                      for i in range(0, len(points), PRC_ROWS)])


def _share_inside(points: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor) -> float:
    """The share of `points` within `radius` of some centre."""
    inside = torch.cat([(torch.cdist(points[i:i + PRC_ROWS], centres) <= radius).any(dim=1)
                        for i in range(0, len(points), PRC_ROWS)])
    return inside.float().mean().item()
