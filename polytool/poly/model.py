"""PolyModel: a transformers model with Poly/MHR layers in place of its target linears (PEFT-compatible).

Task ids reach the layers through forward pre-hooks registered for one call (`task_context`).
The layers follow the model's train()/eval(); the wrapper never changes the mode by itself.
Saved files are PEFT's: keys `base_model.model.<module path>.poly_*` (no adapter name), the
"default" adapter at the top of the directory and any other adapter in a subfolder of its name.
modules_to_save modules are trained in place (PEFT trains a copy), and saved under their own keys.
"""
from __future__ import annotations

import dataclasses
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Union

import torch
from torch import nn

from ..architectures import PEFT_EMBEDDING_TARGETS, SAVED_EMBEDDING_NAMES
from ..formats.adapter_dir import PREFIX, WEIGHTS_NAME
from ..formats.adapter import load_adapter as read_adapter
from ..errors import AdapterError
from .config import CONFIG_NAME, PolyConfig, PolyValueError, default_target_modules
from .layer import Linear, PolyLayer
from .router import TaskIds, TaskRoute




def _matches(spec: Union[str, list, None], name: str) -> bool:
    """PEFT's rule: a str is a regex full match; a list matches a name exactly or as a `.`-suffix."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def _inside(name: str, saved: list[str]) -> bool:
    """True when module `name` is one of the `saved` module paths or lies inside one."""
    return any(name == s or name.startswith(s + ".") for s in saved)


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    return torch.load(file, map_location="cpu", weights_only=True)


class PolyModel(nn.Module):
    """Poly/MHR adapters on `model` (attribute `.model`); unknown attributes fall through to it."""

    prefix = "poly_"

    def __init__(self, model: nn.Module, config: PolyConfig, adapter_name: str = "default"):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, PolyConfig] = {}
        self._active_adapter = adapter_name
        self.training = model.training  # follow the model; never switch modes here
        self.add_adapter(adapter_name, config)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ---- adapters ---------------------------------------------------------------------------
    def _prepare_config(self, config: PolyConfig) -> PolyConfig:
        config = dataclasses.replace(config)  # a copy: the caller's object is left alone
        if config.target_modules is None:
            model_type = getattr(getattr(self.model, "config", None), "model_type", None)
            config.target_modules = default_target_modules(model_type)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.model, "name_or_path", None) or None
        return config

    def _poly_layers(self) -> Iterator[tuple[str, PolyLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, PolyLayer):
                yield name, module

    def _targets(self, config: PolyConfig) -> list[str]:
        """Paths of the modules `config` targets (not excluded, not in modules_to_save, not inside a Poly layer)."""
        layers = [name for name, _ in self._poly_layers()]
        saved = [name for name, _ in self._modules_to_save(config)]
        return [
            name for name, _ in self.model.named_modules()
            if name and _matches(config.target_modules, name) and not _matches(config.exclude_modules, name)
            and not _inside(name, saved) and not any(name.startswith(p + ".") for p in layers)
        ]

    def add_adapter(self, adapter_name: str, config: PolyConfig) -> None:
        """Add a Poly adapter to the target modules; the active adapter stays active (see set_adapter)."""
        if adapter_name in self.peft_config:
            raise PolyValueError(f"adapter {adapter_name!r} already exists")
        config = self._prepare_config(config)
        targets = self._targets(config)
        if not targets:
            raise PolyValueError(f"target_modules {config.target_modules!r} match no module of the model")
        for path in targets:
            parent_path, _, leaf = path.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            self._create_and_replace(config, adapter_name, getattr(parent, leaf), leaf, parent, name=path)
        self.peft_config[adapter_name] = config
        self.set_adapter(self._active_adapter)  # new layers route through the active adapter too

    def _create_and_replace(self, poly_config: PolyConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, **optional_kwargs: Any) -> None:
        """Add the adapter to `target` if it is a Poly layer, else put a new Poly layer in its place."""
        if isinstance(target, PolyLayer):
            target.update_layer(adapter_name, poly_config)
            return
        name = optional_kwargs.get("name", target_name)
        setattr(parent, target_name, self._create_new_module(poly_config, adapter_name, target, name=name))

    @staticmethod
    def _create_new_module(poly_config: PolyConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> Linear:
        """A Poly Linear around an nn.Linear or Conv1D; UnsupportedTargetError (ValueError and TypeError) otherwise."""
        return Linear(target, adapter_name, poly_config, name=kwargs.get("name", ""))

    @property
    def active_adapter(self) -> str:
        return self._active_adapter

    def set_adapter(self, adapter_name: str) -> None:
        """Route through `adapter_name`; its parameters become the trainable ones (unless inference_mode)."""
        if adapter_name not in self.peft_config:
            raise PolyValueError(f"no adapter named {adapter_name!r}; have {', '.join(sorted(self.peft_config))}")
        self._active_adapter = adapter_name
        for _, layer in self._poly_layers():
            layer.active_adapter = adapter_name
        self._update_trainable()

    def _update_trainable(self) -> None:
        """Freeze everything, then unfreeze the active adapter's Poly tensors and its modules_to_save."""
        self.model.requires_grad_(False)
        config = self.peft_config.get(self._active_adapter)
        if config is None or config.inference_mode:
            return
        for _, layer in self._poly_layers():
            if self._active_adapter in layer.poly_lora_A:
                for p in layer.adapter_parameters(self._active_adapter).values():
                    p.requires_grad_(True)
        for _, module in self._modules_to_save(config):
            module.requires_grad_(True)

    def _modules_to_save(self, config: PolyConfig) -> list[tuple[str, nn.Module]]:
        """The modules trained whole, by PEFT's rule: the outermost modules whose name ENDS WITH an entry (so
        SEQ_CLS's "classifier" takes DistilBERT's pre_classifier too); a str entry list is a regex, as PEFT's."""
        spec = config.modules_to_save
        if isinstance(spec, str):
            return [(n, m) for n, m in self.model.named_modules() if n and _matches(spec, n)]
        found: list[tuple[str, nn.Module]] = []
        for n, m in self.model.named_modules():
            if n and any(n.endswith(entry) for entry in spec or ()) and not _inside(n, [f for f, _ in found]):
                found.append((n, m))
        return found

    def _embedding_targets(self, adapter_name: str) -> list[tuple[str, PolyLayer]]:
        """Poly layers of `adapter_name` on an embedding layer (lm_head, embed_tokens): PEFT saves their base weight."""
        return [(path, layer) for path, layer in self._poly_layers()
                if adapter_name in layer.poly_lora_A and path.rpartition(".")[2] in PEFT_EMBEDDING_TARGETS]

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base model inside the block (modules_to_save stay as trained)."""
        layers = [layer for _, layer in self._poly_layers()]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disabled = False

    def invalidate_cache(self) -> None:
        """Forget every layer's eval factors. The cache follows in-place updates, load_state_dict, replaced and
        moved tensors by itself (version counters, storage pointers); a write through `.data` (no version
        counter moves) is the one change it cannot see: call this after one."""
        for _, layer in self._poly_layers():
            layer.invalidate_cache()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        share = 100 * trainable / total
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")

    # ---- task ids and calls -----------------------------------------------------------------
    @contextmanager
    def _manage_pre_hooks(self, task_ids: TaskIds | None, keep_factors: bool = False) -> Iterator[None]:
        """Within the block every Poly layer receives `task_ids` (an int, a list or a tensor), converted
        and checked once per block as a TaskRoute (`keep_factors`: see TaskRoute)."""
        if task_ids is None:
            yield
            return
        route = TaskRoute(task_ids, keep_factors)

        def pre_hook(_module, args, kwargs):
            kwargs["task_ids"] = route
            return args, kwargs

        def batch_hook(_module, args, kwargs):
            for key in ("input_ids", "inputs_embeds", "decoder_input_ids", "decoder_inputs_embeds"):
                route.note_batch(kwargs.get(key))
            route.note_batch(args[0] if args else None)

        handles = [layer.register_forward_pre_hook(pre_hook, with_kwargs=True) for _, layer in self._poly_layers()]
        callers = [self.model] + ([self.model.get_encoder()] if hasattr(self.model, "get_encoder") else [])
        handles += [m.register_forward_pre_hook(batch_hook, with_kwargs=True) for m in callers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def task_context(self, task_ids: TaskIds) -> Any:
        """Public name of `_manage_pre_hooks`: `with model.task_context(ids): model.model(...)`."""
        return self._manage_pre_hooks(task_ids)

    def forward(self, *args: Any, task_ids: TaskIds | None = None, **kwargs: Any) -> Any:
        with self._manage_pre_hooks(task_ids):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, task_ids: TaskIds | None = None, **kwargs: Any) -> Any:
        """model.generate with task ids that follow beam / num_return_sequences expansion; each layer
        mixes and gathers its factors once for all the steps (the parameters are fixed meanwhile)."""
        with self._manage_pre_hooks(task_ids, keep_factors=True):
            return self.model.generate(*args, **kwargs)

    # ---- files ------------------------------------------------------------------------------
    def _adapter_state_dict(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Saved keys -> tensors of one adapter (Poly tensors, then modules_to_save), PEFT's key names."""
        state = {}
        for path, layer in self._poly_layers():
            if adapter_name in layer.poly_lora_A:
                for suffix, p in layer.adapter_parameters(adapter_name).items():
                    state[f"{PREFIX}{path}.{suffix}"] = p
        for path, module in self._modules_to_save(self.peft_config[adapter_name]):
            for key, tensor in module.state_dict().items():
                state[f"{PREFIX}{path}.{key}"] = tensor
        for path, layer in self._embedding_targets(adapter_name):  # PEFT's save_embedding_layers="auto"
            state[f"{PREFIX}{path}.base_layer.weight"] = layer.base_layer.weight
        return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}  # clone: no shared storage

    def save_pretrained(self, save_directory: Union[str, Path]) -> None:
        """Write every adapter as PEFT does: "default" into the directory, others into <directory>/<name>."""
        from safetensors.torch import save_file

        for name, config in self.peft_config.items():
            out = Path(save_directory) if name == "default" else Path(save_directory) / name
            out.mkdir(parents=True, exist_ok=True)
            save_file(self._adapter_state_dict(name), str(out / WEIGHTS_NAME), metadata={"format": "pt"})
            auto = config.auto_mapping
            if config.task_type is None:  # PEFT records the base class so AutoPeftModel can rebuild it
                auto = {"base_model_class": type(self.model).__name__, "parent_library": type(self.model).__module__}
            dataclasses.replace(config, inference_mode=True, auto_mapping=auto).save_pretrained(out)

    def _load_weights(self, adapter_name: str, tensors: dict[str, torch.Tensor], file: Path) -> None:
        """Copy saved tensors into the adapter; every key must be used and every tensor found."""
        expected = {}
        for path, layer in self._poly_layers():
            if adapter_name in layer.poly_lora_A:
                expected.update({f"{PREFIX}{path}.{s}": p for s, p in layer.adapter_parameters(adapter_name).items()})
        for path, module in self._modules_to_save(self.peft_config[adapter_name]):
            expected.update({f"{PREFIX}{path}.{k}": t for k, t in module.state_dict(keep_vars=True).items()})
        optional = {}  # embedding weights PEFT saves whole: loaded where present, as PEFT loads them
        for path, module in self.model.named_modules():
            if path.rpartition(".")[2] in SAVED_EMBEDDING_NAMES:
                layer = module.base_layer if isinstance(module, PolyLayer) else module
                key = f"{PREFIX}{path}.base_layer.weight" if isinstance(module, PolyLayer) else f"{PREFIX}{path}.weight"
                if key in tensors and isinstance(getattr(layer, "weight", None), torch.Tensor):
                    optional[key] = layer.weight
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise AdapterError(f"no tensor {missing[0]!r} ({len(missing)} missing): made for another model?", file)
        expected.update(optional)
        extra = sorted(set(tensors) - set(expected))
        if extra:
            raise AdapterError(f"tensor {extra[0]!r} ({len(extra)} unused) matches no module of this model", file)
        with torch.no_grad():
            for key, target in expected.items():
                if tuple(tensors[key].shape) != tuple(target.shape):
                    raise AdapterError(f"tensor {key!r} has shape {list(tensors[key].shape)}, "
                                       f"the model needs {list(target.shape)}", file)
                target.copy_(tensors[key])

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: Union[str, Path], adapter_name: str = "default",
                        is_trainable: bool = False) -> "PolyModel":
        """Load a PEFT-format Poly adapter directory (or its `adapter_name` subfolder) onto `model`."""
        path = Path(model_id)
        in_subfolder = not (path / CONFIG_NAME).is_file() and (path / adapter_name / CONFIG_NAME).is_file()
        adapter = read_adapter(path, adapter_name if in_subfolder else None)  # validated before use
        config = PolyConfig.from_dict(adapter.config)
        config.inference_mode = not is_trainable
        poly = cls(model, config, adapter_name)
        poly._load_weights(adapter_name, _read_tensors(adapter.weights_file), adapter.weights_file)
        return poly


def get_poly_model(model: nn.Module, config: PolyConfig, adapter_name: str = "default") -> PolyModel:
    """Wrap `model` with a freshly initialised Poly/MHR adapter (PEFT's get_peft_model for Poly)."""
    return PolyModel(model, config, adapter_name)
