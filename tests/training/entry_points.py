"""Running the suite's entry points (pretrain.py, eval.py, export_hf.py, ...) in a subprocess from tests, and the
check every export must pass: the HF folder, loaded by transformers, gives the suite model's logits."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def pretrain_flags(*argv: str):
    """pretrain.py's arguments for `argv`, with the defaults apply_defaults derives, as the script sees them."""
    import pretrain
    from training import args as flag_defs

    return flag_defs.apply_defaults(pretrain.parser().parse_args(list(argv)))


def run_script(script: str, *args, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python script args...` from the repository root; with check, it must succeed (else its output's tail)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def saved_weights(save_dir: Path) -> dict[str, torch.Tensor]:
    """The model weights of the checkpoint that `save_dir`'s `latest` names, by parameter name."""
    from safetensors.torch import load_file

    latest = save_dir / (save_dir / "latest").read_text().strip()
    state = {}
    for shard in sorted((latest / "model").glob("*.safetensors")):
        state.update(load_file(shard))
    assert state, f"no weights in {latest}"
    return state


def assert_export_gives_suite_logits(checkpoint: Path, out: Path, seq_len: int) -> Path:
    """export_hf.py `checkpoint` to `out` in float32; transformers' LlamaForCausalLM loaded from it gives the logits
    of the suite's model built from the checkpoint's own weights. Returns `out`."""
    import transformers

    from model.config import LlamaConfig
    from model.hf_io import load_hf_state_dict
    from model.llama import LlamaForCausalLM
    from training.checkpoint import model_folder

    run_script("export_hf.py", checkpoint, out, "--dtype", "float32")
    theirs = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    folder = model_folder(checkpoint)
    config = LlamaConfig.from_name(str(folder))
    ours = LlamaForCausalLM(config).eval()
    ours.load_state_dict(load_hf_state_dict(folder))
    ids = torch.randint(0, config.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)
    return out
