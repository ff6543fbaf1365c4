"""Fashion-MNIST: find it, parse it, keep it on the device as uint8, order batches purely.

    split = load("train", device="cuda")            # Split(images uint8 [N,28,28], labels int64 [N], source)
    for x, y in batches(split, 128, seed=0, epoch=3):
        logits = model.apply(params, normalize(x))  # normalize runs inside the (compiled) step

`locate` tries an explicit `data_dir` (never falling back), else `$FASHION_MNIST_DIR`, else
`./dataset/fashion` and `/usr/share/datasets/fashion-mnist`, then downloads with torchvision.
The four IDX files may be plain or gzipped; they are parsed with `struct`, nothing unpickled.

`CLASS_NAMES` are the ten labels' names (`NUM_CLASSES`); `MEAN` and `STD` are the training
set's pixel statistics that `normalize` uses by default (from `preprocess`).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import shutil
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from fashion_func import env, privacy
from fashion_func.preprocess import (  # TUTORIAL_*: importable here by module path, not in __all__
    MEAN,
    STD,
    TUTORIAL_MEAN,  # noqa: F401
    TUTORIAL_STD,  # noqa: F401
    normalize,
)
from fashion_func.safeio import FileError, Worded, one_line, open_regular

__all__ = [
    "CLASS_NAMES",
    "MEAN",
    "NUM_CLASSES",
    "STD",
    "DataError",
    "EpochBatches",
    "PoissonBatches",
    "Split",
    "batch_order",
    "batches",
    "hold_out",
    "load",
    "normalize",
    "num_batches",
]

CLASS_NAMES: tuple[str, ...] = (
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
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28)

ENV_VAR = "FASHION_MNIST_DIR"
# Module-level so tests can point them elsewhere with monkeypatch.
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_ROOT = Path("dataset/fashion")  # relative to the current directory at call time
TORCHVISION_SUBDIR = Path("FashionMNIST/raw")

SplitName = Literal["train", "test"]
# split -> (images file, labels file), without the optional ".gz"
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_FILES: tuple[str, ...] = (*FILES["train"], *FILES["test"])

_MAGIC = {"images": 2051, "labels": 2049}  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim
_KIND_OF_MAGIC = {v: k for k, v in _MAGIC.items()}

_HOW_TO_GET = (
    "get the data with `apt-get install dataset-fashion-mnist` (as root, on Debian), "
    "or pass data_dir=DIR, or set FASHION_MNIST_DIR=DIR (a directory holding the four IDX files, "
    "plain or .gz), or run once on a machine with internet access so torchvision can download it "
    "into ./dataset/fashion"
)


class DataError(Worded):
    """The data could not be found, read or trusted. The message is one line naming the file or
    places; where the data was not found, `kind` says why (`WORDS`) for a client that words it itself."""

    WORDS: ClassVar[Mapping[str, str]] = {
        "data_dir_missing": "data_dir {dir} does not exist or is not a directory; " + _HOW_TO_GET,
        "data_dir_lacks": "data_dir {dir} lacks {missing}; " + _HOW_TO_GET,
        "env_dir_missing": f"${ENV_VAR} {{dir}} does not exist or is not a directory; " + _HOW_TO_GET,
        "env_dir_lacks": f"${ENV_VAR} {{dir}} lacks {{missing}}; " + _HOW_TO_GET,
        "env_dir_invalid": "{reason}; " + _HOW_TO_GET,
        "data_not_found": "Fashion-MNIST not found (searched {searched}) and download is disabled; "
        + _HOW_TO_GET,
        "data_download_failed": "Fashion-MNIST not found (searched {searched}) and the download into {root} "
        "failed ({reason}); " + _HOW_TO_GET,
        "data_download_incomplete": "download into {root} finished but {raw} lacks {missing}; " + _HOW_TO_GET,
    }


class Split(NamedTuple):
    """One split, resident on a device."""

    images: Tensor  # uint8 [N, 28, 28]
    labels: Tensor  # int64 [N], values in 0..9
    source: str  # where the files came from, for logs


def hold_out(split: Split, n: int) -> tuple[Split, Split]:
    """(the first len - n examples, the last n): a validation split held out of `split`."""
    cut = len(split.labels) - n
    return (
        Split(split.images[:cut], split.labels[:cut], split.source),
        Split(split.images[cut:], split.labels[cut:], split.source),
    )


def _find(directory: Path, name: str) -> Path | None:
    """`directory/name` or `directory/name.gz`; the plain file wins (no decompression needed)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _missing(directory: Path) -> list[str]:
    return [name for name in _ALL_FILES if _find(directory, name) is None]


