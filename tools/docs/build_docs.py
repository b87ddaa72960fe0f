"""`make docs`: build the documentation website (site/) from the notebooks, fully offline.

1. nbdev's notebook processing (`nbdev.serve.proc_nbs`, the step `nbdev_proc_nbs` runs before Quarto; the command
itself is
   not used because it insists on installing Quarto) writes _proc/: front matter from the title cell, show_doc cells for
   every exported symbol (executed, so their markdown output holds signature and docstring), hidden cells removed.
2. This script turns the processed notebooks into pages that read well without Quarto (build/docs_src/): the YAML front
   matter becomes a `# Title` and a summary line; show_doc cells become markdown cells with a stable anchor; `#|`
   directive
   lines, quarto link attributes `{...}` and `:::` fences go; nbdev doc links to `doc_host` point at the local pages.
   It also writes the API reference page (every show_doc block, by module) and the nav, and copies the hand-written
   pages
   in docs/ and a local MathJax (from the `jupyter-server-mathjax` package) next to them.
3. `mkdocs build` (mkdocs-material + mkdocs-jupyter) renders the *stored* outputs; nothing is executed, because the
   processed notebooks no longer contain their hidden import cells. Run `make run-nbs` first to refresh outputs.

    python tools/docs/build_docs.py [--site DIR] [--no-proc]
"""

from __future__ import annotations

import argparse
import os
import posixpath
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import nbtools  # noqa: E402

ROOT = nbtools.ROOT
BUILD = ROOT / 'build'
STAGE = BUILD / 'docs_src'
HAND = ROOT / 'docs'  # hand-written pages and assets (migration.md, stylesheets/)
MATHJAX_SKIP = {'localization', 'SVG', 'png', 'eot', 'otf', 'svg'}  # keep the HTML-CSS output and STIX-Web woff fonts


def page_slug(nb_path: Path) -> str:
    "URL folder of a notebook page relative to the site root (use_directory_urls): nbs/03_graph.ipynb -> 03_graph/."
    rel = nb_path.relative_to(ROOT / 'nbs').with_suffix('')
    return '' if rel.name == 'index' else rel.as_posix() + '/'


def default_exp(nb) -> str | None:
    for c in nb.cells:
        if c.cell_type == 'code':
            m = re.search(r'^#\|\s*default_exp\s+(\S+)', c.source, re.M)
            if m:
                return m.group(1)
    return None


def anchor(name: str) -> str:
    "nbdev's doc-link anchor of a symbol: lower case, dots and non-word characters removed (Fiber.check -> fiber.check)"
    return re.sub(r'[^\w.-]', '', name.lower())


class LinkFixer:
    "Rewrite nbdev doc links (doc_host/doc_baseurl/<output-file>.html#anchor) to the local pages."

    def __init__(self, html_to_slug: dict[str, str], anchors: dict[str, set] | None = None):
        self.anchors = anchors or {}  # slug -> ids of the show_doc entries on that page
        cfg = nbtools.settings()
        base = (cfg.get('doc_host', '') + cfg.get('doc_baseurl', '')).rstrip('/')
        self.html_to_slug = html_to_slug
        self.pat = re.compile(r'\]\(' + re.escape(base) + r'/([\w./-]+?)\.html(#[^)\s]*)?\)') if base else None

    def _fragment(self, slug: str, frag: str) -> str:
        "A method without its own show_doc entry links to its class's entry; an unknown symbol to the page."
        known = self.anchors.get(slug, set())
        while frag and frag not in known:
            frag = frag.rpartition('.')[0]
        return f'#{frag}' if frag else ''

    def __call__(self, text: str, depth: int, folder: str = '') -> str:
        up = '../' * depth

        # relative links between notebooks (`[x](04_conv.ipynb#y)`): mkdocs does not rewrite them inside notebook pages
        def nb_link(m):
            target = posixpath.normpath(posixpath.join(folder, m.group(1)))
            slug = '' if target == 'index' else target + '/'
            return f']({up}{slug}{m.group(2) or ""})'

        text = re.sub(r'\]\((?![a-z]+:|/|#)([^)\s#]+?)\.ipynb(#[^)\s]*)?\)', nb_link, text)
        if self.pat:

            def sub(m):
                slug = self.html_to_slug.get(m.group(1))
                if slug is None:
                    return m.group(0)
                return f']({up}{slug}{self._fragment(slug, (m.group(2) or "")[1:])})'

            text = self.pat.sub(sub, text)
        text = re.sub(r'(\]\([^)]*\))\{[^}\n]*\}', r'\1', text)  # quarto link attributes: [x](url){.doc-link}
        text = re.sub(r'^:::.*$\n?', '', text, flags=re.M)  # quarto divs / callout fences
        return text


