"""A dense artifact checked in weight space, exactly, tensor by tensor (streamed: one tensor at a time).

    merged tensor     == base weight + the reference's float64 update, rounded once to the stored dtype,
                         within one unit in the last place (ulp) of that dtype
    trained head      == the adapter's modules_to_save copy, rounded once (within one ulp)
    any other tensor  == the base's, byte for byte (or, where the artifact was written in another dtype,
                         the base's value rounded once)

The update comes from polytool/reference.py, not from the code that wrote the artifact, so a wrong
formula there shows up here even where rounding would hide it in the forward (one weight two ulps off).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..adapter import PolyAdapter
from ..basemodel import match_targets, open_base
from ..checkpoint import SafetensorsFile
from ..export import saved_module_keys

# stored dtype -> (explicit mantissa bits, smallest normal exponent)
FORMATS = {"F64": (52, -1022), "F32": (23, -126), "BF16": (7, -126), "F16": (10, -14)}


def ulps(got: np.ndarray, want: np.ndarray, dtype: str) -> float:
    """max |got - want| in units of the last place of `dtype` at `want`'s magnitude (float64 inputs)."""
    if got.size == 0:
        return 0.0
    bits, emin = FORMATS[dtype]
    exponent = np.floor(np.log2(np.maximum(np.abs(want), np.finfo(np.float64).tiny)))
    unit = np.exp2(np.maximum(exponent, emin) - bits)
    with np.errstate(invalid="ignore"):
        err = np.abs(got - want) / unit
    return float(np.inf) if not np.isfinite(err).all() else float(err.max())


def check_dense_weights(path: Path, base_dir: Path, adapter: PolyAdapter, delta: Any) -> dict:
    """{"merged", "replaced", "identical", "max_ulps", "first_bad", "first_bad_ulps"} for the dense model at `path`;
    `delta(module)` is the reference's (out, in) float64 update of each adapted module."""
    dense, base = open_base(path), open_base(base_dir)
    merged = {t.key: t for t in match_targets(base, adapter.modules, untie=True)}
    replaced = saved_module_keys(adapter, base)
    counts = {"merged": 0, "replaced": 0, "identical": 0}
    worst, first_bad, first_bad_ulps = 0.0, None, None
    files: dict[Path, SafetensorsFile] = {}

    def opened(file: Path) -> SafetensorsFile:
        if file not in files:
            files[file] = SafetensorsFile(file)
        return files[file]

    try:
        for key, info in dense.tensors.items():
            st = opened(path / info.shard)
            target = merged.get(key)
            source = target.source if target else key
            base_st = opened(base_dir / base.tensors[source].shard)
            if target is None and key not in replaced:
                if info.dtype == base.tensors[key].dtype:
                    same = bytes(st.raw(key)) == bytes(base_st.raw(key))
                    error = 0.0 if same else np.inf
                else:
                    error = ulps(st.float_array(key), base_st.float_array(key), info.dtype)
                counts["identical"] += 1
            else:
                if target is not None:
                    update = delta(target.module).numpy()  # (out, in), float64: the reference's
                    want = base_st.float_array(source) + (update.T if target.transposed else update)
                    counts["merged"] += 1
                else:
                    want = adapter.tensor(replaced[key], np.float64)
                    counts["replaced"] += 1
                error = ulps(st.float_array(key), want, info.dtype)
                worst = max(worst, error)
            if not error <= 1.0 and first_bad is None:
                first_bad, first_bad_ulps = key, error
    finally:
        for st in files.values():
            st.close()
    return {**counts, "max_ulps": worst, "first_bad": first_bad,
            "first_bad_ulps": None if first_bad_ulps is None or not np.isfinite(first_bad_ulps) else first_bad_ulps}
