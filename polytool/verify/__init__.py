"""verify: collapsed artifacts against the routed model, computed independently.

One copy of the base, loaded in float32 with the class the adapter was trained for (task_type), serves
every model of the run. For each task spec the same inputs go through:

    reference  the routed Poly/MHR model of polytool/reference.py (a second implementation, float64
               mixing, no code shared with what wrote the artifact), or PEFT's with --reference peft
    base       the bare base: if the reference equals it, the check proves nothing (a no-op)
    artifact   a LoRA applied as PEFT applies it (polytool/lora.py), a dense model directory, or, for
               the self-check, the product path's collapse put in memory (LoRA hooks, merged weights)

Compared: every floating output tensor and every adapted module's output, NaN-proof (compare.py); for
dense artifacts also every tensor in weight space (weights.py); for half-precision dense artifacts the
forward is judged against the error of the ideal rounding of the same weights, measured in the same run.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..adapter import PolyAdapter, load_adapter
from ..basemodel import resolve_base_dir
from ..collapse import LORA_ALPHA, collapse_adapter, collapse_module, lora_weights, stored_delta
from ..errors import CheckpointError, PolytoolError
from ..lora import LoraArtifact, attach_lora, swap_saved_modules
from ..routing import TaskSpec, parse_task_spec
from .artifacts import Target, artifact_targets
from .compare import errors, forward, kl, make_check, non_finite, top1
from .inputs import DEFAULT_INPUTS, DEFAULT_SEQ_LEN, prompt_inputs, random_inputs
from .models import (base_config, linear_layers, load_model, model_class, release_memory, resolve_device, stored_dtype,
                     utf8_path)
from .report import render_report
from .weights import CHUNK

__all__ = ["verify", "render_report", "run_checks", "Target", "TOLERANCES", "FLOOR_MULTIPLE"]

# stored dtype -> (atol, rtol) against the float64 reference; docs/ci.md records the measurements. Dense
# artifacts in half precision are judged against their own rounding floor (FLOOR_MULTIPLE) instead of the
# half-precision row, which applies to half-precision LoRA factors.
TOLERANCES = {"float64": (1e-5, 1e-5), "float32": (1e-5, 1e-5), "bfloat16": (1e-4, 1e-2), "float16": (1e-5, 3e-3)}
HALF = ("bfloat16", "float16")
FLOOR_MULTIPLE = 2.0
REFERENCES = ("polytool", "peft")


def _product_lora(adapter: PolyAdapter, spec: TaskSpec) -> LoraArtifact:
    """The self-check's LoRA: what `collapse --to lora` computes, held in memory."""
    import numpy as np

    weights = {m.name: tuple(np.asarray(t, np.float32) for t in lora_weights(A, B))
               for m, A, B in collapse_adapter(adapter, spec)}
    config = {"peft_type": "LORA", "r": adapter.r, "lora_alpha": LORA_ALPHA, "target_modules": list(weights)}
    return LoraArtifact(adapter.directory, config, "float32", {}, weights, {}, _saved(adapter))


def _saved(adapter: PolyAdapter) -> dict:
    """The adapter's trained heads (modules_to_save) by model tensor name."""
    import numpy as np

    return {f"{module}.{param}": adapter.tensor(key, np.float32)
            for module, params in adapter.saved_modules.items() for param, key in params.items()}


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


