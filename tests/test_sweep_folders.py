"""Nothing lost (issue #10 items 3-5 and 9): sweep job folders are tied to their config, locked while a run owns
them, never written by another config; foreign checkpoint files are ignored with one warning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli, make_cfg, read_metrics, run_job

from detox.results import job_dir_name, job_dirs, write_sweep_summary
from detox.trainer import CHECKPOINT, METRIC_KEYS

# the README's figure-sweep layout on digits: a sweep file with swept methods and attacks, a fixed sweep dir
SWEEP_FILE = """
defaults:
  - config
  - _self_
figure: T
max_steps: {steps}
eval_freq: {steps}
hydra:
  sweep:
    dir: {root}
    subdir: ${{detox.job_dir:${{hydra.job.override_dirname}}}}
  sweeper:
    params:
      method: vanilla-multi-krum,detox-multi-krum
      err_mode: rev_grad,constant
"""


def _sweep(tmp_path: Path, *extra: str, steps: int = 4, wait: bool = True, env: dict | None = None):
    conf = tmp_path / "sweeps"
    conf.mkdir(exist_ok=True)
    (conf / "fig_t.yaml").write_text(SWEEP_FILE.format(root=tmp_path / "root", steps=steps))
    args = [sys.executable, "-m", "detox.train", "-m", "--config-dir", str(conf), "--config-name", "fig_t", *extra]
    if not wait:
        return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env)
    return subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
                          env=env)


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name in ("summary.json", "metrics.jsonl", "resolved_config.yaml")}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_job_folder_names() -> None:
    assert job_dir_name("") == "default"
    assert job_dir_name("err_mode=alie,method=detox-bulyan") == "err_mode=alie,method=detox-bulyan"
    # path separators and shell characters never make nested or odd folders; the hash keeps names distinct
    a, b = job_dir_name("data_root=/a/b"), job_dir_name("data_root=_a_b")
    assert "/" not in a and a != b and a.startswith("data_root=_a_b-")
    assert job_dir_name("x='a b*'") != job_dir_name("x='a_b_'")
    long = job_dir_name("lr=" + "1" * 400)
    assert len(long) <= 161 and long != job_dir_name("lr=" + "1" * 399)
    assert job_dir_name("..") not in (".", "..")


@pytest.mark.slow
def test_narrowing_a_finished_sweep_adds_a_job_and_overwrites_nothing(tmp_path: Path) -> None:
    """The README's "narrow it" command once replaced job 0 of a finished sweep (numbered folders)."""
    first = _sweep(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:]
    root = tmp_path / "root"
    before = _snapshot(root)
    assert len([d for d in job_dirs(root)]) == 4
    narrow = _sweep(tmp_path, "method=detox-multi-krum", "err_mode=alie")
    assert narrow.returncode == 0, narrow.stdout[-3000:]
    after = _snapshot(root)
    assert {k: after[k] for k in before} == before  # every finished job's files byte for byte
    names = sorted(d.name for d in job_dirs(root))
    assert names == sorted(["err_mode=alie,method=detox-multi-krum", "err_mode=constant,method=detox-multi-krum",
                            "err_mode=constant,method=vanilla-multi-krum", "err_mode=rev_grad,method=detox-multi-krum",
                            "err_mode=rev_grad,method=vanilla-multi-krum"])
    lines = _jsonl(root / "summary.jsonl")
    assert sorted(x["job"] for x in lines) == names  # exactly the jobs of the root, each once
    for x in lines:
        job = root / x["job"]
        assert x["status"] == "completed"
        assert x["choices"]["err_mode"] in x["job"] and x["choices"]["method"] in x["job"]
        assert json.loads((job / "summary.json").read_text())["choices"] == x["choices"]
    # a full rerun skips all of them
    again = _sweep(tmp_path)
    assert again.returncode == 0 and again.stdout.count("skipping") == 4
    assert {k: _snapshot(root)[k] for k in before} == before


