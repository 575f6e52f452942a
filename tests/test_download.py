"""End-to-end tests of scripts/download.sh against a local HTTP server that plays Meta's
presigned download URL: it ignores the query string, honours Range requests (416 past the
end, like S3/CloudFront) and can answer 403 or an HTML page instead. Each runs with wget and curl."""

import hashlib
import http.server
import os
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "download.sh"
SHARD = "llama-2-7b/consolidated.00.pth"
FILES = {
    "LICENSE": b"Fake license for tests.\n",
    "USE_POLICY.md": b"# Fake use policy\n",
    "tokenizer.model": bytes(range(256)) * 8,
    "llama-2-7b/params.json": b'{"dim": 64, "n_layers": 2, "n_heads": 4}\n',
    SHARD: bytes((i * 31 + i // 256) % 256 for i in range(64_000)),
}
HTML_PAGE = b"<!DOCTYPE html>\n<html><body>Please log in to continue.</body></html>\n"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    """Write FILES plus Meta-style md5 checklists for them under root."""
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "tokenizer_checklist.chk").write_text(f"{md5(files['tokenizer.model'])}  tokenizer.model\n")
    folder = [name for name in files if name.startswith("llama-2-7b/")]
    lines = "".join(f"{md5(files[n])}  {n.split('/', 1)[1]}\n" for n in sorted(folder))
    (root / "llama-2-7b" / "checklist.chk").write_text(lines)


class Server:
    """A threaded HTTP server on 127.0.0.1 serving `root`; `mode` is "files", "no ranges" (whole files
    whatever the Range), "403" or "html"."""

    def __init__(self, root: Path):
        self.root, self.mode, self.requests = root, "files", []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if server.mode == "403":
                    return self.reply(403, b"<Error>AccessDenied</Error>", "application/xml")
                if server.mode == "html":
                    return self.reply(200, HTML_PAGE, "text/html; charset=utf-8")
                file = server.root / unquote(urlsplit(self.path).path).lstrip("/")
                if not file.is_file():
                    return self.reply(404, b"not found", "text/plain")
                data = file.read_bytes()
                ranged = self.headers["Range"] and server.mode != "no ranges"
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if ranged else 0
                if start >= len(data) > 0:
                    return self.reply(416, b"", "application/xml", {"Content-Range": f"bytes */{len(data)}"})
                if start:
                    headers = {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
                    return self.reply(206, data[start:], "binary/octet-stream", headers)
                self.reply(200, data, "binary/octet-stream")

            def reply(self, code: int, body: bytes, ctype: str, headers: dict[str, str] | None = None):
                self.send_response(code)
                for key, value in {"Content-Type": ctype, "Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Like Meta's links: '*' is replaced by the file path, the signed query string must stay.
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/*?Policy=p&Signature=x&Key-Pair-Id=k"


@pytest.fixture(params=["wget", "curl"])
def downloader(request) -> str:
    if shutil.which(request.param) is None:
        pytest.skip(f"{request.param} is not installed")
    return request.param


@pytest.fixture
def server(tmp_path):
    write_tree(tmp_path / "served", FILES)
    srv = Server(tmp_path / "served")
    thread = threading.Thread(target=srv.httpd.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def run(tmp_path: Path, downloader: str, *args: str, env: dict[str, str] | None = None):
    """Run download.sh with stdin closed, no proxies and no user config, within a timeout."""
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and not k.startswith("LLAMA_")}
    base |= {"HOME": str(tmp_path), "LLAMA_DOWNLOADER": downloader, **(env or {})}
    return subprocess.run(
        [str(SCRIPT), *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, env=base, timeout=60
    )


def download(tmp_path: Path, downloader: str, server: Server):
    target = tmp_path / "weights"
    return target, run(tmp_path, downloader, "--url", server.url, "--models", "7B", "--target-dir", str(target))


def test_full_download_is_identical_and_rerun_succeeds(tmp_path, downloader, server):
    target, result = download(tmp_path, downloader, server)
    assert result.returncode == 0, result.stderr
    served = sorted(p.relative_to(server.root) for p in server.root.rglob("*") if p.is_file())
    got = sorted(p.relative_to(target) for p in target.rglob("*") if p.is_file())
    assert got == served
    for name in served:
        assert (target / name).read_bytes() == (server.root / name).read_bytes(), name
    assert all("Signature=x" in path and "Key-Pair-Id=k" in path for path, _ in server.requests)

    again = run(tmp_path, downloader, "--url", server.url, "--models", "7b", "--target-dir", str(target))
    assert again.returncode == 0, again.stderr
    assert (target / SHARD).read_bytes() == FILES[SHARD]


def test_partial_download_resumes(tmp_path, downloader, server):
    half = len(FILES[SHARD]) // 2
    (tmp_path / "weights" / "llama-2-7b").mkdir(parents=True)
    (tmp_path / "weights" / SHARD).write_bytes(FILES[SHARD][:half])
    target, result = download(tmp_path, downloader, server)
    assert result.returncode == 0, result.stderr
    assert (target / SHARD).read_bytes() == FILES[SHARD]
    assert (f"/{SHARD}?Policy=p&Signature=x&Key-Pair-Id=k", f"bytes={half}-") in server.requests


def test_a_server_that_ignores_range_restarts_the_file(tmp_path, downloader, server):
    """Resuming fails the same way every time there: the partial file is started over instead."""
    server.mode = "no ranges"
    (tmp_path / "weights" / "llama-2-7b").mkdir(parents=True)
    (tmp_path / "weights" / SHARD).write_bytes(FILES[SHARD][:1000])
    target, result = download(tmp_path, downloader, server)
    assert result.returncode == 0, result.stderr
    assert (target / SHARD).read_bytes() == FILES[SHARD]


def test_corrupt_file_fails_naming_it(tmp_path, downloader, server):
    (server.root / SHARD).write_bytes(b"not the weights the checklist describes")
    _, result = download(tmp_path, downloader, server)
    assert result.returncode != 0
    assert "consolidated.00.pth" in result.stderr
    assert "Delete" in result.stderr and "re-run" in result.stderr


def test_expired_link_says_so(tmp_path, downloader, server):
    server.mode = "403"
    target, result = download(tmp_path, downloader, server)
    assert result.returncode != 0
    assert "403" in result.stderr and "expired" in result.stderr
    assert "https://llama.meta.com/llama-downloads/" in result.stderr
    assert not [p for p in target.rglob("*") if p.is_file()]


def test_html_page_says_so_and_is_not_kept(tmp_path, downloader, server):
    server.mode = "html"
    target, result = download(tmp_path, downloader, server)
    assert result.returncode != 0
    assert "web page (HTML)" in result.stderr
    assert "https://llama.meta.com/llama-downloads/" in result.stderr
    assert not [p for p in target.rglob("*") if p.is_file()]


def test_environment_variables_and_no_terminal(tmp_path, downloader, server):
    target = tmp_path / "from-env"
    env = {"LLAMA_URL": server.url, "LLAMA_MODELS": "7B", "LLAMA_TARGET_DIR": str(target)}
    result = run(tmp_path, downloader, env=env)
    assert result.returncode == 0, result.stderr
    assert (target / SHARD).read_bytes() == FILES[SHARD]

    missing = run(tmp_path, downloader, "--models", "7B")  # no URL and nothing to prompt on
    assert missing.returncode != 0 and "--url" in missing.stderr


def test_unknown_model_is_named(tmp_path, downloader):
    result = run(tmp_path, downloader, "--url", "http://127.0.0.1:9/*?Signature=x", "--models", "7B,8B")
    assert result.returncode != 0
    assert "'8B'" in result.stderr and "7B-chat" in result.stderr


def test_a_target_dir_that_is_a_file_is_named(tmp_path, downloader):
    (tmp_path / "afile").write_text("")
    url = ("--url", "http://127.0.0.1:9/*?Signature=x", "--models", "7B")
    result = run(tmp_path, downloader, *url, "--target-dir", str(tmp_path / "afile"))
    assert result.returncode != 0 and "afile is a file, not a folder" in result.stderr


def test_help():
    result = subprocess.run([SCRIPT, "--help"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0 and "--target-dir" in result.stdout


def test_without_wget_or_curl_says_so(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "tr"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(
        [str(bin_dir / "bash"), str(SCRIPT), "--url", "http://127.0.0.1:9/*", "--models", "7B"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir)},
        timeout=10,
    )
    assert result.returncode != 0 and "neither wget nor curl is installed" in result.stderr
