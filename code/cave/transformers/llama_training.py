# Generated from docs/transformers/llama_training.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


"""Training LLaMA on Tiny Shakespeare: the complete pipeline.

The chapter docs/transformers/llama_training.md builds, in order:

    TrainConfig, PRESETS   every training knob with a reason; named recipes
    Batches                random windows of the training text, resumable
    lr_at                  linear warm-up, then cosine decay
    make_optimizer         AdamW, weight decay on matrices only
    evaluate               the fixed validation protocol
    save_safetensors, load_safetensors
                           the safetensors format, written and read by hand
    save_checkpoint, load_checkpoint, load_model
                           atomic checkpoints: weights, optimiser, every
                           random state, the data position, the configs
    train                  the loop: accumulation, clipping, bf16 autocast,
                           validation, checkpoints, exact resume, a log
    main                   the `cave` command line: train, sample, bench

Nothing here unpickles: weights and optimiser tensors are safetensors,
everything else is JSON.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor, nn

import cave
from cave.fundamentals.data import CharTokenizer, shakespeare_split
from cave.transformers.llama import Llama, LlamaConfig, generate

__all__ = [
    "TrainConfig", "PRESETS", "Batches", "lr_at", "make_optimizer",
    "evaluate", "CheckpointError", "save_safetensors", "load_safetensors",
    "save_checkpoint", "load_checkpoint", "load_model", "train", "main",
    "SHIPPED", "RESULTS",
]

# The trained model that ships with the package, and the recorded results.
RESULTS_DIR: Path = Path(cave.__file__).resolve().parent / "_results"
SHIPPED: Path = RESULTS_DIR / "llama_shakespeare"
RESULTS: Path = RESULTS_DIR / "llama_training.json"


@dataclasses.dataclass
class TrainConfig:
    batch_size: int = 64  # windows per micro-batch
    block_size: int = 256  # characters of context per window; the model's
    # max_seq_len must be at least this
    grad_accum: int = 1  # micro-batches per optimiser step: the batch the
    # optimiser sees is batch_size * grad_accum windows
    max_steps: int = 5000  # optimiser steps; the cosine ends here
    lr: float = 1e-3  # peak learning rate: small models take large steps
    min_lr: float = 1e-4  # where the cosine ends, a tenth of the peak
    warmup_steps: int = 100  # linear warm-up: Adam's early estimates of
    # the gradient's scale are poor, so the first steps are kept short
    weight_decay: float = 0.1  # AdamW's decay, on matrices only
    beta1: float = 0.9  # momentum of the gradient's running mean
    beta2: float = 0.99  # 0.99, not 0.999: few steps, so a shorter memory
    grad_clip: float = 1.0  # largest global gradient norm; 0 turns it off
    bf16: bool = True  # autocast matrix products to bfloat16 (CPU and GPU)
    eval_interval: int = 500  # steps between validations
    eval_windows: int = 200  # validation windows at intervals (spread
    # evenly over the set); the final validation uses all of them
    checkpoint_interval: int = 1000  # steps between checkpoints; one is
    # always written at the end
    log_interval: int = 10  # steps between lines of the JSON-lines log
    seed: int = 1337  # initial weights, batches and dropout
    device: str = "cpu"  # "cpu", "cuda", "cuda:1", ...

    def __post_init__(self):
        for name in ("batch_size", "block_size", "grad_accum", "max_steps",
                     "eval_interval", "eval_windows",
                     "checkpoint_interval", "log_interval"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, "
                                 f"got {value!r}")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ValueError(f"warmup_steps must be in 0..max_steps="
                             f"{self.max_steps}, got {self.warmup_steps}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr="
                             f"{self.min_lr} and lr={self.lr}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"weight_decay and grad_clip must be >= 0, got "
                             f"{self.weight_decay} and {self.grad_clip}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size * self.grad_accum


class Batches:
    """Random windows of `ids`: x (B, T) and its targets y, shifted by one.

    The windows come from a generator of their own, seeded once; its state
    and the count of batches drawn are the data position a checkpoint keeps.
    """

    def __init__(self, ids: Tensor, batch_size: int, block_size: int,
                 seed: int = 0):
        if ids.ndim != 1 or ids.is_floating_point():
            raise ValueError(f"expected a 1-D integer tensor of ids, got "
                             f"{ids.dtype} {tuple(ids.shape)}")
        if len(ids) < block_size + 1:
            raise ValueError(f"expected at least block_size + 1 = "
                             f"{block_size + 1} ids, got {len(ids)}")
        self.ids, self.B, self.T = ids, batch_size, block_size
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0  # batches handed out so far

    def next(self) -> tuple[Tensor, Tensor]:
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
        raw = base64.b64decode(state["generator"])
        self.generator.set_state(
            torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        self.drawn = int(state["drawn"])


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimiser step `step` (0-based)."""
    c = config
    if step < c.warmup_steps:  # linear from lr / warmup up to lr
        return c.lr * (step + 1) / c.warmup_steps
    span = max(c.max_steps - c.warmup_steps, 1)
    progress = min((step - c.warmup_steps) / span, 1.0)  # 0 -> 1
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return c.min_lr + cosine * (c.lr - c.min_lr)


