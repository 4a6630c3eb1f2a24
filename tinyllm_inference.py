"""Using a trained tinyllm model beyond plain sampling: int8 weights; text streamed as it is
generated, with stop strings, for one sample or a batch of them; and a compiled one-token step,
where compiling pays back its cost.

tinyllm.py names `quantize_int8` in its QUANTIZATIONS registry, so a checkpoint saved with int8
weights loads through `tinyllm.load_checkpoint` and imports this module only then.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import os
import statistics
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import tinyllm
import tinyllm_hooks
from tinyllm import logger


class Int8Linear(nn.Module):
    """A linear layer stored as int8 weights with one float scale per output channel (weight-only:
    activations stay in floating point, and the weights are expanded back as they are used)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # each row's largest magnitude -> 127
        quantized = cls(linear.in_features, linear.out_features).to(weight.device)
        quantized.weight.copy_(torch.round(weight / scales[:, None]).to(torch.int8))
        quantized.scales.copy_(scales)
        return quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


def quantize_int8(model: tinyllm.TransformerModel) -> tinyllm.TransformerModel:
    """Replace every nn.Linear of `model` by an Int8Linear, in place: about 4x smaller weights.
    Embeddings and norm gains stay in float; they are a small share of the weights."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    model.quantization = "int8"
    return model


class TextStream:
    """One sample's tokens decoded into text as they come. Text that might begin a stop string is held
    back, and so are the bytes of a character not yet complete; `done` once a stop string appears."""

    def __init__(self, tokenizer: tinyllm.Tokenizer, stop: Sequence[str] = ()):
        stop = [stop] if isinstance(stop, str) else list(stop)  # one string is one stop, not its letters
        if not all(isinstance(s, str) for s in stop):
            raise tinyllm.TinyLLMError(f"stop strings must be strings, got {stop!r}")
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.pending: List[int] = []  # tokens not yet whole characters
        self.held = ""  # text that may start a stop string
        self.done = False

    def add(self, token: int) -> str:
        """The text that `token` lets out (often all of it, sometimes nothing yet)."""
        if self.done:
            return ""
        self.pending.append(token)
        piece = self.tokenizer.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < 4:  # a UTF-8 character still incomplete
            return ""
        self.held, self.pending = self.held + piece, []
        hits = [self.held.find(s) for s in self.stop if s in self.held]
        if hits:
            self.done = True
            return self.held[:min(hits)]
        keep = max((n for s in self.stop for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return out

    def flush(self) -> str:
        """What was held back, once generation has ended without a stop string."""
        rest = "" if self.done else self.held + self.tokenizer.decode(self.pending)
        self.held, self.pending = "", []
        return rest


def check_generation_memory(model: tinyllm.TransformerModel, num_samples: int, device: torch.device) -> None:
    """Refuse, before allocating, a batch of samples that cannot fit in the device's memory."""
    # Each sample holds a KV cache (keys and values of every layer, max_context positions) and, while a
    # window is filled, about a dozen activations of n_embd per position and layer, attention scores
    # and the logits.
    c = model.config
    per_position = 2 * c.n_layer * c.n_embd + 12 * c.n_embd + c.n_head * c.max_context + 3 * c.vocab_size
    per_sample, available = 4 * c.max_context * per_position, tinyllm.device_memory(device)
    needed, gib = num_samples * per_sample, 2**30
    if available is not None and needed > available:
        raise tinyllm.TinyLLMError(f"{num_samples:,} samples in one batch need about {needed / gib:,.1f} GiB "
                                   f"of memory ({per_sample / 2**20:.1f} MiB each: a KV cache and a window's "
                                   f"activations), more than the {available / gib:,.1f} GiB of {device}; "
                                   "ask for fewer samples")


