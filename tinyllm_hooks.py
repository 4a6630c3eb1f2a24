"""Plug-ins for tinyllm's Trainer, each attached through tinyllm.Callback or tinyllm.World:

- DistributedWorld: torchrun and DistributedDataParallel, one process per device;
- MeasuredSettings: time the training step in each dtype, thread count and compiled or not, and
  train with the fastest (compiling only where it pays back its cost), falling back if compiling fails;
- StopOnSignals: Ctrl-C and SIGTERM end a run after the current step, with last.pt saved;
- ModelFlopsUtilization: the measured peak matrix-multiply speed, and the share of it training used;
- MemorisingNote: at the end of a run whose validation loss rose well above its best, what helps;
- LossPlot: loss.png at the end of a run (needs matplotlib);
- ProgressBar: a tqdm bar on a terminal; ProgressLog: a progress line every 30 s where there is none.

`standard_callbacks()` returns them in the order train_shakespeare.py uses them.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import functools
import gc
import hashlib
import itertools
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List, NoReturn, Optional, Set, Tuple

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
        self.store: Optional[dist.Store] = None  # torchrun's key-value store, once asked
        self.failures_key = f"tinyllm/failures/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        self.failed = False  # whether this process has counted itself among the failed
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._terminated)

    def join(self, device: torch.device) -> torch.device:
        if device.type == "cuda":  # every process checks, so all of them stop at once
            processes, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
            if processes > gpus:
                raise tinyllm.TinyLLMError(
                    f"torchrun started {processes} processes on this machine, which has {gpus} GPU"
                    f"{'' if gpus == 1 else 's'}; start one per GPU (torchrun --nproc_per_node={gpus}), "
                    "or train on the CPU with `device` cpu (gloo)")
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.device = device
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)

    def mean(self, total: torch.Tensor, count: int) -> float:
        sums = torch.stack([total.detach().float(), torch.tensor(float(count), device=total.device)])
        dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def average(self, values: torch.Tensor) -> torch.Tensor:
        total = values.detach().clone()
        dist.all_reduce(total)  # a sum: gloo has no average
        return total / self.size

    def max(self, value: int) -> int:
        tensor = torch.tensor(value, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def barrier(self) -> None:
        dist.barrier()

    def _failures(self) -> Optional[dist.Store]:
        """torchrun's key-value store, which its agent keeps, so it outlives any one failed process;
        None where there is none to reach."""
        if self.store is None:
            with contextlib.suppress(KeyError, ValueError, RuntimeError):
                self.store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                           is_master=False, timeout=datetime.timedelta(seconds=5))
        return self.store

    def first_to_fail(self) -> bool:
        """Count this process's failure; True for the first process to fail, which prints the error
        (once, whether every process met it or only this one). Without the store, process 0 prints."""
        self.failed = True
        with contextlib.suppress(RuntimeError, AttributeError):
            return self._failures().add(self.failures_key, 1) == 1
        return self.rank == 0

    def exit(self, code: int, *, wait: float = 2.0) -> NoReturn:
        """End this failed process with `code`, once every process has failed or `wait` seconds have
        passed."""
        # torchrun's agent sends SIGTERM to the others as soon as one ends, so one that was still
        # starting up (meeting the same error a moment later) would die by that signal; one that waits
        # in a collective operation finds it broken when this one ends, and follows with code 2.
        if not self.failed:
            self.first_to_fail()
        deadline = time.monotonic() + wait
        with contextlib.suppress(RuntimeError, AttributeError):
            while self._failures().add(self.failures_key, 0) < self.size and time.monotonic() < deadline:
                time.sleep(0.05)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _terminated(self, signal_number: int, frame: Any) -> None:
        """The agent's SIGTERM after another process failed: exit with that one's code, 2, not by the
        signal. Any other SIGTERM still ends the process, with the usual code 143."""
        if self.peer_failed():
            self.exit(2, wait=0.0)
        raise SystemExit(128 + signal_number)

    def peer_failed(self) -> bool:
        """Whether another process has failed (said by first_to_fail), which breaks this one's
        collective operations: it then exits with the same code, quietly, since the other said why."""
        with contextlib.suppress(RuntimeError, AttributeError):
            return self._failures().check([self.failures_key])
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
RECHECKS_A_RUN_PAYS = 20  # a compiled step measured slower is timed again in runs 20 times its cost
# A compiled step recorded this much faster than eager is compiled without timing both again: that took
# 2-4 s of a 180-s run, and the records are each setting's fastest timing, so other load does not bias them.
TRUSTED_GAIN = 0.15


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
    `setting`, on a batch of the run's shape; a step over `give_up_after` seconds ends the timing."""
    # The model, its gradients and torch's random generators are left as they were: an optimizer with
    # learning rate 0 on them, a snapshot put back.
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


