"""The training step and loop shared by pretrain.py, finetune.py and benchmark.py.

`Trainer` builds the model under the plugin's init context, boosts it with the optimizer and LR schedule,
resumes if asked, and runs optimizer steps over a loader of batches (dicts of CPU tensors: input_ids, labels
already shifted, position_ids). The loader must offer state_dict()/load_state_dict() for exact resume.
With a validation reader (corpus.loader.HeldOutReader, corpus.sft.SFTHeldOut), it validates every
--eval_interval steps and before every checkpoint (training/evaluate.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm import tqdm

from model.config import LlamaConfig
from model.kernels import resolve_kernels
from model.kernels.in_place_grads import weight_grads_summed_in_place
from model.kernels.loss import IGNORE_INDEX
from model.llama import LlamaForCausalLM

from . import gpu_clock, metrics
from .checkpoint import CheckpointManager, PreemptionFlag
from .plugins import (build_optimizer, build_plugin, builds_lazily, clips_inside_optimizer, data_parallel_rank,
                      defers_grad_sync, model_init_context, place_weights_for_plugin)
from .profiling import FORWARD_BACKWARD, OPTIMIZER_STEP


@dataclass
class RunState:
    """What a resumed run needs beyond the model and optimizer: saved as JSON in every checkpoint."""

    step: int = 0
    tokens_seen: int = 0
    bad_steps_in_row: int = 0
    data: dict | None = None
    val_loss: float | None = None  # measured at this step (None when not): what `best` compares


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    finite: bool


def init_distributed(seed: int) -> tuple[int, int]:
    """Join the process group (NCCL with GPUs, gloo without). A plain `python script.py` runs as one rank."""
    import colossalai

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    colossalai.launch_from_torch(backend=backend, seed=seed, verbose=False)
    return dist.get_rank(), dist.get_world_size()


def grad_accum_steps(args: argparse.Namespace, seq_len: int, dp_size: int) -> int:
    """Micro-batches per optimizer step, derived from --global_batch_tokens (never set by hand)."""
    tokens_per_micro_step = args.batch_size * seq_len * dp_size
    if args.global_batch_tokens is None:
        return 1
    if args.global_batch_tokens % tokens_per_micro_step:
        raise SystemExit(
            f"error: --global_batch_tokens {args.global_batch_tokens} is not a multiple of batch x length x GPUs "
            f"= {args.batch_size} x {seq_len} x {dp_size} = {tokens_per_micro_step}"
        )
    return args.global_batch_tokens // tokens_per_micro_step


def cosine_schedule(warmup_steps: int, total_steps: int, min_ratio: float):
    """Linear warm-up to the peak, then cosine decay to min_ratio of the peak at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Trainer:
    def __init__(self, args: argparse.Namespace, config: LlamaConfig, loader, *, rank: int, world_size: int,
                 total_steps: int, initial_weights: str | None = None, run_config: dict | None = None,
                 validation=None, model_builder=None):
        self.args, self.config, self.loader = args, config, loader
        # (args, config, kernels) -> module with the suite model's forward; benchmark.py --baseline swaps it
        self.model_builder = model_builder or build_model
        self.validation = validation
        self.eval_interval = args.eval_interval if validation is not None else 0
        self.validations: list[tuple[int, float]] = []  # (step, validation loss) of this launch
        self._logger, self._val_postfix = None, {}
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0
        self.total_steps = total_steps
        self.seq_len = args.max_length
        # hybrid_parallel: the tensor and pipeline ranks of one model replica share its batches
        self.data_ranks = data_parallel_rank(args, rank, world_size)[1]
        self.accum = grad_accum_steps(args, self.seq_len, self.data_ranks)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.state = RunState()
        self.run_config = run_config or {}
        self.checkpoints = CheckpointManager(args.save_dir, args.keep_last, rank)
        self.preempted = PreemptionFlag()
        self.step_hooks: list = []  # called with no arguments after every optimizer step (e.g. a profiler's step)
        self._build(initial_weights)
        if validation is not None and self.pipelined:
            raise SystemExit("error: --eval_interval: validation runs a plain forward, which a pipeline (--pp > 1) "
                             "does not have yet; validate with eval.py on a checkpoint under another plugin")

    # ---- building ------------------------------------------------------------------------------
    def _build(self, initial_weights: str | None) -> None:
        from colossalai.booster import Booster

        args = self.args
        kernels = kernels_for_run(args)
        self.print(f"model {self.config.name}: {self.config.num_params() / 1e6:,.1f}M parameters; "
                   f"kernels: {kernels.describe()}; plugin {args.plugin}, {args.mixed_precision}, "
                   f"{self.world_size} process(es), micro batch {args.batch_size} x {self.seq_len}, "
                   f"gradient accumulation {self.accum}")
        self.kernels = kernels  # the backends resolved, for the run's records (benchmark.py's JSON line)
        model = self.model_builder(args, self.config, kernels)
        if initial_weights is not None:
            load_weights(None, model, initial_weights, args.plugin, boosted=False)
        place_weights_for_plugin(model, args.plugin, args.mixed_precision)
        optimizer = build_optimizer(model, args)
        warmup = args.warmup_steps if args.warmup_steps is not None else max(10, self.total_steps // 100)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, cosine_schedule(min(warmup, self.total_steps), self.total_steps, args.min_lr_ratio))
        self.booster = Booster(plugin=build_plugin(args, self.accum))
        from model.policy import ShardingError

        try:
            self.model, self.optimizer, _, _, self.scheduler = self.booster.boost(model, optimizer,
                                                                                  lr_scheduler=scheduler)
        except ShardingError as error:  # hybrid_parallel: a layout model/policy.py cannot shard this model into
            raise SystemExit(f"error: -p {args.plugin} with -c {args.config}: {error}") from None
        hybrid = args.plugin == "hybrid_parallel"
        self.dp_group = self.booster.plugin.dp_group if hybrid else None  # None: all ranks
        self.pipelined = hybrid and args.pp > 1
        # no_sync on all micro-batches of a step but the last, where the plugin allows it
        self.defers_grad_sync = defers_grad_sync(args.plugin, self.booster.plugin)
        if hybrid and args.tp > 1:  # model/policy.py replaced the loss kernel: the head's vocabulary is split
            self.print(f"tensor parallel {args.tp}: kernels {self.model.unwrap().kernels.describe()}")
        if initial_weights is not None:
            load_weights(self.booster, self.model, initial_weights, args.plugin, boosted=True)
        self.autocast = _autocast(args, self.device)
        unwrapped = self.model.unwrap()
        if getattr(args, "cuda_graphs", False) and hasattr(unwrapped, "use_cuda_graphs"):  # not --baseline hf's
            unwrapped.use_cuda_graphs()

    def resume(self, load: str) -> None:
        path = self.checkpoints.resolve(load)
        if path is None:
            self.print(f"-f {load}: no checkpoint in {self.checkpoints.save_dir} yet; starting from scratch")
            return
        saved, masters_not_restored = self.checkpoints.load(path, self.booster, self.model, self.optimizer,
                                                            self.scheduler)
        if masters_not_restored:
            self.print(f"note: the optimizer's float32 master weights start from the checkpoint's rounded weights, so "
                       f"the run continues close to, not exactly as, the saved one: {masters_not_restored}")
        self.state = RunState(**saved)
        if self.state.data is not None:
            self.loader.load_state_dict(self.state.data)
        self.print(f"resumed from {path} at step {self.state.step} ({self.state.tokens_seen:,} tokens seen)")

    # ---- one optimizer step --------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """One optimizer step over this rank's micro-batches.

        The loss is the mean over every labelled token of the step on all ranks, not a mean of per-rank means:
        ranks (and finetuning rows) hold different numbers of labels, and each must weigh by its tokens. The
        plugins average gradients over the data-parallel ranks, hence the factor data_ranks.
        """
        self.model.train()
        with record_function(FORWARD_BACKWARD):
            # counted on the host (the loader's tensors are CPU tensors): no wait for the GPU here
            labelled = [int((batch["labels"] != IGNORE_INDEX).sum()) for batch in micro_batches]
            step_labelled = self._labelled_over_ranks(sum(labelled))
            if self.pipelined:
                total = self._pipeline_forward_backward(micro_batches, self.data_ranks / step_labelled)
            else:
                total = torch.zeros((), device=self.device)
                for i, batch in enumerate(micro_batches):
                    batch = {k: self._to_device(v) for k, v in batch.items()}
                    sync = i == len(micro_batches) - 1
                    total += self._micro_batch(batch, labelled[i], self.data_ranks / step_labelled, sync)
            # the step's one wait for the GPU: the loss decides whether the optimizer may step
            loss_value = float(self._sum_over_ranks(total) / step_labelled)
        if not math.isfinite(loss_value):
            self.optimizer.zero_grad()
            return StepResult(loss_value, None, finite=False)
        with record_function(OPTIMIZER_STEP):
            grad_norm = self._clip_and_norm()
            self.optimizer.step()
            self.optimizer.zero_grad()
        return StepResult(loss_value, grad_norm, finite=True)

    def _micro_batch(self, batch: dict, labelled: int, scale: float, sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its summed token loss. Both run inside no_sync: torch
        DDP decides in the forward whether the backward reduces, but LowLevelZero's gradient hooks and backward()
        read the flag during the backward, so a backward outside the context reduces every micro-batch. Under
        no_sync nothing waits for the gradients, so the linear layers may sum theirs inside their GEMMs
        (model/kernels/concat_linear.py)."""
        deferred = not sync and self.defers_grad_sync  # this micro-batch's gradients wait for the step's last
        with self.booster.no_sync(self.model, self.optimizer) if deferred else nullcontext():
            with self.autocast:
                loss_sum = self.model(**batch) * labelled
            with weight_grads_summed_in_place(deferred):
                self.booster.backward(loss_sum * scale, self.optimizer)
        return loss_sum.detach()

    def _labelled_over_ranks(self, local: int) -> float | torch.Tensor:
        """The step's labelled tokens over the data-parallel ranks: a number with one rank, else a tensor on the
        device, summed there without waiting for it, so the host can go on launching the forward."""
        if self.data_ranks == 1:
            return float(local)
        return self._sum_over_ranks(torch.full((), float(local), device=self.device))

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy a batch tensor to the device without making the host wait: a copy from pageable memory first waits
        for all the GPU's queued work (the previous optimizer step), one from pinned memory does not."""
        if self.device.type != "cuda" or tensor.device.type != "cpu":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def _pipeline_forward_backward(self, micro_batches: list[dict], scale: float) -> torch.Tensor:
        """Forward and backward of the step's rows through the pipeline (hybrid_parallel, --pp > 1): one batch,
        which colossalai's schedule splits into --microbatch_size micro-batches. Returns the summed token losses,
        on every rank (only the last stage computes them).

        The schedule divides each micro-batch's criterion by their number; the criterion weighs each micro-batch's
        mean loss by its labelled tokens, as train_step weighs the loader's batches.
        """
        batch = {k: self._to_device(torch.cat([b[k] for b in micro_batches])) for k in micro_batches[0]}
        num_micro_batches = batch["labels"].shape[0] // self.args.microbatch_size
        total = torch.zeros((), device=self.device)

        def token_weighted(loss, micro_batch):
            tokens = (micro_batch["labels"] != IGNORE_INDEX).sum()
            total.add_(loss.detach() * tokens)
            return loss * tokens * (scale * num_micro_batches)

        self.booster.execute_pipeline(iter([batch]), self.model, token_weighted, self.optimizer, return_loss=False)
        dist.all_reduce(total, group=self.booster.plugin.pp_group)  # from the last stage to all (zero elsewhere)
        return total

    def _clip_and_norm(self) -> float | None:
        if clips_inside_optimizer(self.args.plugin):
            return None  # reported after the step by the optimizer itself
        max_norm = self.args.grad_clip if self.args.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))

    def _sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks: all of them, but for hybrid_parallel's model-parallel ranks, which
        hold copies of their replica's values."""
        if self.data_ranks > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=self.dp_group)
        return value

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self, save_at_end: bool = True, save_on_preemption: bool = True) -> list[float]:
        """Run until total_steps, preemption or --stop_after; returns the losses of the steps run here.

        save_on_preemption=False (benchmark.py): a SIGTERM or SIGUSR1 stops the loop without a checkpoint; a
        measurement on synthetic tokens has nothing worth the minutes and gigabytes of a save."""
        args = self.args
        throughput = metrics.Throughput(self.config.flops_per_token(self.seq_len), self.world_size,
                                        warmup_steps=min(2, max(0, self.total_steps - self.state.step - 1)),
                                        clock=gpu_clock.for_current_gpu())
        logger = self._logger = metrics.Logger(args.tensorboard_dir, self.is_main)
        self._val_postfix = {}
        tokens_per_step = args.batch_size * self.seq_len * self.data_ranks * self.accum
        batches = iter(self.loader)
        losses = []
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.is_main, desc="train",
                   dynamic_ncols=True)
        try:
            while self.state.step < self.total_steps:
                result = self.train_step([next(batches) for _ in range(self.accum)])
                self.state.step += 1
                self.state.val_loss = None
                self.state.tokens_seen += tokens_per_step
                throughput.step_done(tokens_per_step)
                for hook in self.step_hooks:
                    hook()
                losses.append(result.loss)
                self.scheduler.step()  # the schedule follows the data: a skipped step still consumed its batches
                if not self._check_finite(result):
                    self.save()
                    raise SystemExit(f"error: {self.state.bad_steps_in_row} non-finite losses in a row at step "
                                     f"{self.state.step}; saved a checkpoint and stopped")
                if self.state.step % args.log_interval == 0 or self.state.step == self.total_steps:
                    values = self._log_values(result, throughput)
                    logger.scalars(values, self.state.step)
                    bar.set_postfix({**metrics.postfix(values), **self._val_postfix}, refresh=False)
                bar.update(1)
                if self.eval_interval and self.state.step % self.eval_interval == 0:
                    self.validate()
                if self._save_or_stop(len(losses), save_at_end, save_on_preemption):
                    break
        finally:
            bar.close()
            logger.close()
            throughput.close()
        self.summary = {**throughput.summary(), "peak_mem_gib": metrics.peak_gpu_mem_gib(),
                        "resident_mem_gib": metrics.resident_gpu_mem_gib(), "host_mem_gib": metrics.host_mem_gib()}
        return losses

    def _save_or_stop(self, steps_run: int, save_at_end: bool, save_on_preemption: bool) -> bool:
        """Save when due; True when this launch should stop (finished, preempted, or --stop_after reached)."""
        args, step = self.args, self.state.step
        finished = step >= self.total_steps
        stop = finished or bool(self.preempted) or (args.stop_after is not None and steps_run >= args.stop_after)
        if self.preempted:
            if not save_on_preemption:
                self.print(f"\n{self.preempted.signal_name}: stopping at step {step} without saving")
                return True
            self.print(f"\n{self.preempted.signal_name}: saving at step {step} and exiting")
        due = bool(args.save_interval) and step % args.save_interval == 0
        if due or (stop and (save_at_end or not finished)):
            if self.validation is not None and self.state.val_loss is None and not self.preempted:
                self.validate()  # every checkpoint records its validation loss, so that `best` can be kept
            self.save()
        return stop

    def validate(self) -> dict:
        """Validation loss and perplexity per source over all ranks: printed, logged, kept in the state."""
        from .evaluate import evaluate, scalars, summary

        result = evaluate(self.model, self.validation, device=self.device, autocast=self.autocast,
                          world_size=self.world_size)
        self.state.val_loss = result["loss"]
        self.validations.append((self.state.step, result["loss"]))
        if self._logger is not None:
            self._logger.scalars(scalars(result), self.state.step)
        self._val_postfix = {"val": f"{result['loss']:.4f}"}
        self.print(f"\nstep {self.state.step}: validation {summary(result)}")
        return result

    def _check_finite(self, result: StepResult) -> bool:
        if result.finite:
            self.state.bad_steps_in_row = 0
            return True
        self.state.bad_steps_in_row += 1
        if self.is_main:
            warnings.warn(f"step {self.state.step}: loss is {result.loss}; step skipped "
                          f"({self.state.bad_steps_in_row} in a row, stopping at {self.args.max_bad_steps})")
        return self.state.bad_steps_in_row < self.args.max_bad_steps

    def _log_values(self, result: StepResult, throughput: metrics.Throughput) -> dict:
        grad_norm = result.grad_norm
        if grad_norm is None and hasattr(self.optimizer, "get_grad_norm"):
            grad_norm = self.optimizer.get_grad_norm()
        return {"loss": result.loss, "lr": self.scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_seen": self.state.tokens_seen, "peak_mem_gib": metrics.peak_gpu_mem_gib(),
                **throughput.rate()}

    def save(self):
        self.state.data = self.loader.state_dict()
        path = self.checkpoints.save(self.booster, self.model, self.optimizer, self.scheduler,
                                     dataclasses.asdict(self.state), self.run_config, self.config)
        self.print(f"\nsaved {path}")
        return path

    def report(self, losses: list[float]) -> None:
        """One closing line: how far the loss fell and how fast the run went."""
        if not losses:
            return
        first, last, summary = losses[0], losses[-1], self.summary
        parts = [f"done: step {self.state.step}/{self.total_steps}",
                 f"loss {first:.4f} -> {last:.4f} ({(last - first) / first:+.0%})",
                 f"{self.state.tokens_seen:,} tokens seen"]
        if self.validations:
            first_val, last_val = self.validations[0][1], self.validations[-1][1]
            parts.append(f"validation loss {first_val:.4f} -> {last_val:.4f} (steps {self.validations[0][0]} -> "
                         f"{self.validations[-1][0]})")
        if "tokens_per_s_per_gpu" in summary:
            parts.append(f"{summary['tokens_per_s_per_gpu']:,.0f} tokens/s/GPU")
        if "mfu" in summary:
            parts.append(f"MFU {summary['mfu']:.1%}")
        if summary.get("peak_mem_gib"):
            parts.append(f"peak GPU memory {summary['peak_mem_gib']:.1f} GiB")
        if "sm_clock_mhz" in summary:
            parts.append(f"SM clock {summary['sm_clock_mhz']:,} of {summary['sm_clock_max_mhz']:,} MHz at "
                         f"{summary['power_w']:.0f} of {summary['power_limit_w']:.0f} W")
        if "energy_mj_per_token" in summary:
            parts.append(f"{summary['energy_mj_per_token']:.2f} mJ per token")
        self.print("; ".join(parts))

    def print(self, *values) -> None:
        if self.is_main:
            print(*values, flush=True)