def _strip_directives(src: str) -> str:
    lines = src.splitlines()
    while lines and (lines[0].lstrip().startswith('#|') or not lines[0].strip()):
        lines.pop(0)
    return '\n'.join(lines)


def _md_output(cell) -> str:
    for o in cell.get('outputs', []):
        data = o.get('data', {})
        if 'text/markdown' in data:
            md = data['text/markdown']
            return ''.join(md) if isinstance(md, list) else md
    return ''


SHOW_DOC_HEAD = re.compile(r'^(#{2,4})\s+(\S[^\n]*)$', re.M)
SOURCE_LINK = re.compile(r'^\[source\]\((\S+)\)\s*$', re.M)


def clean_notebook(nb, *, fix_links: LinkFixer, depth: int, module: str | None, stem: str, folder: str = ''):
    """Make a processed notebook read well outside Quarto. Returns (nb, title, api_entries); an api entry is
    (name, anchor, markdown) for one show_doc block."""
    title, summary, cells, api = None, None, [], []
    fix = fix_links
    fix_links = lambda text, depth: fix(text, depth, folder)  # noqa: E731
    for cell in nb.cells:
        src = cell.source
        if cell.cell_type == 'raw':
            if src.lstrip().startswith('---'):
                fm = yaml.safe_load(src.strip().strip('-')) or {}
                title, summary = fm.get('title'), fm.get('description')
            continue
        if cell.cell_type == 'markdown':
            if src.strip().startswith('<!-- WARNING: THIS FILE WAS AUTOGENERATED'):
                continue
            cell.source = fix_links(src, depth)
            cells.append(cell)
            continue
        d = nbtools.directives(src)
        if d.get('include', '').lower() == 'false':
            continue
        if d.get('output', '').lower() == 'asis' or 'show_doc(' in src and d.get('echo', '').lower() == 'false':
            md = _md_output(cell).strip()
            md = re.sub(r'^---\s*\n', '', md).strip()
            if not md:
                continue
            md = fix_links(md, depth)
            m = SHOW_DOC_HEAD.search(md)
            if m and 'show_doc(' in src:
                name = m.group(2).strip().strip('`')
                api.append((name, anchor(name), md))
                link = SOURCE_LINK.search(md)  # nbdev puts [source](...) above the heading: move it under
                if link:
                    md = (md[: link.start()] + md[link.end() :]).strip()
                    md = SHOW_DOC_HEAD.sub(
                        lambda h: f'{h.group(0)}\n\n<small><a href="{link.group(1)}">source</a></small>', md, count=1
                    )
                md = f'<a id="{anchor(name)}"></a>\n\n' + md
            cells.append(nbformat.v4.new_markdown_cell(md))
            continue
        tags = [t for t in cell.metadata.get('tags', []) if not t.startswith(nbtools.STAMP_PREFIX)]
        if d.get('echo', '').lower() == 'false':
            tags.append('hide-input')
        if d.get('output', '').lower() == 'false':
            cell.outputs = []
        cell.metadata = {'tags': tags} if tags else {}
        cell.source = _strip_directives(src)
        if not cell.source.strip() and not cell.get('outputs'):
            continue
        for o in cell.get('outputs', []):  # markdown outputs may hold doc links too
            if 'text/markdown' in o.get('data', {}):
                o['data']['text/markdown'] = fix_links(_md_output(nbformat.from_dict({'outputs': [o]})), depth)
        cells.append(cell)
    has_h1 = any(c.cell_type == 'markdown' and re.match(r'\s*#\s', c.source) for c in cells)
    if not has_h1:
        head = f'# {title or stem}' + (f'\n\n> {summary}' if summary else '')
        if module:
            head += (
                f'\n\n<small>Module `se3nb.{module}` · '
                f'[API reference](../api/#{("se3nb." + module).replace(".", "-")})</small>'
                if depth
                else ''
            )
        cells.insert(0, nbformat.v4.new_markdown_cell(fix_links(head, depth)))
    if title is None:
        h1 = next((re.match(r'\s*#\s+(.*)', c.source) for c in cells if c.cell_type == 'markdown'), None)
        title = h1.group(1).strip() if h1 else stem
    nb.cells = cells
    nb.metadata = {k: v for k, v in nb.metadata.items() if k in ('kernelspec', 'language_info')}
    return nb, title, api


