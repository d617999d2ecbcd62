# %% [markdown]
# # Zero-shot, measured
#
# The [CLIP chapter](../frontiers/clip.md) trained an image encoder and a
# text encoder on MNIST digits with captions from templates, and
# classified the validation digits with captions from templates it had
# held back. In this lab we take the full run's model (its weights ship
# with the book) and question its zero-shot classifier:
#
# - **which captions work**: every template, seen in training or not,
#   and new ones we write here from the vocabulary;
# - **prompt ensembling**: the paper's trick of averaging the caption
#   vectors of several templates into one per class;
# - **where it fails**: the digits it confuses, and the images a caption
#   retrieves.
#
# Every measurement embeds the 2,000 validation digits once and the
# captions many times: captions are cheap, which is the point of a
# classifier written in words.

# %%
import time

import matplotlib.pyplot as plt
import torch

from cave.fundamentals.data import mnist_split
from cave.frontiers.clip import (HELD_OUT_TEMPLATES, TRAIN_TEMPLATES,
                                 embed_captions, embed_images, fill,
                                 load_trained_clip)

lab_start = time.perf_counter()
(train_x, train_y), (val_x, val_y) = mnist_split(seed=0)
model = load_trained_clip()
images = embed_images(model, val_x)  # (2000, E), unit vectors
print("validation images embedded:", tuple(images.shape))


def accuracy(class_vectors):
    """Zero-shot accuracy of ten class vectors (10, E) on the images."""
    predictions = (images @ class_vectors.T).argmax(dim=1)  # (2000,)
    return (predictions == val_y).float().mean().item()


def template_vectors(template):
    """The ten captions of one template, encoded: (10, E)."""
    return embed_captions(model, [fill(template, d) for d in range(10)])


# %% [markdown]
# ## Every template, seen and unseen
#
# The training templates were paired with training images; the held-out
# ones never appeared. If the text encoder had memorised strings, the
# held-out ones would do worse.

# %%
for group, templates in [("train", TRAIN_TEMPLATES),
                         ("held-out", HELD_OUT_TEMPLATES)]:
    for template in templates:
        print(f"{group:9} {template!r:40} "
              f"{accuracy(template_vectors(template)):.2%}")

# %% [markdown]
# Seen or held out, the templates score within a few images of each other
# (the table above). Now captions nobody wrote: new phrases of the
# vocabulary's words. The last one names no digit at all, so its ten
# captions are the same sentence, and the classifier must give every
# image one class.

# %%
new_templates = ["a neat {number}", "the handwritten figure {name}",
                 "a picture of a {number} drawn by hand", "{name} {number}",
                 "a handwritten digit"]
for template in new_templates:
    print(f"new       {template!r:40} "
          f"{accuracy(template_vectors(template)):.2%}")

# %% [markdown]
# ## Prompt ensembling
#
# Radford et al. average, for each class, the text vectors of many
# templates ("a photo of a big {}", "a photo of a small {}", ...), and
# normalise the mean; on ImageNet it gained them a few points. Here the
# four held-out templates give each digit one averaged vector. The last
# line printed says what there is to gain: how far apart two templates'
# vectors of one digit can be.

# %%
stack = torch.stack([template_vectors(t) for t in HELD_OUT_TEMPLATES])
ensemble = torch.nn.functional.normalize(stack.mean(dim=0), dim=-1)
single = [accuracy(v) for v in stack]
print(f"single held-out templates: {min(single):.2%} to {max(single):.2%}")
print(f"their ensemble:            {accuracy(ensemble):.2%}")
pairwise = torch.einsum("ade,bde->abd", stack, stack)  # (4, 4, 10)
print("cosine between two templates' vectors of one digit, smallest:",
      f"{pairwise.min().item():.3f}")

# %% [markdown]
# Our captions differ only in words that say nothing about the image, so
# the text encoder learned to map every caption of a digit to nearly one
# vector, and averaging vectors that are already alike changes little.
# On the web, "a photo of a big dog" and "a sketch of a dog" describe
# different pictures, and their average is a broader net.
#
# ## Where it fails
#
# The confusion matrix of the ensemble, and the pairs it mixes up most.

