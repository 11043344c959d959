"""Pretrain a Llama on a corpus with a Colossal-AI booster plugin.

  python pretrain.py -c tiny -d data/sample/corpus                      # one process (CPU or GPU)
  torchrun --nproc_per_node 8 pretrain.py -c 1b -p zero2 -d SLIMPAJAMA
  colossalai run --nproc_per_node 8 --hostfile hosts.txt pretrain.py -c 7b -p gemini ...
"""
import argparse

from training import args as flags
from training.data import pretrain_loader, steps_per_epoch, validation_reader
from training.evaluate import DEFAULT_PROMPTS, greedy_continuations, print_continuations
from training.loop import Trainer, grad_accum_steps
from training.plots import plot_at_end
from training.plugins import data_parallel_rank
from training.setup import load_checked_tokenizer, resolve_run, run_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_model_flags(p, default_config="tiny")
    flags.add_parallel_flags(p)
    flags.add_data_flags(p, default_dataset="data/sample/corpus")
    flags.add_eval_flags(p, eval_dataset=True, unit="each source's tokens (its last documents)")
    flags.add_schedule_flags(p)
    flags.add_optimizer_flags(p, default_lr=3e-4)
    flags.add_output_flags(p)
    return p


def main(argv=None) -> None:
    args, config, rank, world_size = resolve_run(parser(), argv)
    tokenizer = load_checked_tokenizer(args.tokenizer, config)
    data_rank, data_ranks = data_parallel_rank(args, rank, world_size)  # hybrid_parallel: one per model replica
    loader = pretrain_loader(args, tokenizer, data_rank, data_ranks)
    validation = validation_reader(args, tokenizer, data_rank, data_ranks)
    accum = grad_accum_steps(args, args.max_length, data_ranks)
    total_steps = args.max_steps or args.num_epochs * steps_per_epoch(loader, data_ranks, accum)
    trainer = Trainer(args, config, loader, rank=rank, world_size=world_size, total_steps=total_steps,
                      run_config=run_config(args, config, world_size, tokenizer=tokenizer.source),
                      validation=validation)
    if validation is not None:
        where = f"--eval_dataset {args.eval_dataset}" if args.eval_dataset else \
            f"the held-out last {args.eval_fraction:.1%} of each source of -d"
        tokens = ", ".join(f"{name} {n:,}" for name, n in validation.num_tokens().items())
        trainer.print(f"validation every {args.eval_interval} steps on {where}; tokens per source: {tokens}")
    if args.load:
        trainer.resume(args.load)
    losses = trainer.fit()
    trainer.report(losses)
    if validation is not None and not trainer.preempted:  # a glance at what the model learned
        texts = greedy_continuations(trainer.model, tokenizer, DEFAULT_PROMPTS, max_new_tokens=32,
                                     max_length=args.max_length, device=trainer.device, autocast=trainer.autocast)
        print_continuations(DEFAULT_PROMPTS, texts, trainer.print)
    plot_at_end(args.tensorboard_dir, trainer.is_main, trainer.print)


if __name__ == "__main__":
    main()
