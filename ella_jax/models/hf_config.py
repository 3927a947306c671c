"""Reading a Hugging Face or diffusers `config.json` object into a port's config dataclass."""

import dataclasses
from collections.abc import Mapping
from typing import Any


def known_fields(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of `raw` that name fields of the dataclass `cls`, lists as tuples (so that
    the config stays hashable, a static argument of jitted functions). Other keys, which the
    ports do not read, are dropped; each `from_dict` refuses the values it cannot honour."""
    names = {field.name for field in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}
