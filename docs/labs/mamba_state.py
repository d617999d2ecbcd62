# %% [markdown]
# # Mamba's state, measured
#
# The [Mamba chapter](../frontiers/mamba.md) raced a Mamba against a LLaMA
# of the same size and recorded the run. This lab reads that record, then
# measures the one thing the recurrent state promises: a step of
# generation that costs the same at token 10 and at token 400, in time and
# in memory, where the LLaMA's KV cache grows. The models here are the
# race's, freshly initialised: the cost of a step does not depend on what
# the weights have learned.

# %%
import time

import matplotlib.pyplot as plt
import torch

from cave.fundamentals.data import load_results
from cave.fundamentals.essentials import smooth
from cave.frontiers.mamba import RACE, Mamba, MambaConfig
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
