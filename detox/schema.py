"""The config's schema: the type and range of every key, checked before anything else runs.

Every leaf of the composed config (``workers``, ``mode.f``, ``engine.timeout``, ...) has one entry in ``SCHEMA``,
keyed by its dotted path; a config group's keys are shared by all of its options (``mode.m`` is the key ``m`` of
whichever ``mode`` option has it). A key the schema does not know is refused, so a new key needs an entry before
anything can run with it (tests/test_schema.py enumerates every option file to keep that true).

Why not Hydra structured configs: they reject a wrong type at composition, but with a multi-line error and exit 1,
cannot state ranges (``lr`` finite and > 0, ``momentum`` in [0, 1)), and need a dataclass per option file. One
table gives every refusal the same one line: the key, the value, what is allowed.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detox.errors import ConfigError

# a config group's option as typed: a file name in the group's folder, never a path (mode=../../x would load a
# YAML from outside conf/); also what analysis.labels looks up there
OPTION_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


# counts and steps are int64 wherever they are stored (checkpoints, numpy, pandas) and sized with floats (memory):
# a 400-digit count was an OverflowError traceback
INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Int:
    lo: int | None = None
    hi: int | None = None
    null: bool = False

    def error(self, v: Any) -> str | None:
        if _is_int(v) and (self.lo is None or v >= self.lo) and (self.hi is None or v <= self.hi):
            return None
        # int64's limit is named only to a value past it: ">= 1" is what a count needs to say otherwise
        hi = None if self.hi == INT64_MAX and not (_is_int(v) and v > self.hi) else self.hi
        shown = "2^63 - 1" if hi == INT64_MAX else hi
        bounds = {(False, False): "", (True, False): f" >= {self.lo}", (False, True): f" <= {shown}",
                  (True, True): f" in [{self.lo}, {shown}]"}[(self.lo is not None, hi is not None)]
        return f"must be an integer{bounds}" + (" or null" if self.null else "")


@dataclass(frozen=True)
class Num:
    """A finite number (ints accepted) in a range; ``open_lo``: strictly above ``lo``."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False
    finite: bool = True
    null: bool = False

    def error(self, v: Any) -> str | None:
        # an int beyond float range (a 400-digit literal) is no number a run can use: refused here in one line,
        # not an OverflowError from math.isfinite (or from torch mid-run, for err_mode.value)
        ok = _is_num(v) and not (isinstance(v, int) and abs(v) > sys.float_info.max)
        ok = ok and (not self.finite or math.isfinite(v))
        if ok and self.lo is not None:
            ok = v > self.lo if self.open_lo else v >= self.lo
        if ok and self.hi is not None:
            ok = v < self.hi if self.open_hi else v <= self.hi
        if ok:
            return None
        what = "a finite number" if self.finite else "a number"
        if self.lo is not None and self.hi is not None:
            what += f" in {'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}{')' if self.open_hi else ']'}"
        elif self.lo is not None:
            what += f" {'>' if self.open_lo else '>='} {self.lo:g}"
        elif self.hi is not None:
            what += f" {'<' if self.open_hi else '<='} {self.hi:g}"
        return f"must be {what}" + (" or null" if self.null else "")


@dataclass(frozen=True)
class Bool:
    null: bool = False

    def error(self, v: Any) -> str | None:
        return None if isinstance(v, bool) else "must be true or false"


@dataclass(frozen=True)
class Str:
    """A string; ``choices`` (a tuple, or a registry dict read at check time) or a regex ``pattern``."""

    choices: tuple[str, ...] | Callable[[], Mapping | tuple] | None = None
    pattern: str | None = None
    null: bool = False

    def allowed(self) -> list[str] | None:
        if self.choices is None:
            return None
        found = self.choices() if callable(self.choices) else self.choices
        return sorted(found)

    def error(self, v: Any) -> str | None:
        allowed = self.allowed()
        if isinstance(v, str) and v and (allowed is None or v in allowed) and (
                self.pattern is None or re.fullmatch(self.pattern, v)):
            return None
        null = " or null" if self.null else ""
        if allowed is not None:
            return f"unknown; choose from {', '.join(allowed)}{null}"
        return f"must be a non-empty string{f' matching {self.pattern}' if self.pattern else ''}{null}"


