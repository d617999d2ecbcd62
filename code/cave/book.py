"""The book's machinery: chapters are the source, everything else derives.

Not a chapter. It does five jobs, each small, all on one reading of the
pages (`fences`, a line scanner of its own; labs are read as percent-format
scripts by `lab_cells`):

* write each chapter's module from the fences titled with its path, each
  group marked with its section and chapter line (`tangle`), and report
  where a module has drifted (`check`);
* run a page top to bottom in one namespace, like a notebook, keeping what
  each fence printed and drew (`ChapterRun`), and note what it read;
* record those outputs in `docs/_outputs/`, committed with the book, with
  the digest of every input the run had (the page, the modules it imports,
  the files it read, the torch it ran on), so that a fresh clone serves
  the book without running it and CI can prove every record current
  (`record_state`, `execute`);
* turn chapters and labs into Jupyter notebooks that carry their outputs
  (`notebook`);
* serve mkdocs as a hook file: outputs under their fences, lab pages made
  from their scripts, notebook downloads (`on_files`, `on_page_markdown`).

Command line::

    python -m cave.book tangle          # regenerate every module
    python -m cave.book check           # fail if a module has drifted
    python -m cave.book run PAGE        # run a chapter or lab, print it
    python -m cave.book record          # re-record every stale page
    python -m cave.book status          # which records are stale; budgets
"""

from __future__ import annotations

import __future__
import ast
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
from html import escape as html_escape
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # code/cave/book.py -> repo
DOCS = ROOT / "docs"
CODE = ROOT / "code"
OUTPUTS = DOCS / "_outputs"  # recorded outputs, committed with the book
PYTHON_LANGS = {"python", "py", "python3"}
RECORD_FORMAT = 3  # bump when the runner changes what a record means
BUDGET_SECONDS = 20.0  # what one page's fences may take on a 2-core CPU

# --------------------------------------------------------------------------
# Reading fences
# --------------------------------------------------------------------------

_OPEN = re.compile(r"^(?P<indent> *)(?P<mark>`{3,}|~{3,})(?P<info>.*)$")
_CONTAINER = re.compile(r"^(?P<indent> *)(!!!|\?\?\?\+?|===)\s")
_TITLE = re.compile(r'title="(?P<title>[^"]*)"')
_HEADING = re.compile(r"^(#{1,6})\s+(?P<text>.+?)\s*#*\s*$")
_ANNOTATION = re.compile(r"#\s*\(\d+\)!")  # mkdocs-material's marker


@dataclasses.dataclass(frozen=True)
class Fence:
    """One fenced block: where it starts, how it is marked, what it holds."""

    line: int  # 1-based line of the opening fence (of a lab's `# %%`)
    end: int  # 1-based line of the closing fence (of a lab cell's last)
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
    """Every fenced block of a Markdown text, in order, at any indentation
    (inside admonitions, content tabs and collapsed blocks too)."""
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


def headings(text: str) -> list[tuple[int, str]]:
    """(line, text) of every Markdown heading outside the fences."""
    inside = set()
    for fence in fences(text):
        inside.update(range(fence.line, fence.end + 1))
    return [(n, m.group("text")) for n, line in enumerate(
        text.splitlines(), 1) if n not in inside and (m := _HEADING.match(
            line))]


def flatten_containers(text: str) -> str:
    """Un-indent the bodies of admonitions and content tabs, line for line.

    For notebooks: Markdown outside mkdocs has no admonitions, and would
    read a fence indented inside one as an indented code block. The line
    count is kept, so line numbers still point into the chapter.
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
# Labs: percent-format scripts, read as cells
# --------------------------------------------------------------------------

_CELL = re.compile(r"^# %%(?P<markdown> \[markdown\])?\s*$")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One cell of a percent-format script: Markdown or code."""

    line: int  # 1-based line just before its text (its marker, or a blank)
    end: int  # 1-based line of its text's last line
    markdown: bool
    text: str  # the Markdown (comment marks removed) or the code


def lab_cells(text: str) -> list[Cell]:
    """The cells of a percent-format script (``# %%`` and
    ``# %% [markdown]`` markers), blank lines at their edges trimmed."""
    lines, cells = text.splitlines(), []
    markers = [n for n, line in enumerate(lines) if _CELL.match(line)]
    for k, n in enumerate(markers):
        stop = markers[k + 1] if k + 1 < len(markers) else len(lines)
        first, last = n + 1, stop  # 0-based, the body is lines[first:last]
        while first < last and not lines[first].strip():
            first += 1
        while last > first and not lines[last - 1].strip():
            last -= 1
        if first == last:
            continue
        markdown = bool(_CELL.match(lines[n]).group("markdown"))
        body = lines[first:last]
        if markdown:
            body = [re.sub(r"^# ?", "", line) for line in body]
        cells.append(Cell(first, last, markdown, "\n".join(body) + "\n"))
    return cells


def lab_fences(text: str) -> list[Fence]:
    """A lab's code cells as fences; their lines are the script's."""
    return [Fence(c.line, c.end, 0, "python", "python", None, (), c.text)
            for c in lab_cells(text) if not c.markdown]


def lab_markdown(text: str) -> str:
    """A lab as a Markdown page: its Markdown cells, its code in fences."""
    parts = []
    for cell in lab_cells(text):
        parts.append(cell.text if cell.markdown
                     else "```python\n" + cell.text + "```\n")
    return "\n".join(parts)


def page_fences(path: Path) -> list[Fence]:
    """The Python fences of a chapter (.md) or the code cells of a lab."""
    text = Path(path).read_text(encoding="utf-8")
    return lab_fences(text) if Path(path).suffix == ".py" else \
        python_fences(text)


# --------------------------------------------------------------------------
# Chapters, parts and their modules
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


