"""``refusalguard train``: LoRA fine-tuning with the RefusalGuard penalty, from the command line.

Loads the model and tokenizer, tokenizes the dataset, loads (``--basis``) or extracts
(``--extract``) the refusal basis, wraps the model with a PEFT LoRA adapter, attaches a
``RefusalGuard`` and runs ``RefusalGuardTrainer`` (a ``transformers.Trainer``, so
``torchrun``/``accelerate launch`` work as for any Trainer script).  The adapter, the
tokenizer and the basis land in ``--output-dir``.
"""

from __future__ import annotations

import argparse
import os
import sys

from .common import (
    DTYPES,
    CLIError,
    HelpFormatter,
    add_common_model_options,
    add_threads_option,
    apply_threads,
    cli_errors,
    int_at_least,
    load_model_and_tokenizer,
    merge_adapter,
    nonnegative_float,
    parse_layers,
    quiet_transformers,
    resolve_dtype,
)

__all__ = ["add_parser", "run"]

EPILOG_TRAIN = """\
examples:
  # basis from `refusalguard extract`, prompt/response data, penalty on the response tokens
  refusalguard train meta-llama/Llama-3.2-1B-Instruct --dataset data.jsonl \\
      --prompt-field prompt --response-field response --basis llama1b_basis.safetensors \\
      --positions response --steps 500 --bf16 --gradient-checkpointing --output-dir out/

  # extract a basis on the spot from the built-in prompt sets, cache the anchors once
  refusalguard train ./my-model --dataset org/some-dataset --text-field text --extract --layers 6-9 \\
      --anchors cached --warmup-steps 50 --warmup-multiplier 10

  # the baseline: the same LoRA run without the guard
  refusalguard train ./my-model --dataset data.jsonl --no-guard --output-dir out-plain/

  # align-then-attack: fine-tune the model with an (alignment) adapter merged in, guard extracted from it
  refusalguard extract ./base --adapter aligned/ --output aligned_basis.safetensors
  refusalguard train ./base --adapter aligned/ --basis aligned_basis.safetensors --dataset attack.jsonl

Multi-GPU: torchrun --nproc_per_node 8 -m refusalguard_kernels train ... (or accelerate launch).

Coefficients: with a basis from `refusalguard extract` (0.2+), --drift-coef and --gram-coef are in the
basis' units: the drift term is the mean squared movement of the guarded tokens' refusal coordinates in
pooled standard deviations of the extraction prompts' coordinates, averaged over the guarded layers, so
--drift-coef 1 means the same on any model (docs/guard_scale.md has the measured effect of 0.1-100 on
SmolLM2-135M and the demo organism). The first token of every example (an attention sink with massive
activations in pre-norm LLMs) is never guarded (--exclude-first).

CPU: without a GPU the run uses the CPU by itself. --bf16 works there too (autocast), but is faster than
float32 only on CPUs with native bf16 instructions (avx512_bf16 / amx_bf16 in /proc/cpuinfo: recent Xeon
and EPYC); on this project's Xeon without them a SmolLM2-135M LoRA step took ~2x longer in bf16.

Anchors: "online" runs a frozen forward each step (no preparation, one extra forward);
"cached" computes them once before training into dataset columns (memory-mapped, reused
next run, checked against the tokens, the basis and the model).
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train",
        help="LoRA fine-tuning with the RefusalGuard penalty (keeps the refusal geometry in place)",
        description=(
            "Fine-tune a causal LM with a LoRA adapter (peft) on a dataset while RefusalGuard penalises drift of "
            "the hidden states' coordinates in the refusal basis away from the frozen model's (drift term) and "
            "of their second moments (Gram term). Saves the adapter, the tokenizer and the basis in --output-dir."
        ),
        epilog=EPILOG_TRAIN,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("model", help="base model folder or Hugging Face Hub name (loaded with AutoModelForCausalLM)")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        metavar="SOURCE",
        help="training data: a .json/.jsonl/.csv/.txt/.parquet file, a save_to_disk folder, or a "
        "Hugging Face dataset name",
    )
    data.add_argument(
        "--dataset-config", default=None, metavar="NAME", help="dataset configuration (subset) on the Hub"
    )
    data.add_argument("--split", default="train", help="dataset split to train on")
    data.add_argument(
        "--text-field", default=None, metavar="NAME", help="column with whole training texts (trained on every token)"
    )
    data.add_argument(
        "--prompt-field",
        default=None,
        metavar="NAME",
        help="column with prompts (not trained on; formatted with the chat template when the tokenizer "
        "has one); needs --response-field",
    )
    data.add_argument(
        "--response-field",
        default=None,
        metavar="NAME",
        help="column with the responses to train on; needs --prompt-field. With no field option, "
        "prompt/response, prompt/completion, instruction/output, question/answer or text columns "
        "are recognised",
    )
    data.add_argument(
        "--messages-field",
        default=None,
        metavar="NAME",
        help="column with chat conversations (lists of {role, content} messages): formatted with the tokenizer's "
        "chat template, trained on the assistant turns only, which --positions response guards",
    )
    data.add_argument(
        "--max-length",
        type=int_at_least("--max-length", 2),
        default=512,
        help="tokens per example; longer examples are cut on the right",
    )
    data.add_argument(
        "--max-examples",
        type=int_at_least("--max-examples", 1),
        default=None,
        metavar="N",
        help="train on the first N examples only (default: all)",
    )
    data.add_argument(
        "--no-chat-template",
        action="store_true",
        help="do not format prompt/response pairs with the tokenizer's chat template",
    )

    lora = parser.add_argument_group("LoRA adapter")
    lora.add_argument(
        "--lora-r",
        type=int_at_least("--lora-r", 1),
        default=16,
        help="rank of the LoRA update matrices (capacity of the adapter)",
    )
    lora.add_argument(
        "--lora-alpha", type=nonnegative_float("--lora-alpha"), default=32.0, help="LoRA scaling numerator (alpha / r)"
    )
    lora.add_argument(
        "--lora-dropout", type=nonnegative_float("--lora-dropout"), default=0.05, help="dropout on the LoRA input"
    )
    lora.add_argument(
        "--lora-targets",
        default=None,
        metavar="LIST",
        help="comma-separated module names to adapt (e.g. q_proj,v_proj) or all-linear; default: "
        "peft's choice for the architecture",
    )

    parser.add_argument(
        "--adapter",
        default=None,
        metavar="PATH",
        help="a PEFT (LoRA) adapter merged into the model before training (e.g. an alignment adapter, for an "
        "align-then-attack run): the merged model is the frozen model the guard anchors to and the new LoRA "
        "adapter trains on top of it",
    )
    guard = parser.add_argument_group("refusal guard")
    source = guard.add_mutually_exclusive_group()
    source.add_argument(
        "--basis",
        default=None,
        metavar="PATH",
        help="refusal basis from `refusalguard extract` (.safetensors file or a folder holding one)",
    )
    source.add_argument(
        "--extract",
        action="store_true",
        help="extract a basis first from the built-in harmful/harmless prompt sets (see --layers, --k); "
        "it is saved in --output-dir",
    )
    source.add_argument(
        "--no-guard",
        action="store_true",
        help="plain LoRA, no penalty and no hooks: the baseline to compare a guarded run with (every other "
        "option the same)",
    )
    guard.add_argument(
        "--layers",
        type=parse_layers,
        default=None,
        metavar="LIST",
        help="with --extract: decoder layers, e.g. '10,12,14' or '8-11'; default: the middle band of depth",
    )
    guard.add_argument(
        "--k",
        type=int_at_least("--k", 1),
        default=None,
        help="with --extract: directions per layer, default 1 (k > 1 uses the svd method)",
    )
    guard.add_argument(
        "--positions",
        default=None,
        help="tokens the penalty covers: all (every non-padding token), prompt, response, or fN+lM "
        "(first N and last M prompt tokens, e.g. f5+l5); prompt/response/fN+lM need prompt and "
        "response fields or --messages-field (response: the assistant turns). Default: response with "
        "--messages-field, else all. The first --exclude-first tokens are never guarded",
    )
    guard.add_argument(
        "--exclude-first",
        type=int_at_least("--exclude-first", 0),
        default=1,
        metavar="N",
        help="never guard the first N tokens of an example: in pre-norm LLMs the first token is an attention "
        "sink with massive activations (SmolLM2-135M: 130-170x the median hidden norm) that would dominate the "
        "penalty",
    )
    guard.add_argument(
        "--coef-units",
        choices=("auto", "spread", "raw"),
        default="auto",
        help="spread: coefficients per squared pooled standard deviation of the basis' coordinates, layers "
        "averaged (model-independent); raw: on raw coordinates, layers summed (0.1's meaning); auto: spread when "
        "the basis records its spread (bases from 0.2's extract)",
    )
    guard.add_argument(
        "--drift-coef",
        type=nonnegative_float("--drift-coef"),
        default=1.0,
        help="weight of the drift term (mean squared change of the refusal coordinates, see --coef-units); "
        "measured in docs/guard_scale.md: 1 holds an attack's movement to a few percent and leaves a benign "
        "fine-tune alone, 10 holds the cone hard (and blocks task learning that goes through it), 0.1 does little",
    )
    guard.add_argument(
        "--gram-coef",
        type=nonnegative_float("--gram-coef"),
        default=0.0,
        help="weight of the Gram term (change of the coordinates' second-moment matrix)",
    )
    guard.add_argument(
        "--warmup-steps",
        type=int_at_least("--warmup-steps", 0),
        default=0,
        help="ProCon-style warm-up: optimizer steps over which the penalty scale decays from "
        "--warmup-multiplier to 1 (0: no warm-up)",
    )
    guard.add_argument(
        "--warmup-multiplier",
        type=nonnegative_float("--warmup-multiplier"),
        default=10.0,
        help="penalty scale at step 0 when --warmup-steps > 0",
    )
    guard.add_argument(
        "--warmup-schedule", choices=("linear", "cosine"), default="linear", help="shape of the warm-up decay"
    )
    guard.add_argument(
        "--anchors",
        choices=("online", "cached"),
        default="online",
        help="online: the frozen model's coordinates from an extra no-grad forward each step; cached: "
        "computed once before training and stored with the dataset (checked against tokens, "
        "basis and model)",
    )
    guard.add_argument(
        "--anchor-batch-size",
        type=int_at_least("--anchor-batch-size", 1),
        default=None,
        metavar="N",
        help="examples per forward when caching anchors (default: --batch-size)",
    )
    guard.add_argument(
        "--backend",
        choices=("auto", "torch", "triton", "cuda"),
        default="auto",
        help="penalty implementation: auto picks the fused kernels on GPU and PyTorch on CPU",
    )

    train = parser.add_argument_group("training")
    length = train.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=int_at_least("--steps", 1), default=None, help="optimizer steps to train (overrides --epochs)"
    )
    length.add_argument("--epochs", type=nonnegative_float("--epochs"), default=1.0, help="passes over the dataset")
    train.add_argument("--lr", type=nonnegative_float("--lr"), default=2e-4, help="peak learning rate")
    train.add_argument(
        "--lr-scheduler",
        default="linear",
        choices=("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_min_lr"),
        help="learning-rate schedule",
    )
    train.add_argument(
        "--lr-warmup-steps",
        type=int_at_least("--lr-warmup-steps", 0),
        default=0,
        help="learning-rate warm-up steps (independent of the penalty warm-up)",
    )
    train.add_argument(
        "--weight-decay", type=nonnegative_float("--weight-decay"), default=0.0, help="AdamW weight decay"
    )
    train.add_argument(
        "--batch-size", type=int_at_least("--batch-size", 1), default=4, help="examples per device per micro-batch"
    )
    train.add_argument(
        "--grad-accum",
        type=int_at_least("--grad-accum", 1),
        default=1,
        help="micro-batches accumulated per optimizer step",
    )
    train.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in backward to save memory (non-reentrant)",
    )
    train.add_argument(
        "--bf16",
        action="store_true",
        help="train in bfloat16 mixed precision (autocast; the penalty itself is computed in float32). Also on a "
        "CPU, where it is faster than float32 only with native bf16 instructions (avx512_bf16 or amx_bf16 in "
        "/proc/cpuinfo; without them SmolLM2-135M steps ran ~2x slower here)",
    )
    train.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="base model weights dtype; auto: bfloat16 with --bf16, else float32",
    )
    train.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is available")
    add_threads_option(train)
    train.add_argument("--seed", type=int, default=42, help="random seed (adapter init, data order)")
    train.add_argument(
        "--output-dir",
        default="refusalguard-output",
        metavar="DIR",
        help="where the adapter, tokenizer, basis and checkpoints go",
    )
    train.add_argument(
        "--logging-steps",
        type=int_at_least("--logging-steps", 1),
        default=10,
        help="log loss, task loss, penalty and per-layer drift every N steps",
    )
    train.add_argument(
        "--save-steps",
        type=int_at_least("--save-steps", 0),
        default=0,
        help="save a checkpoint (with the basis) every N steps; 0: only at the end",
    )
    train.add_argument(
        "--save-total-limit",
        type=int_at_least("--save-total-limit", 1),
        default=None,
        metavar="N",
        help="keep at most N checkpoints (default: all)",
    )
    train.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue an interrupted run from a checkpoint (model, optimizer, scheduler, RNG and data order): "
        "with no value the latest checkpoint-N in --output-dir, or a checkpoint folder; the same options must "
        "be given as for the interrupted run. The result equals an uninterrupted run",
    )
    train.add_argument(
        "--report-to",
        default="none",
        help="experiment trackers for the Trainer's logs: none, tensorboard, wandb, ... (comma-separated)",
    )
    add_common_model_options(parser)
    parser.set_defaults(func=run)
    return parser


def _check_args(args) -> None:
    if args.basis is None and not args.extract and not args.no_guard:
        raise CLIError(
            "no refusal basis: pass --basis PATH (made with `refusalguard extract`) or --extract to build one from "
            "the built-in prompt sets (or --no-guard for plain LoRA)"
        )
    if args.no_guard:
        guard_options = [
            name
            for name, given in (
                ("--layers", args.layers is not None),
                ("--k", args.k is not None),
                ("--positions", args.positions is not None),
                ("--anchors", args.anchors != "online"),
                ("--warmup-steps", args.warmup_steps != 0),
            )
            if given
        ]
        if guard_options:
            raise CLIError(f"--no-guard trains without the guard; drop {', '.join(guard_options)}")
    if args.basis is not None and (args.layers is not None or args.k is not None):
        raise CLIError("--layers and --k choose what --extract builds; a --basis file already fixes its layers and k")
    if args.text_field is not None and (args.prompt_field is not None or args.response_field is not None):
        raise CLIError("give either --text-field or --prompt-field with --response-field, not both")
    if (args.prompt_field is None) != (args.response_field is None):
        raise CLIError("--prompt-field and --response-field go together; give both")
    if args.messages_field is not None:
        if args.text_field is not None or args.prompt_field is not None:
            raise CLIError("give either --messages-field or --text-field / --prompt-field with --response-field")
        if args.no_chat_template:
            raise CLIError("--messages-field formats conversations with the chat template; drop --no-chat-template")
    if args.no_guard:
        return
    if args.positions is None:
        # Chat data trains on the assistant turns; guard the same tokens.
        args.positions = "response" if args.messages_field is not None else "all"
    from ..integration.hooks import parse_positions

    try:
        parse_positions(args.positions)
    except ValueError as exc:
        raise CLIError(f"--positions: {exc}") from None


def _resume_checkpoint(args) -> str | None:
    """The checkpoint folder ``--resume`` names (None without ``--resume``)."""
    if args.resume is None:
        return None
    if args.resume == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        latest = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
        if latest is None:
            raise CLIError(
                f"--resume: no checkpoint-N folder in --output-dir {args.output_dir!r} to resume from; give the "
                "checkpoint folder (--resume PATH), or start afresh without --resume (checkpoints are written with "
                "--save-steps N)"
            )
        return latest
    if not os.path.isfile(os.path.join(args.resume, "trainer_state.json")):
        raise CLIError(
            f"--resume {args.resume!r} is not a Trainer checkpoint folder (no trainer_state.json); give a "
            "checkpoint-N folder from --output-dir, or --resume with no value for the latest one"
        )
    return args.resume


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _training_arguments(args):
    import inspect

    from transformers import TrainingArguments

    fields = inspect.signature(TrainingArguments.__init__).parameters
    options = dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.lr_warmup_steps,
        weight_decay=args.weight_decay,
        max_steps=args.steps if args.steps is not None else -1,
        num_train_epochs=args.epochs,
        bf16=args.bf16,
        seed=args.seed,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        save_total_limit=args.save_total_limit,
        report_to=[] if args.report_to == "none" else args.report_to.split(","),
        disable_tqdm=args.quiet,
        # Without a GPU the CPU is the only choice: say so to the Trainer (it refuses --bf16 otherwise,
        # naming its own `use_cpu` argument).
        use_cpu=args.cpu or not _cuda_available(),
        dataloader_pin_memory=not args.cpu and _cuda_available(),
    )
    if args.gradient_checkpointing:
        name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
        options[name] = True
        options[f"{name}_kwargs"] = {"use_reentrant": False}
    return TrainingArguments(**options)


@cli_errors("train")
def run(args) -> int:
    _check_args(args)

    from transformers.utils import logging as hf_logging

    from ..integration.anchors import add_cached_anchors
    from ..integration.basis import BASIS_FILENAME, RefusalBasis, extract_refusal_basis
    from ..integration.hooks import RefusalGuard
    from ..training.data_utils import (
        ChatTemplateError,
        load_training_dataset,
        resolve_fields,
        tokenize_chats,
        tokenize_dataset,
    )
    from ..training.trainer import RefusalGuardTrainer, training_autocast_dtype

    hf_logging.set_verbosity_warning()
    apply_threads(args)
    quiet_transformers(args.quiet)
    training_args = _training_arguments(args)
    if args.bf16 and training_args.device.type == "cpu":
        from .common import cpu_has_native_bf16

        if cpu_has_native_bf16() is False:
            print(
                "refusalguard train: note: --bf16 on this CPU, which has no native bf16 instructions (no avx512_bf16 "
                "or amx_bf16 in /proc/cpuinfo): bf16 autocast is emulated there and usually slower than float32; "
                "drop --bf16 for speed",
                file=sys.stderr,
            )
    resume = _resume_checkpoint(args)

    # Data first: mistakes there are the most common and cost nothing to find.
    raw = load_training_dataset(args.dataset, split=args.split, config_name=args.dataset_config)
    if args.max_examples is not None:
        raw = raw.select(range(min(args.max_examples, len(raw))))
    text_field = prompt_field = response_field = None
    if args.messages_field is not None:
        if args.messages_field not in raw.column_names:
            raise CLIError(
                f"--messages-field {args.messages_field!r} is not a column of the dataset; its columns are "
                f"{raw.column_names}"
            )
    else:
        try:
            text_field, prompt_field, response_field = resolve_fields(
                raw.column_names,
                text_field=args.text_field,
                prompt_field=args.prompt_field,
                response_field=args.response_field,
            )
        except ValueError as exc:
            raise CLIError(
                f"{exc} (use --text-field, --prompt-field and --response-field, or --messages-field for chats)"
            ) from None
    if not args.no_guard and args.positions != "all" and prompt_field is None and args.messages_field is None:
        raise CLIError(
            f"--positions {args.positions} needs prompt/response data to tell the prompt from the response: give "
            f"--prompt-field and --response-field (the dataset's columns are {raw.column_names}), or use --positions all"
        )

    dtype = resolve_dtype(args.dtype, str(training_args.device), bf16=args.bf16, training=True)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    if args.adapter is not None:
        model = merge_adapter(model, args.adapter)
    tokenizer.padding_side = "right"  # cached anchors and causal-LM labels both assume it
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CLIError("the tokenizer has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token

    with training_args.main_process_first(desc="tokenizing"):
        if args.messages_field is not None:
            try:
                tokenized = tokenize_chats(
                    raw,
                    tokenizer,
                    messages_field=args.messages_field,
                    max_length=args.max_length,
                    show_progress=not args.quiet,
                )
            except ChatTemplateError as exc:
                raise CLIError(f"--messages-field with {args.model}: {exc}") from None
        else:
            tokenized = tokenize_dataset(
                raw,
                tokenizer,
                text_field=text_field,
                prompt_field=prompt_field,
                response_field=response_field,
                max_length=args.max_length,
                chat_template=False if args.no_chat_template else None,
                show_progress=not args.quiet,
            )

    model.to(training_args.device)
    resumed_basis = os.path.join(resume, BASIS_FILENAME) if resume is not None else None
    if args.no_guard:
        basis = None
    elif resumed_basis is not None and args.basis is None and os.path.isfile(resumed_basis):
        basis = RefusalBasis.load(resumed_basis)  # the basis the interrupted run trained with, not a re-extraction
    elif args.basis is not None:
        basis = RefusalBasis.load(args.basis)
    else:
        basis = extract_refusal_basis(
            model,
            tokenizer,
            "builtin:harmful",
            "builtin:harmless",
            layers=args.layers,
            k=args.k or 1,
            method="dim" if (args.k or 1) == 1 else "svd",
            show_progress=not args.quiet and training_args.should_save,
            layers_path=args.layers_path,
        )
        if training_args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)  # save() treats a path that is not a folder as a file name
            basis.save(args.output_dir)
    if basis is not None:
        basis.check_model(model, layers_path=args.layers_path)
    if basis is not None and resumed_basis is not None and args.basis is not None and os.path.isfile(resumed_basis):
        from ..integration.anchors import basis_fingerprint

        if basis_fingerprint(RefusalBasis.load(resumed_basis)) != basis_fingerprint(basis):
            raise CLIError(
                f"--basis {args.basis!r} is not the basis the checkpoint {resume!r} was trained with "
                f"({resumed_basis}); resume with the same --basis, or start a new run in another --output-dir"
            )

    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    # --seed promises a reproducible adapter init: the Trainer seeds only once it is built, after this.
    set_seed(args.seed)

    targets = args.lora_targets
    if targets is not None and targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    lora_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora_config)
    except ValueError as exc:
        raise CLIError(f"cannot add the LoRA adapter: {exc} (check --lora-targets)") from None

    if args.no_guard:
        return _train_plain(model, tokenizer, tokenized, training_args, resume, args)
    guard = RefusalGuard(
        model,
        basis,
        positions=args.positions,
        drift_coef=args.drift_coef,
        gram_coef=args.gram_coef,
        coef_units=args.coef_units,
        exclude_first=args.exclude_first,
        backend=args.backend,
        layers_path=args.layers_path,
    )
    if args.anchors == "cached":
        with training_args.main_process_first(desc="caching anchors"):
            tokenized = add_cached_anchors(
                tokenized,
                model,
                guard,
                batch_size=args.anchor_batch_size or args.batch_size,
                autocast_dtype=training_autocast_dtype(training_args),
                show_progress=not args.quiet,
            )

    trainer = RefusalGuardTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized,
        processing_class=tokenizer,
        guard=guard,
        anchors=args.anchors,
        warmup_steps=args.warmup_steps,
        warmup_multiplier=args.warmup_multiplier,
        warmup_schedule=args.warmup_schedule,
    )
    if training_args.should_save and not args.quiet:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(
            f"training {n_params:,} LoRA parameters on {len(tokenized)} examples; guard on layers {guard.layers} "
            f"(k={guard.k}, positions={args.positions}, exclude_first={guard.exclude_first}, "
            f"drift_coef={guard.drift_coef:g}, gram_coef={guard.gram_coef:g} in {guard.coef_units} units, "
            f"anchors={args.anchors})"
        )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    guard.remove()
    if training_args.should_save:
        print(f"saved the adapter, tokenizer and refusal basis to {args.output_dir}")
    return 0


def _train_plain(model, tokenizer, tokenized, training_args, resume, args) -> int:
    """--no-guard: the same LoRA run through the plain Trainer, no hooks, no penalty."""
    from transformers import DataCollatorForSeq2Seq, Trainer

    if "prompt_lengths" in tokenized.column_names:
        tokenized = tokenized.remove_columns("prompt_lengths")
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")
    trainer = Trainer(
        model=model, args=training_args, train_dataset=tokenized, data_collator=collator, processing_class=tokenizer
    )
    if training_args.should_save and not args.quiet:
        n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"training {n_params:,} LoRA parameters on {len(tokenized)} examples; no guard (--no-guard)")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    if training_args.should_save:
        print(f"saved the adapter and tokenizer to {args.output_dir} (no guard)")
    return 0
