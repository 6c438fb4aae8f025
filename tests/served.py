"""``python -m gptjax.serve`` as a user starts it, for the tests that talk to it over HTTP: a subprocess on a free
port of 127.0.0.1, sharing the tests' compilation cache, killed when the caller is done; and a headless browser
for the tests of its page."""

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"  # Debian's package (.ci/run installs it); playwright's own download cannot work here


@contextlib.contextmanager
def running_server(weights: str | os.PathLike, *flags: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """The server's process and base URL, once every shape is compiled and the socket listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".cache" / "jax")}
    proc = subprocess.Popen([sys.executable, "-m", "gptjax.serve", "--weights", str(weights), "--port", str(port),
                             *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server listens
        assert f"http://127.0.0.1:{port}" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:  # a test may have ended it (SIGTERM)
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def browser_page(url: str) -> Iterator:
    """A playwright page of headless Chromium, opened at ``url``."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM)
        try:
            page = browser.new_page()
            page.goto(url)
            yield page
        finally:
            browser.close()
