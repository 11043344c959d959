"""Kernel backends: the resolver, the Gemini-safe wrapper, and every backend against its reference.

CPU: the resolver's presets, overrides and errors; `hookable` under a recording parameter hook (Gemini's contract);
SDPA and FlexAttention (forward) against the math reference; the flash-attn glue (varlen offsets, table layout,
loss reduction; flash-attn-4's too) against stand-ins that follow their documented semantics, since neither runs on
a CPU.
GPU (`-m gpu`): every backend against its reference, forward and backward, float32 and bfloat16.
"""
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model.kernels as kernels
from model.kernels import OP_TABLES, OPS, PRESETS, auto_preset, missing_packages, resolve_kernels
from model.kernels.attention import HALF_PRECISION_ONLY, document_ids, row_offsets, varlen_offsets
from model.kernels.hookable import hookable
from model.kernels.rotary import rotary_tables

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = {"attention": "math", "rms_norm": "torch", "add_rms_norm": "torch", "rotary": "torch",
             "qkv_rotary": "torch", "swiglu": "torch", "swiglu_packed": "torch", "loss": "torch"}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


# ---- resolver ----------------------------------------------------------------------------------------------
def test_every_preset_names_a_known_backend_for_every_op():
    for preset, names in PRESETS.items():
        assert set(names) == set(OP_TABLES), preset
        for op, name in names.items():
            assert name in OP_TABLES[op], (preset, op, name)
    assert REFERENCE == PRESETS["reference"]


def test_overrides_replace_single_ops():
    chosen = resolve_kernels("torch", {"attention": "math", "swiglu": "torch"})
    assert dict(chosen.names)["attention"] == "math"
    assert chosen.backend("attention") == "math" and chosen.backend("swiglu") == "torch"
    assert chosen.attention is OP_TABLES["attention"]["math"]
    assert chosen.rms_norm is OP_TABLES["rms_norm"]["torch"]
    assert chosen.describe() == ("torch (attention=math, rms_norm=torch, add_rms_norm=torch, rotary=torch, "
                                 "qkv_rotary=torch, swiglu=torch, swiglu_packed=torch, loss=torch)")


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown kernel preset 'fast'.*reference, torch, liger, flash_attn, auto"):
        resolve_kernels("fast")
    with pytest.raises(ValueError, match="unknown kernel op 'mlp'.*attention, rms_norm"):
        resolve_kernels("torch", {"mlp": "torch"})
    with pytest.raises(ValueError, match="unknown rotary backend 'xformers'.*torch, liger, flash_attn"):
        resolve_kernels("torch", {"rotary": "xformers"})


@pytest.fixture
def nothing_installed(monkeypatch):
    """As if neither liger-kernel, triton nor flash-attn were installed."""
    real_find_spec = importlib.util.find_spec
    absent = {"liger_kernel", "triton", "flash_attn"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real_find_spec(name, *a))


def test_missing_package_is_a_clear_error_not_a_fallback(nothing_installed):
    with pytest.raises(ValueError, match=r"rms_norm backend 'liger' needs the liger_kernel, triton packages, not "
                                         r"installed here: pip install liger-kernel; pip install triton"):
        resolve_kernels("liger")
    with pytest.raises(ValueError, match=r"attention backend 'flash_attn' needs the flash_attn package.*"
                                         r"pip install flash-attn"):
        resolve_kernels("flash_attn")
    with pytest.raises(ValueError, match=r"loss backend 'liger' needs"):
        resolve_kernels("torch", {"loss": "liger"})


def test_installed_package_that_fails_to_import_is_a_clear_error(monkeypatch):
    installed = types.SimpleNamespace(origin="site-packages/liger_kernel/__init__.py")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: installed)

    def broken(name):
        raise ImportError(f"{name}: undefined symbol (built for another torch)")

    monkeypatch.setattr(kernels.importlib, "import_module", broken)
    with pytest.raises(ValueError, match="swiglu backend 'liger': the liger_kernel package is installed but fails"):
        resolve_kernels("torch", {"swiglu": "liger"})


ALL = "every optional package"


