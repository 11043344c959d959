"""Pretrain a Llama on a corpus with a Colossal-AI booster plugin.

  python pretrain.py -c tiny -d data/sample/corpus                      # one process (CPU or GPU)
  torchrun --nproc_per_node 8 pretrain.py -c 1b -p zero2 -d SLIMPAJAMA
  colossalai run --nproc_per_node 8 --hostfile hosts.txt pretrain.py -c 7b -p gemini ...
"""
import argparse

from corpus.tokenizer import load_tokenizer
from training import args as flags
from training.data import check_vocab, pretrain_loader, steps_per_epoch
from training.loop import Trainer, grad_accum_steps
from training.setup import resolve_run, run_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flags.add_model_flags(p, default_config="tiny")
    flags.add_parallel_flags(p)
    flags.add_data_flags(p, default_dataset="data/sample/corpus")
    flags.add_schedule_flags(p)
    flags.add_optimizer_flags(p, default_lr=3e-4)
    flags.add_output_flags(p)
    return p


def main(argv=None) -> None:
    args, config, rank, world_size = resolve_run(parser(), argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: --tokenizer {args.tokenizer}: {error}") from None
    check_vocab(tokenizer, config, args.tokenizer)
    loader = pretrain_loader(args, tokenizer, rank, world_size)
    accum = grad_accum_steps(args, args.max_length, world_size)
    total_steps = args.max_steps or args.num_epochs * steps_per_epoch(loader, world_size, accum)
    trainer = Trainer(args, config, loader, rank=rank, world_size=world_size, total_steps=total_steps,
                      run_config=run_config(args, config, world_size, tokenizer=tokenizer.source))
    if args.load:
        trainer.resume(args.load)
    losses = trainer.fit()
    trainer.report(losses)


if __name__ == "__main__":
    main()
