"""A real headless browser for the docs tests: Debian's chromium driven over the DevTools protocol on a pipe
(`--remote-debugging-pipe`: no websocket library, no extra package), and the built site served from 127.0.0.1 by
`http.server` on a free port.

    with serve(site_dir) as base, Chromium() as b:
        b.goto(base + '00_fiber/'); b.eval('document.title'); b.screenshot('out/page.png')

Also a CLI: `python tools/docs/browser.py site/ --shot out/docs/page.png --page 02_equivariance/`.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

FLAGS = [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-dev-shm-usage',
    '--hide-scrollbars',
    '--mute-audio',
    '--disable-extensions',
    '--no-default-browser-check',
    '--remote-debugging-pipe',
]


def find_chromium() -> str | None:
    for name in ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable'):
        path = shutil.which(name)
        if path:
            return path
    return None


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve(root: Path):
    "Serve `root` on 127.0.0.1 (free port) in a thread; yields the base URL ending in '/'."
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f'http://127.0.0.1:{httpd.server_address[1]}/'
    finally:
        httpd.shutdown()
        httpd.server_close()


class CDPError(RuntimeError):
    pass


class Chromium:
    "One headless chromium process with a fresh profile and one page, driven over --remote-debugging-pipe."

    def __init__(self, executable: str | None = None, width: int = 1280, height: int = 900, timeout: float = 30):
        self.executable = executable or find_chromium()
        if not self.executable:
            raise FileNotFoundError('chromium not found (apt-get install -y chromium)')
        self.size, self.timeout, self._id = (width, height), timeout, 0
        self.events: list[dict] = []

    def __enter__(self):
        self.profile = tempfile.mkdtemp(prefix='se3nb-chromium-')
        to_child_r, self._w = os.pipe()  # we write commands, chromium reads fd 3
        self._r, from_child_w = os.pipe()  # chromium writes fd 4, we read

        def fds():  # runs in the child before exec: put the pipe ends on fds 3 and 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        args = [
            self.executable,
            *FLAGS,
            f'--user-data-dir={self.profile}',
            f'--window-size={self.size[0]},{self.size[1]}',
            'about:blank',
        ]
        self.proc = subprocess.Popen(
            args,
            preexec_fn=fds,
            close_fds=False,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b''
        targets = self.send('Target.getTargets')['targetInfos']
        page = next((t for t in targets if t['type'] == 'page'), None)
        target = page['targetId'] if page else self.send('Target.createTarget', url='about:blank')['targetId']
        self.session = self.send('Target.attachToTarget', targetId=target, flatten=True)['sessionId']
        for domain in ('Page', 'Runtime', 'Network'):
            self.send(f'{domain}.enable', session=True)
        self.send(
            'Emulation.setDeviceMetricsOverride',
            session=True,
            width=self.size[0],
            height=self.size[1],
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(Exception):
            self.send('Browser.close')
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._w, self._r):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.profile, ignore_errors=True)

    # --- protocol ---
    def _read_message(self, deadline: float) -> dict:
        import select

        while b'\0' not in self._buf:
            left = deadline - time.time()
            if left <= 0:
                raise TimeoutError('no answer from chromium')
            ready, _, _ = select.select([self._r], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise CDPError('chromium closed the pipe (did it crash?)')
            self._buf += chunk
        msg, self._buf = self._buf.split(b'\0', 1)
        return json.loads(msg)

    def send(self, method: str, session: bool = False, timeout: float | None = None, **params):
        self._id += 1
        msg = {'id': self._id, 'method': method, 'params': params}
        if session:
            msg['sessionId'] = self.session
        os.write(self._w, json.dumps(msg).encode() + b'\0')
        deadline = time.time() + (timeout or self.timeout)
        while True:
            m = self._read_message(deadline)
            if m.get('id') == self._id:
                if 'error' in m:
                    raise CDPError(f'{method}: {m["error"]}')
                return m.get('result', {})
            self.events.append(m)

    # --- page helpers ---
    def eval(self, expression: str, timeout: float | None = None):
        "Evaluate JS in the page (promises awaited) and return its JSON value."
        r = self.send(
            'Runtime.evaluate',
            session=True,
            timeout=timeout,
            expression=expression,
            awaitPromise=True,
            returnByValue=True,
        )
        if 'exceptionDetails' in r:
            raise CDPError(f'JS error: {r["exceptionDetails"]}')
        return r['result'].get('value')

    def goto(self, url: str, wait_images: bool = True) -> dict:
        "Open `url`, wait for the load event (and for images to decode). Returns {status, url, title}."
        self.events.clear()
        self.send('Page.navigate', session=True, url=url)
        deadline = time.time() + self.timeout
        while not any(e.get('method') == 'Page.loadEventFired' for e in self.events):
            self.events.append(self._read_message(deadline))
        if wait_images:
            self.eval('Promise.all([...document.images].map(i => i.decode().catch(() => null)))')
        status = next(
            (
                e['params']['response']['status']
                for e in self.events
                if e.get('method') == 'Network.responseReceived' and e['params'].get('type') == 'Document'
            ),
            None,
        )
        return {'status': status, 'url': url, 'title': self.eval('document.title')}

    def requests(self) -> list[str]:
        "URLs the page requested since the last goto."
        return [e['params']['request']['url'] for e in self.events if e.get('method') == 'Network.requestWillBeSent']

    def wait_for(self, expression: str, timeout: float = 15, interval: float = 0.2):
        "Poll a JS expression until it is truthy; returns its value (raises TimeoutError)."
        deadline = time.time() + timeout
        while True:
            v = self.eval(expression)
            if v:
                return v
            if time.time() > deadline:
                raise TimeoutError(f'timed out waiting for: {expression}')
            time.sleep(interval)

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params = {'format': 'png'}
        if full_page:
            w, h = self.eval('[document.documentElement.scrollWidth, document.documentElement.scrollHeight]')
            params.update(
                captureBeyondViewport=True, clip={'x': 0, 'y': 0, 'width': w, 'height': min(h, 12000), 'scale': 1}
            )
        data = self.send('Page.captureScreenshot', session=True, **params)['data']
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description='Screenshot a page of the built site in headless chromium.')
    ap.add_argument('site', nargs='?', default='site')
    ap.add_argument('--page', default='', help="page path under the site, e.g. '02_equivariance/'")
    ap.add_argument('--shot', default='out/docs/page.png')
    ap.add_argument('--scroll', default='', help='CSS selector to scroll into view before the shot')
    ap.add_argument('--full', action='store_true', help='whole page, not just the viewport')
    a = ap.parse_args(argv)
    with serve(Path(a.site)) as base, Chromium() as b:
        print(b.goto(base + a.page))
        if a.scroll:
            b.eval(f'document.querySelector({json.dumps(a.scroll)}).scrollIntoView()')
        print(b.screenshot(Path(a.shot), full_page=a.full))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