def make_optimizer(model: nn.Module, config: TrainConfig
                   ) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (ndim >= 2), none on norm gains."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr,
                             betas=(config.beta1, config.beta2))


def validation_windows(ids: Tensor, block_size: int,
                       max_windows: int | None = None) -> Tensor:
    """The fixed validation windows: (N, block_size + 1) ids.

    The text is cut into consecutive, non-overlapping windows of
    block_size + 1 ids that share their boundary id (window i starts at
    i * block_size), so every id after the first is predicted exactly once;
    the tail too short for a window is dropped. With max_windows, that many
    windows spread evenly over the whole set (always the same ones).
    """
    n = (len(ids) - 1) // block_size  # full windows
    if n < 1:
        raise ValueError(f"validation text of {len(ids)} ids is shorter "
                         f"than one window of {block_size + 1}")
    index = torch.arange(n)  # (N,)
    if max_windows is not None and max_windows < n:
        index = torch.linspace(0, n - 1, max_windows).round().long()
    offsets = index[:, None] * block_size + torch.arange(block_size + 1)
    return ids[offsets]  # (N, block_size + 1)


@torch.no_grad()
def evaluate(model: nn.Module, ids: Tensor, block_size: int,
             max_windows: int | None = None, batch_size: int = 64,
             bf16: bool = True) -> float:
    """Mean cross-entropy (nats per character) over validation_windows."""
    windows = validation_windows(ids, block_size, max_windows)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size].to(device)  # (b, T + 1)
        x, y = chunk[:, :-1], chunk[:, 1:]  # (b, T), (b, T)
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            _, loss = model(x, targets=y)
        total += loss.item() * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / count


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or not what the loader expects."""


# safetensors' dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
MAX_HEADER = 100_000_000  # bytes; the format's own limit on the header


def tensor_bytes(t: Tensor) -> bytes:
    """A tensor's values as raw little-endian bytes, row-major."""
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors is little-endian; this "
                                  "writer assumes a little-endian machine")
    flat = t.detach().cpu().reshape(-1).clone()  # (numel,), its own memory
    return ctypes.string_at(flat.data_ptr(), flat.nbytes)  # (1)!


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


def parse_safetensors(raw: bytes, source: str = "<bytes>"
                      ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) from the bytes of a .safetensors file.

    Every field is checked before it is trusted: the header length, the
    JSON, each dtype and shape, and that the offsets tile the data exactly.
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
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise bad(f"header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise bad(f"header is a {type(header).__name__}, expected an "
                  f"object")
    metadata = header.pop("__metadata__", None) or {}
    data = memoryview(raw)[8 + n:]
    tensors, spans = {}, []
    for name, entry in header.items():
        try:
            dtype = ST_DTYPES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise bad(f"{name}: expected dtype (one of {sorted(ST_DTYPES)})"
                      f", shape and data_offsets, got {entry!r}") from None
        itemsize = torch.empty((), dtype=dtype).element_size()
        expected = math.prod(shape) * itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end or \
                end - begin != expected:
            raise bad(f"{name}: shape {shape} of {entry['dtype']} needs "
                      f"{expected} bytes, offsets give {end - begin}")
        spans.append((begin, end, name))
        if expected == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        if end > len(data):
            raise bad(f"{name}: data ends at byte {end}, the file holds "
                      f"{len(data)}")
        buffer = bytearray(data[begin:end])  # a writable copy
        tensors[name] = torch.frombuffer(buffer, dtype=torch.uint8) \
            .view(dtype).reshape(shape)
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that a crash leaves either the old file or the new.

    The bytes go to a temporary file in the same folder, reach the disk
    (fsync), and then os.replace swaps the name over in one step.
    """
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


def rng_states() -> dict:
    """Every random state the loop consumes, as JSON-ready values."""
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


def set_rng_states(states: dict) -> None:
    def tensor(s: str) -> Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)),
                                dtype=torch.uint8)

    version, mt, gauss = states["python"]
    random.setstate((version, tuple(mt), gauss))
    if "numpy" in states and "numpy" in sys.modules:
        np = sys.modules["numpy"]
        kind, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos,
                             has_gauss, cached))
    torch.set_rng_state(tensor(states["torch"]))
    if "cuda" in states and torch.cuda.is_available():
        cuda = [tensor(s) for s in states["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


FORMAT = "cave-llama-checkpoint-1"  # written into every config.json


def optimizer_to_files(optimizer: torch.optim.Optimizer
                       ) -> tuple[dict[str, Tensor], list[dict]]:
    """An optimiser's state_dict as (tensors, JSON-ready param_groups)."""
    sd = optimizer.state_dict()
    tensors = {}
    for index, slots in sd["state"].items():
        for key, value in slots.items():
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
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in groups]
    return {"state": state, "param_groups": groups}


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


