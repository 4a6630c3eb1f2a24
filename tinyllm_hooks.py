"""Plug-ins for tinyllm's Trainer, each attached through tinyllm.Callback or tinyllm.World:

- DistributedWorld: torchrun and DistributedDataParallel, one process per device;
- MeasuredSettings: time the training step in each dtype, thread count and compiled or not, and
  train with the fastest (compiling only where it pays back its cost), falling back if compiling fails;
- StopOnSignals: Ctrl-C and SIGTERM end a run after the current step, with last.pt saved;
- ModelFlopsUtilization: the measured peak matrix-multiply speed, and the share of it training used;
- LossPlot: loss.png at the end of a run (needs matplotlib);
- ProgressBar: a tqdm bar on a terminal.

`standard_callbacks()` returns them in the order train_shakespeare.py uses them.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, List, NoReturn, Optional

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
# The dtype, thread count and torch.compile that train fastest, measured on this machine


CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
MEASUREMENTS = CACHE / "tinyllm" / "measurements.json"
# Before compiling was ever measured here for a model: assume it saves 30% of the time and costs 30 s,
# so it is tried in runs of over 100 s, and measured; from then on the measurement decides. A second
# compile of the same model finds PyTorch's compile cache warm: 5.8 s instead of 44 s, measured on a
# 2-core AMD EPYC, so until a warm compile is timed, it is taken to cost a fifth of the cold one.
GUESSED_GAIN, GUESSED_COMPILE_SECONDS, WARM_COMPILE_SHARE = 0.3, 30.0, 0.2
SHORTEST_MEASURED_RUN = 60.0  # seconds: timing the candidates takes a few, which a shorter run keeps


@dataclasses.dataclass(frozen=True)
class Setting:
    """One way to run the training step."""

    dtype: str = "float32"
    threads: int = 1
    compiled: bool = False

    def __str__(self) -> str:
        return f"{self.dtype} {'compiled' if self.compiled else 'eager'}, {self.threads} threads"


def first_line(error: Exception) -> str:
    """An exception in a few words, for a one-line warning."""
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def compile_pays(*, relative_gain: float, remaining_seconds: float, compile_seconds: float) -> bool:
    """Compiling pays when what it saves exceeds its cost: the R seconds left take R x (1 - gain)
    compiled, so it saves gain x R."""
    return relative_gain * remaining_seconds > compile_seconds


def time_training_step(trainer: tinyllm.Trainer, setting: Setting, module: Any, *,
                       min_seconds: float = 1.0, give_up_after: float = math.inf) -> tuple:
    """(seconds of the first call, median seconds per step after it) of a training step of `module` in
    `setting`, on a batch of the run's shape; a step taking over `give_up_after` seconds ends the
    timing. The model, its gradients and torch's random generators are left as they were: an
    optimizer with learning rate 0 on them, a snapshot put back."""
    c, device = trainer.config, trainer.device
    x, y = next(iter(tinyllm.epoch_loader(trainer.train_ids, c.max_context, c.batch_size,
                                          torch.Generator().manual_seed(0))))
    autocast = tinyllm.autocast_context(device, tinyllm.DTYPES[setting.dtype])
    scratch = torch.optim.AdamW(trainer.model.parameters(), lr=0.0, fused=device.type in ("cpu", "cuda"))
    snapshot = {name: w.detach().clone() for name, w in trainer.model.state_dict().items()}
    threads, times = torch.get_num_threads(), []
    torch.set_num_threads(setting.threads)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        while (len(times) < 4 or sum(times[1:]) < min_seconds) and max(times, default=0) <= give_up_after:
            started = time.perf_counter()
            with autocast():
                loss = module(x, y)[1]
            loss.backward()
            scratch.step()
            scratch.zero_grad(set_to_none=True)
            loss.item()  # waits for the device
            times.append(time.perf_counter() - started)
    torch.set_num_threads(threads)
    trainer.model.load_state_dict(snapshot)
    later = sorted(times[1:]) or times  # a step given up on is its own timing
    return times[0], later[len(later) // 2]


def machine_key(trainer: tinyllm.Trainer) -> str:
    """What a measurement depends on: the chip, torch, the model's shape and the batch."""
    if trainer.device.type == "cuda":
        chip = torch.cuda.get_device_name(trainer.device)
    else:
        with contextlib.suppress(OSError):
            cpuinfo = Path("/proc/cpuinfo").read_text()
        chip = next((line.split(":", 1)[1].strip() for line in locals().get("cpuinfo", "").splitlines()
                     if line.startswith("model name")), platform.processor() or "cpu")
    m, c = trainer.model.config, trainer.config
    return (f"{chip} | torch {torch.__version__} | {m.n_layer}x{m.n_head}x{m.n_embd}, vocab {m.vocab_size} "
            f"| batch {c.batch_size} x {c.max_context}")


