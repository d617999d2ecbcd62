# Generated from docs/fundamentals/checkpoints.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Saving and resuming (docs/fundamentals/checkpoints.md:31)
"""Saving and resuming: checkpoints for any model, and run records.

The chapter docs/fundamentals/checkpoints.md builds, in order:

    parse_safetensors, safetensors_bytes, load_safetensors,
    save_safetensors    the safetensors format, written and read by hand
    write_atomic        a file appears whole or not at all
    save_checkpoint     step folders and an atomic `latest` pointer
    rng_states, set_rng_states
                        every random state, as JSON
    optimizer_to_files, optimizer_from_files
                        an optimiser's state as tensors and JSON
    checkpoint_files, load_checkpoint, restore_checkpoint
                        (model, optimiser, state, config) <-> files
    environment, record_results
                        what a full run measured, and on what machine

Nothing here unpickles: tensors are safetensors, everything else is JSON.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from cave.fundamentals.data import RESULTS_DIR

__all__ = [
    "CheckpointError", "ST_DTYPES", "safetensors_bytes", "parse_safetensors",
    "load_safetensors", "save_safetensors", "write_atomic", "fsync_dir",
    "save_checkpoint", "rng_states", "set_rng_states", "optimizer_to_files",
    "optimizer_from_files", "checkpoint_files", "checkpoint_folder",
    "read_json", "require_keys", "load_checkpoint", "load_weights",
    "restore_checkpoint", "environment", "record_results",
]


# § Safetensors, by hand (docs/fundamentals/checkpoints.md:118)
class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or not what the loader expects.

    Every message names the file, what was expected and what was found.
    """


# safetensors' dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32,
    "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100_000_000  # bytes; the format's own limit on the header
MAX_DIMS = 64  # dimensions of one tensor: far beyond any model's, and a
# bound keeps a hostile header from asking for absurd shapes


def tensor_bytes(t: Tensor) -> bytes:
    """A tensor's values as raw little-endian bytes, row-major."""
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors is little-endian; this "
                                  "writer assumes a little-endian machine")
    flat = t.detach().cpu().reshape(-1).clone()  # (numel,), its own memory
    return ctypes.string_at(flat.data_ptr(), flat.nbytes)


