"""Audit of the separate evaluator (python -m detox.evaluate) and of the trainer's checkpoint and final files: hostile
files in a run folder (links, fifos, compressed archives, YAML aliases), another run's weights, a full disk, Ctrl-C,
a checkpoint that would unpack into more memory than a checkpoint of its config holds, and odd but legal settings.

Each test but the last fails on the code before the audit (the last pins behaviour the audit found correct)."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import ROOT, read_metrics, run_job
from test_evaluate import (
    RUN,
    STEPS,
    assert_same_evaluations,
    evaluate_in_process,
    line_reader,
    read_jsonl,
    wait_for_line,
)

from detox import trainer
from detox.evaluate import EvalError, Records
from detox.trainer import CHECKPOINT


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The default short job in-loop and with evaluation=external, and an external run of another config (seed)."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("inloop", []), ("external", ["evaluation=external"]),
                        ("other", ["evaluation=external", "seed=5"])):
        summary = run_job([*RUN, *extra], root / name)
        assert summary["status"] == "completed", summary.get("error")
    return {name: root / name for name in ("inloop", "external", "other")}


def deflated_copy(src: Path, dst: Path) -> None:
    """``src`` (a torch.save file) repacked with every entry deflated: torch.load reads it just the same."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))


# ------------------------------------------------------------------------------------------- the evaluator

def test_weights_of_another_config_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    """run_dir=A model_dir=<B's weights>, B a run of another config: B's accuracies used to be recorded in A's
    eval.jsonl as A's (analysis then reported them for A). The weights folder names its run (.detox_run): refused
    in one line before any work. A copy of the same run (the same config) still evaluates."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    with pytest.raises(EvalError) as info:
        evaluate_in_process([f"run_dir={run}", f"model_dir={runs['other'] / 'models'}"])
    assert str(info.value).startswith(f"model_dir={runs['other'] / 'models'} holds the weights files of "
                                      f"{runs['other'].resolve()}, a run of another config than run_dir={run}")
    assert not (run / "eval.jsonl").exists()
    out = tmp_path / "copy.jsonl"  # the weights of a run of this same config (run is a copy of it): its own numbers
    assert evaluate_in_process([f"run_dir={run}", f"model_dir={runs['external'] / 'models'}", f"out={out}"]) == 0
    assert_same_evaluations(runs["inloop"], read_jsonl(out))


def test_files_that_are_not_the_runs_weights_are_skipped(runs: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """Under a model_step_<t> name: a link to another run's weights (same network: it used to be evaluated as this
    run's step), a deflated archive (torch unpacks one, so a few hundred KB could allocate GBs before any shape
    check), a copy at a step past the run's max_steps (no file of this run). Each is skipped with one line."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    models = run / "models"
    (models / "model_step_20").unlink()
    (models / "model_step_20").symlink_to(runs["other"] / "models" / "model_step_20")
    deflated_copy(runs["external"] / "models" / "model_step_30", models / "model_step_25")
    shutil.copy(models / "model_step_30", models / "model_step_31")
    assert evaluate_in_process([f"run_dir={run}"]) == 1
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == [0, 10, 30]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3, err
    for line, (step, why) in zip(err, [(20, "a symbolic link, not a file the run wrote"),
                                       (25, "compressed entries"), (31, "past the run's max_steps=30")], strict=True):
        assert line.startswith(f"detox.evaluate: skipping {models / f'model_step_{step}'}: ") and why in line, line


