"""Weights in and out in the Hugging Face layout: config.json plus safetensors shards and their index.

The suite's parameter names are transformers' own, so no renaming happens here, only checks: a checkpoint of
another model (missing tensors, unexpected ones, other shapes) is refused with a message naming the folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import LlamaConfig

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], config: LlamaConfig, folder: str | os.PathLike,
                       *, max_shard_bytes: int = 5 * 1024**3, dtype: torch.dtype | None = None) -> Path:
    """Write config.json and `model-0000i-of-0000n.safetensors` shards (or one model.safetensors) + index."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: _to_saveable(t, dtype) for name, t in state_dict.items()}
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)  # HF stores a tied head once, as the embedding
    shards = _split_into_shards(tensors, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, folder / name)
        weight_map.update(dict.fromkeys(shard, name))
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    config.save_hf(folder)
    return folder


def load_hf_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint folder (sharded or single; safetensors, or .bin as a fallback)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    files = _weight_files(folder)
    state = {}
    for path in files:
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt") as reader:
                    state.update({key: reader.get_tensor(key) for key in reader.keys()})
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except Exception as error:  # a truncated or foreign file: name it
            raise ValueError(f"cannot read weights from {path}: {error}") from None
    return state


def load_hf_checkpoint(folder: str | os.PathLike) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """The config and weights of an HF Llama folder, checked against each other."""
    folder = Path(folder)
    config = LlamaConfig.from_name(str(folder))
    state = load_hf_state_dict(folder)
    if config.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    check_state_dict(state, expected_shapes(config), source=str(folder))
    return config, state


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a Llama of this config, in HF naming. Built on the meta device."""
    from .llama import LlamaForCausalLM  # late: llama imports kernels, which fast backends may make heavy

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_state_dict(state: dict, shapes: dict, source: str) -> None:
    missing = sorted(set(shapes) - set(state))
    unexpected = sorted(set(state) - set(shapes) - _IGNORABLE)
    wrong = [f"{k} {tuple(state[k].shape)} != {shapes[k]}" for k in shapes if k in state
             and tuple(state[k].shape) != shapes[k]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (first: {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} tensors of the wrong shape (first: {wrong[0]})")
    if problems:
        raise ValueError(f"checkpoint {source} does not fit this model config: " + "; ".join(problems))


# Old HF checkpoints carry the rotary inverse frequencies as a buffer; the suite computes them.
_IGNORABLE = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(1024)}


def _weight_files(folder: Path) -> list[Path]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as error:
                raise ValueError(f"{index}: not a valid weight index ({error})") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            absent = [f.name for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(f"{index} names shards that are missing: {', '.join(absent)}")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"no model weights in {folder} (expected model.safetensors or a sharded index)")


def _to_saveable(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = tensor.detach().to("cpu")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.contiguous()


def _split_into_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensor
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
