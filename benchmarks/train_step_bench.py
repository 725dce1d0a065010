"""Training-step overhead of the guard on a Llama-shaped stack (GPU).

    python benchmarks/train_step_bench.py [--layers 4 --seq 2048 --batch 4 --out benchmarks/results]

Model: LlamaConfig with Llama-3-8B layer sizes (hidden 4096, MLP 14336, 32 heads, 8 KV
heads, vocab 128256), random init, bf16, LoRA r=16 on q/k/v/o/gate/up/down (peft).
Variants, each timed over the same batch (random token ids, never zeros):
  plain              LoRA only (run twice: the plain-vs-plain spread is the resolution)
  guard-cached       RefusalGuard on 2 layers, anchors computed once before timing
  guard-online       the same with the frozen anchor pass every step
  torch-penalty      the guard with backend="torch" (the plain-PyTorch penalty), cached anchors
  guard-all-cached   RefusalGuard on every layer, cached anchors
  guard-all-online   every layer, anchors recomputed every step
  torch-penalty-all  every layer, plain-PyTorch penalty, cached anchors
Step = forward + backward + AdamW step over the LoRA parameters; CUDA events. The
variant list is run --repeats times round-robin (so slow drift hits every variant
alike); each variant reports p20/p50/p80 over all its timed steps. Peak memory =
torch.cuda.max_memory_allocated over the timed steps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys

import torch


def build(args):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256
    )
    if args.tiny:  # a CPU smoke test of this script, not a measurement
        sizes = dict(
            hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, vocab_size=256
        )
    config = LlamaConfig(
        num_hidden_layers=args.layers,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        attention_dropout=0.0,
        **sizes,
    )
    config._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    model = get_peft_model(model, lora)
    model.train()
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="round-robin passes over the variant list")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    args = ap.parse_args(argv)
    args.device = "cpu" if args.tiny else "cuda"
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("the training-step benchmark needs a CUDA GPU (or --tiny for a CPU smoke run)")
    hidden_size = 64 if args.tiny else 4096
    vocab = 256 if args.tiny else 128256

    import refusalguard_kernels as rg
    from refusalguard_kernels import RefusalBasis, RefusalGuard

    torch.manual_seed(0)
    model = build(args)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    hooked = [1, 2] if args.layers > 2 else [0]
    every = list(range(args.layers))
    meta = {"model_name": "llama3-8b-shaped-random", "method": "random"}
    dirs = {i: rg.orthonormalize_basis(torch.randn(hidden_size, args.k, dtype=torch.float64)) for i in every}
    bases = {
        "some": RefusalBasis(bases={i: dirs[i] for i in hooked}, metadata=meta),
        "all": RefusalBasis(bases=dirs, metadata=meta),
    }

    def run(variant: str) -> dict:
        guard = None
        if variant != "plain":
            backend = "torch" if variant.startswith("torch-penalty") else "auto"
            basis = bases["all" if "-all" in variant else "some"]
            guard = RefusalGuard(model, basis, positions="all", drift_coef=1.0, gram_coef=0.1, backend=backend)
            weight = guard.weights(**batch)
            cached = guard.anchors(**batch)

        def step():
            optimizer.zero_grad(set_to_none=True)
            if guard is not None:
                anchors = guard.anchors(**batch) if variant.endswith("-online") else cached
                guard.arm(anchors, weight)
            out = model(**batch)
            loss = out.loss + guard.penalty() if guard is not None else out.loss
            loss.backward()
            if guard is not None:
                guard.disarm()
            optimizer.step()

        for _ in range(args.warmup):
            step()
        times = []
        if args.tiny:
            import time

            for _ in range(args.steps):
                t0 = time.perf_counter()
                step()
                times.append(1e3 * (time.perf_counter() - t0))
            peak = 1
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            for _ in range(args.steps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            peak = torch.cuda.max_memory_allocated()
        if guard is not None:
            guard.remove()
        return {
            "variant": variant,
            "step_ms": statistics.median(times),
            "step_ms_all": times,
            "peak_mem_gib": peak / 2**30,
        }

    variants = [
        "plain",
        "guard-cached",
        "guard-online",
        "torch-penalty",
        "guard-all-cached",
        "guard-all-online",
        "torch-penalty-all",
        "plain",  # plain twice: the run-to-run spread any effect must beat
    ]
    runs = [[run(v) for v in variants] for _ in range(args.repeats)]
    rows = []
    for i, v in enumerate(variants):
        times = [t for rep in runs for t in rep[i]["step_ms_all"]]
        q = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
        rows.append(
            {
                "variant": v,
                "step_ms": statistics.median(times),
                "p20_ms": q[1],
                "p80_ms": q[7],
                "step_ms_all": times,
                "peak_mem_gib": max(rep[i]["peak_mem_gib"] for rep in runs),
            }
        )
    base = rows[0]
    for r in rows:
        r["time_overhead_pct"] = 100 * (r["step_ms"] / base["step_ms"] - 1)
        r["mem_overhead_pct"] = 100 * (r["peak_mem_gib"] / base["peak_mem_gib"] - 1)
    spread = abs(rows[-1]["step_ms"] / base["step_ms"] - 1) * 100

    device = "cpu-smoke" if args.tiny else torch.cuda.get_device_name(0)
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    payload = {
        "device": device,
        "date": stamp,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "setup": vars(args) | {"hooked_layers": hooked, "all_layers": every, "lora_r": 16, "dtype": "bfloat16"},
        "command": "python benchmarks/train_step_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "plain_vs_plain_pct": spread,
        "rows": rows,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"{device.replace(' ', '_')}-{stamp}-train_step.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(payload, fh, indent=1)
    os.replace(path + ".tmp", path)
    print(
        f"train-step summary ({device}; Llama-3-8B layer sizes x {args.layers}, seq {args.seq}, batch {args.batch}, "
        f"LoRA r=16, bf16, guard on layers {hooked}, k={args.k})"
    )
    print(f"{'variant':>18} {'p50 ms':>9} {'p20 ms':>9} {'p80 ms':>9} {'vs plain':>9} {'peak GiB':>9} {'vs plain':>9}")
    for r in rows:
        print(
            f"{r['variant']:>18} {r['step_ms']:9.2f} {r['p20_ms']:9.2f} {r['p80_ms']:9.2f} "
            f"{r['time_overhead_pct']:8.2f}% {r['peak_mem_gib']:9.3f} {r['mem_overhead_pct']:8.2f}%"
        )
    print(
        f"plain vs plain: {spread:.2f} % ({args.repeats} repeats x {args.steps} steps each); "
        "overheads below that are not resolved"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
