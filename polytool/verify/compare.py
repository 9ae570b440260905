"""Running the models on the same inputs and comparing what they output, NaN-proof.

Per output tensor (logits, hidden states) and per adapted module's output, over every batch, with b
the reference's value and a the artifact's:

    max_abs_err = max |a - b|      scale = max |b|      max_rel_err = max_abs_err / scale

NaN or Inf anywhere in a (any batch, any element) is an infinite error: it never passes. Language
models also get the KL divergence of the artifact's next-token distribution from the reference's,
per position (mean and max), and the share of positions whose argmax agrees.
"""
from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from ..errors import PolytoolError

Errors = dict[str, tuple[float, float]]  # name -> (max |a - b|, max |b|)


def forward(model, family: str, batches: list[dict], capture: dict, **extra) -> tuple[dict, dict]:
    """Every floating output tensor, and the output of each `capture` module ({name: module}), per batch,
    as float32 CPU copies (never views: model code may add to a layer's output in place afterwards):
    ({output name: [tensor, ...]}, {module name: [tensor, ...]})."""
    import torch

    outputs: dict[str, list] = {}
    modules: dict[str, list] = {}

    def recorder(name):
        return lambda _mod, _args, out: modules.setdefault(name, []).append(_copy(out))

    handles = [module.register_forward_hook(recorder(name)) for name, module in capture.items()]
    # with device_map="auto", accelerate moves it on; offloaded weights (meta) say nothing of where inputs go
    device = next((p.device for p in model.parameters() if not p.is_meta), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        with torch.no_grad():
            for batch in batches:  # inputs.py built what this model's forward reads (ids, images, audio)
                kwargs = {key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
                          for key, value in batch.items()}
                if family == "seq2seq" and "decoder_input_ids" not in kwargs:  # the encoder's ids (T5, BART)
                    kwargs["decoder_input_ids"] = kwargs["input_ids"]
                kwargs.update(extra)
                if family != "encoder" and _generates(model):  # heads that do not generate set it themselves
                    kwargs["use_cache"] = False
                try:
                    result = model(**kwargs)
                except Exception as exc:  # noqa: BLE001 - the model's own code refusing these inputs
                    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items())
                    raise PolytoolError(f"{type(model).__name__}'s forward refused verify's inputs ({shapes}): "
                                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} "
                                        "(this model cannot be verified with generated inputs yet)") from None
                for name, value in result.items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        outputs.setdefault(name, []).append(_copy(value))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, modules


@contextmanager
def calls(model, names: list[str]) -> Iterator[set[str]]:
    """The set of `names` (modules of `model`) whose forward ran inside the block."""
    ran: set[str] = set()
    handles = [model.get_submodule(name).register_forward_pre_hook(lambda *_, name=name: ran.add(name))
               for name in names]
    try:
        yield ran
    finally:
        for handle in handles:
            handle.remove()


