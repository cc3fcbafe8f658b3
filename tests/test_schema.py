"""Every key of every option of every config group has a schema entry, and a wrong type for it is refused.

The keys are enumerated from the option files themselves, so a key added to a YAML file without a schema entry
fails here (and is refused at run time as an unknown setting)."""

from __future__ import annotations

import pytest
from conftest import GROUPS, make_cfg, options
from omegaconf import OmegaConf

from detox.config import ConfigError, validate
from detox.schema import (
    SCHEMA,
    Bool,
    Int,
    IntList,
    IntOrName,
    Num,
    Params,
    Records,
    Str,
    StrList,
    check,
    leaves,
    resolve,
)

PRESET_GROUPS = ("task", "method")


def _all_keys() -> list[tuple[list[str], str]]:
    """(overrides that select an option, dotted key) for every key of every option of every group."""
    out: dict[str, list[str]] = {}
    for group in (*GROUPS, *PRESET_GROUPS):
        for option in options(group):
            overrides = [f"{group}={option}"]
            for key in leaves(resolve(make_cfg(overrides))):
                out.setdefault(key, overrides)
    return [(o, k) for k, o in sorted(out.items())]


ALL_KEYS = _all_keys()

# a value of the wrong type for each kind of entry
WRONG = {Int: "abc", Num: "abc", Bool: "maybe", Str: 12345, IntList: "abc", StrList: 7, Records: 7, Params: 7,
         IntOrName: "abc"}


def test_every_key_has_a_schema_entry() -> None:
    missing = [key for _, key in ALL_KEYS if key not in SCHEMA]
    assert not missing, f"keys without a schema entry in detox/schema.py: {missing}"
    assert len(ALL_KEYS) >= 60  # every group's keys were found, not just the top level


def test_no_schema_entry_is_stale() -> None:
    """An entry for a key no option file has any more is dead weight (or a typo that checks nothing)."""
    found = {key for _, key in ALL_KEYS}
    assert sorted(set(SCHEMA) - found) == []


@pytest.mark.parametrize(("overrides", "key"), ALL_KEYS, ids=[k for _, k in ALL_KEYS])
def test_wrong_type_is_refused(overrides: list[str], key: str) -> None:
    cfg = make_cfg(overrides)
    spec = SCHEMA[key]
    bad = WRONG[type(spec)]
    OmegaConf.update(cfg, key, bad, force_add=True)
    with pytest.raises(ConfigError) as info:
        check(cfg)
    message = str(info.value)
    assert message.startswith(f"{key}={bad!r}: "), message
    assert "\n" not in message
    with pytest.raises(ConfigError, match=f"^{key}="):  # validate runs the schema first
        validate(cfg)
    if not spec.null:
        OmegaConf.update(cfg, key, None, force_add=True)
        with pytest.raises(ConfigError, match=f"^{key}=null: "):  # as typed on the command line
            check(cfg)


def test_every_option_file_passes_the_schema() -> None:
    for overrides, _ in ALL_KEYS:
        check(make_cfg(overrides))
