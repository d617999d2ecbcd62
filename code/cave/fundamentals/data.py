# Generated from docs/fundamentals/data.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Where the data comes from (docs/fundamentals/data.md:36)
"""Data: where the book's data comes from and how it reaches a model.

The IDX format read by hand, MNIST and Tiny Shakespeare loaders with
checksums, a character tokeniser, train/validation splits, Dataset and
DataLoader wrappers, and seeding for reproducible runs.
"""

import gzip
import hashlib
import json
import math
import random
import struct
import sys
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

import cave
from cave.fundamentals.essentials import seed_everything  # taught there

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


# § Checksums (docs/fundamentals/data.md:111)
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


# § Parsing by hand (docs/fundamentals/data.md:237)
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
    zeros, code, ndim = data[:2], data[2], data[3]  # bytes, int, int
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
    shape = struct.unpack(f">{ndim}I", data[4:start])  # big-endian u32s
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
        raw = raw.view(count, itemsize).flip(1)  # (count, itemsize)
    return raw.contiguous().view(dtype).reshape(shape)  # no copy: a view


# § MNIST (docs/fundamentals/data.md:345)
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


# § Training and validation (docs/fundamentals/data.md:429)
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


# § Dataset and DataLoader (docs/fundamentals/data.md:505)
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


# § Tiny Shakespeare (docs/fundamentals/data.md:596)
SHAKESPEARE_FILE = "tinyshakespeare.txt"


def load_shakespeare(root: str | Path = DATA_DIR) -> str:
    """The Tiny Shakespeare text, checksum-verified."""
    path = verify(Path(root) / SHAKESPEARE_FILE)
    return path.read_text(encoding="utf-8")


# § A character tokeniser (docs/fundamentals/data.md:638)
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


# § Splitting text: contiguous, not shuffled (docs/fundamentals/data.md:728)
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


# § Windows for next-character prediction (docs/fundamentals/data.md:802)
import base64  # the sampler's state travels in JSON, as base64 text


class Batches:
    """Random windows of `ids`: x (B, T) and its targets y, shifted by one.

    The windows come from a generator of their own, seeded once; its state
    and the count of batches drawn are the data position a checkpoint keeps.
    """

    def __init__(self, ids: torch.Tensor, batch_size: int, block_size: int,
                 seed: int = 0):
        if ids.ndim != 1 or ids.is_floating_point():
            raise ValueError(f"expected a 1-D integer tensor of ids, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        for name, value in (("batch_size", batch_size),
                            ("block_size", block_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got "
                                 f"{value!r}")
        if len(ids) < block_size + 1:
            raise DataError(f"sequence too short: expected at least "
                            f"block_size + 1 = {block_size + 1} ids, "
                            f"found {len(ids)}")
        self.ids, self.B, self.T = ids, batch_size, block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0  # batches handed out so far

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        n_starts = len(self.ids) - self.T  # windows that have a target
        starts = torch.randint(0, n_starts, (self.B,),
                               generator=self.generator)  # (B,)
        offsets = starts[:, None] + torch.arange(self.T + 1)  # (B, T + 1)
        chunk = self.ids[offsets]  # (B, T + 1)
        self.drawn += 1
        return chunk[:, :-1], chunk[:, 1:]  # (B, T), (B, T)

    def state_dict(self) -> dict:
        state = bytes(self.generator.get_state().tolist())
        return {"generator": base64.b64encode(state).decode("ascii"),
                "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict; ValueError, and nothing changed, if it is
        not one."""
        try:
            raw = base64.b64decode(state["generator"], validate=True)
            drawn = state["drawn"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"expected a Batches state_dict with base64 "
                             f"'generator' and 'drawn', got an error: "
                             f"{err!r}") from None
        expected = self.generator.get_state().numel()
        if len(raw) != expected or type(drawn) is not int or drawn < 0:
            raise ValueError(f"expected a generator state of {expected} "
                             f"bytes and a count >= 0, found {len(raw)} "
                             f"bytes and {drawn!r}")
        self.generator.set_state(
            torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        self.drawn = drawn


def validation_windows(ids: torch.Tensor, block_size: int,
                       max_windows: int | None = None) -> torch.Tensor:
    """The fixed validation windows: (N, block_size + 1) ids.

    The text is cut into consecutive, non-overlapping windows of
    block_size + 1 ids that share their boundary id (window i starts at
    i * block_size), so every id after the first is predicted exactly once;
    the tail too short for a window is dropped. With max_windows, that many
    windows spread evenly over the whole set (always the same ones).
    """
    if ids.ndim != 1 or ids.is_floating_point():
        raise ValueError(f"expected a 1-D integer tensor of ids, got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    n = (len(ids) - 1) // block_size  # full windows
    if n < 1:
        raise DataError(f"validation text too short: expected at least "
                        f"block_size + 1 = {block_size + 1} ids, found "
                        f"{len(ids)}")
    index = torch.arange(n)  # (N,)
    if max_windows is not None and max_windows < n:
        index = torch.linspace(0, n - 1, max_windows).round().long()
    offsets = index[:, None] * block_size + torch.arange(block_size + 1)
    return ids[offsets]  # (N, block_size + 1)


# § When examples differ in size: `collate_fn` (docs/fundamentals/data.md:938)
def pad_batch(seqs: list[torch.Tensor], pad: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D id tensors -> padded (N, max_len) and their lengths (N,)."""
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence, got none")
    lengths = torch.tensor([len(s) for s in seqs])  # (N,)
    out = torch.full((len(seqs), int(lengths.max())), pad)  # (N, L)
    for row, s in enumerate(seqs):
        out[row, :len(s)] = s
    return out, lengths


# § Seeds and reproducibility (docs/fundamentals/data.md:974)
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


# § A generated task: dates to ISO 8601 (docs/fundamentals/data.md:1135)
# What the dates task needs beyond the imports at the top of the module.
import datetime
from collections.abc import Callable, Iterator

from torch import Tensor

MONTHS = ("January", "February", "March", "April", "May", "June", "July",
          "August", "September", "October", "November", "December")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday",
            "Saturday", "Sunday")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"
                                                  }.get(n % 10, "th")
    return f"{n}{suffix}"


