"""`polytool adapt`: does learning only the routing of a new task work, and is it fast and lean? In one run:

1. Learning. A small random Llama (hidden 128, 2 layers, frozen; the fixtures' character tokenizer) gets a
   Poly/MHR adapter (r 8, 4 skills, 2 splits, all 7 projections) trained by polytool on 8 synthetic tasks
   over letters: at every position the next letter follows one of
   4 rules (shift+1, shift+3, reverse, swapcase) drawn with the task's own probabilities, so each task is a
   different mixture of the same skills. A 9th mixture is held out. `adapt --train routing` learns it from
   a few dozen examples (3 seeds); its loss on 512 held-out sequences is set beside uniform routing (MHR-mu),
   the mean of the tasks' logits, the best single training task's routing, and a routing fitted with
   plenty of data (2000 examples, 4x the steps), all with the same skills.
2. Speed and memory. The same routing-only training (same model, batches, steps, AdamW) written with PEFT's
   PolyModel (logits tables trainable, the old rows' gradients masked to zero) and with polytool's adapt
   loop, each in its own process: examples/s side by side, the ratio, peak RSS, the numbers the optimizer
   keeps. A Llama-shaped model, hidden 256, 4 layers, all 7 projections targeted, r 8, 8 skills, 4 splits.

Usage: python benchmarks/bench_adapt.py [--quick] [--threads N] [--skip-learning] [--skip-speed]
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TOKENIZER = ROOT / "fixtures" / "tiny-llama"
LETTERS = [chr(c) for c in range(32, 127) if chr(c).isalpha()]
N = len(LETTERS)
RULES = (lambda i: (i + 1) % N, lambda i: (i + 3) % N, lambda i: N - 1 - i,
         lambda i: LETTERS.index(LETTERS[i].swapcase()))
TASKS = [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (.5, .5, 0, 0), (0, 0, .5, .5), (.5, 0, 0, .5),
         (0, .5, .5, 0)]
HELD_OUT = (.5, 0, .5, 0)
SEQ = 24


def sample(mix: tuple, rng: random.Random) -> str:
    """One sequence of a task: each next letter follows a rule drawn with the task's probabilities."""
    i = rng.randrange(N)
    out = [i]
    for _ in range(SEQ - 1):
        out.append(RULES[rng.choices(range(4), weights=mix)[0]](out[-1]))
    return "".join(LETTERS[j] for j in out)


