# Generated from docs/frontiers/mamba.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § State-space models and Mamba (docs/frontiers/mamba.md:38)
"""State-space models and Mamba: the selective scan, the block, the model.

The chapter docs/frontiers/mamba.md builds, in order:

    discretize_zoh     zero-order hold of a diagonal continuous system
    ssm_recurrent, ssm_kernel, causal_conv
                       a time-invariant SSM as a recurrence and as a
                       convolution, proven the same
    scan_sequential, scan_parallel, selective_scan
                       h_t = a_t h_{t-1} + b_t by a loop and in log-depth
                       steps, proven equal; Mamba's selective SSM on top
    MambaConfig, MambaState, MambaMixer, MambaBlock, Mamba
                       the model, equal to transformers' MambaForCausalLM
                       (tests/test_mamba.py)
    generate           sampling one token at a time from the state
    export_hf, import_hf
                       the Hugging Face layout, both ways
    RACE, full_run     Mamba against the LLaMA of the same size, both
                       trained by the linear attention chapter's train_lm
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
from cave.fundamentals.essentials import (cross_entropy, eval_mode,
                                          pick_device, seed_everything)
from cave.frontiers.linear_attention import train_lm
from cave.transformers.llama import (Llama, LlamaConfig, RMSNorm,
                                     at_least_float32, sample_next)
from cave.transformers.llama import generate as llama_generate
from cave.transformers.llama_training import TrainConfig

__all__ = [
    "discretize_zoh", "ssm_recurrent", "ssm_kernel", "causal_conv",
    "scan_sequential", "scan_parallel", "selective_scan", "MambaConfig",
    "MambaState", "MambaMixer", "MambaBlock", "Mamba", "generate",
    "export_hf", "import_hf", "RACE", "full_run",
]


# § From a continuous system to a recurrence (docs/frontiers/mamba.md:127)
def discretize_zoh(A: Tensor, B: Tensor, delta: Tensor
                   ) -> tuple[Tensor, Tensor]:
    """Zero-order hold of h' = A h + B x for a diagonal A.

    A, B (D, N): the diagonal of each channel's A, and its B; delta (D,)
    the step per channel -> A_bar = exp(delta A), B_bar = (exp(delta A)
    - 1) / A * B, each (D, N). A must have no zero entry.
    """
    dA = delta[..., None] * A  # (D, N)
    A_bar = torch.exp(dA)  # (D, N)
    B_bar = torch.expm1(dA) / A * B  # (D, N): (dA)^-1 (e^dA - 1) delta B
    return A_bar, B_bar


# § Two views of one system (docs/frontiers/mamba.md:189)
def ssm_recurrent(A_bar: Tensor, B_bar: Tensor, C: Tensor, x: Tensor
                  ) -> Tensor:
    """The recurrent view: h_t = A_bar h_{t-1} + B_bar x_t, y_t = C . h_t.

    A_bar, B_bar, C (D, N), one diagonal system per channel; x (B, T, D)
    -> y (B, T, D), from h = 0.
    """
    batch, T, D = x.shape
    h = x.new_zeros(batch, D, A_bar.shape[-1])  # (B, D, N)
    ys = []
    for x_t in x.unbind(1):  # (B, D) per step
        h = A_bar * h + B_bar * x_t[..., None]  # (B, D, N)
        ys.append((h * C).sum(-1))  # (B, D)
    return torch.stack(ys, dim=1)  # (B, T, D)


def ssm_kernel(A_bar: Tensor, B_bar: Tensor, C: Tensor, length: int
               ) -> Tensor:
    """The convolutional view's kernel K_k = C . A_bar^k B_bar for k = 0
    .. length - 1: (D, length)."""
    k = torch.arange(length, device=A_bar.device, dtype=A_bar.dtype)
    powers = A_bar[:, None, :] ** k[None, :, None]  # (D, L, N)
    return (C[:, None, :] * powers * B_bar[:, None, :]).sum(-1)  # (D, L)


def causal_conv(x: Tensor, K: Tensor) -> Tensor:
    """y_t = sum_k K_k x_{t-k}, each channel with its own kernel.

    x (B, T, D), K (D, L) -> (B, T, D): a depthwise F.conv1d with L - 1
    zeros on the left, so that y_t sees x_t and earlier only.
    """
    L = K.shape[-1]
    xt = F.pad(x.transpose(1, 2), (L - 1, 0))  # (B, D, L - 1 + T)
    w = K.flip(-1)[:, None, :]  # (D, 1, L): conv1d correlates, so flip
    return F.conv1d(xt, w, groups=K.shape[0]).transpose(1, 2)  # (B, T, D)


# § Selectivity, and why it needs a scan (docs/frontiers/mamba.md:290)
def scan_sequential(a: Tensor, b: Tensor, h0: Tensor | None = None
                    ) -> Tensor:
    """Every h_t of h_t = a_t * h_{t-1} + b_t, by a loop over time.

    a, b (B, T, ...) -> (B, T, ...), from h0 (B, ...) or zeros.
    """
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0  # (B, ...)
    hs = []
    # unbind, not a[:, t]: indexing one step at a time makes autograd
    # write a whole zero tensor per step on the way back (T^2 memory work)
    for a_t, b_t in zip(a.unbind(1), b.unbind(1)):  # (B, ...) each
        h = a_t * h + b_t
        hs.append(h)
    return torch.stack(hs, dim=1)  # (B, T, ...)


def selective_scan(x: Tensor, delta: Tensor, A: Tensor, B: Tensor,
                   C: Tensor, D: Tensor, h0: Tensor | None = None,
                   parallel: bool = False) -> tuple[Tensor, Tensor]:
    """y_t = C_t . h_t + D x_t, h_t = exp(delta_t A) h_{t-1} + delta_t B_t
    x_t, per channel, in float32 (float64 stays float64).

    x, delta (B, T, E); A (E, N); B, C (B, T, N); D (E,); h0 (B, E, N) or
    None -> y (B, T, E) and the last state h_T (B, E, N).
    """
    x, delta = at_least_float32(x), at_least_float32(delta)
    a = torch.exp(delta[..., None] * A)  # (B, T, E, N)
    b = (delta * x)[..., None] * B[:, :, None, :].to(x.dtype)  # (B,T,E,N)
    h = (scan_parallel if parallel else scan_sequential)(a, b, h0)
    y = (h * C[:, :, None, :].to(x.dtype)).sum(-1)  # (B, T, E)
    return y + D * x, h[:, -1]  # (B, T, E), (B, E, N)


# § The scan, in parallel (docs/frontiers/mamba.md:391)
def scan_parallel(a: Tensor, b: Tensor, h0: Tensor | None = None
                  ) -> Tensor:
    """The h_t of scan_sequential in ceil(log2 T) rounds (Hillis and
    Steele). a, b (B, T, ...) -> (B, T, ...), from h0 (B, ...) or zeros."""
    if h0 is not None:  # fold h0 into the first map: b_0 + a_0 h0
        b = torch.cat([b[:, :1] + a[:, :1] * h0[:, None], b[:, 1:]], 1)
    T, s = a.shape[1], 1
    while s < T:
        # position t takes the map s back first: (a_t, b_t) o (a_{t-s},
        # b_{t-s}) = (a_t a_{t-s}, a_t b_{t-s} + b_t); the first s stay
        b = torch.cat([b[:, :s], a[:, s:] * b[:, :-s] + b[:, s:]], 1)
        a = torch.cat([a[:, :s], a[:, s:] * a[:, :-s]], 1)
        s *= 2
    return b  # (B, T, ...)


# § The Mamba block (docs/frontiers/mamba.md:470)
@dataclasses.dataclass
class MambaConfig:
    vocab_size: int = 65  # Tiny Shakespeare's characters
    dim: int = 64  # the residual stream's width ("d_model")
    n_layers: int = 7  # Mamba blocks: each holds about half the weights
    # of a LLaMA block of the same width, so twice as many match a LLaMA
    d_state: int = 16  # N, the state entries per channel: the paper's 16
    expand: int = 2  # E = expand * dim channels inside the block
    d_conv: int = 4  # the causal convolution's width, the paper's 4
    dt_rank: int | None = None  # R, the rank of delta's projection;
    # None: ceil(dim / 16), the paper's rule
    norm_eps: float = 1e-5  # RMSNorm's epsilon, Hugging Face's default
    conv_bias: bool = True  # the convolution has a bias (the paper's)
    bias: bool = False  # in_proj and out_proj have none (the paper's)
    tie_embeddings: bool = True  # output matrix = embedding (the paper's)
    dt_min: float = 1e-3  # initial steps drawn log-uniformly between
    dt_max: float = 0.1  # dt_min and dt_max: memories of 10 to 1000 tokens
    dt_floor: float = 1e-4  # no initial step below this
    init_std: float = 0.02  # other matrices: normal(0, init_std)
    parallel_scan: bool = False  # scan_parallel instead of the loop: the
    # loop is the faster one on a CPU (measured above)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "d_state", "expand",
                     "d_conv"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, "
                                 f"got {value!r}")
        if self.d_conv < 2:
            raise ValueError(f"d_conv must be at least 2, got {self.d_conv}")
        if self.dt_rank is not None and (not isinstance(self.dt_rank, int)
                                         or self.dt_rank < 1):
            raise ValueError(f"dt_rank must be a positive int or None, "
                             f"got {self.dt_rank!r}")
        if not (0 < self.dt_min <= self.dt_max and self.dt_floor > 0):
            raise ValueError(f"need 0 < dt_min <= dt_max and dt_floor > 0, "
                             f"got {self.dt_min}, {self.dt_max}, "
                             f"{self.dt_floor}")

    @property
    def inner(self) -> int:
        """E, the channels inside a block."""
        return self.expand * self.dim

    @property
    def rank(self) -> int:
        """R, the rank of delta's projection."""
        return self.dt_rank or math.ceil(self.dim / 16)


