"""Train a character-level transformer on Tiny Shakespeare (or any UTF-8 text), or use one.

    python train_shakespeare.py                        # download the text if needed, train, sample
    python train_shakespeare.py --generate --prompt "ROMEO:" --top-p 0.9
    python train_shakespeare.py --init-from out/best.pt --data my.txt --out-dir out/mine
    python train_shakespeare.py --evaluate --quantize int8
    python train_shakespeare.py --plot --out-dir out/mine
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import gc
import hashlib
import itertools
import logging
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path
from statistics import median
from typing import Iterator, List, Optional, Sequence

import torch
from tqdm import tqdm

import tinyllm
import tinyllm_hooks
import tinyllm_data
import tinyllm_inference

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
HERE = Path(__file__).resolve().parent
# In a checkout, data/ beside this file; installed (`pip install .`, the `tinyllm` command), the cache.
DEFAULT_DATA = (HERE / "data" if (HERE / "data").is_dir() else tinyllm_hooks.CACHE / "tinyllm") / \
    "shakespeare.txt"

# Command-line flags that set the TrainingConfig field of the same name, then the two that differ.
CONFIG_FLAGS = {name: name for name in (
    "tokenizer", "vocab_size", "epochs", "max_steps", "time_budget", "batch_size", "learning_rate",
    "max_context", "val_frequency", "checkpoint_frequency", "sample_frequency", "sample_length",
    "temperature", "lowercase", "normalize_whitespace", "seed", "device", "dtype", "compile", "out_dir",
    "n_layer", "n_head", "n_embd", "dropout", "init_from", "optimizer")}
CONFIG_FLAGS.update(size="model_size", metrics_csv="metrics_csv_enabled")
# The library names a setting as `field` in its messages; here each becomes its flag.
FLAG_OF = {field: f"--{flag.replace('_', '-')}" for flag, field in CONFIG_FLAGS.items()}
FLAG_OF.update(text="--data", resume="--resume", overwrite="--overwrite", top_k="--top-k", top_p="--top-p")


def in_flags(message: str) -> str:
    """A library message as the command line says it: `max_context` becomes --max-context, and a
    setting without a flag is named as a --config field."""
    return re.sub(r"`(\w+)`", lambda m: FLAG_OF.get(m.group(1), f"{m.group(1)} (a --config field)"), message)


def load_installed_plugins() -> None:
    """Add the tokenizers and model sizes that installed packages declare as entry points (groups
    `tinyllm.tokenizers` and `tinyllm.model_sizes`); one that fails gets a warning naming it."""
    groups = {"tinyllm.tokenizers": tinyllm.TOKENIZERS, "tinyllm.model_sizes": tinyllm.MODEL_SIZES}
    for group, registry in groups.items():
        for plugin in metadata.entry_points(group=group):
            problem = register_plugin(registry, plugin)
            if problem:
                warnings.warn(f"tinyllm: {registry.kind} plugin {plugin.name!r} ({plugin.value}) is ignored: "
                              f"{problem}")


def register_plugin(registry: tinyllm.Registry, plugin: metadata.EntryPoint) -> Optional[str]:
    """Register one entry point (again is fine); say what is wrong with it instead, if anything."""
    try:  # a broken plug-in must not break unrelated commands
        entry = plugin.load()
        if registry.entries.get(plugin.name, entry) is not entry:
            return "that name is already taken"
        registry.register(plugin.name, entry)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (exit code 2) instead of a usage dump."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def default(field: str) -> str:
    """A TrainingConfig field's default, for --help."""
    value = {f.name: f.default for f in dataclasses.fields(tinyllm.TrainingConfig)}[field]
    if value is None:
        return ("from --size" if field in tinyllm.MODEL_FIELDS else
                "10, or no limit with --time-budget" if field == "epochs" else "none")
    return str(value)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_flags in (data_flags, model_flags, training_flags, output_flags, device_flags, generation_flags):
        add_flags(p)
    return p.parse_args(argv)


