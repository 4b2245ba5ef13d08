"""A minimal Hugging Face Hub-compatible HTTP server for tests (model and dataset repos).

It implements the subset of the Hub API that `huggingface_hub` (HfApi.create_repo / create_commit /
upload_folder / repo_info / list_repo_files, hf_hub_download, HfFileSystem), transformers'
push_to_hub / from_pretrained and datasets' streaming loader use:

    POST     /api/repos/create                                  create a repo (409 if it exists)
    POST     /api/validate-yaml                                 README metadata check (always valid)
    GET      /api/{models,datasets}/{repo}[/revision/{rev}]     repo info: sha, siblings
    GET      /api/{models,datasets}/{repo}/tree/{rev}[/{path}]  listing (?recursive=true for all descendants)
    POST     /api/{models,datasets}/{repo}/paths-info/{rev}     entries of the given paths
    POST     /api/{models,datasets}/{repo}/preupload/{rev}      every file "regular" (no LFS, no Xet)
    POST     /api/{models,datasets}/{repo}/commit/main          NDJSON: header, file (base64), deletedFile/Folder
    GET|HEAD /[datasets/]{repo}/resolve/{rev}/{path}            file with X-Repo-Commit, ETag, Range support

Repo ids are "namespace/name" and the only branch is "main". Every commit is kept as a snapshot
directory named by its commit sha (sha1 of the file tree), so a revision is "main" or any past
commit sha. Errors carry the X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound)
that the client maps to its exceptions. Any token is accepted and paths are not sanitised: this is
for tests on the loopback interface only.
"""

import base64
import hashlib
import json
import re
import shutil
import tempfile
import threading
from pathlib import Path, PurePosixPath

from flask import Flask, jsonify, request, send_file
from werkzeug.serving import make_server

KINDS = {"model": "models", "dataset": "datasets"}  # repo_type -> url segment and storage folder
KIND = "<any(models, datasets):kind>"
REPO = f"/api/{KIND}/<ns>/<name>"