class MambaState:
    """What a Mamba remembers of the past, per layer: conv[layer] (B, E,
    d_conv - 1), the convolution's last inputs, and ssm[layer] (B, E, N),
    the SSM state (always float32). Its size never grows."""

    def __init__(self, config: MambaConfig, batch_size: int,
                 dtype: torch.dtype = torch.float32, device=None):
        E, N, k = config.inner, config.d_state, config.d_conv
        self.conv = [torch.zeros(batch_size, E, k - 1, dtype=dtype,
                                 device=device)
                     for _ in range(config.n_layers)]
        self.ssm = [torch.zeros(batch_size, E, N, device=device,
                                dtype=torch.promote_types(dtype,
                                                          torch.float32))
                    for _ in range(config.n_layers)]
        self.batch_size = batch_size

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.conv + self.ssm)


class MambaMixer(nn.Module):
    """The Mamba layer: in_proj, causal depthwise conv, SiLU, selective
    SSM, SiLU(z) gate, out_proj."""

    def __init__(self, config: MambaConfig, layer_idx: int = 0):
        super().__init__()
        E, N, R, k = config.inner, config.d_state, config.rank, config.d_conv
        self.layer_idx, self.d_state, self.rank = layer_idx, N, R
        self.parallel = config.parallel_scan
        self.in_proj = nn.Linear(config.dim, 2 * E, bias=config.bias)
        self.conv1d = nn.Conv1d(E, E, k, groups=E, bias=config.conv_bias)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)  # delta, B, C
        self.dt_proj = nn.Linear(R, E, bias=True)  # delta's rank R -> E
        self.A_log = nn.Parameter(torch.zeros(E, N))  # A = -exp(A_log)
        self.D = nn.Parameter(torch.ones(E))  # the skip x_t -> y_t
        self.out_proj = nn.Linear(E, config.dim, bias=config.bias)

    def forward(self, u: Tensor, state: MambaState | None = None) -> Tensor:
        batch, T, _ = u.shape
        i, k = self.layer_idx, self.conv1d.kernel_size[0]
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, E) each
        x = x.transpose(1, 2)  # (B, E, T): channels first, for conv1d
        past = x.new_zeros(batch, x.shape[1], k - 1) if state is None \
            else state.conv[i].to(x.dtype)  # (B, E, k - 1)
        x = torch.cat([past, x], dim=-1)  # (B, E, k - 1 + T)
        if state is not None:
            state.conv[i] = x[:, :, -(k - 1):].detach()  # the last k - 1
        x = F.silu(self.conv1d(x)).transpose(1, 2)  # (B, T, E), causal
        dt, B, C = self.x_proj(x).split(
            [self.rank, self.d_state, self.d_state], dim=-1)
        # dt (B, T, R); B, C (B, T, N)
        delta = F.softplus(at_least_float32(self.dt_proj(dt)))  # (B, T, E)
        A = -torch.exp(at_least_float32(self.A_log))  # (E, N), all < 0
        h0 = None if state is None else state.ssm[i]
        y, h = selective_scan(x, delta, A, B, C, at_least_float32(self.D),
                              h0, self.parallel)  # (B, T, E), (B, E, N)
        if state is not None:
            state.ssm[i] = h.detach()
        y = y * F.silu(at_least_float32(z))  # (B, T, E), the gate
        return self.out_proj(y.type_as(u))  # (B, T, dim)


