"""Every copy button copies code that runs pasted alone.

For each page, a fresh Python (with the package installed, nothing else)
runs, for every fence, exactly what its copy button copies: the fence's
context (cave.book.copy_context) and the fence, in a fresh `__main__`
namespace. Contexts share their first statements, so the runner walks them
as a tree and forks the process where two copies part: each copy still
runs its own statements in its own process, and what they share runs once.

A lab's cell copies with every cell above it: the lab's own run, cell
after cell in one namespace (conftest.py), runs every such copy already;
the last test checks that is what the copies are.
"""

import json
import subprocess
import sys
import textwrap

import pytest

from cave import book

RUNNER = textwrap.dedent('''
    import contextlib, io, json, os, sys, traceback, types
    import matplotlib
    matplotlib.use("Agg")
    import torch
    torch.set_num_threads(1)  # nothing forks safely from a thread pool
    from pathlib import Path
    from cave import book

    page, out = Path(sys.argv[1]), sys.argv[2]
    tree = {}  # piece -> (subtree, fences that end here)
    for index, pieces in enumerate(book.copy_pieces(page)):
        node = tree
        for k, piece in enumerate(pieces):
            child = node.setdefault(piece, ({}, []))
            if k == len(pieces) - 1:
                child[1].append(index)
            node = child[0]

    def below(node):
        for sub, ends in node.values():
            yield from ends
            yield from below(sub)

    def report(fences, error=None):
        with open(out, "a") as f:
            for index in fences:
                f.write(json.dumps([index, error]) + "\\n")

    def walk(node, namespace):
        for piece, (sub, ends) in node.items():
            forked = len(node) > 1
            if forked:
                pid = os.fork()
                if pid:
                    os.waitpid(pid, 0)
                    continue
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    exec(compile(piece, "<copied>", "exec"), namespace)
            except BaseException:
                error = traceback.format_exc(limit=-3)
                report(ends + list(below(sub)), error)
            else:
                report(ends)
                walk(sub, namespace)
            finally:
                import matplotlib.pyplot as plt
                plt.close("all")
            if forked:
                os._exit(0)

    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    walk(tree, main.__dict__)
    ''')


CHAPTERS = [c.markdown for c in book.chapters()]


@pytest.mark.spread
@pytest.mark.parametrize("page", CHAPTERS, ids=book._rel)
def test_every_copy_button_copies_code_that_runs_alone(page, tmp_path):
    out = tmp_path / "results.jsonl"
    done = subprocess.run([sys.executable, "-c", RUNNER, str(page),
                           str(out)], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(json.loads(line) for line in out.read_text().splitlines())
    fences = book.page_fences(page)
    assert sorted(results) == list(range(len(fences))), \
        "some copies never ran: " + done.stderr[-2000:]
    failed = {k: e for k, e in results.items() if e is not None}
    assert not failed, "\n".join(
        f"{book._rel(page)}:{fences[k].line}: the copied fence fails "
        f"alone:\n{e}" for k, e in sorted(failed.items()))


@pytest.mark.parametrize("lab", book.labs(), ids=book._rel)
def test_a_lab_cell_copies_with_the_cells_above_it(lab):
    codes = [f.code for f in book.page_fences(lab)]
    texts = book.copy_texts(lab)
    assert len(texts) == len(codes)
    for k, text in enumerate(texts):
        assert text == "\n".join(codes[:k]) + ("\n\n" if k else "") + \
            codes[k]
