"""The config-and-checkpoint audit: tampered checkpoints are ignored, fixed data sets keep their own shape and
sizes, data-dependent and launch refusals come before any folder, group options are names, documented overrides
work. (The refusal lines themselves are in tests/test_validation.py's BAD table.)"""

from __future__ import annotations

import math
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import CONF, ROOT, cli, make_cfg, read_metrics, run_job
from hydra import compose, initialize_config_dir

from detox import config, trainer
from detox.config import FIXED, ConfigError, data_facts, digits_split, validate
from detox.data import _digits_arrays, load_data
from detox.trainer import CHECKPOINT

# ------------------------------------------------------------------------------------ tampered checkpoints

CKPT_JOB = ["workers=9", "worker_fail=1", "group_size=3", "batch_size=8", "max_steps=30", "eval_freq=10",
            "checkpoint.every=10"]


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint as the loop writes it at step 20 of CKPT_JOB (records of steps 0, 10, 20): copied aside while
    the job runs, since a finished run deletes its checkpoint."""
    folder = tmp_path_factory.mktemp("real")
    kept = folder / "kept"
    kept.mkdir()
    save = trainer.save_checkpoint

    def save_and_keep(cfg, path: Path, state: dict) -> None:  # noqa: ANN001
        save(cfg, path, state)
        shutil.copy(path, kept / f"step{state['records'][-1]['step']}.pt")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "save_checkpoint", save_and_keep)
        assert run_job(CKPT_JOB, folder / "run")["status"] == "completed"
    return kept / "step20.pt"


def _set(where: Callable[[dict], dict], key: str, value: object) -> Callable[[dict], None]:
    def tamper(state: dict) -> None:
        where(state)[key] = value
    return tamper


def _last(s: dict) -> dict:
    return s["records"][-1]


def _first(s: dict) -> dict:
    return s["records"][0]


def _drop_middle_record(s: dict) -> None:
    del s["records"][1]


def _nan_weights(s: dict) -> None:
    s["w"].fill_(math.nan)


def _inf_momentum(s: dict) -> None:
    s["v"][0] = math.inf


def _wall_times_decrease(s: dict) -> None:
    s["records"][1]["wall_time"] = s["records"][2]["wall_time"] + 1.0


# each changes a real checkpoint in one way a run of this code never writes
TAMPERED: dict[str, Callable[[dict], None]] = {
    "test_acc a string": _set(_last, "test_acc", "abc"),
    "cluster_time_median a string": _set(_last, "cluster_time_median", "x"),
    "test_acc a tensor": _set(_first, "test_acc", torch.tensor(0.5)),
    "cluster_time_median null": _set(_last, "cluster_time_median", None),
    "samples a bool": _set(_last, "samples", True),
    "test_acc above 1": _set(_last, "test_acc", 1.5),
    "negative eval time": _set(_last, "eval_time", -1.0),
    "train_loss a string": _set(_last, "train_loss", "low"),
    "last step forged to max_steps": _set(_last, "step", 30),
    "step not a multiple of eval_freq": _set(_last, "step", 25),
    "step a float": _set(_last, "step", 20.0),
    "a record left out": _drop_middle_record,
    "all-NaN weights": _nan_weights,
    "infinite momentum": _inf_momentum,
    "wall times decrease": _wall_times_decrease,
    "total wall behind the records": lambda s: s.update(wall=0.0),
    "malformed messages on engine=local": lambda s: s.update(malformed=3),
    "MPI source state on engine=local": lambda s: s.update(source={"malformed_by_rank": {"1": 2},
                                                                   "malformed_rows": 0}),
}


@pytest.mark.parametrize("kind", TAMPERED)
def test_a_tampered_checkpoint_is_ignored_with_one_warning(kind: str, real_checkpoint: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Each used to resume, then crash at the end (TypeError) and again on every rerun, or report steps it never
    trained; now: one warning, the run starts over and finishes, and no checkpoint is left."""
    state = torch.load(real_checkpoint, weights_only=True)
    TAMPERED[kind](state)
    torch.save(state, tmp_path / CHECKPOINT)
    with caplog.at_level("WARNING", logger="detox"):
        summary = run_job(CKPT_JOB, tmp_path)
    assert summary["status"] == "completed" and summary["steps"] == 30, summary
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 10, 20, 30]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and CHECKPOINT in warnings[0] and "starting from step 0" in warnings[0], warnings
    assert not (tmp_path / CHECKPOINT).exists()


