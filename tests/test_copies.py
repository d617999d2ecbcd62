"""Every copy button copies code that runs pasted alone.

For each chapter, every fence's copy text (its context, computed by
cave.book.copy_context, then the fence) runs in a fresh `__main__`
namespace: none of the chapter's state is there, only the package. (It
runs in the test process, where the package is already imported; a fresh
Python would only import it first.)

A fence whose copy is the fence alone (it needs nothing from above) is
not run again here: the page's run runs it alone, in a fresh module, and
its names join the page's afterwards.

A lab's cell copies with every cell above it: the lab's own run, cell
after cell in one namespace (conftest.py), runs every such copy already;
the last test checks that is what the copies are.
"""

import contextlib
import io
import sys
import traceback
import types

import matplotlib.pyplot as plt
import pytest

from cave import book

CHAPTERS = [c.markdown for c in book.chapters()]


@pytest.mark.spread
@pytest.mark.parametrize("page", CHAPTERS, ids=book._rel)
def test_every_copy_button_copies_code_that_runs_alone(page, monkeypatch):
    fences = book.page_fences(page)
    failed = []
    alone = book.ChapterRun(page).alone
    for k, text in enumerate(book.copy_texts(page)):
        if k in alone:  # the fence is its own copy, and the page's run
            continue  # ran it alone, in a fresh module (test_book.py)
        main = types.ModuleType("__main__")  # what a fresh Python runs in
        monkeypatch.setitem(sys.modules, "__main__", main)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(text, f"<copy of {book._rel(page)}:"
                             f"{fences[k].line}>", "exec"), main.__dict__)
        except Exception:
            failed.append(f"{book._rel(page)}:{fences[k].line}: the copied "
                          f"fence fails alone:\n{traceback.format_exc(-3)}")
        finally:
            plt.close("all")
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("lab", book.labs(), ids=book._rel)
def test_a_lab_cell_copies_with_the_cells_above_it(lab):
    codes = [f.code for f in book.page_fences(lab)]
    texts = book.copy_texts(lab)
    assert len(texts) == len(codes)
    for k, text in enumerate(texts):
        assert text == "\n".join(codes[:k]) + ("\n\n" if k else "") + \
            codes[k]
