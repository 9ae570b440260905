"""The adapter reader's bad inputs, each through the CLI: exit code 2, one line naming the problem,
no traceback, and the input left untouched. Plus the inputs it must accept (.bin, one subfolder)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from polytool.cli import main

from conftest import tree_hash

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
ST, CONFIG, BIN = "adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"
DOWN = "base_model.model.model.layers.0.mlp.down_proj"


@pytest.fixture(scope="session")
def good_adapter(tmp_path_factory) -> Path:
    """A valid hand-made MHR adapter: 3 tasks, 4 skills, 2 splits, r 2, two modules."""
    out = tmp_path_factory.mktemp("good") / "adapter"
    out.mkdir()
    rng = np.random.default_rng(0)
    tensors = {}
    for key, d_in, d_out in ((Q_PROJ, 8, 8), (DOWN, 12, 8)):
        tensors[f"{key}.poly_lora_A"] = rng.normal(size=(2, 4, d_in // 2, 2)).astype(np.float32)
        tensors[f"{key}.poly_lora_B"] = rng.normal(size=(2, 4, 2, d_out // 2)).astype(np.float32)
        tensors[f"{key}.poly_router.module_logits"] = rng.normal(size=(3, 8)).astype(np.float32)
    save_file(tensors, str(out / ST), metadata={"format": "pt"})
    config = {"peft_type": "POLY", "poly_type": "poly", "r": 2, "n_tasks": 3, "n_skills": 4, "n_splits": 2,
              "target_modules": ["q_proj", "down_proj"], "base_model_name_or_path": "tiny"}
    (out / CONFIG).write_text(json.dumps(config))
    return out


def inspect(path: Path):
    return CliRunner().invoke(main, ["inspect", str(path), "--json"])


# ---- mutations of the good adapter ---------------------------------------------------------------
def set_config(**changes):
    def mutate(d: Path) -> None:
        cfg = json.loads((d / CONFIG).read_text())
        cfg.update(changes)
        (d / CONFIG).write_text(json.dumps(cfg))
    return mutate


def edit_tensors(fn):
    def mutate(d: Path) -> None:
        tensors = load_file(str(d / ST))
        fn(tensors)
        save_file(tensors, str(d / ST), metadata={"format": "pt"})
    return mutate


def set_value(key: str, value: float):
    def fn(t: dict) -> None:
        t[key] = t[key].copy()
        t[key].flat[3] = value
    return edit_tensors(fn)


def set_shape(key: str, shape: tuple[int, ...]):
    return edit_tensors(lambda t: t.__setitem__(key, np.zeros(shape, np.float32)))


def rewrite_header(fn):
    """Edit the raw safetensors header JSON, keeping the data bytes."""
    def mutate(d: Path) -> None:
        raw = (d / ST).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        fn(header)
        text = json.dumps(header).encode()
        (d / ST).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return mutate


def shift_offsets(header: dict) -> None:  # a span longer than its dtype x shape needs
    header[f"{Q_PROJ}.poly_lora_B"]["data_offsets"][1] += 4


def beyond_end(header: dict) -> None:  # offsets past the end of the data section
    entry = header[f"{Q_PROJ}.poly_lora_B"]
    entry["data_offsets"] = [o + 10_000 for o in entry["data_offsets"]]


def overlap(header: dict) -> None:  # two tensors claim the same bytes
    header[f"{Q_PROJ}.poly_lora_A"]["data_offsets"] = list(header[f"{DOWN}.poly_lora_B"]["data_offsets"])


def truncate(d: Path) -> None:
    raw = (d / ST).read_bytes()
    (d / ST).write_bytes(raw[: len(raw) - 100])


def several(d: Path) -> None:
    for name in ("task_a", "task_b"):
        shutil.copytree(d, d / name, ignore=shutil.ignore_patterns("task_*"))
    (d / ST).unlink()
    (d / CONFIG).unlink()


BAD = {
    "missing directory": (lambda d: d / "nope", "nope: no such adapter directory"),
    "a file": (lambda d: d / CONFIG, "is a file, expected an adapter directory"),
    "empty directory": (lambda d: [p.unlink() for p in d.iterdir()], "no adapter_config.json here: not an adapter directory"),
    "no weights": (lambda d: (d / ST).unlink(), "no adapter_model.safetensors (or adapter_model.bin) in the adapter directory"),
    "unparsable JSON": (lambda d: (d / CONFIG).write_text('{"peft_type": "POLY",'), "adapter_config.json: invalid JSON: Expecting property name"),
    "config not an object": (lambda d: (d / CONFIG).write_text("[1, 2]"), "invalid config: expected a JSON object"),
    "peft_type LORA": (set_config(peft_type="LORA"), "peft_type is 'LORA', not 'POLY': this is not a Poly/MHR adapter"),
    "r = 0": (set_config(r=0), "adapter_config.json: r must be an integer >= 1, got 0"),
    "n_skills a string": (set_config(n_skills="4"), "n_skills must be an integer >= 1, got '4'"),
    "missing tensor": (edit_tensors(lambda t: t.pop(f"{Q_PROJ}.poly_lora_B")),
                       "module 'model.layers.0.self_attn.q_proj' is missing poly_lora_B"),
    "extra tensor": (edit_tensors(lambda t: t.__setitem__("base_model.model.model.norm.weight", np.zeros(3, np.float32))),
                     "unexpected tensor 'base_model.model.model.norm.weight'"),
    "integer tensor": (edit_tensors(lambda t: t.__setitem__(f"{DOWN}.poly_lora_A", t[f"{DOWN}.poly_lora_A"].astype(np.int32))),
                       "has dtype I32, expected floating point"),
    "config r": (set_config(r=3), "poly_lora_A has shape [2, 4, 6, 2], config says (n_splits=2, n_skills=4, in/n_splits, r=3): r=3 in the config but 2 in the tensor"),
    "config n_skills": (set_config(n_skills=5), "config says (n_splits=2, n_skills=5, in/n_splits, r=2): n_skills=5 in the config but 4 in the tensor"),
    "config n_splits": (set_config(n_splits=1), "config says (n_splits=1, n_skills=4, in/n_splits, r=2): n_splits=1 in the config but 2 in the tensor"),
    "config n_tasks": (set_config(n_tasks=4), "module_logits has shape [3, 8], config says (n_tasks=4, n_splits*n_skills=8): n_tasks=4 in the config but 3 in the tensor"),
    "A and B disagree": (set_shape(f"{Q_PROJ}.poly_lora_B", (2, 4, 3, 4)),
                         "'model.layers.0.self_attn.q_proj': poly_lora_B has shape [2, 4, 3, 4], config says"
                         " (n_splits=2, n_skills=4, r=2, out/n_splits): r=2 in the config but 3 in the tensor"),
    "modules disagree on n_tasks": (set_shape(f"{Q_PROJ}.poly_router.module_logits", (4, 8)),
                                    "'model.layers.0.self_attn.q_proj': module_logits has shape [4, 8]"),
    "wrong rank tensor": (set_shape(f"{Q_PROJ}.poly_lora_A", (2, 4, 4)), "have the wrong number of dimensions (4, 4, 2)"),
    "truncated safetensors": (truncate, "truncated or corrupt: tensor"),
    "garbage bytes": (lambda d: (d / ST).write_bytes(np.random.default_rng(1).bytes(4096)),
                      "not a safetensors file or truncated: header length"),
    "empty safetensors": (lambda d: (d / ST).write_bytes(b""), "not a safetensors file (0 bytes"),
    "header span lies": (rewrite_header(shift_offsets), "F32 [2, 4, 2, 4] needs 256 bytes but its offsets span 260"),
    "header offsets past end": (rewrite_header(beyond_end), "truncated or corrupt: tensor"),
    "header overlap": (rewrite_header(overlap), "overlap"),
    "NaN": (set_value(f"{DOWN}.poly_lora_B", float("nan")), "module 'model.layers.0.mlp.down_proj': poly_lora_B contains NaN"),
    "Inf": (set_value(f"{Q_PROJ}.poly_router.module_logits", float("inf")),
            "module 'model.layers.0.self_attn.q_proj': poly_router.module_logits contains Inf"),
    "several adapters": (several, "holds several adapters (task_a, task_b): name one, e.g. "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, good_adapter, tmp_path):
    mutate, message = BAD[case]
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    target = mutate(adapter)
    path = target if isinstance(target, Path) else adapter
    before = tree_hash(tmp_path)
    res = inspect(path)
    assert res.exit_code == 2, res.output
    assert isinstance(res.exception, SystemExit)  # no crash
    assert "Traceback" not in res.output
    line = res.stderr.rstrip("\n")
    assert json.loads(res.stdout) == {"error": line.removeprefix("error: "), "exit_code": 2, "kind": "input"}
    assert "\n" not in line and line.startswith("error: "), line
    assert message in line, line
    assert tree_hash(tmp_path) == before


def test_single_adapter_in_a_subfolder_is_found(good_adapter, tmp_path):
    shutil.copytree(good_adapter, tmp_path / "only_task")
    before = tree_hash(tmp_path)
    res = inspect(tmp_path)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["adapter_dir"] == str(tmp_path / "only_task")
    assert inspect(tmp_path / "only_task").exit_code == 0  # and named directly
    assert tree_hash(tmp_path) == before


def test_bin_adapter_loads_with_weights_only(good_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("POLYTOOL_ALLOW_PICKLE", "1")  # asked for explicitly; refused without (test below)
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    tensors = load_file(str(adapter / ST))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, adapter / BIN)
    (adapter / ST).unlink()
    before = tree_hash(tmp_path)
    res = inspect(adapter)
    assert res.exit_code == 0, res.output
    got, want = json.loads(res.stdout), json.loads(inspect(good_adapter).stdout)
    assert got["weights_file"] == BIN
    assert {m["name"] for m in got["modules"]} == {m["name"] for m in want["modules"]}
    order = [want["modules"].index(m) for m in got["modules"]]  # .bin keeps its own order
    expected = np.asarray(want["routing"]["weights"])[:, order]
    np.testing.assert_allclose(got["routing"]["weights"], expected, atol=1e-12)
    assert tree_hash(tmp_path) == before


class _Payload:
    """Unpickling this runs a command: what a malicious adapter_model.bin would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_bin_is_refused(writer, good_adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("POLYTOOL_ALLOW_PICKLE", "1")  # even when .bin files are allowed
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    (adapter / ST).unlink()
    marker = tmp_path.parent / f"pwned-{writer}"
    if writer == "torch.save":
        torch.save({"x": _Payload(marker)}, adapter / BIN)
    else:
        (adapter / BIN).write_bytes(pickle.dumps({"x": _Payload(marker)}))
    before = tree_hash(tmp_path)
    res = inspect(adapter)
    assert res.exit_code == 2 and not marker.exists()
    line = res.stderr.rstrip("\n")
    assert "\n" not in line and "Traceback" not in res.output
    assert "adapter_model.bin: refused by torch.load(weights_only=True): not a plain state dict of tensors" in line
    assert "weights_only` set to `False`" not in line  # never advise the unsafe retry
    assert tree_hash(tmp_path) == before


def test_a_bin_adapter_is_not_unpickled_unless_asked(good_adapter, tmp_path):
    """Without POLYTOOL_ALLOW_PICKLE=1, adapter_model.bin is refused in one line before anything reads it: a
    malicious pickle runs nothing, even one torch's weights_only loader would let through."""
    adapter = tmp_path / "adapter"
    shutil.copytree(good_adapter, adapter)
    (adapter / ST).unlink()
    marker = tmp_path.parent / "pwned-unasked"
    (adapter / BIN).write_bytes(pickle.dumps({"x": _Payload(marker)}))
    for args in (("inspect", adapter), ("collapse", adapter, "--task", "0", "--out", tmp_path / "out"),
                 ("verify", adapter, "--base", FIXTURES / "tiny-llama")):
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exit_code == 2 and "POLYTOOL_ALLOW_PICKLE=1" in res.stderr and not marker.exists(), res.output
