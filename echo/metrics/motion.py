"""Facial-motion metrics of the ECHO paper (Sec. 4.1, Tables 1 and 3), after learning2listen (Ng et al., 2022).

All functions take motion-coefficient sequences as arrays of shape `(T, D)` (frames × dims): FLAME/3DMM expression
(50-d) or pose (6-d) coefficients, or the landmark-based coefficients of `echo.metrics.extractor`. Lists of
sequences (clips of different lengths) are accepted where a metric pools frames over a data set.

Choices the paper and learning2listen leave open, fixed here:

- **MSE**: mean over frames *and* dims of the squared difference (per clip); the data-set value is the mean over
  clips.
- **FD**: Fréchet distance between Gaussians fitted to the *frames* (each frame one sample of dimension D) of the
  generated and of the ground-truth sequences, pooled over clips (covariance with ``ddof=1``); the trace of the
  covariance-product square root in its symmetric form (see `frechet_distance_from_statistics`).
- **Var**: variance over time (population variance, ``ddof=0``) of each dim, averaged over dims, per sequence; the
  data-set value is the mean over clips.
- **SID**: k-means (k = 15 for expression, 9 for pose) fitted on the pooled ground-truth frames with k-means++
  seeding, ``n_init`` restarts and a fixed ``seed`` (deterministic); every generated frame is assigned to its
  nearest centroid and SID is the Shannon entropy of that histogram in **bits** (``log2``), so it lies in
  ``[0, log2(k)]`` (3.91 for k = 15, 3.17 for k = 9). The histogram is taken over all frames of the generated set
  passed in (one sequence, or a list pooled together). Note: the paper's Table 1 reports a ground-truth SID of
  3.972, slightly above ``log2(15)`` = 3.907; a 15-bin histogram cannot reach it in bits (nor in nats), so Table 1's
  aggregation of expression and pose is not recoverable from the text. ``echo-eval`` reports expression and pose
  SID separately (and the ground truth's own SID under the same clusters, as a reference value).
- **rPCC**: PCC(a, u) between an avatar sequence ``a`` and the user sequence ``u`` is the Pearson correlation over
  time of each dim, averaged over dims (dims that are constant in either sequence contribute 0, the correlation of
  a constant signal being undefined); ``rpcc = |PCC(gt, user) − PCC(generated, user)|`` per clip, averaged over
  clips for the data set.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SID_CLUSTERS = {"expression": 15, "pose": 9}


def _as_sequence(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"`{name}` has shape {tuple(x.shape)}, expected a non-empty (frames, dims) motion sequence.")
    if not np.isfinite(x).all():
        raise ValueError(f"`{name}` holds NaN or inf values; drop or interpolate frames without a detected face first.")
    return x


def _stack_frames(x: np.ndarray | Sequence[np.ndarray], name: str) -> np.ndarray:
    """`(T, D)` or a list of `(T_i, D)` → all frames `(ΣT_i, D)`."""
    if isinstance(x, np.ndarray) and x.ndim <= 2:
        return _as_sequence(x, name)
    seqs = [_as_sequence(s, f"{name}[{i}]") for i, s in enumerate(x)]
    if not seqs:
        raise ValueError(f"`{name}` is an empty list of motion sequences.")
    dims = {s.shape[1] for s in seqs}
    if len(dims) != 1:
        raise ValueError(f"`{name}` mixes sequences of different dims {sorted(dims)}; all must share one.")
    return np.concatenate(seqs, axis=0)


def _check_same_shape(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` has shape {tuple(a.shape)} but `{name_b}` has shape {tuple(b.shape)}; frame-aligned metrics "
            "need sequences of the same length and dims (trim both to the shorter clip first)."
        )


def mse(generated: np.ndarray, ground_truth: np.ndarray) -> float:
    """Point-wise reconstruction error: mean over frames and dims of `(generated − ground_truth)²`.

    Args:
        generated (`np.ndarray` of shape `(T, D)`), ground_truth (`np.ndarray` of shape `(T, D)`).
    """
    gen = _as_sequence(generated, "generated")
    gt = _as_sequence(ground_truth, "ground_truth")
    _check_same_shape(gen, gt, "generated", "ground_truth")
    return float(np.mean((gen - gt) ** 2))


def gaussian_statistics(samples: np.ndarray | Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean `(D,)` and covariance `(D, D)` (``ddof=1``) of the frames of one sequence or a list of sequences."""
    x = _stack_frames(samples, "samples")
    if x.shape[0] < 2:
        raise ValueError(f"`samples` has {x.shape[0]} frame(s); a covariance needs at least 2.")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues → 0)."""
    eigvals, eigvecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between `N(mu1, sigma1)` and `N(mu2, sigma2)`.

    ``d² = |mu1 − mu2|² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^{1/2})`` (Dowson & Landau, 1982). The trace of the
    square root is computed in its symmetric form, ``tr((sigma1 sigma2)^{1/2}) = Σ sqrt(eig(s1 sigma2 s1))`` with
    ``s1 = sigma1^{1/2}`` (the two matrices are similar), which equals pytorch-fid's ``scipy.linalg.sqrtm`` value
    (tested) and stays finite and real for singular covariances (fewer samples than dims) without an ``eps`` fix.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape:
        raise ValueError(f"`mu1` has shape {mu1.shape} but `mu2` has shape {mu2.shape}; they must match.")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"`sigma1` {sigma1.shape} and `sigma2` {sigma2.shape} must both be ({mu1.shape[0]}, {mu1.shape[0]})."
        )
    diff = mu1 - mu2
    root1 = _sqrt_psd(sigma1)
    product = root1 @ sigma2 @ root1
    trace_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0.0, None)).sum()
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_covmean)


def frechet_distance(
    generated: np.ndarray | Sequence[np.ndarray], ground_truth: np.ndarray | Sequence[np.ndarray]
) -> float:
    """FD between the frame distributions of the generated and ground-truth motions (each pooled over clips).

    Args:
        generated (`np.ndarray` of shape `(T, D)` or a list of them), ground_truth (same).
    """
    mu1, sigma1 = gaussian_statistics(generated)
    mu2, sigma2 = gaussian_statistics(ground_truth)
    return frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2)


def variance(motion: np.ndarray) -> float:
    """Var: temporal variance (``ddof=0``) of each dim of one `(T, D)` sequence, averaged over the D dims."""
    x = _as_sequence(motion, "motion")
    return float(np.mean(np.var(x - x[0], axis=0)))  # shifting by the first frame makes a constant exactly 0


def _squared_distances(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """`(N, D)`, `(k, D)` → squared Euclidean distances `(N, k)` (clipped at 0 against round-off)."""
    d = (x**2).sum(1)[:, None] - 2.0 * x @ centroids.T + (centroids**2).sum(1)[None]
    return np.maximum(d, 0.0)


def kmeans(
    data: np.ndarray, num_clusters: int, n_init: int = 10, max_iter: int = 300, seed: int = 0, tol: float = 1e-8
) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding; returns the centroids `(k, D)` of the best of ``n_init`` runs.

    Deterministic for a given ``seed``. Empty clusters are re-seeded with the point farthest from its centroid.
    """
    x = _as_sequence(data, "data")
    if num_clusters < 1 or num_clusters > x.shape[0]:
        raise ValueError(f"`num_clusters` is {num_clusters}; it must be in [1, {x.shape[0]}] (the number of frames).")
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        # 1. k-means++ seeding
        centroids = [x[rng.integers(x.shape[0])]]
        d2 = np.sum((x - centroids[0]) ** 2, axis=1)
        for _ in range(1, num_clusters):
            total = d2.sum()
            idx = rng.choice(x.shape[0], p=d2 / total) if total > 0 else rng.integers(x.shape[0])
            centroids.append(x[idx])
            d2 = np.minimum(d2, np.sum((x - x[idx]) ** 2, axis=1))
        centroids = np.stack(centroids)
        # 2. Lloyd iterations
        for _ in range(max_iter):
            dist = _squared_distances(x, centroids)  # N, k
            labels = dist.argmin(1)
            counts = np.bincount(labels, minlength=num_clusters)
            sums = np.eye(num_clusters)[labels].T @ x  # k, D
            new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
            for j in np.flatnonzero(counts == 0):  # re-seed an empty cluster with the worst-fitted point
                new[j] = x[dist[np.arange(len(x)), labels].argmax()]
            shift = np.sum((new - centroids) ** 2)
            centroids = new
            if shift <= tol:
                break
        inertia = _squared_distances(x, centroids).min(1).sum()
        if inertia < best_inertia:
            best, best_inertia = centroids, inertia
    return best


