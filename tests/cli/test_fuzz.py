"""Every command against a table of bad inputs, as a hostile user or a CI job would try them.

Each case runs in one sandbox folder (the working directory) holding a tiny model T, its
quantize output Q and packed P, and broken or foreign variants of each. For every case:

* the exit code is the documented one (docs/CI.md: 2 bad input, 3 does not fit);
* stderr is one line `error: ...`, and nothing anywhere says Traceback;
* with --json, stdout's last line is one JSON object with `error` and that `exit_code`;
* no file in the sandbox is created, changed or removed (the case's `may_create` paths
  excepted: a work dir a job leaves for resuming after a failure mid-way).

`scripts/ci_batch.sh` gets the same treatment for its own contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tests.helpers import tiny_llama_folder

ROOT = Path(__file__).resolve().parents[2]
TEXT = "The quick brown fox jumps over the lazy dog, and the dog sleeps on. " * 60
FAST = ["--nsamples", "2", "--seqlen", "32", "--whiten-steps", "0", "--correction-steps", "0"]


def write_recipe(path: Path, body: str) -> None:
    path.write_text(body)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, smollm2_folder) -> Path:
    from typer.testing import CliRunner

    from liftq_cli.cli.app import app

    root = tmp_path_factory.mktemp("fuzz")
    (root / "c.txt").write_text(TEXT)
    tiny_llama_folder(root / "T", smollm2_folder, layers=1, hidden=32)
    # R: the same tokenizer, too few embeddings for it
    tiny_llama_folder(root / "R", smollm2_folder, vocab=64, layers=1, hidden=32)
    runner = CliRunner()
    quantize = ["quantize", str(root / "T"), "--config", "LQ-24/10", "--out", str(root / "Q")]
    done = runner.invoke(app, [*quantize, "--calib", str(root / "c.txt"), *FAST])
    assert done.exit_code == 0, done.output
    shutil.rmtree(root / ".Q.work")
    done = runner.invoke(app, ["pack", str(root / "Q"), "--out", str(root / "P")])
    assert done.exit_code == 0, done.output
    # broken variants
    for name in ("Tcut", "Thdr", "Tnan"):
        shutil.copytree(root / "T", root / name)
    weights = (root / "T" / "model.safetensors").read_bytes()
    (root / "Tcut" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    header = bytearray(weights)
    header[8:20] = b"garbagegarba"
    (root / "Thdr" / "model.safetensors").write_bytes(bytes(header))
    tensors = load_file(root / "T" / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(root / "Tnan" / "model.safetensors"), metadata={"format": "pt"})
    for name in ("Qcut", "Qv7"):
        shutil.copytree(root / "Q", root / name)
    codes = (root / "Q" / "liftq_codes.safetensors").read_bytes()
    (root / "Qcut" / "liftq_codes.safetensors").write_bytes(codes[:-64])
    meta = json.loads((root / "Q" / "liftq.json").read_text())
    (root / "Qv7" / "liftq.json").write_text(json.dumps({**meta, "format_version": 7}))
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("hi\n")
    (root / "afile").write_text("precious\n")
    (root / "bin.txt").write_bytes(b"\xff\xfe\x00binary")
    (root / "bad.gguf").write_bytes(b"GGUFjunk")
    (root / "nota.gguf").write_bytes(b"not a gguf")
    (root / "report.json").write_text('{"mine": 1}\n')
    head = "format_version: 2\nmodel: T\nconfig: LQ-24/10\nctx: 2048\n"
    write_recipe(root / "r_other.yaml", (ROOT / "recipes" / "llama-3-70b-24gb.yaml").read_text())
    write_recipe(root / "r_bad.yaml", "format_version: 2\nmodel: [unclosed\n")
    write_recipe(root / "r_key.yaml", head + "quantize: {steps: 3}\n")
    write_recipe(root / "r_type.yaml", head + "quantize: {seed: abc}\n")
    write_recipe(root / "r_v9.yaml", head.replace("format_version: 2", "format_version: 9"))
    write_recipe(root / "r_mixed.yaml", head + "layers: {0: {down_proj: LQ-30/10}}\n")
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` -> a digest of its content (folders: 'dir')."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        state[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    code: int
    says: str  # a fragment the one-line error must contain
    may_create: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return " ".join(self.args)[:80]


def case(args: str, code: int, says: str, may_create: tuple[str, ...] = ()) -> Case:
    return Case(tuple(args.split()), code, says, may_create)


Q_ARGS = "--calib c.txt --nsamples 2 --seqlen 32"
CASES = [
    # -- data loss: an --out that holds, is, or contains someone's files
    case(f"quantize T --bits 2.4 {Q_ARGS} --out notes", 2, "not a `liftq quantize` output"),
    case("pack Q --out notes", 2, "not a `liftq pack` output"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --out T", 2, "is the input"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --out T/sub", 2, "is inside the input"),
    case(f"quantize notes/../T --bits 2.4 {Q_ARGS} --out .", 2, "contains the input"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --out afile", 2, "is a file, not a folder"),
    case("pack Q --out afile", 2, "is a file, not a folder"),
    case("pack Q --out Q", 2, "is the input"),
    case("pack Q --out Q/packed", 2, "is inside the input"),
    case("pack Q --out P", 2, "pass --overwrite"),
    case(f"quantize T --config LQ-24/10 {Q_ARGS} --out Q", 2, "pass --overwrite"),
    case("pack Q --out /", 2, "file system root"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --out o --work-dir T", 2, "is the input"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --out o --work-dir o/w", 2, "is inside --out 'o'"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --out o/q --work-dir o", 2, "contains --out"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --out o --work-dir notes", 2, "not a `liftq quantize`"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --out /proc/liftq-o", 2, "cannot be written"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --out o --work-dir /proc/w", 2, "cannot be written"),
    case("lattice build-catalog", 2, "--out"),
    case("lattice build-catalog --out notes --only LQ-24/10", 2, "notes"),
    case("plan --model smollm2-135m --vram 1GB --write-recipe notes", 2, "is a folder"),
    case("plan --model smollm2-135m --vram 1GB --write-recipe afile", 2, "not a liftq recipe"),
    case("plan --model smollm2-135m --vram 1GB --write-recipe /proc/x/r.yaml", 2, "cannot be"),
    case("plan --model smollm2-135m --vram 1GB --write-recipe r_other.yaml", 2, "--overwrite"),
    case("eval T --ppl c.txt --ctx 32 --save notes", 2, "is a folder"),
    case("eval T --ppl c.txt --ctx 32 --save report.json", 2, "not a `liftq eval --save`"),
    case("eval T --ppl c.txt --ctx 32 --save c.txt", 2, "is the input"),
    case("lattice train --D 16 --d 10 --out notes", 2, "is a folder"),
    case("lattice train --D 16 --d 10 --out afile", 2, "not a `liftq lattice train"),
    # -- silent wrong results, now refused
    case(f"quantize T --bits nan {Q_ARGS} --out o", 2, "--bits nan is not a number"),
    case(f"quantize T --bits inf {Q_ARGS} --out o", 2, "--bits inf is not a number"),
    case(f"quantize T --bits 0.5 {Q_ARGS} --out o", 2, "--bits 0.5"),
    case(f"quantize T --recipe r_other.yaml {Q_ARGS} --out o", 2, "meta-llama/Meta-Llama-3-70B"),
    case("pack Qv7 --out o", 2, "format_version 7"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --whiten-steps -1 --out o", 2, "--whiten-steps -1"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --correction-steps -5 --out o", 2, "-5 is invalid"),
    case("eval Qcut --ppl c.txt --ctx 32", 2, "liftq_codes.safetensors' is corrupt"),
    case("pack Qcut --out o", 2, "liftq_codes.safetensors' is corrupt"),
    # -- tracebacks, now one line
    case(f"quantize Tcut --bits 2.4 {Q_ARGS} --out o", 2, "is unreadable or corrupt"),
    case(f"quantize Thdr --bits 2.4 {Q_ARGS} --out o", 2, "is unreadable or corrupt"),
    case("eval Tcut --ppl c.txt --ctx 32", 2, "are corrupt"),
    case("eval Thdr --ppl c.txt --ctx 32", 2, "are corrupt"),
    case("eval T --ppl c.txt --ctx 32 --kld-ref R", 2, "--kld-ref 'R'"),
    case("eval R --ppl c.txt --ctx 32", 2, "belong to another model"),
    case(f"quantize R --bits 2.4 {Q_ARGS} --out o", 2, "belong to another model"),
    case(
        f"quantize Tnan --config LQ-24/10 {Q_ARGS} --out o",
        2,
        "NaN or infinite",
        may_create=(".o.work", ".o.work/job.json", ".o.work/.lock"),
    ),  # fmt: skip
    case("eval bad.gguf --ppl c.txt --ctx 32", 2, "cannot read GGUF file"),
    case("eval nota.gguf --ppl c.txt --ctx 32", 2, "is not a GGUF file"),
    case("plan --ctx abc", 2, "Invalid value for '--ctx'"),
    case("quantize --bogus", 2, "No such option: --bogus"),
    case("eval", 2, "Missing argument"),
    case("nosuchcommand", 2, "No such command"),
    # -- smaller
    case("plan --model smollm2-135m --vram 1MB", 2, "did you mean 1GB?"),
    case("plan --model smollm2-135m --vram 24", 2, "add a unit"),
    case("plan --model smollm2-135m --vram 99999999999999999999GB", 2, "more than any GPU"),
    case("plan --model smollm2-135m --vram abc", 2, "is not a size"),
    case("plan --model smollm2-135m --vram 1GB --ctx 0", 2, "--ctx 0"),
    case("plan --model smollm2-135m --vram 1GB --batch 0", 2, "--batch 0"),
    case("plan --model smollm2-135m --vram 1GB --kv-bits 3", 2, "3"),
    case("plan --model no-such-model --vram 1GB", 2, "unknown model"),
    case("plan --model llama-70b --vram 1GB", 3, "does not fit"),
    case("plan --model smollm2-135m --vram 1GB --sensitivity x.yaml", 2, "needs --mixed"),
    # -- every other command's numbers and files
    case(f"quantize T --config LQ-40/10 {Q_ARGS} --out o", 2, "at most 32"),
    case(f"quantize T --config nonsense {Q_ARGS} --out o", 2, "not of the form LQ-D/d"),
    case(f"quantize T --bits 2.4 --config LQ-24/10 {Q_ARGS} --out o", 2, "exactly one"),
    case(f"quantize T {Q_ARGS} --out o", 2, "exactly one"),
    case("quantize T --bits 2.4 --nsamples 0 --out o", 2, "--nsamples 0 is invalid"),
    case("quantize T --bits 2.4 --seqlen 1 --out o", 2, "--seqlen 1 is invalid"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --finetune-lr 0 --out o", 2, "--finetune-lr"),
    case(f"quantize T --bits 2.4 {Q_ARGS} --finetune-steps -1 --out o", 2, "--finetune-steps"),
    case("quantize T --bits 2.4 --calib wikitext2 --out o", 2, "evaluation set"),
    case("quantize T --bits 2.4 --calib missing.txt --out o", 2, "missing.txt"),
    case("quantize T --bits 2.4 --calib bin.txt --out o", 2, "not UTF-8"),
    case("quantize T --recipe missing.yaml --out o", 2, "missing.yaml"),
    case("quantize T --recipe r_bad.yaml --out o", 2, "not valid YAML"),
    case("quantize T --recipe r_key.yaml --out o", 2, "unknown key(s) steps"),
    case("quantize T --recipe r_type.yaml --out o", 2, "seed = 'abc' must be an integer"),
    case("quantize T --recipe r_v9.yaml --out o", 2, "format_version 9"),
    case(f"quantize T --recipe r_mixed.yaml --mixed {Q_ARGS} --out o", 2, "--mixed"),
    case(f"quantize ./nowhere/model --bits 2.4 {Q_ARGS} --out o", 2, "does not exist"),
    case(f"quantize afile --bits 2.4 {Q_ARGS} --out o", 2, "is a file but not a .gguf"),
    case(f"quantize notes --bits 2.4 {Q_ARGS} --out o", 2, "has no config.json"),
    case("pack missing --out o", 2, "is not a folder"),
    case("pack T --out o", 2, "has no liftq.json"),
    case("pack Q --out o --dtype int8", 2, "--dtype 'int8'"),
    case("eval ./missing-folder/x", 2, "does not exist"),
    case("eval T --ppl c.txt --ctx 1", 2, "--ctx 1"),
    case("eval T --ppl c.txt --ctx 32 --max-tokens 0", 2, "--max-tokens 0"),
    case("eval T --ppl c.txt --ctx 32 --batch-size 0", 2, "--batch-size 0"),
    case("eval T --ppl nosuchtext", 2, "nosuchtext"),
    case("push P --repo not-a-repo --dry-run", 2, "--repo 'not-a-repo'"),
    case("push Q --repo a/b --dry-run", 2, "run `liftq pack"),
    case("push missing --repo a/b --dry-run", 2, "does not exist"),
    case("lattice train --D 40 --d 10", 2, "at most 32"),
    case("lattice train --D 16 --d 10 --samples 0", 2, "samples=0"),
    case("lattice train --D 16 --d 10 --iterations -1", 2, "iterations=-1"),
]


def invoke(args: tuple[str, ...]):
    from typer.testing import CliRunner

    from liftq_cli.cli.app import app

    return CliRunner().invoke(app, list(args), catch_exceptions=True)


@pytest.mark.slow
@pytest.mark.parametrize("item", CASES, ids=lambda c: c.id)
def test_bad_input(sandbox, monkeypatch, item):
    monkeypatch.chdir(sandbox)
    before = snapshot(sandbox)
    for as_json in (False, True):
        args = (*item.args, "--json") if as_json else item.args
        result = invoke(args)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"{item.id}: {type(result.exception).__name__}: {result.exception}"
        )
        output = result.stdout + result.stderr
        assert "Traceback" not in output, output
        assert result.exit_code == item.code, (item.id, result.exit_code, output)
        errors = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
        assert item.says in errors[0], (item.says, errors[0])
        if as_json:
            last = json.loads(result.stdout.strip().splitlines()[-1])
            assert last["exit_code"] == item.code and item.says in last["error"], last
        after = snapshot(sandbox)
        changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
        assert changed <= set(item.may_create), (item.id, sorted(changed))
        for path in item.may_create:
            target = sandbox / path
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)


def test_the_table_covers_every_command():
    commands = {c.args[0] if c.args[0] != "lattice" else " ".join(c.args[:2]) for c in CASES}
    assert {"quantize", "pack", "eval", "plan", "push", "lattice train"} <= commands
    assert {"lattice build-catalog"} <= commands
    assert len(CASES) >= 60


# -- the CI batch script ------------------------------------------------------------------


def ci_batch(sandbox: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LIFTQ=str(Path(sys.executable).parent / "liftq"), DRY_RUN="1")
    script = ROOT / "scripts" / "ci_batch.sh"
    return subprocess.run(
        ["bash", str(script), *args], cwd=sandbox, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "step", "code"),
    [
        (("T", "r_other.yaml", "user/model", "ci1"), "quantize", 2),
        (("./nowhere/model", "r_other.yaml", "user/model", "ci2"), "quantize", 2),
        (("T", "r_other.yaml", "bad--repo/x", "ci3"), "repo", 2),
        (("T", "r_other.yaml", "noslash", "ci4"), "repo", 2),
        (("T",), "usage", 2),
    ],
)
def test_ci_batch_fails_with_its_contract(sandbox, args, step, code):
    before = snapshot(sandbox)
    done = ci_batch(sandbox, *args)
    assert done.returncode == code, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["ok"] is False and summary["failed_step"] == step
    assert summary["exit_code"] == code
    assert "Traceback" not in done.stderr
    work = sandbox / args[3] if len(args) == 4 else None
    if step in ("repo", "usage"):  # refused before anything is made
        assert snapshot(sandbox) == before
    else:  # the failing step's JSON is whole, never a 0-byte file
        output = json.loads((work / f"{step}.json").read_text().strip().splitlines()[-1])
        assert output["exit_code"] == code and output["error"]
        assert not list(work.glob("*.part"))
        shutil.rmtree(work)
        assert snapshot(sandbox) == before


def test_docs_ci_states_the_exit_codes_the_code_uses():
    import re

    from liftq_cli.errors import EXIT_CODES

    text = (ROOT / "docs" / "CI.md").read_text()
    table = dict(re.findall(r"^\| (\d) \| ([^|]+) \|", text, flags=re.M))
    assert sorted(int(c) for c in table) == sorted(EXIT_CODES.values())
    for name, code in EXIT_CODES.items():
        words = {"ok": "ok", "internal": "internal", "bad_input": "bad input",
                 "does_not_fit": "does not fit", "resource": "resource"}  # fmt: skip
        assert table[str(code)].startswith(words[name]), (code, table[str(code)])
    assert '{"error": "<message>", "exit_code": N}' in text
