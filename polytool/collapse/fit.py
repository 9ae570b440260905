"""Does an adapter fit a base? The checks every output path runs before it writes (torch-free).

- Embedding layers PEFT saved whole (a tied lm_head target's weight) must equal the base's: they are
  carried only as a check (`check_collapsible`).
- Trained heads (modules_to_save) must have a tensor of the same shape in the base (`saved_module_keys`);
  embeddings of a resized vocabulary (another row count) are written whole too (`resized_embeddings`,
  `vocab_size`).
- A LoRA export needs to know whether the base stores its targets as Conv1D (`base_uses_conv1d`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..architectures import CONV1D_MODEL_TYPES, INPUT_EMBEDDING_NAMES, OUTPUT_LEAVES, SAVED_EMBEDDING_NAMES
from ..errors import AdapterError, CheckpointError, ConvertedWeightError
from ..formats.adapter import PolyAdapter
from ..formats.base import (INDEX_NAME, INPUT_EMBEDDINGS, SINGLE_NAME, BaseCheckpoint, find_tensor, match_targets,
                            open_base, optional_base, read_config)
from ..formats.adapter_dir import PREFIX
from ..formats.safetensors import SafetensorsFile

WRAPPER_COPIES = ("modules_to_save.", "original_module.")  # PEFT's ModulesToSaveWrapper saved whole


def check_collapsible(adapter: PolyAdapter, base: BaseCheckpoint | None = None) -> None:
    """Embedding layers PEFT saved whole (a tied lm_head target's weight) must equal the base's: they are
    carried only as a check; a resized one (another row count: `resized_embeddings`) is carried whole instead.
    Without a base at hand they cannot be checked and are taken as the base's."""
    if base is None:
        return
    for module, key in adapter.saved_embeddings.items():
        found = _saved_embedding_key(adapter, base, module, key)
        if found is None and _tied_copy(base, module):
            continue  # a tied head's copy of the (resized) input embeddings: the checkpoint stores it once
        if found is None:
            raise CheckpointError(f"the adapter saves embedding weight {key!r}, which the base has no tensor for: "
                                  "wrong base model?", base.directory)
        if _resized(base.tensors[found].shape, adapter.tensor_shape(key)):
            continue
        with SafetensorsFile(base.directory / base.tensors[found].shard) as st:
            same = st.shape(found) == adapter.tensor_shape(key) and np.array_equal(
                st.float_array(found, np.float32), adapter.tensor(key, np.float32))
        if not same:
            raise AdapterError(f"the adapter carries a changed copy of {found} (saved as {key!r}: embeddings trained "
                               "or resized): collapsing it is not supported", adapter.weights_file)


def _saved_embedding_key(adapter: PolyAdapter, base: BaseCheckpoint, module: str, key: str) -> str | None:
    """The base's key of an embedding layer the adapter saved whole, None when it has none."""
    name = key[len(PREFIX):].replace(".base_layer.weight", ".weight")
    found = find_tensor(name, base.tensors)
    if found is None and module in {m.name for m in adapter.modules}:
        found = next((t.source for t in match_targets(base, [m for m in adapter.modules if m.name == module],
                                                      untie=True)), None)
    if found is None and not _tied_copy(base, module):
        found = base.locate(name)  # a family whose checkpoint names transformers converts
    return found


def _tied_copy(base: BaseCheckpoint, module: str) -> bool:
    """An output head the base ties to its input embeddings (not stored in the checkpoint)."""
    return base.tie_word_embeddings and module.rpartition(".")[2] in OUTPUT_LEAVES


def _resized(base_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """An embedding matrix of a resized vocabulary: another row count, the same width."""
    return len(shape) == len(base_shape) == 2 and shape[0] != base_shape[0] and shape[1] == base_shape[1]


def resized_embeddings(adapter: PolyAdapter, base: BaseCheckpoint) -> dict[str, str]:
    """{base checkpoint key: adapter key} of the embedding layers PEFT saved whole with another row count than
    the base's (`model.resize_token_embeddings(n)` before the adapter was made): written whole, like a head."""
    pairs = {}
    for module, key in adapter.saved_embeddings.items():
        found = _saved_embedding_key(adapter, base, module, key)
        if found is not None and _resized(base.tensors[found].shape, adapter.tensor_shape(key)):
            pairs[found] = key
    return pairs


def check_tied_copies(adapter: PolyAdapter, base: BaseCheckpoint) -> None:
    """A dense model of a base that ties its output head to the input embeddings ties them again: an adapter
    that carries the input embeddings whole (trained or resized) and an output head copy that differs from
    them (PEFT's model reads the one in and the other out) cannot be written so; refused, naming both."""
    if not base.tie_word_embeddings:
        return
    inputs = [k for m, k in _carried_weights(adapter).items() if m.rpartition(".")[2] in INPUT_EMBEDDING_NAMES]
    heads = [k for m, k in _carried_weights(adapter).items() if _tied_copy(base, m)]
    for head in heads[:1] if inputs else []:
        if adapter.tensor_shape(head) != adapter.tensor_shape(inputs[0]) or not np.array_equal(
                adapter.tensor(head, np.float32), adapter.tensor(inputs[0], np.float32)):
            raise AdapterError(f"the adapter's output head {head!r} differs from its input embeddings {inputs[0]!r}, "
                               "which the base ties together (tie_word_embeddings): a dense model would tie them "
                               "again. Collapse --to lora instead, or train with both in modules_to_save on an "
                               "untied base", adapter.weights_file)


def _carried_weights(adapter: PolyAdapter) -> dict[str, str]:
    """{module: adapter key} of every weight the adapter carries whole (modules_to_save, embeddings saved whole)."""
    return {**{m: p["weight"] for m, p in adapter.saved_modules.items() if "weight" in p}, **whole_embeddings(adapter)}


def embedding_rows(adapter: PolyAdapter) -> int | None:
    """The row count of the input embeddings the adapter carries whole (a resized or trained vocabulary), if
    any: PEFT loads such an adapter onto a base with as many (base.resize_token_embeddings(rows) first)."""
    rows = [adapter.tensor_shape(k)[0] for m, k in _carried_weights(adapter).items()
            if m.rpartition(".")[2] in INPUT_EMBEDDING_NAMES and len(adapter.tensor_shape(k)) == 2]
    return rows[0] if rows else None


def whole_embeddings(adapter: PolyAdapter) -> dict[str, str]:
    """{module: adapter key} of the embedding layers PEFT saved whole on their own (save_embedding_layers: a
    resized vocabulary), not a targeted layer's base weight (`.base_layer.weight`, a copy of the base's)."""
    return {m: k for m, k in adapter.saved_embeddings.items() if not k.endswith(".base_layer.weight")}


def saved_module_keys(adapter: PolyAdapter, base: BaseCheckpoint) -> dict[str, str]:
    """{base checkpoint key: adapter key} of every modules_to_save tensor (a trained head, or embeddings of a
    resized vocabulary: another row count), shapes checked. PEFT's copies of the wrapper itself (saved beside
    a resized embedding in modules_to_save: `<module>.modules_to_save.weight`, a duplicate of the trained copy,
    and `<module>.original_module.weight`, the base's) are neither written nor carried: PEFT loads the trained
    copy (`<module>.weight`) alone, the same outputs without a warning."""
    pairs = {}
    for module, params in adapter.saved_modules.items():
        for param, key in params.items():
            if param.startswith(WRAPPER_COPIES):
                continue
            found = base.locate(f"{module}.{param}")
            if found is None:
                raise CheckpointError(f"has no tensor for {module}.{param}, which the adapter trains (modules_to_save): "
                                      "save the base with the head class the adapter was trained with", base.directory)
            embedding = module.rpartition(".")[2] in SAVED_EMBEDDING_NAMES
            if base.tensors[found].shape != adapter.tensor_shape(key) and not (
                    embedding and _resized(base.tensors[found].shape, adapter.tensor_shape(key))):
                raise CheckpointError(f"{found} has shape {list(base.tensors[found].shape)}, the adapter's trained "
                                      f"copy {list(adapter.tensor_shape(key))}: wrong base model?", base.directory)
            pairs[found] = key
    return pairs


def vocab_size(base: BaseCheckpoint, written: dict[str, tuple[int, ...]]) -> int | None:
    """The row count of the input embeddings among `written` ({base key: the shape written}) where it differs
    from the base's (a resized vocabulary), else None."""
    for key, shape in written.items():
        if key.endswith(INPUT_EMBEDDINGS) and _resized(base.tensors[key].shape, shape):
            return shape[0]
    return None


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
    for module in adapter.modules:  # shapes checked; tying does not matter to a LoRA
        try:
            match_targets(base, [module], untie=True)
        except ConvertedWeightError:  # built by transformers' conversion in a way only a dense merge must place
            continue
    check_collapsible(adapter, base)
    if adapter.saved_modules:
        saved_module_keys(adapter, base)  # the trained heads fit the base's
    return base.conv1d
