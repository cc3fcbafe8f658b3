"""Learning rates tuned per method (DESIGN §5): ``lr_picks=<file>`` sets a job's ``lr`` from a picks file.

The original tuned the learning rate of every method over {2^-10, ..., 2^-3}, 200 iterations each, and kept the one
of the lowest training loss (``src/tune.sh``). ``sweeps/tune_lr_*`` run that grid and ``python -m analysis.tune``
writes its picks as YAML::

    lr:
      fc-fashion:                 # task
        detox-bulyan:             # method
          constant: 0.0625        # err_mode: the picked lr
          rev_grad: 0.03125

(other top-level keys are notes for the reader: ``source``, ``loss``). A job with ``lr_picks`` set trains with the lr
picked for its (task, method, err_mode); one the file has no lr for, one without a task or method preset, a file
that cannot be read (not a regular file of at most 1 MiB of UTF-8 YAML, as a fifo or /dev/zero; YAML aliases, a key
given twice or one that is not a string), an entry that is no finite number > 0 (named with its value), or an
``lr=`` typed next to ``lr_picks=`` is refused in one line before any work: never the
task's lr in silence. ``lr_picks=null`` (the default) leaves ``lr`` as the task preset (or the command line) set it.

What a job read is recorded: ``lr_picks_sha256``, the SHA-256 of the file's bytes as they were parsed, is added to
its config (so ``resolved_config.yaml`` and ``summary.json`` carry it next to ``lr``). A picks file edited after a
run was made is therefore another config for that run's folder: a rerun or resume into it is refused, never mixed;
and within one sweep the first job that reads a picks file pins its digest under the sweep's root
(``<root>/.lr_picks/<sweep id>/``, removed when the sweep ends): a later job of that sweep that reads other content
is refused in one line naming both digests (``pin_lr_picks``), so the jobs of one sweep never mix two files.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf, open_dict

from detox.errors import ConfigError
from detox.results import PINS, SMALL_FILE, SWEEP_ID_ENV, has_yaml_aliases, read_small_bytes, sweep_folder_name

KEYS = ("task", "method", "err_mode")
# the config key (added by apply_lr_picks) that records the SHA-256 of the picks file's bytes the job's lr came from
DIGEST_KEY = "lr_picks_sha256"


def _is_lr(value: Any) -> bool:
    # an int past float range (a 400-digit literal) is no learning rate: refused, not an OverflowError
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and not (isinstance(value, int) and abs(value) > sys.float_info.max) and math.isfinite(value) and value > 0)


def _check_nodes(node: yaml.Node, seen: int = 0) -> None:
    """Refuse what analysis.tune never writes and a hand edit makes ambiguous: a key given twice in one mapping
    (YAML keeps the last in silence), or a key that is not a plain string."""
    if isinstance(node, yaml.MappingNode):
        keys: set[str] = set()
        for key, value in node.value:
            if not isinstance(key, yaml.ScalarNode) or key.tag != "tag:yaml.org,2002:str":
                shown = key.value if isinstance(key, yaml.ScalarNode) else key.tag
                raise ValueError(f"the key {shown!r} is not a name (keys are task, method and err_mode names)")
            if key.value in keys:
                raise ValueError(f"the key {key.value!r} is given twice in one mapping")
            keys.add(key.value)
            _check_nodes(value)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_nodes(item)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_picks(path: str | Path) -> dict[str, dict[str, dict[str, float]]]:
    """The ``lr`` table of a picks file (task -> method -> err_mode -> lr). Raises ConfigError (one line) where
    the file is missing, not a small regular file of UTF-8 YAML (no aliases, no repeated or non-string keys), or
    not such a table of finite positive numbers."""
    return read_picks_file(path)[0]


def read_picks_file(path: str | Path) -> tuple[dict[str, dict[str, dict[str, float]]], str]:
    """``read_picks`` and the SHA-256 (hex) of the very bytes the table was parsed from: the file is read once, so
    the digest names the content the lr came from even when the file is rewritten meanwhile."""
    where = f"lr_picks={path}"
    file = Path(path).expanduser()
    try:
        raw = read_small_bytes(file)
        digest = hashlib.sha256(raw).hexdigest()
        text = raw.decode()
        if has_yaml_aliases(text):
            raise ValueError("YAML aliases (*name), which analysis.tune never writes")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _check_nodes(node)
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (write one with python -m analysis.tune <tuning sweep>)") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a folder; name the lr_picks.yaml that python -m analysis.tune wrote") from None
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as err:  # UnicodeDecodeError is a ValueError
        why = str(err).strip().splitlines()
        raise ConfigError(f"{where}: unreadable ({type(err).__name__}{': ' + why[0] if why else ''}); a picks file "
                          f"is the small UTF-8 YAML file python -m analysis.tune writes") from None
    table = data.get("lr") if isinstance(data, Mapping) else None
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: not a picks file (a mapping with an 'lr' table of task -> method -> err_mode "
                          f"-> lr, as python -m analysis.tune writes)")
    for task, methods in table.items():
        for method, attacks in (methods.items() if isinstance(methods, Mapping) else [(None, methods)]):
            for err_mode, lr in (attacks.items() if isinstance(attacks, Mapping) else [(None, attacks)]):
                if method is None or err_mode is None or not _is_lr(lr):
                    at = ".".join(str(k) for k in (task, method, err_mode) if k is not None)
                    hint = (" (a string: YAML reads 1e-3 as one; write 0.001 or 1.0e-3)"
                            if isinstance(lr, str) else "")
                    raise ConfigError(f"lr_picks={path}: lr.{at} is {_shown(lr)}{hint}, not a learning rate (each "
                                      f"entry is task -> method -> err_mode -> a finite number > 0)")
    return {str(t): {str(m): {str(e): float(v) for e, v in a.items()} for m, a in ms.items()}
            for t, ms in table.items()}, digest


def lookup(picks: Mapping[str, Mapping[str, Mapping[str, float]]], task: Any, method: Any, err_mode: Any,
           where: str) -> float:
    """The lr picked for (task, method, err_mode); ConfigError (one line naming what the file has) if none."""
    if task is None or method is None:
        missing = " and ".join(k for k, v in (("task", task), ("method", method)) if v is None)
        raise ConfigError(f"{where}: picks are per task, method and err_mode; this job has no {missing} preset "
                          f"(set task=... method=..., or lr_picks=null)")
    methods = picks.get(str(task))
    if methods is None:
        raise ConfigError(f"{where}: no lr for task={task} (the file tunes task={', '.join(sorted(picks)) or '-'}); "
                          f"tune it, or lr_picks=null for the task's lr")
    attacks = methods.get(str(method))
    lr = None if attacks is None else attacks.get(str(err_mode))
    if lr is None:
        have = sorted(f"{m}/{e}" for m, a in methods.items() for e in a)
        raise ConfigError(f"{where}: no lr for task={task} method={method} err_mode={err_mode} (it has "
                          f"{', '.join(have) or 'none'} for task={task}); tune it, or lr_picks=null for the task's lr")
    return lr


def _typed_keys(cfg: DictConfig) -> set[str]:
    """The keys this job's command line (or sweep) set: ``hydra.overrides.task`` (the ValidateFirst callback's
    config has it), else the running Hydra job's; empty outside Hydra (compose in tests)."""
    overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
    if overrides is None:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    return {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}


