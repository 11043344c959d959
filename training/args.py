"""Command-line flags shared by pretrain.py, finetune.py and benchmark.py.

A superset of the Colossal-AI llama example's flags. Flags hold plain values (names, numbers); plugins and
kernels are resolved from them later. `validate` refuses a flag that the chosen plugin cannot honour instead
of ignoring it.
"""
from __future__ import annotations

import argparse

import torch

PLUGINS = ("gemini", "gemini_auto", "zero1", "zero2", "zero2_cpu", "hybrid_parallel", "ddp")


def layer_count(text: str) -> int:
    """-g's LAYERS: a whole number of layers, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers, not '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more layers, not {value}")
    return value


def add_recompute_flag(parser, help_text: str) -> None:
    """-g: False without it, True alone (every layer), or a number of layers (model/config.py recomputed_layers)."""
    parser.add_argument("-g", "--grad_checkpoint", nargs="?", const=True, default=False, type=layer_count,
                        metavar="LAYERS", help=help_text)


def pinned_recomputation(grad_checkpoint: bool | int) -> bool | int | None:
    """-g as the planner's pin: None without -g (the planner chooses), else what -g says (-g 0: none)."""
    return None if grad_checkpoint is False else grad_checkpoint


def check_recomputed_layers(grad_checkpoint: bool | int, num_layers: int) -> None:
    """-g LAYERS beyond the model's layers is a mistake (a number meant for another model), not "all"."""
    if not isinstance(grad_checkpoint, bool) and grad_checkpoint > num_layers:
        raise SystemExit(f"error: -g {grad_checkpoint}: the model has {num_layers} layers; -g alone recomputes all")


def add_model_flags(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    """default_config None: the entry point takes the config from its weights (finetune.py), so no -c flag."""
    group = parser.add_argument_group("model")
    if default_config is not None:
        group.add_argument("-c", "--config", default=default_config,
                           help="model size (tiny, 1b, 7b, 13b, 70b) or a Hugging Face config.json / folder")
    group.add_argument("--kernels", default=None,
                       help="kernel preset: auto, torch, reference, liger, flash_attn (default: torch)")
    group.add_argument("--kernel_override", action="append", default=[], metavar="OP=BACKEND",
                       help="replace one op's backend, e.g. attention=flex (repeatable)")
    group.add_argument("-a", "--flash_attention", action="store_true",
                       help="use the fastest fused kernels available (same as --kernels auto)")
    group.add_argument("--attention_scope", choices=("document", "sequence"), default="document",
                       help="document: packed documents do not attend to each other; sequence: plain causal rows")
    add_recompute_flag(group, "recompute activations in backward: every layer's, or with LAYERS the first LAYERS "
                              "layers' (of each pipeline stage), for less memory than none and less compute than all")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each decoder layer (not with gemini; the first "
                            "steps pay the compilation)")
    group.add_argument("--cuda_graphs", action="store_true",
                       help="replay the decoder layers' forward and backward as CUDA graphs, captured at the first "
                            "step: far less host work per micro-batch, for small micro batches (zero1, zero2, "
                            "zero2_cpu on a GPU, --attention_scope sequence, no -g)")


def add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("parallelism")
    group.add_argument("-p", "--plugin", choices=(*PLUGINS, "auto"), default=None,
                       help="Colossal-AI booster plugin; auto: the memory planner picks plugin, micro batch and "
                            "recomputation for these GPUs (default: gemini with a GPU, ddp without)")
    group.add_argument("-x", "--mixed_precision", choices=("bf16", "fp16", "fp32"), default=None,
                       help="training precision (default: bf16 with a GPU, fp32 without)")
    group.add_argument("--tp", type=int, default=1, help="tensor parallel size (hybrid_parallel)")
    group.add_argument("--pp", type=int, default=1, help="pipeline parallel size (hybrid_parallel)")
    group.add_argument("--zero", type=int, default=0, choices=(0, 1, 2), help="ZeRO stage on top (hybrid_parallel)")
    group.add_argument("--microbatch_size", type=int, default=1, help="pipeline micro-batch size (hybrid_parallel)")
    group.add_argument("--pp_style", choices=("1f1b", "interleaved"), default="1f1b",
                       help="pipeline schedule (hybrid_parallel, --pp 2 or more)")
    group.add_argument("--num_model_chunks", type=int, default=1,
                       help="model chunks per pipeline stage (--pp_style interleaved: 2 or more)")
    group.add_argument("--pp_layers", type=int, nargs="+", default=None, metavar="N",
                       help="decoder layers of each pipeline stage, stages x chunks counts in the order the model "
                            "runs them (default: an even split)")
    group.add_argument("--sequence_parallel", choices=("split_gather", "ring"), default=None,
                       help="split activations along the sequence over the tensor-parallel ranks (hybrid_parallel)")
    group.add_argument("--offload_optim_frac", type=float, default=0.0, help="optimizer state on CPU (gemini)")
    group.add_argument("--offload_param_frac", type=float, default=0.0, help="parameters on CPU (gemini)")
    group.add_argument("--gemini_prefetch", type=int, default=None, metavar="N",
                       help="chunks gemini gathers ahead of the layer that needs them (default: 4 on several GPUs, "
                            "0 on one, where the chunks stay whole)")


def add_optimizer_flags(parser: argparse.ArgumentParser, default_lr: float) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--lr", type=float, default=default_lr, help="peak learning rate")
    group.add_argument("-w", "--weight_decay", type=float, default=0.1)
    group.add_argument("-s", "--warmup_steps", type=int, default=None,
                       help="linear warm-up steps, then cosine decay (default: 1%% of the run, at least 10)")
    group.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decays to this fraction of --lr")
    group.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), metavar=("BETA1", "BETA2"))
    group.add_argument("--grad_clip", type=float, default=1.0, help="clip the global gradient norm (0: off)")
    group.add_argument("--max_bad_steps", type=int, default=5,
                       help="NaN/inf losses in a row before the run saves and stops")


