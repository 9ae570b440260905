"""Issue 22: checkpoints whose saved names are not the module names (ViT: transformers renames them on load),
and resized vocabularies. Every adapter is PEFT's own; every artifact is loaded by the runtime that reads it
(transformers' from_pretrained, PEFT's PeftModel) and compared with PEFT's routed model on the same inputs,
beside a negative control (another task, the base)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from polytool.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5  # float32 artifacts against the float32 routed forward (max |a - b| / max |b|)
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
           patch_size=4, num_labels=3)
LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
NEW_VOCAB = 100  # the Llama base resized from 96 rows before the adapter was made


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def randomize(model, seed: int = 1) -> None:
    """Non-trivial adapter values: B != 0, task-dependent routing, trained modules_to_save copies."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "poly_lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif "module_logits" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)
            elif "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def peft_adapter(base, out: Path, **config) -> Path:
    from peft import PolyConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a resized embedding: PEFT warns that it saves the embedding layers
        model = get_peft_model(base, PolyConfig(r=3, n_tasks=3, n_skills=4, n_splits=2, **config))
        randomize(model)
        model.save_pretrained(out)
    return out


def peft_routed(base, adapter: Path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, adapter).eval()


# ---- ViT: the checkpoint holds vit.encoder.layer.N.attention.attention.query, the model vit.layers.N.attention.q_proj


