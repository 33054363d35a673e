import json

import pytest
from tests.helpers import assert_one_line_error

from liftq_cli import __version__


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and result.stdout.strip() == f"liftq {__version__}"


@pytest.mark.slow
def test_eval_json_on_the_real_model(cli, smollm2):
    from liftq_cli.data.calibration import tokenize
    from liftq_cli.data.text import load_wikitext2
    from liftq_cli.evaluate.perplexity import perplexity

    result = cli(
        "eval",
        "smollm2-135m",
        "--ppl",
        "wikitext2",
        "--ctx",
        "512",
        "--max-tokens",
        "1536",
        "--json",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert {"model", "ppl", "ctx", "tokens", "seconds", "protocol"} <= payload.keys()
    assert payload["ctx"] == 512 and payload["tokens"] == {"wikitext2": 1536}
    assert payload["protocol"]["stride"] == 512 and payload["protocol"]["bos"] is False
    ids = tokenize(smollm2.tokenizer, load_wikitext2().text)[:1536]
    expected = perplexity(smollm2.model, ids, ctx=512).ppl
    assert payload["ppl"]["wikitext2"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_eval_table_states_the_protocol(cli, smollm2, tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("The cat sat on the mat. " * 200)
    saved = tmp_path / "reports" / "eval.json"
    result = cli(
        "eval", "smollm2-135m", "--ppl", str(text), "--ctx", "256", "--max-tokens", "512",
        "--save", str(saved),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mine.txt" in result.stdout
    report = json.loads(saved.read_text())  # the table on stdout, the JSON report in --save
    (name,) = report["ppl"]
    assert report["ctx"] == 256 and report["tokens"][name] == 512
    assert f"{report['ppl'][name]:.3f}" in result.stdout
    assert "protocol: ctx 256, stride 256" in result.stdout
    # Repetitive text is nearly free to predict once seen.
    ppl = float(
        next(line for line in result.stdout.splitlines() if "mine.txt" in line).split("│")[2]
    )
    assert ppl < 3


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["eval", "llama-9000"], ["unknown model 'llama-9000'"]),
        (["eval", "./no/such/folder"], ["'./no/such/folder' does not exist"]),
        (["eval", "smollm2-135m", "--ppl", "wikitext9"], ["unknown text source 'wikitext9'"]),
        (["eval", "smollm2-135m", "--ctx", "1"], ["--ctx 1 is too small"]),
        (["eval", "smollm2-135m", "--ppl", ","], ["--ppl is empty"]),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, args, fragments):
    assert_one_line_error(cli(*args), *fragments)


def test_corrupt_gguf_is_one_line_exit_2_with_json(cli, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"NOPE" + b"\x00" * 100)
    result = cli("eval", str(bad), "--json", env={"LIFTQ_CACHE": str(tmp_path / "c")})
    assert_one_line_error(result, "model.gguf", "not a GGUF file")
    assert json.loads(result.stdout)["exit_code"] == 2
    assert not (tmp_path / "c" / "models").exists()
