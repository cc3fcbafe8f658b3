"""engine=mpi: real PS and worker processes; same trajectory as engine=local; survives hostile workers."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli, make_cfg, read_metrics, run_job

from detox.mpi import BLOSC_HEADER, decode_gradient, launch_command

pytestmark = [pytest.mark.mpi, pytest.mark.slow]  # 40-80 s a test: MPI worlds start slowly on 2 cores

SMALL = ["workers=6", "worker_fail=1", "group_size=3", "max_steps=8", "eval_freq=4", "threads=1",
         "save_model=true"]
COMPARED = ("step", "samples", "train_loss", "test_loss", "test_acc", "test_acc5", "corrupted_groups",
            "vote_fallbacks", "byzantine_workers")


def assert_same_trajectory(a: Path, b: Path) -> None:
    ma, mb = read_metrics(a), read_metrics(b)
    assert len(ma) == len(mb)
    for ra, rb in zip(ma, mb, strict=True):
        for k in COMPARED:
            if isinstance(ra[k], float):
                assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (k, ra["step"])
            else:
                assert ra[k] == rb[k], (k, ra["step"])
    wa, wb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compress", ["null", "blosc"])
@pytest.mark.parametrize(
    "job",
    [
        ["approach=baseline", "mode=coord-median", "err_mode=rev_grad", "dataset.augment=crop-flip"],
        ["approach=draco-lite", "mode=mean", "err_mode=alie", "adversary.placement=worst", "worker_fail=2"],
    ],
    ids=["baseline-rev_grad", "draco-lite-alie-worst"],
)
def test_mpi_matches_local_step_by_step(job: list[str], compress: str, tmp_path: Path) -> None:
    local = run_job([*SMALL, *job], tmp_path / "local")
    mpi = run_job([*SMALL, *job, "engine=mpi", f"engine.compress={compress}"], tmp_path / "mpi")
    assert local["status"] == mpi["status"] == "completed", mpi.get("error")
    assert_same_trajectory(tmp_path / "local", tmp_path / "mpi")
    records = read_metrics(tmp_path / "mpi")[1:]
    assert all(r["t_comm"] > 0 and r["t_compute"] > 0 for r in records)  # measured for real
    assert (tmp_path / "mpi" / "mpi.log").read_text().startswith("$ ")
    if "worst" in " ".join(job):
        assert all(r["corrupted_groups"] == 1 for r in records)  # PS-side attack, placement as in local


@pytest.mark.parametrize(
    ("compress", "faults"),
    [
        ("null", "[{rank: 1, kind: random_bytes}, {rank: 4, kind: pickle}, {rank: 8, kind: wrong_length, step: 3}]"),
        ("blosc", "[{rank: 2, kind: bad_blosc}, {rank: 6, kind: float64}, {rank: 9, kind: empty, step: 5}]"),
    ],
    ids=["raw", "blosc"],
)
def test_mpi_ps_survives_garbage_and_counts_it(compress: str, faults: str, tmp_path: Path) -> None:
    # one garbage sender per group: every vote still has an honest majority, so training is unaffected
    job = ["workers=9", "worker_fail=0", "mode=mean", "max_steps=8", "eval_freq=4", "threads=1",
           "save_model=true"]
    run_job(job, tmp_path / "local")
    mpi = run_job([*job, "engine=mpi", f"engine.compress={compress}", f"engine.faults={faults}"], tmp_path / "mpi")
    assert mpi["status"] == "completed", mpi.get("error")
    starts = [int(s) for s in re.findall(r"step: (\d+)", faults)]
    expected = sum(8 - s for s in starts) + (3 - len(starts)) * 8
    assert mpi["malformed_messages"] == expected
    assert_same_trajectory(tmp_path / "local", tmp_path / "mpi")


def test_mpi_worker_exit_fails_cleanly(tmp_path: Path) -> None:
    t0 = time.monotonic()
    proc = cli(["engine=mpi", "workers=6", "worker_fail=0", "mode=mean", "max_steps=50", "engine.timeout=30",
                "engine.faults=[{rank: 2, kind: exit, step: 2}]", f"hydra.run.dir={tmp_path}"], cwd=ROOT)
    assert proc.returncode == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and "rank 2" in summary["error"]
    assert time.monotonic() - t0 < 90


def test_mpi_worker_hang_fails_within_timeout(tmp_path: Path) -> None:
    summary = run_job(["engine=mpi", "workers=6", "worker_fail=0", "mode=mean", "max_steps=50", "engine.timeout=4",
                       "engine.faults=[{rank: 5, kind: hang, step: 3}]"], tmp_path, multirun=True)
    assert summary["status"] == "failed"
    assert "rank(s) [5]" in summary["error"] and "engine.timeout=4" in summary["error"]
    assert (tmp_path / "metrics.jsonl").exists()  # what was measured before the hang is kept


def test_mpi_multirun_each_job_its_own_world(tmp_path: Path) -> None:
    proc = cli(["-m", "engine=mpi", "workers=3", "worker_fail=0", "mode=mean", "max_steps=3", "eval_freq=3",
                "seed=0,1", f"hydra.sweep.dir={tmp_path}"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "summary.jsonl").read_text().splitlines()]
    # job folders are named by the sweep's naming scheme (numbers or overrides): only their content matters here
    assert sorted((x["status"], x["seed"]) for x in lines) == [("completed", 0), ("completed", 1)]
    assert len({x["dir"] for x in lines}) == 2 and all((Path(x["dir"]) / "mpi.log").exists() for x in lines)
    # start-up is not silent: each stage is echoed as it happens, in order, for each job
    out = proc.stdout + proc.stderr
    stages = ["engine=mpi: starting 4 ranks", "engine=mpi: 4 ranks started", "data and network=fc ready on the PS",
              "step 0: all 3 workers answered"]
    assert all(out.count(stage) == 2 for stage in stages), out[-3000:]
    first = [out.index(stage) for stage in stages]
    assert first == sorted(first)


def test_decode_gradient_bounds_every_message() -> None:
    import blosc

    row = np.zeros(1000, dtype=np.float32)
    g = np.arange(1000, dtype=np.float32)
    assert decode_gradient(g.tobytes(), row, None) and np.array_equal(row, g)
    assert not decode_gradient(g.tobytes()[:-4], row, None)
    assert not decode_gradient(g.astype(np.float64).tobytes(), row, None)
    packed = blosc.compress(g.tobytes(), typesize=4, cname="lz4")
    row[:] = 0
    assert decode_gradient(packed, row, "blosc") and np.array_equal(row, g)
    # a header that claims 4 GB is refused before blosc allocates anything
    huge = bytearray(packed)
    BLOSC_HEADER.pack_into(huge, 0, 2, 1, 1, 4, 2**32 - 1, 4000, len(packed))
    assert not decode_gradient(bytes(huge), row, "blosc")
    assert not decode_gradient(packed[:10], row, "blosc")
    corrupt = bytearray(packed)
    corrupt[20:60] = bytes(40)
    assert decode_gradient(bytes(corrupt), row, "blosc") in (True, False)  # never raises


def test_launch_command_uses_hostfile_and_mpi4py(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("10.0.0.1 slots=1\n10.0.0.2 slots=8\n")
    cfg = make_cfg(["engine=mpi", "workers=6", f"engine.hostfile={hosts}", "engine.launcher_args=[--bind-to,none]"])
    cmd = launch_command(cfg, tmp_path)
    assert cmd[1:3] == ["--bind-to", "none"] and cmd[cmd.index("-n") + 1] == "7"
    assert cmd[cmd.index("--hostfile") + 1] == str(hosts)
    assert cmd[-5:] == ["-m", "mpi4py", "-m", "detox.mpi", str(tmp_path)]
    # with a hostfile: hosts filled in file order (plain --oversubscribe maps every rank to the first host), and
    # PYTHONUNBUFFERED reaches the ranks on other hosts
    assert cmd[cmd.index("--map-by") + 1] == "slot" and cmd[cmd.index("-x") + 1] == "PYTHONUNBUFFERED"
    own = launch_command(make_cfg(["engine=mpi", "workers=6", f"engine.hostfile={hosts}",
                                   "engine.launcher_args=[--map-by,ppr:2:node]"]), tmp_path)
    assert own.count("--map-by") == 1 and own[own.index("--map-by") + 1] == "ppr:2:node"  # the user's mapping
    alone = launch_command(make_cfg(["engine=mpi", "workers=6"]), tmp_path)
    assert "--map-by" not in alone and "-x" not in alone  # one host: the command is as before
