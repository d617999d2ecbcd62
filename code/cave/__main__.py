"""`cave` and `python -m cave`: the book's command line.

    cave train   train the LLaMA of docs/transformers/llama_training.md
    cave sample  sample from a checkpoint (the shipped one by default)
    cave bench   the LLaMA chapter's speed benchmark
    cave run     run a chapter's page, or its full run (--full)

The commands live in cave/cli.py; this file only dispatches.
"""

import sys


def main(argv=None) -> int:
    from cave.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