@dataclass(frozen=True)
class IntOrName:
    """An integer count >= ``lo``, or one of the named choices a rule resolves per call from its (n, f)."""

    names: tuple[str, ...]
    lo: int = 1
    null: bool = True

    def error(self, v: Any) -> str | None:
        if (_is_int(v) and v >= self.lo) or (isinstance(v, str) and v in self.names):
            return None
        return f"must be an integer >= {self.lo}, {' or '.join(self.names)}" + (" or null" if self.null else "")


@dataclass(frozen=True)
class IntList:
    """A list of integers >= ``lo`` (``length``: exactly that many)."""

    lo: int = 1
    length: int | None = None
    null: bool = False

    def error(self, v: Any) -> str | None:
        if isinstance(v, list | tuple) and all(_is_int(x) and x >= self.lo for x in v) and (
                self.length is None or len(v) == self.length):
            return None
        size = f"{self.length} " if self.length else ""
        return f"must be a list of {size}integers >= {self.lo}" + (" or null" if self.null else "")


@dataclass(frozen=True)
class StrList:
    null: bool = False

    def error(self, v: Any) -> str | None:
        if isinstance(v, list | tuple) and all(isinstance(x, str | int | float) and not isinstance(x, bool)
                                               for x in v):
            return None
        return "must be a list of strings"


@dataclass(frozen=True)
class Records:
    """A list of mappings with these keys, each value checked by its own spec (``engine.faults``)."""

    fields: tuple[tuple[str, Any], ...]
    required: tuple[str, ...] = ()
    null: bool = False

    def error(self, v: Any) -> str | None:
        specs = dict(self.fields)
        if not isinstance(v, list | tuple):
            return f"must be a list of {{{', '.join(specs)}}} entries"
        for i, item in enumerate(v):
            if not isinstance(item, Mapping):
                return f"entry {i} must be a mapping with keys {', '.join(specs)}"
            for key in item:
                if key not in specs:
                    return f"entry {i} has unknown key {key!r}; allowed: {', '.join(specs)}"
            for key in self.required:
                if key not in item:
                    return f"entry {i} needs the key {key!r}"
            for key, value in item.items():
                problem = _spec_error(specs[key], value)
                if problem:
                    return f"entry {i}: {key}={value!r}: {problem}"
        return None


@dataclass(frozen=True)
class Params:
    """A mapping of rule parameters (``approach.inner_params``); its values are checked by the rule's own
    requirement (detox.aggregators) once the rule and its n are known."""

    null: bool = False

    def error(self, v: Any) -> str | None:
        if isinstance(v, Mapping) and all(isinstance(k, str) for k in v):
            return None
        return "must be a mapping of rule parameters, e.g. {m: original}"


def _spec_error(spec: Any, value: Any) -> str | None:
    if value is None:
        return None if spec.null else spec.error(value) or "must not be null"
    return spec.error(value)


def _registry(module: str, name: str) -> Callable[[], Mapping]:
    """The keys of a registry dict, imported when first checked (the registries import torch)."""
    def keys() -> Mapping:
        import importlib

        return getattr(importlib.import_module(module), name)
    return keys


def options(group: str) -> Callable[[], tuple[str, ...]]:
    """The option files of a config group (conf/<group>/*.yaml), listed when called."""
    def names() -> tuple[str, ...]:
        from pathlib import Path

        conf = Path(__file__).resolve().parent.parent / "conf" / group
        return tuple(p.stem for p in conf.glob("*.yaml"))
    return names


