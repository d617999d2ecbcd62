# Generated from docs/fundamentals/data.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


"""Data: where the book's data comes from and how it reaches a model.

The IDX format read by hand, MNIST and Tiny Shakespeare loaders with
checksums, a character tokeniser, train/validation splits, Dataset and
DataLoader wrappers, and seeding for reproducible runs.
"""

import gzip
import hashlib
import json
import math
import os
import random
import struct
import sys
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

import cave
from cave.fundamentals.essentials import seed_everything

# The files the book ships, as package data: code/cave/_data.
DATA_DIR: Path = Path(cave.__file__).resolve().parent / "_data"
# What the book's full runs recorded (results, a trained model), beside it:
# code/cave/_results. `cave run CHAPTER --full` writes there.
RESULTS_DIR: Path = Path(cave.__file__).resolve().parent / "_results"


class DataError(ValueError):
    """A data file is missing, damaged, or not what a loader expects.

    Every message names the file, what was expected and what was found.
    """


def load_results(name: str) -> dict:
    """The record a chapter's full run left in RESULTS_DIR / name.json."""
    path = RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        raise DataError(f"{path}: no recorded results named {name!r}; "
                        f"`cave run {name} --full` records them")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: expected a JSON record, found invalid "
                        f"JSON ({err})") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object, found a "
                        f"{type(record).__name__}")
    return record


# The SHA-256 digest of every file the book ships.
SHA256: dict[str, str] = {
    "mnist-t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "mnist-t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "tinyshakespeare.txt":
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
}


def sha256_of(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The SHA-256 digest of a file, as 64 hex characters."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str | Path, sha256: str | None = None) -> Path:
    """Return `path` if its digest is `sha256`, else raise DataError.

    Without `sha256`, the expected digest is looked up by file name.
    """
    path = Path(path)
    expected = sha256 if sha256 is not None else SHA256.get(path.name)
    if expected is None:
        raise DataError(f"{path}: no known checksum for {path.name!r}; "
                        f"expected one of {sorted(SHA256)}")
    if not path.is_file():
        raise DataError(f"{path}: expected a file, found none")
    actual = sha256_of(path)
    if actual != expected.lower():
        raise DataError(f"{path}: sha256 mismatch, expected {expected}, "
                        f"found {actual}")
    return path


# IDX type code -> (torch dtype, bytes per number)
IDX_DTYPES: dict[int, tuple[torch.dtype, int]] = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}
GZIP_MAGIC = b"\x1f\x8b"  # the first two bytes of every gzip stream


