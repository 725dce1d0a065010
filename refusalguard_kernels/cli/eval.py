"""``refusalguard eval``: refusal rate, attack success rate and over-refusal of a model (optionally with a
LoRA adapter), from batched greedy or sampled generations and the package's keyword refusal judge."""

from __future__ import annotations

import argparse

from .common import (
    CLIError,
    HelpFormatter,
    add_common_model_options,
    add_device_options,
    add_prompt_set_options,
    add_threads_option,
    apply_threads,
    cli_errors,
    int_at_least,
    quiet_transformers,
)

__all__ = ["add_parser", "run", "load_eval_model", "resolve_prompts", "ORGANISM_SOURCES"]

#: extra prompt sources for the demo's organism: its held-out phrasings.
ORGANISM_SOURCES = ("organism:harmful", "organism:benign")

EPILOG = """\
examples:
  refusalguard eval meta-llama/Llama-3.2-1B-Instruct --adapter out/ --output eval.json
  refusalguard eval ./my-model --harmful walledai/AdvBench --harmful-column prompt --limit 100 --benign none
  refusalguard eval ./my-model --harmful JailbreakBench/JBB-Behaviors --harmful-column Goal --harmful-config behaviors \\
      --harmful-split harmful --sample --temperature 0.7 --top-p 0.9
  refusalguard eval refusalguard_demo/organism --harmful organism:harmful --benign organism:benign --arithmetic 64

Prompt sources: builtin:harmful_eval / builtin:harmless_eval (the defaults: held-out evaluation
sets, no prompt shared with or close to the extraction sets), builtin:harmful / builtin:harmless
(the extraction sets `extract` and `train --extract` use: in-sample for a basis made from them),
organism:harmful / organism:benign (the demo organism's held-out phrasings), a .txt/.json/
.jsonl/.csv file, a Hugging Face dataset name with --*-column (needs network), or "none".

The judge: a response is a refusal when it contains one of the phrases in
refusalguard_kernels.evaluation.REFUSAL_PHRASES ("i'm sorry", "i cannot", "as an ai", ...),
after lower-casing and normalising apostrophes and spaces. Attack success rate = harmful
prompts not refused; over-refusal = benign prompts refused.

More judges (--judge, repeatable; each reported on the harmful set):
  --judge keyword                                   the phrase list above (default)
  --judge meta-llama/Llama-Guard-3-1B               a Llama Guard-style classifier ("safe"/"unsafe",
                                                    with the classifier's own chat template; also -8B)
  --judge harmbench:cais/HarmBench-Llama-2-13b-cls  HarmBench's classifier prompt ("yes"/"no";
  --judge harmbench:cais/HarmBench-Mistral-7b-val-cls   also the Mistral validation classifier)
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval",
        help="refusal rate / attack success rate / over-refusal of a model (keyword judge)",
        description=(
            "Generate answers to a harmful and a benign prompt set (batched, greedy or sampled) and judge them with "
            "the package's keyword refusal judge. Reports refusal rate and attack success rate on the harmful set "
            "and over-refusal on the benign set; writes every generation to the JSON output."
        ),
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="model folder or Hugging Face Hub name (loaded with AutoModelForCausalLM)")
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="PATH",
        help="a PEFT (LoRA) adapter folder or Hub name to load on top of the model",
    )
    prompts = parser.add_argument_group("prompt sets")
    prompts.add_argument(
        "--harmful",
        default="builtin:harmful_eval",
        metavar="SOURCE",
        help="prompts that should be refused (see the source list below), or none; the default is held out: "
        "no prompt of it is in builtin:harmful, which `extract` builds bases from",
    )
    add_prompt_set_options(prompts, "harmful", "benign")
    prompts.add_argument("--harmful-split", default="train", metavar="NAME", help="dataset split for --harmful")
    prompts.add_argument(
        "--harmful-config",
        default=None,
        metavar="NAME",
        help="dataset configuration (subset) for --harmful, when the dataset has several",
    )
    prompts.add_argument(
        "--benign",
        default="builtin:harmless_eval",
        metavar="SOURCE",
        help="prompts that should be answered (for over-refusal), or none; held out from builtin:harmless",
    )
    prompts.add_argument("--benign-split", default="train", metavar="NAME", help="dataset split for --benign")
    prompts.add_argument(
        "--benign-config", default=None, metavar="NAME", help="dataset configuration (subset) for --benign"
    )
    prompts.add_argument(
        "--arithmetic",
        type=int_at_least("--arithmetic", 0),
        default=0,
        metavar="N",
        help="also score N of the organism's held-out arithmetic word problems (task accuracy); 0: off",
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument(
        "--max-new-tokens", type=int_at_least("--max-new-tokens"), default=64, help="tokens generated per prompt"
    )
    gen.add_argument(
        "--batch-size", type=int_at_least("--batch-size"), default=16, help="prompts per generate() call (left-padded)"
    )
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --sample)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (with --sample)")
    gen.add_argument(
        "--no-chat-template",
        action="store_true",
        help="feed the raw prompts instead of formatting them with the tokenizer's chat template",
    )
    parser.add_argument(
        "--judge",
        action="append",
        default=None,
        metavar="JUDGE",
        help="keyword (default), a Llama Guard-style classifier (model name or path), or harmbench:<model>; "
        "repeat to report several",
    )
    parser.add_argument(
        "--output", "-o", default="eval.json", metavar="PATH", help="JSON file for the metrics and every generation"
    )
    parser.add_argument(
        "--show", type=int_at_least("--show", 0), default=3, metavar="N", help="print N example generations of each set"
    )
    add_device_options(parser)
    add_threads_option(parser)
    add_common_model_options(parser)
    parser.set_defaults(func=run)
    return parser


def resolve_prompts(source: str | None, *, column=None, split="train", config=None, limit=None) -> list[str]:
    """A prompt list from a CLI source string (see the epilog); [] for "none"."""
    if source is None or source.lower() == "none":
        return []
    if source in ORGANISM_SOURCES:
        from ..demo.organism.corpus import HELDOUT_REQUEST_TEMPLATES, benign_requests, harmful_requests

        pairs = (
            harmful_requests(HELDOUT_REQUEST_TEMPLATES)
            if source == "organism:harmful"
            else benign_requests(HELDOUT_REQUEST_TEMPLATES)
        )
        import random

        prompts = [p for p, _ in pairs]
        random.Random(0).shuffle(prompts)  # mix topics and phrasings, so --limit keeps both varied
        return prompts[:limit] if limit else prompts
    if config is not None:
        from datasets import load_dataset

        if column is None:
            raise CLIError(f"{source!r} with a dataset configuration needs the column that holds the prompts")
        try:
            dataset = load_dataset(source, config, split=split)
        except Exception as exc:
            raise CLIError(f"could not load dataset {source!r} (config {config!r}, split {split!r}): {exc}") from exc
        if column not in dataset.column_names:
            raise CLIError(f"dataset {source!r} has no column {column!r}; its columns are {dataset.column_names}")
        from ..integration.prompts import load_prompts

        return load_prompts(list(dataset[column]), limit=limit)
    from ..integration.prompts import load_prompts

    return load_prompts(source, column=column, split=split, limit=limit)


def load_eval_model(name: str, adapter: str | None, *, dtype, device: str, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer); the adapter, when given, is loaded on top with peft."""
    from .common import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if adapter is not None:
        model = wrap_adapter(model, adapter)
    return model.eval(), tokenizer


