# Generated from docs/transformers/llama_training.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § LLaMA training: the complete pipeline (docs/transformers/llama_training.md:34)
"""Training LLaMA on Tiny Shakespeare: the complete pipeline.

The chapter docs/transformers/llama_training.md builds, in order:

    TrainConfig         every training knob with a reason
    lr_at               linear warm-up, then cosine decay
    make_optimizer      AdamW, weight decay on matrices only
    evaluate            the fixed validation protocol
    FORMAT, config_json, read_config, load_model, saved_configs
                        a LLaMA checkpoint: the checkpoints chapter's files
                        with the configs, the tokeniser, the data position
    TrainingRun         a run around its loop: model, optimiser and data,
                        fresh or resumed; validation, a log, checkpoints
    train               the loop: accumulation, clipping, bf16 autocast
    PRESETS, export_model
                        named recipes; the shipped model's files
    matmul_peak, flops_per_token, generation_speed
                        what the benchmark measures

The `cave` command that drives them (train, sample, bench) is
code/cave/cli.py. Nothing here unpickles: weights and optimiser tensors
are safetensors, everything else is JSON.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from cave.fundamentals.checkpoints import (
    CheckpointError, checkpoint_files, checkpoint_folder, load_checkpoint,
    load_safetensors, load_weights, read_json, require_keys,
    restore_checkpoint, safetensors_bytes, save_checkpoint, write_atomic)
from cave.fundamentals.data import (
    RESULTS_DIR, Batches, CharTokenizer, shakespeare_split,
    validation_windows)
from cave.fundamentals.essentials import (eval_mode, pick_device,
                                          seed_everything)
from cave.transformers.llama import Llama, LlamaConfig, generate

__all__ = [
    "TrainConfig", "PRESETS", "lr_at", "make_optimizer", "evaluate",
    "FORMAT", "config_json", "read_config", "load_model", "saved_configs",
    "TrainingRun", "train", "sample_text", "export_model", "matmul_peak",
    "flops_per_token", "generation_speed", "SHIPPED",
]

# The trained model that ships with the package; its run is recorded in
# RESULTS_DIR / "llama_training.json" (read it with load_results).
SHIPPED: Path = RESULTS_DIR / "llama_shakespeare"


# § The configuration (docs/transformers/llama_training.md:113)
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


# § Warm-up and cosine (docs/transformers/llama_training.md:210)
def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimiser step `step` (0-based)."""
    c = config
    if step < c.warmup_steps:  # linear from lr / warmup up to lr
        return c.lr * (step + 1) / c.warmup_steps
    span = max(c.max_steps - c.warmup_steps, 1)
    progress = min((step - c.warmup_steps) / span, 1.0)  # 0 -> 1
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return c.min_lr + cosine * (c.lr - c.min_lr)


# § AdamW, decay on matrices only (docs/transformers/llama_training.md:247)
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


# § Evaluation: a fixed protocol (docs/transformers/llama_training.md:293)
@torch.no_grad()
def evaluate(model: nn.Module, ids: torch.Tensor, block_size: int,
             max_windows: int | None = None, batch_size: int = 64,
             bf16: bool = True) -> float:
    """Mean cross-entropy (nats per character) over validation_windows."""
    windows = validation_windows(ids, block_size, max_windows)  # (N, T + 1)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(windows), batch_size):
            chunk = windows[i:i + batch_size].to(device)  # (b, T + 1)
            x, y = chunk[:, :-1], chunk[:, 1:]  # (b, T), (b, T)
            with torch.autocast(device.type, torch.bfloat16,
                                enabled=bf16):
                _, loss = model(x, targets=y)
            total += loss.item() * y.numel()
            count += y.numel()
    return total / count


# § A LLaMA's checkpoints (docs/transformers/llama_training.md:355)
FORMAT = "cave-llama-checkpoint-1"  # written into every config.json


