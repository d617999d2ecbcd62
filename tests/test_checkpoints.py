"""docs/fundamentals/checkpoints.md: saving and resuming, for any model.

Safetensors files written by hand are read by the `safetensors` package and
its files by ours, bit for bit, for every dtype. The reader turns every
malformed file into CheckpointError naming it: listed cases, and a fuzz
test (hypothesis) of random JSON in every field and random byte damage.
Files and checkpoint folders appear whole or not at all. Random states,
optimiser states and whole checkpoints round-trip, and a resume is exact
(torch.equal). The recorder merges the machine into the record.
"""

import json
import os
import random
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from cave.fundamentals import checkpoints as C
from cave.fundamentals import data as D

# --------------------------------------------------------------------------
# safetensors by hand
# --------------------------------------------------------------------------


def every_dtype() -> dict[str, torch.Tensor]:
    """One tensor of each dtype the format knows, with varied values."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g) * 4
    out = {}
    for name, dtype in C.ST_DTYPES.items():
        if dtype == torch.bool:
            out[name] = base > 0
        elif dtype.is_complex:
            out[name] = torch.complex(base, -base).to(dtype)
        elif dtype.is_floating_point:
            out[name] = base.to(dtype)
        else:
            lo = 0 if name.startswith("U") else -100
            out[name] = torch.randint(lo, 100, (3, 5), generator=g) \
                .to(dtype)
    return out


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (torch.equal lacks some dtypes)."""
    return a.dtype == b.dtype and a.shape == b.shape and \
        C.tensor_bytes(a) == C.tensor_bytes(b)


def sample_tensors():
    out = every_dtype()
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.zeros(0, 4)
    out["view"] = torch.arange(20.0).reshape(4, 5)[1:, ::2]  # a view
    out["i64_1d"] = torch.arange(-3, 4)
    return out


def test_every_dtype_of_ours_loads_in_the_safetensors_package():
    tensors = sample_tensors()
    assert {ST for ST in C.ST_DTYPES} <= set(tensors)
    theirs = safetensors_torch.load(C.safetensors_bytes(tensors,
                                                        {"step": "7"}))
    assert set(theirs) == set(tensors)
    for name, t in tensors.items():
        assert same(theirs[name], t.contiguous()), name


def test_every_dtype_of_theirs_loads_in_ours_with_metadata(tmp_path):
    tensors = {k: v.contiguous() for k, v in sample_tensors().items()}
    path = tmp_path / "theirs.safetensors"
    safetensors_torch.save_file(tensors, str(path), metadata={"a": "b"})
    ours, meta = C.load_safetensors(path)
    assert meta == {"a": "b"}
    assert set(ours) == set(tensors)
    for name, t in tensors.items():
        assert same(ours[name], t), name
    assert C.parse_safetensors(C.safetensors_bytes(tensors, {"a": "b"})
                               )[1] == {"a": "b"}


def test_header_is_aligned_json_and_offsets_tile_the_data():
    raw = C.safetensors_bytes({"b": torch.ones(3), "a": torch.zeros(2)})
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["a"]["data_offsets"] == [0, 8]  # sorted by name
    assert header["b"]["data_offsets"] == [8, 20]
    assert len(raw) == 8 + n + 20


def test_a_dtype_without_a_name_is_refused_by_the_writer():
    with pytest.raises(ValueError, match="no safetensors name"):
        C.safetensors_bytes({"q": torch.zeros(2, dtype=torch.complex128)})


def rebuild(header, data: bytes) -> bytes:
    text = header if isinstance(header, bytes) else \
        json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


VALID = C.safetensors_bytes({"w": torch.ones(2, 2), "b": torch.zeros(2)},
                            {"k": "v"})
_N = int.from_bytes(VALID[:8], "little")
HEADER = json.loads(VALID[8:8 + _N])
DATA = VALID[8 + _N:]


def with_w(**changes) -> bytes:
    return rebuild({**HEADER, "w": {**HEADER["w"], **changes}}, DATA)


