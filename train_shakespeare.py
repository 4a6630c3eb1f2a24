"""Train a character-level transformer on Tiny Shakespeare (or any UTF-8 text), or use one.

    python train_shakespeare.py                        # download the text if needed, train, sample
    python train_shakespeare.py --generate --prompt "ROMEO:" --top-p 0.9
    python train_shakespeare.py --init-from out/best.pt --data my.txt --out-dir out/mine
    python train_shakespeare.py --evaluate --quantize int8
    python train_shakespeare.py --plot --out-dir out/mine
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import os
import signal
import sys
import time
import urllib.error
import urllib.request
import warnings
from importlib import metadata
from pathlib import Path
from typing import List, Optional

import torch
from tqdm import tqdm

import tinyllm
import tinyllm_hooks
import tinyllm_inference

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "shakespeare.txt"

# Command-line flags that set the TrainingConfig field of the same name, then the two that differ.
CONFIG_FLAGS = {name: name for name in (
    "tokenizer", "vocab_size", "epochs", "max_steps", "time_budget", "batch_size", "learning_rate",
    "max_context", "val_frequency", "checkpoint_frequency", "sample_frequency", "temperature",
    "lowercase", "normalize_whitespace", "seed", "device", "dtype", "compile", "out_dir", "n_layer",
    "n_head", "n_embd", "dropout", "init_from")}
CONFIG_FLAGS.update(size="model_size", metrics_csv="metrics_csv_enabled")


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


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="UTF-8 text file (default: Tiny Shakespeare, downloaded)")
    p.add_argument("--out-dir", help="where checkpoints, logs and samples go (default: out)")
    p.add_argument("--config", type=Path, help="JSON file of TrainingConfig fields")
    p.add_argument("--size", help=f"model size: {', '.join(tinyllm.MODEL_SIZES.names())}")
    p.add_argument("--tokenizer", help=f"tokenizer: {', '.join(tinyllm.TOKENIZERS.names())}")
    p.add_argument("--vocab-size", type=int, help="vocabulary size of a tokenizer that learns one (bpe: 768)")
    for flag, kind in [("epochs", int), ("max-steps", int), ("time-budget", float), ("batch-size", int),
                       ("learning-rate", float), ("max-context", int), ("val-frequency", int),
                       ("checkpoint-frequency", int),
                       ("sample-frequency", int), ("temperature", float), ("seed", int),
                       ("n-layer", int), ("n-head", int), ("n-embd", int), ("dropout", float)]:
        p.add_argument(f"--{flag}", type=kind)
    p.add_argument("--init-from", help="fine-tune this checkpoint on --data (fresh optimizer and schedule)")
    for flag in ("metrics-csv", "lowercase", "normalize-whitespace", "compile"):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", choices=tinyllm.DEVICES)
    p.add_argument("--dtype", choices=list(tinyllm.DTYPES))
    p.add_argument("--quiet", action="store_true", help="no progress bar; console shows warnings only")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a training run already in --out-dir (with --quantize: an int8 file)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir from its last.pt, with its own settings")
    p.add_argument("--benchmark", action="store_true", help="print training tokens/s and MFU (median of "
                   "3), or with --generate tokens/s with and without the KV cache, then exit")
    p.add_argument("--plot", action="store_true", help="draw loss.png from <out-dir>/metrics.csv, then exit")
    g = p.add_argument_group("using a trained model")
    g.add_argument("--generate", action="store_true", help="stream a sample instead of training")
    g.add_argument("--evaluate", action="store_true", help="print the full validation loss on --data")
    g.add_argument("--checkpoint", type=Path, help="checkpoint to use (default: <out-dir>/best.pt)")
    g.add_argument("--quantize", choices=["int8"], help="int8 weights: with --generate or --evaluate, "
                   "in memory; alone, write <checkpoint>.int8.pt")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--num-chars", type=int, default=500, help="how many tokens (characters) to generate")
    g.add_argument("--top-k", type=int, help="sample only from the k most likely tokens (1: greedy)")
    g.add_argument("--top-p", type=float, help="sample only from the most likely tokens holding this mass")
    g.add_argument("--stop", action="append", default=[], help="end before this string (repeatable)")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> tinyllm.TrainingConfig:
    """Defaults, overridden by the fields in --config, overridden by each flag given."""
    flags = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()
             if getattr(args, flag) is not None}
    if args.config:
        return tinyllm.TrainingConfig.from_json(args.config, **flags)
    return tinyllm.TrainingConfig.from_dict(flags)


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


def shakespeare_text(path: Path) -> str:
    """The default data: use the local copy, or download and verify it once."""
    for partial in path.parent.glob(f".{path.name}.*.tmp"):  # a download killed midway
        partial.unlink()
    if not path.exists():
        print(f"downloading Tiny Shakespeare to {path} ...", file=sys.stderr)
        download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
    return tinyllm.load_text(path)


def checkpoint_path(args: argparse.Namespace) -> Path:
    """--checkpoint, or <out-dir>/best.pt; it must exist."""
    path = args.checkpoint or Path(args.out_dir or "out") / "best.pt"
    if not path.exists():
        raise tinyllm.TinyLLMError(f"no checkpoint at {path}; train first or pass --checkpoint PATH")
    return path


def load_for_inference(args: argparse.Namespace) -> tinyllm.Checkpoint:
    """The checkpoint to use, int8-quantized if asked."""
    checkpoint = tinyllm.load_checkpoint(checkpoint_path(args), tinyllm.resolve_device(args.device or "auto"))
    if args.quantize and not checkpoint.model.quantization:
        tinyllm_inference.quantize_int8(checkpoint.model)
    return checkpoint


def generation_stream(args: argparse.Namespace, checkpoint: tinyllm.Checkpoint, **options):
    """The prompt (as the model sees it) and an iterator over the text generated after it."""
    if args.num_chars <= 0:
        raise tinyllm.TinyLLMError(f"--num-chars must be positive, got {args.num_chars}")
    if args.seed is not None and not 0 <= args.seed < 2**32:  # the range training accepts
        raise tinyllm.TinyLLMError(f"--seed must be in [0, 2**32), got {args.seed}")
    options.setdefault("stop", args.stop)
    config = checkpoint.config
    prep = dict(lowercase=config.lowercase, normalize_whitespace=config.normalize_whitespace)
    temperature = args.temperature if args.temperature is not None else config.temperature
    pieces = tinyllm_inference.stream_text(checkpoint.model, checkpoint.tokenizer, args.prompt,
                                           args.num_chars, temperature=temperature, top_k=args.top_k,
                                           top_p=args.top_p, **prep, **options)
    return tinyllm.prepare_text(args.prompt, **prep), pieces


def generate(args: argparse.Namespace) -> None:
    """Print the prompt, then each piece of the continuation as soon as it is generated."""
    prompt, pieces = generation_stream(args, load_for_inference(args), seed=args.seed)
    first = next(pieces, "")  # a bad prompt fails here, before anything is printed
    print(prompt + first, end="", flush=True)
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def benchmark_generation(args: argparse.Namespace) -> None:
    """Tokens/s generating --num-chars tokens with and without the KV cache (median of 3); stop
    strings play no part, so every run generates them all."""
    checkpoint = load_for_inference(args)
    rates = {}
    for use_cache in (True, False):
        runs = []
        for seed in range(3):
            _, pieces = generation_stream(args, checkpoint, seed=seed, use_cache=use_cache, stop=())
            start = time.perf_counter()
            "".join(pieces)
            runs.append(args.num_chars / max(time.perf_counter() - start, 1e-9))
        rates[use_cache] = sorted(runs)[1]
    int8 = ", int8" if checkpoint.model.quantization else ""
    print(f"{checkpoint.model.num_parameters():,} parameters{int8}, "
          f"{args.num_chars} tokens: {rates[True]:,.0f} tokens/s with the KV cache, {rates[False]:,.0f} "
          f"without; {rates[True] / rates[False]:.1f}x faster")


def evaluate(args: argparse.Namespace) -> None:
    """The full validation loss of a checkpoint on the validation split of --data, as training scores it."""
    checkpoint = load_for_inference(args)
    config = checkpoint.config
    text = tinyllm.load_text(args.data) if args.data else shakespeare_text(DEFAULT_DATA)
    text = tinyllm.prepare_text(text, config.lowercase, config.normalize_whitespace)
    _, val_ids = tinyllm.split_train_val(text, checkpoint.tokenizer, config.val_fraction, config.max_context)
    start = time.perf_counter()
    loss = tinyllm.evaluate_full(checkpoint.model, val_ids, config.batch_size)
    bits = tinyllm.bits_per_char(loss, len(val_ids), int(len(text) * config.val_fraction))
    print(f"full validation loss {loss:.4f} ({bits:.3f} bits/char) on {len(val_ids):,} tokens "
          f"({time.perf_counter() - start:.1f} s, {checkpoint.model.quantization or 'float'} weights)")


def quantize(args: argparse.Namespace) -> None:
    """Write an int8 copy of the checkpoint (weights only, no optimizer state) beside it."""
    source = checkpoint_path(args)
    checkpoint = tinyllm.load_checkpoint(source)
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


def benchmark(args: argparse.Namespace, world: tinyllm.World) -> None:
    """Time training steps of the configured model on the real data; nothing is kept."""
    text = tinyllm.load_text(args.data) if args.data else shakespeare_text(DEFAULT_DATA)
    config = dataclasses.replace(build_config(args), out_dir=None)  # nothing is written
    trainer = tinyllm.Trainer(config, text, quiet=True, world=world)
    compile_step, meter = tinyllm_hooks.MeasuredSettings(), tinyllm_hooks.ModelFlopsUtilization()
    for callback in (compile_step, meter):
        callback.on_start(trainer)
    one_epoch = tinyllm.epoch_loader(trainer.train_ids, config.max_context, config.batch_size,
                                     trainer.generator, world.rank, world.size)
    if not len(one_epoch):  # the endless stream below would never yield
        raise tinyllm.TinyLLMError(f"the text gives no batch of {config.batch_size} x {config.max_context} "
                                   f"tokens per process; use more text or a smaller --batch-size")
    batches = (batch for _ in itertools.count() for batch in tinyllm.epoch_loader(
        trainer.train_ids, config.max_context, config.batch_size, trainer.generator, world.rank, world.size))
    for _ in range(5):  # warm-up (and compilation, with --compile)
        trainer.train_step(*next(batches), config.learning_rate).item()
    rates = []
    for _ in range(3):
        start = time.perf_counter()
        losses = [trainer.train_step(*next(batches), config.learning_rate) for _ in range(30)]
        losses[-1].item()  # wait for the device to finish
        rates.append(30 * config.batch_size * config.max_context * world.size / (time.perf_counter() - start))
    rate = sorted(rates)[1]
    if world.rank != 0:
        return
    processes = f" x {world.size} processes" if world.size > 1 else ""
    print(f"{config.n_layer} layers x {config.n_head} heads x {config.n_embd} wide, context "
          f"{config.max_context}, batch {config.batch_size}{processes}, "
          f"{trainer.model.num_parameters():,} parameters, "
          f"{trainer.device} {str(trainer.dtype).replace('torch.', '')}: {rate:,.0f} tokens/s "
          f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}), MFU {100 * meter.mfu(trainer, rate):.1f}% "
          f"of {meter.peak_flops / 1e12:.2f} TFLOP/s")


def check_resume_settings(args: argparse.Namespace) -> None:
    """--resume runs with the saved run's settings, so re-running the same command works; a flag or
    --config field that differs from the saved setting is refused, naming both values."""
    last = Path(args.out_dir or "out") / "last.pt"
    given = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items()
             if getattr(args, flag) is not None and flag not in ("out_dir", "device", "compile")}
    if args.config:
        build_config(args)  # a bad file gets its usual one-line error
        given = {**tinyllm.read_json(args.config, "config"), **given}
    if not given or not last.is_file():  # nothing to compare, or nothing to resume (the trainer says so)
        return
    try:  # only the config: memory-mapped, the weights are not read (the trainer loads them next)
        saved = tinyllm.TrainingConfig.from_dict(torch.load(last, mmap=True, weights_only=True)["config"])
    except Exception:  # a broken or hostile file: the trainer says what is wrong with it
        return
    names = {field: f"--{flag.replace('_', '-')}" for flag, field in CONFIG_FLAGS.items()}
    changed = [f"{names.get(field, field)} {value} (saved: {getattr(saved, field)})"
               for field, value in given.items() if getattr(saved, field) != value]
    if changed:
        raise tinyllm.TinyLLMError(f"--resume continues a run with the settings it started with, and these "
                                   f"differ: {', '.join(changed)}; drop them, or start a new run")


def train(args: argparse.Namespace, world: tinyllm.World) -> None:
    if args.resume:  # the run's own settings, except where and how to run it
        check_resume_settings(args)
        config = tinyllm.TrainingConfig(out_dir=args.out_dir or "out", device=args.device or "auto",
                                        compile=args.compile)
    else:
        config = build_config(args)
    # Under torchrun, process 0 downloads the text while the others wait for it.
    world.join(tinyllm.resolve_device(config.device))
    if world.rank == 0 and not args.data:
        shakespeare_text(DEFAULT_DATA)
    world.barrier()
    text = tinyllm.load_text(args.data) if args.data else shakespeare_text(DEFAULT_DATA)
    callbacks = tinyllm_hooks.standard_callbacks(progress_bar=sys.stdout.isatty() and not args.quiet)
    trainer = tinyllm.Trainer(config, text, callbacks=callbacks, world=world, quiet=args.quiet,
                              overwrite=args.overwrite, resume=args.resume)
    summary = trainer.train()
    if summary and not args.quiet:
        print(f"\nfull validation loss {summary['full_val_loss']:.4f} after {summary['steps']} steps "
              f"({summary['elapsed_seconds']:.0f} s, {summary['tokens_per_second']:.0f} tokens/s); "
              f"files in {config.out_dir}/\n\n{summary['sample']}")


def main(argv: Optional[List[str]] = None) -> int:
    load_installed_plugins()  # before the flags, whose help lists the tokenizers and sizes
    args = parse_args(argv)
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
            message = e if isinstance(e, tinyllm.TinyLLMError) else (
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


if __name__ == "__main__":
    sys.exit(main())
