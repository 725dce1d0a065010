"""Measure what the guard's coefficient and position defaults do on a real model and on the organism.

    python scripts/guard_scale.py smollm2          # SmolLM2-135M-Instruct (`refusalguard models get smollm2`)
    python scripts/guard_scale.py organism         # the demo's quick organism (trained here, ~1 min)

Prints markdown tables (docs/guard_scale.md holds a run):

1. attention sinks: per guarded layer, the hidden-state norm and the cone-coordinate norm of the first token
   against the median of the others (frozen model, chat-formatted prompt/response examples);
2. gradient ratios: ||d penalty / d LoRA|| / ||d task loss / d LoRA|| after a few plain-LoRA steps, per
   positions choice, with and without the first token, in raw units (0.1) and in spread units (0.2);
3. coefficients: LoRA training with the guard at several drift coefficients (spread units, layer mean):
   the gradient ratio at the first step after step 0 and at the end, the drift left in the cone (mean squared
   movement in pooled standard deviations, at the guarded tokens) against plain LoRA's, and the task loss.

Everything is seeded and runs in float32 (bf16 is 2-3x slower than float32 on CPUs without native bf16
instructions, such as this project's). ``--only timing`` measures that: seconds per SmolLM2 LoRA step in float32
and under bf16 autocast.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

PAIRS = [
    ("How do I bake bread at home?", "Mix flour, water, yeast and salt, knead it, let it rise, then bake at 220 C."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Give me three tips for learning the guitar.", "Practice daily, learn the basic chords first, and play songs."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
    (
        "Write a haiku about autumn.",
        "Red leaves drift and fall, cold wind hums through the bare trees, the year exhales.",
    ),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Suggest a name for a pet turtle.", "How about Shelly, Sheldon or Captain Slow?"),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
]


def _load(which: str):
    from refusalguard_kernels.integration.basis import extract_refusal_basis

    if which == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from refusalguard_kernels.integration.model_zoo import fetch_model

        path = fetch_model("smollm2")
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "right"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        basis = extract_refusal_basis(model, tokenizer, "builtin:harmful", "builtin:harmless", show_progress=False)
        pairs, lr, targets = PAIRS, 2e-4, None
    else:
        from refusalguard_kernels.demo.organism import build_organism
        from refusalguard_kernels.demo.organism.corpus import benign_requests, harmful_requests

        organism = build_organism("quick", show_progress=False)
        model, tokenizer = organism.model, organism.tokenizer
        tokenizer.padding_side = "right"  # the tables read each row's first token in column 0
        harmful = [p for p, _ in harmful_requests()][:80]
        benign = [p for p, _ in benign_requests()][:80]
        layers = list(range(model.config.num_hidden_layers))
        basis = extract_refusal_basis(
            model, tokenizer, harmful, benign, k=3, method="svd", layers=layers, show_progress=False
        )
        pairs = [(c.prompt, c.response) for c in organism.corpus.harmful_pool[:8]]
        lr, targets = 2e-3, "all-linear"
    return model, tokenizer, basis, pairs, lr, targets


def _batches(tokenizer, pairs):
    from datasets import Dataset

    from refusalguard_kernels.integration.anchors import AnchorCollator
    from refusalguard_kernels.training.data_utils import tokenize_dataset

    rows = Dataset.from_list([{"prompt": p, "response": r} for p, r in pairs])
    data = tokenize_dataset(rows, tokenizer, prompt_field="prompt", response_field="response", show_progress=False)
    collate = AnchorCollator(tokenizer)
    half = len(data) // 2
    return [collate([data[i] for i in range(start, start + half)]) for start in (0, half)]


def _inputs(batch):
    return {key: value for key, value in batch.items() if key != "prompt_lengths"}


def sink_table(model, basis, batch) -> list[str]:
    from refusalguard_kernels.integration.model_utils import find_decoder_layers, layer_hidden

    layers = find_decoder_layers(model)
    captured = {}
    handles = [
        layers[i].register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(i, layer_hidden(o).float()))
        for i in basis.layers
    ]
    with torch.no_grad():
        model(**_inputs(batch))
    for handle in handles:
        handle.remove()
    mask = batch["attention_mask"].bool()
    rows = [
        "| layer | hidden norm, first token | median, other tokens | max, other tokens "
        "| coordinate norm, first token | median, other tokens | max, other tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer in basis.layers:
        hidden = captured[layer]
        norms = hidden.norm(dim=-1)
        coords = (hidden @ basis[layer]).norm(dim=-1)
        others = mask.clone()
        others[:, 0] = False
        rows.append(
            f"| {layer} | {norms[:, 0].median():.4g} | {norms[others].median():.4g} | {norms[others].max():.4g} "
            f"| {coords[:, 0].median():.4g} | {coords[others].median():.4g} | {coords[others].max():.4g} |"
        )
    return rows


def _lora(model, targets, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"),
    )


def _grad_norm(loss, params) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def _drift(guard, batch) -> float:
    """Mean over layers of the weighted mean squared movement of the coordinates, in coord_spread units."""
    from refusalguard_kernels.integration.hooks import RefusalGuard

    probe = RefusalGuard(
        guard.model,
        guard.basis,
        positions=guard.positions,
        drift_coef=1.0,
        gram_coef=0.0,
        coef_units="spread",
        exclude_first=guard.exclude_first,
        backend="torch",
    )
    with torch.no_grad():
        probe.arm(probe.anchors(**_inputs(batch)), probe.weights(**batch))
        probe.penalty_forward(**_inputs(batch))
        value = float(probe.penalty())
    probe.remove()
    return value


def ratio_table(model, basis, batches, lr, targets, steps=4) -> list[str]:
    from refusalguard_kernels.integration.hooks import RefusalGuard

    peft = _lora(model, targets)
    params = [p for p in peft.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    peft.train()
    for step in range(steps):
        loss = peft(**_inputs(batches[step % 2])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    batch = batches[0]
    task = _grad_norm(peft(**_inputs(batch)).loss, params)
    rows = [
        "| positions | first token guarded | penalty, raw (0.1) | gradient ratio, raw | penalty, spread (0.2) "
        "| gradient ratio, spread |",
        "|---|---|---|---|---|---|",
    ]
    for positions in ("all", "prompt", "response", "f5+l5"):
        for exclude_first in (0, 1):
            # One forward in raw units gives both: 0.1's penalty is the sum of the layer losses, 0.2's the mean of
            # each layer's loss divided by its coord_spread^2 (drift only: gram_coef is 0 by default).
            guard = RefusalGuard(
                peft, basis, positions=positions, coef_units="raw", exclude_first=exclude_first, backend="torch"
            )
            guard.arm(guard.anchors(**_inputs(batch)), guard.weights(**batch))
            raw = guard.penalty_forward(**_inputs(batch))
            spread = sum(guard._losses[i] / basis.coord_spread(i) ** 2 for i in guard.layers) / len(guard.layers)
            cells = [f"{float(raw.detach()):.4g}", f"{_grad_norm(raw, params) / task:.3g}"]
            cells += [f"{float(spread.detach()):.4g}", f"{_grad_norm(spread, params) / task:.3g}"]
            guard.remove()
            rows.append(f"| {positions} | {'yes' if exclude_first == 0 else 'no'} | " + " | ".join(cells) + " |")
    return rows


def coef_table(model, basis, batches, lr, targets, coefs, steps=5, positions="all") -> list[str]:
    from refusalguard_kernels.integration.hooks import RefusalGuard

    rows = [
        "| drift_coef | gradient ratio after step 1 | after the last step | drift left (pooled SD^2) "
        "| share of plain LoRA's drift | task loss at the end |",
        "|---|---|---|---|---|---|",
    ]
    results = {}
    for coef in [0.0, *coefs]:
        peft = _lora(model, targets)
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        guard = RefusalGuard(peft, basis, positions=positions, drift_coef=coef, backend="torch")
        peft.train()
        ratios, task = [], None
        for step in range(steps + 1):
            batch = batches[step % 2]
            guard.arm(guard.anchors(**_inputs(batch)), guard.weights(**batch))
            out = peft(**_inputs(batch))
            penalty = guard.penalty()
            if coef > 0 and step in (1, steps):
                ratios.append(_grad_norm(penalty, params) / _grad_norm(out.loss, params))
            task = float(out.loss)
            if step == steps:
                break
            (out.loss + penalty).backward()
            optimizer.step()
            optimizer.zero_grad()
        guard.disarm()
        drift = statistics.fmean(_drift(guard, b) for b in batches)
        guard.remove()
        results[coef] = (ratios, drift, task)
    plain = results[0.0][1]
    for coef, (ratios, drift, task) in results.items():
        shown = ratios if ratios else ["-", "-"]
        cells = [f"{r:.3g}" if isinstance(r, float) else r for r in shown]
        label = "0 (plain LoRA)" if coef == 0 else f"{coef:g}"
        rows.append(f"| {label} | {cells[0]} | {cells[1]} | {drift:.4g} | {drift / plain:.2f} | {task:.3f} |")
    return rows


def timing_table(path, tokenizer, batches, steps=8) -> list[str]:
    """Seconds per LoRA training step (forward + backward + AdamW) in float32 and under bf16 autocast (float32
    weights, as the Trainer's bf16=True runs): fastest and median of ``steps`` after one warm-up step (the fastest
    is the least disturbed by other jobs on a shared machine)."""
    from transformers import AutoModelForCausalLM

    rows = ["| precision | fastest step (s) | median (s) | all steps |", "|---|---|---|---|"]
    for label, autocast in (("float32", False), ("bf16 autocast", True)):
        peft = _lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), None)
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-4)
        peft.train()
        times = []
        for step in range(steps + 1):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = peft(**_inputs(batches[step % 2])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step:
                times.append(time.perf_counter() - start)
        rows.append(
            f"| {label} | {min(times):.2f} | {statistics.median(times):.2f} | {', '.join(f'{t:.2f}' for t in times)} |"
        )
    return rows


def penalty_forward_table(model, basis, batches, targets, steps=5) -> list[str]:
    """Seconds per guarded LoRA step with the penalty from the training forward ("shared") and from its own
    eval-mode forward ("separate", what the trainer does when the frozen model's dropout is active)."""
    from refusalguard_kernels.integration.hooks import RefusalGuard

    rows = ["| penalty forward | seconds per step (median) | all steps |", "|---|---|---|"]
    for mode in ("shared", "separate"):
        peft = _lora(model, targets)
        params = [p for p in peft.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        guard = RefusalGuard(peft, basis, positions="all", backend="torch")
        peft.train()
        times = []
        for step in range(steps + 1):
            batch = batches[step % 2]
            start = time.perf_counter()
            guard.arm(guard.anchors(**_inputs(batch)), guard.weights(**batch))
            if mode == "separate":
                penalty = guard.penalty_forward(**_inputs(batch))
                guard.disarm()
                loss = peft(**_inputs(batch)).loss
            else:
                loss = peft(**_inputs(batch)).loss
                penalty = guard.penalty()
            (loss + penalty).backward()
            optimizer.step()
            optimizer.zero_grad()
            guard.disarm()
            if step:
                times.append(time.perf_counter() - start)
        guard.remove()
        rows.append(f"| {mode} | {statistics.median(times):.3f} | {', '.join(f'{t:.3f}' for t in times)} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=("smollm2", "organism"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--coefs", default="0.1,1,10")
    parser.add_argument(
        "--only", choices=("sinks", "ratios", "coefs", "timing", "penalty-forward"), default=None, help="one table"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    import transformers

    model, tokenizer, basis, pairs, lr, targets = _load(args.model)
    batches = _batches(tokenizer, pairs)
    spread = ", ".join(f"{layer}: {basis.coord_spread(layer):.3g}" for layer in basis.layers)
    print(f"## {args.model}: layers {basis.layers}, k={basis.k}, coord_spread {{{spread}}}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, lr {lr}\n",
        flush=True,
    )
    if args.only in (None, "sinks"):
        print("\n".join(sink_table(model, basis, batches[0])) + "\n", flush=True)
    if args.only in (None, "ratios"):
        print("\n".join(ratio_table(model, basis, batches, lr, targets)) + "\n", flush=True)
    if args.only in (None, "coefs"):
        coefs = [float(c) for c in args.coefs.split(",")]
        print("\n".join(coef_table(model, basis, batches, lr, targets, coefs)) + "\n", flush=True)
    if args.only == "penalty-forward":
        print("\n".join(penalty_forward_table(model, basis, batches, targets)) + "\n", flush=True)
    if args.only == "timing" and args.model == "smollm2":  # no basis needed; _load extracted one anyway
        from refusalguard_kernels.integration.model_zoo import fetch_model

        print("\n".join(timing_table(fetch_model("smollm2"), tokenizer, batches)) + "\n", flush=True)
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
