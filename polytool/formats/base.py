"""A base model directory as a safetensors checkpoint, and where each adapted module's weight lives.

    config.json                        model_type, tie_word_embeddings, dtype
    model.safetensors                  one file, or
    model.safetensors.index.json       {"metadata": {"total_size"}, "weight_map": {tensor: shard}}
    model-0000i-of-0000N.safetensors   the shards

`open_base` reads only headers (no tensor data). `match_targets` maps every adapted module to
exactly one checkpoint weight of the right shape, or raises naming the module: exact
`<path>.weight` first, else the unique key one leading wrapper component away (`model.`,
`bert.`, `transformer.`, ...), else through the family's own renaming of its checkpoint keys (a `Renamer`:
the product's is formats/conversion.py, transformers' conversion mapping, which needs torch; `open_base(dir,
renamer=None)` stays torch-free and matches names as they are). Torch-free itself.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .safetensors import FLOAT_DTYPES, SafetensorsFile, read_index
from .hub import local_or_hub
from .jsonfile import parse_json
from ..architectures import CONV1D_MODEL_TYPES, INPUT_EMBEDDING_NAMES, OUTPUT_EMBEDDINGS
from ..errors import CheckpointError

SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# weights of other frameworks: never copied into a merged model (they would hold the unmerged weights)
FOREIGN_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json", "tf_model*.h5", "tf_model.h5.index.json",
                   "flax_model*.msgpack", "flax_model.msgpack.index.json", "model.ckpt*")
INPUT_EMBEDDINGS = tuple(f"{name}.weight" for name in INPUT_EMBEDDING_NAMES)


@dataclass(frozen=True)
class Placement:
    """Where a model tensor lies in the checkpoint: key `key`, whole, or its rows [lo, hi) (`rows`: a fused
    tensor that the family's conversion splits along its rows on load, e.g. a `qkv` projection); `transposed`:
    the key holds the tensor transposed (the conversion transposes it on load)."""

    key: str
    rows: tuple[int, int] | None = None
    transposed: bool = False


# (base, model tensor name) -> the checkpoint key it is renamed from (a Placement, or (key, rows, transposed), where
# it is a block of a key's rows or stored transposed), or None: a family's conversion of its names
Renamer = Callable[["BaseCheckpoint", str], "str | Placement | tuple | None"]


@dataclass(frozen=True)
class TensorInfo:
    shard: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class WeightTarget:
    """Where one adapted module is merged: `source` is read from the base, `key` written out."""

    module: str
    key: str
    source: str
    transposed: bool  # Conv1D: the weight is stored (in, out)
    tied_to: str | None  # the weight this one is tied to (merged only with --untie)
    rows: tuple[int, int] | None = None  # the module's weight is rows [lo, hi) of `source` (split on load)


class BaseCheckpoint:
    """A validated safetensors base directory: config, shard layout, every tensor's dtype and shape."""

    def __init__(self, directory: Path, renamer: Renamer | None = None):
        self.directory = directory
        self.renamer = renamer
        self.config = read_config(directory)
        self.model_type = str(self.config.get("model_type", ""))
        self.conv1d = self.model_type in CONV1D_MODEL_TYPES
        self.tie_word_embeddings = bool(self.config.get("tie_word_embeddings", True))
        self.index_metadata: dict | None = None  # None: a single model.safetensors
        self.tensors: dict[str, TensorInfo] = {}  # in shard order, then file order
        self.shard_metadata: dict[str, dict[str, str]] = {}
        if (directory / INDEX_NAME).is_file():
            self.index_metadata, weight_map = read_index(directory / INDEX_NAME)
            shards = list(dict.fromkeys(weight_map.values()))
        elif (directory / SINGLE_NAME).is_file():
            weight_map, shards = None, [SINGLE_NAME]
        else:
            raise _missing_weights(directory)
        for shard in shards:
            self._read_shard(shard)
        if weight_map is not None:
            for key, shard in weight_map.items():
                if self.tensors.get(key, TensorInfo("", "", ())).shard != shard:
                    raise CheckpointError(f"the index maps {key!r} to {shard}, which does not hold it", directory / INDEX_NAME)

    def _read_shard(self, shard: str) -> None:
        path = self.directory / shard
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "is missing"
            raise CheckpointError(f"shard {shard} named by the index {what}", self.directory)
        with SafetensorsFile(path) as st:
            self.shard_metadata[shard] = dict(st.metadata)
            for key in st.keys():
                if key in self.tensors:
                    raise CheckpointError(f"tensor {key!r} is stored twice ({self.tensors[key].shard} and {shard})", self.directory)
                self.tensors[key] = TensorInfo(shard, st.dtype(key), st.shape(key))

    def locate(self, name: str) -> str | None:
        """The checkpoint key holding model tensor `name` (`<module path>.<param>`), whole or in a block of its
        rows (see place); None when there is none."""
        found = self.place(name)
        return None if found is None else found.key

    def place(self, name: str) -> Placement | None:
        """Where model tensor `name` lies: find_tensor's key, else the key the family's conversion renames to it
        or splits it from (self.renamer; none without one); None when there is none."""
        found = find_tensor(name, self.tensors)
        if found is None and self.renamer is not None:
            found = self.renamer(self, name)
        if isinstance(found, tuple):  # (key, (lo, hi) or None, transposed): a Renamer of plain types (verify's)
            found = Placement(*found)
        return Placement(found) if isinstance(found, str) else found

    @property
    def shards(self) -> list[str]:
        return list(self.shard_metadata)

    @property
    def dtype(self) -> str:
        """The most common floating dtype of the weights (what `--dtype auto` keeps)."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            if info.dtype in FLOAT_DTYPES:
                counts[info.dtype] = counts.get(info.dtype, 0) + 1
        return max(counts, key=counts.get) if counts else "F32"

    def weight_files(self) -> set[str]:
        """The top-level file names that hold this checkpoint's weights (shards and index)."""
        return set(self.shards) | ({INDEX_NAME} if self.index_metadata is not None else set())

    def other_entries(self) -> list[str]:
        """Everything else in the directory (config, tokenizer, modules.json, 1_Pooling/, ...), by name."""
        import fnmatch

        skip = self.weight_files() | {".git"}
        return sorted(p.name for p in self.directory.iterdir()
                      if p.name not in skip and not any(fnmatch.fnmatch(p.name, pat) for pat in FOREIGN_WEIGHTS))


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError("no config.json: not a transformers model directory", directory)
    try:
        config = parse_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read ({exc.__class__.__name__}: {exc})", path) from None
    if not isinstance(config, dict):
        raise CheckpointError("not a JSON object", path)
    if not isinstance(config.get("tie_word_embeddings", True), (bool, type(None))):
        raise CheckpointError(f"tie_word_embeddings must be true or false, got {config['tie_word_embeddings']!r}", path)
    return config


def _missing_weights(directory: Path) -> CheckpointError:
    if any(directory.glob("pytorch_model*.bin")):
        return CheckpointError("holds only PyTorch .bin weights; polytool merges safetensors checkpoints only "
                               "(convert once: from_pretrained(...).save_pretrained(dir), which writes safetensors)", directory)
    return CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME}: not a safetensors model directory", directory)