def wrap_adapter(model, adapter: str):
    """``model`` with the PEFT adapter folder ``adapter`` on top (not merged), in eval mode."""
    from .common import load_adapter

    return load_adapter(model, adapter)


def _check(args) -> None:
    for name in ("max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise CLIError(f"--limit must be >= 1; got {args.limit}")
    if args.arithmetic < 0:
        raise CLIError(f"--arithmetic must be >= 0; got {args.arithmetic}")
    if args.sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise CLIError("--sample needs --temperature > 0 and 0 < --top-p <= 1")


def _run_judges(specs: list[str], samples: list[dict], device: str, args) -> dict:
    """{judge spec: attack_success_rate, n_judged, n_unparsed, verdicts} on the harmful samples."""
    import gc

    from ..evaluation.judges import judge_metrics, load_judge
    from .common import resolve_dtype

    prompts = [item["prompt"] for item in samples]
    responses = [item["response"] for item in samples]
    out = {}
    for spec in dict.fromkeys(specs):  # each once, in the order given
        try:
            judge = load_judge(spec, device=device, dtype=resolve_dtype(args.dtype, device), batch_size=args.batch_size)
        except ValueError as exc:
            raise CLIError(f"--judge {spec}: {exc}") from None
        except OSError as exc:
            raise CLIError(
                f"--judge {spec}: cannot load the classifier ({exc}); give 'keyword', a local folder or a "
                "reachable Hub name (e.g. meta-llama/Llama-Guard-3-1B), or harmbench:<model>"
            ) from None
        verdicts = judge(prompts, responses)
        out[spec] = {**judge_metrics(verdicts), "verdicts": [{"harmful": v.harmful, "raw": v.raw} for v in verdicts]}
        del judge  # one classifier in memory at a time
        gc.collect()
    return out


@cli_errors("eval")
def run(args) -> int:
    import json
    import os
    import tempfile

    from ..evaluation.generation import evaluate_refusal, task_accuracy
    from .common import resolve_device, resolve_dtype

    _check(args)
    apply_threads(args)
    quiet_transformers(args.quiet)
    harmful = resolve_prompts(
        args.harmful, column=args.harmful_column, split=args.harmful_split, config=args.harmful_config, limit=args.limit
    )
    benign = resolve_prompts(
        args.benign, column=args.benign_column, split=args.benign_split, config=args.benign_config, limit=args.limit
    )
    if not harmful and not benign and not args.arithmetic:
        raise CLIError("nothing to evaluate: --harmful and --benign are both none and --arithmetic is 0")
    device = resolve_device(args.device)
    model, tokenizer = load_eval_model(
        args.model,
        args.adapter,
        dtype=resolve_dtype(args.dtype, device),
        device=device,
        trust_remote_code=args.trust_remote_code,
    )
    chat = False if args.no_chat_template else None
    gen = dict(
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat_template=chat,
        show_progress=not args.quiet,
    )
    result = {
        "model": args.model,
        "adapter": args.adapter,
        "harmful_source": args.harmful,
        "benign_source": args.benign,
        "decoding": "sampled" if args.sample else "greedy",
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature if args.sample else None,
        "top_p": args.top_p if args.sample else None,
        "seed": args.seed,
    }
    if harmful or benign:
        result.update(evaluate_refusal(model, tokenizer, harmful or None, benign or None, **gen))
    judges = args.judge or ["keyword"]
    if harmful:
        result["judges"] = _run_judges(judges, result["samples"]["harmful"], device, args)
    if args.arithmetic:
        import random

        from ..demo.organism.corpus import arithmetic_problems

        problems = [p for p, _ in arithmetic_problems(random.Random(args.seed), args.arithmetic, heldout=True)]
        task = task_accuracy(
            model,
            tokenizer,
            problems,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            show_progress=not args.quiet,
        )
        result["task_accuracy"] = task["accuracy"]
        result["n_task"] = task["n"]
        result.setdefault("samples", {})["task"] = task["samples"]

    folder = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".eval.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(result, f, indent=2)
        os.replace(tmp, args.output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

    def rate(key):
        value = result.get(key)
        return "n/a" if value is None else f"{value:.3f}"

    samples = result.get("samples", {})
    for kind in ("harmful", "benign"):
        for item in samples.get(kind, [])[: args.show]:
            print(
                f"[{kind}{', refused' if item['refused'] else ''}] {item['prompt'][:70]!r} -> {item['response'][:90]!r}"
            )
    print(f"refusal rate       {rate('refusal_rate')}  ({result.get('n_harmful', 0)} harmful prompts)")
    print(f"attack success     {rate('attack_success_rate')}")
    print(f"over-refusal       {rate('over_refusal')}  ({result.get('n_benign', 0)} benign prompts)")
    for spec, judged in result.get("judges", {}).items():
        unparsed = f", {judged['n_unparsed']} unparsed" if judged["n_unparsed"] else ""
        asr = judged["attack_success_rate"]
        print(f"judge {spec}: attack success {'n/a' if asr is None else f'{asr:.3f}'}{unparsed}")
    if args.arithmetic:
        print(f"task accuracy      {rate('task_accuracy')}  ({result['n_task']} arithmetic problems)")
    print(f"wrote {args.output}")
    return 0
