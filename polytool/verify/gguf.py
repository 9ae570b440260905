"""verify --against X.gguf --gguf-base BASE.gguf: run a GGUF LoRA in llama.cpp itself and compare.

The same token ids go through two runtimes:

    llama.cpp     (llama-cpp-python, n_threads 1, logits for every position)
                  base        BASE.gguf alone
                  lora        BASE.gguf with X.gguf applied (scale 1)
    transformers  (float32)   hf_base     the HF base
                              routed      verify's independent reference (polytool/verify/reference.py) on it

llama.cpp's arithmetic is not PyTorch's, so no fixed tolerance fits. The gate measures the
runtime's own floor first and judges the adapter against it:

    floor    = max |base - hf_base|           what llama.cpp vs transformers costs with no adapter
    err      = max |lora - routed|            the GGUF LoRA against the routed model
    effect   = max |routed - hf_base|         what the adapter changes (the no-op control)
    passed   = err <= GGUF_FLOOR_MULTIPLE * floor + DTYPE_SHARE[dtype] * effect
               and effect >= EFFECT_MULTIPLE * floor  (else a no-op: the check proves nothing)

DTYPE_SHARE is the rounding the GGUF's dtype adds in llama.cpp's LoRA path, as a share of the adapter's
effect: it grows with the effect, which the floor (measured without an adapter) cannot show. llama.cpp
runs with a float32 KV cache: its default F16 cache rounds keys and values, which costs the base ~1e-4
(and a trained adapter's larger keys and values 1e-3), the runtime's noise, not the artifact's.
docs/serving.md records the measurements behind the constants. A base GGUF that is not the HF
base (floor above FLOOR_REFUSE of the logits' scale) is refused, as are a GGUF LoRA whose tensors
are not this adapter's (names, shapes, architecture) and one whose provenance names another adapter.
"""
from __future__ import annotations

import ctypes
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..collapse.fit import check_collapsible
from ..collapse.gguf import plan_gguf  # the GGUF tensor names of this adapter on this base: a structural check
from ..errors import PolytoolError
from ..formats.adapter import load_adapter
from ..formats.base import resolve_base_dir
from ..formats.gguf import read_gguf_lora
from ..formats.provenance import TASKS_INDEX
from .inputs import SEED  # the seed of the random inputs, as for every verify run

GGUF_FLOOR_MULTIPLE = 4.0  # err may reach this multiple of the floor, plus the dtype share below (docs/serving.md)
EFFECT_MULTIPLE = 20.0  # below this multiple of the floor the adapter's effect is not "far above" it
FLOOR_REFUSE = 1e-2  # floor / max|hf_base| above this: the base GGUF is not the HF base
# the rounding of the GGUF's dtype in llama.cpp's LoRA path, as a share of the adapter's effect; measured at most
# 1.7e-6 (F32), 3.0e-3 (F16) and 2.9e-2 (BF16) on the fixtures' trained adapters (docs/serving.md): twice that, about
DTYPE_SHARE = {"F32": 1e-5, "F16": 6e-3, "BF16": 6e-2}
# llama.cpp's KV cache in float32 (ggml's GGML_TYPE_F32): its default F16 cache rounds keys and values, an error
# that grows with what the adapter adds to them (a trained adapter's 1e-3 on the fixtures), not the artifact's
GGML_F32 = 0
TYPE_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


def _import_llama():
    try:
        import llama_cpp
    except ImportError:
        raise PolytoolError("running a GGUF needs llama-cpp-python: pip install llama-cpp-python") from None
    return llama_cpp


@contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines (instead of printing them) while loading; restore its logger after."""
    llama_cpp = _import_llama()
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _reason(lines: list[str]) -> str:
    errors = [line.strip() for line in lines if "error" in line.lower() or "failed" in line.lower()]
    return (errors or [line.strip() for line in lines if line.strip()] or ["no message"])[-1]


def llama_logits(model_path: Path, ids: np.ndarray, lora_path: Path | None = None) -> np.ndarray:
    """(N, L) token ids -> (N, L, vocab) float32 logits from llama.cpp, one sequence at a time."""
    llama_cpp = _import_llama()
    n, length = ids.shape
    with _llama_log() as log:
        try:
            llm = llama_cpp.Llama(model_path=str(model_path), lora_path=None if lora_path is None else str(lora_path),
                                  n_ctx=max(length, 64), n_batch=length, n_ubatch=length, logits_all=True,
                                  n_threads=1, n_threads_batch=1, seed=SEED, verbose=False,
                                  type_k=GGML_F32, type_v=GGML_F32)
        except (ValueError, RuntimeError) as exc:
            where = model_path if lora_path is None else lora_path
            raise PolytoolError(f"llama.cpp refused it ({_reason(log) or exc})", where) from None
        # llama-cpp-python 0.3.36 does not raise when llama.cpp refuses the LoRA (a NULL adapter is not None
        # to ctypes): it would serve the base model, or crash at eval. Its log says so; so does the pointer.
        refused = [line.strip() for line in log if "failed to apply lora" in line or "failed to load" in line]
        adapter = getattr(llm, "_lora_adapter", None)
        if lora_path is not None and (refused or not getattr(adapter, "value", adapter)):
            llm.close()
            raise PolytoolError(f"llama.cpp refused it ({(refused or ['the adapter did not load'])[-1]})", lora_path)
    try:
        out = np.empty((n, length, llm.n_vocab()), dtype=np.float32)
        for i in range(n):
            llm.reset()
            llm.eval([int(t) for t in ids[i]])
            out[i] = llm.scores[:length]
    finally:
        llm.close()
    return out


def _hf_logits(base_dir: Path, adapter_dir: Path, ids: np.ndarray, specs: list) -> tuple[np.ndarray, dict]:
    """transformers, float32: the bare base's logits and the routed model's for each spec (verify's
    independent reference, polytool/verify/reference.py)."""
    import torch

    from .reference import ReferenceAdapter, routed
    from .models import load_model

    model = load_model(base_dir, "AutoModelForCausalLM", "cpu")
    reference = ReferenceAdapter(adapter_dir)
    x = torch.from_numpy(ids)  # (N, L)
    with torch.no_grad():
        base = model(input_ids=x, use_cache=False).logits.float().numpy()  # (N, L, V)
        out = {}
        for spec in specs:
            with routed(model, reference, spec):
                out[spec] = model(input_ids=x, use_cache=False).logits.float().numpy()
    return base, out


def _gguf_dtype(header: dict) -> str:
    kinds = {TYPE_DTYPES.get(t, t) for t in header["types"].values()}
    for name in ("BF16", "F16", "F32"):
        if name in kinds:
            return name
    raise PolytoolError(f"GGUF tensor types {sorted(kinds)}: verify checks F32, F16 and BF16 GGUF LoRAs")


def _target(path: Path, adapter, plan, override: str | None, given_by: str) -> tuple[Any, str, list[str], str | None]:
    """(task spec, dtype, notes, problem) of one GGUF LoRA; refuses one that is not this adapter's. The task
    comes from the user (--task, or the request recorded as typed), as for every artifact (artifacts.py)."""
    from .artifacts import _task_of

    header = read_gguf_lora(path)
    meta = header["metadata"]
    spec, notes, problem = _task_of(path, meta, adapter, override, given_by)
    if header["arch"] != plan.arch:
        raise PolytoolError(f"is a GGUF LoRA for llama.cpp architecture {header['arch']!r}; the base is "
                            f"{plan.arch!r} ({plan.hf_arch})", path)
    modules = {m.name: m for m in adapter.modules}
    want = {}
    for t in plan.targets:  # numpy order: lora_a (r, in), lora_b (out, r)
        want[f"{t.name}.lora_a"] = (adapter.r, modules[t.module].in_features)
        want[f"{t.name}.lora_b"] = (modules[t.module].out_features, adapter.r)
    if header["tensors"] != want:
        extra = sorted(set(header["tensors"]) - set(want))
        differ = sorted(k for k in want if header["tensors"].get(k) != want[k])
        raise PolytoolError(f"its tensors are not this adapter's on this base (e.g. {(extra or differ)[0]!r}: "
                            f"{header['tensors'].get((extra or differ)[0])} vs {want.get((extra or differ)[0])})", path)
    if header["alpha"] is None or not math.isclose(float(header["alpha"]), 1.0):
        raise PolytoolError(f"adapter.lora.alpha is {header['alpha']}, not 1 (what polytool writes: scale 1/r)", path)
    return spec, _gguf_dtype(header), notes, problem


def _gguf_files(path: Path, override: str | None) -> list[tuple[Path, str | None, str]]:
    """(file, the task asked of it, who asked) for X.gguf (--task, or its recorded request), or for each file
    of a `collapse --to gguf --task all` directory (its task index says which task each holds)."""
    import json

    if path.is_file():
        return [(path, override, "--task")]
    index = path / TASKS_INDEX
    if index.is_file():
        try:
            tasks = json.loads(index.read_text(encoding="utf-8"))["tasks"]
            files = [(path / Path(str(name)).name, str(int(task)), "the task index") for task, name in tasks.items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PolytoolError(f"cannot read the task index ({exc.__class__.__name__})", index) from None
        if all(f.suffix == ".gguf" for f, _, _ in files):
            return files
    raise PolytoolError("not a GGUF LoRA file (or a `collapse --to gguf --task all` directory)", path)


def _check(target: tuple, lora: np.ndarray, routed: np.ndarray, base: tuple[np.ndarray, np.ndarray],
           floor: float, allow_noop: bool) -> dict:
    """One GGUF LoRA judged: `target` (path, spec, dtype, notes, problem), llama.cpp's logits with it (`lora`),
    the routed model's, and the bases' (llama.cpp's, transformers') for the effects."""
    path, spec, dtype, notes, problem = target
    label = str(path)
    effect = float(np.abs(routed - base[1]).max())
    gguf_effect = float(np.abs(lora - base[0]).max())
    err = float(np.abs(lora - routed).max())
    scale = float(np.abs(routed).max())
    allowed = max(GGUF_FLOOR_MULTIPLE * floor, 1e-6) + DTYPE_SHARE[dtype] * effect
    noop = effect < EFFECT_MULTIPLE * floor
    ok = err <= allowed and math.isfinite(err)
    if problem:  # a recorded task that was not asked fails whatever llama.cpp computes
        ok, reason = False, problem
    elif not ok:
        reason = (f"max |lora - routed| {err:.2e} is above the allowance {allowed:.2e} "
                  f"({GGUF_FLOOR_MULTIPLE:g} x floor {floor:.2e} + {DTYPE_SHARE[dtype]:g} x effect)")
    elif noop:
        reason = (f"no-op: the adapter's effect {effect:.2e} is not far above llama.cpp's floor {floor:.2e} "
                  f"(needs {EFFECT_MULTIPLE:g} x), so the check proves nothing"
                  + (" (accepted: --allow-noop)" if allow_noop else "; pass --allow-noop to accept"))
    else:
        reason = None
    top1 = float((lora.argmax(-1) == routed.argmax(-1)).mean())
    return {"task": spec, "artifact": label, "kind": "gguf", "dtype": dtype, "max_abs_err": err,
            "max_rel_err": err / scale if scale else math.inf, "top1_agreement": top1, "adapter_effect": effect,
            "gguf_effect": gguf_effect, "floor": floor, "allowed": allowed, "noop": noop,
            "passed": ok and (allow_noop or not noop), "reason": reason, "notes": notes,
            "proof": "llama.cpp runs the GGUF LoRA on --gguf-base; its logits against the routed reference, within "
                     "llama.cpp's own floor (its base against transformers')"}


def verify_gguf(adapter_dir: str | Path, base_dir: str | Path | None, gguf_lora: str | Path | list,
                gguf_base: str | Path, task: str | None = None, n_inputs: int = 4, seq_len: int | None = None,
                allow_noop: bool = False) -> list[dict]:
    """One check dict per GGUF LoRA (verify's check keys, kind "gguf", plus floor / allowed)."""
    adapter = load_adapter(adapter_dir)
    check_collapsible(adapter)
    base_dir = resolve_base_dir(base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))
    if gguf_base is None:
        raise PolytoolError("--against X.gguf needs --gguf-base BASE.gguf (the base converted by llama.cpp's "
                            "convert_hf_to_gguf.py)")
    gguf_base = Path(gguf_base)
    if not gguf_base.is_file():
        raise PolytoolError("no such base GGUF file", gguf_base)
    plan = plan_gguf(adapter, base_dir)
    given = [g for p in ([gguf_lora] if isinstance(gguf_lora, (str, Path)) else gguf_lora)
             for g in _gguf_files(Path(p), task)]  # the task as the user typed it: verify parses it itself
    targets = [(p, *_target(p, adapter, plan, asked, by)) for p, asked, by in given]
    seq_len = seq_len or 32
    from ..formats.base import read_config

    vocab = read_config(base_dir).get("vocab_size")
    if n_inputs < 1 or seq_len < 1 or not isinstance(vocab, int):
        raise PolytoolError(f"--inputs {n_inputs} --seq-len {seq_len}: need >= 1 each (and a vocab_size in config.json)")
    ids = np.random.default_rng(SEED).integers(0, vocab, size=(n_inputs, seq_len))  # (N, L)
    base_cpp = llama_logits(gguf_base, ids)
    if base_cpp.shape[-1] != vocab:
        raise PolytoolError(f"has a vocabulary of {base_cpp.shape[-1]}, the HF base {vocab}: not this base", gguf_base)
    hf_base, routed = _hf_logits(base_dir, adapter.directory, ids, list(dict.fromkeys(t[1] for t in targets)))
    floor = float(np.abs(base_cpp - hf_base).max())
    if not floor <= FLOOR_REFUSE * float(np.abs(hf_base).max()):
        raise PolytoolError(f"does not compute the HF base {base_dir} (llama.cpp and transformers differ by up to {floor:.2e} "
                            "without an adapter): convert that base with convert_hf_to_gguf.py", gguf_base)
    checks = []
    for target in targets:
        lora_cpp = llama_logits(gguf_base, ids, target[0])
        checks.append(_check(target, lora_cpp, routed[target[1]], (base_cpp, hf_base), floor, allow_noop))
    return checks