def nav_pages(config: Path | None = None) -> list[str]:
    """Pages of the nav (Markdown chapters, lab scripts), in reading order."""
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

    config = ROOT / "mkdocs.yml" if config is None else config
    nav = yaml.safe_load(config.read_text(encoding="utf-8"))["nav"]
    return list(walk(nav))


def is_chapter_page(src: str) -> bool:
    """`docs/<part>/<stem>.md` is a chapter; labs and index pages are not."""
    parts = Path(src).parts
    return (len(parts) == 2 and src.endswith(".md") and parts[0] != "labs"
            and parts[1] != "index.md")


def is_lab(src: str) -> bool:
    """`docs/labs/<name>.py`: a lab, a percent-format script. The nav names
    its page, `labs/<name>.md`, which the hooks make from the script."""
    parts = Path(src).parts
    return len(parts) == 2 and parts[0] == "labs" and src.endswith(".py")


def chapters() -> list[Chapter]:
    """The chapters in reading order: the order of the site's nav."""
    return [Chapter(*Path(p).with_suffix("").parts)
            for p in nav_pages() if is_chapter_page(p)]


def parts() -> list[str]:
    """The book's parts, in the nav's order: declared once, in mkdocs.yml."""
    found: list[str] = []
    for chapter in chapters():
        if chapter.part not in found:
            found.append(chapter.part)
    return found


def labs() -> list[Path]:
    """The labs' scripts, in the nav's order."""
    return [DOCS / (p[:-3] + ".py") for p in nav_pages()
            if p.startswith("labs/") and p.endswith(".md")]


def pages() -> list[Path]:
    """Every page whose code runs: the chapters, then the labs."""
    return [c.markdown for c in chapters()] + labs()


def chapter_of(path: str | Path) -> Chapter:
    """The chapter a Markdown file under docs/ is; an error that says what
    to do for a file the nav does not list."""
    path = Path(path).resolve()
    part, stem = path.with_suffix("").parts[-2:]
    chapter = Chapter(part, stem)
    if chapter not in chapters():
        known = ", ".join(parts())
        raise ValueError(
            f"docs/{part}/{stem}.md is not in the nav of mkdocs.yml: add it "
            f"under its part's section (parts, in order: {known}); a new "
            "part is a new section of the nav, in reading order")
    return chapter


HEADER = (
    '# Generated from docs/{chapter}.md by `python -m cave.book tangle`.\n'
    '# Do not edit: edit the chapter, then regenerate. CI fails on drift.\n'
)


def tangle_text(chapter: Chapter, text: str) -> tuple[str, list[int]]:
    """A chapter's module text, and for each of its lines the chapter line.

    The module is the chapter's fences titled with its path, in order,
    under a header; each run of fences from one section opens with a
    comment naming the section and the chapter line. A fence titled with
    another module's path is an error (each chapter writes only its own
    module), and so is an annotation marker, which is page-only markup.
    """
    marks = headings(text)
    pieces, origin = [HEADER.format(chapter=chapter)], [0, 0]
    section = None
    for fence in python_fences(text):
        if fence.title is None:
            continue
        where = f"docs/{chapter}.md:{fence.line}"
        if fence.title != chapter.module_title:
            raise ValueError(
                f"{where}: fence titled {fence.title!r}, expected "
                f"{chapter.module_title!r} (a chapter writes only its own "
                "module)")
        for k, line in enumerate(fence.code.splitlines()):
            if _ANNOTATION.search(line):
                raise ValueError(
                    f"docs/{chapter}.md:{fence.line + 1 + k}: annotation "
                    f"marker in a titled fence ({line.strip()!r}); it would "
                    "land in the module: say it in the prose or a comment")
        heading = next((h for n, h in reversed(marks) if n < fence.line), "")
        lead = len(fence.code) - len(fence.code.lstrip("\n"))
        body = fence.code.strip("\n")
        first = fence.line + 1 + lead  # chapter line of the body's first
        if heading != section:
            section = heading
            mark = f"# § {heading or chapter.stem} (docs/{chapter}.md:{first})"
            pieces.append(f"\n\n{mark}\n{body}\n")
            origin += [0, 0, 0]
        else:
            pieces.append("\n\n" + body + "\n")
            origin += [0, 0]
        origin += [first + k for k in range(len(body.splitlines()))]
    return "".join(pieces), origin


def tangle(chapter: Chapter) -> str:
    text = chapter.markdown.read_text(encoding="utf-8")
    return tangle_text(chapter, text)[0]


def check() -> list[str]:
    """Every difference between the chapters and the modules, explained;
    every chapter file the nav does not list."""
    problems = []
    for page in sorted(DOCS.glob("*/*.md")):
        if is_chapter_page(page.relative_to(DOCS).as_posix()):
            try:
                chapter_of(page)
            except ValueError as err:
                problems.append(str(err))
    for chapter in chapters():
        text = chapter.markdown.read_text(encoding="utf-8")
        try:
            want, origin = tangle_text(chapter, text)
        except ValueError as err:
            problems.append(str(err))
            continue
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


def write_modules() -> tuple[list[Path], list[str]]:
    """Regenerate every module that differs from its chapter: (the files
    written, the chapters that could not be tangled and why)."""
    written, problems = [], []
    for chapter in chapters():
        try:
            text = tangle(chapter)
        except ValueError as err:
            problems.append(str(err))
            continue
        path = chapter.module
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            init = path.parent / "__init__.py"
            if not init.exists():
                init.write_text(f'"""Part: {chapter.part}."""\n')
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written, problems


# --------------------------------------------------------------------------
# Running a page, like a notebook
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Output:
    """What one fence printed and drew."""

    line: int
    text: str = ""
    figures: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    dark: list[bytes] = dataclasses.field(default_factory=list)  # figures
    # recoloured for the dark scheme, one per figure (none: old records)


INK_ON_DARK = "#d3d5df"  # text, axes and black lines on the dark scheme
PAPER_ON_DARK = "#1e2129"  # Material's slate background, for legend boxes


