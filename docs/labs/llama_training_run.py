# %% [markdown]
# # Inside a training run
#
# The [LLaMA training chapter](../transformers/llama_training.md) trained
# the model that ships with the book and recorded its run. This lab reads
# that record: the loss curves, and what the model wrote at each
# validation. Then it runs one ablation of its own: **RMSNorm against
# LayerNorm**, the same small model trained twice from the same seed on
# the same batches, differing only in its normalisation.

# %%
import time

import matplotlib.pyplot as plt
import torch
from torch import nn

from cave.fundamentals.data import Batches, load_results, shakespeare_split
from cave.fundamentals.essentials import smooth
from cave.transformers.llama import Llama, LlamaConfig, RMSNorm
from cave.transformers import llama_training as T

lab_start = time.perf_counter()
run = load_results("llama_training")["shakespeare"]
print(run["command"])
print(f"final validation loss {run['val_loss']:.4f} after "
      f"{run['tokens']:,} tokens")

# %% [markdown]
# ## The loss curves
#
# The training loss is one batch's loss every ten steps; the validation
# loss uses 200 fixed windows during the run and all of them at the end.

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
tr, va = run["history"]["train"], run["history"]["val"]
ax.plot([r["tokens"] / 1e6 for r in tr], [r["loss"] for r in tr],
        label="training batch", alpha=0.6)
ax.plot([r["tokens"] / 1e6 for r in va], [r["val_loss"] for r in va],
        "o-", label="validation")
ax.set_xlabel("tokens seen (millions)")
ax.set_ylabel("nats per character")
ax.set_ylim(1.0, 3.0)
ax.legend()
ax.set_title("Training and validation loss of the shipped model")
plt.show()

# %% [markdown]
# ## Samples along the way
#
# At every validation the run drew 200 characters from the same seed.
# Watch spelling arrive first, then the shape of a play: names in
# capitals, a colon, a speech.

# %%
for sample in run["history"]["samples"]:
    print(f"=== step {sample['step']}")
    print(sample["text"][:200].strip(), "\n")

# %% [markdown]
# ## Ablation: RMSNorm or LayerNorm?
#
# LLaMA normalises with RMSNorm: no mean subtracted, no bias. Here the
# same small model is trained twice for the same steps, once as built and
# once with every RMSNorm replaced by `nn.LayerNorm`. Same seed, same
# initial matrices, same batches; only the norms differ.


# %%
def with_layernorm(model: Llama) -> Llama:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, RMSNorm):
                setattr(module, child_name,
                        nn.LayerNorm(child.weight.shape[0], eps=child.eps))
    return model


def ablation_run(layernorm: bool, steps: int = 80):
    tokenizer, train_ids, val_ids = shakespeare_split()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, dim=64,
                         n_layers=2, n_heads=4, n_kv_heads=2,
                         max_seq_len=64)
    model = Llama(config)
    if layernorm:
        model = with_layernorm(model)
    tc = T.TrainConfig(batch_size=16, block_size=64, max_steps=steps,
                       warmup_steps=10, lr=4e-3, min_lr=4e-4)
    optimizer = T.make_optimizer(model, tc)
    batches = Batches(train_ids, tc.batch_size, tc.block_size, seed=0)
    curve = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = T.lr_at(step, tc)
        x, y = batches.next()  # (B, T), (B, T)
        with torch.autocast("cpu", torch.bfloat16):
            _, loss = model(x, targets=y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    val = T.evaluate(model, val_ids, 64, max_windows=200)
    return curve, val


results = {}
for name, layernorm in [("RMSNorm", False), ("LayerNorm", True)]:
    t0 = time.perf_counter()
    curve, val = ablation_run(layernorm)
    results[name] = (curve, val)
    print(f"{name:9s}: validation loss {val:.4f} (200 windows), "
          f"{time.perf_counter() - t0:.1f} s")

# %%
fig, ax = plt.subplots(figsize=(7, 3.4))
for name, (curve, val) in results.items():
    ax.plot(smooth(curve, window=10), label=f"{name} (val {val:.3f})")
ax.set_xlabel("step")
ax.set_ylabel("training loss, mean of 10 steps")
ax.legend()
ax.set_title("RMSNorm against LayerNorm, same seed and batches")
plt.show()
print(f"lab ran in {time.perf_counter() - lab_start:.1f} s")

# %% [markdown]
# On a model this small and a run this short, the two norms land close
# together: RMSNorm's case is speed (one statistic instead of two, no
# bias) at equal quality, as its paper argued. Try longer runs
# (`steps=`), a deeper model, or `lr=1e-2`, where normalisation matters
# more.
