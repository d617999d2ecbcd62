# %% [markdown]
# # Break the CNN
#
# The [CNN chapter](../classical/cnn.md) trained a small ResNet past 99 %
# on 8,000 digits, and measured that a plain network of 21 convolutions
# trains slower than the same network with shortcuts. Two ingredients held
# that network up: **batch norm** after every convolution and **residual**
# shortcuts around every pair of them. In this lab we take them away, alone
# and together, from a network of 17 convolutions, and watch it train.
#
# To keep every run to a few seconds, the digits are shrunk to 14×14
# with the chapter's own average pooling, each run sees 1,024 of them for
# two epochs, and the networks are narrow (16 and 32 channels). Short runs
# exaggerate differences in the speed of learning; that is what we want
# to see.

# %%
import dataclasses
import time

import matplotlib.pyplot as plt
import torch

from cave.classical.cnn import ResNet, ResNetConfig, avg_pool2d
from cave.fundamentals.data import mnist_split
from cave.fundamentals.deep_networks import TrainConfig, train
from cave.fundamentals.essentials import seed_everything, smooth

lab_start = time.perf_counter()
(train_x, train_y), (val_x, val_y) = mnist_split(seed=0)


def shrink(images: torch.Tensor) -> torch.Tensor:
    """uint8 digits (N, 28, 28) -> uint8 (N, 14, 14), 2x2 averages."""
    small = avg_pool2d(images.unsqueeze(1).float(), 2)  # (N, 1, 14, 14)
    return small.squeeze(1).round().to(torch.uint8)  # (N, 14, 14)


train_data = (shrink(train_x[:1024]), train_y[:1024])
val_data = (shrink(val_x[:500]), val_y[:500])
print("training digits", tuple(train_data[0].shape),
      "| validation digits", tuple(val_data[0].shape))

# %% [markdown]
# ## The experiments
#
# Every run uses the same seed, data, optimiser and schedule; only the
# network changes: two stages of four blocks (17 convolutions), with or
# without batch norm, with or without shortcuts. Without batch norm the
# convolutions get their biases back; initialisation stays Kaiming's.

# %%
schedule = TrainConfig(epochs=2, batch_size=32, lr=3e-3, max_shift=1)
experiments = {
    "BN + residual": dict(),
    "BN, plain": dict(residual=False),
    "no BN, residual": dict(batch_norm=False),
    "no BN, plain": dict(batch_norm=False, residual=False),
}
histories = {}
for name, changes in experiments.items():
    config = ResNetConfig(stem_channels=16, widths=(16, 32), blocks=(4, 4),
                          **changes)
    seed_everything(0)
    model = ResNet(config)
    history = train(model, train_data, val_data, schedule)
    histories[name] = history
    print(f"{name:16s} {model.depth} convolutions   final train loss "
          f"{history.train_loss[-1]:6.3f}   best val acc "
          f"{history.best_val_acc:6.2%}   {history.seconds[-1]:4.1f} s")

# %% [markdown]
# ## The curves
#
# Every step's training loss, smoothed over 8 steps, on a log scale.

# %%
fig, ax = plt.subplots(figsize=(8, 4.2))
for (name, history), style in zip(histories.items(),
                                  ["-", "-", "--", "--"]):
    ax.plot(smooth(history.step_loss, window=8), style, label=name, lw=1.6)
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("training loss (smoothed)")
ax.set_title("Batch norm and residuals, taken away one at a time")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What happened, and why
#
# **Batch norm and shortcuts.** The chapter's network, only deeper: it
# learns steadily from the first steps.
#
# **Batch norm, no shortcuts.** The same 17 convolutions without the skip
# paths learn far more slowly, the chapter's measurement again. Batch norm
# keeps every layer's *output* at a healthy scale, but not the gradient
# flowing back through seventeen of them: the layers get gradients of very
# different sizes, and no single learning rate suits them all.
#
# **No batch norm, shortcuts.** Perhaps the surprise: the shortcuts alone
# do not save the network. Each block adds its output to the running sum
# $x + F(x)$, so with Kaiming-initialised blocks the signal's variance
# grows with every block and the network starts far from a trainable
# scale: its first losses, the top curve, are several times those of the
# others. Residual networks without normalisation need their branches
# scaled down at initialisation (for example the last layer of each
# branch set to zero, as in Fixup or "zero-init residual") to train.
#
# **Neither.** Nothing keeps the signal at a trainable scale, and nothing
# carries the gradient around the layers: in this short run the network
# learns next to nothing.
#
# These are short runs on a small subset with one seed, so the numbers
# will move if you change anything, but the order of the first two and
# the failure of the last two are what the chapter's argument predicts.
#
# ## Try it yourself
#
# 1. Make the deep networks deeper, `blocks=(8, 8)`. Which runs get worse,
#    and which hardly notice?
# 2. Zero-initialise the residual branches: after building the model, set
#    every block's `bn2.weight` to zero (with batch norm) or its
#    `conv2.weight` to zero (without). Every block then starts as the
#    identity. Does "no BN, residual" train now?
# 3. Raise the learning rate tenfold. Which networks survive without batch
#    norm?
# 4. Swap the stem's max pool off with `stem_pool=False`. How much slower
#    is each step, and does accuracy change?

