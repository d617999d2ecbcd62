# %% [markdown]
# # Race the optimisers
#
# The [optimisation chapter](../techniques/optimization.md) raced five
# optimisers on MNIST, each at the learning rate its own sweep chose. In
# this lab we run a smaller race ourselves and ask the question the
# chapter warned about: what happens when every optimiser gets the *same*
# learning rate, the one tuned for Adam, as in many a comparison?
#
# To keep each run to a moment, the network is the chapter's MLP with two
# hidden layers of 64 (no batch norm, no dropout), trained for two epochs
# on 2,048 digits and validated on 1,000, with the chapter's warm-up and
# cosine. `race_one` is the chapter's own function: it builds the
# network, the optimiser (Muon with AdamW for what is not a hidden
# matrix) and the schedule, trains, and returns the losses.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from cave.fundamentals.data import load_results, mnist_split
from cave.fundamentals.essentials import max_diff, smooth
from cave.techniques.optimization import (RACE, Adam, RaceConfig,
                                          accumulate, race_one)

lab_start = time.perf_counter()
(train_x, train_y), (val_x, val_y) = mnist_split(seed=0)
train_data = (train_x[:2048], train_y[:2048])
val_data = (val_x[:1000], val_y[:1000])
small = RaceConfig(epochs=2, hidden=64, batch_size=64)
recorded = load_results("optimization")  # the chapter's full race
print("training digits", tuple(train_data[0].shape), "| steps per run",
      small.epochs * len(train_data[0]) // small.batch_size)

# %% [markdown]
# ## Adam's rate for all, or each its own
#
# The common mistake: tune the learning rate for Adam, then give that
# rate to every optimiser. Here every optimiser runs at the rate the
# chapter's sweep chose for Adam, and at the rate it chose for itself
# (for Adam and AdamW the two are the same run).

# %%
adam_lr = recorded["Adam"]["best_lr"]
runs = {}
for name in RACE:
    own = recorded[name]["best_lr"]
    for label, lr in [("Adam's", adam_lr), ("its own", own)]:
        if label == "its own" and own == adam_lr:
            runs[name, label] = runs[name, "Adam's"]  # the same run
            continue
        runs[name, label] = race_one(name, lr, small, train_data, val_data)
        print(f"{name:6s} lr {lr:<6g} ({label:7s} rate) validation loss "
              f"{runs[name, label]['val_loss']:.3f}, accuracy "
              f"{runs[name, label]['val_acc']:.1%}")

# %% [markdown]
# The training losses, smoothed over 8 steps: solid lines at each
# optimiser's own rate, dashed at Adam's.

# %%
fig, ax = plt.subplots(figsize=(8, 4.2))
for i, name in enumerate(RACE):
    for label, style in [("its own", "-"), ("Adam's", "--")]:
        ax.plot(smooth(runs[name, label]["step_loss"], 8), style,
                color=f"C{i}", lw=1.5, label=f"{name}, {label} rate")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("training loss (smoothed)")
ax.set_title("The same race at Adam's rate and at each one's own")
ax.legend(fontsize=7, ncol=2)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What happened, and why
#
# **SGD** at Adam's rate barely learns in 64 steps. Its step is the
# gradient times the rate, and this network's gradients are small; Adam
# divides them by their own size, SGD does not, so SGD's own rate is
# many times Adam's.
#
# **Muon** at Adam's rate starves too. Its orthogonalised update has
# singular values near 1, so each entry of a 64-wide matrix's update is
# about $1/8$ of the rate: its useful rates are an order of magnitude
# above Adam's.
#
# **Lion** is the interesting one: on this short run, Adam's rate suits
# it at least as well as its own (compare its two printed lines). Every
# Lion step moves every weight by the full rate; early in training that
# is fast progress, and only late, when the weights should settle, does
# it become jitter. The advice to give Lion a rate 3 to 10 times below
# AdamW's comes from long runs; the chapter's four-epoch sweep preferred
# its smaller rate, by a small margin.
#
# A race at Adam's rate ranks SGD and Muon far behind; at their own rates
# the chapter found them among the best. Runs this short, on one seed,
# move when anything changes; what holds is the size of the gap between
# a rule at a borrowed rate and the same rule at its own.
#
# ## Try it yourself
#
# 1. Sweep Lion on this small task over 3e-4, 1e-3, 3e-3 and 1e-2. Does
#    the best rate match the chapter's?
# 2. Is Nesterov worth it? Run SGD with momentum 0.9 at its own rate
#    with and without Nesterov.
# 3. Train one step of a small network with a batch of 128, and one step
#    with the same batch as four micro-batches through the chapter's
#    `accumulate`. Are the weights the same?

# %% [markdown]
# ### Solution 1: sweep Lion

# %%
lion_sweep = {lr: race_one("Lion", lr, small, train_data, val_data)
              for lr in (3e-4, 1e-3, 3e-3, 1e-2)}
for lr, run in lion_sweep.items():
    print(f"Lion lr {lr:g}: validation loss {run['val_loss']:.3f}")
best = min(lion_sweep, key=lambda lr: lion_sweep[lr]["val_loss"])
print(f"best here {best:g}; the chapter's sweep chose "
      f"{recorded['Lion']['best_lr']:g}")

# %% [markdown]
# Compare the two printed rates. A run of 64 steps rewards the fast early
# progress of a large rate more than the chapter's 252 steps do, so if
# the two differ, the short run's choice is the larger one. A sweep
# tunes the rate for the budget it was run with: sweep again when the
# number of steps changes.

# %% [markdown]
# ### Solution 2: Nesterov or not
#
# `RACE` holds each racer's fixed settings; the SGD entry uses Nesterov.
# We switch it off for one run, then restore it.

# %%
sgd_lr = recorded["SGD"]["best_lr"]
with_nesterov = race_one("SGD", sgd_lr, small, train_data, val_data)
RACE["SGD"][1]["nesterov"] = False
try:
    without = race_one("SGD", sgd_lr, small, train_data, val_data)
finally:
    RACE["SGD"][1]["nesterov"] = True
print(f"SGD lr {sgd_lr:g}, momentum 0.9: validation loss with Nesterov "
      f"{with_nesterov['val_loss']:.3f}, without "
      f"{without['val_loss']:.3f}")

# %% [markdown]
# Nesterov's run ends lower. This rate is near the edge of what SGD
# tolerates here (the chapter's sweep diverged at three times it), and
# there Nesterov's look-ahead damps the oscillations that plain momentum
# lets grow. Far below the edge the two behave alike.

# %% [markdown]
# ### Solution 3: accumulation equals the large batch

# %%
torch.manual_seed(0)
nets = [nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(),
                      nn.Linear(32, 10)) for _ in range(2)]
nets[1].load_state_dict(nets[0].state_dict())
x, y = train_x[:128].float() / 255, train_y[:128]
optimisers = [Adam(net.parameters(), lr=1e-3) for net in nets]
optimisers[0].zero_grad()
nn.functional.cross_entropy(nets[0](x), y).backward()  # one batch of 128
optimisers[0].step()
optimisers[1].zero_grad()
accumulate(nets[1], list(zip(x.split(32), y.split(32))))  # 4 of 32
optimisers[1].step()
gap = max(max_diff(a, b) for a, b in zip(nets[0].parameters(),
                                         nets[1].parameters()))
print(f"weights after one step, batch 128 against 4 x 32: {gap:.1e}")

# %% [markdown]
# Equal to float32 rounding: the micro-batches' gradients add up, in
# another order, to the large batch's.

# %%
print(f"the lab ran in {time.perf_counter() - lab_start:.1f} s")