def config_json(config: TrainConfig, model_config: LlamaConfig,
                tokenizer: CharTokenizer) -> dict:
    """What a LLaMA checkpoint's config.json holds."""
    return {"format": FORMAT, "model": dataclasses.asdict(model_config),
            "train": dataclasses.asdict(config),
            "tokenizer": {"kind": "char", "chars": tokenizer.chars}}


def read_config(folder: Path) -> tuple[dict, LlamaConfig, CharTokenizer]:
    """A checkpoint folder's config.json, checked: (the record, the model's
    configuration, the tokeniser, which must fit the vocabulary)."""
    path = Path(folder) / "config.json"
    config = read_json(path)
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{path}: expected format {FORMAT!r}, found "
                              f"{config.get('format')!r}")
    require_keys(config, ["model", "tokenizer"], path)
    try:
        model_config = LlamaConfig(**config["model"])
        chars = config["tokenizer"]["chars"]
        if not isinstance(chars, str):
            raise TypeError(f"tokenizer chars must be a string, found "
                            f"{type(chars).__name__}")
        tokenizer = CharTokenizer(chars)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad model or tokenizer entry "
                              f"({err})") from None
    if tokenizer.chars != chars or \
            tokenizer.vocab_size != model_config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokeniser does not fit the model: expected "
            f"{model_config.vocab_size} distinct characters in sorted "
            f"order, found {chars[:80]!r} ({len(chars)} characters)")
    return config, model_config, tokenizer


def load_model(path: str | Path = SHIPPED, device: str = "cpu"
               ) -> tuple[Llama, CharTokenizer, dict]:
    """(model in eval mode, tokenizer, config.json) from a checkpoint."""
    folder = checkpoint_folder(path)
    config, model_config, tokenizer = read_config(folder)
    tensors, _ = load_safetensors(folder / "model.safetensors")
    model = Llama(model_config)
    load_weights(model, tensors, folder / "model.safetensors")
    return model.to(pick_device(device)).eval(), tokenizer, config


