"""Artifacts' weights put into the run's one model copy, and taken out again (verify's own code).

verify holds one copy of the base. A dense artifact's merged weights, its trained heads, or, where it was
written in another dtype, every tensor, are copied into the model's own tensors for a forward and read back
from the base checkpoint after (`ModelWeights`, which `Run` builds on). Where accelerate offloaded a layer
(--max-memory) a forward hook adds x @ (W - W_base) instead, a block of rows at a time. `merged_weights`
makes base weight + update rounded once to a dtype, lazily: the ideal dense weights the gate compares with.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..collapse.fit import saved_module_keys
from ..formats.base import open_base
from ..formats.safetensors import FLOAT_DTYPES, SafetensorsFile
from .names import checkpoint_name
from .weights import CHUNK


def _merged(base_weight: Callable[[str], Any], deltas: Iterator[tuple[str, Callable[[], Any]]],
            dtype: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(module, producer of base weight + delta (float64) rounded once to `dtype`), lazily: a producer
    computes its weight when called (once in place; at every forward for an offloaded layer)."""
    import torch

    def producer(name, delta):
        weight, update = base_weight(name), delta()  # update: a tensor, an array, or a LowRankUpdate
        out = torch.empty(weight.shape, dtype=getattr(torch, dtype), device=weight.device)
        step = max(1, CHUNK // max(1, weight[0].numel())) if weight.dim() else 1
        for lo in range(0, weight.shape[0] if weight.dim() else 1, step):  # rows that stay in cache
            rows = torch.as_tensor(update[lo:lo + step]).to(weight.device)
            out[lo:lo + step] = torch.add(rows, weight[lo:lo + step]).to(out.dtype)  # float64, rounded once
        return out

    for name, delta in deltas:
        yield name, (lambda name=name, delta=delta: producer(name, delta))


def _is_conv1d(layer) -> bool:
    import torch

    return not isinstance(layer, torch.nn.Linear)


def _ideal_dense(delta: Callable[[str], Any], modules: list[str], layers: dict, base_weight: Callable[[str], Any],
                 dtype: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The ideal dense weights: the reference's float64 update (`delta(module)`, (out, in)) added and
    rounded once to `dtype`."""
    def stored(m):
        return delta(m).T if _is_conv1d(layers[m]) else delta(m)

    return _merged(base_weight, ((m, lambda m=m: stored(m)) for m in modules), dtype)


class ModelWeights:
    """Swapping weights into `self.model` (a Run's): needs model, layers, targets, base and adapter."""

    def base_weight(self, name: str):
        """The base's float32 weight of an adapted module: the model's own, or read from the checkpoint where
        accelerate offloaded it (--max-memory; then possibly a read-only view of the mapped file)."""
        weight = self.layers[name].weight
        return self._checkpoint_weight(name).float() if weight.is_meta else weight.detach()

    @contextmanager
    def weights_in_place(self, weights: Iterator[tuple[str, Callable[[], Any]]]) -> Iterator[None]:
        """Inside the block the adapted layers compute with `weights` ((module, producer of its weight)): copied
        into the model's own tensors, so the run holds one model, and read back from the base checkpoint
        after; a weight tied to the embeddings gets a new tensor (merged alone, as `--untie`). A layer that
        accelerate offloaded (--max-memory) keeps its weight on disk: a forward hook adds x @ (W - W_base)
        with W produced at each call and applied a block of rows at a time, so memory stays at one weight."""
        import torch

        changed, handles = [], []
        try:
            for name, produce in weights:
                layer = self.layers[name]
                if layer.weight.is_meta:
                    def hook(mod, args, out, name=name, produce=produce, conv1d=_is_conv1d(layer)):
                        W, base = produce(), self._checkpoint_weight(name)  # stored layout and dtypes
                        x, update = args[0].to(torch.float32), out.to(torch.float32, copy=True)
                        step = max(1, CHUNK // W.shape[1])
                        for lo in range(0, W.shape[0], step):  # W - W_base a block of rows at a time
                            D = W[lo:lo + step].to(torch.float32, copy=True)  # W may be a read-only map
                            D -= base[lo:lo + step].to(torch.float32)
                            if conv1d:  # (in, out): these rows are input features
                                update += x[..., lo:lo + step] @ D
                            else:  # (out, in): these rows are output features
                                update[..., lo:lo + step] += x @ D.T
                        return update.to(out.dtype)

                    handles.append(layer.register_forward_hook(hook))
                elif self.targets[name].tied_to:
                    changed.append((layer, layer.weight))
                    weight = produce().to(layer.weight.device, layer.weight.dtype, copy=True)  # never a map
                    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
                else:
                    changed.append((layer, None))
                    with torch.no_grad():
                        layer.weight.copy_(produce())
                    changed[-1] = (layer, name)
            yield
        finally:
            for handle in handles:
                handle.remove()
            for layer, original in reversed(changed):
                if isinstance(original, torch.nn.Parameter):
                    layer.weight = original
                elif original is not None:
                    with torch.no_grad():
                        layer.weight.copy_(self._checkpoint_weight(original))

    def _checkpoint_weight(self, name: str):
        """The base checkpoint's weight of an adapted module in its stored dtype, a view of the mapped file
        (copied into a float32 weight, it converts without a temporary)."""

        target = self.targets[name]
        weight = SafetensorsFile(self.base.directory / self.base.tensors[target.source].shard).tensor(target.source)
        return self._as_layer(name, weight)

    def _as_layer(self, name: str, weight):
        """A checkpoint tensor holding module `name`'s weight, as the layer holds it: its block of rows (a fused
        key), transposed where the checkpoint stores it the other way round (a conversion's transpose)."""
        target = self.targets[name]
        weight = weight if target.rows is None else weight[target.rows[0]:target.rows[1]]
        return weight.T if target.transposed != _is_conv1d(self.layers[name]) else weight

    def _artifact_weights(self, path: Path) -> Iterator[tuple[str, Callable[[], Any]]]:
        """A dense artifact's merged weights, each read when its producer is called (a view of the mapped file,
        in its stored dtype)."""

        dense = open_base(path, checkpoint_name)
        for name, target in self.targets.items():
            yield name, (lambda name=name, key=target.key:
                         self._as_layer(name, SafetensorsFile(path / dense.tensors[key].shard).tensor(key)))

    def _all_tensors(self, path: Path) -> dict | None:
        """{checkpoint key: the model's tensor} for every tensor of the dense artifact at `path`, where each has
        one in the model (same name and shape; tied tensors given one value) and the base checkpoint holds
        it too (to read it back); None where that is not so (then the artifact is loaded whole)."""

        dense = open_base(path, checkpoint_name)
        named = self.model.state_dict(keep_vars=True)
        pairs, seen = {}, set()
        for key, info in dense.tensors.items():
            tensor = named.get(key)
            if tensor is None or tuple(tensor.shape) != tuple(info.shape) or key not in self.base.tensors \
                    or info.dtype not in FLOAT_DTYPES or not tensor.is_floating_point() \
                    or tensor.data_ptr() in seen:  # a tied twin written apart (--untie): not this model's layout
                return None
            seen.add(tensor.data_ptr())
            pairs[key] = tensor
        return pairs

    @contextmanager
    def _tensors_in_place(self, path: Path, pairs: dict) -> Iterator[None]:
        """Inside the block the model's tensors hold the artifact's values (converted exactly to float32), copied
        in one at a time from the mapped files; the base's are read back from its checkpoint after."""
        import torch


        def copy_in(directory: Path, tensors: dict, key: str) -> None:
            with torch.no_grad():
                pairs[key].copy_(SafetensorsFile(directory / tensors[key].shard).tensor(key))

        dense, done = open_base(path, checkpoint_name), []
        try:
            for key in pairs:
                done.append(key)
                copy_in(path, dense.tensors, key)
            yield
        finally:
            for key in done:
                copy_in(self.base.directory, self.base.tensors, key)

    def _artifact_heads(self, path: Path) -> dict:
        """A dense artifact's trained heads (modules_to_save), by model tensor name."""

        dense, heads = open_base(path, checkpoint_name), {}
        for key, adapter_key in saved_module_keys(self.adapter, self.base).items():
            module = next(m for m, params in self.adapter.saved_modules.items() if adapter_key in params.values())
            param = next(p for p, k in self.adapter.saved_modules[module].items() if k == adapter_key)
            with SafetensorsFile(path / dense.tensors[key].shard) as st:
                heads[f"{module}.{param}"] = st.float_array(key, np.float32)
        return heads
