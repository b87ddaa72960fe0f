"""mkdocs hooks for the se3nb site (listed by the generated config, see build_docs.py).

Keeps every page offline: the notebook pages' MathJax (mkdocs-jupyter writes `custom_mathjax_url` from mkdocs.yml, a
placeholder) and the markdown pages with formulas (pymdownx.arithmatex) load the local copy under assets/mathjax/, with
a page-relative URL, so the site also works from a sub-path or from file://.
On notebook pages (on_page_content, so the search index sees the result too) it gives repeated heading ids the `_1`
suffixes of the table of contents, lets the copy buttons copy the visible code instead of a hidden duplicate (which the
search index would show twice), and moves the "Copied!" notice text into CSS. It also drops nbconvert's mermaid loader
(an import from a CDN, dead code here: the notebooks have no mermaid diagrams).
"""

import re

MERMAID = re.compile(r'<script type="module">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*</script>', re.S)
PLACEHOLDER = 'MATHJAX_LOCAL/'
# the MathJax 2.7 of jupyter-server-mathjax ships the HTML-CSS output with the STIX-Web fonts (no TeX fonts, no
# CommonHTML)
FONTS = """<script type="text/x-mathjax-config">
MathJax.Hub.Config({"HTML-CSS": {availableFonts: [], webFont: "STIX-Web", preferredFont: null, imageFont: null}});
</script>
"""
CONFIG = """<script type="text/x-mathjax-config">
MathJax.Hub.Config({tex2jax: {inlineMath: [['$','$'], ['\\\\(','\\\\)']], displayMath: [['$$','$$'], ['\\\\[','\\\\]']],
  processEscapes: true, processEnvironments: true}, messageStyle: 'none', CommonHTML: {linebreaks: {automatic: true}}});
</script>"""


def _prefix(page, config) -> str:
    url = page.url or ''
    return '../' * url.count('/')


def on_post_page(output: str, page, config) -> str:
    local = _prefix(page, config) + 'assets/mathjax/'
    if '.jp-Mermaid' in output and 'class="jp-Mermaid' not in output:
        output = MERMAID.sub('', output)
    if PLACEHOLDER in output:
        return output.replace(f'<script src="{PLACEHOLDER}', f'{FONTS}<script src="{PLACEHOLDER}', 1).replace(
            PLACEHOLDER, local
        )
    if 'class="arithmatex"' in output:
        tag = f'{FONTS}{CONFIG}\n<script src="{local}MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe"></script>\n'
        return output.replace('</body>', tag + '</body>', 1)
    return output


COPY_TXT = re.compile(
    r'(<div class="highlight-ipynb[^"]*"><pre)(>.*?</pre></div>\s*)'
    r'<div class="clipboard-copy-txt" id="(cell-\d+)">.*?</div>',
    re.S,
)
HEADING = re.compile(r'<h([1-6]) id="([^"]+)">(.*?)</h\1>', re.S)


def on_page_content(html: str, page, config, files) -> str:
    if 'jupyter-wrapper' not in html:
        return html
    html = COPY_TXT.sub(r'\1 id="\3"\2', html)
    html = html.replace('<span class="notice" hidden="">Copied!</span>', '<span class="notice" hidden=""></span>')
    seen = set()

    def unique(m):
        level, hid, body = m.groups()
        new, n = hid, 0
        while new in seen:
            n += 1
            new = f'{hid}_{n}'
        seen.add(new)
        if new == hid:
            return m.group(0)
        return f'<h{level} id="{new}">' + body.replace(f'href="#{hid}"', f'href="#{new}"') + f'</h{level}>'

    return HEADING.sub(unique, html)
