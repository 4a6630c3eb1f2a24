"""Plug-ins for tinyllm's Trainer, each attached through tinyllm.Callback or tinyllm.World:

- DistributedWorld: torchrun and DistributedDataParallel, one process per device;
- CompileWithFallback: compile the training step where it pays, and train without it if compiling fails;
- StopOnSignals: Ctrl-C and SIGTERM end a run after the current step, with last.pt saved;
- ModelFlopsUtilization: the measured peak matrix-multiply speed, and the share of it training used;
- LossPlot: loss.png at the end of a run (needs matplotlib);
- ProgressBar: a tqdm bar on a terminal.

`standard_callbacks()` returns them in the order train_shakespeare.py uses them.
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import gc
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import tinyllm
from tinyllm import logger

# ----------------------------------------------------------------------------------------------
# torchrun: one process per device, gradients averaged by DistributedDataParallel


class DistributedWorld(tinyllm.World):
    """The processes torchrun started (it sets RANK, WORLD_SIZE and LOCAL_RANK): gloo on a CPU, nccl
    on CUDA with one GPU per process. Each process trains on every world-size-th batch."""

    def __init__(self) -> None:
        self.rank, self.size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.device = torch.device("cpu")  # set by join
        self.store: Optional[dist.Store] = None  # torchrun's key-value store, once joined
        self.failures_key = f"tinyllm/failures/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"

    def join(self, device: torch.device) -> torch.device:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        with contextlib.suppress(KeyError, ValueError, RuntimeError):  # no store: see first_to_fail
            # torchrun's agent keeps this store, so it outlives any one failed process.
            self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                       is_master=False, timeout=datetime.timedelta(seconds=10))
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._terminated)
        self.device = device
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def mean(self, total: torch.Tensor, count: int) -> float:
        sums = torch.stack([total.detach().float(), torch.tensor(float(count), device=total.device)])
        dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def max(self, value: int) -> int:
        tensor = torch.tensor(value, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def barrier(self) -> None:
        dist.barrier()

    def first_to_fail(self) -> bool:
        """Count this process's failure; True for the first process to fail, which prints the error
        (once, whether every process met it or only this one). Before joining, process 0 prints."""
        if self.store is None:
            return self.rank == 0
        with contextlib.suppress(RuntimeError):
            return self.store.add(self.failures_key, 1) == 1
        return self.rank == 0

    def exit(self, code: int) -> NoReturn:
        """End this process now with `code`. Once one process has failed, torchrun's agent soon sends
        SIGTERM to the others, and a slower, orderly exit would end as death by that signal instead."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _terminated(self, signal_number: int, frame: Any) -> None:
        """The agent's SIGTERM after another process failed: exit with that one's code, 2, not by the
        signal. Any other SIGTERM still ends the process, with the usual code 143."""
        if self.peer_failed():
            self.exit(2)
        raise SystemExit(128 + signal_number)

    def peer_failed(self) -> bool:
        """Whether another process has failed (said by first_to_fail), which breaks this one's
        collective operations: it then exits with the same code, quietly, since the other said why."""
        with contextlib.suppress(RuntimeError, AttributeError):
            return self.store.check([self.failures_key])
        return False


def world_from_environment() -> tinyllm.World:
    """torchrun's world when torchrun started this process; otherwise the single process."""
    return DistributedWorld() if "RANK" in os.environ and "WORLD_SIZE" in os.environ else tinyllm.World()


