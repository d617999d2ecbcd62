"""The machinery: reading fences, flattening containers, tangling, running."""

import json
import os
import textwrap
from pathlib import Path

import pytest

from cave import book

SAMPLE = textwrap.dedent('''\
    # A chapter

    ```{.python title="cave/part/chap.py"}
    import math
    ```

    ```python
    x = 1
    ```

    !!! note "Inside an admonition"

        ```python
        y = x + 1
        ```

    === "A tab"

        ```{.python}
        print(y)
        ```

    ````markdown
    ```python
    not a fence: inside a four-backtick block
    ```
    ````

    ```{.python title="cave/part/chap.py"}

    def f():
        return math.pi
    ```

    ```bash
    echo not python
    ```
    ''')


def test_fences_found_at_every_depth_in_order():
    found = book.python_fences(SAMPLE)
    assert [f.line for f in found] == [3, 7, 13, 19, 29]
    assert [f.title for f in found] == [
        "cave/part/chap.py", None, None, None, "cave/part/chap.py"]
    assert found[2].indent == 4 and found[2].code == "y = x + 1\n"
    assert found[3].code == "print(y)\n"
    # the four-backtick block holds one fence of its own, not a Python one
    assert [f.lang for f in book.fences(SAMPLE)] == [
        "python", "python", "python", "python", "markdown", "python", "bash"]


@pytest.mark.parametrize("info, want", [
    ('{.python title="cave/a/b.py"}', ("python", "cave/a/b.py", ())),
    ("{.py .numberLines}", ("py", None, ())),
    ("python", ("python", None, ())),
    ("python continuation", ("python", None, ("continuation",))),
    ("", ("", None, ())),
])
def test_parse_info(info, want):
    assert book.parse_info(info) == want


def test_flatten_keeps_lines_and_unindents_container_bodies():
    flat = book.flatten_containers(SAMPLE)
    assert len(flat.splitlines()) == len(SAMPLE.splitlines())
    lines = flat.splitlines()
    assert lines[12] == "```python" and lines[13] == "y = x + 1"
    assert lines[18] == "```{.python}" and lines[19] == "print(y)"


def test_flatten_handles_nested_containers_and_leaves_code_alone():
    text = textwrap.dedent('''\
        === "Outer"

            !!! tip

                ```python
                    indented_inside_code = True
                !!! not a container inside code
                ```

        after
        ''')
    flat = book.flatten_containers(text).splitlines()
    assert flat[4] == "```python"
    assert flat[5] == "    indented_inside_code = True"
    assert flat[6] == "!!! not a container inside code"
    assert flat[9] == "after"


def test_tangle_writes_titled_fences_under_a_header_with_line_map():
    chapter = book.Chapter("part", "chap")
    text, origin = book.tangle_text(chapter, SAMPLE)
    lines = text.splitlines()
    assert lines[0].startswith("# Generated from docs/part/chap.md")
    assert "Do not edit" in lines[1]
    assert "import math" in lines and "    return math.pi" in lines
    assert "x = 1" not in lines  # untitled fences are demonstrations
    # each run of fences from one section is marked with it and its line
    assert "# § A chapter (docs/part/chap.md:4)" in lines
    # every module line maps back to the chapter line that wrote it
    sample = SAMPLE.splitlines()
    for k, line in enumerate(lines):
        if origin[k]:
            assert sample[origin[k] - 1] == line


def test_tangle_marks_each_section_once_with_its_chapter_line():
    text = textwrap.dedent('''\
        # Title

        ## First

        ```{.python title="cave/part/chap.py"}
        a = 1
        ```

        ```{.python title="cave/part/chap.py"}
        b = 2
        ```

        ```python
        # A comment in a demo is no heading
        ```

        ## Second

        ```{.python title="cave/part/chap.py"}
        c = 3
        ```
        ''')
    module, origin = book.tangle_text(book.Chapter("part", "chap"), text)
    marks = [line for line in module.splitlines() if line.startswith("# §")]
    assert marks == ["# § First (docs/part/chap.md:6)",
                     "# § Second (docs/part/chap.md:20)"]
    assert "b = 2" in module


