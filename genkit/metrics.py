"""Sample-quality metrics on feature vectors: FID, KID and improved precision/recall.

Each metric compares two sets of features, ``real`` (the reference: the test split) and
``fake`` (the model's samples, or the train split for the floor), computed by a feature
extractor (:mod:`genkit.features`). They follow torchmetrics' habits: :meth:`SampleMetrics.update`
takes batches, :meth:`SampleMetrics.compute` runs once, and the state is plain tensors that
merge across processes (:meth:`SampleMetrics.merge`: sums add, feature lists concatenate).

The maths is computed here directly, in float64, rather than through torchmetrics'
``FrechetInceptionDistance``/``KernelInceptionDistance``: torchmetrics has no improved
precision/recall, KID and precision/recall both need the features themselves (so one feature
store serves all three), and the few lines below show each formula next to its docstring.
The tests check FID against ``scipy.linalg.sqrtm`` (pytorch-fid's formula), torchmetrics and
the closed form, KID against a double loop, and precision/recall on hand-checked points.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from genkit.errors import InvalidParameterError

#: The metrics :class:`SampleMetrics` computes, in report order.
METRICS = ("fid", "kid", "precision", "recall")


def check_metrics(names: Iterable[str], where: str = "--metrics") -> list[str]:
    """``names`` as a list if each is one of :data:`METRICS`, else one
    :class:`~genkit.errors.InvalidParameterError` line."""
    from genkit.config import did_you_mean

    names = [str(n).strip().lower() for n in names]
    for name in names:
        if name not in METRICS:
            raise InvalidParameterError(
                f"{where}: unknown metric '{name}'{did_you_mean(name, list(METRICS))}; "
                f"available: {', '.join(METRICS)}"
            )
    if not names:
        raise InvalidParameterError(f"{where}: name at least one of {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017)::

        d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))

    pytorch-fid's ``calculate_frechet_distance`` takes ``scipy.linalg.sqrtm(sigma1 @ sigma2)``.
    Here tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i) with lambda_i the eigenvalues of the
    symmetric PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2), which has the same spectrum as
    sigma1 sigma2: real, non-negative up to rounding (clipped at 0), no complex parts to drop.
    """
    mu1, mu2 = mu1.double(), mu2.double()
    s1, s2 = sigma1.double(), sigma2.double()
    w, v = torch.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * w.clamp(min=0).sqrt()) @ v.T  # sigma1^(1/2)
    inner = root1 @ s2 @ root1
    lam = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0)
    diff = mu1 - mu2
    return float(diff @ diff + torch.trace(s1) + torch.trace(s2) - 2 * lam.sqrt().sum())


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's kernel k(x, y) = (x . y / d + 1)^3 for features of dimension d: (n, m)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor) -> float:
    """The unbiased estimate of MMD^2 between samples x (m, d) and y (n, d)::

    MMD^2 = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
            - 2/(mn) sum_{i, j} k(x_i, y_j)
    """
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


def kernel_inception_distance(
    real: Tensor, fake: Tensor, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): :func:`mmd2_unbiased` with :func:`polynomial_kernel` on
    ``subsets`` random subsets of ``m`` examples of each set (drawn without replacement within
    a subset); returns the mean and the std over the subsets (ddof 1; 0 for one subset).

    ``m = min(subset_size, len(real), len(fake))`` for one subset; for several, at most half
    of each set as well, so that the subsets differ and their std measures the estimate's
    spread (with sets no larger than ``subset_size`` every subset would be the whole set and
    the std 0)."""
    real, fake = real.double(), fake.double()
    m = min(subset_size, real.shape[0], fake.shape[0])
    if subsets > 1:
        m = min(m, real.shape[0] // 2, fake.shape[0] // 2)
    if m < 2:
        raise InvalidParameterError(f"KID needs at least 2 examples of each set, got {m}")
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        i = torch.randperm(real.shape[0], generator=g)[:m]
        j = torch.randperm(fake.shape[0], generator=g)[:m]
        values.append(mmd2_unbiased(real[i], fake[j]))
    v = np.asarray(values)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def _kth_neighbour_radii(x: Tensor, k: int, batch: int = 1024) -> Tensor:
    """The distance of each row of x (n, d) to its k-th nearest other row: (n,). Rows are
    taken ``batch`` at a time (a (batch, n) block of distances), so 50,000 samples need
    400 MB at once, not the 20 GB of the whole (n, n) matrix."""
    radii = []
    for start in range(0, x.shape[0], batch):
        d = torch.cdist(x[start : start + batch], x)  # (b, n); each row's own point gives 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(centres: Tensor, radii: Tensor, points: Tensor, batch: int = 1024) -> float:
    """The fraction of ``points`` inside at least one ball (centre_i, radius_i) (closed)."""
    inside = 0
    for start in range(0, points.shape[0], batch):
        d = torch.cdist(points[start : start + batch], centres)  # (b, n)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / points.shape[0]


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019). The manifold of a set is the
    union of balls around its points, each of radius the distance to its k-th nearest
    neighbour in the set::

        precision = 1/|fake| sum_{f in fake} [f in manifold(real)]
        recall    = 1/|real| sum_{r in real} [r in manifold(fake)]
    """
    real, fake = real.double(), fake.double()
    for name, x in (("real", real), ("fake", fake)):
        if x.shape[0] <= k:
            raise InvalidParameterError(
                f"precision/recall with k={k} needs more than {k} {name} examples, got {x.shape[0]}"
            )
    precision = _coverage(real, _kth_neighbour_radii(real, k), fake)
    recall = _coverage(fake, _kth_neighbour_radii(fake, k), real)
    return precision, recall


