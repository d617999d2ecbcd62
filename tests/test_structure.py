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


# --------------------------------------------------------------------------
# The rhythm of a chapter (CONTRIBUTING.md, "A chapter's skeleton")
# --------------------------------------------------------------------------


def sections(text: str) -> list[tuple[str, str]]:
    """(title, body) of every level-2 section, body up to the next one."""
    lines = text.splitlines()
    starts = [(n, t) for n, t in book.headings(text)
              if lines[n - 1].startswith("## ")]
    ends = [n for n, _ in starts[1:]] + [len(lines) + 1]
    return [(t, "\n".join(lines[n:end - 1]))
            for (n, t), end in zip(starts, ends)]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.stem)
def test_chapter_closes_with_what_we_have_then_exercises(chapter):
    titles = [t for t, _ in sections(chapter.markdown.read_text())]
    assert titles[-2:] == ["What we have", "Exercises"], \
        f"{chapter.stem}: the last sections must be '## What we have' " \
        f"then '## Exercises', found {titles[-2:]}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.stem)
def test_every_section_ends_with_a_key_insight(chapter):
    missing = [t for t, body in sections(chapter.markdown.read_text())
               if t not in ("What we have", "Exercises")
               and '!!! abstract "Key insight"' not in body]
    assert not missing, f"{chapter.stem}: sections without a Key insight: " \
                        f"{missing}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda c: c.stem)
def test_three_to_five_exercises_each_with_a_solution_that_asserts(chapter):
    text = chapter.markdown.read_text()
    body = dict(sections(text))["Exercises"]
    exercises = re.split(r"^### ", body, flags=re.M)[1:]
    assert 3 <= len(exercises) <= 5, \
        f"{chapter.stem}: {len(exercises)} exercises, expected 3 to 5"
    for k, exercise in enumerate(exercises, 1):
        title = exercise.splitlines()[0]
        assert title.startswith(f"{k}. "), \
            f"{chapter.stem}: exercise heading '### {title}' should be " \
            f"'### {k}. <title>'"
        solution = exercise.split('??? success "Solution"', 1)
        assert len(solution) == 2, f"{chapter.stem} {title}: no solution"
        code = [f for f in book.python_fences(solution[1])]
        assert code, f"{chapter.stem} {title}: the solution runs no code"
        assert any(re.search(r"^\s*assert\b", f.code, re.M) for f in code), \
            f"{chapter.stem} {title}: the solution checks no claim"
        assert all(f.indent == 4 for f in code), \
            f"{chapter.stem} {title}: solution code belongs inside the " \
            f"collapsed block, indented by 4"
    # and the suite runs them: they are fences of the page it collects
    lines = {f.line for f in book.page_fences(chapter.markdown)}
    start = text.index("## Exercises")
    first = text[:start].count("\n") + 1
    in_exercises = [f for f in book.python_fences(text) if f.line > first]
    assert in_exercises and all(f.line in lines for f in in_exercises)


def test_each_lab_prompt_has_a_solution():
    for lab in sorted((book.DOCS / "labs").glob("*.py")):
        text = lab.read_text()
        prompts = re.search(r"# ## Try it yourself\n((?:#.*\n)+)", text)
        assert prompts, f"{lab.name}: no '## Try it yourself' prompts"
        count = len(re.findall(r"^# \d+\. ", prompts.group(1), re.M))
        assert count, f"{lab.name}: number the prompts 1., 2., ..."
        for k in range(1, count + 1):
            assert re.search(rf"^# ### Solution {k}: ", text, re.M), \
                f"{lab.name}: prompt {k} needs a '### Solution {k}: " \
                f"<title>' heading over the cells that answer it"


def test_no_hardware_claim_that_the_page_did_not_measure():
    """AMX, AVX-512 and bf16 units: prose may name them only where the
    page's own code printed what this machine has."""
    claim = re.compile(r"\b(AMX|AVX-?512\w*)\b", re.I)
    for page in book.pages():
        if not page.exists():
            continue  # a page the nav promises: the nav test reports it
        text = page.read_text()
        code = {n for f in book.fences(text)
                for n in range(f.line, f.end + 1)}
        prose = [line for n, line in enumerate(text.splitlines(), 1)
                 if n not in code]
        named = {m.group(1).upper() for line in prose
                 for m in claim.finditer(line)}
        if not named:
            continue
        record = book._read_record(page) or {"outputs": []}
        printed = "".join(o["text"] for o in record["outputs"]).lower()
        for name in named:
            assert name.lower().replace("-", "")[:6] in \
                printed.replace("-", ""), \
                f"{page.name} names {name} in its prose, but nothing on " \
                f"the page printed what this machine has"
