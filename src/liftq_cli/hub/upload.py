"""Push a folder and its model card to the Hugging Face Hub, then check what landed.

Steps, each through `huggingface_hub.HfApi` against `$HF_ENDPOINT` (default huggingface.co):
`whoami` (the token works and may write), `repo_info` then `create_repo` (an existing repo is
reused, its visibility untouched), `create_branch` for a `--revision` other than main,
`preupload_lfs_files` (large files to LFS / Xet storage) and `create_commit` (the folder's
files plus the generated README.md in one commit: what `upload_folder` does, without writing
the card into the user's folder), and finally `hf_hub_download` of config.json at the new
commit to check that `quantization_config` survived.

The token comes from HF_TOKEN or the login cache (`hf auth login`); it is passed only to the
client and never printed: error details are scrubbed of it. Every failure becomes one line:
a rejected token or missing rights is bad input (exit 2), a network or Hub failure a resource
error (exit 4) that says whether anything was committed.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from liftq_cli.errors import BadInputError, ResourceError
from liftq_cli.hub.card import BaseInfo
from liftq_cli.hub.errors import TOKEN_PAGE, HubContext, detail, error_chain, stage
from liftq_cli.hub.folder import CARD_FILENAME, FolderInfo, known_license
from liftq_cli.version import __version__

DEFAULT_ENDPOINT = "https://huggingface.co"
_REVISION = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]*$")
_TRUE = {"1", "true", "yes", "on"}


def endpoint() -> str:
    """The Hub to talk to: $HF_ENDPOINT (read now, not at import) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in _TRUE


def check_repo_id(repo_id: str) -> str:
    """`user/name` or `org/name`, as the Hub spells repo ids; one-line error otherwise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise BadInputError(
            f"--repo '{repo_id}' must be namespace/name (your user or org, then the model name)"
        )
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        detail = " ".join(str(exc).split())
        raise BadInputError(f"--repo '{repo_id}' is not a valid repo id ({detail})") from None
    return repo_id


def check_revision(revision: str) -> str:
    bad = not _REVISION.match(revision) or ".." in revision or revision.endswith(("/", ".lock"))
    if bad:
        raise BadInputError(
            f"--revision '{revision}' is not a valid branch name: use letters, digits, . _ - /"
        )
    return revision


def resolve_token() -> tuple[str, str]:
    """(token, where it came from): HF_TOKEN first, then the login cache."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise BadInputError(
            f"no Hugging Face token: set HF_TOKEN to a write token ({TOKEN_PAGE}) or run "
            "`hf auth login`; or check the card first with --dry-run"
        )
    from_env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    return token, "HF_TOKEN" if from_env else "the login cache"


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi

    return HfApi(
        endpoint=endpoint(), token=token, library_name="liftq", library_version=__version__
    )