def candidates(data_dir: str | os.PathLike[str] | None = None) -> list[tuple[Path, str]]:
    """The directories `locate` tries, in order, as (path, description) pairs. An explicit
    `data_dir` (else a set $FASHION_MNIST_DIR) lists only itself and torchvision's layout under
    it: an explicit choice is never silently replaced by another place."""
    if data_dir is not None:
        base, what = Path(data_dir).expanduser(), "data_dir"
    elif (env_dir := _env_dir()) is not None:
        base, what = env_dir, f"${ENV_VAR}"
    else:
        base, what = Path.cwd() / DOWNLOAD_ROOT, "./dataset/fashion"
    found = [(base, what), (base / TORCHVISION_SUBDIR, f"{what}, torchvision layout")]
    if what == "./dataset/fashion":  # no explicit choice: the Debian package's place too
        found.append((Path(DEBIAN_DIR), "Debian package dataset-fashion-mnist"))
    return found


def _env_dir() -> Path | None:
    """$FASHION_MNIST_DIR as a path (None when unset or empty), checked like `data_dir`."""
    try:
        return env.directory(ENV_VAR)
    except ValueError as exc:
        raise DataError(kind="env_dir_invalid", reason=str(exc)) from None


def fetch(root: Path) -> None:
    """Download Fashion-MNIST with torchvision into `root/FashionMNIST/raw` (network needed);
    module-level so tests replace it and never touch the network."""
    from torchvision.datasets import FashionMNIST  # imported here: only the download needs it

    # train=False: after downloading all four files torchvision parses one split; take the small one.
    FashionMNIST(root=str(root), train=False, download=True)


def _first_missing(base: Path, relative: Path) -> Path | None:
    """The outermost folder of `base / relative` that does not exist yet (None: all do), so a
    failed download removes only the folders it created (`./dataset` of a user stays)."""
    path = base
    for part in relative.parts:
        path = path / part
        if not os.path.lexists(path):
            return path
    return None


def locate(data_dir: str | os.PathLike[str] | None = None, *, download: bool = True) -> tuple[Path, str]:
    """The directory holding the four Fashion-MNIST files, and a description of where it came
    from. DataError (one line, naming the places searched and how to get the data) when an
    explicit `data_dir` lacks the files, or when no place has them and downloading is disabled
    or fails."""
    places = candidates(data_dir)
    for path, description in places:
        if not _missing(path):
            return path, f"{path} ({description})"
    if data_dir is not None or places[0][1] == f"${ENV_VAR}":
        base, source = places[0][0], ("data_dir" if data_dir is not None else "env_dir")
        if not base.is_dir():
            raise DataError(kind=f"{source}_missing", dir=base)
        missing = ", ".join(f"{name}[.gz]" for name in _missing(base))
        raise DataError(kind=f"{source}_lacks", dir=base, missing=missing)

    searched = "; ".join(f"{path} ({description})" for path, description in places)
    if not download:
        raise DataError(kind="data_not_found", searched=searched)
    root = Path.cwd() / DOWNLOAD_ROOT
    created = _first_missing(Path.cwd(), DOWNLOAD_ROOT / TORCHVISION_SUBDIR)
    try:
        fetch(root)
    except Exception as e:  # urllib/socket/torchvision errors: a missing network has many faces
        if created is not None:  # what this download made, and nothing that was there before
            shutil.rmtree(created, ignore_errors=True)
        reason = one_line(f"{type(e).__name__}: {e}")
        raise DataError(kind="data_download_failed", searched=searched, root=root, reason=reason) from e
    raw = root / TORCHVISION_SUBDIR
    if _missing(raw):
        missing = ", ".join(_missing(raw))
        raise DataError(kind="data_download_incomplete", root=root, raw=raw, missing=missing)
    return raw, f"{raw} (downloaded by torchvision)"


# The most examples a split may declare: Fashion-MNIST's own counts (MNIST-format sets share them).
MAX_EXAMPLES = {"train": 60_000, "test": 10_000}


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to `n` bytes from `f` (fewer only at the end of the stream); never more memory than n."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = f.readinto(view[got:])  # type: ignore[attr-defined]
        if not k:
            break
        got += k
    return bytes(view[:got])


@contextlib.contextmanager
def _open_idx(path: Path) -> Iterator[BinaryIO]:
    """The file's (decompressed) byte stream: a regular file only, gzip streamed, never read whole."""
    try:
        raw = open_regular(path, what="file")
    except FileError as e:
        raise DataError(str(e)) from None
    with raw:
        if path.name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw, mode="rb") as unpacked:
                yield unpacked  # type: ignore[misc]
        else:
            yield raw


