"""Tests for cave.fundamentals.data (docs/fundamentals/data.md).

The IDX tests write their own files with an independent writer (struct,
one number at a time), so the reader is checked against the format, not
against itself.
"""

import functools
import gzip
import random
import shutil
import struct
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from cave.fundamentals import data as D

# IDX type code -> (struct letter for one number, torch dtype)
CODES = {
    0x08: ("B", torch.uint8),
    0x09: ("b", torch.int8),
    0x0B: ("h", torch.int16),
    0x0C: ("i", torch.int32),
    0x0D: ("f", torch.float32),
    0x0E: ("d", torch.float64),
}


def idx_bytes(values: list, shape: tuple, code: int) -> bytes:
    """An IDX file's bytes, written number by number with struct."""
    letter = CODES[code][0]
    header = bytes([0, 0, code, len(shape)])
    header += b"".join(struct.pack(">I", n) for n in shape)
    return header + b"".join(struct.pack(">" + letter, v) for v in values)


def sample_values(code: int, count: int, seed: int) -> list:
    rng = random.Random(seed)
    if code == 0x08:
        return [rng.randrange(0, 256) for _ in range(count)]
    if code == 0x09:
        return [rng.randrange(-128, 128) for _ in range(count)]
    if code == 0x0B:
        return [rng.randrange(-2**15, 2**15) for _ in range(count)]
    if code == 0x0C:
        return [rng.randrange(-2**31, 2**31) for _ in range(count)]
    # floats exactly representable in float32, with signs and fractions
    return [rng.randrange(-2**20, 2**20) / 64 for _ in range(count)]


def write(path, payload: bytes, gz: bool):
    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


# --------------------------------------------------------------------------
# read_idx
# --------------------------------------------------------------------------

SHAPES = [(5,), (3, 4), (2, 3, 4), (1, 1, 1), (7, 2)]


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("code", list(CODES), ids=hex)
def test_read_idx_round_trip(tmp_path, code, shape, gz):
    count = 1
    for n in shape:
        count *= n
    values = sample_values(code, count, seed=code * 31 + count)
    path = write(tmp_path / "x.idx", idx_bytes(values, shape, code), gz)
    got = D.read_idx(path)
    want = torch.tensor(values, dtype=CODES[code][1]).reshape(shape)
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_read_idx_big_endian_not_native(tmp_path):
    # 0x0102 big-endian is 258; read the other way it would be 513.
    path = write(tmp_path / "x.idx", idx_bytes([258, -2], (2,), 0x0B), False)
    assert D.read_idx(path).tolist() == [258, -2]


def test_read_idx_extreme_values(tmp_path):
    for code, values in [(0x0C, [-2**31, 2**31 - 1, 0]),
                         (0x0B, [-2**15, 2**15 - 1, 1]),
                         (0x09, [-128, 127, 0])]:
        path = write(tmp_path / f"{code}.idx",
                     idx_bytes(values, (3,), code), False)
        assert D.read_idx(path).tolist() == values


def test_read_idx_empty_dimension(tmp_path):
    path = write(tmp_path / "e.idx", idx_bytes([], (0, 3), 0x0D), True)
    got = D.read_idx(path)
    assert got.shape == (0, 3) and got.dtype == torch.float32


def good_payload() -> bytes:
    return idx_bytes(list(range(12)), (3, 4), 0x0C)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_truncated_data(tmp_path, gz):
    path = write(tmp_path / "cut.idx", good_payload()[:-3], gz)
    with pytest.raises(D.DataError, match="truncated") as err:
        D.read_idx(path)
    assert "cut.idx" in str(err.value)
    assert "expected 48" in str(err.value) and "found 45" in str(err.value)


def test_truncated_header(tmp_path):
    path = write(tmp_path / "head.idx", good_payload()[:9], False)
    with pytest.raises(D.DataError, match="truncated header") as err:
        D.read_idx(path)
    assert "head.idx" in str(err.value)


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_trailing_bytes(tmp_path, gz):
    path = write(tmp_path / "long.idx", good_payload() + b"\x00" * 5, gz)
    with pytest.raises(D.DataError, match="5 trailing bytes") as err:
        D.read_idx(path)
    assert "long.idx" in str(err.value)