def gguf_report(o) -> dict:
    """The CLI's report around verify_gguf's checks (`o`: the VerifyOptions of the run)."""
    if o.atol is not None or o.rtol is not None or o.prompts is not None or o.device != "cpu":
        raise PolytoolError("--atol, --rtol, --prompts and --device do not apply to a GGUF check (llama.cpp on "
                            "the CPU, judged against its own floor: docs/serving.md)")
    checks = verify_gguf(o.adapter_dir, o.base_dir, list(o.against), o.gguf_base, o.task, o.n_inputs, o.seq_len,
                         o.allow_noop)
    n_passed = sum(c["passed"] for c in checks)
    return {"passed": n_passed == len(checks), "adapter": str(o.adapter_dir), "gguf_base": str(o.gguf_base),
            "runtime": "llama.cpp (llama-cpp-python, n_threads 1)", "reference": "transformers float32 + PolyModel",
            "inputs": {"source": "random", "sequences": o.n_inputs, "seq_len": o.seq_len or 32, "seed": SEED},
            "rule": {"floor_multiple": GGUF_FLOOR_MULTIPLE, "effect_multiple": EFFECT_MULTIPLE, "dtype_share": DTYPE_SHARE},
            "checks": checks, "summary": {"checks": len(checks), "passed": n_passed, "failed": len(checks) - n_passed}}


