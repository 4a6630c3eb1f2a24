"""Train a character-level transformer on Tiny Shakespeare (or any UTF-8 text), or sample from one.

    python train_shakespeare.py                        # download the text if needed, train, sample
    python train_shakespeare.py --generate --prompt "ROMEO:"
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional

from tqdm import tqdm

import tinyllm

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "shakespeare.txt"

# Command-line flags that map one to one onto TrainingConfig fields.
CONFIG_FLAGS = {
    "size": "model_size", "tokenizer": "tokenizer", "epochs": "epochs", "max_steps": "max_steps",
    "time_budget": "time_budget", "batch_size": "batch_size", "learning_rate": "learning_rate",
    "max_context": "max_context", "val_frequency": "val_frequency",
    "sample_frequency": "sample_frequency", "temperature": "temperature",
    "metrics_csv": "metrics_csv_enabled", "lowercase": "lowercase",
    "normalize_whitespace": "normalize_whitespace", "seed": "seed", "device": "device",
    "dtype": "dtype", "compile": "compile", "out_dir": "out_dir",
}


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
    for flag, kind in [("epochs", int), ("max-steps", int), ("time-budget", float), ("batch-size", int),
                       ("learning-rate", float), ("max-context", int), ("val-frequency", int),
                       ("sample-frequency", int), ("temperature", float), ("seed", int)]:
        p.add_argument(f"--{flag}", type=kind)
    for flag in ("metrics-csv", "lowercase", "normalize-whitespace", "compile"):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--device", choices=tinyllm.DEVICES)
    p.add_argument("--dtype", choices=list(tinyllm.DTYPES))
    p.add_argument("--quiet", action="store_true", help="no progress bar; console shows warnings only")
    p.add_argument("--overwrite", action="store_true", help="replace a training run already in --out-dir")
    p.add_argument("--benchmark", action="store_true",
                   help="print training tokens/s and MFU for the configured model (median of 3), then exit")
    g = p.add_argument_group("generation")
    g.add_argument("--generate", action="store_true", help="sample from a trained model instead of training")
    g.add_argument("--checkpoint", type=Path, help="checkpoint to sample from (default: <out-dir>/best.pt)")
    g.add_argument("--prompt", default="", help="text to continue")
    g.add_argument("--num-chars", type=int, default=500, help="how many tokens to generate")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> tinyllm.TrainingConfig:
    """Defaults, overridden by the fields in --config, overridden by each flag given."""
    flags = {field: getattr(args, flag) for flag, field in CONFIG_FLAGS.items() if getattr(args, flag) is not None}
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
        raise tinyllm.TinyLLMError(f"could not download {url} ({getattr(e, 'reason', None) or e}); "
                                   f"if you are offline, fetch that file elsewhere and save it as {path}") from None
    return path


def shakespeare_text(path: Path) -> str:
    """The default data: use the local copy, or download and verify it once."""
    if not path.exists():
        print(f"downloading Tiny Shakespeare to {path} ...", file=sys.stderr)
        download(SHAKESPEARE_URL, path, SHAKESPEARE_SHA256)
    return tinyllm.load_text(path)


def generate(args: argparse.Namespace) -> None:
    path = args.checkpoint or Path(args.out_dir or "out") / "best.pt"
    if not path.exists():
        raise tinyllm.TinyLLMError(f"no checkpoint at {path}; train first or pass --checkpoint PATH")
    if args.num_chars <= 0:
        raise tinyllm.TinyLLMError(f"--num-chars must be positive, got {args.num_chars}")
    checkpoint = tinyllm.load_checkpoint(path, tinyllm.resolve_device(args.device or "auto"))
    config = checkpoint.config
    temperature = args.temperature if args.temperature is not None else config.temperature
    print(tinyllm.sample_text(checkpoint.model, checkpoint.tokenizer, args.prompt, args.num_chars,
                              temperature, lowercase=config.lowercase,
                              normalize_whitespace=config.normalize_whitespace, seed=args.seed))


def benchmark(args: argparse.Namespace) -> None:
    """Time training steps of the configured model on the real data; nothing is kept."""
    text = tinyllm.load_text(args.data) if args.data else shakespeare_text(DEFAULT_DATA)
    with tempfile.TemporaryDirectory() as out_dir:
        config = dataclasses.replace(build_config(args), out_dir=out_dir)
        trainer = tinyllm.Trainer(config, text, progress=False, quiet=True)
        batches = (batch for _ in itertools.count() for batch in tinyllm.epoch_loader(
            trainer.train_ids, config.max_context, config.batch_size, trainer.generator))  # endless
        for _ in range(5):  # warm-up (and compilation, with --compile)
            trainer.train_step(*next(batches), config.learning_rate).item()
        rates = []
        for _ in range(3):
            start = time.perf_counter()
            losses = [trainer.train_step(*next(batches), config.learning_rate) for _ in range(30)]
            losses[-1].item()  # wait for the device to finish
            rates.append(30 * config.batch_size * config.max_context / (time.perf_counter() - start))
    rate = sorted(rates)[1]
    print(f"{config.n_layer} layers x {config.n_head} heads x {config.n_embd} wide, context "
          f"{config.max_context}, batch {config.batch_size}, {trainer.model.num_parameters():,} parameters, "
          f"{trainer.device} {str(trainer.dtype).replace('torch.', '')}: {rate:,.0f} tokens/s "
          f"(runs: {', '.join(f'{r:,.0f}' for r in rates)}), MFU {100 * trainer.mfu(rate):.1f}% "
          f"of {trainer.peak_flops / 1e12:.2f} TFLOP/s")


def train(args: argparse.Namespace) -> None:
    config = build_config(args)
    text = tinyllm.load_text(args.data) if args.data else shakespeare_text(DEFAULT_DATA)
    trainer = tinyllm.Trainer(config, text, quiet=args.quiet, overwrite=args.overwrite)
    summary = trainer.train()
    if not args.quiet:
        print(f"\nfull validation loss {summary['full_val_loss']:.4f} after {summary['steps']} steps "
              f"({summary['elapsed_seconds']:.0f} s, {summary['tokens_per_second']:.0f} tokens/s); "
              f"files in {config.out_dir}/\n\n{summary['sample']}")


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        if args.generate:
            generate(args)
        else:
            benchmark(args) if args.benchmark else train(args)
    except tinyllm.TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk or a vanished directory: still one line, not a traceback
        print(f"error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