# § The language model (docs/frontiers/mamba.md:616)
class MambaBlock(nn.Module):
    """x + mixer(norm(x)): a pre-norm residual block."""

    def __init__(self, config: MambaConfig, layer_idx: int = 0):
        super().__init__()
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.mixer = MambaMixer(config, layer_idx)

    def forward(self, x: Tensor, state: MambaState | None = None) -> Tensor:
        return x + self.mixer(self.norm(x), state)  # (B, T, dim)


class Mamba(nn.Module):
    """A Mamba language model: embedding, n_layers blocks, RMSNorm,
    output (tied to the embedding by default)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(MambaBlock(config, i)
                                    for i in range(config.n_layers))
        self.norm_f = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:  # one (vocab, dim) matrix, used twice
            self.lm_head.weight = self.embeddings.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c = self.config
        for layer in self.layers:
            m = layer.mixer
            n = torch.arange(1, c.d_state + 1, dtype=torch.float32)  # (N,)
            m.A_log.copy_(torch.log(n).expand_as(m.A_log))  # A = -1..-N
            m.D.fill_(1.0)
            bound = c.rank ** -0.5
            m.dt_proj.weight.uniform_(-bound, bound)
            u = torch.rand(c.inner)  # (E,) uniform in [0, 1)
            dt = torch.exp(u * (math.log(c.dt_max) - math.log(c.dt_min))
                           + math.log(c.dt_min)).clamp(min=c.dt_floor)
            m.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            # softplus(bias) = dt: the inverse of softplus
            for lin in (m.in_proj, m.x_proj):
                lin.weight.normal_(0.0, c.init_std)
            m.out_proj.weight.normal_(  # it writes into the stream
                0.0, c.init_std / math.sqrt(2 * c.n_layers))
            bound = 1 / math.sqrt(c.d_conv)  # nn.Conv1d's own default
            m.conv1d.weight.uniform_(-bound, bound)
            for lin in (m.in_proj, m.out_proj, m.conv1d):
                if lin.bias is not None:
                    lin.bias.zero_()
            layer.norm.weight.fill_(1.0)
        self.norm_f.weight.fill_(1.0)
        self.embeddings.weight.normal_(0.0, c.init_std)
        if not c.tie_embeddings:
            self.lm_head.weight.normal_(0.0, c.init_std)

    def new_state(self, batch_size: int) -> MambaState:
        """An empty MambaState in the parameters' dtype and device."""
        w = self.embeddings.weight
        return MambaState(self.config, batch_size, w.dtype, w.device)

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                state: MambaState | None = None
                ) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) -> logits (B, T, vocab_size), and the loss if targets
        (B, T). With a state, idx continues the tokens the state has seen,
        and the state moves on past them."""
        if idx.dtype != torch.long or idx.dim() != 2:
            raise ValueError(f"Mamba expects token ids of shape (B, T) and "
                             f"dtype torch.int64, got {tuple(idx.shape)} "
                             f"{idx.dtype}")
        if state is not None and state.batch_size != idx.shape[0]:
            raise ValueError(f"the state holds batch size "
                             f"{state.batch_size}, got ids of shape "
                             f"{tuple(idx.shape)}")
        x = self.embeddings(idx)  # (B, T, dim)
        for layer in self.layers:
            x = layer(x, state)  # (B, T, dim)
        logits = self.lm_head(self.norm_f(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            if targets.shape != idx.shape:
                raise ValueError(f"targets must match idx "
                                 f"{tuple(idx.shape)}, got "
                                 f"{tuple(targets.shape)}")
            loss = cross_entropy(at_least_float32(logits.flatten(0, 1)),
                                 targets.flatten())  # mean over B * T
        return logits, loss


# § Generation in constant memory (docs/frontiers/mamba.md:738)
@torch.no_grad()
def generate(model: Mamba, idx: Tensor, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """idx (B, T) -> (B, T + max_new_tokens), sampled by sample_next
    (temperature 0 is greedy), from the recurrent state."""
    if idx.dim() != 2 or idx.shape[1] < 1:
        raise ValueError(f"generate expects prompts of shape (B, T) with "
                         f"T >= 1, got {tuple(idx.shape)}")
    state = model.new_state(idx.shape[0])
    with eval_mode(model):
        logits, _ = model(idx, state=state)  # the prompt, all at once
        for i in range(max_new_tokens):
            next_id = sample_next(logits[:, -1], temperature, top_k, top_p,
                                  generator)  # (B,)
            idx = torch.cat([idx, next_id[:, None]], dim=1)  # (B, T + 1)
            if i + 1 < max_new_tokens:
                logits, _ = model(idx[:, -1:], state=state)  # one token
    return idx


# § Hugging Face's layout (docs/frontiers/mamba.md:816)
def config_to_hf(config: MambaConfig) -> dict:
    """Our config as the fields of transformers' MambaConfig."""
    return {"model_type": "mamba", "architectures": ["MambaForCausalLM"],
            "vocab_size": config.vocab_size, "hidden_size": config.dim,
            "num_hidden_layers": config.n_layers,
            "state_size": config.d_state, "expand": config.expand,
            "conv_kernel": config.d_conv, "time_step_rank": config.rank,
            "layer_norm_epsilon": config.norm_eps,
            "use_conv_bias": config.conv_bias, "use_bias": config.bias,
            "tie_word_embeddings": config.tie_embeddings,
            "hidden_act": "silu", "residual_in_fp32": True,
            "time_step_min": config.dt_min, "time_step_max": config.dt_max,
            "time_step_floor": config.dt_floor,
            "use_associative_scan": False,  # the plain loop, as ours
            "pad_token_id": None, "bos_token_id": None,
            "eos_token_id": None}  # no special tokens in 65 characters


