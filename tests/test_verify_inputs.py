"""verify on models that do not read token ids: a vision classifier (CLIP's, a nested vision_config, a trained
head) and Whisper (audio features in, decoder ids beside them), each with a Poly adapter PEFT wrote.

Each case is collapsed to a LoRA and to a dense model by the CLI, then:
- `polytool verify` of both passes (exit 0, rel error <= 1e-5), against polytool's reference and PEFT's;
- in the runtimes that read them (transformers' from_pretrained, PEFT's LoRA loader) both give PEFT's routed
  output for the task; negative controls: another task's routed output and the base's differ from it, a
  scaled weight in either artifact makes verify exit 1, and so does checking the LoRA as another task.
Plus what verify builds for other kinds of model (wav2vec2, CLIPModel, Speech2Text) and its refusals (exit 2).
"""
from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from polytool.cli import main
from polytool.errors import PolytoolError
from polytool.verify.inputs import SEED, random_inputs

from matrix import randomize

TASK, OTHER, N = 1, 2, 2
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
              patch_size=8)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=96)
WHISPER = dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
               max_source_positions=16, max_target_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1)


@dataclass(frozen=True)
class Media:
    model_class: str
    config_class: str
    config: dict
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    tensors: dict  # what verify should build with --inputs 4 --seq-len 32 (the defaults)


CASES = {
    # CLIPForImageClassification: its saved keys are its module names (ViT's are renamed on load)
    "clip-image-cls": Media("CLIPForImageClassification", "CLIPConfig",
                            dict(vision_config=VISION, text_config=TEXT, num_labels=3), ("q_proj", "v_proj", "fc1"),
                            ("classifier",), {"pixel_values": [4, 3, 16, 16]}),
    "whisper": Media("WhisperForConditionalGeneration", "WhisperConfig", WHISPER, ("q_proj", "v_proj"), (),
                     {"input_features": [4, 8, 32], "decoder_input_ids": [4, 32]}),
}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def build_base(case: Media):
    import transformers as tf

    torch.manual_seed(0)
    return getattr(tf, case.model_class)(getattr(tf, case.config_class)(**case.config)).eval()


def load(case: Media, directory: Path):
    import transformers as tf

    return getattr(tf, case.model_class).from_pretrained(directory, dtype=torch.float32).eval()


def write_adapter(case: Media, base_dir: Path, out: Path) -> None:
    """PEFT's Poly adapter (no task type, as PEFT's vision and audio examples), with non-trivial values."""
    from peft import PolyConfig, get_peft_model

    config = PolyConfig(r=3, n_tasks=3, n_skills=4, n_splits=2, target_modules=list(case.targets),
                        modules_to_save=list(case.modules_to_save) or None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load(case, base_dir), config)
    randomize(model)
    model.save_pretrained(out)


@pytest.fixture(scope="session")
def media(tmp_path_factory):
    """name -> {base, adapter, lora, dense}: built once per session, on first use."""
    built: dict = {}

    def get(name: str) -> dict:
        if name not in built:
            root, case = tmp_path_factory.mktemp(name), CASES[name]
            build_base(case).save_pretrained(root / "base")
            write_adapter(case, root / "base", root / "adapter")
            paths = {"base": root / "base", "adapter": root / "adapter"}
            for to in ("lora", "dense"):
                got = run("collapse", root / "adapter", "--task", TASK, "--to", to, "--out", root / to)
                assert got.exit_code == 0, got.output
                paths[to] = root / to
            built[name] = paths
        return built[name]

    return get


def fixed_inputs(case: Media) -> dict:
    """The runtime check's own inputs (not verify's): seeded, N of them."""
    g = torch.Generator().manual_seed(7)
    if case.model_class == "CLIPForImageClassification":
        return {"pixel_values": torch.randn((N, 3, 16, 16), generator=g)}
    return {"input_features": torch.randn((N, 8, 32), generator=g),
            "decoder_input_ids": torch.randint(0, 96, (N, 8), generator=g)}


def logits(model, inputs: dict, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, **extra).logits.detach().float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def verify_json(*args) -> tuple[int, dict | None, str]:
    got = run("verify", *args, "--json")
    return got.exit_code, json.loads(got.stdout) if got.stdout else None, got.stderr