def _idx_stream(path: Path, max_count: int) -> tuple[bytes, tuple[int, ...], bytes]:
    """(header, its dimensions, body) of an IDX file, the declared size checked against
    `max_count` before the body is read, and never more than one byte past it read (a gzip
    bomb costs no more memory than a valid file)."""
    with _open_idx(path) as f:
        head = _read_exact(f, 4)
        if len(head) < 4:
            raise DataError(f"file {path} is truncated: expected at least 8 header bytes, got {len(head)}")
        ndim = head[3]
        head += _read_exact(f, 4 * ndim)
        if len(head) < 4 + 4 * ndim or len(head) < 8:
            raise DataError(
                f"file {path} is truncated: expected at least {4 + 4 * ndim} header bytes, got {len(head)}"
            )
        dims = struct.unpack_from(f">{ndim}I", head, 4)
        if dims and dims[0] > max_count:
            raise DataError(f"file {path} declares {dims[0]} examples, more than the {max_count} allowed")
        count = int(np.prod(dims, dtype=np.int64)) if len(dims) <= 3 else -1
        if count < 0 or count > max_count * IMAGE_SHAPE[0] * IMAGE_SHAPE[1]:
            raise DataError(f"file {path} declares dimensions {dims}, more data than a split holds")
        body = _read_exact(f, count)
        extra = len(_read_exact(f, 1)) if len(body) == count else 0
    return head, dims, body + b"\0" * extra


def read_idx(
    path: str | os.PathLike[str],
    expect: Literal["images", "labels"] | None = None,
    *,
    max_count: int = MAX_EXAMPLES["train"],
) -> Tensor:
    """The uint8 tensor stored in an IDX file (plain or .gz): [N, 28, 28] images or [N] labels.
    Checks the magic number (2051 images, 2049 labels; `expect` pins which), the dimensions, and
    that the file is exactly as long as its header says, at most `max_count` examples, reading
    no more than that; DataError naming the file otherwise."""
    path = Path(path)
    try:
        head, dims, body = _idx_stream(path, max_count)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"file {path} is not a valid gzip file or is truncated ({one_line(e)})") from e
    except OSError as e:
        raise DataError(f"file {path} cannot be read ({one_line(e)})") from e
    (magic,) = struct.unpack_from(">I", head, 0)
    kind = _KIND_OF_MAGIC.get(magic)
    if kind is None:
        raise DataError(
            f"file {path} is not a Fashion-MNIST IDX file: magic number {magic}, expected 2051 (images) "
            f"or 2049 (labels)"
        )
    if expect is not None and kind != expect:
        raise DataError(
            f"file {path} holds {kind} (magic {magic}), expected {expect} (magic {_MAGIC[expect]})"
        )
    if kind == "images" and tuple(dims[1:]) != IMAGE_SHAPE:
        raise DataError(f"file {path} holds images of shape {tuple(dims[1:])}, expected {IMAGE_SHAPE}")
    count = int(np.prod(dims, dtype=np.int64))
    expected = len(head) + count
    if len(body) < count:
        raise DataError(f"file {path} is truncated: expected {expected} bytes, got {len(head) + len(body)}")
    if len(body) > count:
        raise DataError(f"file {path} is too long: expected {expected} bytes, got more")
    array = np.frombuffer(body, dtype=np.uint8, count=count).reshape(dims)
    # frombuffer over immutable bytes is read-only; the copy gives torch memory it owns.
    return torch.from_numpy(array.copy())