def data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, nargs="+", help="UTF-8 text files or folders, read recursively "
                   "(default: Tiny Shakespeare, downloaded once); your own text is kept as it is unless "
                   "you pass --lowercase or --normalize-whitespace")
    g.add_argument("--include", action="append", default=[], help="in folders, read only files matching "
                   "this pattern, e.g. '*.py' (repeatable; default: every file)")
    g.add_argument("--val-data", type=Path, nargs="+", help="validate on these files or folders (default: "
                   "whole files held out of a folder, or the last part of one file)")
    g.add_argument("--token-cache", type=Path, help="folder for the token files that --data is tokenized "
                   "into once (default: ~/.cache/tinyllm/tokens, or $XDG_CACHE_HOME/tinyllm/tokens)")
    g.add_argument("--tokenizer", help=f"{', '.join(tinyllm.TOKENIZERS.names())} "
                   f"(default: {default('tokenizer')})")
    g.add_argument("--vocab-size", type=int, help="vocabulary size of a tokenizer that learns one (bpe: 768)")
    g.add_argument("--lowercase", action=argparse.BooleanOptionalAction,
                   help="lowercase the text (default: on for Tiny Shakespeare, off for --data)")
    g.add_argument("--normalize-whitespace", action=argparse.BooleanOptionalAction,
                   help="tidy spaces and blank lines (default: on for Tiny Shakespeare, off for --data)")


def model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--size", help=f"{', '.join(tinyllm.MODEL_SIZES.names())} "
                   f"(default: {default('model_size')})")
    for flag, kind, what in [("n-layer", int, "blocks"), ("n-head", int, "attention heads"),
                             ("n-embd", int, "width"), ("dropout", float, "dropout rate"),
                             ("max-context", int, "tokens the model sees at once")]:
        g.add_argument(f"--{flag}", type=kind, help=f"{what} (default: {default(flag.replace('-', '_'))})")
    g.add_argument("--init-from", help="fine-tune this checkpoint on --data (fresh optimizer and schedule)")


def training_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    for flag, kind, what in [("epochs", int, "passes over the text"),
                             ("max-steps", int, "stop after this many steps"),
                             ("time-budget", float, "seconds for the whole run, final evaluation included"),
                             ("batch-size", int, "windows per step (per process under torchrun)"),
                             ("learning-rate", float, "peak learning rate"),
                             ("seed", int, "seeds the weights, the batch order and the samples")]:
        g.add_argument(f"--{flag}", type=kind, help=f"{what} (default: {default(flag.replace('-', '_'))})")
    g.add_argument("--optimizer", help=f"{', '.join(tinyllm.OPTIMIZERS.names())}: muon orthogonalises the "
                   f"blocks' updates, adamw is the classic (default: {default('optimizer')})")
    g.add_argument("--config", type=Path, help="JSON file of TrainingConfig fields; flags override it")
    g.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its last.pt")
    g.add_argument("--benchmark", action="store_true", help="print training tokens/s and MFU (median of 3) "
                   "against a plain GPT of the same shape, or with --generate generation tokens/s, then exit")


def output_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", help="where checkpoints, logs and samples go (default: out)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a training run already in --out-dir (with --quantize: an int8 file)")
    for flag, what in [("val-frequency", "validate every N steps"), ("checkpoint-frequency", "save last.pt "
                       "every N steps"), ("sample-frequency", "log a sample every N steps"),
                       ("sample-length", "tokens in each sample logged while training")]:
        g.add_argument(f"--{flag}", type=int, help=f"{what} (default: {default(flag.replace('-', '_'))})")
    g.add_argument("--metrics-csv", action=argparse.BooleanOptionalAction,
                   help="write metrics.csv (default: on)")
    g.add_argument("--quiet", action="store_true",
                   help="the console shows warnings only (the log has everything)")
    g.add_argument("--plot", action="store_true", help="draw loss.png from <out-dir>/metrics.csv, then exit")


def device_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("device and distributed (launch with torchrun for several processes)")
    g.add_argument("--device", choices=tinyllm.DEVICES,
                   help="auto: CUDA, then MPS, then the CPU (default: auto)")
    g.add_argument("--dtype", choices=list(tinyllm.DTYPES), help="auto: measured on a CPU (default: auto)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the training step, or with --generate the one-token step "
                   "(default: where measuring shows it pays)")
    g.add_argument("--threads", type=int, help="CPU threads per process, as OMP_NUM_THREADS sets them; "
                   "fewer on a busy machine (default: OMP_NUM_THREADS, else measured on a CPU)")


def generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (and other uses of a trained model)")
    g.add_argument("--generate", action="store_true", help="stream a sample instead of training")
    g.add_argument("--evaluate", action="store_true", help="print the full validation loss on --data")
    g.add_argument("--checkpoint", type=Path, help="checkpoint to use (default: <out-dir>/best.pt)")
    g.add_argument("--quantize", choices=["int8"], help="int8 weights: with --generate or --evaluate, "
                   "in memory; alone, write <checkpoint>.int8.pt")
    g.add_argument("--prompt", default="", help="text to continue (default: a newline)")
    g.add_argument("--num-chars", type=int, default=500, help="how many tokens to generate (default: 500)")
    g.add_argument("--num-samples", type=int, default=1,
                   help="samples drawn at once, in one batch, each under its own header (default: 1)")
    g.add_argument("--temperature", type=float,
                   help=f"sampling temperature, also in training (default: {default('temperature')})")
    g.add_argument("--top-k", type=int, help="sample only from the k most likely tokens (1: greedy)")
    g.add_argument("--top-p", type=float, help="sample only from the most likely tokens holding this mass")
    g.add_argument("--stop", action="append", default=[], help="end before this string (repeatable)")


def fields_given(args: argparse.Namespace) -> set:
    """The TrainingConfig fields that the flags or the --config file set."""
    from_file = tinyllm.read_json(args.config, "config") if args.config else {}
    return {field for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None} | set(from_file)


def build_config(args: argparse.Namespace) -> tinyllm.TrainingConfig:
    """Defaults, overridden by the fields in --config, overridden by each flag given. A user's own text
    keeps its case and whitespace by default: in code or data they carry meaning."""
    flags = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()
             if getattr(args, flag) is not None}
    kept_as_is = {"lowercase": False, "normalize_whitespace": False} if args.data else {}
    from_file = tinyllm.read_json(args.config, "config") if args.config else {}
    source = f"config file {args.config}" if args.config else "config"
    return tinyllm.TrainingConfig.from_dict({**kept_as_is, **from_file, **flags}, source=source)


