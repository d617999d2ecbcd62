# %% [markdown]
# # Break the RNN: no gradient clipping
#
# The [recurrent networks chapter](../classical/rnn.md) measured how a
# gradient travelling back through a vanilla RNN can grow by orders of
# magnitude, and built `clip_grad_norm_`, which caps the length of the
# whole gradient and keeps its direction. Here we watch what one exploding
# step does to a real training run, and what clipping does about it.
#
# The model is the simplest recurrent language model: an embedding, one
# vanilla `tanh` RNN layer (the chapter's own `RNN`) and a linear layer
# to Tiny Shakespeare's 65 characters. It trains with plain SGD and
# momentum on random 50-character windows. Three runs, identical except
# for the learning rate and clipping, each 250 steps: a few seconds each
# on a laptop CPU.

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn as nn
import torch.nn.functional as F

from cave.classical.rnn import RNN, clip_grad_norm_
from cave.fundamentals.data import Batches, shakespeare_split
from cave.fundamentals.essentials import seed_everything, smooth

lab_start = time.perf_counter()
tokenizer, train_ids, val_ids = shakespeare_split()


class CharRNN(nn.Module):
    """Embedding -> one vanilla RNN layer -> Linear to the characters."""

    def __init__(self, vocab_size: int, hidden: int = 128):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 32)
        self.rnn = RNN(32, hidden)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))  # (B, T, H)
        return self.head(out)  # (B, T, V)


def run(lr: float, clip: float | None, steps: int = 250):
    """Train from the same seed; return per-step losses and gradient norms.

    The norm is measured before clipping: it is what the gradient was.
    """
    seed_everything(0)  # the same initial weights
    model = CharRNN(tokenizer.vocab_size)
    batches = Batches(train_ids, 32, 50, seed=0)  # the same batches
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, norms = [], []
    for _ in range(steps):
        x, y = batches.next()  # (B, T) each
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimiser.zero_grad()
        loss.backward()
        norm = clip_grad_norm_(model.parameters(),
                               clip if clip is not None else float("inf"))
        optimiser.step()
        losses.append(loss.item())
        norms.append(norm.item())
    return losses, norms


runs = {"lr 0.5, no clipping": (0.5, None),
        "lr 1.0, no clipping": (1.0, None),
        "lr 1.0, clipped at 1.0": (1.0, 1.0)}
results = {}
for name, (lr, clip) in runs.items():
    start = time.perf_counter()
    losses, norms = run(lr, clip)
    results[name] = (losses, norms)
    print(f"{name:24s} first loss {losses[0]:.2f}, largest gradient norm "
          f"{max(norms):7.1f}, mean loss of the last 50 steps "
          f"{sum(losses[-50:]) / 50:6.2f}   "
          f"({time.perf_counter() - start:.1f} s)")

# %% [markdown]
# With `max_norm=inf`, `clip_grad_norm_` only measures: the scale factor
# $\min(1, \infty / \lVert g \rVert)$ is 1. So the three runs differ only
# where the printout says they do.
#
# ## The curves

# %%
fig, (ax_loss, ax_norm) = plt.subplots(1, 2, figsize=(11, 4))
for name, (losses, norms) in results.items():
    ax_loss.plot(smooth(losses, window=10), label=name)
    ax_norm.semilogy(norms, label=name, lw=0.9)
ax_loss.axhline(torch.log(torch.tensor(65.0)).item(), color="gray", ls=":",
                label="uniform guess, ln 65")
ax_loss.set_yscale("log")  # the broken run is an order of magnitude up
ax_loss.set_xlabel("step")
ax_loss.set_ylabel("training loss (smoothed over 10 steps)")
ax_loss.set_title("Loss")
ax_loss.legend(fontsize=8)
ax_norm.axhline(1.0, color="k", ls="--", lw=1, label="clipping threshold")
ax_norm.set_xlabel("step")
ax_norm.set_ylabel("gradient norm before clipping")
ax_norm.set_title("Gradient norm")
ax_norm.legend(fontsize=8)
fig.suptitle("A vanilla RNN on Tiny Shakespeare, with and without clipping")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What happened, and why
#
# **At learning rate 0.5** the run is healthy without any help: the
# gradient norm spikes at the very start, when the untrained network's
# predictions are furthest off, and settles; the loss falls steadily.
#
# **At learning rate 1.0, unclipped**, the first steps have the same
# large gradient, now multiplied by twice the rate, and SGD with momentum
# keeps moving in that direction for several more steps. The weights land
# where the recurrence amplifies: the gradient norm explodes (right), the
# logits grow huge, and the loss jumps far above the uniform guess. From
# there every gradient is large and points somewhere different; the run
# never finds its way back in the steps it has. One bad stretch at the
# start ruined it.
#
# **At learning rate 1.0, clipped at 1.0**, the early steps are cut to
# length 1 in the same direction. Nothing else changes: once the gradient
# norm falls below the threshold (the right-hand plot), clipping does
# nothing at all, and the run trains at the higher rate. Clipping is not
# a regulariser or a smoother; it is insurance against the rare step that
# would otherwise be catastrophic, which is why nearly every recurrent
# model, and every large Transformer, trains with it.
#
# ## Try it yourself
#
# 1. Raise the learning rate of the clipped run to 2.0, then 4.0. Where
#    does clipping stop being enough, and why (think of what a step of
#    length `lr * max_norm` does)?
# 2. Clip at 0.1 instead of 1.0. The run is stable, but is it as fast?
#    Clipping every step turns SGD into a fixed-length step.
# 3. Replace `RNN` with the chapter's `LSTM` (same arguments) and repeat
#    the unclipped run at learning rate 1.0. Does the gated cell explode
#    less?
# 4. Train with `torch.optim.Adam(lr=1e-2)` instead of SGD. Adam divides
#    each step by a running size of the gradient: does it need clipping?
# 5. Lengthen the windows from 50 to 200 characters. The chapter showed
#    that a longer recurrence multiplies more Jacobians; does the
#    unclipped run at learning rate 0.5 still survive?

# %%
print(f"the lab ran in {time.perf_counter() - lab_start:.1f} s")
