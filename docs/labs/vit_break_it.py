# %% [markdown]
# # Break the ViT
#
# The [Vision Transformer chapter](../transformers/vit.md) built a ViT
# that reads digits as 49 patches of 4×4 pixels (and trained one with 16
# patches of 7×7), with a learned table of positions, trained with a
# warm-up at the start. In this lab we break it three ways and watch what
# each costs:
#
# - **no position embeddings**: the encoder sees a bag of patches;
# - **patches of 14×14** instead of 4×4: four tokens per digit;
# - **no warm-up**: the full learning rate from the first step.
#
# Two kinds of evidence. First the ViT that the chapter's full run
# trained (its weights ship with the book): we take its positions away
# and shuffle its patches, which costs a few forward passes. Then short
# training runs of a small ViT (width 32, two layers, 60 steps of 32
# digits on 640 training digits, validated on 500), so that the lab
# stays within seconds. Short runs show how fast each version *starts*
# learning, which is not the same as where it ends: one seed, one short
# run, directions rather than final scores.

# %%
import dataclasses
import time

import matplotlib.pyplot as plt
import torch

from cave.fundamentals.data import load_results, mnist_split
from cave.fundamentals.deep_networks import evaluate, train
from cave.fundamentals.essentials import seed_everything, smooth
from cave.transformers.vit import (VIT_RECIPE, ViT, ViTConfig,
                                   load_trained_vit, patchify)

lab_start = time.perf_counter()
(train_x, train_y), (val_x, val_y) = mnist_split(seed=0)
val_data = (val_x[:500], val_y[:500])
trained = load_trained_vit(config=ViTConfig(
    **load_results("vit")["vit"]["model"]))
print("the full run's ViT:", sum(p.numel() for p in trained.parameters()),
      "parameters")

# %% [markdown]
# ## What the trained ViT does with its positions
#
# Zeroing the table is exactly a ViT without positions (the same model
# with `position_embeddings=False`). Shuffling the patches of every digit,
# the same way for all, keeps every patch intact and moves it elsewhere:
# a ViT without positions could not even notice.

# %%
def shuffle_patches(images, order, P):
    """Put the P x P patches of (B, H, W) images in another order."""
    B, H, W = images.shape
    g = H // P
    patches = patchify(images[:, None], P)[:, order]  # (B, N, P*P)
    x = patches.view(B, g, g, P, P).permute(0, 1, 3, 2, 4)
    return x.reshape(B, H, W)


P = trained.config.patch_size  # the full run's: 7, a 4x4 grid
order = torch.randperm(trained.config.grid ** 2,
                       generator=torch.Generator().manual_seed(0))
shuffled = shuffle_patches(val_data[0].float(), order, P).round().byte()
blind = load_trained_vit(config=trained.config)
with torch.no_grad():
    blind.positions.zero_()  # the table gone: a bag of patches
checks = {"as trained": (trained, val_data[0]),
          "positions zeroed": (blind, val_data[0]),
          "patches shuffled": (trained, shuffled),
          "both": (blind, shuffled)}
for name, (model, images) in checks.items():
    _, accuracy, _ = evaluate(model, images, val_data[1])
    print(f"{name:18s} validation accuracy {accuracy:6.2%}")

# %% [markdown]
# The trained ViT leans on its positions: without them it loses much of
# its accuracy, and more still on shuffled digits. Without positions, shuffling changes nothing at all, the last
# two lines agree exactly: attention treats its tokens as a set, and
# only the position table tells it where each patch lies.
#
# ## Training from scratch, broken three ways
#
# Same seed, same data, same batches; one change per run.

# %%
small = ViTConfig(dim=32, depth=2, heads=2, mlp_dim=64)
schedule = dataclasses.replace(VIT_RECIPE, epochs=3, batch_size=32,
                               lr=3e-3)  # float32, as the recipe: at one