def _generates(model) -> bool:
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # noqa: BLE001 - a custom model's can_generate
        return False


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread inside the block. For verify's passes over small tensors or cache-sized chunks (the
    comparisons, the weight-space check): a second thread barely helps a pass bound by memory, and where the
    cores are shared (CI runners, a busy box) every op waits for a descheduled thread at its barrier: the
    weight-space check of a 1.08 GB model took 14-28 s of CPU on two threads, 1.6 s on one (performance.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _one_thread(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with one_thread():
            return function(*args, **kwargs)
    return wrapper


def _copy(tensor):
    import torch

    return tensor.detach().to("cpu", torch.float32, copy=True)


def _max_diff(a, b) -> float:
    """max |a - b| of one batch; inf when shapes differ or a holds NaN/Inf anywhere."""
    import torch

    if a.shape != b.shape or not bool(torch.isfinite(a).all()):
        return math.inf
    return float((a - b).abs().max()) if a.numel() else 0.0


@_one_thread
def errors(out: dict[str, list], ref: dict[str, list]) -> Errors:
    """{name: (max |a - b|, max |b|)} over every batch; NaN or Inf in `out` is an infinite error."""
    from ..errors import PolytoolError

    if set(out) != set(ref) or any(len(out[k]) != len(ref[k]) for k in ref):
        raise PolytoolError(f"the models produce different outputs ({sorted(out)} vs {sorted(ref)}): not the same architecture")
    result = {}
    for name, refs in ref.items():
        diffs = [_max_diff(a, b) for a, b in zip(out[name], refs)]
        result[name] = (math.inf if any(math.isnan(d) for d in diffs) else max(diffs, default=0.0),
                        max((float(b.abs().max()) for b in refs if b.numel()), default=0.0))
    return result


@_one_thread
def non_finite(outputs: dict[str, list]) -> str | None:
    """The first output holding NaN or Inf in any batch, or None."""
    import torch

    return next((name for name, values in outputs.items() if not all(bool(torch.isfinite(t).all()) for t in values)),
                None)


def within(errs: Errors, atol: float, rtol: float, floor: Errors | None = None, multiple: float = 0.0) -> list[str]:
    """Names whose error exceeds atol + rtol * scale and, with a floor, also `multiple` x the floor's error."""
    bad = []
    for name, (diff, scale) in errs.items():
        allowed = atol + rtol * scale
        if floor is not None and name in floor and math.isfinite(floor[name][0]):  # a broken floor allows nothing
            allowed = max(allowed, multiple * floor[name][0])
        if not diff <= allowed:  # NaN-proof: a NaN compares False
            bad.append(name)
    return bad


def rel(diff: float, scale: float) -> float:
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


@_one_thread
def top1(out: dict[str, list], ref: dict[str, list]) -> float | None:
    """Fraction of positions whose argmax over the logits agrees (None without logits)."""
    import torch

    if "logits" not in ref:
        return None
    same = [(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(out["logits"], ref["logits"])]
    return float(torch.cat(same).float().mean())


@_one_thread
def kl(out: dict[str, list], ref: dict[str, list]) -> tuple[float, float] | None:
    """(mean, max) over positions of KL(reference || artifact) of the softmax of the logits, in nats."""
    import torch

    if "logits" not in ref:
        return None
    per_position = []
    for a, b in zip(out["logits"], ref["logits"]):
        a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])  # (positions, vocab)
        for lo in range(0, b.shape[0], 8):  # a few positions at a time: float64 copies of all logits are large
            log_p, log_q = b[lo:lo + 8].double().log_softmax(-1), a[lo:lo + 8].double().log_softmax(-1)
            per_position.append((log_p.exp() * (log_p - log_q)).sum(-1))
    values = torch.cat(per_position)
    if not bool(torch.isfinite(values).all()):
        return math.inf, math.inf
    return float(values.mean()), float(values.max())


def number(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


@dataclass(frozen=True)
class Measured:
    """What one comparison measured: errors of the outputs (`final`) and of each adapted module (`modules`, in
    execution order), the adapter's effect on the base, top-1 agreement, KL (mean, max), and for half-precision
    dense artifacts the errors of the ideal rounding of the same weights (`floor`: outputs, modules)."""

    final: Errors
    modules: Errors
    effect: Errors
    agree: float | None = None
    divergence: tuple[float, float] | None = None
    floor: tuple[Errors, Errors] | None = None


@dataclass(frozen=True)
class Rule:
    """How a comparison is judged: (atol, rtol), whether a no-op passes, --max-kl, and the multiple of the
    rounding floor a half-precision dense artifact may reach."""

    tolerance: tuple[float, float]
    allow_noop: bool = False
    max_kl: float | None = None
    multiple: float = 0.0


def _weights_reason(weights: dict, dtype: str) -> str:
    u = weights["first_bad_ulps"]
    detail = f"{u:.3g} units in the last place; 1 allowed" if u is not None else "NaN/Inf, or not the base's bytes"
    return (f"weight {weights['first_bad']} is not what it should be (the base's, plus the routed update "
            f"where merged, rounded once to {dtype}): {detail}")


def _rank_reason(truncation: dict) -> str:
    row = next(r for r in truncation["modules"] if r["module"] == truncation["first_bad"])
    return (f"module {row['module']}: rank {row['rank']} truncation error {row['error']:.3e} exceeds the best any "
            f"rank-{row['rank']} LoRA can do, {row['optimum']:.3e}, by more than rounding ({row['slack']:.1e}), "
            f"or its rank or retained energy {row['energy']:.4f} is not what the recipe asked")


def _small_outputs(effect: Errors, atol: float, rtol: float) -> str:
    """Why a visible effect counts as none: the outputs are so small that atol alone covers it."""
    name, (diff, scale) = max(effect.items(), key=lambda item: rel(*item[1]))
    if not rel(diff, scale) > 2 * rtol or not math.isfinite(diff):
        return ""
    return (f" ({name} is small, max |b| {scale:.2e}: the adapter moves it by {diff:.2e}, {rel(diff, scale):.1e} of "
            f"that, under atol {atol:g}; a smaller --atol, 0 for max |b| alone, judges it relative to its scale)")


def make_check(target: Any, m: Measured, rule: Rule) -> dict:
    """One line of the report. A task whose live output equals the base's proves nothing (a no-op); the first
    module out of tolerance is where the error starts; a half-precision dense artifact passes where it stays
    within `rule.multiple` times the errors of the ideal rounding of its weights."""
    final, modules, effect, agree, divergence, floor = m.final, m.modules, m.effect, m.agree, m.divergence, m.floor
    (atol, rtol), allow_noop, max_kl, multiple = rule.tolerance, rule.allow_noop, rule.max_kl, rule.multiple
    floor_final, floor_modules = floor if floor is not None else (None, None)
    bad = within(modules, atol, rtol, floor_modules, multiple)
    final_bad = within(final, atol, rtol, floor_final, multiple)
    noop = not within(effect, atol, rtol)
    kl_bad = max_kl is not None and divergence is not None and not divergence[1] <= max_kl
    notes = list(target.notes)
    weights = getattr(target, "weights", None)
    weights_bad = bool(weights and weights.get("first_bad"))
    truncation = getattr(target, "truncation", None)
    rank_bad = bool(truncation and truncation.get("first_bad"))
    floor_err = None
    if floor_final is not None:
        floor_err = max(rel(*e) for e in floor_final.values())
        effect_rel = max(rel(*e) for e in effect.values())
        if effect_rel > 0 and floor_err > 0.1 * effect_rel:
            notes.append(f"rounding to {target.dtype} alone moves the output by {floor_err:.2e} (relative), "
                         f"{100 * floor_err / effect_rel:.0f}% of the adapter's effect {effect_rel:.2e}: consider "
                         "--dtype float32 or serving the LoRA")
    problem = getattr(target, "problem", None)
    if problem:
        reason = problem
    elif weights_bad:
        reason = _weights_reason(weights, target.dtype)
    elif rank_bad:
        reason = _rank_reason(truncation)
    elif bad:
        worst = rel(*modules[bad[0]])
        shown = "NaN or Inf" if math.isinf(worst) else f"max_rel_err {worst:.2e}"
        reason = f"module {bad[0]} is the first to differ beyond tolerance ({shown})"
    elif final_bad:
        reason = "outputs differ beyond tolerance" + (" (NaN or Inf)" if any(
            math.isinf(final[n][0]) for n in final_bad) else "")
    elif kl_bad:
        reason = f"KL divergence {divergence[1]:.2e} exceeds --max-kl {max_kl:g}"
    elif noop:
        reason = ("no-op: the adapter does not change the base's output for this task, so the check proves "
                  "nothing" + _small_outputs(effect, atol, rtol)
                  + (" (accepted: --allow-noop)" if allow_noop else "; pass --allow-noop to accept"))
    else:
        reason = None
    task = target.spec if isinstance(target.spec, int) else str(target.spec)  # a mix as its canonical text
    return {"task": task, "artifact": target.label, "kind": target.kind, "dtype": target.dtype,
            "max_abs_err": number(max(d for d, _ in final.values())),
            "max_rel_err": number(max(rel(d, s) for d, s in final.values())), "top1_agreement": agree,
            "kl_mean": None if divergence is None else number(divergence[0]),
            "kl_max": None if divergence is None else number(divergence[1]),
            "module_max_rel_err": number(max((rel(*e) for e in modules.values()), default=0.0)),
            "first_failing_module": bad[0] if bad else None,
            "adapter_effect": number(max(d for d, _ in effect.values())),
            "adapter_effect_rel": number(max(rel(*e) for e in effect.values())),
            "rounding_floor_rel": floor_err, "floor_multiple": multiple if floor is not None else None,
            "noop": noop, "atol": atol, "rtol": rtol,
            "passed": not problem and not weights_bad and not rank_bad and not bad and not final_bad and not kl_bad
            and (allow_noop or not noop),
            "reason": reason, "weights": weights, "truncation": truncation, "proof": getattr(target, "proof", None),
            "notes": notes}
