"""The machinery: reading fences, flattening containers, tangling, running."""

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
    # every module line maps back to the chapter line that wrote it
    sample = SAMPLE.splitlines()
    for k, line in enumerate(lines):
        if origin[k]:
            assert sample[origin[k] - 1] == line


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
    book.write_modules()
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


def test_outputs_cache_is_keyed_on_the_chapter_text(monkeypatch, tmp_path):
    monkeypatch.setattr(book, "DOCS", tmp_path)
    monkeypatch.setattr(book, "CACHE", tmp_path / "cache")
    chapter = tmp_path / "c.md"
    chapter.write_text("```python\nprint('hi')\n```\n")
    assert book.load_outputs(chapter) is None
    assert book.execute(chapter)[0].text == "hi\n"
    assert book.load_outputs(chapter)[0].text == "hi\n"
    chapter.write_text("```python\nprint('changed')\n```\n")
    assert book.load_outputs(chapter) is None
    assert book.execute(chapter)[0].text == "changed\n"


def test_rendered_outputs_sit_under_their_fences_at_their_indent():
    markdown = "# T\n\n!!! note\n\n    ```python\n    print(1)\n    ```\n"
    outputs = [book.Output(5, "1\n", [("A plot", b"png")])]
    html = book._render_outputs(markdown, outputs, "part/t/")
    assert "    ```{.text .cave-output}\n    1\n    ```" in html
    assert '<img src="figure-1-1.png" alt="A plot"' in html
    assert book._FIGURES["part/t/figure-1-1.png"] == ("A plot", b"png")


def test_notebook_has_one_code_cell_per_fence():
    import nbformat

    path = Path(book.DOCS / "fundamentals" / "data.md")
    nb = nbformat.reads(book.notebook(path), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) == len(book.python_fences(path.read_text()))
    assert nb.metadata.kernelspec.name == "python3"
    nbformat.validate(nb)


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
