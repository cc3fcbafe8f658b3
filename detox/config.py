"""Up-front validation of a composed config: one clear line per problem, before any work starts."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from detox.aggregators import AGGREGATORS
from detox.approaches import APPROACHES, Plan, plan_from_cfg
from detox.attacks import ATTACKS, PLACEMENTS, alie_z_max
from detox.cluster.hostfile import parse_hostfile

# what a deliberately faulty worker of engine=mpi does (engine.faults[].kind; detox.mpi)
FAULT_KINDS = ("wrong_length", "random_bytes", "pickle", "float64", "bad_blosc", "empty", "exit", "hang")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and what is allowed."""


def _int(cfg: DictConfig, key: str, low: int, what: str = "") -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{key}={value!r}: must be an integer >= {low}{what}")
    return value


def _positive(cfg: DictConfig, key: str) -> float:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{key}={value!r}: must be a number > 0")
    return float(value)


def _known(key: str, value: str, registry: dict) -> None:
    if value not in registry:
        raise ConfigError(f"{key}={value!r}: unknown; choose from {', '.join(sorted(registry))}")


def _rule_fits(rule: str, n: int, f: int, params: dict, where: str) -> None:
    """Run the rule on an (n, 1) dummy: its own requirement check says whether (n, f) can work."""
    try:
        AGGREGATORS[rule](torch.zeros(n, 1), f, **params)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: {err}") from None


