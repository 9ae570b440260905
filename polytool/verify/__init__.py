"""verify: collapsed artifacts against the routed model, computed independently.

One copy of the base, loaded in float32 with the class the adapter was trained for (task_type), serves
every model of the run. For each task spec the same inputs go through:

    reference  the routed Poly/MHR model of polytool/verify/reference.py (a second implementation, float64
               mixing, no code shared with what wrote the artifact), or PEFT's with --reference peft
    base       the bare base: if the reference equals it, the check proves nothing (a no-op)
    artifact   a LoRA applied as PEFT applies it (verify/lora_apply.py), a dense model directory, or, for
               the self-check, the product path's collapse put in memory (LoRA hooks, merged weights)

Compared: every floating output tensor and every adapted module's output, NaN-proof (compare.py); for
dense artifacts also every tensor in weight space (weights.py); for half-precision dense artifacts the
forward is judged against the error of the ideal rounding of the same weights, measured in the same run.
"""
from __future__ import annotations

import math
import dataclasses
from pathlib import Path
from typing import Callable

from ..core.units import parse_size
from ..errors import CheckpointError, PolytoolError
from ..extras import collector_paused
from ..formats.adapter import PolyAdapter, load_adapter
from ..formats.base import resolve_base_dir
from .artifacts import Target, artifact_targets, spec_under_test
from .compare import Measured, Rule, calls, errors, kl, make_check, non_finite, one_thread, top1
from .forked import Forked
from .inputs import DEFAULT_INPUTS, DEFAULT_SEQ_LEN, prompt_inputs, random_inputs  # noqa: F401 (the defaults: part of the API)
from .models import base_config, model_class, release_memory, resolve_device, stored_dtype, utf8_path
from .options import VerifyOptions
from .report import render_report
from .run import Run

__all__ = ["verify", "VerifyOptions", "render_report", "run_checks", "Target", "TOLERANCES", "FLOOR_MULTIPLE"]

# stored dtype -> (atol, rtol) against the float64 reference; docs/ci.md records the measurements. Dense
# artifacts in half precision are judged against their own rounding floor (FLOOR_MULTIPLE) instead of the
# half-precision row, which applies to half-precision LoRA factors.
TOLERANCES = {"float64": (1e-5, 1e-5), "float32": (1e-5, 1e-5), "bfloat16": (1e-4, 1e-2), "float16": (1e-5, 3e-3)}
HALF = ("bfloat16", "float16")
FLOOR_MULTIPLE = 2.0
REFERENCES = ("polytool", "peft")
SELF_CHECK_COVERS = ("the self-check runs the product's routing and collapse formula in memory; the file writers "
                     "(safetensors, the streaming dense merge, dtype casts, provenance) run only for written "
                     "artifacts: collapse, then verify those with --against")


def run_checks(adapter: PolyAdapter, base_dir: Path, model: tuple[str, str], targets: list[Target], batches: list,
               options: VerifyOptions = VerifyOptions(), progress: Callable | None = None,
               info: dict | None = None) -> tuple[list[str], list[dict]]:
    """Load the base once (`model`: its transformers class and family); per task spec, compare the reference
    with the base and with each target. `progress`: (items, total, label) -> items, e.g. a bar on a terminal."""
    # a bar of one step around the load: transformers' own tqdm bar does not show on every terminal
    for _ in progress([None], 1, "loading the base") if progress else [None]:
        run = Run(adapter, base_dir, model, batches, options)
    if info is not None:  # what the caller reports beside the checks
        info["offloaded"] = run.offloaded
    parents = sorted({name.rpartition(".")[0] for name in run.capture})
    with calls(run.model, sorted(run.capture) + parents) as ran:
        base_out, base_modules = run.run(run.model, run.capture)
    bypassed = [name for name in run.capture if name not in ran and name.rpartition(".")[0] in ran]
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
        tol = tuple(defaults[i] if options.tolerance[i] is None else options.tolerance[i] for i in (0, 1))
        floor = None
        if half_dense and _ideal_weights(target, run.base_dtype):  # the same model as the ideal rounding's
            floor = errors(out, live[0]), errors(modules, live[1])
        elif half_dense:
            floor = run.floor(target, live)
        elif target.truncation is not None and target.dtype in HALF:  # judged against its own ideal rounding
            floor = run.lora_floor(target, live)
        measured = Measured(errors(out, live[0]), errors(modules, live[1]), effect, top1(out, live[0]),
                            kl(out, live[0]), floor)
        checks.append(make_check(target, measured, Rule(tol, options.allow_noop, options.max_kl, FLOOR_MULTIPLE)))
        if target.kind == "dense" and bypassed:
            checks[-1]["notes"].append(_bypassed_note(bypassed))
        del out, modules
        release_memory()
    return sorted(base_out), checks