def kernels_for_run(args: argparse.Namespace):
    """The backends of --kernels and --kernel_override for this run's precision (-x fp32 rules out half-precision
    attention); training and evaluation resolve them the same way."""
    return resolve_kernels(args.kernels, _parse_overrides(args.kernel_override),
                           float32=args.mixed_precision == "fp32")


def _parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        op, sep, backend = pair.partition("=")
        if not sep or not op or not backend:
            raise SystemExit(f"error: --kernel_override {pair!r}: expected OP=BACKEND, e.g. attention=sdpa")
        overrides[op] = backend
    return overrides


def _autocast(args, device):
    # ZeRO and Gemini cast parameters to bf16/fp16 themselves; plain DDP needs autocast for mixed precision.
    if args.plugin != "ddp" or args.mixed_precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_model(args: argparse.Namespace, config: LlamaConfig, kernels) -> LlamaForCausalLM:
    """The model, built under the plugin's init context (lazily for Gemini)."""
    with model_init_context(args.plugin):
        return LlamaForCausalLM(config, kernels, document_causal=args.attention_scope == "document",
                                grad_checkpoint=args.grad_checkpoint, compile_blocks=args.compile)


def load_weights(booster, model: torch.nn.Module, folder: str, plugin: str, *, boosted: bool) -> None:
    """Load HF-layout weights: call before boosting (boosted=False) and after (boosted=True); one of them loads.

    The plugins that build lazily (Gemini, hybrid_parallel) load into their shards after boosting, the other
    plugins into the plain module before.
    """
    if builds_lazily(plugin) != boosted:
        return
    if not boosted:
        _load_initial_weights(model, folder)
        return
    single = os.path.join(folder, "model.safetensors")  # colossalai takes a sharded folder or a single file
    booster.load_model(model, single if os.path.isfile(single) else folder)


def _load_initial_weights(model: torch.nn.Module, folder: str) -> None:
    from model.hf_io import check_state_dict, load_hf_state_dict

    state = load_hf_state_dict(folder)
    check_state_dict(state, {k: tuple(v.shape) for k, v in model.state_dict().items()}, source=folder)
    model.load_state_dict(state, strict=False)  # strict=False only for a tied head stored once


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