def test_tangle_rejects_annotation_markers_in_titled_fences():
    text = ('```{.python title="cave/part/chap.py"}\n'
            'x = data[2]  # (1)!\n```\n\n1. An annotation.\n')
    with pytest.raises(ValueError, match=r"chap.md:2: annotation marker"):
        book.tangle_text(book.Chapter("part", "chap"), text)
    # in a demonstration fence an annotation is page-only, and allowed
    book.tangle_text(book.Chapter("part", "chap"),
                     "```python\nx = 1  # (1)!\n```\n")


def test_tangle_rejects_a_fence_titled_with_another_module():
    text = '```{.python title="cave/other/module.py"}\nx = 1\n```\n'
    with pytest.raises(ValueError, match="cave/other/module.py.*expected "
                                         "'cave/part/chap.py'"):
        book.tangle_text(book.Chapter("part", "chap"), text)


def test_check_names_chapter_line_and_first_differing_line(monkeypatch,
                                                           tmp_path):
    docs, code = tmp_path / "docs", tmp_path / "code"
    (docs / "part").mkdir(parents=True)
    (docs / "part" / "chap.md").write_text(SAMPLE)
    monkeypatch.setattr(book, "DOCS", docs)
    monkeypatch.setattr(book, "CODE", code)
    monkeypatch.setattr(book, "ROOT", tmp_path)
    monkeypatch.setattr(book, "chapters", lambda: [book.Chapter("part",
                                                                "chap")])
    assert "is missing" in book.check()[0]
    assert book.write_modules()[1] == []
    assert book.check() == []
    module = code / "cave" / "part" / "chap.py"
    module.write_text(module.read_text().replace("math.pi", "math.tau"))
    (problem,) = book.check()
    assert "docs/part/chap.md line 32" in problem
    assert "return math.pi" in problem and "return math.tau" in problem


def test_chapter_run_shares_one_namespace_and_captures_outputs(tmp_path):
    chapter = tmp_path / "c.md"
    chapter.write_text(textwrap.dedent('''\
        ```python
        import matplotlib.pyplot as plt
        total = 2
        print("first", total)
        ```

        ```python
        fig, ax = plt.subplots()
        ax.set_title("Twice")
        ax.plot([total, total * 2])
        print("second", total * 2)
        ```
        '''))
    run = book.ChapterRun(chapter)
    out = run.run_to(1)
    assert run.complete and run.outputs[0].text == "first 2\n"
    assert out.text == "second 4\n"
    (alt, png), = out.figures
    assert alt == "Twice" and png.startswith(b"\x89PNG")
    dark, = out.dark  # its twin for the dark scheme
    assert dark.startswith(b"\x89PNG") and dark != png


def test_dark_figures_turn_ink_light_and_keep_colours_and_data():
    import matplotlib
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    fig, ax = plt.subplots()
    black, = ax.plot([0, 1], "k-")
    blue, = ax.plot([1, 0], color="C0")
    grey = ax.axhline(0.5, color="gray")
    title = ax.set_title("t")
    data = [[0.0, 1.0], [1.0, 0.0]]
    image = ax.imshow(data, cmap="gray")
    legend = ax.legend(["a", "b"])
    book._recolour_for_dark(fig)
    light = mcolors.to_rgba(book.INK_ON_DARK)
    assert mcolors.to_rgba(black.get_color()) == light
    assert mcolors.to_rgba(title.get_color()) == light
    assert mcolors.to_rgba(ax.xaxis.label.get_color()) == light
    assert mcolors.to_rgba(ax.spines["left"].get_edgecolor()) == light
    assert mcolors.to_rgba(legend.get_frame().get_facecolor())[:3] == \
        mcolors.to_rgba(book.PAPER_ON_DARK)[:3]
    assert mcolors.to_rgba(blue.get_color()) == mcolors.to_rgba("C0")
    assert mcolors.to_rgba(grey.get_color()) == mcolors.to_rgba("gray")
    assert image.get_array().tolist() == data and \
        image.get_cmap().name == "gray"
    plt.close(fig)


