"""soupkit.zoo.hub against a real http.server on 127.0.0.1 (ephemeral port) that supports Range requests."""
from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from soupkit.errors import DownloadError, IntegrityError
from soupkit.zoo.hub import (MANIFEST_NAME, DownloadConfig, checkpoint_filename, download_file, download_model_soups,
                             read_manifest)

FAST = DownloadConfig(retries=1, backoff_s=0.0, timeout_s=5.0, chunk_bytes=7, progress=False)


class _Files:
    """What the server holds: bytes per path, optional lies about the size, and a request log."""

    def __init__(self) -> None:
        self.content: dict[str, bytes] = {}
        self.announced: dict[str, int] = {}  # Content-Length / Content-Range total to claim instead of the truth
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: dict[str, int] = {}  # send only this many bytes once, then close (a dropped connection)


def _handler(files: _Files) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def do_GET(self) -> None:
            files.requests.append((self.path, self.headers.get("Range")))
            if self.path.startswith("/redirect/"):
                self.send_response(302)
                self.send_header("Location", "/files/" + self.path.split("/", 2)[2])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = files.content.get(self.path)
            if body is None:
                self.send_error(404, "Not Found")
                return
            total = files.announced.get(self.path, len(body))
            rng = self.headers.get("Range")
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            if rng and start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
            self.send_header("Content-Length", str(total - start))
            self.end_headers()
            cut = files.drop_after.pop(self.path, None)
            self.wfile.write(body[start:] if cut is None else body[start:start + cut])
            self.close_connection = True  # a lying Content-Length must not leave the client waiting

    return Handler


@pytest.fixture()
def server():
    files = _Files()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(files))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield files, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _payload(i: int, n: int = 100) -> bytes:
    return bytes((i * 31 + j) % 256 for j in range(n))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_download_all_then_skip_verified(server, tmp_path):
    files, url = server
    for i in range(3):
        files.content[f"/files/{checkpoint_filename(i)}"] = _payload(i)
    cfg = DownloadConfig(**{**FAST.__dict__, "base_url": url + "/files"})
    paths = download_model_soups(tmp_path, num_models=3, config=cfg)
    assert [p.name for p in paths] == ["model_0.pt", "model_1.pt", "model_2.pt"]
    for i, p in enumerate(paths):
        assert p.read_bytes() == _payload(i)
        assert not p.with_name(p.name + ".part").exists()
    manifest = read_manifest(tmp_path)
    assert manifest["model_1.pt"] == {"size": 100, "sha256": _sha(_payload(1)), "url": f"{url}/files/model_1.pt"}

    # a second run, with the recorded hashes as expectations, asks the server for nothing
    files.requests.clear()
    expected = {name: entry["sha256"] for name, entry in manifest.items()}
    download_model_soups(tmp_path, [2, 0], expected_sha256=expected, config=cfg)
    assert files.requests == []


def test_resume_from_partial_part_file_through_redirect(server, tmp_path):
    files, url = server
    data = _payload(7, 1000)
    files.content["/files/model_7.pt"] = data
    (tmp_path / "model_7.pt.part").write_bytes(data[:300])
    out = download_file(f"{url}/redirect/model_7.pt", tmp_path / "model_7.pt",
                        expected_sha256=_sha(data), config=FAST)
    assert out.read_bytes() == data
    # the Range header survives the redirect and asks only for the missing bytes
    assert files.requests[-1] == ("/files/model_7.pt", "bytes=300-")


def test_dropped_connection_is_resumed_within_one_call(server, tmp_path):
    files, url = server
    data = _payload(2, 500)
    files.content["/files/model_2.pt"] = data
    files.drop_after["/files/model_2.pt"] = 123
    download_file(f"{url}/files/model_2.pt", tmp_path / "model_2.pt", expected_sha256=_sha(data), config=FAST)
    assert (tmp_path / "model_2.pt").read_bytes() == data
    assert files.requests == [("/files/model_2.pt", None), ("/files/model_2.pt", "bytes=123-")]


def test_complete_part_and_unlisted_existing_file_are_verified_not_refetched(server, tmp_path):
    files, url = server
    data = _payload(3)
    files.content["/files/model_3.pt"] = data
    (tmp_path / "model_3.pt").write_bytes(data)  # e.g. downloaded by hand: not in the manifest yet
    download_file(f"{url}/files/model_3.pt", tmp_path / "model_3.pt", expected_sha256=_sha(data), config=FAST)
    assert files.requests == [("/files/model_3.pt", "bytes=100-")]  # answered 416: nothing re-sent
    assert read_manifest(tmp_path)["model_3.pt"]["sha256"] == _sha(data)


def test_size_mismatch_raises_naming_file(server, tmp_path):
    files, url = server
    files.content["/files/model_4.pt"] = _payload(4)
    files.announced["/files/model_4.pt"] = 150  # the server promises 50 bytes it never sends
    with pytest.raises(IntegrityError, match=r"model_4\.pt: size mismatch.*100 of 150"):
        download_file(f"{url}/files/model_4.pt", tmp_path / "model_4.pt", config=FAST)
    assert not (tmp_path / "model_4.pt").exists()
    assert len(files.requests) == 2  # bounded: one try plus FAST.retries


def test_hash_mismatch_raises_and_deletes(server, tmp_path):
    files, url = server
    files.content["/files/model_5.pt"] = _payload(5)
    with pytest.raises(IntegrityError, match=r"model_5\.pt: sha256 mismatch"):
        download_file(f"{url}/files/model_5.pt", tmp_path / "model_5.pt", expected_sha256="0" * 64, config=FAST)
    assert not (tmp_path / "model_5.pt").exists() and not (tmp_path / "model_5.pt.part").exists()
    assert MANIFEST_NAME not in os.listdir(tmp_path)


def test_http_error_is_final_and_named(server, tmp_path):
    _, url = server
    with pytest.raises(DownloadError, match=r"model_9\.pt: HTTP 404"):
        download_file(f"{url}/files/model_9.pt", tmp_path / "model_9.pt", config=FAST)


def test_unreachable_server_gives_up_after_bounded_retries(tmp_path):
    import socket
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=r"model_0\.pt: giving up after 2 attempts"):
        download_file(f"http://127.0.0.1:{port}/model_0.pt", tmp_path / "model_0.pt", config=FAST)


def test_corrupt_manifest_is_reported(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DownloadError, match="manifest is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps([1]))
    with pytest.raises(DownloadError, match="JSON object"):
        read_manifest(tmp_path)


def test_checkpoint_filename_rejects_negative():
    assert checkpoint_filename(71) == "model_71.pt"
    with pytest.raises(ValueError):
        checkpoint_filename(-1)


def test_cli_downloads_and_checks_against_another_manifest(server, tmp_path):
    from soupkit.zoo.hub import main
    files, url = server
    for i in range(2):
        files.content[f"/files/model_{i}.pt"] = _payload(i)
    assert main(["--out", str(tmp_path / "a"), "--num-models", "2", "--base-url", url + "/files", "--no-progress"]) == 0
    # a second machine checks its copy against the first machine's manifest
    assert main(["--out", str(tmp_path / "b"), "--indices", "1", "--base-url", url + "/files", "--no-progress",
                 "--expect", str(tmp_path / "a" / MANIFEST_NAME)]) == 0
    files.content["/files/model_0.pt"] = b"tampered"
    with pytest.raises(IntegrityError, match=r"model_0\.pt: sha256 mismatch"):
        main(["--out", str(tmp_path / "c"), "--indices", "0", "--base-url", url + "/files", "--no-progress",
              "--expect", str(tmp_path / "a" / MANIFEST_NAME)])
