"""verify: the live routed forward (polytool's PolyModel on the base) vs collapsed artifacts.

One copy of the base, loaded in float32, carries the Poly adapter (the live model). For each task
spec the same inputs go through:

    live      the Poly model routed by task id (uniform / mean: every router's logits replaced)
    base      the same model with the adapter disabled: if live equals it, the check is a no-op
    artifact  the disabled model with a collapsed LoRA hooked onto the base layers or the dense
              delta added to their weights (in memory or from a LoRA directory), or a dense model
              directory loaded on its own

Compared: every floating output tensor (logits; an encoder's hidden states) and the output of every
adapted module, so one wrong element anywhere shows where it is. Per tensor b (live) and a:

    max_abs_err = max |a - b|    max_rel_err = max |a - b| / max |b|
    passed      = max |a - b| <= atol + rtol * max |b|   for every tensor compared

Everything computes in float32 (bfloat16 / float16 values are exact in it), so the only error left
is the artifact's own rounding: tolerances go by the dtype the artifact stores its weights in.
"""
from __future__ import annotations

import math
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .adapter import PolyAdapter, load_adapter
from .basemodel import is_directory, require_dir, resolve_base_dir
from .checkpoint import TORCH_NAMES, parse_json
from .collapse import LORA_ALPHA, collapse_adapter, dense_delta, lora_weights
from .errors import AdapterError, CheckpointError, PolytoolError
from .export import SHA_KEY, TASK_KEY, TASKS_INDEX, check_collapsible
from .lora import LoraArtifact, attach_lora, read_lora
from .routing import TaskSpec, parse_task_spec

SEED = 0
DEFAULT_INPUTS, DEFAULT_SEQ_LEN = 4, 32
# stored dtype -> (atol, rtol); docs/ci.md records the measurements behind the half-precision rows.
TOLERANCES = {"float64": (1e-5, 1e-5), "float32": (1e-5, 1e-5), "bfloat16": (1e-4, 1e-2), "float16": (1e-5, 3e-3)}
DEVICES = ("cpu", "cuda", "auto")


@dataclass
class Target:
    """One thing to compare with the live model for one task spec."""

    spec: TaskSpec
    kind: str  # "lora" or "dense"
    label: str  # the artifact's path, or "<in memory>" for the self-check
    dtype: str  # the dtype the artifact stores its weights in (sets the default tolerance)
    path: Path | None = None  # a dense model directory
    lora: LoraArtifact | None = None
    notes: list[str] = field(default_factory=list)


# ---- inputs and models ---------------------------------------------------------------------------


def base_config(base_dir: Path):
    """The base's transformers config; CheckpointError when the directory is not a model."""
    from transformers import AutoConfig

    require_dir(base_dir, "base model directory")
    if not (base_dir / "config.json").is_file():
        raise CheckpointError("no config.json here: not a transformers model directory", base_dir)
    try:
        return AutoConfig.from_pretrained(base_dir)
    except Exception as exc:  # transformers raises many types for a bad config
        raise CheckpointError(f"cannot read config.json ({_why(exc)})", base_dir) from None


