"""Finetune a Llama on instruction or chat data, the loss on responses only.

  torchrun --nproc_per_node 8 finetune.py --model meta-llama/Llama-2-7b-hf -p gemini -d alpaca.jsonl -l 2048
  python finetune.py --model checkpoints/demo -d data/instructions.jsonl        # a suite checkpoint

--model is a Hugging Face Llama folder, a hub name (downloaded where there is a network), or a suite
checkpoint (a step-N folder, or a save_dir: its latest); the model config comes from it.
"""
import argparse

from corpus.sft import SFTLoader
from training import args as flags
from training.checkpoint import read_run_config, weights_folder
from training.data import steps_per_epoch
from training.loop import Trainer, grad_accum_steps
from training.plots import plot_at_end
from training.plugins import data_parallel_rank
from training.setup import load_checked_tokenizer, resolve_run, run_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="HF Llama folder, hub name, or suite checkpoint")
    flags.add_model_flags(p, default_config=None)
    flags.add_parallel_flags(p)
    flags.add_finetune_data_flags(p)
    flags.add_eval_flags(p, eval_dataset=False, unit="the examples (a fixed pick)")
    flags.add_schedule_flags(p)
    flags.add_optimizer_flags(p, default_lr=2e-5)
    flags.add_output_flags(p)
    p.set_defaults(weight_decay=0.0, save_dir="checkpoints/finetune", tensorboard_dir="runs/finetune")
    return p


def main(argv=None) -> None:
    resolved = {}

    def config_from(args):
        resolved["weights"] = weights_folder(args.model)
        return str(resolved["weights"])

    args, config, rank, world_size = resolve_run(parser(), argv, config_from=config_from)
    weights = resolved["weights"]
    tokenizer_spec = args.tokenizer or read_run_config(args.model).get("tokenizer") or str(weights)
    tokenizer = load_checked_tokenizer(tokenizer_spec, config)
    data_rank, data_ranks = data_parallel_rank(args, rank, world_size)  # hybrid_parallel: one per model replica
    loader = SFTLoader(args.dataset, tokenizer, seq_len=args.max_length, batch_size=args.batch_size, rank=data_rank,
                       world_size=data_ranks, seed=args.seed, pack=not args.no_pack, on_bad_line=args.on_bad_line,
                       held_out=args.eval_fraction)
    validation = loader.validation(args.eval_tokens or None) if args.eval_interval else None
    accum = grad_accum_steps(args, args.max_length, data_ranks)
    total_steps = args.max_steps or args.num_epochs * steps_per_epoch(loader, data_ranks, accum)
    trainer = Trainer(args, config, loader, rank=rank, world_size=world_size, total_steps=total_steps,
                      initial_weights=None if args.load else str(weights),
                      run_config=run_config(args, config, world_size, tokenizer=tokenizer.source,
                                            initial_weights=str(weights), data_stats=loader.stats),
                      validation=validation)
    trainer.print(f"finetuning data: {loader.stats}")
    if args.load:
        trainer.resume(args.load)
    losses = trainer.fit()
    trainer.report(losses)
    plot_at_end(args.tensorboard_dir, trainer.is_main, trainer.print)


if __name__ == "__main__":
    main()