def write_jsonl(path: Path, mix: tuple, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": sample(mix, rng)}) + "\n" for _ in range(n)), encoding="utf-8")
    return path


def make_base(out: Path) -> Path:
    """A random LlamaForCausalLM (hidden 128) with the fixtures' character tokenizer beside it."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TOKENIZER / name, out / name)
    return out


def train_multitask(base_dir: Path, out: Path, steps: int) -> None:
    """A Poly/MHR adapter trained by polytool on TASKS (the held-out mixture never seen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from polytool import PolyConfig, get_poly_model

    torch.manual_seed(0)
    tok, base = AutoTokenizer.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(base_dir)
    config = PolyConfig(task_type="CAUSAL_LM", r=8, n_tasks=len(TASKS), n_skills=4, n_splits=2,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        base_model_name_or_path=str(base_dir))
    model = get_poly_model(base, config).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rng = random.Random(0)
    for step in range(steps):
        tasks = [rng.randrange(len(TASKS)) for _ in range(32)]
        ids = torch.tensor([tok.convert_tokens_to_ids(list(sample(TASKS[t], rng))) for t in tasks])  # (32, SEQ)
        loss = model(input_ids=ids, labels=ids, task_ids=torch.tensor(tasks)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  multi-task training step {step:4d} loss {loss.item():.3f}", file=sys.stderr)
    model.eval().save_pretrained(out)


def held_out_loss(base: Path, adapter_dir: Path, eval_file: Path, init: str | None = None) -> float:
    """Loss per token of eval_file on the adapter's last task, or (init) on a new task routed as `init`."""
    from polytool.adapt.data import read_examples, tokenize
    from polytool.adapt.model import build
    from polytool.adapt.train import evaluate
    from polytool.formats.adapter import load_adapter

    model = build(load_adapter(adapter_dir), base, init or "uniform", "routing")
    if init is None:  # the adapter's own last task, already learned: route to it
        model.task -= 1
    items = tokenize(read_examples(eval_file), model.tokenizer, False, None, eval_file)
    return evaluate(model, items, 64)


def learning(work: Path, quick: bool) -> None:
    from polytool.adapt.command import AdaptOptions, adapt

    base = make_base(work / "base")
    poly = work / "poly"
    train_multitask(base, poly, 150 if quick else 800)
    eval_file = write_jsonl(work / "eval.jsonl", HELD_OUT, 512, seed=99)
    rows = [("uniform routing (MHR-mu, zero logits)", held_out_loss(base, poly, eval_file, "uniform")),
            ("mean of the 8 tasks' logits", held_out_loss(base, poly, eval_file, "mean"))]
    best = min((held_out_loss(base, poly, eval_file, str(t)), t) for t in range(len(TASKS)))
    rows.append((f"best training task's routing (task {best[1]}, mix {TASKS[best[1]]})", best[0]))
    for seed in (0, 1, 2):
        few = write_jsonl(work / f"few-{seed}.jsonl", HELD_OUT, 32, seed=seed)
        out = work / f"few-{seed}"
        report = adapt(AdaptOptions(poly, few, out, base, steps=100, lr=0.1, batch_size=8, seed=seed, eval_split=0))
        rows.append((f"adapt --train routing, 32 examples, 100 steps (seed {seed}; {report['seconds']:.1f} s)",
                     held_out_loss(base, out, eval_file)))
    many = write_jsonl(work / "many.jsonl", HELD_OUT, 2000, seed=7)
    adapt(AdaptOptions(poly, many, work / "many", base, steps=400, lr=0.1, batch_size=32, seed=0, eval_split=0))
    rows.append(("routing fitted with plenty of data (2000 examples, 400 steps x 32)", held_out_loss(base, work / "many", eval_file)))
    print(f"\nheld-out mixture {HELD_OUT}: loss per token on 512 unseen sequences (lower is better)")
    for label, loss in rows:
        print(f"  {loss:.4f}  {label}")


# ---- speed and memory: one process per implementation ------------------------------------------------------
SIZE = dict(hidden=256, inter=704, layers=4, heads=4, vocab=4096, batch=8, seq=64, steps=30, examples=256)
QUICK_SIZE = dict(SIZE, hidden=128, inter=352, layers=2, steps=10, examples=64)


def make_speed_adapter(size: dict, out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from polytool import PolyConfig, get_poly_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=size["vocab"], hidden_size=size["hidden"], intermediate_size=size["inter"],
                         num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
                         num_key_value_heads=size["heads"], max_position_embeddings=512)
    base = LlamaForCausalLM(config)
    base.save_pretrained(out / "base")
    poly = get_poly_model(base, PolyConfig(task_type="CAUSAL_LM", r=8, n_tasks=8, n_skills=8, n_splits=4,
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in poly.named_parameters():
            if "poly_" in name:
                p.normal_(0, 0.05 if "lora" in name else 1.0)
    poly.save_pretrained(out / "adapter")


def speed_items(size: dict) -> list:
    from polytool.adapt.data import Tokenized

    g = torch.Generator().manual_seed(0)
    rows = torch.randint(4, size["vocab"], (size["examples"], size["seq"]), generator=g).tolist()
    return [Tokenized(r, r) for r in rows]


def run_polytool(size: dict, work: Path) -> dict:
    """polytool's adapt: the model and loop `polytool adapt --train routing` runs."""
    from transformers import LlamaForCausalLM

    from polytool import PolyModel
    from polytool.adapt.model import AdaptModel, append_task, trainable_parameters
    from polytool.adapt.train import TrainSettings, train

    poly = PolyModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "base"), work / "adapter")
    task = append_task(poly, "uniform")
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 0})()
    model = AdaptModel(poly, tok, False, task, trainable_parameters(poly, "routing"), None)
    stats = train(model, speed_items(size), TrainSettings(size["steps"], 0.1, size["batch"], 0))
    return {"examples_per_s": stats["examples_per_s"], "trainable": stats["trainable_parameters"],
            "optimizer_state": stats["optimizer_state_numel"]}


def run_peft(size: dict, work: Path) -> dict:
    """The same training written with PEFT: a new task row in each logits table, only it learns."""
    from peft import PeftModel

    from polytool.adapt.data import collate
    from transformers import LlamaForCausalLM

    config = json.loads((work / "adapter" / "adapter_config.json").read_text())
    grown = work / "adapter-peft"
    if not grown.exists():  # PEFT has no "add a task": the same adapter with one more (zero) routing row
        from safetensors.torch import load_file, save_file

        tensors = load_file(work / "adapter" / "adapter_model.safetensors")
        tensors = {k: torch.cat([v, torch.zeros(1, v.shape[1])]) if k.endswith("module_logits") else v
                   for k, v in tensors.items()}
        grown.mkdir()
        save_file(tensors, grown / "adapter_model.safetensors", metadata={"format": "pt"})
        (grown / "adapter_config.json").write_text(json.dumps({**config, "n_tasks": config["n_tasks"] + 1}))
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(work / "base"), grown, is_trainable=True)
    task = config["n_tasks"]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_("module_logits" in name)
        if "module_logits" in name:
            mask = torch.zeros_like(p)
            mask[task] = 1  # only the new task's row learns
            p.register_hook(lambda g, m=mask: g * m)
            params.append(p)
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.0)
    items, gen = speed_items(size), torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model.train()
    seen, start = 0, time.perf_counter()
    for step in range(size["steps"]):
        order = torch.randperm(len(items), generator=gen).tolist()[: size["batch"]]
        batch = collate([items[i] for i in order], 0)
        loss = model(**batch, task_ids=torch.full((len(order),), task)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += len(order)
    seconds = time.perf_counter() - start
    state = sum(v.numel() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {"examples_per_s": seen / seconds, "trainable": sum(p.numel() for p in params), "optimizer_state": state}


def child(which: str, quick: bool, threads: int, work: Path) -> None:
    torch.set_num_threads(threads)
    size = QUICK_SIZE if quick else SIZE
    data = (run_polytool if which == "polytool" else run_peft)(size, work)
    data["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(data))


def speed(work: Path, quick: bool, threads: int) -> None:
    size = QUICK_SIZE if quick else SIZE
    make_speed_adapter(size, work)
    results = {}
    for which in ("peft", "polytool", "peft", "polytool"):  # alternate, to spread the machine's noise
        proc = subprocess.run([sys.executable, __file__, "--child", which, "--threads", str(threads), "--work",
                               str(work)] + (["--quick"] if quick else []), capture_output=True, text=True, check=True)
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        best = results.get(which)
        if best is None or data["examples_per_s"] > best["examples_per_s"]:
            results[which] = data
    print(f"\nrouting-only training, Llama-shaped hidden {size['hidden']}, {size['layers']} layers, 7 targets, r 8, "
          f"8 skills, 4 splits; batch {size['batch']} x {size['seq']} tokens, {size['steps']} steps, "
          f"{threads} thread(s); best of 2 processes each")
    for which, label in (("peft", "PEFT PolyModel"), ("polytool", "polytool adapt")):
        d = results[which]
        print(f"  {label:15s} {d['examples_per_s']:7.1f} examples/s  peak RSS {d['peak_rss_mb']:6.0f} MB  "
              f"trainable {d['trainable']:6d}  optimizer state {d['optimizer_state']:6d} numbers")
    ratio = results["polytool"]["examples_per_s"] / results["peft"]["examples_per_s"]
    print(f"  polytool / PEFT examples/s: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child")
    parser.add_argument("--work", type=Path)
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick, args.threads, args.work)
        return
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-adapt-") as tmp:
        if not args.skip_learning:
            (Path(tmp) / "learn").mkdir()
            learning(Path(tmp) / "learn", args.quick)
        if not args.skip_speed:
            (Path(tmp) / "speed").mkdir()
            speed(Path(tmp) / "speed", args.quick, args.threads)


if __name__ == "__main__":
    main()