# ---- verify: both artifacts pass, against either reference ------------------------------------------


@pytest.mark.parametrize("reference", ["polytool", "peft"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_verify_passes_lora_and_dense(media, name, reference):
    files, case = media(name), CASES[name]
    code, report, err = verify_json(files["adapter"], "--base", files["base"], "--against", files["lora"],
                                    "--against", files["dense"], "--reference", reference)
    assert code == 0, err
    assert report["inputs"]["tensors"] == case.tensors and report["inputs"]["seed"] == SEED
    assert report["family"] == ("seq2seq" if name == "whisper" else "encoder")
    assert "logits" in report["outputs"]
    assert [c["kind"] for c in report["checks"]] == ["lora", "dense"]
    for check in report["checks"]:
        assert check["task"] == TASK and check["passed"] and check["max_rel_err"] <= 1e-5, check
        assert check["adapter_effect_rel"] > 1e-2  # the adapter visibly changes the output


@pytest.mark.parametrize("name", sorted(CASES))
def test_self_check_passes_and_says_what_it_fed(media, name):
    files = media(name)
    got = run("verify", files["adapter"], "--base", files["base"], "--task", "0", "--inputs", "2")
    assert got.exit_code == 0 and "PASS: 2 of 2 checks passed" in got.stdout, got.output
    fed = {"clip-image-cls": "random pixel_values (2, 3, 16, 16) (seed 0)",
           "whisper": "random input_features (2, 8, 32), decoder_input_ids (2, 32) (seed 0)"}[name]
    assert f"inputs    {fed}" in got.stdout


# ---- the runtimes that read the artifacts give PEFT's routed output ---------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_artifacts_in_their_runtimes_give_peft_routed_output(media, name):
    from peft import PeftModel

    files, case = media(name), CASES[name]
    inputs = fixed_inputs(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        routed = PeftModel.from_pretrained(load(case, files["base"]), files["adapter"]).eval()
        lora = PeftModel.from_pretrained(load(case, files["base"]), files["lora"]).eval()
    # a PeftModel without task_type passes no task_ids: PEFT's PolyModel takes them itself
    want = logits(routed.base_model, inputs, task_ids=torch.full((N,), TASK))
    other = logits(routed.base_model, inputs, task_ids=torch.full((N,), OTHER))
    base = logits(load(case, files["base"]), inputs)
    dense = logits(load(case, files["dense"]), inputs)
    assert rel_err(dense, want) <= 1e-5
    assert rel_err(logits(lora, inputs), want) <= 1e-5
    assert rel_err(base, want) > 1e-2 and rel_err(other, want) > 1e-3  # negative controls


# ---- negative controls: verify fails a corrupted artifact and another task ---------------------------


def scaled_copy(src: Path, dst: Path, file: str, match: str, factor: float) -> Path:
    """A copy of `src` with the first tensor of `file` whose key contains `match` scaled by `factor`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    with safe_open(str(dst / file), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in sorted(tensors) if match in k)
    tensors[key] = tensors[key] * factor
    save_file(tensors, str(dst / file), metadata=metadata)
    return dst


@pytest.mark.parametrize("kind", ["lora", "dense"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_scaled_weight_fails(media, name, kind, tmp_path):
    files = media(name)
    file, match = ("adapter_model.safetensors", "lora_B") if kind == "lora" else ("model.safetensors", "q_proj.weight")
    bad = scaled_copy(files[kind], tmp_path / "bad", file, match, 1.05)
    code, report, err = verify_json(files["adapter"], "--base", files["base"], "--against", bad)
    assert code == 1 and not report["checks"][0]["passed"], err


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_lora_as_another_task_fails(media, name):
    files = media(name)
    code, report, _ = verify_json(files["adapter"], "--base", files["base"], "--against", files["lora"],
                                  "--task", OTHER)
    assert code == 1 and report["checks"][0]["task"] == OTHER and report["checks"][0]["max_rel_err"] > 1e-3


# ---- what verify builds for other models, and what it refuses --------------------------------------


def tiny(config_class: str, **kwargs):
    import transformers as tf

    return getattr(tf, config_class)(**kwargs)


def test_text_models_get_the_same_ids_as_before():
    config = tiny("LlamaConfig", vocab_size=96, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=64, architectures=["LlamaForCausalLM"])
    want = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(SEED))
    for class_name in (None, "AutoModelForCausalLM"):
        batches, info = random_inputs(config, 4, 16, class_name)
        assert list(batches[0]) == ["input_ids"] and torch.equal(batches[0]["input_ids"], want)
        assert info["tensors"] == {"input_ids": [4, 16]} and info["seq_len"] == 16


def test_t5_gets_its_ids_as_decoder_ids():
    config = tiny("T5Config", vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4)
    batches, info = random_inputs(config, 2, 8, "AutoModelForSeq2SeqLM")
    assert batches[0]["decoder_input_ids"] is batches[0]["input_ids"]
    assert info["tensors"] == {"input_ids": [2, 8], "decoder_input_ids": [2, 8]}


@pytest.mark.parametrize("model_class, config_class, kwargs, tensors", [
    # wav2vec2: raw audio whose conv stack gives --seq-len frames (the model's hidden states have 8 positions)
    ("Wav2Vec2ForSequenceClassification", "Wav2Vec2Config",
     dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, conv_dim=(8, 8),
          conv_kernel=(5, 3), conv_stride=(4, 2), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
          num_labels=2), {"input_values": [2, 1 + 4 + 2 * 4 + 7 * 8]}),
    # CLIP's pair model reads text and images
    ("CLIPModel", "CLIPConfig", dict(vision_config=VISION, text_config=TEXT),
     {"input_ids": [2, 8], "pixel_values": [2, 3, 16, 16]}),
    # an image_size pair
    ("ViTModel", "ViTConfig", dict(VISION, image_size=[16, 24]), {"pixel_values": [2, 3, 16, 24]}),
    ("WhisperForAudioClassification", "WhisperConfig", dict(WHISPER, num_labels=2), {"input_features": [2, 8, 32]}),
    # Speech2Text: L frames of features, and decoder ids
    ("Speech2TextForConditionalGeneration", "Speech2TextConfig",
     dict(vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
          decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, input_feat_per_channel=12,
          conv_channels=16, max_source_positions=64, max_target_positions=64),
     {"input_features": [2, 8, 12], "decoder_input_ids": [2, 8]}),
])
def test_inputs_from_signature_and_config_run(model_class, config_class, kwargs, tensors):
    import transformers as tf

    config = tiny(config_class, **kwargs)
    batches, info = random_inputs(config, 2, 8, model_class)
    assert info["tensors"] == tensors
    torch.manual_seed(0)
    model = getattr(tf, model_class)(config).eval()
    with torch.no_grad():
        out = model(**batches[0], output_hidden_states=True)
    assert torch.isfinite(out[0]).all()
    if model_class.startswith("Wav2Vec2"):  # --seq-len frames
        assert out.hidden_states[-1].shape[:2] == (2, 8)


def test_a_model_without_image_size_is_refused():
    from types import SimpleNamespace

    config = SimpleNamespace(patch_size=4)  # a config that names no image size nor channels
    with pytest.raises(PolytoolError, match="ViTModel reads 'pixel_values', and its config has no image_size"):
        random_inputs(config, 2, 8, "ViTModel")


def test_a_convolutional_model_without_image_size_gets_any_size():
    """CvT's config names no image_size (its convolutions take any): verify feeds ANY_IMAGE_SIZE images."""
    import transformers as tf
    from polytool.verify.inputs import ANY_IMAGE_SIZE

    config = tf.CvtConfig(embed_dim=[16, 32, 48], num_heads=[1, 2, 4], depth=[1, 2, 3], num_labels=2)  # depth[i] > i
    batches, info = random_inputs(config, 2, 8, "CvtForImageClassification")
    assert info["tensors"] == {"pixel_values": [2, 3, ANY_IMAGE_SIZE, ANY_IMAGE_SIZE]} and info["seq_len"] is None
    torch.manual_seed(0)
    with torch.no_grad():
        assert tf.CvtForImageClassification(config).eval()(**batches[0]).logits.shape == (2, 2)


def test_prompts_for_a_model_without_token_ids_exit_2(media, tmp_path):
    files = media("clip-image-cls")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    got = run("verify", files["adapter"], "--base", files["base"], "--prompts", prompts)
    assert got.exit_code == 2 and got.stdout == ""
    assert "--prompts: CLIPForImageClassification reads 'pixel_values', not token ids" in got.stderr


def test_a_model_whose_inputs_cannot_be_made_exits_2(media, tmp_path):
    """PatchTST reads past_values (a time series): named, with the class, in one line (before any load)."""
    base = tmp_path / "patchtst"
    tiny("PatchTSTConfig", architectures=["PatchTSTModel"]).save_pretrained(base)
    got = run("verify", media("clip-image-cls")["adapter"], "--base", base)
    assert got.exit_code == 2 and "Traceback" not in got.output
    assert "PatchTSTModel reads 'past_values', which verify cannot make" in got.stderr


@pytest.mark.parametrize("task_type, config_class, kwargs, want", [
    ("SEQ_2_SEQ_LM", "WhisperConfig", WHISPER, ("AutoModelForSpeechSeq2Seq", "seq2seq")),
    (None, "WhisperConfig", dict(WHISPER, architectures=["WhisperForConditionalGeneration"]),
     ("AutoModelForSpeechSeq2Seq", "seq2seq")),
    ("SEQ_CLS", "WhisperConfig", WHISPER, ("AutoModelForAudioClassification", "encoder")),  # encoder-only head
    ("SEQ_CLS", "CLIPConfig", dict(vision_config=VISION, text_config=TEXT), ("AutoModelForImageClassification", "encoder")),
    ("SEQ_2_SEQ_LM", "T5Config", {}, ("AutoModelForSeq2SeqLM", "seq2seq")),  # as before
    (None, "T5Config", dict(architectures=["T5EncoderModel"]), ("T5EncoderModel", "encoder")),  # takes no decoder ids
])
def test_model_class_for_images_and_audio(task_type, config_class, kwargs, want):
    from polytool.verify.models import model_class

    assert model_class(task_type, tiny(config_class, **kwargs)) == want


def test_llava_like_models_get_text_without_image_tokens():
    """A model whose images enter as image tokens of its ids gets token ids alone, none of them the image
    token (random images with random ids crashed LLaVA-like models: 'Image features and image tokens do not
    match'); the ids run through the model. Control: without the image token the same config draws it."""
    import transformers as tf

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    config = tf.LlavaConfig(vision_config=dict(VISION), text_config=dict(text, model_type="llama"),
                            image_token_index=5)
    batches, info = random_inputs(config, 4, 32, "LlavaModel")
    ids = batches[0]["input_ids"]
    assert info["tensors"] == {"input_ids": [4, 32]} and not (ids == 5).any()
    plain = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(SEED))
    assert (plain == 5).any() and torch.equal(ids[plain != 5], plain[plain != 5])
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.isfinite(tf.LlavaModel(config).eval()(**batches[0]).last_hidden_state).all()


def test_encoder_decoder_classifiers_get_one_eos_at_the_end():
    """BART classifies the hidden state of each row's <eos> and refuses rows with different counts of it."""
    import transformers as tf

    config = tf.BartConfig(vocab_size=16, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                           max_position_embeddings=64, num_labels=3, eos_token_id=2)
    batches, _ = random_inputs(config, 4, 32, "BartForSequenceClassification")
    ids = batches[0]["input_ids"]
    assert (ids[:, -1] == 2).all() and ((ids == 2).sum(1) == 1).all()
    torch.manual_seed(0)
    with torch.no_grad():
        assert tf.BartForSequenceClassification(config).eval()(**batches[0]).logits.shape == (4, 3)
    generated, _ = random_inputs(config, 4, 32, "BartForConditionalGeneration")  # control: other heads untouched
    assert not (generated[0]["input_ids"][:, -1] == 2).all()


def test_a_forward_that_refuses_the_inputs_is_a_one_line_error():
    from polytool.verify.compare import forward

    class Refuses(torch.nn.Module):
        def forward(self, input_ids, use_cache=None):
            raise ValueError("Each example must have the same number of <eos> tokens.\nmore")

    with pytest.raises(PolytoolError, match=r"Refuses's forward refused verify's inputs \(input_ids \[2, 4\]\): "
                                            r"ValueError: Each example must have the same number of <eos> tokens\. "):
        forward(Refuses(), "encoder", [{"input_ids": torch.zeros(2, 4, dtype=torch.long)}], {})


# ---- the range of the ids: vocab_size, else the input embedding's rows, else hash buckets ---------------

CANINE = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
              num_hash_functions=4, num_hash_buckets=64, max_position_embeddings=64)


def test_a_model_that_hashes_its_ids_gets_ids_over_its_buckets():
    """CANINE reads Unicode code points (its config has no vocab_size) and hashes each into num_hash_buckets
    rows: verify draws ids in [0, buckets), which reach every row of every hash table; the model runs on them."""
    import transformers as tf

    config = tiny("CanineConfig", **CANINE)
    assert getattr(config, "vocab_size", None) is None
    batches, info = random_inputs(config, 4, 32, "CanineForTokenClassification")
    want = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(SEED))
    assert info["tensors"] == {"input_ids": [4, 32]} and torch.equal(batches[0]["input_ids"], want)
    torch.manual_seed(0)
    with torch.no_grad():
        assert torch.isfinite(tf.CanineForTokenClassification(config).eval()(**batches[0]).logits).all()