def validate(cfg: DictConfig) -> Plan:
    """Check every cross-field rule and return the resolved aggregation plan."""
    workers = _int(cfg, "workers", 1)
    q = _int(cfg, "worker_fail", 0)
    if q > workers:
        raise ConfigError(f"worker_fail={q}: must be <= workers ({workers})")
    r = _int(cfg, "group_size", 1)
    for key in ("batch_size", "max_steps", "eval_freq", "eval_batch_size"):
        _int(cfg, key, 1)
    _int(cfg, "bn_calibration_batches", 0)
    _positive(cfg, "lr")
    if not 0.0 <= float(cfg.momentum) < 1.0:
        raise ConfigError(f"momentum={cfg.momentum!r}: must be in [0, 1)")
    if cfg.target_acc is not None and not 0.0 < float(cfg.target_acc) <= 1.0:
        raise ConfigError(f"target_acc={cfg.target_acc!r}: must be in (0, 1] or null")
    if float(cfg.weight_decay) < 0:
        raise ConfigError(f"weight_decay={cfg.weight_decay!r}: must be >= 0")
    every = (cfg.get("checkpoint") or {}).get("every")
    if every is not None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1 or every % int(cfg.eval_freq):
            raise ConfigError(f"checkpoint.every={every!r}: must be null or a positive multiple of "
                              f"eval_freq ({cfg.eval_freq}): checkpoints are taken at evaluations")
    if int(cfg.dataset.num_classes) < 2:
        raise ConfigError(f"dataset.num_classes={cfg.dataset.num_classes!r}: a classifier needs at least 2 classes")
    _check_attack(cfg)
    _known("mode", cfg.mode.name, AGGREGATORS)
    _known("approach", cfg.approach.name, APPROACHES)
    _known("err_mode", cfg.err_mode.name, ATTACKS)
    _known("adversary.placement", cfg.adversary.placement, PLACEMENTS)
    if str(cfg.device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r}: no CUDA device is available here; use device=cpu")

    grouped = cfg.approach.name != "baseline"
    if grouped and workers % r:
        raise ConfigError(
            f"group_size={r}: workers={workers} must be divisible by it for approach={cfg.approach.name}"
        )
    groups = workers // r
    buckets = cfg.approach.get("buckets")
    if grouped and buckets is not None:
        if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= groups:
            raise ConfigError(f"approach.buckets={buckets!r}: must be null or an integer in [1, {groups}] "
                              f"(the number of groups, workers / group_size)")
    if grouped and cfg.approach.get("inner", "mean") is not None:
        _known("approach.inner", cfg.approach.get("inner", "mean"), AGGREGATORS)
    if grouped and not float(cfg.approach.get("vote_tol") or 0.0) >= 0:
        raise ConfigError(f"approach.vote_tol={cfg.approach.vote_tol!r}: must be >= 0 (0: bit-exact majority)")
    inner_f = cfg.approach.get("inner_f")
    if inner_f is not None and (isinstance(inner_f, bool) or not isinstance(inner_f, int) or inner_f < 0):
        raise ConfigError(f"approach.inner_f={inner_f!r}: must be null or an integer >= 0")

    plan = plan_from_cfg(cfg)
    if plan.f < 0:
        raise ConfigError(f"mode.f={plan.f}: must be >= 0")
    _rule_fits(plan.mode, plan.rule_inputs, plan.f, plan.mode_params,
               f"mode={plan.mode} with approach={plan.approach} sees n={plan.rule_inputs} inputs per step "
               f"and f={plan.f} (set mode.f, worker_fail, workers or approach.buckets)")
    if grouped and plan.buckets and plan.buckets < groups:
        smallest = groups // plan.buckets
        _rule_fits(plan.inner, smallest, plan.inner_f, plan.inner_params,
                   f"approach.inner={plan.inner} sees as few as n={smallest} winners per bucket "
                   f"with f={plan.inner_f} (set approach.inner_f or approach.buckets)")
    if cfg.err_mode.name == "alie" and cfg.err_mode.get("z") is None and q:
        try:
            alie_z_max(workers, q)
        except ValueError as err:
            raise ConfigError(str(err)) from None

    if cfg.engine.name == "mpi":
        _check_mpi(cfg)

    net_shape = cfg.network.get("input_shape")
    if net_shape is not None and list(net_shape) != list(cfg.dataset.shape):
        raise ConfigError(
            f"network={cfg.network.name} expects inputs of shape {list(net_shape)} but dataset={cfg.dataset.name} "
            f"has {list(cfg.dataset.shape)}; pick a matching dataset (or network=fc, which takes any shape)"
        )
    return plan


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
    e = cfg.engine
    if str(cfg.device) != "cpu":
        raise ConfigError(f"device={cfg.device!r}: engine=mpi moves CPU tensors; use device=cpu")
    if not cfg.save:
        raise ConfigError("save=false: engine=mpi reports through files in the job directory; use save=true")
    if e.get("compress") not in (None, "blosc"):
        raise ConfigError(f"engine.compress={e.compress!r}: must be null or blosc")
    if e.get("compress"):
        import blosc

        if e.codec not in blosc.compressor_list():
            raise ConfigError(f"engine.codec={e.codec!r}: not in this blosc build; choose from "
                              f"{', '.join(blosc.compressor_list())}")
    if not float(e.timeout) > 0:
        raise ConfigError(f"engine.timeout={e.timeout!r}: must be > 0 seconds")
    if e.get("hostfile"):
        _check_hostfile(cfg)
    for i, fault in enumerate(e.get("faults") or []):
        if fault.get("kind") not in FAULT_KINDS:
            raise ConfigError(f"engine.faults[{i}].kind={fault.get('kind')!r}: choose from {', '.join(FAULT_KINDS)}")
        rank = fault.get("rank")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= int(cfg.workers):
            raise ConfigError(f"engine.faults[{i}].rank={rank!r}: must be a worker rank in [1, {cfg.workers}]")


# attack parameters that must be finite and non-negative to mean anything (constant's value may be anything:
# NaN and inf payloads are how the hostile-value tests attack)
_ATTACK_BOUNDS = {"rev_grad": ("scale", 0.0), "gaussian": ("std", 0.0), "ipm": ("epsilon", 0.0)}


def _check_attack(cfg: DictConfig) -> None:
    name = cfg.err_mode.name
    if name in _ATTACK_BOUNDS:
        key, low = _ATTACK_BOUNDS[name]
        value = cfg.err_mode.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
            raise ConfigError(f"err_mode.{key}={value!r}: must be a finite number >= {low:g} for err_mode={name}")
    if name == "alie" and cfg.err_mode.get("z") is not None:
        z = cfg.err_mode.z
        if isinstance(z, bool) or not isinstance(z, int | float) or not math.isfinite(z):
            raise ConfigError(f"err_mode.z={z!r}: must be a finite number or null (z_max)")
