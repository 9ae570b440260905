"""Routed eval forward and generate: the bare base model vs PEFT's Poly vs polytool's Poly, in one run.

A Llama-shaped model with random weights (nothing downloaded): 8 layers, hidden 1024, intermediate
2816, vocab 32000, every projection targeted (q k v o gate up down), r 8, 8 skills, 4 splits, 8 tasks,
float32. One adapter with non-zero B and task-dependent routing is saved once and loaded by PEFT
(PeftModel.from_pretrained) and by polytool (PolyModel.from_pretrained, frozen); a third row is
polytool's get_poly_model result in eval mode, whose adapter tensors still require grad; a fourth is the
frozen model in the order it ran before the fused eval forward (base product first, the update added after),
for a before/after figure in the same run.

Forward: a batch of 16 x 64 tokens with 6 different task ids. Generate: greedy, 4 prompts x 16
tokens, 32 new tokens, one task per prompt. Eval mode, torch.no_grad(), torch.set_num_threads(2),
warm-up, then the models take turns (interleaved, to spread noise); the median of N runs, the
fastest run (the least disturbed by other load on a shared machine) and the median of the paired ratios
(each run over the base's in the same round) are shown.

Usage: python benchmarks/bench_forward.py [--quick] [--repeat N] [--gen-repeat N] [--profile] [--vocab N]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import tempfile
import time

import torch

FULL = dict(hidden=1024, intermediate=2816, layers=8, heads=16, vocab=32000, batch=16, seq=64, repeat=15,
            gen_batch=4, prompt=16, new_tokens=32, gen_repeat=9)
QUICK = dict(hidden=256, intermediate=704, layers=4, heads=4, vocab=4096, batch=8, seq=32, repeat=7,
             gen_batch=4, prompt=8, new_tokens=8, gen_repeat=3)
R, SKILLS, SPLITS, TASKS, USED_TASKS = 8, 8, 4, 8, 6
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(size: dict) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["intermediate"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["heads"], max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def build_models(size: dict, adapter_dir: str) -> dict[str, torch.nn.Module]:
    """name -> model, all on the same base weights and the same adapter weights."""
    from peft import PeftModel

    from polytool import PolyConfig, PolyModel, get_poly_model

    base = build_base(size)
    trainable = get_poly_model(copy.deepcopy(base), PolyConfig(r=R, n_tasks=TASKS, n_skills=SKILLS,
                                                               n_splits=SPLITS, target_modules=TARGETS,
                                                               task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainable.named_parameters():
            if "poly_lora" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)  # non-zero B: the adapter changes the output
            elif "module_logits" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2)
    trainable.eval().save_pretrained(adapter_dir)
    frozen = PolyModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    return {
        "base": base,
        "peft": PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval(),
        "polytool": frozen,
        "polytool (trainable)": trainable,
        UNFUSED: frozen,
    }


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(calls: dict, repeat: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each entry, `repeat` times, the entries taking turns."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(warmup + repeat):
        for name, fn in calls.items():
            seconds = timed(fn)
            if i >= warmup:
                times[name].append(seconds)
    return times


UNFUSED = "polytool (unfused)"


@contextlib.contextmanager
def unfused():
    """The frozen polytool model as it ran before the fused eval forward: the base layer's product first, the
    update added after it (Linear._fusable answers None), for a before/after figure in one run."""
    from polytool.poly.layer import Linear

    fusable = Linear._fusable
    Linear._fusable = lambda self, x, adapter_name: None
    try:
        yield
    finally:
        Linear._fusable = fusable


def _run(name: str, fn, **kw):
    """fn(**kw), in the unfused order for the UNFUSED row."""
    with unfused() if name == UNFUSED else contextlib.nullcontext():
        return fn(**kw)


def forward_calls(models: dict, ids: torch.Tensor, tasks: torch.Tensor) -> dict:
    return {name: (lambda m=model: m(input_ids=ids)) if name == "base" else
            (lambda m=model, n=name: _run(n, m, input_ids=ids, task_ids=tasks)) for name, model in models.items()}


def generate_calls(models: dict, prompts: torch.Tensor, tasks: torch.Tensor, new_tokens: int) -> dict:
    kw = dict(attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=0)
    return {name: (lambda m=model: m.generate(input_ids=prompts, **kw)) if name == "base" else
            (lambda m=model, n=name: _run(n, m.generate, input_ids=prompts, task_ids=tasks, **kw))
            for name, model in models.items()}


def check_outputs(models: dict, ids: torch.Tensor, tasks: torch.Tensor) -> None:
    """polytool must equal PEFT, and the adapter must change the output."""
    logits = {name: fn().logits for name, fn in forward_calls(models, ids, tasks).items()}
    for name in ("polytool", "polytool (trainable)", UNFUSED):
        err = ((logits[name] - logits["peft"]).norm() / logits["peft"].norm()).item()
        print(f"  {name} vs peft: relative error {err:.1e}")
        if err > 1e-5:
            raise SystemExit(f"{name} differs from PEFT (relative error {err:.1e} > 1e-5)")
    change = ((logits["polytool"] - logits["base"]).norm() / logits["base"].norm()).item()
    print(f"  adapter vs bare base: relative change {change:.1e}")


def check_generate(calls: dict) -> None:
    """polytool's greedy tokens must be PEFT's."""
    tokens = {name: calls[name]() for name in ("peft", "polytool", "polytool (trainable)", UNFUSED)}
    same = all(torch.equal(tokens[name], tokens["peft"]) for name in tokens)
    print(f"  greedy tokens of polytool and peft: {'equal' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit("polytool's greedy tokens differ from PEFT's")


def report(title: str, times: dict[str, list[float]]) -> dict[str, float]:
    """Print median and fastest time with ratios to the base, and the median of the paired ratios (each run over
    the base's run of the same round: the box's speed drifts over minutes, and a pair shares its minute); return
    the median overhead % per model."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    fastest = {name: min(ts) for name, ts in times.items()}
    paired = {name: statistics.median(t / b for t, b in zip(ts, times["base"])) for name, ts in times.items()}
    print(title)
    for name in times:
        print(f"  {name:<22} median {medians[name] * 1e3:8.1f} ms {medians[name] / medians['base']:6.3f}x base   "
              f"fastest {fastest[name] * 1e3:8.1f} ms {fastest[name] / fastest['base']:6.3f}x base   "
              f"paired {paired[name]:6.3f}x")
    return {name: 100 * (medians[name] / medians["base"] - 1) for name in times if name != "base"}