def checkpoint_folder(path: str | Path) -> Path:
    """The checkpoint a path names: a run folder (its `latest`) or a
    folder that holds model.safetensors and config.json itself."""
    path = Path(path)
    if (path / "latest").is_file():
        name = (path / "latest").read_text(encoding="ascii").strip()
        if not name.startswith("step-") or "/" in name or "\\" in name:
            raise CheckpointError(f"{path / 'latest'}: expected a name "
                                  f"like step-000100, found {name[:40]!r}")
        path = path / name
    for needed in ("model.safetensors", "config.json"):
        if not (path / needed).is_file():
            raise CheckpointError(f"{path}: expected a checkpoint folder "
                                  f"holding {needed}, found none")
    return path


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({err.strerror})") \
            from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def load_model(path: str | Path = SHIPPED, device: str = "cpu"
               ) -> tuple[Llama, CharTokenizer, dict]:
    """(model in eval mode, tokenizer, config.json) from a checkpoint.

    Names, shapes and dtypes are checked before any weight is copied.
    """
    folder = checkpoint_folder(path)
    config = read_json(folder / "config.json")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{folder / 'config.json'}: expected format "
                              f"{FORMAT!r}, found {config.get('format')!r}")
    try:
        model_config = LlamaConfig(**config["model"])
        tokenizer = CharTokenizer(config["tokenizer"]["chars"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: bad model or "
                              f"tokenizer entry ({err})") from None
    tensors, _ = load_safetensors(folder / "model.safetensors")
    model = Llama(model_config)
    expected = {k: v for k, v in model.state_dict().items()}
    if set(tensors) != set(expected):
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        raise CheckpointError(f"{folder / 'model.safetensors'}: tensors do "
                              f"not fit the config: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape or not t.is_floating_point():
            raise CheckpointError(
                f"{folder / 'model.safetensors'}: {name} expected a float "
                f"tensor of shape {tuple(expected[name].shape)}, found "
                f"{t.dtype} {tuple(t.shape)}")
    model.load_state_dict(tensors)  # copies, casting to float32
    return model.to(device).eval(), tokenizer, config


def load_checkpoint(path: str | Path) -> dict:
    """Everything a resume needs: {"folder", "config", "state", "model",
    "optimizer"} (the last two as dicts of tensors)."""
    folder = checkpoint_folder(path)
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise CheckpointError(f"{folder}: expected state.json for a resume,"
                              f" found none (an exported model?)")
    model, _ = load_safetensors(folder / "model.safetensors")
    optimizer, _ = load_safetensors(folder / "optimizer.safetensors")
    return {"folder": folder, "config": read_json(folder / "config.json"),
            "state": read_json(state_path), "model": model,
            "optimizer": optimizer}


class Progress:
    """A one-line progress bar (redrawn in place on a terminal, a line
    at a time elsewhere)."""

    def __init__(self, total: int, stream=None, width: int = 24):
        self.total, self.width = total, width
        self.stream = stream
        self.tty = stream is not None and stream.isatty()

    def update(self, step: int, loss: float, tok_per_s: float,
               val_loss: float | None = None) -> None:
        if self.stream is None:
            return
        done = int(self.width * step / self.total)
        bar = "#" * done + "." * (self.width - done)
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}]"
                f" loss {loss:.4f} | {tok_per_s:,.0f} tok/s")
        if val_loss is not None:
            line += f" | val {val_loss:.4f}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if step == self.total
                                             else ""))
        elif val_loss is not None or step == self.total:
            self.stream.write(line + "\n")
        self.stream.flush()


