"""Turn failures of the huggingface_hub client into liftq's one-line errors.

`hub_error` walks the exception chain (huggingface_hub wraps LFS failures in RuntimeError,
transport errors come from its HTTP stack): a 401 or 403 is bad input (exit 2, fix the
token or the namespace), a revision that does not exist too, any other HTTP status or a
network failure a resource error (exit 4). Each message names the step that failed and says
what was (not) committed; the token is scrubbed from any server text that is quoted.
`stage` wraps one hub call in that mapping: `with stage("committing", ctx): ...`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from liftq_cli.errors import BadInputError, LiftqError, ResourceError

TOKEN_PAGE = "https://huggingface.co/settings/tokens"


def network_errors() -> tuple[type[BaseException], ...]:
    """Transport-level failures of whichever HTTP stack this huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        try:
            found.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    try:
        import requests

        found.append(requests.ConnectionError)
        found.append(requests.Timeout)
    except ImportError:
        pass
    return tuple(found)


def error_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def detail(exc: BaseException, token: str | None) -> str:
    server = getattr(exc, "server_message", None)
    text = server if isinstance(server, str) and server.strip() else str(exc)
    text = " ".join(text.split()) or type(exc).__name__
    if token:
        text = text.replace(token, "***")
    return text[:200]


@dataclass
class HubContext:
    """What a failure message needs to say: where, with which token, and what was done."""

    repo_id: str
    token: str | None
    token_source: str
    endpoint: str
    created: bool = False
    stage: str = "contacting the Hub"

    def nothing_done(self) -> str:
        created = " (the repo itself was created, empty)" if self.created else ""
        return f"nothing was committed to {self.repo_id}{created}"


def hub_error(exc: BaseException, ctx: HubContext, nothing: str | None = None) -> LiftqError:
    """Turn any failure of the hub client into the one-line error with its exit code."""
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    nothing = nothing or ctx.nothing_done()
    if isinstance(exc, ValueError) and "metadata in README.md" in str(exc):
        # huggingface_hub's pre-commit check of the card (POST /api/validate-yaml) failed.
        return BadInputError(
            f"the Hub rejected the model card metadata ({detail(exc, ctx.token)}): "
            f"fix --license / --base-model; {nothing}"
        )
    for cause in error_chain(exc):
        if isinstance(cause, RevisionNotFoundError):
            return BadInputError(
                f"the revision does not exist in {ctx.repo_id} while {ctx.stage}: "
                "pass an existing branch with --revision (or omit it for main)"
            )
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            text = detail(cause, ctx.token)
            if status == 401:
                return BadInputError(
                    f"the Hub rejected the token from {ctx.token_source} (HTTP 401 while "
                    f"{ctx.stage}): create a write token at {TOKEN_PAGE}, then set HF_TOKEN or "
                    f"run `hf auth login`; {nothing}"
                )
            if status == 403:
                namespace = ctx.repo_id.split("/")[0]
                return BadInputError(
                    f"the token from {ctx.token_source} may not write to {ctx.repo_id} (HTTP 403 "
                    f"while {ctx.stage}: {text}): use a write token of '{namespace}' or push "
                    f"to your own namespace; {nothing}"
                )
            return ResourceError(
                f"the Hub answered HTTP {status} while {ctx.stage} ({text}): {nothing}; "
                "re-run the same command to retry"
            )
        if isinstance(cause, network_errors()):
            return ResourceError(
                f"network error while {ctx.stage} at {ctx.endpoint} ({type(cause).__name__}: "
                f"{detail(cause, ctx.token)}): {nothing}; check the connection or HF_ENDPOINT "
                "and re-run the same command"
            )
    return ResourceError(
        f"{ctx.stage} failed ({type(exc).__name__}: {detail(exc, ctx.token)}): {nothing}; "
        "re-run the same command to retry"
    )


@contextmanager
def stage(
    name: str, ctx: HubContext, nothing: str | Callable[[], str] | None = None
) -> Iterator[None]:
    """Run one step of a push as `ctx.stage = name`; any failure becomes its one-line error.

    `nothing` says what was (not) committed, default `ctx.nothing_done()`; a callable is
    asked only after a failure (e.g. to re-read the branch head after a failed commit).
    """
    ctx.stage = name
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - classified into a one-line error
        said = nothing() if callable(nothing) else nothing
        raise hub_error(exc, ctx, nothing=said) from None