def test_bad_magic(tmp_path):
    payload = b"\x00\x01" + good_payload()[2:]
    path = write(tmp_path / "magic.idx", payload, False)
    with pytest.raises(D.DataError, match="bad IDX magic") as err:
        D.read_idx(path)
    assert "magic.idx" in str(err.value) and "00 01" in str(err.value)


def test_unknown_dtype(tmp_path):
    payload = bytearray(good_payload())
    payload[2] = 0x0A
    path = write(tmp_path / "type.idx", bytes(payload), True)
    with pytest.raises(D.DataError, match="0x0A") as err:
        D.read_idx(path)
    assert "type.idx" in str(err.value)


def test_corrupt_gzip(tmp_path):
    packed = gzip.compress(good_payload() * 50)
    for name, damaged in [("cut.gz", packed[:len(packed) // 2]),
                          ("junk.gz", packed[:10] + b"\xff" * 40)]:
        path = tmp_path / name
        path.write_bytes(damaged)
        with pytest.raises(D.DataError, match="corrupt gzip") as err:
            D.read_idx(path)
        assert name in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(D.DataError, match="nothere.idx"):
        D.read_idx(tmp_path / "nothere.idx")


# --------------------------------------------------------------------------
# verify
# --------------------------------------------------------------------------


def test_verify_shipped_files():
    for name in D.SHA256:
        assert D.verify(D.DATA_DIR / name) == D.DATA_DIR / name


def test_data_dir_is_package_data():
    import cave

    assert D.DATA_DIR == Path(cave.__file__).resolve().parent / "_data"
    assert sorted(p.name for p in D.DATA_DIR.iterdir()
                  if p.name in D.SHA256) == sorted(D.SHA256)


def test_wrong_checksum(tmp_path):
    name = "tinyshakespeare.txt"
    path = tmp_path / name
    shutil.copy(D.DATA_DIR / name, path)
    with path.open("ab") as f:
        f.write(b"!")
    with pytest.raises(D.DataError, match="sha256 mismatch") as err:
        D.verify(path)
    message = str(err.value)
    assert name in message and D.SHA256[name] in message
    assert D.sha256_of(path) in message


def test_verify_explicit_digest(tmp_path):
    path = tmp_path / "any.bin"
    path.write_bytes(b"abc")
    digest = ("ba7816bf8f01cfea414140de5dae2223"
              "b00361a396177a9cb410ff61f20015ad")
    assert D.verify(path, digest) == path
    with pytest.raises(D.DataError, match="any.bin"):
        D.verify(path, "0" * 64)


def test_verify_unknown_name(tmp_path):
    path = tmp_path / "mystery.bin"
    path.write_bytes(b"x")
    with pytest.raises(D.DataError, match="mystery.bin"):
        D.verify(path)


def test_load_mnist_rejects_damaged_copy(tmp_path):
    for name in D.MNIST_FILES.values():
        shutil.copy(D.DATA_DIR / name, tmp_path / name)
    target = tmp_path / D.MNIST_FILES["images"]
    raw = bytearray(target.read_bytes())
    raw[-100] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(D.DataError, match=D.MNIST_FILES["images"]):
        D.load_mnist(tmp_path)


# --------------------------------------------------------------------------
# MNIST
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return D.load_mnist()


def test_load_mnist(mnist):
    images, labels = mnist
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10000,) and labels.dtype == torch.int64
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert int(images.max()) == 255 and int(images.min()) == 0
    # every class present, none wildly over- or under-represented
    counts = torch.bincount(labels, minlength=10)
    assert int(counts.min()) > 800 and int(counts.max()) < 1200


def test_mnist_split_sizes_and_disjoint(mnist):
    images, labels = mnist
    (tx, ty), (vx, vy) = D.mnist_split(seed=0)
    assert tx.shape == (8000, 28, 28) and vx.shape == (2000, 28, 28)
    assert ty.shape == (8000,) and vy.shape == (2000,)
    assert tx.dtype == vx.dtype == torch.uint8
    assert ty.dtype == vy.dtype == torch.int64
    # Together the parts are the whole set, each (image, label) once.
    def rows(x, y):
        return Counter(bytes(r.numpy()) + bytes([int(c)])
                       for r, c in zip(x.reshape(len(x), -1), y))

    # Equal multisets: nothing lost, nothing added, nothing in both parts
    # (an example in both would be counted once too often).
    whole, train, val = rows(images, labels), rows(tx, ty), rows(vx, vy)
    assert train + val == whole
    assert len(whole) == 10000  # MNIST's test images are all distinct
    torch.testing.assert_close(
        torch.bincount(torch.cat([ty, vy]), minlength=10),
        torch.bincount(labels, minlength=10), rtol=0, atol=0)


def test_mnist_split_deterministic_and_seeded():
    (a_x, a_y), (a_vx, a_vy) = D.mnist_split(seed=0)
    (b_x, b_y), (b_vx, b_vy) = D.mnist_split(seed=0)
    assert torch.equal(a_x, b_x) and torch.equal(a_y, b_y)
    assert torch.equal(a_vx, b_vx) and torch.equal(a_vy, b_vy)
    (c_x, c_y), _ = D.mnist_split(seed=1)
    assert not torch.equal(a_y, c_y)
    (_, _), (s_vx, s_vy) = D.mnist_split(seed=0, val_size=500)
    assert s_vx.shape == (500, 28, 28) and s_vy.shape == (500,)


def test_mnist_split_leaves_global_rng_alone():
    torch.manual_seed(123)
    random.seed(7)
    state, py_state = torch.get_rng_state(), random.getstate()
    D.mnist_split(seed=3)
    assert torch.equal(state, torch.get_rng_state())
    assert py_state == random.getstate()


def test_mnist_split_bad_val_size():
    with pytest.raises(ValueError, match="val_size"):
        D.mnist_split(val_size=0)
    with pytest.raises(ValueError, match="val_size"):
        D.mnist_split(val_size=10000)


def test_mnist_dataset_items(mnist):
    images, labels = mnist
    ds = D.MNISTDataset(images[:10], labels[:10])
    assert len(ds) == 10
    x, y = ds[3]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    torch.testing.assert_close(x[0] * 255, images[3].float(),
                               rtol=0, atol=1e-4)
    assert y.dtype == torch.int64 and int(y) == int(labels[3])
    shifted = D.MNISTDataset(images[:10], labels[:10],
                             transform=lambda t: t + 1)
    torch.testing.assert_close(shifted[3][0], x + 1, rtol=0, atol=0)
    with pytest.raises(ValueError, match="labels"):
        D.MNISTDataset(images[:10], labels[:9])
    with pytest.raises(ValueError, match="uint8"):
        D.MNISTDataset(images[:10].float(), labels[:10])


def loader_labels(ds, seed, epochs=2):
    loader = DataLoader(ds, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    out = []
    for _ in range(epochs):
        out += [(xb.clone(), yb.clone()) for xb, yb in loader]
    return out


def test_dataloader_determinism(mnist):
    images, labels = mnist
    ds = D.MNISTDataset(images[:200], labels[:200])
    a, b = loader_labels(ds, 0), loader_labels(ds, 0)
    assert len(a) == len(b) == 2 * 7
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape[1:] == (1, 28, 28)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = loader_labels(ds, 1)
    assert not all(torch.equal(ya, yc) for (_, ya), (_, yc) in zip(a, c))
    # the two epochs of one loader are shuffled differently
    assert not torch.equal(torch.cat([y for _, y in a[:7]]),
                           torch.cat([y for _, y in a[7:]]))
    # the global generator plays no part
    torch.manual_seed(0)
    d = loader_labels(ds, 0)
    torch.manual_seed(99)
    e = loader_labels(ds, 0)
    assert all(torch.equal(yd, ye) for (_, yd), (_, ye) in zip(d, e))


def test_seed_everything():
    g = D.seed_everything(5)
    assert isinstance(g, torch.Generator)
    first = (random.random(), torch.rand(4), torch.rand(2, generator=g))
    g = D.seed_everything(5)
    again = (random.random(), torch.rand(4), torch.rand(2, generator=g))
    assert first[0] == again[0]
    assert torch.equal(first[1], again[1])
    assert torch.equal(first[2], again[2])
    D.seed_everything(6)
    assert random.random() != first[0]


# --------------------------------------------------------------------------
# Tiny Shakespeare
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def shakespeare():
    return D.load_shakespeare()


@functools.lru_cache(maxsize=None)
def tokenizer():
    return D.CharTokenizer(shakespeare())


def test_load_shakespeare():
    text = shakespeare()
    assert isinstance(text, str) and len(text) == 1_115_394
    assert text.startswith("First Citizen:\n")


def test_tokenizer_vocabulary():
    tok = tokenizer()
    assert tok.vocab_size == 65 == len(tok.chars)
    assert list(tok.chars) == sorted(set(shakespeare()))
    assert tok.encode("\n").tolist() == [0]
    assert tok.encode(" ").tolist() == [1]
    assert D.CharTokenizer.from_text("bca").chars == "abc"


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_tokenizer_round_trip(data):
    tok = tokenizer()
    text = data.draw(st.text(alphabet=tok.chars, max_size=200))
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text
    if len(ids):
        assert 0 <= int(ids.min()) and int(ids.max()) < tok.vocab_size


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=30))
def test_tokenizer_built_from_any_text(text):
    tok = D.CharTokenizer(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))