def test_ids_sized_by_the_input_embedding(monkeypatch):
    """A config without vocab_size whose model has an input embedding: the ids cover its rows (built on the
    meta device: no memory). Control: with the embedding gone, and no hash buckets, verify refuses."""
    import transformers as tf

    class ToyIdsModel(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.table = torch.nn.Embedding(40, 8)

        def get_input_embeddings(self):
            return self.table

        def forward(self, input_ids):
            return self.table(input_ids)

    monkeypatch.setattr(tf, "ToyIdsModel", ToyIdsModel, raising=False)
    config = tf.PretrainedConfig()
    batches, _ = random_inputs(config, 4, 32, "ToyIdsModel")
    want = torch.randint(0, 40, (4, 32), generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(batches[0]["input_ids"], want)
    monkeypatch.setattr(ToyIdsModel, "get_input_embeddings", lambda self: None)
    with pytest.raises(PolytoolError, match=r"the base config has no vocab_size \(nor an input embedding"):
        random_inputs(config, 4, 32, "ToyIdsModel")


# ---- an adapted module its parent bypasses (reads the weight itself) -----------------------------------

SIGLIP_HEAD = Media("SiglipVisionModel", "SiglipVisionConfig", VISION, ("out_proj", "fc1"), (), {})


def test_a_module_its_parent_bypasses_is_named(tmp_path):
    """SigLIP's pooling head is an nn.MultiheadAttention, which reads out_proj's weight itself: PEFT's Poly layer
    there never runs, so the routed model (PEFT's and verify's) ignores that update while a dense merge applies
    it, and pooler_output differs. verify fails that dense model and its note names the module; with that update
    zero (as training leaves it: no gradient reaches it) the dense model passes. The LoRA passes either way."""
    from safetensors.torch import load_file, save_file

    build_base(SIGLIP_HEAD).save_pretrained(tmp_path / "base")
    write_adapter(SIGLIP_HEAD, tmp_path / "base", tmp_path / "adapter")
    silent = "head.attention.out_proj"
    for zeroed in (False, True):
        if zeroed:
            file = tmp_path / "adapter" / "adapter_model.safetensors"
            tensors = load_file(file)
            key = f"base_model.model.{silent}.poly_lora_B"
            tensors[key] = torch.zeros_like(tensors[key])
            save_file(tensors, file, metadata={"format": "pt"})
        for to in ("lora", "dense"):
            got = run("collapse", tmp_path / "adapter", "--task", TASK, "--to", to, "--out", tmp_path / to, "--force")
            assert got.exit_code == 0, got.output
        code, report, err = verify_json(tmp_path / "adapter", "--base", tmp_path / "base", "--against",
                                        tmp_path / "lora", "--against", tmp_path / "dense")
        lora, dense = report["checks"]
        assert lora["passed"] and not any(silent in n for n in lora["notes"]), lora
        assert any(f"bypassed by their parent, which reads the weight itself (first: {silent}" in n
                   for n in dense["notes"]), dense
        assert dense["passed"] == zeroed and code == (0 if zeroed else 1), (dense, err)
        assert zeroed or dense["first_failing_module"] == "head.mlp.fc1"