def config_from_hf(hf: dict) -> MambaConfig:
    """A MambaConfig from the fields of a transformers MambaConfig."""
    if hf.get("model_type", "mamba") != "mamba" or \
            hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"expected model_type 'mamba' with hidden_act "
                         f"'silu', got {hf.get('model_type')!r} and "
                         f"{hf.get('hidden_act')!r}")
    dim = hf["hidden_size"]
    rank = hf.get("time_step_rank", "auto")
    return MambaConfig(
        vocab_size=hf["vocab_size"], dim=dim,
        n_layers=hf["num_hidden_layers"], d_state=hf.get("state_size", 16),
        expand=hf.get("expand", 2), d_conv=hf.get("conv_kernel", 4),
        dt_rank=None if rank in ("auto", math.ceil(dim / 16)) else rank,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        conv_bias=hf.get("use_conv_bias", True),
        bias=hf.get("use_bias", False),
        tie_embeddings=hf.get("tie_word_embeddings", True))


def export_hf(model: Mamba) -> tuple[dict[str, Tensor], dict]:
    """(state_dict, config) in the layout of MambaForCausalLM: copies."""
    state = {(name if name == "lm_head.weight" else f"backbone.{name}"):
             tensor.detach().clone()
             for name, tensor in model.state_dict().items()}
    return state, config_to_hf(model.config)