def test_unknown_character_named():
    tok = tokenizer()
    with pytest.raises((KeyError, ValueError)) as err:
        tok.encode("abc\u00e9d")
    message = str(err.value)
    assert repr("\u00e9") in message and "position 3" in message


def test_decode_out_of_range_named():
    tok = tokenizer()
    for bad in (65, -1):
        with pytest.raises((KeyError, ValueError)) as err:
            tok.decode([1, 2, bad])
        assert str(bad) in str(err.value) and "position 2" in str(err.value)
    with pytest.raises(ValueError, match="999"):
        tok.decode(torch.tensor([999]))


def test_split_tokens():
    ids = torch.arange(100)
    train, val = D.split_tokens(ids)
    assert torch.equal(train, torch.arange(90))
    assert torch.equal(val, torch.arange(90, 100))
    train, val = D.split_tokens(ids, train_fraction=0.25)
    assert len(train) == 25 and len(val) == 75
    with pytest.raises(ValueError):
        D.split_tokens(ids, train_fraction=1.0)
    with pytest.raises(ValueError):
        D.split_tokens(ids.reshape(10, 10))


def test_shakespeare_split():
    tok, train, val = D.shakespeare_split()
    n = 1_115_394
    assert len(train) + len(val) == n
    assert len(train) == int(0.9 * n) == 1_003_854
    assert train.dtype == val.dtype == torch.int64
    assert tok.vocab_size == 65
    text = shakespeare()
    assert tok.decode(train[:50]) == text[:50]
    assert tok.decode(train[-20:]) + tok.decode(val[:20]) == \
        text[len(train) - 20:len(train) + 20]
    assert tok.decode(val[-20:]) == text[-20:]