# Each style writes a date its own way; none is ambiguous (dd.mm.yyyy and
# m/d/yyyy use different separators), so every source has one answer.
DATE_FORMATS: dict[str, Callable[[datetime.date], str]] = {
    "d Month yyyy": lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    "Month d, yyyy": lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    "Mon d, yyyy": lambda d: f"{MONTHS[d.month - 1][:3]} {d.day}, {d.year}",
    "d Mon yyyy": lambda d: f"{d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    "Weekday, Month d, yyyy": lambda d: (f"{WEEKDAYS[d.weekday()]}, "
                                         f"{MONTHS[d.month - 1]} {d.day}, "
                                         f"{d.year}"),
    "Wkd d Mon yyyy": lambda d: (f"{WEEKDAYS[d.weekday()][:3]} {d.day} "
                                 f"{MONTHS[d.month - 1][:3]} {d.year}"),
    "dd.mm.yyyy": lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    "m/d/yyyy": lambda d: f"{d.month}/{d.day}/{d.year}",
    "the dth of Month, yyyy": lambda d: (f"the {_ordinal(d.day)} of "
                                         f"{MONTHS[d.month - 1]}, {d.year}"),
    "MONTH d yyyy": lambda d: f"{MONTHS[d.month - 1].upper()} {d.day} "
                              f"{d.year}",
    "yyyymmdd": lambda d: f"{d.year}{d.month:02d}{d.day:02d}",
    "d-mon-yyyy": lambda d: f"{d.day}-{MONTHS[d.month - 1][:3].lower()}-"
                            f"{d.year}",
}


def format_date(date: datetime.date, style: str) -> str:
    """`date` written in one of DATE_FORMATS' styles (locale-independent)."""
    if style not in DATE_FORMATS:
        raise ValueError(f"unknown date style {style!r}, expected one of "
                         f"{list(DATE_FORMATS)}")
    return DATE_FORMATS[style](date)


class Vocab:
    """Characters <-> ids, with <pad> = 0, <bos> = 1, <eos> = 2 first."""

    PAD, BOS, EOS = 0, 1, 2
    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars):
            raise ValueError(f"vocabulary characters repeat: {chars!r}")
        self.itos: list[str] = [*self.SPECIALS, *chars]  # id -> token
        self.stoi = {c: i for i, c in enumerate(self.itos)}  # token -> id

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str, bos: bool = False, eos: bool = False
               ) -> Tensor:
        """A string as ids (len(text) + bos + eos,), LongTensor."""
        missing = sorted(set(text) - set(self.stoi))
        if missing:
            raise ValueError(f"characters {missing} of {text!r} are not in "
                             f"the vocabulary of {len(self)} tokens")
        ids = [self.BOS] * bos + [self.stoi[c] for c in text] + \
            [self.EOS] * eos
        return torch.tensor(ids, dtype=torch.long)  # (len,)

    def decode(self, ids) -> str:
        """Ids back to text, skipping <pad> and <bos>, stopping at <eos>."""
        out = []
        for i in (ids.tolist() if isinstance(ids, Tensor) else ids):
            if i == self.EOS:
                break
            if i not in (self.PAD, self.BOS):
                out.append(self.itos[i])
        return "".join(out)

    def __repr__(self) -> str:
        return f"Vocab({len(self)} tokens)"


