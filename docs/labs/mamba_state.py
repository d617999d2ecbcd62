# %% [markdown]
# # Mamba's state, measured
#
# The [Mamba chapter](../frontiers/mamba.md) raced a Mamba against a LLaMA
# of the same size and recorded the run. This lab reads that record, tests
# what selectivity buys on a task made for it, then measures the one
# thing the recurrent state promises: a step of
# generation that costs the same at token 10 and at token 400, in time and
# in memory, where the LLaMA's KV cache grows. The models here are the
# race's, freshly initialised: the cost of a step does not depend on what
# the weights have learned.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from cave.fundamentals.data import load_results
from cave.fundamentals.essentials import seed_everything, smooth
from cave.frontiers.mamba import (RACE, Mamba, MambaConfig, MambaMixer,
                                  selective_scan)
from cave.transformers.llama import Llama, LlamaConfig

lab_start = time.perf_counter()
race = load_results("mamba")
print(race["command"])
for name in ("llama", "mamba"):
    print(f"{name}: {race[name]['parameters']:,} weights, validation loss "
          f"{race[name]['val_loss']:.4f}")

# %% [markdown]
# ## The training curves
#
# One batch's loss every twenty steps, smoothed over five points. The two
# models saw the same batches in the same order.

# %%
fig, ax = plt.subplots(figsize=(7, 3.2))
for name in ("llama", "mamba"):
    train = race[name]["history"]["train"]
    ax.plot([r["step"] for r in train],
            smooth([r["loss"] for r in train], 5), label=name)
ax.set_xlabel("optimiser step")
ax.set_ylabel("training loss")
ax.legend()
plt.show()

# %% [markdown]
# ## What the state keeps: selectivity, tested
#
# The chapter argued that a token-dependent step $\Delta_t$ and
# token-dependent $B_t$, $C_t$ let the model choose what enters its state.
# Here is the task the Mamba paper uses to show it, *selective copying*:
# three data tokens (1 to 6) sit at random places among ten slots of
# noise (0); after them come three markers (7), and at each marker the
# model must name the next data token, in order. Where the data sit
# changes from sequence to sequence, so no fixed kernel can pick them out.
#
# Two tiny Mambas learn it from the same seed and batches, 120 steps
# each: ours, and one made time-invariant, whose $\Delta$, $B$ and $C$ are
# learned constants (S4D's design, the paper's ablation). Accuracy is
# measured on 500 fresh sequences.

# %%
DATA, SHOWN, SLOTS = 6, 3, 10  # symbols, data tokens, slots of noise


def copy_batch(n, generator):
    """(n, SLOTS + SHOWN) sequences and the (n, SHOWN) tokens to name."""
    where = torch.rand(n, SLOTS, generator=generator).argsort(1)[:, :SHOWN]
    where = where.sort(1).values  # (n, SHOWN), in order
    data = torch.randint(1, DATA + 1, (n, SHOWN), generator=generator)
    seq = torch.zeros(n, SLOTS + SHOWN, dtype=torch.long)
    seq.scatter_(1, where, data)
    seq[:, SLOTS:] = DATA + 1  # the markers
    return seq, data


class TimeInvariantMixer(MambaMixer):
    """The Mamba layer with delta, B and C learned constants."""

    def __init__(self, config, layer_idx=0):
        super().__init__(config, layer_idx)
        self.B_fixed = nn.Parameter(0.5 * torch.randn(config.d_state))
        self.C_fixed = nn.Parameter(0.5 * torch.randn(config.d_state))

    def forward(self, u, state=None):
        batch, T, _ = u.shape
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, E) each
        k = self.conv1d.kernel_size[0]
        x = F.pad(x.transpose(1, 2), (k - 1, 0))  # causal
        x = F.silu(self.conv1d(x)).transpose(1, 2)  # (B, T, E)
        delta = F.softplus(self.dt_proj.bias).expand(batch, T, -1)
        N = self.d_state
        y, _ = selective_scan(x, delta, -torch.exp(self.A_log),
                              self.B_fixed.expand(batch, T, N),
                              self.C_fixed.expand(batch, T, N), self.D)
        return self.out_proj(y * F.silu(z))


