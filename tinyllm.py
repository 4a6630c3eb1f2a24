"""tinyllm: train a character-level transformer language model, in one readable file.

It reads top to bottom in the order data flows: registries, the character tokenizer, the
configuration, data and batching, the model, sampling, metrics and checkpoints, the trainer.
Copy this file alone into a project, or `from tinyllm import TransformerModel`. Optional features
live in plug-in modules beside it (see README.md) and attach through its registries and hooks.

Copyright (c) 2026 the tinyllm authors. MIT License: keep this notice in copies (see LICENSE).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import itertools
import json
import logging
import math
import numbers
import os
import re
import shutil
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim import Optimizer
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

try:
    import fcntl  # the out-dir lock; Windows has none, and runs there without it
except ImportError:
    fcntl = None

__all__ = [  # the last six live in plug-in modules and are imported from there on first use
    "TinyLLMError", "Registry", "TOKENIZERS", "MODEL_SIZES", "QUANTIZATIONS", "OPTIMIZERS", "atomic_write",
    "Tokenizer", "CharacterTokenizer", "load_tokenizer", "ModelConfig", "TrainingConfig", "prepare_text",
    "load_text", "split_train_val", "bits_per_char", "TokenWindows", "epoch_loader", "fixed_batches",
    "TransformerModel", "KVCache", "sample_next", "next_token", "check_sampling", "generate",
    "generate_tokens", "generate_blocks", "encode_prompt", "sample_text", "scored_tokens", "evaluate_full",
    "MetricsLogger", "Checkpoint", "save_checkpoint", "load_checkpoint", "RunState", "RunClock",
    "RunDirectory", "Callback", "World", "Muon", "Trainer",
    "BytePairTokenizer", "stream_text", "Int8Linear", "quantize_int8", "plot_losses", "TrainingInterrupted"]
PLUGIN_NAMES = {"BytePairTokenizer": "tinyllm_bpe", "merge_pair": "tinyllm_bpe",
                "stream_text": "tinyllm_inference", "Int8Linear": "tinyllm_inference",
                "quantize_int8": "tinyllm_inference",
                "plot_losses": "tinyllm_hooks", "TrainingInterrupted": "tinyllm_hooks",
                "measure_peak_flops": "tinyllm_hooks"}
__version__ = "0.2.0"
PathLike = Union[str, os.PathLike]
logger = logging.getLogger("tinyllm")


def __getattr__(name: str) -> Any:
    """`tinyllm.BytePairTokenizer` and the other plug-in names, imported when first used."""
    if name in PLUGIN_NAMES:
        return getattr(importlib.import_module(PLUGIN_NAMES[name]), name)
    raise AttributeError(f"module 'tinyllm' has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------
# Errors, registries and files


class TinyLLMError(ValueError):
    """A user mistake: the message says what was wrong and how to fix it. Settings are named as in
    TrainingConfig and the Trainer, in backticks (`max_context`); the command line shows its flags."""


class Registry:
    """A named table of entries, so a new tokenizer or model size is one decorator or call. An entry may
    be a "module:attribute" string, imported when first looked up; `check` vets each entry."""
    # A string entry makes an optional plug-in cost nothing until it is used.

    def __init__(self, kind: str, check: Callable[[str, Any], None] = lambda name, entry: None):
        self.kind, self.check, self.entries = kind, check, {}

    def register(self, name: str, entry: Any = None) -> Any:
        """Register `entry` under `name`; without `entry`, return a decorator that does."""
        if entry is None:
            return lambda obj: self.register(name, obj)
        if not isinstance(entry, str):
            self.check(name, entry)
        self.entries[name] = entry
        return entry

    def __getitem__(self, name: str) -> Any:
        if name not in self.entries:
            raise TinyLLMError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        if isinstance(self.entries[name], str):
            module, _, attribute = self.entries[name].partition(":")
            try:
                self.register(name, getattr(importlib.import_module(module), attribute))
            except (ImportError, AttributeError, TypeError) as e:
                raise TinyLLMError(f"{self.kind} {name!r} needs {module}.py beside tinyllm.py, and it "
                                   f"could not be loaded ({e})") from None
        return self.entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def names(self) -> List[str]:
        return sorted(self.entries)


def _check_tokenizer(name: str, entry: Any) -> None:
    if not (isinstance(entry, type) and issubclass(entry, Tokenizer)):
        raise TypeError(f"expected a subclass of tinyllm.Tokenizer, got {entry!r}")
    if "type_name" not in vars(entry):  # files and checkpoints name a tokenizer by its registered name
        entry.type_name = name


def _check_model_size(name: str, entry: Any) -> None:
    if not isinstance(entry, dict) or not set(entry) <= set(MODEL_FIELDS):
        raise TypeError(f"expected a dict with keys among {', '.join(MODEL_FIELDS)}, got {entry!r}")


TOKENIZERS = Registry("tokenizer", _check_tokenizer)
TOKENIZERS.register("bpe", "tinyllm_bpe:BytePairTokenizer")
QUANTIZATIONS = Registry("quantization")  # a name -> a function that quantizes a model in place
QUANTIZATIONS.register("int8", "tinyllm_inference:quantize_int8")
OPTIMIZERS = Registry("optimizer")  # a name -> a function (model, config, device) -> an optimizer
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "dropout")  # what a model size may set
MODEL_SIZES = Registry("model size", _check_model_size)
MODEL_SIZES.register("tiny", {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0})
MODEL_SIZES.register("small", {"n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0})
MODEL_SIZES.register("medium", {"n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2})
MODEL_SIZES.register("large", {"n_layer": 8, "n_head": 8, "n_embd": 512, "dropout": 0.2})


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[typing.IO]:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`: a reader (or a
    crash) never sees half a file, and the old file survives any failure."""
    path = Path(path)
    if path.is_dir():
        raise TinyLLMError(f"{path} is a folder; name a file to write")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists: what creating `path` would meet first."""
    return next(p for p in (path, *path.absolute().parents) if p.exists())


def read_json(path: PathLike, what: str) -> dict:
    """Read a JSON object from `path`, turning every way that can fail into a TinyLLMError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TinyLLMError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise TinyLLMError(f"{what} file {path} is a folder; name a JSON file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyLLMError(f"{what} file {path} is not valid JSON ({e})") from None
    except RecursionError:  # json's decoder recurses once per level
        raise TinyLLMError(f"{what} file {path} is nested too deeply to read") from None
    if not isinstance(data, dict):
        raise TinyLLMError(f"{what} file {path} must hold a JSON object, not {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------
# The character tokenizer


class Tokenizer:
    """Base class. Subclasses define `fit`, `encode`, `decode`, `vocab_size`, and `state()` /
    `set_state(state)` to turn themselves into plain JSON data and back."""

    type_name = ""  # @TOKENIZERS.register sets it to the registered name
    version = 1
    learns_vocabulary = False  # True where fit(text, vocab_size) uses the size (the config's vocab_size)

    def save_state(self, path: PathLike) -> None:
        """Save the tokenizer as a language-neutral JSON file."""
        with atomic_write(path, "w") as f:
            json.dump({"type": self.type_name, "version": self.version, **self.state()}, f,
                      ensure_ascii=False)

    @staticmethod
    def from_state(state: dict, source: str) -> "Tokenizer":
        """The registered tokenizer that `state` (from `save_state`, or a checkpoint) names, filled."""
        if not isinstance(state.get("type"), str):
            raise TinyLLMError(f"{source} has no string 'type' field")
        tokenizer = TOKENIZERS[state["type"]]()
        if state.get("version", tokenizer.version) != tokenizer.version:
            raise TinyLLMError(f"{source} holds {state['type']!r} version {state.get('version')!r}, "
                               f"expected version {tokenizer.version}")
        try:
            tokenizer.set_state(state)
        except (KeyError, TypeError, ValueError) as e:
            raise TinyLLMError(f"{source} is malformed ({e})") from None
        return tokenizer

    def extend(self, text: str) -> int:
        """Add the tokens `text` needs that the vocabulary lacks, after the existing ones (so their
        ids stay); return how many were added. A tokenizer that encodes any text adds none."""
        self.encode(text)
        return 0


@TOKENIZERS.register("char")
class CharacterTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of characters seen in `fit`."""

    def __init__(self, chars: Sequence[str] = ()):
        self.set_state({"chars": list(chars)})

    def fit(self, text: str, vocab_size: Optional[int] = None) -> "CharacterTokenizer":
        """The vocabulary is every character of `text`; `vocab_size` plays no part."""
        self.set_state({"chars": sorted(set(text))})
        return self

    def extend(self, text: str) -> int:
        new_chars = sorted(set(text) - self.index.keys())
        self.set_state({"chars": self.chars + new_chars})
        return len(new_chars)

    def state(self) -> dict:
        return {"chars": list(self.chars)}

    def set_state(self, state: dict) -> None:
        chars = state["chars"]
        if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("'chars' must be a list of distinct single characters")
        self.chars, self.index = list(chars), {c: i for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> List[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError:
            unknown = "".join(sorted(set(text) - self.index.keys()))
            raise TinyLLMError(f"characters not in the tokenizer's vocabulary: {unknown!r}") from None

    def decode(self, ids: Sequence[int]) -> str:
        check_token_ids(ids, len(self.chars))
        return "".join(self.chars[i] for i in ids)


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    """Raise TinyLLMError for ids a tokenizer cannot decode (a negative one would count from the end)."""
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise TinyLLMError(f"token ids outside the tokenizer's vocabulary [0, {vocab_size}): {outside[:5]}")


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Read a tokenizer file written by `Tokenizer.save_state`."""
    return Tokenizer.from_state(read_json(path, "tokenizer"), f"tokenizer file {path}")


# ----------------------------------------------------------------------------------------------
# Configuration

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """The shape of a TransformerModel (a checkpoint stores it as `model_args`)."""

    vocab_size: int
    max_context: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    token_shift: bool = True  # each token takes in a learned share of the previous token's embedding
    attention_gate: bool = True  # each head's output scaled by a learned gate of the head's input

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_context", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise TinyLLMError(f"model field {name!r} must be a whole number of at least 1, "
                                   f"got {value!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise TinyLLMError(f"model field 'dropout' must be in [0, 1), got {self.dropout!r}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise TinyLLMError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}) into an "
                               "even head size (rotary embeddings turn pairs of features)")


