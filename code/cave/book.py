"""The book's machinery: chapters are the source, everything else derives.

Not a chapter. It does four jobs, each small:

* read the Python fences of a chapter (`fences`), with a line scanner of
  its own, independent of any Markdown library;
* write each chapter's module from the fences titled with its path
  (`tangle`), and report where a module has drifted (`check`);
* run a chapter top to bottom in one namespace, like a notebook, keeping
  what each fence printed and drew (`ChapterRun`, `execute`, cached);
* serve mkdocs as a hook file: put those outputs under their fences, and
  offer every chapter as a Jupyter notebook (`notebook`).

Command line::

    python -m cave.book tangle          # regenerate every module
    python -m cave.book check           # fail if a module has drifted
    python -m cave.book run CHAPTER.md  # run a chapter, print its outputs
"""

from __future__ import annotations

import __future__
import base64
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # code/cave/book.py -> repo
DOCS = ROOT / "docs"
CODE = ROOT / "code"
CACHE = ROOT / ".cache" / "outputs"
PYTHON_LANGS = {"python", "py", "python3"}

# --------------------------------------------------------------------------
# Reading fences
# --------------------------------------------------------------------------

_OPEN = re.compile(r"^(?P<indent> *)(?P<mark>`{3,}|~{3,})(?P<info>.*)$")
_CONTAINER = re.compile(r"^(?P<indent> *)(!!!|\?\?\?\+?|===)\s")
_TITLE = re.compile(r'title="(?P<title>[^"]*)"')


@dataclasses.dataclass(frozen=True)
class Fence:
    """One fenced block: where it starts, how it is marked, what it holds."""

    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    indent: int  # spaces before the opening fence
    info: str  # everything after the backticks
    lang: str
    title: str | None
    flags: tuple[str, ...]  # words after the language, outside braces
    code: str  # the body, un-indented, ending in a newline

    @property
    def is_python(self) -> bool:
        return self.lang in PYTHON_LANGS


def parse_info(info: str) -> tuple[str, str | None, tuple[str, ...]]:
    """Split a fence's info string into (language, title, bare flags).

    ``{.python title="cave/x.py"}`` is the brace form pymdownx.superfences
    renders; ``python`` alone is plain CommonMark. Anything after the
    language outside braces is a bare flag, which superfences cannot read.
    """
    info = info.strip()
    if info.startswith("{") and info.endswith("}"):
        inner = info[1:-1]
        title = _TITLE.search(inner)
        words = _TITLE.sub("", inner).split()
        langs = [w[1:] for w in words if w.startswith(".")]
        lang = langs[0] if langs else ""
        return lang, title.group("title") if title else None, ()
    words = info.split()
    return (words[0] if words else ""), None, tuple(words[1:])


def fences(text: str) -> list[Fence]:
    """Every fenced block of a Markdown text, in order, at any indentation."""
    lines = text.splitlines()
    found, i = [], 0
    while i < len(lines):
        opened = _OPEN.match(lines[i])
        mark = opened and opened.group("mark")
        if not opened or (mark[0] == "`" and "`" in opened.group("info")):
            i += 1
            continue
        indent = len(opened.group("indent"))
        close = re.compile(rf"^ *{re.escape(mark[0])}{{{len(mark)},}}\s*$")
        body, j = [], i + 1
        while j < len(lines) and not close.match(lines[j]):
            line = lines[j]
            cut = min(indent, len(line) - len(line.lstrip(" ")))
            body.append(line[cut:])
            j += 1
        lang, title, flags = parse_info(opened.group("info"))
        code = "\n".join(body) + "\n" if body else ""
        found.append(Fence(i + 1, j + 1, indent, opened.group("info").strip(),
                           lang, title, flags, code))
        i = j + 1
    return found


def python_fences(text: str) -> list[Fence]:
    return [f for f in fences(text) if f.is_python]


