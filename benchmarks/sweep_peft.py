"""The sweep's adapter, written by PEFT: targets chosen as PEFT would, Poly tensors randomised (train-free).

    wrap(model, model_type, task_type, inputs) -> (PeftModel, info)   raises Outcome("peft-cannot-wrap", ...)
"""
from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

from sweep_family import HEADS, Outcome, one_line

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from matrix import randomize  # noqa: E402 (tests/matrix.py: the adapter values every test uses)

R, N_TASKS, N_SKILLS, N_SPLITS = 2, 3, 2, 2


def targets(model_type: str, model, inputs: dict) -> tuple[object, list[str] | None, str]:
    """(target_modules, exclude_modules, how): PEFT's default for the model_type, else all-linear less the
    Linears whose input is not 3-D in a forward (PEFT's Poly layer multiplies with bmm) or whose forward never
    runs while their parent's does (the parent reads the weight itself: nn.MultiheadAttention's out_proj)."""
    import torch
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_POLY_TARGET_MODULES_MAPPING as DEFAULTS

    if model_type in DEFAULTS:
        return DEFAULTS[model_type], None, "PEFT's default"
    seen: dict[str, int] = {}  # Linear -> the dims of its input
    ran: set[str] = set()  # every module whose forward ran

    def record(name: str, module, args: tuple, kwargs: dict) -> None:
        ran.add(name)
        if not isinstance(module, torch.nn.Linear):
            return
        x = args[0] if args else next(iter(kwargs.values()))
        if seen.get(name, 3) == 3:  # any call without a 3-D input excludes the module
            seen[name] = x.dim()

    hooks = [m.register_forward_pre_hook(lambda m, args, kwargs, name=name: record(name, m, args, kwargs),
                                         with_kwargs=True) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    heads = {name for name in seen if any(part.endswith(HEADS) for part in name.split("."))}
    # a Linear bypassed by its parent gets a Poly layer PEFT never applies: trained, its B stays zero;
    # randomised, an update no PEFT model applies (a dense merge would). Linears of parts these inputs do not
    # reach (an audio tower under text) stay targets: PEFT applies them where those parts run.
    bypassed = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name not in ran
                and name.rpartition(".")[0] in ran}
    exclude = sorted(heads | bypassed | {name for name, dim in seen.items() if dim != 3})
    if seen and set(seen) <= set(exclude):
        raise Outcome("peft-cannot-wrap", f"no Linear but the task head sees a 3-D input (PEFT's Poly layer "
                      f"multiplies with bmm): inputs {sorted(set(seen.values()))}-D")
    why = "heads, non-3-D" + (", bypassed" if bypassed else "")
    return "all-linear", exclude or None, "all-linear" + (f" less {len(exclude)} ({why})" if exclude else "")


def _splits_divide(model, n_splits: int) -> bool:
    return all(m.in_features % n_splits == 0 and m.out_features % n_splits == 0
               for m in model.modules() if hasattr(m, "poly_lora_A") and hasattr(m, "in_features"))


def wrap(model, model_type: str, task_type: str | None, inputs: dict):
    """PEFT's Poly model of `model` (which it modifies), randomised; n_splits 2 where every target divides."""
    from peft import PolyConfig, get_peft_model

    try:
        target_modules, exclude, how = targets(model_type, model, inputs)
    except Outcome:
        raise
    except Exception as exc:
        raise Outcome("skipped", f"cannot trace the Linears' inputs: {one_line(exc)}") from None
    spare = copy.deepcopy(model)  # for n_splits 1 when a target does not divide by 2
    peft_model = None
    for n_splits in (N_SPLITS, 1):
        config = PolyConfig(task_type=task_type, r=R, n_tasks=N_TASKS, n_skills=N_SKILLS, n_splits=n_splits,
                            target_modules=target_modules, exclude_modules=exclude)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = get_peft_model(model if n_splits == N_SPLITS else spare, config).eval()
        except Exception as exc:
            raise Outcome("peft-cannot-wrap", f"get_peft_model: {one_line(exc)}") from None
        if _splits_divide(peft_model, n_splits):
            break
    randomize(peft_model)
    n_targets = sum(1 for m in peft_model.modules() if hasattr(m, "poly_lora_A") and hasattr(m, "in_features"))
    return peft_model, {"targets": how if isinstance(target_modules, str) else ",".join(sorted(target_modules)),
                        "n_targets": n_targets, "n_splits": n_splits}
