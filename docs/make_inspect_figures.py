"""Make the figures shown in docs/inspect.md: `inspect --plot` of the two fixtures and of a generated
adapter of 32 layers x 7 modules x 40 tasks (deterministic: numpy seeded, no torch).

The generated adapter has structure to find: 40 tasks in 5 families that share a routing pattern,
routing that sharpens with depth (near-uniform in the first layers, close to one skill in the last),
and skill 7 switched off for every task in the MLP of the upper half.

Usage: python docs/make_inspect_figures.py      (writes docs/images/inspect-*.png)
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from polytool.formats.adapter import load_adapter  # noqa: E402
from polytool.formats.jsonfile import write_json  # noqa: E402
from polytool.formats.safetensors_writer import save_file  # noqa: E402
from polytool.inspect.plot import write_figure  # noqa: E402
from polytool.inspect.report import build_report  # noqa: E402

OUT = ROOT / "docs" / "images"
LAYERS, TASKS, SKILLS, FAMILIES, R, D = 32, 40, 8, 5, 2, 8
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_generated(directory: Path) -> Path:
    """The 32 x 7 x 40 adapter: logits = depth-scaled family pattern + task noise (A and B are tiny)."""
    rng = np.random.default_rng(27)
    family = np.arange(TASKS) % FAMILIES  # task t belongs to family t % 5
    tensors = {}
    for layer in range(LAYERS):
        sharp = 0.3 + 5.0 * layer / (LAYERS - 1)  # logits grow with depth: routing sharpens
        for proj in PROJ:
            pattern = rng.standard_normal((FAMILIES, SKILLS))  # (families, s)
            z = sharp * pattern[family] + 0.5 * rng.standard_normal((TASKS, SKILLS))  # (t, s)
            if proj.startswith("mlp") and layer >= LAYERS // 2:
                z[:, 7] = -6.0  # skill 7 unused by every task
            key = f"base_model.model.model.layers.{layer}.{proj}"
            tensors[f"{key}.poly_lora_A"] = rng.standard_normal((1, SKILLS, D, R)).astype(np.float32)
            tensors[f"{key}.poly_lora_B"] = np.zeros((1, SKILLS, R, D), np.float32)
            tensors[f"{key}.poly_router.module_logits"] = z.astype(np.float32)
    directory.mkdir(parents=True)
    save_file(directory / "adapter_model.safetensors", tensors, {"format": "pt"})
    write_json(directory / "adapter_config.json", {
        "peft_type": "POLY", "poly_type": "poly", "task_type": "CAUSAL_LM", "r": R, "n_tasks": TASKS,
        "n_skills": SKILLS, "n_splits": 1, "target_modules": sorted(p.split(".")[1] for p in PROJ),
        "base_model_name_or_path": None})
    return directory


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {"mhr": ROOT / "fixtures" / "mhr", "poly": ROOT / "fixtures" / "poly",
                    "32x7x40": write_generated(Path(tmp) / "generated-32x7x40")}
        for name, adapter in adapters.items():
            out = write_figure(build_report(load_adapter(adapter)), OUT / f"inspect-{name}.png", force=True)
            print(f"{out.relative_to(ROOT)}  {out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