def test_batches_are_shifted_windows_of_the_text():
    ids = torch.arange(20)
    batches = D.Batches(ids, batch_size=50, block_size=8, seed=0)
    x, y = batches.next()
    assert x.shape == y.shape == (50, 8)
    assert torch.equal(y, x + 1)  # the targets: one id on
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows
    starts = x[:, 0]
    assert starts.min() >= 0 and starts.max() <= 20 - 8 - 1
    assert len(set(starts.tolist())) > 5  # random starts, not one
    assert len(D.Batches(torch.arange(9), 1, 8).next()[0][0]) == 8


def test_batches_resume_exactly_through_json_and_ignore_the_global_rng():
    import json

    _, ids, _ = D.shakespeare_split()
    a = D.Batches(ids[:20_000], 5, 16, seed=3)
    a.next()
    state = json.loads(json.dumps(a.state_dict()))  # through JSON
    b = D.Batches(ids[:20_000], 5, 16, seed=99)
    b.load_state_dict(state)
    for _ in range(3):
        torch.rand(7)  # global draws do not move the sampler
        for u, v in zip(a.next(), b.next()):
            assert torch.equal(u, v)
    assert a.drawn == b.drawn == 4


def test_batches_on_shakespeare_decode_to_the_text():
    tok, train, _ = D.shakespeare_split()
    x, y = D.Batches(train, 4, 32, seed=0).next()
    text = shakespeare()
    for row_x, row_y in zip(x, y):
        window = tok.decode(row_x)
        start = text.find(window)
        assert start >= 0 and tok.decode(row_y) == \
            text[start + 1:start + 33]


