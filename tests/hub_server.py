"""A small, local-only, in-memory Hugging Face Hub server for tests.

It speaks enough of the Hub HTTP API for ``huggingface_hub`` and ``transformers`` to create
repos, commit files (inline "regular" uploads or Git LFS "basic" transfers) and download them
back through ``/resolve``. Point a client at it by setting ``HF_ENDPOINT`` to the URL returned
by :meth:`LocalHub.start` *before* ``huggingface_hub`` is imported.

Only the standard library is used; the server binds to 127.0.0.1 and never opens outgoing
connections. Run it standalone with ``python tests/hub_server.py --port 8123``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

HOST = "127.0.0.1"
DEFAULT_BRANCH = "main"
API_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    b"*.msgpack filter=lfs diff=lfs merge=lfs -text\n"
    b"*.onnx filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    b"*tfevents* filter=lfs diff=lfs merge=lfs -text\n"
)


def _now() -> str:
    """Current UTC time in the Hub's ISO format."""
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _git_blob_sha1(data: bytes) -> str:
    """Git object id of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    """Content of the Git LFS pointer file for an object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class _Blob:
    """A committed file: its bytes and whether it is stored through LFS."""

    data: bytes
    lfs: bool
    sha256: str
    git_oid: str

    @classmethod
    def make(cls, data: bytes, lfs: bool = False) -> _Blob:
        """Build a blob, computing its hashes (git oid of the pointer for LFS files)."""
        sha256 = hashlib.sha256(data).hexdigest()
        oid = _git_blob_sha1(_lfs_pointer(sha256, len(data)) if lfs else data)
        return cls(data=data, lfs=lfs, sha256=sha256, git_oid=oid)

    @property
    def etag(self) -> str:
        """ETag served by ``/resolve``: sha256 for LFS files, git sha1 otherwise."""
        return self.sha256 if self.lfs else self.git_oid


@dataclass
class _Commit:
    """One commit: full snapshot of the repo files."""

    sha: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    """A repository with its commits, refs and uploaded LFS objects."""

    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    prs: dict[int, str] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)


class _HubError(Exception):
    """An HTTP error answered the way the Hub does (X-Error-Code / X-Error-Message)."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers = dict(headers or {})


@dataclass
class _Request:
    """A parsed request, independent of the HTTP handler."""

    method: str
    raw_segments: list[str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    base_url: str

    @property
    def segments(self) -> list[str]:
        """URL-decoded path segments."""
        return [unquote(s) for s in self.raw_segments]

    def flag(self, name: str) -> bool:
        """Whether a boolean query parameter is set."""
        return self.query.get(name, [""])[0].lower() in ("1", "true")

    def json(self) -> dict:
        """Body decoded as a JSON object."""
        try:
            data = json.loads(self.body or b"{}")
        except ValueError as exc:
            raise _HubError(400, f"Invalid JSON body: {exc}") from None
        if not isinstance(data, dict):
            raise _HubError(400, "JSON body must be an object")
        return data


@dataclass
class _Response:
    """Status, headers and body of an answer."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(obj, status: int = 200, content_type: str = "application/json") -> _Response:
    """JSON response."""
    return _Response(status, json.dumps(obj).encode(), {"Content-Type": content_type})


