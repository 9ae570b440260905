"""Checkpoint keys that are not the model's tensor names: transformers' own conversion of a family, applied.

transformers 5 renames the weights of some families as it loads them (ViT saves
`vit.encoder.layer.0.attention.attention.query.weight` and builds `vit.layers.0.attention.q_proj`), and
`save_pretrained` reverts the renaming. A PEFT adapter names the built modules; the base checkpoint holds the
saved keys. `checkpoint_key` maps the one to the other with transformers' machinery, not a table of ours:
the family's conversion (`conversion_mapping.get_model_conversion_mapping`, for the base's class built on
the meta device from its config.json: no weights, no cost) applied to every checkpoint key as
`from_pretrained` applies it (`core_model_loading.rename_source_key`), then read backwards. The dense output
keeps the checkpoint's keys, so `from_pretrained` converts it as it converts the base.

Renamings only: a key that a WeightConverter turns into other tensors (fused or split: MoE experts, a fused
gate/up projection) has no one weight to merge into, and is refused naming the module. Needs torch and
transformers (the `polytool[torch]` extra); only called when a name is not a key of the checkpoint as it is.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from ..extras import require

if TYPE_CHECKING:
    from .base import BaseCheckpoint


class FamilyNames:
    """{model tensor name: checkpoint key} of one base, as transformers' loading conversion renames it, and
    the target patterns of the family's converters (tensors built from several keys, or split from one)."""

    def __init__(self, renamed: dict[str, str], converted: dict[str, str], fused_targets: list[str]):
        self.renamed = renamed  # model tensor name -> checkpoint key (renamed, or unchanged)
        self.converted = converted  # model tensor name -> checkpoint key it is converted from (not one weight)
        self.fused_targets = fused_targets  # the converters' target patterns (regular expressions)


def checkpoint_key(base: BaseCheckpoint, name: str) -> str | None:
    """The checkpoint key holding model tensor `name` (`<module path>.<param>`) through the family's conversion,
    None when there is none; raises CheckpointError when the tensor is converted from other keys (not renamed)."""
    from .base import find_tensor

    require(f"{name!r} is not a key of the base checkpoint; matching it through transformers' conversion of "
            f"{base.model_type or 'this family'}'s checkpoint names")
    names = base.__dict__.get("_family_names")
    if names is None:
        names = base.__dict__["_family_names"] = family_names(base)
    found = find_tensor(name, names.renamed)
    if found is not None:
        return names.renamed[found]
    found = find_tensor(name, names.converted)
    if found is not None or any(_search(p, name) for p in names.fused_targets):
        module = name.rpartition(".")[0]
        raise CheckpointError(f"module {module!r}: transformers builds its weight from other tensors of the "
                              f"checkpoint ({names.converted.get(found, 'a fused or split tensor')}), not by renaming "
                              "one: polytool merges into renamed weights only", base.directory)
    return None


def _search(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern.replace("*.", r".*\."), name) is not None
    except re.error:
        return False


def family_names(base: BaseCheckpoint) -> FamilyNames:
    """The base's checkpoint keys renamed as from_pretrained renames them (see the module's docstring); no
    renaming at all where the base's class cannot be built from its config (custom code, an unknown class)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    model = meta_model(base.directory, base.config)
    if model is None:
        return FamilyNames({}, {}, [])
    from transformers.conversion_mapping import get_model_conversion_mapping

    try:
        transforms = get_model_conversion_mapping(model)
    except ValueError:  # transformers' own refusal (conflicting fusions): it cannot load this class either
        return FamilyNames({}, {}, [])
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    renamed, converted = {}, {}
    for key in base.tensors:
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        (renamed if pattern is None else converted)[name] = key
    return FamilyNames(renamed, converted, [p for c in converters for p in c.target_patterns])


def meta_model(directory, config: dict):
    """The base's model class (config.json's `architectures`, else the bare model of its model_type) built on
    the meta device; None where transformers has no such class."""
    import torch
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(directory)
    except Exception:  # noqa: BLE001 - transformers raises many types for a config it cannot read
        return None
    names = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    classes = [getattr(transformers, n, None) for n in names]
    with torch.device("meta"):
        try:
            if classes and classes[0] is not None:
                return classes[0](hf_config)
            return transformers.AutoModel.from_config(hf_config)
        except Exception:  # noqa: BLE001 - a class that cannot be built on the meta device: no renaming known
            return None
