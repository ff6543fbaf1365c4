"""fashion_func.data: IDX parsing, locating, loading, batch order, normalisation."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from fashion_func import data

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
HAS_REAL = all((REAL_DIR / f"{name}.gz").is_file() for name in data._ALL_FILES)
needs_real = pytest.mark.skipif(not HAS_REAL, reason="real Fashion-MNIST not installed at " + str(REAL_DIR))


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file's bytes written independently of the reader: big-endian magic, dims, payload."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_idx(
    path: Path, array: np.ndarray, *, gz: bool = False, magic: int | None = None, cut: int = 0
) -> Path:
    raw = idx_bytes(array, magic)
    if cut:
        raw = raw[:-cut]
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def make_dataset(
    directory: Path, *, n_train: int = 12, n_test: int = 5, gz: bool = False, seed: int = 0
) -> dict[str, np.ndarray]:
    """Four small synthetic IDX files in `directory`; returns the arrays written."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,), dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, gz=gz)
    return arrays


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No real data visible: empty cwd, no env var, Debian dir pointed at nothing, download refused."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")

    def no_network(root):
        raise URLError("network unreachable (test)")

    monkeypatch.setattr(data, "fetch", no_network)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip_images_and_labels(tmp_path, gz):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 4], dtype=np.uint8)
    ip = write_idx(tmp_path / "i", images, gz=gz)
    lp = write_idx(tmp_path / "l", labels, gz=gz)
    got_i, got_l = data.read_idx(ip), data.read_idx(lp, "labels")
    assert got_i.dtype == torch.uint8 and got_i.shape == (3, 28, 28)
    assert got_l.dtype == torch.uint8 and got_l.shape == (3,)
    assert torch.equal(got_i, torch.from_numpy(images))
    assert torch.equal(got_l, torch.from_numpy(labels))
    got_i[0, 0, 0] = 7  # owns writable memory (no read-only buffer warnings, no aliasing)


def test_read_idx_wrong_magic_names_file(tmp_path):
    p = write_idx(tmp_path / "bad", np.zeros((2, 28, 28), np.uint8), magic=0x0903)
    with pytest.raises(data.DataError, match=r"file .*bad .*magic number 2307"):
        data.read_idx(p)


def test_read_idx_labels_where_images_expected(tmp_path):
    p = write_idx(tmp_path / "labels", np.zeros(4, np.uint8))
    with pytest.raises(data.DataError, match=r"labels .*expected images"):
        data.read_idx(p, "images")


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    p = write_idx(tmp_path / "t", np.zeros((2, 28, 28), np.uint8), gz=gz, cut=10)
    expected = 16 + 2 * 28 * 28
    msg = f"file {p} is truncated: expected {expected} bytes, got {expected - 10}"
    with pytest.raises(data.DataError) as info:
        data.read_idx(p)
    assert str(info.value) == msg


def test_read_idx_truncated_gzip_stream(tmp_path):
    blob = gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)))
    p = tmp_path / "x.gz"
    p.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.DataError, match=r"x\.gz"):
        data.read_idx(p)