def test_batches_refuse_bad_input_and_bad_states():
    with pytest.raises(D.DataError, match="= 9 ids, found 8"):
        D.Batches(torch.arange(8), 1, block_size=8)
    with pytest.raises(ValueError, match="1-D"):
        D.Batches(torch.zeros(4, 4, dtype=torch.long), 1, block_size=2)
    with pytest.raises(ValueError, match="batch_size must be a positive"):
        D.Batches(torch.arange(9), 0, block_size=2)
    b = D.Batches(torch.arange(100), 2, 4, seed=0)
    before = b.state_dict()
    for bad in [{}, {"generator": "!!!", "drawn": 1},
                {"generator": "AAAA", "drawn": 1},
                {**before, "drawn": -1}, {**before, "drawn": "3"}]:
        with pytest.raises(ValueError, match="expected"):
            b.load_state_dict(bad)
    assert b.state_dict() == before  # nothing changed


def test_validation_windows_predict_every_id_once():
    ids = torch.arange(101)
    w = D.validation_windows(ids, 10)  # (10, 11)
    assert w.shape == (10, 11)
    targets = w[:, 1:].flatten()
    assert torch.equal(targets, torch.arange(1, 101))
    few = D.validation_windows(ids, 10, max_windows=3)
    # linspace(0, 9, 3) = 0, 4.5, 9; 4.5 rounds to even: windows 0, 4, 9
    assert torch.equal(few[:, 0], torch.tensor([0, 40, 90]))
    assert D.validation_windows(ids, 10, max_windows=50).shape == (10, 11)
    with pytest.raises(D.DataError, match="= 11 ids, found 10"):
        D.validation_windows(torch.arange(10), 10)


# ---- the dates task: the RNN and Transformer chapters depend on this API ---

import datetime  # noqa: E402  (the dates task's tests, kept together)

from cave.fundamentals.data import (DATE_FORMATS, DateTask,  # noqa: E402
                                    Vocab, format_date, pad_batch)


