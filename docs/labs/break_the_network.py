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
# Every run is short: three epochs over the first 2,000 training digits,
# validated on all 2,000 validation digits, with the chapter's network
# narrowed from two hidden layers of 1,024 units to two of 256. Each run
# takes well under a second on a laptop CPU, so the lab can afford
# twenty of them. Short runs exaggerate differences in the speed of
# learning; that is what we want to see.

# %%
import time

import matplotlib.pyplot as plt
import torch

from cave.fundamentals.data import mnist_split
from cave.fundamentals.deep_networks import MLP, MLPConfig, TrainConfig, train
from cave.fundamentals.essentials import seed_everything, smooth

lab_start = time.perf_counter()
(train_x, train_y), (val_x, val_y) = mnist_split(seed=0)
print(f"{len(train_x)} training and {len(val_x)} validation digits; "
      "the runs train on the first 2,000")

# %% [markdown]
# ## The experiments
#
# Each experiment is the chapter's configuration with one or two fields
# changed. Everything else, including the seed, stays the same, so any
# difference comes from the change.

# %%
base_model = MLPConfig(hidden=(256, 256))
base_train = TrainConfig(epochs=3)
runs = {}  # a configuration trained once is looked up, not trained again


def small_run(name, model_changes=None, train_changes=None, digits=2000):
    """Train base_model + changes on the first `digits` training digits,
    validate on all 2,000 validation digits, print one line."""
    model_config = MLPConfig(**{**vars(base_model), **(model_changes or {})})
    train_config = TrainConfig(**{**vars(base_train),
                                  **(train_changes or {})})
    key = repr((model_config, train_config, digits))
    if key not in runs:
        seed_everything(0)  # the same initial weights, the same batches
        model = MLP(model_config)
        runs[key] = train(model, (train_x[:digits], train_y[:digits]),
                          (val_x, val_y), train_config)
    history = runs[key]
    accuracies = " ".join(f"{a:6.2%}" for a in history.val_acc)
    print(f"{name:34s} first loss {history.step_loss[0]:7.1f}  losses: "
          f"train {history.train_loss[-1]:7.2f}, val "
          f"{history.val_loss[-1]:6.2f}   val acc by epoch {accuracies}")
    return history


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
histories = {name: small_run(name, *changes)
             for name, changes in experiments.items()}

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
# **Without batch norm.** At the recipe's learning rate, little changes
# in this short run: a point or two of accuracy. Kaiming initialisation
# already starts the signal at a healthy size, and a network of two
# hidden layers is shallow enough that nothing drifts far. Batch norm is
# not magic that every network needs; the next two runs show what it
# buys.
#
# **Learning rate ten times higher.** Adam moves each weight by about the
# learning rate per step, whatever the gradient's size. At ten times the
# rate the steps overshoot during the warm-up peak: look at the first
# epoch's accuracy, the lowest of the three runs with batch norm and
# Kaiming's start. With batch norm the run recovers as the schedule
# brings the rate down, because each layer's output is rescaled after
# every step, so weights that grew too large cannot blow up the
# activations; in a run this short the larger steps then even pay.
#
# **Learning rate ten times higher, without batch norm.** Now nothing
# rescales them. Large steps make some activations huge; the next steps,
# following gradients computed in that state, overshoot again, and ReLU
# units can end up switched off for every input ("dead"), where they get
# no gradient at all. The run starts behind and ends far behind its
# batch-normed twin. This is the main practical gift of batch norm: a
# much wider range of learning rates that work (solution 2 measures it).
#
# **Naive initialisation.** With every weight drawn from $N(0, 1)$, a
# unit sums 784 (or 256) inputs each multiplied by a weight of variance
# 1, so the signal's standard deviation grows by about $\sqrt{784} = 28$
# at the first layer and by about $\sqrt{256} = 16$ at the two after it,
# whose inputs are 256 hidden units (a ReLU in between halves the mean
# square, which brings that to about 11). Batch norm repairs the hidden
# layers (it divides the scale away), but the last layer has no batch
# norm after it: its logits come out in the tens, and the first loss
# printed above is far above the $\ln 10 \approx 2.3$ of a guess. Adam's
# steps of about the learning rate per weight would need thousands of
# steps to shrink weights of size 1, so the loss stays high.
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
# 1. Double the number of epochs of the two runs furthest behind: ten
#    times the rate without batch norm, and the naive initialisation.
#    Does either catch up with the baseline?
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

# %% [markdown]
# ### Solutions
#
# Every solution trains with `small_run` from the top of the lab: the
# same 2,000 digits and network, with the changes asked for. A
# configuration that already ran is printed again, not retrained.