@pytest.fixture(scope="session")
def vit(tmp_path_factory):
    """(base dir, adapter dir, pixel_values): a tiny ViTForImageClassification and PEFT's Poly adapter on it
    (attention and MLP targets; SEQ_CLS, so the classifier is trained whole beside the skills)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("vit")
    torch.manual_seed(0)
    tf.ViTForImageClassification(tf.ViTConfig(**VIT)).eval().save_pretrained(root / "base")
    base = tf.ViTForImageClassification.from_pretrained(root / "base").eval()
    adapter = peft_adapter(base, root / "adapter", task_type="SEQ_CLS", target_modules=["q_proj", "v_proj", "fc1"])
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return root / "base", adapter, pixels


def vit_logits(model, pixels, task: int | None = None) -> torch.Tensor:
    extra = {} if task is None else {"task_ids": torch.full((pixels.shape[0],), task)}
    with torch.no_grad():
        return model(pixel_values=pixels, **extra).logits.float()


@pytest.fixture(scope="session")
def vit_routed(vit):
    """{task: PEFT's routed logits} for every task, and None: the base's."""
    import transformers as tf

    base_dir, adapter, pixels = vit
    model = peft_routed(tf.ViTForImageClassification.from_pretrained(base_dir).eval(), adapter)
    out = {t: vit_logits(model, pixels, t) for t in range(3)}
    out[None] = vit_logits(tf.ViTForImageClassification.from_pretrained(base_dir).eval(), pixels)
    return out


def keys(path: Path) -> set[str]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return set(f.keys())


def test_the_vit_checkpoint_names_are_not_the_module_names(vit):
    """The premise: PEFT names the built modules, the checkpoint holds the saved names."""
    base_dir, adapter, _ = vit
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.vit.layers.0.attention.q_proj.poly_lora_A" in f.keys()
    assert "vit.layers.0.attention.q_proj.weight" not in keys(base_dir)
    assert "vit.encoder.layer.0.attention.attention.query.weight" in keys(base_dir)


def test_vit_dense_loads_in_transformers_as_the_routed_model(vit, vit_routed, tmp_path):
    import transformers as tf

    base_dir, adapter, pixels = vit
    res = run("collapse", adapter, "--task", "1", "--to", "dense", "--base", base_dir, "--out", tmp_path / "d", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["tensors_merged"] == 6 and data["tensors_replaced"] == 2  # q, v, fc1 x 2 layers; the classifier
    assert keys(tmp_path / "d") == keys(base_dir)  # the checkpoint's names: what from_pretrained converts
    dense = tf.AutoModelForImageClassification.from_pretrained(tmp_path / "d").eval()
    got = vit_logits(dense, pixels)
    assert rel(got, vit_routed[1]) <= TOL
    assert rel(got, vit_routed[0]) > 1e-2 and rel(got, vit_routed[None]) > 1e-2  # another task, the base


def test_vit_lora_loads_in_peft_as_the_routed_model(vit, vit_routed, tmp_path):
    import transformers as tf

    base_dir, adapter, pixels = vit
    res = run("collapse", adapter, "--task", "2", "--base", base_dir, "--out", tmp_path / "l")
    assert res.exit_code == 0, res.output
    lora = peft_routed(tf.ViTForImageClassification.from_pretrained(base_dir).eval(), tmp_path / "l")
    got = vit_logits(lora, pixels)
    assert rel(got, vit_routed[2]) <= TOL
    assert rel(got, vit_routed[1]) > 1e-2 and rel(got, vit_routed[None]) > 1e-2
    res = run("check", tmp_path / "l", "--for", "peft", "--base", base_dir, "--json")
    targets = next(f for f in json.loads(res.stdout)["findings"] if f["rule"] == "targets")
    assert res.exit_code == 0 and targets["status"] == "ok", res.output


def test_vit_merge_dense_and_verify_weights(vit, vit_routed, tmp_path):
    """merge --to dense matches through the conversion too; verify's weight check (its own reading of the names,
    save_pretrained's direction) passes the artifact against its task and fails it against another."""
    import transformers as tf
    from polytool.formats.adapter import load_adapter
    from polytool.verify.reference import ReferenceAdapter
    from polytool.verify.weights import check_dense_weights

    base_dir, adapter, _ = vit
    res = run("merge", f"{adapter}:1", "--to", "dense", "--base", base_dir, "--out", tmp_path / "m")
    assert res.exit_code == 0, res.output
    res = run("collapse", adapter, "--task", "1", "--to", "dense", "--base", base_dir, "--out", tmp_path / "d")
    assert res.exit_code == 0, res.output
    merged, dense = (tf.AutoModelForImageClassification.from_pretrained(tmp_path / d) for d in ("m", "d"))
    for layer in range(2):  # a merge combines the skills' deltas only (not the trained classifier)
        q_merged, q_dense, q_base = (m.vit.layers[layer].attention.q_proj.weight.detach() for m in (
            merged, dense, tf.AutoModelForImageClassification.from_pretrained(base_dir)))
        assert rel(q_merged, q_dense) <= TOL and rel(q_merged, q_base) > 1e-3
    reference = ReferenceAdapter(adapter)
    good = check_dense_weights(tmp_path / "d", base_dir, load_adapter(adapter), lambda m: reference.update(m, "1"))
    bad = check_dense_weights(tmp_path / "d", base_dir, load_adapter(adapter), lambda m: reference.update(m, "0"))
    assert good["merged"] == 6 and good["first_bad"] is None and good["max_ulps"] <= 1.0
    assert bad["first_bad"] == "vit.encoder.layer.0.attention.attention.query.weight"


def test_the_two_readings_of_the_names_agree(vit):
    """The product reads transformers' conversion forwards (from_pretrained's way), verify backwards
    (save_pretrained's): for every model tensor name both give the same checkpoint key."""
    from polytool.formats.base import open_base
    from polytool.formats.conversion import family_names
    from polytool.verify.names import saved_names

    base = open_base(vit[0])
    forwards = family_names(base).renamed
    backwards = saved_names(base.directory, set(base.tensors))
    assert backwards and all(forwards[name] == key for name, key in backwards.items())
    assert backwards["vit.layers.1.mlp.fc1.weight"] == "vit.encoder.layer.1.intermediate.dense.weight"


DINO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=4,
            use_swiglu_ffn=True)