def test_a_fifo_in_place_of_the_summary_does_not_hang_a_follower(runs: dict[str, Path], tmp_path: Path) -> None:
    """follow=true reads summary.json every poll: a fifo there used to block that read forever (timeout= never
    came). It is not a summary: the follower goes on and gives up at its timeout."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    (run / "summary.json").unlink()
    os.mkfifo(run / "summary.json")
    proc = subprocess.run([sys.executable, "-m", "detox.evaluate", f"run_dir={run}", "follow=true", "poll=0.1",
                           "timeout=1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 1 and "giving up" in proc.stdout, proc


def test_a_fifo_records_file_is_refused_not_read(tmp_path: Path) -> None:
    """out= swapped for a fifo after the evaluator's first look: opening it read-write succeeds, and reading the
    records already there ended in a traceback (OSError: Illegal seek), or could block; it is refused in one line."""
    fifo = tmp_path / "eval.jsonl"
    os.mkfifo(fifo)
    result: list[object] = []

    def open_records() -> None:
        try:
            result.append(Records(fifo))
        except Exception as err:  # noqa: BLE001 - the outcome is checked below
            result.append(err)

    thread = threading.Thread(target=open_records, daemon=True)  # a daemon: the old code's read never returns
    thread.start()
    thread.join(30)
    assert not thread.is_alive(), "reading the fifo blocked"
    assert isinstance(result[0], EvalError) and str(result[0]) == (
        f"out={fifo}: not a file (give the file for the records, e.g. <run_dir>/eval.jsonl)")


def test_a_run_config_with_yaml_aliases_is_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    """No run writes YAML aliases; nested ones (a 'billion laughs' of 1 KB) kept OmegaConf expanding for hours."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    path = run / "resolved_config.yaml"
    levels = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]'] + [
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 4)]
    path.write_text(path.read_text() + "\n".join(levels) + "\n")
    t0 = time.monotonic()
    with pytest.raises(EvalError) as info:
        evaluate_in_process([f"run_dir={run}"])
    assert str(info.value) == f"{path}: not a detox run config (ValueError: YAML aliases (*name), which no run writes)"
    assert time.monotonic() - t0 < 10


