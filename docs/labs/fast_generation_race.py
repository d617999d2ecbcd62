# %% [markdown]
# # Fast generation, measured
#
# The [fast generation chapter](../frontiers/fast_generation.md) built a
# decoder without per-token overhead, a rolling cache, and speculative
# decoding with a small draft model. Here we run them on the shipped
# Shakespeare model and its draft (the quick preset's model) and watch
# what each buys. Every rate below is what this run measured, in CPU time
# of this process, on this machine at its load of the moment: run the lab
# again and the numbers move, the comparisons (made in the same cell, one
# after the other) much less.

# %%
import time

import torch

from cave.frontiers.fast_generation import (DRAFT, FastDecoder,
                                            fast_generate,
                                            speculative_generate)
from cave.transformers.llama import generate
from cave.transformers.llama_training import SHIPPED, load_model

model, tokenizer, _ = load_model(SHIPPED)
draft, _, _ = load_model(DRAFT)
prompt = tokenizer.encode("ROMEO:\n")[None]  # (1, 7)
fast, small = FastDecoder(model), FastDecoder(draft)


def rate(fn, n):
    """Tokens per second of fn(n) (this process's CPU time), and what it
    returned."""
    start = time.process_time()
    out = fn(n)
    return n / (time.process_time() - start), out


def seeded():
    return torch.Generator().manual_seed(0)


# %% [markdown]
# ## The same tokens, faster
#
# `generate` and `fast_generate` draw from the same seeded generator with
# the same `sample_next`, so inside the window they write the same text.

# %%
torch.set_num_threads(1)  # CPU time is a fair clock with one thread
slow_rate, slow = rate(lambda n: generate(model, prompt, n, top_k=50,
                                          generator=seeded()), 100)
fast_rate, quick = rate(lambda n: fast_generate(fast, prompt, n, top_k=50,
                                                generator=seeded()), 100)
print(f"generate {slow_rate:.0f} tok/s, fast_generate {fast_rate:.0f} "
      f"tok/s: same text {torch.equal(slow, quick)}")
print(tokenizer.decode(quick[0]))

# %% [markdown]
# ## Speculative decoding: how many drafts survive
#
# The draft proposes `draft_tokens` characters, the shipped model checks
# them in one pass. Characters are often predictable (the rest of a word,
# a space after it), so the small model is often right.

# %%
for k in (2, 4):
    spec_rate, (text, stats) = rate(lambda n: speculative_generate(
        fast, small, prompt, n, draft_tokens=k, top_k=50,
        generator=seeded()), 100)
    print(f"draft_tokens {k}: {stats['accepted'] / stats['rounds']:.2f} "
          f"accepted per round, {spec_rate:.0f} tok/s")

# %% [markdown]
# ## Try it yourself
#
# 1. Decode greedily (`temperature=0`): does the draft agree with the
#    target more often than when sampling at temperature 1?
# 2. Build the decoder in bfloat16 (`FastDecoder(model, torch.bfloat16)`)
#    and in float16. Are the greedy tokens those of float32, and which is
#    fastest here?
# 3. Generate for a batch of 4 prompts at once. How many tokens per second
#    in total, against one prompt?

# %% [markdown]
# ### Solution 1: greedy drafts

# %%
for temperature in (0.0, 1.0):
    _, stats = speculative_generate(fast, small, prompt, 80, top_k=50,
                                    temperature=temperature,
                                    generator=seeded())
    print(f"temperature {temperature}: "
          f"{stats['accepted'] / stats['rounds']:.2f} drafts accepted per "
          f"round of 4")

# %% [markdown]
# Under greedy decoding a draft survives when it is the target's argmax;
# under sampling it survives with probability $\min(1, p/q)$, which
# punishes every place where the two distributions differ, even where
# their argmaxes agree. The printout says which wins for this pair.

# %% [markdown]
# ### Solution 2: bfloat16

# %%
r32, g32 = rate(lambda n: fast_generate(fast, prompt, n, temperature=0), 80)
for dtype in (torch.bfloat16, torch.float16):
    half = FastDecoder(model, dtype)
    r16, g16 = rate(lambda n: fast_generate(half, prompt, n, temperature=0),
                    80)
    agree = (g32 == g16)[0, prompt.shape[1]:].float().mean().item()
    print(f"float32 {r32:.0f} tok/s, {dtype} {r16:.0f} tok/s; greedy "
          f"tokens equal to float32's: {agree:.0%}")

# %% [markdown]
# Both halve the bytes per token. bfloat16 rounds every product to 8
# significant bits, float16 to 11: greedy text agrees until the first
# near-tie, then goes its own way, later for float16. Which is faster
# depends on the CPU's kernels for one row at a time; the chapter's full
# run measures it.

# %% [markdown]
# ### Solution 3: a batch of four

# %%
four = prompt.expand(4, -1)  # (4, 7)
r1, _ = rate(lambda n: fast_generate(fast, prompt, n, generator=seeded()),
             60)
r4, _ = rate(lambda n: fast_generate(fast, four, n, generator=seeded()),
             60)
print(f"one prompt {r1:.0f} tok/s, four prompts {4 * r4:.0f} tok/s in "
      f"total ({4 * r4 / r1:.1f}x)")

# %% [markdown]
# Four rows read each weight once for four tokens, so the total rate rises
# by nearly the batch size while the matrix products stay small.