def import_hf(state: dict[str, Tensor], hf_config: dict) -> Mamba:
    """A Mamba from a MambaForCausalLM state dict and config, checked."""
    model = Mamba(config_from_hf(hf_config))
    ours = model.state_dict()
    wanted = {(n if n == "lm_head.weight" else f"backbone.{n}"): n
              for n in ours}
    optional = {"lm_head.weight"} if model.config.tie_embeddings else set()
    missing = sorted(set(wanted) - set(state) - optional)
    unexpected = sorted(set(state) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit {model.config}: missing "
                         f"{missing[:5]} ({len(missing)}), unexpected "
                         f"{unexpected[:5]} ({len(unexpected)})")
    loaded = {}
    for theirs, name in wanted.items():
        w = state.get(theirs, state.get("backbone.embeddings.weight"))
        if w.shape != ours[name].shape:
            raise ValueError(f"{theirs}: expected shape "
                             f"{tuple(ours[name].shape)}, got "
                             f"{tuple(w.shape)}")
        loaded[name] = w
    model.load_state_dict(loaded)
    return model


# § Mamba against LLaMA (docs/frontiers/mamba.md:910)
RACE = {  # the two models: about the same number of weights
    "llama": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=4,
                  max_seq_len=512),
    "mamba": dict(dim=64, n_layers=7),
    "train": dict(batch_size=16, block_size=64, max_steps=500,
                  warmup_steps=30, lr=4e-3, min_lr=4e-4, eval_interval=100,
                  eval_windows=100, log_interval=20),
}


