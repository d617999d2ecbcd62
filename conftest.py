"""How pytest runs the book: every Python fence of every page, once.

pytest-markdown-docs collects each chapter's fences; this file changes how,
through public hooks only:

* the fences it collects are the book's own reading of the page
  (`cave.book.fences`, the scanner the tangler, the runner and the site
  use): the plugin's Markdown-parser hook gets a parser that answers with
  them, so fences inside admonitions, tabs and collapsed blocks count;
* each fence runs in its chapter's one namespace, after the fences above
  it, exactly once (a notebook's semantics at linear cost, where the
  plugin's `continuation` would re-run every earlier fence);
* the labs (`docs/labs/*.py`) are collected cell by cell and run the same
  way;
* a page that ran completely leaves its record in docs/_outputs (if the
  record was stale), and which records were stale when the session
  started is kept for tests/test_structure.py to report;
* no `.py` file is imported to look for docstring fences;
* under pytest-xdist (two workers; a page's fences and a test file's tests
  kept together on one, by `--dist loadgroup` and the group written into
  their nodeids here), each worker computes on one thread.
"""

import os
import types
from pathlib import Path

import pytest
import torch
from _pytest.nodeid import NodeId  # see _keep_on_one_worker

from cave import book

STALE_AT_START = pytest.StashKey[list]()
_RUNS: dict[Path, book.ChapterRun] = {}


class _BookFences:
    """A stand-in for the plugin's markdown-it parser: `parse` returns the
    book's fences as the fence tokens the plugin reads."""

    def parse(self, src, env=None):
        return [types.SimpleNamespace(type="fence", info=f.info,
                                      content=f.code, map=[f.line - 1, f.end])
                for f in book.python_fences(src)]


@pytest.hookimpl(tryfirst=True)
def pytest_markdown_docs_markdown_it():
    return _BookFences()


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pyproject runs two workers (pytest-xdist), one per core; torch's
        # default of a thread per core in each would oversubscribe them
        # (measured on 2 cores: 395 s with two threads each, 163 s with one)
        torch.set_num_threads(1)
    config.stash[STALE_AT_START] = [
        (book._rel(page), why) for page, why in book.stale_pages()]


@pytest.fixture(scope="module")
def one_thread():
    """For tests of tiny tensors: a second thread only adds waiting, which
    on a busy machine costs far more than the arithmetic. (Under xdist
    every worker has one thread already.) Use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stale_at_start(request):
    """Pages whose recorded outputs were stale when this session began."""
    return request.config.stash[STALE_AT_START]


def _run_of(path) -> book.ChapterRun:
    path = Path(path).resolve()
    if path not in _RUNS:
        _RUNS[path] = book.ChapterRun(path)
    return _RUNS[path]


def run_fence(run: book.ChapterRun, index: int) -> None:
    """Run a page's fences up to `index`, each once; record it when done."""
    try:
        run.run_to(index)
    except book.EarlierFenceFailed as reason:
        pytest.skip(str(reason))
    if run.complete:
        book.save_outputs(run)


def _run_markdown_fence(item):
    run = _run_of(item.path)
    run_fence(run, run.index_of(item.start_line))


class LabCell(pytest.Item):
    def __init__(self, *, index: int, fence: book.Fence, **kw):
        super().__init__(**kw)
        self.index, self.fence = index, fence

    def runtest(self):
        run_fence(_run_of(self.path), self.index)

    def reportinfo(self):
        return self.path, self.fence.line, self.name


class LabScript(pytest.File):
    def collect(self):
        for index, fence in enumerate(book.page_fences(self.path)):
            yield LabCell.from_parent(self, name=f"cell {index + 1} (line "
                                      f"{fence.line + 1})", index=index,
                                      fence=fence)


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path, parent):
    collectors = yield
    collectors = [c for c in collectors
                  if type(c).__name__ != "MarkdownDocstringCodeModule"]
    if file_path.suffix == ".py" and file_path.parent == book.DOCS / "labs":
        collectors.append(LabScript.from_parent(parent, path=file_path))
    return collectors


def _keep_on_one_worker(item, group: str) -> None:
    """pytest-xdist's `--dist loadgroup` sends the tests whose nodeids end
    in the same "@group" to one worker. xdist 3.8 writes that suffix into
    `item._nodeid`, which pytest 9 no longer reads (it keeps the nodeid in
    `item._id`), so the `xdist_group` marker does nothing there: each
    page's fences went to both workers, and each worker ran again the
    fences above the ones it was given. The suffix is written here."""
    item._id = NodeId.parse(f"{item.nodeid}@{group}")


def pytest_collection_modifyitems(config, items):
    grouping = getattr(config.option, "loadgroup", False)  # an xdist worker
    for item in items:
        if hasattr(item, "test_definition") and item.path.suffix == ".md":
            item.runtest = types.MethodType(_run_markdown_fence, item)
        # a page's fences, in order, and a test file's tests stay on one
        # worker; tests marked `spread` go wherever a worker is free
        if grouping and item.get_closest_marker("spread") is None:
            _keep_on_one_worker(item, item.nodeid.split("::")[0])
    # xdist hands out the groups in this order: the longest first (the
    # site's build and browser, about 100 s on one worker; then the copies
    # and the labs, which retrain), so that no long group starts last
    # while the other worker sits idle. The sort is stable: a page's
    # fences keep their order.
    items.sort(key=_heavy_first)


def _heavy_first(item) -> int:
    path = item.path.as_posix()
    if path.endswith("tests/test_site.py"):
        return 0
    if path.endswith("tests/test_copies.py") or "/docs/labs/" in path:
        return 1
    return 2
