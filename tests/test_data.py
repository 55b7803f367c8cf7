"""Tests of ddpm_nb.data: sources, fallbacks, transforms, splits and loaders.

Real data comes from the course's offline copy in ../shared/data (beside the checkout); tests that
need it are skipped, with the reason, when it is absent. Nothing here touches the network.
"""
from __future__ import annotations

import gzip
import pickle
import re
import shutil
import socket
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm_nb import data
from ddpm_nb.config import DataConfig

BUNDLED = Path(data.__file__).parent / "assets" / "FashionMNIST-test"  # package data: in the wheel too
FASHION_MD5 = {  # torchvision's FashionMNIST.resources
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def offline_data(shared_data) -> Path:
    """../shared/data (conftest's `shared_data`), checked to hold both datasets these tests read."""
    for sub in ("FashionMNIST/raw/train-images-idx3-ubyte.gz", "flowers/flowers-102/setid.mat"):
        if not (shared_data / sub).exists():
            pytest.skip(f"{shared_data / sub} is missing (CI provides ../shared/data beside the checkout)")
    return shared_data


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails at once, as on an offline machine."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    def connect(sock, address):  # local (AF_UNIX) sockets stay usable: DataLoader workers need them
        if sock.family == socket.AF_UNIX:
            return real_connect(sock, address)
        refuse()

    real_connect = socket.socket.connect
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(data, "_ONLINE", {})
    monkeypatch.delenv("DDPM_NB_OFFLINE", raising=False)


@pytest.fixture
def env(tmp_path, monkeypatch, no_network):
    """An empty default data root (as a fresh clone's data/ without the full sets) and an empty cache,
    both under tmp_path; no network. (An explicit DDPM_NB_DATA that is empty is an error instead.)"""
    root, cache = tmp_path / "root", tmp_path / "cache"
    root.mkdir()
    monkeypatch.delenv("DDPM_NB_DATA", raising=False)
    monkeypatch.setattr(data, "data_root", lambda: root)
    monkeypatch.setenv("DDPM_NB_CACHE", str(cache))
    monkeypatch.setattr(data, "_NOTIFIED", set())
    return root, cache


def listing(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.lstat().st_size) for p in path.rglob("*"))