@pytest.fixture(scope="session")
def dino(tmp_path_factory):
    """(base dir, adapter dir, pixel_values): Dinov2 with a SwiGLU MLP, whose checkpoint holds one fused
    mlp.weights_in that transformers chunks into gate_proj (rows 0:88) and up_proj (88:176) on load; PEFT's
    Poly adapter on q_proj (renamed) and gate_proj (a block of the fused rows)."""
    import transformers as tf

    root = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    tf.Dinov2Model(tf.Dinov2Config(**DINO)).save_pretrained(root / "base")
    base = tf.Dinov2Model.from_pretrained(root / "base")
    adapter = peft_adapter(base, root / "adapter", task_type="FEATURE_EXTRACTION", target_modules=["q_proj", "gate_proj"])
    return root / "base", adapter, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))


FUSED = "encoder.layer.0.mlp.weights_in.weight"


def test_a_fused_weight_merges_into_its_block_of_rows(dino, tmp_path):
    """gate_proj is rows 0:88 of the checkpoint's fused weights_in: the dense model merges into those rows
    only (up_proj's rows keep the base's bytes) and loads in transformers as PEFT's routed model computes;
    the LoRA loads in PEFT the same; both pass verify, and fail as another task."""
    import transformers as tf
    from safetensors.torch import load_file

    base_dir, adapter, pixels = dino
    routed = peft_routed(tf.Dinov2Model.from_pretrained(base_dir).eval(), adapter)
    with torch.no_grad():
        want = {t: routed(pixel_values=pixels, task_ids=torch.full((2,), t)).last_hidden_state for t in (0, 1)}
        plain = tf.Dinov2Model.from_pretrained(base_dir).eval()(pixel_values=pixels).last_hidden_state
    assert rel(plain, want[1]) > 1e-3 and rel(want[0], want[1]) > 1e-3  # the controls: the adapter shows
    for kind in ("dense", "lora"):
        res = run("collapse", adapter, "--task", "1", "--to", kind, "--base", base_dir, "--out", tmp_path / kind)
        assert res.exit_code == 0, res.output
    fused, before = load_file(tmp_path / "dense" / "model.safetensors")[FUSED], load_file(base_dir / "model.safetensors")[FUSED]
    assert torch.equal(fused[88:], before[88:]) and not torch.equal(fused[:88], before[:88])
    with torch.no_grad():
        dense = tf.Dinov2Model.from_pretrained(tmp_path / "dense").eval()(pixel_values=pixels).last_hidden_state
        lora = peft_routed(tf.Dinov2Model.from_pretrained(base_dir).eval(), tmp_path / "lora")(pixel_values=pixels)
    assert rel(dense, want[1]) <= TOL and rel(lora.last_hidden_state, want[1]) <= TOL
    assert rel(dense, want[0]) > 1e-3
    for kind in ("dense", "lora"):
        res = run("verify", adapter, "--base", base_dir, "--against", tmp_path / kind, "--json")
        assert res.exit_code == 0 and all(c["passed"] for c in json.loads(res.stdout)["checks"]), res.output
        res = run("verify", adapter, "--base", base_dir, "--against", tmp_path / kind, "--task", "0")
        assert res.exit_code == 1, res.output


@pytest.mark.parametrize("rows", [(0, 88), (88, 176)])
def test_a_changed_row_of_a_fused_weight_fails_verify(dino, rows, tmp_path):
    """A dense model whose fused weight has one element changed, in the merged block (gate_proj's) or in the
    block the adapter does not touch (up_proj's): the weight-space check fails it."""
    from safetensors.numpy import load_file, save_file

    base_dir, adapter, _ = dino
    res = run("collapse", adapter, "--task", "1", "--to", "dense", "--base", base_dir, "--out", tmp_path / "d")
    assert res.exit_code == 0, res.output
    file = tmp_path / "d" / "model.safetensors"
    with safe_open(str(file), "np") as f:
        metadata = f.metadata()
    tensors = load_file(str(file))
    tensors[FUSED][rows[0] + 3, 5] *= 1.01
    save_file(tensors, str(file), metadata=metadata)
    res = run("verify", adapter, "--base", base_dir, "--against", tmp_path / "d", "--json")
    assert res.exit_code == 1, res.output
    assert json.loads(res.stdout)["checks"][0]["weights"]["first_bad"] == FUSED


