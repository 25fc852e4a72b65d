"""`edgerag serve` in its own process on a free loopback port, and a plain HTTP client's request to it:
what the suite's HTTP fuzzing, load and soak sections drive, and what the tests' live_server fixture (tests/conftest.py) starts."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(bundle, *args, python: str = sys.executable):
    """`edgerag serve BUNDLE` in its own process on a free loopback port; yields (url, pid). Its output
    goes to a file (a pipe nobody reads would stall it once full), shown if it fails to start."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen([str(python), "-m", "edgerag.cli", "serve", str(bundle), "--port", str(port),
                                 *map(str, args)], stdout=output, stderr=subprocess.STDOUT, text=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url + "/health", timeout=2)
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        proc.kill()
                        output.seek(0)
                        raise RuntimeError(f"the server did not start: {output.read()[-2000:]}")
                    time.sleep(0.1)
            yield url, proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def request(url: str, body: bytes | dict | None = None, timeout: float = 120) -> tuple[int, dict | None]:
    """(status, JSON body or None) of a POST (body given) or GET."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, None