def read_maybe_gzip(path: str | Path) -> bytes:
    """A file's bytes, decompressed if they start with gzip's magic."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the file ({err})") from err
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip stream ({err})") from err


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file (raw or gzip) into a tensor of its shape and type."""
    path = Path(path)
    data = read_maybe_gzip(path)
    if len(data) < 4:
        raise DataError(f"{path}: truncated header, expected 4 magic "
                        f"bytes, found {len(data)}")
    zeros, code, ndim = data[:2], data[2], data[3]  # (1)!
    if zeros != b"\x00\x00":
        raise DataError(f"{path}: bad IDX magic, expected 00 00 as the "
                        f"first two bytes, found {zeros.hex(' ')}")
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X}, "
                        f"expected one of {known}")
    if ndim == 0:
        raise DataError(f"{path}: expected at least 1 dimension, found 0")
    start = 4 + 4 * ndim  # where the numbers begin
    if len(data) < start:
        raise DataError(f"{path}: truncated header, expected {start} bytes "
                        f"for {ndim} dimensions, found {len(data)}")
    shape = struct.unpack(f">{ndim}I", data[4:start])  # (2)!
    dtype, itemsize = IDX_DTYPES[code]
    count = math.prod(shape)
    expected, found = count * itemsize, len(data) - start
    if found < expected:
        raise DataError(f"{path}: truncated data, expected {expected} bytes "
                        f"for shape {shape}, found {found}")
    if found > expected:
        raise DataError(f"{path}: {found - expected} trailing bytes, "
                        f"expected {expected} data bytes for shape {shape},"
                        f" found {found}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(data[start:]), dtype=torch.uint8)
    if itemsize > 1 and sys.byteorder == "little":
        raw = raw.view(count, itemsize).flip(1)  # (3)!
    return raw.contiguous().view(dtype).reshape(shape)  # (4)!


MNIST_FILES = {
    "images": "mnist-t10k-images-idx3-ubyte.gz",
    "labels": "mnist-t10k-labels-idx1-ubyte.gz",
}


def load_mnist(root: str | Path = DATA_DIR
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST's 10,000 test digits: uint8 images (N, 28, 28), int64 labels.

    Both files are checksum-verified before they are read.
    """
    root = Path(root)
    images_path = verify(root / MNIST_FILES["images"])
    labels_path = verify(root / MNIST_FILES["labels"])
    images = read_idx(images_path)  # (N, 28, 28)
    labels = read_idx(labels_path)  # (N,)
    if images.dtype != torch.uint8 or images.shape[1:] != (28, 28):
        raise DataError(f"{images_path}: expected uint8 images of shape "
                        f"(N, 28, 28), found {images.dtype} "
                        f"{tuple(images.shape)}")
    if labels.dtype != torch.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_path}: expected uint8 labels of shape "
                        f"(N,), found {labels.dtype} {tuple(labels.shape)}")
    if len(images) != len(labels):
        raise DataError(f"{images_path}, {labels_path}: expected one label "
                        f"per image, found {len(images)} images and "
                        f"{len(labels)} labels")
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{labels_path}: expected labels 0 to 9, found "
                        f"{int(labels.max())}")
    return images, labels.long()


def mnist_split(seed: int = 0, val_size: int = 2000,
                root: str | Path = DATA_DIR):
    """((train_images, train_labels), (val_images, val_labels)).

    A fixed-seed random permutation puts `val_size` digits in validation
    and the rest in training. It uses its own generator, so the global
    random state is left untouched.
    """
    images, labels = load_mnist(root)  # (N, 28, 28), (N,)
    n = len(images)
    if not 0 < val_size < n:
        raise ValueError(f"val_size must be between 1 and {n - 1}, "
                         f"got {val_size}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)  # (N,)
    val, train = order[:val_size], order[val_size:]
    return ((images[train], labels[train]),  # (N - V, 28, 28), (N - V,)
            (images[val], labels[val]))  # (V, 28, 28), (V,)


class MNISTDataset(Dataset):
    """MNIST digits as (image, label): float (1, 28, 28) in [0, 1], int64.

    `transform`, if given, is applied to each float image (for example a
    random shift for data augmentation).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 transform=None):
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(f"expected uint8 images (N, H, W), got "
                             f"{images.dtype} {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"expected labels of shape ({len(images)},), "
                             f"got {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.images[i].unsqueeze(0).float() / 255  # (1, 28, 28)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


SHAKESPEARE_FILE = "tinyshakespeare.txt"


def load_shakespeare(root: str | Path = DATA_DIR) -> str:
    """The Tiny Shakespeare text, checksum-verified."""
    path = verify(Path(root) / SHAKESPEARE_FILE)
    return path.read_text(encoding="utf-8")


class TokenizerError(DataError):
    """Text or ids outside a tokeniser's vocabulary."""


class CharTokenizer:
    """Characters to ids and back; the vocabulary is the sorted characters.

    `CharTokenizer(text)` (or `CharTokenizer.from_text(text)`) makes one
    id per distinct character of `text`.
    """

    def __init__(self, text: str):
        if not text:
            raise ValueError("cannot build a vocabulary from empty text")
        self.chars: str = "".join(sorted(set(text)))  # id -> character
        self.stoi = {c: i for i, c in enumerate(self.chars)}  # char -> id

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """A string as a LongTensor of ids, shape (len(text),)."""
        try:
            ids = [self.stoi[c] for c in text]
        except KeyError as err:
            char = err.args[0]
            raise TokenizerError(
                f"character {char!r} at position {text.index(char)} is not "
                f"in the vocabulary of {self.vocab_size} characters"
            ) from None
        return torch.tensor(ids, dtype=torch.long)  # (T,)

    def decode(self, ids) -> str:
        """Ids (a tensor or a list of ints) back to a string."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()  # (T,)
        for position, i in enumerate(ids):
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(
                    f"id {i} at position {position} is out of range, "
                    f"expected 0 to {self.vocab_size - 1}")
        return "".join(self.chars[i] for i in ids)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"


def split_tokens(ids: torch.Tensor, train_fraction: float = 0.9
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `train_fraction` of a 1-D id tensor, and the rest.

    Contiguous, not shuffled: neighbouring windows of text overlap, so a
    shuffled split would leak validation text into training.
    """
    if ids.ndim != 1:
        raise ValueError(f"expected a 1-D tensor of ids, got shape "
                         f"{tuple(ids.shape)}")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got "
                         f"{train_fraction}")
    n = int(train_fraction * len(ids))
    return ids[:n], ids[n:]  # (n,), (N - n,)


def shakespeare_split(train_fraction: float = 0.9,
                      root: str | Path = DATA_DIR):
    """(tokenizer, train_ids, val_ids) for Tiny Shakespeare.

    The vocabulary covers the whole text, so validation has no unknown
    characters; the ids are split contiguously.
    """
    text = load_shakespeare(root)
    tokenizer = CharTokenizer(text)
    train, val = split_tokens(tokenizer.encode(text), train_fraction)
    return tokenizer, train, val


class CharWindows(Dataset):
    """Every window of `block_size` ids, and its target shifted by one."""

    def __init__(self, ids: torch.Tensor, block_size: int):
        if ids.ndim != 1 or ids.is_floating_point():
            raise ValueError(f"expected a 1-D integer tensor of ids, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got "
                             f"{block_size}")
        if len(ids) < block_size + 1:
            raise DataError(f"sequence too short: expected at least "
                            f"block_size + 1 = {block_size + 1} ids, "
                            f"found {len(ids)}")
        self.ids, self.block_size = ids, block_size

    def __len__(self) -> int:
        return len(self.ids) - self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        i %= n
        x = self.ids[i:i + self.block_size]  # (T,)
        y = self.ids[i + 1:i + 1 + self.block_size]  # (T,)
        return x, y


def seed_worker(worker_id: int) -> None:
    """A DataLoader `worker_init_fn`: seed Python and NumPy in a worker.

    PyTorch seeds each worker's torch generator with base_seed + worker_id,
    base_seed drawn from the loader's generator. Recent versions seed
    `random` and NumPy too; this does it explicitly, from the same seed.
    """
    seed = torch.initial_seed() % 2**32  # base_seed + worker_id
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed)