def download(url: str, path: Path, sha256: str, timeout: float = 30.0) -> Path:
    """Download `url` to `path` with a progress bar, verify its sha256, and write it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, tinyllm.atomic_write(path) as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}",
                      disable=not sys.stderr.isatty()) as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if digest.hexdigest() != sha256:  # raising here makes atomic_write drop the file
                raise tinyllm.TinyLLMError(f"download from {url} has sha256 {digest.hexdigest()}, "
                                           f"expected {sha256}; download it by hand and save it as {path}")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", None) or e
        raise tinyllm.TinyLLMError(f"could not download {url} ({reason}); if you are offline, "
                                   f"fetch that file elsewhere and save it as {path}") from None
    return path


def shakespeare_file(path: Path) -> Path:
    """The default data's file: the local copy, or downloaded and verified once. A local copy is checked
    too (1 MB, a few ms): one cut short or edited is used as it is, but not passed off as the real one."""
    for partial in path.parent.glob(f".{path.name}.*.tmp"):  # a download killed midway
        partial.unlink()
    if not path.exists():
        print(f"downloading Tiny Shakespeare to {path} ...", file=sys.stderr)
        download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
    elif path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != SHAKESPEARE_SHA256:
        print(f"warning: {path} is not the Tiny Shakespeare this program downloads (its sha256 differs: "
              "cut short or edited?); training on it as it is; delete it to download it again",
              file=sys.stderr)
    return path


def corpus(args: argparse.Namespace, *, default_ready: bool = False) -> tinyllm_data.Corpus:
    """--data (or Tiny Shakespeare: fetched or checked here unless `default_ready`), --include and
    --val-data as a data source for the Trainer."""
    paths = args.data or [DEFAULT_DATA if default_ready else shakespeare_file(DEFAULT_DATA)]
    return tinyllm_data.Corpus(paths, include=args.include,
                               val_paths=args.val_data or (),
                               cache_dir=args.token_cache, progress=not args.quiet)


def checkpoint_path(args: argparse.Namespace) -> Path:
    """--checkpoint, or <out-dir>/best.pt; it must exist."""
    path = args.checkpoint or Path(args.out_dir or "out") / "best.pt"
    if not path.exists():
        raise tinyllm.TinyLLMError(f"no checkpoint at {path}; train first or pass --checkpoint PATH")
    return path


def load_for_inference(args: argparse.Namespace) -> tinyllm.Checkpoint:
    """The checkpoint to use, int8-quantized if asked."""
    device = tinyllm.resolve_device(args.device or "auto")
    if device.type == "cuda":  # TF32 tensor cores for float32 products, as in training
        torch.backends.cuda.matmul.allow_tf32 = True
    checkpoint = tinyllm.load_checkpoint(checkpoint_path(args), device)
    if args.quantize and not checkpoint.model.quantization:
        tinyllm_inference.quantize_int8(checkpoint.model)
    return checkpoint


def sampling_settings(args: argparse.Namespace, checkpoint: tinyllm.Checkpoint) -> dict:
    """--temperature (by default the checkpoint's), --top-k and --top-p, as `generate_tokens` takes them."""
    temperature = args.temperature if args.temperature is not None else checkpoint.config.temperature
    return dict(temperature=temperature, top_k=args.top_k, top_p=args.top_p)


def generation_stream(args: argparse.Namespace, checkpoint: tinyllm.Checkpoint, **options):
    """The prompt (as the model sees it) and an iterator of (sample number, text piece) generated after it;
    the one-token step is chosen here (and logged) unless `options` name one."""
    for flag, value in (("--num-chars", args.num_chars), ("--num-samples", args.num_samples)):
        if value <= 0:
            raise tinyllm.TinyLLMError(f"{flag} must be positive, got {value}")
    if args.seed is not None and not 0 <= args.seed < 2**32:  # the range training accepts
        raise tinyllm.TinyLLMError(f"--seed must be in [0, 2**32), got {args.seed}")
    options.setdefault("stop", args.stop)
    options.setdefault("num_samples", args.num_samples)
    config = checkpoint.config
    prep = dict(lowercase=config.lowercase, normalize_whitespace=config.normalize_whitespace)
    sampling = sampling_settings(args, checkpoint)
    # Bad settings or a prompt with unseen characters fail now, before anything is printed.
    tinyllm.check_sampling(**sampling)
    tinyllm.encode_prompt(checkpoint.tokenizer, tinyllm.prepare_text(args.prompt, **prep))
    if options.get("use_cache", True) and "decode_step" not in options:
        with info_on_stderr(args.quiet):  # which one-token step runs, and why
            options["decode_step"] = tinyllm_inference.choose_decode_step(
                checkpoint.model, tokens=args.num_chars, batch_size=args.num_samples, compile=args.compile,
                **sampling)
    pieces = tinyllm_inference.stream_samples(checkpoint.model, checkpoint.tokenizer, args.prompt,
                                              args.num_chars, **sampling, **prep, **options)
    return tinyllm.prepare_text(args.prompt, **prep), pieces


@contextlib.contextmanager
def info_on_stderr(quiet: bool) -> Iterator[None]:
    """The library's INFO lines on stderr (unless `quiet`), while generating: stdout carries the text."""
    handler, level = logging.StreamHandler(sys.stderr), tinyllm.logger.level
    if not quiet:
        tinyllm.logger.addHandler(handler)
        tinyllm.logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        tinyllm.logger.removeHandler(handler)
        tinyllm.logger.setLevel(level)


def generate(args: argparse.Namespace) -> None:
    """Print the prompt, then each piece of the continuation as soon as it is generated; several
    samples are printed one after another, each under its own header."""
    prompt, pieces = generation_stream(args, load_for_inference(args), seed=args.seed)
    if args.num_samples == 1:
        print(prompt, end="", flush=True)
        for _, piece in pieces:
            print(piece, end="", flush=True)
        print()
        return
    texts = [""] * args.num_samples
    for number, piece in pieces:
        texts[number] += piece
    for number, text in enumerate(texts):
        print(f"{'' if number == 0 else os.linesep}--- sample {number + 1} of {args.num_samples} ---")
        print(prompt + text)


def time_generation(args: argparse.Namespace, checkpoint: tinyllm.Checkpoint, seed: int, **options) -> tuple:
    """(seconds to the first token, tokens/s over all of them) generating --num-chars tokens per sample;
    stop strings play no part, so every run generates them all."""
    start = time.perf_counter()
    _, pieces = generation_stream(args, checkpoint, seed=seed, stop=(), **options)
    next(pieces)
    first = time.perf_counter() - start
    collections.deque(pieces, maxlen=0)
    return first, args.num_chars * args.num_samples / max(time.perf_counter() - start, 1e-9)


def benchmark_generation(args: argparse.Namespace) -> None:
    """Time to first token, and tokens/s without the KV cache, with it, and (unless --no-compile) with it
    and a compiled one-token step, each the median of 3; the compiled step's build and load times."""
    checkpoint = load_for_inference(args)
    model, batch, sampling = checkpoint.model, args.num_samples, sampling_settings(args, checkpoint)
    eager = functools.partial(tinyllm.next_token, model)
    results = {"uncached": [time_generation(args, checkpoint, seed, use_cache=False) for seed in range(3)],
               "cached": [time_generation(args, checkpoint, seed, decode_step=eager) for seed in range(3)]}
    ready_seconds = []
    if args.compile is not False:
        results["cached, compiled"] = []
        for seed in range(3):
            torch._dynamo.reset()  # a GPU's step compiles each time (from PyTorch's cache after the first)
            step = tinyllm_inference.compile_decode_step(model)
            if seed == 0 and isinstance(step.module, tinyllm_inference.PackagedDecodeStep):  # built once,
                step.module.path(batch, tinyllm_inference.with_defaults(sampling)).unlink(missing_ok=True)
            first, step_seconds = tinyllm_inference.time_decode_step(model, step, batch, **sampling)
            ready_seconds.append(first)  # then loaded
            results["cached, compiled"].append(time_generation(args, checkpoint, seed, decode_step=step))
        timings = {"eager": tinyllm_inference.time_decode_step(model, eager, batch, **sampling)[1],
                   "compiled": step_seconds, "compile seconds": ready_seconds[0]}
        # The later ones: on a GPU compiled from PyTorch's cache; on a CPU the library loaded, as a new
        # process loads it (through the C++ loader alone, with nothing left to import).
        cuda = next(model.parameters()).device.type == "cuda"
        timings["warm compile seconds" if cuda else "library load seconds"] = min(ready_seconds[1:])
        tinyllm_inference.record_decode_timings(model, batch, timings)
    rate = {route: median(r[1] for r in runs) for route, runs in results.items()}
    int8 = ", int8" if model.quantization else ""
    print(f"{model.num_parameters():,} parameters{int8}, batch {batch}, {args.num_chars} tokens each "
          f"(median of 3):")
    for route, runs in results.items():
        print(f"  {route:17} {rate[route]:9,.0f} tokens/s, first token after "
              f"{1000 * median(r[0] for r in runs):.1f} ms")
    print(f"  cached is {rate['cached'] / rate['uncached']:.1f}x uncached", end="")
    if ready_seconds:
        print(f"; compiled is {rate['cached, compiled'] / rate['cached']:.1f}x eager; the compiled step was "
              f"ready after {', '.join(f'{t:.1f}' for t in ready_seconds)} s", end="")
    print()


def evaluate(args: argparse.Namespace) -> None:
    """The full validation loss of a checkpoint on the validation split of --data, as training scores it."""
    checkpoint = load_for_inference(args)
    config = checkpoint.config
    data = corpus(args).prepare(config, checkpoint.tokenizer)
    if data.added_tokens:
        raise tinyllm.TinyLLMError(f"the text has {data.added_tokens} character(s) that the vocabulary of "
                                   f"{checkpoint_path(args)} lacks; evaluate on text like its training text")
    start = time.perf_counter()
    loss = tinyllm.evaluate_full(checkpoint.model, data.val_ids, config.batch_size,
                                 max_tokens=config.full_val_tokens, seed=config.seed)
    bits = tinyllm.bits_per_char(loss, len(data.val_ids), data.val_chars)
    scored = tinyllm.scored_tokens(len(data.val_ids), config.max_context, config.full_val_tokens)
    print(f"full validation loss {loss:.4f} ({bits:.3f} bits/char) on {scored:,} tokens "
          f"({time.perf_counter() - start:.1f} s, {checkpoint.model.quantization or 'float'} weights)")


def quantize(args: argparse.Namespace) -> None:
    """Write an int8 copy of the checkpoint (weights only, no optimizer state) beside it."""
    source = checkpoint_path(args)
    checkpoint = tinyllm.load_checkpoint(source)
    if checkpoint.model.quantization:  # quantizing it again would only copy it
        raise tinyllm.TinyLLMError(f"{source} is {checkpoint.model.quantization}-quantized already; "
                                   "quantize the float checkpoint it came from")
    float_bytes = sum(t.numel() * t.element_size() for t in checkpoint.model.state_dict().values())
    tinyllm_inference.quantize_int8(checkpoint.model)
    target = source.with_suffix(".int8.pt")
    if target.exists() and not args.overwrite:
        raise tinyllm.TinyLLMError(f"{target} already exists; pass --overwrite to replace it")
    tinyllm.save_checkpoint(target, checkpoint.model, None, checkpoint.config, checkpoint.tokenizer,
                            step=checkpoint.step, epoch=checkpoint.epoch,
                            best_val_loss=checkpoint.best_val_loss)
    print(f"wrote {target}: {target.stat().st_size / 1e6:.2f} MB; {source} is "
          f"{source.stat().st_size / 1e6:.2f} MB, of which {float_bytes / 1e6:.2f} MB float weights")


class ReferenceGPT(torch.nn.Module):
    """A plain GPT-2-style model (learned positions, LayerNorm, GELU, a head tied to the embedding),
    trained in float32 without compiling: the yardstick for `--benchmark`'s tokens/s."""

    def __init__(self, vocab_size: int, context: int, n_layer: int, n_head: int, n_embd: int):
        super().__init__()
        nn = torch.nn
        self.n_head = n_head
        self.tokens, self.positions = nn.Embedding(vocab_size, n_embd), nn.Embedding(context, n_embd)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            norm1=nn.LayerNorm(n_embd), qkv=nn.Linear(n_embd, 3 * n_embd), proj=nn.Linear(n_embd, n_embd),
            norm2=nn.LayerNorm(n_embd), up=nn.Linear(n_embd, 4 * n_embd), down=nn.Linear(4 * n_embd, n_embd),
        )) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.tokens(idx) + self.positions(torch.arange(T, device=idx.device))
        for b in self.blocks:
            q, k, v = b.qkv(b.norm1(x)).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.proj(y.transpose(1, 2).reshape(B, T, -1))
            x = x + b.down(torch.nn.functional.gelu(b.up(b.norm2(x))))
        logits = self.norm(x) @ self.tokens.weight.T
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def median_tokens_per_second(step, batches, tokens_per_step: int) -> tuple:
    """Tokens/s of `step(x, y)` (which returns the loss): 5 warm-up steps (they compile, if compiled),
    then three timings of 30 steps; the median, and all three."""
    for _ in range(5):
        step(*next(batches)).item()
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        losses = [step(*next(batches)) for _ in range(30)]
        losses[-1].item()  # wait for the device to finish
        rates.append(30 * tokens_per_step / (time.perf_counter() - start))
    return sorted(rates)[1], rates


