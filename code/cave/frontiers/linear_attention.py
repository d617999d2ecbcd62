# Generated from docs/frontiers/linear_attention.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Linear attention (docs/frontiers/linear_attention.md:32)
"""Linear attention: softmax's kernel replaced by a dot product of
features, so that attention can be summed in any order: a quadratic form,
a parallel form with cumulative sums, a recurrent form with a state of
constant size, and chunks between them; a LLaMA built on it.

The chapter docs/frontiers/linear_attention.md builds, in order:

    softmax_kernel, kernel_attention
                        attention with any kernel, written quadratically;
                        with exp(q.k / sqrt(d)) it is softmax attention
    elu_features, relu_features, RandomFeatures
                        feature maps: elu + 1, ReLU, and Performer's
                        positive random features for the softmax kernel
    linear_attention    the non-causal form by associativity
    causal_quadratic, causal_parallel, causal_recurrent, causal_chunked
                        the causal forms, equal to each other
    LinearAttention, LinearCache, LinearLlama
                        the LLaMA chapter's model with linear attention,
                        its state as the generation cache
    train_lm            the LLaMA training pipeline for any language
                        model, with validation along the way, an
                        auxiliary loss and a logging hook
    full_run            the two LLaMAs trained alike, and the speed of
                        each form; `cave run linear_attention --full`
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cave.fundamentals.checkpoints import override_configs
from cave.fundamentals.data import Batches, shakespeare_split
from cave.fundamentals.essentials import pick_device, seed_everything
from cave.frontiers.flash_attention import peak_memory
from cave.transformers.llama import (Attention, Llama, LlamaConfig,
                                     apply_rope, at_least_float32, repeat_kv)
from cave.transformers.llama_training import (TrainConfig, evaluate,
                                              generation_speed, lr_at,
                                              make_optimizer)

__all__ = [
    "softmax_kernel", "kernel_attention", "elu_features", "relu_features",
    "RandomFeatures", "linear_attention", "causal_quadratic",
    "causal_parallel", "causal_recurrent", "causal_chunked",
    "LinearAttention", "LinearCache", "LinearLlama", "train_lm",
    "FULL_RUN_PARTS", "full_run",
]


# § Attention as a kernel (docs/frontiers/linear_attention.md:118)
def softmax_kernel(q: Tensor, k: Tensor) -> Tensor:
    """exp(q k^T / sqrt(d)): q (..., L, d), k (..., S, d) -> (..., L, S)."""
    return torch.exp(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))


def kernel_attention(q: Tensor, k: Tensor, v: Tensor, kernel,
                     causal: bool = False) -> Tensor:
    """sum_j K(q_i, k_j) v_j / sum_j K(q_i, k_j), over j <= i if causal.

    q (..., L, d), k (..., S, d), v (..., S, dv) -> (..., L, dv). kernel
    maps (q, k) to non-negative similarities (..., L, S).
    """
    a = kernel(q, k)  # (..., L, S)
    if causal:
        L, S = a.shape[-2:]
        a = a * torch.ones(L, S, dtype=a.dtype, device=a.device).tril()
    return (a @ v) / a.sum(dim=-1, keepdim=True)  # (..., L, dv)


# § Feature maps (docs/frontiers/linear_attention.md:179)
def elu_features(x: Tensor) -> Tensor:
    """elu(x) + 1: positive everywhere (Katharopoulos et al., 2020)."""
    return F.elu(x) + 1


def relu_features(x: Tensor) -> Tensor:
    """max(x, 0): cheap, but a query with no positive feature sees
    nothing (the forms below add eps to the denominator)."""
    return F.relu(x)


class RandomFeatures(nn.Module):
    """Performer's positive random features (Choromanski et al., 2021):

        phi(x) = exp(w_r . x - |x|^2 / 2) / sqrt(m),  r = 1..m,

    with w_r ~ N(0, I_d), so that E[phi(q) . phi(k)] = exp(q . k). For
    softmax attention feed q and k scaled by d ** -0.25 each.
    orthogonal=True draws the w_r in orthogonal blocks (lower variance).
    """

    def __init__(self, dim: int, n_features: int, orthogonal: bool = True,
                 seed: int = 0):
        super().__init__()
        if dim < 1 or n_features < 1:
            raise ValueError(f"expected dim >= 1 and n_features >= 1, got "
                             f"{dim} and {n_features}")
        g = torch.Generator().manual_seed(seed)
        if orthogonal:  # blocks of d orthonormal rows, gaussian lengths
            blocks = []
            for _ in range(math.ceil(n_features / dim)):
                qr, r = torch.linalg.qr(torch.randn(dim, dim, generator=g))
                qr = qr * torch.sign(torch.diagonal(r))  # uniform: without
                # this sign, LAPACK's convention fixes the sign of a row
                blocks.append(qr.T)  # (d, d), orthonormal rows
            w = torch.cat(blocks)[:n_features]  # (m, d)
            lengths = torch.randn(n_features, dim, generator=g).norm(dim=1)
            w = w * lengths[:, None]  # each row as long as a gaussian's
        else:
            w = torch.randn(n_features, dim, generator=g)  # (m, d)
        self.register_buffer("w", w)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., d) -> features (..., m), positive."""
        w = self.w.to(x.dtype)
        proj = x @ w.T  # (..., m)
        norm = x.pow(2).sum(dim=-1, keepdim=True) / 2  # (..., 1)
        return torch.exp(proj - norm) / math.sqrt(w.shape[0])


