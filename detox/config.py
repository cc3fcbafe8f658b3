"""Up-front validation of a composed config: one clear line per problem, before any work starts."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from detox.aggregators import requirement_error
from detox.approaches import Plan, decisive, plan_from_cfg
from detox.attacks import alie_z_max
from detox.cluster.hostfile import parse_hostfile
from detox.data import PAD, stratified_split
from detox.errors import ConfigError
from detox.models import MODELS
from detox.schema import OPTION_NAME, check, options, show
from detox.tuning import apply_lr_picks

# what a deliberately faulty worker of engine=mpi does (engine.faults[].kind; detox.mpi)
FAULT_KINDS = ("wrong_length", "random_bytes", "pickle", "float64", "bad_blosc", "empty", "exit", "hang",
               "huge", "extra_message", "wrong_tag", "lying_meta", "nan_loss",
               "ack_hang", "fork_stdout", "forged_death", "exit0", "segv")  # the last five: how the world ends


def _rule_fits(rule: str, n: int, f: int, params: dict, where: str) -> None:
    """Arithmetic only (instant at any n): the rule's own requirement on (n, f) and its parameters."""
    problem = requirement_error(rule, n, f, params)
    if problem:
        raise ConfigError(f"{where}: {problem}")


def available_bytes() -> int | None:
    """Memory this machine can still give (MemAvailable), or None where /proc/meminfo is missing."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def parameter_count(cfg: DictConfig, shape: list[int], num_classes: int) -> int:
    """d, the model's parameter count, built on the meta device (no memory, no RNG use)."""
    params = {k: v for k, v in cfg.network.items() if k not in ("name", "input_shape")}
    with torch.device("meta"):
        model = MODELS[cfg.network.name](tuple(shape), num_classes, **params)
    return sum(p.numel() for p in model.parameters())


# rules that hold an (n, n) float64 matrix of pairwise distances
PAIRWISE = ("krum", "multi-krum", "bulyan")

# the images and classes of the data sets whose loader ignores dataset.shape and dataset.num_classes (detox.data)
FIXED: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((1, 8, 8), 10), "mnist": ((1, 28, 28), 10), "fashion_mnist": ((1, 28, 28), 10),
    "cifar10": ((3, 32, 32), 10), "cifar100": ((3, 32, 32), 100), "svhn": ((3, 32, 32), 10),
}
# (train, test) images of each release (SVHN: its 'extra' split is not used)
RELEASE_SIZES: dict[str, tuple[int, int]] = {
    "mnist": (60000, 10000), "fashion_mnist": (60000, 10000), "cifar10": (50000, 10000),
    "cifar100": (50000, 10000), "svhn": (73257, 26032),
}
# scikit-learn's digits: images of each class 0..9 (1,797 in all; tests/test_config_audit.py checks the file)
DIGITS_PER_CLASS = (178, 182, 177, 183, 181, 182, 181, 179, 174, 180)


@dataclass(frozen=True)
class DataFacts:
    """What the loader will deliver, whatever the config claims: image shape, classes, train and test sizes
    (None where unknown)."""

    shape: tuple[int, ...]
    num_classes: int
    train: int | None
    test: int | None


def digits_split(test_fraction: float, split_seed: int) -> tuple[int, int]:
    """(train, test) sizes of digits, by detox.data's own per-class split (its sizes do not depend on the seed's
    shuffle; labels suffice)."""
    labels = np.repeat(np.arange(len(DIGITS_PER_CLASS)), DIGITS_PER_CLASS)
    train, test = stratified_split(labels, test_fraction, split_seed)
    return len(train), len(test)


def data_facts(cfg: DictConfig) -> DataFacts:
    """synthetic: what its config asks for; every other data set: its own shape, classes and split sizes."""
    d = cfg.dataset
    if d.name == "synthetic":
        return DataFacts(tuple(d.shape), int(d.num_classes), int(d.train_size), int(d.test_size))
    shape, classes = FIXED.get(d.name, (tuple(d.shape), int(d.num_classes)))
    if d.name == "digits":
        return DataFacts(shape, classes, *digits_split(float(d.test_fraction), int(d.split_seed)))
    return DataFacts(shape, classes, *RELEASE_SIZES.get(d.name, (None, None)))