def safetensors_bytes(tensors: dict[str, Tensor],
                      metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of a .safetensors file holding `tensors`."""
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in ST_NAMES:
            raise ValueError(f"{name}: dtype {t.dtype} has no safetensors "
                             f"name, expected one of {sorted(ST_DTYPES)}")
        data = tensor_bytes(t)
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    if metadata:
        header["__metadata__"] = {str(k): str(v)
                                  for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so the data starts aligned
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


# § Reading a file you did not write (docs/fundamentals/checkpoints.md:201)
def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json's object_pairs_hook: a dict, refusing a repeated key."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice")
        seen.add(key)
    return dict(pairs)


def _refuse_constant(name: str):
    """json's parse_constant: NaN and Infinity are not JSON numbers."""
    raise ValueError(f"{name} is not a JSON number")


def _is_size(x) -> bool:
    """An int (bool excluded) that fits a 64-bit signed size."""
    return type(x) is int and 0 <= x < 2**63


def parse_safetensors(raw: bytes, source: str = "<bytes>"
                      ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) from the bytes of a .safetensors file.

    Every field is checked, type first, before it is trusted; anything
    malformed raises CheckpointError naming `source`.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: not a valid safetensors file: "
                               f"{why}")

    if len(raw) < 8:
        raise bad(f"expected an 8-byte header length, found {len(raw)} "
                  f"bytes")
    n = int.from_bytes(raw[:8], "little")
    if n > min(MAX_HEADER, len(raw) - 8):
        raise bad(f"header length {n} exceeds the {len(raw) - 8} bytes "
                  f"that follow")
    try:
        header = json.loads(bytes(raw[8:8 + n]).decode("utf-8"),
                            object_pairs_hook=_unique_keys,
                            parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise bad(f"header is not JSON ({str(err)[:80]})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a {type(header).__name__}, expected an "
                  f"object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(v, str) for v in metadata.values()):
        raise bad(f"__metadata__ must map strings to strings, found "
                  f"{str(metadata)[:80]}")
    data = memoryview(raw)[8 + n:]
    tensors, spans = {}, []
    for name, entry in header.items():
        if not name:
            raise bad("a tensor with an empty name")
        if not isinstance(entry, dict) or \
                set(entry) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"{name}: expected exactly dtype, shape and "
                      f"data_offsets, found {str(entry)[:80]}")
        dtype, shape, offsets = (entry["dtype"], entry["shape"],
                                 entry["data_offsets"])
        if not isinstance(dtype, str) or dtype not in ST_DTYPES:
            raise bad(f"{name}: dtype {str(dtype)[:20]!r} is not one of "
                      f"{sorted(ST_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or \
                not all(_is_size(s) for s in shape):
            raise bad(f"{name}: shape must be a list of at most {MAX_DIMS}"
                      f" sizes (ints >= 0), found {str(shape)[:80]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or \
                not all(_is_size(o) for o in offsets):
            raise bad(f"{name}: data_offsets must be two ints >= 0, found "
                      f"{str(offsets)[:80]}")
        begin, end = offsets
        itemsize = torch.empty((), dtype=ST_DTYPES[dtype]).element_size()
        expected = math.prod(shape) * itemsize
        if end > len(data):
            raise bad(f"{name}: data ends at byte {end}, the file holds "
                      f"{len(data)}")
        if begin > end or end - begin != expected:
            raise bad(f"{name}: shape {shape} of {dtype} needs {expected} "
                      f"bytes, data_offsets [{begin}, {end}] give "
                      f"{end - begin}")
        spans.append((begin, end, name))
        if expected == 0:
            try:
                tensors[name] = torch.empty(shape, dtype=ST_DTYPES[dtype])
            except RuntimeError as err:  # e.g. a stride overflow
                raise bad(f"{name}: shape {shape}: {err}") from None
            continue
        buffer = bytearray(data[begin:end])  # a writable copy
        tensors[name] = torch.frombuffer(buffer, dtype=torch.uint8) \
            .view(ST_DTYPES[dtype]).reshape(shape)
    position = 0  # the spans must tile the data: no gap, no overlap
    for begin, end, name in sorted(spans):
        if begin != position:
            raise bad(f"{name}: data starts at byte {begin}, expected "
                      f"{position} (a gap or an overlap)")
        position = end
    if position != len(data):
        raise bad(f"{len(data) - position} bytes after the last tensor")
    return tensors, dict(metadata)


def load_safetensors(path: str | Path
                     ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) from a .safetensors file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") \
            from None
    return parse_safetensors(raw, str(path))


def save_safetensors(path: str | Path, tensors: dict[str, Tensor],
                     metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a .safetensors file, atomically."""
    write_atomic(Path(path), safetensors_bytes(tensors, metadata))


# § Writing atomically (docs/fundamentals/checkpoints.md:391)
def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new.

    The bytes go to a temporary file in the same folder, reach the disk
    (fsync), and then os.replace swaps the name over in one step.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (new names, renames) durable."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# § A checkpoint is a folder (docs/fundamentals/checkpoints.md:449)
def save_checkpoint(out_dir: str | Path, files: dict[str, bytes],
                    step: int, keep: int = 1) -> Path:
    """Write a checkpoint's files as out_dir/step-NNNNNN and point
    out_dir/latest at it; a crash at any moment leaves `latest` naming a
    complete checkpoint. The `keep` newest checkpoints are kept."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}."))
    try:
        for filename, data in files.items():  # 1. every file, synced
            with open(tmp / filename, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(tmp)
        final = out_dir / name
        if final.exists():  # an older run's step: set it aside first
            shutil.rmtree(final)
        os.replace(tmp, final)  # 2. the folder appears whole, or not
        fsync_dir(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(out_dir / "latest", name.encode("ascii"))  # 3. the switch
    steps = sorted(p for p in out_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:  # 4. tidy up
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


# § Every random state (docs/fundamentals/checkpoints.md:499)
def rng_states() -> dict:
    """Every global random state, as JSON-ready values."""
    def b64(t: Tensor) -> str:  # a uint8 tensor as base64 text
        return base64.b64encode(bytes(t.tolist())).decode("ascii")

    version, mt, gauss = random.getstate()
    states = {"python": [version, list(mt), gauss],
              "torch": b64(torch.get_rng_state())}
    if "numpy" in sys.modules:  # only if something imported it
        np = sys.modules["numpy"]
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        states["numpy"] = [kind, keys.tolist(), pos, has_gauss, cached]
    if torch.cuda.is_available():
        states["cuda"] = [b64(s) for s in torch.cuda.get_rng_state_all()]
    return states


def set_rng_states(states: dict, source: str = "<rng states>") -> None:
    """Restore what rng_states returned; CheckpointError naming `source`
    if anything is damaged, and then no generator is touched."""
    def tensor(s: str) -> Tensor:
        raw = base64.b64decode(s.encode("ascii"), validate=True)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8)

    try:
        version, mt, gauss = states["python"]
        python = (version, tuple(mt), gauss)
        random.Random().setstate(python)  # a trial on a spare generator
        cpu = tensor(states["torch"])
        if cpu.numel() != torch.get_rng_state().numel():
            raise ValueError(f"the torch state has {cpu.numel()} bytes, "
                             f"expected {torch.get_rng_state().numel()}")
        cuda = [tensor(s) for s in states.get("cuda", [])]
        np_state = None
        if "numpy" in states and "numpy" in sys.modules:
            np = sys.modules["numpy"]
            kind, keys, pos, has_gauss, cached = states["numpy"]
            np_state = (kind, np.array(keys, dtype=np.uint32), pos,
                        has_gauss, cached)
            np.random.RandomState().set_state(np_state)  # a trial
    except (LookupError, TypeError, ValueError, OverflowError,
            AttributeError, binascii.Error) as err:
        raise CheckpointError(f"{source}: damaged random states, expected "
                              f"what rng_states() writes ({err})") from None
    random.setstate(python)
    torch.set_rng_state(cpu)
    if np_state is not None:
        sys.modules["numpy"].random.set_state(np_state)
    if cuda and torch.cuda.is_available() and \
            len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# § The optimiser's state (docs/fundamentals/checkpoints.md:578)
def optimizer_to_files(optimizer: torch.optim.Optimizer
                       ) -> tuple[dict[str, Tensor], list[dict]]:
    """An optimiser's state_dict as (tensors, JSON-ready param_groups)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, slots in sd["state"].items():
        for key, value in slots.items():
            if value is None:
                continue
            if not isinstance(value, Tensor):
                raise TypeError(f"optimiser state {index}.{key} is a "
                                f"{type(value).__name__}, expected a tensor")
            tensors[f"state.{index}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v
               for k, v in group.items()} for group in sd["param_groups"]]
    return tensors, groups


def optimizer_from_files(tensors: dict[str, Tensor], groups: list[dict]
                         ) -> dict:
    """The inverse: a state_dict that optimizer.load_state_dict accepts."""
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        head, index, key = name.split(".", 2)
        if head != "state":
            raise ValueError(f"tensor {name!r}: expected state.N.slot")
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in groups]
    return {"state": state, "param_groups": groups}


# § Saving and loading a checkpoint (docs/fundamentals/checkpoints.md:624)
def checkpoint_files(model: nn.Module,
                     optimizer: torch.optim.Optimizer | None,
                     state: dict, config: dict,
                     metadata: dict[str, str] | None = None
                     ) -> dict[str, bytes]:
    """The bytes of every file of a checkpoint, ready for save_checkpoint.

    state and config must be JSON-able; state gains "param_groups" (with an
    optimiser), "rng" (every random state, taken now) and "torch".
    """
    state = dict(state)
    files = {"model.safetensors": safetensors_bytes(
        dict(model.state_dict()), metadata)}
    if optimizer is not None:
        tensors, state["param_groups"] = optimizer_to_files(optimizer)
        files["optimizer.safetensors"] = safetensors_bytes(tensors,
                                                           metadata)
    state["rng"] = rng_states()
    state["torch"] = torch.__version__
    files["state.json"] = json.dumps(state).encode("utf-8")
    files["config.json"] = json.dumps(config, indent=1).encode("utf-8")
    return files


STEP_NAME = re.compile(r"step-\d{6,}")  # what save_checkpoint writes


def checkpoint_folder(path: str | Path,
                      needs: tuple[str, ...] = ("model.safetensors",
                                                "config.json")) -> Path:
    """The checkpoint a path names: a run folder (its `latest`) or a
    folder that holds the files in `needs` itself."""
    path = Path(path)
    if (path / "latest").is_file():
        raw = (path / "latest").read_bytes()
        try:
            name = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            name = None
        if name is None or not STEP_NAME.fullmatch(name):
            raise CheckpointError(f"{path / 'latest'}: expected a name "
                                  f"like step-000100, found {raw[:40]!r}")
        path = path / name
    for needed in needs:
        if not (path / needed).is_file():
            raise CheckpointError(f"{path}: expected a checkpoint folder "
                                  f"holding {needed}, found none")
    return path


def read_json(path: Path) -> dict:
    """A JSON object from a file; CheckpointError naming it otherwise."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") \
            from None
    except (UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a "
                              f"{type(value).__name__}")
    return value


def require_keys(record: dict, keys, source: str | Path) -> None:
    """CheckpointError naming `source` unless `record` has every key."""
    missing = [k for k in keys if k not in record]
    if missing:
        raise CheckpointError(f"{source}: expected the keys "
                              f"{', '.join(map(str, keys))}; missing "
                              f"{', '.join(map(str, missing))}")


def load_checkpoint(path: str | Path) -> dict:
    """Everything a resume needs: {"folder", "config", "state", "model",
    "optimizer"} (the last two as dicts of tensors; no optimiser file
    gives an empty dict)."""
    folder = checkpoint_folder(path)
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"{folder}: expected state.json for a resume,"
                              f" found none (an exported model?)")
    state = read_json(state_path)
    has_optimizer = (folder / "optimizer.safetensors").is_file()
    require_keys(state, ["rng"] + ["param_groups"] * has_optimizer,
                 state_path)
    model, _ = load_safetensors(folder / "model.safetensors")
    optimizer = load_safetensors(folder / "optimizer.safetensors")[0] \
        if has_optimizer else {}
    return {"folder": folder, "config": read_json(folder / "config.json"),
            "state": state, "model": model, "optimizer": optimizer}


def load_weights(model: nn.Module, tensors: dict[str, Tensor],
                 source: str | Path) -> None:
    """Copy tensors into model after checking names, shapes and kinds."""
    expected = model.state_dict()
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise CheckpointError(f"{source}: tensors do not fit the model: "
                              f"missing {missing[:3]}, unexpected "
                              f"{extra[:3]}")
    for name, t in tensors.items():
        want = expected[name]
        if t.shape != want.shape or \
                t.is_floating_point() != want.is_floating_point():
            kind = "a float" if want.is_floating_point() else "an integer"
            raise CheckpointError(
                f"{source}: {name} expected {kind} tensor of shape "
                f"{tuple(want.shape)}, found {t.dtype} {tuple(t.shape)}")
    model.load_state_dict(tensors)  # copies, casting to the model's dtype


def restore_checkpoint(checkpoint: dict, model: nn.Module,
                       optimizer: torch.optim.Optimizer | None = None
                       ) -> dict:
    """Put a load_checkpoint result into model, optimizer and the global
    random generators; return the saved state."""
    folder = checkpoint["folder"]
    load_weights(model, checkpoint["model"], folder / "model.safetensors")
    state = checkpoint["state"]
    if optimizer is not None:
        try:
            optimizer.load_state_dict(optimizer_from_files(
                checkpoint["optimizer"], state["param_groups"]))
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(
                f"{folder / 'optimizer.safetensors'}: does not fit the "
                f"optimiser ({type(err).__name__}: {err})") from None
    set_rng_states(state["rng"], str(folder / "state.json"))
    return state


# § Recording a full run (docs/fundamentals/checkpoints.md:888)
def environment() -> dict:
    """The machine a measurement was made on, as JSON-ready values."""
    load = [round(x, 2) for x in os.getloadavg()] \
        if hasattr(os, "getloadavg") else None
    return {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average": load}


RECORDER_KEYS = ("command", "torch", "date", "cpus", "threads",
                 "cpu_capability", "load_average")  # added, never given


def record_results(name: str, record: dict, command: str,
                   entry: str | None = None,
                   path: str | Path | None = None) -> Path:
    """Write RESULTS_DIR/name.json (or `path`) atomically: the record with
    "command" and the environment merged in at the top level.

    With `entry`, the file is a dict of records and this one is stored
    under that key, the others kept.
    """
    clash = sorted(set(record) & set(RECORDER_KEYS))
    if clash:
        raise ValueError(f"the record already has {clash}: the recorder "
                         f"adds {', '.join(RECORDER_KEYS)} itself")
    path = Path(path) if path is not None else RESULTS_DIR / f"{name}.json"
    full = {"command": command, **record, **environment()}
    if entry is not None:
        results = read_json(path) if path.is_file() else {}
        results[entry] = full
        full = results
    text = json.dumps(full, indent=1) + "\n"  # TypeError if not JSON-able
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode("utf-8"))
    return path


def override_configs(configs: dict[str, object], overrides: dict) -> list:
    """Copies of dataclass configs with `overrides` applied, checked.

    configs maps a prefix to a config: with {"char": CharTrainConfig()},
    char_steps=300 sets its steps; the prefix "" takes the fields' own
    names. A key that names no field raises ValueError listing them all;
    a value of another type than the field's default raises TypeError (an
    int will do for a float).
    """
    fields = {(f"{prefix}_{f.name}" if prefix else f.name): (prefix, f.name)
              for prefix, c in configs.items()
              for f in dataclasses.fields(c)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}: expected some of "
                         f"{sorted(fields)}")
    changes: dict[str, dict] = {prefix: {} for prefix in configs}
    for key, value in overrides.items():
        prefix, name = fields[key]
        default = getattr(configs[prefix], name)
        wanted = (int, float) if type(default) is float else type(default)
        if default is not None and (not isinstance(value, wanted) or
                                    isinstance(value, bool) !=
                                    isinstance(default, bool)):
            raise TypeError(f"override {key}={value!r}: expected a "
                            f"{type(default).__name__} like {default!r}, "
                            f"got a {type(value).__name__}")
        changes[prefix][name] = value
    return [dataclasses.replace(c, **changes[prefix])
            for prefix, c in configs.items()]


def override_config(config, overrides: dict):
    """One dataclass config with `overrides` applied, checked."""
    return override_configs({"": config}, overrides)[0]