def test_date_task_is_deterministic_and_disjoint():
    a, b = DateTask(2000, 200, 300, seed=7), DateTask(2000, 200, 300, seed=7)
    assert a.train == b.train and a.val == b.val and a.test == b.test
    assert (len(a.train), len(a.val), len(a.test)) == (2000, 200, 300)
    assert DateTask(2000, 200, 300, seed=8).test != a.test
    dates = [{t for _, t in split} for split in (a.train, a.val, a.test)]
    assert not dates[0] & dates[2] and not dates[0] & dates[1]
    sources = [{s for s, _ in split} for split in (a.train, a.val, a.test)]
    assert not sources[0] & sources[2]
    state = torch.get_rng_state()
    DateTask(100, 10, 10, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched


def test_date_task_targets_are_iso_and_sources_parse_back():
    task = DateTask(500, 50, 50, seed=1)
    for source, target in task.train + task.test:
        date = datetime.date.fromisoformat(target)
        assert source in {format_date(date, s) for s in DATE_FORMATS}
    styles = {next(s for s in DATE_FORMATS
                   if format_date(datetime.date.fromisoformat(t), s) == src)
              for src, t in task.train}
    assert styles == set(DATE_FORMATS)  # every style is used


def test_date_styles_are_unambiguous():
    """No source string may stand for two dates."""
    seen = {}
    for first in (datetime.date(1900, 1, 1), datetime.date(1999, 1, 1),
                  datetime.date(2098, 1, 1)):  # every day of 9 years
        for offset in range(3 * 366):
            day = first + datetime.timedelta(days=offset)
            for style in DATE_FORMATS:
                text = format_date(day, style)
                assert seen.setdefault(text, day) == day, (text, style)


def test_date_task_tensors_and_batches():
    task = DateTask(300, 20, 30, seed=0)
    src, lengths, tgt = task.tensors("train")
    assert src.shape[0] == lengths.shape[0] == tgt.shape[0] == 300
    assert tgt.shape[1] == 12 and (tgt[:, 0] == Vocab.BOS).all()
    assert (tgt[:, -1] == Vocab.EOS).all()
    for row in range(5):
        assert task.src_vocab.decode(src[row]) == task.train[row][0]
        assert task.tgt_vocab.decode(tgt[row]) == task.train[row][1]
        assert int(lengths[row]) == len(task.train[row][0])
    seen = 0
    for s, n, t in task.batches("train", 64,
                                torch.Generator().manual_seed(0)):
        assert s.shape[1] == int(n.max()) and len(s) == len(t) <= 64
        seen += len(s)
    assert seen == 300
    with pytest.raises(ValueError, match="split must be"):
        task.tensors("dev")
    with pytest.raises(ValueError, match=r"n_val \+ n_test <= 73049 days"):
        DateTask(80_000, 10, 10)


def test_vocab_round_trip_and_errors():
    vocab = Vocab("abc")
    ids = vocab.encode("cab", bos=True, eos=True)
    assert ids.tolist() == [1, 5, 3, 4, 2]
    assert vocab.decode(ids) == "cab"
    assert vocab.decode([5, 2, 3]) == "c"  # stops at <eos>
    with pytest.raises(ValueError, match=r"\['z'\] of 'za' are not in"):
        vocab.encode("za")
    with pytest.raises(ValueError, match="repeat"):
        Vocab("aa")


def test_pad_batch():
    padded, lengths = pad_batch([torch.tensor([5, 6, 7]), torch.tensor([8])])
    assert padded.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert lengths.tolist() == [3, 1]


def answer_key(task, split):
    """A decoder that is always right: it looks the answer up."""
    answers = dict(task.split(split))

    def decode(src, lengths):
        assert src.shape[0] == lengths.shape[0] and src.ndim == 2
        return torch.stack([task.tgt_vocab.encode(
            answers[task.src_vocab.decode(row)], eos=True) for row in src])
    return decode


def test_exact_match_counts_exact_strings_in_order():
    task = DateTask(300, 40, 50, seed=3)
    score, outputs = task.exact_match(answer_key(task, "val"), "val",
                                      batch_size=7)
    assert score == 1.0 and outputs == [t for _, t in task.val]
    key = answer_key(task, "test")

    def every_other_wrong(src, lengths):  # one digit off on even rows
        ids = key(src, lengths).clone()  # (B, 11)
        ids[::2, 1] = torch.where(ids[::2, 1] == task.tgt_vocab.stoi["9"],
                                  task.tgt_vocab.stoi["8"],
                                  task.tgt_vocab.stoi["9"])
        return ids
    score, outputs = task.exact_match(every_other_wrong, "test",
                                      batch_size=50)
    assert score == 0.5 and len(outputs) == 50
    assert all(o != t for o, (_, t) in zip(outputs[::2], task.test[::2]))

    # <eos> ends an output; what follows it (and <pad>) is ignored
    def with_tail(src, lengths):
        ids = key(src, lengths)
        return torch.cat([ids, torch.full((len(ids), 3), 5)], dim=1)
    assert task.exact_match(with_tail, "test")[0] == 1.0


def test_exact_match_moves_batches_and_checks_the_decoder():
    task = DateTask(30, 10, 10, seed=0)
    seen = []

    def spy(src, lengths):
        seen.append((src.device, src.dtype, lengths.shape))
        return torch.zeros(len(src), 11, dtype=torch.long)
    task.exact_match(spy, "val", batch_size=4, device="cpu")
    assert [s[2] for s in seen] == [(4,), (4,), (2,)]
    with pytest.raises(ValueError, match=r"\(B=10, T\), got \(10,\)"):
        task.exact_match(lambda s, n: torch.zeros(len(s)), "val")
    with pytest.raises(ValueError, match=r"\(B=10, T\), got \(3, 11\)"):
        task.exact_match(lambda s, n: torch.zeros(3, 11), "val")
    with pytest.raises(ValueError, match="split must be"):
        task.exact_match(spy, "dev")
