"""Every option of every config group: a file, a registry key of the same name, and a job that runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import CONF, GROUPS, TINY, TINY_CLUSTER, fake_svhn, make_cfg, options, run_job

from detox.aggregators import AGGREGATORS
from detox.approaches import APPROACHES
from detox.attacks import ATTACKS
from detox.data import DATASETS
from detox.engines import ENGINES
from detox.models import MODELS

REGISTRIES = {"network": MODELS, "dataset": DATASETS, "mode": AGGREGATORS, "approach": APPROACHES,
              "err_mode": ATTACKS, "engine": ENGINES}
# the heaviest options (an MPI world, the largest networks) run in the full suite only: the quick subset
# (-m "not slow") stays a few minutes
HEAVY = {("engine", "mpi"), ("network", "resnet50"), ("network", "densenet121")}
ALL_OPTIONS = [pytest.param(g, o, marks=pytest.mark.slow) if (g, o) in HEAVY else (g, o)
               for g in GROUPS for o in options(g)]
# jobs on a data set of the network's input shape, one group, mean: only the network's cost matters
NETWORK_JOB = ["workers=3", "worker_fail=0", "group_size=3", "mode=mean", "max_steps=2", "eval_freq=1",
               "batch_size=4", "dataset=synthetic", "dataset.train_size=16", "dataset.test_size=8",
               "eval_batch_size=8", "bn_calibration_batches=1"]


def test_groups_are_the_conf_folders() -> None:
    folders = {p.name for p in CONF.iterdir() if p.is_dir()}
    assert folders >= set(GROUPS)


@pytest.mark.parametrize("group", GROUPS)
def test_options_equal_registry_keys(group: str) -> None:
    assert options(group) == sorted(REGISTRIES[group]), f"conf/{group}/*.yaml and the {group} registry differ"


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS)
def test_option_file_names_itself(group: str, option: str) -> None:
    raw = yaml.safe_load((CONF / group / f"{option}.yaml").read_text())
    assert raw["name"] == option
    assert make_cfg([f"{group}={option}"])[group].name == option


def _job(group: str, option: str) -> list[str]:
    if group == "network":
        shape = make_cfg([f"network={option}"]).network.input_shape or [1, 8, 8]
        return [*NETWORK_JOB, f"network={option}", f"dataset.shape=[{','.join(map(str, shape))}]"]
    if group == "dataset":
        job = [*TINY_CLUSTER, "network=fc", f"dataset={option}"]
        if "download" in make_cfg([f"dataset={option}"]).dataset:
            job.append("dataset.download=false")  # no network access in tests: absent files must fail clearly
        return job
    if group == "mode":
        # baseline over 15 workers with f=1 fits every rule's bound (bulyan: 15 >= 4*1 + 3)
        return [*TINY, "workers=15", "approach=baseline", f"mode={option}"]
    return [*TINY, f"{group}={option}"]


@pytest.mark.parametrize(("group", "option"), ALL_OPTIONS)
def test_option_runs_a_few_steps(group: str, option: str, tmp_path: Path, data_root: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from detox.train import run

    if (group, option) == ("dataset", "svhn"):  # tiny release files of the real format where torchvision reads them
        fake_svhn(data_root / "svhn", monkeypatch, sizes=(64, 16))
    cfg = make_cfg(_job(group, option))
    summary = run(cfg, tmp_path, multirun=True)  # multirun: a failure comes back as a summary
    if summary["status"] == "failed" and "DataUnavailable" in summary["error"]:
        # the data set's files are not on this machine: the one-line error must say where they go
        assert group == "dataset" and option not in ("digits", "synthetic", "svhn")
        assert cfg.dataset.name in summary["error"] and str(data_root) in summary["error"]
        return
    assert summary["status"] == "completed", summary.get("error")
    assert summary["steps"] == cfg.max_steps
    assert summary["choices"][group] == option


def test_tiny_default_job_writes_design_outputs(tmp_path: Path) -> None:
    summary = run_job(TINY, tmp_path)
    assert summary["status"] == "completed"
    assert {p.name for p in tmp_path.iterdir()} >= {"metrics.jsonl", "summary.json", "resolved_config.yaml"}


PRESET_GROUPS = ("task", "method")


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in PRESET_GROUPS for o in options(g)])
def test_preset_labels_itself_and_validates(group: str, option: str) -> None:
    from detox.config import validate

    cfg = make_cfg([f"{group}={option}"])
    assert cfg[group] == option  # the label analysis groups by
    validate(cfg)


@pytest.mark.parametrize("option", options("method"))
def test_method_preset_runs_on_the_paper_cluster(option: str, tmp_path: Path) -> None:
    summary = run_job(["workers=45", "worker_fail=5", "max_steps=2", "eval_freq=2", "batch_size=4",
                       "dataset=synthetic", "dataset.train_size=64", "dataset.test_size=16", f"method={option}"],
                      tmp_path)
    assert summary["status"] == "completed" and summary["choices"]["method"] == option
