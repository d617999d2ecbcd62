"""How pytest runs the book: every Python fence of every chapter, once.

pytest-markdown-docs collects the fences; three hooks here change how:

* its Markdown parser sees admonitions and content tabs flattened, so the
  fences indented inside them are collected too;
* each fence runs in its chapter's one namespace, after the fences above
  it, exactly once (a notebook's semantics at linear cost, where the
  plugin's `continuation` would re-run every earlier fence);
* no `.py` file is imported to look for docstring fences: the book's code
  is tested through its chapters and tests, not by accident of collection.
"""

from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from pytest_markdown_docs._runners import DefaultRunner, register_runner

from cave import book


class _ContainerAwareMarkdown(MarkdownIt):
    def parse(self, src, env=None):
        return super().parse(book.flatten_containers(src), env)


@pytest.hookimpl(tryfirst=True)
def pytest_markdown_docs_markdown_it():
    return _ContainerAwareMarkdown("commonmark")


_RUNS: dict[Path, book.ChapterRun] = {}


@register_runner(default=True)
class ChapterRunner(DefaultRunner):
    """Runs a fence in its chapter's namespace, catching up earlier ones."""

    def runtest(self, test, args, **_):
        path = Path(test.source_path).resolve()
        run = _RUNS.get(path)
        if run is None:
            run = _RUNS[path] = book.ChapterRun(path)
        try:
            run.run_to(run.index_of(test.start_line))
        except book.EarlierFenceFailed as reason:
            pytest.skip(str(reason))
        if run.complete:
            book.save_outputs(run)  # the site shows these, not a re-run


@pytest.hookimpl(wrapper=True)
def pytest_collect_file(file_path, parent):
    collectors = yield
    return [c for c in collectors
            if type(c).__name__ != "MarkdownDocstringCodeModule"]
