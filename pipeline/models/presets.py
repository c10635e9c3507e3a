"""A model config from a run's ``model:`` block: a named preset plus overrides."""
from __future__ import annotations

import dataclasses


def from_preset(cls, params: dict, presets: dict[str, dict], default: str,
                data_fields: dict, data_names: tuple[str, ...], model: str, origin: str):
    """``cls(**presets[preset], **overrides, **data_fields)``; unknown presets and keys are
    refused, naming them, and the ``data_names`` keys may not be set in the block (they come
    from ``origin``)."""
    params = dict(params)
    preset = params.pop("preset", default)
    if preset not in presets:
        raise ValueError(f"model preset {preset!r}; valid presets: {sorted(presets)}")
    names = {f.name for f in dataclasses.fields(cls)} - set(data_names)
    unknown = sorted(set(params) - names)
    if unknown:
        raise ValueError(f"unknown {model} model keys {unknown}; valid keys: "
                         f"{sorted(names | {'preset'})} ({', '.join(data_names)} come "
                         f"from {origin})")
    return cls(**{**presets[preset], **params, **data_fields})