class HubError(Exception):
    """Answered with HTTP `status` and the X-Error-Code header `code` that huggingface_hub maps to its errors."""

    def __init__(self, status: int, code: str, message: str, **headers: str):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _blob_oid(data: bytes) -> str:
    """The git blob id, which the Hub uses as the ETag of regular (non-LFS) files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entries(snapshot: Path) -> dict[str, dict]:
    """Tree entries (as the Hub lists them) of every file and directory of a snapshot, keyed by path."""
    entries = {}
    for file in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        path, data = file.relative_to(snapshot).as_posix(), file.read_bytes()
        entries[path] = {"type": "file", "path": path, "size": len(data), "oid": _blob_oid(data)}
        for parent in map(str, PurePosixPath(path).parents[:-1]):
            oid = hashlib.sha1(parent.encode()).hexdigest()  # not a git tree id: clients only need one
            entries.setdefault(parent, {"type": "directory", "path": parent, "size": 0, "oid": oid})
    return dict(sorted(entries.items()))


def _commit_sha(entries: dict[str, dict]) -> str:
    return hashlib.sha1(json.dumps(entries).encode()).hexdigest()


EMPTY_TREE = _commit_sha({})


def create_app(root: Path) -> Flask:
    """The Hub app storing repo `ns/name` of kind `models`/`datasets` in `root/kind/ns/name/`."""
    app = Flask(__name__)
    lock = threading.Lock()  # serialises commits and repo creation

    def repo_url(kind: str, ns: str, name: str) -> str:
        return f"{request.host_url}{'datasets/' if kind == 'datasets' else ''}{ns}/{name}"

    def snapshot(kind: str, ns: str, name: str, rev: str) -> tuple[str, Path]:
        """(commit sha, snapshot directory) of a revision."""
        repo = root / kind / ns / name
        if not (repo / "main").is_file():
            raise HubError(404, "RepoNotFound", f"Repository {ns}/{name} not found")
        sha = (repo / "main").read_text() if rev == "main" else rev
        if not (re.fullmatch("[0-9a-f]{40}", sha) and (repo / sha).is_dir()):
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        return sha, repo / sha

    @app.errorhandler(HubError)
    def hub_error(e: HubError):
        return jsonify(error=e.message), e.status, {"X-Error-Code": e.code, "X-Error-Message": e.message, **e.headers}

    @app.post("/api/repos/create")
    def create_repo():
        body = request.get_json()
        kind, ns, name = KINDS.get(body.get("type") or "model"), body.get("organization"), body["name"]
        if kind is None or not ns:
            return jsonify(error="only model and dataset repos with a namespace/name id are supported"), 400
        repo = root / kind / ns / name
        with lock:
            if (repo / "main").exists():
                return jsonify(error="You already created this repo", url=repo_url(kind, ns, name)), 409
            (repo / EMPTY_TREE).mkdir(parents=True)
            (repo / "main").write_text(EMPTY_TREE)
        return jsonify(url=repo_url(kind, ns, name))

    @app.post("/api/validate-yaml")
    def validate_yaml():
        return jsonify(errors=[], warnings=[])

    @app.get(REPO)
    @app.get(f"{REPO}/revision/<rev>")
    def repo_info(kind, ns, name, rev="main"):
        sha, snap = snapshot(kind, ns, name, rev)
        files = [e["path"] for e in _entries(snap).values() if e["type"] == "file"]
        return jsonify(id=f"{ns}/{name}", sha=sha, private=False, siblings=[{"rfilename": f} for f in files])

    @app.get(f"{REPO}/tree/<rev>")
    @app.get(f"{REPO}/tree/<rev>/<path:path>")
    def tree(kind, ns, name, rev, path=""):
        entries = _entries(snapshot(kind, ns, name, rev)[1])
        if path and entries.get(path, {}).get("type") != "directory":
            raise HubError(404, "EntryNotFound", f"{path} is not a directory")
        prefix = f"{path}/" if path else ""
        recursive = request.args.get("recursive", "false").lower() == "true"
        return jsonify([e for p, e in entries.items()
                        if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])])

    @app.post(f"{REPO}/paths-info/<rev>")
    def paths_info(kind, ns, name, rev):
        entries = _entries(snapshot(kind, ns, name, rev)[1])
        return jsonify([entries[p] for p in request.form.getlist("paths") if p in entries])

    @app.post(f"{REPO}/preupload/<rev>")
    def preupload(kind, ns, name, rev):
        snapshot(kind, ns, name, rev)
        files = request.get_json()["files"]
        return jsonify(files=[{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files])

    @app.post(f"{REPO}/commit/<rev>")
    def commit(kind, ns, name, rev):
        with lock:
            _, head = snapshot(kind, ns, name, "main")
            if rev != "main":
                raise HubError(404, "RevisionNotFound", f"Can only commit to main, not {rev}")
            with tempfile.TemporaryDirectory(dir=head.parent) as tmp:
                work = Path(shutil.copytree(head, Path(tmp) / "tree"))
                for line in request.get_data().splitlines():
                    op = json.loads(line)
                    key, value = op["key"], op["value"]
                    target = work / value.get("path", "")
                    if key == "file":
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(value["content"]))
                    elif key in ("deletedFile", "deletedFolder"):
                        if not target.exists():
                            message = f"A file with this name doesn't exist: {value['path']}"  # the Hub's wording
                            raise HubError(404, "EntryNotFound", message)
                        if target.is_dir():
                            shutil.rmtree(target)
                        else:
                            target.unlink()
                    elif key != "header":  # lfsFile never comes: preupload answers "regular" for every file
                        return jsonify(error=f"unsupported commit operation {key!r}"), 400
                sha = _commit_sha(_entries(work))
                if not (head.parent / sha).exists():
                    work.rename(head.parent / sha)
            (head.parent / "main").write_text(sha)
        return jsonify(commitUrl=f"{repo_url(kind, ns, name)}/commit/{sha}", commitOid=sha, success=True)

    @app.get("/<ns>/<name>/resolve/<rev>/<path:path>")
    @app.get("/<any(datasets):kind>/<ns>/<name>/resolve/<rev>/<path:path>")
    def resolve(ns, name, rev, path, kind="models"):  # Flask answers HEAD with this view's headers
        sha, snap = snapshot(kind, ns, name, rev)
        file = snap / path
        if not file.is_file():
            raise HubError(404, "EntryNotFound", f"{path} does not exist at {rev}", **{"X-Repo-Commit": sha})
        response = send_file(file, etag=_blob_oid(file.read_bytes()), mimetype="application/octet-stream")
        response.headers["X-Repo-Commit"] = sha
        return response

    return app


class LocalHub:
    """The Hub app on 127.0.0.1 (ephemeral port) in a background thread, repos stored under `root`."""

    def __init__(self, root: str | Path):
        self._server = make_server("127.0.0.1", 0, create_app(Path(root)), threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()

    def __enter__(self) -> "LocalHub":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