def test_a_full_disk_is_one_line_and_leaves_no_torn_record(runs: dict[str, Path], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills while the record of step 20 is written: it used to end in a traceback, half the record left
    in eval.jsonl. Now the records before it stay whole, the partial one is cut off, and the error is one line."""
    from detox import evaluate

    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    write = os.write

    def filling(fd: int, data: bytes) -> int:
        if data.startswith(b'{"step": 20,'):  # half of it fits, then the disk is full
            write(fd, data[: len(data) // 2])
            monkeypatch.setattr(os, "write", full)
            return len(data) // 2
        return write(fd, data)

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", filling)
    with pytest.raises(Exception) as info:  # noqa: PT011 - the type is checked below
        evaluate_in_process([f"run_dir={run}"])
    monkeypatch.setattr(os, "write", write)
    assert isinstance(info.value, getattr(evaluate, "WriteFailed", ())), info.value
    assert str(info.value).startswith(f"out={run / 'eval.jsonl'}: cannot write the record of step 20 (No space left")
    assert "\n" not in str(info.value)
    assert (run / "eval.jsonl").read_text().endswith("\n")
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == [0, 10]
    assert evaluate_in_process([f"run_dir={run}"]) == 0  # space again: the rest is evaluated
    assert_same_evaluations(runs["inloop"], read_jsonl(run / "eval.jsonl"))


def test_ctrl_c_says_what_the_evaluator_keeps(runs: dict[str, Path], tmp_path: Path) -> None:
    """Ctrl-C used to print the trainer's line (finished jobs skipped, resumed from a checkpoint)."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    (run / "summary.json").unlink()  # following a run that has not ended
    # SIGINT as the terminal delivers it (a shell's background job would have it ignored, and so its children)
    proc = subprocess.Popen([sys.executable, "-m", "detox.evaluate", f"run_dir={run}", "follow=true", "poll=0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, seen = line_reader(proc), []
    try:
        wait_for_line(lines, "step    30 |", seen)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == -signal.SIGINT
    finally:
        proc.kill()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    assert seen[-1] == ("detox.evaluate: interrupted (Ctrl-C); the records so far are kept: the same command again "
                        "evaluates only the steps not yet recorded"), seen
    assert [r["step"] for r in read_jsonl(run / "eval.jsonl")] == STEPS


# ------------------------------------------------------------------------------------------- the trainer

JOB = ["max_steps=30", "eval_freq=10", "checkpoint.every=10"]


class Crash(RuntimeError):
    """The stand-in for a crash right after a checkpoint."""


def crashed_run(run: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...] = ()) -> dict:
    """A run of JOB that crashed right after its checkpoint of step 20; returns the checkpoint's state."""
    save = trainer.save_checkpoint

    def save_then_crash(cfg, path, state):  # noqa: ANN001, ANN202
        save(cfg, path, state)
        if state["records"][-1]["step"] == 20:
            raise Crash("crashed after the checkpoint of step 20")

    with monkeypatch.context() as mp:
        mp.setattr(trainer, "save_checkpoint", save_then_crash)
        assert run_job([*JOB, *extra], run, multirun=True)["status"] == "failed"
    return torch.load(run / CHECKPOINT, weights_only=True)


@pytest.mark.parametrize("packing", ["stored", "deflated"])
def test_a_checkpoint_larger_than_its_config_allows_is_ignored(packing: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint with 16 MB more than one of its config can hold (here an extra tensor: as a deflated entry only
    16 KB on disk, and a few hundred KB could be GBs) used to be unpacked whole into memory and resumed from. It is
    refused unread, with one warning, and the run starts over to the same end."""
    run = tmp_path / "run"
    state = crashed_run(run, monkeypatch)
    padded = tmp_path / "padded.pt"
    torch.save({**state, "pad": torch.zeros(4 << 20)}, padded)
    if packing == "deflated":
        deflated_copy(padded, run / CHECKPOINT)
        assert (run / CHECKPOINT).stat().st_size < 1 << 20
    else:
        shutil.copy(padded, run / CHECKPOINT)
    with caplog.at_level(logging.INFO, logger="detox"):
        assert run_job(JOB, run)["status"] == "completed"
    assert "resuming from" not in caplog.text
    assert f"ignoring checkpoint {run / CHECKPOINT}: unreadable (ValueError: " in caplog.text
    assert [r["step"] for r in read_metrics(run)] == [0, 10, 20, 30]


def test_model_pt_is_never_left_torn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """save_model=true: model.pt used to be written in place, so a full disk (or a kill) left a torn model.pt that
    torch.load rejects; it is written under a temporary name and renamed like every other file."""
    write_bytes = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:  # torch files are serialised in memory, then written here
        if "model.pt" in self.name:
            write_bytes(self, b"PK\x03\x04 half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    summary = run_job(["max_steps=4", "eval_freq=2", "save_model=true"], tmp_path, multirun=True)
    assert summary["status"] == "failed" and "No space left" in summary["error"]
    assert not (tmp_path / "model.pt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_resume_never_leaves_metrics_cut_short(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A resumed run rewrites metrics.jsonl with its checkpoint's records: written in place, a failure (full disk,
    kill) midway left the file cut short. Now it is replaced whole, or not at all."""
    run = tmp_path / "run"
    crashed_run(run, monkeypatch)
    before = (run / "metrics.jsonl").read_text()
    write_text = Path.write_text

    def full_disk(self: Path, text: str, *args, **kwargs) -> int:  # noqa: ANN002, ANN003
        if "metrics.jsonl" in self.name:
            write_text(self, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write_text(self, text, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(Path, "write_text", full_disk)
        assert run_job(JOB, run, multirun=True)["status"] == "failed"
    assert (run / "metrics.jsonl").read_text() == before
    assert run_job(JOB, run)["status"] == "completed"  # and the checkpoint still resumes
    assert [r["step"] for r in read_metrics(run)] == [0, 10, 20, 30]


@pytest.mark.parametrize("job", [["max_steps=1", "eval_freq=1", "checkpoint.every=1"],
                                 ["max_steps=3", "eval_freq=100", "checkpoint.every=100"],
                                 ["max_steps=5", "eval_freq=2", "checkpoint.every=4"]],
                         ids=["one-step", "eval_freq-past-max_steps", "last-step-off-the-grid"])
def test_odd_but_legal_settings_evaluate_like_inloop(job: list[str], tmp_path: Path) -> None:
    """max_steps=1, eval_freq past max_steps, a last step off the eval_freq grid: a record at 0, every eval_freq
    steps and the last, a weights file for each, the evaluator's numbers the in-loop ones, no checkpoint left."""
    assert run_job(job, tmp_path / "inloop")["status"] == "completed"
    assert run_job([*job, "evaluation=external"], tmp_path / "external")["status"] == "completed"
    steps = [r["step"] for r in read_metrics(tmp_path / "inloop")]
    freq, last = int(job[1].split("=")[1]), int(job[0].split("=")[1])
    assert steps == sorted({*range(0, last, freq), last})
    assert sorted(int(p.name.rsplit("_", 1)[1]) for p in (tmp_path / "external" / "models").glob("model_step_*")) \
        == steps
    assert evaluate_in_process([f"run_dir={tmp_path / 'external'}"]) == 0
    assert_same_evaluations(tmp_path / "inloop", read_jsonl(tmp_path / "external" / "eval.jsonl"))
    assert not (tmp_path / "external" / CHECKPOINT).exists()
    summary = json.loads((tmp_path / "inloop" / "summary.json").read_text())
    assert summary["steps"] == last and summary["final_test_acc"] == read_metrics(tmp_path / "inloop")[-1]["test_acc"]


def test_a_cuda_device_this_machine_lacks_is_one_line(runs: dict[str, Path], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """device=cuda:3 on a machine with one GPU passed the check (CUDA is available) and ended in torch's 'invalid
    device ordinal' traceback once the data set was loaded. (Simulated: one CUDA device.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    with pytest.raises(EvalError) as info:
        evaluate_in_process([f"run_dir={run}", "device=cuda:3"])
    assert str(info.value) == "device=cuda:3: this machine's CUDA devices are cuda:0; give one of them, or device=cpu"
    assert not (run / "eval.jsonl").exists()


def test_an_out_that_is_a_big_file_is_refused_at_its_first_line(runs: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """out= given a big file that is no records file (a data set): the evaluator used to read it all into memory,
    appending 1 MB chunks to one bytes object (quadratic: 86 s for 540 MB) before refusing its line 1."""
    big = tmp_path / "data.bin"
    with open(big, "wb") as f:
        f.write(b"not a record\n")
        f.truncate(64 << 20)  # sparse: 64 MB of zeros, no disk used
    read, seen = os.read, [0]

    def counting(fd: int, n: int) -> bytes:
        data = read(fd, n)
        seen[0] += len(data)
        return data

    monkeypatch.setattr(os, "read", counting)
    with pytest.raises(EvalError, match=rf"^out={big}: line 1 is not a record of detox\.evaluate"):
        evaluate_in_process([f"run_dir={runs['external']}", f"out={big}"])
    assert seen[0] <= 2 << 20
    assert big.stat().st_size == 64 << 20


def test_weights_in_the_job_folder_itself_are_evaluated(tmp_path: Path) -> None:
    """model_dir=<the job folder> (the weights next to metrics.jsonl) is a run the trainer accepts; the evaluator
    refused its default records file, <run_dir>/eval.jsonl, as 'a file of the run itself'. Only the run's own files
    are refused there."""
    run = tmp_path / "run"
    job = ["max_steps=4", "eval_freq=2", f"model_dir={run}"]
    assert run_job(job, run)["status"] == "completed"
    assert evaluate_in_process([f"run_dir={run}"]) == 0
    assert_same_evaluations(run, read_jsonl(run / "eval.jsonl"))
    for name in ("model_step_6", ".detox_run", "metrics.jsonl"):
        with pytest.raises(EvalError, match=rf"^out={run / name}: a file of the run itself"):
            evaluate_in_process([f"run_dir={run}", f"out={run / name}"])


# ------------------------------------------------------------------------- one records file, one set of settings
# eval_batch_size (it also sizes the BatchNorm calibration batches), device and threads can each change the numbers.
# Overriding one used to append records into a records file next to records made with other settings (or of another
# run), nothing saying so. The settings are now kept next to the records (<out>.settings.json) and a mix is refused
# in one line, exit 2, the file untouched.

def _evaluated_minus_last(runs: dict[str, Path], tmp_path: Path, *args: str, out: Path | None = None) -> Path:
    """A copy of the external run evaluated (with ``args``), its last record gone again: step 30 is still to be
    recorded, as for an evaluator stopped before the run's last file."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    out = out or run / "eval.jsonl"
    assert evaluate_in_process([f"run_dir={run}", f"out={out}", *args]) == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]))
    return run


def _settings(out: Path) -> dict:
    return json.loads((out.parent / f"{out.name}.settings.json").read_text())


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_other_evaluation_settings_never_mix_into_one_records_file(runs: dict[str, Path], tmp_path: Path) -> None:
    run = _evaluated_minus_last(runs, tmp_path)
    out = run / "eval.jsonl"
    before = out.read_bytes()
    for args, made, uses in ((["eval_batch_size=7"], "eval_batch_size=1000", "eval_batch_size=7"),
                             (["threads=2"], "threads=1", "threads=2"),
                             (["eval_batch_size=7", "threads=2"], "eval_batch_size=1000, threads=1",
                              "eval_batch_size=7, threads=2")):
        with pytest.raises(EvalError) as info:
            evaluate_in_process([f"run_dir={run}", *args])
        assert str(info.value).startswith(
            f"out={out}: its 3 records were made with {made} ({out}.settings.json); this evaluation uses {uses}, "
            f"which can change the numbers: give "), info.value
        assert out.read_bytes() == before
    # as typed: one line, exit 2
    proc = subprocess.run([sys.executable, "-m", "detox.evaluate", f"run_dir={run}", "eval_batch_size=7"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"detox.evaluate: error: out={out}: its 3 records were made with "
                                  f"eval_batch_size=1000"), proc.stderr
    assert out.read_bytes() == before
    # the run's own settings, typed: they are the records', so the missing step is added
    assert evaluate_in_process([f"run_dir={run}", "eval_batch_size=1000", "threads=1", "device=cpu"]) == 0
    assert_same_evaluations(runs["inloop"], read_jsonl(out))
    assert _settings(out) == {"eval_batch_size": 1000, "device": "cpu", "threads": 1,
                              "run_config_sha256": _sha256(run / "resolved_config.yaml")}
    # other settings go to a file of their own, which keeps them
    other = tmp_path / "batch7.jsonl"
    assert evaluate_in_process([f"run_dir={run}", "eval_batch_size=7", f"out={other}"]) == 0
    assert [r["step"] for r in read_jsonl(other)] == STEPS and _settings(other)["eval_batch_size"] == 7


def test_records_of_an_older_evaluator_take_only_the_runs_own_settings(runs: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Records without a settings file (an older evaluator wrote them): they count as made with the run's own
    settings, so adding to them with other settings is refused; with the run's own it goes on, and says so."""
    run = _evaluated_minus_last(runs, tmp_path)
    out = run / "eval.jsonl"
    (run / "eval.jsonl.settings.json").unlink(missing_ok=True)
    before = out.read_bytes()
    with pytest.raises(EvalError) as info:
        evaluate_in_process([f"run_dir={run}", "eval_batch_size=7"])
    assert str(info.value) == (
        f"out={out}: its 3 records carry no settings (an older detox.evaluate wrote them, or eval.jsonl.settings.json "
        f"was removed), so they count as made with the run's own eval_batch_size=1000; this evaluation uses "
        f"eval_batch_size=7, which can change the numbers: give another out= for it")
    assert out.read_bytes() == before and not (run / "eval.jsonl.settings.json").exists()
    capsys.readouterr()
    assert evaluate_in_process([f"run_dir={run}"]) == 0
    assert (f"detox.evaluate: {out}: its 3 records carry no settings (an older detox.evaluate wrote them): taken as "
            f"made with the run's own eval_batch_size=1000, device=cpu, threads=1, which this evaluation uses"
            in capsys.readouterr().out)
    assert_same_evaluations(runs["inloop"], read_jsonl(out))
    assert _settings(out)["eval_batch_size"] == 1000


def test_records_of_another_run_are_never_added_to(runs: dict[str, Path], tmp_path: Path) -> None:
    """out= shared by two runs: the second run's steps were all 'already there' (the first run's), so it recorded
    nothing and its numbers were the other run's. And out=<another run's folder>/eval.jsonl put this run's numbers
    where analysis reads that run's."""
    shared = tmp_path / "shared.jsonl"
    assert evaluate_in_process([f"run_dir={runs['external']}", f"out={shared}"]) == 0
    before = shared.read_bytes()
    with pytest.raises(EvalError) as info:
        evaluate_in_process([f"run_dir={runs['other']}", f"out={shared}"])
    assert str(info.value).startswith(f"out={shared}: its 4 records are of another run (its settings file "
                                      f"{shared}.settings.json names a resolved_config.yaml of sha256 "), info.value
    assert shared.read_bytes() == before
    other = tmp_path / "other"
    shutil.copytree(runs["other"], other)
    with pytest.raises(EvalError) as info:
        evaluate_in_process([f"run_dir={runs['external']}", f"out={other / 'eval.jsonl'}"])
    assert str(info.value) == (f"out={other / 'eval.jsonl'}: in the folder of another run "
                               f"({other / 'resolved_config.yaml'} differs from run_dir={runs['external']}'s): "
                               f"analysis would read its records as that run's; give another out=")
    assert not (other / "eval.jsonl").exists()
    copy = tmp_path / "copy"  # a copy of the same run: the same config, the same numbers
    shutil.copytree(runs["external"], copy)
    assert evaluate_in_process([f"run_dir={runs['external']}", f"out={copy / 'eval.jsonl'}"]) == 0


@pytest.mark.parametrize("kind", ["fifo", "folder", "not-json", "huge", "wrong-types", "missing-key"])
def test_a_hostile_settings_file_is_one_line_and_changes_nothing(kind: str, runs: dict[str, Path],
                                                                 tmp_path: Path) -> None:
    run = _evaluated_minus_last(runs, tmp_path)
    out, side = run / "eval.jsonl", run / "eval.jsonl.settings.json"
    good = {"eval_batch_size": 1000, "device": "cpu", "threads": 1,
            "run_config_sha256": _sha256(run / "resolved_config.yaml")}
    side.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(side)
    elif kind == "folder":
        side.mkdir()
    elif kind == "huge":
        with open(side, "wb") as f:
            f.truncate(64 << 20)
    else:
        side.write_text({"not-json": "{eval_batch_size: 1000",
                         "wrong-types": json.dumps({**good, "eval_batch_size": "1000"}),
                         "missing-key": json.dumps({k: v for k, v in good.items() if k != "threads"})}[kind])
    before = out.read_bytes()
    t0 = time.monotonic()
    with pytest.raises(EvalError) as info:
        evaluate_in_process([f"run_dir={run}"])
    assert time.monotonic() - t0 < 30
    message = str(info.value)
    assert message.startswith(f"out={out}: its settings file {side} is ") and "\n" not in message, message
    assert message.endswith("the settings of its 3 records are unknown; move both files aside, or give another out=")
    assert out.read_bytes() == before


def test_a_killed_evaluator_leaves_nothing_that_mixes(runs: dict[str, Path], tmp_path: Path) -> None:
    """Killed after writing the settings file, before its first record: no record to mix with, the next evaluation
    takes the file with its own settings. Killed mid-record: an evaluation with other settings is refused before the
    torn line is touched; one with the records' settings drops it and evaluates that step again."""
    run = _evaluated_minus_last(runs, tmp_path, "eval_batch_size=7")
    out = run / "eval.jsonl"
    out.write_text("")  # the settings file (eval_batch_size=7) without a record
    assert evaluate_in_process([f"run_dir={run}"]) == 0
    assert _settings(out)["eval_batch_size"] == 1000
    assert_same_evaluations(runs["inloop"], read_jsonl(out))
    whole = out.read_bytes()
    torn = whole[: len(whole) - 40]  # the last record cut short
    out.write_bytes(torn)
    with pytest.raises(EvalError, match=r"its 3 records were made with eval_batch_size=1000 "):
        evaluate_in_process([f"run_dir={run}", "eval_batch_size=7"])
    assert out.read_bytes() == torn
    assert evaluate_in_process([f"run_dir={run}"]) == 0
    assert_same_evaluations(runs["inloop"], read_jsonl(out))


def test_two_names_of_one_records_file_share_its_settings(runs: dict[str, Path], tmp_path: Path) -> None:
    """out=<a link to the records file>: the same records (and the same lock), so the same settings file."""
    records = tmp_path / "records.jsonl"
    run = _evaluated_minus_last(runs, tmp_path, "eval_batch_size=7", out=records)
    link = tmp_path / "link.jsonl"
    link.symlink_to(records)
    before = records.read_bytes()
    with pytest.raises(EvalError, match=r"its 3 records were made with eval_batch_size=7 "):
        evaluate_in_process([f"run_dir={run}", f"out={link}"])
    assert records.read_bytes() == before
    with pytest.raises(EvalError, match=r"the settings file kept next to a records file"):
        evaluate_in_process([f"run_dir={run}", f"out={records}.settings.json"])


def test_a_settings_file_that_cannot_be_written_records_nothing(runs: dict[str, Path], tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk when the settings file is written: one line (exit 1), no record without its settings, and no
    empty file left behind."""
    from detox import evaluate

    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)

    def full(path: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(evaluate, "write_text_atomic", full)
    with pytest.raises(evaluate.WriteFailed) as info:
        evaluate_in_process([f"run_dir={run}"])
    assert str(info.value).startswith(f"out={run / 'eval.jsonl'}: cannot write its settings file "
                                      f"{run / 'eval.jsonl.settings.json'} before the record of step 0 (No space")
    assert not (run / "eval.jsonl").exists() and not (run / "eval.jsonl.settings.json").exists()


def test_a_run_with_threads_null_adds_to_its_own_records(runs: dict[str, Path], tmp_path: Path) -> None:
    """threads=null (torch's default) is a setting a run can have: kept as null, and read back as one."""
    run = tmp_path / "run"
    shutil.copytree(runs["external"], run)
    config = run / "resolved_config.yaml"
    config.write_text(config.read_text().replace("\nthreads: 1\n", "\nthreads: null\n"))
    out = run / "eval.jsonl"
    assert evaluate_in_process([f"run_dir={run}"]) == 0
    assert _settings(out)["threads"] is None
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:-1]))
    assert evaluate_in_process([f"run_dir={run}"]) == 0
    assert [r["step"] for r in read_jsonl(out)] == STEPS
    with pytest.raises(EvalError, match=r"its 4 records were made with threads=null .* this evaluation uses threads=1, "
                                        r"which can change the numbers: give threads=null to add to them"):
        evaluate_in_process([f"run_dir={run}", "threads=1"])