class DateTask:
    """Translate dates written in many styles into ISO 8601 'YYYY-MM-DD'.

    `DateTask(seed=0)` draws n_train + n_val + n_test *distinct* dates
    between `first` and `last`, writes each in a random style of
    DATE_FORMATS, and splits them: the test and validation dates never
    occur in training, in any style. Everything follows from `seed`.

    train, val, test    lists of (source, target) string pairs
    src_vocab, tgt_vocab   Vocab of the source and target characters
    tensors(split)      (src (N, S), src_lengths (N,), tgt (N, 12)):
                        src padded with <pad>; tgt = <bos> ISO <eos>
    batches(split, batch_size, generator=None)   shuffled when given a
                        generator; each batch trimmed to its longest source
    exact_match(decode, split)   the fraction of a split some decoder
                        translates exactly right, and its outputs
    """

    SRC_CHARS = (" ,-./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                 "abcdefghijklmnopqrstuvwxyz")  # every style's characters
    TGT_CHARS = "-0123456789"

    def __init__(self, n_train: int = 30_000, n_val: int = 1_000,
                 n_test: int = 2_000, seed: int = 0,
                 first: datetime.date = datetime.date(1900, 1, 1),
                 last: datetime.date = datetime.date(2099, 12, 31)):
        days = (last - first).days + 1
        n = n_train + n_val + n_test
        if min(n_train, n_val, n_test) < 0 or n > days:
            raise ValueError(f"expected 0 <= sizes with n_train + n_val + "
                             f"n_test <= {days} days, got {n_train}, "
                             f"{n_val}, {n_test}")
        rng = random.Random(seed)  # its own stream: the global one untouched
        styles = list(DATE_FORMATS)
        pairs = []
        for offset in rng.sample(range(days), n):
            date = first + datetime.timedelta(days=offset)
            pairs.append((format_date(date, rng.choice(styles)),
                          date.isoformat()))
        self.seed = seed
        self.test = pairs[:n_test]
        self.val = pairs[n_test:n_test + n_val]
        self.train = pairs[n_test + n_val:]
        self.src_vocab = Vocab(self.SRC_CHARS)
        self.tgt_vocab = Vocab(self.TGT_CHARS)
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    def split(self, name: str) -> list[tuple[str, str]]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got "
                             f"{name!r}")
        return getattr(self, name)

    def tensors(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """(src (N, S), src_lengths (N,), tgt (N, 12)) for a split."""
        if name not in self._cache:
            pairs = self.split(name)
            src, lengths = pad_batch([self.src_vocab.encode(s)
                                      for s, _ in pairs], Vocab.PAD)
            tgt, _ = pad_batch([self.tgt_vocab.encode(t, bos=True, eos=True)
                                for _, t in pairs], Vocab.PAD)
            self._cache[name] = (src, lengths, tgt)
        return self._cache[name]

    def batches(self, name: str, batch_size: int,
                generator: torch.Generator | None = None
                ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(src (B, S_b), src_lengths (B,), tgt (B, 12)), S_b the longest."""
        src, lengths, tgt = self.tensors(name)
        order = (torch.arange(len(src)) if generator is None
                 else torch.randperm(len(src), generator=generator))
        for i in range(0, len(src), batch_size):
            index = order[i:i + batch_size]  # (B,)
            longest = int(lengths[index].max())
            yield src[index, :longest], lengths[index], tgt[index]

    @torch.no_grad()
    def exact_match(self, decode: Callable[[Tensor, Tensor], Tensor],
                    split: str, batch_size: int = 1000,
                    device: torch.device | str | None = None
                    ) -> tuple[float, list[str]]:
        """Decode a split in order: (fraction exactly right, outputs).

        decode(src (B, S), src_lengths (B,)) -> target ids (B, T), read up
        to the first <eos>: any model's decoder (greedy, beam...). The
        batches go to `device` first; the decoder sets its own mode.
        """
        outputs = []
        for src, lengths, _ in self.batches(split, batch_size):
            if device is not None:
                src, lengths = src.to(device), lengths.to(device)
            ids = decode(src, lengths)  # (B, T)
            if not isinstance(ids, Tensor) or ids.ndim != 2 \
                    or ids.shape[0] != len(src):
                found = (tuple(ids.shape) if isinstance(ids, Tensor)
                         else type(ids).__name__)
                raise ValueError(f"decode must return target ids of shape "
                                 f"(B={len(src)}, T), got {found}")
            outputs += [self.tgt_vocab.decode(row) for row in ids.cpu()]
        right = sum(out == tgt for out, (_, tgt) in zip(outputs,
                                                        self.split(split)))
        return right / len(outputs), outputs

    def __repr__(self) -> str:
        return (f"DateTask(train={len(self.train)}, val={len(self.val)}, "
                f"test={len(self.test)}, seed={self.seed})")
