"""verify's own reading of a checkpoint whose keys are not the model's tensor names (ViT, and the other
families transformers 5 renames on load), straight from transformers, not through the product's matcher.

The product reads the family's conversion forwards, as from_pretrained renames checkpoint keys
(formats/conversion.py). The gate takes the other road, the one `save_pretrained` takes: the base's class is
built on the meta device from its config.json and transformers' `revert_weight_conversion` renames the
model's own tensor names into the checkpoint keys it would save. Two readings of one mapping agree only where
both are right. A family whose saving fuses or splits tensors (a WeightConverter) is read as no renaming;
its adapted modules then have no weight, and verify says so, except where the saving concatenates whole model
tensors into one key along its rows (a fused `qkv` or `gate_up` projection, split on load): `revert_weight_conversion`
run on each model tensor's element numbers shows the rows of the saved key each one becomes.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def checkpoint_name(base: Any, name: str) -> str | tuple | None:
    """A Renamer (formats/base.py) for verify: the checkpoint key `save_pretrained` writes model tensor `name`
    under, where that key is in `base` (a BaseCheckpoint); exact, else one leading component away. (key, rows,
    transposed) where the saving writes it as rows of a key or transposed (saved_rows)."""
    saved = base.__dict__.get("_saved_names")
    if saved is None:
        model = _meta(base.directory, base.__dict__.setdefault("_saved_rows", {}))
        saved = base.__dict__["_saved_names"] = {} if model is None else \
            saved_names(base.directory, set(base.tensors), model)
    found = _one(saved, name)
    return found if found is not None else saved_rows(base, name)


def _one(saved: dict, name: str):
    if name in saved:
        return saved[name]
    rest = name.partition(".")[2]  # a base saved from another head class: `vit.` dropped or added
    found = {saved[n] for n in saved if n == rest or (n.endswith("." + name) and "." not in n[: -len(name) - 1])}
    return found.pop() if len(found) == 1 else None


def saved_rows(base: Any, name: str) -> tuple[str, tuple[int, int] | None, bool] | None:
    """(checkpoint key, (lo, hi), False) where `save_pretrained` writes model tensor `name` (or its name one
    leading component away) as rows [lo, hi) of a key of `base` that other model tensors share, (key, None,
    True) where it writes it transposed; None otherwise. The
    tensors of `name`'s module's parent are numbered element by element and saved through
    `revert_weight_conversion`; the key that holds `name`'s numbers must hold them as whole rows, in order."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    cache = base.__dict__.setdefault("_saved_rows", {})
    model = _meta(base.directory, cache)
    if model is None:
        return None
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    own = name if name in shapes else _one({n: n for n in shapes}, name)
    if own is None:
        return None
    parent = own.rpartition(".")[0].rpartition(".")[0] + "."
    family = [n for n in shapes if n.startswith(parent) and n.count(".") == own.count(".")]
    if parent not in cache:
        numbers, start = {}, 0
        total = sum(int(np.prod(shapes[n])) if shapes[n] else 1 for n in family)
        kind = torch.int32 if total < 2**31 else torch.int64  # half the memory of a fused MLP's numbers
        for n in family:
            count = int(np.prod(shapes[n])) if shapes[n] else 1
            numbers[n] = torch.arange(start, start + count, dtype=kind).reshape(shapes[n])
            start += count
        try:
            cache[parent] = (revert_weight_conversion(model, numbers), {n: int(t.reshape(-1)[0]) for n, t in numbers.items() if t.numel()})
        except Exception:  # noqa: BLE001 - a conversion that cannot run on numbers: no rows known
            cache[parent] = ({}, {})
    saved, first = cache[parent]
    if own not in first:
        return None
    want = torch.arange(first[own], first[own] + int(np.prod(shapes[own])))
    for key, value in saved.items():
        value = value[0] if isinstance(value, list) else value
        want = want.to(value.dtype)
        if key not in base.tensors or tuple(base.tensors[key].shape) != tuple(value.shape) or value.dim() < 1:
            continue
        if value.dim() == 2 and tuple(value.shape[::-1]) == tuple(shapes[own]) and \
                torch.equal(value.T.reshape(-1), want):  # saved transposed (ergo's shared experts)
            return key, None, True
        flat = value.reshape(value.shape[0], -1)
        hit = (flat[:, 0] >= want[0]) & (flat[:, 0] <= want[-1])
        if not bool(hit.any()):
            continue
        lo = int(hit.nonzero()[0])
        hi = lo + shapes[own][0]
        if tuple(value.shape[1:]) == tuple(shapes[own][1:]) and torch.equal(value[lo:hi].reshape(-1), want):
            return key, (lo, hi), False
    return None


def _meta(directory, cache: dict):
    """The base's class on the meta device, built once per base (`cache`: the base's), None where it cannot be."""
    if "_model" not in cache:
        cache["_model"] = meta_model(directory)
    return cache["_model"]


def meta_model(directory):
    """The class of the base at `directory` (config.json's architectures, else the bare model) on the meta
    device: no weights; None where transformers cannot build it."""
    import torch
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        cls = next((getattr(transformers, a) for a in config.architectures or [] if hasattr(transformers, a)), None)
        with torch.device("meta"):
            return cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    except Exception:  # noqa: BLE001 - transformers raises many types; no renaming is then verify's reading
        return None


def saved_names(directory, keys: set[str], model: Any = None) -> dict[str, str]:
    """{model tensor name: checkpoint key} for the checkpoint keys `keys` of the base at `directory`, where
    `save_pretrained` renames them; {} where the class cannot be built or its saving converts tensors. `model`:
    the base's class on the meta device, where the caller has it (else built here)."""
    from transformers.core_model_loading import revert_weight_conversion

    model = meta_model(directory) if model is None else model
    if model is None:
        return {}
    names = list(model.state_dict())
    try:
        saved = revert_weight_conversion(model, {n: n for n in names})  # {saved key: model name}: the values travel
    except Exception:  # noqa: BLE001 - a converter (fused experts) cannot run on names: each name on its own,
        saved = {}  # so that the renamings of the family's other tensors are still read
        for n in names:
            try:
                saved.update(revert_weight_conversion(model, {n: n}))
            except Exception:  # noqa: BLE001 - a tensor save_pretrained converts: not a renamed weight
                continue
    return {str(n): k for k, n in saved.items() if k in keys and isinstance(n, str) and n != k}