# %%
predictions = (images @ ensemble.T).argmax(dim=1)
confusion = torch.zeros(10, 10, dtype=torch.long)
confusion.index_put_((val_y, predictions), torch.ones_like(val_y),
                     accumulate=True)
mistakes = confusion.clone().fill_diagonal_(0)
top = mistakes.flatten().topk(4)
for count, index in zip(top.values.tolist(), top.indices.tolist()):
    print(f"a {index // 10} read as a {index % 10}: {count} times")
fig, ax = plt.subplots(figsize=(4.4, 4))
shown = ax.imshow(mistakes, cmap="magma")
fig.colorbar(shown, ax=ax, label="images", shrink=0.8)
ax.set_xticks(range(10))
ax.set_yticks(range(10))
ax.set_xlabel("predicted digit")
ax.set_ylabel("true digit")
ax.set_title("Zero-shot mistakes (diagonal blanked)")
fig.tight_layout()

# %% [markdown]
# Text to image: a caption retrieves the images nearest to it. Here the
# eight nearest validation digits to one held-out caption.

# %%
query = "a handwritten 4"
scores = (images @ embed_captions(model, [query]).T).squeeze(1)  # (2000,)
best = scores.topk(8).indices
fig, axes = plt.subplots(1, 8, figsize=(8, 1.4))
for ax, i in zip(axes, best.tolist()):
    ax.imshow(val_x[i], cmap="gray")
    ax.set_title(f"{scores[i]:.2f}", fontsize=8)
    ax.axis("off")
fig.suptitle(f"nearest to {query!r} (cosine)")
print("labels of the eight nearest:", val_y[best].tolist())

# %% [markdown]
# ## Try it yourself
#
# 1. Ensemble all nineteen templates, training and held-out: does it beat
#    the four held-out ones?
# 2. Do "seven" and "7" mean the same to the text encoder? Compare the
#    vectors of the bare word and the bare figure for each digit.
# 3. The chapter found that every held-out caption of zero retrieves
#    another digit as its nearest image. Look at that image, and at the
#    zeros that come next.

# %% [markdown]
# ### Solution 1: a larger ensemble
#
# More templates average away each one's quirks; the gain, if any, is
# what this cell prints. With vectors as alike as the ensembling section
# measured, expect little.

# %%
every = torch.stack([template_vectors(t)
                     for t in TRAIN_TEMPLATES + HELD_OUT_TEMPLATES])
big = torch.nn.functional.normalize(every.mean(dim=0), dim=-1)
print(f"ensemble of {len(every)} templates: {accuracy(big):.2%} "
      f"(held-out four: {accuracy(ensemble):.2%})")

# %% [markdown]
# ### Solution 2: words and figures
#
# For each digit, the cosine between the vectors of "seven" and "7", and,
# for contrast, the largest cosine between a word and another digit's
# figure. The text encoder never saw a dictionary: it learned that the
# word and the figure mean the same from the images they were paired
# with.

# %%
words = template_vectors("{name}")  # (10, E)
figures = template_vectors("{number}")  # (10, E)
cosines = words @ figures.T  # (10, 10)
same = cosines.diagonal()
other = cosines.clone().fill_diagonal_(-1).max(dim=1).values
for d in range(10):
    print(f"{d}: same digit {same[d]:.3f}, closest other {other[d]:.3f}")

# %% [markdown]
# ### Solution 3: the image every zero caption finds
#
# The nearest validation images to "the digit zero", with their labels
# and cosines: one odd image can sit further along the caption's
# direction than any real zero.

# %%
zero = embed_captions(model, ["the digit zero"])  # (1, E)
scores = (images @ zero.T).squeeze(1)  # (2000,)
best = scores.topk(6).indices
fig, axes = plt.subplots(1, 6, figsize=(6, 1.5))
for ax, i in zip(axes, best.tolist()):
    ax.imshow(val_x[i], cmap="gray")
    ax.set_title(f"a {int(val_y[i])}, {scores[i]:.2f}", fontsize=8)
    ax.axis("off")
fig.suptitle("nearest to 'the digit zero'")
print("labels of the six nearest:", val_y[best].tolist())
print(f"lab ran in {time.perf_counter() - lab_start:.1f} s")
