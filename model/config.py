"""Llama model sizes by name, and Hugging Face `config.json` in and out.

Field names are those of transformers' `LlamaConfig`, so a config.json written here loads there and the
reverse. Derived sizes (head_dim, kv groups) are computed, never stored twice.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: multi-head attention (as many kv heads as query heads)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int = 1
    eos_token_id: int = 2
    name: str = field(default="custom", compare=False)  # registry name, for logs; not written to config.json

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_groups(self) -> int:
        """Query heads per key-value head (1 for multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    # ---- sizes, for logs, MFU and the planner -------------------------------------------------
    def params_per_layer(self) -> int:
        d, f = self.hidden_size, self.intermediate_size
        kv_dim = self.num_key_value_heads * self.head_dim
        attention = d * d * 2 + d * kv_dim * 2  # q, o; k, v
        mlp = 3 * d * f  # gate, up, down
        norms = 2 * d
        return attention + mlp + norms

    def num_params(self) -> int:
        embedding = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return embedding + self.num_hidden_layers * self.params_per_layer() + self.hidden_size + head

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6N for the matmuls over all parameters plus 12*L*d*T for attention.

        The attention term counts the full T x T score matrix (no causal discount), PaLM's convention.
        """
        return 6 * self.num_params() + 12 * self.num_hidden_layers * self.hidden_size * seq_len

    # ---- Hugging Face config.json ------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values.pop("name")
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "head_dim": self.head_dim,
            "torch_dtype": "bfloat16",
            **values,
        }

    def save_hf(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_hf_dict(cls, values: dict, source: str = "config") -> "LlamaConfig":
        model_type = values.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"{source}: model_type is '{model_type}', this suite trains Llama models only")
        unsupported = {k: values[k] for k in ("attention_bias", "mlp_bias") if values.get(k)}
        if values.get("hidden_act", "silu") != "silu":
            unsupported["hidden_act"] = values["hidden_act"]
        if values.get("rope_scaling"):
            unsupported["rope_scaling"] = values["rope_scaling"]
        if unsupported:
            raise ValueError(f"{source}: unsupported Llama options {unsupported}")
        names = {f.name for f in dataclasses.fields(cls)} - {"name"}
        config = cls(**{k: v for k, v in values.items() if k in names}, name=source)
        head_dim = values.get("head_dim")
        if head_dim is not None and head_dim != config.head_dim:
            raise ValueError(f"{source}: head_dim {head_dim} differs from hidden_size / num_attention_heads")
        return config

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        """A registry size by name (`tiny`, `1b`, `7b`, `13b`, `70b`), or a path to an HF config.json or its folder."""
        if name in CONFIGS:
            return dataclasses.replace(CONFIGS[name], **overrides)
        path = Path(name)
        if path.is_dir():
            path = path / "config.json"
        if path.is_file():
            try:
                values = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"model config {path}: not valid JSON ({error})") from None
            return dataclasses.replace(cls.from_hf_dict(values, source=str(name)), **overrides)
        raise ValueError(
            f"unknown model config '{name}': expected one of {', '.join(CONFIGS)} "
            "or a path to a Hugging Face config.json (or the folder holding it)"
        )


CONFIGS: dict[str, LlamaConfig] = {
    # A few million parameters: trains on a CPU in seconds; grouped-query like the larger sizes.
    "tiny": LlamaConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512, name="tiny",
    ),
    # TinyLlama-1.1B.
    "1b": LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, name="1b",
    ),
    # Llama-2 sizes, as in the Colossal-AI llama example.
    "7b": LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, name="7b",
    ),
    "13b": LlamaConfig(
        hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, name="13b",
    ),
    "70b": LlamaConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, name="70b",
    ),
}


def recomputed_layers(grad_checkpoint: bool | int, layers: int) -> int:
    """How many of `layers` decoder layers (a model's, or a pipeline stage's) recompute their activations in the
    backward: all for True, none for False, else the first `grad_checkpoint` of them (all if it is more). Recomputing
    only some of the layers trades less compute for memory than recomputing all (-g N)."""
    if isinstance(grad_checkpoint, bool):
        return layers if grad_checkpoint else 0
    if grad_checkpoint < 0:
        raise ValueError(f"the number of layers to recompute must be 0 or more, not {grad_checkpoint}")
    return min(grad_checkpoint, layers)
