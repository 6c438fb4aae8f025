"""Weights from the network: Hugging Face Hub model ids through the Hub's cache, and OpenAI's GPT-2 release
downloaded with resumable HTTP. Only fetches files; reading them is the readers' and name tables' work."""

from __future__ import annotations

import http.client
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm

from gptjax.atomic import made_dirs
from gptjax.tokenizer import TOKENIZER_FILES
from gptjax.weights.files import WEIGHTS_FILES, is_index, one_line, shard_names, shards

CONFIG = "config.json"  # a Hugging Face model's settings, beside its weights
MODEL_TYPES = ("gpt2", "llama", "qwen3")  # GPT-2, Llama 3, Qwen3: the families gptjax's models compute
GPT2_SIZES = ("124M", "355M", "774M", "1558M")
GPT2_FILES = (
    "checkpoint",
    "encoder.json",
    "hparams.json",
    "model.ckpt.data-00000-of-00001",
    "model.ckpt.index",
    "model.ckpt.meta",
    "vocab.bpe",
)
# OpenAI's own location first, then the book's backup copy.
BASE_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/models",
    "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2",
)
# ---------------------------------------------------------------------------------------------
# Model ids on the Hugging Face Hub, through its cache

# GPT-2's short ids now live under openai-community (the Hub redirects); a cache may hold either name.
HUB_ALIASES = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` can be a Hub model id: one of GPT-2's short ids or ``owner/name``."""
    return name in HUB_ALIASES or bool(_HUB_ID.fullmatch(name))


def hub_folder(model_id: str) -> Path:
    """A local folder holding ``model_id``'s config.json and weights: the Hugging Face cache's copy when it
    is complete there (no network needed), else downloaded into the cache (one weights layout, the first of
    :data:`WEIGHTS_FILES` the model has)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    alias = HUB_ALIASES.get(model_id) or next((k for k, v in HUB_ALIASES.items() if v == model_id), None)
    for repo in (model_id, alias) if alias else (model_id,):
        if (folder := _cached(repo)) is not None:
            return folder
    where = f"not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{model_id}: no such file or folder, and {where}; HF_HUB_OFFLINE is set, so it cannot be downloaded "
            "(unset it, or give a local path)"
        )
    try:
        return _download(model_id)
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{model_id}: no such file or folder, nor a model on the Hugging Face Hub (a private or gated one "
            "needs `hf auth login`)"
        ) from None
    except OSError as e:  # no network, a proxy, a server error: huggingface_hub's errors are OSErrors
        raise FileNotFoundError(
            f"{model_id}: no such file or folder, {where}, and the Hub cannot be reached ({one_line(e, 160)}); "
            "download it once with a network, or give a local path"
        ) from None


def _cached(repo: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo, CONFIG)
    if not isinstance(config, str):
        return None
    folder = Path(config).parent  # the snapshot: every cached file of that revision
    name = next((n for n in WEIGHTS_FILES if (folder / n).is_file()), None)
    if name is None:
        return None
    if is_index(folder / name):
        try:
            shards(folder / name)
        except (ValueError, FileNotFoundError):  # an interrupted download: fetch the rest
            return None
    return folder


def _download(repo: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    config = Path(hf_hub_download(repo, CONFIG))
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type not in MODEL_TYPES:  # before any weights are downloaded
        raise ValueError(
            f"{repo}: model_type {model_type!r} in its config.json is not one gptjax reads ({', '.join(MODEL_TYPES)})"
        )
    for name in WEIGHTS_FILES:
        try:
            path = Path(hf_hub_download(repo, name))
        except EntryNotFoundError as e:
            if isinstance(e, LocalEntryNotFoundError):  # not "no such file": the Hub could not be asked
                raise
            continue
        if is_index(path):
            for shard in shard_names(path):
                hf_hub_download(repo, shard)
        if model_type != "gpt2":  # GPT-2's tokenizer is bundled; the others' come with their weights
            for name in TOKENIZER_FILES:
                try:
                    hf_hub_download(repo, name)
                except EntryNotFoundError as e:
                    if isinstance(e, LocalEntryNotFoundError):
                        raise
        return path.parent
    raise ValueError(f"{repo} on the Hugging Face Hub has none of {', '.join(WEIGHTS_FILES)}")


# ---------------------------------------------------------------------------------------------
# Download


def download_gpt2(
    model_size: str,
    models_dir: str | os.PathLike,
    *,
    base_urls: Sequence[str] = BASE_URLS,
    retries: int = 3,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download OpenAI's GPT-2 ``model_size`` into ``models_dir/model_size`` and return that folder.

    Each file comes from the first base URL that serves it, is resumed with an HTTP Range request
    when a transfer breaks off (also across runs: the partial file stays as ``NAME.part``), is checked
    against the server's Content-Length, and appears under its name only when complete (atomic rename),
    so files already there are skipped.
    """
    if model_size not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {model_size!r}; choose one of {', '.join(GPT2_SIZES)}")
    if not base_urls:
        raise ValueError("no base URLs to download from")
    with made_dirs(Path(models_dir) / model_size) as folder:  # removed again if nothing arrives
        for name in GPT2_FILES:
            dest = folder / name
            if dest.is_file():
                continue
            failures = []
            for base in base_urls:
                url = f"{base.rstrip('/')}/{model_size}/{name}"
                try:
                    _fetch(url, dest, retries=retries, timeout=timeout, progress=progress)
                    break
                except _DownloadError as e:
                    failures.append(f"{url} ({e})")
            else:
                raise ValueError(f"could not download {name} of GPT-2 {model_size}: tried " + "; ".join(failures))
    return folder


class _DownloadError(Exception):
    pass


_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+)")


def _fetch(url: str, dest: Path, *, retries: int, timeout: float, progress: bool) -> None:
    """``url`` into ``dest`` by way of ``dest.part``, resuming it across attempts (and runs)."""
    part = dest.with_name(dest.name + ".part")
    total = None  # the size the server announced first: every later answer must agree
    last = "no answer"
    for _ in range(max(1, retries)):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                announced, start = _announced_size(response, have)
                if total is not None and announced is not None and announced != total:
                    part.unlink(missing_ok=True)
                    raise _DownloadError(f"size mismatch: the server first announced {total} bytes, now {announced}")
                total = announced if announced is not None else total
                with open(part, "ab" if start else "wb") as f, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, desc=dest.name, disable=not progress
                ) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the partial file is no prefix of this one: start over
                part.unlink()
                continue
            raise _DownloadError(f"HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            last = one_line(e)
            continue  # broken off: resume from what arrived
        size = part.stat().st_size
        if total is None or size == total:
            os.replace(part, dest)
            return
        if size > total:
            part.unlink()
            raise _DownloadError(f"size mismatch: received {size} bytes, the server announced {total}")
        last = f"the transfer broke off at {size} of {total} bytes"
    raise _DownloadError(f"incomplete after {retries} attempts, last: {last}; run again to resume")


def _announced_size(response: http.client.HTTPResponse, have: int) -> tuple[int | None, int]:
    """(full file size the server announces, offset its body starts at)."""
    if have and response.status == 206:
        m = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != have:
            raise _DownloadError(f"bad Content-Range {response.headers.get('Content-Range')!r} for a resume at {have}")
        return int(m.group(2)), have
    length = response.headers.get("Content-Length")
    return (int(length) if length is not None else None), 0
