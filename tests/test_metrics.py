"""genkit.metrics against independent computations: FID against pytorch-fid's formula
(scipy.linalg.sqrtm), torchmetrics and the closed form for commuting covariances; KID against
a double loop; precision/recall on points checked by hand."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from genkit.errors import InvalidParameterError
from genkit.metrics import (
    FeatureSet,
    SampleMetrics,
    check_metrics,
    frechet_distance,
    kernel_inception_distance,
    mmd2_unbiased,
    precision_recall,
)


def gaussian(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ a * scale + shift


def pytorch_fid_formula(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance, written out from its documented steps."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("d", [3, 16])
def test_fid_equals_pytorch_fid_formula(d):
    x, y = gaussian(400, d, 0), gaussian(300, d, 1, shift=0.2, scale=1.3)
    fx, fy = FeatureSet(), FeatureSet()
    for chunk in x.split(64):
        fx.update(chunk)
    fy.update(y)
    mu1, s1 = fx.mean_cov()
    mu2, s2 = fy.mean_cov()
    # the streamed mean and covariance are numpy's
    np.testing.assert_allclose(s1.numpy(), np.cov(x.numpy(), rowvar=False), rtol=1e-10)
    np.testing.assert_allclose(mu2.numpy(), y.numpy().mean(0), rtol=1e-12)
    ours = frechet_distance(mu1, s1, mu2, s2)
    ref = pytorch_fid_formula(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy())
    assert ours == pytest.approx(ref, rel=1e-6)


def test_fid_closed_form_for_commuting_covariances():
    """Covariances Q diag(a) Q^T and Q diag(b) Q^T: tr(sqrt(S1 S2)) = sum sqrt(a b), so
    d^2 = ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2."""
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    a = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.1], dtype=torch.float64)
    b = torch.tensor([1.5, 0.2, 2.0, 4.0, 0.9], dtype=torch.float64)
    mu1, mu2 = torch.zeros(5, dtype=torch.float64), torch.arange(5, dtype=torch.float64) / 3
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    got = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu1, q @ torch.diag(a) @ q.T) == (
        pytest.approx(0.0, abs=1e-9)
    )


def test_fid_equals_torchmetrics_with_a_custom_feature_module():
    fid_module = pytest.importorskip("torchmetrics.image.fid")

    class Identity(torch.nn.Module):
        num_features = 6

        def forward(self, x):
            return x.double()

    x, y = gaussian(200, 6, 4), gaussian(150, 6, 5, shift=0.5)
    tm = fid_module.FrechetInceptionDistance(feature=Identity(), input_img_size=(6,))
    tm.update(x, real=True)
    tm.update(y, real=False)
    m = SampleMetrics(["fid"])
    m.update(x, real=True)
    m.update(y, real=False)
    assert m.compute()["fid"]["value"] == pytest.approx(float(tm.compute()), rel=1e-6)


def brute_force_mmd2(x, y):
    def k(a, b):
        return (sum(float(p) * float(q) for p, q in zip(a, b, strict=True)) / len(a) + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_equals_a_double_loop():
    x, y = gaussian(9, 3, 6), gaussian(7, 3, 7, shift=0.4)
    assert mmd2_unbiased(x, y) == pytest.approx(brute_force_mmd2(x.tolist(), y.tolist()), rel=1e-9)
    # the subset mean is the mean of the double loop over the same subsets
    mean, std = kernel_inception_distance(x, y, subsets=4, subset_size=5, seed=11)
    g = torch.Generator().manual_seed(11)
    values = []
    for _ in range(4):  # several subsets: at most half of each set (7 // 2 = 3), so they differ
        i, j = torch.randperm(9, generator=g)[:3], torch.randperm(7, generator=g)[:3]
        values.append(brute_force_mmd2(x[i].tolist(), y[j].tolist()))
    assert mean == pytest.approx(np.mean(values), rel=1e-9)
    assert std == pytest.approx(np.std(values, ddof=1), rel=1e-9) and std > 0


def test_kid_of_one_distribution_is_zero_within_its_error():
    """The estimate is unbiased: over independent pairs of sets from one Gaussian, the mean
    KID is 0 within 3 standard errors (and a shifted pair is far above)."""
    kids = []
    for r in range(20):
        x, y = gaussian(100, 8, 100 + 2 * r), gaussian(100, 8, 101 + 2 * r)
        # the same mixing matrix for both sets: re-draw y from x's distribution
        g = torch.Generator().manual_seed(100 + 2 * r)
        a = torch.randn(8, 8, generator=g, dtype=torch.float64) / math.sqrt(8)
        y = torch.randn(100, 8, generator=torch.Generator().manual_seed(999 + r)).double() @ a
        kids.append(kernel_inception_distance(x, y, subsets=1, subset_size=100)[0])
    kids = np.asarray(kids)
    assert abs(kids.mean()) < 3 * kids.std(ddof=1) / math.sqrt(len(kids))
    shifted = kernel_inception_distance(x, y + 1.0, subsets=1, subset_size=100)[0]
    assert shifted > kids.mean() + 10 * kids.std(ddof=1)


def test_precision_recall_by_hand():
    """k = 1. Real {0, 1, 2, 3, 10}: radii 1, 1, 1, 1, 7. Fake {0.5, 2.5, 5, 30, 31}: radii
    2, 2, 2.5, 1, 1. Precision: 0.5, 2.5 and 5 (|5 - 10| <= 7) lie in the real balls, 30 and
    31 do not: 3/5. Recall: 0..3 lie in the fake balls, 10 does not (5 away from 5, radius
    2.5): 4/5."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    fake = torch.tensor([[0.5], [2.5], [5.0], [30.0], [31.0]])
    assert precision_recall(real, fake, k=1) == pytest.approx((0.6, 0.8))


def test_precision_recall_of_a_set_against_itself_is_one():
    x = gaussian(50, 4, 8)
    assert precision_recall(x, x, k=3) == (1.0, 1.0)
    with pytest.raises(InvalidParameterError, match="more than 3"):
        precision_recall(x[:3], x, k=3)


def test_state_merges_like_one_process():
    x, y = gaussian(60, 4, 9), gaussian(40, 4, 10, shift=1.0)
    whole, a, b = SampleMetrics(), SampleMetrics(), SampleMetrics()
    whole.update(x, real=True)
    whole.update(y, real=False)
    a.update(x[:25], real=True)
    a.update(y[:10], real=False)
    b.update(x[25:], real=True)
    b.update(y[10:], real=False)
    a.merge(b)
    got, want = a.compute(), whole.compute()
    for name in want:
        assert got[name]["value"] == pytest.approx(want[name]["value"], rel=1e-9)


def test_unknown_metric_is_one_clear_line():
    with pytest.raises(InvalidParameterError, match=r"unknown metric 'fdi'.*did you mean 'fid'"):
        check_metrics(["fdi"])
    assert check_metrics(["FID", "kid", "fid"]) == ["fid", "kid"]