def _bypassed_note(bypassed: list[str]) -> str:
    """Adapted modules whose forward never runs while their parent's does: the parent reads the weight itself
    (nn.MultiheadAttention's out_proj), so the routed model, like PEFT's, never applies their update, while a
    dense merge does (where it is not zero, the outputs differ downstream of them)."""
    return (f"{len(bypassed)} adapted module(s) are bypassed by their parent, which reads the weight itself (first: "
            f"{bypassed[0]}; nn.MultiheadAttention does so with out_proj): the routed model, like PEFT's, never "
            "applies their update, a dense merge does; trained by PEFT, their B stays at its initial zeros")


def _ideal_weights(target: Target, base_dtype: str) -> bool:
    """Every element of the artifact equals the ideal rounding (the weight-space check found so, with no trained
    head, every converted tensor the base's rounded once; or the self-check's product was): it is the ideal
    artifact, so its forward is the rounding floor's, which then need not be run again."""
    if target.ideal:  # the self-check's product, compared with the ideal as it was made (Run._against_ideal)
        return True
    w = target.weights
    return bool(w) and w["not_ideal"] == 0 and w["replaced"] == 0 and w["first_bad"] is None \
        and (target.dtype == base_dtype or not target.whole)


def _dense_weight_checks(targets: list[Target], adapter: PolyAdapter, base_dir: Path) -> None:
    """Every dense artifact directory checked in weight space against the reference's update (weights.py); every
    truncated merge LoRA against the optimum for its ranks (truncation.py)."""
    from .reference import ReferenceAdapter
    from .reference_merge import ReferenceRecipe
    from .truncation import check_truncation
    from .weights import check_dense_weights

    reference, recipes = None, {}
    for target in targets:
        if target.recipe is not None and target.spec not in recipes:
            recipes[target.spec] = ReferenceRecipe(target.recipe)
        if target.recipe is not None:
            target.reference = recipes[target.spec]
        if target.lora is not None and target.recipe is not None and _truncated(target.recipe):
            target.truncation = check_truncation(target.lora, recipes[target.spec], target.dtype)
        if target.path is None:
            continue
        if target.recipe is not None:
            recipe = recipes[target.spec]
            target.weights = check_dense_weights(target.path, base_dir, adapter, recipe.delta,
                                                 allowance=recipe.allowance)
            target.weights["ambiguous"] = sum(recipe.ambiguous(m) for m in recipe.modules)
        else:
            reference = reference or ReferenceAdapter(adapter.directory)
            delta = (lambda ref, spec: lambda module: ref.update(module, spec))(reference, target.spec)
            target.weights = check_dense_weights(target.path, base_dir, adapter, delta)


def _truncated(recipe: dict) -> bool:
    return recipe.get("rank") is not None or recipe.get("energy") is not None


def _check_options(o: VerifyOptions) -> None:
    for name, value in (("--atol", o.atol), ("--rtol", o.rtol), ("--max-kl", o.max_kl)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise PolytoolError(f"{name} {value}: expected a finite number >= 0")
    if o.reference not in REFERENCES:
        raise PolytoolError(f"--reference {o.reference!r}: expected one of {', '.join(REFERENCES)}")


def _weight_checks(targets: list[Target], adapter: PolyAdapter, base_dir: Path) -> list[tuple]:
    """_dense_weight_checks on one thread (passes over cache-sized chunks: compare.one_thread); what it found per
    target, (weights, truncation), returned to the process that asked (where it runs in a forked child:
    forked.py)."""
    with one_thread():
        _dense_weight_checks(targets, adapter, base_dir)
    return [(t.weights, t.truncation) for t in targets]


def _self_check_targets(o: VerifyOptions, adapter: PolyAdapter, base_dir: Path, config) -> list[Target]:
    """For the self-check: every task (or the one --task names), collapsed in memory by the product code."""
    base_dtype = stored_dtype(base_dir, config)
    spec = None if o.task is None else spec_under_test(o.task, adapter.n_tasks)
    return [Target(s, kind, "<in memory>", "float32" if kind == "lora" else base_dtype)
            for s in (range(adapter.n_tasks) if spec is None else [spec]) for kind in ("lora", "dense")]


def _resized_vocabulary(config, adapter_dir: Path):
    """The config random token ids are drawn by: the base's, except where the adapter carries a whole input
    embedding with more rows than the base's vocab_size (a resized vocabulary; verify resizes its base to it),
    then a copy saying that row count, so that the forwards read the new tokens' rows too (verify's own
    reading of the adapter's file header, as fit_vocabulary's)."""
    import copy

    from ..architectures import INPUT_EMBEDDING_NAMES
    from .reference import ReferenceAdapter

    text = config.get_text_config()
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int):
        return config
    reference = ReferenceAdapter(adapter_dir)
    shapes = [reference.whole_shape(name) for name in reference.whole
              if name.endswith(".weight") and name[:-len(".weight")].rpartition(".")[2] in INPUT_EMBEDDING_NAMES]
    rows = max([shape[0] for shape in shapes if shape is not None and len(shape) == 2], default=0)
    if rows <= vocab:
        return config
    config = copy.deepcopy(config)
    config.get_text_config().vocab_size = rows
    return config


