"""polytool's LoRA applier is PEFT's LoRA loader.

Every honoured LoraConfig key: a LoRA made and saved by PEFT itself (random non-zero factors), loaded
by PEFT's PeftModel.from_pretrained and by read_lora + attach_lora (+ swap_saved_modules) on a fresh
base: the outputs agree to 1e-5, and the bare base (or the artifact with the key ignored) differs.
Every refused key: an adapter using it (PEFT-made where PEFT can) is refused in one line naming it.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, build_base

from polytool.errors import AdapterError, PolytoolError
from polytool.formats.lora import read_lora
from polytool.verify.lora_apply import attach_lora, lora_targets, swap_saved_modules

IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))
LLAMA_QVD = ["q_proj", "v_proj", "down_proj"]


def build(kind: str):
    """build_base, plus sequence classifiers (3 labels) for modules_to_save: BERT, and DistilBERT, whose
    `pre_classifier` PEFT also saves (its name ends with 'classifier')."""
    if kind not in ("bert-cls", "distilbert-cls"):
        return build_base(kind)
    import transformers as tf

    torch.manual_seed(0)
    if kind == "bert-cls":
        cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=128, num_labels=3)
        return tf.BertForSequenceClassification(cfg).eval()
    cfg = tf.DistilBertConfig(vocab_size=VOCAB, dim=32, hidden_dim=48, n_layers=2, n_heads=4,
                              max_position_embeddings=128, num_labels=3)
    return tf.DistilBertForSequenceClassification(cfg).eval()


def output(model) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=IDS)
    if hasattr(out, "logits"):
        return out.logits
    pooled = getattr(out, "pooler_output", None)  # a BertModel: its pooler too (modules_to_save=['pooler'])
    return out.last_hidden_state if pooled is None else torch.cat([out.last_hidden_state.flatten(), pooled.flatten()])


def linears(model) -> dict:
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in model.named_modules() if n and isinstance(m, (torch.nn.Linear, Conv1D))}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def peft_lora(kind: str, out, seed: int = 1, **config):
    """A LoRA made by PEFT on a fresh `kind` base, every adapter tensor random (seeded), saved to `out`."""
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build(kind), LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT 0.21 mistakes lora_B's 1-D bias for an unsharded tensor
        model.save_pretrained(out)
    return out


def peft_targets(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def applied(kind: str, lora_dir, artifact=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(PEFT's output, polytool's, the bare base's), each on a fresh base; the hooks and swaps undone after."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(build(kind), lora_dir).eval()
    reference = output(peft_model)
    base = build(kind)
    bare = output(base)
    artifact = artifact or read_lora(lora_dir)
    names = [n for n, _ in base.named_modules()]
    assert lora_targets(artifact, names) == peft_targets(peft_model)
    handles = attach_lora(linears(base), artifact, module_names=names)
    with swap_saved_modules(base, artifact):
        ours = output(base)
    for handle in handles:
        handle.remove()
    assert torch.equal(output(base), bare)  # hooks and swaps undone
    return reference, ours, bare


def check(kind: str, lora_dir) -> tuple[torch.Tensor, torch.Tensor]:
    reference, ours, bare = applied(kind, lora_dir)
    assert rel(ours, reference) <= 1e-5
    assert rel(bare, reference) > 1e-3  # negative control: the LoRA visibly changes the output
    return reference, ours


# ---- honoured keys, against PEFT ------------------------------------------------------------------


def test_target_modules_regex(tmp_path):
    check("llama", peft_lora("llama", tmp_path, r=3, lora_alpha=5, target_modules=r".*\.self_attn\.(q|v)_proj"))
    assert len(read_lora(tmp_path).weights) == 4


@pytest.mark.parametrize("exclude, count", [(None, 6), (["model.layers.0.mlp.down_proj", "1.self_attn.q_proj"], 4),
                                            (r".*\.0\..*_proj", 3)])
def test_target_modules_list_and_exclude_modules(tmp_path, exclude, count):
    check("llama", peft_lora("llama", tmp_path, r=2, target_modules=LLAMA_QVD, exclude_modules=exclude))
    assert len(read_lora(tmp_path).weights) == count


@pytest.mark.parametrize("layers", [
    dict(layers_to_transform=[1], layers_pattern="layers"),
    dict(layers_to_transform=0),  # no pattern: the first numbered segment
    dict(layers_to_transform=[1], layers_pattern=["h", "layers"]),
])
def test_layers_to_transform_and_layers_pattern(tmp_path, layers):
    # an exact module name is targeted whatever its layer (PEFT's exact-match branch skips the layer filter)
    targets = LLAMA_QVD + ["model.layers.0.self_attn.k_proj"]
    check("llama", peft_lora("llama", tmp_path, r=2, target_modules=targets, **layers))
    assert "model.layers.0.self_attn.k_proj" in read_lora(tmp_path).weights and len(read_lora(tmp_path).weights) == 4


@pytest.mark.parametrize("rslora", [False, True])
def test_rank_pattern_alpha_pattern_and_rslora(tmp_path, rslora):
    lora_dir = peft_lora("llama", tmp_path, r=4, lora_alpha=8, target_modules=LLAMA_QVD, use_rslora=rslora,
                         rank_pattern={"v_proj": 2, "model.layers.1.self_attn.q_proj": 6},
                         alpha_pattern={"q_proj": 3, r"layers\.0\.mlp\.down_proj": 11, "layers.1.self_attn.q_proj": 5})
    lora = read_lora(lora_dir)
    # PEFT saves the patterns with sorted keys and its loader takes the first match in file order, so
    # layer 1's q_proj loads with alpha 5, although it trained with 3 (insertion order): the loader is the truth
    root = (lambda r: r ** 0.5) if rslora else (lambda r: r)
    assert lora.scalings["model.layers.1.self_attn.q_proj"] == pytest.approx(5 / root(6))
    assert lora.scalings["model.layers.0.self_attn.q_proj"] == pytest.approx(3 / root(4))
    assert lora.scalings["model.layers.0.mlp.down_proj"] == pytest.approx(11 / root(4))
    assert lora.scalings["model.layers.1.self_attn.v_proj"] == pytest.approx(8 / root(2))
    reference, _ = check("llama", lora_dir)
    # negative controls: the patterns ignored (one scaling for all), or the other rslora setting
    flat = dataclasses.replace(lora, scalings={m: lora.scaling() for m in lora.weights})
    assert rel(applied("llama", lora_dir, flat)[1], reference) > 1e-3
    other_root = (lambda r: r) if rslora else (lambda r: r ** 0.5)
    other = {m: s * root(A.shape[0]) / other_root(A.shape[0]) for m, s in lora.scalings.items()
             for A in [lora.weights[m][0]]}
    assert rel(applied("llama", lora_dir, dataclasses.replace(lora, scalings=other))[1], reference) > 1e-3


def test_use_rslora(tmp_path):
    lora_dir = peft_lora("llama", tmp_path, r=4, lora_alpha=6, target_modules=["q_proj", "down_proj"], use_rslora=True)
    lora = read_lora(lora_dir)
    assert lora.scaling() == pytest.approx(3.0) and all(s == pytest.approx(3.0) for s in lora.scalings.values())
    reference, _ = check("llama", lora_dir)
    plain_scaling = dataclasses.replace(lora, scalings={m: 6 / 4 for m in lora.weights})  # alpha / r
    assert rel(applied("llama", lora_dir, plain_scaling)[1], reference) > 1e-3


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_lora_bias(tmp_path, kind):
    targets = ["q_proj", "o_proj"] if kind == "llama" else ["query", "value"]
    lora_dir = peft_lora(kind, tmp_path, r=2, target_modules=targets, lora_bias=True)
    lora = read_lora(lora_dir)
    assert set(lora.biases) == set(lora.weights) and all(b.any() for b in lora.biases.values())
    reference, _ = check(kind, lora_dir)
    no_bias = dataclasses.replace(lora, biases={})
    assert rel(applied(kind, lora_dir, no_bias)[1], reference) > 1e-3


@pytest.mark.parametrize("kind, targets, heads", [
    ("bert-cls", ["query", "value"], ["classifier"]),
    ("distilbert-cls", ["q_lin", "v_lin"], ["classifier", "pre_classifier"]),
])
def test_modules_to_save_seq_cls_head(tmp_path, kind, targets, heads):
    lora_dir = peft_lora(kind, tmp_path, task_type="SEQ_CLS", r=2, target_modules=targets)
    lora = read_lora(lora_dir)
    assert {m: sorted(p) for m, p in lora.saved_modules.items()} == {h: ["bias", "weight"] for h in heads}
    reference, _ = check(kind, lora_dir)
    no_head = dataclasses.replace(lora, saved={})
    assert rel(applied(kind, lora_dir, no_head)[1], reference) > 1e-3


def test_modules_to_save_excludes_its_modules_from_targets(tmp_path):
    # 'dense' would also hit the pooler's Linear, but pooler is saved whole: PEFT does not wrap inside it
    lora_dir = peft_lora("bert", tmp_path, r=2, target_modules=["query", "dense"], modules_to_save=["pooler"])
    lora = read_lora(lora_dir)
    assert set(lora.saved_modules) == {"pooler"} and not any(m.startswith("pooler") for m in lora.weights)
    check("bert", lora_dir)


def test_gpt2_conv1d_fan_in_fan_out(tmp_path):
    lora_dir = peft_lora("gpt2", tmp_path, r=3, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    check("gpt2", lora_dir)


@pytest.mark.parametrize("variant", [dict(init_lora_weights=False), dict(init_lora_weights="gaussian"),
                                     dict(init_lora_weights="orthogonal"), dict(init_lora_weights="mica"),
                                     dict(init_lora_weights="eva"), dict(velora_config={"num_groups": 4}),
                                     dict(monteclora_config={})])
def test_inits_and_training_only_variants_that_leave_the_base(tmp_path, variant):
    """These change how the factors start or how they train, never the base weights or the eval forward."""
    from peft.tuners.lora.config import MontecloraConfig, VeloraConfig

    made = {**variant}
    if "velora_config" in made:
        made["velora_config"] = VeloraConfig(**made["velora_config"])
    if "monteclora_config" in made:
        made["monteclora_config"] = MontecloraConfig()
    check("llama", peft_lora("llama", tmp_path, r=4, target_modules=["q_proj", "v_proj"], **made))


def test_unknown_keys_are_ignored_as_peft_drops_them(tmp_path):
    lora_dir = peft_lora("llama", tmp_path, r=2, target_modules=["q_proj"])
    config = json.loads((lora_dir / "adapter_config.json").read_text())
    (lora_dir / "adapter_config.json").write_text(json.dumps({**config, "not_a_field": {"x": 1}, "use_dora2": True}))
    check("llama", lora_dir)


@pytest.mark.parametrize("config", [
    dict(target_modules=r".*(q|k)_proj", exclude_modules=["model.layers.1.self_attn.k_proj"]),
    dict(target_modules=["dense", "query"], modules_to_save=["pooler"], kind="bert"),
    dict(target_modules=["dense", "query"], task_type="SEQ_CLS", kind="bert-cls"),
    # 20+ names: PEFT condenses them to suffixes first, so the exact names lose their layer-filter bypass
    dict(target_modules=[f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj",
         "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
         + [f"absent{i}" for i in range(6)], layers_to_transform=[1]),
    dict(target_modules=["model.layers.0.self_attn.q_proj", "q_proj"] + [f"absent{i}" for i in range(18)],
         layers_to_transform=[1], layers_pattern=["h", "layers"]),
])
def test_lora_targets_are_peft_targets(config):
    from peft import LoraConfig, get_peft_model

    from polytool.formats.lora import LoraArtifact

    config = dict(config)
    kind = config.pop("kind", "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(build(kind), LoraConfig(r=2, **config))
    raw = {"peft_type": "LORA", "r": 2, "lora_alpha": 8, **config}
    names = [n for n, _ in build(kind).named_modules()]
    artifact = LoraArtifact(Path("."), raw, "float32", {}, {})
    assert lora_targets(artifact, names) == peft_targets(model) != set()


# ---- refused keys ---------------------------------------------------------------------------------


def edited(lora_dir, out, **changes):
    shutil.copytree(lora_dir, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return peft_lora("llama", tmp_path_factory.mktemp("plain"), r=2, target_modules=["q_proj", "v_proj"])


PEFT_MADE = [  # (LoraConfig arguments, the key the refusal must name)
    (dict(use_dora=True), "use_dora=True"),
    (dict(bias="all"), "bias='all'"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(init_lora_weights="pissa"), "init_lora_weights='pissa'"),
    (dict(init_lora_weights="pissa_niter_2"), "init_lora_weights='pissa_niter_2'"),
    (dict(init_lora_weights="olora"), "init_lora_weights='olora'"),
    (dict(init_lora_weights="lora_ga"), "init_lora_weights='lora_ga'"),
    (dict(layer_replication=[[0, 2], [1, 2]]), "layer_replication=[[0, 2], [1, 2]]"),
    (dict(trainable_token_indices=[1, 2]), "trainable_token_indices=[1, 2]"),
    (dict(alora_invocation_tokens=[3, 4], task_type="CAUSAL_LM"), "alora_invocation_tokens=[3, 4]"),
    (dict(target_modules=[], target_parameters=["self_attn.q_proj.weight"]), "target_parameters=['self_attn"),
    (dict(use_qalora=True), "use_qalora=True"),
    (dict(ensure_weight_tying=True), "ensure_weight_tying=True"),
    ("kasa", "kasa_config={"),
    ("bdlora", "use_bdlora={"),
]
EDITED = [  # config fields PEFT cannot write here (needs scipy, data, Megatron, several adapters)
    (dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}), "init_lora_weights='loftq'"),
    (dict(init_lora_weights="corda", corda_config={}), "init_lora_weights='corda'"),
    (dict(megatron_config={"num_layers": 2}), "megatron_config={'num_layers': 2}"),
    (dict(arrow_config={"top_k": 2}), "arrow_config={'top_k': 2}"),
    (dict(target_modules=None), "target_modules=None"),
    (dict(target_modules="all-linear"), "target_modules is 'all-linear'"),
    (dict(target_modules="ALL-LINEAR"), "target_modules is 'ALL-LINEAR'"),
    (dict(init_lora_weights="kaiming"), "init_lora_weights='kaiming'"),
    (dict(target_modules=".*q_proj", layers_to_transform=[0]), "layers_to_transform=[0] together with target_modules"),
    (dict(layers_pattern="layers"), "layers_pattern='layers' together with layers_to_transform=None"),
    (dict(lora_bias=True, init_lora_weights="gaussian"), "lora_bias=True together with init_lora_weights='gaussian'"),
    (dict(velora_config={}, init_lora_weights="mica"), "velora_config={} together with init_lora_weights='mica'"),
    (dict(rank_pattern={"q_proj": 0}), "rank_pattern must be an object of module pattern -> rank >= 1"),
    (dict(lora_alpha=None), "lora_alpha must be a number, got None"),
]


def _assert_refused(directory, names: str) -> None:
    with pytest.raises(AdapterError) as info:
        read_lora(directory)
    message = str(info.value)
    assert names in message and "\n" not in message, message


@pytest.mark.parametrize("made, names", PEFT_MADE, ids=[n.split("=")[0] for _, n in PEFT_MADE])
def test_refused_keys_peft_made(tmp_path, made, names):
    from peft.tuners.lora.config import BdLoraConfig, KasaConfig

    made = {"kasa": dict(kasa_config=KasaConfig()),
            "bdlora": dict(use_bdlora=BdLoraConfig(target_modules_bd_a=["q_proj"], target_modules_bd_b=["v_proj"],
                                                   nblocks=2))}[made] if isinstance(made, str) else made
    _assert_refused(peft_lora("llama", tmp_path / "a", r=4, **{"target_modules": ["q_proj", "v_proj"], **made}), names)


@pytest.mark.parametrize("changes, names", EDITED, ids=[n.split("=")[0].split(" ")[0] for _, n in EDITED])
def test_refused_keys_edited(plain, tmp_path, changes, names):
    _assert_refused(edited(plain, tmp_path / "a", **changes), names)


def test_odd_rank_orthogonal_is_refused_as_peft_refuses_it(tmp_path):
    from peft import PeftModel

    lora_dir = peft_lora("llama", tmp_path / "a", r=3, target_modules=["q_proj"])
    bad = edited(lora_dir, tmp_path / "b", init_lora_weights="orthogonal")
    with pytest.raises(ValueError, match="even"):
        PeftModel.from_pretrained(build("llama"), bad)
    _assert_refused(bad, "init_lora_weights='orthogonal' with the odd rank 3")


# ---- refused tensors and models -------------------------------------------------------------------


def with_tensors(lora_dir, out, drop=(), **add):
    from safetensors.torch import load_file, save_file

    shutil.copytree(lora_dir, out)
    tensors = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if not any(d in k for d in drop)}
    save_file({**tensors, **{k.replace("__", "."): v for k, v in add.items()}}, out / "adapter_model.safetensors",
              metadata={"format": "pt"})
    return out


def attach(lora_dir, kind="llama"):
    base = build(kind)
    return attach_lora(linears(base), read_lora(lora_dir), module_names=[n for n, _ in base.named_modules()])


def test_tensors_peft_would_ignore_are_refused(plain, tmp_path):
    key = "base_model__model__model__layers__0__mlp__up_proj__lora_"
    bad = with_tensors(plain, tmp_path / "a", **{key + "A__weight": torch.ones(2, 32),
                                                 key + "B__weight": torch.ones(48, 2)})
    with pytest.raises(PolytoolError, match=r"'model.layers.0.mlp.up_proj', which PEFT would not wrap .*would ignore"):
        attach(bad)


def test_targets_without_tensors_are_refused(plain, tmp_path):
    bad = with_tensors(plain, tmp_path / "a", drop=("layers.1.self_attn.v_proj",))
    with pytest.raises(PolytoolError, match=r"selects 'model.layers.1.self_attn.v_proj' \(1 modules in all\), .*"
                                            r"\(B = 0, a no-op\); the adapter is incomplete"):
        attach(bad)


def test_targets_that_are_not_linear_are_refused(plain, tmp_path):
    bad = edited(plain, tmp_path / "a", target_modules=["q_proj", "v_proj", "embed_tokens"])
    with pytest.raises(PolytoolError, match="selects 'model.embed_tokens', which is not a Linear or Conv1D layer"):
        attach(bad)
    nothing = edited(plain, tmp_path / "b", target_modules=["nothing"])
    with pytest.raises(PolytoolError, match="selects no module of this model: PEFT refuses to load it"):
        attach(nothing)


def test_shapes_that_do_not_fit_are_refused(plain, tmp_path):
    wide = with_tensors(plain, tmp_path / "a", base_model__model__model__layers__0__self_attn__q_proj__lora_A__weight=
                        torch.ones(2, 40))
    with pytest.raises(PolytoolError, match=r"'model.layers.0.self_attn.q_proj': lora_A \[2, 40\] / lora_B \[32, 2\] "
                                            r"do not fit the base's layer \(in 32, out 32\)"):
        attach(wide)
    lora = read_lora(plain)
    base = build("llama")
    with pytest.raises(PolytoolError, match=r"trained classifier.weight \[3, 32\] does not fit this model"):
        with swap_saved_modules(base, {"classifier": {"weight": torch.zeros(3, 32).numpy()}}):
            pass
    bad = dataclasses.replace(lora, saved={"lm_head.weight": torch.zeros(5, 32).numpy()})
    with pytest.raises(PolytoolError, match=r"trained lm_head.weight \[5, 32\] does not fit .* of shape \[96, 32\]"):
        with swap_saved_modules(base, bad):
            pass
    assert base.lm_head.weight.shape == (96, 32)


def test_bias_tensors_must_agree_with_lora_bias(plain, tmp_path):
    key = "base_model__model__model__layers__0__self_attn__q_proj__lora_B__bias"
    bad = with_tensors(plain, tmp_path / "a", **{key: torch.ones(32)})
    _assert_refused(bad, "has a lora_B bias, but lora_bias is false: PEFT would ignore it")
    _assert_refused(edited(plain, tmp_path / "b", lora_bias=True), "has no lora_B bias, but lora_bias is true")


def test_other_tensors_are_refused(plain, tmp_path):
    bad = with_tensors(plain, tmp_path / "a", base_model__model__model__norm__weight=torch.ones(32))
    _assert_refused(bad, "unexpected tensor 'base_model.model.model.norm.weight'")


def test_rank_pattern_must_fit_the_tensors(plain, tmp_path):
    _assert_refused(edited(plain, tmp_path / "a", rank_pattern={"v_proj": 3}), "with r=3 (from r / rank_pattern)")


def test_swap_restores_the_same_parameters_and_keeps_tied_partners(tmp_path):
    base = build("gpt2")  # lm_head is tied to transformer.wte
    before = {n: p for n, p in base.named_parameters(remove_duplicate=False)}
    assert base.lm_head.weight is base.transformer.wte.weight
    embeddings = base.transformer.wte.weight.detach().clone()
    new = torch.randn(VOCAB, 32).numpy()
    with swap_saved_modules(base, {"lm_head.weight": new}):
        assert torch.equal(base.lm_head.weight, torch.as_tensor(new))
        assert torch.equal(base.transformer.wte.weight, embeddings)  # PEFT's copy leaves the tied partner
    after = {n: p for n, p in base.named_parameters(remove_duplicate=False)}
    assert all(after[n] is p for n, p in before.items()) and torch.equal(base.lm_head.weight, embeddings)


def test_import_stays_torch_free():
    code = "import sys, polytool.formats.lora; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
