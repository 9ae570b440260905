"""Checkpoint keys that are not the model's tensor names: transformers' own conversion of a family, applied.

transformers 5 renames the weights of some families as it loads them (ViT saves
`vit.encoder.layer.0.attention.attention.query.weight` and builds `vit.layers.0.attention.q_proj`), and
`save_pretrained` reverts the renaming. A PEFT adapter names the built modules; the base checkpoint holds the
saved keys. `checkpoint_key` maps the one to the other with transformers' machinery, not a table of ours:
the family's conversion (`conversion_mapping.get_model_conversion_mapping`, for the base's class built on
the meta device from its config.json: no weights, no cost) applied to every checkpoint key as
`from_pretrained` applies it (`core_model_loading.rename_source_key`), then read backwards. The dense output
keeps the checkpoint's keys, so `from_pretrained` converts it as it converts the base.

A key that a WeightConverter splits on load (a fused `qkv` or `gate_up` projection, chunked or split along
its rows) places each built weight in a block of its rows: the converter's own operations are run once on
the key's element indices (`torch.arange` in the key's shape), and a built weight whose indices are the rows
[lo, hi) of one key, in order, is merged into those rows (a `Placement` with `rows`); one that is a key
transposed is merged as Conv1D's (in, out) weights are. Any other conversion (experts stacked from many keys,
a permutation for rotary embeddings) has no block of rows to merge into and is refused naming the module. Needs torch and transformers (the `polytool[torch]` extra);
only called when a name is not a key of the checkpoint as it is.
"""
from __future__ import annotations

import re
from copy import deepcopy
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError, ConvertedWeightError
from ..extras import require
from .base import Placement

if TYPE_CHECKING:
    from .base import BaseCheckpoint


class FamilyNames:
    """{model tensor name: checkpoint key} of one base, as transformers' loading conversion renames it, and
    what its converters build: the keys each converter instance reads, run on demand (`placed`)."""

    def __init__(self, renamed: dict[str, str], fused_targets: list[str],
                 groups: dict[str, list[tuple[str, str]]] | None = None, converters: dict[str, Any] | None = None,
                 model: Any = None, shapes: dict[str, tuple[int, ...]] | None = None):
        self.renamed = renamed  # model tensor name -> checkpoint key (renamed, or unchanged)
        self.fused_targets = fused_targets  # the converters' target patterns (regular expressions)
        self.groups = groups or {}  # first built name -> [(checkpoint key, source pattern)] one converter reads
        self.converters = converters or {}  # source pattern -> its WeightConverter
        self.model, self.shapes = model, shapes or {}  # the meta model (Split reads its shapes), key -> shape
        self.placed: dict[str, Placement | None] = {}  # built name -> where it lies (None: not a block of rows)
        self.done: set[str] = set()  # groups already run

    def place(self, name: str) -> Placement | None:
        """Where model tensor `name` lies in a converted key: run the converters of its module's groups."""
        parent = name.rpartition(".")[0].rpartition(".")[0]
        near = [g for g in self.groups if g.rpartition(".")[0].rpartition(".")[0].endswith(parent)
                or parent.endswith(g.rpartition(".")[0].rpartition(".")[0])]
        for group in near or list(self.groups):
            if group not in self.done:
                self.done.add(group)
                self.placed.update(_placements(self, group))
            found = _find(name, self.placed)
            if found is not None:
                return self.placed[found]
        return None


def _find(name: str, names: dict) -> str | None:
    from .base import find_tensor

    try:
        return find_tensor(name, names)
    except CheckpointError:
        return None


def _placements(names: FamilyNames, group: str) -> dict[str, Placement | None]:
    """{built name: its Placement, or None} for one converter instance, from its operations run on indices."""
    import torch
    from transformers.core_model_loading import Chunk, Concatenate, Split

    keys = names.groups[group]
    converter = deepcopy(names.converters[keys[0][1]])
    # operations that only cut or join along rows move whole rows: one number per row tells where each goes
    # (a (rows, 1) stand-in: memory per row, not per element, for a fused MLP of hundreds of millions)
    by_rows = all(isinstance(op, (Chunk, Concatenate, Split)) and op.dim == 0 for op in converter.operations)
    shapes = {k: (names.shapes[k][0], 1) if by_rows and len(names.shapes[k]) == 2 else names.shapes[k] for k, _ in keys}
    total = sum(_numel(shapes[k]) for k, _ in keys)
    dtype = torch.int32 if total < 2**31 else torch.int64
    offsets, start = {}, 0
    for key, pattern in keys:  # every element (row) of every key read gets its own number
        converter.add_tensor(group, key, pattern, torch.arange(start, start + _numel(shapes[key]), dtype=dtype).reshape(shapes[key]))
        offsets[key], start = start, start + _numel(shapes[key])
    try:
        built = converter.convert(group, model=names.model, config=names.model.config)
    except Exception:  # noqa: BLE001 - an operation that cannot run on indices: nothing placed
        return {}
    out: dict[str, Placement | None] = {}
    for name, value in built.items():
        value = value[0] if isinstance(value, list) else value
        out[name] = _rows(value, keys, offsets, shapes)
    return out