def test_the_two_readings_of_a_fused_weight_agree(dino):
    """The product runs transformers' loading converter on the key's element numbers, verify its saving
    converter on the modules': both place gate_proj and up_proj in the same rows of weights_in."""
    from polytool.formats.base import open_base
    from polytool.verify.names import checkpoint_name

    base_dir = dino[0]
    for renamer in ({}, {"renamer": checkpoint_name}):
        base = open_base(base_dir, **renamer)
        gate = base.place("encoder.layer.0.mlp.gate_proj.weight")
        assert (gate.key, gate.rows) == (FUSED, (0, 88))
        assert base.place("encoder.layer.0.mlp.up_proj.weight").rows == (88, 176)
        assert base.place("encoder.layer.0.mlp.down_proj.weight").rows is None


def light(*args) -> subprocess.CompletedProcess:
    """polytool's CLI with torch and transformers unimportable, as in a light install (test_light_install.py)."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "from polytool.cli import main; main(sys.argv[1:])")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_without_transformers_the_conversion_names_the_extra(vit, tmp_path):
    """A light install (torch and transformers unimportable) cannot read the family's conversion: exit 2
    naming the extra, nothing written. inspect, which compares names as they are, still runs."""
    base_dir, adapter, _ = vit
    res = light("collapse", adapter, "--task", "1", "--to", "dense", "--base", base_dir, "--out", tmp_path / "d")
    assert res.returncode == 2 and res.stdout == "" and not (tmp_path / "d").exists()
    assert "vit.layers.0.attention.q_proj.weight' is not a key of the base checkpoint" in res.stderr
    assert res.stderr.rstrip().endswith("pip install 'polytool[torch]'") and "Traceback" not in res.stderr
    res = light("inspect", adapter, "--base", base_dir, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["saved_modules"], res.stderr


# ---- resized vocabulary: resize_token_embeddings(100) on a 96-row Llama before the adapter was made


@pytest.fixture(scope="session")
def resized(tmp_path_factory):
    """(base dir, {variant: adapter dir}, input_ids with new tokens): PEFT's adapters on a resized base, with
    embed_tokens and lm_head in modules_to_save ("saved") or saved whole by PEFT on its own ("whole")."""
    return resized_case(tmp_path_factory.mktemp("resized"), tied=False, saved=["embed_tokens", "lm_head"])


@pytest.fixture(scope="session")
def resized_tied(tmp_path_factory):
    """The same on a base whose lm_head is tied to embed_tokens; "saved" trains embed_tokens only."""
    return resized_case(tmp_path_factory.mktemp("resized-tied"), tied=True, saved=["embed_tokens"])


def resized_case(root: Path, tied: bool, saved: list[str]):
    import transformers as tf

    torch.manual_seed(0)
    tf.LlamaForCausalLM(tf.LlamaConfig(**dict(LLAMA, tie_word_embeddings=tied))).eval().save_pretrained(root / "base")
    adapters = {}
    for variant, extra in {"saved": {"modules_to_save": saved}, "whole": {}}.items():
        base = resized_base(root / "base")
        adapters[variant] = peft_adapter(base, root / variant, task_type="CAUSAL_LM",
                                         target_modules=["q_proj", "v_proj"], **extra)
    ids = torch.randint(2, NEW_VOCAB, (2, 8), generator=torch.Generator().manual_seed(7))
    ids[:, 0] = torch.tensor([96, 99])  # tokens only the resized vocabulary has
    return root / "base", adapters, ids


def resized_base(base_dir: Path):
    """The base as PEFT needs it under such an adapter: loaded, then resized the same way."""
    import transformers as tf

    base = tf.LlamaForCausalLM.from_pretrained(base_dir).eval()
    base.resize_token_embeddings(NEW_VOCAB)
    return base


def lm_logits(model, ids, task: int | None = None) -> torch.Tensor:
    extra = {} if task is None else {"task_ids": torch.full((ids.shape[0],), task)}
    with torch.no_grad():
        return model(input_ids=ids, **extra).logits.float()


@pytest.mark.parametrize("variant", ["saved", "whole"])
def test_a_resized_vocabulary_collapses_to_dense_and_lora(resized, variant, tmp_path):
    import transformers as tf

    base_dir, adapters, ids = resized
    adapter = adapters[variant]
    routed = peft_routed(resized_base(base_dir), adapter)
    want, other = lm_logits(routed, ids, 1), lm_logits(routed, ids, 0)
    assert rel(want, other) > 1e-3  # the routing matters (the negative control below would prove nothing else)
    res = run("collapse", adapter, "--task", "1", "--to", "dense", "--base", base_dir, "--out", tmp_path / "d", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "d" / "config.json").read_text())["vocab_size"] == NEW_VOCAB
    dense = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    got = lm_logits(dense, ids)
    assert got.shape[-1] == NEW_VOCAB and rel(got, want) <= TOL and rel(got, other) > 1e-3
    res = run("collapse", adapter, "--task", "1", "--base", base_dir, "--out", tmp_path / "l", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["embedding_rows"] == NEW_VOCAB, res.output
    assert f"base.resize_token_embeddings({NEW_VOCAB})" in (tmp_path / "l" / "README.md").read_text()
    lora = peft_routed(resized_base(base_dir), tmp_path / "l")  # PEFT: onto a base resized the same way
    got = lm_logits(lora, ids)
    assert rel(got, want) <= TOL and rel(got, other) > 1e-3
    with pytest.raises(RuntimeError, match="size mismatch"):  # as for the Poly adapter: the base must be resized
        peft_routed(tf.LlamaForCausalLM.from_pretrained(base_dir), tmp_path / "l")


def test_a_resized_tied_vocabulary(resized_tied, tmp_path):
    """A tied base: embeddings PEFT saved whole (its lm_head copy is the same matrix) make a dense model that
    ties them again; a trained embed_tokens beside the original lm_head cannot be tied, and is refused for
    dense (the LoRA carries both, and PEFT loads it)."""
    import transformers as tf

    base_dir, adapters, ids = resized_tied
    for variant in ("whole", "saved"):
        routed = peft_routed(resized_base(base_dir), adapters[variant])
        want, other = lm_logits(routed, ids, 1), lm_logits(routed, ids, 0)
        res = run("collapse", adapters[variant], "--task", "1", "--base", base_dir, "--out", tmp_path / variant)
        assert res.exit_code == 0, res.output
        got = lm_logits(peft_routed(resized_base(base_dir), tmp_path / variant), ids)
        assert rel(got, want) <= TOL and rel(got, other) > 1e-3
    routed = peft_routed(resized_base(base_dir), adapters["whole"])
    want, other = lm_logits(routed, ids, 1), lm_logits(routed, ids, 0)
    res = run("collapse", adapters["whole"], "--task", "1", "--to", "dense", "--base", base_dir, "--out", tmp_path / "d")
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["vocab_size"] == NEW_VOCAB and config["tie_word_embeddings"] is True
    got = lm_logits(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval(), ids)
    assert rel(got, want) <= TOL and rel(got, other) > 1e-3
    res = run("collapse", adapters["saved"], "--task", "1", "--to", "dense", "--base", base_dir, "--out", tmp_path / "x")
    assert res.exit_code == 2 and "which the base ties together (tie_word_embeddings)" in res.stderr
    assert not (tmp_path / "x").exists()


def test_inspect_names_the_resize(resized):
    base_dir, adapters, _ = resized
    res = run("inspect", adapters["whole"], "--base", base_dir, "--json")
    assert res.exit_code == 0, res.output
    embeddings = {e["module"]: e for e in json.loads(res.stdout)["saved_embeddings"]}
    assert embeddings["model.embed_tokens"]["resized_from"] == 96 and embeddings["model.embed_tokens"]["shape"] == [100, 32]
    res = run("inspect", adapters["whole"], "--base", base_dir)
    assert "a resized vocabulary: the base has 96 rows" in res.stdout


def test_vit_artifacts_pass_verify_end_to_end(vit, tmp_path):
    """polytool verify on a family whose checkpoint names are converted on load: the dense model and the LoRA
    of task 1 pass against the adapter (pixel_values built from the config), and fail as task 0."""
    base_dir, adapter, _ = vit
    for kind in ("dense", "lora"):
        out = tmp_path / kind
        res = run("collapse", adapter, "--task", "1", "--to", kind, "--base", base_dir, "--out", out)
        assert res.exit_code == 0, res.output
        res = run("verify", adapter, "--base", base_dir, "--against", out, "--json")
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        assert report["inputs"]["tensors"] == {"pixel_values": [4, 3, VIT["image_size"], VIT["image_size"]]}
        assert all(c["passed"] and c["max_rel_err"] <= TOL for c in report["checks"]), report["checks"]
        res = run("verify", adapter, "--base", base_dir, "--against", out, "--task", "0", "--json")
        assert res.exit_code == 1, res.output


@pytest.mark.parametrize("variant", ["saved", "whole"])
def test_a_resized_vocabulary_passes_verify(resized, variant, tmp_path):
    """verify resizes its base as PEFT needs it (the rows of the embedding the adapter carries whole): the self-check,
    the dense model and the LoRA pass; as another task they fail; a changed row of a new token fails the weight check."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    base_dir, adapters, _ = resized
    adapter = adapters[variant]
    res = run("verify", adapter, "--base", base_dir, "--json")
    assert res.exit_code == 0, res.output
    for kind in ("dense", "lora"):
        res = run("collapse", adapter, "--task", "1", "--to", kind, "--base", base_dir, "--out", tmp_path / kind)
        assert res.exit_code == 0, res.output
        res = run("verify", adapter, "--base", base_dir, "--against", tmp_path / kind, "--json")
        assert res.exit_code == 0 and all(c["passed"] for c in json.loads(res.stdout)["checks"]), res.output
        res = run("verify", adapter, "--base", base_dir, "--against", tmp_path / kind, "--task", "0", "--json")
        assert res.exit_code == 1, res.output
    file = tmp_path / "dense" / "model.safetensors"
    with safe_open(str(file), "np") as f:
        metadata = f.metadata()
    tensors = load_file(str(file))
    tensors["model.embed_tokens.weight"][NEW_VOCAB - 2] *= 1.5  # a token only the resized vocabulary has
    save_file(tensors, str(file), metadata=metadata)
    res = run("verify", adapter, "--base", base_dir, "--against", tmp_path / "dense", "--json")
    assert res.exit_code == 1, res.output


def test_verify_draws_the_new_tokens_of_a_resized_vocabulary(resized):
    """verify's random ids reach the rows a resized vocabulary adds (96 -> 100), so its forwards read them too;
    an adapter on the base's own vocabulary keeps the base's range."""
    import transformers as tf

    from polytool.verify import _resized_vocabulary
    from polytool.verify.inputs import random_inputs

    base_dir, adapters, _ = resized
    config = tf.AutoConfig.from_pretrained(base_dir)
    sized = _resized_vocabulary(config, adapters["saved"])
    assert sized.vocab_size == NEW_VOCAB and config.vocab_size == NEW_VOCAB - 4  # the base's config untouched
    ids = random_inputs(sized, 4, 16, "LlamaForCausalLM")[0][0]["input_ids"]
    assert int(ids.max()) >= NEW_VOCAB - 4  # a token only the resized vocabulary has
    assert _resized_vocabulary(config, ROOT / "fixtures" / "mhr") is config