@dataclass
class TrainingConfig:
    """Every setting of a training run; model fields left as None come from `model_size`."""

    epochs: Optional[int] = None  # None: 10, or as many as the time budget allows when there is one
    batch_size: int = 16
    learning_rate: float = 2e-3
    max_context: int = 128
    val_frequency: int = 500
    checkpoint_frequency: int = 500  # last.pt every this many steps, so a crash loses no more
    sample_frequency: int = 1000
    temperature: float = 0.8
    metrics_csv_enabled: bool = True
    model_size: str = "small"
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    dropout: Optional[float] = None
    lowercase: bool = True
    normalize_whitespace: bool = True
    val_fraction: float = 0.1
    init_from: Optional[str] = None  # a checkpoint to fine-tune, instead of a fresh model
    tokenizer: str = "char"
    vocab_size: Optional[int] = None  # for tokenizers that learn their vocabulary (bpe); None: theirs
    seed: int = 1337
    optimizer: str = "muon"  # an OPTIMIZERS name: muon (for the blocks' matrices) or adamw
    weight_decay: float = 0.1
    grad_clip: Optional[float] = 1.0
    warmup_steps: int = 30  # 100 was as good in 180-s runs, and worse in 60-s and 600-s ones
    early_stopping_patience: Optional[int] = None
    val_batches: int = 20
    full_val_tokens: Optional[int] = 2_000_000  # the final score's most tokens (seeded windows); None: all
    max_steps: Optional[int] = None
    time_budget: Optional[float] = None
    device: str = "auto"
    dtype: str = "auto"
    compile: Optional[bool] = None  # None: a plug-in may decide (tinyllm_hooks); the core alone does not
    out_dir: Optional[str] = "out"  # None: train in memory and write no files
    sample_prompt: str = ""
    sample_length: int = 300

    POSITIVE = ("epochs", "batch_size", "learning_rate", "max_context", "val_frequency",
                "checkpoint_frequency", "sample_frequency", "temperature", "n_layer", "n_head", "n_embd",
                "val_batches", "full_val_tokens", "sample_length", "max_steps", "time_budget", "grad_clip",
                "early_stopping_patience", "vocab_size")

    def __post_init__(self) -> None:
        self._check_types()
        size = MODEL_SIZES[self.model_size]
        for name in MODEL_FIELDS:  # a size may give only some fields; ModelConfig's defaults fill the rest
            if getattr(self, name) is None:
                setattr(self, name, size.get(name, MODEL_DEFAULTS[name]))
        self._check_types()  # again, for the values a size plug-in filled in
        self._check_values()

    def _check_types(self) -> None:
        for name, hint in typing.get_type_hints(type(self)).items():
            value, optional = getattr(self, name), type(None) in typing.get_args(hint)
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            if value is None and optional:
                continue
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value) if abs(value) < 1e300 else math.inf  # inf fails the value checks
                setattr(self, name, value)
            if not isinstance(value, base) or (base is int and isinstance(value, bool)):
                raise TinyLLMError(f"config field {name!r} must be {base.__name__}"
                                   f"{' or null' if optional else ''}, got {value!r}")

    def _check_values(self) -> None:
        for name in self.POSITIVE:
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise TinyLLMError(f"config field {name!r} must be positive and finite, got {value!r}")
        for name, ok, shown in [("weight_decay", 0 <= self.weight_decay < math.inf, "zero or more"),
                                ("warmup_steps", self.warmup_steps >= 0, "zero or more"),
                                ("dropout", 0 <= self.dropout < 1, "in [0, 1)"),
                                ("val_fraction", 0 < self.val_fraction <= 0.5, "in (0, 0.5]"),
                                ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)")]:
            if not ok:
                raise TinyLLMError(f"config field {name!r} must be {shown}, got {getattr(self, name)!r}")
        self.model_config(1)  # checks the head size
        if self.out_dir == "":
            raise TinyLLMError("config field 'out_dir' must name a directory (or be null), got ''")
        check_device_name(self.device)
        if self.dtype not in DTYPES:
            raise TinyLLMError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        tokenizer = TOKENIZERS[self.tokenizer]  # an unknown name raises TinyLLMError listing the known ones
        OPTIMIZERS[self.optimizer]  # an unknown name raises TinyLLMError, as for the tokenizer
        if self.vocab_size is not None and not tokenizer.learns_vocabulary:
            raise TinyLLMError(f"config field 'vocab_size' applies only to tokenizers that learn their "
                               f"vocabulary, such as bpe; the {self.tokenizer!r} tokenizer has a fixed one")

    def model_config(self, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size, self.max_context, **{f: getattr(self, f) for f in MODEL_FIELDS})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainingConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TinyLLMError(f"{source} has unknown key(s) {', '.join(unknown)}; "
                               f"valid keys are listed in TrainingConfig")
        return cls(**data)

    @classmethod
    def from_checkpoint(cls, data: dict, source: str = "checkpoint") -> "TrainingConfig":
        """The settings a checkpoint saved; one from before `optimizer` was a setting trained with AdamW."""
        return cls.from_dict({"optimizer": "adamw", **data}, source=source)

    def to_json(self, path: PathLike) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: PathLike, **overrides: Any) -> "TrainingConfig":
        """Load a config file; `overrides` replace its fields (model fields it omits come from the size)."""
        return cls.from_dict({**read_json(path, "config"), **overrides}, source=f"config file {path}")


MODEL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig) if f.name in MODEL_FIELDS}


# ----------------------------------------------------------------------------------------------
# Data and batching


def prepare_text(text: str, lowercase: bool = True, normalize_whitespace: bool = True) -> str:
    """Lowercase and tidy whitespace while keeping the line structure (both steps optional)."""
    if lowercase:
        text = text.lower()
    if normalize_whitespace:
        text = re.sub(r"\r\n?", "\n", text).replace("\t", " ")
        text = re.sub(r" {2,}", " ", text)
        text = re.sub(r" +(?=\n|\Z)", "", text)  # trailing spaces on each line
        text = re.sub(r"\n{3,}", "\n\n", text)
    return text


def load_text(path: PathLike) -> str:
    """Read a UTF-8 text file, with a clear error for everything that is not one."""
    path = Path(path)
    if path.is_dir():
        raise TinyLLMError(f"data path {path} is a directory; pass a UTF-8 text file")
    if path.exists() and not path.is_file():  # a device such as /dev/zero would be read forever
        raise TinyLLMError(f"data path {path} is not a regular file; pass a UTF-8 text file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TinyLLMError(f"data file {path} does not exist; give the path of a UTF-8 text file") from None
    except OSError as e:
        raise TinyLLMError(f"cannot read data file {path}: {e.strerror}") from None
    if not raw.strip():
        raise TinyLLMError(f"data file {path} is empty; it needs some text to learn from")
    if b"\x00" in raw:
        raise TinyLLMError(f"data file {path} looks binary (it contains NUL bytes); pass a text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TinyLLMError(f"data file {path} is not UTF-8 (bad byte at offset {e.start}); "
                           "convert it, e.g. with iconv -t utf-8") from None


def split_train_val(text: str, tokenizer: Tokenizer, val_fraction: float, context: int,
                    val_text: Optional[str] = None) -> tuple:
    """Token ids of the training and the validation text. Validation is `val_text` if given, else
    the LAST `val_fraction` of the characters, so results compare with other tools and tokenizers."""
    if val_text is None:
        n_val = int(len(text) * val_fraction)
        text, val_text = text[:len(text) - n_val], text[len(text) - n_val:]
    train, val = (torch.tensor(tokenizer.encode(part), dtype=torch.long) for part in (text, val_text))
    check_token_counts(len(train), len(val), context, len(text) + len(val_text))
    return train, val


def check_token_counts(train: int, val: int, context: int, chars: int) -> None:
    """Training and validation each need one window of `context` tokens and its next token."""
    if val < context + 1 or train < context + 1:
        raise TinyLLMError(f"text too short: {chars:,} characters give {train:,} training and {val:,} "
                           f"validation tokens, but each needs at least max_context + 1 = {context + 1}; "
                           "use more text, or a model with a smaller `max_context`")


def bits_per_char(loss: float, tokens: int, chars: int) -> float:
    """Turn a mean loss in nats per token into bits per character, which compares across tokenizers."""
    return loss * tokens / (chars * math.log(2))


class TokenWindows(Dataset):
    """Non-overlapping windows over a token tensor: item i is (ids[s:s+T], ids[s+1:s+T+1]), s = offset + i*T.
    An item may be a list of indices: the batch is then cut in one gather, with no Python loop."""

    def __init__(self, ids: torch.Tensor, context: int, offset: int = 0):
        self.ids, self.context, self.offset = ids, context, offset
        self.arange = torch.arange(context + 1, device=ids.device)

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1 - self.offset) // self.context)

    def __getitem__(self, index: Union[int, Sequence[int]]) -> tuple:
        # A blocking copy of the starts to a GPU would wait there for the previous step to finish.
        starts = (self.offset + torch.as_tensor(index) * self.context).to(self.ids.device, non_blocking=True)
        chunk = self.ids[starts.unsqueeze(-1) + self.arange].long()  # ids may be narrower (a token file)
        return chunk[..., :-1], chunk[..., 1:]


class RankBatches:
    """Every `world_size`-th batch, from the `rank`-th on: all processes get the same number."""

    def __init__(self, batches: BatchSampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches) // self.world_size

    def __iter__(self) -> Iterator[List[int]]:
        return itertools.islice(iter(self.batches), self.rank, len(self) * self.world_size, self.world_size)