@pytest.mark.parametrize(("source", "malformed", "problem"), [
    ({}, 0, None),  # a checkpoint of older code, or of a run where no rank misbehaved yet
    ({"malformed_by_rank": {"2": 3, "5": 1}, "malformed_rows": 3}, 3, None),
    ({"malformed_by_rank": {"2": 3}, "malformed_rows": 2}, 3, "malformed_rows"),
    ({"malformed_by_rank": {"2": 1}, "malformed_rows": 2}, 2, "malformed_rows"),
    ({"malformed_by_rank": {"7": 1}, "malformed_rows": 0}, 0, "ranks 1..6"),
    ({"malformed_by_rank": {"0": 1}, "malformed_rows": 0}, 0, "ranks 1..6"),
    ({"malformed_by_rank": {"2": 0}, "malformed_rows": 0}, 0, "ranks 1..6"),
    ({"malformed_by_rank": {"2": True}, "malformed_rows": 0}, 0, "ranks 1..6"),
    ({"malformed_by_rank": {"\u0663": 1}, "malformed_rows": 0}, 0, "ranks 1..6"),
    ({"malformed_by_rank": [1], "malformed_rows": 0}, 0, "ranks 1..6"),
    ({"malformed_by_rank": {}}, 0, "not the state"),
    ("x", 0, "not the state"),
])
def test_an_mpi_checkpoints_source_state_is_checked(source: object, malformed: int, problem: str | None) -> None:
    """engine=mpi keeps which ranks misbehaved in its checkpoint (a resumed run goes on distrusting them and
    counting); a state this code never writes is refused like any other tampering."""
    from detox.trainer import _source_problem

    found = _source_problem(make_cfg(["engine=mpi", "workers=6"]), source, malformed)
    assert (found is None) if problem is None else (problem in found), found


def test_the_real_checkpoint_resumes(real_checkpoint: Path, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """The untampered checkpoint passes every check above: the cases differ from it only in what they break."""
    shutil.copy(real_checkpoint, tmp_path / CHECKPOINT)
    with caplog.at_level("INFO", logger="detox"):
        summary = run_job(CKPT_JOB, tmp_path)
    assert summary["status"] == "completed"
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert any("resuming from" in r.getMessage() and "step 20" in r.getMessage() for r in caplog.records)
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 10, 20, 30]


# ------------------------------------------------------------------------------- what a data set really is

FIXED_SETS = sorted(FIXED)


@pytest.mark.parametrize("name", FIXED_SETS)
def test_fixed_data_sets_match_their_option_files(name: str) -> None:
    raw = yaml.safe_load((CONF / "dataset" / f"{name}.yaml").read_text())
    assert (tuple(raw["shape"]), raw["num_classes"]) == FIXED[name]


def test_every_data_set_but_synthetic_is_fixed() -> None:
    assert set(FIXED) | {"synthetic"} == {p.stem for p in (CONF / "dataset").glob("*.yaml")}


def test_digits_facts_are_the_loaders() -> None:
    labels = _digits_arrays()[1]
    assert tuple(np.bincount(labels)) == config.DIGITS_PER_CLASS
    for fraction in (0.2, 0.37, 0.99):
        cfg = make_cfg([f"dataset.test_fraction={fraction}"])
        data, facts = load_data(cfg.dataset), data_facts(cfg)
        assert (data.shape, data.num_classes) == (facts.shape, facts.num_classes)
        assert (len(data.train_y), len(data.test_y)) == (facts.train, facts.test) == digits_split(fraction, 0)