def load(
    split: SplitName,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    device: torch.device | str = "cpu",
    limit: int | None = None,
    download: bool = True,
) -> Split:
    """One split as uint8 images [N,28,28] and int64 labels [N] on `device` (the first `limit`
    examples). DataError when the files are missing or inconsistent (image/label counts differ,
    a label outside 0..9) or when `limit` exceeds the examples available."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    directory, source = locate(data_dir, download=download)
    images_name, labels_name = FILES[split]
    images_path, labels_path = _find(directory, images_name), _find(directory, labels_name)
    if images_path is None or labels_path is None:  # removed between locate and now
        raise DataError(f"{directory} lacks {images_name}[.gz] or {labels_name}[.gz]")
    images = read_idx(images_path, "images", max_count=MAX_EXAMPLES[split])
    labels = read_idx(labels_path, "labels", max_count=MAX_EXAMPLES[split])
    if images.shape[0] == 0:
        raise DataError(f"file {images_path} holds no examples")
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"file {images_path} holds {images.shape[0]} images but file {labels_path} holds "
            f"{labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.max()) >= NUM_CLASSES:
        bad = int(torch.nonzero(labels >= NUM_CLASSES)[0, 0])
        raise DataError(
            f"file {labels_path} holds label {int(labels[bad])} at index {bad}; "
            f"labels must be in 0..{NUM_CLASSES - 1}"
        )
    if limit is not None:
        if limit > images.shape[0]:
            raise DataError(
                f"limit {limit} exceeds the {images.shape[0]} examples of the {split} split ({source})"
            )
        # clone so the slice does not keep the whole split's memory alive
        images, labels = images[:limit].clone(), labels[:limit].clone()
    return Split(images.to(device), labels.to(torch.int64).to(device), source)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    # SplitMix64's finaliser: a bijection on 64-bit ints that scatters nearby inputs far apart.
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _order_seed(seed: int, epoch: int) -> int:
    """splitmix64(splitmix64(seed) ^ epoch), both mod 2**64: unlike seed + epoch, (1, 0) and
    (0, 1) stay apart and consecutive epochs get unrelated orders."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (epoch & _MASK64))


def batch_order(n: int, seed: int, epoch: int) -> Tensor:
    """A permutation of range(n) (int64, CPU), a pure function of (n, seed, epoch) drawn with a
    local generator: the global RNG is neither read nor advanced."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    generator = torch.Generator(device="cpu").manual_seed(_order_seed(int(seed), int(epoch)))
    return torch.randperm(n, generator=generator, dtype=torch.int64)


def num_batches(n: int, batch_size: int, *, drop_last: bool = False) -> int:
    """How many batches `batches` yields for n examples."""
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
    start: int = 0,
) -> Iterator[tuple[Tensor, Tensor]]:
    """(uint8 images [B,28,28], int64 labels [B]) batches on the split's device, in `batch_order`.
    With drop_last=False the final batch may be smaller (a compiled step sees one more shape).
    start: the first batch to yield (a run resumed mid-epoch continues where it was cut)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = split.images.shape[0]
    device = split.images.device
    order = batch_order(n, seed, epoch) if shuffle else torch.arange(n, dtype=torch.int64)
    order = order.to(device)  # one transfer per epoch; each batch is an on-device gather
    for b in range(start, num_batches(n, batch_size, drop_last=drop_last)):
        idx = order[b * batch_size : (b + 1) * batch_size]
        yield split.images[idx], split.labels[idx]


@dataclass(frozen=True)
class EpochBatches:
    """A split's batches for `fit`: called as `(epoch, start=0)` it yields that epoch's
    batches from batch `start` on (`batches` in `batch_order(seed, epoch)`). `len()` is the
    number of batches per epoch; `batching` identifies the order, so that a checkpoint cut
    mid-epoch is only continued with the same batches."""

    split: Split
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False

    def __call__(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        return batches(
            self.split,
            self.batch_size,
            seed=self.seed,
            epoch=epoch,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            start=start,
        )

    def __len__(self) -> int:
        return num_batches(self.split.labels.shape[0], self.batch_size, drop_last=self.drop_last)

    @property
    def batching(self) -> dict[str, int]:
        """What fixes the batches: example count, batch size and seed."""
        return {"n": int(self.split.labels.shape[0]), "batch_size": self.batch_size, "seed": self.seed}


_POISSON_SALT = 0x50_4F_49_53  # the inclusion draws have their own stream, apart from batch_order


def poisson_capacity(n: int, sample_rate: float, overflow: float = 1e-9) -> int:
    """The smallest physical batch size P with P(Binomial(n, sample_rate) > P) <= `overflow`:
    a Poisson batch larger than P (that rare) is cut to P (`poisson_batches`)."""
    if n < 1 or not 0 < sample_rate <= 1:
        raise ValueError(f"poisson_capacity needs n >= 1 and sample_rate in (0, 1], got {n}, {sample_rate}")
    if sample_rate == 1:
        return n
    mean = n * sample_rate
    log_p, log_q = math.log(sample_rate), math.log1p(-sample_rate)

    def pmf(i: int) -> float:
        return math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                        + i * log_p + (n - i) * log_q)  # fmt: skip

    # P(X > k) summed from far in the tail (40 standard deviations: nothing beyond) down
    hi = min(n, int(mean + 40 * math.sqrt(mean) + 40))
    tail = 0.0
    for k in range(hi - 1, int(mean) - 1, -1):
        tail += pmf(k + 1)
        if tail > overflow:
            return k + 1
    return max(int(mean), 1)