# %% [markdown]
# ### Solution 1: twice the epochs
#
# The two runs furthest behind, for three epochs and then for six.

# %%
for name, short in [("learning rate x10, no batch norm", "lr x10, no BN"),
                    ("naive init N(0, 1)", "naive init")]:
    model_changes, train_changes = experiments[name]
    for epochs in (3, 6):
        small_run(f"{short}, {epochs} epochs", model_changes,
                  {**train_changes, "epochs": epochs})
small_run("baseline, 3 epochs")

# %% [markdown]
# Twice the epochs help both, unequally. The run without batch norm at
# ten times the rate ends within a point of the baseline's three epochs,
# at twice the cost; the naive initialisation, still far behind, is
# nowhere near: its last layer has weights of size 1 to shrink at about
# the learning rate per step, and six epochs are not enough steps.

# %% [markdown]
# ### Solution 2: the largest learning rate that trains
#
# Three, ten and thirty times the recipe's rate, with and without batch
# norm.

# %%
for factor in (3, 10, 30):
    for batch_norm in (True, False):
        small_run(f"lr x{factor}, batch norm {'on' if batch_norm else 'off'}",
                  {"batch_norm": batch_norm},
                  {"lr": base_train.lr * factor})

# %% [markdown]
# With batch norm, every rate up to thirty times the recipe's trains at
# least as well as the recipe's own (better, in a run this short).
# Without it, three times is the last that does: at ten times it ends
# well behind its batch-normed twin, and at thirty it collapses, to about
# one digit in four. Batch norm widens the range of working rates by a
# factor of ten at least.

# %% [markdown]
# ### Solution 3: what dropout does to the gap
#
# The training loss printed is measured with dropout on and on shifted
# digits; the validation loss with neither.

# %%
small_run("dropout 0.3 (the recipe)")
small_run("dropout 0.0", {"dropout": 0.0})

# %% [markdown]
# In runs this short, dropout does not pay: without it both losses are
# lower and the accuracy higher. The training loss sits *above* the
# validation loss in both runs, because it is measured on shifted digits
# (and, with dropout, on a thinned network): after three epochs nothing
# is being memorised yet, so there is no gap for dropout to close.
# Dropout is insurance against memorising; the deep networks chapter's
# ladder of eras shows it paying, with the shifts, over the recipe's
# fifteen epochs.

# %% [markdown]
# ### Solution 4: a linear classifier
#
# With the identity in place of ReLU, the whole network is one affine map
# from pixels to logits (batch norm, at evaluation, is affine too).

# %%
small_run("identity activation", {"activation": "identity"})

# %% [markdown]
# The linear classifier ends below the network with ReLUs trained on the
# same digits (the baseline, printed in solution 3 as "dropout 0.3"):
# without a nonlinearity, depth adds nothing but parameters. Train both
# longer and the gap grows: the linear map soon has nothing left to
# learn, the network with ReLUs goes on improving.

# %% [markdown]
# ### Solution 5: Xavier's variance with ReLU
#
# Xavier draws weights with variance $2 / (n_\text{in} + n_\text{out})$;
# for the hidden layer of 256 by 256 that is $1/256$, half of
# Kaiming's $2/256$.

# %%
for init in ("kaiming", "xavier"):
    for batch_norm in (True, False):
        small_run(f"{init}, batch norm {'on' if batch_norm else 'off'}",
                  {"init": init, "batch_norm": batch_norm})

# %% [markdown]
# Xavier lands within a point of Kaiming, with batch norm and without
# it: no larger than the difference batch norm itself makes here. Batch
# norm makes the initial scale irrelevant by design; without it, half the
# variance per layer shrinks the signal by $\sqrt 2$ per layer, and two
# hidden layers absorb a factor of 2. Kaiming's factor matters in deep
# plain networks, where $2^{-L/2}$ compounds (the CNN chapter's depth
# experiment).

# %% [markdown]
# ### Solution 6: float32 against bf16
#
# The same run with and without bf16 autocast; the seconds are this
# machine's.

# %%
for name, changes in [("bf16 autocast (the recipe)", {}),
                      ("float32", {"bf16": False})]:
    history = small_run(name, train_changes=changes)
    print(f"{'':34s} trained in {history.seconds[-1]:.2f} s")

# %% [markdown]
# The accuracy agrees to a fraction of a point: bf16 keeps float32's
# range, and the loss, batch norm's statistics and Adam stay in float32.
# The seconds are this machine's, under whatever else it was running;
# the essentials chapter's section 19 measures the two rates properly and
# explains them from the instructions the CPU offers.

# %%
print(f"the lab ran in {time.perf_counter() - lab_start:.1f} s")