def idx_gz(path: Path, array: np.ndarray) -> None:
    """Write an IDX file (uint8) the way FashionMNIST's are written."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


# ---------------------------------------------------------------------------------------------
# FashionMNIST: bundled fallback, read-only roots, downloads routed to the cache
# ---------------------------------------------------------------------------------------------
def test_bundled_files_are_the_original_test_split():
    import hashlib

    for name, md5 in FASHION_MD5.items():
        assert hashlib.md5((BUNDLED / name).read_bytes()).hexdigest() == md5
    assert "Zalando SE" in (BUNDLED / "LICENSE").read_text()


@pytest.mark.parametrize("size", [16, 32])
def test_fashion_mnist_falls_back_to_bundled_test_split(env, size):
    root, cache = env
    with pytest.warns(data.BundledDataWarning, match="bundled") as record:
        ds = data.load_dataset(DataConfig(dataset="fashion-mnist", hflip=False), size)
    assert len(record) == 1 and "DDPM_NB_DATA" in str(record[0].message)
    assert len(ds) == 10_000 and data.dataset_channels(ds) == 1
    batch = torch.stack([ds[i][0] for i in range(0, 10_000, 97)])
    assert batch.shape[1:] == (1, size, size) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1 and batch.min() == -1  # background is exactly black
    assert set(ds.labels.tolist()) == set(range(10)) and ds[9_999][1] in range(10)
    assert listing(root) == [] and not cache.exists()  # a failed download leaves nothing behind
    with warnings.catch_warnings():  # the notice is given once, not on every call
        warnings.simplefilter("error")
        data.load_dataset(DataConfig(dataset="fashion-mnist"), size)


def test_fashion_mnist_test_split_uses_bundled_copy_silently(env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = data.load_dataset(DataConfig(dataset="fashion-mnist", split="test"), 28, train=False)
    raw = gzip.open(BUNDLED / "t10k-images-idx3-ubyte.gz").read()
    first = np.frombuffer(raw, np.uint8, offset=16, count=784).reshape(28, 28)
    expected = torch.from_numpy(first.astype(np.float32) / 255 * 2 - 1)
    torch.testing.assert_close(ds[0][0][0], expected)  # 28 px: no resize, exact pixel values
    assert len(ds) == 10_000 and ds[0][1] == 9  # the first test image is an ankle boot


def test_fashion_mnist_has_no_val_split(env):
    with pytest.raises(ValueError, match="no 'val' split.*val_split='test'"):
        data.load_dataset(DataConfig(dataset="fashion-mnist", split="val"), 28)


def test_fashion_mnist_read_only_root_is_never_written(offline_data, tmp_path, monkeypatch, no_network):
    root, cache = tmp_path / "ro", tmp_path / "cache"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in (offline_data / "FashionMNIST" / "raw").glob("*.gz"):
        (raw / gz.name).symlink_to(gz)
    for d in (raw, raw.parent, root):
        d.chmod(0o555)
    before = listing(root)
    monkeypatch.setenv("DDPM_NB_DATA", str(root))
    monkeypatch.setenv("DDPM_NB_CACHE", str(cache))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the full set is there: no fallback notice
            ds = data.load_dataset(DataConfig(dataset="fashion-mnist", split="all"), 32)
        assert len(ds) == 70_000
        x, y = ds[69_999]
        assert x.shape == (1, 32, 32) and 0 <= y <= 9
        assert listing(root) == before
        assert not cache.exists() or listing(cache) == []  # .gz files are read in place, not unpacked
    finally:
        for d in (root, raw.parent, raw):
            d.chmod(stat.S_IRWXU)


@pytest.mark.parametrize("writable", [True, False])
def test_fashion_mnist_download_goes_to_root_or_cache(offline_data, env, monkeypatch, writable):
    """torchvision's real download=True path, with the 'server' being ../shared/data.

    The root holds only the test split (read-only unless `writable`): the train files must be
    downloaded next to it when the root is writable, and into the cache when it is not.
    """
    import torchvision.datasets.utils as tvu

    root, cache = env
    for name in FASHION_MD5:
        (root / name).symlink_to(offline_data / "FashionMNIST" / "raw" / name)
    fetched = []

    def fake_urlretrieve(url, filename, chunk_size=None):
        fetched.append(url.rsplit("/", 1)[1])
        shutil.copyfile(offline_data / "FashionMNIST" / "raw" / fetched[-1], filename)

    monkeypatch.setattr(tvu, "_get_redirect_url", lambda url, max_hops=3: url)
    monkeypatch.setattr(tvu, "_urlretrieve", fake_urlretrieve)
    monkeypatch.setattr(data, "_network_available", lambda url, timeout=3.0: True)
    monkeypatch.setattr(data, "_is_writable", lambda path: writable or Path(path) != root)
    before = listing(root)
    ds = data.load_dataset(DataConfig(dataset="fashion-mnist", split="train", limit=100), 28)
    assert len(ds) == 100 and ds[0][0].shape == (1, 28, 28)
    assert sorted(fetched) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]  # t10k: linked
    target = (root if writable else cache) / "FashionMNIST" / "raw"
    assert (target / "train-images-idx3-ubyte").stat().st_size == 47_040_016
    if not writable:
        assert listing(root) == before


def test_fashion_mnist_unpacked_files_read_like_gz(env):
    root, _ = env
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in FASHION_MD5:  # unpacked test files, as torchvision leaves them
        (raw / name[:-3]).write_bytes(gzip.open(BUNDLED / name).read())
    a = data.load_dataset(DataConfig(dataset="fashion-mnist", split="test", hflip=False), 20)
    monkeypatch_root = root.parent / "empty"
    monkeypatch_root.mkdir()
    b = data.load_dataset(DataConfig(dataset="fashion-mnist", split="test", hflip=False,
                                     root=str(monkeypatch_root)), 20)
    assert str(raw) in a.source and data.FASHION_BUNDLED in b.source
    for i in (0, 1234, 9999):
        torch.testing.assert_close(a[i][0], b[i][0])
        assert a[i][1] == b[i][1]


def test_missing_dataset_error_names_dataset_path_and_fix(env, monkeypatch):
    root, _ = env
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load_dataset(DataConfig(dataset="flowers102"), 32)
    msg = str(err.value)
    assert "Flowers102" in msg and str(root / "flowers-102") in msg and "DDPM_NB_DATA" in msg
    assert isinstance(err.value, FileNotFoundError)

    monkeypatch.setattr(data, "_bundled_dirs", lambda root: [])  # a checkout without the bundled split
    with pytest.raises(data.DatasetNotFoundError, match=r"FashionMNIST.*FashionMNIST/raw.*DDPM_NB_DATA"):
        data.load_dataset(DataConfig(dataset="fashion-mnist"), 32)

    with pytest.raises(data.DatasetNotFoundError, match="no_such_folder.*DataConfig.path"):
        data.load_dataset(DataConfig(dataset="imagefolder", path="no_such_folder"), 32)


def test_offline_env_var_skips_network_probe(monkeypatch):
    monkeypatch.setattr(data, "_ONLINE", {})
    monkeypatch.setenv("DDPM_NB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("network was probed"))
    assert data._network_available("http://example.org/") is False


def test_network_probe_goes_through_the_proxy(monkeypatch):
    """Behind an HTTP proxy the server itself is unreachable; the probe must ask the proxy instead
    (here a listening socket on 127.0.0.1), and go direct again for hosts in no_proxy."""
    for var in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
                "all_proxy", "ALL_PROXY", "DDPM_NB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    real = socket.create_connection
    probed = []

    def connect(address, *args, **kwargs):  # only the local "proxy" is reachable, as behind a firewall
        probed.append(address)
        if address[0] != "127.0.0.1":
            raise OSError("unreachable (test)")
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", connect)
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen(4)
        port = proxy.getsockname()[1]
        monkeypatch.setattr(data, "_ONLINE", {})
        assert data._network_available("https://files.example.org/a.gz", timeout=1.0) is False
        assert probed[-1] == ("files.example.org", 443)
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
        monkeypatch.setattr(data, "_ONLINE", {})
        assert data._network_available("https://files.example.org/a.gz", timeout=1.0) is True
        assert probed[-1] == ("127.0.0.1", port)
        monkeypatch.setenv("no_proxy", "example.org")
        monkeypatch.setattr(data, "_ONLINE", {})
        assert data._network_available("https://files.example.org/a.gz", timeout=1.0) is False
        assert probed[-1] == ("files.example.org", 443)


# ---------------------------------------------------------------------------------------------
# Flowers102
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("split,n", [("train", 1020), ("val", 1020), ("test", 6149), ("all", 8189)])
def test_flowers102_splits(offline_data, monkeypatch, no_network, split, n):
    monkeypatch.setenv("DDPM_NB_DATA", str(offline_data))  # holds flowers/flowers-102/, read only
    ds = data.load_dataset(DataConfig(dataset="flowers102", split=split, hflip=False), 32)
    assert len(ds) == n and data.dataset_channels(ds) == 3
    assert set(ds.labels) == set(range(102))  # every split has every class
    x, y = ds[n - 1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() < x.max() <= 1
    assert 0 <= y <= 101


def test_relative_data_root_is_found_from_any_folder(offline_data, tmp_path, monkeypatch, no_network):
    """`DDPM_NB_DATA=../shared/data` must work from notebooks/ too (nbmake runs notebooks there)."""
    monkeypatch.chdir(tmp_path)  # tmp_path/../shared/data does not exist; the repository's does
    monkeypatch.setenv("DDPM_NB_DATA", "../shared/data")
    ds = data.load_dataset(DataConfig(dataset="flowers102", split="val"), 8)
    assert len(ds) == 1020 and str(offline_data.resolve()) in ds.source


def test_flowers102_matches_torchvision(offline_data):
    from torchvision.datasets import Flowers102

    cfg = DataConfig(dataset="flowers102", root=str(offline_data / "flowers"), split="test", hflip=False)
    ours = data.load_dataset(cfg, 48)
    theirs = Flowers102(str(offline_data / "flowers"), split="test", transform=data.build_transform(48, hflip=False))
    for i in (0, 3000, 6148):
        torch.testing.assert_close(ours[i][0], theirs[i][0])
        assert ours[i][1] == theirs[i][1]
    assert data.dataset_num_classes(cfg) == 102


# ---------------------------------------------------------------------------------------------
# Image folders and numpy arrays
# ---------------------------------------------------------------------------------------------
def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_classes_labels_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    for cls, n in (("tulip", 2), ("daisy", 3), ("rose", 1)):
        for i in range(n):
            write_png(tmp_path / "flowers" / cls / f"{i}.png", rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))
    (tmp_path / "flowers" / "daisy" / "notes.txt").write_text("not an image")
    (tmp_path / "flowers" / "empty").mkdir()
    cfg = DataConfig(dataset="imagefolder", path=str(tmp_path / "flowers"), hflip=False)
    ds = data.load_dataset(cfg, 16)
    assert len(ds) == 6 and ds.classes == ["daisy", "rose", "tulip"]
    assert [ds[i][1] for i in range(6)] == [0, 0, 0, 1, 2, 2]
    assert all(ds[i][0].shape == (3, 16, 16) for i in range(6)) and data.dataset_channels(ds) == 3
    assert data.dataset_num_classes(cfg) == 3
    gray = data.load_dataset(cfg, 16, channels=1)
    assert gray[0][0].shape == (1, 16, 16) and data.dataset_channels(gray) == 1
    with pytest.raises(ValueError, match="no 'test' split"):
        data.load_dataset(cfg, 16, split="test")


def test_image_folder_grayscale_pngs_become_rgb_unless_asked(tmp_path):
    for i in range(2):
        write_png(tmp_path / "g" / "a" / f"{i}.png", np.full((20, 20), 255 * i, np.uint8))
    cfg = DataConfig(dataset="imagefolder", path=str(tmp_path / "g"), hflip=False)
    x = data.load_dataset(cfg, 8)[1][0]
    assert x.shape == (3, 8, 8)
    torch.testing.assert_close(x, torch.ones(3, 8, 8))  # bicubic resize in float32: equal up to rounding
    assert data.load_dataset(cfg, 8, channels=1)[0][0].shape == (1, 8, 8)


def test_image_folder_with_split_subfolders(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for i in range(n):
            write_png(tmp_path / "d" / split / ("cat" if i % 2 else "dog") / f"{i}.png",
                      np.zeros((8, 8, 3), np.uint8))
    cfg = DataConfig(dataset="imagefolder", path=str(tmp_path / "d"))
    assert [len(data.load_dataset(cfg, 8, split=s)) for s in ("train", "test", "all")] == [3, 2, 5]
    assert data.dataset_num_classes(cfg) == 2
    assert data.real_images(cfg, 8, 2).shape == (2, 3, 8, 8)  # split='test' exists here


@pytest.mark.parametrize("layout", ["NHW", "NHWC", "NCHW", "NCHW-1", "float01", "float11", "float255"])
def test_numpy_arrays_layouts_and_ranges(tmp_path, layout):
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (5, 12, 10, 3), dtype=np.uint8)  # N, H, W, C
    base[0] = 0
    base[1] = 255
    arrays = {
        "NHW": base[..., 0], "NHWC": base, "NCHW": base.transpose(0, 3, 1, 2),
        "NCHW-1": base[..., :1].transpose(0, 3, 1, 2),
        "float01": base.astype(np.float32) / 255, "float11": base.astype(np.float64) / 127.5 - 1,
        "float255": base.astype(np.float32),
    }
    np.save(tmp_path / "x.npy", arrays[layout])
    cfg = DataConfig(dataset="npy", path=str(tmp_path / "x.npy"), hflip=False,
                     value_range=(0, 255) if layout == "float255" else None)  # floats of 0..255: say so
    ds = data.load_dataset(cfg, 8)
    c = 1 if layout in ("NHW", "NCHW-1") else 3
    assert len(ds) == 5 and data.dataset_channels(ds) == c and data.dataset_num_classes(cfg) is None
    images = torch.stack([ds[i][0] for i in range(5)])
    assert images.shape == (5, c, 8, 8) and {ds[i][1] for i in range(5)} == {-1}
    torch.testing.assert_close(images[0], torch.full((c, 8, 8), -1.0))
    torch.testing.assert_close(images[1], torch.full((c, 8, 8), 1.0))
    assert images.min() >= -1 and images.max() <= 1


def test_numpy_folder_of_npz_with_labels(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"part{i}.npz", images=np.full((4, 6, 6), 50 * i, np.uint8), labels=np.arange(4) + i)
    cfg = DataConfig(dataset="npy", path=str(tmp_path), limit=10)
    ds = data.load_dataset(cfg, 6)
    assert len(ds) == 10 and [ds[i][1] for i in range(10)] == [0, 1, 2, 3, 1, 2, 3, 4, 2, 3]
    assert data.dataset_num_classes(cfg) == 6
    np.save(tmp_path / "odd.npy", np.zeros((2, 7, 7), np.uint8))
    with pytest.raises(ValueError, match="do not match"):
        data.load_dataset(cfg, 6)


def test_numpy_bad_shapes_are_clear_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 5, 5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"\(N, H, W, C\).*C = 1 or 3.*\(2, 5, 5, 4\)"):
        data.load_dataset(DataConfig(dataset="npy", path=str(tmp_path / "x.npy")), 8)


# ---------------------------------------------------------------------------------------------
# Transform
# ---------------------------------------------------------------------------------------------
def test_transform_resizes_shorter_side_and_center_crops():
    img = np.zeros((40, 100, 3), np.uint8)
    img[:, 20:80] = 255  # a white band in the middle of a wide image: only it survives the crop
    x = data.build_transform(20, hflip=False)(Image.fromarray(img))
    assert x.shape == (3, 20, 20)
    torch.testing.assert_close(x, torch.ones(3, 20, 20))
    tall = data.build_transform(16, hflip=False)(torch.zeros(1, 50, 20, dtype=torch.uint8))
    assert tall.shape == (1, 16, 16)


def test_transform_range_is_exactly_minus_one_to_one():
    img = np.zeros((8, 8), np.uint8)
    img[:, 4:] = 255
    x = data.build_transform(8, hflip=False)(Image.fromarray(img))
    assert x.dtype == torch.float32 and x.shape == (1, 8, 8)
    assert set(x.unique().tolist()) == {-1.0, 1.0} and torch.all(x[:, :, :4] == -1)
    up = data.build_transform(32, hflip=False)(Image.fromarray(img))  # bicubic overshoot is clamped
    assert up.min() == -1 and up.max() == 1


def test_transform_flip():
    img = torch.arange(16, dtype=torch.uint8).reshape(1, 4, 4) * 16
    fixed = data.build_transform(4, hflip=False)
    assert all(torch.equal(fixed(img), fixed(img)) for _ in range(10))
    flip = data.build_transform(4, hflip=True)
    torch.manual_seed(0)
    outs = {tuple(flip(img)[0, 0].tolist()) for _ in range(30)}
    assert outs == {tuple(fixed(img)[0, 0].tolist()), tuple(fixed(img)[0, 0].flip(0).tolist())}


def test_bad_size_or_channels_are_value_errors(env):
    for size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            data.build_transform(size, hflip=False)
    with pytest.raises(ValueError, match="channels must be 1"):
        data.load_dataset(DataConfig(dataset="fashion-mnist", split="test"), 16, channels=4)
    rgb = data.load_dataset(DataConfig(dataset="fashion-mnist", split="test"), 16, channels=3)
    x = rgb[0][0]
    assert x.shape == (3, 16, 16) and torch.equal(x[0], x[2])


# ---------------------------------------------------------------------------------------------
# Splits, loaders, workers, reference images
# ---------------------------------------------------------------------------------------------
def test_train_val_split_is_disjoint_and_deterministic(env):
    cfg = DataConfig(dataset="fashion-mnist", split="test", limit=1000, val_fraction=0.1, hflip=True)
    train, val = data.train_val_datasets(cfg, 16)
    train2, val2 = data.train_val_datasets(cfg, 16)
    assert len(train) == 900 and len(val) == 100
    assert set(train.indices).isdisjoint(val.indices) and set(train.indices) | set(val.indices) == set(range(1000))
    assert list(val.indices) == list(val2.indices) and list(train.indices) == list(train2.indices)
    assert list(val.indices) != list(range(100))  # random, not the first items
    assert all(torch.equal(val[i][0], val[i][0]) for i in range(5))  # validation never flips
    assert train.dataset.transform.hflip and not val.dataset.transform.hflip
    assert data.dataset_channels(train) == data.dataset_channels(val) == 1


def test_train_val_with_val_split(offline_data, monkeypatch):
    monkeypatch.setenv("DDPM_NB_DATA", str(offline_data))
    cfg = DataConfig(dataset="flowers102", split="train", val_split="val")
    train, val = data.train_val_datasets(cfg, 16)
    assert (len(train), len(val)) == (1020, 1020) and not val.transform.hflip
    assert set(train.files).isdisjoint(val.files)


def test_default_num_workers_is_zero_under_pytest():
    assert data.default_num_workers() == 0


def test_make_loader_batches_and_reproducible_shuffle(env):
    ds = data.load_dataset(DataConfig(dataset="fashion-mnist", split="test", limit=64, hflip=False), 16)
    first = [next(iter(data.make_loader(ds, 8, shuffle=True, seed=3)))[1] for _ in range(2)]
    x, y = next(iter(data.make_loader(ds, 8, shuffle=True, seed=3)))
    assert x.shape == (8, 1, 16, 16) and y.dtype == torch.int64
    assert torch.equal(first[0], first[1]) and torch.equal(first[0], y)
    assert len(data.make_loader(ds, 10, shuffle=False)) == 6  # drop_last
    assert len(data.make_loader(ds, 10, shuffle=False, drop_last=False)) == 7
    with pytest.raises(ValueError, match="yield no batch"):
        data.make_loader(ds, 100, shuffle=True)
    batches = data.infinite_batches(data.make_loader(ds, 32, shuffle=True))
    assert sum(1 for _ in zip(range(5), batches)) == 5  # past the end of an epoch


def test_datasets_pickle_and_work_in_worker_processes(tmp_path, env):
    for i in range(4):
        write_png(tmp_path / "imgs" / "a" / f"{i}.png", np.full((10, 10, 3), 60 * i, np.uint8))
    folder = data.load_dataset(DataConfig(dataset="imagefolder", path=str(tmp_path / "imgs"), hflip=False), 8)
    fashion = data.load_dataset(DataConfig(dataset="fashion-mnist", split="test", limit=8, hflip=False), 8)
    for ds in (folder, fashion):
        clone = pickle.loads(pickle.dumps(ds))
        torch.testing.assert_close(clone[3][0], ds[3][0])
    loader = data.make_loader(folder, 2, shuffle=False, num_workers=2)
    got = torch.cat([x for x, _ in loader])
    torch.testing.assert_close(got, torch.stack([folder[i][0] for i in range(4)]))


def test_real_images_fixed_choice(env):
    cfg = DataConfig(dataset="fashion-mnist", hflip=True)
    a = data.real_images(cfg, 16, 12, seed=1)
    assert a.shape == (12, 1, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, data.real_images(cfg, 16, 12, seed=1))
    assert not torch.equal(a, data.real_images(cfg, 16, 12, seed=2))
    with pytest.raises(ValueError, match="between 1 and the 10000"):
        data.real_images(cfg, 16, 10_001)


# ---------------------------------------------------------------------------------------------
# Image folders as users have them; .npy value ranges (issue 8)
# ---------------------------------------------------------------------------------------------
def _messy_folder(root: Path) -> Path:
    """A class folder with every image mode and every kind of junk a real folder holds."""
    from PIL import Image

    d = root / "imgs" / "a"
    d.mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(d / "rgb.jpg", quality=95)
    Image.new("RGBA", (20, 20), (0, 0, 255, 0)).save(d / "rgba.png")  # fully transparent blue
    Image.new("LA", (20, 20), (0, 0)).save(d / "la.png")  # transparent black
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # red in CMYK
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 255, 0] * 256)
    pal.save(d / "palette.png")  # green
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(d / "gray16.png")  # 16-bit mid grey
    Image.new("RGB", (1, 1), (0, 0, 255)).save(d / "tiny.png")
    Image.new("RGB", (600, 3), (0, 0, 0)).save(d / "wide.png")
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    noise.save(d / "noise.jpg", quality=90)
    whole = (d / "noise.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (d / "zero.png").write_bytes(b"")
    (d / "fake.jpg").write_text("not a jpeg")
    (d / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (d / "notes.txt").write_text("not an image")
    return root / "imgs"


def test_image_folder_decodes_every_mode_and_skips_unreadable_files(tmp_path):
    folder = _messy_folder(tmp_path)
    cfg = DataConfig(dataset="imagefolder", path=str(folder), hflip=False)
    with pytest.warns(data.UnreadableImageWarning) as record:
        ds = data.load_dataset(cfg, 16)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "skipped 3 unreadable image file(s) of 12" in msg
    assert all(name in msg for name in ("truncated.jpg", "zero.png", "fake.jpg"))
    assert len(ds) == 9
    item = {Path(f).name: ds[i][0] for i, f in enumerate(ds.files)}
    assert all(x.shape == (3, 16, 16) and torch.isfinite(x).all() for x in item.values())
    torch.testing.assert_close(item["gray16.png"], torch.full((3, 16, 16), 2 * 32768 / 65535 - 1))  # not white
    assert item["rgba.png"].min() > 0.99 and item["la.png"].min() > 0.99  # alpha composited over white
    red, green = item["cmyk.jpg"].mean((1, 2)), item["palette.png"].mean((1, 2))
    assert red[0] > 0.9 and red[1] < -0.9 and green[1] > 0.99 and green[0] < -0.99
    assert item["tiny.png"][2].min() > 0.99 and item["tiny.png"][0].max() < -0.99
    assert item["wide.png"].max() < -0.99


def test_image_folder_file_damaged_after_the_scan_is_skipped_in_training(tmp_path):
    folder = _messy_folder(tmp_path)
    with pytest.warns(data.UnreadableImageWarning):
        ds = data.load_dataset(DataConfig(dataset="imagefolder", path=str(folder), hflip=False), 8)
    i = next(k for k, f in enumerate(ds.files) if f.endswith("noise.jpg"))
    Path(ds.files[i]).write_bytes(b"")  # damaged while the run goes on
    with pytest.warns(data.UnreadableImageWarning, match=r"skipping unreadable image .*noise\.jpg"):
        x, _ = ds[i]
    assert x.shape == (3, 8, 8)


def test_image_folder_with_nothing_readable_is_one_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"")
    (d / "b.png").write_text("junk")
    with pytest.raises(data.DatasetNotFoundError, match=r"no readable images in .*all 2 image files"):
        data.load_dataset(DataConfig(dataset="imagefolder", path=str(d)), 8)


@pytest.mark.parametrize("values, observed", [
    (np.linspace(0, 1.2, 5 * 8 * 8), "[0, 1.2]"),          # a little above 1: was divided by 255
    (np.linspace(-1.5, 1, 5 * 8 * 8), "[-1.5, 1]"),        # was clipped
    (np.linspace(0, 255, 5 * 8 * 8), "[0, 255]"),          # needs data.value_range
])
def test_numpy_float_ranges_are_explicit(tmp_path, values, observed):
    np.save(tmp_path / "x.npy", values.reshape(5, 8, 8).astype(np.float32))
    cfg = DataConfig(dataset="npy", path=str(tmp_path / "x.npy"), hflip=False)
    with pytest.raises(ValueError, match=rf"x\.npy: values span {re.escape(observed)}.*data\.value_range"):
        data.load_dataset(cfg, 8)
    lo, hi = float(values.min()), float(values.max())
    ds = data.load_dataset(cfg.replace(value_range=(lo, hi)), 8)  # say what they span: mapped, not clipped
    images = torch.stack([ds[i][0] for i in range(5)])
    assert images.min() == -1 and images.max() == 1


def test_numpy_value_range_for_16_bit_integers(tmp_path):
    np.save(tmp_path / "x.npy", np.full((2, 8, 8), 65535, np.uint16))
    cfg = DataConfig(dataset="npy", path=str(tmp_path / "x.npy"), hflip=False)
    with pytest.raises(ValueError, match="uint16.*value_range"):
        data.load_dataset(cfg, 8)
    ds = data.load_dataset(cfg.replace(value_range=[0, 65535]), 8)
    torch.testing.assert_close(ds[0][0], torch.ones(1, 8, 8))
def test_flowers_on_disk_finds_the_files_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_NB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert not data.flowers_on_disk(DataConfig(dataset="flowers102", root=str(tmp_path)))
    folder = tmp_path / "flowers" / "flowers-102"          # the course's layout
    (folder / "jpg").mkdir(parents=True)
    (folder / "setid.mat").write_bytes(b"")
    assert not data.flowers_on_disk(DataConfig(dataset="flowers102", root=str(tmp_path)))   # labels missing
    (folder / "imagelabels.mat").write_bytes(b"")
    assert data.flowers_on_disk(DataConfig(dataset="flowers102", root=str(tmp_path)))
    monkeypatch.setenv("DDPM_NB_DATA", str(tmp_path))
    assert data.flowers_on_disk()


# ---- the registry, and CIFAR-10 through it -----------------------------------------------------------------
def _fake_cifar10(root: Path, n: int = 6) -> np.ndarray:
    """A cifar-10-batches-py folder in the authors' pickle format, n images per batch file."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (6 * n, 3072), dtype=np.uint8)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        batch = {b"data": pixels[i * n:(i + 1) * n], b"labels": list(range(i, i + n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    return pixels