def family_renamer(base: BaseCheckpoint, name: str) -> str | None:
    """The product's Renamer: transformers' conversion of the family's checkpoint names (formats/conversion.py,
    imported only when a name is not a key as it is: it needs torch)."""
    from .conversion import checkpoint_key

    return checkpoint_key(base, name)


def open_base(directory: str | Path, renamer: Renamer | None = family_renamer) -> BaseCheckpoint:
    """Open and validate a base model directory (headers only). `renamer`: where a model tensor name is not a
    checkpoint key, (base, name) -> the key the family's conversion renames to it (None: names as they are)."""
    return BaseCheckpoint(require_dir(Path(directory), "base model directory"), renamer)


# ---- locating the base -----------------------------------------------------------------------


def is_directory(path: Path) -> bool:
    """Path.is_dir, False (not an exception) for names the file system refuses (too long, a NUL byte)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False


def require_dir(path: Path, what: str) -> Path:
    """`path` if it is a directory; else CheckpointError saying it is a file, or missing."""
    if is_directory(path):
        return path
    try:
        exists = path.exists()
    except (OSError, ValueError):
        exists = False
    article = "an" if what[0] in "aeiou" else "a"
    raise CheckpointError(f"is a file, expected {article} {what}" if exists else f"no such {what}", path)


def resolve_base_dir(base: str | Path | None, name_or_path: str | None, revision: str | None = None,
                     download: bool = True) -> Path:
    """--base if given, else the adapter's base_model_name_or_path: a local directory, else a hub id resolved
    through huggingface_hub (formats/hub.py) at the adapter's pinned `revision`. --base naming the same repo as
    the adapter keeps the pin; a local directory (that exists) always wins. `download=False`: the cache only
    (a base read for optional checks is never downloaded)."""
    hint = "" if base is not None else ": pass --base DIR"
    if base is None and not name_or_path:
        raise CheckpointError("the adapter does not name its base model (base_model_name_or_path): pass --base DIR")
    name = str(base) if base is not None else str(name_or_path)
    pinned = revision if name == name_or_path else None
    return require_dir(local_or_hub(name, pinned, "base model directory", hint, download), "base model directory")


def optional_base(base: str | Path | None, name_or_path: str | None, revision: str | None = None) -> Path | None:
    """The base a command reads only for its checks: --base (which must work), else the recorded base when it
    is at hand (a local directory or a cached snapshot, never downloaded); None when it is not."""
    try:
        return resolve_base_dir(base, name_or_path, revision, download=base is not None)
    except CheckpointError:
        if base is not None:
            raise
        return None


# ---- matching adapted modules to checkpoint weights -------------------------------------------


def find_key(path: str, keys: Iterable[str]) -> str | None:
    """The checkpoint key of module `path`'s weight (see find_tensor)."""
    return find_tensor(path + ".weight", keys)