def stream_samples(model: tinyllm.TransformerModel, tokenizer: tinyllm.Tokenizer, prompt: str, length: int, *,
                   num_samples: int = 1, stop: Sequence[str] = (), lowercase: bool = True,
                   normalize_whitespace: bool = True, seed: Optional[int] = None,
                   **sampling: Any) -> Iterator[tuple]:
    """Yield (sample number, text piece) as `num_samples` continuations of `prompt`, of up to `length`
    tokens, are generated in one batch, each ending before its first `stop` string (not yielded)."""
    # The prompt is preprocessed as the training text was (see `tinyllm.sample_text`). The batch ends
    # when every sample has; the same seed and number of samples give the same samples. `sampling`: see
    # `tinyllm.generate_blocks`.
    if num_samples < 1:
        raise tinyllm.TinyLLMError(f"num_samples must be at least 1, got {num_samples}")
    device = next(model.parameters()).device
    check_generation_memory(model, num_samples, device)
    prompt = tinyllm.prepare_text(prompt, lowercase, normalize_whitespace)
    idx = tinyllm.encode_prompt(tokenizer, prompt, device).expand(num_samples, -1)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    streams = [TextStream(tokenizer, stop) for _ in range(num_samples)]
    for block in tinyllm.generate_blocks(model, idx, length, generator=generator, **sampling):
        for tokens in zip(*block.tolist()):  # a position's tokens, one per sample
            for number, (stream, token) in enumerate(zip(streams, tokens)):
                piece = stream.add(token)
                if piece:
                    yield number, piece
            if all(stream.done for stream in streams):
                return
    for number, stream in enumerate(streams):
        rest = stream.flush()
        if rest:
            yield number, rest


def stream_text(model: tinyllm.TransformerModel, tokenizer: tinyllm.Tokenizer, prompt: str, length: int,
                **options: Any) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece as it is generated; see `stream_samples`."""
    for _, piece in stream_samples(model, tokenizer, prompt, length, num_samples=1, **options):
        yield piece


def sample_texts(model: tinyllm.TransformerModel, tokenizer: tinyllm.Tokenizer, prompt: str, length: int, *,
                 num_samples: int, **options: Any) -> List[str]:
    """`num_samples` continuations of `prompt` generated in one batch, each with the prompt before it."""
    texts = [tinyllm.prepare_text(prompt, options.get("lowercase", True),
                                  options.get("normalize_whitespace", True))] * num_samples
    for number, piece in stream_samples(model, tokenizer, prompt, length, num_samples=num_samples, **options):
        texts[number] += piece
    return texts


# ----------------------------------------------------------------------------------------------
# A compiled one-token step, where it pays


# Before a model's steps were timed here: a compiled one-token step takes a third of the eager one's
# time (it fuses about 150 small operations, each paying PyTorch's fixed dispatch cost), and compiling
# it costs what MeasuredSettings assumes for training (30 s; a CPU's library took 22-30 s to build).
GUESSED_SPEEDUP = 3.0
GUESSED_LOAD_SECONDS = 0.1  # to load a library built before, in a new process (0.02 s measured)
DECODE_PACKAGES = tinyllm_hooks.CACHE / "tinyllm" / "decode"  # PackagedDecodeStep's compiled libraries


def generation_key(model: tinyllm.TransformerModel, batch_size: int) -> str:
    """What the speed of a one-token step depends on: the chip, torch, the model's shape and the batch."""
    m, device = model.config, next(model.parameters()).device
    return (f"{tinyllm_hooks.chip_name(device)} | torch {torch.__version__} | generate "
            f"{m.n_layer}x{m.n_head}x{m.n_embd}, vocab {m.vocab_size}, context {m.max_context}"
            f"{', int8' if model.quantization else ''} | batch {batch_size}")


def with_defaults(sampling: dict) -> dict:
    """`sampling` with `tinyllm.generate_blocks`' defaults, as it passes them to a one-token step."""
    defaults = inspect.signature(tinyllm.generate_blocks).parameters
    return {name: sampling.get(name, defaults[name].default) for name in ("temperature", "top_k", "top_p")}


def time_decode_step(model: tinyllm.TransformerModel, step: Callable, batch_size: int,
                     repeats: int = 20, **sampling: Any) -> tuple:
    """(seconds of the first call, median seconds of the calls after it) of `step` on a scratch cache."""
    device, times, sampling = next(model.parameters()).device, [], with_defaults(sampling)
    with torch.inference_mode():  # as in generation: a tensor from outside makes a compiled step recompile
        cache = tinyllm.KVCache(model, batch_size)
        token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        race = torch.ones(batch_size, model.config.vocab_size, device=device)
        for position in range(min(repeats + 1, model.max_context)):
            started = time.perf_counter()
            step(token, torch.tensor([position], device=device), cache, race, **sampling).sum().item()
            times.append(time.perf_counter() - started)  # .item() waited for the device
    return times[0], statistics.median(times[1:] or times)