def render_gguf_report(report: dict) -> str:
    lines = [f"adapter  {report['adapter']}", f"runtime  {report['runtime']} on {report['gguf_base']}",
             f"ref      {report['reference']}; {report['inputs']['sequences']} x {report['inputs']['seq_len']} "
             f"random token ids (seed {report['inputs']['seed']})",
             f"rule     max|lora - routed| <= {report['rule']['floor_multiple']:g} x floor + share x effect; "
             f"effect >= {report['rule']['effect_multiple']:g} x floor", ""]
    for c in report["checks"]:
        task = f"task {c['task']}" if isinstance(c["task"], int) else c["task"]
        lines.append(f"{'PASS' if c['passed'] else 'FAIL'}  {task:<8} gguf  {c['artifact']}  {c['dtype']}  "
                     f"err {c['max_abs_err']:.2e}  floor {c['floor']:.2e}  allowed {c['allowed']:.2e}  "
                     f"effect {c['adapter_effect']:.2e}  top1 {100 * c['top1_agreement']:.1f}%")
        lines += [f"      proof: {c['proof']}"] if c.get("proof") else []
        lines += [f"      {text}" for text in ([c["reason"]] if c["reason"] else []) + c["notes"]]
    s = report["summary"]
    lines += ["", f"summary: {'PASS' if report['passed'] else 'FAIL'}: {s['passed']} of {s['checks']} checks passed, "
                  f"{s['failed']} failed"]
    return "\n".join(lines)