def epoch_loader(ids: torch.Tensor, context: int, batch_size: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    """One epoch: every window once, in random order, after a fresh random offset in [0, context) (new
    cuts each epoch); each of several processes takes every `world_size`-th batch of one shuffle."""
    windows = TokenWindows(ids, context, int(torch.randint(min(context, len(ids) - context), (1,),
                                                           generator=generator)))
    # A last, incomplete batch is dropped (if there is a full one), so every step has one shape; and
    # every process gets as many batches, so none waits at a step that the others never take.
    batches = BatchSampler(RandomSampler(windows, generator=generator), batch_size,
                           drop_last=len(windows) >= batch_size)
    # The loader draws its workers' seed from `generator` too, so the global RNG is left alone.
    return DataLoader(windows, sampler=RankBatches(batches, rank, world_size), batch_size=None,
                      generator=generator)


def fixed_batches(ids: torch.Tensor, context: int, batch_size: int, n_batches: int, seed: int) -> list:
    """`n_batches` random batches chosen once, so successive validation losses are comparable."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(ids) - context, (n_batches, batch_size), generator=generator)
    windows = ids[starts.to(ids.device).unsqueeze(-1) + torch.arange(context + 1, device=ids.device)].long()
    return [(w[:, :-1], w[:, 1:]) for w in windows]


def on_device(ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Token ids where batches are cut from them: on a CPU as they are (a memory map stays mapped, not
    read), elsewhere as int32, which every device indexes (not so uint16 or uint32)."""
    return ids if device.type == "cpu" else ids.to(device, torch.int32)


@dataclass
class TokenData:
    """Text made ready to train on: the tokenizer, the token ids and the sizes bits per character needs.
    A data source (tinyllm_data.Corpus) is anything whose `prepare(config, tokenizer)` gives one."""

    tokenizer: Tokenizer
    train_ids: torch.Tensor  # an integer tensor of any width, e.g. a memory-mapped token file
    val_ids: torch.Tensor
    chars: tuple  # the characters given, and left after preprocessing
    val_chars: int  # the validation text's characters, after preprocessing
    sha256: str  # of the ids as int64: a resumed run checks it trains on the same tokens
    added_tokens: int = 0  # how many a given tokenizer gained for this text


def ids_sha256(*parts: torch.Tensor, chunk: int = 1 << 22) -> str:
    """The sha256 of token ids as int64, read a chunk at a time, so a memory-mapped file is never
    widened whole."""
    digest = hashlib.sha256()
    for part in parts:
        for start in range(0, len(part), chunk):
            digest.update(part[start:start + chunk].long().numpy().tobytes())
    return digest.hexdigest()


def prepare_data(config: TrainingConfig, text: str, val_text: Optional[str],
                 tokenizer: Optional[Tokenizer]) -> TokenData:
    """Preprocess; fit a new tokenizer (or grow a given one); split and encode."""
    c, given_chars = config, len(text) + len(val_text or "")
    text = prepare_text(text, c.lowercase, c.normalize_whitespace)
    val_text = None if val_text is None else prepare_text(val_text, c.lowercase, c.normalize_whitespace)
    every_text = text + (val_text or "")
    added = tokenizer.extend(every_text) if tokenizer else 0
    tokenizer = tokenizer or TOKENIZERS[c.tokenizer]().fit(every_text, vocab_size=c.vocab_size)
    train_ids, val_ids = split_train_val(text, tokenizer, c.val_fraction, c.max_context, val_text)
    val_chars = int(len(text) * c.val_fraction) if val_text is None else len(val_text)
    return TokenData(tokenizer, train_ids, val_ids, (given_chars, len(every_text)), val_chars,
                     ids_sha256(train_ids, val_ids), added)


def token_data(config: TrainingConfig, text: Any, val_text: Optional[str],
               tokenizer: Optional[Tokenizer]) -> TokenData:
    """The tokens of `text` (and `val_text`) as strings, or of a data source, which holds its own
    validation text (an object whose `prepare(config, tokenizer)` returns TokenData)."""
    if isinstance(text, str) and isinstance(val_text, (str, type(None))):
        return prepare_data(config, text, val_text, tokenizer)
    if not hasattr(text, "prepare") or val_text is not None:
        raise TinyLLMError(f"the text must be a string (and `val_text` one, or None) or a data source, "
                           f"which holds its own validation text; got {type(text).__name__} and "
                           f"{type(val_text).__name__}")
    return text.prepare(config, tokenizer)


def check_prompt(config: TrainingConfig, tokenizer: Tokenizer) -> None:
    """Fail now, not mid-run, if the sample prompt has characters the training text lacks."""
    try:
        tokenizer.encode(prepare_text(config.sample_prompt, config.lowercase, config.normalize_whitespace))
    except TinyLLMError as e:
        raise TinyLLMError(f"sample_prompt has {e}, which the training text lacks") from None


# ----------------------------------------------------------------------------------------------
# The model: a decoder-only transformer with pre-norm blocks, as in GPT-2 and nanoGPT.


def rotary_table(context: int, head_dim: int) -> torch.Tensor:
    """cos and sin of every position's rotation angles, shape (2, context, head_dim // 2)."""
    inverse_frequencies = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(context).float(), inverse_frequencies)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rotary(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (RoPE): rotate feature pairs by angles that grow with position,
    so a query-key dot product depends on how far apart two tokens are, not where they stand."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = table[0], table[1]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, gate: bool = True):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        # Gated attention: each head's output times 2 sigmoid(a learned function of the input), 1 at first
        # (zero weights). A head can then say nothing where it found nothing, instead of averaging
        # whatever it attends to (1,000 steps on a CPU: 0.008 lower validation loss, median of 3 seeds).
        self.gate = nn.Linear(n_embd, n_head, bias=False) if gate else None
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0, positions: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # QK-norm: unit-length queries and keys (rescaled to the usual size) bound the attention
        # logits, which keeps training stable at a high learning rate.
        q, k = apply_rotary(F.normalize(qkv[:2], dim=-1) * math.sqrt(C // self.n_head), rotary)
        v = qkv[2]
        if cache is None:  # PyTorch's fused kernel does the masking, softmax and dropout in one pass
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:  # the new positions' keys and values join the cache; the mask hides its later slots
            k, v = cache.update(layer, positions, k, v)
            if torch.compiler.is_compiling():  # written out, torch.compile fuses it with its neighbours
                scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
                y = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
            else:  # eager, the fused kernel is faster than these four operations
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.gate is not None:  # (B, T, heads) -> (B, heads, T, 1), as y is laid out
            y = y * (2 * torch.sigmoid(self.gate(x))).transpose(1, 2).unsqueeze(-1)  # x2 on the small one
        return self.proj_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    """SwiGLU: a SiLU-activated gate times a linear path. Its hidden width of 8/3 x n_embd (rounded
    to a multiple of 16) gives as many weights as the classic 4 x n_embd GELU layer."""

    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        hidden = max(16, 16 * round(8 * n_embd / 3 / 16))  # at least 16: a width of 2 would round to 0
        self.up = nn.Linear(n_embd, 2 * hidden, bias=False)  # gate and value in one product
        self.proj = nn.Linear(hidden, n_embd, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.dropout(self.proj(F.silu(gate) * value))


class Block(nn.Module):
    """Pre-norm residual block: normalising before each sublayer keeps deep stacks stable. RMSNorm is
    LayerNorm without centring or bias: cheaper, and as good for transformers."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, attention_gate: bool = True):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(n_embd, eps=1e-6), nn.RMSNorm(n_embd, eps=1e-6)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, attention_gate)
        self.ffn = FeedForward(n_embd, dropout)

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0, positions: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, cache, layer, positions, mask)
        return x + self.ffn(self.norm2(x))


class KVCache:
    """Every layer's keys and values for the tokens seen so far, so generating a token costs one
    position instead of the whole context; static, as in gpt-fast."""
    # Room for max_context positions is allocated up front and written in place, so every one-token
    # step has the same shapes, and a compiled step (tinyllm_inference) runs them all without
    # recompiling. A plain object, not a Module: a Module's `length` took 3 microseconds to set, 3% of
    # a compiled step.

    def __init__(self, model: TransformerModel, batch_size: int = 1,
                 tensors: Optional[Sequence[torch.Tensor]] = None):
        """Zeros, or the given `tensors` (in the order of `self.tensors`), as a compiled step gets them."""
        c, weight = model.config, model.token_embedding.weight
        shape = (batch_size, c.n_head, c.max_context, c.n_embd // c.n_head)
        # Keys and values layer by layer, then the latest token's embedding (the next token's token
        # shift takes it in): the arguments of a compiled step, listed once.
        self.tensors = list(tensors) if tensors is not None else [
            *(weight.new_zeros(shape) for _ in range(2 * c.n_layer)),
            weight.new_zeros(batch_size, 1, c.n_embd)]
        self.keys, self.values, self.previous = self.tensors[0:-1:2], self.tensors[1:-1:2], self.tensors[-1]
        self.length = 0  # positions filled; whoever runs the model advances it

    def update(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Write the keys and values of `positions`; return all max_context slots (the attention
        masks the ones not yet written)."""
        self.keys[layer].index_copy_(2, positions, k)
        self.values[layer].index_copy_(2, positions, v)
        return self.keys[layer], self.values[layer]


class TransformerModel(nn.Module):
    """Token embeddings, `n_layer` blocks, a final norm and a projection to logits. Build it from a
    ModelConfig, or from its fields: `TransformerModel(vocab_size=65, n_layer=4, ...)`."""

    def __init__(self, config: Union[ModelConfig, int, None] = None, *args: Any, **fields: Any):
        super().__init__()
        self.config = c = config if isinstance(config, ModelConfig) else ModelConfig(
            *([] if config is None else [config]), *args, **fields)
        self.quantization: Optional[str] = None  # the QUANTIZATIONS name, once quantized
        self.token_embedding = nn.Embedding(c.vocab_size, c.n_embd)
        # Positions enter through rotary embeddings in attention; the table is derived, not saved.
        self.register_buffer("rotary", rotary_table(c.max_context, c.n_embd // c.n_head), persistent=False)
        self.dropout = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c.n_embd, c.n_head, c.dropout, c.attention_gate)
                                    for _ in range(c.n_layer))
        self.final_norm = nn.RMSNorm(c.n_embd, eps=1e-6)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        # Zero at first: the model starts as one without the shift, and learns how much to take in.
        self.token_shift = nn.Parameter(torch.zeros(c.n_embd)) if c.token_shift else None
        self.apply(self._init_weights)
        # Each block adds two residual branches; shrinking their output projections keeps the
        # residual stream's variance from growing with depth (GPT-2).
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))
            elif name.endswith("attn.gate.weight"):  # every gate open at 1: the model starts as one without
                nn.init.zeros_(param)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_config(cls, config: TrainingConfig, vocab_size: int) -> "TransformerModel":
        return cls(config.model_config(vocab_size))

    @classmethod
    def from_checkpoint(cls, path: PathLike, device: Union[str, torch.device] = "cpu") -> "TransformerModel":
        return load_checkpoint(path, device).model

    @property
    def max_context(self) -> int:
        return self.config.max_context

    @property
    def window_after_jump(self) -> int:
        """The newest tokens that generation keeps when its window is full and jumps (generate_blocks)."""
        return self.max_context // 2 or 1

    def grow_vocabulary(self, vocab_size: int) -> None:
        """Add embedding and output rows for new tokens; the trained rows keep their values, so the
        old tokens' logits do not change until training updates them."""
        old, device = self.config.vocab_size, self.lm_head.weight.device
        n_embd = self.config.n_embd
        embedding, head = nn.Embedding(vocab_size, n_embd), nn.Linear(n_embd, vocab_size, bias=False)
        for module, trained in ((embedding, self.token_embedding), (head, self.lm_head)):
            self._init_weights(module)
            with torch.no_grad():
                module.weight[:old] = trained.weight
        self.token_embedding, self.lm_head = embedding.to(device), head.to(device)
        self.config = dataclasses.replace(self.config, vocab_size=vocab_size)

    def num_parameters(self) -> int:
        """Every weight: the trainable ones, plus quantized weights (which are stored as buffers)."""
        return sum(p.numel() for p in self.parameters()) + sum(
            b.numel() for name, b in self.named_buffers() if name.endswith("weight"))

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> tuple:
        """Return (logits of shape (B, T, vocab), mean cross-entropy loss or None). With a `cache`,
        `idx` holds only the tokens that follow the ones already cached."""
        if idx.dim() != 2 or idx.dtype not in (torch.long, torch.int) or \
                targets is not None and targets.shape != idx.shape:
            raise TinyLLMError(f"idx must be token ids of shape (batch, tokens), as torch.long, and targets "
                               f"the same shape; got {tuple(idx.shape)} of {idx.dtype} and "
                               f"{None if targets is None else tuple(targets.shape)}")
        start, T = cache.length if cache is not None else 0, idx.shape[1]
        if start + T > self.max_context:
            raise TinyLLMError(f"input has {start + T} tokens but the model's max_context is "
                               f"{self.max_context}; crop it to the last max_context tokens")
        # Only a cache needs the positions as a tensor; training slices the rotary table, as before.
        positions = None if cache is None else torch.arange(start, start + T, device=idx.device)
        logits = self.logits(idx, positions, cache)
        if cache is not None:
            cache.length += T
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def logits(self, idx: torch.Tensor, positions: Optional[torch.Tensor] = None,
               cache: Optional[KVCache] = None) -> torch.Tensor:
        """Logits of the tokens `idx` (B, T) standing at `positions` (T,), by default 0 to T - 1. The
        positions are a tensor, not numbers, so a compiled one-token step is one graph for them all."""
        x = self.embed(idx, positions, cache)
        rotary = self.rotary[:, :idx.shape[1]] if positions is None else self.rotary[:, positions]
        mask = None  # with a cache, each new token attends to the cache's slots up to its own position
        if cache is not None:
            mask = positions[:, None] >= torch.arange(self.max_context, device=idx.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, cache, layer, positions, mask)
        return self.lm_head(self.final_norm(x))

    def embed(self, idx: torch.Tensor, positions: Optional[torch.Tensor] = None,
              cache: Optional[KVCache] = None) -> torch.Tensor:
        """Token embeddings, each plus a learned share (per feature) of the previous token's: a token
        shift, as in RWKV and the public GPT speed records."""
        # A character model leans on the character before, and this hands it over without spending
        # attention on it (1,000 steps on a CPU: 0.011 lower validation loss at the median of three
        # seeds, at no measurable cost).
        x = self.dropout(self.token_embedding(idx))
        if self.token_shift is None:
            return x
        if cache is None:
            previous = F.pad(x[:, :-1], (0, 0, 1, 0))  # a window's first token has none before it
        else:  # before the first new token: the cache's latest, unless the new tokens start the window
            first = cache.previous * (positions[:1] > 0).to(x.dtype)
            previous = torch.cat([first, x[:, :-1]], dim=1)
            cache.previous.copy_(x[:, -1:])
        return x + self.token_shift * previous

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling: Any) -> torch.Tensor:
        """`idx` (B, T) with `max_new_tokens` sampled tokens appended; options: `generate_blocks`."""
        return generate(self, idx, max_new_tokens, **sampling)


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits: torch.Tensor, *, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                race: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw one token per row of `logits` (B, vocab) after temperature, top-k and top-p filtering, with
    `race`, Exp(1) draws shaped like `logits` (by default drawn here from `generator`)."""
    # With the best logit shifted to 0, a tiny temperature (floored at float32's smallest normal
    # number) gives finite logits that sample greedily, instead of inf - inf = nan.
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    logits = (logits.float() - logits.float().amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None:  # keep the k most likely tokens (top_k=1 is greedy decoding)
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1:  # nucleus: the fewest likely tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before them already reached top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    # An exponential race: the token whose probability over an Exp(1) draw is largest wins, with
    # exactly its probability. torch.multinomial draws one sample this way too (the same draws, so
    # the same tokens), but first checks the probabilities, which cost more than the draw itself.
    if race is None:
        race = torch.empty_like(logits).exponential_(generator=generator)
    return (logits.softmax(dim=-1) / race).argmax(dim=-1, keepdim=True)


def next_token(model: TransformerModel, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache,
               race: torch.Tensor, **sampling: Any) -> torch.Tensor:
    """One step of cached generation: the token (B, 1) after `tokens` (B, T) standing at `positions` (T,),
    drawn with `race` (see `sample_next`, which takes `sampling`). tinyllm_inference compiles it."""
    return sample_next(model.logits(tokens, positions, cache)[:, -1], race=race, **sampling)


def check_sampling(*, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Raise TinyLLMError for sampling settings that `sample_next` cannot use."""
    if not (isinstance(temperature, numbers.Real) and temperature > 0 and math.isfinite(temperature)):
        raise TinyLLMError(f"`temperature` must be positive and finite, got {temperature!r} "
                           "(for greedy decoding use `top_k` 1)")
    if top_k is not None and not (isinstance(top_k, numbers.Integral) and top_k > 0):
        raise TinyLLMError(f"`top_k` must be a positive whole number, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise TinyLLMError(f"`top_p` must be in (0, 1], got {top_p!r}")


def check_prompt_ids(idx: torch.Tensor, vocab_size: int, max_new_tokens: int) -> None:
    """Raise TinyLLMError for a prompt `generate_blocks` cannot continue (checked once, not each step)."""
    if idx.dim() != 2 or idx.shape[1] == 0 or idx.dtype not in (torch.long, torch.int):
        raise TinyLLMError(f"the prompt must be token ids of shape (batch, tokens), at least one token, as "
                           f"torch.long; got shape {tuple(idx.shape)} of {idx.dtype}")
    if idx.numel() and not (0 <= int(idx.min()) and int(idx.max()) < vocab_size):
        raise TinyLLMError(f"the prompt holds token ids outside the model's vocabulary [0, {vocab_size}): "
                           f"{int(idx.min())} to {int(idx.max())}")
    if not (isinstance(max_new_tokens, numbers.Integral) and max_new_tokens >= 0):
        raise TinyLLMError(f"max_new_tokens must be a whole number, zero or more, got {max_new_tokens!r}")


class Generation:
    """One generation between its blocks of tokens: the window of tokens the model sees, the cache,
    and the tokens the cache has not seen yet."""

    def __init__(self, model: TransformerModel, idx: torch.Tensor, *, use_cache: bool,
                 decode_step: Optional[Callable], generator: Optional[torch.Generator], sampling: dict):
        self.model, self.generator, self.sampling = model, generator, sampling
        self.step = decode_step or functools.partial(next_token, model)
        self.cache = KVCache(model, idx.shape[0]) if use_cache else None
        self.window = self.new = idx[:, -model.max_context:]  # new: the tokens the cache has not seen yet
        self.since_window: List[torch.Tensor] = []  # tokens made since `window` was last extended

    @torch.inference_mode()
    def block(self, draws: int, count: int) -> torch.Tensor:
        """The next `count` tokens (B, count), drawn with the first `count` of `draws` random draws."""
        races = torch.empty(draws, self.new.shape[0], self.model.config.vocab_size, device=self.new.device,
                            dtype=torch.float32).exponential_(generator=self.generator)
        return torch.cat([self.one_token(race) for race in races[:count]], dim=1)

    def one_token(self, race: torch.Tensor) -> torch.Tensor:
        """The next token (B, 1), drawn with `race`; first the window jumps, if it is full."""
        model, cache = self.model, self.cache
        if self.window.shape[1] + len(self.since_window) > model.max_context:  # the window jumps
            joined = torch.cat([self.window, *self.since_window], dim=1)
            self.window = self.new = joined[:, -model.window_after_jump:]
            self.since_window = []
            if cache is not None:  # filled again; its old slots stay, masked until they are written again
                cache.length = 0
        if cache is None:
            self.window, self.since_window = torch.cat([self.window, *self.since_window], dim=1), []
            next_id = sample_next(model(self.window)[0][:, -1], race=race, **self.sampling)
        else:  # the tokens the cache has not seen: a whole window when one starts, then one a step
            positions = torch.arange(cache.length, cache.length + self.new.shape[1], device=race.device)
            next_id = self.step(self.new, positions, cache, race, **self.sampling)
            cache.length += self.new.shape[1]
        self.since_window.append(next_id)
        self.new = next_id
        return next_id


def generate_blocks(model: TransformerModel, idx: torch.Tensor, max_new_tokens: int, *,
                    temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    generator: Optional[torch.Generator] = None, use_cache: bool = True,
                    decode_step: Optional[Callable] = None) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` sampled tokens continuing each row of `idx` (B, T), in blocks (B, n) of
    1, 2, 4, 8 and then 16 tokens; each cached step calls `decode_step` (`next_token` by default)."""
    # The first token comes at once; later ones share the cost of entering inference mode and of
    # drawing random numbers (a token at a time, a tenth of a compiled step's time). The window holds
    # at most max_context tokens; when it is full it jumps forward, keeping the newest
    # max_context // 2, and the cache is filled again from them in one pass (a cache cannot just drop
    # its oldest position: every later position's keys were computed while attending to it). Without
    # the cache the same window is recomputed at each step, so both routes give the same tokens. Each
    # fill of the cache and each token after it calls `decode_step(tokens, positions, cache, race,
    # **sampling)`. The draws, a (B, vocab) tensor a token, are made here a block at a time, so a seed
    # gives the same tokens whichever route runs and however many are asked for.
    check_sampling(temperature=temperature, top_k=top_k, top_p=top_p)
    check_prompt_ids(idx, model.config.vocab_size, max_new_tokens)
    generation = Generation(model, idx, use_cache=use_cache, decode_step=decode_step, generator=generator,
                            sampling=dict(temperature=temperature, top_k=top_k, top_p=top_p))
    was_training, made, size = model.training, 0, 1
    model.eval()
    try:
        while made < max_new_tokens:
            block = generation.block(size, min(size, max_new_tokens - made))
            yield block
            made, size = made + block.shape[1], min(2 * size, 16)
    finally:  # also when the caller stops early, e.g. at a stop string
        model.train(was_training)


def generate_tokens(model: TransformerModel, idx: torch.Tensor, max_new_tokens: int,
                    **options: Any) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` sampled tokens, each of shape (B, 1); options: `generate_blocks`."""
    for block in generate_blocks(model, idx, max_new_tokens, **options):
        yield from block.split(1, dim=1)


def generate(model: TransformerModel, idx: torch.Tensor, max_new_tokens: int,
             **sampling: Any) -> torch.Tensor:
    """`idx` (B, T) with `max_new_tokens` sampled tokens appended; options: `generate_blocks`."""
    return torch.cat([idx, *generate_blocks(model, idx, max_new_tokens, **sampling)], dim=1)


def encode_prompt(tokenizer: Tokenizer, prompt: str,
                  device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """A prepared prompt as a (1, T) tensor; an empty one starts from a newline (or token 0)."""
    try:
        ids = tokenizer.encode(prompt or "\n")
    except TinyLLMError as e:
        if prompt:
            raise TinyLLMError(f"the prompt has {e}, which the model never saw in training; "
                               "remove or replace them") from None
        ids = [0]  # a vocabulary without a newline
    return torch.tensor([ids], dtype=torch.long, device=device)


def sample_text(model: TransformerModel, tokenizer: Tokenizer, prompt: str, length: int, *,
                lowercase: bool = True, normalize_whitespace: bool = True, seed: Optional[int] = None,
                **sampling: Any) -> str:
    """The prompt, preprocessed like the training text, followed by `length` sampled tokens, decoded.
    `seed` makes it reproducible; `sampling`: see `generate_blocks`."""
    prompt, device = prepare_text(prompt, lowercase, normalize_whitespace), next(model.parameters()).device
    idx = encode_prompt(tokenizer, prompt, device)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    new_ids = generate(model, idx, length, generator=generator, **sampling)[0, idx.shape[1]:]
    return prompt + tokenizer.decode(new_ids.tolist())


def scored_tokens(n_ids: int, context: int, max_tokens: Optional[int]) -> int:
    """How many of `n_ids` tokens' successors `evaluate_full` scores: all, or whole windows holding at
    most `max_tokens` (at least one window)."""
    if max_tokens is None or n_ids - 1 <= max_tokens:
        return n_ids - 1
    return max(1, max_tokens // context) * context


@torch.no_grad()
def evaluate_full(model: TransformerModel, ids: torch.Tensor, batch_size: int,
                  autocast: Callable = contextlib.nullcontext, *, max_tokens: Optional[int] = None,
                  seed: int = 0, progress: Optional[Callable[[Iterator, int], Iterator]] = None) -> float:
    """Mean loss per token over ALL of `ids` in windows of max_context (over more than `max_tokens`, a
    seeded choice of windows holding that many); `progress(batches, n)`, e.g. tqdm, wraps the batches."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    windows = TokenWindows(ids, model.max_context)
    chosen, tail = range(len(windows)), ids[len(windows) * model.max_context:].long()  # a shorter window
    scored = scored_tokens(len(ids), model.max_context, max_tokens)
    if scored < len(ids) - 1:  # the same windows every time
        order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))
        chosen, tail = sorted(order[:scored // model.max_context].tolist()), tail[:0]
    starts = range(0, len(chosen), batch_size)
    batches = itertools.chain((windows[list(chosen[start:start + batch_size])] for start in starts),
                              [(tail[None, :-1], tail[None, 1:])] if len(tail) > 1 else [])
    total, count = torch.zeros((), device=device), 0
    for x, y in (progress or (lambda batches, _: batches))(batches, len(starts) + (len(tail) > 1)):
        with autocast():
            total += model(x.to(device), y.to(device))[1] * y.numel()
        count += y.numel()
    model.train(was_training)
    return total.item() / count


# ----------------------------------------------------------------------------------------------
# Metrics and checkpoints


class MetricsLogger:
    """Append one CSV row per call and flush it, so a crash never loses a logged row."""

    COLUMNS = ("step", "epoch", "train_loss", "val_loss", "learning_rate", "tokens_per_second",
               "elapsed_seconds")

    def __init__(self, path: PathLike, columns: Sequence[str] = COLUMNS):
        new_file = not Path(path).exists() or Path(path).stat().st_size == 0
        self.file = open(path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=columns)
        if new_file:
            self.writer.writeheader()

    def log(self, **row: Any) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def drop_metrics_after(path: Path, step: int, columns: Sequence[str] = MetricsLogger.COLUMNS) -> None:
    """Remove the rows logged after `step` from a CSV file of `columns`, with a `step` column (metrics.csv,
    a plug-in's): a resumed run logs those steps again. Other columns are refused: new rows would not fit."""
    if not path.exists():
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is not None and reader.fieldnames != list(columns):
                raise ValueError(f"its columns are {','.join(reader.fieldnames)}, not {','.join(columns)}")
            rows = [row for row in reader if int(row["step"]) <= step]
            if any(None in row or None in row.values() for row in rows):  # too many fields, or too few
                raise ValueError(f"a row without one value for each of {','.join(columns)}")
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error) as e:
        raise TinyLLMError(f"{path} is malformed ({e}); move it away to resume") from None
    except OSError as e:  # a folder, say
        raise TinyLLMError(f"cannot read {path} ({e.strerror}); move it away to resume") from None
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: the rebuilt model and tokenizer and the training state."""

    model: TransformerModel
    tokenizer: Tokenizer
    config: TrainingConfig
    optimizer_state: Optional[dict]
    step: int
    epoch: int
    best_val_loss: float
    training_state: Optional[dict] = None  # a RunState's fields, for an exact resume


def model_shape(model: TransformerModel) -> dict:
    """The TrainingConfig fields that a model's weights fix."""
    return {name: getattr(model.config, name) for name in ("max_context", *MODEL_FIELDS)}


def save_checkpoint(path: PathLike, model: TransformerModel,
                    optimizer: Optional[Union[Optimizer, OptimizerPair]] = None,
                    config: Optional[TrainingConfig] = None, tokenizer: Optional[Tokenizer] = None, *,
                    step: int = 0, epoch: int = 0, best_val_loss: float = math.inf,
                    training_state: Optional[dict] = None) -> None:
    """Save weights, optimizer, config, tokenizer and progress as tensors and plain Python data. The
    config's model fields are the model's own (a default config if none is given), so it loads."""
    if tokenizer is None or tokenizer.vocab_size != model.config.vocab_size:
        raise TinyLLMError(f"save_checkpoint needs the tokenizer of the model's {model.config.vocab_size} "
                           f"tokens (got {tokenizer.vocab_size if tokenizer else 'none'}): a checkpoint "
                           "without it could not be loaded")
    config = dataclasses.replace(config or TrainingConfig(out_dir=None), **model_shape(model))
    state = {"format": "tinyllm-checkpoint", "version": 1, "model_args": dataclasses.asdict(model.config),
             "model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
             "config": config.to_dict(), "tokenizer": {"type": tokenizer.type_name, **tokenizer.state()},
             "step": step, "epoch": epoch, "best_val_loss": float(best_val_loss),
             "quantization": model.quantization, "training_state": training_state}
    with atomic_write(path) as f:
        torch.save(state, f)


def read_checkpoint(path: PathLike) -> dict:
    """A checkpoint file's contents, read safely (weights_only: no pickled code runs), on the CPU."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # moved to `device` once checked
    except FileNotFoundError:
        raise TinyLLMError(f"checkpoint {path} does not exist; train a model first or pass its path") \
            from None
    except IsADirectoryError:
        raise TinyLLMError(f"checkpoint {path} is a folder; pass a checkpoint file in it, such as "
                           f"{Path(path) / 'best.pt'}") from None
    except Exception as e:  # torch raises many types for truncated, corrupt or unsafe files
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = (f"it holds a pickled {unsafe.group(1)}, which could run code, so it was not loaded"
                  if unsafe else "it is truncated, corrupted or not a PyTorch checkpoint")
        raise TinyLLMError(f"checkpoint {path} cannot be loaded safely: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != "tinyllm-checkpoint":
        raise TinyLLMError(f"{path} is not a tinyllm checkpoint")
    if state.get("version") != 1:  # every checkpoint so far; a later format may mean other things
        raise TinyLLMError(f"checkpoint {path} has format version {state.get('version')!r}, and this "
                           f"tinyllm {__version__} reads version 1; load it with the tinyllm that wrote it")
    return state


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> Checkpoint:
    """Load a checkpoint safely and rebuild its model and tokenizer, every part checked."""
    device = resolve_device(str(device))  # checked first: the file is not to blame
    state = read_checkpoint(path)
    try:
        counts, best = (state["step"], state["epoch"]), state["best_val_loss"]
        if not all(type(n) is int and n >= 0 for n in counts) or type(best) is not float or math.isnan(best):
            raise TypeError(f"step and epoch must be whole numbers and best_val_loss a number, got "
                            f"{[*counts, best]!r:.80}")
        config = TrainingConfig.from_checkpoint(state["config"], source="its config")  # the error names it
        tokenizer = Tokenizer.from_state(state["tokenizer"], "its tokenizer")
        # Checkpoints written before the token shift or the attention gates existed have neither.
        model = TransformerModel(ModelConfig(**{"token_shift": False, "attention_gate": False,
                                                **state["model_args"]}))
        if state.get("quantization"):
            QUANTIZATIONS[state["quantization"]](model)
        expected = model.state_dict()
        wrong = [f"{name} is {weight.dtype}" for name, weight in state["model"].items()
                 if name in expected and weight.dtype != expected[name].dtype]
        if wrong:  # load_state_dict would cast them silently
            raise TypeError(f"weights of the wrong type: {', '.join(wrong[:3])}")
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        detail = " ".join(line.strip() for line in str(e).splitlines())  # torch's first line names no weight
        raise TinyLLMError(f"checkpoint {path} is inconsistent ({detail[:300]})") from None
    weights = [weight for weight in model.state_dict().values() if weight.is_floating_point()]
    if not all(torch.isfinite(weight).all() for weight in weights):
        raise TinyLLMError(f"checkpoint {path} holds NaN or infinite weights; use an earlier checkpoint")
    if tokenizer.vocab_size != model.config.vocab_size:
        raise TinyLLMError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} tokens, "
                           f"model expects {model.config.vocab_size}")
    for name in ("max_context", *MODEL_FIELDS):
        if getattr(config, name) != getattr(model.config, name):
            raise TinyLLMError(f"checkpoint {path} is inconsistent: its config has {name} "
                               f"{getattr(config, name)} but its weights were built with "
                               f"{getattr(model.config, name)}")
    return Checkpoint(model.to(device), tokenizer, config, state["optimizer"], state["step"], state["epoch"],
                      state["best_val_loss"], state.get("training_state"))


def resumed_best(path: Path, device: torch.device) -> Optional[Checkpoint]:
    """A resumed run's best.pt, or None where it is gone; a damaged one is refused, saying what to do."""
    if not path.is_file():
        return None
    try:
        return load_checkpoint(path, device)
    except TinyLLMError as e:
        raise TinyLLMError(f"{e}; move it away to resume without it") from None


def starting_point(config: TrainingConfig, saved: Optional[Checkpoint], model: Optional[TransformerModel],
                   tokenizer: Optional[Tokenizer]) -> tuple:
    """The config, model and tokenizer to start from: a resumed run's own; a checkpoint's to fine-tune
    (with a fresh optimizer and schedule); or those given, whose model sets the config's shape."""
    if saved:
        stopped = (saved.training_state or {}).get("stopped_because")
        if stopped not in (None, "interrupted"):
            raise TinyLLMError(f"the run in {config.out_dir} finished at step {saved.step} ({stopped}); "
                               f"to train on, start a new run with `init_from` {config.out_dir}/best.pt")
        config = dataclasses.replace(saved.config, out_dir=config.out_dir, device=config.device,
                                     compile=config.compile)
        return config, saved.model, saved.tokenizer
    if config.init_from:
        start = load_checkpoint(config.init_from)
        if start.model.quantization:
            raise TinyLLMError(f"checkpoint {config.init_from} is {start.model.quantization}-quantized, "
                               "which cannot be trained; fine-tune from the float checkpoint it came from")
        inherited = ("model_size", "tokenizer", "lowercase", "normalize_whitespace")
        config = dataclasses.replace(config, **{name: getattr(start.config, name) for name in inherited})
        model, tokenizer = start.model, start.tokenizer
    if model is not None:
        config = dataclasses.replace(config, **model_shape(model))
    return config, model, tokenizer


# ----------------------------------------------------------------------------------------------
# The trainer: its state, clock, files and plug-in points, then the loop itself


@dataclass
class RunState:
    """Where a run stands. last.pt stores exactly these fields, so a resumed run continues exactly."""

    step: int = 0
    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    last_val_loss: float = math.nan
    last_val_step: int = -1
    bad_validations: int = 0  # validations in a row without a new best, for early stopping
    recent_losses: List[torch.Tensor] = field(default_factory=list)  # each step's, since the last validation
    epoch_rng_state: Optional[torch.Tensor] = None  # replayed on resume to cut the same batches
    elapsed_seconds: float = 0.0
    untimed_seconds: float = 0.0  # the first step, validation, samples and saves: not in tokens/s
    untimed_tokens: int = 0  # the tokens of those first steps (one a run, and one a resume)
    scaler: dict = field(default_factory=dict)
    data_sha256: str = ""
    rng: dict = field(default_factory=dict)  # torch's random generators (dropout, samples)
    samples_bytes: Optional[int] = None  # samples.txt's length: a resumed run cuts the samples after it
    stopped_because: Optional[str] = None  # set when the run has finished

    def check_losses(self) -> None:
        """Stop at a NaN or infinite loss since the last validation, naming its step, before it is saved."""
        losses = torch.stack(self.recent_losses) if self.recent_losses else torch.zeros(0)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            raise TinyLLMError(f"training loss became {losses[bad[0]].item()} at step "
                               f"{self.step - len(losses) + 1 + int(bad[0])}; lower `learning_rate` or set "
                               "`grad_clip` (nothing from that step on was saved)")

    def snapshot(self, clock: RunClock, scaler: torch.amp.GradScaler) -> dict:
        """The state now, with the clock, the gradient scaler and torch's random generators: tensors and
        plain data only, so last.pt loads with weights_only=True."""
        self.elapsed_seconds, self.untimed_seconds = clock.elapsed(), clock.untimed
        self.untimed_tokens = clock.untimed_tokens
        self.scaler = scaler.state_dict()
        self.rng = {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        losses = torch.stack(self.recent_losses).cpu() if self.recent_losses else torch.zeros(0)
        return {**vars(self), "recent_losses": losses}

    def restore_rng(self) -> None:
        torch.set_rng_state(self.rng["torch"])
        if self.rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.rng["cuda"])

    @classmethod
    def from_checkpoint(cls, saved: Checkpoint, device: torch.device) -> "RunState":
        """The state in `saved` (an earlier version kept step, epoch and best_val_loss outside it)."""
        fields = {"step": saved.step, "epoch": saved.epoch, "best_val_loss": saved.best_val_loss,
                  **saved.training_state}
        counts = [fields[name] for name in ("step", "epoch", "batch_in_epoch", "tokens_seen",
                                            "bad_validations")]
        counts += [fields[name] for name in ("samples_bytes", "untimed_tokens")  # not in runs saved before
                   if fields.get(name) is not None]
        if not all(type(count) is int and count >= 0 for count in counts):
            raise TypeError(f"step, epoch and the other counts must be whole numbers, got {counts}")
        times = [fields[name] for name in ("best_val_loss", "last_val_loss", "elapsed_seconds",
                                           "untimed_seconds")]
        generators = [fields["epoch_rng_state"], fields["rng"]["torch"]]
        if not all(type(value) in (int, float) for value in times) or not all(
                generator is None or isinstance(generator, torch.Tensor) and generator.dtype == torch.uint8
                for generator in generators):
            raise TypeError("its losses, times or random generator states are not of their types")
        return cls(**{**fields, "recent_losses": list(fields["recent_losses"].to(device))})


class RunClock:
    """Time: the budget, the time kept out of tokens/s (the first step, validation, samples, saves),
    and tokens/s since the last report."""

    def __init__(self, budget: Optional[float] = None, final_tokens: int = 0,
                 state: Optional[RunState] = None, *, sample_tokens: int = 0, step_tokens: int = 0):
        state = state or RunState()
        self.budget, self.final_tokens = budget, final_tokens  # final: tokens scored after the last step
        self.step_tokens = step_tokens  # a training step's, per process
        self.sample_tokens = sample_tokens  # the final sample's cost before one is timed, in forward tokens
        self.start = time.perf_counter() - state.elapsed_seconds  # a resumed run counts the time spent
        self.untimed, self.save_seconds = state.untimed_seconds, 0.0  # save: the latest checkpoint's
        self.untimed_tokens = state.untimed_tokens  # trained in the untimed time: not in tokens/s either
        self.forward_rate: Optional[float] = None  # tokens/s of the latest timed validation forward passes
        self.sample_seconds: Optional[float] = None  # the latest sample's
        self.window = (self.train_seconds(), state.tokens_seen)  # training seconds and tokens, last report

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def train_seconds(self) -> float:
        return self.elapsed() - self.untimed

    def budget_spent(self, tokens_per_process: int) -> float:
        """The share of the time budget spent (0 without one), counting the next step and the work after
        the last step too, so that a run which stops when it reaches 1 ends within its budget."""
        if self.budget is None:
            return 0.0
        next_step = self.step_tokens * self.seconds_per_token(tokens_per_process)
        return (self.elapsed() + next_step + self.final_seconds(tokens_per_process)) / self.budget

    def seconds_per_token(self, tokens_per_process: int) -> float:
        """Training's pace so far (0 before any token): what the budget's guesses start from."""
        return self.train_seconds() / tokens_per_process if tokens_per_process else 0.0

    def final_seconds(self, tokens_per_process: int) -> float:
        """The time the work after the last step will take: scoring `final_tokens` and sampling, at the
        pace last timed with a quarter to spare, and a save."""
        # Not yet timed, a forward pass is counted at two thirds of a training step's time per token
        # (it costs about a third).
        if not tokens_per_process:
            return 0.0
        guessed_rate = 1.5 / max(self.seconds_per_token(tokens_per_process), 1e-12)
        rate = self.forward_rate / 1.25 if self.forward_rate else guessed_rate
        sampling = self.sample_tokens / rate if self.sample_seconds is None else 1.25 * self.sample_seconds
        return self.final_tokens / rate + sampling + self.save_seconds

    @contextlib.contextmanager
    def untimed_block(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.untimed += time.perf_counter() - started

    def rate(self, tokens_seen: int) -> float:
        """Tokens per second of training since the last report."""
        seconds, tokens = self.train_seconds() - self.window[0], tokens_seen - self.window[1]
        self.window = (self.train_seconds(), tokens_seen)
        return tokens / max(seconds, 1e-9)

    def discard(self, tokens_seen: int) -> float:
        """Keep the time since the last report out of tokens/s (a warm-up); return it."""
        seconds = self.train_seconds() - self.window[0]
        self.untimed += seconds
        self.untimed_tokens += tokens_seen - self.window[1]
        self.window = (self.train_seconds(), tokens_seen)
        return seconds


class ConsoleHandler(logging.StreamHandler):
    """The console log. If the console goes away (output piped to `head`), the run carries on without it."""

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ValueError)):  # ValueError: a closed stream
            self.setLevel(logging.CRITICAL + 1)
        else:
            super().handleError(record)


class RunDirectory:
    """The files of a run in `path`; nothing is written without a path (training in memory) or by a
    distributed run's other processes (`main=False`)."""

    # The last four are plug-ins' files; an int8 copy kept beside a new run's checkpoints would be stale.
    FILES = ("best.pt", "last.pt", "tokenizer.json", "config.json", "tinyllm_training.log", "metrics.csv",
             "samples.txt", "summary.json", "loss.png", "steps.csv", "best.int8.pt", "last.int8.pt")
    SET_ASIDE = ".replaced"  # an earlier run's files, until the run replacing it has a checkpoint

    def __init__(self, path: Optional[PathLike], *, main: bool = True):
        self.path, self.main = Path(path) if path is not None else None, main
        self.writes = main and self.path is not None
        self.console = ConsoleHandler(sys.stdout)  # a progress bar plug-in may redirect it
        self.handlers: List[logging.Handler] = []
        self.metrics: Optional[MetricsLogger] = None
        self.lock: Optional[typing.IO] = None  # held while the run trains
        self.lock_holder = ""  # the process id of another run holding it
        self.replacing = False  # True while this run has an earlier run's files set aside

    def check(self, *, overwrite: bool, resume: bool) -> None:
        """Refuse to clobber an earlier run unless asked (its files go only when training starts)."""
        if overwrite and resume:
            raise TinyLLMError("`resume` continues a run and `overwrite` replaces it; choose one")
        if resume and not (self.path and (self.path / "last.pt").is_file()):
            raise TinyLLMError(f"nothing to resume: {self.path or '<no out_dir>'}/last.pt does not exist; "
                               "start a new run without `resume`")
        if self.path is None:
            return
        # Made only when the run opens, so that a run refused before (bad text, say) leaves no empty folder.
        nearest = nearest_existing(self.path)
        if not nearest.is_dir():
            raise TinyLLMError(f"cannot create output directory {self.path}: {nearest} is not a directory")
        with self._file_errors():
            if (self.path / self.SET_ASIDE).is_dir() and self._lock():  # set aside by a run killed since
                self._put_back()
                self._unlock()
        existing = [f for f in self.FILES if (self.path / f).exists()]
        if existing and not (overwrite or resume):
            raise TinyLLMError(f"{self.path} already holds a training run ({', '.join(existing)}); pass "
                               "`resume` to continue it, another `out_dir`, or `overwrite` to replace it")
        if not os.access(nearest, os.W_OK):
            raise TinyLLMError(f"output directory {self.path} is not writable; choose another `out_dir`")

    def open(self, config: TrainingConfig, tokenizer: Tokenizer, *, resumed: Optional[RunState],
             quiet: bool) -> None:
        """Write config.json and tokenizer.json and start the logs and metrics.csv, after setting an
        earlier run's files aside (or, resuming, dropping the metrics rows and samples after last.pt)."""
        self.console.setLevel(logging.WARNING if quiet else logging.INFO)
        self.handlers = [self.console if self.main else logging.NullHandler()]  # other processes: silent
        if self.writes:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TinyLLMError(f"cannot create output directory {self.path}: {e.strerror}") from None
            with self._file_errors():  # a folder where a file of the run belongs, say
                self._prepare_files(config, tokenizer, resumed)
        for handler in self.handlers:
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    def _prepare_files(self, config: TrainingConfig, tokenizer: Tokenizer,
                       resumed: Optional[RunState]) -> None:
        """Take the lock, set an earlier run aside (or trim a resumed one), open the logs, write the files."""
        if not self._lock():
            raise TinyLLMError(f"{self.path} is in use by another training run (process "
                               f"{self.lock_holder}); wait for it to end, or choose another `out_dir`")
        for tmp in self.path.glob(".*.tmp"):  # left by a process killed while writing
            if any(tmp.name.startswith(f".{name}.") for name in self.FILES):
                tmp.unlink()
        if (self.path / self.SET_ASIDE).is_dir():  # set aside by a run killed since
            self._put_back()
        samples = self.path / "samples.txt"
        if resumed is not None:  # the steps after last.pt come again, with their rows and samples
            drop_metrics_after(self.path / "metrics.csv", resumed.step)
            if resumed.samples_bytes is not None and samples.exists() and \
                    samples.stat().st_size > resumed.samples_bytes:
                os.truncate(samples, resumed.samples_bytes)
        for name in () if resumed is not None else self.FILES:
            if (self.path / name).exists():
                (self.path / self.SET_ASIDE).mkdir(exist_ok=True)
                os.replace(self.path / name, self.path / self.SET_ASIDE / name)
                self.replacing = True
        self.handlers.append(logging.FileHandler(self.path / "tinyllm_training.log", encoding="utf-8"))
        self.handlers[-1].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.metrics = MetricsLogger(self.path / "metrics.csv") if config.metrics_csv_enabled else None
        config.to_json(self.path / "config.json")
        tokenizer.save_state(self.path / "tokenizer.json")

    @contextlib.contextmanager
    def _file_errors(self) -> Iterator[None]:
        """An OSError in the out-dir as one line that names the path it met and what to do."""
        try:
            yield
        except OSError as e:
            what = {IsADirectoryError: "a folder, where the run keeps a file",
                    FileExistsError: "a file, where the run keeps a folder"}.get(type(e), e.strerror)
            raise TinyLLMError(f"cannot use {e.filename or self.path} for the run ({what}); move it away, or "
                               "choose another `out_dir`") from None

    def _lock(self) -> bool:
        """One run per out-dir: take an OS lock, which the kernel releases when the process ends (even
        by kill -9), so a second run is refused before it touches a file. False if another run holds it."""
        if fcntl is None:
            return True
        self.lock = open(self.path / ".tinyllm.lock", "a+", encoding="utf-8")
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.seek(0)
            self.lock_holder = self.lock.read().strip() or "unknown"
            self._unlock()
            return False
        self.lock.truncate(0)
        self.lock.write(str(os.getpid()))
        self.lock.flush()
        return True

    def _unlock(self) -> None:
        if self.lock:
            self.lock.close()  # which releases the lock
        self.lock = None

    def forget_earlier_run(self) -> None:
        """This run has a checkpoint of its own: the earlier run it replaces can go."""
        if self.replacing:
            shutil.rmtree(self.path / self.SET_ASIDE)
            self.replacing = False

    def _put_back(self) -> None:
        """Restore the earlier run set aside, replacing what a run that never saved a checkpoint wrote."""
        for name in self.FILES:
            (self.path / name).unlink(missing_ok=True)
        for saved in (self.path / self.SET_ASIDE).iterdir():
            os.replace(saved, self.path / saved.name)
        (self.path / self.SET_ASIDE).rmdir()

    def write(self, name: str, text: str, *, append: bool = False) -> None:
        if not self.writes:
            return
        path = self.path / name
        with open(path, "a", encoding="utf-8") if append else atomic_write(path, "w") as f:
            f.write(text)

    def close(self) -> None:
        """Close the logs; put back an earlier run if this one ended before its first checkpoint."""
        if self.metrics:
            self.metrics.close()
        for handler in self.handlers:
            logger.removeHandler(handler)
            handler.close()
        if self.replacing:
            self._put_back()
            self.replacing = False
        self._unlock()


class Callback:
    """A trainer plug-in overrides the moments it needs. `on_validation` and `on_end` may return a note
    for that log line, and `on_end` may add to the summary."""

    def on_start(self, trainer: Trainer) -> None: ...  # model, optimizer and files ready
    def on_step_end(self, trainer: Trainer) -> None: ...
    def on_validation(self, trainer: Trainer, row: dict) -> Optional[str]: ...  # row: the metrics row
    def on_stop(self, trainer: Trainer, reason: str) -> None: ...  # reason: "error" if the loop raised
    def on_end(self, trainer: Trainer, summary: dict) -> Optional[str]: ...


class World:
    """The processes training together: just this one, unless a plug-in (torchrun's) says otherwise.
    `mean` is sum(total) / sum(count) over the processes; `max`, the largest value any of them has."""

    rank, size = 0, 1

    def join(self, device: torch.device) -> torch.device: return device  # sets the process up
    def wrap(self, model: nn.Module) -> nn.Module: return model  # across processes, averaging gradients
    def mean(self, total: torch.Tensor, count: int) -> float: return float(total / count)  # 0 / 0: nan
    def average(self, values: torch.Tensor) -> torch.Tensor: return values
    def max(self, value: int) -> int: return value
    def barrier(self) -> None: pass


def check_device_name(name: str) -> None:
    """Raise TinyLLMError unless `name` is a device tinyllm knows (whether this machine has it or not)."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", name):
        raise TinyLLMError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)} (or cuda:N)")


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    check_device_name(name)
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device("cuda" if available["cuda"] else "mps" if available["mps"] else "cpu")
    if not available[name.split(":")[0]]:
        raise TinyLLMError(f"`device` {name} was asked for but PyTorch cannot see one here; use `device` cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> tuple:
    """The autocast dtype, and why. Whether bfloat16 is faster on a CPU depends on the chip and the
    model, and no CPU flag tells (a plug-in may time both); float32 is the safe default there."""
    if name != "auto":
        return DTYPES[name], "asked for"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16, "this CUDA GPU supports bfloat16"
    if device.type == "cuda":
        return torch.float16, "this CUDA GPU lacks bfloat16; float16 with a gradient scaler"
    return torch.float32, f"the safe default on {device.type}"


def autocast_context(device: torch.device, dtype: torch.dtype) -> Callable:
    """A maker of autocast contexts: none for float32, else matrix products in `dtype`."""
    return contextlib.nullcontext if dtype == torch.float32 else functools.partial(
        torch.autocast, device.type, dtype=dtype)


def scheduled_learning_rate(config: TrainingConfig, step: int, total_steps: int,
                            budget_spent: float) -> float:
    """Warmup-stable-decay: a linear warmup, the peak rate, then a linear decay to 3% over the second
    half of the run, by steps or by the time budget spent."""
    # In 180-s runs it beat a cosine decay by 0.03 (and a decay over the last 30% by 0.01 with Muon;
    # ending at 3% instead of 10% gained 0.004).
    warmup = min(config.warmup_steps, total_steps // 5)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = max((step - warmup) / max(1, total_steps - warmup), budget_spent)
    return config.learning_rate * (0.03 + 0.97 * min(1.0, max(0.0, (1 - progress) / 0.5)))


# Muon's iteration moves each singular value x of an update to ax + bx³ + cx⁵. Keller Jordan's one
# (a, b, c) is made to be repeated 5 times; these three were fitted here to be used once each: by
# gradient descent on the largest |log| of the result over 4,000 values spaced evenly in log from 0.01
# to 1, they move every value in [0.01, 1] into [0.71, 1.37] (his, three times: into [0.40, 1.20]).
NEWTON_SCHULZ = ((4.6961, -10.2315, 5.6362), (3.8621, -6.4516, 2.8252), (4.1091, -6.2103, 2.8402))


def orthogonalize(update: torch.Tensor) -> torch.Tensor:
    """`update` (..., rows, cols), each matrix with its singular values pushed towards 1 (to about
    0.7-1.4) by three Newton-Schulz iterations: the same directions, each moved at about the same rate."""
    tall = update.shape[-2] > update.shape[-1]
    x = update.float().reshape(-1, *update.shape[-2:])  # a batch of matrices, iterated at once
    x = x.mT if tall else x  # iterate on the smaller Gram matrices
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=1e-7)  # every singular value at most 1
    for a, b, c in NEWTON_SCHULZ:
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # ax + (bG + cG²)x
    return (x.mT if tall else x).reshape(update.shape).to(update.dtype)


def orthogonalize_together(updates: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """`orthogonalize` of each of `updates` (n, rows, cols), those of one shape stacked into one batch:
    fewer, larger products (every layer's matrices of a shape at once)."""
    same_shape: dict = {}
    for i, update in enumerate(updates):
        same_shape.setdefault(update.shape[1:], []).append(i)
    done: List[torch.Tensor] = list(updates)
    for indices in same_shape.values():
        stacked = orthogonalize(torch.cat([updates[i] for i in indices]))
        for i, part in zip(indices, stacked.split([len(updates[i]) for i in indices])):
            done[i] = part
    return done


class Muon(Optimizer):
    """Muon (Keller Jordan, 2024) for weight matrices: Nesterov momentum, each update orthogonalised,
    then scaled to a typical AdamW update's size (one learning rate serves both)."""
    # It is torch.optim.Muon with "match_rms_adamw", but it iterates in float32 (PyTorch's iterates in
    # bfloat16, which a CPU without bfloat16 units emulates 4x slower), and 3 times, not 5, with
    # coefficients fitted for 3: in 180-s runs on a CPU, that learned the most per second. Its momentum
    # warms up over the first `momentum_warmup` steps (0: none), as in the public speed records.

    def __init__(self, params: Any, lr: float, *, weight_decay: float = 0.1, momentum: float = 0.95,
                 momentum_warmup: int = 300, parts: Optional[Mapping[torch.Tensor, int]] = None):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self.momentum_warmup = momentum_warmup  # steps over which momentum rises from 0.1 below its value
        self.parts = dict(parts or {})  # weights that stack matrices by rows: how many, each orthogonalised

    def next_momentum(self, group: dict, weight: torch.Tensor) -> float:
        """Count a step of `weight`; its momentum: 0.1 below the group's at the first, rising to it over the
        warmup. Early gradients change fast; averaging fewer of them learned more in 1,000 steps."""
        state = self.state[weight]
        if "momentum_buffer" not in state:  # a new weight (a state saved before the warmup existed is warm)
            state["momentum_buffer"], state["step"] = torch.zeros_like(weight), 0
        state["step"] = state.get("step", self.momentum_warmup) + 1
        warmed = min(1.0, state["step"] / max(1, self.momentum_warmup))
        return max(0.0, group["momentum"] - 0.1 * (1 - warmed))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                beta, momentum = self.next_momentum(group, p), self.state[p]["momentum_buffer"]
                momentum.lerp_(p.grad, 1 - beta)
                update = p.grad.lerp(momentum, beta)
                updates.append(update.view(self.parts.get(p, 1), -1, p.shape[1]))
            for p, update in zip(params, orthogonalize_together(updates)):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update.reshape(p.shape), alpha=-group["lr"] * 0.2 * math.sqrt(max(update.shape[1:])))


class OptimizerPair:
    """Two optimizers over separate parameters, used as one: stepped, zeroed and saved together."""

    def __init__(self, first: Optimizer, second: Optimizer):
        self.optimizers = (first, second)

    @property
    def param_groups(self) -> List[dict]:
        """Both optimizers' groups, where the schedule sets `lr` (loading a state replaces them)."""
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"pair": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["pair"], strict=True):
            optimizer.load_state_dict(saved)


def adamw_optimizer(model: nn.Module, config: TrainingConfig, device: torch.device,
                    skip: Sequence[nn.Parameter] = ()) -> Optimizer:
    """AdamW over the model's trainable weights but `skip`, fused into one kernel; weight decay only
    on matrices, since decaying gains hurts."""
    skipped = {id(p) for p in skip}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skipped]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(0.9, 0.99),
                             fused=device.type in ("cpu", "cuda"))


def muon_optimizer(model: TransformerModel, config: TrainingConfig, device: torch.device) -> OptimizerPair:
    """Muon for the blocks' weight matrices; AdamW for the embeddings, the head and the gains."""
    hidden = [p for p in model.blocks.parameters() if p.dim() == 2 and p.requires_grad]
    # Queries, keys and values share one product, and so do the gate and its value: orthogonalising
    # each matrix on its own learned more in 180-s runs than orthogonalising the stack.
    parts = {**{block.attn.qkv.weight: 3 for block in model.blocks},
             **{block.ffn.up.weight: 2 for block in model.blocks}}
    return OptimizerPair(Muon(hidden, config.learning_rate, weight_decay=config.weight_decay, parts=parts),
                         adamw_optimizer(model, config, device, skip=hidden))


OPTIMIZERS.register("adamw", adamw_optimizer)
OPTIMIZERS.register("muon", muon_optimizer)


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes of memory the device has in all (a GPU's own, else the machine's); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return None


def check_memory(config: TrainingConfig, vocab_size: int, device: torch.device) -> None:
    """Refuse, before allocating, a run that cannot fit in the device's memory."""
    # Training keeps 4 floats per weight (the weight, its gradient and AdamW's two moments), a step's
    # activations for the backward pass (about 10 x n_embd, the SwiGLU hidden layer and the attention
    # scores per token and layer, and the logits), and the fixed validation batches.
    c, hidden = config, 16 * round(8 * config.n_embd / 3 / 16)
    weights = 2 * vocab_size * c.n_embd + c.n_layer * (4 * c.n_embd ** 2 + 3 * c.n_embd * hidden)
    tokens = c.batch_size * c.max_context
    per_token = c.n_layer * (10 * c.n_embd + 3 * hidden + c.n_head * c.max_context) + 3 * vocab_size
    activations = tokens * per_token
    needed = 4 * (4 * weights + activations) + 8 * c.val_batches * c.batch_size * (c.max_context + 1)
    available = device_memory(device)
    if available is not None and needed > available:
        raise TinyLLMError(f"this run needs at least {needed / 2**30:,.1f} GiB of memory ({weights:,} "
                           f"weights, batches of {tokens:,} tokens), more than the {available / 2**30:,.1f} "
                           f"GiB of {device}; choose a smaller `batch_size`, `max_context`, model or "
                           "`val_batches`")


def match_vocabulary(model: TransformerModel, tokenizer: Tokenizer) -> None:
    """Grow the model for the tokens a fine-tuning text added; refuse a model with more token ids than
    the tokenizer, which would sample ids nothing decodes."""
    ids, known = model.config.vocab_size, tokenizer.vocab_size
    if ids < known:
        model.grow_vocabulary(known)
    elif ids > known:
        raise TinyLLMError(f"the model has {ids} token ids but the tokenizer {known}; build it with "
                           f"vocab_size={known}, or pass the tokenizer it was built for")


def log_run_start(trainer: Trainer) -> None:
    """The first lines of a run's log: the text, the tokens, the model, the device and the batch."""
    c, m, state = trainer.config, trainer.model.config, trainer.state
    done = " and ".join(what for what, asked in (("lowercased", c.lowercase),
                                                 ("whitespace tidied", c.normalize_whitespace)) if asked)
    logger.info("text: %s characters, %s", f"{trainer.data.chars[0]:,}",
                f"{done}: {trainer.data.chars[1]:,} characters" if done else "kept as it is")
    logger.info("tinyllm: %d training and %d validation tokens, vocabulary of %d %s tokens",
                len(trainer.train_ids), len(trainer.val_ids), trainer.tokenizer.vocab_size, c.tokenizer)
    if trainer.resumed_at is not None:
        logger.info("resumed from %s at step %d (epoch %d, batch %d of it)",
                    trainer.run_dir.path / "last.pt", state.step, state.epoch, state.batch_in_epoch)
    elif c.init_from:
        logger.info("fine-tuning %s: %d tokens added to its vocabulary", c.init_from,
                    trainer.data.added_tokens)
    logger.info("model %s: %d layers, %d heads, %d wide, context %d, %s parameters", c.model_size,
                m.n_layer, m.n_head, m.n_embd, m.max_context, f"{trainer.model.num_parameters():,}")
    if trainer.full_val_tokens < len(trainer.val_ids) - 1:
        logger.info("the final evaluation scores %s of the %s validation tokens, a seeded choice of "
                    "windows (`full_val_tokens`)", f"{trainer.full_val_tokens:,}",
                    f"{len(trainer.val_ids) - 1:,}")
    logger.info("device %s, dtype %s (%s)", trainer.device, str(trainer.dtype).removeprefix("torch."),
                trainer.dtype_reason)
    per_process = f" per process x {trainer.world.size} processes = {c.batch_size * trainer.world.size}"
    limit = f"at most {trainer.total_steps} steps" if trainer.total_steps < math.inf else "no step limit"
    budget = f", time budget {c.time_budget:g} s" if c.time_budget else ""
    logger.info("batch %d%s, %d steps per epoch, %s%s", c.batch_size,
                per_process if trainer.world.size > 1 else "", trainer.steps_per_epoch, limit, budget)


class Trainer:
    """One training run: `Trainer(config, text).train()` returns the summary (also summary.json). With
    `resume`, the run in config.out_dir continues with its own settings (but out_dir, device, compile)."""
    # The text may be a data source instead (see TokenData). A model, a tokenizer and validation text
    # may be handed in; plug-ins attach as `callbacks`, and a distributed run passes its `world`.

    STOP_REASONS = ("max_steps", "time_budget", "early_stopping", "interrupted")  # later ones win

    def __init__(self, config: TrainingConfig, text: Union[str, Any], *, val_text: Optional[str] = None,
                 model: Optional[TransformerModel] = None, tokenizer: Optional[Tokenizer] = None,
                 callbacks: Sequence[Callback] = (), world: Optional[World] = None, quiet: bool = False,
                 overwrite: bool = False, resume: bool = False):
        self.world, self.callbacks, self.quiet = world or World(), list(callbacks), quiet
        self.run_dir = RunDirectory(config.out_dir, main=self.world.rank == 0)
        self.run_dir.check(overwrite=overwrite, resume=resume)
        saved = load_checkpoint(self.run_dir.path / "last.pt") if resume else None
        self.config, model, tokenizer = starting_point(config, saved, model, tokenizer)
        c = self.config
        torch.manual_seed(c.seed)
        self.device = self.world.join(resolve_device(c.device))
        self.dtype, self.dtype_reason = resolve_dtype(c.dtype, self.device)
        self.autocast = autocast_context(self.device, self.dtype)  # autocast() is a new context each time
        self.data = token_data(c, text, val_text, tokenizer)
        self.tokenizer, train_ids, val_ids = self.data.tokenizer, self.data.train_ids, self.data.val_ids
        check_prompt(c, self.tokenizer)
        check_memory(c, self.tokenizer.vocab_size, self.device)
        self.train_ids, self.val_ids = on_device(train_ids, self.device), on_device(val_ids, self.device)
        self.val_batches = fixed_batches(self.val_ids, c.max_context, c.batch_size, c.val_batches, c.seed)
        self.full_val_tokens = scored_tokens(len(val_ids), c.max_context, c.full_val_tokens)  # at the end
        batches = len(TokenWindows(train_ids, c.max_context)) // c.batch_size
        self.steps_per_epoch = max(1, batches // self.world.size)
        # Without `epochs`, a time budget is the stopping rule: the run does not end after ten passes.
        self.epochs = c.epochs or (math.inf if c.time_budget else 10)
        self.total_steps = min(self.epochs * self.steps_per_epoch, c.max_steps or math.inf)  # may be inf
        if model is None:
            model = TransformerModel.from_config(c, self.tokenizer.vocab_size)
        self.model = model.to(self.device)
        match_vocabulary(self.model, self.tokenizer)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for float32 products
        self.eager_model = self.world.wrap(self.model)
        # Compiling fuses the small operations between matrix products; evaluation and sampling use
        # the plain module, so changing mode or shape never triggers a recompile.
        self.train_model = torch.compile(self.eager_model, dynamic=False) if c.compile else self.eager_model
        self.optimizer = OPTIMIZERS[self.config.optimizer](self.model, self.config, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.state = RunState(data_sha256=self.data.sha256)
        self.generator = torch.Generator().manual_seed(c.seed)  # shuffles the batches
        self.clock, self.lr = RunClock(), c.learning_rate  # lr: the latest step's learning rate
        self.best_weights: Optional[dict] = None  # the model's weights at the best validation loss,
        self.best_step = 0  # and the step they are from
        self.stop_requested, self.first_step = False, 1
        self.evaluation_progress = None  # a plug-in may wrap the final evaluation's batches: a progress bar
        if saved:
            self._restore(saved)
        self.resumed_at = self.state.step if saved else None  # the step last.pt was saved at

    def _restore(self, saved: Checkpoint) -> None:
        """Put the run back where last.pt left it: optimizer, schedule, position in the epoch, validation
        history, timers, torch's random generators, and the best weights."""
        path = self.run_dir.path / "last.pt"
        if not saved.training_state or not saved.optimizer_state:
            raise TinyLLMError(f"{path} holds no training state to resume from")
        if saved.training_state.get("data_sha256") != self.state.data_sha256:
            raise TinyLLMError(f"the text differs from the one the run in {self.run_dir.path} was trained "
                               "on; pass the same `text` to resume it")
        best = resumed_best(self.run_dir.path / "best.pt", self.device)  # first: it draws random numbers
        if best:
            self.best_weights, self.best_step = best.model.state_dict(), best.step
        try:
            self.state = RunState.from_checkpoint(saved, self.device)
            if not best:  # best.pt is gone: the next validation's weights are the best kept
                self.state.best_val_loss = math.inf
            self.optimizer.load_state_dict(saved.optimizer_state)
            self.scaler.load_state_dict(self.state.scaler)
            self.state.restore_rng()  # last, so that nothing draws from them before training does
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise TinyLLMError(f"{path} cannot be resumed from ({str(e).splitlines()[0][:200]})") from None

    def learning_rate(self) -> float:
        budget_spent = self.clock.budget_spent(self.state.tokens_seen // self.world.size)
        return scheduled_learning_rate(self.config, self.state.step, self.total_steps, budget_spent)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One optimizer step; the loss stays a tensor so the step never waits on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            loss = self.train_model(x, y)[1]
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches, shared out among the processes."""
        return self.validation_loss(self.val_batches)

    def validation_loss(self, batches: Sequence[tuple]) -> float:
        """Mean loss over `batches`, shared out among the processes. Their pace is kept: the time
        budget reckons the work after the last step from it."""
        started = time.perf_counter()
        self.model.eval()
        with torch.no_grad(), self.autocast():
            mine = batches[self.world.rank::self.world.size]
            losses = [self.model(x, y)[1].float() for x, y in mine]
        self.model.train()
        loss = self.world.mean(sum(losses, torch.zeros((), device=self.device)), len(losses))
        self.clock.forward_rate = sum(y.numel() for _, y in mine) / max(time.perf_counter() - started, 1e-9)
        return loss

    def request_stop(self) -> None:
        """End the run after the current step (a signal handler may call this)."""
        self.stop_requested = True

    def train(self) -> dict:
        """Run the loop and write every output file; return the summary ({} on the other processes)."""
        try:
            self.world.barrier()  # every process has checked the out-dir before the first writes to it
            self.run_dir.open(self.config, self.tokenizer, quiet=self.quiet,
                              resumed=self.state if self.resumed_at is not None else None)
            log_run_start(self)
            c = self.config  # from here on the time counts, against a time budget too
            final = self.full_val_tokens + c.val_batches * c.batch_size * c.max_context
            sample = c.sample_length * c.max_context  # a sample, in forward tokens, until one is timed
            self.clock = RunClock(c.time_budget, final, self.state, sample_tokens=sample,
                                  step_tokens=c.batch_size * c.max_context)
            self._hook("on_start")
            return self._finish(self._loop())
        finally:
            self.run_dir.close()

    def _hook(self, name: str, *args: Any) -> str:
        """Call `name` on every callback; return their notes for the log line, each after a comma."""
        notes = [getattr(callback, name)(self, *args) for callback in self.callbacks]
        return "".join(f", {note}" for note in notes if note)

    def _loop(self) -> str:
        """Train until epochs, max_steps, the time budget, early stopping or a stop request ends it."""
        self.first_step, reason = self.state.step + 1, "error"
        try:
            reason = self._run_epochs()
        finally:
            self._hook("on_stop", reason)
        if self.state.last_val_step != self.state.step:
            self._validate()
        return reason

    def _run_epochs(self) -> str:
        c, state = self.config, self.state
        while state.epoch < self.epochs:
            if state.batch_in_epoch == 0:
                state.epoch_rng_state = self.generator.get_state()
            self.generator.set_state(state.epoch_rng_state)  # resuming mid-epoch replays its shuffle
            loader = epoch_loader(self.train_ids, c.max_context, c.batch_size, self.generator,
                                  self.world.rank, self.world.size)
            for x, y in itertools.islice(loader, state.batch_in_epoch, None):
                reason = self._stop_reason()
                if reason:
                    return reason
                self.lr = self.learning_rate()
                state.recent_losses.append(self.train_step(x, y, self.lr))
                state.step, state.batch_in_epoch = state.step + 1, state.batch_in_epoch + 1
                state.tokens_seen += y.numel() * self.world.size
                self._after_step()
            state.batch_in_epoch, state.epoch = 0, state.epoch + 1
        return "epochs"

    def _after_step(self) -> None:
        c, step = self.config, self.state.step
        if step == self.first_step:  # it compiles and warms up: report it, and keep it out of tokens/s
            self.state.recent_losses[-1].item()  # wait for the device
            logger.info("first step took %.1f s (%s)", self.clock.discard(self.state.tokens_seen),
                        "warm-up" if self.train_model is self.eager_model else "compilation and warm-up")
            if self.clock.budget is not None:  # a short run validates only at its end: time forward passes
                with self.clock.untimed_block():  # of three batches (one alone was 14% off a validation's)
                    self.validation_loss(self.val_batches[:3 * self.world.size])
        self._hook("on_step_end")  # first: the step's loss is in recent_losses until a validation
        if step % c.val_frequency == 0:
            self._validate()
        if step % c.sample_frequency == 0:
            self._sample()
        if step % c.checkpoint_frequency == 0:
            self.save_last()

    def _stop_reason(self) -> Optional[str]:
        """Why to stop now, if at all. All processes agree on the latest reason in STOP_REASONS that any
        of them has, since one that stopped alone would leave the others waiting for it forever."""
        c, state = self.config, self.state
        reasons = {"max_steps": c.max_steps is not None and state.step >= c.max_steps,
                   "time_budget": self.clock.budget_spent(state.tokens_seen // self.world.size) >= 1,
                   "early_stopping": (c.early_stopping_patience is not None
                                      and state.bad_validations >= c.early_stopping_patience),
                   "interrupted": self.stop_requested}
        local = max((i + 1 for i, name in enumerate(self.STOP_REASONS) if reasons[name]), default=0)
        code = self.world.max(local)
        return self.STOP_REASONS[code - 1] if code else None

    def _validate(self) -> None:
        """Validate, log a metrics row, keep and save the best model; stop on a NaN loss."""
        state = self.state
        state.check_losses()
        losses = state.recent_losses
        train_loss = self.world.mean(sum(losses, torch.zeros((), device=self.device)), len(losses))
        tokens_per_second = self.clock.rate(state.tokens_seen)
        with self.clock.untimed_block():
            state.last_val_loss, state.last_val_step = self.evaluate(), state.step
            improved = state.last_val_loss < state.best_val_loss
            state.bad_validations = 0 if improved else state.bad_validations + 1
            if improved:
                state.best_val_loss = state.last_val_loss
                self.best_weights = {name: w.detach().clone() for name, w in self.model.state_dict().items()}
                self.best_step = state.step
                self._save("best.pt")
            epoch = state.epoch + (state.step - state.epoch * self.steps_per_epoch) / self.steps_per_epoch
            row = dict(step=state.step, epoch=round(epoch, 4), train_loss=round(train_loss, 5),
                       val_loss=round(state.last_val_loss, 5), learning_rate=self.lr,
                       tokens_per_second=round(tokens_per_second, 1),
                       elapsed_seconds=round(self.clock.elapsed(), 3))
            notes = self._hook("on_validation", row)
            logger.info("step %d (epoch %.2f): train loss %.4f, val loss %.4f (%.3f bits/char), lr %.2e, "
                        "%.0f tokens/s%s", state.step, epoch, train_loss, state.last_val_loss,
                        bits_per_char(state.last_val_loss, len(self.val_ids), self.data.val_chars), self.lr,
                        tokens_per_second, notes)
            if self.run_dir.metrics:
                self.run_dir.metrics.log(**row)
            state.recent_losses = []

    def _sample(self, label: str = "") -> str:
        c = self.config
        if not self.run_dir.main:
            return ""
        with self.clock.untimed_block():
            started = time.perf_counter()
            text = sample_text(self.model, self.tokenizer, c.sample_prompt, c.sample_length,
                               temperature=c.temperature, lowercase=c.lowercase,
                               normalize_whitespace=c.normalize_whitespace)
            self.clock.sample_seconds = time.perf_counter() - started
            label = label or f"step {self.state.step}"
            logger.info("sample at %s:\n%s", label, text)
            self.run_dir.write("samples.txt", f"=== {label} ===\n{text}\n\n", append=True)
        return text

    def _save(self, name: str) -> None:
        if not self.run_dir.writes:
            return
        started, state = time.perf_counter(), self.state
        samples = self.run_dir.path / "samples.txt"
        state.samples_bytes = samples.stat().st_size if samples.exists() else 0
        save_checkpoint(self.run_dir.path / name, self.model, self.optimizer, self.config, self.tokenizer,
                        step=state.step, epoch=state.epoch, best_val_loss=state.best_val_loss,
                        training_state=state.snapshot(self.clock, self.scaler))
        self.run_dir.forget_earlier_run()
        self.clock.save_seconds = time.perf_counter() - started

    def save_last(self) -> None:
        """Write last.pt (kept out of tokens/s), once the losses since the last one are checked."""
        self.state.check_losses()
        with self.clock.untimed_block():
            self._save("last.pt")

    def _finish(self, stopped_because: str) -> dict:
        """Write last.pt, score the best model on the whole validation split, sample, summarise."""
        state, train_seconds = self.state, self.clock.train_seconds()
        state.stopped_because = stopped_because
        self.save_last()
        if not self.run_dir.main:
            return {}
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        c, val_chars = self.config, self.data.val_chars
        full_val_loss = evaluate_full(self.model, self.val_ids, c.batch_size, self.autocast,
                                      max_tokens=c.full_val_tokens, seed=c.seed,
                                      progress=self.evaluation_progress)
        sample = self._sample(f"the end, from the best model (step {self.best_step})")
        tokens_per_second = (state.tokens_seen - self.clock.untimed_tokens) / max(train_seconds, 1e-9)
        summary = {"best_val_loss": state.best_val_loss, "best_step": self.best_step,
                   "final_val_loss": state.last_val_loss, "full_val_loss": full_val_loss,
                   "full_val_bits_per_char": bits_per_char(full_val_loss, len(self.val_ids), val_chars),
                   "full_val_tokens": self.full_val_tokens,
                   "steps": state.step, "epochs_completed": state.epoch, "tokens_seen": state.tokens_seen,
                   "tokens_per_second": round(tokens_per_second, 1),
                   "elapsed_seconds": round(self.clock.elapsed(), 3),
                   "parameters": self.model.num_parameters(), "device": str(self.device),
                   "dtype": str(self.dtype).removeprefix("torch."), "stopped_because": stopped_because,
                   "sample": sample}
        notes = self._hook("on_end", summary)
        self.run_dir.write("summary.json", json.dumps(summary, indent=2))
        logger.info("stopped after %d steps (%s) in %.1f s; best val loss %.4f, full val loss %.4f "
                    "(%.3f bits/char), %.0f tokens/s%s", state.step, stopped_because,
                    summary["elapsed_seconds"], state.best_val_loss, full_val_loss,
                    summary["full_val_bits_per_char"], tokens_per_second, notes)
        return summary


if __name__ == "__main__":  # `python -m tinyllm`: the command line, which train_shakespeare.py holds
    if importlib.util.find_spec("train_shakespeare") is None:
        print("error: python -m tinyllm runs the command line in train_shakespeare.py; put that file "
              "beside tinyllm.py", file=sys.stderr)
        sys.exit(2)
    sys.exit(importlib.import_module("train_shakespeare").command_line())
