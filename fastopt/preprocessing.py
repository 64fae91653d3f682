"""Data preprocessing from the lecture notes: zero-centering, normalization, PCA, whitening.

Statistics are fitted on the training data only and then applied unchanged to validation
and test data (refitting on test data would leak it into the model). Each class has
``fit(x)``, ``transform(x)``, ``fit_transform(x)`` and ``inverse_transform(y)``, and works on
NumPy or CuPy arrays (the fitted statistics live on the device of the data they were fitted on).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .nn._array import array_module

if TYPE_CHECKING:
    import numpy as np


class _Fitted:
    if TYPE_CHECKING:  # each subclass defines them
        def fit(self, x: np.ndarray) -> _Fitted: ...

        def transform(self, x: np.ndarray) -> np.ndarray: ...

    def fit_transform(self, x: np.ndarray) -> np.ndarray:
        """``fit(x)`` then ``transform(x)``."""
        return self.fit(x).transform(x)

    def _require_fitted(self) -> None:
        if not getattr(self, "fitted", False):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(train_data) first")


class Standardize(_Fitted):
    """x -> (x - mean) / std, the statistics taken over ``axis`` of the training data.

    axis=0 on (N, D) data: per feature. axis=(0, 2, 3) on (N, C, H, W) images: per channel
    (the VGG practice: C means). axis=0 on images: the mean image (AlexNet).
    ``scale=False``: zero-centering only (the notes' advice for images); ``eps`` keeps a
    constant feature from dividing by zero: std = sqrt(var + eps).
    Defaults: ``axis=0``, ``scale=True``, ``eps=1e-8``.
    """

    def __init__(self, axis: int | tuple[int, ...] = 0, scale: bool = True, eps: float = 1e-8) -> None:
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.axis, self.scale, self.eps = axis, bool(scale), float(eps)

    def fit(self, x: np.ndarray) -> Standardize:
        """Take the mean (and std) of the training data ``x``; returns self."""
        xp = array_module(x)
        if x.size == 0:
            raise ValueError("x is empty: nothing to fit")
        self.mean = x.mean(axis=self.axis, keepdims=True)
        self.std = xp.sqrt(x.var(axis=self.axis, keepdims=True) + self.eps) if self.scale else None
        self.fitted = True
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` (``x - mean`` with ``scale=False``)."""
        self._require_fitted()
        centered = x - self.mean
        return centered / self.std if self.scale else centered

    def inverse_transform(self, y: np.ndarray) -> np.ndarray:
        """``y * std + mean``: back to the input's scale."""
        self._require_fitted()
        return (y * self.std if self.scale else y) + self.mean


class PCA(_Fitted):
    """Project centered data on the top principal directions (the notes' "PCA and whitening").

    Fit on X (N, D) (any (N, ...) array is flattened per sample): mean mu, covariance
    Sigma = Xc^T Xc / N, eigen-decomposition Sigma = U diag(lam) U^T, eigenvalues descending.

        transform(x) = (x - mu) U_k                           (N, k): decorrelated
        whiten=True:   (x - mu) U_k / sqrt(lam_k + eps)       covariance ~ identity on the training data

    ``components`` (k, D) are the rows U_k^T, each signed so its largest-magnitude entry is
    positive (the decomposition leaves the sign free); ``explained_variance`` is lam_k.
    ``n_components``: k, default None (all D); ``whiten`` default False; ``eps`` default 1e-5.
    """

    def __init__(self, n_components: int | None = None, whiten: bool = False, eps: float = 1e-5) -> None:
        if n_components is not None and (int(n_components) != n_components or n_components < 1):
            raise ValueError(f"n_components must be a positive integer or None, got {n_components!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.n_components, self.whiten, self.eps = n_components, bool(whiten), float(eps)

    def fit(self, x: np.ndarray) -> PCA:
        """Mean, components and explained variance of the training data ``x`` (N, ...); returns self."""
        xp = array_module(x)
        flat = x.reshape(x.shape[0], -1)
        n, d = flat.shape
        k = d if self.n_components is None else int(self.n_components)
        if k > d:
            raise ValueError(f"n_components must be <= the {d} features, got {k}")
        if n < 2:
            raise ValueError(f"fit needs at least 2 samples, got {n}")
        self.mean = flat.mean(axis=0)
        centered = flat - self.mean
        lam, u = xp.linalg.eigh(centered.T @ centered / n)  # ascending
        lam, u = lam[::-1][:k], u[:, ::-1][:, :k]
        pivot = xp.argmax(xp.abs(u), axis=0)
        u = u * xp.sign(u[pivot, xp.arange(k)])
        self.components = xp.ascontiguousarray(u.T)
        self.explained_variance = xp.maximum(lam, 0)  # eigh can return -1e-17 for a zero variance
        self.fitted = True
        return self

    def _scale(self) -> np.ndarray:
        return self.explained_variance + self.eps

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``(x - mu) U_k`` (N, k), divided by ``sqrt(lam_k + eps)`` with ``whiten``."""
        self._require_fitted()
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.mean.shape[0]:
            raise ValueError(f"x has {flat.shape[1]} features per sample, PCA was fitted on {self.mean.shape[0]}")
        y = (flat - self.mean) @ self.components.T
        return y / array_module(y).sqrt(self._scale()) if self.whiten else y

    def inverse_transform(self, y: np.ndarray) -> np.ndarray:
        """Back to the flat (N, D) input space (exact when n_components is D)."""
        self._require_fitted()
        if self.whiten:
            y = y * array_module(y).sqrt(self._scale())
        return y @ self.components + self.mean