def _interleaved(fns: dict, rounds: int) -> dict:
    """Seconds of each fn, best of `rounds`, run in turn each round."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def full_run(device: str | None = None, **overrides) -> dict:
    """Train RACE's LLaMA and Mamba on Tiny Shakespeare; time training
    and generation, interleaved; return the record. overrides: fields of
    TrainConfig (max_steps=100)."""
    (train_config,) = override_configs(
        {"": TrainConfig(**RACE["train"], device=device or "cpu")},
        overrides)
    data = shakespeare_split()
    models, record = {}, {"train": dataclasses.asdict(train_config)}
    for name in ("llama", "mamba"):
        seed_everything(train_config.seed)
        models[name] = Llama(LlamaConfig(**RACE["llama"])) \
            if name == "llama" else Mamba(MambaConfig(**RACE["mamba"]))
        result = train_lm(models[name], train_config, data)
        record[name] = {"model": RACE[name], **result}
    device = pick_device(train_config.device)
    x, y = Batches(data[1], train_config.batch_size,
                   train_config.block_size, seed=1).next()
    x, y = x.to(device), y.to(device)

    def train_step(model):
        with torch.autocast(device.type, torch.bfloat16,
                            enabled=train_config.bf16):
            _, loss = model(x, targets=y)
        loss.backward()
        model.zero_grad(set_to_none=True)

    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    gen_tokens = 500

    def sample(name):
        gen = torch.Generator(device=device).manual_seed(0)
        fn = llama_generate if name == "llama" else generate
        fn(models[name], prompt, gen_tokens, generator=gen)

    train_s = _interleaved({n: (lambda m=m: train_step(m))
                            for n, m in models.items()}, 5)
    gen_s = _interleaved({n: (lambda n=n: sample(n)) for n in models}, 3)
    for name in models:
        record[name]["train_tok_per_s"] = \
            train_config.batch_size * train_config.block_size / train_s[name]
        record[name]["generate_tok_per_s"] = gen_tokens / gen_s[name]
    record["device"] = str(device)
    return record
