"""The quality bench's rows: ids, table order and the --rows selection."""

from __future__ import annotations

import pytest
from bench.quality_specs import FINETUNE_STEPS, all_specs, select


def test_row_ids_are_unique_and_fp_comes_first():
    ids = [s.id for s in all_specs()]
    assert len(ids) == len(set(ids)) and ids[0] == "fp"
    assert {"rtn-b2-g64", "gptq-b3-g64", "llamacpp-IQ2_XS", "liftq-3.0-mixed-ft96"} <= set(ids)
    assert {"liftq-2.4-mixed", "liftq-2.4-mixed-ft", "liftq-2.4-mixed-ft96"} <= set(ids)


def test_liftq_rows_carry_their_cli_settings():
    specs = {s.id: s for s in all_specs()}
    assert specs["liftq-2.4"].target_bits == 2.4 and specs["liftq-2.4"].finetune_steps == 0
    assert specs["liftq-2.4-ft"].finetune_steps == FINETUNE_STEPS
    long = specs["liftq-3.0-mixed-ft96"]
    assert (long.mixed, long.finetune_steps, long.finetune_lr) == (True, 96, 2e-3)
    mixed = specs["liftq-2.4-mixed-ft"]
    assert (mixed.target_bits, mixed.mixed, mixed.finetune_steps) == (2.4, True, FINETUNE_STEPS)


def test_select_by_glob_or_method():
    specs = all_specs()
    assert select(specs, None) == specs
    assert {s.method for s in select(specs, "hqq, fp")} == {"hqq", "fp"}
    assert [s.id for s in select(specs, "rtn-b4-*")] == ["rtn-b4-g64", "rtn-b4-g128"]
    with pytest.raises(SystemExit, match="matches no row"):
        select(specs, "nothing-*")