def _card_metadata(readme: bytes) -> dict:
    """Very small reader for ``library_name`` and ``tags`` in a model card's YAML header."""
    text = readme.decode("utf-8", "replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    meta: dict = {"tags": []}
    if not match:
        return meta
    key = None
    for line in match.group(1).splitlines():
        item = re.match(r"^\s*-\s+(.+)$", line)
        if item and key == "tags":
            meta["tags"].append(item.group(1).strip().strip("'\""))
            continue
        pair = re.match(r"^([A-Za-z_][\w-]*):\s*(.*)$", line)
        if pair:
            key, value = pair.group(1), pair.group(2).strip().strip("'\"")
            if key == "library_name" and value:
                meta["library_name"] = value
    return meta


class LocalHub:
    """In-memory Hub server on 127.0.0.1 (see module docstring).

    ``lfs_threshold``: files at least this many bytes are announced as ``"lfs"`` by the preupload
    endpoint (``None``: every file is ``"regular"`` and sent base64-inline in the commit). LFS
    uploads use the Git LFS batch API with "basic" transfers, so clients must run with
    ``HF_HUB_DISABLE_XET=1`` (Xet storage is not implemented). ``max_body_bytes`` bounds the size
    of any request body. ``token``: when set, every request must carry ``Authorization: Bearer
    <token>`` (401 otherwise, as the Hub answers a bad token), except the LFS object transfers,
    whose URLs stand for the Hub's pre-signed storage URLs.
    """

    def __init__(
        self,
        *,
        lfs_threshold: int | None = None,
        max_body_bytes: int = 1 << 30,
        username: str = "user",
        token: str | None = None,
    ):
        self.lfs_threshold = lfs_threshold
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.username = username
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._log: deque[tuple[str, str, int]] = deque(maxlen=10_000)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        self.endpoint: str | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, port: int = 0) -> str:
        """Bind 127.0.0.1:``port`` (0 = any free port), serve in a daemon thread, return the URL."""
        self._bind(port)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self.endpoint

    def serve_forever(self, port: int = 0) -> None:
        """Run the server in the calling thread (used by the command line)."""
        self._bind(port)
        print(self.endpoint, flush=True)
        try:
            self._server.serve_forever()
        finally:
            self._server.server_close()
            self._server = None

    def _bind(self, port: int) -> None:
        if self._server is not None:
            raise RuntimeError("LocalHub already started")
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer((HOST, port), handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://{HOST}:{self._server.server_address[1]}"

    def stop(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def __enter__(self) -> LocalHub:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---------------------------------------------------------------------------- inspection
    def _snapshot(self, repo_id: str, revision: str, repo_type: str) -> _Commit:
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r}")
            try:
                return repo.commits[self._resolve_revision(repo, revision)]
            except _HubError:
                raise KeyError(f"no revision {revision!r} in {repo_id!r}") from None

    def files(
        self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model"
    ) -> dict[str, bytes]:
        """Files of ``repo_id`` at ``revision``, as ``{path: content}``."""
        return {p: b.data for p, b in self._snapshot(repo_id, revision, repo_type).files.items()}

    def lfs_paths(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> set[str]:
        """Paths stored through Git LFS at ``revision``."""
        return {p for p, b in self._snapshot(repo_id, revision, repo_type).files.items() if b.lfs}

    def commits(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> list[dict]:
        """History of ``revision``, newest first, as ``{"sha", "title"}`` dicts."""
        with self._lock:
            commit: _Commit | None = self._snapshot(repo_id, revision, repo_type)
            repo = self._repos[(repo_type, repo_id)]
            out = []
            while commit is not None:
                out.append({"sha": commit.sha, "title": commit.title})
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return out

    @property
    def requests(self) -> list[tuple[str, str, int]]:
        """Log of ``(method, path, status)`` of the requests served so far."""
        with self._lock:
            return list(self._log)

    # ------------------------------------------------------------------------------- helpers
    def _repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve_revision(self, repo: _Repo, revision: str) -> str:
        if revision.startswith("refs/heads/"):
            revision = revision[len("refs/heads/") :]
        if revision in repo.branches:
            return repo.branches[revision]
        pr = re.fullmatch(r"refs/pr/(\d+)", revision)
        if pr and int(pr.group(1)) in repo.prs:
            return repo.prs[int(pr.group(1))]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            found = [sha for sha in repo.commits if sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        raise _HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _new_commit(self, repo: _Repo, parent: str | None, title: str, message: str, files: dict) -> _Commit:
        self._counter += 1
        seed = [parent, title, message, sorted((p, b.git_oid) for p, b in files.items()), self._counter]
        sha = hashlib.sha1(json.dumps(seed).encode()).hexdigest()
        commit = _Commit(sha, parent, title, message, _now(), files)
        repo.commits[sha] = commit
        return commit

    def _repo_url(self, base: str, repo: _Repo) -> str:
        return f"{base}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _last_commit(self, repo: _Repo, sha: str, key: Callable[[_Commit], object]) -> dict:
        """Newest commit (from ``sha`` backwards) that changed ``key(commit)``."""
        commit = repo.commits[sha]
        while commit.parent is not None:
            parent = repo.commits[commit.parent]
            if key(parent) != key(commit):
                break
            commit = parent
        return {"id": commit.sha, "title": commit.title, "date": commit.date}

    def _entry(self, repo: _Repo, sha: str, path: str, expand: bool) -> dict | None:
        """Tree / paths-info entry for ``path`` (file or folder), ``None`` if absent."""
        files = repo.commits[sha].files
        blob = files.get(path)
        if blob is not None:
            entry: dict = {"type": "file", "oid": blob.git_oid, "size": len(blob.data), "path": path}
            if blob.lfs:
                pointer = _lfs_pointer(blob.sha256, len(blob.data))
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(pointer)}
            if expand:
                entry["lastCommit"] = self._last_commit(repo, sha, lambda c: c.files.get(path))
            return entry
        prefix = path.rstrip("/") + "/"

        def children(c: _Commit) -> list:
            return sorted((p, b.git_oid) for p, b in c.files.items() if p.startswith(prefix))

        listing = children(repo.commits[sha])
        if not listing:
            return None
        oid = hashlib.sha1(json.dumps(listing).encode()).hexdigest()
        entry = {"type": "directory", "oid": oid, "size": 0, "path": path.rstrip("/")}
        if expand:
            entry["lastCommit"] = self._last_commit(repo, sha, children)
        return entry

    # ------------------------------------------------------------------------------- routing
    def _route(self, req: _Request) -> _Response:
        seg = req.segments
        if self.token is not None and seg[:1] != ["__lfs"]:
            if req.headers.get("authorization") != f"Bearer {self.token}":
                raise _HubError(401, "Invalid credentials in Authorization header")
        if seg[:1] == ["api"]:
            return self._route_api(req, seg[1:])
        if seg[:1] == ["__lfs"] and len(seg) == 5 and seg[1] in URL_PREFIXES:
            return self._lfs_object(req, self._repo(seg[1], f"{seg[2]}/{seg[3]}"), seg[4])
        repo_type = "model"
        if seg[:1] in (["datasets"], ["spaces"]):
            repo_type, seg = API_TYPES[seg[0]], seg[1:]
        if len(seg) >= 2 and seg[1] == "resolve":
            raise _HubError(404, "Repository not found", "RepoNotFound")  # legacy ids without namespace
        if len(seg) >= 5 and seg[2] == "resolve" and req.method in ("GET", "HEAD"):
            repo = self._repo(repo_type, f"{seg[0]}/{seg[1]}")
            if seg[3] == "refs" and len(seg) >= 7:  # unquoted "refs/pr/1" or "refs/heads/x" revision
                return self._resolve(req, repo, "/".join(seg[3:6]), "/".join(seg[6:]))
            return self._resolve(req, repo, seg[3], "/".join(seg[4:]))
        if len(seg) == 6 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(req, self._repo(repo_type, f"{seg[0]}/{seg[1][:-4]}"))
        raise _HubError(404, f"Not implemented by LocalHub: {req.method} /{'/'.join(req.raw_segments)}")

    def _route_api(self, req: _Request, seg: list[str]) -> _Response:
        m = req.method if req.method != "HEAD" else "GET"
        if seg == ["whoami-v2"] and m == "GET":
            return _json(
                {
                    "type": "user",
                    "name": self.username,
                    "fullname": self.username,
                    "orgs": [],
                    "auth": {
                        "type": "access_token",
                        "accessToken": {"displayName": "local", "role": "write"},
                    },
                }
            )
        if seg == ["agent-harnesses"] and m == "GET":
            return _json({"standardEnvVars": [], "harnesses": {}})
        if seg == ["validate-yaml"] and m == "POST":
            return _json({"errors": [], "warnings": []})
        if seg == ["repos", "create"] and m == "POST":
            return self._create_repo(req)
        if seg == ["repos", "delete"] and m == "DELETE":
            return self._delete_repo(req)
        if len(seg) < 3 or seg[0] not in API_TYPES:
            raise _HubError(404, f"Not implemented by LocalHub: {req.method} /api/{'/'.join(seg)}")
        repo = self._repo(API_TYPES[seg[0]], f"{seg[1]}/{seg[2]}")
        action, args = (seg[3] if len(seg) > 3 else None), seg[4:]
        if action is None and m == "GET":
            return self._info(req, repo, DEFAULT_BRANCH)
        if action == "revision" and len(args) == 1 and m == "GET":
            return self._info(req, repo, args[0])
        if action == "tree" and args and m == "GET":
            return self._tree(req, repo, args[0], "/".join(args[1:]))
        if action == "paths-info" and len(args) == 1 and m == "POST":
            return self._paths_info(req, repo, args[0])
        if action == "preupload" and len(args) == 1 and m == "POST":
            return self._preupload(req, repo, args[0])
        if action == "commit" and len(args) == 1 and m == "POST":
            return self._commit(req, repo, args[0])
        if action == "commits" and len(args) == 1 and m == "GET":
            return self._list_commits(repo, args[0])
        if action == "refs" and not args and m == "GET":
            return self._refs(repo)
        if action == "branch" and args and m in ("POST", "DELETE"):
            return self._branch(req, repo, "/".join(args))
        if action in ("xet-write-token", "xet-read-token"):
            raise _HubError(
                501, "LocalHub does not implement Xet storage; set HF_HUB_DISABLE_XET=1 on the client"
            )
        raise _HubError(404, f"Not implemented by LocalHub: {req.method} /api/{'/'.join(seg)}")

    # ------------------------------------------------------------------------------ handlers
    def _create_repo(self, req: _Request) -> _Response:
        payload = req.json()
        name, org = payload.get("name"), payload.get("organization") or self.username
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise _HubError(400, f"Invalid repo type: {repo_type}")
        if not (isinstance(name, str) and _NAME_RE.match(name) and _NAME_RE.match(str(org))):
            raise _HubError(400, f"Invalid repo name: {org}/{name}")
        repo_id = f"{org}/{name}"
        existing = self._repos.get((repo_type, repo_id))
        if existing is not None:
            url = self._repo_url(req.base_url, existing)
            return _json({"error": f"You already created this {repo_type} repo", "url": url}, status=409)
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo = _Repo(repo_type, repo_id, private, _now())
        initial = self._new_commit(
            repo, None, "initial commit", "", {".gitattributes": _Blob.make(_GITATTRIBUTES)}
        )
        repo.branches[DEFAULT_BRANCH] = initial.sha
        self._repos[(repo_type, repo_id)] = repo
        return _json({"url": self._repo_url(req.base_url, repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, req: _Request) -> _Response:
        payload = req.json()
        repo_id = f"{payload.get('organization') or self.username}/{payload.get('name')}"
        key = (payload.get("type") or "model", repo_id)
        if key not in self._repos:
            raise _HubError(404, "Repository not found", "RepoNotFound")
        del self._repos[key]
        return _json({})

    def _info(self, req: _Request, repo: _Repo, revision: str) -> _Response:
        sha = self._resolve_revision(repo, revision)
        commit = repo.commits[sha]
        blobs = req.flag("blobs")
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict = {"rfilename": path}
            if blobs:
                sibling.update(size=len(blob.data), blobId=blob.git_oid)
                if blob.lfs:
                    pointer = _lfs_pointer(blob.sha256, len(blob.data))
                    sibling["lfs"] = {
                        "size": len(blob.data),
                        "sha256": blob.sha256,
                        "pointerSize": len(pointer),
                    }
            siblings.append(sibling)
        meta = _card_metadata(commit.files["README.md"].data) if "README.md" in commit.files else {"tags": []}
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": sha,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": meta["tags"],
            "siblings": siblings,
            "usedStorage": sum(len(b.data) for b in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            info["library_name"] = meta.get("library_name")
        return _json(info)

    def _resolve(self, req: _Request, repo: _Repo, revision: str, path: str) -> _Response:
        sha = self._resolve_revision(repo, revision)
        blob = repo.commits[sha].files.get(path)
        if blob is None:
            raise _HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        size = len(blob.data)
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob.etag}"',
            "X-Repo-Commit": sha,
            "Accept-Ranges": "bytes",
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(size)})
        range_header = req.headers.get("range")
        if not range_header or req.method == "HEAD":
            return _Response(200, blob.data, headers)
        match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", range_header)
        start = end = None
        if match and (match.group(1) or match.group(2)):
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:
                start, end = max(size - int(match.group(2)), 0), size - 1
        if start is None or end is None or start > end or start >= size:
            raise _HubError(
                416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{size}"}
            )
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        return _Response(206, blob.data[start : end + 1], headers)

    def _tree(self, req: _Request, repo: _Repo, revision: str, path: str) -> _Response:
        sha = self._resolve_revision(repo, revision)
        files = repo.commits[sha].files
        path = path.strip("/")
        prefix = f"{path}/" if path else ""
        if path and not any(p.startswith(prefix) for p in files):
            raise _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": sha})
        recursive, expand = req.flag("recursive"), req.flag("expand")
        paths: set[str] = set()
        for p in files:
            if not p.startswith(prefix):
                continue
            parts = p[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            for i in range(1, depth + 1):
                paths.add(prefix + "/".join(parts[:i]))
        entries = [self._entry(repo, sha, p, expand) for p in sorted(paths)]
        return _json([e for e in entries if e is not None])

    def _paths_info(self, req: _Request, repo: _Repo, revision: str) -> _Response:
        sha = self._resolve_revision(repo, revision)
        if "json" in req.headers.get("content-type", ""):
            payload = req.json()
            paths, expand = payload.get("paths") or [], bool(payload.get("expand"))
        else:
            form = parse_qs(req.body.decode("utf-8", "replace"))
            paths = form.get("paths", [])
            expand = form.get("expand", [""])[0].lower() in ("1", "true")
        paths = [paths] if isinstance(paths, str) else paths
        entries = [self._entry(repo, sha, str(p).strip("/"), expand) for p in paths]
        return _json([e for e in entries if e is not None])

    def _preupload(self, req: _Request, repo: _Repo, revision: str) -> _Response:
        sha = self._resolve_revision(repo, revision)
        files = repo.commits[sha].files
        out = []
        for item in req.json().get("files") or []:
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise _HubError(400, "Malformed preupload payload")
            size = int(item.get("size") or 0)
            lfs = self.lfs_threshold is not None and size > 0 and size >= self.lfs_threshold
            existing = files.get(item["path"])
            oid = None
            if existing is not None:  # same kind of oid the client computes for this upload mode
                oid = existing.sha256 if lfs else _git_blob_sha1(existing.data)
            mode = "lfs" if lfs else "regular"
            out.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": out, "commitOid": sha})

    def _commit(self, req: _Request, repo: _Repo, revision: str) -> _Response:
        try:
            lines = [json.loads(line) for line in req.body.splitlines() if line.strip()]
        except ValueError as exc:
            raise _HubError(400, f"Invalid NDJSON payload: {exc}") from None
        if not lines or not isinstance(lines[0], dict) or lines[0].get("key") != "header":
            raise _HubError(400, "Commit payload must start with a header line")
        header = lines[0].get("value") or {}
        title = str(header.get("summary") or "").strip()
        if not title:
            raise _HubError(400, "Commit summary is required")

        pr_num = None
        if req.flag("create_pr"):
            base = self._resolve_revision(repo, revision)
            pr_num = max(repo.prs, default=0) + 1
        else:
            branch = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
            pr = re.fullmatch(r"refs/pr/(\d+)", branch)
            if pr and int(pr.group(1)) in repo.prs:
                pr_num = int(pr.group(1))
                base = repo.prs[pr_num]
            elif branch in repo.branches:
                base = repo.branches[branch]
            else:
                self._resolve_revision(repo, revision)  # 404 RevisionNotFound if unknown
                raise _HubError(400, f"Cannot commit to {revision}: not a branch")
        parent_commit = header.get("parentCommit")
        if parent_commit and not base.startswith(str(parent_commit)):
            raise _HubError(412, "A commit has happened since. Please refresh and try again.")

        files = dict(repo.commits[base].files)
        for line in lines[1:]:
            self._apply_operation(repo, files, line)
        commit = self._new_commit(repo, base, title, str(header.get("description") or ""), files)
        pr_url = None
        if pr_num is not None:
            repo.prs[pr_num] = commit.sha
            if req.flag("create_pr"):
                pr_url = f"{self._repo_url(req.base_url, repo)}/discussions/{pr_num}"
        else:
            repo.branches[branch] = commit.sha
        commit_url = f"{self._repo_url(req.base_url, repo)}/commit/{commit.sha}"
        return _json(
            {"success": True, "commitOid": commit.sha, "commitUrl": commit_url, "pullRequestUrl": pr_url}
        )

    @staticmethod
    def _check_path(path) -> str:
        if not isinstance(path, str) or not path or path.startswith("/"):
            raise _HubError(400, f"Invalid path: {path!r}")
        parts = path.rstrip("/").split("/")
        if any(p in ("", ".", "..", ".git") for p in parts):
            raise _HubError(400, f"Invalid path: {path!r}")
        return path

    def _apply_operation(self, repo: _Repo, files: dict[str, _Blob], line: dict) -> None:
        key, value = line.get("key"), line.get("value") or {}
        if key == "file":
            path = self._check_path(value.get("path"))
            content = value.get("content") or ""
            if value.get("encoding") == "base64":
                try:
                    data = base64.b64decode(content, validate=True)
                except ValueError:
                    raise _HubError(400, f"Invalid base64 content for {path}") from None
            else:
                data = content.encode()
            files[path] = _Blob.make(data)
        elif key == "lfsFile":
            path = self._check_path(value.get("path"))
            oid = value.get("oid")
            data = repo.lfs.get(oid) if isinstance(oid, str) else None
            if data is None:
                raise _HubError(400, f"LFS object {oid} for {path} was not uploaded")
            if value.get("size") is not None and int(value["size"]) != len(data):
                raise _HubError(400, f"Size mismatch for LFS object {oid}")
            files[path] = _Blob(data, True, oid, _git_blob_sha1(_lfs_pointer(oid, len(data))))
        elif key == "deletedFile":
            path = self._check_path(value.get("path"))
            if files.pop(path, None) is None:
                raise _HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
        elif key == "deletedFolder":
            prefix = self._check_path(value.get("path")).rstrip("/") + "/"
            doomed = [p for p in files if p.startswith(prefix)]
            if not doomed:
                raise _HubError(404, f"A file with this name doesn't exist: {prefix}", "EntryNotFound")
            for p in doomed:
                del files[p]
        else:
            raise _HubError(400, f"Unknown commit operation: {key!r}")

    def _list_commits(self, repo: _Repo, revision: str) -> _Response:
        commit: _Commit | None = repo.commits[self._resolve_revision(repo, revision)]
        out = []
        while commit is not None:
            out.append(
                {
                    "id": commit.sha,
                    "title": commit.title,
                    "message": commit.message,
                    "date": commit.date,
                    "authors": [{"user": self.username}],
                }
            )
            commit = repo.commits.get(commit.parent) if commit.parent else None
        return _json(out)

    def _refs(self, repo: _Repo) -> _Response:
        def ref(name: str, full: str, sha: str) -> dict:
            return {"name": name, "ref": full, "targetCommit": sha}

        return _json(
            {
                "branches": [ref(b, f"refs/heads/{b}", s) for b, s in sorted(repo.branches.items())],
                "converts": [],
                "tags": [],
                "pullRequests": [ref(f"refs/pr/{n}", f"refs/pr/{n}", s) for n, s in sorted(repo.prs.items())],
            }
        )

    def _branch(self, req: _Request, repo: _Repo, branch: str) -> _Response:
        if req.method == "DELETE":
            if branch == DEFAULT_BRANCH or branch not in repo.branches:
                raise _HubError(400 if branch == DEFAULT_BRANCH else 404, f"Cannot delete branch {branch}")
            del repo.branches[branch]
            return _json({})
        if branch in repo.branches:
            raise _HubError(409, f"Reference already exists: refs/heads/{branch}")
        if not all(_NAME_RE.match(part) for part in branch.split("/")):
            raise _HubError(400, f"Invalid branch name: {branch}")
        start = (req.json() if req.body else {}).get("startingPoint") or DEFAULT_BRANCH
        repo.branches[branch] = self._resolve_revision(repo, start)
        return _json({})

    def _lfs_batch(self, req: _Request, repo: _Repo) -> _Response:
        payload = req.json()
        operation = payload.get("operation")
        if operation not in ("upload", "download"):
            raise _HubError(400, f"Unsupported LFS operation: {operation}")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if not (isinstance(oid, str) and _SHA256_RE.match(oid) and isinstance(size, int)):
                raise _HubError(400, "Malformed LFS batch object")
            href = f"{req.base_url}/__lfs/{repo.repo_type}/{repo.repo_id}/{oid}"
            stored = repo.lfs.get(oid)
            entry: dict = {"oid": oid, "size": size, "authenticated": True}
            if operation == "upload" and stored is None:
                entry["actions"] = {"upload": {"href": href, "expires_in": 3600}}
            elif operation == "download" and stored is not None:
                entry["actions"] = {"download": {"href": href, "expires_in": 3600}}
            elif operation == "download":
                entry["error"] = {"code": 404, "message": "Object does not exist"}
            objects.append(entry)
        return _json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_object(self, req: _Request, repo: _Repo, oid: str) -> _Response:
        if req.method == "PUT":
            if hashlib.sha256(req.body).hexdigest() != oid:
                raise _HubError(400, f"Uploaded content does not match sha256 {oid}")
            repo.lfs[oid] = req.body
            return _Response(200, b"", {"ETag": f'"{oid}"'})
        if req.method in ("GET", "HEAD") and oid in repo.lfs:
            return _Response(
                200, repo.lfs[oid], {"Content-Type": "application/octet-stream", "ETag": f'"{oid}"'}
            )
        raise _HubError(404, "LFS object not found", "EntryNotFound")


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 handler delegating to the bound :class:`LocalHub`."""

    hub: LocalHub
    protocol_version = "HTTP/1.1"
    server_version = "LocalHub/1.0"
    timeout = 120  # seconds a connection may stay silent

    def log_message(self, format, *args):
        """Silence the default stderr access log."""

    def _read_body(self) -> bytes:
        limit = self.hub.max_body_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                total += size
                if total > limit:
                    raise _HubError(413, "Request body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(1024)
        length = int(self.headers.get("Content-Length") or 0)
        if length > limit:
            raise _HubError(413, "Request body too large")
        return self.rfile.read(length) if length > 0 else b""

    def _handle(self) -> None:
        url = urlsplit(self.path)
        host = self.headers.get("Host") or f"{HOST}:{self.server.server_address[1]}"
        try:
            body = self._read_body()
        except (_HubError, ValueError) as exc:
            self.close_connection = True
            resp = self._error(exc if isinstance(exc, _HubError) else _HubError(400, "Malformed body"))
        else:
            req = _Request(
                method=self.command,
                raw_segments=[s for s in url.path.split("/") if s],
                query=parse_qs(url.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                base_url=f"http://{host}",
            )
            try:
                with self.hub._lock:
                    resp = self.hub._route(req)
            except _HubError as exc:
                resp = self._error(exc)
            except Exception as exc:  # pragma: no cover - server bug: report instead of hanging
                resp = self._error(_HubError(500, f"LocalHub internal error: {type(exc).__name__}: {exc}"))
        with self.hub._lock:
            self.hub._log.append((self.command, self.path, resp.status))
        self.send_response(resp.status)
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if self.command != "HEAD" and resp.body:
            self.wfile.write(resp.body)

    @staticmethod
    def _error(exc: _HubError) -> _Response:
        message = exc.message.encode("ascii", "replace").decode()
        resp = _json({"error": exc.message}, status=exc.status)
        resp.headers["X-Error-Message"] = message
        if exc.code:
            resp.headers["X-Error-Code"] = exc.code
        resp.headers.update(exc.headers)
        return resp

    def handle_one_request(self):
        """Serve one request, treating a dropped client as a closed connection."""
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--lfs-threshold", type=int, default=None, help="announce files >= N bytes as LFS")
    parser.add_argument("--token", default=None, help="require 'Authorization: Bearer TOKEN' on every request")
    args = parser.parse_args(argv)
    try:
        LocalHub(lfs_threshold=args.lfs_threshold, token=args.token).serve_forever(args.port)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