def leave_process_group() -> None:
    """End a distributed run that succeeded: DistributedDataParallel goes before the process group it
    uses, and no process closes its connections while another still uses them."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# torch.compile where it pays, and plain PyTorch where it fails


def resolve_compile(setting: Optional[bool], device: torch.device, planned_tokens: int,
                    time_budget: Optional[float]) -> tuple:
    """Compile by default only where a measurement showed it pays, its cold start included."""
    if setting is not None:
        return setting, "asked for"
    if device.type != "cpu":
        return False, f"not yet measured on {device.type}; pass --compile to try it"
    # Measured on a 2-core CPU: +46% tokens/s after a cold compile of about 22 s, which pays off
    # once a run would take more than about 90 s uncompiled (about 20,000 tokens/s there).
    long_run = time_budget >= 90 if time_budget is not None else planned_tokens >= 90 * 20_000
    if long_run:
        return True, "+46% tokens/s on a CPU, measured; the first step compiles for about 20 s"
    return False, "this run is too short to win back the 20 s that compiling takes"


class EagerFallback:
    """Calls the compiled module; if that fails (compiling needs a C++ compiler on a CPU, Triton on a
    GPU), warns once and calls the plain module from then on."""

    def __init__(self, compiled: Any, eager: nn.Module):
        self.module, self.eager = compiled, eager

    def __call__(self, *args: Any) -> Any:
        try:
            return self.module(*args)
        except Exception as e:
            if self.module is self.eager:
                raise
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            logger.warning("torch.compile failed (%s); training without it", reason)
            self.module = self.eager
            return self.eager(*args)


class CompileWithFallback(tinyllm.Callback):
    """With `compile` unset (None), compile the training step when the run is long enough to win
    back the compile time; whenever it is compiled, fall back to plain PyTorch if compiling fails."""

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        c = trainer.config
        planned_tokens = trainer.total_steps * c.batch_size * c.max_context
        compiled, reason = resolve_compile(c.compile, trainer.device, planned_tokens, c.time_budget)
        logger.info("torch.compile %s (%s)", "on" if compiled else "off", reason)
        if compiled and trainer.train_model is trainer.eager_model:
            trainer.train_model = torch.compile(trainer.eager_model, dynamic=False)
        if compiled:
            trainer.train_model = EagerFallback(trainer.train_model, trainer.eager_model)


# ----------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM after saving last.pt; `exit_code` follows the
    shell's convention of 128 + the signal number (130, 143)."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class StopOnSignals(tinyllm.Callback):
    """SIGINT and SIGTERM end the run after the current step instead of mid-step: last.pt is saved
    and TrainingInterrupted raised. A signal the parent ignores (a shell's `command &`) stays ignored."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self.previous: dict = {}  # the handlers to put back

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        if threading.current_thread() is not threading.main_thread():  # only it may set handlers
            return

        def remember(signal_number: int, frame: Any) -> None:
            self.received = signal_number
            trainer.request_stop()
        self.previous = {s: signal.signal(s, remember) for s in (signal.SIGINT, signal.SIGTERM)
                         if signal.getsignal(s) is not signal.SIG_IGN}

    def on_stop(self, trainer: tinyllm.Trainer, reason: str) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
        if reason != "interrupted":
            return
        trainer.save_last()
        signal_number = self.received or signal.SIGTERM  # or another process's signal
        path = trainer.run_dir.path
        saved = (f"{path / 'last.pt'} holds the run. Continue it with --resume and the same --out-dir "
                 "and --data" if path else "training in memory, nothing was saved")
        message = f"stopped by {signal.Signals(signal_number).name} after step {trainer.state.step}; {saved}"
        logger.warning(message)
        raise TrainingInterrupted(signal_number, message)


# ----------------------------------------------------------------------------------------------
# Model FLOPs utilisation


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Matrix-multiply FLOP/s this device reaches in `dtype`: the yardstick for model FLOPs utilisation.
    The fastest of a few timings is taken, since anything else running only slows a timing down."""
    n, generator = 1024 if device.type == "cpu" else 8192, torch.Generator(device).manual_seed(0)
    # Its own generator leaves the global one alone, so a resumed run draws the same numbers.
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    synchronize = getattr(getattr(torch, device.type, None), "synchronize", lambda: None)
    fastest = math.inf
    for _ in range(6):
        start = time.perf_counter()
        a @ b
        synchronize()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n ** 3 / fastest


def flops_per_token(model: tinyllm.TransformerModel) -> int:
    """Training FLOPs per token at full context: 6 per weight used in a matrix product (forward and
    backward) plus the attention scores and sums (the PaLM paper's appendix B estimate)."""
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2) - embeddings
    c = model.config
    return 6 * matrices + 12 * c.n_layer * c.n_embd * c.max_context


class ModelFlopsUtilization(tinyllm.Callback):
    """MFU: the share of the measured matrix-multiply peak that training used, in the log and summary."""

    def __init__(self) -> None:
        self.peak_flops = math.nan  # measured when training starts

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        self.peak_flops = measure_peak_flops(trainer.device, trainer.dtype)
        logger.info("peak %.2f TFLOP/s (a matrix multiply in %s, measured)", self.peak_flops / 1e12,
                    str(trainer.dtype).replace("torch.", ""))

    def mfu(self, trainer: tinyllm.Trainer, tokens_per_second: float) -> float:
        return tokens_per_second / trainer.world.size * flops_per_token(trainer.model) / self.peak_flops

    def on_validation(self, trainer: tinyllm.Trainer, row: dict) -> str:
        return f"MFU {100 * self.mfu(trainer, row['tokens_per_second']):.1f}%"

    def on_end(self, trainer: tinyllm.Trainer, summary: dict) -> str:
        summary["mfu"] = round(self.mfu(trainer, summary["tokens_per_second"]), 4)
        summary["peak_tflops"] = round(self.peak_flops / 1e12, 3)
        return f"MFU {100 * summary['mfu']:.1f}%"


# ----------------------------------------------------------------------------------------------
# The loss plot and the progress bar


def plot_losses(out_dir: tinyllm.PathLike) -> Path:
    """Draw train and validation loss against step from `out_dir`/metrics.csv into loss.png."""
    try:  # an optional dependency; Figure without pyplot leaves any global plotting state alone
        from matplotlib.figure import Figure
    except ImportError:
        raise tinyllm.TinyLLMError("loss.png needs matplotlib: pip install 'tinyllm[plot]' "
                                   "(or pip install matplotlib)") from None
    metrics = Path(out_dir) / "metrics.csv"
    try:
        with open(metrics, newline="", encoding="utf-8") as f:
            rows = [(int(r["step"]), float(r["train_loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]
    except FileNotFoundError:
        raise tinyllm.TinyLLMError(f"{metrics} does not exist; point --out-dir at a training run") from None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise tinyllm.TinyLLMError(f"{metrics} is malformed ({e})") from None
    if not rows:
        raise tinyllm.TinyLLMError(f"{metrics} has no rows yet; a run logs one at each validation")
    steps, train_losses, val_losses = zip(*rows)
    figure = Figure(figsize=(7, 4), layout="tight")
    axes = figure.subplots()
    axes.plot(steps, train_losses, label="train (mean since the last validation)")
    axes.plot(steps, val_losses, label="validation")
    axes.set(xlabel="step", ylabel="loss (nats per token)", title=f"training run in {out_dir}")
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(out_dir) / "loss.png"
    with tinyllm.atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=120)
    return path


class LossPlot(tinyllm.Callback):
    """Draw loss.png at the end of a run; without matplotlib, say how to get it and finish anyway."""

    def on_end(self, trainer: tinyllm.Trainer, summary: dict) -> None:
        if not trainer.run_dir.metrics:
            return
        try:
            logger.info("loss curves drawn in %s", plot_losses(trainer.run_dir.path))
        except tinyllm.TinyLLMError as e:  # a missing optional dependency must not fail a finished run
            logger.warning("no loss.png: %s", e)


class _AboveTheBar:
    """A stream for the console log that prints above the progress bar instead of through it."""

    def write(self, text: str) -> None:
        tqdm.write(text, end="", file=sys.stdout)

    def flush(self) -> None:
        sys.stdout.flush()


class ProgressBar(tinyllm.Callback):
    """A tqdm progress bar of the steps, with the latest losses."""

    def __init__(self) -> None:
        self.bar: Optional[tqdm] = None

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        if trainer.run_dir.main:
            self.bar = tqdm(total=trainer.total_steps, initial=trainer.state.step, unit="step",
                            dynamic_ncols=True)
            trainer.run_dir.console.setStream(_AboveTheBar())

    def on_step_end(self, trainer: tinyllm.Trainer) -> None:
        if self.bar:
            self.bar.update()

    def on_validation(self, trainer: tinyllm.Trainer, row: dict) -> None:
        if self.bar:
            self.bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_loss']:.3f}",
                                 tok_s=f"{row['tokens_per_second']:.0f}")

    def on_stop(self, trainer: tinyllm.Trainer, reason: str) -> None:
        if self.bar:
            self.bar.close()
            trainer.run_dir.console.setStream(sys.stdout)


def standard_callbacks(*, progress_bar: bool = False) -> List[tinyllm.Callback]:
    """Every trainer plug-in here. StopOnSignals comes last: its on_stop may end the run."""
    bar = [ProgressBar()] if progress_bar else []
    return [*bar, CompileWithFallback(), ModelFlopsUtilization(), LossPlot(), StopOnSignals()]