def compile_decode_step(model: tinyllm.TransformerModel,
                        folder: Optional[tinyllm.PathLike] = None) -> Callable:
    """`tinyllm.next_token` for `model`, compiled, falling back to eager with a warning if compiling
    fails."""
    # A one-token step is a few dozen small kernels, so what is left to win is the overhead around
    # them: on a GPU, torch.compile with CUDA graphs launches them all at once; on a CPU, AOTInductor
    # builds a library that C++ calls without Python (see PackagedDecodeStep).
    eager = functools.partial(tinyllm.next_token, model)
    if next(model.parameters()).device.type == "cpu":
        return tinyllm_hooks.EagerFallback(PackagedDecodeStep(model, folder or DECODE_PACKAGES), eager)
    skip_module_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
    options = {"guard_filter_fn": skip_module_guards} if skip_module_guards else {}
    options["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets
    compiled = torch.compile(eager, dynamic=False, options=options)
    return tinyllm_hooks.EagerFallback(with_static_cache(compiled, eager), eager)


def with_static_cache(compiled: Callable, eager: Callable) -> Callable:
    """`compiled` for one-token steps, with each new cache's tensors marked as staying at their
    addresses, and `eager` for a window's fill (each length would be a graph of its own)."""
    # A CUDA graph replays fixed addresses, so it skips (runs without graphs) a step that writes in
    # place to an input it would have to copy; a marked cache is written where it lies (as a static
    # cache in Hugging Face transformers does), and a new cache only makes the graph be recorded again.
    marked: weakref.WeakSet = weakref.WeakSet()  # the caches marked so far, while they live

    def step(tokens: torch.Tensor, positions: torch.Tensor, cache: tinyllm.KVCache, race: torch.Tensor,
             **sampling: Any) -> torch.Tensor:
        if tokens.shape[1] > 1:
            return eager(tokens, positions, cache, race, **sampling)
        if cache not in marked:
            for tensor in cache.tensors:
                torch._dynamo.mark_static_address(tensor, guard=False)
            marked.add(cache)
        return compiled(tokens, positions, cache, race, **sampling)

    return step


class ExportedStep(nn.Module):
    """`tinyllm.next_token` as torch.export takes it: tensors in (the cache's too), the sampling fixed."""

    def __init__(self, model: tinyllm.TransformerModel, sampling: dict):
        super().__init__()
        self.model, self.sampling = model, sampling

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, race: torch.Tensor,
                *cache_tensors: torch.Tensor) -> torch.Tensor:
        cache = tinyllm.KVCache(self.model, tokens.shape[0], cache_tensors)
        return tinyllm.next_token(self.model, tokens, positions, cache, race, **self.sampling)


