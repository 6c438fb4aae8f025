"""download_gpt2 against a local HTTP server (Range support, broken transfers, lying servers, mirrors)."""

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from gptjax.cli.download import main as download_main
from gptjax.weights.hub import GPT2_FILES, download_gpt2

FILES = {name: np.random.default_rng(i).bytes(1000 + 137 * i) for i, name in enumerate(GPT2_FILES)}


class Handler(BaseHTTPRequestHandler):
    """Serves FILES under /<mode>/124M/<name>. Modes: ok; missing (404); cut (each file's first answer
    breaks off halfway); short (every answer breaks off halfway); liar (the first answer announces 10 bytes
    too many, then breaks off)."""

    requests: list = []
    first_seen: set = set()

    def do_GET(self):
        m = re.fullmatch(r"/(\w+)/124M/([\w.-]+)", self.path)
        mode, name = (m.group(1), m.group(2)) if m else ("missing", "")
        rng = self.headers.get("Range")
        type(self).requests.append((self.path, rng))
        if mode == "missing" or name not in FILES:
            self.send_error(404)
            return
        body = FILES[name]
        first = (mode, name) not in self.first_seen
        self.first_seen.add((mode, name))
        start = int(re.fullmatch(r"bytes=(\d+)-", rng).group(1)) if rng else 0
        if start:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        announced = len(body) + (10 if mode == "liar" and first else 0)
        self.send_header("Content-Length", str(announced - start))
        self.end_headers()
        part = body[start:]
        if mode == "short" or (first and mode in ("cut", "liar")):
            part = part[: len(part) // 2]
        self.wfile.write(part)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def fresh_log():
    Handler.requests.clear()
    Handler.first_seen.clear()


def assert_complete(folder):
    assert sorted(p.name for p in folder.iterdir()) == sorted(GPT2_FILES)
    for name, body in FILES.items():
        assert (folder / name).read_bytes() == body, name


def test_download_and_skip_complete_files(server, tmp_path):
    folder = download_gpt2("124M", tmp_path, base_urls=[f"{server}/ok"], progress=False)
    assert folder == tmp_path / "124M"
    assert_complete(folder)
    assert len(Handler.requests) == len(GPT2_FILES)
    Handler.requests.clear()
    download_gpt2("124M", tmp_path, base_urls=[f"{server}/ok"], progress=False)
    assert Handler.requests == []


def test_broken_transfer_resumes_with_range(server, tmp_path):
    download_gpt2("124M", tmp_path, base_urls=[f"{server}/cut"], progress=False)
    assert_complete(tmp_path / "124M")
    for name, body in FILES.items():
        asked = [rng for path, rng in Handler.requests if path.endswith("/" + name)]
        assert asked == [None, f"bytes={len(body) // 2}-"], name


def test_partial_file_from_an_earlier_run_resumes(server, tmp_path):
    folder = tmp_path / "124M"
    folder.mkdir()
    name = "model.ckpt.index"
    (folder / (name + ".part")).write_bytes(FILES[name][:300])
    download_gpt2("124M", tmp_path, base_urls=[f"{server}/ok"], progress=False)
    assert_complete(folder)
    assert (f"/ok/124M/{name}", "bytes=300-") in Handler.requests


def test_size_mismatch_fails_and_leaves_no_file(server, tmp_path):
    with pytest.raises(ValueError, match=r"could not download checkpoint of GPT-2 124M: tried "
                                         r"http://127\.0\.0\.1:\d+/liar/124M/checkpoint \(size mismatch"):
        download_gpt2("124M", tmp_path, base_urls=[f"{server}/liar"], progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing fetched: the folder it made is gone again


def test_failed_download_removes_only_the_empty_folders_it_made(server, tmp_path):
    with pytest.raises(ValueError, match="could not download checkpoint"):
        download_gpt2("124M", tmp_path / "models" / "gpt2", base_urls=[f"{server}/missing"], progress=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "gpt2" / "124M").mkdir(parents=True)  # the user's own folder stays, even empty
    with pytest.raises(ValueError, match="could not download checkpoint"):
        download_gpt2("124M", tmp_path / "gpt2", base_urls=[f"{server}/missing"], progress=False)
    assert (tmp_path / "gpt2" / "124M").is_dir()
    with pytest.raises(ValueError, match="could not download"):  # a partial file stays, for resuming
        download_gpt2("124M", tmp_path / "new", base_urls=[f"{server}/short"], progress=False)
    assert [p.name for p in (tmp_path / "new" / "124M").iterdir()] == ["checkpoint.part"]


def test_transfer_that_keeps_breaking_off_fails_but_keeps_the_part(server, tmp_path):
    with pytest.raises(ValueError, match=r"short/124M/checkpoint \(incomplete after 3 attempts, last: the transfer "
                                         r"broke off at 875 of 1000 bytes; run again to resume\)"):
        download_gpt2("124M", tmp_path, base_urls=[f"{server}/short"], progress=False)
    assert [p.name for p in (tmp_path / "124M").iterdir()] == ["checkpoint.part"]


def test_falls_back_to_the_next_base_url(server, tmp_path):
    download_gpt2("124M", tmp_path, base_urls=[f"{server}/missing", f"{server}/ok"], progress=False)
    assert_complete(tmp_path / "124M")
    assert [p for p, _ in Handler.requests[:2]] == ["/missing/124M/checkpoint", "/ok/124M/checkpoint"]


def test_cli(server, tmp_path, capsys):
    assert download_main(["--model-size", "124M", "--models-dir", str(tmp_path), "--base-urls", f"{server}/ok"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "124M")
    assert_complete(tmp_path / "124M")
    assert download_main(["--model-size", "355M", "--models-dir", str(tmp_path), "--base-urls", f"{server}/ok"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download checkpoint of GPT-2 355M") and "/ok/355M/checkpoint (HTTP 404" in err
    assert not (tmp_path / "355M").exists()
    assert download_main(["--model-size", "124M", "--retries", "0"]) == 2
    assert capsys.readouterr().err == "error: --retries must be at least 1, got 0\n"
    with pytest.raises(SystemExit):
        download_main(["--model-size", "7B"])
