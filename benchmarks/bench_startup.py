"""Start-up cost: `polytool --help` and `polytool inspect --json` against a torch-based read.

Generates a Llama-shaped MHR adapter (8 layers x 7 targets, hidden 1024, intermediate 2816, r 8,
8 skills, 4 splits, 6 tasks: about 40 MB of float32) with numpy + safetensors into a temporary
directory, then times each command as a fresh subprocess (wall time, best of N):

    polytool --help
    polytool inspect DIR --json
    python -c "import torch, safetensors.torch; safetensors.torch.load_file(...)"   (reading alone)
    python -c "import torch"                                                         (the floor)

Usage: python benchmarks/bench_startup.py [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

HIDDEN, INTERMEDIATE, LAYERS = 1024, 2816, 8
R, SKILLS, SPLITS, TASKS = 8, 8, 4, 6
TARGETS = {  # name -> (in, out)
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN, HIDDEN),
    "self_attn.v_proj": (HIDDEN, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (HIDDEN, INTERMEDIATE), "mlp.up_proj": (HIDDEN, INTERMEDIATE),
    "mlp.down_proj": (INTERMEDIATE, HIDDEN),
}


def make_adapter(out: Path) -> int:
    """Write the adapter into `out`; return the weights file's size in bytes."""
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(LAYERS):
        for target, (d_in, d_out) in TARGETS.items():
            key = f"base_model.model.model.layers.{layer}.{target}"
            tensors[f"{key}.poly_lora_A"] = rng.standard_normal((SPLITS, SKILLS, d_in // SPLITS, R), np.float32) * 0.02
            tensors[f"{key}.poly_lora_B"] = rng.standard_normal((SPLITS, SKILLS, R, d_out // SPLITS), np.float32) * 0.02
            tensors[f"{key}.poly_router.module_logits"] = rng.standard_normal((TASKS, SPLITS * SKILLS), np.float32) * 2
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "POLY", "poly_type": "poly", "r": R, "n_tasks": TASKS, "n_skills": SKILLS,
              "n_splits": SPLITS, "target_modules": sorted(t.split(".")[-1] for t in TARGETS),
              "base_model_name_or_path": "llama-1024-synthetic", "task_type": "CAUSAL_LM"}
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return (out / "adapter_model.safetensors").stat().st_size


def best_of(cmd: list[str], repeat: int) -> float:
    """Fastest wall time of `repeat` runs of `cmd` (each must succeed)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def polytool_command() -> str:
    """The installed polytool command beside this Python (else on PATH); exits naming the install step."""
    exe = shutil.which("polytool", path=str(Path(sys.executable).parent)) or shutil.which("polytool")
    if exe is None:
        sys.exit("the polytool command is not installed (pip install -e .)")
    return exe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the best is reported")
    args = parser.parse_args()
    polytool = [polytool_command()]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp)
        size = make_adapter(adapter)
        weights = adapter / "adapter_model.safetensors"
        commands = {
            "polytool --help": polytool + ["--help"],
            "polytool inspect --json": polytool + ["inspect", str(adapter), "--json"],
            "torch + safetensors.torch.load_file": [
                sys.executable, "-c", f"import torch, safetensors.torch; safetensors.torch.load_file({str(weights)!r})"],
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        }
        print(f"adapter: {LAYERS} layers x {len(TARGETS)} targets, r={R}, skills={SKILLS}, splits={SPLITS}, "
              f"tasks={TASKS}: {size / 1e6:.1f} MB; best of {args.repeat}")
        times = {name: best_of(cmd, args.repeat) for name, cmd in commands.items()}
    inspect_s = times["polytool inspect --json"]
    for name, seconds in times.items():
        print(f"  {name:<38} {seconds:7.3f} s   {seconds / inspect_s:5.2f}x inspect")
    read_s, torch_s = times["torch + safetensors.torch.load_file"], times["python -c 'import torch'"]
    print(f"summary: inspect answers in {inspect_s:.2f} s, {read_s / inspect_s:.1f}x faster than only reading "
          f"the adapter with torch ({read_s:.2f} s; import torch alone {torch_s:.2f} s)")


if __name__ == "__main__":
    main()