def profile(models: dict, ids: torch.Tensor, tasks: torch.Tensor, name: str) -> None:
    """Top operators of one model's forward (torch.profiler, CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    call = forward_calls({name: models[name]}, ids, tasks)[name]
    call()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    print(f"profile of {name}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and fewer repeats")
    parser.add_argument("--repeat", type=int, help="timed forward runs per model (median shown)")
    parser.add_argument("--gen-repeat", type=int, help="timed generate runs per model (default 9; 3 with --quick)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables")
    parser.add_argument("--vocab", type=int, help="vocabulary size (a smaller lm_head makes the adapter's share larger)")
    args = parser.parse_args()
    size = dict(QUICK if args.quick else FULL)
    size["vocab"] = args.vocab or size["vocab"]
    repeat = args.repeat or size["repeat"]
    gen_repeat = args.gen_repeat or size["gen_repeat"]
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as adapter_dir:
        models = build_models(size, adapter_dir)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, size["vocab"], (size["batch"], size["seq"]), generator=g)
    tasks = torch.arange(size["batch"]) % USED_TASKS  # (b,): 6 different tasks
    prompts = ids[: size["gen_batch"], : size["prompt"]]
    gen_tasks = tasks[: size["gen_batch"]]
    print(f"Llama {size['layers']} layers, hidden {size['hidden']}, intermediate {size['intermediate']}, vocab "
          f"{size['vocab']}; Poly r {R}, {SKILLS} skills, {SPLITS} splits, {len(TARGETS)} targets per layer; "
          f"float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    with torch.no_grad():
        check_outputs(models, ids, tasks)
        fwd = report(f"forward, batch {size['batch']} x {size['seq']}, {USED_TASKS} tasks, median of {repeat}:",
                     interleaved(forward_calls(models, ids, tasks), repeat))
        gen_calls = generate_calls(models, prompts, gen_tasks, size["new_tokens"])
        check_generate(gen_calls)
        gen = report(f"greedy generate, {size['gen_batch']} prompts x {size['prompt']} + {size['new_tokens']} new "
                     f"tokens, median of {gen_repeat}:", interleaved(gen_calls, gen_repeat, 1))
        if args.profile:
            for name in ("base", "peft", "polytool"):
                profile(models, ids, tasks, name)
    print("summary: median overhead over the bare base: forward " + ", ".join(f"{n} {v:+.1f}%" for n, v in fwd.items())
          + "; generate " + ", ".join(f"{n} {v:+.1f}%" for n, v in gen.items()))


if __name__ == "__main__":
    main()