class PackagedDecodeStep:
    """The cache's steps on a CPU, compiled ahead of time: torch.export captures them and AOTInductor
    builds a shared library with the weights inside, which C++ runs with no Python between kernels."""
    # Called through torch.compile instead, this small model's step spends more time in the Python
    # around the compiled code (guards, wrappers, ~40 tensor arguments) than in its kernels. The
    # library holds two programs: the one-token step, and the refill of a window after it jumps
    # (max_context // 2 tokens; eager, it costs as much as 50 one-token steps); a prompt of another
    # length runs eager. A library is built per batch size and sampling settings (they are part of
    # the code) and kept in `folder` under a name hashed from them, the weights and torch, so the next
    # run only loads it.

    KEEP = 16  # the newest libraries kept in the folder; older ones are deleted

    def __init__(self, model: tinyllm.TransformerModel, folder: tinyllm.PathLike):
        self.model, self.folder = model, Path(folder)
        self.lengths = sorted({1, model.window_after_jump})  # the token counts it has programs for
        self.weights_hash, self.weights_seen = "", ()  # set by read_weights
        self.runners: dict = {}  # (batch size, sampling) -> the library's programs by token count
        # The latest cache (a weak reference), its sampling and its programs: what a generation's steps use.
        self.current: tuple = (lambda: None, {}, {})
        self.read_weights()

    def weights_state(self) -> tuple:
        """Which tensors the model holds and how often each was changed in place (an optimizer's step
        changes them all): cheap, so it is checked once a generation."""
        return tuple((id(t), 0 if t.is_inference() else t._version)  # inference tensors count no changes
                     for t in self.model.state_dict(keep_vars=True).values())

    def read_weights(self) -> None:
        """Hash the model's weights, which name its libraries; the programs loaded before are dropped."""
        digest = hashlib.sha256()
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        self.weights_hash, self.weights_seen, self.runners = digest.hexdigest(), self.weights_state(), {}

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, cache: tinyllm.KVCache,
                 race: torch.Tensor, **sampling: Any) -> torch.Tensor:
        cache_seen, sampling_seen, programs = self.current
        if cache is not cache_seen() or sampling != sampling_seen:  # a new generation
            if self.weights_state() != self.weights_seen:  # trained on since: the library must hold today's
                self.read_weights()
            programs = self.programs(tokens.shape[0], sampling)
            self.current = weakref.ref(cache), sampling, programs
        if tokens.shape[1] not in programs:  # a prompt: once a generation
            return tinyllm.next_token(self.model, tokens, positions, cache, race, **sampling)
        # The loader's own run, with a flat list of tensors. It reads each tensor as if laid out in order:
        # a window cut from a batch's longer one, or a prompt expanded to a batch, is copied first.
        return programs[tokens.shape[1]].boxed_run([tokens.contiguous(), positions, race, *cache.tensors])[0]

    def programs(self, batch_size: int, sampling: dict) -> dict:
        """The library's programs for `batch_size` and `sampling`, by token count; loaded once."""
        key = (batch_size, tuple(sorted(sampling.items())))
        if key not in self.runners:
            self.runners[key] = self.load(batch_size, sampling)
        return self.runners[key]

    @staticmethod
    def options(batch_size: int, length: int) -> dict:
        """Inductor's settings: one allocation for the step's intermediate tensors (a quarter faster
        than one each), and for one token of one sample, matrix-vector products as Inductor's loops."""
        one_row = batch_size * length == 1
        mm_as_loops = {"post_grad_fusion_options": {"decompose_mm_pass": {}}} if one_row else {}
        return {"memory_planning": True, "aot_inductor.package": True, **mm_as_loops}

    def path(self, batch_size: int, sampling: dict) -> Path:
        """Where the library for `batch_size` and `sampling` lies, once built."""
        # The batch size is in the code (a library run with another one aborts the process), so in the name.
        programs = {length: self.options(batch_size, length) for length in self.lengths}
        name = hashlib.sha256(f"{torch.__version__} {tinyllm_hooks.chip_name(torch.device('cpu'))} "
                              f"{self.model.config} {self.model.quantization} batch {batch_size} {programs} "
                              f"{sorted(sampling.items())} {self.weights_hash}".encode()).hexdigest()[:24]
        return self.folder / f"decode-{name}.pt2"

    def built(self, batch_size: int, sampling: dict) -> bool:
        """Whether the library for `batch_size` and `sampling` lies in the folder, to be loaded."""
        return self.path(batch_size, sampling).exists()

    def load(self, batch_size: int, sampling: dict) -> dict:
        """The programs for `batch_size` and `sampling`, by token count: from the folder's library, or
        built and saved there. A library that does not load (truncated, say) is built again."""
        path = self.path(batch_size, sampling)
        if path.exists():
            os.utime(path)  # recently used: kept
            try:
                return self.programs_in(path)
            except Exception as e:
                logger.warning("%s does not load (%s); building it again", path, tinyllm_hooks.first_line(e))
        self.build(path, batch_size, sampling)
        return self.programs_in(path)

    def programs_in(self, path: Path) -> dict:
        """The library's programs, loaded, by the number of tokens each takes."""
        return {length: load_program(path, f"tokens{length}") for length in self.lengths}

    def build(self, path: Path, batch_size: int, sampling: dict) -> None:
        """Export the programs, build them into one library at `path`, and delete all but the newest KEEP."""
        from torch._inductor import package
        cache, files = tinyllm.KVCache(self.model, batch_size), {}
        self.folder.mkdir(parents=True, exist_ok=True)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch 2.13's export warns of its own internals
            for length in self.lengths:
                inputs = (torch.zeros(batch_size, length, dtype=torch.long), torch.arange(length),
                          torch.ones(batch_size, self.model.config.vocab_size), *cache.tensors)
                program = torch.export.export(ExportedStep(self.model, sampling), inputs)
                files[f"tokens{length}"] = torch._inductor.aot_compile(
                    program.module(check_guards=False), inputs, options=self.options(batch_size, length))
        # Packed under a name of this process's own, then renamed: a crash mid-build leaves no library to
        # load, and two processes building the same one do not write into one file.
        partial = path.with_name(f"partial-{os.getpid()}-{path.name}")
        package.package_aoti(str(partial), files)
        os.replace(partial, path)
        for old in sorted(self.folder.glob("decode-*.pt2"), key=lambda p: p.stat().st_mtime)[:-self.KEEP]:
            old.unlink(missing_ok=True)