@pytest.mark.parametrize("bad", [
    VALID[:5],  # shorter than the length field
    (10**12).to_bytes(8, "little") + VALID[8:],  # header past the end
    VALID[:8] + b"{" * _N + VALID[8 + _N:],  # not JSON
    VALID[:8] + b"\xff" * _N + VALID[8 + _N:],  # not UTF-8
    rebuild(b"[1, 2]", DATA),  # not an object
    rebuild(b"[" * 100_000 + b"]" * 100_000, b""),  # nested past recursion
    with_w(data_offsets=[0, 60]),
    with_w(dtype="F7"), with_w(dtype=["F32"]), with_w(dtype=None),
    with_w(shape=[1e400, 1]), with_w(shape=[2.0, 2]), with_w(shape=[2.7]),
    with_w(shape=[True, 4]), with_w(shape=[-2, -2]), with_w(shape="22"),
    with_w(shape=[2**64, 0]), with_w(shape=[1] * 65),
    with_w(data_offsets=[8, 24.0]), with_w(data_offsets=[False, 16]),
    with_w(data_offsets=[8, 24, 0]), with_w(data_offsets=[24, 8]),
    with_w(data_offsets=[2**64 + 8, 2**64 + 24]),
    with_w(data_offsets=[8, 2**70]), with_w(data_offsets={"0": 8}),
    rebuild({**HEADER, "w": {**HEADER["w"], "extra": 1}}, DATA),
    rebuild({**HEADER, "w": [1, 2]}, DATA),
    rebuild({**HEADER, "": HEADER["w"]}, DATA),
    rebuild({**HEADER, "__metadata__": {"k": 1}}, DATA),
    rebuild({**HEADER, "__metadata__": ["k"]}, DATA),
    rebuild({**HEADER, "__metadata__": None}, DATA),
    rebuild(b'{"w": {"dtype": "F32", "shape": [NaN], '
            b'"data_offsets": [8, 24]}}', DATA),
    rebuild(b'{"b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},'
            b' "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}'
            b'}', DATA[:8]),  # a name twice
    rebuild(b'{"w": {"dtype": "F32", "dtype": "F32", "shape": [4], '
            b'"data_offsets": [0, 16]}}', DATA[:16]),  # a field twice
    rebuild({"w": {"dtype": "F32", "shape": [0, 2**62, 2**62],
                   "data_offsets": [0, 0]}}, b""),  # strides overflow
    VALID[:-4],  # truncated
    VALID + b"\0" * 8,  # trailing bytes
])
def test_damaged_safetensors_raise_checkpoint_error(bad):
    with pytest.raises(C.CheckpointError,
                       match=r"^x\.st: not a valid safetensors file: "):
        C.parse_safetensors(bad, "x.st")


def check_parse(raw: bytes) -> None:
    """The reader's contract: tensors that fit the header, or
    CheckpointError. No other exception, nothing inconsistent."""
    try:
        tensors, meta = C.parse_safetensors(raw, "fuzz.st")
    except C.CheckpointError as err:
        assert str(err).startswith("fuzz.st: not a valid safetensors")
        return
    assert all(isinstance(k, str) and isinstance(v, str)
               for k, v in meta.items())
    n = int.from_bytes(raw[:8], "little")
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    assert total == len(raw) - 8 - n  # the tensors tile the data
    for t in tensors.values():
        assert t.dtype in C.ST_NAMES


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True,
                                          allow_infinity=True)
    | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
    | st.text(max_size=6) | st.sampled_from(sorted(C.ST_DTYPES)),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
FIELDS = ["dtype", "shape", "data_offsets"]


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS + ["entry", "header", "metadata",
                                       "extra", "name"]),
       value=json_values, tail=st.binary(max_size=40))
