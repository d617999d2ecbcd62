"""The shape of the book: chapters, modules, imports, fences, CI."""

import ast
import re
import sys
from pathlib import Path

import pytest

from cave import book

ROOT = book.ROOT
CHAPTERS = book.chapters()
ALLOWED = {"torch", "numpy", "matplotlib", "cave"}  # and the standard library


def all_markdown():
    return sorted(book.DOCS.rglob("*.md"))


def test_every_chapter_has_its_module_and_every_module_its_chapter():
    on_disk = {(p.parent.name, p.stem) for p in book.DOCS.glob("*/*.md")
               if p.name != "index.md"}
    assert on_disk == {(c.part, c.stem) for c in CHAPTERS}, \
        "every chapter must be in the nav, and the nav only lists chapters"
    modules = {(p.parent.name, p.stem)
               for p in (book.CODE / "cave").glob("*/*.py")
               if p.name != "__init__.py"}
    assert modules == on_disk, (
        f"modules without a chapter: {sorted(modules - on_disk)}; "
        f"chapters without a module: {sorted(on_disk - modules)}")


def test_modules_are_generated_from_their_chapters():
    problems = book.check()
    assert not problems, "\n".join(problems)


def test_the_nav_declares_the_parts_once_each_in_one_section():
    """The parts and their order are the nav's: each section of the nav
    holds the chapters of one part folder, and each part is one section."""
    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    sections = [(title, pages) for item in nav if isinstance(item, dict)
                for title, pages in item.items() if isinstance(pages, list)]
    seen = []
    for title, entries in sections:
        paths = [p for e in entries for p in
                 (e.values() if isinstance(e, dict) else [e])]
        chapter_parts = {Path(p).parts[0] for p in paths
                         if book.is_chapter_page(p)}
        assert len(chapter_parts) <= 1, (
            f"nav section {title!r} mixes parts {sorted(chapter_parts)}: "
            "one section per part folder")
        seen += sorted(chapter_parts)
    assert seen == book.parts(), "a part appears in two sections"
    assert seen, "the nav lists no chapter"
    for part in seen:
        assert (book.CODE / "cave" / part / "__init__.py").exists(), \
            f"code/cave/{part}/__init__.py is missing: run `cave.book tangle`"


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_modules_import_only_from_earlier_chapters():
    order = {c.module_name: i for i, c in enumerate(CHAPTERS)}
    for i, chapter in enumerate(CHAPTERS):
        tree = ast.parse(chapter.module.read_text())
        for name in _imports(tree):
            target = next((m for m in order if name == m or
                           name.startswith(m + ".")), None)
            if target is not None:
                assert order[target] < i, (
                    f"{chapter.module_name} imports {name}, which comes "
                    "later in the book (imports flow only backward)")
            elif name.startswith("cave."):
                assert name == "cave", f"{chapter} imports unknown {name}"


def test_book_code_uses_no_library_but_pytorch():
    sources = [(c.module, c.module.read_text()) for c in CHAPTERS]
    sources += [(md, f.code) for md in all_markdown()
                for f in book.python_fences(md.read_text())]
    sources += [(lab, lab.read_text()) for lab in book.DOCS.rglob("*.py")]
    for path, source in sources:
        for name in _imports(ast.parse(source)):
            top = name.split(".")[0]
            assert top in ALLOWED or top in sys.stdlib_module_names, (
                f"{path.relative_to(ROOT)} imports {name}: the book's code "
                "uses only PyTorch, NumPy, matplotlib and the standard "
                "library (reference libraries belong in tests/)")


def test_no_package_named_code():
    assert not (ROOT / "code" / "__init__.py").exists()
    import code

    assert Path(code.__file__).parent == Path(ast.__file__).parent, \
        "`import code` must find the standard library's module"


def test_no_fence_carries_a_bare_flag():
    bad = [f"{md.relative_to(ROOT)}:{f.line}: ```{f.info}"
           for md in all_markdown() for f in book.fences(md.read_text())
           if f.flags]
    assert not bad, ("bare flags break superfences rendering; use the brace "
                     "form {.python ...}:\n" + "\n".join(bad))


def test_titled_fences_name_their_own_chapter_module():
    for md in all_markdown():
        for f in book.python_fences(md.read_text()):
            if f.title is not None:
                rel = md.relative_to(book.DOCS).with_suffix(".py")
                assert f.title == f"cave/{rel.as_posix()}", \
                    f"{md.relative_to(ROOT)}:{f.line} titled {f.title}"