@pytest.mark.slow
def test_two_sweeps_into_one_folder_never_run_a_job_twice(tmp_path: Path) -> None:
    a = _sweep(tmp_path, steps=60, wait=False)
    time.sleep(1.0)
    b = _sweep(tmp_path, steps=60, wait=False)
    out_a, _ = a.communicate(timeout=600)
    out_b, _ = b.communicate(timeout=600)
    assert a.returncode == 0 and b.returncode == 0, out_a[-2000:] + out_b[-2000:]
    root = tmp_path / "root"
    for job in job_dirs(root):
        steps = [r["step"] for r in read_metrics(job)]
        assert steps == sorted(set(steps)) == [0, 60], (job, steps)  # every record once
        summary = json.loads((job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["max_steps"] == 60
        resolved = (job / "resolved_config.yaml").read_text()
        assert "max_steps: 60" in resolved and f"name: {summary['choices']['err_mode']}" in resolved
    # each job ran in exactly one of the two sweeps; the other said so
    ran = (out_a + out_b).count("step    60 |")
    assert ran == 4, out_a + out_b
    assert (out_a + out_b).count("skipping") == 4
    lines = _jsonl(root / "summary.jsonl")
    assert len(lines) == 4 and len({x["job"] for x in lines}) == 4


def _every_file(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (Hydra's .hydra/ and the job log included) except the lock file, whose bytes are
    the pid of whoever held it last."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_a_folder_of_another_config_is_never_written(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert cli(["max_steps=4", "eval_freq=2", f"hydra.run.dir={run_dir}"], cwd=ROOT).returncode == 0
    before = _every_file(run_dir)
    assert {".hydra/config.yaml", ".hydra/overrides.yaml", "train.log", "summary.json"} <= set(before)
    other = cli(["max_steps=4", "eval_freq=2", "lr=0.01", f"hydra.run.dir={run_dir}"], cwd=ROOT)
    assert other.returncode == 2
    assert f"{run_dir} holds a run of a different config" in other.stderr
    assert _every_file(run_dir) == before  # Hydra's .hydra/ and train.log too (they were rewritten and appended to)
    again = cli(["max_steps=4", "eval_freq=2", f"hydra.run.dir={run_dir}"], cwd=ROOT)  # the same config: skipped
    assert again.returncode == 0 and "already holds a completed run" in again.stdout + again.stderr
    after = _every_file(run_dir)
    assert after.pop("train.log").startswith(before.pop("train.log")) and after == before  # its log says it skipped


@pytest.mark.slow
def test_a_sweep_refused_by_another_configs_folder_says_so_and_writes_nothing(tmp_path: Path) -> None:
    """A sweep of another figure into a finished sweep's root once rewrote the finished jobs' .hydra/ and then
    reported them as its own completed jobs, exit 0."""
    assert _sweep(tmp_path, "method=detox-multi-krum", "err_mode=rev_grad").returncode == 0
    root = tmp_path / "root"
    before = _every_file(root)
    # another config in the same folder name: data_root comes from the environment, not an override
    other = _sweep(tmp_path, "method=detox-multi-krum", "err_mode=rev_grad",
                   env={**os.environ, "DETOX_DATA": str(tmp_path / "data")})
    assert other.returncode == 1, other.stdout[-2000:]  # none of its jobs ran
    assert f"detox: sweep {root}: 1 jobs: 0 completed, 0 failed, 1 refused" in other.stdout
    assert "  refused: err_mode=rev_grad,method=detox-multi-krum: ConfigError: " in other.stdout
    after = _every_file(root)
    after.pop("multirun.yaml"), before.pop("multirun.yaml")  # the root's record of the last sweep: rewritten
    assert after.pop("summary.jsonl") == before.pop("summary.jsonl")  # the folder's content did not change
    assert after == before and not (root / ".refused").exists()


@pytest.mark.slow
def test_the_same_config_spelled_differently_runs_once(tmp_path: Path) -> None:
    """Folders are named by the overrides as typed: lr=0.05 (the default) or a value quoted another way once made
    a second folder and a second run of one config, which the tables then counted as another seed."""
    assert _sweep(tmp_path, "method=detox-multi-krum", "err_mode=rev_grad").returncode == 0
    root = tmp_path / "root"
    before = _every_file(root)
    for spelled in (["lr=0.05"], ["data_root='~/.cache/detox/data'"], ["lr=0.05", "threads=1"]):
        again = _sweep(tmp_path, "method=detox-multi-krum", "err_mode=rev_grad", *spelled,
                       env={**os.environ, "DETOX_DATA": "~/.cache/detox/data"})
        assert again.returncode == 0, again.stdout[-2000:]
        assert "step     4 |" not in again.stdout and "spelled differently" in again.stdout, spelled
        assert [d.name for d in job_dirs(root)] == ["err_mode=rev_grad,method=detox-multi-krum"]
        assert "1 jobs: 1 completed, 0 failed" in again.stdout
    after = _every_file(root)
    for name in ("multirun.yaml", "summary.jsonl", "err_mode=rev_grad,method=detox-multi-krum/train.log"):
        after.pop(name), before.pop(name)
    assert after == before


def test_a_job_running_in_another_sweep_is_reported_running(tmp_path: Path) -> None:
    """The first of two sweeps into one root to finish once reported the other's running job as failed."""
    from detox.results import job_lock, read_summary

    job = tmp_path / "root" / "seed=1"
    job.mkdir(parents=True)
    (job / "resolved_config.yaml").write_text("seed: 1\n")
    with job_lock(job):
        assert read_summary(job)["status"] == "running"
        write_sweep_summary(tmp_path / "root")
        assert _jsonl(tmp_path / "root" / "summary.jsonl")[0]["status"] == "running"
    assert read_summary(job)["status"] == "failed"  # no summary and nobody running it: it died


@pytest.mark.slow
def test_a_running_job_is_locked_and_the_lock_dies_with_its_process(tmp_path: Path) -> None:
    from detox.results import job_lock

    run_dir = tmp_path / "run"
    job = ["max_steps=100000", "eval_freq=1000", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "detox.train", *job], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        records = (run_dir / "metrics.jsonl").read_text()
        busy = cli(job, cwd=ROOT)
        assert busy.returncode == 0
        assert f"skipping: {run_dir} is being run by another process (pid {proc.pid})" in busy.stdout + busy.stderr
        assert (run_dir / "metrics.jsonl").read_text().startswith(records)  # the second run wrote nothing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with job_lock(run_dir):  # raises JobBusy if the killed process still held it
        pass


def test_sweep_summary_is_written_atomically(tmp_path: Path) -> None:
    for i in range(20):
        (tmp_path / f"job{i}").mkdir()
        (tmp_path / f"job{i}" / "summary.json").write_text(json.dumps({"status": "completed", "pad": "x" * 5000}))
    errors: list[str] = []

    def writer() -> None:
        for _ in range(30):
            write_sweep_summary(tmp_path)

    def reader() -> None:
        end = time.monotonic() + 3
        while time.monotonic() < end:
            text = (tmp_path / "summary.jsonl").read_text() if (tmp_path / "summary.jsonl").exists() else ""
            if text and len(text.splitlines()) != 20:
                errors.append(f"{len(text.splitlines())} lines")

    threads = [threading.Thread(target=writer) for _ in range(3)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["summary.jsonl"]  # no temporary left


# ------------------------------------------------------------------------------------------ foreign checkpoints

JOB = ["max_steps=30", "eval_freq=10", "checkpoint.every=10"]


def _valid_state() -> dict:
    from detox.approaches import plan_from_cfg
    from detox.trainer import setup

    cfg = make_cfg(JOB)
    s = setup(cfg, plan_from_cfg(cfg))
    record = dict.fromkeys(METRIC_KEYS, 0.0) | {"step": 10}
    return {"w": s.w_d.clone(), "v": torch.zeros_like(s.w_d), "torch_rng": torch.get_rng_state(),
            "records": [record], "wall": 1.0, "cluster": 1.0, "malformed": 0}


def _bad_rng(state: dict) -> dict:
    rng = state["torch_rng"].clone()
    rng.zero_()
    return {**state, "torch_rng": rng}


FOREIGN = {
    "a list": lambda s: [1, 2, 3],
    "a tensor": lambda s: torch.zeros(3),
    "missing keys": lambda s: {k: v for k, v in s.items() if k != "records"},
    "empty records": lambda s: {**s, "records": []},
    "records not dicts": lambda s: {**s, "records": [1, 2]},
    "steps past max_steps": lambda s: {**s, "records": [{**s["records"][0], "step": 10_000}]},
    "wrong weight shape": lambda s: {**s, "w": torch.zeros(5)},
    "wrong weight dtype": lambda s: {**s, "v": s["v"].double()},
    "rng of the wrong size": lambda s: {**s, "torch_rng": torch.zeros(3, dtype=torch.uint8)},
    "rng not bytes": lambda s: {**s, "torch_rng": s["torch_rng"].float()},
    "bad rng content": _bad_rng,
    "nan wall time": lambda s: {**s, "wall": float("nan")},
    "negative malformed": lambda s: {**s, "malformed": -1},
}


@pytest.mark.parametrize("kind", [*FOREIGN, "garbage bytes", "a directory"])
def test_a_foreign_checkpoint_is_ignored_with_one_warning(kind: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from detox.results import resolved_yaml

    path = tmp_path / CHECKPOINT
    if kind == "garbage bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "a directory":
        path.mkdir()
    else:
        state = FOREIGN[kind](_valid_state())
        if isinstance(state, dict):  # written with this config's text: only the content makes it foreign
            state["config"] = resolved_yaml(make_cfg(JOB))
        torch.save(state, path)
    with caplog.at_level("WARNING", logger="detox"):
        summary = run_job(JOB, tmp_path)
    assert summary["status"] == "completed"
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 10, 20, 30]  # started over
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and CHECKPOINT in warnings[0] and "\n" not in warnings[0], warnings


def test_the_valid_state_of_these_tests_resumes(tmp_path: Path) -> None:
    """The foreign variants above differ from a resumable checkpoint only in what each one breaks."""
    from detox.results import resolved_yaml

    torch.save({**_valid_state(), "config": resolved_yaml(make_cfg(JOB))}, tmp_path / CHECKPOINT)
    run_job(JOB, tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30]  # resumed after the step-10 record


@pytest.mark.slow
def test_a_sweep_ends_with_its_table_and_fails_when_no_job_ran(tmp_path: Path) -> None:
    mixed = cli(["-m", "lr=0.05,inf", "max_steps=2", "eval_freq=2", f"hydra.sweep.dir={tmp_path / 'mixed'}"],
                cwd=ROOT)
    assert mixed.returncode == 0, mixed.stderr[-2000:]
    assert f"detox: sweep {tmp_path / 'mixed'}: 2 jobs: 1 completed, 1 failed; table: " \
           f"{tmp_path / 'mixed' / 'summary.jsonl'}" in mixed.stdout
    assert "  failed: eval_freq=2,lr=inf,max_steps=2: ConfigError: lr=inf: must be a finite number > 0" in mixed.stdout
    none = cli(["-m", "lr=nan,inf", "max_steps=2", f"hydra.sweep.dir={tmp_path / 'none'}"], cwd=ROOT)
    assert none.returncode == 1  # every job failed: a script running the sweep must notice
    assert "2 jobs: 0 completed, 2 failed" in none.stdout
    assert len(_jsonl(tmp_path / "none" / "summary.jsonl")) == 2


def test_a_sweep_with_save_false_reports_no_failures(tmp_path: Path) -> None:
    """save=false: the jobs write no summary.json, so the sweep used to list every finished job as failed (exit 0)."""
    out = cli(["-m", "save=false", "seed=0,1", "max_steps=2", "eval_freq=2", f"hydra.sweep.dir={tmp_path}"], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"detox: sweep {tmp_path}: save=false: its jobs wrote no results" in out.stdout
    assert "failed" not in out.stdout and not (tmp_path / "summary.jsonl").exists()
    # all file output hangs on save: Hydra's .hydra/ and job log are not written, the empty job folders go
    assert [p.name for p in tmp_path.iterdir()] == ["multirun.yaml"]


def test_a_run_with_save_false_leaves_nothing(tmp_path: Path) -> None:
    """save=false wrote no results but left Hydra's outputs/<date>/<time>/ with .hydra/ and train.log behind."""
    (tmp_path / "outputs" / "earlier").mkdir(parents=True)
    out = cli(["save=false", "max_steps=2", "eval_freq=2"], cwd=tmp_path)
    assert out.returncode == 0 and "(save=false: nothing written)" in out.stdout, out.stderr[-2000:]
    assert [p.relative_to(tmp_path).as_posix() for p in sorted(tmp_path.rglob("*"))] == ["outputs",
                                                                                          "outputs/earlier"]
    deep = tmp_path / "a" / "b"
    assert cli(["save=false", "max_steps=2", "eval_freq=2", f"hydra.run.dir={deep}"], cwd=tmp_path).returncode == 0
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("value, says", [("${oc.env:DETOX_NO_SUCH_VARIABLE}", "Environment variable"),
                                         ("", "empty"), (" ", "empty"), ("{tmp}/x\tb", "control characters"),
                                         ("{tmp}/file", "is a file"), ("{tmp}/file/run", "file is a file")])
def test_an_output_folder_that_cannot_be_made_is_refused(value: str, says: str, tmp_path: Path) -> None:
    """hydra.run.dir= (empty) once wrote the run's files into the current folder; a file on the way, or an
    interpolation that does not resolve, ended in a traceback after Hydra had started."""
    from omegaconf import OmegaConf

    from detox.config import ConfigError
    from detox.train import check_output_folder

    (tmp_path / "file").write_text("x")
    config = OmegaConf.create({"hydra": {"run": {"dir": value.replace("{tmp}", str(tmp_path))}}})
    with pytest.raises(ConfigError, match=f"hydra.run.dir.*{says}"):
        check_output_folder(config, "hydra.run.dir")
    check_output_folder(OmegaConf.create({"hydra": {"run": {"dir": str(tmp_path / "new" / "run")}}}),
                        "hydra.run.dir")


@pytest.mark.parametrize("key", ["hydra.run.dir", "hydra.sweep.dir"])
def test_a_run_or_sweep_into_an_empty_folder_name_is_refused_in_one_line(key: str, tmp_path: Path) -> None:
    proc = cli([*(["-m"] if "sweep" in key else []), "max_steps=2", f"{key}="], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == f"detox: error: {key}='': empty; give the folder for " \
                                                          f"the run's output", proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written where it was started


def test_an_output_folder_under_a_read_only_one_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A sweep (either launcher) or run under a read-only mount was Hydra's mkdir traceback, exit 1. The check is
    access(2), which says no even to root on a read-only file system (seen with `mount -o ro`); simulated here for
    the folder that exists, since a test cannot count on mounting."""
    from omegaconf import OmegaConf

    from detox.config import ConfigError
    from detox.train import check_output_folder

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep" / "deeper")}}})
    with pytest.raises(ConfigError, match=rf"^hydra.sweep.dir={tmp_path}/sweep/deeper: {tmp_path} is not writable"):
        check_output_folder(config, "hydra.sweep.dir")
    monkeypatch.setattr(os, "access", real_access)
    check_output_folder(config, "hydra.sweep.dir")
