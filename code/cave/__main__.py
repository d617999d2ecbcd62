"""`cave` and `python -m cave`: the book's command line.

    cave train   train the LLaMA of docs/transformers/llama_training.md
    cave sample  sample from a checkpoint (the shipped one by default)
    cave bench   the chapter's speed benchmark

The commands live in their chapter's module; this file only dispatches.
"""

import sys


def main(argv=None) -> int:
    from cave.transformers.llama_training import main as chapter_main

    return chapter_main(argv)


if __name__ == "__main__":
    sys.exit(main())