def test_auto_without_cuda_is_the_torch_preset(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_preset() == PRESETS["torch"]
    assert dict(resolve_kernels("auto").names) == PRESETS["torch"]


@pytest.mark.parametrize("capability, absent, expected", [
    ((9, 0), (), {"attention": "flash_attn4", "rms_norm": "liger", "add_rms_norm": "triton",
                  "qkv_rotary": "triton", "swiglu_packed": "triton", "loss": "triton"}),
    ((9, 0), ("flash_attn.cute",), {"attention": "sdpa_cudnn", "rms_norm": "liger", "loss": "triton"}),
    ((9, 0), ALL, {"attention": "sdpa_cudnn", "rms_norm": "torch", "add_rms_norm": "torch",
                   "qkv_rotary": "torch", "swiglu_packed": "torch", "loss": "torch"}),
    ((8, 0), (), {"attention": "flash_attn", "rms_norm": "liger", "loss": "triton"}),
    ((8, 0), ALL, {"attention": "sdpa_flash", "rms_norm": "torch", "loss": "torch"}),
    ((7, 0), ALL, {"attention": "sdpa", "rms_norm": "torch", "loss": "torch"}),
], ids=["hopper", "hopper-without-flash-attn-4", "hopper-bare", "ampere", "ampere-bare", "volta-bare"])
def test_auto_on_gpus(monkeypatch, capability, absent, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(kernels, "missing_packages", lambda op, name: [
        package for package in OPS[op].REQUIRES.get(name, ()) if absent is ALL or package in absent])
    chosen = auto_preset()
    assert {op: chosen[op] for op in expected} == expected


def test_float32_runs_get_an_attention_with_a_float32_kernel(monkeypatch):
    """-x fp32 on a GPU: `auto` picks SDPA of PyTorch's choice; naming a bf16/fp16-only backend is a clear error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(kernels, "missing_packages", lambda op, name: [])
    assert auto_preset()["attention"] == "flash_attn4"
    assert auto_preset(float32=True)["attention"] == "sdpa"
    for name in HALF_PRECISION_ONLY:
        with pytest.raises(ValueError, match=f"attention backend '{name}' runs in bf16 or fp16 only.*-x bf16"):
            resolve_kernels("torch", {"attention": name}, float32=True)
    assert dict(resolve_kernels("torch", {"attention": "sdpa_cudnn"}).names)["attention"] == "sdpa_cudnn"


def test_a_namespace_package_is_not_an_installed_one(tmp_path, monkeypatch):
    """flash-attn-4 alone leaves `flash_attn/cute` without `flash_attn/__init__.py`: flash-attn (2) is then
    missing, flash_attn.cute present; a dotted name under an absent package is missing, not an error."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    assert missing_packages("attention", "flash_attn") == ["flash_attn"]
    assert missing_packages("attention", "flash_attn4") == []
    assert not kernels._installed("no_such_package_here.cute")


def test_importing_the_model_loads_no_triton_or_liger():
    """Packages load when a backend that needs them is resolved, not on import (whatever torch loads itself)."""
    code = ("import sys, torch; before = set(sys.modules); import model.llama, model.kernels; "
            "loaded = [m for m in set(sys.modules) - before if m.split('.')[0] in ('triton', 'liger_kernel', "
            "'flash_attn')]; assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---- hookable: Gemini's contract, with a recording hook in place of Gemini's ----------------------------------
def test_hookable_brackets_a_custom_kernel_like_a_torch_op():
    """Under parameter hooks, the kernel's forward runs after pre_forward (chunk fetched), its backward after
    pre_backward (fetched again), and the parameter's gradient arrives after post_backward (Gemini's reduction
    hook checks exactly that). The kernel sees plain tensors, and gradients are those of the bare call."""
    from colossalai.tensor.colo_parameter import ColoParameter
    from colossalai.tensor.param_op_hook import ColoParamOpHook, ColoParamOpHookManager

    events, kernel_saw = [], []

    class Recorder(ColoParamOpHook):
        def pre_forward(self, params):
            events.append("pre_forward")

        def post_forward(self, params):
            events.append("post_forward")

        def pre_backward(self, params):
            events.append("pre_backward")

        def post_backward(self, params):
            events.append("post_backward")

    class Scale(torch.autograd.Function):  # a stand-in for a Triton kernel
        @staticmethod
        def forward(ctx, x, weight):
            kernel_saw.append((type(x), type(weight)))
            events.append("kernel_forward")
            ctx.save_for_backward(x, weight)
            return x * weight

        @staticmethod
        def backward(ctx, grad):
            x, weight = ctx.saved_tensors
            events.append("kernel_backward")
            return grad * weight, (grad * x).sum(0)

    scale = hookable(Scale.apply)
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(4))
    expected = Scale.apply(x, weight)
    expected.sum().backward()
    expected_grads = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    events.clear()

    weight.__class__ = ColoParameter  # what GeminiDDP does to every parameter
    weight.register_hook(lambda grad: events.append("weight_grad"))
    with ColoParamOpHookManager.use_hooks(Recorder()):
        # The trap: called bare, the kernel runs before any fetch, and its weight gradient arrives without the
        # backward bracket that Gemini's reduction hook checks for.
        Scale.apply(x, weight).sum().backward()
        assert events[0] == "kernel_forward" and "pre_backward" not in events and "post_backward" not in events
        events.clear()
        x.grad = weight.grad = None
        out = scale(x, weight)
        out.sum().backward()
    assert events == ["pre_forward", "kernel_forward", "post_forward",
                      "pre_backward", "kernel_backward", "post_backward", "weight_grad"]
    assert kernel_saw[-1] == (torch.Tensor, torch.Tensor)
    torch.testing.assert_close(out, expected, check_dtype=True, rtol=0, atol=0)
    torch.testing.assert_close((x.grad, weight.grad), expected_grads, rtol=0, atol=0)


def test_hookable_calls_the_kernel_directly_without_subclasses():
    seen = []
    kernel = hookable(lambda x, eps: seen.append((type(x), eps)) or x * 2)
    x = torch.ones(2)
    assert torch.equal(kernel(x, 0.5), x * 2)
    assert seen == [(torch.Tensor, 0.5)]


# ---- attention and the model on the CPU ----------------------------------------------------------------------
def packed_doc_ids(batch: int, seq: int, starts_per_row, device="cpu") -> torch.Tensor:
    """(B, T) document ids from the start positions of each row's documents (each row starts one at 0)."""
    positions = torch.zeros(batch, seq, dtype=torch.long)
    for row, starts in enumerate(starts_per_row):
        bounds = [0, *starts, seq]
        positions[row] = torch.cat([torch.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])
    return document_ids(positions).to(device)


DOCS = [[37, 100, 190], [128, 129, 200]]  # several packed documents per row, one a single token


def attention_inputs(batch=2, seq=256, heads=8, kv_heads=2, head_dim=64, dtype=torch.float32, device="cpu"):
    generator = torch.Generator().manual_seed(0)
    make = lambda h: torch.randn(batch, seq, h, head_dim, generator=generator).to(device, dtype)  # noqa: E731
    return make(heads), make(kv_heads), make(kv_heads)


def test_varlen_offsets_cover_documents_and_rows():
    doc_ids = packed_doc_ids(2, 8, [[3], []])
    cu_seqlens, longest = varlen_offsets(doc_ids)
    assert cu_seqlens.dtype == torch.int32
    assert cu_seqlens.tolist() == [0, 3, 8, 16] and longest == 8
    # Rows whose documents carry the same id still split at the row boundary.
    cu_seqlens, longest = varlen_offsets(torch.zeros(3, 4, dtype=torch.long))
    assert cu_seqlens.tolist() == [0, 4, 8, 12] and longest == 4
    cu_seqlens, longest = row_offsets(3, 4, "cpu")  # the same, from the shape alone
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 4, 8, 12] and longest == 4


@pytest.mark.parametrize("layout", ["causal", "document"])
def test_sdpa_matches_math_forward_and_backward(layout):
    q, k, v = attention_inputs(seq=64)
    doc_ids = packed_doc_ids(2, 64, [[10, 33], [40]]) if layout == "document" else None
    expected = run_op(OP_TABLES["attention"]["math"], attention_case(q, k, v, doc_ids))
    actual = run_op(OP_TABLES["attention"]["sdpa"], attention_case(q, k, v, doc_ids))
    for a, e in zip(actual, expected):
        assert relative_error(a, e) < 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("layout", ["causal", "document"])
def test_flex_forward_matches_math_on_cpu(layout):
    q, k, v = attention_inputs(seq=64, head_dim=16)
    doc_ids = packed_doc_ids(2, 64, [[10, 33], [40]]) if layout == "document" else None
    with torch.no_grad():  # PyTorch has no CPU backward for FlexAttention
        actual = OP_TABLES["attention"]["flex"](q, k, v, doc_ids)
        expected = OP_TABLES["attention"]["math"](q, k, v, doc_ids)
    assert relative_error(actual, expected) < 1e-5


def test_model_builds_under_lazy_init_and_runs():
    """Gemini builds 7B and larger under LazyInitContext; the model has no buffers for it to trip over."""
    import dataclasses

    from colossalai.lazy import LazyInitContext

    from model.config import CONFIGS
    from model.llama import LlamaForCausalLM

    config = dataclasses.replace(CONFIGS["tiny"], num_hidden_layers=2, vocab_size=300)
    with LazyInitContext():
        model = LlamaForCausalLM(config, resolve_kernels("reference"))
    LazyInitContext.materialize(model)
    assert list(model.buffers()) == []
    ids = torch.randint(0, 300, (2, 16))
    loss = model(ids, labels=ids)
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None


# ---- the flash-attn glue, against stand-ins with flash-attn's documented semantics ----------------------------
@pytest.fixture
def fake_flash_attn(monkeypatch):
    """flash_attn modules whose functions compute, in plain PyTorch, what flash-attn's docstrings specify."""
    from model.kernels.attention import attention_math

    def flash_attn_func(q, k, v, causal=False):
        assert causal and q.dim() == 4
        return attention_math(q, k, v)

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False):
        assert causal and q.dim() == 3 and cu_seqlens_q.dtype == torch.int32
        bounds = cu_seqlens_q.tolist()
        assert bounds[-1] == q.shape[0] and max_seqlen_q == max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
        return torch.cat([attention_math(q[None, a:b], k[None, a:b], v[None, a:b])[0]
                          for a, b in zip(bounds[:-1], bounds[1:])])

    def fa4_func(q, k, v, qv=None, causal=False):  # flash-attn-4 returns (out, log-sum-exp or None)
        return flash_attn_func(q, k, v, causal=causal), None

    def fa4_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                        causal=False):
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal), None

    def apply_rotary_emb(x, cos, sin):
        batch, seq, heads, head_dim = x.shape  # cos, sin: (seqlen_rotary >= seq, head_dim / 2), x's dtype
        assert cos.shape[0] >= seq and cos.shape[1] == head_dim // 2 and cos.dtype == x.dtype
        cos, sin = (torch.cat([t[:seq], t[:seq]], dim=-1)[None, :, None, :].float() for t in (cos, sin))
        x1, x2 = x.float().chunk(2, dim=-1)
        return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)

    def cross_entropy_loss(logits, labels, ignore_index=-100):
        losses = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
        return losses, torch.zeros_like(losses)

    def rms_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False):
        assert bias is None
        if residual is not None:
            x = x + residual
        x32 = x.float()
        out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
        return (out, x) if prenorm else out

    modules = {
        "flash_attn": dict(flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func),
        "flash_attn.layers": {}, "flash_attn.layers.rotary": dict(apply_rotary_emb=apply_rotary_emb),
        "flash_attn.ops": {}, "flash_attn.ops.triton": {},
        "flash_attn.ops.triton.cross_entropy": dict(cross_entropy_loss=cross_entropy_loss),
        "flash_attn.ops.triton.layer_norm": dict(rms_norm_fn=rms_norm_fn),
        "flash_attn.ops.activations": dict(swiglu=lambda x, y: F.silu(x) * y),
        "flash_attn.cute": dict(flash_attn_func=fa4_func, flash_attn_varlen_func=fa4_varlen_func),
    }
    for name, attributes in modules.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attributes))