def verify(o: VerifyOptions, progress: Callable | None = None) -> dict:
    """Run every check and return the report (a JSON-ready dict; `passed` says whether all passed)."""
    _check_options(o)
    adapter = load_adapter(o.adapter_dir)
    base_dir = resolve_base_dir(o.base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))
    for path in (adapter.weights_file, base_dir):  # torch and transformers open them
        utf8_path(path)
    # what to compare: each artifact of --against, checked in weight space first (where dense) in a child
    # process while this one imports transformers and reads the config (forked.py), or the self-check's
    targets = [t for path in o.against for t in artifact_targets(Path(path), adapter, base_dir, o.task)]
    work = any(t.path is not None or (t.lora is not None and t.recipe is not None and _truncated(t.recipe))
               for t in targets)
    # a merge recipe's reference, built by the check, also serves the forwards: built here, once
    checking = Forked(_weight_checks, targets, adapter, base_dir, child=all(t.recipe is None for t in targets)) \
        if work else None
    try:
        with collector_paused():  # transformers and the model's module are imported here
            config = base_config(base_dir)
            class_name, family = model_class(adapter.task_type, config)
        if checking is not None:
            for _ in progress([None], 1, "checking weights") if progress else [None]:
                for target, (weights, truncation) in zip(targets, checking.result()):
                    target.weights, target.truncation = weights, truncation
            release_memory()  # (where it ran here) the chunks and updates of the check, before the model loads
    finally:
        if checking is not None:
            checking.cancel()  # a run that failed before asking: the child ends now
    targets = targets or _self_check_targets(o, adapter, base_dir, config)
    if o.prompts is not None:
        batches, inputs = prompt_inputs(base_dir, Path(o.prompts), o.seq_len, class_name, config)
    else:
        sized = _resized_vocabulary(config, adapter.directory)
        batches, inputs = random_inputs(sized, o.n_inputs, o.seq_len or DEFAULT_SEQ_LEN, class_name)
    device = resolve_device("auto" if o.max_memory is not None and o.device == "cpu" else o.device)
    limit = None if o.max_memory is None else parse_size(o.max_memory)
    o = dataclasses.replace(o, device=device, max_memory=limit)
    info: dict = {}
    outputs, checks = run_checks(adapter, base_dir, (class_name, family), targets, batches, o, progress, info)
    return _report(o, adapter, base_dir, (class_name, family), inputs, outputs, checks, info)


def _report(o: VerifyOptions, adapter: PolyAdapter, base_dir: Path, model: tuple[str, str], inputs: dict,
            outputs: list[str], checks: list[dict], info: dict) -> dict:
    n_passed = sum(c["passed"] for c in checks)
    tolerances = {d: tuple(TOLERANCES[d][i] if o.tolerance[i] is None else o.tolerance[i] for i in (0, 1))
                  for d in TOLERANCES}
    return {"passed": n_passed == len(checks), "adapter": str(adapter.directory), "adapter_sha256": adapter.sha256,
            "base": str(base_dir), "model_class": model[0], "family": model[1], "compute_dtype": "float32",
            "offloaded": info.get("offloaded", False), "max_memory": o.max_memory,
            "reference": "PEFT's PeftModel (--reference peft)" if o.reference == "peft" else
            "polytool.verify.reference (independent float64 routed model)", "device": o.device, "inputs": inputs,
            "outputs": outputs, "modules": len(adapter.modules), "tolerances": tolerances,
            "floor_dtypes": list(HALF), "floor_multiple": FLOOR_MULTIPLE, "max_kl": o.max_kl, "checks": checks,
            "covers": None if o.against else SELF_CHECK_COVERS,
            "summary": {"checks": len(checks), "passed": n_passed, "failed": len(checks) - n_passed}}