def _recolour_for_dark(fig) -> None:
    """Turn a figure's black ink light and its white paper dark, in place.

    Only greys change: near-black becomes INK_ON_DARK, near-white
    PAPER_ON_DARK; coloured lines, mid greys and colour-mapped images
    (whose colours carry data) are left as they are.
    """
    import matplotlib.colors as mcolors

    def swap(colour):
        r, g, b, a = mcolors.to_rgba(colour)
        if max(r, g, b) - min(r, g, b) > 0.1:  # a colour, not a grey
            return (r, g, b, a)
        luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
        if luminance < 0.35:
            return mcolors.to_rgba(INK_ON_DARK, a)
        if luminance > 0.9:
            return mcolors.to_rgba(PAPER_ON_DARK, a)
        return (r, g, b, a)

    for artist in fig.findobj():
        if getattr(artist, "get_array", lambda: None)() is not None:
            continue  # an image or a colour-mapped mesh: data, not ink
        for name in ("color", "edgecolor", "facecolor", "markeredgecolor",
                     "markerfacecolor"):
            get = getattr(artist, f"get_{name}", None)
            put = getattr(artist, f"set_{name}", None)
            if get is None or put is None:
                continue
            try:
                value = get()
                if isinstance(value, str) and value in ("none", "auto"):
                    continue
                if hasattr(value, "ndim") and value.ndim == 2:  # per item
                    put([swap(c) for c in value] if len(value) else value)
                else:
                    put(swap(value))
            except (ValueError, TypeError):
                continue  # a property that is not a single colour


def _collect_figures() -> tuple[list[tuple[str, bytes]], list[bytes]]:
    """Every open matplotlib figure as (alt text, PNG bytes), and the same
    figures recoloured for the dark scheme; then close them all."""
    if "matplotlib.pyplot" not in sys.modules:
        return [], []
    import matplotlib.pyplot as plt

    figures, dark = [], []
    for number in plt.get_fignums():
        fig = plt.figure(number)
        title = fig._suptitle.get_text() if fig._suptitle else ""
        title = title or next((ax.get_title() for ax in fig.axes
                               if ax.get_title()), "figure")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        figures.append((title, buffer.getvalue()))
        _recolour_for_dark(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight",
                    transparent=True)
        dark.append(buffer.getvalue())
    plt.close("all")
    return figures, dark


_FUTURE_FLAGS = 0
for _name in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _name).compiler_flag

# Files a running page opens for reading, for its record's inputs. One
# audit hook for the process (hooks cannot be removed), idle unless a page
# is running.
_OPENED: set[str] | None = None
_HOOKED = False
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _audit(event: str, args: tuple) -> None:
    if _OPENED is None or event != "open":
        return
    path, mode, flags = (tuple(args) + (None, None))[:3]
    if not isinstance(path, (str, bytes, os.PathLike)):
        return
    if isinstance(mode, str):
        if any(c in mode for c in "wax+"):
            return
    elif isinstance(flags, int) and flags & _WRITE_FLAGS:
        return
    _OPENED.add(os.fsdecode(path))


@contextlib.contextmanager
def _watch_reads(into: set[str]):
    global _OPENED, _HOOKED
    if not _HOOKED:
        sys.addaudithook(_audit)
        _HOOKED = True
    saved, _OPENED = _OPENED, into
    try:
        yield
    finally:
        _OPENED = saved


def _use_agg() -> None:
    """Draw off-screen, in this process only: setting MPLBACKEND in the
    environment would also reach every process a page starts (a notebook
    kernel drawing nothing)."""
    if os.environ.get("MPLBACKEND") is None:
        import matplotlib

        if matplotlib.get_backend().lower() != "agg":
            matplotlib.use("Agg")


class ChapterRun:
    """A chapter (or a lab) run top to bottom in one namespace, each fence
    once, noting the files it reads."""

    def __init__(self, path: Path):
        self.path = Path(path).resolve()
        self.text = self.path.read_text(encoding="utf-8")
        self.fences = page_fences(self.path)
        # The namespace is a real module, registered like an imported one,
        # so that dataclasses, pickle and multiprocessing can find what the
        # page defines. Its name is not "__main__": a page's
        # `if __name__ == "__main__":` blocks are not for the book.
        part, stem = self.path.with_suffix("").parts[-2:]
        module = types.ModuleType(f"__chapter_{part}_{stem}__".replace(
            "-", "_"), f"The running page {part}/{stem}")
        module.__file__ = str(self.path)
        sys.modules[module.__name__] = module
        self.namespace = module.__dict__
        self.outputs: list[Output] = []
        self.failed: int | None = None  # index of the fence that failed
        self.future = 0  # `from __future__` flags carry on, as in a notebook
        self.opened: set[str] = set()  # what its fences read
        # A chapter's fence whose copy button copies the fence alone (it
        # needs nothing from above) runs alone: in a fresh module, as a
        # reader's paste would, its names then joining the page's. That
        # run proves its copy; tests/test_copies.py runs the others.
        self.alone: set[int] = set()
        if self.path.suffix == ".md":
            self.alone = {k for k, pieces in enumerate(copy_pieces(
                self.path)) if len(pieces) == 1}

    def index_of(self, line: int) -> int:
        for i, fence in enumerate(self.fences):
            if fence.line == line:
                return i
        raise LookupError(f"{self.path}: no Python fence opens at line {line}")

    @property
    def done(self) -> int:
        return len(self.outputs)

    def run_next(self) -> Output:
        """Run the next fence; its line numbers are the page's."""
        _use_agg()
        fence = self.fences[self.done]
        alone = self.done in self.alone
        source = "\n" * fence.line + fence.code
        code = compile(source, str(self.path), "exec",
                       flags=0 if alone else self.future, dont_inherit=True)
        self.future |= code.co_flags & _FUTURE_FLAGS
        namespace = self.namespace
        if alone:  # a module of its own, registered like the page's
            fresh = types.ModuleType(f"{self.namespace['__name__']}"
                                     f"fence_{self.done}__")
            fresh.__file__ = str(self.path)
            sys.modules[fresh.__name__] = fresh
            namespace = fresh.__dict__
        out = io.StringIO()
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(out), _watch_reads(self.opened):
                exec(code, namespace)
            if alone:
                self.namespace.update({k: v for k, v in namespace.items()
                                       if not k.startswith("__")})
        except BaseException:
            self.failed = self.done
            _collect_figures()
            raise
        figures, dark = _collect_figures()  # drawing them counts too
        result = Output(fence.line, out.getvalue(), figures,
                        time.perf_counter() - start, dark)
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
    """A fence cannot run because one before it in its page failed."""