POSITIVE = Int(lo=1, hi=INT64_MAX)
COUNT = Int(lo=0, hi=INT64_MAX)
SEED = Int(lo=0, hi=2**32 - 1)  # numpy and torch accept any seed in this range
SECONDS = Num(lo=0.0, open_lo=True)
# a path or a label may hold anything printable but no control characters (a newline would break logs and files)
PATH = Str(pattern=r"[^\x00-\x1f]+")
LABEL = Str(pattern=r"[^\x00-\x1f]+", null=True)
DEVICE = Str(pattern=r"cpu|cuda(:\d+)?")

SCHEMA: dict[str, Any] = {
    # cluster and adversary
    "workers": POSITIVE,
    "worker_fail": COUNT,
    "group_size": POSITIVE,
    "adversary.placement": Str(_registry("detox.attacks", "PLACEMENTS")),
    # optimisation
    "batch_size": POSITIVE,
    "lr": Num(lo=0.0, open_lo=True),
    "lr_picks": Str(pattern=r"[^\x00-\x1f]+", null=True),  # analysis.tune's picks file (detox.tuning)
    "momentum": Num(lo=0.0, hi=1.0, open_hi=True),
    "weight_decay": Num(lo=0.0),
    "max_steps": POSITIVE,
    "eval_freq": POSITIVE,
    "evaluation": Str(("inloop", "external")),
    "model_dir": Str(pattern=r"[^\x00-\x1f]+", null=True),
    "eval_batch_size": POSITIVE,
    "bn_calibration_batches": COUNT,
    "target_acc": Num(lo=0.0, hi=1.0, open_lo=True, null=True),
    # run
    "seed": SEED,
    "task": LABEL,
    "method": LABEL,
    "figure": LABEL,
    "device": DEVICE,
    "threads": Int(lo=1, hi=4096, null=True),
    "data_root": PATH,
    "save": Bool(),
    "save_model": Bool(),
    "checkpoint.every": Int(lo=1, null=True),
    # network
    "network.name": Str(_registry("detox.models", "MODELS")),
    "network.input_shape": IntList(lo=1, length=3, null=True),
    "network.hidden": IntList(lo=1),
    # dataset
    "dataset.name": Str(_registry("detox.data", "DATASETS")),
    "dataset.shape": IntList(lo=1, length=3),
    "dataset.num_classes": Int(lo=2),
    "dataset.root": PATH,
    "dataset.source": PATH,
    "dataset.download": Bool(),
    "dataset.test_fraction": Num(lo=0.0, hi=1.0, open_lo=True, open_hi=True),
    "dataset.split_seed": SEED,
    "dataset.train_size": POSITIVE,
    "dataset.test_size": POSITIVE,
    "dataset.noise": Num(lo=0.0),
    "dataset.seed": SEED,
    "dataset.augment": Str(_registry("detox.data", "AUGMENTS"), null=True),
    # robust rule
    "mode.name": Str(_registry("detox.aggregators", "AGGREGATORS")),
    "mode.f": Int(lo=0, null=True),
    "mode.m": IntOrName(("literature", "original")),
    "mode.theta": IntOrName(("literature", "original")),
    "mode.neighbours": IntOrName(("literature", "original")),
    "mode.selection": Str(("literature", "original")),
    "mode.average": Str(("literature", "original")),
    "mode.tol": Num(lo=0.0, open_lo=True),
    "mode.max_iter": POSITIVE,
    # approach
    "approach.name": Str(_registry("detox.approaches", "APPROACHES")),
    "approach.vote": Str(("strict", "boyer-moore")),
    "approach.vote_tol": Num(lo=0.0),
    "approach.buckets": Int(lo=1, null=True),
    "approach.inner": Str(_registry("detox.aggregators", "AGGREGATORS")),
    "approach.inner_f": Int(lo=0, null=True),
    "approach.inner_params": Params(),
    # attack (constant's value may be anything: NaN and inf payloads are how the hostile-value tests attack)
    "err_mode.name": Str(_registry("detox.attacks", "ATTACKS")),
    "err_mode.scale": Num(lo=0.0),
    "err_mode.value": Num(finite=False),
    "err_mode.std": Num(lo=0.0),
    "err_mode.epsilon": Num(lo=0.0),
    "err_mode.z": Num(null=True),
    # engine
    "engine.name": Str(_registry("detox.engines", "ENGINES")),
    "engine.launcher": Str(pattern=r"[^\x00-\x1f]+", null=True),
    "engine.launcher_args": StrList(),
    "engine.hostfile": Str(pattern=r"[^\x00-\x1f]+", null=True),
    "engine.python": Str(pattern=r"[^\x00-\x1f]+", null=True),
    "engine.threads_per_rank": Int(lo=1, hi=4096),
    "engine.compress": Str(("blosc",), null=True),
    "engine.codec": Str(pattern=r"[a-z0-9]+"),
    "engine.clevel": Int(lo=0, hi=9),
    # >= 1 s: less fails every run at its first exchange (after minutes of start-up); <= a week: 1e308 turned every
    # per-exchange deadline off, so a hung rank held the PS forever
    "engine.timeout": Num(lo=1.0, hi=7 * 86400.0),
    "engine.job_timeout": Num(lo=0.0, open_lo=True, null=True),
    "engine.faults": Records((("rank", Int(lo=1)), ("kind", Str(_registry("detox.config", "FAULT_KINDS"))),
                              ("step", COUNT)), required=("rank", "kind")),
}

