"""One family of the sweep: a tiny random model, a PEFT Poly adapter on it, polytool's commands, and the check.

    run_family(mapping, model_type, workdir) -> dict   (status: pass, peft-cannot-wrap, skipped, polytool-fails)

Steps: the family's config made small (sweep_config.py), the mapping's class built with seeded random weights
and saved (safetensors) as the base; PEFT's PolyConfig (the mapping's task type, n_tasks 3, n_skills 2,
n_splits 2 where every target's dims divide, else 1, r 2) on PEFT's default targets for the model_type, else
all-linear less the Linears that see no 3-D input (PEFT's Poly multiplies with bmm); the Poly tensors
randomised (B is zero at init; the router logits too, so tasks differ) and saved. Then polytool's CLI
(inspect, collapse --task 1 --to lora, --to dense, verify --against both; run in this process through Click,
exit codes and tracebacks as a shell would see them), and an independent check: the dense model loaded by
transformers and the LoRA by PEFT against PEFT's routed model for task 1 (rel <= 1e-5), task 2 differing.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path

MAPPINGS = {  # the sweep's name -> (transformers.models.auto.modeling_auto table, PEFT task_type)
    "causal-lm": ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM"),
    "seq2seq-lm": ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "SEQ_2_SEQ_LM"),
    "seq-cls": ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS"),
    "token-cls": ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS"),
    "qa": ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS"),
    "feature": ("MODEL_MAPPING_NAMES", "FEATURE_EXTRACTION"),
    "image-cls": ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", None),  # PEFT has no task type for it
}
BOUND, DIFFERS = 1e-5, 1e-4  # task 1's artifacts vs routed; task 2 (and the bare base) must differ by more
MAX_PARAMS = 20_000_000  # a "tiny" model larger than this was not made small
BATCH, SEQ = 2, 8
CALIBRATION = 16  # samples BatchNorm's running statistics are taken from
LAYERS = (2, 8)  # layers of the tiny model; the second where the first cannot run
# PEFT's classes of trained heads (modules_to_save by task type): all-linear leaves them to the task head
HEADS = ("classifier", "score", "qa_outputs")


class Outcome(Exception):
    """Ends a family early with its status and a one-line reason."""

    def __init__(self, status: str, reason: str, **extra):
        super().__init__(reason)
        self.status, self.reason, self.extra = status, reason, extra


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:limit]}"


def families(mapping: str) -> dict[str, str]:
    """model_type -> transformers class name, for one of MAPPINGS."""
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, MAPPINGS[mapping][0])
    return {t: c if isinstance(c, str) else c[0] for t, c in names.items()}


def run_family(mapping: str, model_type: str, workdir: Path) -> dict:
    """Run every step for one family; never raises (a bug in a step is reported as the sweep's own error)."""
    start = time.perf_counter()
    result = {"mapping": mapping, "model_type": model_type, "status": None, "reason": ""}
    try:
        _steps(mapping, model_type, Path(workdir), result)
        result["status"] = "pass"
    except Outcome as out:
        result.update(status=out.status, reason=out.reason, **out.extra)
    except Exception as exc:  # the harness itself failed: listed apart, never as a polytool failure
        result.update(status="sweep-error", reason=one_line(exc), traceback=traceback.format_exc()[-2000:])
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _steps(mapping: str, model_type: str, workdir: Path, result: dict) -> None:
    from sweep_cli import polytool_steps
    from sweep_peft import wrap

    class_name = families(mapping)[model_type]
    result["class"] = class_name
    cls = _model_class(class_name)
    base_dir, adapter_dir = workdir / "base", workdir / "adapter"
    layers = LAYERS[0]
    try:
        config, base, inputs, base_out = _tiny_base(cls, model_type, mapping, layers)
    except Outcome as out:  # hybrids place attention layers by period: 2 layers may hold none
        if out.status != "skipped" or out.reason.startswith(("needs", "not made small")):
            raise
        layers = LAYERS[1]
        config, base, inputs, base_out = _tiny_base(cls, model_type, mapping, layers)
    result["layers"] = layers
    try:
        base.save_pretrained(base_dir)
        fresh = cls.from_pretrained(base_dir).eval()
    except Exception as exc:
        raise Outcome("skipped", f"the tiny base does not save and load: {one_line(exc)}") from None
    if rel_err(forward(fresh, inputs, "the saved base does not load"), base_out) > BOUND:
        raise Outcome("skipped", "the base's output changes across save_pretrained/from_pretrained "
                                 "(not deterministic, or weights not saved)")
    task_type = MAPPINGS[mapping][1]
    peft_model, info = wrap(fresh, model_type, task_type, inputs)
    result.update(info)
    routed = [forward(peft_model.base_model, inputs, "PEFT's routed model does not run", task=t) for t in (1, 2)]
    if rel_err(routed[0], base_out) <= DIFFERS:
        raise Outcome("skipped", "the adapter does not change the output (its targets do not reach it)")
    if rel_err(routed[1], routed[0]) <= DIFFERS:
        raise Outcome("skipped", "tasks 1 and 2 give the same output")
    peft_model.save_pretrained(adapter_dir)
    try:
        lora_dir, dense_dir = polytool_steps(adapter_dir, base_dir, workdir)
    except Outcome as out:
        if out.extra.get("exit_code") == 1:  # verify found a mismatch: does PEFT's routed model agree?
            out.reason += "; " + _second_opinion(cls, base_dir, workdir, inputs, routed[0])
        raise
    result["rel"] = independent_check(cls, base_dir, lora_dir, dense_dir, inputs, routed[0])


def _second_opinion(cls, base_dir: Path, workdir: Path, inputs: dict, routed1) -> str:
    """Where verify failed an artifact: the dense model against PEFT's routed model, for the reason's record."""
    try:
        dense = cls.from_pretrained(workdir / "dense").eval()
        return f"dense vs PEFT's routed model: rel {rel_err(forward(dense, inputs, 'dense'), routed1):.1e}"
    except Exception as exc:
        return f"dense not compared ({one_line(exc, 80)})"


def _tiny_base(cls, model_type: str, mapping: str, layers: int):
    """(config, model, inputs, the model's output) of the family made small with at most `layers` layers."""
    config = _config(model_type, pad=mapping == "seq-cls", layers=layers)
    base = _build_base(cls, config)
    try:
        inputs = make_inputs(base, config)
    except Outcome:
        raise
    except Exception as exc:
        raise Outcome("skipped", f"cannot make inputs: {one_line(exc)}") from None
    _calibrate_batchnorm(base, inputs)
    return config, base, inputs, forward(base, inputs, "the tiny base does not run")


def _calibrate_batchnorm(model, inputs: dict) -> None:
    """BatchNorm's running statistics as training leaves them: those of inputs like the sweep's (one pass of
    CALIBRATION seeded samples in train mode, the rest of the model in eval; two samples made some channels'
    variance tiny where the last stage is 1 x 1, and the model ill-conditioned). At init they are 0 and 1, and a
    random convolutional stack then shrinks its signal some 4x a stage: SwiftFormer's logits came out near
    1e-5, where verify's absolute tolerance (1e-5) cannot tell the adapter's effect from none."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    g = torch.Generator().manual_seed(11)
    inputs = {k: torch.randn((CALIBRATION, *v.shape[1:]), generator=g) if v.is_floating_point()  # (C, ...)
              else v.repeat(CALIBRATION // len(v), *[1] * (v.dim() - 1)) for k, v in inputs.items()}
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: this one pass
        norm.train()
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception as exc:
        raise Outcome("skipped", f"the tiny base does not run in train mode (BatchNorm): {one_line(exc)}") from None
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
            norm.eval()


def _model_class(class_name: str):
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None:
        raise Outcome("skipped", f"transformers exports no class {class_name}")
    return cls


def _config(model_type: str, pad: bool, layers: int):
    from sweep_config import tiny_config

    try:
        return tiny_config(model_type, pad, layers)
    except Exception as exc:
        raise Outcome("skipped", f"cannot make a small config: {one_line(exc)}") from None


def _build_base(cls, config):
    import torch

    torch.manual_seed(0)
    try:
        model = cls(config).eval()
    except Exception as exc:
        raise Outcome("skipped", f"the tiny model cannot be built: {one_line(exc)}") from None
    params = sum(p.numel() for p in model.parameters())
    if params > MAX_PARAMS:
        raise Outcome("skipped", f"not made small: {params / 1e6:.0f}M parameters")
    return model


def make_inputs(model, config) -> dict:
    """Seeded inputs: token ids (no special ids; decoder ids for encoder-decoders), or pixel values."""
    import torch

    from sweep_config import special_token_ids

    g = torch.Generator().manual_seed(7)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "input_ids":
        vocab = getattr(config.get_text_config(), "vocab_size", 256)  # none: characters (CANINE)
        allowed = torch.tensor([i for i in range(3, min(vocab, 256)) if i not in special_token_ids(config)])
        ids = allowed[torch.randint(0, len(allowed), (BATCH, SEQ), generator=g)]  # (B, L)
        eos = getattr(config.get_text_config(), "eos_token_id", None)
        if isinstance(eos, int) and 0 <= eos < vocab:  # classifiers that pool at <eos> (BART) need one per row
            ids[:, -1] = eos
        out = {"input_ids": ids}
        if getattr(config, "is_encoder_decoder", False):
            out["decoder_input_ids"] = ids
        return out
    if name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        size = getattr(vision, "image_size", 32)
        size = size if isinstance(size, int) else max(size)
        channels = getattr(vision, "num_channels", 3)
        return {"pixel_values": torch.randn(BATCH, channels, size, size, generator=g)}  # (B, C, H, W)
    raise Outcome("skipped", f"needs `{name}` inputs (audio or other: not built by the sweep)")


def forward(model, inputs: dict, what: str, task: int | None = None, status: str | None = None):
    """The head's outputs as one float tensor (logits, start/end logits, or the last hidden state). A failure
    ends the family: `status`, by default skipped for the base and PEFT cannot wrap for the routed model."""
    import torch

    extra = {} if task is None else {"task_ids": torch.full((BATCH,), task)}
    try:
        with torch.no_grad():
            out = model(**inputs, **extra)
    except Outcome:
        raise
    except Exception as exc:
        status = status or ("peft-cannot-wrap" if task is not None else "skipped")
        raise Outcome(status, f"{what}: {one_line(exc)}") from None
    keys = [k for k in ("logits", "start_logits", "end_logits", "last_hidden_state") if out.get(k) is not None]
    if not keys:
        raise Outcome("skipped", f"{what}: no logits or last_hidden_state in the output")
    return torch.cat([out[k].detach().float().reshape(BATCH, -1) for k in keys], dim=1)  # (B, everything)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|"""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def independent_check(cls, base_dir: Path, lora_dir: Path, dense_dir: Path, inputs: dict, routed1) -> dict:
    """The dense model by transformers and the LoRA by PEFT, each against PEFT's routed task 1."""
    import warnings

    from peft import PeftModel

    dense = cls.from_pretrained(dense_dir).eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = PeftModel.from_pretrained(cls.from_pretrained(base_dir).eval(), lora_dir).eval()
    except Exception as exc:  # e.g. PEFT refuses LoRA on Mamba's out_proj
        dense_err = rel_err(forward(dense, inputs, "the dense output does not run", status="polytool-fails"), routed1)
        status = "peft-cannot-load" if dense_err <= BOUND else "polytool-fails"
        raise Outcome(status, f"PEFT's LoRA loader: {one_line(exc)}; dense rel {dense_err:.1e}") from None
    rel = {"dense": rel_err(forward(dense, inputs, "the dense output does not run", status="polytool-fails"), routed1),
           "lora": rel_err(forward(lora.base_model, inputs, "the LoRA output does not run", status="polytool-fails"), routed1)}
    for kind, err in rel.items():
        if not err <= BOUND:
            if kind == "lora" and (moved := _peft_retargeted(lora, lora_dir)):
                raise Outcome("peft-cannot-load", f"PEFT's LoRA loader does not apply the LoRA's modules as "
                              f"written ({moved}; its transformers-v5 MoE conversion); dense rel "
                              f"{rel['dense']:.1e}", rel=rel)
            raise Outcome("polytool-fails", f"the {kind} output differs from PEFT's routed model: rel {err:.1e}",
                          rel=rel)
    return rel


def _peft_retargeted(lora, lora_dir: Path) -> str:
    """What PEFT's LoRA loader wrapped beyond or short of the LoRA file's modules, or wrapped but did not load
    (the file's value not in the model: its keys renamed on load and reported missing) ('' when none)."""
    from safetensors import safe_open

    with safe_open(str(Path(lora_dir) / "adapter_model.safetensors"), "pt") as f:
        stored = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in f.keys() if ".lora_A" in k}
        loaded = lora.state_dict()  # in memory the adapter name sits before .weight: lora_A.default.weight
        unloaded = sorted({k.split(".lora_")[0].removeprefix("base_model.model.") for k in f.keys() if ".lora_" in k
                           and not _same(loaded.get("{0}.default.{2}".format(*k.rpartition("."))), f.get_tensor(k))})
    wrapped = {n.removeprefix("base_model.model.") for n, m in lora.named_modules() if hasattr(m, "lora_A")
               and hasattr(m, "base_layer") and not n.endswith(".base_layer")}
    missing, extra = sorted(stored - wrapped), sorted(wrapped - stored)
    unloaded = [n for n in unloaded if n not in missing]
    return ", ".join(filter(None, [f"not wrapped: {len(missing)} e.g. {missing[0]}" if missing else "",
                                   f"wrapped without weights: {len(extra)} e.g. {extra[0]}" if extra else "",
                                   f"wrapped but left unloaded (its keys renamed on load, peft#3711): "
                                   f"{len(unloaded)} e.g. {unloaded[0]}" if unloaded else ""]))


def _same(loaded, stored) -> bool:
    return loaded is not None and loaded.shape == stored.shape and bool((loaded.float() == stored.float()).all())