def _rows(value, keys: list[tuple[str, str]], offsets: dict[str, int], shapes: dict) -> Placement | None:
    """The Placement of a built tensor whose indices `value` are rows [lo, hi) of one key, in order; else None."""
    import torch

    if value.numel() == 0:
        return None
    first = int(value.reshape(-1)[0])
    key = next((k for k, _ in keys if offsets[k] <= first < offsets[k] + _numel(shapes[k])), None)
    if key is not None and value.dim() == 2 and tuple(value.shape[::-1]) == tuple(shapes[key]) and first == offsets[key]:
        whole = torch.arange(first, first + value.numel(), dtype=value.dtype).reshape(shapes[key])
        if torch.equal(value, whole.T):  # the key holds the weight transposed (ergo's shared experts)
            return Placement(key, None, transposed=True)
    if key is None or not shapes[key] or tuple(value.shape[1:]) != tuple(shapes[key][1:]):
        return None
    shape = shapes[key]
    row = _numel(shape[1:])
    lo, rest = divmod(first - offsets[key], row)
    hi = lo + value.shape[0]
    expected = torch.arange(first, first + value.numel(), dtype=value.dtype).reshape(value.shape)
    if rest or hi > shape[0] or not torch.equal(value, expected):
        return None
    return Placement(key, None if (lo, hi) == (0, shape[0]) else (lo, hi))


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def checkpoint_key(base: BaseCheckpoint, name: str) -> str | Placement | None:
    """The checkpoint key holding model tensor `name` (`<module path>.<param>`) through the family's conversion,
    a Placement where it is a block of rows of a key split on load, None when there is none; raises
    CheckpointError when the tensor is converted from other keys otherwise (stacked, transposed, permuted)."""
    from .base import find_tensor

    require(f"{name!r} is not a key of the base checkpoint; matching it through transformers' conversion of "
            f"{base.model_type or 'this family'}'s checkpoint names")
    names = base.__dict__.get("_family_names")
    if names is None:
        names = base.__dict__["_family_names"] = family_names(base)
    found = find_tensor(name, names.renamed)
    if found is not None:
        return names.renamed[found]
    found = find_tensor(name, names.groups)
    if found is not None or any(_search(p, name) for p in names.fused_targets):
        placed = names.place(name)
        if placed is not None:
            return placed
        module, source = name.rpartition(".")[0], names.groups[found][0][0] if found else "a fused or split tensor"
        raise ConvertedWeightError(f"module {module!r}: transformers builds its weight from other tensors of the "
                                   f"checkpoint ({source}), not by renaming one or splitting its rows: polytool "
                                   "merges into renamed weights and blocks of rows only", base.directory)
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
        return FamilyNames({}, [])
    from transformers.conversion_mapping import get_model_conversion_mapping

    try:
        transforms = get_model_conversion_mapping(model)
    except ValueError:  # transformers' own refusal (conflicting fusions): it cannot load this class either
        return FamilyNames({}, [])
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    renamed, groups = {}, {}
    for key in sorted(base.tensors, key=_natural):  # from_pretrained's order: a group's keys in its order
        name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        if name not in meta and key in meta:  # transformers' own fallback: the key as it is
            name, pattern = rename_source_key(key, [], [], model.base_model_prefix, meta)
        if pattern is None:
            renamed[name] = key
        else:
            groups.setdefault(name, []).append((key, pattern))
    return FamilyNames(renamed, [p for c in converters for p in c.target_patterns], groups,
                       {p: c for c in converters for p in c.source_patterns}, model,
                       {k: info.shape for k, info in base.tensors.items()})


def _natural(key: str):
    from transformers.core_model_loading import dot_natural_key

    return dot_natural_key(key)


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
