"""What a run is called in figures and tables, from the config it actually ran.

A method preset's name (``detox-multi-krum``) is used only while the run's ``approach`` and ``mode`` settings are
exactly the preset's: ``method=detox-multi-krum approach.buckets=null`` is not the original's DETOX-Multi-Krum, and
neither is a plain ``approach=draco-lite mode=multi-krum`` run. Those get a label built from the config itself:
``draco-lite/multi-krum``, ``draco-lite/2×multi-krum→mean (vote=boyer-moore)``, ``baseline/bulyan (theta=original)``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from detox.schema import OPTION_NAME

CONF = Path(__file__).resolve().parents[1] / "conf"
DEFENCE = {"baseline": "vanilla", "draco-lite": "detox"}
# an option's name as conf/ spells them (detox.schema.OPTION_NAME): what a summary or config names otherwise (``../x``,
# a NUL byte, which open() refuses with ValueError) is no option, and no file outside conf/ is read for it
OPTION = re.compile(OPTION_NAME)


def _load(path: Path) -> dict:
    try:
        out = yaml.safe_load(path.read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return out if isinstance(out, dict) else {}


def _option_file(group: str, option: str) -> Path | None:
    return CONF / group / f"{option}.yaml" if OPTION.fullmatch(option) else None


@lru_cache(maxsize=64)
def group_default(group: str, option: str) -> dict:
    """The option's own settings, ``conf/<group>/<option>.yaml`` (empty if unknown)."""
    path = _option_file(group, option)
    return {} if path is None else _load(path)


@lru_cache(maxsize=64)
def preset(method: str) -> dict | None:
    """``{"approach": {...}, "mode": {...}}`` as the method preset composes them, or None for an unknown preset.

    The presets only override group options (``override /approach: draco-lite``) and set keys under ``approach:``
    and ``mode:``; composing them is a merge of the group's file with those keys (a test checks this against
    Hydra's own composition for every preset).
    """
    path = _option_file("method", method)
    raw = {} if path is None else _load(path)
    if not raw:
        return None
    chosen = {}
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                chosen[key.removeprefix("override ").strip().lstrip("/")] = value
    out = {}
    for group in ("approach", "mode"):
        if group not in chosen:
            return None
        out[group] = _merge(group_default(group, chosen[group]), raw.get(group) or {})
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _core(approach: dict, mode: dict) -> tuple[str, str, list[str]]:
    """(structure, robust rule, approach keys the structure already shows)."""
    name, rule = approach.get("name"), mode.get("name")
    if name == "maj_vote":
        return "maj_vote", "maj-vote", []
    if name == "draco-lite" and approach.get("buckets"):
        inner = approach.get("inner") or "mean"
        # DETOX-Multi-Krum as the original ran it: the robust rule is inside the buckets, a plain mean across
        robust = inner if rule == "mean" and inner != "mean" else rule
        return f"draco-lite/{approach['buckets']}×{inner}→{rule}", robust, ["buckets", "inner"]
    # without buckets the inner rule and its settings are unused: not worth a mention
    return f"{name}/{rule}", rule, ["buckets", "inner", "inner_f", "inner_params"] if name == "draco-lite" else []


def structural(approach: dict, mode: dict) -> tuple[str, str, str]:
    """(label, defence, rule) of a run described by its settings, listing those that differ from the options'
    defaults (``baseline/multi-krum (m=original)``)."""
    core, rule, shown = _core(approach, mode)
    extra = []
    for group, settings in (("approach", approach), ("mode", mode)):
        if group == "mode" and approach.get("name") == "maj_vote":
            continue  # maj_vote ignores the rule
        default = _flat(group_default(group, str(settings.get("name"))))
        for k, v in _flat(settings).items():
            if k != "name" and k.split(".")[0] not in shown and default.get(k) != v:
                extra.append(f"{k}={v}")
    label = core + (f" ({', '.join(extra)})" if extra else "")
    return label, DEFENCE.get(str(approach.get("name")), "other"), rule


def labels(method: str | None, approach: str | None, mode: str | None, config: dict | None = None) -> tuple[str, str,
                                                                                                           str]:
    """(label, defence, rule) of a run; ``defence`` is the method family (vanilla, detox, other) and ``rule`` the
    robust rule it is compared under (``detox-multi-krum`` -> ("detox-multi-krum", "detox", "multi-krum")).

    ``config`` is the run's resolved config (``resolved_config.yaml``): with it the preset name is kept only when
    the run's approach and mode settings equal the preset's; without it (older runs) the preset name is trusted.
    """
    if config and isinstance(config.get("approach"), dict) and isinstance(config.get("mode"), dict):
        expected = preset(method) if method else None
        actual = {"approach": config["approach"], "mode": config["mode"]}
        if expected is None or _flat(expected) != _flat(actual):
            return structural(config["approach"], config["mode"])
    if not method:
        prefix = {"baseline": "vanilla", "draco-lite": "detox", "maj_vote": "maj-vote"}.get(approach or "", approach)
        method = f"{prefix}-{mode}" if prefix != "maj-vote" else "maj-vote"
    for defence in ("vanilla", "detox"):
        if method.startswith(defence + "-"):
            return method, defence, method[len(defence) + 1 :]
    return method, "other", method


def attack_label(config: dict | None, err_mode: str | None) -> str:
    """The attack with its strength, from the resolved config: ``alie (z = 1)``, ``rev_grad (scale = 100)``."""
    params = (config or {}).get("err_mode") or {}
    params = params if isinstance(params, dict) else {}  # a hand-edited config: the name alone
    shown = {k: v for k, v in params.items() if k != "name"}
    name = params.get("name", err_mode)
    if not shown:
        return str(name)
    return f"{name} (" + ", ".join(f"{k} = {_value(k, v)}" for k, v in shown.items()) + ")"


def _value(key: str, value: Any) -> str:
    if value is None:
        return "z_max" if key == "z" else "default"  # ALIE's null z is z_max (DESIGN §3)
    return f"{value:g}" if isinstance(value, float | int) and not isinstance(value, bool) else str(value)