class MeasuredSettings(tinyllm.Callback):
    """Where `dtype` is "auto" (on a CPU) or `compile` unset, time the real training step in each
    candidate for a second or so and train with the fastest; compile only where the measured (or, the
    first time, guessed) gain over the rest of the run exceeds its cost. Timings are kept in
    `record_path`, so a later run of the same model here starts at once. A compiled step that fails
    falls back to plain PyTorch."""

    def __init__(self, *, timer: Callable = time_training_step,
                 record_path: Optional[tinyllm.PathLike] = None):
        self.timer, self.record_path = timer, Path(record_path or MEASUREMENTS)
        self.timings: dict = {}  # str(Setting) -> seconds per step, this run's and earlier runs'

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        current = Setting(str(trainer.dtype).removeprefix("torch."), torch.get_num_threads())
        key, records = machine_key(trainer), self._read()
        self.timings = dict(records.get(key, {}))
        recorded = dict(self.timings)
        with trainer.clock.untimed_block():
            best = self._fastest_eager(trainer, current)
            compiled = self._compile(trainer, best, trainer.config.compile)
        if self.timings != recorded:
            records[key] = self.timings
            with contextlib.suppress(OSError):  # only a cache: without it, a later run measures again
                self.record_path.parent.mkdir(parents=True, exist_ok=True)
                with tinyllm.atomic_write(self.record_path, "w") as f:
                    json.dump(records, f, indent=1)
        trainer.dtype = tinyllm.DTYPES[best.dtype]
        trainer.autocast = tinyllm.autocast_context(trainer.device, trainer.dtype)
        torch.set_num_threads(best.threads)
        if compiled is not None:
            trainer.train_model = EagerFallback(compiled, trainer.eager_model)

    def _fastest_eager(self, trainer: tinyllm.Trainer, current: Setting) -> Setting:
        """The fastest dtype and thread count that the config leaves open, measured (or recorded)."""
        cpu, c = trainer.device.type == "cpu", trainer.config
        dtypes = ["float32", "bfloat16"] if c.dtype == "auto" and cpu else [current.dtype]
        threads = sorted({current.threads, os.cpu_count() or 1}) if cpu else [current.threads]
        candidates = [Setting(d, t) for d in dtypes for t in threads]
        if len(candidates) == 1 or trainer.world.size > 1:  # processes would have to time them together
            return current
        if self._remaining_seconds(trainer, self._estimate(trainer, current)) < SHORTEST_MEASURED_RUN:
            logger.info("dtype and threads not measured: the run is too short to win back the time")
            return current
        for setting in candidates:  # one far slower than the fastest so far is not timed to the end
            fastest = min([self.timings[str(s)] for s in candidates if str(s) in self.timings] or [math.inf])
            self._time(trainer, setting, trainer.eager_model, give_up_after=5 * fastest)
        best = min(candidates, key=lambda setting: self.timings[str(setting)])
        logger.info("seconds per step: %s; training in %s", ", ".join(
            f"{setting} {self.timings[str(setting)]:.4f}" for setting in candidates), best)
        return best

    def _compile(self, trainer: tinyllm.Trainer, best: Setting, asked: Optional[bool]) -> Optional[Any]:
        """The compiled module to train with, or None: as asked, or where compiling pays."""
        if asked is not None:
            logger.info("torch.compile %s (asked for)", "on" if asked else "off")
            if not asked:
                return None
            compiled = trainer.train_model is not trainer.eager_model  # the core compiled it already
            return trainer.train_model if compiled else torch.compile(trainer.eager_model, dynamic=False)
        setting = dataclasses.replace(best, compiled=True)
        known = self.timings.get(str(setting))
        eager_step = self._estimate(trainer, best)
        gain = 1 - known / eager_step if known else GUESSED_GAIN
        cold = self.timings.get(f"{setting} compile seconds")
        cost = self.timings.get(f"{setting} warm compile seconds") or (
            WARM_COMPILE_SHARE * cold if cold else GUESSED_COMPILE_SECONDS)
        remaining = self._remaining_seconds(trainer, eager_step)
        if not compile_pays(relative_gain=gain, remaining_seconds=remaining, compile_seconds=cost):
            logger.info("torch.compile off: it would save %.0f%% (%s) of the %.0f s left, less than its "
                        "cost of %.0f s", 100 * gain, "measured" if known else "a guess", remaining, cost)
            return None
        eager_step = self._time(trainer, best, trainer.eager_model)
        compiled = torch.compile(trainer.eager_model, dynamic=False)
        try:
            first, step = self.timer(trainer, setting, compiled)
        except Exception as e:  # compiling needs a C++ compiler on a CPU, Triton on a GPU
            logger.warning("torch.compile failed (%s); training without it", first_line(e))
            return None
        self.timings[str(setting)] = step
        self.timings[f"{setting} {'warm ' if cold else ''}compile seconds"] = first
        logger.info("torch.compile %s: %.4f s per step against %.4f eager; compiling took %.1f s",
                    "on" if step < eager_step else "off", step, eager_step, first)
        return compiled if step < eager_step else None

    def _time(self, trainer: tinyllm.Trainer, setting: Setting, module: Any, **limits: float) -> float:
        if str(setting) not in self.timings:
            self.timings[str(setting)] = self.timer(trainer, setting, module, **limits)[1]
        return self.timings[str(setting)]

    def _estimate(self, trainer: tinyllm.Trainer, setting: Setting) -> float:
        """Seconds per step: recorded, or from a few steps (kept out of the record, being rough)."""
        known = self.timings.get(str(setting))
        return known or self.timer(trainer, setting, trainer.eager_model, min_seconds=0.0)[1]

    @staticmethod
    def _remaining_seconds(trainer: tinyllm.Trainer, step_seconds: float) -> float:
        """The training time left: the budget's rest, or the steps left at `step_seconds` each."""
        if trainer.config.time_budget is not None:
            return trainer.config.time_budget - trainer.clock.elapsed()
        return (trainer.total_steps - trainer.state.step) * step_seconds

    def _read(self) -> dict:
        """The recorded timings; a missing or broken file (it is only a cache) is no record."""
        with contextlib.suppress(OSError, ValueError):
            records = json.loads(self.record_path.read_text(encoding="utf-8"))
            if isinstance(records, dict) and all(isinstance(r, dict) and all(
                    type(v) in (int, float) and v > 0 for v in r.values()) for r in records.values()):
                return records
        return {}


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
            logger.warning("torch.compile failed (%s); training without it", first_line(e))
            self.module = self.eager
            return self.eager(*args)


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
    return [*bar, MeasuredSettings(), ModelFlopsUtilization(), LossPlot(), StopOnSignals()]
