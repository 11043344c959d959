"""Validation loss and perplexity per source, and a greedy continuation of a few prompts as a sanity check.

    result = evaluate(model, reader, device=device, autocast=autocast, world_size=world_size)
    result["loss"], result["ppl"], result["sources"]["corpus/github"]["loss"]

`reader` is a validation reader: `names` (one per source) and `batches(s)`, the same number of batches on every
rank (corpus.loader.HeldOutReader, corpus.sft.SFTHeldOut). Used by the training loop (every --eval_interval
steps) and by eval.py. Every rank runs every forward: under Gemini and ZeRO the forward is collective.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.distributed as dist

from model.kernels.loss import IGNORE_INDEX


def evaluate(model, reader, *, device: torch.device, autocast, world_size: int) -> dict:
    """Mean loss per labelled token of each source, and over all of them, summed over ranks.

    Returns {"loss", "ppl", "tokens", "sources": {name: {"loss", "ppl", "tokens"}}}; tokens are labelled tokens.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(reader.names), 2, dtype=torch.float64, device=device)  # (loss x tokens, tokens)
    with torch.no_grad():
        for s in range(len(reader.names)):
            for batch in reader.batches(s):
                labelled = int((batch["labels"] != IGNORE_INDEX).sum())
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with autocast:
                    loss = model(**batch)  # the mean over this batch's labelled tokens (nan when it has none)
                if labelled:
                    sums[s, 0] += loss.double() * labelled
                    sums[s, 1] += labelled
    if world_size > 1:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    model.train(was_training)
    sums = sums.cpu()
    sources = {name: _loss_entry(float(total), int(tokens)) for name, (total, tokens) in zip(reader.names, sums)}
    return {**_loss_entry(float(sums[:, 0].sum()), int(sums[:, 1].sum())), "sources": sources}


def _loss_entry(loss_sum: float, tokens: int) -> dict:
    loss = loss_sum / tokens if tokens else float("nan")
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else float("inf"), "tokens": tokens}


def scalars(result: dict) -> dict:
    """TensorBoard scalars: val/loss, val/ppl (metrics.TAGS), and val/<source>/loss, val/<source>/ppl."""
    values = {"val_loss": result["loss"], "val_ppl": result["ppl"]}
    if len(result["sources"]) > 1:
        for name, entry in result["sources"].items():
            values[f"val/{name}/loss"] = entry["loss"]
            values[f"val/{name}/ppl"] = entry["ppl"]
    return values


def summary(result: dict) -> str:
    """One line: 'loss 4.1234, ppl 61.8 (corpus/github 3.9012, corpus/wikipedia 4.3456)'."""
    line = f"loss {result['loss']:.4f}, ppl {result['ppl']:,.1f}"
    if len(result["sources"]) > 1:
        line += " (" + ", ".join(f"{name} {e['loss']:.4f}" for name, e in result["sources"].items()) + ")"
    return line


def table(result: dict) -> str:
    """Loss and perplexity per source and over all, as an aligned text table."""
    rows = [(name, e) for name, e in result["sources"].items()] + [("all", result)]
    width = max(len("source"), *(len(name) for name, _ in rows))
    lines = [f"{'source':<{width}}  {'tokens':>12}  {'loss':>8}  {'ppl':>10}"]
    lines += [f"{name:<{width}}  {e['tokens']:>12,}  {e['loss']:>8.4f}  {e['ppl']:>10,.2f}" for name, e in rows]
    return "\n".join(lines)


DEFAULT_PROMPTS = ("The", "def __init__(self", "import os")


def greedy_continuations(model, tokenizer, prompts, *, max_new_tokens: int, max_length: int,
                         device: torch.device, autocast) -> list[str]:
    """The most likely next tokens after each prompt, the full forward recomputed per token (no cache).

    Always max_new_tokens forwards per prompt, cut at EOS afterwards, so that ranks running a collective forward
    stay in step whatever they predict. The context is the last max_length tokens.
    """
    was_training = model.training
    model.eval()
    texts = []
    with torch.no_grad():
        for prompt in prompts:
            prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
            ids = list(prompt_ids)
            for _ in range(max_new_tokens):
                context = torch.tensor([ids[-max_length:]], dtype=torch.long, device=device)  # (1, T)
                with autocast:
                    logits = model(input_ids=context)  # (1, T, V)
                ids.append(int(logits[0, -1, :tokenizer.vocab_size].argmax()))  # ids past the tokenizer: padding
            new = ids[len(prompt_ids):]
            if tokenizer.eos_id in new:
                new = new[:new.index(tokenizer.eos_id)]
            texts.append(_continuation_text(tokenizer, prompt_ids, new))
    model.train(was_training)
    return texts


def _continuation_text(tokenizer, prompt_ids: list[int], new: list[int]) -> str:
    # decoding the prompt with its continuation keeps the space that joins them (SentencePiece drops a leading one)
    head, whole = tokenizer.decode(prompt_ids[1:]), tokenizer.decode(prompt_ids[1:] + new)
    return whole[len(head):] if whole.startswith(head) else tokenizer.decode(new)


def print_continuations(prompts, texts, print_fn=print) -> None:
    print_fn("greedy continuations:")
    for prompt, text in zip(prompts, texts):
        print_fn(f"  {prompt!r} -> {prompt + text!r}")


def build_eval_model(args: argparse.Namespace, config, weights: str):
    """The model under the plugin's booster, weights loaded, no optimizer: (model, device, autocast)."""
    from colossalai.booster import Booster

    from .loop import _autocast, build_model, kernels_for_run, load_weights
    from .plugins import build_plugin

    model = build_model(args, config, kernels_for_run(args))
    load_weights(None, model, weights, args.plugin, boosted=False)
    booster = Booster(plugin=build_plugin(args, grad_accum_steps=1))
    model, *_ = booster.boost(model)
    load_weights(booster, model, weights, args.plugin, boosted=True)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return model, device, _autocast(args, device)
