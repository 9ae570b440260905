"""Loading the models verify compares: the base (with the class the adapter was trained for), dense
artifacts, and the device they run on."""
from __future__ import annotations

import logging
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

from ..formats.base import require_dir
from ..formats.safetensors import TORCH_NAMES, least_precise
from ..architectures import TASK_CLASS_ALTERNATIVES, TASK_CLASSES
from ..errors import CheckpointError, PolytoolError

DEVICES = ("cpu", "cuda", "auto")
FLOAT_NAMES = ("float64", "float32", "bfloat16", "float16")


def why(exc: Exception) -> str:
    """An exception as 'Type: first line of its message'."""
    return f"{exc.__class__.__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def utf8_path(path: Path) -> Path:
    """`path`, if it is valid UTF-8: the safetensors library (under torch and transformers) opens no other."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise PolytoolError("the path is not valid UTF-8, and the safetensors library that loads it for torch "
                            "opens only UTF-8 paths: rename it", path) from None
    return path


def base_config(base_dir: Path):
    """The base's transformers config; CheckpointError when the directory is not a model."""
    from transformers import AutoConfig

    require_dir(base_dir, "base model directory")
    if not (base_dir / "config.json").is_file():
        raise CheckpointError("no config.json here: not a transformers model directory", base_dir)
    if not any(base_dir.glob("*.safetensors")) and any(base_dir.glob("pytorch_model*.bin")):
        raise CheckpointError("holds only PyTorch .bin weights, a pickle verify does not unpickle: convert once "
                              "(from_pretrained(...).save_pretrained(dir) writes safetensors)", base_dir)
    try:
        return AutoConfig.from_pretrained(base_dir)
    except Exception as exc:  # transformers raises many types for a bad config
        raise CheckpointError(f"cannot read config.json ({why(exc)})", base_dir) from None


def model_class(task_type: str | None, config) -> tuple[str, str]:
    """(transformers class name, family) of the model the adapter was trained for: from PEFT's task_type (its
    Auto class, or the same task's for images or audio where that one does not map the base), else the base's
    `architectures`. family: 'causal', 'seq2seq' (its forward takes decoder ids) or 'encoder'."""
    archs = list(config.architectures or [])
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    if task_type in TASK_CLASSES:
        name = _mapping(TASK_CLASSES[task_type], config)
    elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        name = "AutoModelForCausalLM"
    elif seq2seq and any(a.endswith("ForConditionalGeneration") for a in archs):
        name = _mapping("AutoModelForSeq2SeqLM", config)
    else:
        import transformers

        name = next((a for a in archs if hasattr(transformers, a)), "AutoModel")
    if name == "AutoModelForCausalLM" or task_type == "CAUSAL_LM":  # MllamaForCausalLM: a causal LM too
        return name, "causal"
    cls = resolve_class(name, config)
    if cls is not None:  # what the forward takes decides (Whisper's audio classifier is an encoder)
        import inspect

        seq2seq = "decoder_input_ids" in inspect.signature(cls.forward).parameters
    return name, "seq2seq" if seq2seq else "encoder"


def _mapping(auto: str, config) -> str:
    """`auto`, or the first of its TASK_CLASS_ALTERNATIVES that maps `config`'s type, else the base's own class
    (its `architectures`: mllama's text model under CAUSAL_LM, Evolla under FEATURE_EXTRACTION), else `auto`,
    which the load then refuses in one line."""
    import transformers

    for name in (auto, *TASK_CLASS_ALTERNATIVES.get(auto, ())):
        if resolve_class(name, config) is not None:
            return name
    return next((a for a in config.architectures or [] if hasattr(transformers, a)), auto)


def resolve_class(name: str, config):
    """The transformers model class `name` loads for `config` (an Auto class resolved through its mapping), or
    None where transformers has no such class or the Auto class does not map the config."""
    import transformers

    cls = getattr(transformers, name, None)
    mapping = getattr(cls, "_model_mapping", None)
    if cls is None or mapping is None:
        return cls
    if type(config) not in mapping:  # what from_pretrained asks: EvollaConfig is found by getitem, refused there
        return None
    try:
        found = mapping[type(config)]
    except (KeyError, ValueError):
        return None
    if isinstance(found, (tuple, list)):  # several classes for one config: the one the base was saved as
        archs = set(config.architectures or [])
        found = next((c for c in found if c.__name__ in archs), found[0])
    return found