def read_measurements(path: Path) -> dict:
    """The recorded timings, by machine_key; a missing or broken file (it is only a cache) is no record."""
    with contextlib.suppress(OSError, ValueError, RecursionError):
        records = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(records, dict) and all(isinstance(r, dict) and all(
                type(v) in (int, float) and 0 < v < math.inf for v in r.values()) for r in records.values()):
            return records
    return {}


def write_measurements(path: Path, key: str, timings: dict) -> None:
    """Record `timings` under `key`, keeping the other keys' records."""
    records = {**read_measurements(path), key: timings}
    # Only a cache: where it cannot be written (a folder in its place, say), a later run measures again.
    with contextlib.suppress(OSError, tinyllm.TinyLLMError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tinyllm.atomic_write(path, "w") as f:
            json.dump(records, f, indent=1)


@functools.lru_cache(maxsize=None)  # asked for by every record and library name; the chip does not change
def cpu_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name, as lscpu shows it, and a digest of its instruction sets."""
    # Machines of one name (a cloud's "AMD EPYC") differ in them, and code compiled for one
    # (-march=native) can crash the other, as a timing made on one misleads on the other.
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:  # not Linux
        lines = []
    fields: dict = {}  # the first processor's
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or "cpu"
    flags = fields.get("flags") or fields.get("Features")  # x86 / ARM
    return f"{name} (instruction sets {hashlib.sha256(flags.encode()).hexdigest()[:8]})" if flags else name


def chip_name(device: torch.device) -> str:
    """The GPU's or the CPU's model name."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def machine_key(trainer: tinyllm.Trainer) -> str:
    """What a measurement depends on: the chip, torch, the model's shape, its dropout, the batch and the
    optimizer (Muon's step costs 10-40% more than AdamW's here)."""
    m, c = trainer.model.config, trainer.config
    dropout = f", dropout {m.dropout}" if m.dropout else ""  # dropout 0.1 made a step 1.8x slower here
    return (f"{chip_name(trainer.device)} | torch {torch.__version__} | {m.n_layer}x{m.n_head}x{m.n_embd}, "
            f"vocab {m.vocab_size}{dropout} | batch {c.batch_size} x {c.max_context} | {c.optimizer}")


class MeasuredSettings(tinyllm.Callback):
    """Where `dtype` is "auto" (on a CPU) or `compile` unset, time the real training step in each
    candidate for a second or so and train with the fastest, compiling only where it pays."""
    # Compiling pays where the measured (or, the first time, guessed) gain over the rest of the run
    # exceeds its cost. Timings are kept in `record_path`, so a later run of the same model here starts
    # at once. A compiled step that fails falls back to plain PyTorch.

    def __init__(self, *, timer: Callable = time_training_step,
                 record_path: Optional[tinyllm.PathLike] = None):
        self.timer, self.record_path = timer, Path(record_path or MEASUREMENTS)
        self.timings: dict = {}  # str(Setting) -> seconds per step, this run's and earlier runs'

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        current = Setting(str(trainer.dtype).removeprefix("torch."), torch.get_num_threads())
        key, records = machine_key(trainer), read_measurements(self.record_path)
        self.timings = dict(records.get(key, {}))
        recorded = dict(self.timings)
        with trainer.clock.untimed_block():
            best = self._fastest_eager(trainer, current)
            compiled = self._compile(trainer, best, trainer.config.compile)
        if self.timings != recorded:
            write_measurements(self.record_path, key, self.timings)
        trainer.dtype = tinyllm.DTYPES[best.dtype]
        trainer.autocast = tinyllm.autocast_context(trainer.device, trainer.dtype)
        torch.set_num_threads(best.threads)
        if compiled is not None:
            trainer.train_model = EagerFallback(compiled, trainer.eager_model)

    def on_end(self, trainer: tinyllm.Trainer, summary: dict) -> None:
        budget = trainer.config.time_budget
        if trainer.config.compile and budget and summary["elapsed_seconds"] > budget:
            logger.warning("the run took %.1f s, past its time budget of %g s; with compiling asked for, the "
                           "first step compiles whatever the budget (without --compile, or with compile "
                           "None, it compiles only where that pays)", summary["elapsed_seconds"], budget)

    def _fastest_eager(self, trainer: tinyllm.Trainer, current: Setting) -> Setting:
        """The fastest dtype and thread count that the config leaves open, measured (or recorded)."""
        cpu, c = trainer.device.type == "cpu", trainer.config
        dtypes = ["float32", "bfloat16"] if c.dtype == "auto" and cpu else [current.dtype]
        chosen = "OMP_NUM_THREADS" in os.environ  # the user's thread count stands
        threads = sorted({current.threads, os.cpu_count() or 1}) if cpu and not chosen else [current.threads]
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
        if trainer.world.size > 1:  # the processes would have to time the same steps together
            logger.info("torch.compile off: not measured under torchrun; pass --compile to compile")
            return None
        setting = dataclasses.replace(best, compiled=True)
        known = self.timings.get(str(setting))
        eager_step = self._estimate(trainer, best)
        gain = 1 - known / eager_step if known else GUESSED_GAIN
        cold = self.timings.get(f"{setting} compile seconds")
        cost = self.timings.get(f"{setting} warm compile seconds") or (
            WARM_COMPILE_SHARE * cold if cold else GUESSED_COMPILE_SECONDS)
        remaining = self._remaining_seconds(trainer, eager_step)
        # A compiled step measured slower than eager may have met a slow moment of a busy machine, and
        # would never be timed again; a run long enough to pay twenty re-checks times it again.
        recheck = known is not None and gain <= 0 and remaining > RECHECKS_A_RUN_PAYS * cost
        pays = compile_pays(relative_gain=gain, remaining_seconds=remaining, compile_seconds=cost)
        if not (pays or recheck):
            logger.info("torch.compile off: it would save %.0f%% (%s) of the %.0f s left, less than its "
                        "cost of %.0f s", 100 * gain, "measured" if known else "a guess", remaining, cost)
            return None
        if pays and known is not None and gain >= TRUSTED_GAIN:
            logger.info("torch.compile on: measured before at %.4f s per step against %.4f eager",
                        known, eager_step)
            return torch.compile(trainer.eager_model, dynamic=False)
        if recheck:
            logger.info("torch.compile: measured slower before (%.4f s per step against %.4f eager); timing "
                        "it again", known, eager_step)
        # Timed afresh, beside the compiled step: a small recorded gain could be another run's load.
        eager_step = self._record(best, self.timer(trainer, best, trainer.eager_model)[1])
        compiled = torch.compile(trainer.eager_model, dynamic=False)
        try:
            first, step = self.timer(trainer, setting, compiled)
        except Exception as e:  # compiling needs a C++ compiler on a CPU, Triton on a GPU
            logger.warning("torch.compile failed (%s); training without it", first_line(e))
            return None
        self._record(setting, step)
        self.timings[f"{setting} {'warm ' if cold else ''}compile seconds"] = first
        logger.info("torch.compile %s: %.4f s per step against %.4f eager; compiling took %.1f s",
                    "on" if step < eager_step else "off", step, eager_step, first)
        return compiled if step < eager_step else None

    def _time(self, trainer: tinyllm.Trainer, setting: Setting, module: Any, **limits: float) -> float:
        """Seconds per step of `setting`: recorded, or timed now."""
        if str(setting) not in self.timings:
            self.timings[str(setting)] = self.timer(trainer, setting, module, **limits)[1]
        return self.timings[str(setting)]

    def _record(self, setting: Setting, seconds: float) -> float:
        """Keep the fastest timing of `setting` seen here: other load only ever slows a step down, so
        a slow timing is noise (it once made a compiled step look 10% slower than eager, not 20% faster)."""
        self.timings[str(setting)] = min(seconds, self.timings.get(str(setting), math.inf))
        return seconds

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


class EagerFallback:
    """Calls the compiled module; if that fails (compiling needs a C++ compiler on a CPU, Triton on a
    GPU), warns once and calls the plain module from then on."""

    def __init__(self, compiled: Any, eager: nn.Module):
        self.module, self.eager = compiled, eager

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.module(*args, **kwargs)
        except Exception as e:
            if self.module is self.eager:
                raise
            logger.warning("torch.compile failed (%s); running without it", first_line(e))
            self.module = self.eager
            return self.eager(*args, **kwargs)


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


def best_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The highest matrix-multiply FLOP/s measured on this chip so far, now included, kept in the
    measurements record."""
    # At start-up other work (compile workers, say) can slow one measurement by half, and a peak
    # measured low would make the utilisation look high.
    now, key = measure_peak_flops(device, dtype), f"{chip_name(device)} | torch {torch.__version__} | peak"
    name = str(dtype).removeprefix("torch.")
    record = read_measurements(MEASUREMENTS).get(key, {})
    best = max(now, record.get(name, 0.0))
    if best == now:
        write_measurements(MEASUREMENTS, key, {**record, name: now})
    logger.info("peak %.2f TFLOP/s (a matrix multiply in %s, the best measured on this machine; %.2f now)",
                best / 1e12, name, now / 1e12)
    return best


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
        self.peak_flops = best_peak_flops(trainer.device, trainer.dtype)

    def mfu(self, trainer: tinyllm.Trainer, tokens_per_second: float) -> float:
        return tokens_per_second / trainer.world.size * flops_per_token(trainer.model) / self.peak_flops

    def on_validation(self, trainer: tinyllm.Trainer, row: dict) -> str:
        return f"MFU {100 * self.mfu(trainer, row['tokens_per_second']):.1f}%"

    def on_end(self, trainer: tinyllm.Trainer, summary: dict) -> str:
        summary["mfu"] = round(self.mfu(trainer, summary["tokens_per_second"]), 4)
        summary["peak_tflops"] = round(self.peak_flops / 1e12, 3)
        return f"MFU {100 * summary['mfu']:.1f}%"


# ----------------------------------------------------------------------------------------------
# A GPU's batch and context for a budgeted run


@dataclasses.dataclass(frozen=True)
class DeviceDescription:
    """What the batch and context chosen for a GPU depend on."""

    name: str
    memory_gib: float


def describe_cuda(device: torch.device) -> DeviceDescription:
    properties = torch.cuda.get_device_properties(device)
    return DeviceDescription(properties.name, properties.total_memory / 2**30)


# (GiB of memory at least, batch size), with context 256 as in nanoGPT's Shakespeare recipe: a GPU runs
# a step of the CPU's 16 x 128 tokens in about the time of one many times larger, so those leave it
# idle. On an H200, 180-s runs of --size medium (bfloat16, compiled) trained 2.52 million tokens/s at
# batch 128 (MFU 22.7 %) and 2.80 million at 256 (25.2 %); a bare step gained 3 % more at 512. The
# smaller GPUs' batches follow their memory, unmeasured.
GPU_BATCHES, GPU_CONTEXT = ((40.0, 256), (16.0, 64), (8.0, 32)), 256


def fill_the_device(device: DeviceDescription, unset: Set[str]) -> Tuple[dict, str]:
    """The batch size and context for a budgeted run on `device`, of those two fields the ones in
    `unset` (the user's own settings stand); and a line for the log that says why."""
    batch = next((batch for memory, batch in GPU_BATCHES if device.memory_gib >= memory), None)
    wanted = {"batch_size": batch, "max_context": GPU_CONTEXT} if batch else {}
    chosen = {name: value for name, value in wanted.items() if name in unset}
    said = " and ".join(f"{name} {value}" for name, value in chosen.items())
    return chosen, f"{device.name} ({device.memory_gib:.0f} GiB): " + (
        f"{said} chosen for a budgeted run, to keep the GPU busy" if chosen else "batch and context as set")


class LogLine(tinyllm.Callback):
    """A line of the caller's for the run's log, written as the run starts."""

    def __init__(self, line: str):
        self.line = line

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        logger.info("%s", self.line)


# ----------------------------------------------------------------------------------------------
# A note at the end of a run that memorised its text


class MemorisingNote(tinyllm.Callback):
    """At the end of a run whose validation loss rose well above its best, say so, and what helps."""
    # On 30,000 and 100,000 characters of Tiny Shakespeare the default model (no dropout) was best after
    # 7-9 epochs, then memorised; dropout 0.2 scored 0.16 and 0.02 lower (README, "Fine-tuning").

    RISE = 0.1  # nats per token above the best: far more than validations differ by chance

    def on_end(self, trainer: tinyllm.Trainer, summary: dict) -> None:
        state, c = trainer.state, trainer.config
        if not state.last_val_loss > state.best_val_loss + self.RISE:
            return
        if c.init_from:  # a fine-tuned model keeps its checkpoint's shape and dropout
            what_helps = "fewer steps (`max_steps`) would end the run there sooner"
        else:
            more = "`dropout` 0.2" if c.dropout == 0 else f"more `dropout` than {c.dropout:g}"
            what_helps = f"with {more}, or a smaller model, it would learn more from a text this small"
        logger.info("the validation loss was lowest at step %d (epoch %.1f: %.4f) and %.4f at the end: the "
                    "model memorised the text after that step, whose weights are scored; %s",
                    trainer.best_step, trainer.best_step / trainer.steps_per_epoch, state.best_val_loss,
                    state.last_val_loss, what_helps)


# ----------------------------------------------------------------------------------------------
# The loss plot and the progress bar


STEPS_CSV = "steps.csv"  # every step's training loss and learning rate, written by LossPlot
STEPS_COLUMNS = ("step", "train_loss", "learning_rate")


def read_rows(path: Path, columns: tuple) -> list:
    """The rows of a CSV file as tuples of floats in `columns`, each a one-line TinyLLMError if broken."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [tuple(float(row[name]) for name in columns) for row in csv.DictReader(f)]
    except FileNotFoundError:
        raise tinyllm.TinyLLMError(f"{path} does not exist; point --out-dir at a training run") from None
    except KeyError as e:
        raise tinyllm.TinyLLMError(f"{path} is malformed (it has no {e.args[0]} column)") from None
    except (TypeError, ValueError, UnicodeDecodeError, csv.Error) as e:
        raise tinyllm.TinyLLMError(f"{path} is malformed ({e})") from None
    except OSError as e:  # a folder, say
        raise tinyllm.TinyLLMError(f"cannot read {path} ({e.strerror})") from None


def smoothed(values: List[float], weight: float) -> List[float]:
    """An exponential moving average, with the bias of its zero start removed (as Adam does)."""
    average, out = 0.0, []
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def plot_losses(out_dir: tinyllm.PathLike, summary: Optional[dict] = None) -> Path:
    """Draw loss.png in `out_dir`: the training loss (steps.csv, smoothed; else metrics.csv), validation
    points, the learning rate on a second axis, and the model and full validation loss as a title."""
    # The title's numbers come from config.json and `summary` (by default summary.json).
    try:  # an optional dependency; Figure without pyplot leaves any global plotting state alone
        from matplotlib.figure import Figure
    except ImportError:
        raise tinyllm.TinyLLMError("loss.png needs matplotlib: pip install 'tinyllm[plot]' "
                                   "(or pip install matplotlib)") from None
    out_dir = Path(out_dir)
    validations = read_rows(out_dir / "metrics.csv", ("step", "train_loss", "val_loss", "learning_rate"))
    if not validations:
        raise tinyllm.TinyLLMError(f"{out_dir / 'metrics.csv'} has no rows yet; a run logs one at each "
                                   "validation")
    steps = read_rows(out_dir / STEPS_CSV, STEPS_COLUMNS) if (
        out_dir / STEPS_CSV).exists() else []
    steps = steps or [(s, t, lr) for s, t, _, lr in validations]  # from a run before steps.csv, or of 0 steps
    figure = Figure(figsize=(8, 4.5), layout="tight")
    axes = figure.subplots()
    x, train, rates = zip(*steps)
    if len(steps) > len(validations):  # every step: faint as logged, bold smoothed over ~2% of the run
        axes.plot(x, train, color="tab:blue", alpha=0.25, linewidth=0.8)
        axes.plot(x, smoothed(list(train), 1 - 1 / max(1, len(steps) // 50)), color="tab:blue",
                  label="train (each step, smoothed)")
    else:
        axes.plot(x, train, color="tab:blue", marker="o", label="train (mean since the last validation)")
    axes.plot([v[0] for v in validations], [v[2] for v in validations], color="tab:orange", marker="o",
              label="validation")
    axes.set(xlabel="step", ylabel="loss (nats per token)", title=plot_title(out_dir, summary))
    axes.grid(alpha=0.3)
    lr_axes = axes.twinx()
    lr_axes.plot(x, rates, color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
    lr_axes.set_ylabel("learning rate")
    lines = axes.get_legend_handles_labels()[0] + lr_axes.get_legend_handles_labels()[0]
    axes.legend(lines, [line.get_label() for line in lines], loc="upper right")
    path = out_dir / "loss.png"
    with tinyllm.atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=120)
    return path


def plot_title(out_dir: Path, summary: Optional[dict]) -> str:
    """The run's model and result, from its config.json and summary where they can be read."""
    title = f"training run in {out_dir}"
    with contextlib.suppress(tinyllm.TinyLLMError, KeyError, TypeError, ValueError):
        c = tinyllm.read_json(out_dir / "config.json", "config")
        title = (f"{c['model_size']}: {c['n_layer']} layers x {c['n_head']} heads x {c['n_embd']} wide, "
                 f"context {c['max_context']}")
        summary = summary or tinyllm.read_json(out_dir / "summary.json", "summary")
        title += (f"\n{summary['parameters']:,} parameters; {summary['steps']:,} steps; full validation "
                  f"loss {summary['full_val_loss']:.4f}")
    return title


def keep_aside(path: Path) -> Path:
    """Rename `path` to the first of NAME.malformed, NAME.malformed.1, ... not yet taken; return it."""
    for n in itertools.count():
        kept = path.with_name(f"{path.name}.malformed" + (f".{n}" if n else ""))
        if not kept.exists():
            os.replace(path, kept)
            return kept


class LossPlot(tinyllm.Callback):
    """Keep every step's training loss and learning rate in steps.csv and draw loss.png at the end;
    without matplotlib, say how to get it and finish anyway."""
    # The losses are read from the device once per validation and checkpoint, never per step.

    def __init__(self) -> None:
        self.pending: List[tuple] = []  # (step, loss on the device, learning rate) not yet written

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        path = (trainer.run_dir.path or Path()) / STEPS_CSV
        resumed = trainer.run_dir.writes and trainer.resumed_at is not None
        if resumed and path.exists() and path.stat().st_size:
            try:
                tinyllm.drop_metrics_after(path, trainer.resumed_at, STEPS_COLUMNS)  # those steps come again
                return
            except tinyllm.TinyLLMError:  # hand-edited, say: kept as it is, and a new one started below
                kept = keep_aside(path)
                logger.warning("%s is malformed (not rows of step, train_loss and learning_rate), so it is "
                               "kept as %s, and a new %s starts after step %d", path, kept.name, STEPS_CSV,
                               trainer.resumed_at)
        trainer.run_dir.write(STEPS_CSV, ",".join(STEPS_COLUMNS) + "\n")

    def on_step_end(self, trainer: tinyllm.Trainer) -> None:
        self.pending.append((trainer.state.step, trainer.state.recent_losses[-1], trainer.lr))
        if trainer.state.step % trainer.config.checkpoint_frequency == 0:  # last.pt comes next
            self._write(trainer)  # so a resumed run finds every step up to it

    def on_validation(self, trainer: tinyllm.Trainer, row: dict) -> None:
        self._write(trainer)

    def on_stop(self, trainer: tinyllm.Trainer, reason: str) -> None:
        if reason != "error":  # a stop every process agreed on; after a signal, last.pt is saved next
            self._write(trainer)

    def _write(self, trainer: tinyllm.Trainer) -> None:
        if self.pending:
            # every process's loss of its part of the batch, so the mean is the whole batch's loss
            losses = trainer.world.average(torch.stack([loss for _, loss, _ in self.pending])).tolist()
            trainer.run_dir.write(STEPS_CSV, "".join(f"{step},{loss:.5f},{lr:.4g}\n" for (step, _, lr), loss
                                                     in zip(self.pending, losses)), append=True)
            self.pending = []

    def on_end(self, trainer: tinyllm.Trainer, summary: dict) -> None:
        if not trainer.run_dir.metrics:  # (every step is written: a run validates at its last)
            return
        try:
            logger.info("loss curves drawn in %s", plot_losses(trainer.run_dir.path, summary))
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
            total = trainer.total_steps if trainer.total_steps < math.inf else None  # a budget ends it
            self.bar = tqdm(total=total, initial=trainer.state.step, unit="step",
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
            trainer.evaluation_progress = lambda batches, total: tqdm(
                batches, total=total, desc="final evaluation", unit="batch", leave=False, dynamic_ncols=True)


def duration(seconds: float) -> str:
    """Seconds as a person reads them: 42 s, 3 min 05 s, 1 h 02 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressLog(tinyllm.Callback):
    """Progress where no bar can be drawn (nohup, a notebook, CI, output piped to a file): a log line
    every `every` seconds and at 1%, 10%, 25%, 50%, 75% and 90% of the run."""
    # Each line reads the loss from the device once, so the steps between lines never wait for it.

    MILESTONES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9)

    def __init__(self, every: float = 30.0):
        self.every, self.last_line, self.milestone = every, 0.0, 0  # milestone: the next one's index

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        self.last_line = trainer.clock.elapsed()
        progress = self._progress(trainer)
        self.milestone = sum(progress >= m for m in self.MILESTONES)  # a resumed run is past some

    def on_step_end(self, trainer: tinyllm.Trainer) -> None:
        progress, elapsed = self._progress(trainer), trainer.clock.elapsed()
        reached = sum(progress >= m for m in self.MILESTONES)
        if reached <= self.milestone and elapsed - self.last_line < self.every:
            return
        self.milestone, self.last_line = max(self.milestone, reached), elapsed
        state, c, seconds = trainer.state, trainer.config, trainer.clock.train_seconds()
        loss = torch.stack(state.recent_losses).mean().item() if state.recent_losses else math.nan
        epoch = state.step / trainer.steps_per_epoch  # in whole and part epochs, as a reader counts them
        # The first step's time is kept out of the training time, so right after it there is no rate yet.
        rate = f"{state.tokens_seen / seconds:,.0f} tokens/s" if seconds > 0.5 else "no tokens/s yet"
        timed_steps = state.step - trainer.first_step  # the steps that train_seconds counts
        if c.time_budget:
            left = f", about {duration(c.time_budget - elapsed)} left"
        else:  # from the pace of the steps so far, not the time before them (measuring, compiling)
            left = f", about {duration((trainer.total_steps - state.step) * seconds / timed_steps)} left" \
                if timed_steps > 0 else ""
        of_steps = f" of {trainer.total_steps}" if trainer.total_steps < math.inf else ""
        of_epochs = f" of {trainer.epochs}" if trainer.epochs < math.inf else ""
        logger.info("step %d%s (%.0f%%), epoch %.2f%s: train loss %.4f, %s; %s elapsed%s", state.step,
                    of_steps, 100 * progress, epoch, of_epochs, loss, rate, duration(elapsed), left)

    def on_stop(self, trainer: tinyllm.Trainer, reason: str) -> None:
        trainer.evaluation_progress = functools.partial(self._final_evaluation, trainer)

    @staticmethod
    def _final_evaluation(trainer: tinyllm.Trainer, batches: Iterator, total: int) -> Iterator:
        """Say what the minute or so of silence after the last step is."""
        logger.info("the final evaluation: the best model on %s validation tokens, %d batches",
                    f"{trainer.full_val_tokens:,}", total)
        return batches

    @staticmethod
    def _progress(trainer: tinyllm.Trainer) -> float:
        """The share of the run done: of its steps, or of its time budget, whichever is further."""
        spent = trainer.clock.budget_spent(trainer.state.tokens_seen // trainer.world.size)
        return min(1.0, max(trainer.state.step / max(trainer.total_steps, 1), spent))


def standard_callbacks(*, progress_bar: bool = False) -> List[tinyllm.Callback]:
    """Every trainer plug-in here. StopOnSignals comes last: its on_stop may end the run."""
    progress = ProgressBar() if progress_bar else ProgressLog()
    return [progress, MeasuredSettings(), ModelFlopsUtilization(), MemorisingNote(), LossPlot(),
            StopOnSignals()]