def reference_step(trainer: tinyllm.Trainer):
    """A training step of ReferenceGPT in the trainer's shape: plain AdamW, float32, eager."""
    c = trainer.config
    model = ReferenceGPT(trainer.tokenizer.vocab_size, c.max_context, c.n_layer, c.n_head, c.n_embd)
    model.to(trainer.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.learning_rate)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def benchmark(args: argparse.Namespace, world: tinyllm.World) -> None:
    """Time training steps of the configured model on the real data, and of a plain GPT of its shape
    (one process only); nothing is kept."""
    config = dataclasses.replace(build_config(args), out_dir=None)  # nothing is written
    trainer = tinyllm.Trainer(config, corpus(args), quiet=True, world=world)
    settings, meter = tinyllm_hooks.MeasuredSettings(), tinyllm_hooks.ModelFlopsUtilization()
    for callback in (settings, meter):
        callback.on_start(trainer)
    one_epoch = tinyllm.epoch_loader(trainer.train_ids, config.max_context, config.batch_size,
                                     trainer.generator, world.rank, world.size)
    if not len(one_epoch):  # the endless stream below would never yield
        raise tinyllm.TinyLLMError(f"the text gives no batch of {config.batch_size} x {config.max_context} "
                                   f"tokens per process; use more text or a smaller --batch-size")
    batches = (batch for _ in itertools.count() for batch in tinyllm.epoch_loader(
        trainer.train_ids, config.max_context, config.batch_size, trainer.generator, world.rank, world.size))
    tokens_per_step = config.batch_size * config.max_context * world.size
    rate, rates = median_tokens_per_second(lambda x, y: trainer.train_step(x, y, config.learning_rate),
                                           batches, tokens_per_step)
    if world.rank != 0:
        return
    processes = f" x {world.size} processes" if world.size > 1 else ""
    step_kind = "eager" if trainer.train_model is trainer.eager_model else "compiled"
    print(f"{config.n_layer} layers x {config.n_head} heads x {config.n_embd} wide, context "
          f"{config.max_context}, batch {config.batch_size}{processes}, "
          f"{trainer.model.num_parameters():,} parameters, "
          f"{trainer.device} {str(trainer.dtype).removeprefix('torch.')} {step_kind}: {rate:,.0f} tokens/s "
          f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}), MFU {100 * meter.mfu(trainer, rate):.1f}% "
          f"of {meter.peak_flops / 1e12:.2f} TFLOP/s")
    if world.size == 1:
        reference, _ = median_tokens_per_second(reference_step(trainer), batches, tokens_per_step)
        print(f"a plain GPT-2-style model of this shape, float32, eager, AdamW: {reference:,.0f} tokens/s; "
              f"tinyllm is {rate / reference:.2f}x that")