def test_a_failing_fence_reports_chapter_lines_and_stops_the_rest(tmp_path):
    chapter = tmp_path / "c.md"
    chapter.write_text("text\n\n```python\nx = 1\n1 / 0\n```\n\n"
                       "```python\nprint(x)\n```\n")
    run = book.ChapterRun(chapter)
    with pytest.raises(ZeroDivisionError) as info:
        run.run_to(0)
    assert info.traceback[-1].lineno + 1 == 5  # line 5 of the chapter
    with pytest.raises(book.EarlierFenceFailed, match="line 3 failed"):
        run.run_to(1)


def test_rendered_outputs_sit_under_their_fences_at_their_indent():
    markdown = "# T\n\n!!! note\n\n    ```python\n    print(1)\n    ```\n"
    outputs = [book.Output(5, "1\n", [("A plot", b"png")])]
    html = book._render_outputs(markdown, outputs, "part/t/")
    assert "    ```{.text .cave-output}\n    1\n    ```" in html
    assert '<img src="figure-1-1.png" alt="A plot"' in html
    assert book._FIGURES["part/t/figure-1-1.png"] == ("A plot", b"png")


def test_notebook_has_one_code_cell_per_fence_with_its_outputs():
    import nbformat

    path = Path(book.DOCS / "fundamentals" / "data.md")
    outputs = [book.Output(f.line, f"printed {k}\n",
                           [("A plot", b"\x89PNG fake")] if k == 1 else [])
               for k, f in enumerate(book.python_fences(path.read_text()))]
    nb = nbformat.reads(book.notebook(path, outputs), as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == len(outputs)
    assert nb.metadata.kernelspec.name == "python3"
    assert code[0].outputs[0].text == "printed 0\n"
    assert code[1].outputs[1].data["image/png"]  # the figure, base64
    assert code[0].source.startswith("# cave/fundamentals/data.py")


def test_a_lab_script_reads_as_cells_fences_and_a_page(tmp_path):
    script = textwrap.dedent('''\
        # %% [markdown]
        # # A lab
        #
        # Some *prose*.

        # %%

        x = 2
        print(x)


        # %%
        print(x * 3)
        ''')
    cells = book.lab_cells(script)
    assert [(c.markdown, c.text) for c in cells] == [
        (True, "# A lab\n\nSome *prose*.\n"), (False, "x = 2\nprint(x)\n"),
        (False, "print(x * 3)\n")]
    fences = book.lab_fences(script)
    lines = script.splitlines()
    for fence in fences:  # code starts on the line after fence.line
        assert lines[fence.line] == fence.code.splitlines()[0]
    page = book.lab_markdown(script)
    assert page.startswith("# A lab")
    assert [f.code for f in book.python_fences(page)] == [
        f.code for f in fences]
    lab = tmp_path / "labs" / "lab.py"
    lab.parent.mkdir()
    lab.write_text(script + "\n# %%\n1 / 0\n")
    run = book.ChapterRun(lab)
    assert run.run_to(1).text == "6\n"
    with pytest.raises(ZeroDivisionError) as info:
        run.run_to(2)
    line = info.traceback[-1].lineno + 1  # pytest counts from 0
    assert lab.read_text().splitlines()[line - 1] == "1 / 0"


def test_future_imports_carry_to_later_fences(tmp_path):
    chapter = tmp_path / "c.md"
    chapter.write_text("```python\nfrom __future__ import annotations\n```"
                       "\n\n```python\ndef f() -> Later: ...\n"
                       "print(f.__annotations__['return'])\n```\n")
    run = book.ChapterRun(chapter)
    assert run.run_to(1).text == "Later\n"


def test_chapter_namespace_is_a_module_dataclasses_and_pickle_can_find(
        tmp_path):
    chapter = tmp_path / "c.md"
    chapter.write_text(
        "```python\nfrom __future__ import annotations\nimport dataclasses"
        "\nimport pickle\n\n@dataclasses.dataclass\nclass Config:\n"
        "    width: int = 3\n\nprint(pickle.loads(pickle.dumps(Config())))"
        "\nprint(__name__ == '__main__')\n```\n")
    out = book.ChapterRun(chapter).run_to(0)
    assert out.text == "Config(width=3)\nFalse\n"


# --------------------------------------------------------------------------
# Records: outputs kept with the digests of exactly what they came from
# --------------------------------------------------------------------------


@pytest.fixture
def small_book(monkeypatch, tmp_path):
    """A book of three chapters in a temporary repository: `b` imports the
    module of `a`; `c` reads a data file; `a` reads nothing."""
    root = tmp_path
    for name, value in [("ROOT", root), ("DOCS", root / "docs"),
                        ("CODE", root / "code"),
                        ("OUTPUTS", root / "docs" / "_outputs")]:
        monkeypatch.setattr(book, name, value)
    (root / "mkdocs.yml").write_text(
        "nav:\n  - Part:\n      - p/a.md\n      - p/b.md\n      - p/c.md\n"
        "  - Labs:\n      - labs/lab.md\n")
    (root / "docs" / "p").mkdir(parents=True)
    (root / "docs" / "labs").mkdir()
    (root / "code" / "cave" / "_data").mkdir(parents=True)
    (root / "code" / "cave" / "__init__.py").write_text("")
    (root / "code" / "cave" / "_data" / "x.txt").write_text("42\n")
    (root / "docs" / "p" / "a.md").write_text(
        "# A\n\n```{.python title=\"cave/p/a.py\"}\nANSWER = 42\n```\n\n"
        "```python\nprint(ANSWER)\n```\n")
    # b imports a's module; the import never runs (cave here is the real
    # package), but the record follows what the code imports
    (root / "docs" / "p" / "b.md").write_text(
        "# B\n\n```python\nif False:\n    from cave.p.a import ANSWER\n"
        "print('b')\n```\n")
    (root / "docs" / "p" / "c.md").write_text(
        "# C\n\n```python\nimport pathlib\ndata = pathlib.Path("
        f"{str(root / 'code' / 'cave' / '_data' / 'x.txt')!r})\n"
        "print(data.read_text().strip())\n```\n")
    (root / "docs" / "labs" / "lab.py").write_text(
        "# %% [markdown]\n# # Lab\n\n# %%\nprint('lab')\n")
    written, problems = book.write_modules()
    assert problems == [] and root / "code/cave/p/a.py" in written
    return root


def _states():
    return {book._rel(p): book.record_state(p)[0] for p in book.pages()}


def test_records_follow_each_pages_real_inputs(small_book):
    root = small_book
    assert _states() == {"docs/p/a.md": False, "docs/p/b.md": False,
                         "docs/p/c.md": False, "docs/labs/lab.py": False}
    assert [why for _, why in book.stale_pages()] == [
        "no recorded outputs"] * 4
    for page in book.pages():
        assert book.execute(page)  # runs and records
    assert set(_states().values()) == {True}
    record = json.loads((root / "docs/_outputs/p/c.json").read_text())
    assert "code/cave/_data/x.txt" in record["inputs"], "what c read"
    assert "code/cave/p/a.py" not in record["inputs"]
    record = json.loads((root / "docs/_outputs/p/b.json").read_text())
    assert "code/cave/p/a.py" in record["inputs"], "what b imports"
    assert record["outputs"][0]["text"] == "b\n"

    # a's prose changes: a alone is stale; its module changed only in the
    # chapter lines its section mark names
    a = root / "docs/p/a.md"
    a.write_text(a.read_text().replace("# A\n", "# A\n\nMore prose.\n"))
    assert book.write_modules() == ([root / "code/cave/p/a.py"], [])
    assert _states() == {"docs/p/a.md": False, "docs/p/b.md": True,
                         "docs/p/c.md": True, "docs/labs/lab.py": True}
    book.execute(a)
    # a's library code changes: a and b, which imports it, are stale
    a.write_text(a.read_text().replace("ANSWER = 42", "ANSWER = 43"))
    book.write_modules()
    current, why = book.record_state(root / "docs/p/b.md")
    assert not current and why == "code/cave/p/a.py changed"
    assert _states() == {"docs/p/a.md": False, "docs/p/b.md": False,
                         "docs/p/c.md": True, "docs/labs/lab.py": True}
    # the data c reads changes: c alone
    for page in book.pages():
        book.execute(page)
    (root / "code/cave/_data/x.txt").write_text("43\n")
    assert _states() == {"docs/p/a.md": True, "docs/p/b.md": True,
                         "docs/p/c.md": False, "docs/labs/lab.py": True}
    assert book.execute(root / "docs/p/c.md")[0].text == "43\n"


def test_a_current_record_is_served_without_running(small_book):
    a = small_book / "docs/p/a.md"
    book.execute(a)
    target = small_book / "docs/_outputs/p/a.json"
    record = json.loads(target.read_text())
    record["outputs"][1]["text"] = "recorded, not run\n"
    target.write_text(json.dumps(record))
    assert book.execute(a)[1].text == "recorded, not run\n"
    # a complete run does not rewrite a current record (no churn)
    run = book.ChapterRun(a)
    run.run_to(1)
    book.save_outputs(run)
    assert book.execute(a)[1].text == "recorded, not run\n"
    # a damaged record is stale, never an error
    target.write_text("{not json")
    assert book.record_state(a) == (False, "no recorded outputs")
    assert book.execute(a)[1].text == "42\n"


def test_a_page_the_nav_does_not_list_gets_an_error_saying_what_to_do(
        small_book):
    stray = small_book / "docs" / "q" / "d.md"
    stray.parent.mkdir()
    stray.write_text("# D\n")
    assert book.parts() == ["p"]
    with pytest.raises(ValueError, match=r"docs/q/d.md is not in the nav "
                                         r"of mkdocs.yml: add it under its "
                                         r"part's section \(parts, in "
                                         r"order: p\)"):
        book.chapter_of(stray)
    assert book.chapter_of(small_book / "docs/p/a.md") == book.Chapter(
        "p", "a")
    assert any("docs/q/d.md is not in the nav" in problem
               for problem in book.check())


# --------------------------------------------------------------------------
# What a copy button copies
# --------------------------------------------------------------------------

COPY_PAGE = textwrap.dedent('''\
    ```{.python title="cave/part/chap.py"}
    from __future__ import annotations

    import math

    SCALE = 2


    def double(x):
        return SCALE * x
    ```

    ```python
    import torch

    weights = torch.zeros(3)
    unrelated = "never needed"
    ```

    ```python
    for step in range(3):
        weights += 1  # acts on weights
    print("trained")
    ```

    ```python
    def report():
        return float(weights.sum()) + offset  # globals read when called

    offset = 0.5
    ```

    ```python
    print(double(report()), math.pi)
    ```
    ''')


def test_a_copy_carries_exactly_the_context_its_fence_needs(tmp_path):
    page = tmp_path / "part" / "chap.md"
    page.parent.mkdir()
    page.write_text(COPY_PAGE)
    texts = book.copy_texts(page)
    last = texts[-1]
    # the titled fence's definitions are imported, its imports copied
    assert last.startswith("from __future__ import annotations\n"
                           "from cave.part.chap import double\nimport math")
    assert "SCALE = 2" not in last and "def double" not in last
    # the loop that changes `weights`, the global a function reads
    assert "weights += 1" in last and "offset = 0.5" in last
    assert "unrelated" not in last and 'print("trained")' not in last
    # a fence needing nothing copies as itself
    assert texts[1] == book.page_fences(page)[1].code
    # every copy runs alone, apart from the module this page would make
    for k, text in enumerate(texts[1:-1], 1):
        exec(compile(text, f"copy{k}", "exec"), {"__name__": "__main__"})
    namespace = {"__name__": "__main__"}
    exec(compile(last.replace("from cave.part.chap import double\n", "")
                 + "\n", "copy", "exec"),
         {**namespace, "double": lambda x: 2 * x})


def test_a_fence_that_needs_nothing_from_above_runs_alone(tmp_path):
    """Its copy is the fence itself, so the page's run runs it in a fresh
    module: a name it reads from the page in a way the copy's analysis
    cannot see fails here, as it would for a reader who pasted it."""
    page = tmp_path / "part" / "chap.md"
    page.parent.mkdir()
    page.write_text(textwrap.dedent('''\
        ```python
        total = 2
        ```

        ```python
        seen = globals().get("total")
        print("seen", seen)
        ```

        ```python
        print("page", total, seen)
        ```
        '''))
    run = book.ChapterRun(page)
    assert run.alone == {0, 1}  # the third reads total and seen
    run.run_to(2)
    assert [o.text for o in run.outputs] == ["", "seen None\n",
                                             "page 2 None\n"]


def test_a_copy_keeps_what_changes_its_names_and_the_seeds_above_them(
        tmp_path):
    page = tmp_path / "part" / "chap.md"
    page.parent.mkdir()
    page.write_text(textwrap.dedent('''\
        ```python
        import random
        record = {"best": 3}
        log = []
        ```

        ```python
        log.append("expensive")  # changes log: a copy needing log keeps it
        summary = [record["best"]]  # reads record, changes nothing of it
        summary.append(record["best"])  # changes summary only
        ```

        ```python
        random.seed(0)
        unrelated = 1
        draw = random.random()
        ```

        ```python
        print(record, log, draw)
        ```
        '''))
    last = book.copy_texts(page)[-1]
    assert 'log.append("expensive")' in last  # it changes log
    assert "summary" not in last  # passing record["best"] changes nothing
    assert "random.seed(0)" in last  # the seed above `draw`, in its fence
    assert "unrelated" not in last
    namespace = {"__name__": "__main__"}
    exec(compile(last, "copy", "exec"), namespace)
    random_state = __import__("random")
    random_state.seed(0)
    assert namespace["draw"] == random_state.random()


def test_what_a_statement_may_change(tmp_path):
    page = tmp_path / "part" / "chap.md"
    page.parent.mkdir()
    page.write_text(textwrap.dedent('''\
        ```python
        model, task, runs, log, ax = 1, 2, 3, [], 4
        acc = task.exact_match(model)
        n = round(len(task.items) * 0.5)
        log.append(acc)
        train(model, task, config)
        save(model, runs / "b")
        for p in model.parameters():
            p.mul_(0.5)
        for row in task.rows:
            print(row)
        with open(runs / "log", "w") as f:
            f.write("x")
        model.weight[0] = 1
        logits = model(task.images / 255)
        ```
        '''))
    acts = {st.source.split("\n")[0]: set(st.acts)
            for st in book._statements(page)}
    assert acts["acc = task.exact_match(model)"] == set()  # a question
    assert acts["n = round(len(task.items) * 0.5)"] == set()  # builtins
    assert acts["log.append(acc)"] == {"log", "acc"}
    assert acts["train(model, task, config)"] == {"model"}
    assert acts['save(model, runs / "b")'] == {"model", "runs"}
    assert acts["for p in model.parameters():"] == {"model"}
    assert acts["for row in task.rows:"] == set()
    assert acts['with open(runs / "log", "w") as f:'] == {"runs"}
    assert acts["model.weight[0] = 1"] == {"model"}
    assert acts["logits = model(task.images / 255)"] == set()  # arithmetic


def test_a_name_a_block_binds_before_reading_it_is_the_blocks_own(
        tmp_path):
    """`verdict = ...` then `print(verdict)` in one loop body reads no
    earlier `verdict`: the copy leaves out the fence that set one (here
    a costly one); a name read before the block binds it is still needed."""
    page = tmp_path / "part" / "chap.md"
    page.parent.mkdir()
    page.write_text(textwrap.dedent('''\
        ```python
        costly = [1, 2]
        for x in costly:
            verdict = x * 2
        total = 0
        ```

        ```python
        for y in range(3):
            verdict = y + 1
            print(verdict)
            if y:
                total = total + verdict
        ```
        '''))
    last = book.copy_texts(page)[-1]
    assert "costly" not in last and "x * 2" not in last
    assert "total = 0" in last  # read before the loop binds it
    exec(compile(last, "copy", "exec"), {"__name__": "__main__"})


def test_a_test_file_keeps_to_one_worker(request):
    """Under pytest-xdist (the README's command) this file's tests, like a
    page's fences, carry their group in their nodeid: that, and nothing
    else, keeps them on one worker (conftest.py, _keep_on_one_worker). A
    page split over two workers runs its fences twice."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("checks the grouping of pytest-xdist's workers")
    assert request.node.nodeid.endswith("@tests/test_book.py"), \
        request.node.nodeid
