"""`verify --reference peft`: PEFT's own Poly model is the reference, and PEFT's own loader applies LoRA
artifacts. PEFT is imported only here, and only when asked for."""
from __future__ import annotations

from typing import Any

from ..errors import PolytoolError


def _peft():
    try:
        import peft
    except ImportError:
        raise PolytoolError("--reference peft needs PEFT, which is not installed: pip install peft") from None
    return peft


def peft_routed_model(adapter, base_dir, class_name: str, device: str):
    """PeftModel.from_pretrained(the base loaded with the adapter's class, the adapter), in eval mode."""
    import warnings

    from .models import load_model

    peft = _peft()
    model = load_model(base_dir, class_name, device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.PeftModel.from_pretrained(model, str(adapter.directory)).eval()
    except (TypeError, ValueError) as exc:  # e.g. GPT-2's Conv1D targets: PEFT's Poly takes only nn.Linear
        raise PolytoolError(f"PEFT cannot build this adapter's model ({type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0]}): use the default --reference polytool") from None


def peft_forward(run: Any, spec) -> tuple[dict, dict]:
    """PEFT's routed outputs for `spec` (uniform / mean: every router's logits rewritten for the call)."""
    import torch

    from .compare import forward

    model = run.peft
    capture = {name: model.get_submodule("base_model.model." + name) for name in run.capture}
    routers = [p for n, p in model.named_parameters() if n.endswith("module_logits")]
    saved = [p.detach().clone() for p in routers]
    task = spec if isinstance(spec, int) else 0
    try:
        if not isinstance(spec, int):
            with torch.no_grad():
                for p in routers:
                    p.copy_(_spec_logits(p, spec, run.adapter.n_splits, run.adapter.n_skills))
        n = run.batches[0]["input_ids"].shape[0]
        out = forward(model, run.family, run.batches, capture, task_ids=torch.full((n,), task))
    finally:
        with torch.no_grad():
            for p, old in zip(routers, saved):
                p.copy_(old)
    return out


def _spec_logits(logits, spec: str, n_splits: int, n_skills: int):
    """(t, q*s) logits whose eval weights are the spec's for every task: uniform 0; mean logit(mean w / 2)."""
    import torch

    if spec == "uniform":
        return torch.zeros_like(logits)
    w = torch.sigmoid(logits.double()).view(-1, n_splits, n_skills)
    w = w / (w.sum(-1, keepdim=True) + 1e-12)  # (t, q, s)
    return torch.logit(w.mean(0) / 2).flatten().expand_as(logits).to(logits.dtype)  # normalising undoes / 2


def peft_lora_model(run: Any, lora) -> Any:
    """The LoRA directory loaded by PEFT's PeftModel.from_pretrained onto a fresh copy of the base."""
    import warnings

    from .models import load_model

    peft = _peft()
    model = load_model(run.base_dir, run.class_name, run.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(model, str(lora.directory)).eval()