def test_pytest_collects_exactly_the_fences_the_book_reads(pytestconfig):
    """One parser: pytest-markdown-docs collects through the conftest's
    parser hook, which answers with cave.book's fences; each collected
    test starts where the book's fence does, and none is skipped."""
    from pytest_markdown_docs.plugin import FenceSyntax, extract_fence_tests

    parser = pytestconfig.hook.pytest_markdown_docs_markdown_it()
    for md in all_markdown():
        text = md.read_text()
        collected = [t.start_line for t in extract_fence_tests(
            parser, text, 0, md, "md", FenceSyntax.superfences)]
        assert collected == [f.line for f in book.python_fences(text)], \
            f"{md.relative_to(ROOT)}: pytest and the book disagree"


def test_recorded_outputs_were_current_when_the_run_began(stale_at_start):
    """docs/_outputs holds what every page printed and drew, so that a
    fresh clone serves the book at once. Each record names the digests of
    its inputs; a page whose inputs changed since must be recorded again,
    and the record committed with the change."""
    assert not stale_at_start, (
        "recorded outputs out of date (this run re-recorded the pages whose "
        "fences all ran; `python -m cave.book record` does the rest): "
        "commit docs/_outputs/ with your change:\n" + "\n".join(
            f"  {page}: {why}" for page, why in stale_at_start))


def test_chapter_modules_carry_no_command_line():
    for chapter in CHAPTERS:
        source = chapter.module.read_text()
        for name in _imports(ast.parse(source)):
            assert name != "argparse", (
                f"{chapter.module_name} imports argparse: the command line "
                "lives in code/cave/cli.py; a chapter offers full_run()")
        assert "__main__" not in source, (
            f"{chapter.module_name} has a __main__ block: `cave run "
            f"{chapter.stem} --full` runs a chapter's full_run()")


def test_no_chapter_module_pickles_or_evaluates_code():
    """Checkpoints are safetensors and JSON: nothing the book loads runs
    code, so no module pickles, torch.save()s or evaluates strings."""
    for chapter in CHAPTERS:
        source = chapter.module.read_text()
        names = {n.id for n in ast.walk(ast.parse(source))
                 if isinstance(n, ast.Name)}
        where = chapter.module_name
        assert "import pickle" not in source and "pickle." not in source, \
            where
        assert "torch.load(" not in source and "torch.save(" not in source, \
            where
        assert "eval" not in names and "exec" not in names, where


def test_demonstrations_import_the_shared_helpers_instead_of_rewriting():
    """Helpers live once: no demonstration fence and no lab defines a
    function the essentials or data module already exports."""
    from cave.fundamentals import data, essentials

    shared = set(essentials.__all__) | {
        n for n, v in vars(data).items() if callable(v) and
        getattr(v, "__module__", "") == data.__name__}
    sources = [(f"{md.relative_to(ROOT)}:{f.line}", f.code)
               for md in all_markdown()
               for f in book.python_fences(md.read_text()) if not f.title]
    sources += [(str(lab.relative_to(ROOT)), lab.read_text())
                for lab in book.labs()]
    for where, source in sources:
        tree = ast.parse(source)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                assert node.name not in shared, (
                    f"{where} defines {node.name}, which the book already "
                    "has: import it from cave.fundamentals")


def _readme_commands():
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", readme)


def test_readme_opens_with_serve_and_test_commands():
    serve, test = _readme_commands()[:2]
    assert "pip install -r requirements.txt" in serve
    assert serve.endswith("mkdocs serve")
    assert "pip install -r requirements.txt" in test
    assert test.endswith("-m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    test = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run must run the README's test command as is"
    assert "apt-get install -y chromium" in "\n".join(ci)


def test_requirements_pin_everything_exactly():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-e"):
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", line), line
    assert "torch==2.13.0" in (ROOT / "requirements.txt").read_text()


@pytest.mark.parametrize("name, sha", [
    ("tinyshakespeare.txt", "86c4e6aa"),
    ("mnist-t10k-images-idx3-ubyte.gz", "8d422c7b"),
    ("mnist-t10k-labels-idx1-ubyte.gz", "f7ae60f9"),
])
def test_shipped_data_is_package_data(name, sha):
    import hashlib
    from importlib.resources import files

    data = files("cave").joinpath("_data", name).read_bytes()
    assert hashlib.sha256(data).hexdigest().startswith(sha)