# --------------------------------------------------------------------------
# Records: a page's outputs and the digests of everything they came from
# --------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}


_MARK = re.compile(rb"^# \xc2\xa7 .*\n", re.M)  # a tangled section mark


def _digest(path: Path) -> str:
    """A file's SHA-256 (cached while its size and mtime stay put). A
    module's section marks are left out: they name chapter lines, which
    move whenever prose above them changes, and they change nothing the
    code does."""
    stat = path.stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _DIGESTS:
        data = path.read_bytes()
        if path.suffix == ".py":
            data = _MARK.sub(b"", data)
        _DIGESTS[key] = hashlib.sha256(data).hexdigest()
    return _DIGESTS[key]


def _imports(source: str) -> set[str]:
    """The `cave` modules a piece of code imports (and may import)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n == "cave" or n.startswith("cave.")}


def _module_file(name: str) -> Path | None:
    base = CODE.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_closure(source: str) -> set[Path]:
    """Every module file of the package that `source` imports, directly or
    through other modules, with the packages' __init__ files on the way."""
    found: set[Path] = set()
    todo = list(_imports(source))
    while todo:
        name = todo.pop()
        for k in range(1, name.count(".") + 2):  # cave, cave.a, cave.a.b
            path = _module_file(".".join(name.split(".")[:k]))
            if path is not None and path not in found:
                found.add(path)
                todo.extend(_imports(path.read_text(encoding="utf-8")))
    return found


def _is_input(path: Path) -> bool:
    """A file a record depends on: inside the repository, not generated
    on the way (caches, records, the environment), not a module (those
    come from the imports, which do not depend on what ran before)."""
    try:
        rel = path.relative_to(ROOT)
    except ValueError:
        return False
    skip = {".cache", ".git", ".venv", "__pycache__", "site", "_outputs"}
    return (path.is_file() and not skip.intersection(rel.parts)
            and path.suffix != ".py")


def inputs_of(path: Path, opened: set[str] | frozenset = frozenset()
              ) -> dict[str, str]:
    """The digests a page's record keeps: the page, every module its code
    imports, every file its run read, the torch it ran on."""
    import torch

    path = Path(path).resolve()
    source = "\n".join(f.code for f in page_fences(path))
    files = {path} | module_closure(source)
    files |= {p for p in (Path(o).resolve() for o in opened) if _is_input(p)}
    inputs = {p.relative_to(ROOT).as_posix(): _digest(p)
              for p in sorted(files)}
    inputs["torch"] = torch.__version__
    inputs["record format"] = str(RECORD_FORMAT)
    return inputs


def record_path(path: Path) -> Path:
    part, stem = Path(path).resolve().with_suffix("").parts[-2:]
    return OUTPUTS / part / f"{stem}.json"


def _read_record(path: Path) -> dict | None:
    target = record_path(path)
    if not target.is_file():
        return None
    try:
        return json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def record_state(path: Path) -> tuple[bool, str]:
    """(current, why not): a record is current while every input it names
    has the digest it had when the page ran."""
    import torch

    record = _read_record(path)
    if record is None:
        return False, "no recorded outputs"
    inputs = record.get("inputs", {})
    for name, digest in inputs.items():
        if name == "torch":
            now = torch.__version__
        elif name == "record format":
            now = str(RECORD_FORMAT)
        else:
            file = ROOT / name
            now = _digest(file) if file.is_file() else "missing"
        if now != digest:
            return False, f"{name} changed"
    page = Path(path).resolve().relative_to(ROOT).as_posix()
    if page not in inputs:
        return False, "the record names another page"
    source = "\n".join(f.code for f in page_fences(path))
    for module in module_closure(source):
        if module.relative_to(ROOT).as_posix() not in inputs:
            return False, f"now imports {module.relative_to(ROOT)}"
    return True, ""


def stale_pages() -> list[tuple[Path, str]]:
    """Every page whose record is missing or out of date, and why."""
    stale = []
    for page in pages():
        current, why = record_state(page)
        if not current:
            stale.append((page, why))
    return stale


def save_outputs(run: ChapterRun) -> None:
    """Record a complete run's outputs, unless a current record exists (the
    same inputs: re-recording would only churn the timings)."""
    if not run.complete or record_state(run.path)[0]:
        return
    record = {
        "page": run.path.relative_to(ROOT).as_posix(),
        "inputs": inputs_of(run.path, run.opened),
        "seconds": round(sum(o.seconds for o in run.outputs), 2),
        "outputs": [{"line": o.line, "text": o.text,
                     "seconds": round(o.seconds, 3),
                     "figures": [[alt, base64.b64encode(png).decode()]
                                 for alt, png in o.figures],
                     "dark": [base64.b64encode(png).decode()
                              for png in o.dark]}
                    for o in run.outputs]}
    target = record_path(run.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, target)


def _outputs_of(record: dict) -> list[Output]:
    return [Output(o["line"], o["text"],
                   [(alt, base64.b64decode(png)) for alt, png in o["figures"]],
                   o["seconds"],
                   [base64.b64decode(png) for png in o.get("dark", [])])
            for o in record["outputs"]]