def _product_dense(adapter: PolyAdapter, spec: TaskSpec, layers: dict, base_weight: Callable[[str], Any],
                   dtype: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The self-check's dense weights: what `collapse --to dense` computes, through the same formula."""
    def delta(name):
        return stored_delta(*collapse_module(adapter, name, spec), adapter.r, _is_conv1d(layers[name]))

    return _merged(base_weight, ((m.name, lambda m=m: delta(m.name)) for m in adapter.modules), dtype)


def _ideal_dense(delta: Callable[[str], Any], modules: list[str], layers: dict, base_weight: Callable[[str], Any],
                 dtype: str) -> Iterator[tuple[str, Callable[[], Any]]]:
    """The ideal dense weights: the reference's float64 update (`delta(module)`, (out, in)) added and
    rounded once to `dtype`."""
    def stored(m):
        return delta(m).T if _is_conv1d(layers[m]) else delta(m)

    return _merged(base_weight, ((m, lambda m=m: stored(m)) for m in modules), dtype)


class Run:
    """One verify run: the base model (loaded once), its adapted layers, the reference, the inputs."""

    def __init__(self, adapter: PolyAdapter, base_dir: Path, class_name: str, family: str, batches: list,
                 device: str, reference: str, one_copy: bool = True, max_memory: int | None = None,
                 offload_dir: Path | None = None):
        from ..reference import ReferenceAdapter

        self.adapter, self.base_dir, self.class_name, self.family = adapter, base_dir, class_name, family
        self.batches, self.device, self.reference_kind, self.one_copy = batches, device, reference, one_copy
        self.max_memory, self.offload_dir = max_memory, offload_dir
        self.model = load_model(base_dir, class_name, device, max_memory, offload_dir)
        self.offloaded = any(p.is_meta for p in self.model.parameters())
        if self.offloaded and (adapter.saved_modules or adapter.saved_embeddings or reference == "peft"):
            raise PolytoolError("--max-memory offloads the model, and this check would swap tensors into it (trained "
                                "heads, saved embeddings) or load PEFT's copy: verify it without --max-memory")
        names = {n for n, _ in self.model.named_modules()}
        absent = [m.name for m in adapter.modules if m.name not in names]
        if absent:
            raise CheckpointError(f"module {absent[0]!r} of the adapter is not in this base model (loaded as "
                                  f"{class_name}): wrong base model?", base_dir)
        self.layers = linear_layers(self.model)
        self.capture = {m.name: self.layers[m.name] for m in adapter.modules}
        self.base_dtype = stored_dtype(base_dir, self.model.config)
        self.reference = ReferenceAdapter(adapter.directory)
        from ..basemodel import match_targets, open_base

        self.base = open_base(base_dir)
        self.targets = {t.module: t for t in match_targets(self.base, adapter.modules, untie=True)}
        self.peft = None
        if reference == "peft":
            from ..reference_peft import peft_poly

            self.peft = peft_poly(load_model(base_dir, class_name, device), adapter.directory)

    def run(self, model, capture: dict, **extra) -> tuple[dict, dict]:
        return forward(model, self.family, self.batches, capture, **extra)

    def recipe(self, target: Target):
        """The reference of a merged artifact's recipe (built once per recipe)."""
        from ..reference import ReferenceRecipe

        cache = self.__dict__.setdefault("_recipes", {})
        if target.spec not in cache:
            cache[target.spec] = ReferenceRecipe(target.recipe)
        return cache[target.spec]

    def delta_of(self, target: Target) -> Callable[[str], Any]:
        """module -> the reference's (out, in) float64 update for `target`'s task spec or merge recipe (for a
        task spec, computed a block of rows at a time as it is indexed)."""
        if target.recipe is not None:
            return self.recipe(target).delta
        return lambda module: self.reference.update(module, target.spec)

    def routed(self, target: Target) -> tuple[dict, dict]:
        """The reference's outputs and adapted modules' outputs for `target`'s task spec (or merge recipe)."""
        spec = target.spec
        if target.recipe is not None:
            from ..reference import merged

            with merged(self.model, self.recipe(target)):
                out, modules = self.run(self.model, self.capture)
        elif self.peft is not None:
            from ..reference_peft import routed

            with routed(self.peft, spec) as inner:
                out, modules = self.run(inner, {name: inner.get_submodule(name) for name in self.capture})
        else:
            from ..reference import routed

            with routed(self.model, self.reference, spec):
                out, modules = self.run(self.model, self.capture)
        bad = non_finite({**modules, **out})
        if bad is not None:
            raise PolytoolError(f"the routed model produces NaN or Inf on these inputs (first: {bad}), so no "
                                f"comparison can be made: check the adapter and the base", self.adapter.directory)
        return out, modules

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
        from ..checkpoint import SafetensorsFile

        source = self.targets[name].source
        return SafetensorsFile(self.base.directory / self.base.tensors[source].shard).tensor(source)

    def _artifact_weights(self, path: Path) -> Iterator[tuple[str, Callable[[], Any]]]:
        """A dense artifact's merged weights, each read when its producer is called (a view of the mapped file,
        in its stored dtype)."""
        from ..basemodel import open_base
        from ..checkpoint import SafetensorsFile

        dense = open_base(path)
        for name, target in self.targets.items():
            yield name, (lambda key=target.key: SafetensorsFile(path / dense.tensors[key].shard).tensor(key))

    def _all_tensors(self, path: Path) -> dict | None:
        """{checkpoint key: the model's tensor} for every tensor of the dense artifact at `path`, where each has
        one in the model (same name and shape; tied tensors given one value) and the base checkpoint holds
        it too (to read it back); None where that is not so (then the artifact is loaded whole)."""
        from ..basemodel import open_base
        from ..checkpoint import FLOAT_DTYPES

        dense = open_base(path)
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

        from ..basemodel import open_base
        from ..checkpoint import SafetensorsFile

        def copy_in(directory: Path, tensors: dict, key: str) -> None:
            with torch.no_grad():
                pairs[key].copy_(SafetensorsFile(directory / tensors[key].shard).tensor(key))

        dense, done = open_base(path), []
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
        from ..basemodel import open_base
        from ..checkpoint import SafetensorsFile
        from ..export import saved_module_keys

        dense, heads = open_base(path), {}
        for key, adapter_key in saved_module_keys(self.adapter, self.base).items():
            module = next(m for m, params in self.adapter.saved_modules.items() if adapter_key in params.values())
            param = next(p for p, k in self.adapter.saved_modules[module].items() if k == adapter_key)
            with SafetensorsFile(path / dense.tensors[key].shard) as st:
                heads[f"{module}.{param}"] = st.float_array(key, np.float32)
        return heads

    @contextmanager
    def applied(self, target: Target) -> Iterator[tuple[Any, dict]]:
        """(model, {module name: module to capture}) that computes `target`."""
        converted = target.path is not None and target.dtype != self.base_dtype  # every tensor differs
        pairs = self._all_tensors(target.path) if converted and self.one_copy and not self.offloaded else None
        if target.path is not None and (not self.one_copy or (converted and pairs is None)):
            model = load_model(target.path, self.class_name, self.device, self.max_memory, self.offload_dir)
            yield model, {name: model.get_submodule(name) for name in self.capture}
            return
        with ExitStack() as stack:
            if pairs is not None:  # one model copy: every tensor of the artifact copied in, streamed
                stack.enter_context(self._tensors_in_place(target.path, pairs))
            elif target.path is not None:  # one model copy: the merged weights and heads swapped in, streamed
                stack.enter_context(self.weights_in_place(self._artifact_weights(target.path)))
                stack.enter_context(swap_saved_modules(self.model, self._artifact_heads(target.path)))
            elif target.kind == "dense":
                product = _product_dense(self.adapter, target.spec, self.layers, self.base_weight, self.base_dtype)
                stack.enter_context(self.weights_in_place(self._against_ideal(target, product)))
                stack.enter_context(swap_saved_modules(self.model, _saved(self.adapter)))
            else:
                lora = target.lora if target.lora is not None else _product_lora(self.adapter, target.spec)
                if target.lora is not None and self.peft is not None:  # PEFT's own loader
                    from ..reference_peft import peft_lora

                    model = peft_lora(load_model(self.base_dir, self.class_name, self.device), target.lora.directory)
                    yield model, {name: model.get_submodule(name) for name in self.capture}
                    return
                for handle in attach_lora(self.layers, lora):
                    stack.callback(handle.remove)
                stack.enter_context(swap_saved_modules(self.model, lora.saved))
            yield self.model, self.capture

    def _against_ideal(self, target: Target, weights: Iterator[tuple[str, Callable[[], Any]]]) -> Iterator:
        """`weights` as they are made, each compared with the ideal rounding of the same module (made from the
        same base weight, before it is replaced): `target.ideal` says whether all were equal, so that the
        rounding floor's forward, which would compute with the ideal weights, need not be run again."""
        import torch

        ideal = dict(_ideal_dense(self.delta_of(target), list(self.capture), self.layers, self.base_weight,
                                  target.dtype))
        target.ideal = True
        for name, produce in weights:
            def made(name=name, produce=produce):
                weight = produce()
                target.ideal = bool(target.ideal and torch.equal(weight, ideal[name]()))
                return weight

            yield name, made

    def floor(self, target: Target, live: tuple[dict, dict]) -> tuple[dict, dict]:
        """Errors of the ideal rounding of the dense weights to the target's dtype (outputs, modules)."""
        ideal = _ideal_dense(self.delta_of(target), list(self.capture), self.layers, self.base_weight, target.dtype)
        heads = {} if target.recipe is not None else _saved(self.adapter)
        with self.weights_in_place(ideal), swap_saved_modules(self.model, heads):
            out, modules = self.run(self.model, self.capture)
        return errors(out, live[0]), errors(modules, live[1])


def run_checks(adapter: PolyAdapter, base_dir: Path, class_name: str, family: str, targets: list[Target],
               batches: list, device: str, tolerance: tuple, allow_noop: bool, max_kl: float | None = None,
               reference: str = "polytool", one_copy: bool = True, progress: Callable | None = None,
               max_memory: int | None = None, offload_dir: Path | None = None,
               info: dict | None = None) -> tuple[list[str], list[dict]]:
    """Load the base once; per task spec, compare the reference with the base and with each target.
    `one_copy` False loads dense artifacts whole (the old way; tests compare the two); `progress`:
    (items, total, label) -> items, e.g. a bar on a terminal."""
    # a bar of one step around the load: transformers' own tqdm bar does not show on every terminal
    for _ in progress([None], 1, "loading the base") if progress else [None]:
        run = Run(adapter, base_dir, class_name, family, batches, device, reference, one_copy, max_memory,
                  offload_dir)
    if info is not None:  # what the caller reports beside the checks
        info["offloaded"] = run.offloaded
    base_out, base_modules = run.run(run.model, run.capture)
    bad = non_finite({**base_modules, **base_out})
    if bad is not None:
        raise CheckpointError(f"the model's own outputs contain NaN or Inf on these inputs (first: {bad}): its "
                              "weights are broken (or overflow in float32), so no comparison can be made", base_dir)
    del base_modules  # only the outputs are compared with the base (the adapter's effect)
    checks, live, effect, current = [], None, None, object()
    order = list(dict.fromkeys(t.spec for t in targets))
    ordered = sorted(targets, key=lambda t: order.index(t.spec))  # stable: one reference run per task spec
    for target in progress(ordered, len(ordered), "verifying") if progress else ordered:
        if target.spec != current:
            current = target.spec
            live = run.routed(target)
            effect = errors(live[0], base_out)
        with run.applied(target) as (model, capture):
            out, modules = run.run(model, capture)
        half_dense = target.kind == "dense" and target.dtype in HALF
        defaults = TOLERANCES["float32" if half_dense else target.dtype]
        tol = tuple(defaults[i] if tolerance[i] is None else tolerance[i] for i in (0, 1))
        floor = None
        if half_dense and _ideal_weights(target, run.base_dtype):  # the same model as the ideal rounding's
            floor = errors(out, live[0]), errors(modules, live[1])
        elif half_dense:
            floor = run.floor(target, live)
        checks.append(make_check(target, errors(out, live[0]), errors(modules, live[1]), effect, tol, allow_noop,
                                 top1(out, live[0]), kl(out, live[0]), max_kl, floor, FLOOR_MULTIPLE))
        del out, modules
        release_memory()
    return sorted(base_out), checks


def _ideal_weights(target: Target, base_dtype: str) -> bool:
    """Every element of the artifact equals the ideal rounding (the weight-space check found so, with no trained
    head and no tensor converted; or the self-check's product was): its forward is the rounding floor's,
    which then need not be run again."""
    if target.ideal:  # the self-check's product, compared with the ideal as it was made (Run._against_ideal)
        return True
    w = target.weights
    return bool(w) and w["not_ideal"] == 0 and w["replaced"] == 0 and w["first_bad"] is None \
        and target.dtype == base_dtype


def _dense_weight_checks(targets: list[Target], adapter: PolyAdapter, base_dir: Path,
                         progress: Callable | None = None) -> None:
    """Every dense artifact directory checked in weight space against the reference's update (weights.py)."""
    from ..reference import ReferenceAdapter, ReferenceRecipe
    from .weights import check_dense_weights

    reference = None
    for target in targets:
        if target.path is None:
            continue
        if target.recipe is not None:
            recipe = ReferenceRecipe(target.recipe)
            delta = recipe.delta
        else:
            reference = reference or ReferenceAdapter(adapter.directory)
            delta = (lambda ref, spec: lambda module: ref.update(module, spec))(reference, target.spec)
        target.weights = check_dense_weights(target.path, base_dir, adapter, delta, progress)


def verify(adapter_dir: str | Path, base_dir: str | Path | None, against: tuple = (), task: str | None = None,
           atol: float | None = None, rtol: float | None = None, n_inputs: int = DEFAULT_INPUTS,
           seq_len: int | None = None, prompts: str | Path | None = None, device: str = "cpu",
           allow_noop: bool = False, max_kl: float | None = None, reference: str = "polytool",
           progress: Callable | None = None, max_memory: str | None = None, offload_dir: str | Path | None = None) -> dict:
    """Run every check and return the report (a JSON-ready dict; `passed` says whether all passed)."""
    for name, value in (("--atol", atol), ("--rtol", rtol), ("--max-kl", max_kl)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise PolytoolError(f"{name} {value}: expected a finite number >= 0")
    if reference not in REFERENCES:
        raise PolytoolError(f"--reference {reference!r}: expected one of {', '.join(REFERENCES)}")
    adapter = load_adapter(adapter_dir)
    spec = None if task is None else parse_task_spec(task, adapter.n_tasks)
    base_dir = resolve_base_dir(base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))
    for path in (adapter.weights_file, base_dir):  # torch and transformers open them
        utf8_path(path)
    config = base_config(base_dir)
    class_name, family = model_class(adapter.task_type, config)
    if against:
        targets = [t for path in against for t in artifact_targets(Path(path), adapter, base_dir, spec)]
        _dense_weight_checks(targets, adapter, base_dir, progress)
        release_memory()  # the chunks and updates of the weight check, before the model is loaded
    else:  # self-check: every task (or the one --task names), collapsed in memory by the product code
        base_dtype = stored_dtype(base_dir, config)
        targets = [Target(s, kind, "<in memory>", "float32" if kind == "lora" else base_dtype)
                   for s in (range(adapter.n_tasks) if spec is None else [spec]) for kind in ("lora", "dense")]
    if prompts is not None:
        batches, inputs = prompt_inputs(base_dir, Path(prompts), seq_len)
    else:
        batches, inputs = random_inputs(config, n_inputs, seq_len or DEFAULT_SEQ_LEN)
    device = resolve_device("auto" if max_memory is not None and device == "cpu" else device)
    limit, info = None, {}
    if max_memory is not None:
        from ..merge import parse_size

        limit = parse_size(max_memory)
    outputs, checks = run_checks(adapter, base_dir, class_name, family, targets, batches, device, (atol, rtol),
                                 allow_noop, max_kl, reference, progress=progress, max_memory=limit,
                                 offload_dir=None if offload_dir is None else Path(offload_dir), info=info)
    n_passed = sum(c["passed"] for c in checks)
    tolerances = {d: tuple(TOLERANCES[d][i] if (atol, rtol)[i] is None else (atol, rtol)[i] for i in (0, 1))
                  for d in TOLERANCES}
    return {"passed": n_passed == len(checks), "adapter": str(adapter.directory), "adapter_sha256": adapter.sha256,
            "base": str(base_dir), "model_class": class_name, "family": family, "compute_dtype": "float32",
            "offloaded": info.get("offloaded", False), "max_memory": limit,
            "reference": "PEFT's PeftModel (--reference peft)" if reference == "peft" else
            "polytool.reference (independent float64 routed model)", "device": device, "inputs": inputs,
            "outputs": outputs, "modules": len(adapter.modules), "tolerances": tolerances,
            "floor_dtypes": list(HALF), "floor_multiple": FLOOR_MULTIPLE, "max_kl": max_kl, "checks": checks,
            "summary": {"checks": len(checks), "passed": n_passed, "failed": len(checks) - n_passed}}
