# %% [markdown]
# # Balance the experts
#
# The [mixture-of-experts chapter](../frontiers/moe.md) built a sparse
# feed-forward layer with a load-balancing loss and expert capacity. This
# lab trains a tiny MoE LLaMA on Tiny Shakespeare twice, with the
# balancing loss off and at Switch's weight, and looks at how the router
# spreads its tokens. Then it puts a capacity on the
# experts of the trained models and counts the tokens that overflow.
#
# Each run is 50 steps of a two-layer model of width 32, 8 experts of
# width 32, two per token: seconds, not minutes. Short runs show the
# router's early habits, which is where collapse starts.

# %%
import dataclasses
import time

import matplotlib.pyplot as plt
import torch

from cave.fundamentals.data import shakespeare_split
from cave.frontiers.linear_attention import train_lm
from cave.frontiers.moe import MoEConfig, MoELlama
from cave.transformers.llama import LlamaConfig
from cave.transformers.llama_training import TrainConfig, evaluate

lab_start = time.perf_counter()
tokenizer, train_ids, val_ids = shakespeare_split()
data = (tokenizer, train_ids, val_ids[:8192])  # a short validation set
model_config = LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4,
                           max_seq_len=32)
schedule = TrainConfig(batch_size=16, block_size=32, max_steps=50,
                       warmup_steps=5, lr=1e-2, min_lr=1e-3,
                       eval_interval=50, log_interval=10, bf16=False)
experts = MoEConfig(dim=32, hidden_dim=32, n_experts=8, top_k=2)


def run(moe_config):
    """Train a MoELlama; return (model, result, usage per log step)."""
    torch.manual_seed(0)
    model = MoELlama(model_config, moe_config)
    usage = []

    def on_log(step, model):
        shares = [(m.usage / m.usage.sum()).tolist()
                  for m in model.moe_layers()]
        usage.append(shares)
        for m in model.moe_layers():
            m.usage.zero_()

    result = train_lm(model, schedule, data, aux_loss=MoELlama.aux_loss,
                      on_log=on_log)
    return model, result, torch.tensor(usage)  # (logs, layers, E)


runs = {}
for coef in (0.0, 0.01):
    runs[coef] = run(dataclasses.replace(experts, balance_coef=coef))
    model, result, usage = runs[coef]
    print(f"balance_coef {coef:4}: validation loss "
          f"{result['val_loss']:.3f}, busiest expert's share at the end "
          f"{usage[-1].max().item():.2f} (even: {1 / 8:.3f}), "
          f"{result['seconds']:.1f} s")

# %% [markdown]
# ## Where the tokens went
#
# Each expert's share of the assignments over the last ten steps, per
# layer. An even router gives each of the eight experts 1/8.

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3), sharey=True)
for ax, (coef, (_, _, usage)) in zip(axes, runs.items()):
    for layer in range(usage.shape[1]):
        ax.bar((torch.arange(8) + 0.4 * layer - 0.2).numpy(),
               usage[-1, layer].numpy(), width=0.4, label=f"layer {layer}")
    ax.axhline(1 / 8, color="gray", lw=0.8, ls="--")
    ax.set_title(f"balance_coef {coef}")
    ax.set_xlabel("expert")
axes[0].set_ylabel("share of assignments")
axes[0].legend()
plt.show()

# %% [markdown]
# ## Capacity on the trained routers
#
# Now give each expert a buffer of `capacity_factor` times its even share
# and run the validation set through. Assignments past the buffer are
# dropped; the validation loss shows what dropping costs.

# %%
def with_capacity(model, factor):
    for m in model.moe_layers():
        m.config = dataclasses.replace(m.config, capacity_factor=factor)


for coef, (model, _, _) in runs.items():
    cells = []
    for factor in (1.0, 1.5, None):
        with_capacity(model, factor)
        loss = evaluate(model, val_ids[:4096], 32, bf16=False)
        dropped = sum(m.dropped for m in model.moe_layers()) / 2
        cells.append(f"{str(factor):4s}: loss {loss:.3f}, "
                     f"dropped {dropped:5.1%}")
    with_capacity(model, None)
    print(f"balance_coef {coef:4} | " + " | ".join(cells))

# %% [markdown]
# The drops shown are those of the last validation batch, per layer on
# average. The router trained with the balancing loss loses far fewer
# assignments at every factor than the one trained without, which keeps
# overflowing its favourite experts. Compare the validation losses too:
# in runs this short, balance is not what lowers the loss; what it buys is
# experts that all train, and a capacity that costs little.
#
# ## Try it yourself
#
# 1. Switch routes each token to one expert. Train with `top_k=1` (and
#    the balancing loss on): does the router still spread its tokens?
# 2. Raise `z_coef` to 0.1: how large are the router's log-sum-exps
#    after training, against the default?

# %% [markdown]
# ### Solution 1: top-1 routing
#
# With one expert per token the renormalised weight is always 1, so the
# router learns only from the balancing and z-losses: it spreads the
# tokens, but nothing in the language-modelling loss tells it which
# expert suits which token.

# %%
top1_model, top1, top1_usage = run(dataclasses.replace(experts, top_k=1))
print(f"top-1: validation loss {top1['val_loss']:.3f}, busiest expert's "
      f"share {top1_usage[-1].max().item():.2f}")
assert top1_usage[-1].max().item() < 0.5

# %% [markdown]
# ### Solution 2: a stronger z-loss
#
# The z-loss penalises the square of each token's log-sum-exp; a
# stronger weight keeps the router's logits closer to zero.


# %%
def mean_lse(model):
    x = val_ids[:1024].reshape(32, 32)
    with torch.no_grad():
        model(x)
    return sum(torch.logsumexp(m.router_logits, -1).abs().mean().item()
               for m in model.moe_layers()) / 2


strong, _, _ = run(dataclasses.replace(experts, z_coef=0.1))
default = runs[0.01][0]
print(f"mean |log-sum-exp|: z_coef 0.001 {mean_lse(default):.3f}, "
      f"z_coef 0.1 {mean_lse(strong):.3f}")
assert mean_lse(strong) < mean_lse(default)

# %%
print(f"this lab ran in {time.perf_counter() - lab_start:.1f} s")