@contextmanager
def _hub_output(show_progress: bool) -> Iterator[None]:
    """Silence huggingface_hub's progress bars and retry warnings unless on a terminal."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from huggingface_hub.utils import logging as hub_logging

    was_disabled = are_progress_bars_disabled()
    verbosity = hub_logging.get_verbosity()
    if not show_progress:
        disable_progress_bars()
        hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(verbosity)
        if not show_progress and not was_disabled:
            enable_progress_bars()


def describe_base(
    info: FolderInfo,
    base_id: str | None,
    license_override: str | None = None,
    token: str | None = None,
) -> tuple[BaseInfo, list[str]]:
    """The base model's licence and pipeline tag: given, known locally, else its Hub card.

    Returns the facts and warnings (unknown base, unknown licence, lookup failed). The Hub is
    asked only when something is missing and HF_HUB_OFFLINE is not set.
    """
    warnings: list[str] = []
    if base_id is None:
        warnings.append(
            "the base model is unknown (liftq.json names none): pass --base-model owner/name "
            "so the card links it and carries its licence"
        )
        return BaseInfo(None, license_override), warnings
    license_ = license_override or known_license(info, base_id)
    pipeline = None
    if license_ is None and not offline():
        try:
            with _hub_output(False):
                remote = _api(token).model_info(base_id, timeout=20)
            card = remote.card_data
            found = card.get("license") if card is not None else None
            license_ = found if isinstance(found, str) else None
            pipeline = remote.pipeline_tag
        except Exception as exc:  # noqa: BLE001 - any failure only loses the licence line
            cause = next(
                (c for c in error_chain(exc) if getattr(c, "response", None) is not None), exc
            )
            warnings.append(
                f"could not read the card of {base_id} from {endpoint()} "
                f"({type(cause).__name__}: {detail(cause, token)})"
            )
    if license_ is None:
        warnings.append(f"the licence of {base_id} is unknown: pass --license (e.g. apache-2.0)")
    return BaseInfo(base_id, license_, pipeline), warnings


@dataclass
class PushResult:
    """What a successful push did (JSON-ready through `as_json`)."""

    repo_id: str
    url: str
    revision: str
    commit: str
    commit_url: str
    created: bool
    private: bool | None
    user: str
    files: list[dict[str, Any]]
    verified: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": False,
            "repo": self.repo_id,
            "url": self.url,
            "revision": self.revision,
            "commit": self.commit,
            "commit_url": self.commit_url,
            "created": self.created,
            "private": self.private,
            "user": self.user,
            "files": self.files,
            "bytes": sum(f["bytes"] for f in self.files),
            "verified": self.verified,
            "warnings": self.warnings,
        }


def _check_auth(api: Any, ctx: HubContext) -> str:
    with stage("checking the token", ctx):
        me = api.whoami()
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise BadInputError(
            f"the token from {ctx.token_source} is read-only: create a write token at "
            f"{TOKEN_PAGE}; nothing was pushed"
        )
    return str(me.get("name", "?"))


def _verify(api: Any, info: FolderInfo, ctx: HubContext, commit: str) -> dict[str, Any]:
    """Read config.json back at `commit` and compare it with the local one."""
    done = f"commit {commit[:7]} is on {ctx.repo_id}"
    with (
        stage("reading config.json back", ctx, nothing=f"{done} but could not be checked"),
        tempfile.TemporaryDirectory(prefix="liftq-verify-") as tmp,
    ):
        path = api.hf_hub_download(ctx.repo_id, "config.json", revision=commit, cache_dir=tmp)
        remote = json.loads(Path(path).read_text(encoding="utf-8"))
    local_qc = info.quantization_config
    remote_qc = remote.get("quantization_config") if isinstance(remote, dict) else None
    if remote_qc != local_qc:
        state = "is missing" if remote_qc is None else "differs"
        raise ResourceError(
            f"{done}, but its config.json quantization_config {state} on the Hub: "
            "the upload is damaged; re-run `liftq push`"
        )
    if remote != info.config:
        raise ResourceError(
            f"{done}, but config.json read back differs from the local one: re-run `liftq push`"
        )
    summary = None
    if local_qc is not None:
        summary = {k: local_qc.get(k) for k in ("quant_method", "format_version")}
    return {
        "file": "config.json",
        "revision": commit,
        "matches": True,
        "quantization_config": summary,
    }


def push(
    info: FolderInfo,
    card: str,
    repo_id: str,
    token: str,
    token_source: str,
    revision: str = "main",
    private: bool = False,
    message: str | None = None,
    show_progress: bool = False,
    extra: dict[str, bytes] | None = None,
) -> PushResult:
    """Create or reuse `repo_id`, commit the folder, `card` and the generated `extra` files
    ({path in repo: bytes}, e.g. the card's picture), and verify config.json."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.errors import RepositoryNotFoundError

    if offline():
        raise BadInputError(
            "HF_HUB_OFFLINE is set: pushing needs the network; unset it or use --dry-run"
        )
    api = _api(token)
    ctx = HubContext(repo_id, token, token_source, endpoint())
    warnings: list[str] = []
    with _hub_output(show_progress):
        user = _check_auth(api, ctx)
        with stage("looking up the repo", ctx):
            try:
                existing = api.repo_info(repo_id)
                created, visibility = False, existing.private
            except RepositoryNotFoundError:
                existing = None
        if existing is None:
            with stage("creating the repo", ctx):
                api.create_repo(repo_id, private=private, exist_ok=True)
            created, visibility, ctx.created = True, private, True
        elif private and not visibility:
            warnings.append(
                f"{repo_id} already exists and is public: --private does not change it "
                "(change it in the repo settings)"
            )
        if revision != "main":
            with stage(f"creating branch '{revision}'", ctx):
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        with stage("reading the branch head", ctx):
            head = api.repo_info(repo_id, revision=revision).sha
        additions = [
            CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.local))
            for f in info.files
        ]
        additions.append(CommitOperationAdd(CARD_FILENAME, card.encode("utf-8")))
        additions += [CommitOperationAdd(k, v) for k, v in (extra or {}).items()]
        with stage(f"uploading {len(additions)} files", ctx):
            api.preupload_lfs_files(repo_id, additions=additions, revision=revision)
        summary = message or f"Upload {info.folder.name} with liftq {__version__}"
        after = partial(_after_failed_commit, api, ctx, revision, head)  # asked on failure only
        with stage("committing", ctx, nothing=after):
            commit = api.create_commit(
                repo_id, operations=additions, commit_message=summary, revision=revision
            )
        verified = _verify(api, info, ctx, commit.oid)
    base_url = f"{endpoint()}/{repo_id}"
    files = [{"path": f.path_in_repo, "bytes": f.size} for f in info.files]
    files.append({"path": CARD_FILENAME, "bytes": len(card.encode("utf-8"))})
    files += [{"path": k, "bytes": len(v)} for k, v in (extra or {}).items()]
    return PushResult(
        repo_id=repo_id,
        url=base_url if revision == "main" else f"{base_url}/tree/{revision}",
        revision=revision,
        commit=commit.oid,
        commit_url=commit.commit_url,
        created=created,
        private=visibility,
        user=user,
        files=files,
        verified=verified,
        warnings=warnings,
    )


def _after_failed_commit(api: Any, ctx: HubContext, revision: str, head: str | None) -> str:
    """Say whether a failed commit request left anything behind, by re-reading the head."""
    try:
        now = api.repo_info(ctx.repo_id, revision=revision).sha
    except Exception:  # noqa: BLE001 - the Hub is unreachable: say so
        return (
            f"the Hub could not be reached to confirm that nothing was committed: check "
            f"{endpoint()}/{ctx.repo_id}/commits/{revision}"
        )
    if now == head:
        return ctx.nothing_done()
    url = f"{endpoint()}/{ctx.repo_id}/commits/{revision}"
    return f"the branch head moved to {str(now)[:7]}: check {url}"
