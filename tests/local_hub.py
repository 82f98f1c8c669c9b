"""A stand-in for the Hugging Face hub on 127.0.0.1, for testing downloads without a network.

It answers what huggingface_hub's `hf_hub_download` asks (HF_ENDPOINT=`hub.url`):
`HEAD /<org>/<repo>/resolve/<revision>/<file>` with `X-Repo-Commit`, `ETag` (the SHA-256 of the
content for weights, as the hub's LFS files have; a git-style SHA-1 for small files) and
`Content-Length`, then `GET` the same URL (with `Range` for a resumed download). A missing repo
or file gets the hub's 404 with its `X-Error-Code`. Files are served from `root/<org>/<repo>/`.

For failure tests: `requests` counts every request by (method, 'org/repo/file'), `ranged` the
GETs that resume a download; `cut[path] = (n_bytes, times)` drops the next `times` GETs of
`path` after `n_bytes`; `hold.add(path)` stops each GET of `path` half-way until `release()`.
"""

from __future__ import annotations

import collections
import hashlib
import http.server
import os
import sys
import threading

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pth.tar")


class LocalHub:

  def __init__(self, root: str):
    self.root = str(root)
    self.requests: collections.Counter = collections.Counter()
    self.ranged: collections.Counter = collections.Counter()
    self.cut: dict[str, tuple[int, int]] = {}
    self.hold: set[str] = set()
    self._released = threading.Event()
    self._etags: dict[str, tuple[float, str]] = {}
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # Quiet: the tests read `requests` instead.
        pass

      def do_HEAD(self):  # noqa: N802 (the stdlib's naming)
        hub._serve(self, body=False)

      def do_GET(self):  # noqa: N802
        hub._serve(self, body=True)

    class Server(http.server.ThreadingHTTPServer):
      def handle_error(self, request, client_address):  # A client that went away: expected.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
          super().handle_error(request, client_address)

    self._server = Server(("127.0.0.1", 0), Handler)
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self._server.server_port}"

  def __enter__(self) -> "LocalHub":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
    self._server.shutdown()
    self._server.server_close()

  def release(self) -> None:
    self._released.set()

  def count(self, method: str | None = None) -> int:
    return sum(n for (m, _), n in self.requests.items() if method in (None, m))

  def _etag(self, path: str) -> str:
    """sha256 of LFS-like files (what the hub's ETag is for them), else a git-style sha1."""
    mtime = os.path.getmtime(path)
    cached = self._etags.get(path)
    if cached is None or cached[0] != mtime:
      with open(path, "rb") as f:
        data = f.read()
      if path.endswith(LFS_SUFFIXES):
        tag = hashlib.sha256(data).hexdigest()
      else:
        tag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
      self._etags[path] = cached = (mtime, tag)
    return cached[1]

  def _serve(self, handler, *, body: bool) -> None:
    parts = handler.path.split("?")[0].strip("/").split("/")
    if len(parts) < 5 or parts[2] != "resolve":
      return self._error(handler, 404, "RepoNotFound")
    repo, rel = "/".join(parts[:2]), "/".join(parts[4:])
    key = f"{repo}/{rel}"
    self.requests[("GET" if body else "HEAD", key)] += 1
    repo_dir = os.path.join(self.root, repo)
    if not os.path.isdir(repo_dir):
      return self._error(handler, 404, "RepoNotFound")
    path = os.path.join(repo_dir, rel)
    if not os.path.isfile(path):
      return self._error(handler, 404, "EntryNotFound")
    size = os.path.getsize(path)
    start = 0
    ranged = handler.headers.get("Range", "")
    if body and ranged.startswith("bytes="):
      start = int(ranged[len("bytes="):].split("-")[0] or 0)
      self.ranged[key] += 1
    handler.send_response(206 if start else 200)
    handler.send_header("X-Repo-Commit", hashlib.sha1(repo.encode()).hexdigest())
    handler.send_header("ETag", f'"{self._etag(path)}"')
    handler.send_header("Content-Length", str(size - start))
    if start:
      handler.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
    handler.send_header("Accept-Ranges", "bytes")
    handler.end_headers()
    if not body:
      return
    limit, times = self.cut.get(key, (None, 0))
    if times:
      self.cut[key] = (limit, times - 1)
    else:
      limit = None
    sent = 0
    with open(path, "rb") as f:
      f.seek(start)
      while chunk := f.read(1 << 20):
        if limit is not None and sent + len(chunk) > limit:
          handler.wfile.write(chunk[:max(limit - sent, 0)])
          handler.wfile.flush()
          handler.close_connection = True
          handler.connection.shutdown(2)  # The connection drops mid-file.
          return
        handler.wfile.write(chunk)
        sent += len(chunk)
        if key in self.hold and sent >= (size - start) // 2 > sent - len(chunk):
          self._released.wait(timeout=120)

  @staticmethod
  def _error(handler, status: int, code: str) -> None:
    message = f"{code} (local test hub)".encode()
    handler.send_response(status)
    handler.send_header("X-Error-Code", code)
    handler.send_header("Content-Type", "text/plain")
    handler.send_header("Content-Length", str(len(message)))
    handler.end_headers()
    if handler.command != "HEAD":
      handler.wfile.write(message)
