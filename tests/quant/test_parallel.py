"""Several processes, one quantize job (quant/parallel.py, quant/stats.py): the same codes
and scales byte for byte as one process, with `--nproc` and with torchrun; a killed rank
fails the job in one line and the rerun resumes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.helpers import calibration_text, tiny_llama_folder
from tests.quant.test_job_digest import canonical, digest

from liftq_cli.errors import BadInputError
from liftq_cli.quant.costmodel import assign
from liftq_cli.quant.parallel import SOLO, Ranks, Team
from liftq_cli.quant.stats import TreeSum, batch_ranges, complete, range_nodes

BIN = Path(sys.executable).parent
ARGS = ["--nsamples", "6", "--seqlen", "32", "--config", "LQ-24/10", "--whiten-steps", "2"]
ARGS += ["--correction-steps", "20"]


# -- the fixed tree: any split of the batches sums in one order


@pytest.mark.parametrize("world", [1, 2, 3, 5, 7])
def test_tree_sum_is_the_same_for_any_number_of_ranks(world):
    torch.manual_seed(0)
    batches = 11
    leaves = [
        (torch.randn(3, 3, dtype=torch.float64) * 10**k, torch.randn(3).double(), torch.tensor(k))
        for k in range(batches)
    ]
    one = TreeSum()
    for i, leaf in enumerate(leaves):
        one.push(i, leaf)
    reference = complete(dict(one.stack), batches)
    nodes = {}
    for lo, hi in batch_ranges(batches, world):
        part = TreeSum()
        for i in range(lo, hi):
            part.push(i, leaves[i])
        assert [n for n, _ in part.stack] == range_nodes(lo, hi)
        nodes.update(dict(part.stack))
    total = complete(nodes, batches)
    assert torch.equal(total[0], reference[0]) and torch.equal(total[1], reference[1])
    # and it is not the naive left-to-right sum's bits by accident of a tiny case
    assert len(range_nodes(0, batches)) == 3  # 8 + 2 + 1


def test_team_splits_whole_batches_and_refuses_more_ranks_than_batches():
    team = Team(Ranks(1, 3), batch=2, windows=9)  # 5 batches: 2, 2, 1
    assert team.ranges == [(0, 2), (2, 4), (4, 5)]
    assert team.counts == [4, 4, 1]
    assert team.rows() == slice(4, 8) and team.first_batch == 2
    assert Team(SOLO, 2, 9).counts == [9]
    with pytest.raises(BadInputError, match="4 processes but only 3 calibration batches"):
        Team(Ranks(0, 4), batch=2, windows=6)


def test_owners_balance_cost_largest_first():
    costs = {"down": 8.0, "up": 4.0, "gate": 4.0, "q": 1.0, "k": 0.5, "v": 0.5}
    owner = assign(costs, 2)
    load = [sum(c for n, c in costs.items() if owner[n] == r) for r in range(2)]
    assert owner["down"] == 0 and owner["up"] == 1 and owner["gate"] == 1
    assert max(load) - min(load) <= max(costs.values())
    assert set(assign(costs, 1).values()) == {0}


# -- real processes


def _model(tmp_path: Path, smollm2_folder: Path, layers: int = 2) -> tuple[Path, list[str]]:
    folder = tiny_llama_folder(tmp_path / "tiny", smollm2_folder, layers=layers)
    return folder, ["--calib", str(calibration_text(tmp_path)), *ARGS]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "CI": "1"}


def _liftq(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "liftq"), *args], env=_env(), capture_output=True, text=True, **kw
    )


@pytest.mark.slow
def test_two_processes_give_one_process_codes_byte_for_byte(tmp_path, smollm2_folder):
    folder, args = _model(tmp_path, smollm2_folder)
    # one thread per process everywhere: on the CPU torch's reductions split by thread, so
    # the contract is the same codes at the same threads per process
    one = _liftq("quantize", str(folder), "--out", str(tmp_path / "one"), *args)
    assert one.returncode == 0, one.stderr
    two = _liftq("quantize", str(folder), "--out", str(tmp_path / "two"), *args, "--nproc", "2")
    assert two.returncode == 0, two.stderr
    assert "quantised" in two.stdout and two.stdout.count("block 2/2") == 1  # rank 0 reports
    run = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--standalone", "-m", "liftq_cli"]
    torchrun = subprocess.run(
        [*run, "quantize", str(folder), "--out", str(tmp_path / "torchrun"), *args],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert torchrun.returncode == 0, torchrun.stderr
    three = _liftq("quantize", str(folder), "--out", str(tmp_path / "three"), *args, "--nproc", "3")
    assert three.returncode == 0, three.stderr
    reference = canonical(tmp_path / "one")
    blocks = [(tmp_path / "one" / "liftq.json").read_text()]
    assert any(n.endswith(".codes") for n in reference)
    for name in ("two", "torchrun", "three"):
        assert digest(canonical(tmp_path / name)) == digest(reference), name
        blocks.append((tmp_path / name / "liftq.json").read_text())
    # correction did train (so the broadcast of trained latents is what is being compared)
    assert '"mse_after"' in blocks[0]


def _workers(launcher: int) -> list[int]:
    """The pids of a `--nproc` launcher's worker processes, in start order (rank order)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == launcher and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_rank_fails_in_one_line_and_the_rerun_resumes(tmp_path, smollm2_folder):
    folder, args = _model(tmp_path, smollm2_folder, layers=6)
    out = tmp_path / "q"
    command = [str(BIN / "liftq"), "quantize", str(folder), "--out", str(out), *args]
    job = subprocess.Popen(
        [*command, "--nproc", "2"], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    work = tmp_path / ".q.work"
    deadline = time.monotonic() + 120
    while not (work / "block_0000.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = _workers(job.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 4, stderr
    lines = [line for line in stderr.decode().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(r"rank \d of 2 died", lines[0]) and "rerun" in lines[0], (
        stderr
    )
    assert not out.exists()
    done = len(list(work.glob("block_*.safetensors")))
    assert 1 <= done < 6
    rerun = subprocess.run([*command, "--nproc", "2"], env=_env(), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.count("block 1/6") == 0 or done == 0  # resumed blocks are not redone
    one = _liftq("quantize", str(folder), "--out", str(tmp_path / "one"), *args)
    assert one.returncode == 0, one.stderr
    assert digest(canonical(out)) == digest(canonical(tmp_path / "one"))


@pytest.mark.slow
def test_more_processes_than_batches_is_refused_in_one_line(tmp_path, smollm2_folder):
    folder, args = _model(tmp_path, smollm2_folder)
    result = _liftq("quantize", str(folder), "--out", str(tmp_path / "q"), *args, "--nproc", "4")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "4 processes but only 3 calibration batches" in errors[0]
    assert not (tmp_path / "q").exists()


def test_nproc_is_checked_before_any_work(cli, tmp_path):
    for bad in ("0", "-2", "5000"):
        result = cli("quantize", "smollm2-135m", "--out", str(tmp_path / "q"), "--bits", "2.4",
                     "--nproc", bad)  # fmt: skip
        assert result.exit_code == 2 and "--nproc" in result.output
    result = cli("quantize", "smollm2-135m", "--out", str(tmp_path / "q"), "--bits", "2.4",
                 "--nproc", "2", env={"WORLD_SIZE": "2"})  # fmt: skip
    assert result.exit_code == 2 and "under torchrun" in result.output
    assert not (tmp_path / "q").exists()


@pytest.mark.slow
def test_independent_blocks_farmed_out_round_robin_match_one_process(tmp_path, smollm2_folder):
    folder, args = _model(tmp_path, smollm2_folder, layers=3)
    args = [*args, "--independent", "--nsamples", "2"]  # one batch: farming needs no split
    one = _liftq("quantize", str(folder), "--out", str(tmp_path / "one"), *args)
    assert one.returncode == 0, one.stderr
    two = _liftq("quantize", str(folder), "--out", str(tmp_path / "two"), *args, "--nproc", "2")
    assert two.returncode == 0, two.stderr
    assert [f"block {k}/3" in two.stdout for k in (1, 2, 3)] == [True] * 3
    assert digest(canonical(tmp_path / "two")) == digest(canonical(tmp_path / "one"))
    reports = json.loads((tmp_path / "two" / "liftq.json").read_text())["blocks"]
    assert [r["layer"] for r in reports] == [0, 1, 2]