def test_read_idx_trailing_bytes_and_wrong_image_shape(tmp_path):
    p = tmp_path / "long"
    p.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"\0")
    with pytest.raises(data.DataError, match="too long"):
        data.read_idx(p)
    q = write_idx(tmp_path / "small", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(data.DataError, match=r"shape \(8, 8\)"):
        data.read_idx(q)


def test_read_idx_tiny_file(tmp_path):
    p = tmp_path / "tiny"
    p.write_bytes(b"\0\0\x08")
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(p)


# ---------------------------------------------------------------------------------------------
# load


@pytest.mark.parametrize("gz", [False, True])
def test_load_synthetic(isolated, gz):
    d = isolated / "synth"
    arrays = make_dataset(d, gz=gz)
    train = data.load("train", d)
    test = data.load("test", str(d))
    assert train.images.dtype == torch.uint8 and train.images.shape == (12, 28, 28)
    assert train.labels.dtype == torch.int64 and train.labels.shape == (12,)
    assert torch.equal(train.images, torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert torch.equal(train.labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    assert torch.equal(test.labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())
    assert str(d) in train.source and "data_dir" in train.source


def test_load_limit(isolated):
    d = isolated / "synth"
    arrays = make_dataset(d)
    part = data.load("train", d, limit=4)
    assert part.images.shape == (4, 28, 28)
    assert torch.equal(part.labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"][:4]).long())
    assert part.images.untyped_storage().nbytes() == 4 * 28 * 28  # not a view of all 12
    with pytest.raises(data.DataError, match=r"limit 13 exceeds the 12 examples"):
        data.load("train", d, limit=13)
    with pytest.raises(ValueError):
        data.load("train", d, limit=0)
    with pytest.raises(ValueError):
        data.load("valid", d)  # type: ignore[arg-type]


def test_load_count_mismatch_names_files(isolated):
    d = isolated / "synth"
    make_dataset(d)
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(11, np.uint8))
    with pytest.raises(data.DataError, match=r"12 images but file .*train-labels-idx1-ubyte holds 11 labels"):
        data.load("train", d)


def test_load_label_out_of_range_names_file(isolated):
    d = isolated / "synth"
    make_dataset(d)
    labels = np.zeros(5, np.uint8)
    labels[3] = 10
    write_idx(d / "t10k-labels-idx1-ubyte", labels)
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte holds label 10 at index 3"):
        data.load("test", d)
    data.load("train", d)  # the other split is untouched


# ---------------------------------------------------------------------------------------------
# locate: order, explicit dir, failures


def test_explicit_dir_missing_files_is_an_error_not_a_fallback(isolated, monkeypatch):
    good = isolated / "good"
    make_dataset(good)
    monkeypatch.setenv(data.ENV_VAR, str(good))  # a fall-back would find this
    monkeypatch.setattr(data, "DEBIAN_DIR", good)
    explicit = isolated / "partial"
    explicit.mkdir()
    write_idx(explicit / "train-images-idx3-ubyte", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(data.DataError) as info:
        data.locate(explicit)
    msg = str(info.value)
    assert str(explicit) in msg and "\n" not in msg
    assert "train-labels-idx1-ubyte" in msg and "t10k-images-idx3-ubyte" in msg
    assert "train-images-idx3-ubyte[" not in msg  # present files are not listed as missing
    with pytest.raises(data.DataError, match="does not exist"):
        data.locate(isolated / "nowhere")


def test_search_order(isolated, monkeypatch):
    env_dir, debian = isolated / "env", isolated / "debian"
    cwd_dir = Path.cwd() / "dataset" / "fashion"
    explicit = isolated / "explicit"
    for d in (env_dir, debian, cwd_dir, explicit):
        make_dataset(d)
    monkeypatch.setattr(data, "DEBIAN_DIR", debian)
    monkeypatch.setenv(data.ENV_VAR, str(env_dir))

    assert data.locate(explicit)[0] == explicit
    path, source = data.locate()
    assert path == env_dir and "$FASHION_MNIST_DIR" in source
    monkeypatch.setenv(data.ENV_VAR, "")  # set but empty: unset
    assert data.locate()[0] == cwd_dir
    monkeypatch.delenv(data.ENV_VAR)
    assert data.locate()[0] == cwd_dir
    for f in cwd_dir.iterdir():
        f.unlink()
    path, source = data.locate()
    assert path == debian and "dataset-fashion-mnist" in source


def test_candidates_list(isolated, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(isolated))  # an explicit choice: only it is searched
    assert [p for p, _ in data.candidates()] == [isolated, isolated / "FashionMNIST/raw"]
    monkeypatch.delenv(data.ENV_VAR)
    places = [p for p, _ in data.candidates()]
    cwd = Path.cwd()
    assert places == [
        cwd / "dataset/fashion",
        cwd / "dataset/fashion/FashionMNIST/raw",
        isolated / "no-debian",
    ]
    assert [p for p, _ in data.candidates("/x")] == [Path("/x"), Path("/x/FashionMNIST/raw")]


def test_torchvision_raw_layout(isolated):
    raw = Path.cwd() / "dataset" / "fashion" / "FashionMNIST" / "raw"
    make_dataset(raw, gz=True)
    path, source = data.locate(download=False)
    assert path == raw and "torchvision" in source
    assert data.load("test", download=False).images.shape == (5, 28, 28)
    # an explicit --data-dir pointing at torchvision's root works too
    assert data.locate(Path.cwd() / "dataset" / "fashion")[0] == raw


def test_plain_and_gz_mixed(isolated):
    d = isolated / "mixed"
    arrays = make_dataset(d, gz=True)
    write_idx(d / "train-images-idx3-ubyte", arrays["train-images-idx3-ubyte"])  # plain beside the .gz
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(d / "t10k-labels-idx1-ubyte", arrays["t10k-labels-idx1-ubyte"])
    assert torch.equal(data.load("train", d).images, torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert data.load("test", d).labels.shape == (5,)


def test_nothing_found_download_disabled_lists_places(isolated, monkeypatch):
    called = []
    monkeypatch.setattr(data, "fetch", lambda root: called.append(root))
    with pytest.raises(data.DataError) as info:
        data.load("train", download=False)
    msg = str(info.value)
    assert called == []
    assert "\n" not in msg and "download is disabled" in msg
    for place in (Path.cwd() / "dataset/fashion", isolated / "no-debian"):
        assert str(place) in msg
    for hint in ("apt-get install dataset-fashion-mnist", "data_dir=DIR", "FASHION_MNIST_DIR", "internet"):
        assert hint in msg


def test_download_failure_lists_places_and_reason(isolated):
    with pytest.raises(data.DataError) as info:
        data.locate()
    msg = str(info.value)
    assert "\n" not in msg
    assert "network unreachable (test)" in msg and "URLError" in msg
    assert str(Path.cwd() / "dataset/fashion") in msg and str(isolated / "no-debian") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data_dir=DIR" in msg


def test_download_multiline_error_becomes_one_line(isolated, monkeypatch):
    def fails(root):
        raise RuntimeError("Error downloading x:\nTried mirror, got:\n<urlopen error>\n")

    monkeypatch.setattr(data, "fetch", fails)
    with pytest.raises(data.DataError) as info:
        data.locate()
    assert "\n" not in str(info.value) and "Tried mirror" in str(info.value)


def test_download_success_uses_torchvision_layout(isolated, monkeypatch):
    roots = []

    def fake_fetch(root):
        roots.append(root)
        make_dataset(root / "FashionMNIST" / "raw", gz=True)

    monkeypatch.setattr(data, "fetch", fake_fetch)
    split = data.load("train")
    assert roots == [Path.cwd() / "dataset" / "fashion"]
    assert split.images.shape == (12, 28, 28) and "downloaded" in split.source
    data.load("test")
    assert len(roots) == 1  # found in place the second time


def test_download_that_leaves_nothing_is_an_error(isolated, monkeypatch):
    monkeypatch.setattr(data, "fetch", lambda root: None)
    with pytest.raises(data.DataError, match="lacks"):
        data.locate()


# ---------------------------------------------------------------------------------------------
# real data


@needs_real
def test_real_data_loads_and_stats_match_constants(monkeypatch):
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    train = data.load("train", REAL_DIR, download=False)
    test = data.load("test", REAL_DIR, download=False)
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert test.labels.dtype == torch.int64
    # Fashion-MNIST is balanced: 6000 / 1000 per class
    assert torch.equal(torch.bincount(train.labels, minlength=10), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.labels, minlength=10), torch.full((10,), 1000))
    mean, std = data.dataset_stats(train.images)
    assert round(mean, 3) == round(data.MEAN, 3)
    assert round(std, 3) == round(data.STD, 3)
    # and the histogram shortcut agrees with the direct computation on a slice
    x = train.images[:2000].double() / 255
    m, s = data.dataset_stats(train.images[:2000])
    assert m == pytest.approx(x.mean().item(), abs=1e-9)
    assert s == pytest.approx(x.std(unbiased=False).item(), abs=1e-9)


def test_class_names():
    assert data.CLASS_NAMES == (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
    assert data.NUM_CLASSES == 10


# ---------------------------------------------------------------------------------------------
# batch order and batches


def test_batch_order_is_pure_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = data.batch_order(1000, seed=7, epoch=3)
    b = data.batch_order(1000, seed=7, epoch=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.dtype == torch.int64
    assert torch.equal(a, b)
    assert torch.equal(a.sort().values, torch.arange(1000))
    assert not torch.equal(a, data.batch_order(1000, seed=7, epoch=4))
    assert not torch.equal(a, data.batch_order(1000, seed=8, epoch=3))
    # seed/epoch are mixed, not added: (1, 0) and (0, 1) differ
    assert not torch.equal(data.batch_order(1000, 1, 0), data.batch_order(1000, 0, 1))
    assert data.batch_order(0, 0, 0).shape == (0,)


def test_batch_order_fixed_values():
    # pins the (seed, epoch) -> order mapping with literals: a change here breaks exact resume of
    # old runs. 0xE220A8397B1DCDAF is SplitMix64's published first output from state 0.
    assert data._splitmix64(0) == 0xE220A8397B1DCDAF
    assert data._order_seed(0, 0) == 12035550249420947055
    assert data._order_seed(5, 2) == 2611768881034074630
    assert data._order_seed(2**64 + 3, -1) == 4722581856061867462  # both taken mod 2**64
    assert data.batch_order(8, 0, 0).tolist() == [3, 2, 5, 1, 0, 6, 4, 7]
    assert data.batch_order(12, 5, 2).tolist() == [3, 8, 7, 2, 0, 4, 6, 9, 10, 1, 11, 5]
    assert data.batch_order(10, 1, 2).tolist() == [1, 7, 5, 9, 3, 6, 0, 8, 2, 4]


def test_batches(isolated):
    d = isolated / "synth"
    make_dataset(d, n_train=10)
    split = data.load("train", d)
    got = list(data.batches(split, 4, seed=1, epoch=2))
    assert [x.shape[0] for x, _ in got] == [4, 4, 2]
    order = data.batch_order(10, 1, 2)
    xs = torch.cat([x for x, _ in got])
    ys = torch.cat([y for _, y in got])
    assert torch.equal(xs, split.images[order]) and torch.equal(ys, split.labels[order])
    assert got[0][0].dtype == torch.uint8 and got[0][1].dtype == torch.int64
    dropped = list(data.batches(split, 4, seed=1, epoch=2, drop_last=True))
    assert [x.shape[0] for x, _ in dropped] == [4, 4]
    assert data.num_batches(10, 4) == 3 and data.num_batches(10, 4, drop_last=True) == 2
    plain = torch.cat([y for _, y in data.batches(split, 3, seed=0, epoch=0, shuffle=False)])
    assert torch.equal(plain, split.labels)
    with pytest.raises(ValueError):
        next(data.batches(split, 0, seed=0, epoch=0))


# ---------------------------------------------------------------------------------------------
# normalize


@pytest.mark.cross_path
def test_normalize_against_torchvision_style_reference():
    x = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    y = data.normalize(x)
    assert y.dtype == torch.float32 and y.shape == (5, 1, 28, 28)
    ref = (x.unsqueeze(1).float() / 255.0 - 0.2860) / 0.3530
    torch.testing.assert_close(y, ref)
    half = data.normalize(x, data.TUTORIAL_MEAN, data.TUTORIAL_STD, dtype=torch.float64)
    assert half.dtype == torch.float64
    # ToTensor + Normalize((0.5,), (0.5,)) maps 0 -> -1 and 255 -> 1
    edges = data.normalize(torch.tensor([[[0, 255]]], dtype=torch.uint8), 0.5, 0.5)
    assert edges.flatten().tolist() == [-1.0, 1.0]
    assert torch.equal(half[:, 0], x.double() / 255 * 2 - 1)


@pytest.mark.parametrize("kind", ["missing", "empty", "file", "partial"])
def test_fashion_mnist_dir_is_an_explicit_choice_never_a_silent_fall_back(isolated, monkeypatch, kind):
    """$FASHION_MNIST_DIR that lacks the files is an error naming it, like --data-dir, even
    when another place (here ./dataset/fashion) holds the data."""
    make_dataset(Path.cwd() / "dataset" / "fashion")
    target = isolated / "env"
    if kind == "empty":
        target.mkdir()
    elif kind == "file":
        target.write_bytes(b"x")
    elif kind == "partial":
        make_dataset(target)
        (target / "t10k-labels-idx1-ubyte").unlink()
    monkeypatch.setenv(data.ENV_VAR, str(target))
    with pytest.raises(data.DataError, match=r"^\$?FASHION_MNIST_DIR") as info:
        data.locate()
    assert "\n" not in str(info.value) and str(target) in str(info.value)


# ---------------------------------------------------------------------------------------------
# a failed download removes the folders it created, and only those

REAL_FETCH = data.fetch


@pytest.mark.parametrize(
    "before",
    [(), ("dataset",), ("dataset/fashion",), ("dataset/fashion/FashionMNIST",)],
    ids=["nothing", "dataset", "dataset-fashion", "FashionMNIST"],
)
def test_a_failed_download_removes_only_the_folders_it_created(isolated, monkeypatch, before):
    """torchvision's real downloader without a network (urlopen refused): it creates
    ./dataset/fashion/FashionMNIST/raw, fails, and that tree goes again down to what existed
    before, which keeps its own files."""
    import urllib.request
    from urllib.error import URLError

    def offline(*args, **kwargs):
        raise URLError("network unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(data, "fetch", REAL_FETCH)
    cwd = Path.cwd()
    for folder in before:
        (cwd / folder).mkdir(parents=True)
        (cwd / folder / "mine.txt").write_text("kept")
    with pytest.raises(data.DataError, match=r"download into .* failed"):
        data.locate()
    left = sorted(str(p.relative_to(cwd)) for p in cwd.rglob("*"))
    kept = {f"{folder}/mine.txt" for folder in before}
    for folder in before:  # the folder and its parents existed before
        kept |= {str(p) for p in (Path(folder), *Path(folder).parents) if str(p) != "."}
    assert left == sorted(kept)
    assert not (cwd / "dataset/fashion/FashionMNIST/raw").exists()