def config_json(config: TrainConfig, model_config: LlamaConfig,
                tokenizer: CharTokenizer) -> bytes:
    record = {"format": FORMAT, "model": dataclasses.asdict(model_config),
              "train": dataclasses.asdict(config),
              "tokenizer": {"kind": "char", "chars": tokenizer.chars}}
    return json.dumps(record, indent=1).encode("utf-8")


def checkpoint_files(model, optimizer, batches, config, model_config,
                     tokenizer, progress: dict) -> dict[str, bytes]:
    """The bytes of every file of a checkpoint."""
    weights = {k: v for k, v in model.state_dict().items()}
    opt_tensors, groups = optimizer_to_files(optimizer)
    state = {**progress, "lr": lr_at(progress["step"], config),
             "param_groups": groups, "data": batches.state_dict(),
             "rng": rng_states(), "torch": torch.__version__}
    meta = {"format": FORMAT, "step": str(progress["step"])}
    return {"model.safetensors": safetensors_bytes(weights, meta),
            "optimizer.safetensors": safetensors_bytes(opt_tensors, meta),
            "state.json": json.dumps(state).encode("utf-8"),
            "config.json": config_json(config, model_config, tokenizer)}


def sample_text(model: Llama, tokenizer: CharTokenizer, prompt: str,
                chars: int, seed: int = 0) -> str:
    """A sample drawn with a generator of its own: the global random
    state, and so an exact resume, is untouched."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = tokenizer.encode(prompt)[None].to(device)  # (1, T)
    out = generate(model, idx, chars, generator=generator)  # (1, T + n)
    model.train()
    return tokenizer.decode(out[0])


def train(config: TrainConfig, model_config: LlamaConfig,
          out_dir: str | Path | None = None, resume: bool = False,
          stop_at: int | None = None, stream=None, data=None,
          sample_prompt: str = "\n", sample_chars: int = 0) -> dict:
    """Train a Llama on Tiny Shakespeare; return a summary of the run.

    out_dir receives checkpoints and log.jsonl (None: neither). resume
    continues from out_dir's latest checkpoint. stop_at ends the run early
    at that step, as a crash would, after writing a checkpoint. data is
    (tokenizer, train_ids, val_ids), by default the data chapter's split.
    """
    wall_start = time.perf_counter()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} asked for, but CUDA is "
                         f"not available")
    tokenizer, train_ids, val_ids = data or shakespeare_split()
    model_config = dataclasses.replace(model_config,
                                       vocab_size=tokenizer.vocab_size)
    if model_config.max_seq_len < config.block_size:
        raise ValueError(f"block_size {config.block_size} exceeds the "
                         f"model's max_seq_len {model_config.max_seq_len}")
    random.seed(config.seed)  # every generator, even those unused here
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(config.seed % 2**32)
    torch.manual_seed(config.seed)  # initial weights, dropout
    model = Llama(model_config).to(device)
    optimizer = make_optimizer(model, config)
    batches = Batches(train_ids, config.batch_size, config.block_size,
                      seed=config.seed)
    done = {"step": 0, "tokens": 0, "seconds": 0.0}  # over all sessions
    if resume:
        ckpt = load_checkpoint(out_dir)
        saved = LlamaConfig(**ckpt["config"]["model"])
        if saved != model_config:
            raise CheckpointError(f"{ckpt['folder']}: trained with "
                                  f"{saved}, asked to resume {model_config}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(optimizer_from_files(
            ckpt["optimizer"], ckpt["state"]["param_groups"]))
        batches.load_state_dict(ckpt["state"]["data"])
        set_rng_states(ckpt["state"]["rng"])
        done = {k: ckpt["state"][k] for k in done}
    log = None
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        log = open(Path(out_dir) / "log.jsonl", "a", encoding="utf-8")

    def record(**fields):
        if log is not None:
            log.write(json.dumps(fields) + "\n")
            log.flush()
        return fields

    history = {"train": [], "val": [], "samples": []}
    bar = Progress(config.max_steps, stream)
    last = stop_at if stop_at is not None else config.max_steps
    last = min(last, config.max_steps)
    step, tokens = done["step"], done["tokens"]
    start, session_tokens = time.perf_counter(), 0
    record(event="start", step=step, resume=resume, device=str(device),
           config=dataclasses.asdict(config),
           model=dataclasses.asdict(model_config))
    model.train()
    while step < last:
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for _ in range(config.grad_accum):
            x, y = batches.next()  # (B, T), (B, T)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, torch.bfloat16,
                                enabled=config.bf16):
                _, loss = model(x, targets=y)
            (loss / config.grad_accum).backward()
            loss_sum += loss.detach()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens += config.tokens_per_step
        session_tokens += config.tokens_per_step
        final = step == config.max_steps
        val = None
        if step % config.eval_interval == 0 or final:
            val = evaluate(model, val_ids, config.block_size,
                           None if final else config.eval_windows,
                           bf16=config.bf16)
            history["val"].append(record(
                event="val", step=step, val_loss=val, tokens=tokens,
                windows="all" if final else config.eval_windows))
            if sample_chars > 0:
                history["samples"].append(record(
                    event="sample", step=step, text=sample_text(
                        model, tokenizer, sample_prompt, sample_chars)))
        if step % config.log_interval == 0 or val is not None or \
                step == last:
            elapsed = time.perf_counter() - start
            loss_value = loss_sum.item() / config.grad_accum
            tok_s = session_tokens / max(elapsed, 1e-9)
            history["train"].append(record(
                event="train", step=step, loss=loss_value, lr=lr,
                tokens=tokens, seconds=done["seconds"] + elapsed,
                tok_per_s=tok_s))
            bar.update(step, loss_value, tok_s, val)
        if out_dir is not None and (step % config.checkpoint_interval == 0
                                    or step == last):
            progress = {"step": step, "tokens": tokens, "seconds":
                        done["seconds"] + time.perf_counter() - start}
            files = checkpoint_files(model, optimizer, batches, config,
                                     model_config, tokenizer, progress)
            folder = save_checkpoint(out_dir, files, step)
            record(event="checkpoint", step=step, path=str(folder))
    seconds = done["seconds"] + time.perf_counter() - start
    summary = {"steps": step, "tokens": tokens, "seconds": seconds,
               "wall_seconds": time.perf_counter() - wall_start,
               "val_loss": history["val"][-1]["val_loss"]
               if step == config.max_steps and history["val"] else None,
               "parameters": sum(p.numel() for p in model.parameters()),
               "history": history, "model": model}
    record(event="done", **{k: v for k, v in summary.items()
                            if k not in ("history", "model")})
    if log is not None:
        log.close()
    return summary


PRESETS: dict[str, dict[str, dict]] = {
    "tiny": {  # seconds: for tests and the chapter's demonstrations
        "train": dict(batch_size=8, block_size=32, max_steps=40,
                      warmup_steps=5, lr=3e-3, min_lr=3e-4,
                      eval_interval=20, eval_windows=20,
                      checkpoint_interval=20, log_interval=5),
        "model": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      max_seq_len=32)},
    "quick": {  # the CPU recipe: beat nanoGPT's 1.886 in under 35 s
        "train": dict(batch_size=32, block_size=64, max_steps=400,
                      warmup_steps=30, lr=4e-3, min_lr=4e-4,
                      eval_interval=100, eval_windows=100,
                      checkpoint_interval=400, log_interval=10),
        "model": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4,
                      max_seq_len=64)},
    "shakespeare": {  # the shipped model: trained on a GPU in minutes
        "train": dict(batch_size=64, block_size=256, max_steps=1200,
                      warmup_steps=100, lr=1.5e-3, min_lr=1.5e-4,
                      eval_interval=200, eval_windows=200,
                      checkpoint_interval=600, log_interval=10),
        "model": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2,
                      max_seq_len=256, dropout=0.2)},
}


class UsageError(ValueError):
    """A bad command line: reported in one line, exit status 2."""


def parse_value(text: str, kind: str):
    """A command-line string as the type a dataclass field names."""
    if "None" in kind and text.lower() == "none":
        return None
    base = kind.replace("| None", "").strip()
    if base == "bool":
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    return {"int": int, "float": float, "str": str}[base](text)


def apply_overrides(train_kw: dict, model_kw: dict,
                    overrides: list[str]) -> tuple[dict, dict]:
    """key=value strings applied to the train and model keyword dicts."""
    train_kw, model_kw = dict(train_kw), dict(model_kw)
    fields = {f.name: (train_kw, str(f.type))
              for f in dataclasses.fields(TrainConfig)}
    fields.update({f.name: (model_kw, str(f.type))
                   for f in dataclasses.fields(LlamaConfig)
                   if f.name != "vocab_size"})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in fields:
            raise UsageError(f"override {item!r}: expected key=value with "
                             f"key one of {', '.join(sorted(fields))}")
        target, kind = fields[key]
        try:
            target[key] = parse_value(text, kind)
        except (ValueError, KeyError) as err:
            raise UsageError(f"override {item!r}: {err}") from None
    return train_kw, model_kw


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument raises UsageError instead of exiting
    with the usage text, so that main reports it in one line."""

    def error(self, message):
        raise UsageError(message)


