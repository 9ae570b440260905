"""The numbers behind inspect's figures (routing.layers, clustering, usage, entropy) against a plain
recomputation from the adapter's tensors with torch, written here from the definitions in docs/inspect.md;
a changed router must change them (negative control). And the panels stay readable at 100 tasks x 80 layers."""
from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_inspect import SUFFIXES, file_order, inspect_json, run, write_hand_adapter


def module_names(adapter: Path) -> list[str]:
    names = []
    for key in file_order(adapter / "adapter_model.safetensors"):
        name = key[len("base_model.model."):].rsplit(".poly_", 1)[0]
        if name not in names:
            names.append(name)
    return names


def plain_average_linkage(dist: list[list[float]]) -> tuple[list[list], list[int]]:
    """Average linkage as the definition reads: repeatedly merge the two clusters whose members' mean
    pairwise distance is smallest (no update formula); scipy's ids and rows; then the leaf order."""
    n = len(dist)
    clusters = {i: [i] for i in range(n)}
    rows = []
    for k in range(n - 1):
        best = None
        ids = sorted(clusters)
        for x, a in enumerate(ids):
            for b in ids[x + 1:]:
                mean = sum(dist[i][j] for i in clusters[a] for j in clusters[b]) / (len(clusters[a]) * len(clusters[b]))
                if best is None or mean < best[0]:
                    best = (mean, a, b)
        mean, a, b = best
        clusters[n + k] = clusters.pop(a) + clusters.pop(b)
        rows.append([a, b, mean, len(clusters[n + k])])
    def leaves(node: int) -> list[int]:
        return [node] if node < n else leaves(int(rows[node - n][0])) + leaves(int(rows[node - n][1]))
    return rows, leaves(2 * n - 2)


def recompute(adapter: Path) -> dict:
    """layers, clustering, usage and entropy from the files (torch, float64), not from polytool."""
    tensors = load_file(adapter / "adapter_model.safetensors")
    names = module_names(adapter)
    logits = [tensors[f"base_model.model.{n}{SUFFIXES[2]}"].double() for n in names]
    t, q = logits[0].shape[0], len(tensors[f"base_model.model.{names[0]}{SUFFIXES[0]}"])
    s = logits[0].shape[1] // q
    alloc = torch.stack([torch.sigmoid(z).view(t, q, s) for z in logits], 1)  # (t, m, q, s)
    w = alloc / (alloc.sum(-1, keepdim=True) + 1e-12)
    flat = w.reshape(t, -1)
    sim = torch.nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    dist = (1 - sim).clamp(min=0).fill_diagonal_(0).tolist()
    linkage, order = plain_average_linkage(dist)
    ent = torch.distributions.Categorical(probs=w).entropy() / math.log(s) if s > 1 else torch.ones(t, len(names), q)
    per_module = ent.mean((0, 2))
    layer_of = [re.search(r"^(.*?\.\d+)\.", n).group(1) for n in names]
    layers = sorted(set(layer_of), key=lambda L: int(L.rsplit(".", 1)[1]))
    on = alloc >= 0.5
    return {
        "layers": layers,
        "module_types": list(dict.fromkeys(n.rsplit(".", 1)[1] for n in names)),
        "order": order, "linkage": linkage,
        "active": on.double().mean((1, 2)), "unused": (~on.any(0)).sum((0, 1)).tolist(), "routers": len(names) * q,
        "entropy_modules": per_module,
        "entropy_layers": torch.stack([per_module[[i for i, l in enumerate(layer_of) if l == L]].mean() for L in layers]),
    }


def check_views(ro: dict, exp: dict) -> None:
    assert ro["layers"]["names"] == exp["layers"]
    assert ro["layers"]["module_types"] == exp["module_types"]
    assert ro["clustering"]["order"] == exp["order"]
    assert len(ro["clustering"]["linkage"]) == len(exp["linkage"])
    for got, want in zip(ro["clustering"]["linkage"], exp["linkage"]):
        assert got[0] == want[0] and got[1] == want[1] and got[3] == want[3]
        assert got[2] == pytest.approx(want[2], abs=1e-9)
    close = dict(rtol=0, atol=1e-9)
    torch.testing.assert_close(torch.tensor(ro["usage"]["active"], dtype=torch.float64), exp["active"], **close)
    assert ro["usage"]["unused_routers"] == exp["unused"] and ro["usage"]["routers"] == exp["routers"]
    torch.testing.assert_close(torch.tensor(ro["entropy"]["modules"], dtype=torch.float64), exp["entropy_modules"], **close)
    torch.testing.assert_close(torch.tensor(ro["entropy"]["layers"], dtype=torch.float64), exp["entropy_layers"], **close)


@pytest.fixture(scope="module", params=[(1, 6), (2, 5)], ids=["poly", "mhr"])
def adapter(request, make_peft_adapter) -> Path:
    n_splits, n_tasks = request.param
    path, _ = make_peft_adapter("llama", r=3, n_tasks=n_tasks, n_skills=4, n_splits=n_splits)
    return path