def load_outputs(path: Path) -> list[Output] | None:
    """The recorded outputs of a page, if its record is current."""
    if not record_state(path)[0]:
        return None
    return _outputs_of(_read_record(path))


def execute(path: Path, use_cache: bool = True) -> list[Output]:
    """Every fence's output for a page: from its record or by running it."""
    if use_cache and (recorded := load_outputs(path)) is not None:
        return recorded
    run = ChapterRun(path)
    if run.fences:
        run.run_to(len(run.fences) - 1)
    save_outputs(run)
    return run.outputs


# --------------------------------------------------------------------------
# What a copy button copies: a fence with the context it needs
# --------------------------------------------------------------------------

_BUILTINS = frozenset(dir(__import__("builtins"))) | {"__name__", "__file__"}


@dataclasses.dataclass(frozen=True)
class _Statement:
    fence: int  # index of its fence
    source: str
    defines: frozenset
    uses: frozenset
    acts: frozenset  # the names it may change in place (a training call
    # changes its model, a loop anything it reads)
    module: str | None  # the module a titled fence's statement lands in
    is_import: bool
    seeds: bool = False  # torch.manual_seed(0), seed_everything(0)...


_SEEDERS = ("manual_seed", "seed_everything", "seed")


def _seeds(node: ast.stmt) -> bool:
    """A statement that seeds a random generator: what follows it in its
    fence draws from that seed, so a copy keeps it with them."""
    value = getattr(node, "value", None)
    if not isinstance(node, (ast.Expr, ast.Assign)) or \
            not isinstance(value, ast.Call):
        return False
    func = value.func
    name = func.attr if isinstance(func, ast.Attribute) else \
        getattr(func, "id", "")
    return name in _SEEDERS


_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda,
           ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)


def _bindings(node: ast.AST) -> set[str]:
    """The names a statement binds in its own scope (not in the functions,
    classes and comprehensions it holds)."""
    found, todo = set(), list(ast.iter_child_nodes(node))
    if isinstance(node, _SCOPES):
        return set()
    while todo:
        sub = todo.pop()
        if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            found.add(sub.id)
        elif isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef,
                              ast.ClassDef)):
            found.add(sub.name)
        if not isinstance(sub, _SCOPES):
            todo.extend(ast.iter_child_nodes(sub))
    return found


def _free_names(node: ast.AST) -> set[str]:
    """The names a statement reads from outside: a function's parameters
    and locals, a comprehension's variables, a loop's target are not."""
    if isinstance(node, ast.Name):
        return set() if isinstance(node.ctx, ast.Store) else {node.id}
    free = set()
    for _, value in ast.iter_fields(node):
        if isinstance(value, list) and value and \
                isinstance(value[0], ast.stmt):
            free |= _body_free(value)  # a block's statements, in order
        else:
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    free |= _free_names(child)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.Lambda)):
        a = node.args
        params = a.posonlyargs + a.args + a.kwonlyargs + [
            x for x in (a.vararg, a.kwarg) if x is not None]
        own = {x.arg for x in params}
        for stmt in getattr(node, "body", []) if isinstance(
                node.body, list) else []:
            own |= _bindings(stmt) | (
                {stmt.name} if isinstance(stmt, _SCOPES[:3]) else set())
        free -= own
    elif isinstance(node, (ast.ListComp, ast.SetComp, ast.DictComp,
                           ast.GeneratorExp)):
        for gen in node.generators:
            free -= _bindings(ast.Expr(gen.target)) | {
                n.id for n in ast.walk(gen.target) if isinstance(n, ast.Name)}
    elif isinstance(node, ast.AugAssign) and isinstance(node.target,
                                                         ast.Name):
        free.add(node.target.id)  # x += 1 reads x first
    elif isinstance(node, (ast.For, ast.AsyncFor)):
        free -= _stored(node.target) - _free_names(node.iter)
    elif isinstance(node, (ast.With, ast.AsyncWith)):
        for item in node.items:
            if item.optional_vars is not None:
                free -= _stored(item.optional_vars)
    elif isinstance(node, ast.ExceptHandler) and node.name:
        free.discard(node.name)
    return free


def _body_free(body: list[ast.stmt]) -> set[str]:
    """What a block reads from outside: a name its earlier statement binds
    is the block's own for the statements after (`verdict = ...` then
    `print(verdict)` in one loop body reads no outer `verdict`)."""
    free, bound = set(), set()
    for stmt in body:
        free |= _free_names(stmt) - bound
        bound |= _bindings(stmt) | ({stmt.name} if isinstance(
            stmt, _SCOPES[:3]) else set())
    return free