def load_model(directory: Path, class_name: str, device: str, max_memory: int | None = None,
               offload_dir: Path | None = None):
    """A transformers model in eval mode, upcast to float32, on `device` (auto: device_map). With `max_memory`
    (bytes, the run's budget) accelerate keeps at most that much less what the process already holds in CPU
    memory and offloads the rest to `offload_dir`."""
    import torch
    import transformers as tf

    cls = getattr(tf, class_name)
    # Where every floating tensor is stored in one half dtype and the model stays whole on one device, it is
    # loaded in that dtype and upcast after (exact): loading straight to float32 holds the float32 model beside
    # every page of the memory-mapped checkpoint (1.5x the float32 size at the peak, see performance.md). Not
    # with a device map: weights accelerate offloads would stay in the half dtype.
    stored = stored_dtypes(directory)
    half = max_memory is None and device != "auto" and len(stored) == 1 and next(iter(stored)) in ("BF16", "F16")
    dtype = getattr(torch, TORCH_NAMES[next(iter(stored))]) if half else torch.float32
    # mismatched shapes are reported in `info` (refused below, in one line), not raised after a logged table
    kwargs: dict[str, Any] = {"dtype": dtype, "output_loading_info": True, "ignore_mismatched_sizes": True,
                              "use_safetensors": True}  # never transformers' unpickler
    if device == "auto" or max_memory is not None:
        kwargs["device_map"] = "auto"
    if max_memory is not None:
        import tempfile

        # SIZE is the run's budget: what the process already holds (torch, transformers, ~0.4 GB) is not the
        # model's to fill, nor is room for the weights in flight (accelerate onloads an offloaded layer whole)
        kwargs["max_memory"] = {"cpu": max(max_memory - resident_bytes() - largest_tensor(directory), 0)}
        kwargs["offload_folder"] = str(offload_dir or tempfile.mkdtemp(prefix="polytool-offload-"))
    bars, verbosity = tf.utils.logging.is_progress_bar_enabled(), tf.utils.logging.get_verbosity()
    if not sys.stderr.isatty():
        tf.utils.logging.disable_progress_bar()  # progress bars only on a terminal
    tf.utils.logging.set_verbosity_error()  # its load report is multi-line; what matters is raised below
    dispatch = logging.getLogger("accelerate.big_modeling")  # "Some parameters are on the meta device": the
    dispatch_level = dispatch.level  # report says when the model was offloaded
    dispatch.setLevel(logging.ERROR)
    try:
        with _read_not_mapped() if max_memory is not None else nullcontext():
            model, info = cls.from_pretrained(directory, **kwargs)
    except Exception as exc:  # transformers raises many types for a bad checkpoint
        raise CheckpointError(f"cannot load the model ({why(exc)})", directory) from None
    finally:
        dispatch.setLevel(dispatch_level)
        tf.utils.logging.set_verbosity(verbosity)
        if bars:
            tf.utils.logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or []) + [str(m[0]) for m in info.get("mismatched_keys") or []]
    if missing:
        raise CheckpointError(f"incomplete checkpoint: {len(missing)} weights missing or mis-shaped "
                              f"(e.g. {missing[0]})", directory)
    if half:
        model.float()  # parameter by parameter: each half copy is freed as its float32 one is made
        _float32_buffers(model)
    if device == "cuda":
        model.to("cuda")
    return model.eval()


