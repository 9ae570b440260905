"""A LoRA applied to a torch model exactly as PEFT 0.21 loads it (no PEFT import): verify's LoRA runtime.

Which modules PEFT wraps is decided from the config and the model's module names alone
(`lora_targets`: target_modules, exclude_modules, layers_to_transform / layers_pattern, never inside
modules_to_save). Each wrapped module computes y = base(x) + (x @ A.T @ B.T + bias) * scaling_m in
float32, cast back to the layer's dtype, with the scaling resolved by the reader (formats/lora.py).
Modules in modules_to_save run with the saved tensors (`swap_saved_modules`).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from ..architectures import TASK_HEADS
from ..errors import PolytoolError
from ..formats.lora import LoraArtifact, _check_config, _init_kind
from ..formats.adapter_dir import CONFIG_NAME

MIN_TARGETS_TO_MINIMISE = 20  # PEFT's MIN_TARGET_MODULES_FOR_OPTIMIZATION
# What PEFT leaves in a wrapped module that the file has no tensors for, by init_lora_weights.
AT_INIT = {True: "B = 0, a no-op", False: "random A and B", "gaussian": "B = 0, a no-op", "eva": "B = 0, a no-op",
           "orthogonal": "random A and B", "mica": "A = 0, a no-op"}


# ---- which modules PEFT wraps --------------------------------------------------------------------


def _layer_index(layers_pattern: str | list[str] | None, name: str) -> int | None:
    """The layer index PEFT reads from a module path: the first numbered segment (after layers_pattern)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _is_target(config: dict, targets: str | set[str], name: str) -> bool:
    """PEFT 0.21's check_target_module_exists for one module path."""
    exclude = config["exclude_modules"]
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, name):
                return False
        elif name in exclude or any(name.endswith(f".{e}") for e in exclude):
            return False
    guarded = list(config["modules_to_save"] or []) + (list(TASK_HEADS["SEQ_CLS"]) if config["task_type"] == "SEQ_CLS"
                                                       else [])
    if any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in guarded):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True  # an exact name: layers_to_transform does not apply
    found = any(name.endswith(f".{t}") for t in targets)
    layers = config["layers_to_transform"]
    if found and layers is not None and layers != []:
        index = _layer_index(config["layers_pattern"], name)
        if index is None:
            return False
        return index == layers if isinstance(layers, int) else index in layers
    return found


def _minimal_targets(targets: set[str], names: list[str]) -> set[str]:
    """PEFT's _find_minimal_target_modules, which it applies to lists of 20 names or more before matching."""
    suffixes = tuple("." + t for t in targets)
    others = {n for n in names if n not in targets and not n.endswith(suffixes)}

    def suffixes_of(s: str) -> list[str]:
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {s for n in others for s in suffixes_of(n)}
    required: set[str] = set()
    for item, candidates in sorted(((t, suffixes_of(t)) for t in targets), key=lambda tup: tup[1]):
        for suffix in candidates:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(item.endswith("." + r) for r in required):
                required.add(suffix)
                break
    return required or set(targets)


def lora_targets(artifact: LoraArtifact, module_names) -> set[str]:
    """Of a model's module paths (`model.named_modules()` names), those PEFT would wrap with this LoRA."""
    config = _check_config(artifact.config, artifact.directory / CONFIG_NAME)
    names = list(module_names)
    targets = config["target_modules"]
    if not isinstance(targets, str):
        targets = set(targets)
        if len(targets) >= MIN_TARGETS_TO_MINIMISE:
            minimal = _minimal_targets(targets, names)
            targets = minimal if len(minimal) < len(targets) else targets
    return {name for name in names if name and _is_target(config, targets, name)}


# ---- applying it ---------------------------------------------------------------------------------


