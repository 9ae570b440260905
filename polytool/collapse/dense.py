"""Dense merge: stream a safetensors base checkpoint, add each adapted module's collapsed delta, write.

Tensor by tensor in the base's own shard layout (or repacked with `max_shard_size`): untouched
tensors are copied byte for byte inside the kernel (a shard with nothing to merge is copied as a
file); adapted ones are read in blocks of rows, merged in float32 or wider (float64 when the output
is float32) and rounded once to the output dtype. Peak memory is one block, not the model.
`plan_merge` validates everything (targets, shapes, tied weights) before `write_merge` writes.
The deltas come from a DeltaSource (module -> rows of its delta): one task's collapse here, or a
merge of several sources (merge/); one module's delta is computed at a time.
"""
from __future__ import annotations

import os
import shutil
import stat
from concurrent.futures import Executor, wait
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from ..formats.adapter import PolyAdapter
from ..formats.base import INDEX_NAME, SINGLE_NAME, BaseCheckpoint, WeightTarget, match_targets, open_base
from ..formats.safetensors import FLOAT_DTYPES, TORCH_NAMES, SafetensorsFile
from ..formats.safetensors_writer import SafetensorsWriter, TensorSpec, encode_header
from ..formats.cards import dense_card
from ..formats.jsonfile import write_json
from ..formats.atomic import atomic_output_dir, check_output
from ..core.blas import one_blas_thread
from ..core.collapse import add_stored_delta, collapse_factors, stored_delta
from ..errors import CheckpointError, PolytoolError
from ..formats.provenance import provenance
from .fit import check_collapsible, check_tied_copies, resized_embeddings, saved_module_keys, vocab_size
from ..core.taskspec import TaskSpec
from .blocks import Delta, block_pool, blocks

Progress = Callable[[Iterable, int, str], Iterable]
DeltaSource = Callable[[str, type], Delta]  # (module, float dtype to compute in) -> its Delta
Replacement = tuple[tuple[int, ...], Callable[[], np.ndarray]]  # a tensor written whole: (shape, its value)


@dataclass(frozen=True)
class DenseOptions:
    """How a dense output is written: its dtype (None: the base's), a tied target written apart (`untie`),
    shards of at most `max_shard_size` bytes (None: the base's layout), an existing output replaced (`force`)."""

    dtype: str | None = None
    untie: bool = False
    max_shard_size: int | None = None
    force: bool = False
    request: str | None = None  # the task as the user asked for it (provenance, for verify)


@dataclass(frozen=True)
class Op:
    """One output tensor: written as `out`, read from `source` in base shard `shard`, merged with `targets` (one
    module's weight, or several in blocks of its rows: a fused projection split on load)."""

    out: TensorSpec
    shard: str
    source: str
    source_dtype: str
    targets: tuple[WeightTarget, ...] = ()
    replace: Callable[[], np.ndarray] | None = None  # a trained copy written instead (modules_to_save)

    @property
    def kind(self) -> str:
        if self.replace:
            return "replaced"
        return "merged" if self.targets else ("copied" if self.out.dtype == self.source_dtype else "converted")


@dataclass
class OutShard:
    name: str
    metadata: dict[str, str]
    ops: list[Op] = field(default_factory=list)


@dataclass
class MergePlan:
    """Everything a dense merge will write, validated."""

    base: BaseCheckpoint
    spec: TaskSpec | None  # None: a merge of several sources (merge/)
    targets: list[WeightTarget]
    shards: list[OutShard]
    index: dict | None  # the index file's content; None for one model.safetensors
    config: dict | None  # an edited config.json; None copies it unchanged
    others: list[str]  # other entries of the base directory, copied along
    others_bytes: int  # their size (symbolic links followed)

    @property
    def n_tensors(self) -> int:
        return sum(len(s.ops) for s in self.shards)

    def nbytes(self) -> int:
        """Bytes the output will take (shards + everything copied along)."""
        total = sum(len(encode_header([op.out for op in s.ops], s.metadata)) + sum(op.out.nbytes for op in s.ops) for s in self.shards)
        return total + self.others_bytes


