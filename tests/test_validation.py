"""Bad configs are refused before any work: one line naming the key, the value and what is allowed; exit 2; nothing
written. The table covers every class of issue #10 items 6-8 (types, ranges, non-finite floats, devices, engine,
dataset/network and rule/attack parameters, interpolations, rules the math forbids, sizes that cannot fit)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli, make_cfg

from detox.config import ConfigError, validate
from detox.train import run

MPI = ["engine=mpi"]
# (overrides, what the one line must contain); the line must also start with the key the override names
BAD: list[tuple[list[str], str]] = [
    # a non-number where a number belongs
    (["workers=abc"], "workers='abc': must be an integer >= 1"),
    (["lr=abc"], "lr='abc': must be a finite number > 0"),
    (["momentum=fast"], "momentum='fast': must be a finite number in [0, 1)"),
    (["batch_size=[1]"], "batch_size=[1]: must be an integer >= 1"),
    (["target_acc=high"], "target_acc='high': must be a finite number in (0, 1] or null"),
    (["approach.vote_tol=abc"], "approach.vote_tol='abc': must be a finite number >= 0"),
    (["mode=geometric-median", "mode.tol=abc"], "mode.tol='abc'"),
    (["dataset=synthetic", "dataset.train_size=big"], "dataset.train_size='big'"),
    (["err_mode.scale=abc"], "err_mode.scale='abc'"),
    (["mode.m=many"], "mode.m='many'"),
    # a float where an integer belongs
    (["seed=1.5"], "seed=1.5: must be an integer in [0, 4294967295]"),
    (["workers=9.5"], "workers=9.5: must be an integer >= 1"),
    (["max_steps=10.0"], "max_steps=10.0"),
    (["batch_size=2.5"], "batch_size=2.5"),
    (["eval_freq=1.5"], "eval_freq=1.5"),
    (["checkpoint.every=50.5"], "checkpoint.every=50.5: must be an integer >= 1 or null"),
    (["mode.f=1.5"], "mode.f=1.5: must be an integer >= 0 or null"),
    (["approach.buckets=2.5"], "approach.buckets=2.5"),
    (["mode=geometric-median", "mode.max_iter=3.3"], "mode.max_iter=3.3"),
    (["dataset=synthetic", "dataset.test_size=64.5"], "dataset.test_size=64.5"),
    # negative or zero sizes, fractions, timeouts
    (["workers=0"], "workers=0: must be an integer >= 1"),
    (["worker_fail=-1"], "worker_fail=-1: must be an integer >= 0"),
    (["group_size=0"], "group_size=0: must be an integer >= 1"),
    (["batch_size=0"], "batch_size=0"),
    (["max_steps=0"], "max_steps=0"),
    (["eval_freq=-5"], "eval_freq=-5"),
    (["eval_batch_size=0"], "eval_batch_size=0"),
    (["bn_calibration_batches=-1"], "bn_calibration_batches=-1"),
    (["lr=0"], "lr=0: must be a finite number > 0"),
    (["lr=-0.1"], "lr=-0.1"),
    (["momentum=1.0"], "momentum=1.0: must be a finite number in [0, 1)"),
    (["weight_decay=-0.1"], "weight_decay=-0.1: must be a finite number >= 0"),
    (["target_acc=1.5"], "target_acc=1.5"),
    (["threads=0"], "threads=0"),
    (["network.hidden=[0]"], "network.hidden=[0]: must be a list of integers >= 1"),
    (["network.hidden=[]", "+network.bogus=1"], "network.bogus=1: unknown setting"),
    (["dataset.test_fraction=0"], "dataset.test_fraction=0"),
    (["dataset.test_fraction=1.0"], "dataset.test_fraction=1.0: must be a finite number in (0, 1)"),
    (["mode=geometric-median", "mode.tol=0"], "mode.tol=0: must be a finite number > 0"),
    (["approach.vote_tol=-0.5"], "approach.vote_tol=-0.5: must be a finite number >= 0"),
    (["approach.inner_f=-2"], "approach.inner_f=-2: must be an integer >= 0 or null"),
    (["approach.buckets=0"], "approach.buckets=0"),
    (["mode.f=-1"], "mode.f=-1: must be an integer >= 0 or null"),
    (["mode.m=0"], "mode.m=0: must be an integer >= 1, literature or original or null"),
    # non-finite floats
    (["lr=inf"], "lr=inf: must be a finite number > 0"),
    (["lr=nan"], "lr=nan"),
    (["weight_decay=nan"], "weight_decay=nan: must be a finite number >= 0"),
    (["momentum=nan"], "momentum=nan"),
    (["err_mode.scale=inf"], "err_mode.scale=inf: must be a finite number >= 0"),
    (["err_mode=gaussian", "err_mode.std=inf"], "err_mode.std=inf"),
    (["err_mode=gaussian", "err_mode.std=-1"], "err_mode.std=-1: must be a finite number >= 0"),
    (["err_mode=alie", "err_mode.z=inf"], "err_mode.z=inf: must be a finite number or null"),
    (["err_mode=ipm", "err_mode.epsilon=nan"], "err_mode.epsilon=nan"),
    (["dataset=synthetic", "dataset.noise=inf"], "dataset.noise=inf"),
    # unknown devices, names, booleans
    (["device=tpu"], "device='tpu'"),
    (["device=cuda:x"], "device='cuda:x'"),
    (["device=CPU"], "device='CPU'"),
    (["save=abc"], "save='abc': must be true or false"),
    (["save_model=2"], "save_model=2: must be true or false"),
    (["adversary.placement=everywhere"], "adversary.placement='everywhere': unknown; choose from fixed, random, worst"),
    (["approach.inner=nope"], "approach.inner='nope': unknown; choose from"),
    (["dataset=fashion_mnist", "dataset.download=maybe"], "dataset.download='maybe'"),
    (["dataset=mnist", "dataset.root=''"], "dataset.root='': must be a non-empty string"),
    (["+foo=1"], "foo=1: unknown setting"),
    (["+mode.bogus=3"], "mode.bogus=3: unknown setting; mode keys:"),
    # a mapping where one value belongs is that value's type error; booleans and null echoed as typed
    (["mode.f={a:1}"], "mode.f={'a': 1}: must be an integer >= 0 or null"),
    (["workers=true"], "workers=true: must be an integer >= 1"),
    (["save=null"], "save=null: must be true or false"),
    # every engine.* key
    ([*MPI, "engine.timeout=0"], "engine.timeout=0: must be a finite number in [1, 604800]"),
    ([*MPI, "engine.timeout=inf"], "engine.timeout=inf"),
    ([*MPI, "engine.timeout=abc"], "engine.timeout='abc'"),
    ([*MPI, "engine.job_timeout=abc"], "engine.job_timeout='abc': must be a finite number > 0 or null"),
    ([*MPI, "engine.job_timeout=-1"], "engine.job_timeout=-1"),
    ([*MPI, "engine.compress=zip"], "engine.compress='zip': unknown; choose from blosc or null"),
    ([*MPI, "engine.compress=blosc", "engine.codec=snappy2"], "engine.codec='snappy2': not in this blosc build"),
    ([*MPI, "engine.clevel=10"], "engine.clevel=10: must be an integer in [0, 9]"),
    ([*MPI, "engine.threads_per_rank=0"], "engine.threads_per_rank=0"),
    ([*MPI, "engine.launcher_args=5"], "engine.launcher_args=5: must be a list of strings"),
    ([*MPI, "engine.launcher=''"], "engine.launcher=''"),
    ([*MPI, "engine.python=''"], "engine.python=''"),
    ([*MPI, "engine.hostfile=/nonexistent/hosts"], "engine.hostfile='/nonexistent/hosts': no such file"),
    ([*MPI, "engine.hostfile=/tmp"], "engine.hostfile='/tmp': is a folder, not a hostfile"),
    ([*MPI, "save=false"], "save=false: engine=mpi reports through files"),
    ([*MPI, "engine.faults=[{rank: 99, kind: exit}]"], "engine.faults[0].rank=99: must be a worker rank"),
    ([*MPI, "engine.faults=[{rank: 1, kind: nuke}]"], "engine.faults=[{'rank': 1, 'kind': 'nuke'}]: entry 0: kind="),
    ([*MPI, "engine.faults=abc"], "engine.faults='abc': must be a list"),
    ([*MPI, "engine.faults=[{rank: 1}]"], "entry 0 needs the key 'kind'"),
    ([*MPI, "engine.faults=[{rank: 1, kind: exit, when: 3}]"], "entry 0 has unknown key 'when'"),
    ([*MPI, "engine.faults=[{rank: 1.5, kind: exit}]"], "entry 0: rank=1.5"),
    ([*MPI, "workers=9", "engine.launcher=/nonexistent/mpiexec"],
     "engine.launcher='/nonexistent/mpiexec': /nonexistent/mpiexec is not an executable file nor a command on PATH"),
    ([*MPI, "engine.launcher=surely-no-such-mpiexec"],
     "engine.launcher='surely-no-such-mpiexec': surely-no-such-mpiexec is not"),
    ([*MPI, "workers=9", "engine.python=/nonexistent/python"],
     "engine.python='/nonexistent/python': not an executable file nor a command on PATH here"),
    ([*MPI, "engine.python=/tmp"], "engine.python='/tmp': not an executable file"),
    # dataset and network parameters
    (["dataset=synthetic", "dataset.num_classes=1"], "dataset.num_classes=1: must be an integer >= 2"),
    (["dataset.shape=[1,8]"], "dataset.shape=[1, 8]: must be a list of 3 integers >= 1"),
    (["network.input_shape=[1,2]"], "network.input_shape=[1, 2]: must be a list of 3 integers >= 1 or null"),
    (["network=lenet"], "network=lenet expects inputs of shape [1, 28, 28] but dataset=digits has [1, 8, 8]"),
    # a fixed data set's shape and classes are its own (only synthetic takes them), and its sizes bound the batch
    (["network=lenet", "dataset.shape=[1,28,28]"],
     "dataset.shape=[1, 28, 28]: dataset=digits has images of shape [1, 8, 8] (only dataset=synthetic takes a "
     "shape); leave it at [1, 8, 8]"),
    (["network=fc", "dataset.shape=[1,28,28]"], "dataset.shape=[1, 28, 28]: dataset=digits has images of shape"),
    (["network.hidden=[8000000]", "dataset.shape=[1,1,1]"], "dataset.shape=[1, 1, 1]: dataset=digits has images"),
    (["dataset=cifar10", "dataset.num_classes=100"], "dataset.num_classes=100: dataset=cifar10 has 10 classes (only "
                                                "dataset=synthetic takes a number of classes); leave it at 10"),
    (["batch_size=2000"], "batch_size=2000: exceeds the 1438 training samples of dataset=digits"),
    (["dataset.test_fraction=0.99"], "batch_size=32: exceeds the 20 training samples of dataset=digits"),
    (["dataset=synthetic", "dataset.train_size=10"], "batch_size=32: exceeds the 10 training samples of "
                                                     "dataset=synthetic (dataset.train_size=10)"),
    (["dataset=cifar100", "batch_size=50001"], "batch_size=50001: exceeds the 50000 training samples"),
    (["dataset.test_fraction=0.0001"], "dataset.test_fraction=0.0001: leaves the test set of dataset=digits empty"),
    (["dataset.test_fraction=0.9999"], "dataset.test_fraction=0.9999: leaves the training set of dataset=digits"),
    (["dataset.split_seed=-1"], "dataset.split_seed=-1"),
    # interpolations that do not resolve
    (["lr=${nope}"], "lr: does not resolve"),
    (["data_root=${oc.env:DETOX_TEST_SURELY_UNSET_VAR}"], "data_root: does not resolve"),
    # cross-field rules
    (["worker_fail=46"], "worker_fail=46: must be <= workers (45)"),
    (["group_size=4"], "group_size=4: workers=45 must be divisible"),
    (["checkpoint.every=15"], "checkpoint.every=15: must be null or a positive multiple of eval_freq (50)"),
    (["approach.buckets=16"], "approach.buckets=16: must be null or an integer in [1, 15]"),
    (["err_mode=alie", "worker_fail=23", "approach=baseline", "mode=mean"], "err_mode=alie: z_max is undefined"),
    # rules and approaches the math forbids (item 7)
    (["mode=bulyan", "workers=9", "worker_fail=5"], "bulyan needs n >= 4f + 3"),
    (["mode=krum", "approach=baseline", "worker_fail=22"], "krum needs n >= 2f + 3"),
    (["approach.buckets=3", "approach.inner=multi-krum", "mode=mean"], "approach.inner=multi-krum sees n=5"),
    (["approach=baseline", "mode=coord-median", "worker_fail=23"], "coord-median"),
    (["approach=baseline", "mode=geometric-median", "worker_fail=23"], "geometric-median"),
    (["approach=baseline", "mode=sign-sgd", "worker_fail=30"], "sign-sgd"),
    (["approach=baseline", "mode=trimmed-mean", "worker_fail=23"], "trimmed-mean"),
    (["approach=maj_vote", "worker_fail=45"], "worker_fail=45: with workers=45 in groups of 3 the Byzantines can hold"),
    (["workers=44", "group_size=2"], "group_size=2: must be odd for approach=draco-lite"),
    (["workers=44", "group_size=4", "approach=maj_vote"], "group_size=4: must be odd for approach=maj_vote"),
    # sizes that cannot fit (item 8): refused by arithmetic, with the size it would need
    (["workers=99999", "approach=baseline", "mode=mean", "network=resnet18", "dataset=cifar10"],
     "workers=99999: needs 4162.6 GiB for the (99999, 11173962) float32 gradient matrix of network=resnet18;"),
    (["workers=30000000", "approach=baseline", "mode=mean"], "workers=30000000: needs"),
]
if not torch.cuda.is_available():
    BAD.append((["device=cuda"], "device=cuda: no CUDA device is available here; use device=cpu"))


def _key(override: str) -> str:
    return override.lstrip("+").split("=", 1)[0]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_is_refused(overrides: list[str], message: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    """Through the job runner as the CLI calls it: exit 2, one line on stderr, nothing written, in < 10 s."""
    cfg = make_cfg(overrides)
    t0 = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        run(cfg, tmp_path)
    elapsed = time.perf_counter() - t0
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("detox: error: ")
    assert message in lines[0], lines[0]
    line = lines[0][len("detox: error: "):]
    named = [_key(o) for o in overrides]
    assert any(line.startswith(k) or f"{k}=" in line for k in named + ["mode=", "approach.inner="]), line
    assert list(tmp_path.iterdir()) == []  # nothing written but the refusal
    assert elapsed < 10, f"{overrides}: refused after {elapsed:.1f} s"


def test_the_table_covers_every_class() -> None:
    assert len(BAD) >= 60
    keys = {_key(o) for overrides, _ in BAD for o in overrides}
    for wanted in ("seed", "lr", "device", "save", "engine.timeout", "engine.job_timeout", "engine.faults",
                   "dataset.num_classes", "network.hidden", "err_mode.scale", "mode.m", "approach.vote_tol"):
        assert wanted in keys


def test_a_refused_sweep_job_is_recorded_and_the_sweep_goes_on(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    summary = run(make_cfg(["lr=inf"]), tmp_path, multirun=True)
    assert summary["status"] == "failed" and "lr=inf" in summary["error"]
    assert "lr=inf" in (tmp_path / "summary.json").read_text()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_huge_cluster_is_validated_by_arithmetic() -> None:
    """Validation used to run each rule on a dummy (n, 1) matrix: 60 s and 3.8 GB at workers=30000."""
    t0 = time.perf_counter()
    plan = validate(make_cfg(["workers=30000", "worker_fail=5"]))  # ~2 GiB: fits any machine running the tests
    assert plan.rule_inputs == 10000
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(ConfigError, match=r"^workers=3000000: needs [\d.]+ GiB for the \(3000000, \d+\) float32 "
                                          r"gradient matrix .* and the rule's pairwise distances;"):
        validate(make_cfg(["workers=3000000", "worker_fail=5"]))


def test_default_config_is_valid() -> None:
    plan = validate(make_cfg())
    assert (plan.approach, plan.mode, plan.f, plan.rule_inputs) == ("draco-lite", "multi-krum", 2, 15)


# Hydra's own composition errors (unknown option or key, unparsable value) also get one line and exit 2
CLI_BAD = [
    (["mode=foo"], "Could not find 'mode/foo'; available options in 'mode': bulyan, coord-median"),
    (["foo=1"], "Could not override 'foo'"),
    (["lr=["], "no viable alternative at input '['"),
    (["group_size=4"], "group_size=4: workers=45 must be divisible by it for approach=draco-lite"),
]


@pytest.mark.parametrize(("args", "message"), CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_cli_refuses_with_one_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = cli([*args, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("detox: error: ") and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not run_dir.exists()  # refused before Hydra made the run folder


def test_full_error_shows_the_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "detox.train", "group_size=4", f"hydra.run.dir={tmp_path}/r"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "1"},
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr


def test_messages_are_single_lines() -> None:
    for _, message in BAD:
        assert "\n" not in message and not re.search(r"\s$", message)


def test_a_cuda_index_this_machine_lacks_is_refused_before_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """device=cuda:3 on a one-GPU machine passed validation (CUDA is available) and failed with torch's 'invalid
    device ordinal' after the data set was loaded. Simulated: one CUDA device."""
    from detox.config import ConfigError, validate

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"^device=cuda:3: this machine's CUDA devices are cuda:0; give one of "
                                          r"them, or device=cpu$"):
        validate(make_cfg(["device=cuda:3"]))
    validate(make_cfg(["device=cuda:0"]))
    validate(make_cfg(["device=cuda"]))
