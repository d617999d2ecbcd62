# %% [markdown]
# # Break the network
#
# The [deep networks chapter](../fundamentals/deep_networks.md) trained a
# multi-layer perceptron past 97 % validation accuracy with a recipe:
# Kaiming initialisation, batch normalisation, dropout, Adam and a
# one-cycle learning-rate schedule. A recipe is easier to trust once you
# have seen what each ingredient holds up. In this lab we take them away,
# one at a time, and watch.
#
# Every run is short (four epochs over the 8,000 training digits), so the
# whole lab takes well under a minute on a laptop CPU. Short runs
# exaggerate differences in the speed of learning; that is what we want
# to see.

# %%
import time

import matplotlib.pyplot as plt
import torch

from cave.fundamentals.data import mnist_split
from cave.fundamentals.deep_networks import MLP, MLPConfig, TrainConfig, train
from cave.fundamentals.essentials import seed_everything, smooth

lab_start = time.perf_counter()
(train_x, train_y), (val_x, val_y) = mnist_split(seed=0)
print(f"{len(train_x)} training and {len(val_x)} validation digits")

# %% [markdown]
# ## The experiments
#
# Each experiment is the chapter's configuration with one or two fields
# changed. Everything else, including the seed, stays the same, so any
# difference comes from the change.

# %%
base_model, base_train = MLPConfig(), TrainConfig(epochs=4)
experiments = {
    "baseline": ({}, {}),
    "no batch norm": ({"batch_norm": False}, {}),
    "learning rate x10": ({}, {"lr": base_train.lr * 10}),
    "learning rate x10, no batch norm": ({"batch_norm": False},
                                         {"lr": base_train.lr * 10}),
    "naive init N(0, 1)": ({"init": "naive"}, {}),
    "naive init, no batch norm": ({"init": "naive", "batch_norm": False},
                                  {}),
}
histories = {}
for name, (model_changes, train_changes) in experiments.items():
    model_config = MLPConfig(**{**vars(base_model), **model_changes})
    train_config = TrainConfig(**{**vars(base_train), **train_changes})
    seed_everything(0)
    model = MLP(model_config)
    history = train(model, (train_x, train_y), (val_x, val_y), train_config)
    histories[name] = history
    print(f"{name:33s} first loss {history.step_loss[0]:10.2f}   "
          f"final train loss {history.train_loss[-1]:7.3f}   "
          f"best val acc {history.best_val_acc:6.2%}   "
          f"{history.seconds[-1]:4.1f} s")

# %% [markdown]
# ## The curves
#
# The training loss of every step, smoothed over 20 steps so the trends
# show through the noise, on a log scale (the runs start orders of
# magnitude apart), and the validation accuracy after each epoch.

# %%
fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
for name, history in histories.items():
    steps_per_epoch = len(history.step_loss) / len(history.val_acc)
    where = (torch.arange(len(history.step_loss)) + 1) / steps_per_epoch
    ax_loss.plot(where.tolist(), smooth(history.step_loss, window=20),
                 label=name)
    epochs = range(1, len(history.val_acc) + 1)
    ax_acc.plot(epochs, [100 * a for a in history.val_acc], "o-",
                label=name)
ax_loss.set_yscale("log")
ax_loss.set_xlabel("epoch")
ax_loss.set_ylabel("training loss (smoothed)")
ax_loss.set_title("Training loss")
ax_acc.set_xticks(list(epochs))
ax_acc.set_xlabel("epoch")
ax_acc.set_ylabel("validation accuracy (%)")
ax_acc.set_title("Validation accuracy")
ax_acc.set_ylim(bottom=max(0, ax_acc.get_ylim()[0]))
ax_acc.legend(fontsize=8)
fig.suptitle("Breaking the network one ingredient at a time")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What happened, and why
#
# **Without batch norm.** At the recipe's learning rate, hardly anything
# changes in this short run. Kaiming initialisation already starts the
# signal at a healthy size, and a network of two hidden layers is shallow
# enough that nothing drifts far. Batch norm is not magic that every
# network needs; the next two runs show what it buys.
#
# **Learning rate ten times higher.** Adam moves each weight by about the
# learning rate per step, whatever the gradient's size. At ten times the
# rate the steps overshoot during the warm-up peak: look at the first
# epoch's accuracy. With batch norm the run recovers as the cosine
# schedule brings the rate down, because each layer's output is
# rescaled after every step, so weights that grew too large cannot blow
# up the activations.
#
# **Learning rate ten times higher, without batch norm.** Now nothing
# rescales them. Large steps make some activations huge; the next steps,
# following gradients computed in that state, overshoot again, and ReLU
# units can end up switched off for every input ("dead"), where they get
# no gradient at all. Accuracy *falls* after the first epoch and
# the run never comes close to the others. This is the main practical
# gift of batch norm: a much wider range of learning rates that work.
#
# **Naive initialisation.** With every weight drawn from $N(0, 1)$, a
# unit sums 784 (or 1,024) inputs each multiplied by a weight of variance
# 1, so the signal's standard deviation grows by about $\sqrt{784} = 28$
# at the first layer and by about $\sqrt{1024} = 32$ at the two after it,
# whose inputs are 1,024 hidden units (a ReLU in between halves the mean
# square, which brings that to about 23). Batch norm repairs the hidden layers (it divides the scale
# away), but the last layer has no batch norm after it: its logits come
# out in the tens, and the first loss printed above is huge. Adam's steps
# of about the learning rate per weight would need thousands of steps to
# shrink weights of size 1, so the loss stays high.
#
# **Naive initialisation without batch norm.** Now nothing repairs the
# scale at all: the logits are in the thousands and the loss is
# astronomical. Notice, though, that its validation accuracy is not far
# below the previous run's. Accuracy only asks which logit is largest,
# while cross-entropy punishes a confident mistake in proportion to how
# confident it was: with logits in the thousands every mistake costs
# thousands. Such a network is not only less accurate; its
# probabilities are nonsense.
#
# ## Try it yourself
#
# 1. Double the number of epochs for every run. Which of the broken
#    runs catch up with the baseline, and which do not?
# 2. Find the largest learning rate at which the network *without* batch
#    norm still trains well, and the largest *with* it. How far apart are
#    they?
# 3. Set `dropout=0.0` and compare the final *training* loss with the
#    *validation* loss, for the baseline and for the dropout-free run.
#    What does the gap tell you?
# 4. Replace `activation="relu"` with `"identity"`. The chapter proved
#    that such a network is one affine map: what accuracy does a linear
#    classifier reach on MNIST?
# 5. Use `init="xavier"` with ReLU. Xavier's variance is about half of
#    Kaiming's for these layers; does batch norm make the difference
#    vanish?
# 6. Train with `TrainConfig(bf16=False)` and compare the seconds per
#    run. Does float32 change the accuracy?

# %%
print(f"the lab ran in {time.perf_counter() - lab_start:.1f} s")