class FeatureSet:
    """The features of one set, gathered batch by batch: their count, sum and sum of outer
    products in float64 (FID's mean and covariance), and the features themselves in float32
    (KID and precision/recall). Merging two sets adds the sums and concatenates the features,
    as torchmetrics' ``"sum"`` and ``"cat"`` reductions do across processes."""

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
        self.count = 0
        self.total: Tensor | None = None  # (d,)
        self.outer: Tensor | None = None  # (d, d)
        self.rows: list[Tensor] = []

    def update(self, features: Tensor) -> None:
        """Add a batch of features (B, d)."""
        f = features.detach().reshape(features.shape[0], -1).cpu()
        f64 = f.double()
        if self.total is None:
            self.total = torch.zeros(f.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64)
        self.count += f.shape[0]
        self.total += f64.sum(0)
        self.outer += f64.T @ f64
        if self.keep:
            self.rows.append(f.float())

    def merge(self, other: FeatureSet) -> None:
        """Add ``other``'s state to this one (another process's share)."""
        if other.total is None:
            return
        if self.total is None:
            self.total, self.outer = other.total.clone(), other.outer.clone()
        else:
            self.total += other.total
            self.outer += other.outer
        self.count += other.count
        self.rows += other.rows

    def features(self) -> Tensor:
        """Every feature kept: (count, d)."""
        return torch.cat(self.rows) if self.rows else torch.empty(0, 0)

    def mean_cov(self) -> tuple[Tensor, Tensor]:
        """The mean (d,) and the unbiased covariance (d, d):
        (sum f f^T - n mu mu^T) / (n - 1)."""
        if self.count < 2 or self.total is None:
            raise InvalidParameterError(f"FID needs at least 2 examples, got {self.count}")
        mu = self.total / self.count
        cov = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu, cov


class SampleMetrics:
    """FID, KID and precision/recall of ``fake`` features against ``real`` features.

    ``update(features, real=True|False)`` with batches, then ``compute()`` once, which returns
    ``{name: {"value": v, "std": s or None}}`` for each requested metric.

    :param metrics: names among :data:`METRICS`.
    :param kid_subsets: KID's number of subsets; :param kid_subset_size: their size (at most).
    :param k: precision/recall's neighbourhood size.
    :param seed: KID's subset draws.
    """

    def __init__(
        self,
        metrics: Sequence[str] = METRICS,
        *,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        k: int = 3,
        seed: int = 0,
    ) -> None:
        self.metrics = check_metrics(metrics, where="metrics")
        self.kid_subsets, self.kid_subset_size, self.k, self.seed = (
            kid_subsets,
            kid_subset_size,
            k,
            seed,
        )
        keep = any(m != "fid" for m in self.metrics)
        self.real, self.fake = FeatureSet(keep), FeatureSet(keep)

    def update(self, features: Tensor, real: bool) -> None:
        """Add a batch of features (B, d) to the real (reference) or the fake set."""
        (self.real if real else self.fake).update(features)

    def merge(self, other: SampleMetrics) -> None:
        """Add another process's state."""
        self.real.merge(other.real)
        self.fake.merge(other.fake)

    def compute(self) -> dict[str, dict[str, float | None]]:
        """Every requested metric: ``{"value": ..., "std": ... or None}``."""
        out: dict[str, dict[str, float | None]] = {}
        if "fid" in self.metrics:
            out["fid"] = {
                "value": frechet_distance(*self.real.mean_cov(), *self.fake.mean_cov()),
                "std": None,
            }
        if "kid" in self.metrics:
            mean, std = kernel_inception_distance(
                self.real.features(),
                self.fake.features(),
                subsets=self.kid_subsets,
                subset_size=self.kid_subset_size,
                seed=self.seed,
            )
            out["kid"] = {"value": mean, "std": std}
        if "precision" in self.metrics or "recall" in self.metrics:
            p, r = precision_recall(self.real.features(), self.fake.features(), self.k)
            for name, value in (("precision", p), ("recall", r)):
                if name in self.metrics:
                    out[name] = {"value": value, "std": None}
        return {name: out[name] for name in self.metrics}
