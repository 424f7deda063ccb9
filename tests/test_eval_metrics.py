"""The metric formulas against what they must equal: closed forms, unbiasedness, limits."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from difftrain.evaluate.metrics import (
    Statistics,
    frechet_distance,
    frechet_distance_of,
    inception_score,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)


def test_frechet_distance_equals_the_closed_form_for_known_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + np.eye(d), b @ b.T + np.eye(d)
    # ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2), with the matrix root from scipy
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(Statistics(mu1, s1, 0), Statistics(mu2, s2, 0)) == pytest.approx(expected, rel=1e-9)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2 per dimension, plus the mean term
    v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    diagonal = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    got = frechet_distance(Statistics(mu1, np.diag(v1), 0), Statistics(mu2, np.diag(v2), 0))
    assert got == pytest.approx(diagonal, rel=1e-9)
    assert frechet_distance(Statistics(mu1, s1, 0), Statistics(mu1, s1, 0)) == pytest.approx(0, abs=1e-8)


def test_frechet_distance_of_samples_approaches_the_population_value():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 4, generator=generator)
    y = torch.randn(20000, 4, generator=generator) * 2 + 1  # N(1, 4 I)
    # population: 4 * 1^2 + 4 * (1 - 2)^2 = 8
    assert frechet_distance(Statistics.of(x), Statistics.of(y)) == pytest.approx(8.0, rel=0.05)


def test_the_small_set_route_gives_the_full_eigenproblem_value():
    generator = torch.Generator().manual_seed(5)
    reference = Statistics.of(torch.randn(600, 256, generator=generator) * 0.7 + 0.2)
    few = torch.randn(40, 256, generator=generator)  # n < d: the n x n route
    # equal up to the general eigensolver's rounding on a singular product (~1e-8 relative)
    assert frechet_distance_of(few, reference) == pytest.approx(frechet_distance(Statistics.of(few), reference), rel=1e-6)
    many = torch.randn(300, 256, generator=generator)  # n > d: the general one
    assert frechet_distance_of(many, reference) == frechet_distance(Statistics.of(many), reference)
    # a set against its own statistics: zero up to rounding (1e-9 of the covariance's trace)
    own = Statistics.of(few)
    assert abs(frechet_distance_of(few, own)) < 1e-8 * np.trace(own.sigma)


def test_kid_is_unbiased_between_two_halves_of_one_distribution():
    rng = np.random.default_rng(1)
    # The unbiased MMD^2 averages to 0 over many draws of two samples of one law; the biased one does not.
    draws = [mmd2_unbiased(rng.normal(size=(40, 8)), rng.normal(size=(40, 8))) for _ in range(300)]
    assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(len(draws))
    features = torch.randn(400, 64, generator=torch.Generator().manual_seed(2))
    same = kernel_inception_distance(features[:200], features[200:], subsets=50, subset_size=100)
    shifted = kernel_inception_distance(features[:200], features[200:] + 0.5, subsets=50, subset_size=100)
    assert abs(same["mean"]) < 3 * same["std"]
    assert shifted["mean"] > 10 * max(same["std"], 1e-9)
    assert same["subset_size"] == 100
    whole = kernel_inception_distance(features[:30], features[30:60])
    assert whole["subset_size"] == 30 and whole["std"] is None  # capped at the set size: every subset is the set


def test_inception_score_limits():
    # Every image confidently one of C classes, classes equally used: IS = C; all alike: IS = 1.
    classes = 10
    logits = torch.full((200, 1008), -50.0)
    logits[torch.arange(200), torch.arange(200) % classes] = 50.0
    assert inception_score(logits, splits=1)["mean"] == pytest.approx(classes, rel=1e-6)
    assert inception_score(torch.zeros(100, 1008))["mean"] == pytest.approx(1.0)
    assert inception_score(logits)["splits"] == 10


def test_precision_and_recall_of_same_and_disjoint_sets():
    features = torch.randn(100, 16, generator=torch.Generator().manual_seed(3))
    same = precision_recall(features, features.clone())
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = precision_recall(features, features + 100.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0
    # a generated set that covers a quarter of the reference: precise, but low recall
    reference = torch.randn(400, 2, generator=torch.Generator().manual_seed(4))
    corner = reference[(reference[:, 0] > 0) & (reference[:, 1] > 0)]
    half = precision_recall(corner, reference)
    assert half["precision"] > 0.9 and half["recall"] < 0.5


def test_precision_and_recall_in_row_blocks_equal_the_whole_matrices(monkeypatch):
    """Blocks of rows keep memory at PRC_ROWS x N (a 50k reference's whole matrix is 10 GB)."""
    import difftrain.evaluate.metrics as metrics

    generated = torch.randn(150, 8, generator=torch.Generator().manual_seed(5))
    reference = torch.randn(230, 8, generator=torch.Generator().manual_seed(6)) * 1.3
    radius_g = torch.cdist(generated, generated).kthvalue(4, dim=1).values
    radius_r = torch.cdist(reference, reference).kthvalue(4, dim=1).values
    whole = {"recall": (torch.cdist(reference, generated) <= radius_g).any(dim=1).float().mean().item(),
             "precision": (torch.cdist(generated, reference) <= radius_r).any(dim=1).float().mean().item(), "k": 3}
    monkeypatch.setattr(metrics, "PRC_ROWS", 17)
    assert precision_recall(generated, reference) == whole and 0 < whole["precision"] < 1 and 0 < whole["recall"] < 1
