"""The site: a strict build, offline, with notebooks, checked in a browser."""

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cave import book

ROOT = book.ROOT
CHROMIUM = Path("/usr/bin/chromium")
# Material 9.8 draws copy buttons as .md-code__button; older ones .md-clipboard
COPY_BUTTON = "button[data-md-type=copy], button.md-clipboard"


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The site built strictly, from the recorded outputs (a page whose
    record is stale runs during the build and is recorded)."""
    target = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d",
         str(target)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    warnings = re.findall(r"^WARNING +-.*$", done.stderr, re.M)
    assert not warnings, "\n".join(warnings)
    return target


def pages(site):
    return sorted(p for p in site.rglob("index.html")
                  if "assets" not in p.parts)


def test_every_chapter_page_shows_its_outputs_and_notebook(site):
    for chapter in book.chapters():
        html = (site / chapter.part / chapter.stem / "index.html").read_text()
        assert "cave-output" in html, f"{chapter}: no output shown"
        assert f'href="../{chapter.stem}.ipynb"' in html
        assert (site / chapter.part / f"{chapter.stem}.ipynb").exists()
        assert chapter.module_title in html, "fence titles name the module"
        for src in re.findall(r'<img src="(figure-[\d-]+\.png)"', html):
            assert (site / chapter.part / chapter.stem / src).exists(), src


def test_the_site_needs_no_network(site):
    """No page loads a script, style, font, image or frame from elsewhere
    (a canonical link names the address; it loads nothing)."""
    tags = re.compile(r"<(script|link|img|iframe|source)\b[^>]*>", re.I)
    remote = re.compile(r'\b(?:src|href)="(?:https?:)?//', re.I)
    for page in site.rglob("*.html"):
        for tag in tags.finditer(page.read_text()):
            text = tag.group(0)
            if re.search(r'rel="(canonical|alternate)"', text):
                continue
            assert not remote.search(text), \
                f"{page.relative_to(site)} loads {text}"
    for css in site.rglob("*.css"):
        assert not re.search(r"url\((['\"]?)(https?:)?//", css.read_text()), \
            f"{css.relative_to(site)} loads a remote resource"


def test_every_page_shows_every_figure_its_code_draws(site):
    """Chapters and labs alike: as many figures on the page as its code
    drew, each file present, and downloads beside it."""
    for page in book.pages():
        part, stem = page.with_suffix("").parts[-2:]
        html = (site / part / stem / "index.html").read_text()
        drawn = sum(len(o.figures) for o in book.execute(page))
        shown = re.findall(r'<img src="(figure-[\d-]+\.png)#only-light"',
                           html)
        assert len(shown) == drawn, \
            f"{part}/{stem}: drew {drawn} figures, the page shows {len(shown)}"
        dark = re.findall(r'<img src="(figure-[\d-]+-dark\.png)#only-dark"',
                          html)
        assert [d.replace("-dark", "") for d in dark] == shown, \
            f"{part}/{stem}: every figure needs its dark-scheme twin"
        for src in shown + dark:
            assert (site / part / stem / src).stat().st_size > 1000, src
        assert (site / part / f"{stem}.ipynb").exists()
        if part == "labs":
            assert f'href="../{stem}.py"' in html, "the script download"
            assert (site / part / f"{stem}.py").exists()


def test_downloaded_notebooks_carry_their_outputs(site):
    import nbformat

    for page in book.pages():
        part, stem = page.with_suffix("").parts[-2:]
        nb = nbformat.read(site / part / f"{stem}.ipynb", as_version=4)
        nbformat.validate(nb)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert len(code) == len(book.page_fences(page))
        figures = sum(1 for c in code for o in c.outputs
                      if "image/png" in o.get("data", {}))
        assert figures == sum(len(o.figures) for o in book.execute(page))


def test_a_generated_notebook_runs_end_to_end(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    # the kernel computes on one thread, as the suite's workers do: beside
    # a busy second worker, two threads of tiny tensors mostly wait
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    path = book.DOCS / "techniques" / "optimization.md"  # a quick one
    nb = nbformat.reads(book.notebook(path), as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code"
               for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type == "stream" for o in outputs)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def served(site):
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: install chromium")
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def test_every_page_in_a_real_browser(site, served, browser):
    """Every page loads with no console error, no request leaving the
    machine, its math typeset and copy buttons on its code. Pages load
    four at a time (the browser fetches and renders them in parallel);
    each is checked once its "load" event fired: the page and everything
    it asked for while loading. (The idle wait of "networkidle", 500 ms a
    page, would cost half a minute at 40 pages; what a page could fetch
    later is checked statically above.) Every page's search worker would
    fetch and index the whole site's search index again (1.5 MB, a third
    of this test's time); here it gets an empty one, and the search test
    below uses the real one."""
    index = json.loads((site / "search" / "search_index.json").read_text())
    empty = json.dumps({"config": index["config"], "docs": []})
    context = browser.new_context()
    context.route("**/search/search_index.json", lambda route: route.fulfill(
        status=200, content_type="application/json", body=empty))
    urls = []
    for page_file in pages(site):
        rel = page_file.parent.relative_to(site).as_posix()
        urls.append((rel, served + ("" if rel == "." else rel + "/")))
    checked = []
    for start in range(0, len(urls), 4):
        opened = []
        for rel, url in urls[start:start + 4]:
            page = context.new_page()
            errors, outside = [], []
            page.on("console", lambda m, e=errors: m.type == "error" and
                    e.append(m.text))
            page.on("pageerror", lambda exc, e=errors: e.append(str(exc)))
            page.on("request", lambda r, o=outside: o.append(r.url)
                    if not r.url.startswith((served, "data:", "blob:"))
                    else None)
            page.goto(url, wait_until="commit")
            opened.append((rel, url, page, errors, outside))
        for rel, url, page, errors, outside in opened:
            page.wait_for_load_state("load", timeout=30_000)
            html = page.content()
            assert not errors, f"{url}: console errors {errors}"
            assert not outside, f"{url}: requests left 127.0.0.1: {outside}"
            if "arithmatex" in html:  # typeset, even in a collapsed block
                page.wait_for_selector(".katex", state="attached",
                                       timeout=10_000)
                text = page.inner_text("article")
                assert "\\(" not in text and "\\[" not in text, \
                    f"{url}: raw math left unrendered"
            if page.locator("article pre > code").count():
                assert page.locator(COPY_BUTTON).count() > 0, \
                    f"{url}: code without copy buttons"
            checked.append(rel)
            page.close()
    context.close()
    assert {f"{c.part}/{c.stem}" for c in book.chapters()} <= set(checked)


def test_search_finds_a_word_from_a_chapter(served, browser):
    page = browser.new_page()
    page.goto(served, wait_until="networkidle")
    page.keyboard.press("/")  # Material's shortcut to the search box
    page.keyboard.type("broadcasting", delay=30)
    result = page.wait_for_selector(".md-search-result__item",
                                    timeout=15_000)
    link = result.query_selector("a").get_attribute("href")
    assert "fundamentals/essentials" in link, link
    page.close()


def test_copy_buttons_carry_each_fences_context(site):
    """Material copies a block's data-copy attribute when it has one: every
    fence that needs code from above carries exactly its copy text."""
    import html as html_lib

    for page in book.pages():
        part, stem = page.with_suffix("").parts[-2:]
        text = (site / part / stem / "index.html").read_text()
        blocks = re.findall(
            r'<div class="language-python highlight"([^>]*)>', text)
        pieces = book.copy_pieces(page)
        assert len(blocks) == len(pieces), f"{part}/{stem}"
        for attrs, parts, copy in zip(blocks, pieces, book.copy_texts(page)):
            found = re.search(r'data-copy="([^"]*)"', attrs)
            if len(parts) == 1:
                assert found is None
            else:
                assert found, f"{part}/{stem}: a fence lost its context"
                assert html_lib.unescape(found.group(1)) == copy.rstrip()


def test_figures_follow_the_colour_scheme(served, browser):
    """Light scheme: the figure drawn on white; dark: its light-ink twin."""
    for scheme, shown, hidden in [("light", "#only-light", "#only-dark"),
                                  ("dark", "#only-dark", "#only-light")]:
        page = browser.new_page(color_scheme=scheme)
        page.goto(served + "classical/cnn/", wait_until="networkidle")
        visible = page.locator(f'.cave-figure img[src$="{shown}"]')
        invisible = page.locator(f'.cave-figure img[src$="{hidden}"]')
        assert visible.count() == invisible.count() > 0
        visible.first.scroll_into_view_if_needed()  # lazy: load it
        visible.first.wait_for(state="visible", timeout=10_000)
        assert invisible.first.evaluate(
            "img => getComputedStyle(img).display") == "none", \
            f"{scheme}: {hidden} shown"
        loaded = visible.first.evaluate("img => img.complete && "
                                        "img.naturalWidth > 100")
        assert loaded, f"{scheme}: the figure did not load"
        page.close()