def assign_clusters(data: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index `(N,)` of the nearest centroid `(k, D)` for each row of `data` `(N, D)`."""
    x = _as_sequence(data, "data")
    if x.shape[1] != centroids.shape[1]:
        raise ValueError(f"`data` has {x.shape[1]} dims but `centroids` has {centroids.shape[1]}; they must match.")
    return _squared_distances(x, np.asarray(centroids, dtype=np.float64)).argmin(1)


def entropy_bits(labels: np.ndarray, num_clusters: int) -> float:
    """Shannon entropy (bits) of the histogram of integer ``labels`` over ``num_clusters`` bins."""
    counts = np.bincount(np.asarray(labels).reshape(-1), minlength=num_clusters).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum() + 0.0)


def sid(
    generated: np.ndarray | Sequence[np.ndarray],
    ground_truth: np.ndarray | Sequence[np.ndarray] | None = None,
    num_clusters: int = 15,
    centroids: np.ndarray | None = None,
    n_init: int = 10,
    seed: int = 0,
) -> float:
    """SID: entropy (bits) of the generated frames' histogram over k-means clusters of the ground-truth frames.

    Args:
        generated (`np.ndarray` of shape `(T, D)` or a list of them): the frames whose diversity is scored.
        ground_truth (`np.ndarray` of shape `(T', D)` or a list, *optional*): frames the clusters are fitted on
            (k-means, ``num_clusters`` = 15 for expression and 9 for pose in the paper). Not needed when
            ``centroids`` are given (fit them once with `kmeans` and reuse them for every method compared).
        num_clusters (`int`, defaults to 15).
        centroids (`np.ndarray` of shape `(k, D)`, *optional*).
    Returns:
        `float` in `[0, log2(k)]`.
    """
    if centroids is None:
        if ground_truth is None:
            raise ValueError("`sid` needs either `ground_truth` frames to cluster or precomputed `centroids`.")
        centroids = kmeans(_stack_frames(ground_truth, "ground_truth"), num_clusters, n_init=n_init, seed=seed)
    labels = assign_clusters(_stack_frames(generated, "generated"), centroids)
    return entropy_bits(labels, centroids.shape[0])


def pcc(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over time of each dim of two `(T, D)` sequences, averaged over dims.

    Dims that are constant in either sequence contribute 0.
    """
    x = _as_sequence(a, "a")
    y = _as_sequence(b, "b")
    _check_same_shape(x, y, "a", "b")
    xc, yc = x - x.mean(0), y - y.mean(0)
    denom = np.sqrt((xc**2).sum(0) * (yc**2).sum(0))
    valid = denom > 1e-12
    r = np.zeros(x.shape[1])
    r[valid] = (xc * yc).sum(0)[valid] / denom[valid]
    return float(r.mean())


def rpcc(generated: np.ndarray, ground_truth: np.ndarray, user: np.ndarray) -> float:
    """rPCC = |PCC(ground_truth, user) − PCC(generated, user)| for one clip; lower is better, 0 for a perfect copy.

    Args:
        generated (`np.ndarray` of shape `(T, D)`): the generated avatar's motion.
        ground_truth (`np.ndarray` of shape `(T, D)`): the real avatar's motion.
        user (`np.ndarray` of shape `(T, D)`): the user's (listener's / speaker's) motion over the same frames.
    """
    return abs(pcc(ground_truth, user) - pcc(generated, user))


__all__ = [
    "SID_CLUSTERS",
    "assign_clusters",
    "entropy_bits",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "gaussian_statistics",
    "kmeans",
    "mse",
    "pcc",
    "rpcc",
    "sid",
    "variance",
]
