"""The self-check's artifacts: what `collapse --to lora` and `--to dense` compute, held in memory.

These call the product's collapse code on purpose (it is what the self-check tests); the reference that
judges them (reference.py) shares none of it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from ..core.collapse import LORA_ALPHA, collapse_adapter, collapse_module, lora_weights, stored_delta
from ..core.taskspec import TaskSpec, parse_task_spec
from ..formats.adapter import PolyAdapter
from ..formats.lora import LoraArtifact
from .swap import _is_conv1d, _merged


def _product_lora(adapter: PolyAdapter, spec: TaskSpec) -> LoraArtifact:
    """The self-check's LoRA: what `collapse --to lora` computes, held in memory."""
    import numpy as np

    spec = parse_task_spec(str(spec), adapter.n_tasks)  # the product's parser: this is the product's path
    weights = {m.name: tuple(np.asarray(t, np.float32) for t in lora_weights(A, B))
               for m, A, B in collapse_adapter(adapter, spec)}
    config = {"peft_type": "LORA", "r": adapter.r, "lora_alpha": LORA_ALPHA, "target_modules": list(weights)}
    return LoraArtifact(adapter.directory, config, "float32", {}, weights, {}, _saved(adapter))


def _saved(adapter: PolyAdapter) -> dict:
    """What the LoRA carries whole, by model tensor name: the trained heads (modules_to_save, without the copies
    PEFT's wrapper of a resized embedding saves beside `<m>.weight`) and embeddings saved whole (resized)."""
    import numpy as np

    copies = ("modules_to_save.", "original_module.")
    heads = {f"{module}.{param}": adapter.tensor(key, np.float32)
             for module, params in adapter.saved_modules.items() for param, key in params.items()
             if not (param.startswith(copies) and param.partition(".")[2] in params)}
    whole = {f"{path}.weight": adapter.tensor(key, np.float32) for path, key in adapter.saved_embeddings.items()
             if ".base_layer." not in key}
    return {**heads, **whole}


def _product_dense(adapter: PolyAdapter, spec: TaskSpec, layers: dict, base_weight: Callable[[str], Any],
                   dtype: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The self-check's dense weights: what `collapse --to dense` computes, through the same formula."""
    spec = parse_task_spec(str(spec), adapter.n_tasks)  # the product's parser: this is the product's path

    def delta(name):
        return stored_delta(*collapse_module(adapter, name, spec), adapter.r, _is_conv1d(layers[name]))

    return _merged(base_weight, ((m.name, lambda m=m: delta(m.name)) for m in adapter.modules), dtype)