# config nodes whose content is a value, not more keys
_VALUE_NODES = {"approach.inner_params", "engine.faults"}


def default_worker_fail(workers: Any) -> Any:
    """``worker_fail``'s default: floor(P / 9), the paper's 5 Byzantines of 45 workers at any cluster size. A
    value that is not a count passes through unchanged, so the refusal names ``workers``, the key typed."""
    return workers // 9 if _is_int(workers) and workers > 0 else workers


OmegaConf.register_new_resolver("detox.default_worker_fail", default_worker_fail, replace=True)


def leaves(node: Any, prefix: str = "", schema: Mapping[str, Any] = SCHEMA) -> dict[str, Any]:
    """Every leaf of a resolved config as ``{dotted.key: value}`` (lists are leaves). A mapping typed where the
    schema has one value (``mode.f={a: 1}``) is that value, so its own spec refuses it, not "unknown setting"."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in _VALUE_NODES and path not in schema:
            out.update(leaves(value, path + ".", schema))
        else:
            out[path] = value
    return out


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain Python values (the ``hydra`` node left out), every interpolation resolved."""
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]) if "hydra" in cfg else cfg
    try:
        return OmegaConf.to_container(body, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{key}: does not resolve ({reason})") from None


def check(cfg: DictConfig, schema: Mapping[str, Any] = SCHEMA) -> dict[str, Any]:
    """Check every key's type and range against ``schema`` (the training config's by default); return the resolved
    values. Raises ConfigError (one line) on the first problem."""
    values = leaves(resolve(cfg), schema=schema)
    for path, value in values.items():
        spec = schema.get(path)
        if spec is None:
            group = path.split(".")[0]
            known = sorted(k.split(".", 1)[1] for k in schema if k.startswith(group + ".")) if "." in path else []
            hint = f"; {group} keys: {', '.join(known)}" if known else ""
            raise ConfigError(f"{path}={show(value)}: unknown setting{hint}")
        problem = _spec_error(spec, value)
        if problem:
            raise ConfigError(f"{path}={show(value)}: {problem}")
    return values


def show(value: Any) -> str:
    """A value as the refusal echoes it: true, false and null as typed on the command line (not Python's True,
    False, None), anything else as its repr (strings quoted), cut at 80 characters."""
    if isinstance(value, ListConfig | DictConfig):
        value = OmegaConf.to_container(value)
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false"}.get(value, "null")
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
