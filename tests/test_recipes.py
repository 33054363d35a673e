"""recipes/: every file validates, round-trips unchanged, is what `liftq plan` writes today,
and is embedded verbatim in the model card."""

import json
import shlex
from pathlib import Path

import pytest

from liftq_cli.hub.card import BaseInfo, render_card
from liftq_cli.hub.folder import read_folder
from liftq_cli.recipe import dumps, load, loads
from tests.hub.fixtures import make_quantized_folder

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FILES = sorted(RECIPES.glob("*.yaml"))


def plan_commands() -> dict[str, list[str]]:
    """recipe file name -> the `liftq plan` arguments recipes/README.md documents for it."""
    commands = {}
    for line in (RECIPES / "README.md").read_text().splitlines():
        if line.startswith("liftq plan "):
            args = shlex.split(line)[1:]
            target = args[args.index("--write-recipe") + 1]
            commands[Path(target).name] = args
    return commands


def test_the_headline_cases_and_the_demo_are_there():
    names = {f.name for f in FILES}
    assert {"llama-3-70b-24gb.yaml", "qwen2.5-32b-12gb.yaml", "smollm2-135m-demo.yaml"} <= names
    assert set(plan_commands()) == names  # every recipe has its command, and only those


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_recipe_validates_and_round_trips(path):
    text = path.read_text()
    recipe = load(path)
    assert dumps(recipe) == text
    assert loads(dumps(recipe)) == recipe
    assert recipe.predicted_bytes <= recipe.vram_bytes


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_recipe_is_what_liftq_plan_writes(path, cli, tmp_path):
    args = plan_commands()[path.name]
    fresh = tmp_path / path.name
    args[args.index("--write-recipe") + 1] = str(fresh)
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    assert fresh.read_text() == path.read_text(), (
        f"{path.name} is stale: re-run `liftq {shlex.join(plan_commands()[path.name])}`"
    )
    assert json.loads(result.stdout)["config"] == load(path).config.name


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_recipe_is_embedded_in_the_model_card(path, tmp_path):
    folder = make_quantized_folder(tmp_path / "q")
    meta = json.loads((folder / "liftq.json").read_text())
    meta["recipe"] = path.read_text()
    (folder / "liftq.json").write_text(json.dumps(meta))
    card = render_card(read_folder(folder), BaseInfo(None))
    assert f"```yaml\n{path.read_text()}```" in card