def api_page(sections: list[tuple[str, str, str, list]]) -> str:
    "Markdown of the API reference: one `##` section per module, one `###` entry per show_doc block."
    out = [
        '---',
        'search:',
        '  boost: 3  # a class name typed in the search box finds its entry here first',
        '---',
        '',
        '# API reference',
        '',
        'Signatures and docstrings of everything the notebooks export, gathered from their `show_doc` cells, '
        'module by module. Each entry links back to the notebook section that derives and tests it. '
        'The stable API is re-exported by `import se3nb`; the rest is reachable by module path.',
        '',
    ]
    for module, page, title, entries in sections:
        if not entries:
            continue
        mod = f'se3nb.{module}'
        out += [f'## {mod} {{ #{mod.replace(".", "-")} }}', '', f'From the notebook [{title}]({page}).', '']
        seen = set()
        for name, anc, md in entries:
            key = f'{mod}.{name}'
            if key in seen:
                continue
            seen.add(key)
            body = SHOW_DOC_HEAD.sub('', md, count=1).strip()
            src = SOURCE_LINK.search(body)
            body = (body[: src.start()] + body[src.end() :]).strip() if src else body
            links = f'[in the notebook]({page}#{anc})' + (f' · [source]({src.group(1)})' if src else '')
            out += [
                f'### {name} {{ #{key} data-toc-label="{name}" }}',
                '',
                f'<small>`{key}` · {links}</small>',
                '',
                body,
                '',
            ]
    return '\n'.join(out) + '\n'


def copy_mathjax(dest: Path) -> bool:
    try:
        import jupyter_server_mathjax
    except ImportError:
        print('warning: jupyter-server-mathjax is not installed; formulas stay as TeX source', file=sys.stderr)
        return False
    src = Path(jupyter_server_mathjax.__file__).parent / 'static'
    shutil.copytree(src, dest, ignore=lambda d, names: [n for n in names if n in MATHJAX_SKIP])
    return True


def landing(stage: Path, nav_tutorials: list) -> str:
    "index page: nbs/index.ipynb when it exists (handled by the caller), else README.md, else a generated page."
    readme = ROOT / 'README.md'
    if readme.exists() and readme.read_text(encoding='utf-8').strip():
        text = readme.read_text(encoding='utf-8')
        text = re.sub(r'\]\((?:\./)?nbs/([\w-]+)\.ipynb', r'](\1.ipynb', text)
        text = re.sub(r'\]\((?:\./)?docs/', '](', text)
    else:
        cfg = nbtools.settings()
        text = (
            f'# {cfg.get("title", "se3nb")}\n\n> {cfg.get("description", "")}\n\nThe notebooks, in reading order:\n\n'
        )
        text += ''.join(f'- [{t}]({p})\n' for t, p in nav_tutorials)
        text += (
            '\nSee also the [API reference](api.md) and [Migrating from NVIDIA\'s SE(3)-Transformer](migration.md).\n'
        )
    (stage / 'index.md').write_text(text, encoding='utf-8')
    return 'index.md'


def run_proc() -> None:
    "nbdev's notebook processing into _proc/ (fresh every time, so deleted notebooks do not linger)."
    shutil.rmtree(ROOT / '_proc', ignore_errors=True)
    code = 'from nbdev.serve import proc_nbs; proc_nbs(n_workers=2, force=True)'
    subprocess.run([sys.executable, '-W', 'ignore', '-c', code], cwd=ROOT, check=True)