def copy_accuracy(time_invariant, steps=120):
    seed_everything(0)
    model = Mamba(MambaConfig(vocab_size=DATA + 2, dim=32, n_layers=2,
                              d_state=8))
    if time_invariant:  # same initial weights, constant delta, B, C
        for i, block in enumerate(model.layers):
            fixed = TimeInvariantMixer(model.config, i)
            fixed.load_state_dict(block.mixer.state_dict(), strict=False)
            block.mixer = fixed
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = copy_batch(32, gen)
        logits, _ = model(x)  # answers at the markers, one step early
        loss = F.cross_entropy(logits[:, SLOTS - 1:-1].flatten(0, 1),
                               y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = copy_batch(500, torch.Generator().manual_seed(1))
    with torch.no_grad():
        guess = model(x)[0][:, SLOTS - 1:-1].argmax(-1)  # (500, SHOWN)
    return (guess == y).float().mean().item()


copy_scores = {"selective (ours)": copy_accuracy(False),
               "time-invariant": copy_accuracy(True)}
for name, score in copy_scores.items():
    print(f"{name:17s} selective copying accuracy {score:.1%} "
          f"(chance {1 / DATA:.1%})")

# %% [markdown]
# Both models have the same convolution, gate and projections; only the
# SSM's inputs differ. Compare the two accuracies: to name *the next* data
# token wherever it lies, the state must let noise pass and take the data
# in, and that is what a token-dependent step does. (Give both 300 steps
# and see whether the time-invariant model closes the gap.)

# %% [markdown]
# ## The cost of one step, as the context grows
#
# Fill each model's memory with a context of $t$ tokens (the LLaMA's KV
# cache, the Mamba's state), then time the next token's forward. The two
# models are timed in turn at each length, best of several tries, so that
# the load of other programs falls on both.

# %%
torch.manual_seed(0)
llama = Llama(LlamaConfig(**RACE["llama"])).eval()
mamba = Mamba(MambaConfig(**RACE["mamba"])).eval()
lengths = [8, 64, 256, 448]
context = torch.randint(0, 65, (1, max(lengths) + 1))


def step_seconds(model, t, tries=5):
    """Best time of the forward of token t after a memory of t tokens."""
    with torch.no_grad():
        if model is llama:
            memory = model.new_cache(1)
            model(context[:, :t], cache=memory, start_pos=0)
            step = lambda: model(context[:, t:t + 1], cache=memory,
                                 start_pos=t)
        else:
            memory = model.new_state(1)
            model(context[:, :t], state=memory)
            saved = ([c.clone() for c in memory.conv],
                     [h.clone() for h in memory.ssm])
            step = lambda: model(context[:, t:t + 1], state=memory)
        best = float("inf")
        for _ in range(tries):
            start = time.perf_counter()
            step()
            best = min(best, time.perf_counter() - start)
            if model is mamba:  # put the state back to t tokens
                memory.conv = [c.clone() for c in saved[0]]
                memory.ssm = [h.clone() for h in saved[1]]
    return best, memory.nbytes


rows = {"llama": [], "mamba": []}
for t in lengths:
    for name, model in (("llama", llama), ("mamba", mamba)):
        rows[name].append(step_seconds(model, t))
print(f"{'context':>8s} {'LLaMA ms':>9s} {'Mamba ms':>9s}")
for i, t in enumerate(lengths):
    print(f"{t:8d} {rows['llama'][i][0] * 1e3:9.2f} "
          f"{rows['mamba'][i][0] * 1e3:9.2f}")

# %% [markdown]
# At these sizes and lengths a step of either model is dominated by its
# fixed work (seven Mamba layers of small operations against four LLaMA
# layers), and attention over a few hundred cached keys adds little: the
# growth of the LLaMA's step shows only at long contexts. Memory is
# another matter. The KV cache above was allocated for the model's whole
# window (its `max_seq_len`); what it must hold grows with every token.

# %%
tokens = [2 ** k for k in range(4, 15)]
kv = [llama.new_cache(1, max_len=t).nbytes for t in tokens]
state = mamba.new_state(1).nbytes
fig, ax = plt.subplots(figsize=(7, 3.2))
ax.loglog(tokens, kv, "o-", label="LLaMA KV cache")
ax.loglog(tokens, [state] * len(tokens), "s-", label="Mamba state")
ax.set_xlabel("tokens of context")
ax.set_ylabel("bytes per sequence (float32)")
ax.legend()
plt.show()
crossing = next(t for t, b in zip(tokens, kv) if b > state)
print(f"the KV cache outgrows the state at {crossing:,} tokens or fewer "
      f"(state {state:,} bytes)")

# %% [markdown]
# ## Try it yourself
#
# 1. The state keeps `d_state` numbers per channel. Double it to 32: how
#    many bytes does the state take now, and where does the KV cache
#    overtake it?
# 2. Run the race's Mamba with `parallel_scan=True`: are the logits the
#    same, and which forward is faster here, at 64 tokens?
# 3. Store the KV cache in bfloat16 (`dtype=torch.bfloat16` in
#    `new_cache`): by how much does that move the crossing?

# %% [markdown]
# ### Solution 1: a state twice as deep
#
# The SSM part of the state doubles; the convolution's window does not
# change. The crossing moves out by the same factor, roughly.

# %%
deep = Mamba(MambaConfig(**{**RACE["mamba"], "d_state": 32}))
deep_state = deep.new_state(1).nbytes
deep_crossing = next(t for t, b in zip(tokens, kv) if b > deep_state)
print(f"d_state 32: {deep_state:,} bytes; the KV cache overtakes it by "
      f"{deep_crossing:,} tokens")
assert deep_state > state and deep_crossing >= crossing

# %% [markdown]
# ### Solution 2: the parallel scan in the model
#
# Same weights, same logits (to float32 rounding); on this CPU the loop
# is the faster scan, as the chapter measured.

# %%
parallel = Mamba(MambaConfig(**{**RACE["mamba"], "parallel_scan": True}))
parallel.load_state_dict(mamba.state_dict())
x = context[:, :64]
with torch.no_grad():
    times = {}
    for name, model in (("loop", mamba), ("parallel", parallel)) * 2:
        start = time.perf_counter()
        logits = model(x)[0]
        times[name] = min(times.get(name, 1e9),
                          time.perf_counter() - start)
    diff = (mamba(x)[0] - parallel(x)[0]).abs().max().item()
print(f"largest difference {diff:.1e}; loop {times['loop'] * 1e3:.1f} ms, "
      f"parallel {times['parallel'] * 1e3:.1f} ms")
assert diff < 1e-4

# %% [markdown]
# ### Solution 3: a bfloat16 KV cache
#
# Half the bytes per token, so the KV cache needs twice the tokens to
# outgrow the same state (which keeps its SSM part in float32 anyway).

# %%
kv16 = [llama.new_cache(1, max_len=t, dtype=torch.bfloat16).nbytes
        for t in tokens]
crossing16 = next(t for t, b in zip(tokens, kv16) if b > state)
print(f"bfloat16 KV cache: outgrows the state at {crossing16:,} tokens "
      f"or fewer")
assert kv16[0] * 2 == kv[0] and crossing16 == 2 * crossing

# %%
print(f"this lab ran in {time.perf_counter() - lab_start:.1f} s")