def test_cifar10_reads_the_authors_batches(tmp_path):
    pixels = _fake_cifar10(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path), hflip=False)
    train, test = data.load_dataset(cfg, 32), data.load_dataset(cfg, 32, split="test")
    assert (len(train), len(test)) == (30, 6) and data.dataset_channels(train) == 3
    x, y = test[2]
    expected = torch.from_numpy(pixels[32].reshape(3, 32, 32)).float() / 255 * 2 - 1   # CHW, row-major
    torch.testing.assert_close(x, expected)
    assert y == 7 and data.dataset_num_classes(cfg) == 10 and data.class_names("cifar10")[y] == "horse"
    with pytest.raises(ValueError, match="CIFAR-10 has no 'val' split"):
        data.load_dataset(cfg, 32, split="val")


def test_cifar10_offline_and_absent_is_one_line_naming_ddpm_nb_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_NB_OFFLINE", "1")
    monkeypatch.setenv("DDPM_NB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DDPM_NB_DATA", str(tmp_path))
    with pytest.raises(data.DatasetNotFoundError) as err:
        data.load_dataset(DataConfig(dataset="cifar10"), 32)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("CIFAR-10 not found. Looked in:") and "DDPM_NB_DATA" in msg
    assert "cifar-10-batches-py" in msg and "downloads by itself" in msg