def apply_lr_picks(cfg: DictConfig) -> float | None:
    """With ``lr_picks`` set: set ``cfg.lr`` to the lr the file picked for the job's (task, method, err_mode),
    record the file's digest as ``cfg.lr_picks_sha256`` and return the lr; else leave the config alone and return
    None. Raises ConfigError (one line) where it cannot."""
    path = cfg.get("lr_picks")
    if path is None:
        return None
    where = f"lr_picks={path}"
    if "lr" in _typed_keys(cfg):
        raise ConfigError(f"lr={cfg.lr}: the job also has {where}, which sets lr; give one of them")
    picks, digest = read_picks_file(str(path))
    lr = lookup(picks, cfg.get("task"), cfg.get("method"), cfg.err_mode.name, where)
    cfg.lr = lr
    with open_dict(cfg):  # a record of the run, not a setting: the schema has no entry for it, nobody types it
        cfg[DIGEST_KEY] = digest
    return lr


def _pin_key(path: str) -> str:
    """One pin per file, however its path is spelled (relative, ``~``, through a link)."""
    resolved = str(Path(path).expanduser().resolve())
    return hashlib.sha1(resolved.encode()).hexdigest()[:16]


def pin_lr_picks(cfg: DictConfig, root: Path) -> None:
    """Inside a sweep (``DETOX_SWEEP_ID`` set) whose job read a picks file: the first job of the sweep to read that
    file pins its digest under ``root`` (created exclusively: two jobs starting together cannot both pin); a later
    job whose read gave other bytes is refused (ConfigError, one line naming both digests). Outside a sweep, or
    without ``lr_picks``, nothing happens. A pin that cannot be written or read is one warning: the digest in the
    job's resolved_config.yaml still tells the analysis which content each job used."""
    sweep, path, digest = os.environ.get(SWEEP_ID_ENV), cfg.get("lr_picks"), cfg.get(DIGEST_KEY)
    if not sweep or path is None or digest is None:
        return
    pin = root / PINS / sweep_folder_name(sweep) / _pin_key(str(path))
    mine = f"{digest} {Path(str(path)).expanduser().resolve()}\n"
    tmp = pin.with_name(f".{pin.name}.{os.urandom(8).hex()}.tmp")  # jobs on several hosts may share a pid
    try:
        pin.parent.mkdir(parents=True, exist_ok=True)
        try:  # the pin appears whole, and only if none is there yet: os.link never replaces a file
            tmp.write_text(mine)
            os.link(tmp, pin)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        pinned = read_small_bytes(pin, SMALL_FILE).decode().split(" ", 1)[0]
    except (OSError, ValueError) as err:
        print(f"detox: warning: lr_picks={path}: cannot pin its digest for this sweep in {pin.parent} "
              f"({type(err).__name__}: {err}); jobs of this sweep that read other content will not be refused "
              f"(each records what it read: {DIGEST_KEY})", file=sys.stderr, flush=True)
        return
    if pinned != digest:
        raise ConfigError(f"lr_picks={path}: its content changed while this sweep ran (sha256 {pinned[:12]} when its "
                          f"first job read it, {digest[:12]} now): the jobs of one sweep must train with one picks "
                          f"file; restore it, or run the sweep again into another hydra.sweep.dir")