def _stored(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def _root(expr: ast.AST) -> set[str]:
    """The name an attribute or item chain hangs from: model.fc.weight[0]
    -> {"model"}."""
    while isinstance(expr, (ast.Attribute, ast.Subscript)):
        expr = expr.value
    return {expr.id} if isinstance(expr, ast.Name) else set()


def _acted(node: ast.stmt, created: set[str]) -> set[str]:
    """The names a statement may change in place.

    - What it assigns into: `model.weight = ...`, `x[0] = ...`, `x += 1`.
    - A method called for its effect, as the whole statement, on an
      object the page created (`created`): `opt.step()`, `ax.plot(y)`,
      `log.append(x)` change that object and what they are handed whole.
    - A function (or a module's function, not a builtin that only reads):
      its first argument unless arithmetic made it, and where a path built
      in the call points (`train(model, task, config)` trains model;
      `save(model, runs / "b")` writes under runs; `net(x / 255)` changes
      no x). A method whose result is used is a question,
      not a change: `acc = task.exact_match(...)`.
    - A block (a loop, a `with`, an `if`, a `try`): what its statements
      change, and what its loop variable or `as` name was drawn from if
      they change that (`for p in model.parameters(): p.mul_(0.5)`).
    """
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.ClassDef, ast.Import, ast.ImportFrom)):
        return set()  # a definition runs nothing yet
    if isinstance(node, (ast.For, ast.AsyncFor, ast.While, ast.With,
                         ast.AsyncWith, ast.If, ast.Try)):
        inner = []
        for field in ("body", "orelse", "finalbody"):
            inner += getattr(node, field, [])
        for handler in getattr(node, "handlers", []):
            inner += handler.body
        changed = set().union(*(_acted(n, created) for n in inner))
        drawn = []  # (names bound by the block's head, where from)
        if isinstance(node, (ast.For, ast.AsyncFor)):
            drawn.append((_stored(node.target), node.iter))
        if isinstance(node, (ast.With, ast.AsyncWith)):
            drawn += [(_stored(i.optional_vars), i.context_expr)
                      for i in node.items if i.optional_vars is not None]
        for names, source in drawn:
            if changed & names:
                changed |= _free_names(source)
            changed -= names
        return changed
    value = getattr(node, "value", None)
    if isinstance(node, ast.Expr) and isinstance(value, ast.Call) and \
            getattr(value.func, "id", "") == "print":
        return set()  # printing changes nothing
    changed = set()
    targets = node.targets if isinstance(node, ast.Assign) else \
        [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) \
        else []
    for target in targets:
        for t in (target.elts if isinstance(target, (ast.Tuple, ast.List))
                  else [target]):
            if not isinstance(t, ast.Name):
                changed |= _root(t)  # model.weight = ..., x[0] = ...
            elif isinstance(node, ast.AugAssign):
                changed.add(t.id)  # x += 1 changes x
    for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
        receiver = _root(call.func.value) if isinstance(
            call.func, ast.Attribute) else set()
        args = call.args + [k.value for k in call.keywords]
        if receiver and receiver <= created:  # a method of the page's object
            if not (isinstance(node, ast.Expr) and call is value):
                continue  # its result is used: a question
            changed |= receiver  # opt.step(), ax.plot(y), log.append(x)
            for arg in args:
                if isinstance(arg, ast.Starred):
                    arg = arg.value
                if isinstance(arg, ast.Name):
                    changed.add(arg.id)
                elif isinstance(arg, (ast.Tuple, ast.List)):
                    changed |= {e.id for e in arg.elts
                                if isinstance(e, ast.Name)}
            continue
        name = getattr(call.func, "id", None)
        if name in _BUILTINS and name not in _CHANGING_BUILTINS:
            continue  # len, round, zip, sorted... only read
        for n, arg in enumerate(args):  # a function: its first argument,
            if _is_path(arg) or (n == 0 and not isinstance(arg, ast.BinOp)):
                changed |= _free_names(arg)  # and where a path points
                # (arithmetic, `model(x / 255)`, hands over a new value)
    return changed


_CHANGING_BUILTINS = {"next", "setattr", "delattr", "exec", "open"}


def _is_path(expr: ast.AST) -> bool:
    """An argument that may name a file: an f-string, or a `/` whose right
    side is not a number (`runs / "b"`, `folder / name`; `x / 255` is
    arithmetic)."""
    if isinstance(expr, ast.JoinedStr):
        return True
    return isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Div) \
        and not (isinstance(expr.right, ast.Constant) and
                 isinstance(expr.right.value, (int, float)))


def _statements(path: Path) -> list[_Statement]:
    """Every top-level statement of a page's fences, with the names it
    binds and the names it reads."""
    found, trees = [], []
    for k, fence in enumerate(page_fences(path)):
        try:
            trees.append((k, fence, ast.parse(fence.code)))
        except SyntaxError:
            continue
    created = set().union(*(_bindings(node) for _, _, tree in trees
                            for node in tree.body if not isinstance(
                                node, (ast.Import, ast.ImportFrom))))
    for k, fence, tree in trees:
        lines = fence.code.splitlines()
        module = None
        if fence.title:
            module = fence.title[:-3].replace("/", ".")
        for node in tree.body:
            first = min([node.lineno] + [d.lineno for d in getattr(
                node, "decorator_list", [])])
            defines, uses = set(), set()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef,
                                 ast.ClassDef)):
                defines.add(node.name)
            is_import = isinstance(node, (ast.Import, ast.ImportFrom))
            if is_import:
                defines |= {(a.asname or a.name).split(".")[0]
                            for a in node.names}
            uses = _free_names(node)
            defines |= _bindings(node)
            found.append(_Statement(
                k, "\n".join(lines[first - 1:node.end_lineno]),
                frozenset(defines), frozenset(uses - _BUILTINS),
                frozenset(_acted(node, created) & uses - _BUILTINS), module,
                is_import, _seeds(node)))
    return found