def add_schedule_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batch and schedule")
    group.add_argument("-b", "--batch_size", type=int, default=None,
                       help="micro batch per GPU in sequences (default 4; with -p auto, the planner's choice)")
    group.add_argument("-l", "--max_length", type=int, default=None,
                       help="sequence length (default: the config's max_position_embeddings)")
    group.add_argument("--global_batch_tokens", type=int, default=None,
                       help="tokens per optimizer step over all GPUs; gradient accumulation is derived from it")
    group.add_argument("-e", "--num_epochs", type=int, default=1)
    group.add_argument("--max_steps", type=int, default=None, help="optimizer steps (overrides epochs when set)")
    group.add_argument("--seed", type=int, default=42)


def add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("checkpoints and logs")
    group.add_argument("-o", "--save_dir", default="checkpoints", help="checkpoint folder")
    group.add_argument("-i", "--save_interval", type=int, default=0, help="save every N steps (0: only at the end)")
    group.add_argument("--keep_last", type=int, default=3, help="how many step checkpoints to keep")
    group.add_argument("-f", "--load", default=None,
                       help="resume from a checkpoint folder, 'latest' or 'best' in --save_dir, or 'auto' (latest "
                            "if any, else start fresh)")
    group.add_argument("--stop_after", type=int, default=None,
                       help="save and stop after this many steps in this launch (fits a job's time limit)")
    group.add_argument("-t", "--tensorboard_dir", default="runs", help="TensorBoard log folder")
    group.add_argument("--log_interval", type=int, default=1, help="steps between progress/TensorBoard updates")


def add_eval_flags(parser: argparse.ArgumentParser, *, eval_dataset: bool, unit: str) -> None:
    """Validation during training (pretrain.py, finetune.py); `unit` names what a held-out fraction is of."""
    group = parser.add_argument_group("validation")
    group.add_argument("--eval_interval", type=int, default=0,
                       help="validate every N steps and before every checkpoint, and keep the best checkpoint "
                            "(0: no validation)")
    group.add_argument("--eval_tokens", type=int, default=2**20,
                       help="tokens per source read by each validation (0: the whole validation split)")
    group.add_argument("--eval_fraction", type=float, default=None,
                       help=f"fraction of {unit} held out of training for validation (default: "
                            f"{DEFAULT_EVAL_FRACTION} with --eval_interval, else 0)")
    if eval_dataset:
        group.add_argument("--eval_dataset", default=None,
                           help="validate on this corpus instead of a held-out fraction, e.g. SlimPajama's "
                                "validation/ folder (read with the run's tokenizer)")