def saved_config(checkpoint: Path) -> Optional[tinyllm.TrainingConfig]:
    """The settings a checkpoint saved; None where there is none, or where it is broken or hostile
    (the trainer then says what is wrong with it)."""
    if not checkpoint.is_file():
        return None
    try:  # only the config: memory-mapped, the weights are not read (the trainer loads them next)
        saved = torch.load(checkpoint, mmap=True, weights_only=True)
        return tinyllm.TrainingConfig.from_checkpoint(saved["config"])
    except Exception:
        return None


def changed_settings(given: dict, saved: tinyllm.TrainingConfig) -> List[str]:
    """Each setting in `given` that differs from the saved one, as its flag with both values."""
    return [f"{FLAG_OF.get(field, field)} {value} (saved: {getattr(saved, field)})"
            for field, value in given.items() if getattr(saved, field) != value]


def check_resume_settings(args: argparse.Namespace) -> None:
    """--resume runs with the saved run's settings, so re-running the same command works; a flag or
    --config field that differs from the saved setting is refused, naming both values."""
    given = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()
             if getattr(args, flag) is not None and flag not in ("out_dir", "device", "compile")}
    if args.config:
        build_config(args)  # a bad file gets its usual one-line error
        given = {**tinyllm.read_json(args.config, "config"), **given}
    saved = saved_config(Path(args.out_dir or "out") / "last.pt")
    if not given or saved is None:  # nothing to compare, or nothing to resume (the trainer says why)
        return
    changed = changed_settings(given, saved)
    if changed:
        raise tinyllm.TinyLLMError(f"--resume continues a run with the settings it started with, and these "
                                   f"differ: {', '.join(changed)}; drop them, or start a new run")


