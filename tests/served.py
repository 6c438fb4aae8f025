"""``python -m gptjax.serve`` as a user starts it, for the tests that talk to it over HTTP: a subprocess on a free
port of 127.0.0.1, sharing the tests' compilation cache, killed when the caller is done."""

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def running_server(weights: str | os.PathLike, *flags: str) -> Iterator[str]:
    """The server's base URL, once every shape is compiled and the socket listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".cache" / "jax")}
    proc = subprocess.Popen([sys.executable, "-m", "gptjax.serve", "--weights", str(weights), "--port", str(port),
                             *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # printed once the server listens
        assert f"http://127.0.0.1:{port}" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()
