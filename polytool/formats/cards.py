"""README.md model cards of the artifacts polytool writes (LoRA, dense model, GGUF folder, merge), as
huggingface_hub's ModelCard / ModelCardData write them: YAML front matter the hub reads (base_model as a hub
id where known, base_model_relation, library_name, tags) plus a `polytool` block (source, sha256, task or recipe),
then where the artifact came from, how to load it and the `polytool verify` command that proves it.
The YAML is written by a YAML library, so any path (with `: `, `#`, quotes) gives valid front matter."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import DOCS_URL, __version__
from ..architectures import TASK_CLASSES
from ..core.collapse import LORA_ALPHA
from ..core.taskspec import TaskSpec, spec_label
from ..core.units import plural
from .hub import is_repo_id, split_revision
from .provenance import RECIPE_KEY

THIS = "path/to/this/directory"


def hub_id(name: str | Path | None) -> str | None:
    """The hub id of a base: `org/name` as recorded (when no such local path exists), or the repository of a
    Hugging Face cache snapshot (…/models--org--name/snapshots/<commit>); None for a plain local path."""
    if not name:
        return None
    path = Path(str(name))
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/")
    repo = split_revision(str(name))[0]
    try:
        local = path.exists()
    except (OSError, ValueError):
        local = False
    return repo if not local and is_repo_id(repo) else None  # a local base never imports huggingface_hub


# huggingface_hub's ModelCardData fields, in the order its to_yaml writes them (before any other key)
CARD_FIELDS = ("base_model", "datasets", "eval_results", "language", "library_name", "license", "license_name",
               "license_link", "metrics", "model_name", "pipeline_tag", "tags")


def render_card(meta: dict[str, Any], body: str) -> str:
    """A model card: `meta` (None values dropped) as YAML front matter, then `body` (Markdown). The text
    huggingface_hub's `str(ModelCard(...))` of `ModelCardData(**meta)` gives (tests/test_cards.py compares
    them), written with the YAML library alone: importing huggingface_hub's card module (its HTTP client and
    hub API) took 0.3 s and 14 MB of every dense merge (docs/performance.md)."""
    import yaml

    meta = {k: v for k, v in meta.items() if v is not None}
    if isinstance(meta.get("tags"), (list, str)):  # as ModelCardData keeps them: unique, in order
        meta["tags"] = list(dict.fromkeys([meta["tags"]] if isinstance(meta["tags"], str) else meta["tags"]))
    ordered = {k: meta[k] for k in CARD_FIELDS if k in meta} | {k: v for k, v in meta.items() if k not in CARD_FIELDS}
    front = yaml.dump(ordered, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n\n{body.strip()}\n"


def _base_meta(base: Any, relation: str, library: str, tags: list[str]) -> dict[str, Any]:
    return {"base_model": hub_id(base), "base_model_relation": relation, "library_name": library,
            "tags": ["polytool", *tags]}


def _source(adapter: Any, spec: TaskSpec | str, base: Any) -> dict[str, Any]:
    """The `polytool` block of a card made from one adapter and one task spec."""
    return {"version": __version__, "source": str(adapter.directory), "source_sha256": adapter.sha256,
            "task": spec if isinstance(spec, int) else str(spec), "base": None if base is None else str(base),
            "revision": adapter.config.get("revision")}


def _chosen(spec: TaskSpec | str) -> str:
    what = {"uniform": "uniform skill weights (MHR-mu)", "mean": "the mean over tasks of the routing weights",
            "all": "every task (one file each)"}
    return what.get(str(spec), f"task {spec}")


def _verify(adapter: Any, against: str, base: Any = None, extra: str = "") -> str:
    base_arg = f" --base {base}" if base is not None else ""
    return (f"## Verify\n\n```bash\npolytool verify {adapter.directory}{base_arg} --against {against}{extra}\n```\n\n"
            f"Exit 0 proves the artifact computes what the routed Poly model computes ({DOCS_URL}ci.md).")


def lora_card(adapter: Any, spec: TaskSpec, truncated: str = "", base: Any = None, resize: int | None = None) -> str:
    """The card of a LoRA collapsed from one task spec (collapse --to lora); `resize`: the row count of the
    embeddings it carries whole (a resized vocabulary), which the base is resized to before PEFT loads it."""
    name = adapter.base_model_name_or_path or "BASE_MODEL"
    auto = TASK_CLASSES.get(adapter.task_type or "", "AutoModel")
    exact = (f"With its routing fixed, the Poly adapter is\nexactly this LoRA: lora_alpha {LORA_ALPHA} and r {adapter.r} "
             "give PEFT's scaling 1/r, the same as Poly's.")
    resized = "" if resize is None else f"\nbase.resize_token_embeddings({resize})  # the vocabulary the adapter was trained with"
    body = f"""# LoRA collapsed from a Poly/MHR adapter: {spec_label(spec)}

