"""Whether a cache folder's saved settings are the settings asked for now.

Caches (metric models, the style tower) store `dataclasses.asdict(settings)` as JSON and are reused only when it
equals what is asked for. A field added to one of those dataclasses later would make every existing cache look
different; the rule for adding a field is that its default keeps the old behaviour, so a saved record that lacks a
field means that field's default. `matches` applies that rule (recursively into nested dataclasses); an unknown
field in the record, or any other difference, is a mismatch.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def with_defaults(cls: type, saved: Any) -> Any:
    """`saved` (an asdict() of `cls` read back from JSON) with the fields `cls` gained since filled by their
    defaults; fields whose default is a dataclass are filled inside too. Not a dict: returned unchanged."""
    if not isinstance(saved, dict):
        return saved
    out = dict(saved)
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            continue
        if field.name not in out:
            out[field.name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
        elif dataclasses.is_dataclass(default):
            out[field.name] = with_defaults(type(default), out[field.name])
    return out


def _plain(value: Any) -> Any:
    """Tuples as lists, as JSON holds them."""
    return json.loads(json.dumps(value, sort_keys=True))


def matches(saved: Any, wanted: Any) -> bool:
    """Whether a saved asdict() record is the dataclass instance `wanted` (fields added since: their defaults)."""
    return _plain(with_defaults(type(wanted), saved)) == _plain(dataclasses.asdict(wanted))


__all__ = ["with_defaults", "matches"]
