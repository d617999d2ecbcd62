# Generated from docs/frontiers/moe.md by `python -m cave.book tangle`.
# Do not edit: edit the chapter, then regenerate. CI fails on drift.


# § Mixture of experts (docs/frontiers/moe.md:35)
"""Mixture of experts: a sparse feed-forward layer and a LLaMA built on it.

The chapter docs/frontiers/moe.md builds, in order:

    MoEConfig, route   the router: softmax over experts, top-k, weights
                       renormalised over the k chosen (Mixtral's)
    MoE                SwiGLU experts, dispatch and combine by index
                       operations, expert capacity; equal to moe_loop and
                       to transformers' MixtralSparseMoeBlock
                       (tests/test_moe.py)
    moe_loop           the same layer as a plain loop over experts
    load_balancing_loss, router_z_loss
                       Switch's balancing loss (= transformers'
                       load_balancing_loss_func), ST-MoE's z-loss
    MoELlama           a LLaMA with MoE feed-forward layers
    RACE, FULL_RUN_PARTS, full_run
                       MoE against the dense models of the same active
                       and the same total weights, on Tiny Shakespeare
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cave.fundamentals.checkpoints import override_configs
from cave.fundamentals.data import shakespeare_split
from cave.fundamentals.essentials import seed_everything, softmax
from cave.frontiers.linear_attention import train_lm
from cave.transformers.llama import Llama, LlamaConfig, at_least_float32
from cave.transformers.llama_training import TrainConfig

__all__ = [
    "MoEConfig", "route", "MoE", "moe_loop", "load_balancing_loss",
    "router_z_loss", "MoELlama", "RACE", "FULL_RUN_PARTS", "full_run",
]


# § The router (docs/frontiers/moe.md:114)
@dataclasses.dataclass
class MoEConfig:
    dim: int = 64  # the width of the tokens routed (the model's dim)
    hidden_dim: int = 96  # each expert's SwiGLU width: two active experts
    # of 96 do the work of the dense LLaMA's 192 (the race below)
    n_experts: int = 8  # E, Mixtral's 8
    top_k: int = 2  # k experts per token, Mixtral's 2
    capacity_factor: float | None = None  # an expert takes at most
    # capacity_factor * k * tokens / E tokens; None: no limit, no drops
    balance_coef: float = 0.01  # the balancing loss's weight, Switch's
    # alpha = 0.01 (Mixtral's router_aux_loss_coef is 0.02)
    z_coef: float = 1e-3  # the router z-loss's weight, ST-MoE's 0.001
    init_std: float = 0.02  # every weight matrix: normal(0, init_std)

    def __post_init__(self):
        for name in ("dim", "hidden_dim", "n_experts", "top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, "
                                 f"got {value!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k must be at most n_experts="
                             f"{self.n_experts}, got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got "
                             f"{self.capacity_factor}")
        if self.balance_coef < 0 or self.z_coef < 0:
            raise ValueError(f"balance_coef and z_coef must be >= 0, got "
                             f"{self.balance_coef} and {self.z_coef}")


def route(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Router logits (N, E) -> (weights (N, k) in float32 or float64,
    summing to 1 over each token's k experts; experts (N, k), the most
    probable first)."""
    probs = softmax(at_least_float32(logits), dim=-1)  # (N, E)
    top, experts = probs.topk(top_k, dim=-1)  # (N, k) each
    return top / top.sum(dim=-1, keepdim=True), experts  # renormalised