def copy_context(path: Path, index: int,
                 statements: list[_Statement] | None = None) -> list[str]:
    """The code fence `index` needs from the fences above it, so that it
    runs pasted alone into a fresh Python that has the package: a list of
    statements, in the page's order, imports first.

    A backward slice: walking up from the fence, keep every statement that
    binds a name still needed, or acts on one (a training loop changes the
    model it uses); its own names become needed in turn. A seed above a
    kept statement in its fence is kept too, so that what it draws is
    what the page drew. What a titled fence defined is imported from the
    module instead of copied.
    """
    statements = _statements(path) if statements is None else statements
    wanted, bound = set(), set()
    for st in statements:
        if st.fence == index:
            wanted |= st.uses - bound
            bound |= st.defines
    modules = set().union(*(s.defines for s in statements if s.is_import))
    earlier = [s for s in statements if s.fence < index]
    while True:  # a function reads its globals when called, not defined:
        needed = set(wanted)  # walk again until what they read is kept
        kept, imports, deferred, seeded = [], {}, set(), set()
        for st in reversed(earlier):
            if not (st.defines & needed or st.acts & needed - modules or
                    (st.seeds and st.fence in seeded)):
                continue
            if st.module is not None and not st.is_import:
                for name in sorted(st.defines & needed):
                    imports.setdefault(st.module, set()).add(name)
                needed -= st.defines
                continue
            kept.append(st.source)
            seeded.add(st.fence)  # its fence's seed, above it, comes too
            needed -= st.defines - st.acts  # a fresh binding ends the need
            needed |= st.uses
            if st.source.lstrip().startswith(("def ", "class ", "@",
                                              "async def ")):
                deferred |= st.uses
        if deferred <= wanted:
            break
        wanted |= deferred
    head = [f"from {m} import {', '.join(sorted(n))}"
            for m, n in sorted(imports.items())]
    body = [s for s in reversed(kept)]
    own = "\n".join(s.source for s in statements if s.fence == index)
    future = "from __future__ import annotations"  # for annotations in
    if future in body or (future not in own and re.search(  # what it defines
            r"^\s*(async def|def|class) ", "\n".join(body + [own]), re.M)
            and any(future in s.source for s in earlier)):
        head.insert(0, future)
    return head + [s for s in body if s != future]


def copy_pieces(path: Path) -> list[list[str]]:
    """For each fence, what its copy button copies, in pieces: the
    statements of its context, then the fence's own code. A lab is a
    script meant to run whole: a cell copies with every cell above it (a
    lab's run in order proves every such copy)."""
    if Path(path).suffix == ".py":
        codes = [fence.code for fence in page_fences(path)]
        return [codes[:k + 1] for k in range(len(codes))]
    statements = _statements(path)
    return [copy_context(path, k, statements) + [fence.code]
            for k, fence in enumerate(page_fences(path))]


def copy_texts(path: Path) -> list[str]:
    """What each fence's copy button copies: its context, then itself."""
    return ["\n".join(p[:-1]) + ("\n\n" if len(p) > 1 else "") + p[-1]
            for p in copy_pieces(path)]


# --------------------------------------------------------------------------
# Notebooks
# --------------------------------------------------------------------------


def _nb_outputs(output: Output | None) -> list[dict]:
    if output is None:
        return []
    cells = []
    if output.text:
        cells.append({"output_type": "stream", "name": "stdout",
                      "text": output.text.splitlines(keepends=True)})
    for alt, png in output.figures:
        cells.append({"output_type": "display_data", "metadata": {},
                      "data": {"image/png": base64.b64encode(png).decode(),
                               "text/plain": [f"<Figure: {alt}>"]}})
    return cells


def _nb_cell(kind: str, text: str, output: Output | None = None,
             count: int | None = None) -> dict:
    cell = {"cell_type": kind, "metadata": {},
            "source": text.rstrip("\n").splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=count, outputs=_nb_outputs(output))
    return cell


def notebook(path: Path, outputs: list[Output] | None = None) -> str:
    """A chapter or lab as a Jupyter notebook (.ipynb text), one code cell
    per fence, carrying `outputs` (by default the page's current record)."""
    path = Path(path)
    if outputs is None:
        outputs = load_outputs(path) or []
    text = path.read_text(encoding="utf-8")
    rel = "docs/" + "/".join(path.parts[-2:])
    cells = [_nb_cell("markdown", (
        f"*Deep Learning Cave, generated from `{rel}`. Run it where the "
        "book's package `cave` is installed (`pip install -r "
        "requirements.txt` in the book's folder).*"))]
    k = 0
    if path.suffix == ".py":
        for cell in lab_cells(text):
            if cell.markdown:
                cells.append(_nb_cell("markdown", cell.text))
            else:
                out = outputs[k] if k < len(outputs) else None
                cells.append(_nb_cell("code", cell.text, out, k + 1))
                k += 1
    else:
        flat = flatten_containers(text)
        lines, last = flat.splitlines(), 0
        for fence in python_fences(flat):
            prose = "\n".join(lines[last:fence.line - 1]).strip("\n")
            if prose.strip():
                cells.append(_nb_cell("markdown", prose))
            code = fence.code
            if fence.title:
                code = f"# {fence.title} (the book's module)\n" + code
            out = outputs[k] if k < len(outputs) else None
            cells.append(_nb_cell("code", code, out, k + 1))
            k += 1
            last = fence.end
        tail = "\n".join(lines[last:]).strip("\n")
        if tail.strip():
            cells.append(_nb_cell("markdown", tail))
    nb = {"cells": cells, "nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "language": "python",
                                      "display_name": "Python 3"},
                       "language_info": {"name": "python"}}}
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"cell-{i}"
    return json.dumps(nb, indent=1) + "\n"


# --------------------------------------------------------------------------
# mkdocs hooks (mkdocs.yml loads this file with `hooks:`)
# --------------------------------------------------------------------------

_FIGURES: dict[str, tuple[str, bytes]] = {}
_LAB_SOURCES: dict[str, Path] = {}  # generated lab page -> its script


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
        dark = output.dark if len(output.dark) == len(output.figures) \
            else [None] * len(output.figures)
        for k, ((alt, png), dark_png) in enumerate(zip(output.figures,
                                                        dark)):
            name = f"figure-{index + 1}-{k + 1}.png"
            _FIGURES[url + name] = (alt, png)
            alt = alt.replace('"', "&quot;").replace("<", "&lt;")
            block += ["", f'{pad}<figure class="cave-figure" markdown>']
            if dark_png is None:  # an old record: the light one for both
                block.append(f'{pad}<img src="{name}" alt="{alt}" '
                             f'loading="lazy">')
            else:  # Material shows one or the other by the colour scheme
                dark_name = name.replace(".png", "-dark.png")
                _FIGURES[url + dark_name] = (alt, dark_png)
                block += [f'{pad}<img src="{name}#only-light" alt="{alt}" '
                          f'loading="lazy">',
                          f'{pad}<img src="{dark_name}#only-dark" '
                          f'alt="{alt}" loading="lazy">']
            block.append(f"{pad}</figure>")
        lines[fence.end:fence.end] = block
    return "\n".join(lines) + "\n"


