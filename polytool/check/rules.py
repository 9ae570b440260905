"""`polytool check`: preflight of a PEFT LoRA directory (ours or not) for one serving stack.

Serving stacks fail quietly: an adapter can load and serve the base model's output. Each rule
below says what the stack does with a feature, as read from its sources (docs/serving.md cites
the versions), and the check reports, per rule, one finding:

    ok        nothing the stack would refuse or ignore
    problem   the stack refuses the adapter, or loads it and silently ignores part of it
    flag      the stack serves it only with a server flag (the fix names it)
    warning   depends on the model class or the stack's version: check it there
    skipped   needs the base model (--base) to decide

`ready` is false when any finding is a problem (the command exits 1). No torch is imported:
only adapter_config.json, the safetensors header and (with a base) its config and weight names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..architectures import ALWAYS_TIED_MODEL_TYPES, INPUT_EMBEDDING_NAMES, OUTPUT_LEAVES
from ..core.units import plural
from ..errors import CheckpointError, PolytoolError
from ..formats.base import BaseCheckpoint, find_key, open_base, optional_base
from ..formats.lora import NESTED_REPEAT, LoraFacts, read_lora_facts
from ..formats.manifest import VLLM_RANKS, vllm_max_lora_rank
from ..formats.adapter_dir import PREFIX
from ..formats.safetensors import FLOAT_DTYPES

STACKS = ("vllm", "tgi", "llama.cpp", "peft")
SOURCES = {
    "vllm": "vLLM 0.14 to 0.22 (vllm/lora/peft_helper.py, vllm/config/lora.py); silent no-ops: vLLM issues "
            "#34186, #55193",
    "tgi": "text-generation-inference 3.x (server/text_generation_server/adapters/lora.py)",
    "llama.cpp": "llama.cpp as vendored by llama-cpp-python 0.3.36 (convert_lora_to_gguf.py, src/llama-adapter.cpp)",
    "peft": "PEFT 0.21.2 (read and run)",
}


@dataclass
class Finding:
    rule: str
    status: str  # ok, problem, flag, warning, skipped
    behaviour: str  # what the stack does, one line
    detail: str = ""
    fix: str = ""


Rule = Callable[[LoraFacts, str, "BaseCheckpoint | None"], Finding]


def _ok(rule: str, behaviour: str, detail: str = "") -> Finding:
    return Finding(rule, "ok", behaviour, detail)


def rule_alpha(f: LoraFacts, stack: str, base) -> Finding:
    alpha = f.config.get("lora_alpha")
    missing = isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
    behaviour = {"vllm": "lora_alpha is a required field: a config without it is refused",
                 "llama.cpp": "convert_lora_to_gguf.py reads lora_alpha and stops without it",
                 }.get(stack, "a missing lora_alpha silently falls back to 8 (PEFT's LoraConfig default): wrong scaling")
    if not missing:
        return _ok("lora_alpha", behaviour, f"lora_alpha {alpha}")
    return Finding("lora_alpha", "problem", behaviour, f"lora_alpha is {alpha!r}", "write the lora_alpha it was trained with")


def rule_targets(f: LoraFacts, stack: str, base: BaseCheckpoint | None) -> Finding:
    behaviour = {"vllm": "weights whose module path matches no module load without error and are never applied "
                         "(the adapter silently serves the base model)",
                 "tgi": "a module path that is not in the model is skipped (a log warning) and never applied",
                 "llama.cpp": "a tensor the converter's name map or the base GGUF lacks is refused",
                 "peft": "keys that match no module are 'missing adapter keys' (a warning): B stays 0, a silent no-op"
                 }[stack]
    unprefixed = [k for k in f.tensors if not k.startswith(PREFIX)]
    if unprefixed and stack in ("peft", "tgi"):
        return Finding("targets", "problem", behaviour, f"{len(unprefixed)} tensors lack the base_model.model. "
                       f"prefix (e.g. {unprefixed[0]!r}) and are never looked up", "rename them with the prefix")
    if base is None:
        return Finding("targets", "skipped", behaviour, "pass --base DIR to match module paths against the base")
    keys = set(base.tensors)
    exact, shifted, missing, renamed = [], [], [], []
    for module in f.modules:
        tied_output = base.tie_word_embeddings and module.rpartition(".")[2] in OUTPUT_LEAVES
        if module + ".weight" in keys or tied_output:
            exact.append(module)
        elif find_key(module, keys) is not None:
            shifted.append(module)
        elif _converted(base, module):  # the family's conversion builds it from the checkpoint's keys
            exact.append(module)
            renamed.append(module)
        else:
            missing.append(module)
    unmatched = stack == "peft" and not _targets_match(f.config.get("target_modules"), base, renamed)
    if unmatched:
        return Finding("targets", "problem", "target_modules that select no module of the model make PEFT refuse the "
                       "adapter (NoMatchingPeftModuleError)", f"target_modules {f.config.get('target_modules')!r} "
                       "matches no module of the base", "write the target_modules the adapter was trained with")
    if not shifted and not missing:
        return _ok("targets", behaviour, f"all {len(exact)} modules are modules of the base")
    bad = shifted + missing
    what = "none" if not exact else f"{len(bad)} of {len(f.modules)}"
    hint = f" ({bad[0]!r} is {find_key(bad[0], keys)!r} in the base: a prefix differs)" if shifted else f" (e.g. {bad[0]!r})"
    return Finding("targets", "problem", behaviour, f"{what} of the adapter's module paths match the base{hint}",
                   "train or rename against the class and checkpoint the stack serves")


def _converted(base: BaseCheckpoint, module: str) -> bool:
    """Whether transformers' conversion of the family builds `module`'s weight from the checkpoint: renamed, a
    block of a fused key, or any other conversion (stacked, permuted): a module of the model all the same, which a
    LoRA adapts (a dense merge refuses what it cannot place)."""
    try:
        return base.locate(module + ".weight") is not None
    except CheckpointError:
        return True


def _targets_match(targets, base: BaseCheckpoint, renamed: list[str] = ()) -> bool:
    """Whether target_modules selects a module of the base as PEFT matches it (a regex fully matching a module
    path, or a name equal to a path or to its last dotted components); the modules are read off the weights,
    with `renamed`: the adapter's modules whose checkpoint keys the family's conversion renames."""
    import re

    modules = {key.rpartition(".")[0] for key in base.tensors} | set(renamed)
    modules |= {m.partition(".")[2] for m in modules if "." in m}  # a checkpoint saved with its head's prefix
    if isinstance(targets, str):
        if NESTED_REPEAT.search(targets):  # could take exponential time on a module name: selects nothing here
            return False
        try:
            return targets == "all-linear" or any(re.fullmatch(targets, m) for m in modules)
        except re.error:
            return False
    names = [t for t in targets or [] if isinstance(t, str)]
    return not names or any(m == t or m.endswith("." + t) for m in modules for t in names)


def rule_rank(f: LoraFacts, stack: str, base) -> Finding:
    r = max([f.config.get("r") or 0, *f.ranks, *(f.config.get("rank_pattern") or {}).values()])
    if stack != "vllm":
        return _ok("rank", {"tgi": "ranks are padded for its kernels; no limit refuses an adapter",
                            "llama.cpp": "any rank (read per tensor from lora_b)", "peft": "any rank"}[stack], f"r {r}")
    behaviour = (f"an adapter whose rank exceeds --max-lora-rank (default 16; allowed {', '.join(map(str, VLLM_RANKS))}) "
                 "is refused")
    fit = vllm_max_lora_rank(r)
    if fit is None:
        return Finding("rank", "problem", behaviour, f"r {r} is above every allowed --max-lora-rank",
                       "lower the rank (e.g. an SVD truncation)")
    if r <= 16:
        return _ok("rank", behaviour, f"r {r} fits the default --max-lora-rank 16")
    return Finding("rank", "flag", behaviour, f"r {r}", f"serve with --max-lora-rank {fit}")


def rule_bias(f: LoraFacts, stack: str, base) -> Finding:
    behaviour = {"vllm": "LoRA bias is not supported (refused without --enable-lora-bias up to 0.10; removed since)",
                 "tgi": "only r, lora_alpha, target_modules, fan_in_fan_out and use_rslora are read: bias is "
                        "silently ignored",
                 "llama.cpp": "convert_lora_to_gguf.py stops at any tensor that is not lora_A / lora_B",
                 "peft": "supported"}[stack]
    bias = f.config.get("bias", "none") not in ("none", None) or bool(f.config.get("lora_bias"))
    tensors = [k for k in f.tensors if k.endswith(".bias")]
    if not bias and not tensors:
        return _ok("bias", behaviour, "no bias")
    detail = f"bias={f.config.get('bias')!r}, lora_bias={f.config.get('lora_bias')!r}, {len(tensors)} bias tensors"
    if stack == "peft":
        return _ok("bias", behaviour, detail)
    fix = ("every bias tensor is zero: dropping them (bias 'none', lora_bias false) is lossless" if f.bias_zero
           else "merge the bias into the base, or serve with PEFT")
    return Finding("bias", "problem", behaviour, detail, fix)


def rule_dora(f: LoraFacts, stack: str, base) -> Finding:
    behaviour = {"vllm": "refused: 'vLLM does not yet support DoRA'",
                 "tgi": "use_dora is not read: the magnitude vectors are silently ignored (plain LoRA output)",
                 "llama.cpp": "convert_lora_to_gguf.py stops at the lora_magnitude_vector tensors",
                 "peft": "supported"}[stack]
    dora = bool(f.config.get("use_dora")) or any("lora_magnitude_vector" in k for k in f.tensors)
    if not dora or stack == "peft":
        return _ok("dora", behaviour, "DoRA" if dora else "no DoRA")
    return Finding("dora", "problem", behaviour, "use_dora is true", "merge the adapter into the base (dense)")


def rule_modules_to_save(f: LoraFacts, stack: str, base) -> Finding:
    behaviour = {"vllm": "refused: 'vLLM only supports modules_to_save being None'",
                 "tgi": "modules_to_save is not read: the saved modules are silently not applied",
                 "llama.cpp": "convert_lora_to_gguf.py stops at the full-weight tensors ('Unexpected name')",
                 "peft": "supported"}[stack]
    lora_suffixes = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B", ".bias",
                     "lora_magnitude_vector")
    full = [k for k in f.tensors if not k.endswith(lora_suffixes) and "lora_magnitude_vector" not in k]
    saved = f.config.get("modules_to_save") or []
    if (not saved and not full) or stack == "peft":
        return _ok("modules_to_save", behaviour, f"modules_to_save {saved or None}")
    detail = f"modules_to_save {saved}" if saved else f"{len(full)} full-weight tensors (e.g. {full[0]!r})"
    return Finding("modules_to_save", "problem", behaviour, detail, "merge the adapter into the base (dense)")


def rule_embeddings(f: LoraFacts, stack: str, base: BaseCheckpoint | None) -> Finding:
    leaf = {m: m.rpartition(".")[2] for m in f.modules}
    emb = [m for m, name in leaf.items() if name in INPUT_EMBEDDING_NAMES] + [m for m in f.modules
                                                                  if any(k.startswith(PREFIX + m + ".lora_embedding")
                                                                         for k in f.tensors)]
    out = [m for m, name in leaf.items() if name in OUTPUT_LEAVES]
    behaviour = {"vllm": "embedding / lm_head LoRA applies only where the model class declares them "
                         "(embedding_modules); LoRA extra vocabulary was removed (PR #28382)",
                 "tgi": "lm_head is an adapter layer; embed_tokens is not (skipped with a warning)",
                 "llama.cpp": "token-embedding LoRA is applied; an lm_head tied to the embeddings is refused by the "
                              "converter ('lm_head is present in adapter, but is ignored in base model')",
                 "peft": "supported"}[stack]
    if (not emb and not out) or stack == "peft":
        return _ok("embeddings", behaviour, "no embedding or lm_head target")
    detail = f"targets {', '.join(dict.fromkeys(emb + out))}"
    if stack == "vllm":
        return Finding("embeddings", "warning", behaviour, detail, "check that vLLM's class for this model lists them")
    if stack == "tgi":
        return Finding("embeddings", "problem" if emb else "ok", behaviour, detail)
    if not out:
        return _ok("embeddings", behaviour, detail)
    if base is None:
        return Finding("embeddings", "skipped", behaviour, detail + "; pass --base DIR to see whether lm_head is tied")
    tied = base.tie_word_embeddings or base.model_type in ALWAYS_TIED_MODEL_TYPES
    return Finding("embeddings", "problem" if tied else "ok", behaviour, detail + ("; tied" if tied else "; untied"),
                   "collapse without lm_head" if tied else "")


def rule_patterns(f: LoraFacts, stack: str, base) -> Finding:
    ranks, alphas = f.config.get("rank_pattern") or {}, f.config.get("alpha_pattern") or {}
    behaviour = {"vllm": "rank_pattern / alpha_pattern are not read: every module is scaled by lora_alpha / r",
                 "tgi": "rank_pattern / alpha_pattern are not read: every module is scaled by lora_alpha / r",
                 "llama.cpp": "the scale is adapter.lora.alpha / each tensor's own rank: rank_pattern is honoured, "
                              "alpha_pattern is lost",
                 "peft": "supported"}[stack]
    ignored = {"vllm": bool(ranks or alphas), "tgi": bool(ranks or alphas), "llama.cpp": bool(alphas)}.get(stack, False)
    detail = f"rank_pattern {ranks or None}, alpha_pattern {alphas or None}"
    if not ignored:
        return _ok("patterns", behaviour, detail)
    return Finding("patterns", "problem", behaviour, detail,
                   "fold each module's scale into its lora_B and write one r / lora_alpha")


def rule_rslora(f: LoraFacts, stack: str, base) -> Finding:
    behaviour = {"llama.cpp": "use_rslora is not converted: llama.cpp scales by alpha / r, not alpha / sqrt(r)"
                 }.get(stack, "supported (lora_alpha / sqrt(r))")
    rs = bool(f.config.get("use_rslora"))
    if not rs or stack != "llama.cpp":
        return _ok("rslora", behaviour, f"use_rslora {rs}")
    r, alpha = f.config.get("r"), f.config.get("lora_alpha")
    fix = f"convert with lora_alpha {alpha * math.sqrt(r):.6g} (alpha * sqrt(r): the same scale)" if r and alpha else ""
    return Finding("rslora", "problem", behaviour, "use_rslora is true", fix)


def rule_dtype(f: LoraFacts, stack: str, base) -> Finding:
    dtypes = sorted({d for d, _ in f.tensors.values()})
    behaviour = {"vllm": "cast to --lora-dtype (auto: the base's dtype)", "tgi": "cast to the base's dtype",
                 "llama.cpp": "F16/F32 kept, others converted to F32 (or --outtype)", "peft": "kept as stored"}[stack]
    bad = [d for d in dtypes if d not in FLOAT_DTYPES]
    if bad:
        return Finding("dtype", "problem", behaviour, f"non-float tensors ({', '.join(bad)})", "store float tensors")
    return _ok("dtype", behaviour, f"stored {', '.join(dtypes)}")


def rule_conv1d(f: LoraFacts, stack: str, base: BaseCheckpoint | None) -> Finding:
    """GPT-2's Conv1D targets: PEFT's LoRA factors are (r, in) / (out, r) like any Linear's, but
    llama.cpp's converter transposes them as it transposes the Conv1D weights (measured in tests/test_gguf.py)."""
    behaviour = {"llama.cpp": "convert_lora_to_gguf.py transposes GPT-2's c_attn / c_proj / c_fc LoRAs like the "
                              "Conv1D weights: llama.cpp then refuses them ('has incorrect shape') or, where square, "
                              "applies the transpose"}.get(stack, "Conv1D targets are read as (r, in) / (out, r) factors")
    conv1d = bool(f.config.get("fan_in_fan_out")) or (base is not None and base.model_type == "gpt2")
    if not conv1d or stack != "llama.cpp":
        return _ok("conv1d", behaviour, "Conv1D (fan_in_fan_out)" if conv1d else "no Conv1D targets")
    return Finding("conv1d", "problem", behaviour, "fan_in_fan_out / a GPT-2 base",
                   "write the GGUF with polytool collapse --to gguf (untransposed; verified in llama.cpp)")