FLASH_ATTN_CASES = [("attention", "flash_attn"), ("attention", "flash_attn_varlen"), ("attention", "flash_attn4"),
                    ("rms_norm", "flash_attn"), ("add_rms_norm", "flash_attn"), ("rotary", "flash_attn"),
                    ("qkv_rotary", "flash_attn"), ("swiglu", "flash_attn"), ("swiglu_packed", "flash_attn"),
                    ("loss", "flash_attn")]


@pytest.mark.parametrize("op, backend", FLASH_ATTN_CASES, ids=[f"{op}-{b}" for op, b in FLASH_ATTN_CASES])
def test_flash_attn_glue_against_documented_semantics(fake_flash_attn, op, backend):
    for case in op_cases(op, torch.float32, "cpu", small=True):
        expected = run_op(OP_TABLES[op][REFERENCE[op]], case)
        actual = run_op(OP_TABLES[op][backend], case)
        for a, e in zip(actual, expected):
            assert relative_error(a, e) < 1e-5, case["name"]


# ---- flash-attn-4's compiler and the command line ---------------------------------------------------------------
def cutlass_dsl_stand_in(monkeypatch):
    """cutlass.base_dsl.dsl with the `-diagnostic` parser of nvidia-cutlass-dsl 4.8.1 (built once, cached)."""
    import argparse
    import functools

    @functools.lru_cache(maxsize=1)
    def _get_diagnostic_arg_parser():
        parser = argparse.ArgumentParser(description="Process diagnostic status.")
        parser.add_argument("-diagnostic", nargs="?", const="all",
                            choices=["all", "fail", "success", "info", "suggestion"])
        return parser

    dsl = types.SimpleNamespace(_get_diagnostic_arg_parser=_get_diagnostic_arg_parser)
    for name, module in {"cutlass": types.SimpleNamespace(), "cutlass.base_dsl": types.SimpleNamespace(dsl=dsl),
                         "cutlass.base_dsl.dsl": dsl}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return dsl


