# %% [markdown]
# # A state of fixed size
#
# The [linear attention chapter](../frontiers/linear_attention.md) turned
# causal attention into a recurrence: the state
# $S = \sum_j \phi(k_j) v_j^\top$ has $D \times d_v$ numbers however many
# tokens it has seen. Softmax attention keeps every key and value. What
# does the fixed size cost? This lab stores key-value pairs in the state
# and asks it to give the values back, as attention is asked to whenever a
# model looks something up in its context.
#
# The test: $n$ random keys with random values, all written into one
# state, then each key used as a query. A perfect memory returns the
# value stored under that key. We measure how close the answer is, as a
# cosine similarity, for softmax attention (which keeps everything) and
# for linear attention with elu + 1 features.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from cave.frontiers.linear_attention import (RandomFeatures, elu_features,
                                             linear_attention)

lab_start = time.perf_counter()


def recall(n, d=16, feature_map=elu_features, sharpness=4.0, seed=0):
    """Mean cosine between the value stored under each of n keys and what
    attention returns when that key is the query."""
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(n, d, generator=g), dim=-1) * sharpness
    values = torch.randn(n, d, generator=g)
    softmax_out = F.scaled_dot_product_attention(keys, keys, values,
                                                 scale=1.0)
    linear_out = linear_attention(feature_map(keys), feature_map(keys),
                                  values)
    return (F.cosine_similarity(softmax_out, values).mean().item(),
            F.cosine_similarity(linear_out, values).mean().item())


sizes = [2, 4, 8, 16, 32, 64, 128, 256]
results = [recall(n) for n in sizes]
print(f"{'pairs':>6s} {'softmax':>8s} {'linear':>8s}")
for n, (soft, lin) in zip(sizes, results):
    print(f"{n:6d} {soft:8.3f} {lin:8.3f}")

# %% [markdown]
# ## What the numbers say
#
# Softmax attention with sharp keys picks out the one stored key that
# matches the query; at every size here the values come back nearly
# intact. Linear attention blurs from the start: elu + 1
# features are all positive, so every stored pair adds to every answer,
# and with $D = 16$ features the state cannot keep more than about 16
# independent directions apart. Draw it:

# %%
fig, ax = plt.subplots(figsize=(6, 3.6))
ax.semilogx(sizes, [r[0] for r in results], "o-", base=2,
            label="softmax (keeps every pair)")
ax.semilogx(sizes, [r[1] for r in results], "o-", base=2,
            label="linear, elu + 1, D = 16")
ax.axvline(16, color="gray", ls="--", lw=1)
ax.set_xlabel("key-value pairs stored")
ax.set_ylabel("cosine of recalled to stored value")
ax.set_title("recall from a state of fixed size")
ax.legend()
fig.tight_layout()

# %% [markdown]
# ## Try it yourself
#
# 1. Give the state more room: Performer's random features with
#    $m = 16, 64, 256$ features of the same 16-dimensional keys. Does a
#    larger state recall more pairs?
# 2. The keys above have length 4 (`sharpness`). Make them sharper
#    (length 8) and blunter (length 1). Which model gains, which loses?
#
# ### Solution 1: a bigger state
#
# Random features approximate the softmax kernel; with more of them the
# state has more numbers, $m \times d_v$, and the approximation sharpens.
# With scale 1, softmax attention's kernel here is exactly
# $e^{q \cdot k}$, the kernel the random features estimate, so the keys
# go in as they are.

# %%
for m in (16, 64, 256):
    phi = RandomFeatures(16, m, seed=0)
    row = [recall(n, feature_map=phi)[1] for n in (4, 16, 64)]
    print(f"m = {m:3d} random features: recall at 4, 16, 64 pairs " +
          ", ".join(f"{r:.3f}" for r in row))

# %% [markdown]
# More features recall better, but slowly: the estimate of the softmax
# kernel improves only as $1 / \sqrt m$, and at these sharp keys the
# kernel's values span several orders of magnitude, which a few hundred
# random features estimate poorly. A fixed state can be made larger, not
# unlimited.
#
# ### Solution 2: sharper and blunter keys

# %%
for sharpness in (1.0, 4.0, 8.0):
    soft, lin = recall(32, sharpness=sharpness)
    print(f"key length {sharpness:3.0f}: 32 pairs, softmax {soft:.3f}, "
          f"linear {lin:.3f}")

# %% [markdown]
# Sharper keys help softmax attention: the exponential turns a larger
# score gap into a nearly one-hot choice. They help linear attention far
# less, because elu + 1 grows only linearly for positive scores: the
# kernel cannot become sharp, which is the price of a kernel that factors.

# %%
print(f"the lab ran in {time.perf_counter() - lab_start:.1f} s")