def attach_lora(layers: dict, artifact: LoraArtifact | dict, scaling: float | None = None, *,
                module_names=None) -> list:
    """Add y += (x @ A.T @ B.T + bias) * scaling_m to every module PEFT would wrap, through forward hooks.

    layers: {module path: nn.Linear or Conv1D} for EVERY such layer of the model (a Poly layer's
    `.base_layer`); module_names: every module path of the model (`named_modules()`), to also catch
    targets that are not Linear / Conv1D (defaults to the keys of `layers`). Refused in one line: a
    tensor for a module PEFT would not wrap, a wrapped module without tensors, a wrapped module that
    is not Linear / Conv1D, a shape that does not fit. The update runs in float32 and the sum is cast
    back to the layer's dtype, as PEFT does; the returned handles' `remove()` restores the layers.

    attach_lora(layers, {module: (A, B)}, scaling) applies given factors to exactly those modules, scaled
    by a number or by scaling(module).
    """
    if not isinstance(artifact, LoraArtifact):  # the plain form: factors and their scaling, no config
        return _hook_all(layers, artifact, {n: scaling(n) if callable(scaling) else scaling for n in artifact}, {},
                         None)
    names = list(layers) if module_names is None else list(module_names)
    targets = lora_targets(artifact, names)
    where = artifact.directory
    if not targets:
        raise PolytoolError(f"target_modules={artifact.config.get('target_modules')!r} selects no module of this "
                            "model: PEFT refuses to load it", where)
    ignored = sorted(set(artifact.weights) - targets)
    if ignored:
        raise PolytoolError(f"the LoRA holds tensors for {ignored[0]!r}, which PEFT would not wrap with this config "
                            "(target_modules, exclude_modules, layers_to_transform, modules_to_save): PEFT would "
                            "ignore them", where)
    other = sorted(targets - set(layers))
    if other:
        raise PolytoolError(f"the config selects {other[0]!r}, which is not a Linear or Conv1D layer (PEFT would give "
                            "it another LoRA layer type, or refuse it): polytool applies LoRA to those two only", where)
    missing = sorted(targets - set(artifact.weights))
    if missing:
        init = _init_kind(artifact.config.get("init_lora_weights", True))
        raise PolytoolError(f"the config selects {missing[0]!r} ({len(missing)} modules in all), but the LoRA holds no "
                            f"tensors for it: PEFT would leave it at its initial value ({AT_INIT[init]}); the adapter "
                            "is incomplete", where)
    return _hook_all(layers, artifact.weights, artifact.scalings, artifact.biases, where)


def _hook_all(layers: dict, weights: dict, scalings: dict, biases: dict, where: Path | None) -> list:
    import torch

    from ..poly.layer import linear_features

    for name, (A, B) in weights.items():
        d_in, d_out = linear_features(layers[name], name)
        if A.shape[1] != d_in or B.shape[0] != d_out:
            raise PolytoolError(f"module {name!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)} "
                                f"do not fit the base's layer (in {d_in}, out {d_out})", where)
    handles = []
    for name, (A, B) in weights.items():
        weight = layers[name].weight
        device = torch.device("cpu") if weight.is_meta else weight.device  # offloaded (--max-memory): CPU
        At = torch.as_tensor(np.ascontiguousarray(A.T), dtype=torch.float32, device=device)  # (in, r)
        Bt = torch.as_tensor(np.ascontiguousarray(B.T), dtype=torch.float32, device=device)  # (r, out)
        b = biases.get(name)
        b = None if b is None else torch.as_tensor(b, dtype=torch.float32, device=device)  # (out,)

        def hook(mod, args, out, At=At, Bt=Bt, b=b, scale=scalings[name]):
            x = args[0].to(At.device, torch.float32)
            update = (x @ At) @ Bt  # (..., in) @ (in, r) @ (r, out) -> (..., out)
            if b is not None:
                update = update + b  # lora_B's bias is scaled with it, as in PEFT
            return (out.to(torch.float32) + (update * scale).to(out.device)).to(out.dtype)

        handles.append(layers[name].register_forward_hook(hook))
    return handles


@contextmanager
def swap_saved_modules(model, saved: LoraArtifact | dict) -> Iterator[None]:
    """Inside the block the modules_to_save modules hold the saved tensors; restored after.

    saved: an artifact, {module path: {param name: array}} or {model tensor name: array}. Each tensor
    is replaced by a new Parameter (buffer) in the model's dtype, so a tied partner keeps its value, as
    PEFT's modules_to_save copy leaves it. Every name and shape is checked before anything changes.
    """
    import torch

    if isinstance(saved, LoraArtifact):
        saved = saved.saved
    flat = {f"{m}.{p}": v for m, ps in saved.items() for p, v in ps.items()} if saved and all(
        isinstance(v, dict) for v in saved.values()) else saved
    plan = []
    for name, value in flat.items():
        path, _, leaf = name.rpartition(".")
        try:
            owner = model.get_submodule(path)
        except AttributeError:
            owner = None
        slots = None if owner is None else owner._parameters if leaf in owner._parameters else owner._buffers
        current = None if slots is None else slots.get(leaf)
        if current is None or tuple(current.shape) != tuple(value.shape):
            shown = "missing" if current is None else f"of shape {list(current.shape)}"
            raise PolytoolError(f"the artifact's trained {name} {list(value.shape)} does not fit this model "
                                f"(its tensor is {shown}): wrong base model?")
        new = torch.as_tensor(np.ascontiguousarray(value)).to(current.device, current.dtype)
        plan.append((slots, leaf, current, torch.nn.Parameter(new, requires_grad=False)
                     if isinstance(current, torch.nn.Parameter) else new))
    try:
        for slots, leaf, _, new in plan:
            slots[leaf] = new
        yield
    finally:
        for slots, leaf, old, _ in reversed(plan):
            slots[leaf] = old
