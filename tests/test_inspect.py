"""`polytool inspect`: every JSON field against values computed here, independently, from the
safetensors tensors with torch; the human report; the PNG plot; no torch import."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from polytool.cli import main

from conftest import tree_hash

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUFFIXES = (".poly_lora_A", ".poly_lora_B", ".poly_router.module_logits")


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def inspect_json(adapter: Path) -> dict:
    res = run("inspect", str(adapter), "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def file_order(weights: Path) -> list[str]:
    """Tensor names by position in the data buffer, from the raw safetensors header."""
    raw = weights.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def expected_report(adapter: Path) -> dict:
    """The report's numbers, from the files, with torch (not with polytool)."""
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    t, q, s, r = cfg["n_tasks"], cfg["n_splits"], cfg["n_skills"], cfg["r"]
    names = []
    for key in file_order(adapter / "adapter_model.safetensors"):
        name = key[len("base_model.model."):].rsplit(".poly_", 1)[0]
        if name not in names:
            names.append(name)
    modules, weights, stats = [], [], []
    for name in names:
        A, B, Z = (tensors[f"base_model.model.{name}{sfx}"].double() for sfx in SUFFIXES)
        modules.append({"name": name, "in_features": q * A.shape[2], "out_features": q * B.shape[3]})
        p = torch.sigmoid(Z).view(t, q, s)
        weights.append(p / (p.sum(-1, keepdim=True) + 1e-12))
        splits = []
        for j in range(q):
            pj = p[:, j]
            cols = pj.sum(0) / pj.sum()
            splits.append({
                "discreteness": (torch.distributions.Bernoulli(probs=pj).entropy().mean() / math.log(2)).item(),
                "sparsity": (pj < 0.5).double().mean().item(),
                "skill_usage": (torch.distributions.Categorical(probs=cols).entropy() / math.log(s)).item()
                if s > 1 else 1.0,  # one skill: 1 by definition
                "unused_skills": [k for k in range(s) if bool((pj[:, k] < 0.5).all())],
            })
        stats.append({"name": name, "splits": splits,
                      **{k: sum(sp[k] for sp in splits) / q for k in ("discreteness", "sparsity", "skill_usage")}})
    w = torch.stack(weights, 1)  # (t, m, q, s)
    per_skill = w.mean((1, 2))  # (t, s)
    flat = w.reshape(t, -1)
    return {
        "config": cfg, "modules": modules, "weights": w, "stats": stats,
        "parameters": {"poly": sum(x.numel() for x in tensors.values()),
                       "lora_per_task": sum(r * (m["in_features"] + m["out_features"]) for m in modules)},
        "per_skill": per_skill,
        "effective": torch.distributions.Categorical(probs=per_skill).entropy().exp(),
        "similarity": torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1),
    }


