"""A local stand-in for the Hugging Face Hub, served on 127.0.0.1 for the push tests.

It implements the endpoints the real `huggingface_hub` client calls (read from its source,
huggingface_hub 2.x): `whoami` (GET /api/whoami-v2), `model_info` / `repo_exists`
(GET /api/models/{repo}[/revision/{rev}]), `create_repo` (POST /api/repos/create),
`create_branch` (POST /api/models/{repo}/branch/{name}), and `create_commit`: README
metadata check (POST /api/validate-yaml), preupload (POST /api/models/{repo}/preupload/{rev}),
the git-LFS batch API (POST /{repo}.git/info/lfs/objects/batch) with a basic PUT upload and a
verify call, and the ndjson commit (POST /api/models/{repo}/commit/{rev}); `hf_hub_download`
(HEAD/GET /{repo}/resolve/{rev}/{path}).

Every call is recorded (`calls`); `fail[kind] = "drop"` closes the connection without an
answer (a network error), an int answers with that HTTP status; `mutate[path]` corrupts a
file as a commit stores it. Repos keep every commit's
files, so a test can tell exactly what was committed. The Xet upload path is not emulated:
tests switch it off (`HF_HUB_DISABLE_XET`), so large files go through git-LFS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024
KNOWN_LICENSES = {"apache-2.0", "mit", "llama3", "llama3.1", "gemma", "other", "cc-by-4.0"}
KNOWN_PIPELINES = {"text-generation", "text2text-generation", "feature-extraction"}
EMPTY_SHA = "0" * 40


@dataclass
class Call:
    method: str
    path: str
    kind: str
    authorization: str | None
    body: bytes = b""


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    messages: dict[str, str] = field(default_factory=dict)  # sha -> commit summary

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, size: int, sample: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE or b"\0" in sample


class FakeHub:
    """The Hub's state plus a threaded HTTP server; use as a context manager."""

    def __init__(self, tokens: dict[str, tuple[str, str]] | None = None) -> None:
        # token -> (user name, role: "write" | "read")
        self.tokens = tokens if tokens is not None else {"hf_test_write": ("alice", "write")}
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.calls: list[Call] = []
        self.fail: dict[str, str | int] = {}
        # path -> function applied to that file's content when a commit stores it (corruption)
        self.mutate: dict[str, Callable[[bytes], bytes]] = {}
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ----------------------------------------------------------------- test helpers
    def add_repo(
        self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False
    ) -> str:
        """Create a repo with one commit holding `files`; returns that commit's sha."""
        repo = Repo(owner=repo_id.split("/")[0], private=private)
        self.repos[repo_id] = repo
        return self._commit(repo, "main", dict(files or {}), "initial commit")

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        sha = repo.resolve(revision)
        assert sha is not None, revision
        return repo.commits[sha]

    def kinds(self) -> list[str]:
        return [call.kind for call in self.calls]

    def _commit(self, repo: Repo, branch: str, files: dict[str, bytes], message: str) -> str:
        parent = repo.branches.get(branch, EMPTY_SHA)
        digest = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(files):
            digest.update(path.encode() + git_sha1(files[path]).encode())
        sha = digest.hexdigest()
        repo.commits[sha] = files
        repo.messages[sha] = message
        repo.branches[branch] = sha
        return sha


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # quiet: the calls are recorded in hub.calls

    # ----------------------------------------------------------------- plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        payload: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> None:
        body = (
            raw if raw is not None else json.dumps(payload).encode() if payload is not None else b""
        )
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if raw is None else "text/plain")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers)

    def _user(self) -> tuple[str | None, str | None, bool]:
        """(user, role, token_valid); a missing token is valid and anonymous."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None, None, True
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.hub.tokens:
            return None, None, False
        user, role = self.hub.tokens[token]
        return user, role, True

    def _route(self) -> tuple[str, dict[str, str]]:
        path = unquote(urlsplit(self.path).path)
        repo = r"(?P<repo>[^/]+/[^/]+?)"
        patterns = [
            ("whoami", "GET", r"/api/whoami-v2"),
            ("repo_info", "GET", rf"/api/models/{repo}(?:/revision/(?P<rev>.+))?"),
            ("create_repo", "POST", r"/api/repos/create"),
            ("validate_yaml", "POST", r"/api/validate-yaml"),
            ("preupload", "POST", rf"/api/models/{repo}/preupload/(?P<rev>.+)"),
            ("commit", "POST", rf"/api/models/{repo}/commit/(?P<rev>.+)"),
            ("create_branch", "POST", rf"/api/models/{repo}/branch/(?P<rev>.+)"),
            ("lfs_batch", "POST", rf"/{repo}\.git/info/lfs/objects/batch"),
            ("lfs_upload", "PUT", r"/lfs/(?P<oid>[0-9a-f]{64})"),
            ("lfs_verify", "POST", r"/lfs/verify"),
            ("resolve", "GET|HEAD", rf"/{repo}/resolve/(?P<rev>[^/]+)/(?P<file>.+)"),
        ]
        for kind, methods, pattern in patterns:
            match = re.fullmatch(pattern, path)
            if match and self.command in methods.split("|"):
                return kind, {k: v for k, v in match.groupdict().items() if v is not None}
        return "unknown", {}

    def _handle(self) -> None:
        kind, args = self._route()
        body = self._body() if self.command in ("POST", "PUT") else b""
        hub = self.hub
        with hub.lock:
            hub.calls.append(
                Call(self.command, self.path, kind, self.headers.get("Authorization"), body)
            )
            failure = hub.fail.get(kind)
        if failure == "drop":
            self.close_connection = True
            return  # no answer at all: the client sees the connection drop
        if isinstance(failure, int):
            self._error(failure, f"injected HTTP {failure} on {kind}")
            return
        user, role, valid = self._user()
        if not valid:
            self._error(401, "Invalid credentials in Authorization header")
            return
        handler = getattr(self, f"_do_{kind}", None)
        if handler is None:
            self._error(404, f"fake hub: no route for {self.command} {self.path}")
            return
        with hub.lock:
            handler(args, body, user, role)

    do_GET = do_POST = do_PUT = do_HEAD = _handle

    # ----------------------------------------------------------------- repo access
    def _repo(self, args: dict[str, str], user: str | None, write: bool = False) -> Repo | None:
        repo = self.hub.repos.get(args["repo"])
        if repo is None or (repo.private and user != repo.owner):
            self._error(404, "Repository not found", "RepoNotFound")
            return None
        if write and user is None:
            self._error(401, "You must be authenticated to write", None)
            return None
        if write and user != repo.owner:
            self._error(403, f"You don't have the rights to write to {args['repo']}")
            return None
        return repo

    def _revision(self, repo: Repo, args: dict[str, str]) -> str | None:
        revision = args.get("rev", "main")
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    # ----------------------------------------------------------------- endpoints
    def _do_whoami(self, args: dict, body: bytes, user: str | None, role: str | None) -> None:
        if user is None:
            self._error(401, "Invalid credentials in Authorization header")
            return
        token = {"displayName": "test token", "role": role}
        self._send(200, {"type": "user", "name": user, "orgs": [], "auth": {"accessToken": token}})

    def _do_repo_info(self, args: dict, body: bytes, user: str | None, role: str | None) -> None:
        repo = self._repo(args, user)
        sha = self._revision(repo, args) if repo else None
        if repo is None or sha is None:
            return
        files = repo.commits[sha]
        card = _front_matter(files.get("README.md", b"").decode(errors="replace"))
        payload = {
            "id": args["repo"],
            "author": repo.owner,
            "sha": sha,
            "private": repo.private,
            "tags": card.get("tags", []),
            "pipeline_tag": card.get("pipeline_tag"),
            "library_name": card.get("library_name"),
            "cardData": card,
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }
        self._send(200, payload)

    def _do_create_repo(self, args: dict, body: bytes, user: str | None, role: str | None) -> None:
        data = json.loads(body or b"{}")
        owner = data.get("organization") or user
        repo_id = f"{owner}/{data['name']}"
        if user is None:
            self._error(401, "You must be authenticated to create a repo")
        elif role != "write" or owner != user:
            self._error(403, f"You don't have the rights to create a model under {owner}")
        elif repo_id in self.hub.repos:
            self._error(409, "You already created this model repo")
        else:
            private = data.get("visibility") == "private" or bool(data.get("private"))
            self.hub.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs\n"}, private)
            self._send(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _do_create_branch(
        self, args: dict, body: bytes, user: str | None, role: str | None
    ) -> None:
        repo = self._repo(args, user, write=True)
        if repo is None:
            return
        if role != "write":
            self._error(403, "read-only token")
        elif args["rev"] in repo.branches:
            self._error(409, f"Reference already exists: refs/heads/{args['rev']}")
        else:
            repo.branches[args["rev"]] = repo.branches["main"]
            self._send(200, {})

    def _do_validate_yaml(
        self, args: dict, body: bytes, user: str | None, role: str | None
    ) -> None:
        content = json.loads(body)["content"]
        errors = _card_errors(content)
        status = 400 if errors else 200
        self._send(status, {"errors": [{"message": e} for e in errors], "warnings": []})

    def _do_preupload(self, args: dict, body: bytes, user: str | None, role: str | None) -> None:
        repo = self._repo(args, user, write=True)
        sha = self._revision(repo, args) if repo else None
        if repo is None or sha is None:
            return
        existing = repo.commits[sha]
        answer = []
        for item in json.loads(body)["files"]:
            sample = base64.b64decode(item["sample"])
            lfs = is_lfs(item["path"], item["size"], sample)
            old = existing.get(item["path"])
            oid = None
            if old is not None:
                oid = hashlib.sha256(old).hexdigest() if lfs else git_sha1(old)
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        self._send(200, {"files": answer, "commitOid": sha})

    def _do_lfs_batch(self, args: dict, body: bytes, user: str | None, role: str | None) -> None:
        if self._repo(args, user, write=True) is None:
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.hub.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.url}/lfs/verify"},
                }
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def _do_lfs_upload(self, args: dict, body: bytes, user: str | None, role: str | None) -> None:
        if hashlib.sha256(body).hexdigest() != args["oid"]:
            self._error(400, "content does not match the oid")
            return
        self.hub.lfs[args["oid"]] = body
        self._send(200, {})

    def _do_lfs_verify(self, args: dict, body: bytes, user: str | None, role: str | None) -> None:
        data = json.loads(body)
        stored = self.hub.lfs.get(data["oid"])
        if stored is None or len(stored) != data["size"]:
            self._error(404, "object not uploaded")
        else:
            self._send(200, {})

    def _do_commit(self, args: dict, body: bytes, user: str | None, role: str | None) -> None:
        repo = self._repo(args, user, write=True)
        sha = self._revision(repo, args) if repo else None
        if repo is None or sha is None:
            return
        if role != "write":
            self._error(403, "read-only token")
            return
        files = dict(repo.commits[sha])
        summary = ""
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                summary = value["summary"]
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                blob = self.hub.lfs.get(value["oid"])
                if blob is None:
                    self._error(422, f"LFS object {value['oid']} of {value['path']} is missing")
                    return
                files[value["path"]] = blob
            elif item["key"] == "deletedFile":
                files.pop(value["path"], None)
        for path, change in self.hub.mutate.items():
            if path in files:
                files[path] = change(files[path])
        new = self.hub._commit(repo, args["rev"], files, summary)
        url = f"{self.hub.url}/{args['repo']}/commit/{new}"
        self._send(200, {"commitUrl": url, "commitOid": new, "pullRequestUrl": None})

    def _do_resolve(self, args: dict, body: bytes, user: str | None, role: str | None) -> None:
        repo = self._repo(args, user)
        sha = self._revision(repo, args) if repo else None
        if repo is None or sha is None:
            return
        data = repo.commits[sha].get(args["file"])
        if data is None:
            self._error(404, "Entry not found", "EntryNotFound")
            return
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_sha1(data)}"'}
        if is_lfs(args["file"], len(data), data[:512]):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        self._send(200, headers=headers, raw=data)


def _front_matter(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if not match:
        return {}
    data = yaml.safe_load(match.group(1))
    return data if isinstance(data, dict) else {}


def _card_errors(text: str) -> list[str]:
    """The metadata checks the Hub applies to a model card that matter for liftq's cards."""
    if not text.startswith("---\n"):
        return []
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if not match:
        return ["metadata block is not closed by ---"]
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"YAML error: {exc}"]
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    if "license" in data and data["license"] not in KNOWN_LICENSES:
        errors.append(f'"license" must be a known license id, got {data["license"]!r}')
    if "pipeline_tag" in data and data["pipeline_tag"] not in KNOWN_PIPELINES:
        errors.append(f'"pipeline_tag" is unknown: {data["pipeline_tag"]!r}')
    tags = data.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        errors.append('"tags" must be a list of strings')
    base = data.get("base_model")
    if base is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(base)):
        errors.append(f'"base_model" must be a hub id, got {base!r}')
    return errors