# § Experts, dispatch and combine (docs/frontiers/moe.md:195)
class MoE(nn.Module):
    """A sparse mixture of SwiGLU experts: x (..., dim) -> (..., dim).

    After each forward: router_logits (N, E) for the auxiliary losses,
    dropped (the fraction of assignments over capacity, a float), and
    usage, the assignments each expert received since usage was zeroed.
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        E, d, h = config.n_experts, config.dim, config.hidden_dim
        self.gate = nn.Linear(d, E, bias=False)  # the router, W_r (E, d)
        self.w1 = nn.Parameter(torch.empty(E, h, d))  # the SiLU gates
        self.w3 = nn.Parameter(torch.empty(E, h, d))  # the values
        self.w2 = nn.Parameter(torch.empty(E, d, h))  # back to dim
        for w in (self.gate.weight, self.w1, self.w3, self.w2):
            nn.init.normal_(w, 0.0, config.init_std)
        self.register_buffer("usage", torch.zeros(E), persistent=False)
        self.router_logits: Tensor | None = None
        self.dropped = 0.0

    def capacity(self, n_tokens: int) -> int | None:
        """Slots per expert for a batch of n_tokens (None: unlimited)."""
        c = self.config
        if c.capacity_factor is None:
            return None
        return math.ceil(c.capacity_factor * c.top_k * n_tokens
                         / c.n_experts)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.config.dim:
            raise ValueError(f"MoE expected last dimension "
                             f"{self.config.dim}, got {tuple(x.shape)}")
        shape, E, k = x.shape, self.config.n_experts, self.config.top_k
        x = x.reshape(-1, shape[-1])  # (N, d)
        N = x.shape[0]
        self.router_logits = self.gate(x)  # (N, E)
        weights, experts = route(self.router_logits, k)  # (N, k) each
        # 1. flatten, choice-major: all first choices, then all second
        expert = experts.t().reshape(-1)  # (k N,)
        token = torch.arange(N, device=x.device).repeat(k)  # (k N,)
        weight = weights.t().reshape(-1)  # (k N,)
        # 2. each assignment's slot in its expert's queue
        one_hot = F.one_hot(expert, E)  # (k N, E)
        slot = (one_hot.cumsum(0) - 1).gather(1, expert[:, None])[:, 0]
        counts = one_hot.sum(0)  # (E,) assignments per expert
        # 3. capacity: drop the assignments past it
        C = self.capacity(N) or int(counts.max())
        keep = slot < C  # (k N,)
        with torch.no_grad():
            self.usage += counts.float()
            self.dropped = 1.0 - keep.float().mean().item()
        expert, slot, token = expert[keep], slot[keep], token[keep]
        # 4. dispatch into the experts' buffer
        buffer = x.new_zeros(E, C, x.shape[1])  # (E, C, d)
        buffer[expert, slot] = x[token]
        # 5. every expert at once: SwiGLU as batched products
        h = F.silu(buffer @ self.w1.transpose(1, 2)) * \
            (buffer @ self.w3.transpose(1, 2))  # (E, C, h)
        out = h @ self.w2.transpose(1, 2)  # (E, C, d)
        # 6. combine: weigh each kept output and add it to its token
        y = torch.zeros_like(x)  # (N, d), summed in x's dtype
        y.index_add_(0, token, (out[expert, slot]
                                * weight[keep, None]).to(y.dtype))
        return y.reshape(shape)  # (..., d)


def moe_loop(moe: MoE, x: Tensor) -> Tensor:
    """moe's output computed expert by expert (no capacity limit)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])  # (N, d)
    weights, experts = route(moe.gate(x), moe.config.top_k)  # (N, k)
    y = torch.zeros_like(x)
    for e in range(moe.config.n_experts):
        token, choice = torch.where(experts == e)  # its tokens, its rank
        h = F.silu(x[token] @ moe.w1[e].t()) * (x[token] @ moe.w3[e].t())
        y.index_add_(0, token, ((h @ moe.w2[e].t())
                                * weights[token, choice, None]).to(y.dtype))
    return y.reshape(shape)


# § Balancing the load (docs/frontiers/moe.md:341)
def load_balancing_loss(router_logits: Tensor, top_k: int) -> Tensor:
    """Switch's E * sum_i f_i P_i for one layer's logits (N, E): f_i the
    share of tokens routed to expert i (counted once per token that
    chose it), P_i its mean router probability. k at perfect balance."""
    E = router_logits.shape[-1]
    probs = softmax(at_least_float32(router_logits), dim=-1)  # (N, E)
    chosen = probs.topk(top_k, dim=-1).indices  # (N, k)
    f = F.one_hot(chosen, E).sum(1).float().mean(0)  # (E,), sums to k
    P = probs.mean(0)  # (E,), sums to 1
    return E * (f * P).sum()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE's mean squared log-sum-exp of the router logits (N, E)."""
    lse = torch.logsumexp(at_least_float32(router_logits), dim=-1)  # (N,)
    return lse.pow(2).mean()


