"""`liftq push` end to end: the real huggingface_hub client against a local fake Hub."""

import json
import time
import types

import pytest
import yaml
from tests.helpers import assert_one_line_error
from tests.hub import fixtures
from tests.hub.fixtures import READ_TOKEN, TOKEN

hub = fixtures.hub
packed = fixtures.packed
REPO = "alice/demo"


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries network errors with sleeps of 1, 2, 4, 8, 8 s: skip them."""
    import huggingface_hub.utils._http as hub_http

    fake_time = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if k[0] != "_"})
    fake_time.sleep = lambda seconds: None
    monkeypatch.setattr(hub_http, "time", fake_time)


def card_of(result) -> str:
    return result.stdout.split("--- README.md ---\n", 1)[1]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def assert_token_kept_secret(hub, *results) -> None:
    for result in results:
        assert TOKEN not in result.output
    for call in hub.calls:
        assert TOKEN not in call.path and TOKEN.encode() not in call.body
        assert call.authorization in (None, f"Bearer {TOKEN}")


def assert_nothing_committed(hub, repo: str = REPO) -> None:
    """Only the commit that created the repo (its .gitattributes) is there."""
    if repo in hub.repos:
        assert set(hub.files(repo)) == {".gitattributes"}
        assert len(hub.repos[repo].commits) == 1


# ----------------------------------------------------------------------------------- success


def test_push_creates_the_repo_uploads_and_verifies(cli, hub, packed):
    dry = cli("push", str(packed), "--repo", REPO, "--dry-run")
    result = cli("push", str(packed), "--repo", REPO)
    assert result.exit_code == 0, result.output
    assert "pushed 6 files" in result.stdout and f"{hub.url}/{REPO}" in result.stdout
    assert "created public repo" in result.stdout
    assert "quantization_config survived (quant_method liftquant, format_version 1)" in (
        result.stdout
    )
    files = hub.files(REPO)
    for name in ("config.json", "liftq.json", "model.safetensors", "tokenizer.json"):
        assert files[name] == (packed / name).read_bytes(), name
    # The card on the Hub is exactly the one the dry run printed.
    assert files["README.md"].decode() == card_of(dry)
    kinds = hub.kinds()
    assert kinds.index("whoami") < kinds.index("create_repo") < kinds.index("commit")
    assert kinds.count("commit") == 1
    assert "lfs_upload" in kinds  # model.safetensors went through git-LFS
    assert kinds[-1] == "resolve"  # config.json read back after the commit
    assert hub.repos[REPO].private is False
    assert_token_kept_secret(hub, dry, result)


def test_push_json(cli, hub, packed):
    result = cli("push", str(packed), "--repo", REPO, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["dry_run"] is False and payload["created"] is True
    assert payload["commit"] == hub.repos[REPO].branches["main"]
    assert payload["user"] == "alice" and payload["revision"] == "main"
    assert payload["verified"]["quantization_config"] == {
        "quant_method": "liftquant",
        "format_version": 1,
    }
    assert {f["path"] for f in payload["files"]} == set(hub.files(REPO)) - {".gitattributes"}
    assert payload["bytes"] == sum(f["bytes"] for f in payload["files"])


def test_push_to_an_existing_repo_adds_a_commit(cli, hub, packed):
    hub.add_repo(REPO, {"notes.txt": b"kept"})
    before = hub.repos[REPO].branches["main"]
    result = cli("push", str(packed), "--repo", REPO, "--private")
    assert result.exit_code == 0, result.output
    assert "existing public repo" in result.stdout
    assert "--private does not change it" in result.stderr
    assert "create_repo" not in hub.kinds()
    assert hub.repos[REPO].branches["main"] != before
    assert hub.files(REPO)["notes.txt"] == b"kept"
    assert hub.repos[REPO].private is False


def test_pushing_again_skips_unchanged_large_files(cli, hub, packed):
    assert cli("push", str(packed), "--repo", REPO).exit_code == 0
    uploads = hub.kinds().count("lfs_upload")
    result = cli("push", str(packed), "--repo", REPO)
    assert result.exit_code == 0, result.output
    assert hub.kinds().count("lfs_upload") == uploads


def test_private_and_revision(cli, hub, packed):
    result = cli("push", str(packed), "--repo", REPO, "--private", "--revision", "lq-24")
    assert result.exit_code == 0, result.output
    assert hub.repos[REPO].private is True
    assert "config.json" in hub.files(REPO, "lq-24")
    assert "config.json" not in hub.files(REPO, "main")
    assert f"{REPO}/tree/lq-24" in result.stdout and "private repo" in result.stdout


def test_token_from_the_login_cache(cli, hub, packed, monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    monkeypatch.delenv("HF_TOKEN")
    cache = tmp_path / "token"
    cache.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache))
    result = cli("push", str(packed), "--repo", REPO)
    assert result.exit_code == 0, result.output
    assert_token_kept_secret(hub, result)
    cache.write_text("hf_revoked_token")
    failed = cli("push", str(packed), "--repo", REPO)
    assert_one_line_error(failed, "rejected the token from the login cache", "HTTP 401")


# ---------------------------------------------------------------------------------- dry run


def test_dry_run_lists_files_prints_the_card_and_touches_nothing(cli, hub, packed, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = cli("push", str(packed), "--repo", REPO, "--dry-run")
    assert result.exit_code == 0, result.output
    assert hub.calls == []  # base model facts are known locally: no network at all
    for name in ("config.json", "model.safetensors", "liftq_eval.json", "README.md"):
        assert name in result.stdout.split("--- README.md ---")[0]
    card = card_of(result)
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "liftq" and meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert {"liftq", "quantized", "2.40-bit"} <= set(meta["tags"])
    assert fixtures.demo_recipe() in card  # the recipe, verbatim
    assert "| `out/packed` | wikitext2 | 31.250 | 0.1234 | 0.8765 | 40920 |" in card
    assert "windows of ctx 1024 tokens, stride 1024" in card
    assert "| 4,096 |" in card  # VRAM row at a common context length
    assert REPO not in hub.repos


def test_dry_run_json(cli, hub, packed):
    result = cli("push", str(packed), "--repo", REPO, "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["dry_run"] is True and payload["repo"] == REPO
    assert payload["files"][-1]["path"] == "README.md"
    assert front_matter(payload["card"])["license"] == "apache-2.0"
    assert hub.calls == []


def test_a_hub_base_model_carries_its_licence_from_the_hub(cli, hub, packed):
    result = cli(
        "push", str(packed), "--repo", REPO, "--dry-run",
        "--base-model", "HuggingFaceTB/SmolLM2-135M",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = front_matter(card_of(result))
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["license"] == "apache-2.0"  # read from the base repo's card on the (fake) Hub
    assert hub.kinds() == ["repo_info"]


def test_an_unknown_licence_is_a_warning_not_a_guess(cli, hub, packed):
    hub.add_repo("someone/base", {"README.md": b"# no metadata\n"})
    result = cli("push", str(packed), "--repo", REPO, "--dry-run", "--base-model", "someone/base")
    assert result.exit_code == 0, result.output
    assert "license" not in front_matter(card_of(result))
    assert "the licence of someone/base is unknown: pass --license" in result.stderr


# ---------------------------------------------------------------------------------- failures


def test_a_rejected_token_is_one_line_and_pushes_nothing(cli, hub, packed, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = cli("push", str(packed), "--repo", REPO)
    assert_one_line_error(result, "rejected the token from HF_TOKEN", "HTTP 401", "nothing")
    assert "hf_not_a_real_token" not in result.output
    assert hub.kinds() == ["whoami"] and REPO not in hub.repos


def test_a_read_only_token_is_refused_before_any_write(cli, hub, packed, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", READ_TOKEN)
    result = cli("push", str(packed), "--repo", REPO)
    assert_one_line_error(result, "read-only", "write token")
    assert hub.kinds() == ["whoami"]


def test_another_namespace_is_forbidden(cli, hub, packed):
    result = cli("push", str(packed), "--repo", "bob/demo")
    assert_one_line_error(result, "may not write to bob/demo", "HTTP 403", "nothing")
    assert "bob/demo" not in hub.repos


def test_no_token_at_all(cli, hub, packed, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    result = cli("push", str(packed), "--repo", REPO)
    assert_one_line_error(result, "no Hugging Face token", "HF_TOKEN", "--dry-run")
    assert hub.calls == []


def test_network_error_mid_upload(cli, hub, packed, no_backoff):
    hub.fail["lfs_upload"] = "drop"  # the connection drops while model.safetensors uploads
    result = cli("push", str(packed), "--repo", REPO)
    assert_one_line_error(
        result, "network error while uploading", "nothing was committed to alice/demo", code=4
    )
    assert "pushed" not in result.stdout
    assert hub.kinds().count("lfs_upload") == 6  # the client's own retries, then give up
    assert "commit" not in hub.kinds()
    assert_nothing_committed(hub)
    # Once the network is back the same command completes the push.
    del hub.fail["lfs_upload"]
    assert cli("push", str(packed), "--repo", REPO).exit_code == 0
    assert "config.json" in hub.files(REPO)


def test_connection_lost_during_the_commit(cli, hub, packed):
    hub.fail["commit"] = "drop"
    result = cli("push", str(packed), "--repo", REPO, "--json")
    assert result.exit_code == 4, result.output
    error = json.loads(result.stdout)
    assert error["exit_code"] == 4
    assert "network error while committing" in error["error"]
    assert "nothing was committed to alice/demo" in error["error"]  # head re-read: unchanged
    assert_nothing_committed(hub)


def test_a_server_error_during_the_commit(cli, hub, packed):
    hub.fail["commit"] = 500
    result = cli("push", str(packed), "--repo", REPO)
    assert_one_line_error(result, "HTTP 500 while committing", "nothing was committed", code=4)
    assert_nothing_committed(hub)


def test_an_unreachable_hub(cli, hub, packed, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    result = cli("push", str(packed), "--repo", REPO)
    assert_one_line_error(result, "network error while checking the token", "HF_ENDPOINT", code=4)


def test_a_config_that_does_not_survive_is_caught(cli, hub, packed):
    def strip(data: bytes) -> bytes:
        config = json.loads(data)
        config.pop("quantization_config")
        return json.dumps(config).encode()

    hub.mutate["config.json"] = strip
    result = cli("push", str(packed), "--repo", REPO)
    assert_one_line_error(result, "quantization_config is missing on the Hub", code=4)
    assert "pushed" not in result.stdout


def test_card_metadata_rejected_by_the_hub(cli, hub, packed):
    result = cli("push", str(packed), "--repo", REPO, "--license", "my-own-licence")
    assert_one_line_error(result, "rejected the model card metadata", "--license")
    assert_nothing_committed(hub)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["push", "{missing}", "--repo", REPO], ["does not exist"]),
        (["push", "{empty}", "--repo", REPO], ["has no config.json"]),
        (["push", "{packed}", "--repo", "demo"], ["--repo 'demo' must be namespace/name"]),
        (["push", "{packed}", "--repo", "a/b--c"], ["--repo 'a/b--c' is not a valid repo id"]),
        (["push", "{packed}", "--repo", REPO, "--revision", "a b"], ["--revision 'a b'"]),
        (["push", "{packed}", "--repo", REPO, "--base-model", "x"], ["--base-model 'x'"]),
        (["push", "{packed}", "--repo", REPO, "--eval-json", "{empty}/e.json"], ["eval JSON"]),
    ],
)
def test_bad_input_is_one_line_and_offline(cli, hub, packed, tmp_path, args, fragments):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.json").write_text('{"not": "an eval"}')
    paths = {"missing": tmp_path / "nope", "empty": empty, "packed": packed}
    result = cli(*[a.format(**paths) for a in args])
    assert_one_line_error(result, *fragments)
    assert hub.calls == []


def test_offline_mode_refuses_to_push(cli, hub, packed, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("push", str(packed), "--repo", REPO)
    assert_one_line_error(result, "HF_HUB_OFFLINE", "--dry-run")
    assert hub.calls == []