def find_tensor(name: str, keys: Iterable[str]) -> str | None:
    """The checkpoint key of tensor `name` (`<module path>.<param>`): exact, else the unique key one leading
    component away (`bert.` added or `model.` dropped: a checkpoint saved from another head class)."""
    keys = keys if isinstance(keys, (set, dict)) else set(keys)
    if name in keys:
        return name
    rest = name.partition(".")[2]
    found = {rest} if rest and rest in keys else set()
    found |= {k for k in keys if k.endswith("." + name) and "." not in k[: -len(name) - 1]}
    if len(found) > 1:
        raise CheckpointError(f"{name!r} matches several tensors of the checkpoint ({', '.join(sorted(found))})")
    return found.pop() if found else None


def _is_output_embedding(path: str) -> bool:
    return any(path == name or path.endswith("." + name) for name in OUTPUT_EMBEDDINGS)


def _tied_source(base: BaseCheckpoint, shape: tuple[int, int]) -> str | None:
    found = [k for k, info in base.tensors.items() if k.endswith(INPUT_EMBEDDINGS) and info.shape == shape]
    return found[0] if len(found) == 1 else None


def match_target(base: BaseCheckpoint, module: str, in_features: int, out_features: int, untie: bool) -> WeightTarget:
    """One adapted module -> its WeightTarget, checking shape and weight tying; raises naming the module."""
    transposed = base.conv1d and not _is_output_embedding(module)
    shape = (in_features, out_features) if transposed else (out_features, in_features)
    tied_output = base.tie_word_embeddings and _is_output_embedding(module)
    tied_key = find_key(module, base.tensors) if tied_output else None
    placed = (Placement(tied_key) if tied_key else None) if tied_output else base.place(module + ".weight")
    key, rows = (placed.key, placed.rows) if placed else (None, None)
    if placed and placed.transposed:  # a weight the conversion transposes on load: stored the other way round
        transposed, shape = not transposed, shape[::-1]
    tied_to = None
    if key is None:
        source = _tied_source(base, shape) if tied_output else None
        if source is None:
            raise CheckpointError(f"module {module!r} of the adapter has no weight in the base checkpoint (looked "
                                  f"for {module}.weight, with or without a leading prefix, and as the family's "
                                  "conversion renames it): wrong base model?", base.directory)
        key, tied_to = module + ".weight", source
    else:
        source = key
        if tied_output:
            tied_to = _tied_source(base, shape) or "the input embeddings"
    info = base.tensors[source]
    stored = info.shape if rows is None else (rows[1] - rows[0], *info.shape[1:])
    if stored != shape or (rows and transposed):
        layout = "(in, out) as Conv1D stores it" if transposed else "(out, in)"
        part = "" if rows is None else f" rows {rows[0]}:{rows[1]}"
        raise CheckpointError(f"module {module!r}: the adapter needs a weight of shape {list(shape)} {layout}, "
                              f"but {source}{part} is {list(stored)}: wrong base model?", base.directory)
    if info.dtype not in FLOAT_DTYPES:
        raise CheckpointError(f"module {module!r}: weight {source} has dtype {info.dtype}; only float weights can be merged", base.directory)
    if tied_to and not untie:
        raise CheckpointError(f"module {module!r} is tied to {tied_to} (config.json tie_word_embeddings is true): "
                              f"merging into it would change the input embeddings too. Pass --untie to write "
                              f"{key} separately and set tie_word_embeddings false", base.directory)
    return WeightTarget(module, key, source, transposed, tied_to, rows)


def match_targets(base: BaseCheckpoint, modules: Iterable, untie: bool = False) -> list[WeightTarget]:
    """Every adapted module (objects with name, in_features, out_features) -> its WeightTarget; several modules
    may share a key only in disjoint blocks of its rows (a fused projection split on load)."""
    targets = [match_target(base, m.name, m.in_features, m.out_features, untie) for m in modules]
    seen: dict[str, list[WeightTarget]] = {}
    for t in targets:
        for other in seen.get(t.key, []):
            if t.rows is None or other.rows is None or (t.rows[0] < other.rows[1] and other.rows[0] < t.rows[1]):
                raise CheckpointError(f"modules {other.module!r} and {t.module!r} both map to {t.key}", base.directory)
        seen.setdefault(t.key, []).append(t)
    return targets
