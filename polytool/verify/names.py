"""verify's own reading of a checkpoint whose keys are not the model's tensor names (ViT, and the other
families transformers 5 renames on load), straight from transformers, not through the product's matcher.

The product reads the family's conversion forwards, as from_pretrained renames checkpoint keys
(formats/conversion.py). The gate takes the other road, the one `save_pretrained` takes: the base's class is
built on the meta device from its config.json and transformers' `revert_weight_conversion` renames the
model's own tensor names into the checkpoint keys it would save. Two readings of one mapping agree only where
both are right. A family whose saving fuses or splits tensors (a WeightConverter) is read as no renaming;
its adapted modules then have no weight, and verify says so.
"""
from __future__ import annotations

from typing import Any


def checkpoint_name(base: Any, name: str) -> str | None:
    """A Renamer (formats/base.py) for verify: the checkpoint key `save_pretrained` writes model tensor `name`
    under, where that key is in `base` (a BaseCheckpoint); exact, else one leading component away."""
    saved = base.__dict__.get("_saved_names")
    if saved is None:
        saved = base.__dict__["_saved_names"] = saved_names(base.directory, set(base.tensors))
    if name in saved:
        return saved[name]
    rest = name.partition(".")[2]  # a base saved from another head class: `vit.` dropped or added
    found = {saved[n] for n in saved if n == rest or (n.endswith("." + name) and "." not in n[: -len(name) - 1])}
    return found.pop() if len(found) == 1 else None


def saved_names(directory, keys: set[str]) -> dict[str, str]:
    """{model tensor name: checkpoint key} for the checkpoint keys `keys` of the base at `directory`, where
    `save_pretrained` renames them; {} where the class cannot be built or its saving converts tensors."""
    import torch
    import transformers
    from transformers.core_model_loading import revert_weight_conversion

    try:
        config = transformers.AutoConfig.from_pretrained(directory)
        cls = next((getattr(transformers, a) for a in config.architectures or [] if hasattr(transformers, a)), None)
        with torch.device("meta"):
            model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
        names = [n for n in model.state_dict()]
    except Exception:  # noqa: BLE001 - transformers raises many types; no renaming is then verify's reading
        return {}
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
