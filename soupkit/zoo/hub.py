"""Download the model-soups checkpoints (``model_{i}.pt``) with resume, size and hash checks.

Only ``urllib`` is used. Each file is streamed into ``<name>.part``; an interrupted download resumes with an
HTTP ``Range`` request, the byte count is checked against ``Content-Length``/``Content-Range``, the sha256
is computed (and compared when expected hashes are given), and the file is renamed into place only when
complete. A JSON manifest next to the files records size and sha256 of every verified file, so a later run
skips them without re-hashing (or re-hashes with ``verify_existing=True``) and can compare hashes across
machines.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tqdm.auto import tqdm

from soupkit.errors import DownloadError, IntegrityError
from soupkit.io import atomic_write_json, sha256_file

__all__ = [
    "RELEASE_URL", "RELEASE_NUM_MODELS", "MANIFEST_NAME", "DownloadConfig", 
    "checkpoint_filename", "read_manifest", "download_file", "download_model_soups", "main",
]

RELEASE_URL = "https://github.com/mlfoundations/model-soups/releases/download/v0.0.2"
RELEASE_NUM_MODELS = 72  # model_0 (the linear-probe initialisation) .. model_71 in release v0.0.2
MANIFEST_NAME = "manifest.json"

# Statuses worth another try: the server or a proxy may recover; every other 4xx is final.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class DownloadConfig:
    """How files are fetched. ``retries`` counts extra attempts per file after the first one."""

    base_url: str = RELEASE_URL
    retries: int = 3
    backoff_s: float = 2.0  # wait backoff_s * 2**attempt between attempts
    timeout_s: float = 60.0  # socket timeout of one request
    chunk_bytes: int = 1 << 20
    progress: bool = True
    verify_existing: bool = False  # re-hash files the manifest already lists as verified


class _Retryable(Exception):
    """Internal: a transient failure; the ``.part`` file is kept and the next attempt resumes from it."""


def checkpoint_filename(index: int) -> str:
    """File name of model-soups checkpoint ``index`` (``model_{index}.pt``)."""
    if index < 0:
        raise ValueError(f"checkpoint index must be >= 0, got {index}")
    return f"model_{index}.pt"


def read_manifest(directory: str | os.PathLike) -> dict[str, dict]:
    """``{file name: {"size": int, "sha256": str, "url": str}}`` from ``directory/manifest.json`` ({} if absent)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DownloadError(f"{path}: manifest is not valid JSON ({err}); delete it to re-verify the files") from err
    if not isinstance(data, dict):
        raise DownloadError(f"{path}: manifest must hold a JSON object")
    return data


def _record(directory: Path, name: str, entry: dict) -> None:
    # read-modify-write through a temp file so an interrupted run never leaves a truncated manifest
    manifest = read_manifest(directory)
    manifest[name] = entry
    atomic_write_json(directory / MANIFEST_NAME, manifest)


def _is_verified(dest: Path, entry: dict | None, expected: str | None, config: DownloadConfig) -> bool:
    if entry is None or not dest.is_file() or dest.stat().st_size != entry.get("size"):
        return False
    if expected is not None and entry.get("sha256") != expected.lower():
        return False
    if config.verify_existing:
        return sha256_file(dest, config.chunk_bytes) == entry.get("sha256")
    return True


def _total_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """Full file size announced by the server for a response that starts at byte ``offset``."""
    content_range = response.headers.get("Content-Range")  # "bytes start-end/total"
    if response.status == 206 and content_range and "/" in content_range:
        total = content_range.rsplit("/", 1)[1].strip()
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    if length is None or not length.strip().isdigit():
        return None
    return int(length) + (offset if response.status == 206 else 0)