def check_fine_tuning_settings(args: argparse.Namespace, config: tinyllm.TrainingConfig) -> None:
    """--init-from fine-tunes a checkpoint's model with its tokenizer and text preparation; a flag or
    --config field that would change them is refused, where the trainer would ignore it."""
    saved = saved_config(Path(config.init_from)) if config.init_from else None
    if saved is None:  # no fine-tuning, or no checkpoint to compare with (the trainer says why)
        return
    inherited = {"model_size", "tokenizer", "vocab_size", "lowercase", "normalize_whitespace", "max_context",
                 *tinyllm.MODEL_FIELDS}
    given = {field: getattr(config, field) for field in fields_given(args) & inherited}
    changed = changed_settings(given, saved)
    if changed:
        raise tinyllm.TinyLLMError(f"--init-from {config.init_from} fine-tunes its model with its tokenizer "
                                   f"and text preparation, and these differ: {', '.join(changed)}; drop "
                                   "them, or train a new model without --init-from")


def train(args: argparse.Namespace, world: tinyllm.World) -> None:
    if args.resume:  # the run's own settings, except where and how to run it
        check_resume_settings(args)
        config = tinyllm.TrainingConfig(out_dir=args.out_dir or "out", device=args.device or "auto",
                                        compile=args.compile)
    else:
        config = build_config(args)
        check_fine_tuning_settings(args, config)
    device, callbacks = tinyllm.resolve_device(config.device), tinyllm_hooks.standard_callbacks(
        progress_bar=sys.stdout.isatty() and not args.quiet)
    if device.type == "cuda" and config.time_budget and not args.resume:  # a larger batch fills a GPU
        unset = {"batch_size", "max_context"} - fields_given(args)
        chosen, why = tinyllm_hooks.fill_the_device(tinyllm_hooks.describe_cuda(device), unset)
        config = dataclasses.replace(config, **chosen)
        callbacks.insert(0, tinyllm_hooks.LogLine(why))
    # Under torchrun, process 0 downloads the text while the others wait for it.
    world.join(device)
    if world.rank == 0 and not args.data:
        shakespeare_file(DEFAULT_DATA)
    world.barrier()
    data = corpus(args, default_ready=True)
    callbacks.insert(0, tinyllm_data.DataReport(data))
    trainer = tinyllm.Trainer(config, data, callbacks=callbacks, world=world,
                              quiet=args.quiet, overwrite=args.overwrite, resume=args.resume)
    summary = trainer.train()
    if summary and not args.quiet:
        files = f"files in {config.out_dir}/" if config.out_dir else "no files written (out_dir is null)"
        print(f"\nfull validation loss {summary['full_val_loss']:.4f} after {summary['steps']} steps "
              f"({summary['elapsed_seconds']:.0f} s, {summary['tokens_per_second']:.0f} tokens/s); "
              f"{files}\n\n{summary['sample']}")