# thread, as the lab runs, bfloat16 autocast made these steps slower
train_data = (train_x[:640], train_y[:640])
short_val = (val_x[:500], val_y[:500])
experiments = {
    "as built": (small, schedule),
    "no positions": (dataclasses.replace(small, position_embeddings=False),
                     schedule),
    "patches 14x14": (dataclasses.replace(small, patch_size=14), schedule),
    "no warm-up": (small, dataclasses.replace(schedule, warmup=0.0)),
}
histories = {}
for name, (config, recipe) in experiments.items():
    seed_everything(0)
    model = ViT(config)
    history = train(model, train_data, short_val, recipe)
    histories[name] = history
    print(f"{name:14s} {1 + config.grid ** 2:3d} tokens  first-epoch loss "
          f"{history.train_loss[0]:.3f}  best val acc "
          f"{history.best_val_acc:6.2%}  {history.seconds[-1]:4.1f} s")

# %% [markdown]
# ## The curves
#
# Every step's training loss, smoothed over 8 steps.

# %%
fig, ax = plt.subplots(figsize=(8, 4.2))
for name, history in histories.items():
    ax.plot(smooth(history.step_loss, window=8), label=name, lw=1.6)
ax.set_xlabel("step")
ax.set_ylabel("training loss (smoothed)")
ax.set_title(f"A small ViT, broken three ways: the first "
             f"{len(history.step_loss)} steps")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What happened, and why
#
# **Patches of 14×14** learn fastest here, by far. Four tokens, each a
# quarter of the digit, are an easy start: the first linear layer sees
# whole strokes, and attention has almost nothing to sort out. The
# 4×4 patches start slowly because their tokens mean little alone and
# the positions that would arrange them begin as tiny random vectors.
# The price of coarse patches comes later: one linear map must recognise
# every variant of a quarter-digit, with no weight sharing inside the
# patch. Fine patches cost compute: the runs' seconds grow with the
# number of tokens. The chapter's full run settles between the two, on
# 7×7 patches: cheap enough for many epochs, small enough that each
# patch holds a piece of a stroke.
#
# **No positions** looks harmless in a short run, because the positions
# of the built model have not been learned yet either: both start as a
# bag of patches. The trained model above shows what the table is worth
# once it has been learned.
#
# **No warm-up.** At this small scale and learning rate the difference
# is small: a slightly different start. Warm-up guards against the first
# steps, when Adam's estimate of each gradient's scale rests on a
# handful of batches and a full-size step can throw attention's softmax
# into saturation; larger ViTs at larger learning rates diverge outright
# without it, which is why every ViT recipe warms up.
#
# ## Try it yourself
#
# 1. Raise the peak learning rate to 1e-2 and compare warm-up against
#    no warm-up again.
# 2. Try patches of 7×7 (16 tokens): where does it start, between 4 and
#    14?

# %% [markdown]
# ### Solution 1: warm-up at a higher learning rate
#
# At 1e-2, 60 steps leave both runs close to where they started, and
# the printout says which ended ahead in this one seed: a gap of a few
# points between two models that have barely begun. Warm-up's protection
# matters for larger models and longer runs, where an early blow-up is
# not recovered.

# %%
def run(config, recipe):
    seed_everything(0)
    return train(ViT(config), train_data, short_val, recipe)


fast = dataclasses.replace(schedule, lr=1e-2)
tries = {
    "lr 1e-2, warm-up": run(small, fast),
    "lr 1e-2, no warm-up": run(small, dataclasses.replace(fast, warmup=0.0)),
}
for name, history in tries.items():
    print(f"{name:20s} first-epoch loss {history.train_loss[0]:.3f}  "
          f"best val acc {history.best_val_acc:6.2%}")

# %% [markdown]
# ### Solution 2: patches of 7×7
#
# 7×7 patches start between the two: fewer, larger tokens than 4×4,
# more than 14×14.

# %%
history = run(dataclasses.replace(small, patch_size=7), schedule)
print(f"patches 7x7 first-epoch loss {history.train_loss[0]:.3f}  "
      f"best val acc {history.best_val_acc:6.2%}")
print(f"the lab ran in {time.perf_counter() - lab_start:.1f} s")
