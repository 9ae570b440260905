"""`polytool check X.gguf --for llama.cpp`: a GGUF LoRA's header against llama.cpp's loader rules, and with
--base BASE.gguf its architecture and tensor shapes (bases written here with llama.cpp's gguf package)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from polytool.cli import main
from polytool.formats.safetensors import SafetensorsFile

gguf = pytest.importorskip("gguf", reason="the gguf package (polytool[gguf]) is not installed")
ROOT = Path(__file__).resolve().parents[1]
NAMES = {"self_attn.q_proj": "attn_q", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.down_proj": "ffn_down"}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def base_gguf(path: Path, arch: str = "llama", drop: str | None = None) -> Path:
    """A header-true base GGUF of fixtures/tiny-llama: its adapted weights under llama.cpp's names, (out, in)."""
    writer = gguf.GGUFWriter(path, arch)
    with SafetensorsFile(ROOT / "fixtures" / "tiny-llama" / "model.safetensors") as st:
        for key in st.keys():
            parts = key.split(".")  # model.layers.N.<module>.weight
            module = ".".join(parts[3:-1]) if key.startswith("model.layers.") else None
            if module in NAMES and f"blk.{parts[2]}.{NAMES[module]}" != drop:
                writer.add_tensor(f"blk.{parts[2]}.{NAMES[module]}.weight", st.float_array(key, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "task1.gguf"
    assert run("collapse", ROOT / "fixtures" / "mhr", "--task", "1", "--to", "gguf", "--out", out).exit_code == 0
    return out


def statuses(res) -> dict[str, str]:
    return {x["rule"]: x["status"] for x in json.loads(res.stdout)["findings"]}


def test_a_polytool_gguf_is_ready(lora, tmp_path):
    res = run("check", lora, "--for", "llama.cpp", "--json")
    assert res.exit_code == 0, res.output
    assert statuses(res) == {"alpha": "ok", "pairs": "ok", "dtype": "ok", "architecture": "skipped", "shapes": "skipped"}
    res = run("check", lora, "--for", "llama.cpp", "--base", base_gguf(tmp_path / "base.gguf"), "--json")
    assert res.exit_code == 0 and set(statuses(res).values()) == {"ok"}, res.output
    res = run("check", lora, "--for", "llama.cpp", "--base", ROOT / "fixtures" / "tiny-llama")
    assert res.exit_code == 0 and "adapter llama, base llama" in res.stdout


def test_another_base_is_a_problem(lora, tmp_path):
    res = run("check", lora, "--for", "llama.cpp", "--base", base_gguf(tmp_path / "qwen.gguf", arch="qwen2"), "--json")
    assert res.exit_code == 1 and statuses(res)["architecture"] == "problem"
    res = run("check", lora, "--for", "llama.cpp", "--base", base_gguf(tmp_path / "part.gguf", drop="blk.1.attn_q"),
              "--json")
    assert res.exit_code == 1 and statuses(res)["shapes"] == "problem"
    assert "blk.1.attn_q.weight: base missing" in json.dumps(json.loads(res.stdout)["findings"])


def test_refusals(lora, tmp_path):
    res = run("check", lora, "--for", "vllm")
    assert res.exit_code == 2 and "a GGUF LoRA is for llama.cpp (and Ollama): --for llama.cpp" in res.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    res = run("check", bad, "--for", "llama.cpp")
    assert res.exit_code == 2 and "cannot read the GGUF file" in res.stderr and len(res.stderr.splitlines()) == 1
