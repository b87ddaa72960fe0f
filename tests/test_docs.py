"""The documentation site, tested as a user sees it: `make docs` builds it, then a real headless chromium opens the
pages from 127.0.0.1. Needs Debian's chromium (`apt-get install -y chromium`); the browser tests skip without it. Saves
screenshots to out/docs/ (the CI artifact)."""

import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools' / 'docs'))
import browser  # noqa: E402
import nbtools  # noqa: E402

ARTIFACTS = ROOT / 'out' / 'docs'
STAGE = ROOT / 'build' / 'docs_src'
NOTEBOOKS = nbtools.tutorial_notebooks() + nbtools.run_notebooks()


def page_of(nb: Path) -> str:
    rel = nb.relative_to(ROOT / 'nbs').with_suffix('')
    return '' if rel.name == 'index' else rel.as_posix() + '/'


def staged(nb: Path):
    return nbformat.read(str(STAGE / nb.relative_to(ROOT / 'nbs')), as_version=4)


def stored_images(nb) -> int:
    "image/png outputs the page must show (the staged notebook: hidden cells are already gone)."
    return sum(
        'image/png' in o.get('data', {})
        for c in nb.cells
        if c.cell_type == 'code' and 'remove-cell' not in c.metadata.get('tags', [])
        for o in c.get('outputs', [])
    )


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')
    t = time.time()
    r = subprocess.run(
        [sys.executable, str(ROOT / 'tools' / 'docs' / 'build_docs.py'), '--site', str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, f'docs build failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}'
    print(f'docs built in {time.time() - t:.0f}s')
    return out


@pytest.fixture(scope='module')
def web(site):
    if not browser.find_chromium():
        pytest.skip('chromium is not installed (CI installs it: apt-get update && apt-get install -y chromium)')
    with browser.serve(site) as base, browser.Chromium(width=1280, height=1000) as b:
        yield b, base


# --- the built files ---


def test_every_notebook_has_a_page(site):
    assert (site / 'index.html').exists() and (site / 'api' / 'index.html').exists()
    assert (site / 'migration' / 'index.html').exists()
    assert (site / 'search' / 'search_index.json').exists()
    missing = [nb.name for nb in NOTEBOOKS if not (site / page_of(nb) / 'index.html').exists()]
    assert not missing, f'no page for {missing}'


def test_pages_fetch_nothing_from_the_web(site):
    "Offline site: no script, stylesheet, image or font from another host (links to GitHub are fine)."
    bad = set()
    for html in site.rglob('*.html'):
        text = html.read_text(encoding='utf-8')
        for m in re.finditer(
            r'<(script|img|iframe|source)\b[^>]*\bsrc="(https?:)?//[^"]+"|<link\b[^>]*\bhref="(https?:)?//[^"]+"[^>]*>'
            r'|@import\s+url\(["\']?(https?:)?//|import\(["\']https?://',
            text,
        ):
            if m.group(0).startswith('<link') and 'stylesheet' not in m.group(0) and 'preload' not in m.group(0):
                continue
            bad.add(f'{html.relative_to(site)}: {m.group(0)[:120]}')
    assert not bad, '\n'.join(sorted(bad))


def test_internal_links_resolve(site):
    "Every relative link of every page points at a page (and, with a #fragment, at an id on it) that exists."
    from urllib.parse import unquote, urljoin, urlparse

    broken, ids = [], {}
    for html in site.rglob('*.html'):
        if 'assets' in html.relative_to(site).parts or html.name == '404.html':
            continue  # 404 links are site_url-absolute
        page_url = 'http://site/' + html.relative_to(site).as_posix()
        for href in re.findall(r'<a\b[^>]*\bhref="([^"]+)"', html.read_text(encoding='utf-8')):
            if re.match(r'[a-z]+:|//', href):
                continue
            u = urlparse(urljoin(page_url, href))
            target = site / unquote(u.path).lstrip('/')
            if target.is_dir():
                target = target / 'index.html'
            if not target.exists():
                broken.append(f'{html.relative_to(site)} -> {href}')
            elif u.fragment and target.suffix == '.html':
                if target not in ids:
                    ids[target] = set(re.findall(r'\bid="([^"]+)"', target.read_text(encoding='utf-8')))
                if unquote(u.fragment) not in ids[target]:
                    broken.append(f'{html.relative_to(site)} -> {href} (no such id)')
    assert not broken, '\n'.join(sorted(set(broken)))


def test_api_reference_lists_every_module(site):
    html = (site / 'api' / 'index.html').read_text(encoding='utf-8')
    for nb in nbtools.tutorial_notebooks():
        m = re.search(r'^#\|\s*default_exp\s+(\S+)', ''.join(c.source + '\n' for c in nbtools.read(nb).cells), re.M)
        if m:
            assert f'id="se3nb-{m.group(1)}"' in html, f'API reference has no section for se3nb.{m.group(1)}'
    if (ROOT / 'nbs' / '00_fiber.ipynb').exists():
        assert 'id="se3nb.fiber.Fiber"' in html, 'no API entry for Fiber'
        entry = html[html.index('id="se3nb.fiber.Fiber"') :]
        entry = entry[: entry.find('<h3', 10)]
        assert 'class="highlight"' in entry and 'Fiber' in entry, 'the Fiber entry has no signature'
        assert re.search(r'<em>\s*\w', entry), 'the Fiber entry has no docstring'


def test_nbdev_artifacts_are_cleaned(site):
    "No Quarto front matter, `#|` directives, show_doc calls or link attributes on the notebook pages."
    for nb in nbtools.tutorial_notebooks():
        text = (site / page_of(nb) / 'index.html').read_text(encoding='utf-8')
        body = text[text.find('jupyter-wrapper') :]
        for bad in ('output-file:', '#| ', 'show_doc(', '{.doc-link', 'THIS FILE WAS AUTOGENERATED', 'se3nb.github.io'):
            assert bad not in body, f'{nb.name}: page shows {bad!r}'


# --- in the browser ---


def test_notebook_pages_load_with_their_plots(web):
    b, base = web
    problems = []
    for nb in NOTEBOOKS:
        r = b.goto(base + page_of(nb))
        info = b.eval("""(() => { const w = document.querySelector('.jupyter-wrapper');
            const imgs = w ? [...w.querySelectorAll('img')] : [];
            return {wrapper: !!w, h1: (document.querySelector('h1') || {}).textContent || '',
                    images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length}; })()""")
        want = stored_images(staged(nb))
        outside = [u for u in b.requests() if not u.startswith((base, 'data:', 'about:'))]
        errors = [
            e['params']['exceptionDetails'].get('text', '')
            for e in b.events
            if e.get('method') == 'Runtime.exceptionThrown'
        ]
        if r['status'] != 200:
            problems.append(f'{nb.name}: HTTP {r["status"]}')
        if not info['wrapper'] or not info['h1'].strip():
            problems.append(f'{nb.name}: no notebook content or title')
        if info['images'] < want:
            problems.append(f'{nb.name}: {info["images"]} images shown, {want} stored plots')
        if info['broken']:
            problems.append(f'{nb.name}: {info["broken"]} images do not decode')
        if outside:
            problems.append(f'{nb.name}: requests outside 127.0.0.1: {outside[:3]}')
        if errors:
            problems.append(f'{nb.name}: JS errors {errors[:3]}')
    assert not problems, '\n'.join(problems)


def test_search_finds_the_api_entry(web):
    "Typing a public class name in the search box lists its API reference entry, and the link lands on it."
    if not (ROOT / 'nbs' / '00_fiber.ipynb').exists():
        pytest.skip('00_fiber.ipynb (Fiber) not there')
    b, base = web
    b.goto(base)
    b.eval("document.querySelector('.md-search__input').focus()")
    b.send('Input.insertText', session=True, text='Fiber')
    hits = b.wait_for(
        """(() => { const a = [...document.querySelectorAll('.md-search-result__link')];
        return a.length ? a.map(x => x.getAttribute('href')) : null; })()""",
        timeout=30,
    )
    time.sleep(0.3)
    b.screenshot(ARTIFACTS / 'search-Fiber.png')
    api = [h for h in hits if re.search(r'api/(\?[^#]*)?#se3nb\.fiber\.Fiber$', h)]
    assert api, f'no API entry for Fiber among the search results: {hits}'
    b.goto(api[0])
    assert b.eval(
        "(() => { const e = document.getElementById('se3nb.fiber.Fiber'); "
        "return !!e && e.getBoundingClientRect().top < window.innerHeight; })()"
    ), 'link does not land on the entry'


def test_formulas_render_offline(web):
    b, base = web
    nb = next(
        (
            nb
            for nb in nbtools.tutorial_notebooks()
            if any(c.cell_type == 'markdown' and '$' in c.source for c in nbtools.read(nb).cells)
        ),
        None,
    )
    if nb is None:
        pytest.skip('no notebook with LaTeX')
    b.goto(base + page_of(nb))
    assert b.wait_for("document.querySelectorAll('.MathJax, .MathJax_Display').length", timeout=30), (
        f'MathJax did not typeset {nb.name}'
    )


def test_screenshot_of_a_plot(web):
    "CI artifact: out/docs/screenshot.png, the first notebook page with a plot, scrolled to the plot."
    b, base = web
    nb = next((nb for nb in nbtools.tutorial_notebooks() if stored_images(staged(nb))), None)
    b.goto(base + (page_of(nb) if nb else ''))
    if nb:
        b.eval("document.querySelector('.jupyter-wrapper img').scrollIntoView({block: 'center'})")
    time.sleep(0.5)  # header transition
    shot = b.screenshot(ARTIFACTS / 'screenshot.png')
    assert shot.stat().st_size > 10_000
    print(f'screenshot of {page_of(nb) if nb else "the landing page"}: {shot}')