_PAGE_OUTPUTS: dict[str, list[Output]] = {}  # page -> what its code showed


def on_files(files, config):
    """Make each lab's page from its script; get every chapter's and lab's
    outputs (recorded, or by running it when its record is stale; none
    with CAVE_EXECUTE=0); offer each as a notebook carrying them."""
    from mkdocs.structure.files import File

    execute_pages = os.environ.get("CAVE_EXECUTE", "1") != "0"
    for file in list(files):
        src = file.src_uri
        if not (is_chapter_page(src) or is_lab(src)):
            continue
        source = Path(file.abs_src_path)
        page = src[:-3] + ".md"
        if is_lab(src):
            _LAB_SOURCES[page] = source
            files.append(File.generated(config, page, content=lab_markdown(
                source.read_text(encoding="utf-8"))))
        outputs = execute(source) if execute_pages else []
        _PAGE_OUTPUTS[page] = outputs
        files.append(File.generated(
            config, src.rsplit(".", 1)[0] + ".ipynb",
            content=notebook(source, outputs)))
    return files


def on_page_markdown(markdown, page, config, files):
    """Show, under every fence of a chapter or lab, what it printed and
    drew; offer the downloads."""
    src = page.file.src_uri
    if src not in _PAGE_OUTPUTS:
        return markdown
    stem, lab = Path(src).stem, src in _LAB_SOURCES
    markdown = _render_outputs(markdown, _PAGE_OUTPUTS[src], page.url)
    links = [f"[Download this {'lab' if lab else 'chapter'} as a Jupyter "
             f"notebook]({stem}.ipynb){{ .md-button .cave-notebook }}"]
    if lab:
        links.append(f"[or as a Python script]({stem}.py)"
                     "{ .md-button .cave-notebook }")
    return re.sub(r"^(# .*\n)", lambda m: m.group(1) + "\n" +
                  " ".join(links) + "\n", markdown, count=1, flags=re.M)


_PYTHON_BLOCK = re.compile(
    r'<div class="language-(?:python|py|python3) highlight">')


def on_page_content(html, page, config, files):
    """Give each Python block whose fence needs earlier code the text its
    copy button copies (Material copies a `data-copy` attribute when a
    block has one): the context, then the fence."""
    src = page.file.src_uri
    if src not in _PAGE_OUTPUTS:
        return html
    source = _LAB_SOURCES.get(src) or Path(page.file.abs_src_path)
    pieces = copy_pieces(source)
    blocks = list(_PYTHON_BLOCK.finditer(html))
    if len(blocks) != len(pieces):
        raise ValueError(f"{src}: {len(blocks)} Python blocks rendered, "
                         f"{len(pieces)} fences read: the copy buttons "
                         "cannot be matched to their fences")
    for match, parts in reversed(list(zip(blocks, pieces))):
        if len(parts) == 1:
            continue
        text = "\n".join(parts[:-1]) + "\n\n" + parts[-1]
        extra = sum(len(p.splitlines()) for p in parts[:-1])
        tag = (match.group(0)[:-1] +
               f' data-copy="{html_escape(text.rstrip())}"'
               f' data-copy-lines="{extra}">')
        html = html[:match.start()] + tag + html[match.end():]
    return html


def on_post_build(config):
    site = Path(config["site_dir"])
    for name, (_, png) in _FIGURES.items():
        target = site / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _rel(path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cave.book",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tangle", help="regenerate every module from its chapter")
    sub.add_parser("check", help="fail if any module differs from its chapter")
    run = sub.add_parser("run", help="run a chapter or lab, print its outputs")
    run.add_argument("page", type=Path)
    run.add_argument("--figures", type=Path, default=Path("/tmp/cave-figures"))
    sub.add_parser("record", help="run every stale page and record it")
    sub.add_parser("status", help="stale records, and each page's seconds "
                                  "against the budget")
    args = parser.parse_args(argv)

    if args.command == "tangle":
        written, problems = write_modules()
        for path in written:
            print(f"wrote {path.relative_to(ROOT)}")
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if args.command == "check":
        problems = check()
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if args.command == "status":
        over = 0
        for page in pages():
            current, why = record_state(page)
            record = _read_record(page) or {}
            seconds = record.get("seconds")
            shown = "-" if seconds is None else f"{seconds:6.1f} s"
            over += seconds is not None and seconds > BUDGET_SECONDS
            flag = " OVER BUDGET" if seconds and seconds > BUDGET_SECONDS \
                else ""
            print(f"{_rel(page):42s} {shown:>9s}{flag}  "
                  f"{'current' if current else 'STALE: ' + why}")
        print(f"budget: {BUDGET_SECONDS:.0f} s of fences per page "
              f"(as recorded on the machine that ran it)")
        return 0
    if args.command == "record":
        for page, why in stale_pages():
            print(f"recording {_rel(page)} ({why})", flush=True)
            start = time.perf_counter()
            execute(page, use_cache=False)
            print(f"  {time.perf_counter() - start:.1f} s", flush=True)
        return 0
    page = ChapterRun(args.page)
    args.figures.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for index in range(len(page.fences)):
        output = page.run_next()
        print(f"--- fence {index + 1} (line {output.line}): "
              f"{output.seconds:.2f} s")
        if output.text:
            print(output.text, end="" if output.text.endswith("\n") else "\n")
        for k, (alt, png) in enumerate(output.figures):
            target = args.figures / f"{args.page.stem}-{index + 1}-{k + 1}.png"
            target.write_bytes(png)
            print(f"[figure: {alt} -> {target}]")
    save_outputs(page)
    print(f"--- {len(page.fences)} fences in "
          f"{time.perf_counter() - total:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