def flatten_containers(text: str) -> str:
    """Un-indent the bodies of admonitions and content tabs, line for line.

    CommonMark reads a fence indented inside ``!!! note`` or ``=== "Tab"`` as
    an indented code block. With the containers flattened (and the line
    count kept, so line numbers still point into the chapter) it reads them
    as fences again.
    """
    out, stack, fence = [], [], None
    for line in text.splitlines(keepends=True):
        width = len(line) - len(line.lstrip(" "))
        if line.strip() and fence is None:
            while stack and width < stack[-1]:
                stack.pop()
        depth = stack[-1] if stack else 0
        out.append(line[min(depth, width):] if line.strip() else line.lstrip(" "))
        opened = _OPEN.match(line)
        if fence is None and opened:
            fence = opened.group("mark")
        elif fence and re.match(rf"^ *{re.escape(fence)}+\s*$", line):
            fence = None
        elif fence is None:
            container = _CONTAINER.match(line)
            if container:
                stack.append(len(container.group("indent")) + 4)
    return "".join(out)


# --------------------------------------------------------------------------
# Chapters and their modules
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chapter:
    part: str
    stem: str

    @property
    def markdown(self) -> Path:
        return DOCS / self.part / f"{self.stem}.md"

    @property
    def module_title(self) -> str:  # as written in a fence title
        return f"cave/{self.part}/{self.stem}.py"

    @property
    def module(self) -> Path:
        return CODE / self.module_title

    @property
    def module_name(self) -> str:
        return f"cave.{self.part}.{self.stem}"

    def __str__(self) -> str:
        return f"{self.part}/{self.stem}"


def nav_pages(config: Path = ROOT / "mkdocs.yml") -> list[str]:
    """Markdown pages of the nav, in reading order."""
    import yaml

    def walk(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from walk(value)

    nav = yaml.safe_load(config.read_text(encoding="utf-8"))["nav"]
    return [p for p in walk(nav) if p.endswith(".md")]


def is_chapter_page(src: str) -> bool:
    """`docs/<part>/<stem>.md` is a chapter; a part's index.md is not."""
    parts = Path(src).parts
    return len(parts) == 2 and src.endswith(".md") and parts[1] != "index.md"


def chapters() -> list[Chapter]:
    """The chapters in reading order: the order of the site's nav."""
    return [Chapter(*Path(p).with_suffix("").parts)
            for p in nav_pages() if is_chapter_page(p)]


HEADER = (
    '# Generated from docs/{chapter}.md by `python -m cave.book tangle`.\n'
    '# Do not edit: edit the chapter, then regenerate. CI fails on drift.\n'
)


def tangle_text(chapter: Chapter, text: str) -> tuple[str, list[int]]:
    """A chapter's module text, and for each of its lines the chapter line.

    The module is the chapter's fences titled with its path, in order, under
    a header. A fence titled with another module's path is an error: each
    chapter writes only its own module.
    """
    pieces, origin = [HEADER.format(chapter=chapter)], [0, 0]
    for fence in python_fences(text):
        if fence.title is None:
            continue
        if fence.title != chapter.module_title:
            raise ValueError(
                f"docs/{chapter}.md:{fence.line}: fence titled "
                f"{fence.title!r}, expected {chapter.module_title!r} "
                "(a chapter writes only its own module)")
        lead = len(fence.code) - len(fence.code.lstrip("\n"))
        body = fence.code.strip("\n")
        first = fence.line + 1 + lead  # chapter line of the body's first
        pieces.append("\n\n" + body + "\n")
        origin += [0, 0] + [first + k for k in range(len(body.splitlines()))]
    return "".join(pieces), origin


def tangle(chapter: Chapter) -> str:
    text = chapter.markdown.read_text(encoding="utf-8")
    return tangle_text(chapter, text)[0]


def check() -> list[str]:
    """Every difference between the chapters and the modules, explained."""
    problems = []
    for chapter in chapters():
        text = chapter.markdown.read_text(encoding="utf-8")
        want, origin = tangle_text(chapter, text)
        if not chapter.module.exists():
            problems.append(f"{chapter.module.relative_to(ROOT)} is missing: "
                            "run `python -m cave.book tangle`")
            continue
        have = chapter.module.read_text(encoding="utf-8")
        if have == want:
            continue
        want_lines, have_lines = want.splitlines(), have.splitlines()
        k = next((k for k, (a, b) in enumerate(zip(want_lines, have_lines))
                  if a != b), min(len(want_lines), len(have_lines)))
        src = origin[k] if k < len(origin) and origin[k] else None
        where = f"docs/{chapter}.md line {src}" if src else f"docs/{chapter}.md"
        problems.append(
            f"{chapter.module.relative_to(ROOT)} line {k + 1} differs from "
            f"{where}:\n  chapter: "
            f"{want_lines[k] if k < len(want_lines) else '<end of file>'!r}"
            f"\n  module:  "
            f"{have_lines[k] if k < len(have_lines) else '<end of file>'!r}"
            "\n  edit the chapter, then run `python -m cave.book tangle`")
    return problems


def write_modules() -> list[Path]:
    written = []
    for chapter in chapters():
        text = tangle(chapter)
        path = chapter.module
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            init = path.parent / "__init__.py"
            if not init.exists():
                init.write_text(f'"""Part: {chapter.part}."""\n')
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


# --------------------------------------------------------------------------
# Running a chapter, like a notebook
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Output:
    """What one fence printed and drew."""

    line: int
    text: str = ""
    figures: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0


def _collect_figures() -> list[tuple[str, bytes]]:
    """Every open matplotlib figure as (alt text, PNG bytes); then close."""
    if "matplotlib.pyplot" not in sys.modules:
        return []
    import matplotlib.pyplot as plt

    figures = []
    for number in plt.get_fignums():
        fig = plt.figure(number)
        title = fig._suptitle.get_text() if fig._suptitle else ""
        title = title or next((ax.get_title() for ax in fig.axes
                               if ax.get_title()), "figure")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        figures.append((title, buffer.getvalue()))
    plt.close("all")
    return figures


_FUTURE_FLAGS = 0
for _name in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _name).compiler_flag


