"""README.md model cards of the artifacts polytool writes: where each came from and how to load it."""
from __future__ import annotations

from typing import Any

from .. import __version__
from ..architectures import TASK_CLASSES
from ..core.collapse import LORA_ALPHA
from ..core.taskspec import TaskSpec, spec_label
from .provenance import RECIPE_KEY


def _front_matter(base: str, tags: str) -> str:
    return f"---\nlibrary_name: peft\nbase_model: {base}\ntags: [{tags}]\n---"


def lora_card(adapter: Any, spec: TaskSpec, truncated: str = "") -> str:
    base = adapter.base_model_name_or_path or "BASE_MODEL"
    auto = TASK_CLASSES.get(adapter.task_type or "", "AutoModel")
    what = {"uniform": "uniform skill weights (MHR-mu)", "mean": "the mean over tasks of the routing weights"}
    chosen = what.get(str(spec), f"task {spec}")
    exact = (f"With its routing fixed, the Poly adapter is\nexactly this LoRA: lora_alpha {LORA_ALPHA} and r {adapter.r} "
             "give PEFT's scaling 1/r, the same as Poly's.")
    return f"""{_front_matter(base, "lora, poly, polytool")}
# LoRA collapsed from a Poly/MHR adapter: {spec_label(spec)}

Written by polytool {__version__} from the Poly/MHR adapter `{adapter.directory}`
(`{adapter.weights_file.name}` sha256 `{adapter.sha256}`, {adapter.n_tasks} tasks, {adapter.n_skills} skills,
{adapter.n_splits} splits, r {adapter.r}) for {chosen}. {truncated or exact}
The routing weights of every module are recorded in the safetensors metadata (`polytool.routing`).

```python
from transformers import {auto}
from peft import PeftModel

base = {auto}.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "path/to/this/directory")
```
"""


def merge_card(merge: Any, config: dict, truncated: bool) -> str:
    base = config.get("base_model_name_or_path") or "BASE_MODEL"
    lines = [f"- `{s.text}` ({s.kind}, sha256 `{s.sha256}`), weight {w!r}" for s, w in zip(merge.sources, merge.weights)]
    how = ("Per module, the best low-rank approximation of the merged delta (truncated SVD); ranks and "
           "errors are in the safetensors metadata (`polytool.truncation`)." if truncated else
           "Exact: the sources' factors side by side, so this LoRA's delta is the weighted sum of theirs.")
    return f"""{_front_matter(base, "lora, polytool, merge")}
# LoRA merged by polytool {__version__}: {merge.method}

{how} The recipe (sources, weights, method, parameters) is in the safetensors metadata (`{RECIPE_KEY}`).

{chr(10).join(lines)}

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base, "path/to/this/directory")  # base: {base}
```
"""