def test_cutlass_reads_only_its_own_flag_from_our_command_line(monkeypatch, capsys):
    from model.kernels import attention

    dsl = cutlass_dsl_stand_in(monkeypatch)
    monkeypatch.setattr(attention, "_cutlass_argv_guarded", False)
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "-d", "/data/corpus", "-b", "8"])
    with pytest.raises(SystemExit):  # the bug: argparse takes `-d` for `-diagnostic`
        dsl._get_diagnostic_arg_parser().parse_known_args()
    assert "argument -diagnostic: invalid choice: '/data/corpus'" in capsys.readouterr().err
    attention.guard_cutlass_against_our_flags()
    assert attention._cutlass_argv_guarded
    assert dsl._get_diagnostic_arg_parser().parse_known_args()[0].diagnostic is None
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "-d", "/data/corpus", "-diagnostic", "info", "-dx"])
    assert dsl._get_diagnostic_arg_parser().parse_known_args()[0].diagnostic == "info"
    assert attention.diagnostic_tokens(["-diagnostic", "-b", "8", "-diagnostic=fail"]) == ["-diagnostic",
                                                                                        "-diagnostic=fail"]


@pytest.mark.gpu
def test_flash_attn4_compiles_under_pretrain_flags(monkeypatch):
    """A shape no other test compiles (head dim 96), forward and backward, with pretrain.py's `-d` on the command
    line: without the guard CuTe DSL exits at compile time."""
    if missing_packages("attention", "flash_attn4"):
        pytest.skip("needs flash-attn-4")
    monkeypatch.setattr(sys, "argv", ["pretrain.py", "-d", "/data/corpus", "-b", "8"])
    q, k, v = attention_inputs(seq=128, heads=4, kv_heads=4, head_dim=96, dtype=torch.bfloat16, device="cuda")
    case = attention_case(q, k, v, None)
    for a, e in zip(run_op(OP_TABLES["attention"]["flash_attn4"], case), run_op(OP_TABLES["attention"]["math"], case)):
        assert relative_error(a, e) < 1e-2