class ChapterRun:
    """One chapter run top to bottom in one namespace, each fence once."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.text = self.path.read_text(encoding="utf-8")
        self.fences = python_fences(self.text)
        # The namespace is a real module, registered like an imported one,
        # so that dataclasses, pickle and multiprocessing can find what the
        # chapter defines. Its name is not "__main__": a chapter's
        # `if __name__ == "__main__":` blocks are for its command line.
        part, stem = self.path.with_suffix("").parts[-2:]
        module = types.ModuleType(f"__chapter_{part}_{stem}__".replace(
            "-", "_"), f"The running chapter {part}/{stem}")
        module.__file__ = str(self.path)
        sys.modules[module.__name__] = module
        self.namespace = module.__dict__
        self.outputs: list[Output] = []
        self.failed: int | None = None  # index of the fence that failed
        self.future = 0  # `from __future__` flags carry on, as in a notebook

    def index_of(self, line: int) -> int:
        for i, fence in enumerate(self.fences):
            if fence.line == line:
                return i
        raise LookupError(f"{self.path}: no Python fence opens at line {line}")

    @property
    def done(self) -> int:
        return len(self.outputs)

    def run_next(self) -> Output:
        """Run the next fence; its line numbers are the chapter's."""
        os.environ.setdefault("MPLBACKEND", "Agg")
        fence = self.fences[self.done]
        source = "\n" * fence.line + fence.code
        code = compile(source, str(self.path), "exec", flags=self.future,
                       dont_inherit=True)
        self.future |= code.co_flags & _FUTURE_FLAGS
        out = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out):
                exec(code, self.namespace)
        except BaseException:
            self.failed = self.done
            _collect_figures()
            raise
        result = Output(fence.line, out.getvalue(), _collect_figures(),
                        time.perf_counter() - start)
        self.outputs.append(result)
        return result

    def run_to(self, index: int) -> Output:
        """Run every fence up to `index` that has not run yet."""
        if self.failed is not None:
            raise EarlierFenceFailed(
                f"{self.path.name}: the fence at line "
                f"{self.fences[self.failed].line} failed, so later fences "
                "cannot run")
        while self.done <= index:
            self.run_next()
        return self.outputs[index]

    @property
    def complete(self) -> bool:
        return self.failed is None and self.done == len(self.fences)