def saved_configs(path: str | Path) -> tuple[dict, dict]:
    """The TrainConfig and LlamaConfig keywords of a run's latest
    checkpoint, checked."""
    folder = checkpoint_folder(path)
    config, _, _ = read_config(folder)
    require_keys(config, ["train"], folder / "config.json")
    try:
        TrainConfig(**config["train"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'}: bad train entry "
                              f"({err})") from None
    return dict(config["train"]), dict(config["model"])


# § The training loop (docs/transformers/llama_training.md:458)
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


def llama_checkpoint_files(model: Llama, optimizer: torch.optim.Optimizer,
                           batches: Batches, config: TrainConfig,
                           tokenizer: CharTokenizer, progress: dict
                           ) -> dict[str, bytes]:
    """The bytes of every file of a LLaMA checkpoint."""
    state = {**progress, "lr": lr_at(progress["step"], config),
             "data": batches.state_dict()}
    meta = {"format": FORMAT, "step": str(progress["step"])}
    return checkpoint_files(model, optimizer, state,
                            config_json(config, model.config, tokenizer),
                            meta)


def resume_run(ckpt: dict, model: Llama, optimizer: torch.optim.Optimizer,
               batches: Batches, tokenizer: CharTokenizer) -> dict:
    """Restore a load_checkpoint result into model, optimizer, batches
    and the random generators; return {"step", "tokens", "seconds"}."""
    folder = ckpt["folder"]
    _, saved, saved_tokenizer = read_config(folder)
    if saved != model.config:
        raise CheckpointError(f"{folder / 'config.json'}: trained with "
                              f"{saved}, asked to resume {model.config}")
    if saved_tokenizer.chars != tokenizer.chars:
        raise CheckpointError(f"{folder / 'config.json'}: its tokeniser "
                              f"differs from the training data's")
    state_path = folder / "state.json"
    require_keys(ckpt["state"], ["step", "tokens", "seconds", "data"],
                 state_path)
    progress = {k: ckpt["state"][k] for k in ("step", "tokens", "seconds")}
    if not all(type(v) in (int, float) and v >= 0
               for v in progress.values()) or \
            type(progress["step"]) is not int:
        raise CheckpointError(f"{state_path}: expected a step count and "
                              f"numbers >= 0, found {progress}")
    restore_checkpoint(ckpt, model, optimizer)
    try:
        batches.load_state_dict(ckpt["state"]["data"])
    except ValueError as err:
        raise CheckpointError(f"{state_path}: damaged data position "
                              f"({err})") from None
    return progress


def sample_text(model: Llama, tokenizer: CharTokenizer, prompt: str,
                chars: int, seed: int = 0) -> str:
    """A sample drawn with a generator of its own: the global random
    state, and so an exact resume, is untouched. (generate runs in eval
    mode and gives every layer its own mode back.)"""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = tokenizer.encode(prompt)[None].to(device)  # (1, T)
    out = generate(model, idx, chars, generator=generator)  # (1, T + n)
    return tokenizer.decode(out[0])


class TrainingRun:
    """A Llama's training run around its loop: what it trains, and what
    it writes. writes=False keeps it silent: no files, no progress bar."""

    def __init__(self, config: TrainConfig, model_config: LlamaConfig,
                 out_dir: str | Path | None = None, resume: bool = False,
                 stream=None, data=None, writes: bool = True):
        self.wall_start = time.perf_counter()
        self.config, self.resume = config, resume
        self.device = pick_device(config.device)  # ValueError if not there
        if resume and out_dir is None:
            raise ValueError("resume=True needs out_dir, the run's folder")
        ckpt = load_checkpoint(out_dir) if resume else None  # fail early
        data = data or shakespeare_split()
        self.tokenizer, train_ids, self.val_ids = data
        model_config = dataclasses.replace(
            model_config, vocab_size=self.tokenizer.vocab_size)
        if model_config.max_seq_len < config.block_size:
            raise ValueError(f"block_size {config.block_size} exceeds the "
                             f"model's max_seq_len {model_config.max_seq_len}")
        seed_everything(config.seed)  # initial weights, dropout, every RNG
        self.model = Llama(model_config).to(self.device)
        self.optimizer = make_optimizer(self.model, config)
        self.batches = Batches(train_ids, config.batch_size,
                               config.block_size, seed=config.seed)
        self.done = {"step": 0, "tokens": 0, "seconds": 0.0}  # all sessions
        if resume:  # weights, optimiser, data position, every random state
            self.done = resume_run(ckpt, self.model, self.optimizer,
                                   self.batches, self.tokenizer)
        self.out_dir = Path(out_dir) if writes and out_dir is not None \
            else None
        self.log = None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log = open(self.out_dir / "log.jsonl", "a",
                            encoding="utf-8")
        self.history = {"train": [], "val": [], "samples": []}
        self.bar = Progress(config.max_steps, stream if writes else None)
        self.start = time.perf_counter()

    def record(self, **fields) -> dict:
        """One event, appended to log.jsonl (when there is one)."""
        if self.log is not None:
            self.log.write(json.dumps(fields) + "\n")
            self.log.flush()
        return fields

    def begin(self, **fields) -> tuple[int, int]:
        """Log the start (fields join the event); (step, tokens) so far."""
        self.record(event="start", step=self.done["step"],
                    resume=self.resume, device=str(self.device),
                    config=dataclasses.asdict(self.config),
                    model=dataclasses.asdict(self.model.config), **fields)
        self.start = time.perf_counter()
        return self.done["step"], self.done["tokens"]

    def seconds(self) -> float:
        """Seconds of training, over every session of the run."""
        return self.done["seconds"] + time.perf_counter() - self.start

    def after_step(self, step: int, tokens: int, loss: Tensor, lr: float,
                   last: int, sample=None) -> None:
        """Validate, log and checkpoint, each at its interval, after the
        step that reached `step`; loss is that step's mean training loss
        (a 0-d tensor, read only when logged: reading it waits for the
        GPU), last the step this session stops at, sample() a text."""
        c, final = self.config, step == self.config.max_steps
        val = None
        if step % c.eval_interval == 0 or final:
            val = evaluate(self.model, self.val_ids, c.block_size,
                           None if final else c.eval_windows, bf16=c.bf16)
            self.history["val"].append(self.record(
                event="val", step=step, val_loss=val, tokens=tokens,
                windows="all" if final else c.eval_windows))
            if sample is not None:
                self.history["samples"].append(self.record(
                    event="sample", step=step, text=sample()))
        if step % c.log_interval == 0 or val is not None or step == last:
            loss, elapsed = loss.item(), time.perf_counter() - self.start
            tok_s = (tokens - self.done["tokens"]) / max(elapsed, 1e-9)
            self.history["train"].append(self.record(
                event="train", step=step, loss=loss, lr=lr, tokens=tokens,
                seconds=self.seconds(), tok_per_s=tok_s))
            self.bar.update(step, loss, tok_s, val)
        if self.out_dir is not None and (
                step % c.checkpoint_interval == 0 or step == last):
            progress = {"step": step, "tokens": tokens,
                        "seconds": self.seconds()}
            files = llama_checkpoint_files(self.model, self.optimizer,
                                           self.batches, c, self.tokenizer,
                                           progress)
            folder = save_checkpoint(self.out_dir, files, step)
            self.record(event="checkpoint", step=step, path=str(folder))

    def finish(self, step: int, tokens: int, **fields) -> dict:
        """Log the end, close the log; the run's summary (fields join
        it), with its history and the trained model."""
        history = self.history
        summary = {"steps": step, "tokens": tokens,
                   "seconds": self.seconds(),
                   "wall_seconds": time.perf_counter() - self.wall_start,
                   "val_loss": history["val"][-1]["val_loss"]
                   if step == self.config.max_steps and history["val"]
                   else None,
                   "parameters": sum(p.numel()
                                     for p in self.model.parameters()),
                   **fields}
        self.record(event="done", **summary)
        if self.log is not None:
            self.log.close()
        return {**summary, "history": history, "model": self.model}


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
    run = TrainingRun(config, model_config, out_dir, resume, stream, data)
    model, optimizer, batches = run.model, run.optimizer, run.batches
    device = run.device
    last = min(config.max_steps if stop_at is None else stop_at,
               config.max_steps)

    def sample():
        return sample_text(model, run.tokenizer, sample_prompt, sample_chars)

    step, tokens = run.begin()
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
        run.after_step(step, tokens, loss_sum / config.grad_accum, lr, last,
                       sample if sample_chars > 0 else None)
    return run.finish(step, tokens)


# § The command line (docs/transformers/llama_training.md:826)
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


def export_model(model: Llama, tokenizer: CharTokenizer, config: TrainConfig,
                 folder: str | Path, dtype=torch.bfloat16) -> Path:
    """Write model.safetensors (in dtype) and config.json to folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.to(dtype) for k, v in model.state_dict().items()}
    write_atomic(folder / "model.safetensors",
                 safetensors_bytes(weights, {"format": FORMAT}))
    record = config_json(config, model.config, tokenizer)
    write_atomic(folder / "config.json",
                 json.dumps(record, indent=1).encode("utf-8"))
    return folder


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
    """Tokens per second generating `tokens` from one, cache or not."""
    gen = torch.Generator().manual_seed(0)
    prompt = torch.zeros(1, 1, dtype=torch.long)  # (1, 1)
    t0 = time.perf_counter()
    generate(model, prompt, tokens, generator=gen, use_cache=use_cache)
    return tokens / (time.perf_counter() - t0)
