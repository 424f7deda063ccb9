"""Our evaluation code against the reference implementations, where those can be imported.

torch-fidelity's metric modules and the `lpips` package import torchvision, which does
not install beside this project's CPU torch, so CI skips this file. It runs in any
environment with torchvision (see the README's "Measuring" section for the command that
ran it here, in a second virtualenv with torch 2.14.1 + torchvision 0.29.1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchvision")
torch_fidelity = pytest.importorskip("torch_fidelity")  # the whole package, as its users import it
lpips = pytest.importorskip("lpips")

from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric  # noqa: E402
from torch_fidelity.metric_isc import isc_features_to_metric  # noqa: E402
from torch_fidelity.metric_kid import kid_features_to_metric  # noqa: E402
from torch_fidelity.metric_prc import calculate_precision_recall_full  # noqa: E402

from difftrain.evaluate import metrics  # noqa: E402
from difftrain.evaluate.inception import InceptionFeatures, write_random_inception  # noqa: E402
from difftrain.evaluate.lpips import LPIPS, TAPS  # noqa: E402


def test_metric_formulas_equal_torch_fidelity():
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(300, 2048, generator=generator)
    b = torch.randn(250, 2048, generator=generator) * 1.1 + 0.05
    theirs = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False)
    ours = metrics.frechet_distance(metrics.Statistics.of(a), metrics.Statistics.of(b))
    # torch-fidelity takes the feature mean in float32 (np.mean of float32 features), we in float64: ~4e-10 apart
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-8)
    # what evaluation runs for fewer images than dimensions (the n x n eigenproblem): ~6e-8 from the general
    # eigensolver, whose rounding on a singular product is the larger of the two errors
    assert metrics.frechet_distance_of(a, metrics.Statistics.of(b)) == pytest.approx(
        theirs["frechet_inception_distance"], rel=1e-6)
    theirs = kid_features_to_metric(a, b, kid_subsets=100, kid_subset_size=200, verbose=False, rng_seed=2020)
    ours = metrics.kernel_inception_distance(a, b, subsets=100, subset_size=200, seed=2020)
    # the same subsets (same seed and draw order); torch-fidelity's kernels run in float32, ours in float64
    assert ours["mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)
    assert ours["std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4)
    logits = torch.randn(500, 1008, generator=generator) * 3
    theirs = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    ours = metrics.inception_score(logits)
    assert ours["mean"] == pytest.approx(theirs["inception_score_mean"], rel=1e-12)
    assert ours["std"] == pytest.approx(theirs["inception_score_std"], rel=1e-9)
    precision, recall = calculate_precision_recall_full(a[:200], b[:200], neighborhood=3)
    ours = metrics.precision_recall(a[:200], b[:200])
    assert (ours["precision"], ours["recall"]) == (precision, recall)


def test_inception_features_match_torch_fidelity_as_it_loads_itself(tmp_path):
    from safetensors.torch import load_file
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = write_random_inception(tmp_path / "inception.safetensors", seed=3)
    torch.save(load_file(weights), tmp_path / "inception.pth")  # the form torch-fidelity reads
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                         feature_extractor_weights_path=str(tmp_path / "inception.pth"))
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    pool, logits = InceptionFeatures(weights)([Image.fromarray(p) for p in pixels], 40)
    their_pool, their_logits = theirs(torch.from_numpy(pixels).permute(0, 3, 1, 2))
    # ours runs channels_last (faster on CPU and GPU); the kernels round differently, by ~1e-6
    assert torch.allclose(pool, their_pool, rtol=1e-5, atol=1e-6 * their_pool.abs().max().item())
    assert torch.allclose(logits, their_logits, rtol=1e-5, atol=1e-6 * their_logits.abs().max().item())


def test_lpips_equals_the_lpips_package():
    torch.manual_seed(0)
    theirs = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)  # shipped heads, random backbone
    ours = LPIPS()
    backbone = {}
    for tap, (start, end) in enumerate(TAPS, 1):
        for index in range(start, end):
            for name, value in getattr(theirs.net, f"slice{tap}")._modules[str(index)].state_dict().items():
                backbone[f"features.{index}.{name}"] = value
    heads = {k: v for k, v in theirs.state_dict().items() if k.startswith("lin")}
    ours.load(backbone, heads)
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    y = torch.rand(4, 3, 64, 64) * 2 - 1
    expected = theirs(x, y).flatten()
    assert torch.allclose(ours(x, y), expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(ours(x, x), theirs(x, x).flatten(), atol=1e-7)