# § A LLaMA with experts (docs/frontiers/moe.md:463)
class MoELlama(Llama):
    """A Llama whose blocks' feed-forward layers are MoE layers."""

    def __init__(self, config: LlamaConfig, moe: MoEConfig):
        if moe.dim != config.dim:
            raise ValueError(f"the MoE layers must be as wide as the model:"
                             f" expected dim {config.dim}, got {moe.dim}")
        super().__init__(config)
        self.moe_config = moe
        for block in self.layers:
            block.feed_forward = MoE(moe)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        super().reset_parameters()  # LLaMA's: normal(0, init_std)
        for layer in getattr(self, "moe_layers", lambda: [])():
            layer.w2.normal_(0.0, self.config.init_std  # it writes
                             / math.sqrt(2 * self.config.n_layers))  # into
            # the stream, scaled as LLaMA's w2

    def moe_layers(self) -> list[MoE]:
        return [b.feed_forward for b in self.layers
                if isinstance(b.feed_forward, MoE)]

    def aux_loss(self) -> Tensor:
        """The weighted balancing and z-losses of the last forward, summed
        over layers."""
        c = self.moe_config
        total = 0.0
        for layer in self.moe_layers():
            logits = layer.router_logits  # (N, E)
            total = total + c.balance_coef * load_balancing_loss(
                logits, c.top_k) + c.z_coef * router_z_loss(logits)
        return total

    def active_parameters(self) -> int:
        """Weights one token uses: all but the E - k unchosen experts."""
        c = self.moe_config
        per_expert = 3 * c.dim * c.hidden_dim
        idle = (c.n_experts - c.top_k) * per_expert * self.config.n_layers
        return sum(p.numel() for p in self.parameters()) - idle


# § Trained on Tiny Shakespeare (docs/frontiers/moe.md:545)
RACE = {
    "model": dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=4,
                  max_seq_len=64),
    "moe": dict(dim=64, hidden_dim=96, n_experts=8, top_k=2),
    "train": dict(batch_size=16, block_size=64, max_steps=500,
                  warmup_steps=30, lr=4e-3, min_lr=4e-4, eval_interval=100,
                  eval_windows=100, log_interval=20),
}
FULL_RUN_PARTS = ("moe", "moe_no_balance", "dense_active", "dense_total")


def full_run(device: str | None = None, part: str = "moe",
             **overrides) -> dict:
    """Train one of the race's models (part) on Tiny Shakespeare; return
    its record. overrides: fields of TrainConfig (max_steps=100) and of
    MoEConfig with the prefix moe_ (moe_top_k=1)."""
    if part not in FULL_RUN_PARTS:
        raise ValueError(f"part must be one of {FULL_RUN_PARTS}, "
                         f"got {part!r}")
    train_config, moe_config = override_configs(
        {"": TrainConfig(**RACE["train"], device=device or "cpu"),
         "moe": MoEConfig(**RACE["moe"])}, overrides)
    if part == "moe_no_balance":
        moe_config = dataclasses.replace(moe_config, balance_coef=0.0,
                                         z_coef=0.0)
    seed_everything(train_config.seed)
    experts = moe_config.n_experts * moe_config.hidden_dim
    if part.startswith("moe"):
        model = MoELlama(LlamaConfig(**RACE["model"]), moe_config)
    else:
        width = {"dense_active": moe_config.top_k * moe_config.hidden_dim,
                 "dense_total": experts}[part]
        model = Llama(LlamaConfig(**RACE["model"], hidden_dim=width))
    usage = []

    def on_log(step, model):
        if isinstance(model, MoELlama):
            shares = [(layer.usage / layer.usage.sum()).tolist()
                      for layer in model.moe_layers()]
            usage.append({"step": step, "shares": shares})
            for layer in model.moe_layers():
                layer.usage.zero_()

    result = train_lm(model, train_config, shakespeare_split(),
                      aux_loss=MoELlama.aux_loss
                      if isinstance(model, MoELlama) else None,
                      on_log=on_log)
    active = model.active_parameters() if isinstance(model, MoELlama) \
        else result["parameters"]
    return {**result, "active_parameters": active, "usage": usage,
            "model": RACE["model"], "moe": dataclasses.asdict(moe_config),
            "train": dataclasses.asdict(train_config),
            "device": str(next(model.parameters()).device)}