# ---- cases shared by the CPU and GPU parity tests --------------------------------------------------------------
def attention_case(q, k, v, doc_ids, name=""):
    return {"name": name, "args": [q, k, v, doc_ids], "grad": [0, 1, 2]}


def op_cases(op: str, dtype: torch.dtype, device: str, small: bool = False) -> list[dict]:
    """Inputs for one op: `args` for the backend, `grad` the indices of the arguments to differentiate."""
    generator = torch.Generator().manual_seed(1)
    randn = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    batch, seq, hidden = (2, 64, 64) if small else (2, 256, 512)
    if op == "attention":
        q, k, v = attention_inputs(seq=seq, dtype=dtype, device=device)
        doc_ids = packed_doc_ids(batch, seq, [[10, 33], [40]] if small else DOCS, device)
        return [attention_case(q, k, v, None, "causal"), attention_case(q, k, v, doc_ids, "document")]
    if op == "rms_norm":
        weight = 1 + 0.1 * randn(hidden)
        return [{"name": "rms_norm", "args": [randn(batch, seq, hidden), weight, 1e-5], "grad": [0, 1]}]
    if op == "add_rms_norm":
        weight = 1 + 0.1 * randn(hidden)
        return [{"name": "add_rms_norm", "args": [randn(batch, seq, hidden), randn(batch, seq, hidden), weight, 1e-5],
                 "grad": [0, 1, 2]}]
    if op == "rotary":
        doc_ids = packed_doc_ids(batch, seq, [[10, 33], [40]] if small else DOCS)
        positions = torch.arange(seq).expand(batch, seq) - _document_starts(doc_ids)
        cos, sin = rotary_tables(positions.to(device), 64, 10000.0)
        return [{"name": "rotary", "args": [randn(batch, seq, 8, 64), randn(batch, seq, 2, 64), cos, sin],
                 "grad": [0, 1]}]
    if op == "qkv_rotary":  # 8 query heads, 2 key/value heads of 64
        doc_ids = packed_doc_ids(batch, seq, [[10, 33], [40]] if small else DOCS)
        positions = torch.arange(seq).expand(batch, seq) - _document_starts(doc_ids)
        cos, sin = rotary_tables(positions.to(device), 64, 10000.0)
        return [{"name": "qkv_rotary", "args": [randn(batch, seq, 12 * 64), cos, sin, 8, 2], "grad": [0]}]
    if op == "swiglu":
        return [{"name": "swiglu", "args": [randn(batch, seq, 2 * hidden), randn(batch, seq, 2 * hidden)],
                 "grad": [0, 1]}]
    if op == "swiglu_packed":
        return [{"name": "swiglu_packed", "args": [randn(batch, seq, 4 * hidden)], "grad": [0]}]
    if op == "loss":
        vocab = 300 if small else 1000  # not a power of two
        labels = torch.randint(0, vocab, (batch * seq,), generator=generator)
        labels[::7] = -100
        return [{"name": "loss", "args": [randn(batch * seq, hidden), 0.05 * randn(vocab, hidden), labels.to(device)],
                 "grad": [0, 1]}]
    raise ValueError(op)


