"""Does an adapter fit a base? The checks every output path runs before it writes (torch-free).

- Embedding layers PEFT saved whole (a tied lm_head target's weight) must equal the base's: they are
  carried only as a check (`check_collapsible`).
- Trained heads (modules_to_save) must have a tensor of the same shape in the base (`saved_module_keys`).
- A LoRA export needs to know whether the base stores its targets as Conv1D (`base_uses_conv1d`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..architectures import CONV1D_MODEL_TYPES
from ..errors import AdapterError, CheckpointError
from ..formats.adapter import PolyAdapter
from ..formats.base import (INDEX_NAME, SINGLE_NAME, BaseCheckpoint, find_tensor, match_targets, open_base,
                            optional_base, read_config)
from ..formats.adapter_dir import PREFIX
from ..formats.safetensors import SafetensorsFile


def check_collapsible(adapter: PolyAdapter, base: BaseCheckpoint | None = None) -> None:
    """Embedding layers PEFT saved whole (a tied lm_head target's weight) must equal the base's: they are
    carried only as a check. Without a base at hand they cannot be checked and are taken as the base's."""
    if base is None:
        return
    for module, key in adapter.saved_embeddings.items():
        name = key[len(PREFIX):].replace(".base_layer.weight", ".weight")
        found = find_tensor(name, base.tensors)
        if found is None and module in {m.name for m in adapter.modules}:
            found = next((t.source for t in match_targets(base, [m for m in adapter.modules if m.name == module],
                                                          untie=True)), None)
        found = found or base.locate(name)  # a family whose checkpoint names transformers converts
        if found is None:
            raise CheckpointError(f"the adapter saves embedding weight {key!r}, which the base has no tensor for: "
                                  "wrong base model?", base.directory)
        with SafetensorsFile(base.directory / base.tensors[found].shard) as st:
            same = st.shape(found) == adapter.tensor_shape(key) and np.array_equal(
                st.float_array(found, np.float32), adapter.tensor(key, np.float32))
        if not same:
            raise AdapterError(f"the adapter carries a changed copy of {found} (saved as {key!r}: embeddings trained "
                               "or resized): collapsing it is not supported", adapter.weights_file)


def saved_module_keys(adapter: PolyAdapter, base: BaseCheckpoint) -> dict[str, str]:
    """{base checkpoint key: adapter key} of every modules_to_save tensor (a trained head), shapes checked."""
    pairs = {}
    for module, params in adapter.saved_modules.items():
        for param, key in params.items():
            found = base.locate(f"{module}.{param}")
            if found is None:
                raise CheckpointError(f"has no tensor for {module}.{param}, which the adapter trains (modules_to_save): "
                                      "save the base with the head class the adapter was trained with", base.directory)
            if base.tensors[found].shape != adapter.tensor_shape(key):
                raise CheckpointError(f"{found} has shape {list(base.tensors[found].shape)}, the adapter's trained "
                                      f"copy {list(adapter.tensor_shape(key))}: wrong base model?", base.directory)
            pairs[found] = key
    return pairs


def lora_base(adapter: PolyAdapter, base_dir: Path | None) -> Path | None:
    """The base a LoRA export reads for its checks (an input, never written): --base, or the adapter's
    base_model_name_or_path when it is found locally; None when there is none at hand."""
    return optional_base(base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))


def base_uses_conv1d(adapter: PolyAdapter, base_dir: Path | None) -> bool:
    """Whether the base stores its targets as Conv1D (fan_in_fan_out). With --base (or a base found
    locally), the adapter's modules are also checked against the base's weights."""
    directory = lora_base(adapter, base_dir)
    if directory is None:
        return False  # no base at hand: a Linear model (PEFT corrects Conv1D targets itself, with a warning)
    try:
        base = open_base(directory)
    except CheckpointError:
        if base_dir is not None and any((directory / name).is_file() for name in (SINGLE_NAME, INDEX_NAME)):
            raise  # --base names a broken safetensors checkpoint
        return read_config(directory).get("model_type") in CONV1D_MODEL_TYPES  # e.g. .bin weights: the config tells
    match_targets(base, adapter.modules, untie=True)  # shapes checked; tying does not matter to a LoRA
    check_collapsible(adapter, base)
    if adapter.saved_modules:
        saved_module_keys(adapter, base)  # the trained heads fit the base's
    return base.conv1d