# § Regrouping the sums (docs/frontiers/linear_attention.md:329)
def _check_features(fq: Tensor, fk: Tensor, v: Tensor) -> None:
    if fq.shape[:-2] != fk.shape[:-2] or fk.shape[:-1] != v.shape[:-1] \
            or fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"expected features phi(q) (..., L, D), phi(k) "
                         f"(..., S, D) and v (..., S, dv), got "
                         f"{tuple(fq.shape)}, {tuple(fk.shape)}, "
                         f"{tuple(v.shape)}")


def _state_or_zeros(fk: Tensor, v: Tensor,
                    state: tuple[Tensor, Tensor] | None
                    ) -> tuple[Tensor, Tensor]:
    """The (S, z) to start from: the one given, or the empty sums."""
    if state is not None:
        return state
    D, dv = fk.shape[-1], v.shape[-1]
    return (fk.new_zeros(*fk.shape[:-2], D, dv),  # S (..., D, dv)
            fk.new_zeros(*fk.shape[:-2], D))  # z (..., D)


def linear_attention(fq: Tensor, fk: Tensor, v: Tensor, eps: float = 1e-6
                     ) -> Tensor:
    """Non-causal: phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1).

    fq (..., L, D), fk (..., S, D), v (..., S, dv) -> (..., L, dv): the
    (D, dv) summary replaces the (L, S) matrix.
    """
    _check_features(fq, fk, v)
    kv = fk.transpose(-1, -2) @ v  # (..., D, dv)
    z = fk.sum(dim=-2)  # (..., D)
    return (fq @ kv) / ((fq @ z[..., None]) + eps)  # (..., L, dv)


def causal_quadratic(fq: Tensor, fk: Tensor, v: Tensor, eps: float = 1e-6
                     ) -> Tensor:
    """The masked quadratic form: (phi(Q) phi(K)^T * M) V / row sums."""
    _check_features(fq, fk, v)
    a = fq @ fk.transpose(-1, -2)  # (..., T, T)
    T = a.shape[-1]
    a = a * torch.ones(T, T, dtype=a.dtype, device=a.device).tril()
    return (a @ v) / (a.sum(dim=-1, keepdim=True) + eps)  # (..., T, dv)


def causal_parallel(fq: Tensor, fk: Tensor, v: Tensor, eps: float = 1e-6
                    ) -> Tensor:
    """The parallel form: cumulative sums of phi(k_j) v_j^T and phi(k_j).

    S_i = sum_{j<=i} phi(k_j) v_j^T (..., T, D, dv), z_i likewise (..., T,
    D); out_i = phi(q_i) S_i / phi(q_i) z_i. Memory T * D * dv.
    """
    _check_features(fq, fk, v)
    states = torch.cumsum(fk[..., :, None] * v[..., None, :], dim=-3)
    # states (..., T, D, dv)
    z = torch.cumsum(fk, dim=-2)  # (..., T, D)
    num = (fq[..., None, :] @ states)[..., 0, :]  # (..., T, dv)
    den = (fq * z).sum(dim=-1, keepdim=True)  # (..., T, 1)
    return num / (den + eps)