def _fetch_once(url: str, part: Path, config: DownloadConfig, label: str) -> int | None:
    """One attempt: append to ``part`` from its current size. Returns the announced total size (or None)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=config.timeout_s)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            # nothing left to send: the .part already holds the whole file (Content-Range: bytes */total)
            total = err.headers.get("Content-Range", "").rsplit("/", 1)[-1].strip()
            return int(total) if total.isdigit() else offset
        if err.code in _RETRY_STATUS:
            raise _Retryable(f"HTTP {err.code} {err.reason}") from err
        raise DownloadError(f"{label}: HTTP {err.code} {err.reason} for {url}") from err
    except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
        raise _Retryable(f"{type(err).__name__}: {getattr(err, 'reason', err)}") from err

    with response:
        if offset and response.status != 206:
            offset = 0  # the server ignored Range and sends the whole file: start the .part again
        total = _total_size(response, offset)
        mode = "ab" if offset else "wb"
        with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                          unit_divisor=1024, desc=label, disable=not config.progress,
                                          leave=False) as bar:
            while True:
                try:
                    block = response.read(config.chunk_bytes)
                except (http.client.HTTPException, OSError) as err:  # only network errors: a full disk is final
                    raise _Retryable(f"connection lost ({type(err).__name__}: {err})") from err
                if not block:
                    break
                fh.write(block)
                bar.update(len(block))
    return total


def download_file(url: str, dest: str | os.PathLike, *, expected_sha256: str | None = None,
                  config: DownloadConfig = DownloadConfig()) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, and record it in the manifest.

    Args:
        url: source URL (http/https; redirects are followed and keep the Range header).
        dest: final path; its folder holds the manifest.
        expected_sha256: hex digest the file must have, or None to only record the computed digest.
        config: retries, timeouts, progress bar.

    Returns:
        ``dest`` as a Path, complete and verified.

    Raises:
        DownloadError: an HTTP error that is not transient, or retries exhausted.
        IntegrityError: size or sha256 mismatch (the bad ``.part`` is deleted so the next run starts afresh).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    name = dest.name
    if _is_verified(dest, read_manifest(dest.parent).get(name), expected_sha256, config):
        return dest
    part = dest.with_name(name + ".part")
    if dest.exists():
        # a file not (or no longer) matching the manifest: let the Range logic check and complete it
        os.replace(dest, part)

    total: int | None = None
    for attempt in range(config.retries + 1):
        try:
            total = _fetch_once(url, part, config, name)
        except _Retryable as err:
            if attempt == config.retries:
                raise DownloadError(f"{name}: giving up after {attempt + 1} attempts ({err}) for {url}; "
                                    f"the partial file {part} is kept and will be resumed") from err
            time.sleep(config.backoff_s * 2 ** attempt)
            continue
        size = part.stat().st_size if part.exists() else 0
        if total is None or size == total:
            break
        if size > total:
            part.unlink()
            raise IntegrityError(f"{name}: size mismatch, received {size} bytes but the server announced "
                                 f"{total} (from {url}); the partial file was deleted")
        if attempt == config.retries:
            raise IntegrityError(f"{name}: size mismatch, received {size} of {total} bytes after "
                                 f"{attempt + 1} attempts (from {url}); the partial file {part} is kept")
        time.sleep(config.backoff_s * 2 ** attempt)  # short body: resume from where it stopped

    digest = sha256_file(part, config.chunk_bytes)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        part.unlink()
        raise IntegrityError(f"{name}: sha256 mismatch, expected {expected_sha256.lower()} got {digest} "
                             f"(from {url}); the file was deleted")
    os.replace(part, dest)
    _record(dest.parent, name, {"size": dest.stat().st_size, "sha256": digest, "url": url})
    return dest


def download_model_soups(out_dir: str | os.PathLike, indices: Iterable[int] | None = None, *,
                         num_models: int = RELEASE_NUM_MODELS,
                         expected_sha256: Mapping[str, str] | None = None,
                         config: DownloadConfig = DownloadConfig()) -> list[Path]:
    """Download ``model_{i}.pt`` for ``i`` in ``indices`` (default ``range(num_models)``) into ``out_dir``.

    Args:
        out_dir: target folder (created); ``manifest.json`` there records verified files.
        indices: which checkpoints; default all ``num_models`` of the release (72 for v0.0.2).
        num_models: count used when ``indices`` is None.
        expected_sha256: optional ``{file name: hex sha256}``, e.g. the manifest of an earlier run.
        config: base URL, retries, progress.

    Returns:
        Paths of the verified files, in the order of ``indices``.
    """
    out = Path(out_dir)
    chosen = list(range(num_models) if indices is None else indices)
    expected = dict(expected_sha256 or {})
    paths = []
    for index in tqdm(chosen, desc="model-soups checkpoints", unit="file", disable=not config.progress):
        name = checkpoint_filename(index)
        url = f"{config.base_url.rstrip('/')}/{name}"
        paths.append(download_file(url, out / name, expected_sha256=expected.get(name), config=config))
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m soupkit.zoo.hub --out checkpoints/model-soups [--indices 0 5 7] [--expect manifest.json]``."""
    p = argparse.ArgumentParser(prog="python -m soupkit.zoo.hub", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for model_{i}.pt and manifest.json")
    p.add_argument("--indices", type=int, nargs="+", help="which checkpoints (default: all --num-models)")
    p.add_argument("--num-models", type=int, default=RELEASE_NUM_MODELS)
    p.add_argument("--base-url", default=RELEASE_URL)
    p.add_argument("--expect", help="JSON of expected sha256s, e.g. a manifest.json from another machine")
    p.add_argument("--retries", type=int, default=DownloadConfig.retries)
    p.add_argument("--verify-existing", action="store_true", help="re-hash files already verified")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    expected = None
    if a.expect:  # {file name: sha256} or a manifest ({file name: {"sha256": ...}})
        data = json.loads(Path(a.expect).read_text())
        expected = {name: v["sha256"] if isinstance(v, dict) else str(v) for name, v in data.items()}
    config = DownloadConfig(base_url=a.base_url, retries=a.retries, progress=not a.no_progress,
                            verify_existing=a.verify_existing)
    paths = download_model_soups(a.out, a.indices, num_models=a.num_models, expected_sha256=expected, config=config)
    print(f"{len(paths)} checkpoint(s) verified in {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
