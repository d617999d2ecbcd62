"""Deep Learning Cave: every architecture built from raw PyTorch.

The package mirrors the book. Each part of the book is a subpackage and
each chapter a module, generated from the chapter's Markdown:

    cave.fundamentals.essentials     docs/fundamentals/essentials.md
    cave.fundamentals.data           docs/fundamentals/data.md
    cave.fundamentals.deep_networks  docs/fundamentals/deep_networks.md

`cave.book` is the machinery that turns chapters into modules, runs their
code and renders their outputs; it is not a chapter.
"""

__version__ = "0.1.0"