def test_fuzz_random_json_in_every_field(field, value, tail):
    header = json.loads(json.dumps(HEADER))
    if field in FIELDS:
        header["w"][field] = value
    elif field == "entry":
        header["w"] = value
    elif field == "header":
        header = value
    elif field == "metadata":
        header["__metadata__"] = value
    elif field == "extra":
        header["w"]["more"] = value
    else:  # a tensor named by random text
        header[str(value)] = header.pop("b")
    check_parse(rebuild(json.dumps(header).encode(), DATA + tail[:0]))
    check_parse(rebuild(json.dumps(header).encode(), DATA + tail))


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_fuzz_random_byte_damage_of_a_valid_file(data):
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "set"]))
        at = data.draw(st.integers(0, max(len(raw) - 1, 0)))
        if kind == "flip" and raw:
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and raw:
            raw[at] = data.draw(st.sampled_from(b'0129-.e[]{}",: \x00\xff'))
        elif kind == "cut":
            del raw[at:at + data.draw(st.integers(1, 8))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    check_parse(bytes(raw))
    try:
        ours, _ = C.parse_safetensors(bytes(raw))
    except C.CheckpointError:
        return
    # what ours accepts, the reference reads to the same tensors
    theirs = safetensors_torch.load(bytes(raw))
    assert set(theirs) == set(ours)
    for name, t in ours.items():
        assert same(theirs[name], t), name


@settings(max_examples=200, deadline=None)
@given(tensors=st.dictionaries(
    st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
    st.tuples(st.sampled_from(sorted(C.ST_DTYPES)),
              st.lists(st.integers(0, 3), max_size=3)), max_size=4))
def test_fuzz_random_valid_files_round_trip(tensors):
    made = {name: torch.zeros(shape, dtype=C.ST_DTYPES[dtype])
            for name, (dtype, shape) in tensors.items()}
    raw = C.safetensors_bytes(made)
    ours, _ = C.parse_safetensors(raw)
    theirs = safetensors_torch.load(raw)
    for name, t in made.items():
        assert same(ours[name], t) and same(theirs[name], t), name


# --------------------------------------------------------------------------
# atomic files and folders
# --------------------------------------------------------------------------


def test_write_atomic_leaves_the_old_file_when_the_write_fails(
        tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    C.write_atomic(path, b"old")

    def power_cut(fd):
        raise OSError("simulated power cut")

    monkeypatch.setattr(C.os, "fsync", power_cut)
    with pytest.raises(OSError, match="power cut"):
        C.write_atomic(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def tiny_files(step: int) -> dict[str, bytes]:
    model = nn.Linear(2, 2)
    return C.checkpoint_files(model, None, {"step": step}, {"n": 2})


@pytest.mark.parametrize("crash_at", [1, 2, 3, 4, 5, 6, "replace"])
def test_a_crash_anywhere_in_a_save_leaves_the_previous_checkpoint(
        tmp_path, monkeypatch, crash_at):
    out = tmp_path / "run"
    C.save_checkpoint(out, tiny_files(1), step=1)
    before = C.load_checkpoint(out)
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise OSError("simulated power cut")
        real_fsync(fd)

    def replace(src, dst):
        raise OSError("simulated power cut")

    if crash_at == "replace":
        monkeypatch.setattr(C.os, "replace", replace)
    else:
        monkeypatch.setattr(C.os, "fsync", fsync)
    with pytest.raises(OSError, match="power cut"):
        C.save_checkpoint(out, tiny_files(2), step=2)
    monkeypatch.undo()
    after = C.load_checkpoint(out)
    # the crash came before the `latest` switch: the old checkpoint rules
    assert after["folder"] == before["folder"]
    assert after["state"] == before["state"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")], \
        "temporary files left behind"


def test_keep_and_the_latest_pointer(tmp_path):
    for step in range(1, 6):
        C.save_checkpoint(tmp_path, tiny_files(step), step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == \
        ["step-000004", "step-000005"]
    assert (tmp_path / "latest").read_text() == "step-000005"
    assert C.checkpoint_folder(tmp_path).name == "step-000005"


# --------------------------------------------------------------------------
# random states and optimisers
# --------------------------------------------------------------------------


def test_rng_states_round_trip_through_json():
    import numpy as np

    states = json.loads(json.dumps(C.rng_states()))
    first = (random.random(), np.random.rand(), torch.rand(3))
    C.set_rng_states(states)
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1]
    assert torch.equal(first[2], again[2])


@pytest.mark.parametrize("damage", [
    lambda s: s.pop("torch"), lambda s: s.pop("python"),
    lambda s: s.update(torch="not base64!"),
    lambda s: s.update(torch="AAAA"),  # valid base64, wrong size
    lambda s: s.update(python=[3, [1, 2, 3], None]),
    lambda s: s.update(python="garbage"),
    lambda s: s.update(python=[3, [2**40] * 625, None]),
    lambda s: s.update(numpy=["MT19937", [1, 2], 0, 0, 0.0]),
])
def test_damaged_rng_states_are_refused_and_change_nothing(damage):
    import numpy as np  # noqa: F401  (so that its state is saved too)

    states = json.loads(json.dumps(C.rng_states()))
    damage(states)
    before = (random.getstate(), torch.get_rng_state())
    with pytest.raises(C.CheckpointError, match=r"^state\.json: damaged"):
        C.set_rng_states(states, "state.json")
    assert random.getstate() == before[0]
    assert torch.equal(torch.get_rng_state(), before[1])


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    lambda p: torch.optim.SGD(p, lr=1e-2),  # a momentum_buffer of None
])
def test_optimizer_state_round_trips(make):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = make(model.parameters())
    for _ in range(3):
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    tensors, groups = C.optimizer_to_files(opt)
    raw = C.safetensors_bytes(tensors)
    groups = json.loads(json.dumps(groups))
    fresh = make(nn.Linear(3, 2).parameters())
    fresh.load_state_dict(C.optimizer_from_files(
        C.parse_safetensors(raw)[0], groups))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for index, slots in a["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, b["state"][index][key])


# --------------------------------------------------------------------------
# whole checkpoints and an exact resume
# --------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16),
                                  nn.ReLU(), nn.Dropout(0.3),
                                  nn.Linear(16, 1))

    def forward(self, x):
        return self.body(x)


def steps(model, opt, n):
    model.train()
    for _ in range(n):
        x = torch.randn(8, 6)  # (B, 6)
        loss = F.mse_loss(model(x), x.sum(1, keepdim=True))
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_a_resume_into_fresh_objects_is_exact(tmp_path):
    torch.manual_seed(0)
    straight = Net()
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-2)
    steps(straight, opt, 9)

    torch.manual_seed(0)
    first = Net()
    first_opt = torch.optim.AdamW(first.parameters(), lr=1e-2)
    steps(first, first_opt, 4)
    files = C.checkpoint_files(first, first_opt, {"step": 4},
                               {"net": "Net"}, {"step": "4"})
    C.save_checkpoint(tmp_path, files, 4)

    torch.manual_seed(123)
    resumed = Net()
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    ckpt = C.load_checkpoint(tmp_path)
    assert ckpt["config"] == {"net": "Net"}
    state = C.restore_checkpoint(ckpt, resumed, resumed_opt)
    assert state["step"] == 4 and state["torch"] == torch.__version__
    steps(resumed, resumed_opt, 9 - state["step"])
    for (name, a), b in zip(straight.state_dict().items(),
                            resumed.state_dict().values()):
        assert torch.equal(a, b), name  # BatchNorm's int buffer too


def test_without_an_optimizer_the_checkpoint_has_no_optimizer_file(
        tmp_path):
    folder = C.save_checkpoint(tmp_path, tiny_files(3), 3)
    assert sorted(p.name for p in folder.iterdir()) == \
        ["config.json", "model.safetensors", "state.json"]
    ckpt = C.load_checkpoint(tmp_path)
    assert ckpt["optimizer"] == {}
    C.restore_checkpoint(ckpt, nn.Linear(2, 2))


def saved_run(tmp_path) -> Path:
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    C.save_checkpoint(tmp_path, C.checkpoint_files(
        model, opt, {"step": 1}, {}), 1)
    return tmp_path


@pytest.mark.parametrize("damage, message", [
    (lambda run: (run / "latest").write_bytes(b"\xff\xfe\x00\x81"),
     r"latest: expected a name like step-000100, found b'\\xff"),
    (lambda run: (run / "latest").write_text("../../etc"),
     "latest: expected a name like step-000100"),
    (lambda run: (run / "latest").write_text("step-000009"),
     "expected a checkpoint folder holding model.safetensors"),
    (lambda run: (run / "step-000001" / "state.json").unlink(),
     "expected state.json for a resume"),
    (lambda run: (run / "step-000001" / "state.json").write_text("{"),
     r"state\.json: not valid JSON"),
    (lambda run: (run / "step-000001" / "state.json").write_text("[]"),
     r"state\.json: expected a JSON object, found a list"),
    (lambda run: (run / "step-000001" / "state.json").write_text("{}"),
     r"state\.json: expected the keys rng, param_groups; missing rng"),
    (lambda run: (run / "step-000001" / "config.json").write_bytes(
        b"\xff"), r"config\.json: not valid JSON"),
    (lambda run: (run / "step-000001" / "optimizer.safetensors")
     .write_bytes(b"12345678"), "optimizer.safetensors: not a valid"),
])
def test_a_damaged_checkpoint_is_one_clear_error(tmp_path, damage,
                                                 message):
    run = saved_run(tmp_path)
    damage(run)
    with pytest.raises(C.CheckpointError, match=message):
        C.load_checkpoint(run)


def test_restore_names_the_file_that_does_not_fit(tmp_path):
    ckpt = C.load_checkpoint(saved_run(tmp_path))
    with pytest.raises(C.CheckpointError, match=r"model\.safetensors: "
                       r"\w+ expected a float tensor of shape \(3"):
        C.restore_checkpoint(ckpt, nn.Linear(2, 3))
    with pytest.raises(C.CheckpointError, match="missing"):
        C.restore_checkpoint(ckpt, nn.Linear(2, 2, bias=False))
    model = nn.Linear(2, 2)
    two_groups = torch.optim.AdamW([{"params": [model.weight]},
                                    {"params": [model.bias]}])
    with pytest.raises(C.CheckpointError,
                       match=r"optimizer\.safetensors: does not fit"):
        C.restore_checkpoint(ckpt, model, two_groups)
    ckpt["state"]["rng"]["torch"] = "AAAA"
    with pytest.raises(C.CheckpointError, match=r"state\.json: damaged"):
        C.restore_checkpoint(ckpt, nn.Linear(2, 2))


# --------------------------------------------------------------------------
# the run recorder
# --------------------------------------------------------------------------


def test_environment_describes_the_machine():
    env = C.environment()
    assert set(env) == {"torch", "date", "cpus", "threads",
                        "cpu_capability", "load_average"}
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["threads"] == torch.get_num_threads()
    json.dumps(env)


def test_record_results_merges_the_command_and_the_machine(tmp_path,
                                                           monkeypatch):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path)
    path = C.record_results("demo", {"loss": 0.5, "curve": [1, 2]},
                            "cave run demo --full")
    assert path == tmp_path / "demo.json"
    record = json.loads(path.read_text())
    assert list(record)[:3] == ["command", "loss", "curve"]
    assert record["command"] == "cave run demo --full"
    assert set(C.environment()) <= set(record)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(ValueError, match="recorder adds"):
        C.record_results("demo", {"torch": "mine"}, "cave")


def test_record_results_with_an_entry_keeps_the_other_entries(
        tmp_path, monkeypatch):
    monkeypatch.setattr(C, "RESULTS_DIR", tmp_path)
    (tmp_path / "llama.json").write_text(json.dumps({"old": {"x": 1}}))
    C.record_results("llama", {"val_loss": 1.5}, "cave train", entry="new")
    C.record_results("llama", {"val_loss": 1.4}, "cave train", entry="new")
    results = json.loads((tmp_path / "llama.json").read_text())
    assert results["old"] == {"x": 1}
    assert results["new"]["val_loss"] == 1.4
    assert results["new"]["command"] == "cave train"
    other = C.record_results("x", {"a": 1}, "c", path=tmp_path / "t.json")
    assert other == tmp_path / "t.json" and not (tmp_path / "x.json").exists()


def test_recorded_files_keep_their_shape():
    # what the chapters read back: a dict with the recorder's keys on top
    for path in sorted(D.RESULTS_DIR.glob("*.json")):
        record = json.loads(path.read_text())
        assert isinstance(record, dict), path
