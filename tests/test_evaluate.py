"""The separate evaluator (issue #14 item 1): a run with evaluation=external writes model_step_<t> weights files and
evaluates nothing; ``python -m detox.evaluate`` turns them into exactly the numbers in-loop evaluation gives, as the
files appear or after the run; a file being written is never read; analysis reads eval.jsonl like metrics.jsonl."""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import CONF, ROOT, make_cfg, read_metrics, run_job
from hydra import compose, initialize_config_dir

from detox.config import ConfigError, validate
from detox.evaluate import EVAL_KEYS, EvalError, _quote_paths, evaluate_run
from detox.results import job_lock, lock_held
from detox.trainer import METRIC_KEYS

# the default job (digits, MLP, P = 45, DETOX + Multi-Krum under rev_grad), shortened
RUN = ["max_steps=30", "eval_freq=10"]
STEPS = [0, 10, 20, 30]
EVALUATED = ("step", "epoch", "samples", "test_loss", "test_acc", "test_acc5")
# a batch-norm network: the evaluator must recalibrate the statistics from the same batches as in-loop evaluation
BN_RUN = ["network=vgg11", "dataset=synthetic", "dataset.shape=[3,32,32]", "dataset.train_size=32",
          "dataset.test_size=16", "workers=3", "worker_fail=0", "group_size=3", "mode=mean", "max_steps=4",
          "eval_freq=2", "batch_size=4", "eval_batch_size=8", "bn_calibration_batches=2"]


def evaluator_cfg(overrides: list[str]):  # noqa: ANN201 - a DictConfig
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("evaluate", overrides=overrides)


def evaluate_in_process(overrides: list[str]) -> int:
    return evaluate_run(evaluator_cfg(overrides))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_evaluations(inloop: Path, evals: list[dict]) -> None:
    """The evaluator's records carry exactly the in-loop numbers, step by step."""
    expected = [{k: r[k] for k in EVALUATED} for r in read_metrics(inloop)]
    assert [{k: r[k] for k in EVALUATED} for r in evals] == expected