RULES: list[Rule] = [rule_alpha, rule_targets, rule_rank, rule_bias, rule_dora, rule_modules_to_save,
                     rule_embeddings, rule_patterns, rule_rslora, rule_dtype, rule_conv1d]


def run_rules(facts: LoraFacts, stack: str, base: BaseCheckpoint | None) -> list[Finding]:
    if stack not in STACKS:
        raise PolytoolError(f"--for {stack!r}: expected one of {', '.join(STACKS)}")
    return [rule(facts, stack, base) for rule in RULES]


def report(facts: LoraFacts, stack: str, base: BaseCheckpoint | None) -> dict:
    findings = run_rules(facts, stack, base)
    counts = {s: sum(x.status == s for x in findings) for s in ("problem", "flag", "warning", "skipped")}
    return {"adapter": str(facts.where), "stack": stack, "base": None if base is None else str(base.directory),
            "ready": counts["problem"] == 0, "source": SOURCES[stack],
            "findings": [vars(x) for x in findings], "summary": counts}


def check(lora_dir: str | Path, stack: str, base_dir: str | Path | None = None) -> dict:
    """The report for `lora_dir` served by `stack` (with the base's module paths when base_dir is given)."""
    if stack not in STACKS:
        raise PolytoolError(f"--for {stack!r}: expected one of {', '.join(STACKS)}")
    facts = read_lora_facts(lora_dir)
    # without --base: the recorded base when it is at hand, as collapse finds it (and only if it opens)
    directory = optional_base(base_dir, facts.config.get("base_model_name_or_path"), facts.config.get("revision"))
    try:
        base = None if directory is None else open_base(directory)
    except PolytoolError:
        if base_dir is not None:
            raise
        base = None
    return report(facts, stack, base)


