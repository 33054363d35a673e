"""Recipe: plan -> recipe -> YAML -> recipe round-trips unchanged; validation."""

from __future__ import annotations

import pytest

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.plan.architectures import linears, resolve_architecture
from liftq_cli.plan.memory import MemorySettings
from liftq_cli.plan.solver import plan_mixed, plan_uniform
from liftq_cli.recipe import FORMAT_VERSION, Recipe, dump, dumps, from_plan, load, loads


@pytest.fixture(scope="module")
def arch():
    return resolve_architecture("llama-3-8b")


def test_uniform_recipe_round_trips(arch, tmp_path):
    plan = plan_uniform(arch, 6_000_000_000, MemorySettings())
    recipe = from_plan(plan, "meta-llama/Meta-Llama-3-8B")
    assert recipe.config == plan.config and recipe.layers == {}
    assert recipe.predicted_bytes == plan.total_bytes and recipe.format_version == FORMAT_VERSION
    text = dumps(recipe)
    assert text.startswith("format_version: 2\nmodel: meta-llama/Meta-Llama-3-8B\n")
    assert loads(text) == recipe and dumps(loads(text)) == text
    target = tmp_path / "sub" / "r.yaml"
    dump(recipe, target)
    dump(recipe, target)  # overwrite in place
    assert load(target) == recipe and target.read_text() == text
    assert [p.name for p in target.parent.iterdir()] == ["r.yaml"]  # no temp file left


def test_mixed_recipe_round_trips_every_linear(arch):
    plan = plan_mixed(arch, 4_200_000_000, MemorySettings())
    recipe = loads(dumps(from_plan(plan, "m")))
    assert recipe.layers  # mixed plans carry overrides
    for spec in linears(arch):
        assert recipe.config_for(spec.layer, spec.kind) == plan.assignment[spec.name]
    assert dumps(recipe) == dumps(from_plan(plan, "m"))


def test_embedding_choices_round_trip_into_the_plan_and_pack(arch):
    """The recipe carries --embed / --lm-head from the plan to `liftq pack` (which reads the
    quantize output's recipe.yaml): any choice loads, round-trips and plans the same bytes."""
    for embed, lm_head in (("int4", "fp16"), ("fp16", "int8"), ("host", "int4")):
        settings = MemorySettings(embed=embed, lm_head=lm_head)
        plan = plan_uniform(arch, 6_000_000_000, settings)
        text = dumps(from_plan(plan, "m"))
        recipe = loads(text)
        assert (recipe.embed, recipe.lm_head) == (embed, lm_head) and dumps(recipe) == text
        again = MemorySettings(embed=recipe.embed, lm_head=recipe.lm_head)
        assert plan_uniform(arch, 6_000_000_000, again).breakdown == plan.breakdown


def test_defaults_fill_optional_fields():
    recipe = loads("format_version: 1\nmodel: x\nconfig: 24/10\nctx: 2048\n")
    assert recipe == Recipe(model="x", config=LatticeConfig(24, 10), ctx=2048)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("format_version: 3\nmodel: x\nconfig: LQ-24/10\nctx: 1\n", "format_version 3"),
        ("model: x\nconfig: LQ-24/10\nctx: 1\n", "format_version None"),
        ("format_version: 1\nmodel: x\nconfig: LQ-24/10\nctx: 1\nbits: 2\n", "unknown field"),
        ("format_version: 1\nmodel: x\nconfig: LQ-9/10\nctx: 1\n", "D must exceed d"),
        ("format_version: 1\nmodel: x\nconfig: q4\nctx: 1\n", "not of the form LQ-D/d"),
        ("format_version: 1\nmodel: x\nconfig: LQ-24/10\nctx: 0\n", "'ctx' = 0"),
        ("format_version: 1\nmodel: x\nconfig: LQ-24/10\nctx: 1\nembed: fp8\n", "embed 'fp8'"),
        ("format_version: 1\nmodel: x\nconfig: LQ-24/10\nctx: 1\nlm_head: host\n", "'host'"),
        (
            "format_version: 1\nmodel: x\nconfig: LQ-24/10\nctx: 1\nlayers: {0: {qkv: LQ-24/10}}\n",
            "layers.0.qkv",
        ),
        ("format_version: 1\nmodel: x\nconfig: [\n", "not valid YAML"),
        ("- 1\n", "not a YAML mapping"),
    ],
)
def test_invalid_recipes(text, fragment):
    with pytest.raises(BadInputError, match="recipe") as info:
        loads(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)