def poisson_batches(
    split: Split,
    sample_rate: float,
    *,
    physical_batch_size: int,
    seed: int,
    epoch: int,
    steps: int,
    start: int = 0,
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """`steps` Poisson-sampled batches `(images [P, 28, 28], labels [P], mask [P] bool)`: each
    example joins each batch with probability `sample_rate`, a pure function of (seed, epoch,
    step), padded (mask False) to `physical_batch_size` P; a batch of more than P keeps the P
    whose draws were smallest, an unbiased choice."""
    # checked here, not when the first batch is asked for (the batches are a generator)
    privacy.check_sample_rate(sample_rate)
    _check_physical(physical_batch_size)
    if not 0 <= start <= steps:
        raise ValueError(f"start must be in [0, steps], got {start} of {steps}")
    n, size, device = split.images.shape[0], physical_batch_size, split.images.device
    epoch_seed = _order_seed(int(seed) ^ _POISSON_SALT, int(epoch))

    def draw(b: int) -> tuple[Tensor, Tensor, Tensor]:
        u = torch.rand(n, generator=torch.Generator().manual_seed(_splitmix64(epoch_seed ^ (b & _MASK64))))
        chosen = (u < sample_rate).nonzero().squeeze(1)
        if chosen.numel() > size:
            chosen = chosen[u[chosen].argsort()[:size]].sort().values
        idx = torch.zeros(size, dtype=torch.int64)
        idx[: chosen.numel()] = chosen
        idx, mask = idx.to(device), (torch.arange(size) < chosen.numel()).to(device)
        return split.images[idx], split.labels[idx], mask

    return (draw(b) for b in range(start, steps))


def _check_physical(size: Any) -> None:
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError(f"physical_batch_size must be an integer, got {size!r}")
    if size < 1:
        raise ValueError(f"physical_batch_size must be >= 1, got {size}")


@dataclass(frozen=True)
class PoissonBatches:
    """A split's Poisson-sampled batches for `fit` (private training): called as `(epoch,
    start=0)` it yields that epoch's `poisson_batches` from step `start` on, `len()` =
    `round(1 / sample_rate)` steps per epoch (one pass in expectation, as Opacus counts).
    physical_batch_size: the padded size P; None: `poisson_capacity(n, sample_rate)`, which a
    batch exceeds with probability at most 1e-9 per step."""

    split: Split
    sample_rate: float
    seed: int = 0
    physical_batch_size: int | None = None

    def __post_init__(self) -> None:
        # the accountant's own range (a real number, not a bool, of at least SAMPLE_RATE_MIN):
        # an epoch of round(1 / q) steps must be countable
        object.__setattr__(self, "sample_rate", privacy.check_sample_rate(self.sample_rate))
        if self.physical_batch_size is not None:
            _check_physical(self.physical_batch_size)

    @property
    def size(self) -> int:
        """The physical (padded) batch size."""
        return self.physical_batch_size or poisson_capacity(int(self.split.labels.shape[0]), self.sample_rate)

    @property
    def expected_batch_size(self) -> float:
        """`sample_rate * n`: what the clipped sum is divided by (`privacy.clip_and_noise(...,
        expected_batch_size=)`; `fit(privacy=)` refuses a stage whose size is not this)."""
        return self.sample_rate * int(self.split.labels.shape[0])

    def __call__(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return poisson_batches(self.split, self.sample_rate, physical_batch_size=self.size, seed=self.seed,
                               epoch=epoch, steps=len(self), start=start)  # fmt: skip

    def __len__(self) -> int:
        return max(1, round(1 / self.sample_rate))

    @property
    def batching(self) -> dict[str, Any]:
        """What fixes the batches: example count, sample rate, physical size and seed."""
        return {"n": int(self.split.labels.shape[0]), "sample_rate": self.sample_rate,
                "physical_batch_size": self.size, "seed": self.seed}  # fmt: skip


def dataset_stats(images: Tensor) -> tuple[float, float]:
    """(mean, std) of uint8 images scaled to [0, 1], over all pixels (population std): exact and
    cheap, from the 256-bin histogram in float64, never a float copy of the data."""
    counts = torch.bincount(images.reshape(-1).cpu(), minlength=256).to(torch.float64)
    values = torch.arange(256, dtype=torch.float64) / 255.0
    total = counts.sum()
    mean = (counts * values).sum() / total
    var = (counts * (values - mean) ** 2).sum() / total
    return float(mean), float(var.sqrt())