def _check_data(cfg: DictConfig) -> DataFacts:
    """A fixed data set's shape and classes as configured, both splits non-empty and a batch that fits: refused
    here, before Hydra makes a folder (the loader would crash, or record a shape it never used)."""
    d, facts = cfg.dataset, data_facts(cfg)
    if list(d.shape) != list(facts.shape):
        raise ConfigError(f"dataset.shape={list(d.shape)}: dataset={d.name} has images of shape {list(facts.shape)} "
                          f"(only dataset=synthetic takes a shape); leave it at {list(facts.shape)}")
    if int(d.num_classes) != facts.num_classes:
        raise ConfigError(f"dataset.num_classes={d.num_classes}: dataset={d.name} has {facts.num_classes} classes "
                          f"(only dataset=synthetic takes a number of classes); leave it at {facts.num_classes}")
    if d.name == "digits" and not (facts.train and facts.test):
        empty, fix = ("test", "larger") if not facts.test else ("training", "smaller")
        raise ConfigError(f"dataset.test_fraction={d.test_fraction}: leaves the {empty} set of dataset=digits empty "
                          f"({sum(DIGITS_PER_CLASS)} images, each class split by round(test_fraction * its size)); "
                          f"use a {fix} test_fraction (default 0.2)")
    if facts.train is not None and int(cfg.batch_size) > facts.train:
        size_key = {"digits": f" with dataset.test_fraction={d.get('test_fraction')}",
                    "synthetic": f" (dataset.train_size={d.get('train_size')})"}.get(d.name, "")
        raise ConfigError(f"batch_size={cfg.batch_size}: exceeds the {facts.train} training samples of "
                          f"dataset={d.name}{size_key}; use batch_size <= {facts.train}")
    if d.get("augment") == "crop-flip-reflect" and min(facts.shape[1:]) <= PAD:
        raise ConfigError(f"dataset.augment=crop-flip-reflect: mirrors {PAD} pixels on each side, which needs images "
                          f"larger than {PAD}x{PAD} (dataset={d.name} has {list(facts.shape)}); use crop-flip or null")
    return facts


