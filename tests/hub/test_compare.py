"""`liftq push --compare`: the model's own point on the quality bench, placed only when it was
measured the bench's way (same base model, ctx, token count, no BOS), refused otherwise."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from liftq_cli.errors import BadInputError
from liftq_cli.evaluate.pareto import Point, render_png
from liftq_cli.hub.card import quantization, render_card
from liftq_cli.hub.compare import COMPARE_PNG, compare, compare_section, read_bench
from liftq_cli.hub.folder import base_model_id, read_folder
from liftq_cli.hub.upload import describe_base
from tests.helpers import assert_one_line_error
from tests.hub import fixtures

hub = fixtures.hub
packed = fixtures.packed
REPO = "alice/demo"


def bench_rows(bits: float) -> list[dict]:
    """A bench around `bits`: rows near it, one far below, fp, and a failed row."""
    return [
        {"id": "fp", "method": "fp", "status": "ok", "bits_per_weight": 32.0,
         "ppl": {"wikitext2": 24.4, "wiki": 19.2}},
        {"id": "liftq-2.4", "method": "liftq", "status": "ok", "bits_per_weight": bits - 0.3,
         "ppl": {"wikitext2": 40.8, "wiki": 29.2}},
        {"id": "autoround-b2-g64", "method": "autoround", "status": "ok",
         "bits_per_weight": bits + 0.5, "ppl": {"wikitext2": 99.3, "wiki": 53.8}},
        {"id": "rtn-b2-g128", "method": "rtn", "status": "ok", "bits_per_weight": bits - 1.5,
         "ppl": {"wikitext2": 1e6}},
        {"id": "hqq-b2-g64", "method": "hqq", "status": "failed", "bits_per_weight": bits,
         "ppl": {}},
    ]  # fmt: skip


def write_bench(path: Path, bits: float, model: str = "smollm2-135m") -> Path:
    data = {
        "model": model,
        "protocol": {"ctx": 1024, "max_tokens": 40960, "texts": ["wikitext2", "wiki"]},
        "calibration": {"text": "wiki", "nsamples": 64, "seqlen": 512},
        "versions": {"liftq": "0.1.0"},
        "rows": bench_rows(bits),
    }
    path.write_text(json.dumps(data))
    return path


def stored_bits(folder: Path) -> float:
    bits = quantization(read_folder(folder)).stored_bits
    assert bits is not None
    return bits


def test_point_is_the_folders_stored_bits_and_its_matching_eval(packed, tmp_path):
    bits = stored_bits(packed)
    bench = read_bench(write_bench(tmp_path / "q.json", bits))
    info = read_folder(packed)
    found = compare(info, bench, base_model_id(info), bits, "q.json")
    assert found.point == Point("this model", bits, {"wikitext2": 31.25})
    assert found.texts == ["wikitext2"]  # the eval has no wiki number: one panel
    lines = compare_section(found)
    table = [line for line in lines if line.startswith("| ")]
    names = [line.split(" | ")[0].removeprefix("| ") for line in table[1:]]
    # Sorted by bits/w; the far row (1.5 bits away) and the failed row are left out, fp kept.
    assert names == ["liftq-2.4", "**this model**", "autoround-b2-g64", "fp"]
    assert f"| **this model** | liftq | {bits:.3f} | 31.25 |" in lines
    assert f"![bits per weight against perplexity]({COMPARE_PNG})" in lines
    base, _ = describe_base(info, base_model_id(info), None, None)
    card = render_card(info, base, REPO, lines)
    assert (
        card.index("## Evaluation") < card.index("## How it compares") < card.index("## GPU memory")
    )
    assert "## How it compares" not in render_card(info, base, REPO)


def test_the_star_is_drawn_only_where_the_point_has_a_number():
    from PIL import Image

    rows = bench_rows(2.5)
    plain = render_png(rows, ["wikitext2", "wiki"], "t")
    starred = render_png(rows, ["wikitext2", "wiki"], "t", Point("this model", 2.4, {"wiki": 25}))
    assert starred != plain
    with Image.open(io.BytesIO(starred)) as image:
        assert image.format == "PNG"
        width = image.size[0]
        pixels = image.convert("RGB").load()
        # tab:red (214, 39, 40) appears in the wiki panel (right half) only.
        red = {x < width // 2 for x in range(width) for y in range(image.size[1])
               if pixels[x, y] == (214, 39, 40)}  # fmt: skip
    assert red == {False}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"ctx": 2048, "stride": 2048}, "no attached eval used the bench's protocol (ctx 1024"),
        ({"bos": True}, "no BOS"),
        ({"max_tokens": None}, "--max-tokens 40960"),
    ],
)
def test_an_eval_measured_another_way_is_refused_with_the_command(packed, tmp_path, change,
                                                                  fragment):  # fmt: skip
    payload = fixtures.eval_payload()
    payload["protocol"].update(change)
    (packed / "liftq_eval.json").write_text(json.dumps(payload))
    info = read_folder(packed)
    bench = read_bench(write_bench(tmp_path / "q.json", 2.5))
    with pytest.raises(BadInputError, match="liftq eval") as caught:
        compare(info, bench, base_model_id(info), 2.5, "q.json")
    assert fragment in str(caught.value)
    assert "--ppl wikitext2,wiki --ctx 1024 --max-tokens 40960 --json" in str(caught.value)


def test_another_base_model_or_an_unknown_one_is_refused(packed, tmp_path):
    info = read_folder(packed)
    bench = read_bench(write_bench(tmp_path / "q.json", 2.5, model="meta-llama/Llama-2-7b-hf"))
    with pytest.raises(BadInputError, match="measured meta-llama/Llama-2-7b-hf"):
        compare(info, bench, base_model_id(info), 2.5, "q.json")
    with pytest.raises(BadInputError, match="pass --base-model"):
        compare(info, bench, None, 2.5, "q.json")
    same = read_bench(write_bench(tmp_path / "s.json", 2.5))
    with pytest.raises(BadInputError, match="bits per weight .* cannot be counted"):
        compare(info, same, base_model_id(info), None, "s.json")


def test_a_file_that_is_not_a_bench_result_is_refused(tmp_path):
    with pytest.raises(BadInputError, match="does not exist"):
        read_bench(tmp_path / "missing.json")
    (tmp_path / "eval.json").write_text(json.dumps(fixtures.eval_payload()))
    with pytest.raises(BadInputError, match="not a quality bench result"):
        read_bench(tmp_path / "eval.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(BadInputError, match="bad.json"):
        read_bench(tmp_path / "bad.json")


def test_push_uploads_the_picture_beside_the_card(cli, hub, packed, tmp_path):
    bench = write_bench(tmp_path / "quality.json", stored_bits(packed))
    (packed / COMPARE_PNG).write_bytes(b"an old picture")
    dry = cli("push", str(packed), "--repo", REPO, "--compare", str(bench), "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    listed = {f["path"] for f in json.loads(dry.stdout)["files"]}
    result = cli("push", str(packed), "--repo", REPO, "--compare", str(bench))
    assert result.exit_code == 0, result.output
    assert f"{COMPARE_PNG} is not uploaded: --compare draws it anew" in result.stderr
    files = hub.files(REPO)
    assert set(files) - {".gitattributes"} == listed
    assert files[COMPARE_PNG].startswith(b"\x89PNG\r\n\x1a\n")
    card = files["README.md"].decode()
    assert "## How it compares" in card and "| **this model** | liftq |" in card


def test_push_with_a_bad_bench_file_stops_before_the_hub(cli, hub, packed, tmp_path):
    bench = write_bench(tmp_path / "quality.json", 2.5, model="meta-llama/Llama-2-7b-hf")
    result = cli("push", str(packed), "--repo", REPO, "--compare", str(bench))
    assert_one_line_error(result, "--compare", "Llama-2-7b-hf", "drop --compare")
    assert hub.kinds() == []  # not even a login: nothing was asked of the Hub
    missing = cli("push", str(packed), "--repo", REPO, "--compare", str(tmp_path / "no.json"))
    assert_one_line_error(missing, "no.json", "does not exist")