class EarlierFenceFailed(RuntimeError):
    """A fence cannot run because one before it in its chapter failed."""


def _code_digest() -> str:
    """A digest of the package (code, shipped data, recorded results) and
    the torch it runs on: what a chapter's outputs depend on."""
    import torch

    digest = hashlib.sha256(torch.__version__.encode())
    for path in sorted((CODE / "cave").rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(CODE)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:20]


def _cache_key(text: str) -> str:
    """Outputs stay valid while the chapter and the package are unchanged."""
    return hashlib.sha256((_code_digest() + text).encode()).hexdigest()[:20]


def _cache_file(path: Path) -> Path:
    part, stem = Path(path).resolve().with_suffix("").parts[-2:]
    return CACHE / f"{part}__{stem}.json"


def save_outputs(run: ChapterRun) -> None:
    """Keep a complete run's outputs, so the site need not run it again."""
    if not run.complete:
        return
    record = {"key": _cache_key(run.text), "outputs": [
        {"line": o.line, "text": o.text, "seconds": o.seconds,
         "figures": [[alt, base64.b64encode(png).decode()]
                     for alt, png in o.figures]}
        for o in run.outputs]}
    target = _cache_file(run.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, target)


def load_outputs(path: Path) -> list[Output] | None:
    target = _cache_file(path)
    if not target.exists():
        return None
    record = json.loads(target.read_text(encoding="utf-8"))
    if record["key"] != _cache_key(Path(path).read_text(encoding="utf-8")):
        return None
    return [Output(o["line"], o["text"],
                   [(alt, base64.b64decode(png)) for alt, png in o["figures"]],
                   o["seconds"]) for o in record["outputs"]]


def execute(path: Path, use_cache: bool = True) -> list[Output]:
    """Every fence's output for a chapter: from the cache or by running it."""
    if use_cache and (cached := load_outputs(path)) is not None:
        return cached
    run = ChapterRun(path)
    if run.fences:
        run.run_to(len(run.fences) - 1)
    save_outputs(run)
    return run.outputs


# --------------------------------------------------------------------------
# Notebooks
# --------------------------------------------------------------------------


def notebook(path: Path) -> str:
    """A chapter as a Jupyter notebook (.ipynb text), through jupytext."""
    import jupytext

    text = flatten_containers(Path(path).read_text(encoding="utf-8"))
    lines = text.splitlines()
    for fence in reversed(fences(text)):
        if not fence.is_python:
            continue
        head = ["```python"]
        if fence.title:
            head.append(f"# {fence.title} (the book's module)")
        lines[fence.line - 1:fence.line] = head
    rel = "docs/" + "/".join(Path(path).parts[-2:])
    intro = (f"*Deep Learning Cave, generated from `{rel}`. Run it where "
             "the book's package `cave` is installed "
             "(`pip install -r requirements.txt` in the book's folder).*")
    nb = jupytext.reads(intro + "\n\n" + "\n".join(lines) + "\n", fmt="md")
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python",
                                 "display_name": "Python 3"}
    nb.metadata.pop("jupytext", None)
    return jupytext.writes(nb, fmt="ipynb")


# --------------------------------------------------------------------------
# mkdocs hooks (mkdocs.yml loads this file with `hooks:`)
# --------------------------------------------------------------------------

_FIGURES: dict[str, list[tuple[str, bytes]]] = {}


