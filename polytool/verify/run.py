"""One verify run: the base model loaded once, its adapted layers, the reference, the inputs, and what each
target's forward runs with (`Run.applied`)."""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import CheckpointError, PolytoolError
from ..formats.adapter import PolyAdapter
from .artifacts import Target
from .compare import errors, forward, non_finite
from .lora_apply import attach_lora, swap_saved_modules
from .options import VerifyOptions
from .models import fit_vocabulary, linear_layers, load_model, stored_dtype
from .names import checkpoint_name
from .product import _product_dense, _product_lora, _saved
from .swap import ModelWeights, _ideal_dense, _is_conv1d


class Run(ModelWeights):
    """One verify run: the base model (loaded once), its adapted layers, the reference, the inputs."""

    def __init__(self, adapter: PolyAdapter, base_dir: Path, model: tuple[str, str], batches: list,
                 options: VerifyOptions):
        from .reference import ReferenceAdapter

        (class_name, self.family), reference = model, options.reference
        self.adapter, self.base_dir, self.class_name, self.batches = adapter, base_dir, class_name, batches
        self.device, self.reference_kind, self.one_copy = options.device, reference, options.one_copy
        self.max_memory, self.offload_dir = options.max_memory, options.offload_dir
        device, max_memory, offload_dir = self.device, self.max_memory, self.offload_dir
        self.reference = ReferenceAdapter(adapter.directory)
        self.model = load_model(base_dir, class_name, device, max_memory, offload_dir)
        fit_vocabulary(self.model, self.reference)
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
        from ..formats.base import match_targets, open_base

        self.base = open_base(base_dir, checkpoint_name)
        self.targets = {t.module: t for t in match_targets(self.base, adapter.modules, untie=True)}
        self.peft = None
        if reference == "peft":
            from .reference_peft import peft_poly

            copy = load_model(base_dir, class_name, device)
            fit_vocabulary(copy, self.reference)
            self.peft = peft_poly(copy, adapter.directory)

    def run(self, model, capture: dict, **extra) -> tuple[dict, dict]:
        return forward(model, self.family, self.batches, capture, **extra)

    def recipe(self, target: Target):
        """The reference of a merged artifact's recipe (built once per recipe): its exact update, or for a
        truncated merge the best rank-k approximation of it at the artifact's ranks (truncation.py)."""
        from .reference_merge import ReferenceRecipe
        from .truncation import Adopted, BestRank

        cache = self.__dict__.setdefault("_recipes", {})
        if target.spec not in cache:
            recipe = target.reference or ReferenceRecipe(target.recipe)
            if target.truncation is not None:  # degenerate or ambiguous modules: the artifact's own (proven) factors
                rows = target.truncation["modules"]
                own = {r["module"]: _scaled(target.lora, r["module"]) for r in rows if r["degenerate"] or r["ambiguous"]}
                recipe = BestRank(recipe, {r["module"]: r["rank"] for r in rows}, own)
            elif target.path is not None and (target.weights or {}).get("ambiguous"):
                recipe = Adopted(recipe, {m: self._artifact_delta(target.path, m) for m in recipe.modules
                                          if recipe.ambiguous(m)})
            cache[target.spec] = recipe
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
            from .reference_merge import merged

            with merged(self.model, self.recipe(target)):
                out, modules = self.run(self.model, self.capture)
        elif self.peft is not None:
            from .reference_peft import routed

            with routed(self.peft, spec) as inner:
                out, modules = self.run(inner, {name: inner.get_submodule(name) for name in self.capture})
        else:
            from .reference import routed

            with routed(self.model, self.reference, spec):
                out, modules = self.run(self.model, self.capture)
        bad = non_finite({**modules, **out})
        if bad is not None:
            raise PolytoolError(f"the routed model produces NaN or Inf on these inputs (first: {bad}), so no "
                                f"comparison can be made: check the adapter and the base", self.adapter.directory)
        return out, modules

    @contextmanager
    def applied(self, target: Target) -> Iterator[tuple[Any, dict]]:
        """(model, {module name: module to capture}) that computes `target`."""
        converted = target.path is not None and target.dtype != self.base_dtype  # every tensor differs
        pairs = self._all_tensors(target.path) if converted and self.one_copy and not self.offloaded else None
        if target.path is not None and (not self.one_copy or target.whole or (converted and pairs is None)):
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
                    from .reference_peft import peft_lora

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

    def _artifact_delta(self, path: Path, module: str):
        """(out, in) float64: a dense artifact's merged weight of `module` less the base's."""
        weight = dict(self._artifact_weights(path))[module]().double()  # the stored layout
        delta = weight - self._checkpoint_weight(module).double()
        return delta.T if _is_conv1d(self.layers[module]) else delta

    def lora_floor(self, target: Target, live: tuple[dict, dict]) -> tuple[dict, dict]:
        """Errors of the ideal truncated LoRA in the target's half dtype: the reference's best rank-k factors
        (truncation.BestRank), rounded once to that dtype, applied as the artifact is (outputs, modules)."""
        import torch

        best, dtype = self.recipe(target), getattr(torch, target.dtype)
        factors = {}
        for module in best.modules:
            B, A = best.factors(module)  # (out, k), (k, in) float64
            factors[module] = (A.to(dtype).double().numpy(), B.to(dtype).double().numpy())  # rounded once
        handles = attach_lora(self.layers, factors, 1.0)
        try:
            out, modules = self.run(self.model, self.capture)
        finally:
            for handle in handles:
                handle.remove()
        return errors(out, live[0]), errors(modules, live[1])

    def floor(self, target: Target, live: tuple[dict, dict]) -> tuple[dict, dict]:
        """Errors of the ideal rounding of the dense weights to the target's dtype (outputs, modules)."""
        ideal = _ideal_dense(self.delta_of(target), list(self.capture), self.layers, self.base_weight, target.dtype)
        heads = {} if target.recipe is not None else _saved(self.adapter)
        with self.weights_in_place(ideal), swap_saved_modules(self.model, heads):
            out, modules = self.run(self.model, self.capture)
        return errors(out, live[0]), errors(modules, live[1])


def _scaled(lora: Any, module: str) -> tuple:
    """A LoRA artifact's factors of `module` as float64 tensors B * scaling (out, k), A (k, in)."""
    import torch

    A, B = lora.weights[module]
    return torch.from_numpy(B).double() * lora.scalings[module], torch.from_numpy(A).double()