def _why(exc: Exception) -> str:
    """An exception as 'Type: first line of its message'."""
    return f"{exc.__class__.__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def utf8_path(path: Path) -> Path:
    """`path`, if it is valid UTF-8: the safetensors library (under torch and transformers) opens no other."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise PolytoolError("the path is not valid UTF-8, and the safetensors library that loads it for torch "
                            "opens only UTF-8 paths: rename it", path) from None
    return path


def model_family(config) -> str:
    """'causal' (*ForCausalLM, *LMHeadModel), 'seq2seq' (T5-like) or 'encoder' (anything else)."""
    archs = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal"
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "encoder"


def stored_dtype(directory: Path, config=None) -> str:
    """The least precise floating dtype of a model directory's safetensors (else its config's)."""
    from .checkpoint import SafetensorsFile

    found = set()
    for file in sorted(directory.glob("*.safetensors")):
        with SafetensorsFile(file) as st:
            found |= {st.dtype(k) for k in st.keys()}
    for name in ("BF16", "F16", "F32", "F64"):
        if name in found:
            return TORCH_NAMES[name]
    dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return dtype if dtype in TOLERANCES else "float32"


def load_model(directory: Path, family: str, device: str):
    """A transformers model in eval mode, upcast to float32, on `device` (auto: device_map)."""
    import torch
    import transformers as tf

    auto = {"causal": tf.AutoModelForCausalLM, "seq2seq": tf.AutoModelForSeq2SeqLM, "encoder": tf.AutoModel}[family]
    # mismatched shapes are reported in `info` (refused below, in one line), not raised after a logged table
    kwargs: dict[str, Any] = {"dtype": torch.float32, "output_loading_info": True, "ignore_mismatched_sizes": True}
    if device == "auto":
        kwargs["device_map"] = "auto"
    bars, verbosity = tf.utils.logging.is_progress_bar_enabled(), tf.utils.logging.get_verbosity()
    if not sys.stderr.isatty():
        tf.utils.logging.disable_progress_bar()  # progress bars only on a terminal
    tf.utils.logging.set_verbosity_error()  # its load report is multi-line; what matters is raised below
    try:
        model, info = auto.from_pretrained(directory, **kwargs)
    except Exception as exc:  # transformers raises many types for a bad checkpoint
        raise CheckpointError(f"cannot load the model ({_why(exc)})", directory) from None
    finally:
        tf.utils.logging.set_verbosity(verbosity)
        if bars:
            tf.utils.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or []) + [str(m[0]) for m in info.get("mismatched_keys") or []]
    if missing:
        raise CheckpointError(f"incomplete checkpoint: {len(missing)} weights missing or mis-shaped "
                              f"(e.g. {missing[0]})", directory)
    if device == "cuda":
        model.to("cuda")
    return model.eval()


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise PolytoolError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise PolytoolError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if device == "auto":
        try:
            import accelerate  # noqa: F401  (device_map="auto" needs it)
        except ImportError:
            raise PolytoolError("--device auto needs accelerate: pip install 'polytool[auto]'") from None
    return device


def random_inputs(config, n: int, seq_len: int) -> tuple[list[dict], dict]:
    """One batch of N x L token ids, seeded (SEED), uniform in [0, vocab_size): the same every run."""
    import torch

    text = config.get_text_config()
    vocab, limit = getattr(text, "vocab_size", None), getattr(text, "max_position_embeddings", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise PolytoolError("the base config has no vocab_size: pass real text with --prompts")
    if n < 1 or seq_len < 1 or (isinstance(limit, int) and seq_len > limit):
        raise PolytoolError(f"--inputs {n} --seq-len {seq_len}: need >= 1 each and seq-len <= {limit} "
                            "(max_position_embeddings)")
    ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(SEED))  # (N, L)
    return [{"input_ids": ids}], {"source": "random", "sequences": n, "seq_len": seq_len, "seed": SEED}


def prompt_inputs(base_dir: Path, file: Path, seq_len: int | None) -> tuple[list[dict], dict]:
    """One batch per non-empty line of `file`, tokenised by the base's tokenizer (truncated to seq_len)."""
    from transformers import AutoTokenizer

    try:
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise PolytoolError(f"cannot read the prompts file ({exc.__class__.__name__})", file) from None
    if not prompts:
        raise PolytoolError("the prompts file holds no non-empty line", file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
    except Exception as exc:  # no tokenizer files, or unreadable ones
        raise CheckpointError(f"has no usable tokenizer for --prompts ({_why(exc)})", base_dir) from None
    trunc = {"truncation": True, "max_length": seq_len} if seq_len else {}
    batches = [{"input_ids": tokenizer(p, return_tensors="pt", **trunc)["input_ids"]} for p in prompts]  # (1, len)
    if any(b["input_ids"].shape[1] == 0 for b in batches):
        raise PolytoolError("a prompt tokenises to no tokens", file)
    return batches, {"source": "prompts", "file": str(file), "sequences": len(prompts), "seq_len": seq_len, "seed": None}


def forward(model, family: str, batches: list[dict], capture: dict, **extra) -> tuple[dict, dict]:
    """Every floating output tensor, and the output of each `capture` module ({name: module}), per batch
    as float32 on the CPU: ({output name: [tensor, ...]}, {module name: [tensor, ...]})."""
    import torch

    outputs: dict[str, list] = {}
    modules: dict[str, list] = {}

    def recorder(name):
        return lambda _mod, _args, out: modules.setdefault(name, []).append(out.detach().to("cpu", torch.float32))

    handles = [module.register_forward_hook(recorder(name)) for name, module in capture.items()]
    device = next(model.parameters()).device  # with device_map="auto", accelerate moves it on
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                kwargs = {"input_ids": ids, **extra}
                if family == "seq2seq":
                    kwargs["decoder_input_ids"] = ids
                if family != "encoder":
                    kwargs["use_cache"] = False
                for name, value in model(**kwargs).items():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        outputs.setdefault(name, []).append(value.detach().to("cpu", torch.float32))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, modules


# ---- comparison ----------------------------------------------------------------------------------


def errors(out: dict[str, list], ref: dict[str, list]) -> dict[str, tuple[float, float]]:
    """{name: (max |a - b|, max |b|)} over the batches; NaN counts as an infinite error."""
    if set(out) != set(ref) or any(len(out[k]) != len(ref[k]) for k in ref):
        raise PolytoolError(f"the models produce different outputs ({sorted(out)} vs {sorted(ref)}): not the same architecture")
    result = {}
    for name, refs in ref.items():
        diff = max(float((a - b).abs().max()) if a.shape == b.shape else math.inf for a, b in zip(out[name], refs))
        result[name] = (diff if not math.isnan(diff) else math.inf, max(float(b.abs().max()) for b in refs))
    return result


def within(errs: dict[str, tuple[float, float]], atol: float, rtol: float) -> bool:
    return all(diff <= atol + rtol * scale for diff, scale in errs.values())


def _rel(diff: float, scale: float) -> float:
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def top1(out: dict[str, list], ref: dict[str, list]) -> float | None:
    """Fraction of positions whose argmax over the logits agrees (None without logits)."""
    import torch

    if "logits" not in ref:
        return None
    same = [(a.argmax(-1) == b.argmax(-1)).flatten() for a, b in zip(out["logits"], ref["logits"])]
    return float(torch.cat(same).float().mean())


# ---- the live model and the artifacts ------------------------------------------------------------


def load_live(base_dir: Path, adapter: PolyAdapter, family: str, device: str):
    """polytool's PolyModel: the adapter on the float32 base, in eval mode."""
    from .poly.model import PolyModel

    return PolyModel.from_pretrained(load_model(base_dir, family, device), adapter.directory).eval()


def _spec_logits(router, spec: str):
    """(q*s,) logits whose eval weights are the spec's: uniform -> 0; mean -> logit(mean weights / 2)."""
    import torch

    if spec == "uniform":
        return torch.zeros_like(router.module_logits[0])
    mean = router.task_weights().double().mean(0)  # (t, q, s) -> (q, s), each split sums to 1
    return torch.logit(mean / 2).flatten().to(router.module_logits.dtype)  # normalising undoes the / 2


@contextmanager
def routed(live, spec: TaskSpec) -> Iterator[int]:
    """Task id to pass so the live model routes as `spec`; named specs rewrite every router's logits."""
    import torch

    from .poly.router import PolyRouter

    if not isinstance(spec, str):
        yield spec
        return
    routers = [m for m in live.modules() if isinstance(m, PolyRouter)]
    saved = [r.module_logits.detach().clone() for r in routers]
    try:
        with torch.no_grad():
            for router in routers:
                router.module_logits.copy_(_spec_logits(router, spec).expand_as(router.module_logits))
        yield 0
    finally:
        with torch.no_grad():
            for router, logits in zip(routers, saved):
                router.module_logits.copy_(logits)


@contextmanager
def dense_in_memory(layers: dict, adapter: PolyAdapter, spec: TaskSpec, dtype: str) -> Iterator[None]:
    """Inside the block each layer holds a new weight W + dense_delta, rounded once to `dtype` (the
    base's); a new Parameter, so a weight tied to the embeddings is merged alone, as `--untie` does."""
    import torch

    saved = []
    try:
        for module, A, B in collapse_adapter(adapter, spec):
            layer = layers[module.name]
            if layer.weight.is_meta:
                raise PolytoolError(f"module {module.name!r} is offloaded (--device auto): the in-memory dense "
                                    "check cannot change it; check a merged model with --against instead")
            delta = torch.from_numpy(dense_delta(A, B, adapter.r))  # (out, in), float64
            if not isinstance(layer, torch.nn.Linear):
                delta = delta.T  # Conv1D stores (in, out)
            merged = (layer.weight.detach().double() + delta.to(layer.weight.device)).to(getattr(torch, dtype))
            saved.append((layer, layer.weight))
            layer.weight = torch.nn.Parameter(merged.to(layer.weight.dtype), requires_grad=False)
        yield
    finally:
        for layer, weight in saved:
            layer.weight = weight


@contextmanager
def applied(target: Target, live, layers: dict, adapter: PolyAdapter, family: str, device: str,
            base_dtype: str) -> Iterator[tuple[Any, dict]]:
    """(model, {module name: module to capture}) that computes `target`."""
    if target.path is not None:  # a dense model directory, loaded on its own
        model = load_model(target.path, family, device)
        yield model, {name: model.get_submodule(name) for name in layers}
        return
    capture = {name: live.model.get_submodule(name) for name in layers}  # the Poly layers, disabled
    with live.disable_adapter():
        if target.kind == "dense":
            with dense_in_memory(layers, adapter, target.spec, base_dtype):
                yield live, capture
            return
        if target.lora is not None:
            weights, scaling = target.lora.weights, target.lora.scaling
        else:
            weights = {m.name: lora_weights(A, B) for m, A, B in collapse_adapter(adapter, target.spec)}
            scaling = LORA_ALPHA / adapter.r  # what `collapse` exports
        handles = attach_lora(layers, weights, scaling)
        try:
            yield live, capture
        finally:
            for handle in handles:
                handle.remove()


# ---- recognising artifacts -----------------------------------------------------------------------


def _check_source(where: Path, sha: Any, adapter: PolyAdapter) -> None:
    """An artifact whose provenance names another adapter's sha256 does not belong here."""
    if sha is not None and sha != adapter.sha256:
        raise PolytoolError(f"was collapsed from another adapter (provenance sha256 {str(sha)[:12]}, this adapter's "
                            f"{adapter.weights_file.name} has {adapter.sha256[:12]})", where)


def _task_of(where: Path, metadata: dict, adapter: PolyAdapter,
             override: TaskSpec | None) -> tuple[TaskSpec, list[str]]:
    """The task an artifact holds: --task if given, else its provenance; checks it came from `adapter`."""
    _check_source(where, metadata.get(SHA_KEY), adapter)
    recorded = metadata.get(TASK_KEY)
    if override is not None:
        differs = recorded is not None and recorded != str(override)
        return override, [f"checked as {override} (--task); its provenance says {recorded}"] if differs else []
    if recorded is None:
        raise PolytoolError("has no polytool provenance (made elsewhere?): pass --task to say which task it holds", where)
    try:
        return parse_task_spec(recorded, adapter.n_tasks), []
    except PolytoolError as exc:
        raise PolytoolError(f"provenance task: {exc.message}", where) from None


def _lora_target(path: Path, adapter: PolyAdapter, override: TaskSpec | None) -> Target:
    lora = read_lora(path)
    spec, notes = _task_of(path, lora.metadata, adapter, override)
    modules = {m.name: m for m in adapter.modules}
    if set(lora.weights) != set(modules):
        extra, missing = sorted(set(lora.weights) - set(modules)), sorted(set(modules) - set(lora.weights))
        raise AdapterError(f"targets other modules than the adapter (extra: {extra[:2]}, missing: {missing[:2]})", path)
    for name, (A, B) in lora.weights.items():
        want = ((adapter.r, modules[name].in_features), (modules[name].out_features, adapter.r))
        if (A.shape, B.shape) != want:
            raise AdapterError(f"module {name!r}: lora_A {list(A.shape)} / lora_B {list(B.shape)}, but the adapter "
                               f"collapses to {list(want[0])} / {list(want[1])}", path)
    return Target(spec, "lora", str(path), lora.dtype, lora=lora, notes=notes)


def _dense_target(path: Path, adapter: PolyAdapter, base_dir: Path, override: TaskSpec | None) -> Target:
    from .basemodel import match_targets, open_base

    dense, base = open_base(path), open_base(base_dir)
    if dense.model_type != base.model_type:
        raise CheckpointError(f"is a {dense.model_type!r} model, the base a {base.model_type!r} one", path)
    for key, info in base.tensors.items():
        got = dense.tensors.get(key)
        if got is None or got.shape != info.shape:
            shown = "missing" if got is None else f"of shape {list(got.shape)}"
            raise CheckpointError(f"does not belong to this base: tensor {key!r} is {shown}, "
                                  f"the base's is {list(info.shape)}", path)
    match_targets(dense, adapter.modules, untie=True)  # every adapted weight present, of the right shape
    metadata = {}
    for shard in dense.shards:
        metadata.update({k: v for k, v in dense.shard_metadata[shard].items() if k.startswith("polytool.")})
    spec, notes = _task_of(path, metadata, adapter, override)
    return Target(spec, "dense", str(path), stored_dtype(path), path=utf8_path(path), notes=notes)


def _task_dirs(path: Path, adapter: PolyAdapter, override: TaskSpec | None) -> list[Target]:
    """A `collapse --task all` directory: one LoRA per task, listed in its index file."""
    index_file = path / TASKS_INDEX
    try:
        index = parse_json(index_file.read_text(encoding="utf-8"))
        tasks = {int(k): str(v) for k, v in index["tasks"].items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise AdapterError(f"cannot read the task index ({_why(exc)})", index_file) from None
    outside = [sub for sub in tasks.values() if Path(sub).name != sub or sub in ("", ".", "..")]
    if outside:
        raise AdapterError(f"the task index names {outside[0]!r}, not a subdirectory of its own", index_file)
    _check_source(index_file, index.get("source_sha256"), adapter)
    if override is not None:
        if override not in tasks:
            raise PolytoolError(f"holds no LoRA for task {override} (it has tasks {sorted(tasks)})", path)
        tasks = {override: tasks[override]}
    targets = []
    for task, sub in tasks.items():
        target = _lora_target(path / sub, adapter, None)
        if target.spec != task:
            raise AdapterError(f"the index lists it as task {task}, its provenance says {target.spec}", path / sub)
        targets.append(target)
    return targets


def artifact_targets(path: Path, adapter: PolyAdapter, base_dir: Path, override: TaskSpec | None) -> list[Target]:
    """Recognise an artifact by its contents: a task-all dir, a LoRA dir or a dense model dir."""
    if not is_directory(path):
        raise PolytoolError("no such artifact directory", path)
    if (path / TASKS_INDEX).is_file():
        return _task_dirs(path, adapter, override)
    if (path / "adapter_config.json").is_file():
        return [_lora_target(path, adapter, override)]
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return [_dense_target(path, adapter, base_dir, override)]
    raise PolytoolError("not a collapsed artifact: expected a LoRA adapter (adapter_config.json), a `collapse --task all` "
                        f"directory ({TASKS_INDEX}) or a dense model (config.json + *.safetensors)", path)


# ---- the checks and the report -------------------------------------------------------------------


def _number(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def make_check(target: Target, final: dict, modules: dict, agree: float | None, effect: dict,
               tolerance: tuple[float, float], allow_noop: bool) -> dict:
    """One line of the report. A task whose live output equals the base's proves nothing (a no-op).

    `modules` is in execution order, so the first module out of tolerance is where the error starts.
    """
    atol, rtol = tolerance
    bad = [name for name, errs in modules.items() if not within({name: errs}, atol, rtol)]
    final_ok, noop = within(final, atol, rtol), within(effect, atol, rtol)
    if bad:
        reason = f"module {bad[0]} is the first to differ beyond tolerance (max_rel_err {_rel(*modules[bad[0]]):.2e})"
    elif not final_ok:
        reason = "outputs differ beyond tolerance"
    elif noop:
        reason = ("no-op: the adapter does not change the base's output for this task, so the check proves "
                  "nothing" + (" (accepted: --allow-noop)" if allow_noop else "; pass --allow-noop to accept"))
    else:
        reason = None
    return {"task": target.spec, "artifact": target.label, "kind": target.kind, "dtype": target.dtype,
            "max_abs_err": _number(max(d for d, _ in final.values())),
            "max_rel_err": _number(max(_rel(d, s) for d, s in final.values())), "top1_agreement": agree,
            "module_max_rel_err": _number(max((_rel(*e) for e in modules.values()), default=0.0)),
            "first_failing_module": bad[0] if bad else None,
            "adapter_effect": _number(max(d for d, _ in effect.values())), "noop": noop, "atol": atol, "rtol": rtol,
            "passed": final_ok and not bad and (allow_noop or not noop), "reason": reason, "notes": target.notes}


def _check_finite(outputs: dict[str, list], base_dir: Path) -> None:
    """The reference itself must be finite: NaN or Inf there (a broken base weight) would fail every check."""
    bad = next((name for name, values in outputs.items() if not all(bool(t.isfinite().all()) for t in values)), None)
    if bad is not None:
        raise CheckpointError(f"the model's own outputs contain NaN or Inf on these inputs (first: {bad}): its "
                              "weights are broken (or overflow in float32), so no comparison can be made", base_dir)


def run_checks(adapter: PolyAdapter, base_dir: Path, family: str, targets: list[Target], batches: list,
               device: str, tolerance: tuple, allow_noop: bool) -> tuple[list[str], list[dict]]:
    """Load the live model once; per task spec, compare it with the base and with each target."""
    live = load_live(base_dir, adapter, family, device)
    polys = {m.name: live.model.get_submodule(m.name) for m in adapter.modules}
    layers = {name: poly.base_layer for name, poly in polys.items()}
    base_dtype = stored_dtype(base_dir, live.model.config)
    with live.disable_adapter():
        base_out, _ = forward(live, family, batches, {})
    _check_finite(base_out, base_dir)
    checks = []
    for spec in dict.fromkeys(t.spec for t in targets):  # unique, in order
        with routed(live, spec) as task_id:
            live_out, live_modules = forward(live, family, batches, polys, task_ids=task_id)
        _check_finite({**live_modules, **live_out}, base_dir)
        effect = errors(live_out, base_out)
        for target in (t for t in targets if t.spec == spec):
            with applied(target, live, layers, adapter, family, device, base_dtype) as (model, capture):
                out, modules = forward(model, family, batches, capture)
            tol = tuple(TOLERANCES[target.dtype][i] if tolerance[i] is None else tolerance[i] for i in (0, 1))
            checks.append(make_check(target, errors(out, live_out), errors(modules, live_modules),
                                     top1(out, live_out), effect, tol, allow_noop))
    return sorted(base_out), checks


def verify(adapter_dir: str | Path, base_dir: str | Path | None, against: tuple = (), task: str | None = None,
           atol: float | None = None, rtol: float | None = None, n_inputs: int = DEFAULT_INPUTS,
           seq_len: int | None = None, prompts: str | Path | None = None, device: str = "cpu",
           allow_noop: bool = False) -> dict:
    """Run every check and return the report (a JSON-ready dict; `passed` says whether all passed)."""
    for name, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise PolytoolError(f"{name} {value}: expected a finite number >= 0")
    adapter = load_adapter(adapter_dir)
    check_collapsible(adapter)
    spec = None if task is None else parse_task_spec(task, adapter.n_tasks)
    base_dir = resolve_base_dir(base_dir, adapter.base_model_name_or_path, adapter.config.get("revision"))
    for path in (adapter.weights_file, base_dir):  # torch and transformers open them
        utf8_path(path)
    config = base_config(base_dir)
    family = model_family(config)
    if against:
        targets = [t for path in against for t in artifact_targets(Path(path), adapter, base_dir, spec)]
    else:  # self-check: every task (or the one --task names), collapsed in memory
        base_dtype = stored_dtype(base_dir, config)
        targets = [Target(s, kind, "<in memory>", "float32" if kind == "lora" else base_dtype)
                   for s in (range(adapter.n_tasks) if spec is None else [spec]) for kind in ("lora", "dense")]
    if prompts is not None:
        batches, inputs = prompt_inputs(base_dir, Path(prompts), seq_len)
    else:
        batches, inputs = random_inputs(config, n_inputs, seq_len or DEFAULT_SEQ_LEN)
    device = resolve_device(device)
    outputs, checks = run_checks(adapter, base_dir, family, targets, batches, device, (atol, rtol), allow_noop)
    n_passed = sum(c["passed"] for c in checks)
    return {"passed": n_passed == len(checks), "adapter": str(adapter.directory), "adapter_sha256": adapter.sha256,
            "base": str(base_dir), "family": family, "compute_dtype": "float32", "device": device, "inputs": inputs,
            "outputs": outputs, "modules": len(adapter.modules), "checks": checks,
            "summary": {"checks": len(checks), "passed": n_passed, "failed": len(checks) - n_passed}}


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if pct else f"{x:.2e}"


def render_report(report: dict) -> str:
    """The human report: a header, one PASS/FAIL line per check, a summary line."""
    inputs = report["inputs"]
    if inputs["source"] == "random":
        shown = f"{inputs['sequences']} x {inputs['seq_len']} random token ids (seed {inputs['seed']})"
    else:
        shown = f"{inputs['sequences']} prompts from {inputs['file']}"
    checks = report["checks"]
    lines = [f"adapter  {report['adapter']} (sha256 {report['adapter_sha256'][:12]})",
             f"base     {report['base']} ({report['family']}; computed in float32 on {report['device']})",
             f"inputs   {shown}",
             f"compared {', '.join(report['outputs'])} and the outputs of {report['modules']} adapted modules; "
             "each passes if max|a-b| <= atol + rtol * max|b| (tol atol/rtol)", ""]
    width = max((len(str(c["artifact"])) for c in checks), default=0)
    for c in checks:
        task = f"task {c['task']}" if isinstance(c["task"], int) else c["task"]
        lines.append(f"{'PASS' if c['passed'] else 'FAIL'}  {task:<8} {c['kind']:<5}  {c['artifact']:<{width}}  "
                     f"{c['dtype']:<8}  abs {_fmt(c['max_abs_err'])}  rel {_fmt(c['max_rel_err'])}  "
                     f"modules {_fmt(c['module_max_rel_err'])}  top1 {_fmt(c['top1_agreement'], pct=True):>6}  "
                     f"tol {c['atol']:g}/{c['rtol']:g}")
        lines += [f"      {text}" for text in ([c["reason"]] if c["reason"] else []) + c["notes"]]
    s = report["summary"]
    verdict = "PASS" if report["passed"] else "FAIL"
    lines += ["", f"summary: {verdict}: {s['passed']} of {s['checks']} checks passed, {s['failed']} failed"]
    return "\n".join(lines)