def causal_recurrent(fq: Tensor, fk: Tensor, v: Tensor, eps: float = 1e-6,
                     state: tuple[Tensor, Tensor] | None = None,
                     keep_states: bool = False):
    """The recurrent form: one token at a time, a state of constant size.

        S <- S + phi(k_t) v_t^T,  z <- z + phi(k_t),
        out_t = phi(q_t) S / (phi(q_t) z)

    Returns (out (..., T, dv), (S (..., D, dv), z (..., D))), and with
    keep_states the list of every (S, z) after each token as well.
    """
    _check_features(fq, fk, v)
    S, z = _state_or_zeros(fk, v, state)  # (..., D, dv), (..., D)
    outs, kept = [], []
    for t in range(fq.shape[-2]):
        S = S + fk[..., t, :, None] * v[..., t, None, :]  # (..., D, dv)
        z = z + fk[..., t, :]  # (..., D)
        q_t = fq[..., t, :]  # (..., D)
        num = (q_t[..., None, :] @ S)[..., 0, :]  # (..., dv)
        outs.append(num / ((q_t * z).sum(-1, keepdim=True) + eps))
        if keep_states:
            kept.append((S, z))
    out = torch.stack(outs, dim=-2)  # (..., T, dv)
    return (out, (S, z), kept) if keep_states else (out, (S, z))