def build_parser() -> Parser:
    parser = Parser(prog="cave", description="Train LLaMA on Tiny "
                    "Shakespeare, sample from it, measure its speed.")
    sub = parser.add_subparsers(dest="command", required=True,
                                parser_class=Parser)
    t = sub.add_parser("train", help="train a model (key=value overrides)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="any TrainConfig or LlamaConfig field")
    t.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    t.add_argument("--out", type=Path, default=None,
                   help="folder for checkpoints and log.jsonl")
    t.add_argument("--resume", action="store_true",
                   help="continue from --out's latest checkpoint")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1...")
    t.add_argument("--stop-at", type=int, default=None,
                   help="stop at this step, as an interruption would")
    t.add_argument("--record", default=None, metavar="NAME",
                   help="store the run's results under NAME in "
                        "the results JSON")
    t.add_argument("--export", type=Path, default=None,
                   help="also write the final model (weights in bfloat16)"
                        " and config.json to this folder")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", type=Path, default=SHIPPED)
    s.add_argument("--prompt", default="\n")
    s.add_argument("--tokens", type=int, default=500)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-cache", action="store_true")
    s.add_argument("--device", default="cpu")
    b = sub.add_parser("bench", help="measure speed; record the results")
    b.add_argument("--skip-train", action="store_true",
                   help="only the matrix-product peak and generation")
    b.add_argument("--no-record", action="store_true")
    return parser


def update_results(name: str, value: dict, path: Path = RESULTS) -> None:
    """Store value under name in the results JSON (atomically)."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[name] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(results, indent=1) + "\n").encode())


def environment() -> dict:
    return {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "cpus": os.cpu_count(), "load_average":
            [round(x, 2) for x in os.getloadavg()] if hasattr(
                os, "getloadavg") else None}


def export_model(model: Llama, tokenizer: CharTokenizer, config: TrainConfig,
                 folder: str | Path, dtype=torch.bfloat16) -> Path:
    """Write model.safetensors (in dtype) and config.json to folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(dtype) for k, v in model.state_dict().items()}
    write_atomic(folder / "model.safetensors",
                 safetensors_bytes(weights, {"format": FORMAT}))
    write_atomic(folder / "config.json",
                 config_json(config, model.config, tokenizer))
    return folder


