# %% [markdown]
# # Watch the tiles
#
# The [flash attention chapter](../frontiers/flash_attention.md) proved
# its tiled attention equal to PyTorch's. This lab watches the algorithm
# at work on one query, then breaks it the way hand-written versions have
# been broken, and looks at how each mistake shows up in the numbers.
#
# Everything uses the chapter's functions; a broken version is a few
# lines written here, next to what it breaks.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from cave.frontiers.flash_attention import (flash_forward, merge_stats,
                                            softmax_stats)
from cave.fundamentals.essentials import max_diff

lab_start = time.perf_counter()
torch.manual_seed(0)
q = torch.randn(1, 1, 64, 16)  # (B, H, L, E)
k, v = torch.randn(2, 1, 1, 64, 16)  # (B, H_kv, S, E) each
scores = (q @ k.transpose(-1, -2))[0, 0] / 4  # (L, S), for watching only

# %% [markdown]
# ## One row, block by block
#
# The last query's row of 64 scores, read in blocks of 8. After each block
# the running maximum $m$ can only grow; when it does, the running sum
# $\ell$ is multiplied by $e^{m_\text{old} - m_\text{new}} < 1$ before the
# new block's terms are added. The dashed lines are the maximum and sum of
# the whole row: the running values reach them exactly at the last block.

# %%
row = scores[-1]  # (64,)
m, l = torch.tensor(float("-inf")), torch.tensor(0.0)
history = []
for piece in row.split(8):
    m_block, l_block = softmax_stats(piece)
    m, l = merge_stats(m, l, m_block, l_block)
    history.append((m.item(), l.item(), m_block.item()))
m_row, l_row = softmax_stats(row)
print(f"after the last block: m = {m.item():.4f} (row max "
      f"{m_row.item():.4f}), l = {l.item():.4f} (row sum {l_row.item():.4f})")

fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(10, 3.2))
blocks = range(1, len(history) + 1)
ax_m.plot(blocks, [h[0] for h in history], "o-", label="running m")
ax_m.plot(blocks, [h[2] for h in history], "x", label="block's own max")
ax_m.axhline(m_row.item(), ls="--", color="gray")
ax_l.plot(blocks, [h[1] for h in history], "o-", label="running l")
ax_l.axhline(l_row.item(), ls="--", color="gray")
for ax, name in ((ax_m, "maximum"), (ax_l, "sum of exp(s - m)")):
    ax.set_xlabel("blocks read")
    ax.set_title(name)
    ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# Where the block's own maximum (a cross) rises above the running one, the
# sum drops: everything gathered so far is rescaled to the new, larger
# maximum, and then the block's terms are added.
#
# ## Break it: forget to rescale
#
# The rescaling factor $\alpha = e^{m - m'}$ multiplies both the sum and
# the accumulated output. Here is the inner loop written out for one head,
# with a switch that leaves the output unrescaled (the sum still is):

# %%
def tiled(q, k, v, block, rescale_output=True):
    """One head's attention by key blocks: q (L, E), k, v (S, E)."""
    m = torch.full((q.shape[0],), float("-inf"))
    l = torch.zeros(q.shape[0])
    acc = torch.zeros(q.shape[0], v.shape[1])
    for j in range(0, k.shape[0], block):
        s = q @ k[j:j + block].T / q.shape[1] ** 0.5  # (L, bk)
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new[:, None])
        l = alpha * l + p.sum(-1)
        kept = alpha[:, None] * acc if rescale_output else acc  # the bug
        acc = kept + p @ v[j:j + block]  # (L, Ev)
        m = m_new
    return acc / l[:, None]


reference = F.scaled_dot_product_attention(q, k, v)[0, 0]
for block in (64, 16, 4):
    good = tiled(q[0, 0], k[0, 0], v[0, 0], block)
    bad = tiled(q[0, 0], k[0, 0], v[0, 0], block, rescale_output=False)
    print(f"block {block:2d}: rescaled {max_diff(good, reference):.1e}, "
          f"output not rescaled {max_diff(bad, reference):.2f}")

# %% [markdown]
# With one block of 64 there is nothing to rescale, and the bug is
# invisible: a test that uses one block size as large as its sequence
# would pass. With smaller blocks the error is of the order of the output
# itself. Test with several block sizes, including ones that do not
# divide the sequence.
#
# ## Try it yourself
#
# 1. Drop the maximum altogether: use $m = 0$ throughout (plain
#    $e^{s}$). When does that give the right answer, and when does it
#    fail? Try scores scaled by 1, 30 and 100.
# 2. The causal forward skips the key blocks after a query block's last
#    row. Count how many tiles `flash_forward` computes at $N = 1024$,
#    blocks of 64, with and without `is_causal`, and compare the times.
#
# ### Solution 1: no maximum
#
# Mathematically the maximum cancels, so with small scores nothing
# changes; but $e^{s}$ overflows float32 once $s$ passes about 88.

# %%
for factor in (1.0, 30.0, 100.0):
    s = scores[-1] * factor
    plain = torch.exp(s) / torch.exp(s).sum()
    print(f"scores x {factor:5.0f} (max {s.max().item():6.1f}): without "
          f"the maximum, difference {max_diff(plain, torch.softmax(s, -1))}")

# %% [markdown]
# At $\times 1$ the two agree; at $\times 30$ they may still agree if no
# score passes 88; at $\times 100$ the exponentials overflow to infinity
# and the division gives `nan`. The running maximum costs one comparison
# per block and removes the failure.
#
# ### Solution 2: what causal skipping saves

# %%
x = torch.randn(1, 1, 1024, 32)
for causal in (False, True):
    start = time.perf_counter()
    out, _ = flash_forward(x, x, x, is_causal=causal, block_q=64,
                           block_k=64)
    seconds = time.perf_counter() - start
    tiles = sum(-(-min(1024, i + 64) // 64) if causal else 1024 // 64
                for i in range(0, 1024, 64))
    theirs = F.scaled_dot_product_attention(x, x, x, is_causal=causal)
    print(f"causal={causal!s:5}: {tiles:3d} tiles, {1000 * seconds:6.1f} ms,"
          f" difference to PyTorch {max_diff(out, theirs):.1e}")

# %% [markdown]
# The causal run computes 136 of the 256 tiles, a little more than half
# (the diagonal tiles are computed and masked), and its time falls in
# about the same proportion: in Python, time follows the number of tiles.

# %%
print(f"the lab ran in {time.perf_counter() - lab_start:.1f} s")
