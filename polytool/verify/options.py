"""What `polytool verify` is asked to do, as one value (the CLI's options, one field each)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VerifyOptions:
    adapter_dir: Path | None = None
    base_dir: Path | None = None
    against: tuple = ()  # artifacts to check; empty: the self-check
    task: str | None = None
    atol: float | None = None  # None: by the artifact's dtype (TOLERANCES)
    rtol: float | None = None
    n_inputs: int = 4
    seq_len: int | None = None
    prompts: Path | None = None
    device: str = "cpu"
    allow_noop: bool = False
    max_kl: float | None = None
    reference: str = "polytool"  # or "peft"
    max_memory: str | int | None = None  # as given ("1GB"); bytes once verify() has read it
    offload_dir: Path | None = None
    gguf_base: Path | None = None
    one_copy: bool = True  # False loads dense artifacts whole (tests compare the two ways)

    @property
    def tolerance(self) -> tuple[float | None, float | None]:
        return self.atol, self.rtol