def cmd_train(args, argv: list[str]) -> int:
    preset = PRESETS[args.preset]
    train_kw, model_kw = preset["train"], preset["model"]
    if args.resume:
        if args.out is None:
            raise UsageError("--resume needs --out, the run's folder")
        saved = load_checkpoint(args.out)["config"]  # its configs win
        train_kw, model_kw = saved["train"], saved["model"]
    train_kw, model_kw = apply_overrides(train_kw, model_kw, args.overrides)
    if args.device is not None:
        train_kw["device"] = args.device
    try:
        config = TrainConfig(**train_kw)
        model_config = LlamaConfig(**model_kw)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    summary = train(config, model_config, args.out, resume=args.resume,
                    stop_at=args.stop_at,
                    stream=None if args.quiet else sys.stderr,
                    sample_chars=200 if args.record else 0)
    where = f" | checkpoint {args.out}" if args.out is not None else ""
    val = summary["val_loss"]
    print(f"val_loss {'-' if val is None else f'{val:.4f}'} | tokens "
          f"{summary['tokens']:,} | {summary['seconds']:.1f} s{where}")
    if args.export is not None:
        tokenizer, _, _ = shakespeare_split()
        export_model(summary["model"], tokenizer, config, args.export)
    if args.record:
        keep = {k: v for k, v in summary.items() if k != "model"}
        update_results(args.record, {
            "command": "cave " + " ".join(argv), "preset": args.preset,
            "train": dataclasses.asdict(config),
            "model": dataclasses.asdict(summary["model"].config),
            **keep, **environment()})
    return 0


