"""Up-front validation of a composed config: one clear line per problem, before any work starts."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from detox.aggregators import requirement_error
from detox.approaches import Plan, decisive, plan_from_cfg
from detox.attacks import alie_z_max
from detox.cluster.hostfile import parse_hostfile
from detox.errors import ConfigError
from detox.models import MODELS
from detox.schema import check

# what a deliberately faulty worker of engine=mpi does (engine.faults[].kind; detox.mpi)
FAULT_KINDS = ("wrong_length", "random_bytes", "pickle", "float64", "bad_blosc", "empty", "exit", "hang",
               "huge", "extra_message", "wrong_tag", "lying_meta")


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


def _check_memory(cfg: DictConfig, plan: Plan) -> None:
    """The PS holds a (P, d) float32 gradient matrix (and Krum-type rules an (n, n) float64 distance matrix):
    refuse a config that cannot fit in this machine's memory, before anything is allocated."""
    d = parameter_count(cfg, list(cfg.dataset.shape), int(cfg.dataset.num_classes))
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


def validate(cfg: DictConfig) -> Plan:
    """Check every key's type and range (detox.schema), then every cross-field rule, with arithmetic only;
    return the resolved aggregation plan. Raises ConfigError with one line on the first problem."""
    check(cfg)
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
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r}: no CUDA device is available here; use device=cpu")

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

    net_shape = cfg.network.get("input_shape")
    if net_shape is not None and list(net_shape) != list(cfg.dataset.shape):
        raise ConfigError(
            f"network={cfg.network.name} expects inputs of shape {list(net_shape)} but dataset={cfg.dataset.name} "
            f"has {list(cfg.dataset.shape)}; pick a matching dataset (or network=fc, which takes any shape)"
        )
    if cfg.engine.name == "mpi":
        _check_mpi(cfg)
    _check_memory(cfg, plan)
    return plan


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
        raise ConfigError(f"engine.hostfile={e.hostfile!r}: no such file")
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
