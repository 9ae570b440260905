"""The routed model that `verify` trusts: a second implementation of Poly/MHR, written plainly from the
definition and sharing no code with what writes artifacts.

It reads the adapter on its own (json, and the safetensors library's own loader), routes on its own
(sigmoid of the task's logits, normalised per split: w / (w.sum() + 1e-12)), mixes on its own (per
split, in float64, with explicit sums), and applies the update through forward hooks on an unmodified
transformers model:

    A_q = sum_s w[q, s] * poly_lora_A[q, s]        (in/q, r)   stacked along the input rows  -> A (in, r)
    B_q = sum_s w[q, s] * poly_lora_B[q, s]        (r, out/q)  stacked along output columns  -> B (r, out)
    y   = base(x) + (x @ A) @ B / r                computed in float64, returned in y's dtype

Every other tensor of the adapter file replaces the model's tensor of that name, as PEFT loads it: an
embedding layer PEFT saved whole is loaded into the layer's weight (a tied twin shares it); a trained head
of modules_to_save is PEFT's copy of the module, so a head tied to the input embeddings is untied while
routed (the embeddings keep the base's values). No cache: every call recomputes.

Nothing here imports polytool's adapter, routing, collapse, poly, lora, merge or export modules; a test
checks that, and tests prove this module equal to PEFT's PolyModel on every architecture of the
compatibility matrix. A wrong formula in the shared product code therefore makes verify fail.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import torch

from ..errors import AdapterError, CheckpointError, PolytoolError

PREFIX = "base_model.model."
POLY_SUFFIXES = (".poly_lora_A", ".poly_lora_B", ".poly_router.module_logits")
EPS = 1e-12  # PEFT's per-split normalisation: w / (w.sum() + 1e-12)

# a task id, "uniform" (every logit 0, MHR-mu), "mean" (the tasks' weights averaged), or a mix {task: coefficient}
# (w = sum_i c_i * w_task_i; also given as "1:0.7,3:0.3", "1,3" or ((1, 0.7), (3, 0.3)); normalised to sum 1)
RoutingSpec = Union[int, str, Mapping[int, float]]


def _task_id(value: Any, n_tasks: int) -> int:
    if hasattr(value, "__index__") and not isinstance(value, bool):
        value = value.__index__()  # numpy integers too
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n_tasks:
        raise PolytoolError(f"routing {value!r}: expected a task id in [0, {n_tasks}), uniform, mean or a mix")
    return value


def routing_spec(spec: Any, n_tasks: int) -> RoutingSpec:
    """`spec` checked and in canonical form: an int task id, "uniform", "mean", or {task: c} with c summing to 1.
    A mix object with `tasks` and `coefficients` (the product code's TaskMix) is read by those two fields."""
    if hasattr(spec, "tasks") and hasattr(spec, "coefficients"):
        spec = list(zip(spec.tasks, spec.coefficients))
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("uniform", "mean"):
            return text
        try:
            spec = [(int(t), float(c) if sep else 1.0) for t, sep, c in (p.partition(":") for p in text.split(","))]
        except ValueError:
            raise PolytoolError(f"routing {spec!r}: expected a task id, uniform, mean or a mix like 1:0.7,3:0.3") from None
    if not isinstance(spec, (Mapping, list, tuple)):
        return _task_id(spec, n_tasks)
    mix: dict[int, float] = {}
    for item in spec.items() if isinstance(spec, Mapping) else spec:
        task, coef = item if isinstance(item, (tuple, list)) and len(item) == 2 else (item, 1.0)
        task = _task_id(task, n_tasks)
        mix[task] = mix.get(task, 0.0) + (float(coef) if isinstance(coef, (int, float)) else math.nan)
    total = sum(mix.values())
    if not all(math.isfinite(c) and c >= 0 for c in mix.values()) or not total > 0:
        raise PolytoolError(f"routing mix {spec!r}: coefficients must be finite numbers >= 0, not all 0")
    if len(mix) == 1:
        return next(iter(mix))  # one task: its own weights
    return {t: c / total for t, c in sorted(mix.items())}


class ReferenceAdapter:
    """A Poly/MHR adapter directory read into float64 tensors, with nothing derived ahead of time."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        file = self.directory / "adapter_config.json"
        try:
            config = json.loads(file.read_text(encoding="utf-8"))
            self.r, self.n_tasks, self.n_skills, self.n_splits = (
                int(config[k]) for k in ("r", "n_tasks", "n_skills", "n_splits"))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"the reference cannot read r, n_tasks, n_skills and n_splits here "
                               f"({type(exc).__name__})", file) from None
        self.tensors = _load_tensors(self.directory)
        self.modules = [k[len(PREFIX):-len(".poly_lora_A")] for k in self.tensors if k.endswith(".poly_lora_A")]
        if not self.modules:
            raise AdapterError("the reference finds no poly_lora_A tensor in the adapter", self.directory)
        # everything else PEFT saved: model tensor name -> tensor. A saved embedding layer (`<path>.base_layer.
        # weight`, e.g. a tied lm_head target) is loaded into the layer's own weight, tied twin included, as PEFT
        # loads it; a modules_to_save head is PEFT's copy of the module: its tied twin keeps the base's values.
        # PEFT's wrapper of a resized embedding in modules_to_save may also save its copies under
        # `<m>.modules_to_save.` and `<m>.original_module.`: PEFT loads `<m>.weight`, the trained copy, alone
        self.whole = {k[len(PREFIX):].replace(".base_layer.", "."): k for k in self.tensors
                      if not k.endswith(POLY_SUFFIXES) and not _wrapper_copy(k, self.tensors)}  # name -> key
        self.embedding_layers = {k[len(PREFIX):].replace(".base_layer.", ".") for k in self.tensors
                                 if ".base_layer." in k and not k.endswith(POLY_SUFFIXES)}

    @cached_property
    def replaced(self) -> dict[str, torch.Tensor]:
        """Model tensor name -> what the adapter carries whole for it, read when first asked for."""
        return {name: self.tensors[key] for name, key in self.whole.items()}

    def whole_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of the tensor the adapter carries whole for model tensor `name` (None: none), read from the
        file's header: a resized vocabulary's embeddings are not read for it."""
        key = self.whole.get(name)
        if key is None:
            return None
        tensors = self.tensors
        return tensors.shape(key) if isinstance(tensors, _Tensors) else tuple(tensors[key].shape)

    def _tensor(self, module: str, suffix: str) -> torch.Tensor:
        return self.tensors[PREFIX + module + suffix].double()

    def task_weights(self, module: str, task: int) -> torch.Tensor:
        """(q, s): sigmoid of the task's logits, each split divided by its sum (+ 1e-12)."""
        logits = self._tensor(module, ".poly_router.module_logits")[task]  # (q*s,), split-major
        return _normalise(torch.sigmoid(logits).reshape(self.n_splits, self.n_skills))

    def weights(self, module: str, spec: RoutingSpec) -> torch.Tensor:
        """(q, s) mixing weights of a routing spec."""
        spec = routing_spec(spec, self.n_tasks)
        if isinstance(spec, int):
            return self.task_weights(module, spec)
        if spec == "uniform":  # all logits 0: sigmoid 1/2 everywhere, then normalised as any task
            return _normalise(torch.full((self.n_splits, self.n_skills), 0.5, dtype=torch.float64))
        if spec == "mean":
            return sum(self.task_weights(module, t) for t in range(self.n_tasks)) / self.n_tasks
        return sum(c * self.task_weights(module, t) for t, c in spec.items())  # a mix: sum_i c_i w_i

    def factors(self, module: str, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """A (in, r) and B (r, out) in float64, mixed split by split (kept per module and task: every forward
        of a verify run asks for them again, and they are small)."""
        spec = routing_spec(spec, self.n_tasks)
        key = (module, spec if not isinstance(spec, dict) else tuple(sorted(spec.items())))
        cache = self.__dict__.setdefault("_factors", {})
        if key not in cache:
            cache[key] = self._mix(module, spec)
        return cache[key]

    def _mix(self, module: str, spec: RoutingSpec) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weights(module, spec)  # (q, s)
        poly_A = self._tensor(module, ".poly_lora_A")  # (q, s, in/q, r)
        poly_B = self._tensor(module, ".poly_lora_B")  # (q, s, r, out/q)
        A_blocks, B_blocks = [], []
        for q in range(self.n_splits):
            A_q = torch.zeros_like(poly_A[q, 0])  # (in/q, r)
            B_q = torch.zeros_like(poly_B[q, 0])  # (r, out/q)
            for s in range(self.n_skills):
                A_q = A_q + w[q, s] * poly_A[q, s]
                B_q = B_q + w[q, s] * poly_B[q, s]
            A_blocks.append(A_q)
            B_blocks.append(B_q)
        return torch.cat(A_blocks, dim=0), torch.cat(B_blocks, dim=1)  # (in, r), (r, out)

    def update(self, module: str, spec: RoutingSpec) -> "LowRankUpdate":
        """delta(module, spec), computed a block of rows at a time when indexed (update[lo:hi])."""
        return LowRankUpdate(*self.factors(module, spec), self.r)

    def delta(self, module: str, spec: RoutingSpec) -> torch.Tensor:
        """The (out, in) float64 update of a Linear's weight: (A @ B / r).T, computed as B.T @ A.T / r so that
        it is contiguous in (out, in) (read row by row in weight space)."""
        A, B = self.factors(module, spec)
        return (B.T @ A.T).div_(self.r)


class LowRankUpdate:
    """The (out, in) update (A @ B / r).T of factors A (in, r) and B (r, out), never held whole: indexing rows
    computes them (B.T[rows] @ A.T / r); `.T` is the (in, out) layout, rows A[rows] @ B / r."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, r: int, transposed: bool = False):
        self.A, self.B, self.r, self.transposed = A, B, r, transposed
        self._right = B / r if transposed else A.T / r  # 1/r on the small factor, once (exact for r = 2^k)

    @property
    def T(self) -> "LowRankUpdate":
        return LowRankUpdate(self.A, self.B, self.r, not self.transposed)

    def __abs__(self) -> "LowRankUpdate":
        """|B|.T @ |A|.T / r: per element, the sum of the magnitudes of the r products that make the update."""
        return LowRankUpdate(self.A.abs(), self.B.abs(), self.r, self.transposed)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return (self.A[rows] if self.transposed else self.B.T[rows]) @ self._right

    def add_rows_to(self, lo: int, hi: int, rows: torch.Tensor) -> torch.Tensor:
        """rows += self[lo:hi], in place (float64, one BLAS pass: beta 1), and returned; `rows` a buffer reused
        block after block (a new 2 MB result per block costs more in fresh pages than the product itself)."""
        left = self.A[lo:hi] if self.transposed else self.B.T[lo:hi]  # (rows, r)
        return rows.addmm_(left, self._right)  # (rows, r) @ (r, cols)


def _wrapper_copy(key: str, tensors: dict) -> bool:
    """`<m>.original_module.<p>` or `<m>.modules_to_save.<p>` beside `<m>.<p>`: a copy PEFT does not load."""
    for part in (".original_module.", ".modules_to_save."):
        if part in key:
            return key.replace(part, ".", 1) in tensors
    return False


def _normalise(w: torch.Tensor) -> torch.Tensor:
    """(q, s): each split's weights divided by their sum plus 1e-12."""
    return torch.stack([w[q] / (w[q].sum() + EPS) for q in range(w.shape[0])])


def _load_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the adapter file: the safetensors library's own loader, or torch.load(weights_only)."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        file = directory / name
        if file.is_file():
            if name.endswith(".bin") and os.environ.get("POLYTOOL_ALLOW_PICKLE") != "1":
                raise AdapterError("the reference reads adapter_model.bin (a pickle) only with "
                                   "POLYTOOL_ALLOW_PICKLE=1", file)
            try:
                if name.endswith(".bin"):
                    return torch.load(file, map_location="cpu", weights_only=True)
                return _Tensors(file)
            except Exception as exc:  # the loaders raise many types for a bad file
                raise AdapterError(f"the reference cannot load the adapter's tensors ({type(exc).__name__})",
                                   file) from None
    raise AdapterError("no adapter_model.safetensors (or adapter_model.bin) in the adapter directory", directory)


class _Tensors(Mapping):
    """The tensors of a safetensors file by name, each read (by the safetensors library) when it is asked for,
    so that a large adapter is not held whole beside the model."""

    def __init__(self, file: Path):
        from safetensors import safe_open

        self.file = str(file)
        with safe_open(self.file, framework="pt") as f:
            self.names = list(f.keys())
        self._known = set(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self._known:
            raise KeyError(name)
        with safe_open(self.file, framework="pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        from safetensors import safe_open

        with safe_open(self.file, framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _named_tensor(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """(owning module, attribute) of a parameter or buffer by its dotted name."""
    path, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(path) if path else model
    except AttributeError:
        owner = None
    if owner is None or not isinstance(getattr(owner, attr, None), torch.Tensor):
        raise CheckpointError(f"the adapter holds {name!r}, which this model does not have: wrong base model?")
    return owner, attr


@contextmanager
def routed(model: torch.nn.Module, adapter: ReferenceAdapter, spec: RoutingSpec) -> Iterator[torch.nn.Module]:
    """Inside the block `model` (a plain transformers model) computes the routed Poly model for `spec`."""
    spec = routing_spec(spec, adapter.n_tasks)
    handles, swapped = [], []
    try:
        for module in adapter.modules:
            layer = _layer(model, module, "the adapter")
            A, B = adapter.factors(module, spec)
            _check_layer(module, layer, A.shape[0], B.shape[1])
            A, B = A.to(_device(layer)), B.to(_device(layer))

            def hook(_layer, args, out, A=A, B=B):
                x = args[0].to(A.device).double()  # (..., in)
                update = (x @ A) @ B / adapter.r  # (..., in) @ (in, r) @ (r, out) -> (..., out)
                return (out.double() + update.to(out.device)).to(out.dtype)

            handles.append(layer.register_forward_hook(hook))
        for name, tensor in adapter.replaced.items():
            owner, attr = _named_tensor(model, name)
            old = getattr(owner, attr)
            if tuple(old.shape) != tuple(tensor.shape):
                raise CheckpointError(f"the adapter's {name} has shape {list(tensor.shape)}, the model's "
                                      f"{list(old.shape)}: wrong base model?")
            new = tensor.to(old.device, old.dtype)
            if name in adapter.embedding_layers:  # into the shared weight; its values are copied back on exit
                swapped.append((owner, attr, old.detach().clone(), True))
                with torch.no_grad():
                    old.copy_(new)
            else:  # a new tensor in its place; the original object is put back on exit
                swapped.append((owner, attr, old, False))
                setattr(owner, attr, torch.nn.Parameter(new, requires_grad=False)
                        if isinstance(old, torch.nn.Parameter) else new)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for owner, attr, saved, in_place in reversed(swapped):
                if in_place:
                    getattr(owner, attr).copy_(saved)
                else:
                    setattr(owner, attr, saved)


def _layer(model: torch.nn.Module, module: str, owner: str) -> torch.nn.Module:
    try:
        return model.get_submodule(module)
    except AttributeError:
        raise CheckpointError(f"module {module!r} of {owner} is not in this model: wrong base model?") from None


def _check_layer(module: str, layer: torch.nn.Module, d_in: int, d_out: int) -> None:
    """The layer takes `d_in` features and gives `d_out`: a Linear's weight is (out, in), a Conv1D's (in, out)."""
    weight = getattr(layer, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    want = (d_in, d_out) if type(layer).__name__ == "Conv1D" else (d_out, d_in)
    if shape != want:
        raise CheckpointError(f"module {module!r}: the adapter maps {d_in} features to {d_out}, the model's layer "
                              f"has weight {list(shape) if shape else None}: wrong base model?")


def _device(layer: torch.nn.Module) -> torch.device:
    weight = getattr(layer, "weight", None)
    return weight.device if isinstance(weight, torch.Tensor) and not weight.is_meta else torch.device("cpu")