def _check_memory(cfg: DictConfig, plan: Plan, facts: DataFacts) -> None:
    """The PS holds a (P, d) float32 gradient matrix (and Krum-type rules an (n, n) float64 distance matrix):
    refuse a config that cannot fit in this machine's memory, before anything is allocated."""
    d = parameter_count(cfg, list(facts.shape), facts.num_classes)
    need = plan.workers * d * 4
    what = f"the ({plan.workers}, {d}) float32 gradient matrix of network={cfg.network.name}"
    pairs = max([plan.rule_inputs ** 2 * 8 if plan.mode in PAIRWISE else 0]
                + [-(-plan.units // plan.buckets) ** 2 * 8 if plan.buckets and plan.inner in PAIRWISE else 0])
    if pairs:
        need += pairs
        what += " and the rule's pairwise distances"
    have = available_bytes()
    if have is not None and need > have:
        raise ConfigError(f"workers={plan.workers}: needs {need / 2**30:.1f} GiB for {what}; this machine has "
                          f"{have / 2**30:.1f} GiB available: use fewer workers or a smaller network")


def device_problem(device: str) -> str | None:
    """Why ``device`` cannot run on this machine (no CUDA, or an index past its devices: torch's "invalid device
    ordinal" came only after the data set was loaded), or None. Shared by training and the evaluator."""
    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return "no CUDA device is available here; use device=cpu"
    index, count = device.partition(":")[2], torch.cuda.device_count()
    if index and (not index.isdecimal() or int(index) >= count):
        names = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        return f"this machine's CUDA devices are {names}; give one of them, or device=cpu"
    return None


def validate(cfg: DictConfig) -> Plan:
    """Check every key's type and range (detox.schema), then every cross-field rule, with arithmetic only;
    return the resolved aggregation plan. Raises ConfigError with one line on the first problem. The one change it
    makes: with ``lr_picks`` set, ``cfg.lr`` becomes the picked lr (detox.tuning), so the run, its
    resolved_config.yaml and its summary all carry it."""
    _check_choices(cfg)
    check(cfg)
    _check_option_keys(cfg)
    apply_lr_picks(cfg)  # lr_picks=<file>: lr becomes the one tuned for this (task, method, err_mode), or refused
    workers, q, r = int(cfg.workers), int(cfg.worker_fail), int(cfg.group_size)
    if q > workers:
        raise ConfigError(f"worker_fail={q}: must be <= workers ({workers})")
    every = cfg.checkpoint.every
    if every is not None and every % int(cfg.eval_freq):
        raise ConfigError(f"checkpoint.every={every!r}: must be null or a positive multiple of "
                          f"eval_freq ({cfg.eval_freq}): checkpoints are taken at evaluations")
    if not cfg.save and (cfg.evaluation == "external" or cfg.model_dir is not None):
        key = "evaluation=external" if cfg.evaluation == "external" else f"model_dir={cfg.model_dir!r}"
        raise ConfigError(f"{key}: the run writes weights files (for python -m detox.evaluate), which needs "
                          f"save=true")
    if (why := device_problem(str(cfg.device))) is not None:
        raise ConfigError(f"device={cfg.device}: {why}")

    grouped = cfg.approach.name != "baseline"
    if grouped:
        _check_groups(cfg, workers, q, r)
    groups = workers // r
    buckets = cfg.approach.get("buckets")
    if grouped and buckets is not None and buckets > groups:
        raise ConfigError(f"approach.buckets={buckets!r}: must be null or an integer in [1, {groups}] "
                          f"(the number of groups, workers / group_size)")

    plan = plan_from_cfg(cfg)
    try:
        _check_rules(plan, groups)
    except ConfigError as err:
        fits = _largest_worker_fail(cfg, groups)
        if fits is None or fits >= q:
            raise
        raise ConfigError(f"{err}; with workers={workers} and group_size={r}, worker_fail <= {fits} fits") from None
    if cfg.err_mode.name == "alie" and cfg.err_mode.get("z") is None and q:
        try:
            alie_z_max(workers, q)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    facts = _check_data(cfg)
    net_shape = cfg.network.get("input_shape")
    if net_shape is not None and list(net_shape) != list(facts.shape):
        raise ConfigError(
            f"network={cfg.network.name} expects inputs of shape {list(net_shape)} but dataset={cfg.dataset.name} "
            f"has {list(facts.shape)}; pick a matching dataset (or network=fc, which takes any shape)"
        )
    if cfg.engine.name == "mpi":
        _check_mpi(cfg)
    _check_memory(cfg, plan, facts)
    return plan


# groups whose options each take their own settings: a setting of another option of the group would be ignored
OWN_KEYS_GROUPS = ("mode", "err_mode")


@lru_cache(maxsize=64)
def option_keys(group: str, name: str) -> frozenset[str] | None:
    """The settings ``conf/<group>/<name>.yaml`` defines (None: no such file, refused elsewhere)."""
    path = Path(__file__).resolve().parents[1] / "conf" / group / f"{name}.yaml"
    if not re.fullmatch(OPTION_NAME, name) or not path.is_file():
        return None
    return frozenset(OmegaConf.load(path).keys())


def _check_option_keys(cfg: DictConfig) -> None:
    """``mode=krum mode.theta=3`` or ``err_mode=rev_grad +err_mode.z=1``: a setting the chosen option does not read
    (another option's) would be silently ignored; refused, naming the option's own settings."""
    for group in OWN_KEYS_GROUPS:
        node = cfg.get(group)
        own = option_keys(group, str(node.get("name"))) if isinstance(node, DictConfig) else None
        if own is None:
            continue
        extra = sorted(k for k in node.keys() if k not in own)
        if extra:
            raise ConfigError(f"{group}.{extra[0]}={show(node[extra[0]])}: not a setting of {group}={node.name} "
                              f"(its settings: {', '.join(sorted(own - {'name'})) or 'none'})")




def _choices(cfg: DictConfig) -> Mapping:
    """The option Hydra loaded for each config group: from the config's hydra node (the ValidateFirst callback's
    config has it), else from the running Hydra job; {} outside Hydra (compose in tests)."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices", default=None)
    if choices is not None:
        return choices
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}


def _check_choices(cfg: DictConfig) -> None:
    """Every config group's option is a name (Hydra would follow mode=../x out of the group's folder)."""
    for group, choice in _choices(cfg).items():
        if "/" in group or choice is None:  # Hydra's own groups (hydra/launcher, ...); an unset preset
            continue
        if not re.fullmatch(OPTION_NAME, str(choice)) or ".." in str(choice):
            raise ConfigError(f"{group}={choice}: not an option name (a path is not taken); choose from "
                              f"{', '.join(sorted(options(group)()))}")


def _check_rules(plan: Plan, groups: int) -> None:
    """The rule's (n, f) requirement for the inputs it sees, and the inner rule's for every bucket size."""
    _rule_fits(plan.mode, plan.rule_inputs, plan.f, plan.mode_params,
               f"mode={plan.mode} with approach={plan.approach} sees n={plan.rule_inputs} inputs per step "
               f"and f={plan.f} (set mode.f, worker_fail, workers or approach.buckets)")
    if plan.grouped and plan.buckets and plan.buckets < groups:
        # np.array_split: buckets of groups // buckets and groups // buckets + 1 winners
        for size in sorted({groups // plan.buckets, -(-groups // plan.buckets)}):
            _rule_fits(plan.inner, size, plan.inner_f, plan.inner_params,
                       f"approach.inner={plan.inner} sees n={size} winners in a bucket "
                       f"with f={plan.inner_f} (set approach.inner_f or approach.buckets)")


def _largest_worker_fail(cfg: DictConfig, groups: int) -> int | None:
    """The largest worker_fail whose rules fit, other settings unchanged (a larger q never fits better, so a
    binary search: instant at any size); None if not even 0 does."""
    def fits(q: int) -> bool:
        try:
            _check_rules(plan_from_cfg(OmegaConf.merge(cfg, {"worker_fail": q})), groups)
        except ConfigError:
            return False
        return True

    lo, hi = 0, int(cfg.worker_fail)
    if not fits(lo):
        return None
    while lo < hi:  # invariant: fits(lo)
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _check_groups(cfg: DictConfig, workers: int, q: int, r: int) -> None:
    """What redundancy needs (DESIGN §3): groups that tile the workers, an odd size, and at least one group the
    Byzantines cannot outvote."""
    name = cfg.approach.name
    if workers % r:
        raise ConfigError(f"group_size={r}: workers={workers} must be divisible by it for approach={name}")
    if r % 2 == 0:
        # an even group can tie (r = 2: one Byzantine forces the fallback, whose median of two is their mean)
        raise ConfigError(f"group_size={r}: must be odd for approach={name} (an even group can tie, and a tie "
                          f"has no majority); use {r - 1} or {r + 1}")
    need = decisive(r, cfg.approach.get("vote", "strict"))
    if q >= need * (workers // r):
        raise ConfigError(f"worker_fail={q}: with workers={workers} in groups of {r} the Byzantines can hold the "
                          f"majority of every group (needs worker_fail < {need * (workers // r)})")


def _check_hostfile(cfg: DictConfig) -> None:
    """The hostfile parses, and has a slot for every rank unless mpiexec may oversubscribe."""
    e = cfg.engine
    path = Path(str(e.hostfile)).expanduser()
    if not path.is_file():
        raise ConfigError(f"engine.hostfile={e.hostfile!r}: " + ("is a folder, not a hostfile" if path.is_dir() else
                                                                 "no such file"))
    try:
        hosts = parse_hostfile(path)
    except ValueError as err:
        raise ConfigError(f"engine.hostfile={e.hostfile!r}: {err}") from None
    ranks = int(cfg.workers) + 1
    slots = sum(n for _, n in hosts)
    # "--oversubscribe" or Open MPI 5's "--map-by :OVERSUBSCRIBE" lets more ranks than slots start
    oversubscribe = any("oversubscribe" in str(arg).lower() for arg in e.launcher_args or [])
    if slots < ranks and not oversubscribe:
        raise ConfigError(f"engine.hostfile={e.hostfile!r}: {slots} slots on {len(hosts)} hosts for {ranks} ranks "
                          f"(workers={cfg.workers} + the PS); add hosts or slots, or put --oversubscribe in "
                          f"engine.launcher_args")


def _check_mpi(cfg: DictConfig) -> None:
    """Cross-field checks of engine=mpi (types and ranges are the schema's): all before mpiexec starts."""
    e = cfg.engine
    if str(cfg.device) != "cpu":
        raise ConfigError(f"device={cfg.device!r}: engine=mpi moves CPU tensors; use device=cpu")
    if not cfg.save:
        raise ConfigError("save=false: engine=mpi reports through files in the job directory; use save=true")
    if e.get("compress"):
        import blosc

        if e.codec not in blosc.compressor_list():
            raise ConfigError(f"engine.codec={e.codec!r}: not in this blosc build; choose from "
                              f"{', '.join(blosc.compressor_list())}")
    if e.get("hostfile"):
        _check_hostfile(cfg)
    for i, fault in enumerate(e.faults):
        if not 1 <= fault.rank <= int(cfg.workers):
            raise ConfigError(f"engine.faults[{i}].rank={fault.rank!r}: must be a worker rank in [1, {cfg.workers}]")
    _check_launch(cfg)


def _check_launch(cfg: DictConfig) -> None:
    """mpiexec and the ranks' Python exist here: the first host (this machine) runs rank 0 with that Python."""
    from detox.mpi import launcher_path  # lazily: detox.mpi imports the trainer, which imports this module

    e = cfg.engine
    launcher = launcher_path(cfg)
    if shutil.which(launcher) is None:
        raise ConfigError(f"engine.launcher={show(e.launcher)}: {launcher} is not an executable file nor a command "
                          f"on PATH; name mpiexec's path (null: the mpiexec next to this Python, else on PATH)")
    if e.python and shutil.which(str(e.python)) is None:
        raise ConfigError(f"engine.python={show(e.python)}: not an executable file nor a command on PATH here "
                          f"(rank 0 runs on this machine with it); name a Python with detox installed "
                          f"(null: {sys.executable})")