Written by polytool {__version__} from the Poly/MHR adapter `{adapter.directory}`
(`{adapter.weights_file.name}` sha256 `{adapter.sha256}`, {plural(adapter.n_tasks, 'task')}, {plural(adapter.n_skills, 'skill')},
{plural(adapter.n_splits, 'split')}, r {adapter.r}) for {_chosen(spec)}. {truncated or exact}
The routing weights of every module are recorded in the safetensors metadata (`polytool.routing`).

```python
from transformers import {auto}
from peft import PeftModel

base = {auto}.from_pretrained({name!r}){resized}
model = PeftModel.from_pretrained(base, {THIS!r})
```

{_verify(adapter, THIS)}
"""
    meta = {**_base_meta(name, "adapter", "peft", ["lora", "poly"]), "polytool": _source(adapter, spec, base or name)}
    return render_card(meta, body)


def dense_card(adapter: Any, spec: TaskSpec, base: Path) -> str:
    """The card of a dense model: one task spec merged into the base's weights (collapse --to dense)."""
    name = hub_id(base) or str(base)
    auto = TASK_CLASSES.get(adapter.task_type or "", "AutoModel")
    body = f"""# {Path(name).name} with a Poly/MHR task merged in: {spec_label(spec)}

A complete model directory: the base `{name}` with {_chosen(spec)} of the Poly/MHR adapter
`{adapter.directory}` (sha256 `{adapter.sha256}`) merged into its weights by polytool {__version__}
(`polytool collapse --to dense`). It loads without adapter code; it is not the base model.

```python
from transformers import {auto}

model = {auto}.from_pretrained({THIS!r})
```

{_verify(adapter, THIS, base)}
"""
    meta = {**_base_meta(base, "merge", "transformers", ["poly", "merge"]),
            "polytool": _source(adapter, spec, base)}
    return render_card(meta, body)


def gguf_card(adapter: Any, base: Path, files: list[str]) -> str:
    """The card of a `collapse --task all --to gguf` folder: one GGUF LoRA per task for llama.cpp."""
    listed = "\n".join(f"- `{f}`" for f in files)
    body = f"""# GGUF LoRAs collapsed from a Poly/MHR adapter: one per task

Written by polytool {__version__} from the Poly/MHR adapter `{adapter.directory}` (sha256 `{adapter.sha256}`,
{plural(adapter.n_tasks, 'task')}), for llama.cpp, against the base `{base}`:

{listed}

```bash
llama-cli -m BASE.gguf --lora {THIS}/task-0.gguf
```

{_verify(adapter, THIS + '/task-0.gguf', extra=' --gguf-base BASE.gguf')}
"""
    meta = {**_base_meta(adapter.base_model_name_or_path or base, "adapter", "gguf", ["lora", "poly", "gguf"]),
            "polytool": _source(adapter, "all", base)}
    return render_card(meta, body)


def merge_card(merge: Any, config: dict, truncated: bool, recipe: dict | None = None, base: Any = None) -> str:
    """The card of a `polytool merge` output: a LoRA (config: its adapter_config) or, with `base`, a dense model."""
    name = config.get("base_model_name_or_path") or "BASE_MODEL"
    lines = [f"- `{s.text}` ({s.kind}, sha256 `{s.sha256}`), weight {w!r}" for s, w in zip(merge.sources, merge.weights)]
    if base is not None:
        how, load = ("The merged delta is added to the base's weights: a complete model directory.",
                     f"from transformers import AutoModel\nmodel = AutoModel.from_pretrained({THIS!r})  # not the base")
    else:
        how = ("Per module, the best low-rank approximation of the merged delta (truncated SVD); ranks and "
               "errors are in the safetensors metadata (`polytool.truncation`)." if truncated else
               "Exact: the sources' factors side by side, so this LoRA's delta is the weighted sum of theirs.")
        load = f"from peft import PeftModel\nmodel = PeftModel.from_pretrained(base, {THIS!r})  # base: {name}"
    poly = next((s for s in merge.sources if s.kind == "poly"), None)
    if poly is None or merge.method != "linear":  # verify recomputes linear merges with a Poly source only
        why = "has no Poly/MHR source" if poly is None else f"uses {merge.method}, whose pruning verify does not redo"
        check = f"## Verify\n\n`polytool verify` does not check this merge (it {why}): verify its sources instead."
    else:
        check = _verify(poly, THIS, base)
    body = f"""# {'Dense model' if base is not None else 'LoRA'} merged by polytool {__version__}: {merge.method}

{how} The recipe (sources, weights, method, parameters) is in the safetensors metadata (`{RECIPE_KEY}`)
and in this card's front matter (`polytool.recipe`).

{chr(10).join(lines)}

```python
{load}
```

{check}
"""
    meta = {**_base_meta(base or name, "merge" if base is not None else "adapter",
                         "transformers" if base is not None else "peft", ["lora", "merge"] if base is None else ["merge"]),
            "polytool": {"version": __version__, "recipe": recipe}}
    return render_card(meta, body)