def test_memory_is_counted_on_the_real_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PS's (P, d) matrix for fc with 8M hidden units on digits' 64 inputs: d = 600,000,010 (100 GiB)."""
    monkeypatch.setattr(config, "available_bytes", lambda: 50 * 2**30)
    with pytest.raises(ConfigError, match=r"^workers=45: needs 100\.6 GiB for the \(45, 600000010\) float32"):
        validate(make_cfg(["network.hidden=[8000000]"]))
    # the shape that made it look like 96M parameters (16 GiB) is refused before any sizing
    with pytest.raises(ConfigError, match=r"^dataset\.shape=\[1, 1, 1\]: dataset=digits has images of shape"):
        validate(make_cfg(["network.hidden=[8000000]", "dataset.shape=[1,1,1]"]))


def test_synthetic_takes_any_shape_and_classes() -> None:
    plan = validate(make_cfg(["dataset=synthetic", "dataset.shape=[3,5,7]", "dataset.num_classes=4"]))
    assert plan.workers == 45


# ------------------------------------------------------------- refusals that come before the run folder

BEFORE_FOLDER = [
    (["batch_size=2000"], "batch_size=2000: exceeds the 1438 training samples of dataset=digits"),
    (["dataset.test_fraction=0.99"], "batch_size=32: exceeds the 20 training samples of dataset=digits with "
                                     "dataset.test_fraction=0.99"),
    (["dataset=synthetic", "dataset.train_size=10"], "batch_size=32: exceeds the 10 training samples"),
    (["dataset.test_fraction=0.0001"], "dataset.test_fraction=0.0001: leaves the test set of dataset=digits empty"),
    (["network=lenet", "dataset.shape=[1,28,28]"], "dataset.shape=[1, 28, 28]: dataset=digits has images of shape"),
    (["engine=mpi", "workers=9", "engine.launcher=/nonexistent/mpiexec"],
     "engine.launcher='/nonexistent/mpiexec': /nonexistent/mpiexec is not an executable file"),
    (["engine=mpi", "workers=9", "engine.python=/nonexistent/python"], "engine.python='/nonexistent/python': not"),
    (["mode=../mode/krum"], "mode=../mode/krum: not an option name (a path is not taken); choose from bulyan,"),
    # another option's setting, which the chosen option would silently ignore
    (["err_mode=rev_grad", "+err_mode.z=1"], "err_mode.z=1: not a setting of err_mode=rev_grad (its settings: scale)"),
    (["mode=krum", "+mode.theta=3"], "mode.theta=3: not a setting of mode=krum (its settings: f, neighbours)"),
    # a count past int64 (an OverflowError traceback in the memory check for workers)
    (["workers=" + "9" * 400], "must be an integer in [1, 2^63 - 1]"),
    (["eval_batch_size=" + "9" * 400], "must be an integer in [1, 2^63 - 1]"),
    # Hydra's own flags, checked outside its error reporting (were a traceback and exit 1)
    (["--config-dir", "/nonexistent/conf"], "Additional config directory '/nonexistent/conf' not found"),
    (["--resolve"], "The --resolve flag can only be used in conjunction with --cfg or --help"),
    (["-m", "--cfg", "hydra"], "Only one of --run, --multirun, --cfg, --info and --shell_completion can be specified"),
]


@pytest.mark.parametrize(("args", "message"), BEFORE_FOLDER, ids=[" ".join(a)[:60] for a, _ in BEFORE_FOLDER])
def test_refused_before_hydra_makes_the_folder(args: list[str], message: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = cli([*args, "max_steps=2", "eval_freq=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("detox: error: ") and message in errors[0], proc.stderr
    assert not run_dir.exists() and not (tmp_path / "multirun").exists()


# ------------------------------------------------------------------------------ group options are names


def _with_hydra_node(overrides: list[str]):  # noqa: ANN202 - a DictConfig
    """The config as the ValidateFirst callback gets it: Hydra's node (runtime.choices) still in it."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("override", ["mode=../mode/krum", "dataset=../dataset/digits", "task=../task/fc-digits"])
def test_a_group_option_that_is_a_path_is_refused(override: str) -> None:
    group, choice = override.split("=")
    with pytest.raises(ConfigError, match=rf"^{re.escape(override)}: not an option name .*; choose from "):
        validate(_with_hydra_node([override]))
    validate(_with_hydra_node([f"{group}={Path(choice).name}"]))  # the same option by its name


def test_a_yaml_outside_conf_is_not_loaded(tmp_path: Path) -> None:
    """mode=../../x/evil through a config dir reaches a file outside every config folder."""
    (tmp_path / "cd" / "mode").mkdir(parents=True)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "evil.yaml").write_text("name: krum\nf: null\nneighbours: literature\n")
    run_dir = tmp_path / "run"
    proc = cli(["--config-dir", str(tmp_path / "cd"), "mode=../../x/evil", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 2 and "detox: error: mode=../../x/evil: not an option name" in proc.stderr, proc.stderr
    assert not run_dir.exists()


def test_a_sweep_job_with_a_path_option_is_recorded_as_refused(tmp_path: Path) -> None:
    """In a sweep the job's config has no hydra node: the running job's choices are checked."""
    proc = cli(["-m", "mode=../mode/krum", f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert "0 completed, 1 failed" in proc.stdout, proc.stdout + proc.stderr
    assert "ConfigError: mode=../mode/krum: not an option name" in (tmp_path / "summary.jsonl").read_text()


# ---------------------------------------------------------------------------- the documented overrides


def test_design_docs_inner_params_override_runs(tmp_path: Path) -> None:
    """docs/DESIGN.md §8 gives the command-line form for the inner rule's m: it composes, validates and runs."""
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    forms = re.findall(r"`([+]*approach\.inner_params[^`]*)`", design)
    assert forms, "DESIGN.md no longer documents approach.inner_params"
    job = ["approach.buckets=2", "approach.inner=multi-krum", "mode=mean", "max_steps=2", "eval_freq=2"]
    for form in forms:
        assert validate(make_cfg([*job, form])).inner_params == {"m": "original"}, form
    assert run_job([*job, forms[0]], tmp_path)["status"] == "completed"
    # over a preset that already sets inner_params, the same form replaces the one key
    preset = validate(make_cfg(["method=detox-multi-krum", forms[0].replace("original", "literature")]))
    assert preset.inner_params == {"m": "literature", "neighbours": "original"}


def test_the_launch_checks_pass_for_a_real_python() -> None:
    validate(make_cfg(["engine=mpi", "workers=9", f"engine.python={sys.executable}"]))