def _ops(base: BaseCheckpoint, targets: list[WeightTarget], dtype: str | None, replaced: dict[str, Replacement]) -> list[Op]:
    """Every output tensor in base order; an untied weight follows the embedding it is copied from;
    `replaced` {base key: (shape, its value)}: tensors the adapter trained whole (heads, the embeddings of a
    resized vocabulary: another row count), written in place."""
    merged: dict[str, tuple[WeightTarget, ...]] = {}
    for t in targets:
        if t.key == t.source:
            merged[t.key] = merged.get(t.key, ()) + (t,)
    untied: dict[str, list[WeightTarget]] = {}
    for t in targets:
        if t.key != t.source:
            untied.setdefault(t.source, []).append(t)
    ops = []
    for key, info in base.tensors.items():
        out_dtype = dtype if dtype and info.dtype in FLOAT_DTYPES else info.dtype
        shape, value = replaced.get(key, (info.shape, None))
        ops.append(Op(TensorSpec(key, out_dtype, shape), info.shard, key, info.dtype, merged.get(key, ()), value))
        for t in untied.get(key, []):
            ops.append(Op(TensorSpec(t.key, out_dtype, info.shape), info.shard, key, info.dtype, (t,)))
    return ops


def _layout(base: BaseCheckpoint, ops: list[Op], max_shard_size: int | None, stamp: dict[str, str]) -> list[OutShard]:
    """Keep the base's shards, or pack tensors in order into shards of at most `max_shard_size` bytes.

    Every shard gets format pt and `stamp` (polytool's provenance) in its metadata.
    """
    def metadata(shard: str | None) -> dict[str, str]:
        return {**(base.shard_metadata.get(shard, {}) if shard else {}), **stamp, "format": "pt"}

    if max_shard_size is None:
        shards = {name: OutShard(name, metadata(name)) for name in base.shards}
        for op in ops:
            shards[op.shard].ops.append(op)
        return list(shards.values())
    groups: list[list[Op]] = [[]]
    size = 0
    for op in ops:
        if groups[-1] and size + op.out.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(op)
        size += op.out.nbytes
    if len(groups) == 1:
        return [OutShard(SINGLE_NAME, metadata(None), groups[0])]
    n = len(groups)
    return [OutShard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", metadata(None), g) for i, g in enumerate(groups)]


def _index(base: BaseCheckpoint, shards: list[OutShard], repacked: bool) -> dict | None:
    if (base.index_metadata is None and not repacked) or (repacked and len(shards) == 1):
        return None
    # what transformers writes, recomputed: a base's wrong figure is not carried over
    metadata = dict(base.index_metadata or {})
    metadata["total_size"] = sum(op.out.nbytes for s in shards for op in s.ops)
    if "total_parameters" in metadata:
        metadata["total_parameters"] = sum(prod(op.out.shape) for s in shards for op in s.ops)
    return {"metadata": metadata, "weight_map": {op.out.name: s.name for s in shards for op in s.ops}}


def _config(base: BaseCheckpoint, targets: list[WeightTarget], dtype: str | None,
            replaced: dict[str, Replacement]) -> dict | None:
    config = dict(base.config)
    vocab = vocab_size(base, {key: shape for key, (shape, _) in replaced.items()})
    if vocab is not None:  # a resized vocabulary: where the config keeps it (a nested text config's own)
        text = config.get("text_config")
        if "vocab_size" in config or not (isinstance(text, dict) and "vocab_size" in text):
            config["vocab_size"] = vocab
        if isinstance(text, dict) and "vocab_size" in text:
            config["text_config"] = {**text, "vocab_size": vocab}
    if any(t.tied_to for t in targets):
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    if dtype and dtype != base.dtype:
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = TORCH_NAMES[dtype]
    return None if config == base.config else config


def _entry_bytes(path: Path, top: Path, ancestors: frozenset) -> int:
    """Size of a file or directory to copy along, following symbolic links as the copy will; refuses
    broken links, link loops and what is neither file nor directory (a pipe, socket or device)."""
    name = path.relative_to(top)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{name} is a broken symbolic link, which cannot be copied along: remove or fix it", top) from None
    except OSError as exc:  # a link loop, no permission
        raise CheckpointError(f"{name} cannot be copied along: {exc.strerror}", top) from None
    if stat.S_ISREG(info.st_mode):
        return info.st_size
    if not stat.S_ISDIR(info.st_mode):
        raise CheckpointError(f"{name} is not a regular file or directory (a pipe, socket or device): "
                              "it cannot be copied along: remove it", top)
    if (info.st_dev, info.st_ino) in ancestors:
        raise CheckpointError(f"{name} is a symbolic link to a directory that contains it (a loop): remove it", top)
    inside = ancestors | {(info.st_dev, info.st_ino)}
    return sum(_entry_bytes(child, top, inside) for child in sorted(path.iterdir()))


def _others(base: BaseCheckpoint) -> tuple[list[str], int]:
    """The base's other entries (config, tokenizer, ...) and their size, checked to be copyable."""
    names = base.other_entries()
    top = os.stat(base.directory)
    return names, sum(_entry_bytes(base.directory / n, base.directory, frozenset({(top.st_dev, top.st_ino)})) for n in names)


def check_dense_spec(spec: TaskSpec) -> None:
    if spec == "all":
        raise PolytoolError("--task all writes one LoRA per task; a dense merge takes one task (an id, uniform or mean)")


def plan_merge(adapter: PolyAdapter, spec: TaskSpec, base: BaseCheckpoint,
               options: DenseOptions = DenseOptions()) -> MergePlan:
    """Validate and lay out a dense merge of task spec `spec` into `base` (nothing is written)."""
    check_dense_spec(spec)
    check_collapsible(adapter, base)
    check_tied_copies(adapter, base)
    whole = {**saved_module_keys(adapter, base), **resized_embeddings(adapter, base)}
    heads = {key: (adapter.tensor_shape(adapter_key), lambda k=adapter_key: adapter.tensor(k, np.float64))
             for key, adapter_key in whole.items()}
    return plan_dense(base, adapter.modules, provenance(adapter, spec, routing=False, request=options.request), options, spec, heads)


def plan_dense(base: BaseCheckpoint, modules: Iterable, stamp: dict[str, str], options: DenseOptions = DenseOptions(),
               spec: TaskSpec | None = None, replaced: dict[str, Replacement] | None = None) -> MergePlan:
    """Validate and lay out a dense merge of deltas for `modules` (name, in_features, out_features) into
    `base`; every shard's metadata gets `stamp` (provenance). `replaced` {base key: (its shape, its new value)}:
    tensors written whole instead of the base's (a trained head of modules_to_save, resized embeddings)."""
    dtype, max_shard_size = options.dtype, options.max_shard_size
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise PolytoolError(f"output dtype {dtype!r} is not allowed: {', '.join(FLOAT_DTYPES)}")
    targets = match_targets(base, modules, options.untie)
    replaced = replaced or {}
    if set(replaced) & {t.source for t in targets}:
        raise PolytoolError("a module is both adapted by Poly and trained whole (modules_to_save): not supported")
    ops = _ops(base, targets, dtype, replaced)
    shards = _layout(base, ops, max_shard_size, stamp)
    return MergePlan(base, spec, targets, shards, _index(base, shards, max_shard_size is not None),
                     _config(base, targets, dtype, replaced), *_others(base))


# ---- writing ---------------------------------------------------------------------------------


def _factors(adapter: PolyAdapter, module: str, spec: TaskSpec) -> tuple[np.ndarray, np.ndarray]:
    """This module's collapsed A (in, r), B (r, out), float64, through the one collapse formula."""
    return collapse_factors(adapter.poly_A(module), adapter.poly_B(module), adapter.spec_weights(module, spec))


def factored_delta(A: np.ndarray, B: np.ndarray, r: float, wide: type) -> Delta:
    """The delta of the update x @ A @ B / r, A (in, k), B (k, out), by blocks of rows, never formed whole."""
    # (in, k), (k, out) in Fortran order: A.T, B.T and B[:, lo:hi].T are C-contiguous, which BLAS
    # multiplies an order of magnitude faster than strided operands at r of 8 or so
    A, B = (np.asfortranarray(f, dtype=wide) for f in (A, B))

    def add(lo: int, hi: int, transposed: bool, into: np.ndarray, out: np.ndarray | None = None) -> None:
        if transposed:  # Conv1D's (in, out): (rows, out)
            into += stored_delta(A, B, r, True, lo, hi)
        else:  # (rows, in): one BLAS pass where it can (core/collapse.add_stored_delta)
            add_stored_delta(A, B, r, lo, hi, into, out)
    return add


def dense_rows(D: np.ndarray, wide: type) -> Delta:
    """A delta held whole, D (out, in), by blocks of rows."""
    def add(lo: int, hi: int, transposed: bool, into: np.ndarray, out: np.ndarray | None = None) -> None:
        into += (D[:, lo:hi].T if transposed else D[lo:hi]).astype(wide, copy=False)  # (rows, out) or (rows, in)
    return add


def adapter_deltas(adapter: PolyAdapter, spec: TaskSpec) -> DeltaSource:
    """One task spec of a Poly adapter as a DeltaSource: its collapsed factors, through the one formula."""
    return lambda module, wide: factored_delta(*_factors(adapter, module, spec), adapter.r, wide)


def _whole_file(plan: MergePlan, shard: OutShard) -> bool:
    """A shard rewritten exactly as it is: copy the file."""
    return (all(op.kind == "copied" and op.shard == shard.name for op in shard.ops)
            and [op.source for op in shard.ops] == [k for k, i in plan.base.tensors.items() if i.shard == shard.name]
            and plan.base.shard_metadata.get(shard.name, {}).get("format") == "pt")


def _follows(st: SafetensorsFile, prev: Op, op: Op) -> bool:
    """`op`'s source starts where `prev`'s ends, in the same file: one copy covers both."""
    return prev.shard == op.shard and st.entries[op.source]["offsets"][0] == st.entries[prev.source]["offsets"][1]


def _write_shard(plan: MergePlan, shard: OutShard, deltas: DeltaSource, path: Path, pool: Executor | None,
                 released: list) -> Iterator[Op]:
    """Write one output shard; runs of adjacent untouched tensors are copied in one call. The finished file's
    writeback is started and the file closed on the pool (its future appended to `released`)."""
    sources: dict[str, tuple[SafetensorsFile, int]] = {}  # base shard -> (header, fd for pread)
    try:
        with SafetensorsWriter(path, [op.out for op in shard.ops], shard.metadata, pool) as writer:
            run: list[Op] = []
            for op in shard.ops:
                if op.shard not in sources:
                    st = SafetensorsFile(plan.base.directory / op.shard)
                    sources[op.shard] = (st, os.open(st.path, os.O_RDONLY))
                st, fd = sources[op.shard]
                if run and not (op.kind == "copied" and _follows(st, run[-1], op)):
                    writer.copy([o.source for o in run], sources[run[0].shard][0])
                    yield from run
                    run = []
                if op.kind == "copied":
                    run.append(op)
                else:  # each block written at its place by the thread that computed it
                    writer.place(op.out.name, lambda out, start: blocks(op, st, fd, deltas, pool, (out, start)))
                    yield op
            if run:
                writer.copy([o.source for o in run], sources[run[0].shard][0])
                yield from run
        if writer.released is not None:
            released.append(writer.released)
    finally:
        for st, fd in sources.values():
            os.close(fd)
            st.close()


def _steps(plan: MergePlan, deltas: DeltaSource, directory: Path, pool: Executor | None) -> Iterator[Op]:
    """Write every shard; yields each op once its tensor is written. Shards copied whole are copied on the pool's
    threads (in the kernel) while the others are merged, and counted last."""
    whole = [shard for shard in plan.shards if _whole_file(plan, shard)]
    copy = lambda shard: shutil.copyfile(plan.base.directory / shard.name, directory / shard.name)
    copies = [pool.submit(copy, shard) for shard in whole] if pool is not None else []
    released: list = []  # written shards being closed on the pool
    try:
        for shard in plan.shards:
            if not any(shard is w for w in whole):
                yield from _write_shard(plan, shard, deltas, directory / shard.name, pool, released)
        for i, shard in enumerate(whole):
            copies[i].result() if copies else copy(shard)
            yield from shard.ops
        for future in released:
            future.result()  # a failed close is an error of the merge
    finally:  # stopped early: no copy may still be writing into the directory, no file left open
        wait(copies + released)


def write_merge(plan: MergePlan, deltas: DeltaSource, directory: Path, progress: Progress | None = None,
                texts: dict[str, str] | None = None) -> dict:
    """Write the planned model into the existing empty `directory`; returns what was written. `texts`: files
    written in place of the base's (README.md: a merged model must not call itself the base; recipe.yml)."""
    counts = {"merged": 0, "copied": 0, "converted": 0, "replaced": 0}
    # thin (rows, r) @ (r, in) products: BLAS's own threads cost more than they give (core/blas.py); blocks of
    # rows are computed on a few threads instead, while this one writes (collapse/blocks.py)
    with one_blas_thread(), block_pool() as pool:
        steps = _steps(plan, deltas, directory, pool)
        for op in progress(steps, plan.n_tensors, "merging") if progress else steps:
            counts[op.kind] += 1
    if plan.index is not None:
        write_json(directory / INDEX_NAME, plan.index)
    texts = texts or {}
    for name, text in texts.items():
        (directory / name).write_text(text, encoding="utf-8", errors="backslashreplace")
    for name in plan.others:
        src, dst = plan.base.directory / name, directory / name
        if name in texts:
            continue
        if name == "config.json" and plan.config is not None:
            write_json(dst, plan.config)
        elif src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    return {"files": files, "tensors_merged": counts["merged"], "tensors_copied": counts["copied"],
            "tensors_converted": counts["converted"], "tensors_replaced": counts["replaced"], "bytes": sum((directory / f).stat().st_size for f in files)}


def _check_space(plan: MergePlan, out: Path) -> None:
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    need, free = plan.nbytes(), shutil.disk_usage(parent).free
    if need > free:
        raise PolytoolError(f"not enough disk space for {out}: the merged model needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB free")


def merge_dense(adapter: PolyAdapter, spec: TaskSpec, base_dir: Path, out: Path,
                options: DenseOptions = DenseOptions(), progress: Progress | None = None) -> dict:
    """Merge task spec `spec` into the base at `base_dir`, writing a complete model directory at `out` atomically."""
    base = open_base(base_dir)
    check_output(out, options.force, inputs=[adapter.directory, base.directory])
    plan = plan_merge(adapter, spec, base, options)
    card = {"README.md": dense_card(adapter, spec, base_dir)}
    return write_planned(plan, adapter_deltas(adapter, spec), out, options, progress, card)


def write_planned(plan: MergePlan, deltas: DeltaSource, out: Path, options: DenseOptions = DenseOptions(),
                  progress: Progress | None = None, texts: dict[str, str] | None = None) -> dict:
    """Write a planned dense merge at `out` atomically, after checking the disk space; returns what was written."""
    _check_space(plan, out)
    with atomic_output_dir(out, options.force) as tmp:
        written = write_merge(plan, deltas, tmp, progress, texts)
    return {**written, "base": str(plan.base.directory), "dtype": TORCH_NAMES.get(options.dtype or plan.base.dtype),
            "untied": sorted(t.key for t in plan.targets if t.tied_to)}