# %% [markdown]
# ### Solutions: one epoch each
#
# Each solution trains for one epoch (32 steps) to keep the lab quick, and
# compares with the first epoch of the runs above, which saw the same
# digits. `one_epoch` builds a network from the lab's settings plus the
# changes asked for, trains it, and prints its first-epoch numbers.

# %%
def one_epoch(name, changes, schedule_changes=None, prepare=None):
    """Train ResNetConfig(lab's settings + changes) for one epoch."""
    config = ResNetConfig(stem_channels=16, widths=(16, 32), blocks=(4, 4))
    config = dataclasses.replace(config, **changes)
    epoch = dataclasses.replace(schedule, epochs=1, **(schedule_changes or {}))
    seed_everything(0)
    model = ResNet(config)
    if prepare is not None:
        prepare(model)
    history = train(model, train_data, val_data, epoch)
    print(f"{name:28s} {model.depth} convolutions   epoch-1 train loss "
          f"{history.train_loss[0]:6.3f}   val acc {history.val_acc[0]:6.2%}"
          f"   {history.seconds[0]:4.1f} s")
    return history


def first_epoch_of(name):
    history = histories[name]
    print(f"{name + ' (above)':28s} 17 convolutions   epoch-1 train loss "
          f"{history.train_loss[0]:6.3f}   val acc {history.val_acc[0]:6.2%}"
          f"   {history.seconds[0]:4.1f} s")


# %% [markdown]
# ### Solution 1: twice as deep
#
# With batch norm, 33 convolutions against 17. (The networks without batch
# norm already fail at 17; the next solution takes one of them up.)

# %%
for name, changes in [("BN + residual", dict()),
                      ("BN, plain", dict(residual=False))]:
    first_epoch_of(name)
    one_epoch(name + ", blocks (8, 8)", dict(blocks=(8, 8), **changes))

# %% [markdown]
# The residual network hardly notices the extra sixteen convolutions: its
# first-epoch loss and accuracy stay where they were, each step costing
# about twice as much. The plain one gets worse: twice as many layers
# for the backward signal to cross, and nothing to carry it around them.

# %% [markdown]
# ### Solution 2: zero-initialised residual branches
#
# Without batch norm, set every block's `conv2` to zero: each block then
# starts as $\operatorname{ReLU}(\text{shortcut}(x))$, and the signal
# keeps its scale however many blocks are stacked.

# %%
def zero_branches(model):
    with torch.no_grad():
        for stage in model.stages:
            for block in stage:
                block.conv2.weight.zero_()
                block.conv2.bias.zero_()


first_epoch_of("no BN, residual")
one_epoch("no BN, residual, zero-init", dict(batch_norm=False),
          prepare=zero_branches)

# %% [markdown]
# It starts to train: its first-epoch loss falls well below the
# untouched network's, and its accuracy rises above chance (10 %), where
# the untouched one stays. Zero branches remove the growth of the signal
# from block to block; Fixup adds a rescaling of the branches' other
# layers and a learned scalar to train this well at depth.

# %% [markdown]
# ### Solution 3: ten times the learning rate
#
# The two networks without batch norm, at 3e-2 instead of 3e-3.

# %%
for name, changes in [("no BN, residual", dict(batch_norm=False)),
                      ("no BN, plain", dict(batch_norm=False,
                                            residual=False))]:
    first_epoch_of(name)
    one_epoch(name + ", lr 3e-2", changes, dict(lr=3e-2))

# %% [markdown]
# Neither survives. The residual network's loss stays above the uniform
# guess and its accuracy at chance; the plain one's loss sits at
# $\ln 10 \approx 2.303$, a network that predicts the same uniform answer
# for every digit. Batch norm is what lets the chapter's recipe use a
# large learning rate.

# %% [markdown]
# ### Solution 4: no max pool in the stem
#
# Without the pool every stage works at twice the resolution: four times
# the positions.

# %%
first_epoch_of("BN + residual")
one_epoch("BN + residual, no stem pool", dict(stem_pool=False))

# %% [markdown]
# Each epoch takes about three times as long (a little under the four
# times the positions, since the stem and the head cost the same), and
# the accuracy after one epoch hardly changes: on 14×14 digits the pool
# throws away little that the network needs.

# %%
print(f"the lab ran in {time.perf_counter() - lab_start:.1f} s")