def assert_same_tree(got, want, where: str = "") -> None:
    """Nested dicts/lists equal, floats to 1e-9."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            assert_same_tree(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same_tree(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-9), where
    else:
        assert got == want, where


def check_report(rep: dict, adapter: Path) -> None:
    exp = expected_report(adapter)
    cfg = exp["config"]
    for key in ("n_tasks", "n_skills", "n_splits", "r", "base_model_name_or_path", "task_type"):
        assert rep[key] == cfg.get(key), key
    assert rep["poly_type"] == cfg.get("poly_type", "poly")
    assert rep["target_modules"] == sorted(cfg["target_modules"])
    assert rep["weights_file"] == "adapter_model.safetensors" and Path(rep["adapter_dir"]) == adapter
    assert [{k: m[k] for k in ("name", "in_features", "out_features")} for m in rep["modules"]] == exp["modules"]
    assert rep["parameters"] == exp["parameters"]
    ro = rep["routing"]
    close = dict(rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.tensor(ro["weights"], dtype=torch.float64), exp["weights"], **close)
    torch.testing.assert_close(torch.tensor(ro["task_split_skill_weights"], dtype=torch.float64),
                               exp["weights"].mean(1), **close)
    for t, task in enumerate(ro["tasks"]):
        assert task["task"] == t
        torch.testing.assert_close(torch.tensor(task["skill_weights"], dtype=torch.float64), exp["per_skill"][t], **close)
        assert task["effective_skills"] == pytest.approx(exp["effective"][t].item(), abs=1e-9)
        assert task["top_skill"] == int(exp["per_skill"][t].argmax())
        assert task["top_weight"] == pytest.approx(exp["per_skill"][t].max().item(), abs=1e-12)
    torch.testing.assert_close(torch.tensor(ro["similarity"], dtype=torch.float64), exp["similarity"], **close)
    st = ro["statistics"]
    assert [m["name"] for m in st["modules"]] == [m["name"] for m in exp["modules"]]
    assert_same_tree(st["modules"], exp["stats"])
    for key in ("discreteness", "sparsity", "skill_usage"):
        assert st["overall"][key] == pytest.approx(sum(m[key] for m in exp["stats"]) / len(exp["stats"]), abs=1e-9)
    unused = [{"module": m["name"], "split": j, "skills": sp["unused_skills"]}
              for m in exp["stats"] for j, sp in enumerate(m["splits"]) if sp["unused_skills"]]
    assert st["unused_skills"] == unused
    assert st["overall"]["unused_skill_slots"] == sum(len(u["skills"]) for u in unused)
    assert st["overall"]["skill_slots"] == len(exp["modules"]) * cfg["n_splits"] * cfg["n_skills"]


@pytest.fixture(scope="module", params=[1, 2], ids=["poly", "mhr"])
def peft_adapter(request, make_peft_adapter) -> Path:
    adapter, _ = make_peft_adapter("llama", r=3, n_tasks=3, n_skills=4, n_splits=request.param)
    return adapter


def test_json_matches_peft_written_adapter(peft_adapter):
    before = tree_hash(peft_adapter)
    rep = inspect_json(peft_adapter)
    check_report(rep, peft_adapter)
    assert len(rep["modules"]) == 2 * 3  # 2 layers x (q_proj, v_proj, down_proj)
    # negative control: the randomised router gives tasks different weights
    sim = rep["routing"]["similarity"]
    assert min(min(row) for row in sim) < 0.999
    assert tree_hash(peft_adapter) == before


def test_human_report(peft_adapter):
    res = run("inspect", str(peft_adapter))
    assert res.exit_code == 0 and res.stderr == ""
    text = res.stdout
    for section in ("Poly adapter", "config", "targets", "modules", "parameters", "Tasks:", "eff.skills",
                    "Routing statistics", "discreteness", "sparsity", "skill usage", "unused skills",
                    "Task similarity", "most similar pair", "model.layers.1.mlp.down_proj"):
        assert section in text, section
    rep = inspect_json(peft_adapter)
    assert f"{rep['parameters']['poly']:,}" in text
    assert len(text.splitlines()) < 60  # a report, not a dump of the weights


def write_hand_adapter(path: Path, logits: dict[str, torch.Tensor], n_splits: int, n_skills: int, r: int = 2,
                       dtype: torch.dtype = torch.float32) -> Path:
    """An adapter written by hand (not by PEFT): chosen logits, random A/B."""
    path.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, z in logits.items():
        d = 4  # in/out features per split
        key = f"base_model.model.{name}"
        tensors[f"{key}.poly_lora_A"] = torch.randn(n_splits, n_skills, d, r, generator=g).to(dtype)
        tensors[f"{key}.poly_lora_B"] = torch.randn(n_splits, n_skills, r, d + 2, generator=g).to(dtype)
        tensors[f"{key}.poly_router.module_logits"] = z.to(dtype)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "POLY", "poly_type": "poly", "r": r, "n_tasks": next(iter(logits.values())).shape[0],
              "n_skills": n_skills, "n_splits": n_splits, "target_modules": ["fc2", "fc1"],
              "base_model_name_or_path": "hand/made", "task_type": None}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def hand_adapter(tmp_path_factory) -> Path:
    """MHR, 3 tasks x 3 skills x 2 splits, bf16; split 0 of fc1 is discrete with skill 2 unused."""
    hi, lo = 8.0, -8.0
    fc1 = torch.tensor([[hi, lo, lo, hi, hi, hi],
                        [hi, hi, lo, lo, hi, lo],
                        [lo, hi, lo, lo, lo, hi]])
    fc2 = torch.randn(3, 6, generator=torch.Generator().manual_seed(3)) * 3
    return write_hand_adapter(tmp_path_factory.mktemp("hand") / "adapter", {"net.fc1": fc1, "net.fc2": fc2},
                              n_splits=2, n_skills=3, dtype=torch.bfloat16)


def test_json_matches_hand_written_adapter(hand_adapter):
    rep = inspect_json(hand_adapter)
    check_report(rep, hand_adapter)
    fc1 = rep["routing"]["statistics"]["modules"][0]
    assert fc1["name"] == "net.fc1" and fc1["splits"][0]["unused_skills"] == [2]
    assert fc1["splits"][0]["sparsity"] == pytest.approx(5 / 9)
    assert fc1["splits"][0]["discreteness"] < 0.01  # sigmoid(+-8) is nearly 0/1
    assert {"module": "net.fc1", "split": 0, "skills": [2]} in rep["routing"]["statistics"]["unused_skills"]
    assert rep["modules"][0] == {"name": "net.fc1", "short_name": "fc1", "layer": "Linear", "in_features": 8, "out_features": 12}


def test_single_task_single_skill(tmp_path):
    adapter = write_hand_adapter(tmp_path / "a", {"fc1": torch.zeros(1, 1)}, n_splits=1, n_skills=1)
    rep = inspect_json(adapter)
    check_report(rep, adapter)
    assert rep["routing"]["tasks"][0]["effective_skills"] == pytest.approx(1.0)
    assert rep["routing"]["statistics"]["overall"]["skill_usage"] == 1.0
    assert "(one task)" in run("inspect", str(adapter)).stdout
    res = run("inspect", str(adapter), "--plot", str(tmp_path / "one.png"), "--report", str(tmp_path / "one.html"))
    assert res.exit_code == 0, res.output  # no clustering to draw, one layer, one skill


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE
    return struct.unpack(">II", raw[16:24])  # IHDR width, height


def test_plot(make_peft_adapter, tmp_path):
    widths = {}
    for n_splits in (1, 2):
        adapter, _ = make_peft_adapter("llama", r=3, n_tasks=3, n_skills=4, n_splits=n_splits)
        out = tmp_path / f"routing-{n_splits}.png"
        res = run("inspect", str(adapter), "--json", "--plot", str(out))
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["n_splits"] == n_splits  # stdout stays pure JSON
        assert f"wrote {out}" in res.stderr
        widths[n_splits], height = png_size(out)
        assert out.stat().st_size > 5000 and height > 150
    assert widths[1] == widths[2]  # one figure width; the splits share the per-layer panel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing-1.png", "routing-2.png"]  # no temp files


def test_plot_svg_names_every_panel(peft_adapter, tmp_path):
    out = tmp_path / "routing.SVG"
    assert run("inspect", str(peft_adapter), "--plot", str(out)).exit_code == 0
    svg = out.read_text()
    assert svg.startswith("<?xml") and "<svg" in svg
    for title in ("Routing per layer", "Task similarity", "Skill usage per task", "Routing entropy per layer"):
        assert title in svg, title


def test_plot_refuses_other_formats(peft_adapter, tmp_path):
    res = run("inspect", str(peft_adapter), "--plot", str(tmp_path / "routing.jpg"))
    assert res.exit_code == 2 and "--plot writes .png or .svg, not '.jpg'" in res.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option, name", [("--plot", "routing.png"), ("--report", "report.html")])
def test_outputs_never_replace_without_force(peft_adapter, tmp_path, option, name):
    out = tmp_path / name
    out.write_bytes(b"keep me")
    res = run("inspect", str(peft_adapter), option, str(out))
    assert res.exit_code == 2 and "already exists; pass --force to replace it" in res.stderr
    assert out.read_bytes() == b"keep me"
    res = run("inspect", str(peft_adapter), option, str(out), "--force")  # not polytool's: --force leaves it
    assert res.exit_code == 2 and "not an output polytool wrote" in res.stderr and out.read_bytes() == b"keep me"
    out.unlink()
    assert run("inspect", str(peft_adapter), option, str(out)).exit_code == 0
    written = out.read_bytes()
    assert b"polytool.version" in written[:1 << 20]  # the mark that lets --force replace it
    assert run("inspect", str(peft_adapter), option, str(out), "--force").exit_code == 0
    res = run("inspect", str(peft_adapter), option, str(tmp_path / "new" / name))  # a missing folder is made
    assert res.exit_code == 0 and (tmp_path / "new" / name).stat().st_size > 1000
    before = tree_hash(peft_adapter)
    res = run("inspect", str(peft_adapter), option, str(peft_adapter / name))
    assert res.exit_code == 2 and "inputs are never written" in res.stderr
    assert tree_hash(peft_adapter) == before


def test_plot_without_matplotlib(peft_adapter, tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import` raise ImportError
    for option, out in (("--plot", tmp_path / "routing.png"), ("--report", tmp_path / "report.html")):
        res = run("inspect", str(peft_adapter), option, str(out))
        assert res.exit_code == 2
        assert res.stderr.strip() == ("error: --plot and --report need matplotlib, which is not installed: "
                                      "pip install 'polytool[plot]'")
        assert "Traceback" not in res.output and not out.exists()


def test_inspect_does_not_import_torch(peft_adapter, tmp_path):
    """Without --plot/--report neither torch nor matplotlib is imported; with them, still no torch."""
    for extra, light in (([], ("torch", "transformers", "peft", "matplotlib")),
                         (["--plot", str(tmp_path / "p.png"), "--report", str(tmp_path / "r.html")],
                          ("torch", "transformers", "peft"))):
        code = (
            "import sys\n"
            "from polytool.cli import main\n"
            f"main(['inspect', {str(peft_adapter)!r}, '--json', *{extra!r}], standalone_mode=False)\n"
            f"heavy = sorted(m for m in {light!r} if m in sys.modules)\n"
            "assert not heavy, heavy\n"
        )
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["n_tasks"] == 3
    assert (tmp_path / "p.png").is_file() and (tmp_path / "r.html").is_file()