def causal_chunked(fq: Tensor, fk: Tensor, v: Tensor, chunk: int = 64,
                   eps: float = 1e-6,
                   state: tuple[Tensor, Tensor] | None = None
                   ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Chunks of `chunk` tokens: quadratic inside a chunk, the recurrent
    state between chunks. chunk=1 is the recurrent form, chunk >= T the
    quadratic one. Returns (out (..., T, dv), final (S, z))."""
    _check_features(fq, fk, v)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    S, z = _state_or_zeros(fk, v, state)  # (..., D, dv), (..., D)
    outs = []
    for start in range(0, fq.shape[-2], chunk):
        q_c = fq[..., start:start + chunk, :]  # (..., c, D)
        k_c = fk[..., start:start + chunk, :]  # (..., c, D)
        v_c = v[..., start:start + chunk, :]  # (..., c, dv)
        c = q_c.shape[-2]
        a = (q_c @ k_c.transpose(-1, -2)) * torch.ones(
            c, c, dtype=q_c.dtype, device=q_c.device).tril()  # (..., c, c)
        num = q_c @ S + a @ v_c  # (..., c, dv): earlier chunks + this one
        den = q_c @ z[..., None] + a.sum(-1, keepdim=True)  # (..., c, 1)
        outs.append(num / (den + eps))
        S = S + k_c.transpose(-1, -2) @ v_c  # (..., D, dv)
        z = z + k_c.sum(dim=-2)  # (..., D)
    return torch.cat(outs, dim=-2), (S, z)


# § A linear LLaMA (docs/frontiers/linear_attention.md:505)
FEATURES = {"elu": elu_features, "relu": relu_features}


class LinearCache:
    """The generation cache of a LinearLlama: per layer, the state (S, z)
    after the tokens seen so far; its size does not grow with them."""

    def __init__(self, n_layers: int, batch_size: int):
        self.state: list[tuple[Tensor, Tensor] | None] = [None] * n_layers
        self.batch_size = batch_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size()
                   for s in self.state if s is not None for t in s)


class LinearAttention(Attention):
    """The LLaMA chapter's grouped-query attention, its softmax replaced by
    causal linear attention with elu + 1 (or ReLU) features of the rotated
    queries and keys. Same weights, same names: wq, wk, wv, wo."""

    def __init__(self, config: LlamaConfig, layer_idx: int = 0,
                 features: str = "elu", chunk: int = 64):
        super().__init__(config, layer_idx)
        if features not in FEATURES:
            raise ValueError(f"features must be one of {sorted(FEATURES)}, "
                             f"got {features!r}")
        self.features, self.chunk = features, chunk

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor,
                cache: LinearCache | None = None, start_pos: int = 0
                ) -> Tensor:
        B, T, C = x.shape
        hd = self.head_dim
        q = self.wq(x).view(B, T, self.n_heads, hd).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = repeat_kv(k, self.n_rep), repeat_kv(v, self.n_rep)
        # q, k, v (B, H, T, hd)
        phi = FEATURES[self.features]
        with torch.autocast(x.device.type, enabled=False):  # sums in fp32:
            # half precision overflows in the running sums
            fq = phi(at_least_float32(q))  # (B, H, T, hd)
            fk = phi(at_least_float32(k))  # (B, H, T, hd)
            v32 = at_least_float32(v)  # (B, H, T, hd)
            state = None if cache is None else cache.state[self.layer_idx]
            y, state = causal_chunked(fq, fk, v32, self.chunk, state=state)
        if cache is not None:
            cache.state[self.layer_idx] = state
        y = y.type_as(x).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.wo(y)  # (B, T, C)


class LinearLlama(Llama):
    """Llama with LinearAttention in every block; `generate` (from the
    LLaMA chapter) works unchanged, the state standing in for the cache."""

    def __init__(self, config: LlamaConfig, features: str = "elu",
                 chunk: int = 64):
        super().__init__(config)
        for i, layer in enumerate(self.layers):
            layer.attention = LinearAttention(config, i, features, chunk)
        self.reset_parameters()  # the same initialisation as Llama's

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None, device=None
                  ) -> LinearCache:
        return LinearCache(self.config.n_layers, batch_size)


# § A linear LLaMA on Tiny Shakespeare (docs/frontiers/linear_attention.md:695)
def train_lm(model: nn.Module, config: TrainConfig, data=None,
             aux_loss=None, on_log=None, print_every: int = 0) -> dict:
    """Train a language model with the LLaMA chapter's recipe; return its
    losses and history.

    The recipe: config.seed seeds every generator, then the chapter's
    batches, AdamW with decay on matrices, warm-up and cosine, gradient
    clipping, bf16 autocast, and its validation protocol: every
    eval_interval steps on eval_windows windows, and at the end on every
    window. model(idx, targets=...) returns (logits, loss). data:
    (tokenizer, train_ids, val_ids), by default Tiny Shakespeare's split.
    aux_loss(model) -> Tensor, if given, is added to each micro-batch's
    loss (after its forward). on_log(step, model) is called at every
    log_interval step and the last; print_every > 0 prints progress. The
    model trains on config.device. Returns val_loss (the last), train_loss
    (every step's), seconds (with validation), train_seconds (without),
    tokens, history (train at log steps, val at eval steps), parameters.
    """
    device = pick_device(config.device)
    _, train_ids, val_ids = data or shakespeare_split()
    seed_everything(config.seed)
    model = model.to(device).train()
    optimizer = make_optimizer(model, config)
    batches = Batches(train_ids, config.batch_size, config.block_size,
                      seed=config.seed)
    losses, history = [], {"train": [], "val": []}
    start, tokens, validating = time.perf_counter(), 0, 0.0
    for step in range(1, config.max_steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step - 1, config)
        total = 0.0
        for _ in range(config.grad_accum):
            x, y = (t.to(device) for t in batches.next())  # (B, T) each
            with torch.autocast(device.type, torch.bfloat16,
                                enabled=config.bf16):
                _, loss = model(x, targets=y)
                full = loss if aux_loss is None else loss + aux_loss(model)
            (full / config.grad_accum).backward()
            total += loss.item() / config.grad_accum
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        tokens += config.tokens_per_step
        final = step == config.max_steps
        if print_every and step % print_every == 0:
            print(f"  step {step}/{config.max_steps} loss {total:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        if step % config.log_interval == 0 or final:
            history["train"].append({"step": step, "loss": total,
                                     "seconds": time.perf_counter() - start,
                                     "tokens": tokens})
            if on_log is not None:
                on_log(step, model)
        if step % config.eval_interval == 0 or final:
            began = time.perf_counter()
            val = evaluate(model, val_ids, config.block_size,
                           None if final else config.eval_windows,
                           bf16=config.bf16)
            validating += time.perf_counter() - began
            history["val"].append({"step": step, "val_loss": val})
    seconds = time.perf_counter() - start
    return {"val_loss": history["val"][-1]["val_loss"], "train_loss": losses,
            "seconds": seconds, "train_seconds": seconds - validating,
            "tokens": tokens, "history": history,
            "parameters": sum(p.numel() for p in model.parameters())}


LM_TRAIN = dict(  # the LLaMA chapter's "quick" recipe: twice the context,
    # half the batch (the same tokens per step), so that both runs fit in
    # minutes on one CPU thread
    batch_size=16, block_size=128, max_steps=400, warmup_steps=30, lr=4e-3,
    min_lr=4e-4, eval_interval=400, eval_windows=100,
    checkpoint_interval=400, log_interval=10)
LM_MODEL = dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4,
                max_seq_len=1024)  # 1,024 positions for generation
FULL_RUN_PARTS = ("lm", "speed")


def _lm_part(device: str | None, overrides: dict) -> dict:
    gen_tokens = overrides.pop("gen_tokens", 1000)
    train_config, model_config = override_configs(
        {"train": TrainConfig(device=device or "cpu", **LM_TRAIN),
         "model": LlamaConfig(**LM_MODEL)}, overrides)
    data = shakespeare_split()
    model_config = dataclasses.replace(model_config,
                                       vocab_size=data[0].vocab_size)
    seed_everything(train_config.seed)
    softmax = Llama(model_config)
    linear = LinearLlama(model_config)
    linear.load_state_dict(softmax.state_dict())  # the same initial weights
    runs, models = {}, {}
    for name, model in (("softmax", softmax), ("linear", linear)):
        print(f"{name}: training", flush=True)
        runs[name] = train_lm(model, train_config, data, print_every=50)
        models[name] = model.cpu()
    for rnd in range(3):  # generation speed, the two interleaved
        for name, model in models.items():
            speed = generation_speed(model, gen_tokens)
            runs[name].setdefault("gen_tok_per_s", []).append(speed)
    for name, model in models.items():
        cache = model.new_cache(1, gen_tokens)
        with torch.no_grad():
            model(torch.zeros(1, gen_tokens, dtype=torch.long), cache=cache)
        runs[name]["cache_bytes"] = cache.nbytes
        runs[name]["sample"] = model.generate(
            torch.zeros(1, 1, dtype=torch.long), 300,
            generator=torch.Generator().manual_seed(0))[0].tolist()
    return {"train": dataclasses.asdict(train_config),
            "model": dataclasses.asdict(model_config),
            "gen_tokens": gen_tokens, "runs": runs,
            "chars": data[0].chars}


def _speed_part(lengths=(128, 256, 512, 1024, 2048, 4096, 8192),
                heads: int = 4, head_dim: int = 32, repeats: int = 3
                ) -> dict:
    """Forward time and peak memory of causal attention, softmax (the
    formula and PyTorch's fused kernel) and linear (chunked, parallel)."""
    methods = {
        "softmax, formula": lambda q, k, v: kernel_attention(
            q, k, v, softmax_kernel, causal=True),
        "softmax, fused": lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, is_causal=True),
        "linear, chunked": lambda q, k, v: causal_chunked(
            elu_features(q), elu_features(k), v, 64)[0],
        "linear, parallel": lambda q, k, v: causal_parallel(
            elu_features(q), elu_features(k), v),
    }
    rows = []
    for T in lengths:
        q, k, v = torch.randn(3, 1, heads, T, head_dim) / head_dim ** 0.25
        row = {"T": T}
        for name, fn in methods.items():
            if name == "softmax, formula" and T > 4096:
                continue  # 2 x 8192^2 x 4 heads x 4 bytes: 2 GiB
            row[name + " bytes"] = peak_memory(fn, q, k, v)
        with torch.no_grad():
            for name, fn in methods.items():
                if name + " bytes" not in row:
                    continue
                best = float("inf")
                for _ in range(repeats):
                    start = time.perf_counter()
                    fn(q, k, v)
                    best = min(best, time.perf_counter() - start)
                row[name + " seconds"] = best
        rows.append(row)
        print(f"T={T}: " + ", ".join(f"{key} {value:.3g}" for key, value in
                                     row.items() if key != "T"), flush=True)
    return {"heads": heads, "head_dim": head_dim, "rows": rows}


def full_run(device: str | None = None, part: str = "lm", **overrides
             ) -> dict:
    """part="lm": a softmax and a linear LLaMA trained alike (overrides:
    train_* and model_* fields, gen_tokens); part="speed": time and
    memory against the sequence length, on the CPU."""
    if part not in FULL_RUN_PARTS:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, got "
                         f"{part!r}")
    if part == "lm":
        return _lm_part(device, dict(overrides))
    if overrides:
        raise ValueError(f"the speed part takes no overrides, got "
                         f"{sorted(overrides)}")
    return _speed_part()