def render(data: dict) -> str:
    lines = [f"adapter  {data['adapter']}", f"stack    {data['stack']} (rules read from {data['source']})",
             f"base     {data['base'] or '- (pass --base DIR to match module paths)'}", ""]
    for x in data["findings"]:
        lines.append(f"{x['status'].upper():<8} {x['rule']:<16} {x['detail']}")
        if x["status"] != "ok":
            lines.append(f"         {data['stack']}: {x['behaviour']}")
            if x["fix"]:
                lines.append(f"         fix: {x['fix']}")
    s = data["summary"]
    verdict = "READY" if data["ready"] else "NOT READY"
    counts = ", ".join(plural(s[k], k) for k in ("problem", "flag", "warning"))
    lines += ["", f"summary: {verdict} for {data['stack']}: {counts}, {s['skipped']} skipped"]
    return "\n".join(lines)


def collapse_facts(adapter, config: dict, dtype: str) -> LoraFacts:
    """The facts of the LoRA `collapse --to lora` is about to write (its config, its tensors' shapes)."""
    tensors = {}
    for m in adapter.modules:
        tensors[f"{PREFIX}{m.name}.lora_A.weight"] = (dtype, (adapter.r, m.in_features))
        tensors[f"{PREFIX}{m.name}.lora_B.weight"] = (dtype, (m.out_features, adapter.r))
    return LoraFacts(adapter.directory, config, tensors)


def refuse_problems(data: dict) -> None:
    """`collapse --for STACK`: raise on the first problem (nothing is written)."""
    bad = [x for x in data["findings"] if x["status"] == "problem"]
    if bad:
        x = bad[0]
        raise PolytoolError(f"--for {data['stack']}: {x['rule']}: {x['detail']} ({data['stack']}: {x['behaviour']}); "
                            "nothing was written")