DEFAULT_EVAL_FRACTION = 0.01


def _eval_defaults(args: argparse.Namespace) -> None:
    if args.eval_fraction is None:
        from_training_data = args.eval_interval and not getattr(args, "eval_dataset", None)
        args.eval_fraction = DEFAULT_EVAL_FRACTION if from_training_data else 0.0


def _validate_eval(args: argparse.Namespace, fail) -> None:
    eval_dataset = getattr(args, "eval_dataset", None)
    if args.eval_interval < 0 or args.eval_tokens < 0:
        fail("--eval_interval and --eval_tokens must be 0 or more")
    if not 0 <= args.eval_fraction < 1:
        fail(f"--eval_fraction {args.eval_fraction} must be a fraction in [0, 1)")
    if eval_dataset and not args.eval_interval:
        fail("--eval_dataset is read only when validating: add --eval_interval N")
    if eval_dataset and args.eval_fraction:
        fail("--eval_fraction holds training data out for validation, but --eval_dataset replaces it; "
             "give one of them")
    if args.eval_interval and not eval_dataset and not args.eval_fraction:
        fail("--eval_interval needs validation data: --eval_fraction above 0"
             + (" or --eval_dataset" if hasattr(args, "eval_dataset") else ""))


def add_data_flags(parser: argparse.ArgumentParser, default_dataset: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("-d", "--dataset", default=default_dataset,
                       help="a local corpus (jsonl, jsonl.zst, parquet, text; RedPajama/SlimPajama/StarCoder "
                            "layouts), prepared shards, a hub name, or a mixture 'pathA:0.7,pathB:0.3'")
    add_tokenizer_flag(group, default="data/sample/tokenizer")
    group.add_argument("--data_cache", default="data/prepared", help="where tokenized shards are written")
    group.add_argument("--data_workers", type=int, default=None, help="tokenizer processes (default: CPU count)")


def add_tokenizer_flag(group, default: str | None) -> None:
    group.add_argument("--tokenizer", default=default,
                       help="a SentencePiece tokenizer.model, an HF tokenizer folder, or a hub name")


def add_finetune_data_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("-d", "--dataset", required=True, nargs="+",
                       help="instruction jsonl (instruction/input/output) or chat jsonl (messages) files")
    add_tokenizer_flag(group, default=None)
    group.add_argument("--no_pack", action="store_true", help="one example per row instead of packing several")
    group.add_argument("--on_bad_line", choices=("skip", "error"), default="skip",
                       help="a malformed JSON line is skipped and counted, or stops the run")


def apply_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the hardware-dependent defaults, so the run's full configuration can be logged and saved."""
    has_gpu = torch.cuda.is_available()
    if args.plugin is None:
        args.plugin = "gemini" if has_gpu else "ddp"
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if has_gpu else "fp32"
    if args.flash_attention:
        if args.kernels not in (None, "auto"):
            raise SystemExit(f"error: -a/--flash_attention means --kernels auto, but --kernels {args.kernels} was given")
        args.kernels = "auto"
    if args.kernels is None:
        args.kernels = "torch"
    if args.batch_size is None and args.plugin != "auto":
        args.batch_size = 4
    if hasattr(args, "eval_interval"):
        _eval_defaults(args)
    return args


GRAPHED_PLUGINS = ("zero1", "zero2", "zero2_cpu")  # colossalai's LowLevelZero: the weights stay where they are
WHY_NOT_GRAPHED = {
    "gemini": "moves the weights in and out of its chunks", "gemini_auto": "moves the weights in and out of its chunks",
    "hybrid_parallel": "splits the layers over tensor-parallel ranks and pipeline stages",
    # Under torch's DDP the backward's capture was invalidated at its end (H100, torch 2.11, colossalai's
    # TorchDDPPlugin: cudaErrorStreamCaptureInvalidated), where zero2 captured the same layers. DDP builds the
    # weights' gradient accumulators when it is constructed, on the default stream, and autograd ends a backward
    # that reaches them by making the capturing stream wait on that one.
    "ddp": "holds the weights' gradient accumulators on the default stream, where a captured backward cannot wait",
}


def _check_cuda_graphs(args: argparse.Namespace, fail) -> None:
    """--cuda_graphs replays the layers with the weights where they were captured (model/cuda_graphs.py)."""
    if not torch.cuda.is_available():
        fail("--cuda_graphs needs a CUDA GPU")
    if args.plugin not in GRAPHED_PLUGINS:
        fail(f"--cuda_graphs does not work with -p {args.plugin}, which {WHY_NOT_GRAPHED[args.plugin]}: use -p zero2, "
             f"zero1 or zero2_cpu")
    if getattr(args, "attention_scope", "sequence") == "document":
        fail("--cuda_graphs replays plain causal rows only (packed documents need per-batch offsets computed on the "
             "host): add --attention_scope sequence")
    if args.grad_checkpoint is not False and args.grad_checkpoint != 0:
        fail("--cuda_graphs replays the layers without recomputation: leave out -g")
    if args.compile:
        fail("--cuda_graphs and --compile are two ways to cut the host's work: choose one")


def _check_gemini_fractions(args: argparse.Namespace, fail) -> None:
    for flag in ("offload_optim_frac", "offload_param_frac"):
        value = getattr(args, flag)
        if not 0.0 <= value <= 1.0:
            fail(f"--{flag} must be between 0 and 1, not {value}")
    # colossalai warns and drops offload_param_frac otherwise (StaticPlacementPolicy): parameters reach the CPU
    # only from chunks whose optimizer state is there too
    if args.offload_param_frac and args.offload_optim_frac != 1.0:
        fail(f"--offload_param_frac {args.offload_param_frac} needs --offload_optim_frac 1 (colossalai would "
             f"ignore it)")


def validate(args: argparse.Namespace) -> None:
    """Stop with one clear line for a flag the chosen plugin or hardware cannot honour."""
    def fail(message):
        raise SystemExit(f"error: {message}")

    if args.plugin == "auto":
        return  # checked again once the planner has chosen

    if args.plugin != "hybrid_parallel":
        for flag, default in (("tp", 1), ("pp", 1), ("zero", 0), ("microbatch_size", 1), ("pp_style", "1f1b"),
                              ("num_model_chunks", 1), ("pp_layers", None), ("sequence_parallel", None)):
            if getattr(args, flag) != default:
                fail(f"--{flag} applies to -p hybrid_parallel only, not -p {args.plugin}")
    if args.plugin != "gemini":
        for flag in ("offload_optim_frac", "offload_param_frac"):
            if getattr(args, flag):
                fail(f"--{flag} applies to -p gemini (static placement) only, not -p {args.plugin}")
    else:
        _check_gemini_fractions(args, fail)
    if args.gemini_prefetch and not args.plugin.startswith("gemini"):
        fail(f"--gemini_prefetch applies to -p gemini and gemini_auto only, not -p {args.plugin}")
    if args.gemini_prefetch is not None and args.gemini_prefetch < 0:
        fail(f"--gemini_prefetch must be 0 or more, not {args.gemini_prefetch}")
    if args.compile and args.plugin.startswith("gemini"):
        # Dynamo cannot trace Gemini's parameters (colossalai 0.5.0, torch 2.11: InternalTorchDynamoError on their
        # views), so the compiled layers would fail at the first step
        fail(f"--compile does not work with -p {args.plugin}: use -p zero2, zero2_cpu, ddp or hybrid_parallel")
    if getattr(args, "cuda_graphs", False):
        _check_cuda_graphs(args, fail)
    if args.plugin != "ddp" and not torch.cuda.is_available():
        fail(f"-p {args.plugin} needs a CUDA GPU; on a CPU use -p ddp")
    if args.plugin == "ddp" and args.mixed_precision == "fp16":
        fail("-x fp16 needs loss scaling, which -p ddp does not do here; use -x bf16 or a ZeRO/Gemini plugin")
    if args.plugin.startswith("gemini") and args.mixed_precision == "fp32":
        fail(f"-p {args.plugin} trains in fp16 or bf16 only; use -x bf16")
    for flag in ("batch_size", "num_epochs"):
        if getattr(args, flag) < 1:
            fail(f"--{flag} must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        fail("--max_steps must be at least 1")
    if hasattr(args, "eval_interval"):
        _validate_eval(args, fail)