def cmd_sample(args) -> int:
    if args.tokens < 0:
        raise UsageError(f"--tokens must be >= 0, got {args.tokens}")
    model, tokenizer, _ = load_model(args.checkpoint, args.device)
    prompt = tokenizer.encode(args.prompt or "\n")[None]  # (1, T)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = generate(model, prompt.to(args.device), args.tokens,
                   temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, generator=generator,
                   use_cache=not args.no_cache)  # (1, T + tokens)
    print(tokenizer.decode(out[0]))
    return 0


def matmul_peak(n: int = 2048, seconds: float = 1.0,
                device: str = "cpu") -> float:
    """The best bfloat16 matrix-product rate seen, in FLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best


def flops_per_token(model_config: LlamaConfig, block_size: int) -> float:
    """Training FLOPs per token: 6 per weight of every matrix product but
    the embedding lookup, plus attention's 12 * layers * dim * context
    (the non-causal count, as PaLM's MFU does)."""
    c = model_config
    matmul = sum(p.numel() for n, p in Llama(c).named_parameters()
                 if p.ndim == 2 and not n.startswith("tok_embeddings"))
    return 6 * matmul + 12 * c.n_layers * c.dim * block_size


def generation_speed(model: Llama, tokens: int = 500, use_cache=True
                     ) -> float:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.zeros(1, 1, dtype=torch.long)  # (1, 1)
    t0 = time.perf_counter()
    generate(model, prompt, tokens, generator=gen, use_cache=use_cache)
    return tokens / (time.perf_counter() - t0)


def cmd_bench(args, argv: list[str]) -> int:
    result = {"command": "cave " + " ".join(argv), **environment()}
    peak = matmul_peak()
    result["bf16_matmul_peak_tflops"] = peak / 1e12
    print(f"bf16 matrix-product peak: {peak / 1e12:.2f} TFLOP/s")
    if not args.skip_train:
        p = PRESETS["quick"]
        config, mc = TrainConfig(**p["train"]), LlamaConfig(**p["model"])
        s = train(config, mc, stream=sys.stderr)
        tok_s = s["tokens"] / s["seconds"]
        fpt = flops_per_token(s["model"].config, config.block_size)
        result["quick"] = {
            "val_loss": s["val_loss"], "seconds": s["seconds"],
            "wall_seconds": s["wall_seconds"], "tokens": s["tokens"],
            "tokens_per_second": tok_s, "flops_per_token": fpt,
            "fraction_of_peak": tok_s * fpt / peak,
            "parameters": s["parameters"]}
        print(f"quick preset: val_loss {s['val_loss']:.4f} in "
              f"{s['wall_seconds']:.1f} s, {tok_s:,.0f} tok/s, "
              f"{tok_s * fpt / peak:.1%} of the peak")
    model, _, _ = load_model(SHIPPED)
    speeds = {"cache": generation_speed(model, 500, True),
              "no_cache": generation_speed(model, 500, False)}
    result["generation_tokens_per_second"] = speeds
    print(f"generation, 500 tokens: {speeds['cache']:.0f} tok/s with the "
          f"KV cache, {speeds['no_cache']:.0f} without")
    if not args.no_record:
        update_results("bench", result)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `cave` command: train, sample, bench. Returns the exit status:
    0 done, 1 a missing or damaged checkpoint, 2 a bad command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        if args.command == "train":
            return cmd_train(args, argv)
        if args.command == "sample":
            return cmd_sample(args)
        return cmd_bench(args, argv)
    except SystemExit as exit:  # --help
        return exit.code if isinstance(exit.code, int) else 0
    except UsageError as err:
        print(f"cave: error: {err}", file=sys.stderr)
        return 2
    except CheckpointError as err:
        print(f"cave: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as err:  # e.g. a prompt's characters
        print(f"cave: error: {err}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cave: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