def _render_outputs(markdown: str, outputs: list[Output], url: str) -> str:
    lines = markdown.splitlines()
    for index, (fence, output) in reversed(list(
            enumerate(zip(python_fences(markdown), outputs)))):
        pad = " " * fence.indent
        block = []
        if output.text.strip():
            ticks = "`" * max(3, max((len(m) for m in re.findall(
                r"`+", output.text)), default=0) + 1)
            block += ["", f"{pad}{ticks}{{.text .cave-output}}"]
            block += [pad + line for line in output.text.rstrip().split("\n")]
            block += [f"{pad}{ticks}"]
        for k, (alt, png) in enumerate(output.figures):
            name = f"figure-{index + 1}-{k + 1}.png"
            _FIGURES[url + name] = (alt, png)
            alt = alt.replace('"', "&quot;").replace("<", "&lt;")
            block += ["", f'{pad}<figure class="cave-figure" markdown>',
                      f'{pad}<img src="{name}" alt="{alt}" loading="lazy">',
                      f"{pad}</figure>"]
        lines[fence.end:fence.end] = block
    return "\n".join(lines) + "\n"


def on_config(config):
    """Key mkdocs-jupyter's cache of executed labs on the package as well:
    its own key sees only the lab's text, and labs import `cave`."""
    plugin = config.plugins.get("mkdocs-jupyter")
    if plugin is not None:
        plugin.config["cache_dir"] = str(
            ROOT / ".cache" / "mkdocs-jupyter" / _code_digest())
    return config


def on_files(files, config):
    """Offer every chapter as a notebook beside its page."""
    from mkdocs.structure.files import File

    for file in list(files):
        if is_chapter_page(file.src_uri):
            files.append(File.generated(
                config, file.src_uri[:-3] + ".ipynb",
                content=notebook(Path(file.abs_src_path))))
    return files


def on_page_markdown(markdown, page, config, files):
    """Show, under every fence of a chapter, what it printed and drew."""
    if not is_chapter_page(page.file.src_uri):
        return markdown
    stem = Path(page.file.src_uri).stem
    if os.environ.get("CAVE_EXECUTE", "1") != "0":
        outputs = execute(Path(page.file.abs_src_path))
        markdown = _render_outputs(markdown, outputs, page.url)
    link = (f"[Download this chapter as a Jupyter notebook]({stem}.ipynb)"
            "{ .md-button .cave-notebook }")
    return re.sub(r"^(# .*\n)", lambda m: m.group(1) + "\n" + link + "\n",
                  markdown, count=1, flags=re.M)


def on_post_build(config):
    site = Path(config["site_dir"])
    for name, (_, png) in _FIGURES.items():
        target = site / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cave.book",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tangle", help="regenerate every module from its chapter")
    sub.add_parser("check", help="fail if any module differs from its chapter")
    run = sub.add_parser("run", help="run a chapter and print its outputs")
    run.add_argument("chapter", type=Path)
    run.add_argument("--figures", type=Path, default=Path("/tmp/cave-figures"))
    args = parser.parse_args(argv)

    if args.command == "tangle":
        for path in write_modules():
            print(f"wrote {path.relative_to(ROOT)}")
        return 0
    if args.command == "check":
        problems = check()
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    chapter = ChapterRun(args.chapter)
    args.figures.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for index in range(len(chapter.fences)):
        output = chapter.run_next()
        print(f"--- fence {index + 1} (line {output.line}): "
              f"{output.seconds:.2f} s")
        if output.text:
            print(output.text, end="" if output.text.endswith("\n") else "\n")
        for k, (alt, png) in enumerate(output.figures):
            target = args.figures / f"{args.chapter.stem}-{index + 1}-{k + 1}.png"
            target.write_bytes(png)
            print(f"[figure: {alt} -> {target}]")
    save_outputs(chapter)
    print(f"--- {len(chapter.fences)} fences in "
          f"{time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
