"""Export a suite checkpoint to a Hugging Face folder: config.json, safetensors shards, tokenizer.

  python export_hf.py checkpoints/demo out/tiny-hf            # a save_dir exports its latest checkpoint
  python export_hf.py checkpoints/demo/step-00000300 out/tiny-hf --dtype bfloat16

The result loads with transformers.AutoModelForCausalLM / AutoTokenizer.from_pretrained(out).
"""
import argparse
import sys

import torch

from model.config import LlamaConfig
from model.hf_io import check_state_dict, expected_shapes, load_hf_state_dict, save_hf_checkpoint
from training.checkpoint import model_folder, read_run_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export(checkpoint: str, out: str, dtype: str | None, tokenizer: str | None) -> None:
    folder = model_folder(checkpoint)
    config = LlamaConfig.from_name(str(folder))
    state = load_hf_state_dict(folder)
    check_state_dict(state, expected_shapes(config), source=str(folder))
    save_hf_checkpoint(state, config, out, dtype=DTYPES[dtype] if dtype else None)
    tokenizer = tokenizer or read_run_config(checkpoint).get("tokenizer")
    if tokenizer:
        from corpus.tokenizer import load_tokenizer

        load_tokenizer(tokenizer).save_pretrained(out)
    print(f"exported {folder} -> {out} ({config.num_params() / 1e6:,.1f}M parameters"
          f"{', tokenizer from ' + tokenizer if tokenizer else ', no tokenizer recorded: pass --tokenizer'})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a checkpoint folder (step-N) or a save_dir (its latest checkpoint)")
    p.add_argument("out", help="the Hugging Face folder to write")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: as saved)")
    p.add_argument("--tokenizer", default=None, help="tokenizer to include (default: the one the run used)")
    args = p.parse_args(argv)
    try:
        export(args.checkpoint, args.out, args.dtype, args.tokenizer)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {args.checkpoint}: {error}")


if __name__ == "__main__":
    main()