# The flags each use of a trained model reads (argparse's names), besides those of where and how to run
# (RUN_FLAGS, which scripts pass to every use); training reads every flag but NOT_FOR_TRAINING. A flag
# given to a use that does not read it is named in a warning.
RUN_FLAGS = {"out_dir", "device", "compile", "threads", "quiet"}
READ_BY = {
    "plot": {"plot"},
    "generate": {"generate", "checkpoint", "quantize", "benchmark", "prompt",
                 "num_chars", "num_samples", "temperature", "top_k", "top_p", "stop", "seed"},
    "evaluate": {"evaluate", "checkpoint", "quantize", "data", "include", "val_data", "token_cache"},
    "quantize": {"quantize", "checkpoint", "overwrite"},
}
NOT_FOR_TRAINING = {"checkpoint", "prompt", "num_chars", "num_samples", "top_k", "top_p", "stop"}


def warn_of_flags_not_applying(args: argparse.Namespace, given: Sequence[str]) -> None:
    """Say which of the flags `given` the chosen use leaves aside, rather than pass over them as if they
    had done something: say, --dtype or --lowercase with --generate, or --top-k with training."""
    mode = next((name for name in READ_BY if getattr(args, name)), None)  # in run()'s order
    unused = [f"--{name.replace('_', '-')}" for name in given if name not in RUN_FLAGS
              and (name not in READ_BY[mode] if mode else name in NOT_FOR_TRAINING)]
    if unused:
        use = f"--{mode}, which trains nothing" if mode else "training"
        print(f"warning: {', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to {use}; "
              "ignored", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    load_installed_plugins()  # before the flags, whose help lists the tokenizers and sizes
    args = parse_args(argv)
    defaults = vars(parse_args([]))
    warn_of_flags_not_applying(args, [name for name, value in vars(args).items() if value != defaults[name]])
    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if args.threads > cores:  # thousands of spinning threads would stall the whole machine for minutes
            print(f"warning: --threads {args.threads} is more than the {cores} CPU cores this process may "
                  f"use, and threads beyond them only wait for each other; using {cores}", file=sys.stderr)
            args.threads = cores
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # for compile workers, and so none are measured
        torch.set_num_threads(args.threads)
    world = tinyllm_hooks.world_from_environment()  # under torchrun, this process's place in the job
    code = run(args, world)
    if code and isinstance(world, tinyllm_hooks.DistributedWorld):
        world.exit(code)  # at once: torchrun is about to stop the other processes
    tinyllm_hooks.leave_process_group()
    return code


def run(args: argparse.Namespace, world: tinyllm.World) -> int:
    """Do what the flags ask; a user mistake becomes one line on stderr and exit code 2. Under torchrun
    the line comes from one process only (the first to fail), and the others exit with code 2 too."""
    distributed = isinstance(world, tinyllm_hooks.DistributedWorld)
    try:
        if args.plot:
            print(f"wrote {tinyllm_hooks.plot_losses(args.out_dir or 'out')}")
        elif args.generate:
            benchmark_generation(args) if args.benchmark else generate(args)
        elif args.evaluate:
            evaluate(args)
        elif args.quantize:
            quantize(args)
        else:
            benchmark(args, world) if args.benchmark else train(args, world)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the final flush cannot fail
        return 128 + signal.SIGPIPE
    except (tinyllm.TinyLLMError, OSError) as e:  # OSError: a full disk or a vanished directory
        if not distributed or world.first_to_fail():
            message = in_flags(str(e)) if isinstance(e, tinyllm.TinyLLMError) else (
                f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
            print(f"error: {message}", file=sys.stderr)
        return 2
    except tinyllm_hooks.TrainingInterrupted as e:  # last.pt is saved, and the log said how to resume
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing half-written is kept
        print("\ninterrupted", file=sys.stderr)
        return 130
    except RuntimeError:  # a collective operation broke because another process failed and said why
        if distributed and world.peer_failed():
            return 2
        raise
    return 0


def command_line() -> int:
    """`main` in a process of its own: `python train_shakespeare.py`, `python -m tinyllm` or `tinyllm`."""
    code = main()
    # At exit, Python's last garbage collections walk every object torch made: a second on a 2-core CPU.
    # Frozen, they are left for the operating system, which frees the whole process at once.
    gc.freeze()
    return code


if __name__ == "__main__":
    sys.exit(command_line())