def evaluator_process(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "detox.evaluate", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def line_reader(proc: subprocess.Popen) -> queue.Queue:
    """The process's output lines, as they come (None at the end)."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_line(lines: queue.Queue, needle: str, seen: list[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"no line with {needle!r}; the evaluator said:\n" + "\n".join(seen))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same run twice: evaluated in-loop, and with evaluation=external (weights files, no evaluation)."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("inloop", []), ("external", ["evaluation=external"])):
        summary = run_job([*RUN, *extra], root / name)
        assert summary["status"] == "completed", summary.get("error")
    return {"inloop": root / "inloop", "external": root / "external"}


def test_eval_keys_are_metrics_keys() -> None:
    assert set(EVAL_KEYS) <= set(METRIC_KEYS)
    assert [k for k in METRIC_KEYS if k in EVAL_KEYS] == list(EVAL_KEYS)  # the same order as metrics.jsonl


def test_external_run_writes_weights_and_evaluates_nothing(runs: dict[str, Path]) -> None:
    inloop, external = read_metrics(runs["inloop"]), read_metrics(runs["external"])
    assert [r["step"] for r in external] == STEPS
    assert all(r["test_acc"] is None and r["test_loss"] is None and r["test_acc5"] is None for r in external)
    # training is the same trajectory: the training side of the records is identical
    assert [r["train_loss"] for r in external] == [r["train_loss"] for r in inloop]
    names = sorted(p.name for p in (runs["external"] / "models").glob("model_step_*"))
    assert names == [f"model_step_{t}" for t in STEPS]
    assert not (runs["inloop"] / "models").exists()  # in-loop evaluation writes no weights unless model_dir is set
    summary = json.loads((runs["external"] / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["evaluation"] == "external"
    assert summary["final_test_acc"] is None and summary["best_test_acc"] is None


def test_evaluator_gives_the_inloop_numbers(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "eval.jsonl"
    assert evaluate_in_process([f"run_dir={runs['external']}", f"out={out}"]) == 0
    evals = read_jsonl(out)
    assert [list(r) for r in evals] == [list(EVAL_KEYS)] * len(STEPS)
    assert_same_evaluations(runs["inloop"], evals)
    assert evals[-1]["test_acc"] > 0.8  # a real network, trained: not a vacuous comparison of untrained ones
    # a second pass evaluates nothing again; model_dir alone finds the run (its parent folder)
    assert evaluate_in_process([f"model_dir={runs['external'] / 'models'}", f"out={out}"]) == 0
    assert read_jsonl(out) == evals


def test_batchnorm_network_evaluates_identically(tmp_path: Path) -> None:
    assert run_job(BN_RUN, tmp_path / "inloop")["status"] == "completed"
    assert run_job([*BN_RUN, "evaluation=external"], tmp_path / "external")["status"] == "completed"
    assert evaluate_in_process([f"run_dir={tmp_path / 'external'}"]) == 0
    assert_same_evaluations(tmp_path / "inloop", read_jsonl(tmp_path / "external" / "eval.jsonl"))


def test_follow_evaluates_files_as_they_appear_and_ignores_temp_files(runs: dict[str, Path], tmp_path: Path) -> None:
    """A run folder filled one weights file at a time (each written under a temporary name, then renamed, as the
    trainer does): the evaluator evaluates each before the next exists, never reads a leftover temporary file, and
    stops once the summary says the run ended."""
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    shutil.copy(runs["external"] / "resolved_config.yaml", run)
    # what a writer killed mid-file leaves behind: a torn temporary file (a 'step 40' that must never be read)
    (run / "models" / f".model_step_40.{os.getpid()}.1.tmp").write_bytes(b"half a file")
    proc = evaluator_process([f"run_dir={run}", "follow=true", "poll=0.05", "timeout=120"])
    lines, seen = line_reader(proc), []
    try:
        for t in STEPS:
            part = run / "models" / f".model_step_{t}.part"
            shutil.copy(runs["external"] / "models" / f"model_step_{t}", part)
            os.replace(part, run / "models" / f"model_step_{t}")
            wait_for_line(lines, f"step {t:5d} |", seen)
            assert not (run / "models" / f"model_step_{t + 10}").exists()
        shutil.copy(runs["external"] / "summary.json", run)  # the run ended
        assert proc.wait(timeout=60) == 0, "\n".join(seen)
    finally:
        proc.kill()
    assert_same_evaluations(runs["inloop"], read_jsonl(run / "eval.jsonl"))
    assert not any("step    40" in line for line in seen)


@pytest.mark.slow
def test_evaluator_started_before_the_run(runs: dict[str, Path], tmp_path: Path) -> None:
    """The original's workflow: the evaluator is up first and follows the run while it trains."""
    run = tmp_path / "run"
    proc = evaluator_process([f"run_dir={run}", "follow=true", "poll=0.1", "timeout=300"])
    lines, seen = line_reader(proc), []
    try:
        wait_for_line(lines, "waiting for", seen)
        train = subprocess.run([sys.executable, "-m", "detox.train", *RUN, "evaluation=external",
                                f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert train.returncode == 0, train.stderr[-2000:]
        assert proc.wait(timeout=120) == 0
    finally:
        proc.kill()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    assert sum("| test_loss" in line for line in seen) == len(STEPS), seen
    assert_same_evaluations(runs["inloop"], read_jsonl(run / "eval.jsonl"))


@pytest.mark.slow
def test_following_a_run_that_is_killed_stops(tmp_path: Path) -> None:
    """A run killed with SIGKILL writes no summary: the evaluator sees its job lock released and stops, exit 1."""
    run = tmp_path / "run"
    train = subprocess.Popen([sys.executable, "-m", "detox.train", "max_steps=100000", "eval_freq=5",
                              "evaluation=external", f"hydra.run.dir={run}"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = evaluator_process([f"run_dir={run}", "follow=true", "poll=0.1", "timeout=600"])
    lines, seen = line_reader(proc), []
    try:
        wait_for_line(lines, "| test_loss", seen)  # following a live run
        train.kill()
        train.wait(timeout=60)
        assert proc.wait(timeout=60) == 1  # well before timeout=600
    finally:
        train.kill()
        proc.kill()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    assert any("stopped without a summary (no process holds its .lock: killed?)" in line for line in seen), seen
    assert not (run / "summary.json").exists()


def test_lock_held_reads_the_os_lock_table(tmp_path: Path) -> None:
    assert lock_held(tmp_path) is False  # no lock file: no run
    with job_lock(tmp_path):
        assert lock_held(tmp_path) is True
    assert lock_held(tmp_path) is False  # the file stays, the lock is gone


def test_unreadable_weights_file_is_skipped_with_a_line(runs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    (run / "models" / "model_step_40").write_bytes(b"not a torch file")
    assert evaluate_in_process([f"run_dir={run}"]) == 1  # the other files are evaluated; the exit says one failed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"detox.evaluate: skipping {run / 'models' / 'model_step_40'}: ")
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == STEPS


@pytest.mark.parametrize(("make", "args", "message"), [
    (None, ["run_dir={tmp}/nope"], "run_dir={tmp}/nope: no such folder"),
    ("empty", ["run_dir={tmp}/run"], "run_dir={tmp}/run: no resolved_config.yaml there: not a detox run folder"),
    ("inloop", ["run_dir={tmp}/run"], "run_dir={tmp}/run: the run used evaluation=inloop without a model_dir"),
    ("no-models", ["run_dir={tmp}/run"], "model_dir={tmp}/run/models: no model_step_<t> files (empty)"),
    (None, [], "give run_dir=<the run's job folder>"),
    (None, ["run_dir={tmp}", "poll=0"], "poll=0: must be a finite number in (0, 86400]"),
    (None, ["run_dir={tmp}", "+colour=red"], "colour='red': unknown setting"),
])
def test_bad_requests_are_refused(make: str | None, args: list[str], message: str, runs: dict[str, Path],
                                  tmp_path: Path) -> None:
    run = tmp_path / "run"
    if make == "empty":
        run.mkdir()
    elif make in ("inloop", "no-models"):
        shutil.copytree(runs[make.replace("no-models", "external")], run)
        if make == "no-models":
            shutil.rmtree(run / "models")
            (run / "models").mkdir()
    with pytest.raises((EvalError, ConfigError)) as info:
        evaluate_in_process([a.format(tmp=tmp_path) for a in args])
    assert str(info.value).startswith(message.format(tmp=tmp_path)), info.value
    assert "\n" not in str(info.value)


def test_command_line_refusals_are_one_line_exit_2(tmp_path: Path) -> None:
    for args, start in (([f"run_dir={tmp_path}/nope"], f"detox.evaluate: error: run_dir={tmp_path}/nope: no such"),
                        (["colour=red"], "detox.evaluate: error: Could not override 'colour'")):
        proc = subprocess.run([sys.executable, "-m", "detox.evaluate", *args], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert proc.stderr.startswith(start) and proc.stderr.count("\n") == 1, proc.stderr
    assert list(tmp_path.iterdir()) == []  # Hydra made no output folder and no log file


def test_sweep_folder_names_need_no_quoting() -> None:
    """A sweep's job folder is named like its overrides (commas, '='): passed through to Hydra quoted."""
    assert _quote_paths(["run_dir=multirun/x/err_mode=alie,seed=1", "follow=true", "out=/tmp/it's.jsonl"]) == [
        "run_dir='multirun/x/err_mode=alie,seed=1'", "follow=true", "out='/tmp/it\\'s.jsonl'"]
    assert _quote_paths(["run_dir='already'", "model_dir=null"]) == ["run_dir='already'", "model_dir=null"]
    cfg = evaluator_cfg(_quote_paths(["run_dir=multirun/x/err_mode=alie,seed=1"]))
    assert cfg.run_dir == "multirun/x/err_mode=alie,seed=1"


def test_analysis_reads_eval_jsonl(runs: dict[str, Path], tmp_path: Path) -> None:
    from analysis.load import load_metrics, load_runs

    root = tmp_path / "sweep"
    shutil.copytree(runs["inloop"], root / "inloop")
    shutil.copytree(runs["external"], root / "external")
    assert evaluate_in_process([f"run_dir={root / 'external'}"]) == 0
    table = load_runs(root)
    a, b = table.loc["inloop"], table.loc["external"]
    for k in ("final_test_acc", "best_test_acc", "final_test_loss"):
        assert a[k] == b[k] and a[k] is not None
    metrics = load_metrics(root, table)
    by_job = {job: df.sort_values("step") for job, df in metrics.groupby("job")}
    for k in ("test_acc", "test_loss", "test_acc5"):
        assert by_job["external"][k].tolist() == by_job["inloop"][k].tolist()
    assert by_job["external"]["train_loss"].tolist()[1:] == by_job["inloop"]["train_loss"].tolist()[1:]


def test_external_evaluation_needs_files() -> None:
    with pytest.raises(ConfigError, match=r"^evaluation=external: the run writes weights files .* needs save=true$"):
        validate(make_cfg(["evaluation=external", "save=false"]))
    with pytest.raises(ConfigError, match=r"^evaluation='elsewhere': unknown; choose from external, inloop$"):
        validate(make_cfg(["evaluation=elsewhere"]))


def test_model_dir_keeps_weights_next_to_inloop_evaluation(tmp_path: Path) -> None:
    """model_dir set: the weights go there (also with in-loop evaluation), and the evaluator finds them from the
    run's config."""
    models = tmp_path / "weights"
    assert run_job(["max_steps=4", "eval_freq=2", f"model_dir={models}"], tmp_path / "run")["status"] == "completed"
    assert sorted(p.name for p in models.glob("model_step_*")) == ["model_step_0", "model_step_2", "model_step_4"]
    assert evaluate_in_process([f"run_dir={tmp_path / 'run'}"]) == 0
    assert_same_evaluations(tmp_path / "run", read_jsonl(tmp_path / "run" / "eval.jsonl"))

    assert (models / ".detox_run").read_text() == f"{(tmp_path / 'run').resolve()}\n"  # the folder's owner


def test_a_weights_folder_belongs_to_one_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Jobs given one model_dir would overwrite each other's model_step_<t>: the first claims it, the others fail
    saying whose it is, and the owner's weights stay as they were."""
    shared, job = tmp_path / "shared", ["max_steps=4", "eval_freq=2", f"model_dir={tmp_path / 'shared'}"]
    assert run_job([*job, "seed=0"], tmp_path / "a", multirun=True)["status"] == "completed"
    before = {p.name: p.read_bytes() for p in shared.iterdir()}
    other = run_job([*job, "seed=1"], tmp_path / "b", multirun=True)
    assert other["status"] == "failed"
    assert other["error"] == (f"ConfigError: model_dir={shared} holds the weights files of {(tmp_path / 'a').resolve()}"
                              f"; every run needs its own (model_dir=null: <job folder>/models)")
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "failed"
    assert not (tmp_path / "b" / "metrics.jsonl").exists()  # refused before training
    assert {p.name: p.read_bytes() for p in shared.iterdir()} == before
    # a single run exits 2 with the same one line; the owner itself reruns into its folder (it resumes or skips)
    with pytest.raises(SystemExit) as exit_:
        run_job([*job, "seed=1"], tmp_path / "c")
    assert exit_.value.code == 2 and "holds the weights files of" in capsys.readouterr().err
    assert run_job([*job, "seed=0"], tmp_path / "a")["status"] == "completed"


@pytest.mark.slow
@pytest.mark.mpi
def test_mpi_run_writes_the_weights_files(tmp_path: Path) -> None:
    """engine=mpi goes through the same trainer on the PS: its weights files give the local in-loop numbers (float
    round-off between engines aside, as tests/test_mpi.py compares them)."""
    job = ["workers=6", "worker_fail=1", "group_size=3", "mode=mean", "max_steps=4", "eval_freq=2", "threads=1"]
    assert run_job(job, tmp_path / "local")["status"] == "completed"
    summary = run_job([*job, "engine=mpi", "evaluation=external"], tmp_path / "mpi")
    assert summary["status"] == "completed", summary.get("error")
    names = sorted(p.name for p in (tmp_path / "mpi" / "models").glob("model_step_*"))
    assert names == ["model_step_0", "model_step_2", "model_step_4"]
    assert evaluate_in_process([f"run_dir={tmp_path / 'mpi'}"]) == 0
    evals, local = read_jsonl(tmp_path / "mpi" / "eval.jsonl"), read_metrics(tmp_path / "local")
    assert [r["step"] for r in evals] == [r["step"] for r in local]
    for e, r in zip(evals, local, strict=True):
        for k in ("test_loss", "test_acc", "test_acc5"):
            assert e[k] == pytest.approx(r[k], rel=1e-5, abs=1e-7), (k, e["step"])


# ------------------------------------------------------------------------------------------ audit: hostile inputs

def _evaluated_copy(runs: dict[str, Path], tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    assert evaluate_in_process([f"run_dir={run}"]) == 0
    return run


def test_a_torn_last_record_is_dropped_before_appending(runs: dict[str, Path], tmp_path: Path) -> None:
    """An evaluator killed mid-write leaves a last line without its newline. The rerun used to append the
    re-evaluated record right after it, fusing both into one line that is not JSON: analysis then rejected the
    whole file, and every later rerun evaluated that step again."""
    from analysis.load import read_jsonl as analysis_read

    run = _evaluated_copy(runs, tmp_path)
    whole = (run / "eval.jsonl").read_bytes()
    last = whole.rstrip(b"\n").rsplit(b"\n", 1)[1]
    (run / "eval.jsonl").write_bytes(whole[: len(whole) - len(last) - 1] + last[:30])  # torn inside the last record
    assert evaluate_in_process([f"run_dir={run}"]) == 0
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == STEPS  # every line a record again
    assert_same_evaluations(runs["inloop"], read_jsonl(run / "eval.jsonl"))
    assert analysis_read(run / "eval.jsonl")[1] is None


@pytest.mark.parametrize("garbage", [b'{"step": 10, "epoch"\n', b"\xff\xfe not text\n", b'{"step": 10}\n', b"[1]\n"],
                         ids=["torn-inside", "not-utf8", "partial-record", "not-an-object"])
def test_a_records_file_with_a_bad_line_is_refused_and_kept(garbage: bytes, runs: dict[str, Path],
                                                            tmp_path: Path) -> None:
    """A line that is not a record anywhere but at the end: the file is not the evaluator's to append to (analysis
    rejects it whole). It used to be appended to (or crash with a traceback on bytes that are not UTF-8)."""
    run = _evaluated_copy(runs, tmp_path)
    lines = (run / "eval.jsonl").read_bytes().splitlines(keepends=True)
    (run / "eval.jsonl").write_bytes(b"".join(lines[:2]) + garbage + b"".join(lines[3:]))
    before = (run / "eval.jsonl").read_bytes()
    with pytest.raises(EvalError, match=r"^out=.*eval\.jsonl: (line 3 is not a record|not a records file)"):
        evaluate_in_process([f"run_dir={run}"])
    assert (run / "eval.jsonl").read_bytes() == before


def test_a_second_evaluator_on_the_same_records_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    """Two evaluators on one folder used to evaluate and record every step twice; the file is now held under an OS
    lock while an evaluator writes it: the second is refused in one line and the lock goes with the first."""
    import fcntl

    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    with open(run / "eval.jsonl", "a") as held:  # what a running evaluator holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(EvalError, match=r"another evaluator is recording into it now"):
            evaluate_in_process([f"run_dir={run}"])
    assert (run / "eval.jsonl").read_text() == ""
    assert evaluate_in_process([f"run_dir={run}"]) == 0  # released: the file is free again
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == STEPS


@pytest.mark.parametrize(("out", "message"), [
    ("{tmp}", "out={tmp}: not a file"),
    ("{tmp}/nope/eval.jsonl", "out={tmp}/nope/eval.jsonl: its folder {tmp}/nope does not exist"),
    ("{run}/metrics.jsonl", "out={run}/metrics.jsonl: a file of the run itself"),
    ("{run}/summary.json", "out={run}/summary.json: a file of the run itself"),
    ("{run}/models/records", "out={run}/models/records: a file of the run itself"),
])
def test_an_out_that_cannot_take_the_records_is_refused_before_work(out: str, message: str, runs: dict[str, Path],
                                                                    tmp_path: Path) -> None:
    """A folder or a missing folder used to fail with a traceback after the first evaluation; the run's own
    metrics.jsonl was taken for a records file (its steps 'already evaluated', records appended into it)."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(EvalError) as info:
        evaluate_in_process([f"run_dir={run}", f"out={out.format(tmp=tmp_path, run=run)}"])
    assert str(info.value).startswith(message.format(tmp=tmp_path, run=run)), info.value
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_timeout_is_kept_when_poll_is_longer(runs: dict[str, Path], tmp_path: Path) -> None:
    """follow: poll=600 used to sleep the whole 600 s past timeout=0.5 (and poll=1e10 crashed time.sleep)."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    (run / "summary.json").unlink()  # a run that has not ended
    t0 = time.monotonic()
    assert evaluate_in_process([f"run_dir={run}", "follow=true", "poll=600", "timeout=0.5"]) == 1
    assert time.monotonic() - t0 < 30
    with pytest.raises(ConfigError, match=r"^poll=10000000000.0: must be a finite number in \(0, 86400\]"):
        evaluate_in_process([f"run_dir={run}", "follow=true", "poll=1e10"])


def test_only_the_trainers_weights_are_evaluated(runs: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """A second name for a step (model_step_010, model_step_\u0663) is not a file of the run: it used to replace the
    real file of its step, unseen. A state_dict of the right shapes in another dtype used to load, converted, and
    give numbers the run never had; a pickle that runs code on load never runs."""
    import torch

    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    models = run / "models"
    state = torch.load(models / "model_step_10", weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, models / "model_step_010")
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, models / "model_step_\u0663")
    torch.save({k: v.double() for k, v in state.items()}, models / "model_step_40")
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - what a hostile pickle does on load
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, models / "model_step_50")
    assert evaluate_in_process([f"run_dir={run}"]) == 1
    assert not marker.exists()
    assert_same_evaluations(runs["inloop"], read_jsonl(run / "eval.jsonl"))  # steps 0..30 from the real files only
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2, err
    assert err[0].startswith(f"detox.evaluate: skipping {models / 'model_step_40'}: not weights of network=fc (")
    assert "torch.float64 (128, 64), expected torch.float32 (128, 64)" in err[0]
    assert err[1].startswith(f"detox.evaluate: skipping {models / 'model_step_50'}: not weights of network=fc (")


@pytest.mark.parametrize(("line", "message"), [
    ("eval_batch_size: 0", "eval_batch_size=0: must be an integer >= 1"),
    ("bn_calibration_batches: -1", "bn_calibration_batches=-1: must be an integer >= 0"),
    ("seed: x", "seed='x': must be an integer"),
])
def test_a_run_config_the_trainer_would_refuse_is_one_line(line: str, message: str, runs: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """A resolved_config.yaml edited by hand used to crash with a traceback (eval_batch_size: 0 after the data set
    was loaded) or evaluate with settings no run can have."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    key = line.split(":")[0]
    path = run / "resolved_config.yaml"
    path.write_text("".join(line + "\n" if x.startswith(key + ":") else x for x in
                            path.read_text().splitlines(keepends=True)))
    with pytest.raises(EvalError) as info:
        evaluate_in_process([f"run_dir={run}"])
    assert str(info.value).startswith(f"{path}: {message}"), info.value
    assert not (run / "eval.jsonl").exists()
