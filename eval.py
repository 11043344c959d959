"""Evaluate a checkpoint: loss and perplexity per source of a corpus, then a greedy continuation of a few prompts.

  python eval.py checkpoints/demo                         # a suite run: its validation data, as it trained
  python eval.py checkpoints/demo/best -d data/sample/corpus --eval_fraction 0.05 --json
  torchrun --nproc_per_node 8 eval.py out/llama-hf -p gemini -d /data/SlimPajama-627B/validation -l 2048
  python eval.py --plot runs/demo                         # the loss-curve picture of a run: runs/demo/loss.png

The checkpoint is a suite checkpoint (a step-N folder, a save_dir: its latest, or its `best` / `latest` file),
a Hugging Face Llama folder or a hub name. -d is any corpus pretrain.py reads. What is evaluated:
--eval_fraction F, the last F of each source as pretrain.py holds it out; by default the run's own held-out part
when -d is (or defaults to) the run's training data, and all of -d otherwise. --eval_tokens bounds the tokens
per source. Runs under the same plugins as training (every rank evaluates its share; rank 0 prints).
"""
import argparse
import json
import sys

from training import args as flags
from training.checkpoint import read_run_config, weights_folder
from training.data import held_out_reader
from training.evaluate import (DEFAULT_PROMPTS, build_eval_model, evaluate, greedy_continuations,
                               print_continuations, table)
from training.plugins import data_parallel_rank
from training.setup import load_checked_tokenizer, resolve_run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="suite checkpoint, Hugging Face Llama folder, or hub name")
    p.add_argument("--plot", metavar="RUN_TB_DIR", default=None,
                   help="instead: draw the loss curves of the run logged in this TensorBoard folder")
    p.add_argument("--out", default=None, help="with --plot: the PNG to write (default: RUN_TB_DIR/loss.png)")
    flags.add_model_flags(p, default_config=None)
    flags.add_parallel_flags(p)
    group = p.add_argument_group("data")
    group.add_argument("-d", "--dataset", default=None,
                       help="a corpus, as pretrain.py's -d (default: the run's validation data)")
    flags.add_tokenizer_flag(group, default=None)
    group.add_argument("--data_cache", default="data/prepared", help="where tokenized shards are written")
    group.add_argument("--data_workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    group.add_argument("--eval_fraction", type=float, default=None,
                       help="evaluate the last F of each source (default: the run's held-out part of its own "
                            "training data, else all of -d)")
    group.add_argument("--eval_tokens", type=int, default=2**20, help="tokens per source (0: all of them)")
    group.add_argument("-b", "--batch_size", type=int, default=None, help="sequences per GPU and forward (default 4)")
    group.add_argument("-l", "--max_length", type=int, default=None,
                       help="sequence length (default: the run's, else the config's max_position_embeddings)")
    group.add_argument("--seed", type=int, default=42)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    defaults = ", ".join(map(repr, DEFAULT_PROMPTS))
    out.add_argument("--prompt", action="append", default=None,
                     help=f"a prompt to continue greedily (repeatable; default: {defaults})")
    out.add_argument("--max_new_tokens", type=int, default=32, help="tokens to continue each prompt by (0: none)")
    # what the shared flag checks and the plugin factory read; evaluation neither steps nor clips
    p.set_defaults(attention_scope=None, num_epochs=1, max_steps=None, global_batch_tokens=None, grad_clip=0.0)
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    if args.plot:
        if args.checkpoint is not None:
            raise SystemExit(f"error: --plot draws a run's curves; evaluate {args.checkpoint} in another command")
        plot(args)
        return
    if args.checkpoint is None:
        raise SystemExit("error: give a checkpoint to evaluate, or --plot RUN_TB_DIR")
    resolved = {}

    def config_from(args):
        resolved["weights"] = weights_folder(args.checkpoint)
        resolved["run"] = run = read_run_config(args.checkpoint).get("args", {})
        args.max_length = args.max_length or run.get("max_length")
        args.attention_scope = args.attention_scope or run.get("attention_scope") or "document"
        resolved["what"] = choose_data(args, run)
        return str(resolved["weights"])

    args, config, rank, world_size = resolve_run(parser(), argv, config_from=config_from)
    if args.plugin == "hybrid_parallel" and args.pp > 1:
        raise SystemExit("error: --pp > 1: evaluation runs a plain forward, which a pipeline does not have yet; "
                         "use --tp, or another plugin")
    weights = resolved["weights"]
    tokenizer_spec = args.tokenizer or read_run_config(args.checkpoint).get("tokenizer") or str(weights)
    tokenizer = load_checked_tokenizer(tokenizer_spec, config)
    data_rank, data_ranks = data_parallel_rank(args, rank, world_size)  # hybrid_parallel: one per model replica
    reader = held_out_reader(args.dataset, "-d", args.eval_fraction, args, tokenizer, data_rank, data_ranks)
    model, device, autocast = build_eval_model(args, config, str(weights))
    result = evaluate(model, reader, device=device, autocast=autocast, world_size=world_size)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    texts = greedy_continuations(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                 max_length=args.max_length, device=device, autocast=autocast) \
        if args.max_new_tokens > 0 else []
    if rank != 0:
        return
    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "weights": str(weights), "dataset": args.dataset,
                          "eval_fraction": args.eval_fraction, "seq_len": args.max_length, **result,
                          "continuations": [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]}, indent=2))
        return
    print(f"{args.checkpoint} ({weights}) on {resolved['what']}, seq_len {args.max_length}:")
    print(table(result))
    if texts:
        print_continuations(prompts, texts)


def choose_data(args: argparse.Namespace, run: dict) -> str:
    """Fill -d and --eval_fraction from the run where not given (see the module doc); describe the choice."""
    if args.dataset is None and run.get("eval_dataset"):
        args.dataset = run["eval_dataset"]
        args.eval_fraction = args.eval_fraction or 1.0
    if args.dataset is None:
        if not run:
            raise SystemExit(f"error: {args.checkpoint} is not a suite checkpoint (no run configuration): "
                             "give the data to evaluate with -d")
        args.dataset = run["dataset"]
    if args.eval_fraction is None:
        held_out = run.get("eval_fraction") or 0.0
        args.eval_fraction = held_out if held_out and args.dataset == run.get("dataset") else 1.0
        if args.dataset == run.get("dataset") and not held_out:
            print(f"warning: the run held none of -d {args.dataset} out, so all of it is training data",
                  file=sys.stderr)
    if not 0 < args.eval_fraction <= 1:
        raise SystemExit(f"error: --eval_fraction {args.eval_fraction} must be a fraction in (0, 1]")
    if args.eval_tokens < 0:
        raise SystemExit("error: --eval_tokens must be 0 or more")
    if args.eval_fraction == 1:
        return f"all of {args.dataset}"
    return f"the last {args.eval_fraction:.1%} of each source of {args.dataset}"


def plot(args: argparse.Namespace) -> None:
    from training.plots import plot_run

    try:
        print(f"wrote {plot_run(args.plot, args.out)}")
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib") from None
    except ValueError as error:
        raise SystemExit(f"error: --plot {error}") from None


if __name__ == "__main__":
    main()