@contextmanager
def _read_not_mapped() -> Iterator[None]:
    """transformers reads safetensors checkpoints through the library's `pread` backend (as it does on Windows)
    instead of a memory map: a mapped checkpoint stays in the process's resident memory, every page read,
    until the load ends (the whole checkpoint beside the part of the model kept in memory). Used with
    --max-memory, where the load is sequential; the parallel in-memory load peaks higher with it (3.16 vs
    2.66 GB at 1.08 GB bf16), so it keeps the map."""
    import transformers.modeling_utils as loading

    mapped = loading.safe_open

    def pread(file, framework="pt", device="cpu", backend=None, **kwargs):
        return mapped(file, framework=framework, device=device, backend="pread" if device == "cpu" else backend,
                      **kwargs)

    loading.safe_open = pread
    try:
        yield
    finally:
        loading.safe_open = mapped


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory, no init); buffers stay real."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _float32_buffers(model) -> None:
    """The non-persistent floating buffers a float32 model computes at init (e.g. Gemma's embed_scale), put into
    `model`, which was built in half precision and upcast: computed in half they were rounded."""
    import torch

    with _parameters_on_meta():
        skeleton = type(model)._from_config(model.config, dtype=torch.float32)
    kept = set(model.state_dict())
    own = dict(model.named_buffers())
    for name, buffer in skeleton.named_buffers():
        if name not in kept and name in own and buffer.is_floating_point():
            module, _, leaf = name.rpartition(".")
            model.get_submodule(module)._buffers[leaf] = buffer.to(own[name].device)


def resident_bytes() -> int:
    """This process's resident memory now (Linux; 0 where /proc is not there)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Hand the C heap's free memory back to the system (glibc keeps freed chunks of large temporaries; a
    no-op elsewhere), so the next phase's peak does not stand on the last one's."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resolve_device(device: str) -> str:
    import torch

    if device not in DEVICES:
        raise PolytoolError(f"--device {device!r}: expected one of {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise PolytoolError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    if device == "auto":
        try:
            import accelerate  # noqa: F401  (device_map="auto" needs it)
        except ImportError:
            raise PolytoolError("--device auto needs accelerate: pip install 'polytool[auto]'") from None
    return device


def stored_dtypes(directory: Path) -> set[str]:
    """The floating safetensors dtypes (F32, BF16, ...) of a model directory's tensors."""
    from ..formats.safetensors import FLOAT_DTYPES, SafetensorsFile

    found = set()
    for file in sorted(directory.glob("*.safetensors")):
        with SafetensorsFile(file) as st:
            found |= {st.dtype(k) for k in st.keys()}
    return found & set(FLOAT_DTYPES)


def largest_tensor(directory: Path) -> int:
    """The float32 size in bytes of the largest tensor of a model directory's safetensors."""
    from ..formats.safetensors import SafetensorsFile

    largest = 0
    for file in sorted(directory.glob("*.safetensors")):
        with SafetensorsFile(file) as st:
            largest = max([largest, *(4 * math.prod(st.shape(k)) for k in st.keys())])
    return largest


def stored_dtype(directory: Path, config=None) -> str:
    """The least precise floating dtype of a model directory's safetensors (else its config's)."""
    found = stored_dtypes(directory)
    if least_precise(found):
        return TORCH_NAMES[least_precise(found)]
    dtype = str(getattr(config, "dtype", None) or "float32").removeprefix("torch.")
    return dtype if dtype in FLOAT_NAMES else "float32"


def linear_layers(model) -> dict:
    """{module path: nn.Linear or Conv1D} of every linear layer of a transformers model."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return {name: m for name, m in model.named_modules() if name and isinstance(m, (torch.nn.Linear, Conv1D))}


def fit_vocabulary(model, reference) -> int | None:
    """Resize `model`'s token embeddings (transformers' resize_token_embeddings, as PEFT needs the base resized
    first) to the rows of the input embedding the adapter carries whole (`reference`: verify's ReferenceAdapter,
    its `whole_shape`); the new row count, or None where the adapter keeps the base's vocabulary."""
    if not reference.whole:
        return None
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # a model without token embeddings (vision, audio)
        return None
    weight = getattr(embedding, "weight", None)
    name = next((n for n, p in model.named_parameters() if p is weight), None) if weight is not None else None
    shape = reference.whole_shape(name) if name else None
    if shape is None or len(shape) != 2 or shape[0] == weight.shape[0]:
        return None
    model.resize_token_embeddings(shape[0], mean_resizing=False)  # the adapter sets the rows
    return shape[0]