def _document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) index of the first token of each token's document."""
    seq = doc_ids.shape[1]
    index = torch.arange(seq).expand_as(doc_ids)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return torch.cummax(torch.where(starts, index, 0), dim=1).values


def run_op(fn, case: dict, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Outputs and gradients (of the `grad` arguments) as float32, from fresh copies of the inputs (some kernels
    write into their inputs). With `dtype`, floating inputs other than rotary tables are cast to it first."""
    args = []
    for i, arg in enumerate(case["args"]):
        if isinstance(arg, torch.Tensor) and arg.is_floating_point():
            arg = arg.detach().clone()
            if dtype is not None and i in case["grad"]:
                arg = arg.to(dtype)
            arg.requires_grad_(i in case["grad"])
        args.append(arg)
    outputs = fn(*args)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator().manual_seed(2)
    upstream = [torch.randn(o.shape, generator=generator).to(o.device) if o.dim() else torch.tensor(0.5, device=o.device)
                for o in outputs]
    sum((o.float() * g).sum() for o, g in zip(outputs, upstream)).backward()
    grads = [args[i].grad.float() for i in case["grad"]]
    return [o.detach().float() for o in outputs] + grads


# ---- GPU parity: every backend, forward and backward, float32 and bfloat16 -----------------------------------
NO_FLOAT32 = {("attention", name) for name in HALF_PRECISION_ONLY}
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
GPU_CASES = [(op, name) for op, table in OP_TABLES.items() for name in table if name != REFERENCE[op]]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op, backend", GPU_CASES, ids=[f"{op}-{b}" for op, b in GPU_CASES])
def test_backend_matches_reference_on_gpu(op, backend, dtype):
    missing = missing_packages(op, backend)
    if missing:
        pytest.skip(f"{op} backend '{backend}' needs {', '.join(missing)}, not installed")
    if dtype == torch.float32 and (op, backend) in NO_FLOAT32:
        pytest.skip(f"{backend} has no float32 kernel")
    failures = []
    for case in op_cases(op, dtype, "cuda"):
        exact = run_op(OP_TABLES[op][REFERENCE[op]], case, torch.float32)  # the reference on the same values
        reference = run_op(OP_TABLES[op][REFERENCE[op]], case)  # the reference in `dtype`
        actual = run_op(OP_TABLES[op][backend], case)
        labels = ["out"] * (len(actual) - len(case["grad"])) + [f"grad{i}" for i in case["grad"]]
        for label, a, r, e in zip(labels, actual, reference, exact):
            # Within the dtype's tolerance, or no worse than twice the reference's own error in that dtype.
            error, allowed = relative_error(a, e), max(TOLERANCE[dtype], 2 * relative_error(r, e))
            if not error <= allowed:
                failures.append(f"{case['name']} {label}: relative error {error:.2e} > {allowed:.2e}")
    assert not failures, "; ".join(failures)


def test_fused_losses_cut_rows_into_power_of_two_chunks_within_the_logits_budget():
    """loss.fused_chunk_rows, Liger's rule, which the triton loss and the memory planner share: a 1b
    micro-batch of 16 x 2048 is one chunk; a vocabulary over LIGER_CHUNK_MEM_CONST x hidden splits it."""
    from model.kernels.loss import LIGER_CHUNK_MEM_CONST, fused_chunk_rows

    assert LIGER_CHUNK_MEM_CONST == 16
    assert fused_chunk_rows(16 * 2048, 2048, 32000) == 16 * 2048
    assert fused_chunk_rows(32768, 2048, 65536) == 16384  # two chunks
    assert fused_chunk_rows(1000, 64, 5000) == 256  # five chunks of 200 rows, rounded up to a power of two
    assert fused_chunk_rows(3, 64, 10**6) == 1


# ---- the triton loss: chunks, long rows, autocast, and no waiting for the GPU ----------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("budget, max_block, autocast", [(1, 32768, False), (16, 256, False), (1, 256, True)],
                         ids=["two-chunks", "four-blocks-per-row", "autocast-two-chunks"])
def test_triton_loss_paths_match_reference(monkeypatch, budget, max_block, autocast):
    """The parity test above runs one chunk of rows whose vocabulary fits one block. Here: rows in two chunks (the
    weight gradient summed inside the second chunk's GEMM), rows longer than one block (the online logsumexp), and
    float32 weights under bfloat16 autocast, as plain DDP trains (chunks summed in float32)."""
    if missing_packages("loss", "triton"):
        pytest.skip("needs triton")
    from model.kernels import loss, triton_cross_entropy

    monkeypatch.setattr(loss, "LIGER_CHUNK_MEM_CONST", budget)
    monkeypatch.setattr(triton_cross_entropy, "MAX_BLOCK", max_block)
    dtype = torch.float32 if autocast else torch.bfloat16
    case = op_cases("loss", dtype, "cuda")[0]  # 512 rows of 512, a vocabulary of 1000
    assert loss.fused_chunk_rows(512, 512, 1000) == (256 if budget == 1 else 512)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        exact = run_op(OP_TABLES["loss"]["torch"], case, torch.float32)
        reference = run_op(OP_TABLES["loss"]["torch"], case)
        actual = run_op(OP_TABLES["loss"]["triton"], case)
    for label, a, r, e in zip(["loss", "grad hidden", "grad weight"], actual, reference, exact):
        error, allowed = relative_error(a, e), max(1e-2, 2 * relative_error(r, e))
        assert error <= allowed, f"{label}: relative error {error:.2e} > {allowed:.2e}"


def _forward_backward_under_sync_errors(loss_fn, case) -> None:
    hidden, weight, labels = (a.detach().clone().requires_grad_(i < 2) if i < 2 else a
                              for i, a in enumerate(case["args"]))
    loss_fn(hidden, weight, labels).backward()  # compile and autotune outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        (loss_fn(hidden, weight, labels) * 0.5).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_triton_loss_never_waits_for_the_gpu():
    """A wait for the GPU inside a micro-batch empties its queue, and the GPU idles while the host catches up. The
    triton loss runs forward and backward without one; Liger's, where installed, shows that this test catches one
    (its forward's .item(), its backward's torch.equal)."""
    if missing_packages("loss", "triton"):
        pytest.skip("needs triton")
    case = op_cases("loss", torch.bfloat16, "cuda")[0]
    _forward_backward_under_sync_errors(OP_TABLES["loss"]["triton"], case)
    if not missing_packages("loss", "liger"):
        with pytest.raises(RuntimeError, match="synchroniz"):
            _forward_backward_under_sync_errors(OP_TABLES["loss"]["liger"], case)


# ---- the triton add + RMSNorm under gradient accumulation -----------------------------------------------------
def _norm_weight_grads(weight_dtype: torch.dtype, in_place: bool) -> tuple[torch.Tensor, int]:
    """The triton add + RMSNorm's weight gradient summed over three backwards, the last two under
    weight_grads_summed_in_place when `in_place`; and how many gradients autograd was handed for the weight."""
    from model.kernels.in_place_grads import weight_grads_summed_in_place

    generator = torch.Generator().manual_seed(3)
    weight = torch.nn.Parameter((1 + 0.1 * torch.randn(512, generator=generator)).to("cuda", weight_dtype))
    handed = []
    weight.register_hook(lambda grad: handed.append(grad is not None))
    for micro_batch in range(3):
        x, residual, upstream = (torch.randn(2, 64, 512, generator=generator).to("cuda", torch.bfloat16)
                                 for _ in range(3))
        out, total = OP_TABLES["add_rms_norm"]["triton"](x.requires_grad_(), residual, weight, 1e-5)
        with weight_grads_summed_in_place(in_place and micro_batch > 0):
            ((out.float() * upstream.float()).sum() + total.float().sum()).backward()
    return weight.grad.float(), sum(handed)


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_triton_norm_sums_its_weight_grads_in_place_like_autograd(weight_dtype):
    """Under in-place sums (the training loop's deferred micro-batches), the norm adds its weight gradient into the
    existing .grad inside its second kernel, as the projections do in their GEMMs, and hands autograd nothing; the
    sum is autograd's, to the weight dtype's rounding (autograd rounds each micro-batch's gradient once more)."""
    if missing_packages("add_rms_norm", "triton"):
        pytest.skip("needs triton")
    by_autograd, handed_by_autograd = _norm_weight_grads(weight_dtype, in_place=False)
    in_place, handed_in_place = _norm_weight_grads(weight_dtype, in_place=True)
    assert (handed_by_autograd, handed_in_place) == (3, 1)  # in place: only the first, which found no .grad
    assert relative_error(in_place, by_autograd) < (1e-2 if weight_dtype == torch.bfloat16 else 1e-5)