def assemble() -> Path:
    "Write build/docs_src/ and build/mkdocs.gen.yml; returns the generated config."
    proc = ROOT / '_proc'
    shutil.rmtree(STAGE, ignore_errors=True)
    STAGE.mkdir(parents=True)
    if HAND.exists():
        shutil.copytree(HAND, STAGE, dirs_exist_ok=True, ignore=shutil.ignore_patterns('artifacts', '.*'))
    tutorials = nbtools.tutorial_notebooks()
    runs = nbtools.run_notebooks()
    cfg_html = {}
    metas = []
    for nb_path in tutorials + runs:
        pnb = proc / nb_path.relative_to(ROOT / 'nbs')
        if not pnb.exists():
            print(f'warning: nbdev did not process {nb_path.name}; using it unprocessed', file=sys.stderr)
            pnb = nb_path
        nb = nbformat.read(str(pnb), as_version=4)
        fm = next((c.source for c in nb.cells if c.cell_type == 'raw' and c.source.lstrip().startswith('---')), '')
        out_file = (yaml.safe_load(fm.strip().strip('-')) or {}).get('output-file') if fm else None
        slug = page_slug(nb_path)
        if out_file:
            cfg_html[str(Path(out_file).with_suffix(''))] = slug
        metas.append((nb_path, nb, slug))
    anchors = {
        slug: {
            anchor(m.group(2).strip().strip('`'))
            for c in nb.cells
            if c.cell_type == 'code' and 'show_doc(' in c.source
            for m in [SHOW_DOC_HEAD.search(_md_output(c))]
            if m
        }
        for _, nb, slug in metas
    }
    fix = LinkFixer(cfg_html, anchors)
    nav_tut, nav_runs, sections, has_index = [], [], [], False
    for nb_path, nb, slug in metas:
        module = default_exp(nbtools.read(nb_path))
        rel = nb_path.relative_to(ROOT / 'nbs')
        folder = '' if rel.parent == Path('.') else rel.parent.as_posix()
        nb, title, api = clean_notebook(
            nb, fix_links=fix, depth=slug.count('/'), module=module, stem=nb_path.stem, folder=folder
        )
        dest = STAGE / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, str(dest))
        if rel.as_posix() == 'index.ipynb':
            has_index = True
        elif rel.parts[0] == 'runs':
            nav_runs.append((title, rel.as_posix()))
        else:
            nav_tut.append((title, rel.as_posix()))
            if module:
                sections.append((module, rel.as_posix(), title, api))
    (STAGE / 'api.md').write_text(api_page(sections), encoding='utf-8')
    home = 'index.ipynb' if has_index else landing(STAGE, nav_tut)
    if not (STAGE / 'migration.md').exists():
        raise FileNotFoundError("docs/migration.md is missing: the 'Migrating from NVIDIA' page is written by hand")
    copy_mathjax(STAGE / 'assets' / 'mathjax')
    nav = [{'Home': home}, {'Tutorials': [{t: p} for t, p in nav_tut]}]
    if nav_runs:
        nav.append({'Run notebooks': [{t: p} for t, p in nav_runs]})
    nav += [{'API reference': 'api.md'}, {"Migrating from NVIDIA": 'migration.md'}]
    gen = {
        'INHERIT': str(ROOT / 'mkdocs.yml'),
        'docs_dir': str(STAGE),
        'nav': nav,
        'hooks': [str(Path(__file__).resolve().parent / 'mkdocs_hooks.py')],
    }
    cfg_path = BUILD / 'mkdocs.gen.yml'
    cfg_path.write_text(
        '# generated by tools/docs/build_docs.py; edit mkdocs.yml instead\n'
        + yaml.safe_dump(gen, sort_keys=False, allow_unicode=True),
        encoding='utf-8',
    )
    return cfg_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--site', default=str(ROOT / 'site'), help='output folder (default: site/)')
    ap.add_argument('--no-proc', action='store_true', help='reuse _proc/ from the last build')
    ap.add_argument('--strict', action='store_true', help='mkdocs --strict: warnings fail the build')
    a = ap.parse_args(argv)
    t0 = time.time()
    stale = sorted(
        {f.path.name for p in nbtools.tutorial_notebooks() for f in nbtools.check_notebook(p) if f.level == 'error'}
    )
    if stale:
        print(
            'warning: the site shows stored outputs, and these notebooks have stale or missing ones: '
            f'{", ".join(stale)} '
            '(`make check-nbs` says why; `make run-nbs` refreshes them)',
            file=sys.stderr,
        )
    if not a.no_proc:
        run_proc()
    t1 = time.time()
    cfg = assemble()
    cmd = [sys.executable, '-m', 'mkdocs', 'build', '--clean', '-q', '-f', str(cfg), '-d', str(Path(a.site).resolve())]
    if a.strict:
        cmd.append('--strict')
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, NO_MKDOCS_2_WARNING='1'))
    if r.returncode:
        return r.returncode
    site = Path(a.site).resolve()
    shown = site.relative_to(ROOT) if site.is_relative_to(ROOT) else a.site
    print(
        f'docs: {site} (nbdev processing {t1 - t0:.0f}s, pages {time.time() - t1:.0f}s); '
        f'preview with `python -m http.server -d {shown}`'
    )
    return 0


if __name__ == '__main__':
    sys.exit(main())