def load_program(path: Path, name: str) -> Any:
    """The program `name` of the library at `path`, through AOTInductor's C++ loader itself, whose
    `boxed_run` takes a flat list of tensors."""
    # The Python package around it (torch._inductor.package) takes 2-3 s to import, where the loader
    # loads a library's two programs in 0.02 s, and its `__call__` parses a tree of arguments each
    # time (it cost half as much as the step itself).
    return torch._C._aoti.AOTIModelPackageLoader(str(path), name, False, 1, -1)  # one runner, on the CPU


def choose_decode_step(model: tinyllm.TransformerModel, *, tokens: int, batch_size: int = 1,
                       compile: Optional[bool] = None, record_path: Optional[tinyllm.PathLike] = None,
                       **sampling: Any) -> Callable:
    """The one-token step for `tokens` tokens with `sampling`: compiled if asked, or where the time it
    saves (measured, or guessed) exceeds the time it takes to be ready; else `tinyllm.next_token`."""
    # The choice is logged, and a compiled step's timings are recorded.
    timings, eager = recorded_decode_timings(model, batch_size, record_path), functools.partial(
        tinyllm.next_token, model)
    step = compile_decode_step(model) if compile is not False else eager
    packaged = isinstance(getattr(step, "module", None), PackagedDecodeStep)
    built = packaged and step.module.built(batch_size, with_defaults(sampling))  # then it only loads
    if compile is None:
        eager_seconds = timings.get("eager") or time_decode_step(model, eager, batch_size, 5, **sampling)[1]
        compiled = timings.get("compiled") or eager_seconds / GUESSED_SPEEDUP
        cost = ready_timing(timings, packaged=packaged, built=built)[1]
        compile = tinyllm_hooks.compile_pays(relative_gain=1 - compiled / eager_seconds,
                                             remaining_seconds=eager_seconds * tokens, compile_seconds=cost)
        logger.info("one-token step %s: %s tokens at %.2f ms eager%s, compiled %.2f ms (%s), %s %.1f s",
                    "compiled" if compile else "eager", f"{tokens:,}", 1000 * eager_seconds,
                    "" if "eager" in timings else " (timed now)", 1000 * compiled,
                    "measured" if "compiled" in timings else "a guess",
                    "loading it" if built else "compiling", cost)
    if not compile:
        return eager
    first, seconds = time_decode_step(model, step, batch_size, **sampling)
    if step.module is not step.eager:  # it compiled: keep what it cost and gave
        ready = ready_timing(timings, packaged=packaged, built=built)[0]
        record_decode_timings(model, batch_size, {ready: first, "compiled": seconds}, record_path)
    return step


def ready_timing(timings: dict, *, packaged: bool, built: bool) -> tuple:
    """(the timing's name, seconds from `timings` or guessed) of getting a compiled step ready: loading
    a library built before, building one (on a CPU), or compiling (on a GPU)."""
    # On a GPU a compile is faster from PyTorch's cache once one is on record.
    cold = timings.get("compile seconds")
    if built:
        # Named anew when loading went from 3 s to 0.02 s (load_program), so older records go unread.
        return "library load seconds", timings.get("library load seconds", GUESSED_LOAD_SECONDS)
    if packaged or not cold:
        return "compile seconds", cold or tinyllm_hooks.GUESSED_COMPILE_SECONDS
    warm = timings.get("warm compile seconds")
    return "warm compile seconds", warm or tinyllm_hooks.WARM_COMPILE_SHARE * cold


def recorded_decode_timings(model: tinyllm.TransformerModel, batch_size: int,
                            record_path: Optional[tinyllm.PathLike] = None) -> dict:
    """The one-token step's timings recorded on this machine: seconds per step "eager" and "compiled",
    "compile seconds" (the first compile) and "warm compile seconds" (with PyTorch's cache warm)."""
    path = Path(record_path or tinyllm_hooks.MEASUREMENTS)
    return tinyllm_hooks.read_measurements(path).get(generation_key(model, batch_size), {})


def record_decode_timings(model: tinyllm.TransformerModel, batch_size: int, timings: dict,
                          record_path: Optional[tinyllm.PathLike] = None) -> None:
    """Add `timings` to the record that `recorded_decode_timings` reads."""
    key = generation_key(model, batch_size)
    old = recorded_decode_timings(model, batch_size, record_path)
    tinyllm_hooks.write_measurements(Path(record_path or tinyllm_hooks.MEASUREMENTS), key, {**old, **timings})