def test_the_registry_is_what_config_presets_and_lessons_read():
    from ddpm_nb.config import ConfigError, RunConfig, preset
    from ddpm_nb.shipped import class_name, lesson_data

    assert list(data.DATASETS) == ["fashion-mnist", "flowers102", "cifar10", "imagefolder", "npy"]
    assert preset("ddpm-cifar10").data.dataset == "cifar10"
    assert len(data.FLOWERS102_CLASSES) == len(set(data.FLOWERS102_CLASSES)) == 102
    assert class_name("flowers102", 0) == "pink primrose" and class_name("flowers102", 101) == "blackberry lily"
    assert lesson_data("flowers102") == {"data.dataset": "flowers102", "unet.num_classes": 102, "unet.in_channels": 3}
    with pytest.raises(ConfigError, match="DataConfig.dataset: unknown dataset 'cifar'; allowed: fashion-mnist, "
                                          "flowers102, cifar10, imagefolder, npy"):
        DataConfig(dataset="cifar")
    with pytest.raises(ConfigError, match="UNetConfig.in_channels: cifar10 has 3-channel images, got in_channels=1"):
        preset("tiny").override({"data.dataset": "cifar10"})
    with pytest.raises(ConfigError, match="UNetConfig.num_classes: cifar10 has 10 classes, got num_classes=102"):
        RunConfig.from_dict({**preset("ddpm-cifar10").to_dict(), "data": {"dataset": "cifar10", "class_cond": True},
                             "unet": {**preset("ddpm-cifar10").to_dict()["unet"], "num_classes": 102}})


def test_messages_show_no_path_of_this_machine(monkeypatch, tmp_path):
    """Dataset descriptions (printed by lessons and the CLI) name the checkout, the package or <data>, never an
    absolute path of the machine."""
    from ddpm_nb.utils import display_path, repo_root
    ds = data.load_dataset(DataConfig(dataset="fashion-mnist"), 28, split="test", train=False)
    assert not any(s in ds.source for s in ("/work/", "/home/", "/root/", "/tmp/")), ds.source
    monkeypatch.setenv("DDPM_NB_DATA", str(tmp_path))
    assert display_path(tmp_path / "flowers" / "x") == "<data>/flowers/x"
    assert display_path(repo_root() / "ddpm_nb" / "assets") == "ddpm_nb/assets"
    assert display_path("/opt/elsewhere/file") == "/opt/elsewhere/file"
