# %% [markdown]
# # Break data parallelism
#
# The [distributed training chapter](../scale/distributed.md) built data
# parallelism from three rules: every rank starts from rank 0's weights,
# every rank trains on its own equal slice of the batch, and the ranks
# *average* their gradients before every step. In this lab we write that
# loop by hand, with the chapter's `launch` and `Comm`, on two ranks, and
# break each rule on purpose to see what goes wrong and how loudly.
#
# `train_ranks` is data parallelism in ten lines, with a switch for each
# rule. Each rank starts from its own random weights (seeded by its rank),
# so that the broadcast has work to do. `one_process` trains the same
# network on the whole batches, in this process: the answer the ranks
# must reach.

# %%
import time

import torch
from torch import nn

from cave.fundamentals.essentials import max_diff
from cave.scale.distributed import Comm, launch

lab_start = time.perf_counter()
g = torch.Generator().manual_seed(0)
batches = [(torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g))
           for _ in range(5)]  # five whole batches of 16


def make_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))


def make_optimizer(model, kind):
    if kind == "SGD":
        return torch.optim.SGD(model.parameters(), lr=0.2)
    return torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_ranks(rank, world_size, broadcast=True, average=True,
                kind="SGD", sizes=(8, 8)):
    model, comm = make_model(seed=rank), Comm()
    if broadcast:  # rule 1: one starting point
        for p in model.parameters():
            comm.broadcast(p.data, src=0)
    optimizer = make_optimizer(model, kind)
    first = sum(sizes[:rank])
    rows = slice(first, first + sizes[rank])  # rule 2: my slice
    for x, y in batches:
        nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
        for p in model.parameters():  # rule 3: the mean gradient
            comm.all_reduce(p.grad)
            if average:
                p.grad /= world_size
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in model.parameters()]


def one_process(kind="SGD"):
    model = make_model(seed=0)
    optimizer = make_optimizer(model, kind)
    for x, y in batches:
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in model.parameters()]


def apart(a, b):
    return max(max_diff(p, q) for p, q in zip(a, b))


reference = one_process()
rank0, rank1 = launch(train_ranks, 2)
print("all three rules: rank 0 vs rank 1", apart(rank0, rank1),
      "| vs one process", f"{apart(rank0, reference):.1e}")

# %% [markdown]
# With all three rules the two ranks agree to the last bit and sit within
# float32 rounding of one process. Now break the first rule: no
# broadcast, so each rank keeps its own random start.

# %%
rank0, rank1 = launch(train_ranks, 2, False)
print("no broadcast: rank 0 vs rank 1", f"{apart(rank0, rank1):.2f}",
      "| rank 0 vs one process", f"{apart(rank0, reference):.2e}")

# %% [markdown]
# ## What happened, and why
#
# Nothing crashed. The ranks applied the *same* averaged gradient to
# *different* weights, so they stayed exactly as far apart as they
# started: the averaging keeps replicas together, it never brings them
# together (with plain SGD the gap between them never changes at all).
# Rank 0 is wrong too, though it started where the one-process run did:
# every step it applies a mean of its own gradient and one taken at the
# other rank's weights. Such a run trains, its loss falls, and nothing
# but a comparison like this one shows the problem. This is why
# `DataParallel` and DDP broadcast in their constructor.
#
# ## Try it yourself
#
# 1. Forget to divide the summed gradient by the number of ranks. What
#    does it do to SGD, and to AdamW?
# 2. Give the ranks slices of unequal size, 10 and 6 rows of each batch
#    of 16. Does the average of the two means still give the whole
#    batch's gradient? Fix it without changing the slices.
# 3. Count what the hand-written loop sends per step, and compare it with
#    `DataParallel`, which sends the same gradients in buckets.

# %% [markdown]
# ### Solution 1: sum instead of mean
#
# With SGD, the summed gradient is twice the mean: the same as doubling
# the learning rate. AdamW divides each step by the running root mean
# square of the gradients, so a constant factor cancels (up to its
# epsilon): AdamW is almost immune to this bug, which is exactly why it
# can go unnoticed until someone switches optimiser.

# %%
for kind in ("SGD", "AdamW"):
    summed = launch(train_ranks, 2, True, False, kind)[0]
    print(f"{kind:6} summed gradients vs one process: "
          f"{apart(summed, one_process(kind)):.1e}")

# %% [markdown]
# ### Solution 2: unequal slices
#
# Each rank's loss is the mean over its own rows, so averaging the two
# ranks' gradients weighs every row of the smaller slice more: 1/12 per
# row of the 6 against 1/20 per row of the 10, instead of 1/16 for all.
# The fix weighs each rank's loss by its share of the batch before the
# sum, which is the gradient of the whole batch's mean (nanoGPT fixed a
# loss that differed between one rank and many, PR #145).

# %%
uneven = launch(train_ranks, 2, True, True, "SGD", (10, 6))[0]
print("slices of 10 and 6, averaged: vs one process",
      f"{apart(uneven, reference):.1e}")


def train_weighted(rank, world_size, sizes=(10, 6)):
    model, comm = make_model(seed=0), Comm()
    optimizer = make_optimizer(model, "SGD")
    first = sum(sizes[:rank])
    rows = slice(first, first + sizes[rank])
    share = sizes[rank] / sum(sizes)  # this rank's part of the batch
    for x, y in batches:
        loss = nn.functional.mse_loss(model(x[rows]), y[rows]) * share
        loss.backward()
        for p in model.parameters():
            comm.all_reduce(p.grad)  # a weighted sum: no division
        optimizer.step()
        optimizer.zero_grad()
    return [p.detach() for p in model.parameters()]


weighted = launch(train_weighted, 2)[0]
print("weighted by each rank's share: vs one process",
      f"{apart(weighted, reference):.1e}")
assert apart(weighted, reference) < 1e-5 < apart(uneven, reference)

# %% [markdown]
# ### Solution 3: what the loop sends
#
# The hand-written loop calls one all-reduce per parameter, four per
# step; `DataParallel` puts the same gradients into buckets (here one)
# and sends them while backward runs. The bytes are the same, $2 \cdot
# \frac{N-1}{N} P$ per step; the number of calls, each with its own
# fixed cost, is not.

# %%
from cave.scale.distributed import DataParallel  # noqa: E402


def count_both(rank, world_size):
    comm = Comm()
    model = make_model(seed=0)
    for x, y in batches[:1]:  # by hand
        nn.functional.mse_loss(model(x[:8]), y[:8]).backward()
        for p in model.parameters():
            comm.all_reduce(p.grad)
    by_hand = (comm.calls["all_reduce"], comm.sent["all_reduce"])
    comm = Comm()
    replica = DataParallel(make_model(seed=0), comm)
    comm.sent.clear()
    comm.calls.clear()
    for x, y in batches[:1]:
        nn.functional.mse_loss(replica(x[:8]), y[:8]).backward()
    return by_hand, (comm.calls["all_reduce"], comm.sent["all_reduce"])


(hand_calls, hand_bytes), (dp_calls, dp_bytes) = launch(count_both, 2)[0]
print(f"by hand: {hand_calls} all-reduces, {hand_bytes:,.0f} bytes; "
      f"DataParallel: {dp_calls}, {dp_bytes:,.0f} bytes")
print(f"lab: {time.perf_counter() - lab_start:.1f} s")
