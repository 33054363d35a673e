"""quantize_job: typed settings validate at construction; the recipe's quantize section maps
onto them one to one, with one-line errors for unknown keys and wrong types."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from liftq_cli.errors import BadInputError
from liftq_cli.lattice_config import LatticeConfig
from liftq_cli.quantize_job import (
    CalibrationSettings,
    CorrectionConfig,
    FinetuneConfig,
    QuantizeJob,
    QuantizeSettings,
    settings_from_dict,
)
from liftq_cli.recipe import FORMAT_VERSION, Recipe, dumps, for_job, loads

CFG = LatticeConfig(24, 10)


def test_defaults_are_todays_cli_defaults():
    s = QuantizeSettings()
    assert (s.calibration.source, s.calibration.nsamples, s.calibration.seqlen) == (
        "wiki",
        64,
        512,
    )
    assert (s.seed, s.whiten_steps, s.ldlq, s.sequential, s.mixed) == (0, 50, True, True, False)
    assert s.correction == CorrectionConfig(
        steps=100, lr_codes=1e-3, lr_scales=6e-3, batch=2, heldout=4, eval_every=20, patience=2
    )
    assert (s.effort, s.whiten_rotations, s.search_beam) == ("default", "fixed", 0)
    assert s.finetune.steps == 0 and s.finetune.calib is None


def test_the_section_maps_one_to_one_and_round_trips():
    settings = QuantizeSettings(
        calibration=CalibrationSettings("corpus.txt", 16, 256),
        seed=7,
        whiten_steps=3,
        ldlq=False,
        sequential=False,
        correction=CorrectionConfig(steps=9, lr_codes=0.0),
        finetune=FinetuneConfig(steps=4, lr=2e-3, seed=7, calib="wiki"),
    )
    data = settings.to_dict()
    top = {f.name for f in fields(QuantizeSettings)}
    assert set(data) == top  # every field is a key, and only those
    assert "seed" not in data["correction"] and "seed" not in data["finetune"]  # derived
    assert settings_from_dict(data) == settings
    recipe = Recipe("m", CFG, quantize=settings)
    assert loads(dumps(recipe)) == recipe and dumps(loads(dumps(recipe))) == dumps(recipe)


def test_a_version_1_recipe_loads_with_todays_defaults():
    old = "format_version: 1\nmodel: m\nconfig: LQ-24/10\nctx: 2048\n"
    recipe = loads(old)
    assert recipe.quantize == QuantizeSettings() and recipe.format_version == FORMAT_VERSION
    with pytest.raises(BadInputError, match="needs format_version 2"):
        loads(old + "quantize: {seed: 1}\n")


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ("{bits: 3}", "quantize has unknown key(s) bits: allowed are calibration, seed"),
        ("{correction: {step: 3}}", "quantize.correction has unknown key(s) step"),
        ("{correction: {seed: 3}}", "unknown key(s) seed"),  # derived from the job seed
        ("{finetune: {sed: 1}}", "quantize.finetune has unknown key(s) sed"),
        ("{seed: abc}", "seed = 'abc' must be an integer"),
        ("{seed: -1}", "seed must be at least 0"),
        ("{whiten_steps: 2.5}", "whiten_steps = 2.5 must be an integer"),
        ("{ldlq: 1}", "ldlq = 1 must be true or false"),
        ("{mixed: 'yes'}", "mixed = 'yes' must be true or false"),
        ("{calibration: wiki}", "quantize.calibration must be a mapping"),
        ("{calibration: {nsamples: 0}}", "calibration.nsamples must be at least 1"),
        ("{calibration: {source: ''}}", "calibration.source = '' must name a text"),
        ("{correction: {lr_codes: .nan}}", "correction.lr_codes must be a finite number"),
        ("{correction: {steps: true}}", "correction.steps = True must be an integer"),
        ("{finetune: {lr: 0}}", "finetune.lr must be a positive finite number"),
        ("[1, 2]", "must be a mapping"),
    ],
)
def test_bad_quantize_sections_are_one_line_errors(section, fragment):
    text = f"format_version: 2\nmodel: m\nconfig: LQ-24/10\nctx: 2048\nquantize: {section}\n"
    with pytest.raises(BadInputError) as info:
        loads(text, "recipe 'r.yaml'")
    message = str(info.value)
    assert "\n" not in message and fragment in message, message
    assert message.startswith("recipe 'r.yaml'"), message


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: QuantizeSettings(whiten_steps=-1), "--whiten-steps -1 is invalid"),
        (lambda: CorrectionConfig(steps=-5), "--correction-steps -5 is invalid"),
        (lambda: FinetuneConfig(steps=-1), "--finetune-steps -1 is invalid"),
        (lambda: FinetuneConfig(lr=float("inf")), "--finetune-lr inf is invalid"),
        (lambda: CalibrationSettings(seqlen=1), "--seqlen 1 is invalid"),
        (lambda: QuantizeSettings(seed=1), "finetune.seed 0 differs from seed 1"),
    ],
)
def test_every_setting_is_checked_when_built(build, fragment):
    with pytest.raises(BadInputError, match=fragment):
        build()


def test_a_job_knows_its_work_dir_and_configs():
    overrides = {1: {"down_proj": LatticeConfig(30, 10)}}
    job = QuantizeJob("m", Path("/x/out"), CFG, layers=overrides)
    assert job.work == Path("/x/.out.work")
    assert job.config_for(1, "down_proj") == LatticeConfig(30, 10)
    assert job.config_for(0, "down_proj") == CFG
    mixed = QuantizeSettings(mixed=True)
    with pytest.raises(BadInputError, match="--mixed chooses every linear's config itself"):
        QuantizeJob("m", Path("/x/out"), CFG, layers=overrides, settings=mixed)


def test_the_runs_recipe_keeps_the_plans_fields_and_takes_the_jobs_settings():
    plan = Recipe("hub/model", CFG, ctx=4096, vram_bytes=10**9, predicted_bytes=9 * 10**8)
    settings = QuantizeSettings(seed=3, finetune=FinetuneConfig(seed=3))
    job = QuantizeJob("/data/model", Path("o"), CFG, settings=settings, recipe=dumps(plan))
    recipe = for_job(job)
    assert recipe.model == "/data/model" and recipe.quantize == settings
    assert (recipe.ctx, recipe.vram_bytes, recipe.predicted_bytes) == (4096, 10**9, 9 * 10**8)
    plain = for_job(QuantizeJob("m", Path("o"), CFG))
    assert plain.vram_bytes is None and plain.quantize == QuantizeSettings()


def test_effort_presets_set_their_values_and_given_keys_win():
    from liftq_cli.quantize_job import EFFORTS

    assert set(EFFORTS) == {"fast", "default", "best"}
    assert QuantizeSettings.preset("default") == QuantizeSettings()
    fast, best = QuantizeSettings.preset("fast"), QuantizeSettings.preset("best", seed=2)
    assert fast.effort == "fast" and fast.calibration.nsamples == 32
    assert (fast.whiten_steps, fast.correction.steps, fast.correction.heldout) == (25, 40, 2)
    assert best.calibration.nsamples == 256 and best.search_beam == 256
    assert best.correction.steps == 500 and best.finetune.steps == 256
    assert best.seed == best.finetune.seed == 2
    # a recipe's keys override its preset's, key by key inside a section
    mixed = settings_from_dict({"effort": "best", "correction": {"steps": 7}})
    assert mixed.correction.steps == 7 and mixed.correction.heldout == 16
    assert mixed.calibration.nsamples == 256
    # every preset is written out whole, so the recipe reproduces it without the table
    again = settings_from_dict(best.to_dict())
    assert again == best


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        ({"effort": "max"}, "effort 'max' is unknown: use fast, default, best"),
        ({"whiten_rotations": "learned"}, "whiten_rotations .*'learned' is unknown: use fixed"),
        ({"search_beam": -1}, "quantize.search_beam -1 is invalid"),
        ({"correction": {"heldout": -1}}, "quantize.correction.heldout -1 is invalid"),
        ({"correction": {"eval_every": 0}}, "quantize.correction.eval_every 0 is invalid"),
    ],
)
def test_bad_effort_and_new_settings_are_one_line_errors(section, fragment):
    with pytest.raises(BadInputError, match=fragment.replace("(", r"\(")) as info:
        settings_from_dict(section)
    assert "\n" not in str(info.value)
