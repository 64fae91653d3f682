"""fastopt.preprocessing: statistics fitted on training data, applied unchanged to test data."""
import numpy as np
import pytest

from fastopt.preprocessing import PCA, Standardize

try:
    import cupy
except ImportError:
    cupy = None

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(cupy is None, reason="CuPy is not installed"))]


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def _data(shape, seed):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 50, shape[1])  # features / channels of very different ranges, as in the notes
    offset = rng.uniform(-100, 100, shape[1])
    bshape = (1, shape[1]) + (1,) * (len(shape) - 2)
    return rng.standard_normal(shape) * scale.reshape(bshape) + offset.reshape(bshape)


# (id, shape, axis, scale): per feature, per channel (VGG), mean image (AlexNet), centering only
STANDARDIZE = [
    ("per-feature", (200, 6), 0, True),
    ("per-channel", (40, 3, 5, 5), (0, 2, 3), True),
    ("mean-image", (40, 3, 4, 4), 0, False),
    ("per-channel-center-only", (40, 3, 5, 5), (0, 2, 3), False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, shape, axis, scale", STANDARDIZE, ids=[c[0] for c in STANDARDIZE])
def test_standardize_fits_on_train_and_applies_to_test(name, shape, axis, scale, device):
    xp = cupy if device == "cuda" else np
    train, test = xp.asarray(_data(shape, 0)), xp.asarray(_data(shape, 0)[: shape[0] // 2] * 1.5 + 3)
    pre = Standardize(axis=axis, scale=scale)
    out = _host(pre.fit_transform(train))
    np.testing.assert_allclose(out.mean(axis=axis), 0, atol=1e-9)
    if scale:
        np.testing.assert_allclose(out.std(axis=axis), 1, rtol=1e-6)
    h_train, h_test = _host(train), _host(test)
    mean = h_train.mean(axis=axis, keepdims=True)
    expected = (h_test - mean) / (h_train.std(axis=axis, keepdims=True) if scale else 1)
    np.testing.assert_allclose(_host(pre.transform(test)), expected, rtol=1e-6, atol=1e-9)  # not refitted
    np.testing.assert_allclose(_host(pre.inverse_transform(pre.transform(test))), h_test, rtol=1e-12, atol=1e-9)


def test_standardize_keeps_constant_feature_finite():
    x = np.column_stack([np.arange(10.0), np.full(10, 3.0)])
    out = Standardize().fit_transform(x)
    assert np.all(np.isfinite(out)) and not out[:, 1].any()


def _correlated(n, d, seed):
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) * np.linspace(3, 0.2, d)
    return rng.standard_normal((n, d)) @ mixing.T + rng.uniform(-5, 5, d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [2, 5])
def test_pca_matches_the_svd_of_the_centered_data(k, device):
    # an independent route: X_c = U S V^T, so the principal directions are the rows of V^T
    # and the covariance eigenvalues S^2 / N
    xp = cupy if device == "cuda" else np
    x = _correlated(300, 5, 0)
    pca = PCA(n_components=k).fit(xp.asarray(x))
    centered = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    comps = _host(pca.components)
    # the same directions (each sign is free): |<u_i, v_i>| = 1
    np.testing.assert_allclose(np.abs(np.sum(comps * vt[:k], axis=1)), 1, rtol=1e-8)
    np.testing.assert_allclose(_host(pca.explained_variance), s[:k] ** 2 / 300, rtol=1e-8)
    np.testing.assert_allclose(np.abs(_host(pca.transform(xp.asarray(x)))), np.abs(centered @ vt[:k].T),
                               rtol=1e-7, atol=1e-9)


def test_pca_whitening_gives_identity_covariance_on_train_only_statistics_on_test():
    train, test = _correlated(400, 4, 1), _correlated(50, 4, 2)
    pca = PCA(whiten=True, eps=0.0).fit(train)
    white = pca.transform(train)
    np.testing.assert_allclose(white.T @ white / len(train), np.eye(4), atol=1e-10)
    expected = (test - train.mean(0)) @ pca.components.T / np.sqrt(pca.explained_variance)
    np.testing.assert_allclose(pca.transform(test), expected, rtol=1e-12)
    assert not np.allclose(pca.transform(test), PCA(whiten=True, eps=0.0).fit_transform(test))


def test_pca_decorrelates_and_orders_by_variance():
    x = _correlated(500, 6, 3)
    pca = PCA().fit(x)
    y = pca.transform(x)
    cov = y.T @ y / len(x)
    np.testing.assert_allclose(cov, np.diag(pca.explained_variance), atol=1e-8)
    assert np.all(np.diff(pca.explained_variance) <= 0)
    np.testing.assert_allclose(pca.inverse_transform(y), x, rtol=1e-10, atol=1e-10)  # all components: exact


def test_pca_flattens_images():
    images = np.random.default_rng(4).standard_normal((30, 2, 3, 3))
    pca = PCA(n_components=4).fit(images)
    assert pca.components.shape == (4, 18) and pca.transform(images).shape == (30, 4)


BAD = [
    (RuntimeError, "not fitted", lambda: Standardize().transform(np.ones((2, 2)))),
    (RuntimeError, "not fitted", lambda: PCA().transform(np.ones((2, 2)))),
    (ValueError, "n_components must be <=", lambda: PCA(n_components=5).fit(np.ones((10, 3)))),
    (ValueError, "n_components must be a positive", lambda: PCA(n_components=0)),
    (ValueError, "at least 2 samples", lambda: PCA().fit(np.ones((1, 3)))),
    (ValueError, "fitted on 3", lambda: PCA().fit(_correlated(10, 3, 0)).transform(np.ones((2, 4)))),
    (ValueError, "eps must be", lambda: Standardize(eps=-1)),
]


@pytest.mark.parametrize("error, message, call", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input(error, message, call):
    with pytest.raises(error, match=message):
        call()