def test_views_equal_a_plain_recomputation(adapter):
    ro = inspect_json(adapter)["routing"]
    exp = recompute(adapter)
    check_views(ro, exp)
    assert ro["layers"]["labels"] == ["0", "1"] and len(ro["layers"]["modules"][0]) == 3
    assert sorted(ro["clustering"]["order"]) == list(range(len(exp["order"])))
    assert sum(ro["usage"]["unused_routers"]) == ro["statistics"]["overall"]["unused_skill_slots"]


def test_a_changed_router_changes_the_views(adapter, tmp_path):
    """Negative control: task 0 routed like the last task, with one module's logits scaled. The new
    report differs, the recomputation follows it, and the old numbers no longer match."""
    copy = tmp_path / "changed"
    shutil.copytree(adapter, copy)
    tensors = load_file(copy / "adapter_model.safetensors")
    for key in [k for k in tensors if k.endswith(SUFFIXES[2])]:
        z = tensors[key].clone()
        z[0] = z[-1] * 3
        tensors[key] = z
    save_file(tensors, copy / "adapter_model.safetensors", metadata={"format": "pt"})
    old, new = inspect_json(adapter)["routing"], inspect_json(copy)["routing"]
    check_views(new, recompute(copy))
    with pytest.raises(AssertionError):
        check_views(old, recompute(copy))
    assert old["clustering"]["linkage"] != new["clustering"]["linkage"]
    assert old["usage"]["active"][0] != new["usage"]["active"][0]
    assert old["entropy"]["modules"] != new["entropy"]["modules"]


def test_figure_caps_100_tasks_and_80_layers(tmp_path):
    """100 tasks x 80 layers: the per-layer panel shows 16 layers and 24 tasks and says so; labels thin."""
    g = torch.Generator().manual_seed(5)
    logits = {f"model.layers.{i}.mlp.fc1": torch.randn(100, 3, generator=g) * 2 for i in range(80)}
    adapter = write_hand_adapter(tmp_path / "big", logits, n_splits=1, n_skills=3)
    out = tmp_path / "big.svg"
    res = run("inspect", str(adapter), "--plot", str(out))
    assert res.exit_code == 0, res.output
    svg = out.read_text()
    for note in ("16 of 80 layers shown (evenly spaced)", "first 24 of 100 tasks in clustering order",
                 "1 label in 5 shown"):
        assert note in svg, note
    layers = inspect_json(adapter)["routing"]["layers"]
    assert layers["labels"] == [str(i) for i in range(80)]  # numeric order, though the file lists 10 before 2


def test_modules_without_a_layer(tmp_path):
    g = torch.Generator().manual_seed(2)
    adapter = write_hand_adapter(tmp_path / "flat", {"net.fc1": torch.randn(2, 4, generator=g),
                                                     "net.fc2": torch.randn(2, 4, generator=g)}, n_splits=2, n_skills=2)
    ro = inspect_json(adapter)["routing"]
    assert ro["layers"] == {"names": [""], "labels": ["-"], "module_types": ["fc1", "fc2"], "modules": [[0, 1]]}
    assert ro["entropy"]["layers"] == [pytest.approx(sum(ro["entropy"]["modules"]) / 2)]
    assert run("inspect", str(adapter), "--plot", str(tmp_path / "flat.png")).exit_code == 0


@pytest.mark.parametrize("kind", ["t5", "bert"])
def test_encoder_decoder_and_bert_layers(make_peft_adapter, kind, tmp_path):
    """T5: encoder and decoder blocks are separate layers, a decoder's cross-attention is its own module type
    (absent from encoder rows: null); BERT: attention.output.dense and output.dense are told apart."""
    adapter, _ = make_peft_adapter(kind, n_splits=2)
    rep = inspect_json(adapter)
    layers = rep["routing"]["layers"]
    cells = [m for row in layers["modules"] for m in row if m is not None]
    assert sorted(cells) == list(range(len(rep["modules"])))  # every module exactly once
    if kind == "t5":
        assert layers["labels"] == ["decoder.block.0", "decoder.block.1", "encoder.block.0", "encoder.block.1"]
        assert layers["module_types"] == ["SelfAttention.q", "SelfAttention.v", "EncDecAttention.q",
                                          "EncDecAttention.v", "DenseReluDense.wi"]
        assert layers["modules"][2][2] is None  # no cross-attention in the encoder
    else:
        assert layers["labels"] == ["-", "0", "1"]  # pooler.dense has no layer
        assert layers["module_types"] == ["attention.output.dense", "attention.self.query", "attention.self.value",
                                          "intermediate.dense", "output.dense", "pooler.dense"]
    res = run("inspect", str(adapter), "--plot", str(tmp_path / "f.png"), "--report", str(tmp_path / "r.html"))
    assert res.exit_code == 0, res.output
