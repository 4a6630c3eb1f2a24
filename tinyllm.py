"""tinyllm: train a character-level transformer language model, in one readable file.

The module reads top to bottom in the order data flows: errors and registries, tokenizers,
the configuration, data, the model, sampling, training, then metrics and checkpoints.
Copy this file into your project or `from tinyllm import TransformerModel`.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import typing
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from tqdm import tqdm

__all__ = [
    "TinyLLMError", "TrainingInterrupted", "Registry", "TOKENIZERS", "MODEL_SIZES", "Tokenizer",
    "CharacterTokenizer",
    "BytePairTokenizer", "load_tokenizer", "TrainingConfig", "prepare_text", "load_text", "split_train_val",
    "bits_per_char",
    "TokenWindows", "TransformerModel", "KVCache", "generate", "generate_tokens", "stream_text",
    "sample_text", "evaluate_full", "Trainer",
    "Int8Linear", "quantize_int8", "MetricsLogger", "plot_losses", "Checkpoint", "save_checkpoint",
    "load_checkpoint", "atomic_write",
]

PathLike = Union[str, os.PathLike]
logger = logging.getLogger("tinyllm")

# ----------------------------------------------------------------------------------------------
# Errors and registries


class TinyLLMError(ValueError):
    """A user mistake: the message says what was wrong and how to fix it."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM after saving last.pt; `exit_code` follows the
    shell's convention of 128 + the signal number (130, 143)."""

    def __init__(self, signal_number: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signal_number


class Registry:
    """A named table of classes or entries, so a new one is added with one decorator or call.

    Installed packages may add entries under the entry-point group `group` (a plugin); they are
    loaded the first time the table is read, and `check` vets each one.
    """

    def __init__(self, kind: str, group: Optional[str] = None,
                 check: Callable[[Any], None] = lambda entry: None):
        self.kind, self.group, self.check = kind, group, check
        self._entries: Dict[str, Any] = {}
        self._plugins_loaded = group is None

    def register(self, name: str, entry: Any = None) -> Any:
        """Register `entry` under `name`; without `entry`, return a decorator that does."""
        if entry is None:
            return lambda obj: self.register(name, obj)
        self._entries[name] = entry
        return entry

    def _table(self) -> Dict[str, Any]:
        if not self._plugins_loaded:
            self._plugins_loaded = True
            found = metadata.entry_points()
            if hasattr(found, "select"):
                plugins = found.select(group=self.group)
            else:  # Python 3.9 returns a dict of groups
                plugins = found.get(self.group, [])
            for plugin in plugins:
                self._load_plugin(plugin)
        return self._entries

    def _load_plugin(self, plugin: metadata.EntryPoint) -> None:
        """A broken plugin gets a warning that names it, never a crash of unrelated commands."""
        if plugin.name in self._entries:
            warnings.warn(f"tinyllm: {self.kind} plugin {plugin.name!r} ({plugin.value}) is ignored: "
                          "that name is already taken")
            return
        try:
            entry = plugin.load()
            self.check(entry)
        except Exception as e:
            warnings.warn(f"tinyllm: {self.kind} plugin {plugin.name!r} ({plugin.value}) is ignored: "
                          f"{type(e).__name__}: {e}")
            return
        self._entries[plugin.name] = entry

    def __getitem__(self, name: str) -> Any:
        if name not in self._table():
            raise TinyLLMError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self._table()

    def names(self) -> List[str]:
        return sorted(self._table())


def _check_tokenizer_class(entry: Any) -> None:
    if not (isinstance(entry, type) and issubclass(entry, Tokenizer)):
        raise TypeError(f"expected a subclass of tinyllm.Tokenizer, got {entry!r}")


def _check_model_size(entry: Any) -> None:
    if not isinstance(entry, dict) or not set(entry) <= set(MODEL_FIELDS):
        raise TypeError(f"expected a dict with keys among {', '.join(MODEL_FIELDS)}, got {entry!r}")


TOKENIZERS = Registry("tokenizer", "tinyllm.tokenizers", _check_tokenizer_class)
MODEL_SIZES = Registry("model size", "tinyllm.model_sizes", _check_model_size)
# Each size is a dict of model fields; TrainingConfig fills the fields a user left unset.
MODEL_SIZES.register("tiny", {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0})
MODEL_SIZES.register("small", {"n_layer": 4, "n_head": 4, "n_embd": 128, "dropout": 0.0})
MODEL_SIZES.register("medium", {"n_layer": 6, "n_head": 6, "n_embd": 384, "dropout": 0.2})
MODEL_SIZES.register("large", {"n_layer": 8, "n_head": 8, "n_embd": 512, "dropout": 0.2})


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[typing.IO]:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`.

    A reader (or a crash) never sees half a file, and the old file survives any failure.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read_json(path: PathLike, what: str) -> dict:
    """Read a JSON object from `path`, turning every way that can fail into a TinyLLMError."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise TinyLLMError(f"{what} file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TinyLLMError(f"{what} file {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TinyLLMError(f"{what} file {path} must hold a JSON object, not {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer:
    """Base class. Subclasses define `fit`, `encode`, `decode`, `vocab_size`, and `state()` /
    `set_state(state)` to turn themselves into plain JSON data and back."""

    type_name = ""
    version = 1
    learns_vocabulary = False  # True where fit(text, vocab_size) uses the size (the config's vocab_size)

    def save_state(self, path: PathLike) -> None:
        """Save the tokenizer as a language-neutral JSON file."""
        with atomic_write(path, "w") as f:
            json.dump({"type": self.type_name, "version": self.version, **self.state()}, f,
                      ensure_ascii=False)

    def load_state(self, path: PathLike) -> "Tokenizer":
        """Fill this tokenizer from a JSON file written by `save_state`; returns self."""
        state = _read_json(path, "tokenizer")
        if state.get("type") != self.type_name or state.get("version") != self.version:
            raise TinyLLMError(f"tokenizer file {path} holds type {state.get('type')!r} version "
                               f"{state.get('version')!r}, expected {self.type_name!r} "
                               f"version {self.version}")
        try:
            self.set_state(state)
        except (KeyError, TypeError, ValueError) as e:
            raise TinyLLMError(f"tokenizer file {path} is malformed ({e})") from None
        return self

    def extend(self, text: str) -> int:
        """Add the tokens `text` needs that the vocabulary lacks, after the existing ones (so their
        ids stay); return how many were added. A tokenizer that encodes any text adds none."""
        self.encode(text)
        return 0


@TOKENIZERS.register("char")
class CharacterTokenizer(Tokenizer):
    """One token per character; the vocabulary is the sorted set of characters seen in `fit`."""

    type_name = "char"

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
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}

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
        return "".join(self.chars[i] for i in ids)


def merge_pair(ids: List[int], pair: tuple, new_id: int) -> List[int]:
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`."""
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


@TOKENIZERS.register("bpe")
class BytePairTokenizer(Tokenizer):
    """Byte-level byte-pair encoding, as in GPT-2: tokens 0-255 are the UTF-8 bytes, and `fit` adds
    one token at a time for the most frequent adjacent pair, so any text encodes without unknowns.

    Text is first cut into pieces (a word with its leading space, a number, a run of punctuation,
    whitespace) and merges never cross pieces, so each distinct piece is encoded once and cached.
    """

    type_name = "bpe"
    learns_vocabulary = True
    default_vocab_size = 256 + 512
    PIECES = re.compile(r" ?[^\W\d]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")  # covers every character

    def __init__(self, merges: Sequence[Sequence[int]] = ()):
        self.set_state({"merges": [list(pair) for pair in merges]})

    def fit(self, text: str, vocab_size: Optional[int] = None) -> "BytePairTokenizer":
        """Learn merges until the vocabulary has `vocab_size` tokens (or no pair occurs twice)."""
        vocab_size = vocab_size or self.default_vocab_size
        if vocab_size < 256:
            raise TinyLLMError(f"a byte-level BPE vocabulary needs at least 256 tokens, got {vocab_size}")
        counts = Counter(self.PIECES.findall(text))
        pieces, weights = [list(piece.encode("utf-8")) for piece in counts], list(counts.values())
        pair_counts, holders = Counter(), defaultdict(set)  # pair -> occurrences, and which pieces hold it
        for index, (ids, weight) in enumerate(zip(pieces, weights)):
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += weight
                holders[pair].add(index)
        merges: List[tuple] = []
        while 256 + len(merges) < vocab_size and pair_counts:
            best = max(pair_counts, key=pair_counts.__getitem__)
            if pair_counts[best] < 2:
                break
            merges.append(best)
            for index in holders.pop(best):  # only the pieces holding the pair change
                ids, weight = pieces[index], weights[index]
                for pair in zip(ids, ids[1:]):
                    pair_counts[pair] -= weight
                pieces[index] = ids = merge_pair(ids, best, 255 + len(merges))
                for pair in zip(ids, ids[1:]):
                    pair_counts[pair] += weight
                    holders[pair].add(index)
            pair_counts = +pair_counts  # drop the pairs that no longer occur
        self.set_state({"merges": [list(pair) for pair in merges]})
        return self

    def state(self) -> dict:
        return {"merges": [list(pair) for pair in self.merges]}

    def set_state(self, state: dict) -> None:
        merges = [tuple(pair) for pair in state["merges"]]
        for rank, pair in enumerate(merges):
            if len(pair) != 2 or not all(type(i) is int and 0 <= i < 256 + rank for i in pair):
                raise ValueError(f"merge {rank} must be two ids of earlier tokens, got {list(pair)}")
        self.merges, self.ranks = merges, {pair: rank for rank, pair in enumerate(merges)}
        self.token_bytes = [bytes([i]) for i in range(256)]
        for a, b in merges:
            self.token_bytes.append(self.token_bytes[a] + self.token_bytes[b])
        self.cache: Dict[str, List[int]] = {}

    @property
    def vocab_size(self) -> int:
        return 256 + len(self.merges)

    def encode(self, text: str) -> List[int]:
        ids: List[int] = []
        for piece in self.PIECES.findall(text):
            if piece not in self.cache:
                self.cache[piece] = self._encode_piece(list(piece.encode("utf-8")))
            ids.extend(self.cache[piece])
        return ids

    def _encode_piece(self, ids: List[int]) -> List[int]:
        """Apply the merges in the order they were learned, as `fit` did."""
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            ids = merge_pair(ids, pair, 256 + self.ranks[pair])
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")


def load_tokenizer(path: PathLike) -> Tokenizer:
    """Build the registered tokenizer named by the JSON file's `type` and load its state."""
    kind = _read_json(path, "tokenizer").get("type")
    if not isinstance(kind, str):
        raise TinyLLMError(f"tokenizer file {path} has no string 'type' field")
    return TOKENIZERS[kind]().load_state(path)


# ----------------------------------------------------------------------------------------------
# Configuration

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "dropout")


@dataclass
class TrainingConfig:
    """Every setting of a training run; model fields left as None come from `model_size`."""

    # The training loop.
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 4e-3
    max_context: int = 128
    val_frequency: int = 500
    checkpoint_frequency: int = 500  # last.pt every this many steps, so a crash loses no more
    sample_frequency: int = 1000
    temperature: float = 0.8
    metrics_csv_enabled: bool = True
    # The model.
    model_size: str = "small"
    n_layer: Optional[int] = None
    n_head: Optional[int] = None
    n_embd: Optional[int] = None
    dropout: Optional[float] = None
    # The data.
    lowercase: bool = True
    normalize_whitespace: bool = True
    val_fraction: float = 0.1
    # The run.
    init_from: Optional[str] = None  # a checkpoint to fine-tune, instead of a fresh model
    tokenizer: str = "char"
    vocab_size: Optional[int] = None  # for tokenizers that learn their vocabulary (bpe); None: theirs
    seed: int = 1337
    weight_decay: float = 0.1
    grad_clip: Optional[float] = 1.0
    warmup_steps: int = 100
    early_stopping_patience: Optional[int] = None
    val_batches: int = 20
    max_steps: Optional[int] = None
    time_budget: Optional[float] = None
    device: str = "auto"
    dtype: str = "auto"
    compile: Optional[bool] = None
    out_dir: str = "out"
    sample_prompt: str = ""
    sample_length: int = 300

    def __post_init__(self) -> None:
        self._check_types()
        for name, value in MODEL_SIZES[self.model_size].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self._check_values()

    def _check_types(self) -> None:
        for field, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, field)
            optional = type(None) in typing.get_args(hint)
            base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
            if value is None and optional:
                continue
            if base is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value) if abs(value) < 1e300 else math.inf  # inf fails the value checks
                setattr(self, field, value)
            if not isinstance(value, base) or (base is int and isinstance(value, bool)):
                raise TinyLLMError(f"config field {field!r} must be {base.__name__}"
                                   f"{' or null' if optional else ''}, got {value!r}")

    def _check_values(self) -> None:
        positive = ["epochs", "batch_size", "learning_rate", "max_context", "val_frequency",
                    "checkpoint_frequency",
                    "sample_frequency", "temperature", "n_layer", "n_head", "n_embd",
                    "val_batches", "sample_length", "max_steps", "time_budget", "grad_clip",
                    "early_stopping_patience", "vocab_size"]
        for name in positive:
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise TinyLLMError(f"config field {name!r} must be positive, got {value!r}")
        for name in ("weight_decay", "warmup_steps"):
            if not (getattr(self, name) >= 0 and math.isfinite(getattr(self, name))):
                raise TinyLLMError(f"config field {name!r} must be zero or more, got {getattr(self, name)!r}")
        if not 0 <= self.dropout < 1:
            raise TinyLLMError(f"config field 'dropout' must be in [0, 1), got {self.dropout!r}")
        if not 0 < self.val_fraction <= 0.5:
            raise TinyLLMError(f"config field 'val_fraction' must be in (0, 0.5], got {self.val_fraction!r}")
        check_head_size(self.n_embd, self.n_head)
        if not 0 <= self.seed < 2**32:
            raise TinyLLMError(f"config field 'seed' must be in [0, 2**32), got {self.seed!r}")
        if not self.out_dir:
            raise TinyLLMError("config field 'out_dir' must name a directory, got ''")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise TinyLLMError(f"unknown device {self.device!r}; choose one of: {', '.join(DEVICES)} "
                               "(or cuda:N)")
        if self.dtype not in DTYPES:
            raise TinyLLMError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        tokenizer = TOKENIZERS[self.tokenizer]  # raises TinyLLMError listing the known names
        if self.vocab_size is not None and not getattr(tokenizer, "learns_vocabulary", False):
            raise TinyLLMError(f"config field 'vocab_size' applies only to tokenizers that learn their "
                               f"vocabulary, such as bpe; the {self.tokenizer!r} tokenizer has a fixed one")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainingConfig":
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TinyLLMError(f"{source} has unknown key(s) {', '.join(unknown)}; "
                               f"valid keys are listed in TrainingConfig")
        return cls(**data)

    def to_json(self, path: PathLike) -> None:
        with atomic_write(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def from_json(cls, path: PathLike, **overrides: Any) -> "TrainingConfig":
        """Load a config file; `overrides` replace its fields (model fields it omits come from the size)."""
        return cls.from_dict({**_read_json(path, "config"), **overrides}, source=f"config file {path}")


# ----------------------------------------------------------------------------------------------
# Data


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
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise TinyLLMError(f"data file {path} does not exist; pass --data with a UTF-8 text file") from None
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


def split_train_val(text: str, tokenizer: Tokenizer, val_fraction: float, context: int) -> tuple:
    """Token ids of the training and the validation text. Validation is the LAST `val_fraction` of
    the characters, so results compare with other tools, and between tokenizers."""
    n_val = int(len(text) * val_fraction)
    train, val = (torch.tensor(tokenizer.encode(part), dtype=torch.long)
                  for part in (text[:len(text) - n_val], text[len(text) - n_val:]))
    if len(val) < context + 1 or len(train) < context + 1:
        raise TinyLLMError(f"text too short: {len(text)} characters give {len(train)} training and "
                           f"{len(val)} validation tokens, but each needs at least max_context + 1 = "
                           f"{context + 1}; use more text or a smaller --max-context")
    return train, val


def bits_per_char(loss: float, tokens: int, chars: int) -> float:
    """Turn a mean loss in nats per token into bits per character, which compares across tokenizers."""
    return loss * tokens / (chars * math.log(2))


class TokenWindows(Dataset):
    """Non-overlapping context windows over one token tensor: item i is (x, y) = (ids[s:s+T], ids[s+1:s+T+1]).

    `offset` shifts every window, so a fresh random offset each epoch shows the model new cuts.
    An item may be a list of indices: the batch is then cut in one gather, with no Python loop.
    """

    def __init__(self, ids: torch.Tensor, context: int, offset: int = 0):
        self.ids, self.context, self.offset = ids, context, offset
        self.arange = torch.arange(context + 1, device=ids.device)

    def __len__(self) -> int:
        return max(0, (len(self.ids) - 1 - self.offset) // self.context)

    def __getitem__(self, index: Union[int, Sequence[int]]) -> tuple:
        starts = self.offset + torch.as_tensor(index, device=self.ids.device) * self.context
        chunk = self.ids[starts.unsqueeze(-1) + self.arange]
        return chunk[..., :-1], chunk[..., 1:]


class RankBatches:
    """Every `world_size`-th batch starting at `rank`: with the same generator on every process, the
    processes of a distributed run see distinct batches that together cover the epoch once. Each
    gets the same number, so none waits at a step that the others never take."""

    def __init__(self, batches: BatchSampler, rank: int = 0, world_size: int = 1):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches) // self.world_size

    def __iter__(self) -> Iterator[List[int]]:
        return itertools.islice(iter(self.batches), self.rank, len(self) * self.world_size, self.world_size)


def epoch_loader(ids: torch.Tensor, context: int, batch_size: int, generator: torch.Generator,
                 rank: int = 0, world_size: int = 1) -> DataLoader:
    """One epoch: every window once, in random order, after a fresh random offset in [0, context).

    A last, incomplete batch is dropped (when there is a full one), so every step has one shape.
    """
    offset = int(torch.randint(min(context, len(ids) - context), (1,), generator=generator))
    windows = TokenWindows(ids, context, offset)
    batches = BatchSampler(RandomSampler(windows, generator=generator), batch_size,
                           drop_last=len(windows) >= batch_size)
    # The loader draws a seed for its workers from `generator` too, so the global RNG is left alone.
    return DataLoader(windows, sampler=RankBatches(batches, rank, world_size), batch_size=None,
                      generator=generator)


def fixed_batches(ids: torch.Tensor, context: int, batch_size: int, n_batches: int, seed: int) -> list:
    """`n_batches` random batches chosen once, so successive validation losses are comparable."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(len(ids) - context, (n_batches, batch_size), generator=generator)
    windows = ids[starts.to(ids.device).unsqueeze(-1) + torch.arange(context + 1, device=ids.device)]
    return [(w[:, :-1], w[:, 1:]) for w in windows]


# ----------------------------------------------------------------------------------------------
# The model: a decoder-only transformer with pre-norm blocks, as in GPT-2 and nanoGPT.


def check_head_size(n_embd: int, n_head: int) -> None:
    if n_embd % n_head or (n_embd // n_head) % 2:
        raise TinyLLMError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head}) into an even "
                           "head size (rotary embeddings turn pairs of features)")


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

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.proj = nn.Linear(n_embd, n_embd, bias=False)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        # QK-norm: unit-length queries and keys (rescaled to the usual size) bound the attention
        # logits, which keeps training stable at a high learning rate.
        qk = F.normalize(qkv[:2], dim=-1) * math.sqrt(C // self.n_head)
        q, k = apply_rotary(qk, rotary)
        v = qkv[2]
        if cache is not None:  # attend to every earlier position, not just the new ones
            k, v = cache.update(layer, k, v)
        S = k.shape[2]
        # The T new queries stand at the last T of the S key positions: with S == T that is the
        # usual causal mask; one new query may see every key; otherwise the mask is shifted.
        mask = None if S == T or T == 1 else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)
        # PyTorch's fused kernel does the masking, softmax and dropout in one pass.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=S == T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class FeedForward(nn.Module):
    """SwiGLU: a SiLU-activated gate times a linear path. Its hidden width of 8/3 x n_embd (rounded
    to a multiple of 16) gives as many weights as the classic 4 x n_embd GELU layer."""

    def __init__(self, n_embd: int, dropout: float):
        super().__init__()
        hidden = 16 * round(8 * n_embd / 3 / 16)
        self.up = nn.Linear(n_embd, 2 * hidden, bias=False)  # gate and value in one product
        self.proj = nn.Linear(hidden, n_embd, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.up(x).chunk(2, dim=-1)
        return self.dropout(self.proj(F.silu(gate) * value))


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain: LayerNorm without
    centring or bias, cheaper and as good for transformers."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    """Pre-norm residual block: normalising before each sublayer keeps deep stacks stable."""

    def __init__(self, n_embd: int, n_head: int, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(n_embd), RMSNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ffn = FeedForward(n_embd, dropout)

    def forward(self, x: torch.Tensor, rotary: torch.Tensor, cache: Optional[KVCache] = None,
                layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, cache, layer)
        return x + self.ffn(self.norm2(x))


class KVCache:
    """Every layer's keys and values for the tokens seen so far, so generating a token costs one
    position instead of the whole context. Room for max_context positions is allocated up front."""

    def __init__(self, model: TransformerModel, batch_size: int = 1):
        h = model.hparams
        shape = (h["n_layer"], 2, batch_size, h["n_head"], h["max_context"], h["n_embd"] // h["n_head"])
        weight = model.token_embedding.weight
        self.keys_values = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.length = 0  # positions filled; the model advances it after each forward pass

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """Store the new positions' keys and values; return all of them so far."""
        end = self.length + k.shape[2]
        self.keys_values[layer, 0, :, :, self.length:end] = k
        self.keys_values[layer, 1, :, :, self.length:end] = v
        return self.keys_values[layer, 0, :, :, :end], self.keys_values[layer, 1, :, :, :end]


class TransformerModel(nn.Module):
    """Token embeddings, `n_layer` blocks, a final norm and a projection to logits."""

    def __init__(self, vocab_size: int, max_context: int, n_layer: int, n_head: int,
                 n_embd: int, dropout: float = 0.0):
        super().__init__()
        check_head_size(n_embd, n_head)
        self.hparams = dict(vocab_size=vocab_size, max_context=max_context, n_layer=n_layer,
                            n_head=n_head, n_embd=n_embd, dropout=dropout)
        self.max_context = max_context
        self.quantization: Optional[str] = None  # "int8" after quantize_int8
        self.token_embedding = nn.Embedding(vocab_size, n_embd)
        # Positions enter through rotary embeddings in attention; the table is derived, not saved.
        self.register_buffer("rotary", rotary_table(max_context, n_embd // n_head), persistent=False)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.final_norm = RMSNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        # Each block adds two residual branches; shrinking their output projections keeps the
        # residual stream's variance from growing with depth (GPT-2).
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @classmethod
    def from_config(cls, config: TrainingConfig, vocab_size: int) -> "TransformerModel":
        return cls(vocab_size, config.max_context, **{f: getattr(config, f) for f in MODEL_FIELDS})

    @classmethod
    def from_checkpoint(cls, path: PathLike, device: Union[str, torch.device] = "cpu") -> "TransformerModel":
        return load_checkpoint(path, device).model

    def grow_vocabulary(self, vocab_size: int) -> None:
        """Add embedding and output rows for new tokens; the trained rows keep their values, so the
        old tokens' logits do not change until training updates them."""
        old_size, n_embd = self.hparams["vocab_size"], self.hparams["n_embd"]
        device = self.token_embedding.weight.device
        embedding, head = nn.Embedding(vocab_size, n_embd), nn.Linear(n_embd, vocab_size, bias=False)
        for module in (embedding, head):
            self._init_weights(module)
        with torch.no_grad():
            embedding.weight[:old_size] = self.token_embedding.weight
            head.weight[:old_size] = self.lm_head.weight
        self.token_embedding, self.lm_head = embedding.to(device), head.to(device)
        self.hparams["vocab_size"] = vocab_size

    def num_parameters(self) -> int:
        """Trainable weights, plus the int8 weights of a quantized model (stored as buffers)."""
        int8_weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, Int8Linear))
        return sum(p.numel() for p in self.parameters()) + int8_weights

    def flops_per_token(self) -> int:
        """Training FLOPs per token at full context: 6 per weight used in a matrix product (forward
        and backward) plus the attention scores and sums (the PaLM paper's appendix B estimate)."""
        embeddings = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        matrices = sum(p.numel() for p in self.parameters() if p.dim() >= 2) - embeddings
        h = self.hparams
        return 6 * matrices + 12 * h["n_layer"] * h["n_embd"] * h["max_context"]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> tuple:
        """Return (logits of shape (B, T, vocab), mean cross-entropy loss or None).

        With a `cache`, `idx` holds only the tokens that follow the ones already cached."""
        start = cache.length if cache is not None else 0
        T = idx.shape[1]
        if start + T > self.max_context:
            raise TinyLLMError(f"input has {start + T} tokens but the model's max_context is "
                               f"{self.max_context}; crop it to the last max_context tokens")
        x = self.dropout(self.token_embedding(idx))
        rotary = self.rotary[:, start:start + T]
        for layer, block in enumerate(self.blocks):
            x = block(x, rotary, cache, layer)
        if cache is not None:
            cache.length += T
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss


class Int8Linear(nn.Module):
    """A linear layer stored as int8 weights with one float scale per output channel.

    Weight-only quantization: each weight row is scaled so its largest magnitude becomes 127 and
    rounded; activations stay in floating point, and the weights are expanded back as they are used.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        quantized = cls(linear.in_features, linear.out_features).to(weight.device)
        quantized.weight.copy_(torch.round(weight / scales[:, None]).to(torch.int8))
        quantized.scales.copy_(scales)
        return quantized

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)


def quantize_int8(model: TransformerModel) -> TransformerModel:
    """Replace every nn.Linear of `model` by an Int8Linear, in place: about 4x smaller weights.
    Embeddings and norm gains stay in float; they are a small share of the weights."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear.from_linear(child))
    model.quantization = "int8"
    return model


# ----------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw one token per row of `logits` (B, vocab) after temperature, top-k and top-p filtering."""
    logits = logits.float() / temperature
    if top_k is not None:  # keep the k most likely tokens (top_k=1 is greedy decoding)
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1:  # nucleus: the fewest likely tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before them already reached top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise TinyLLMError(f"temperature must be positive, got {temperature!r} "
                           "(for greedy decoding use top_k 1)")
    if top_k is not None and top_k <= 0:
        raise TinyLLMError(f"top_k must be positive, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise TinyLLMError(f"top_p must be in (0, 1], got {top_p!r}")


@torch.inference_mode()
def generate_tokens(model: TransformerModel, idx: torch.Tensor, max_new_tokens: int,
                    temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                    generator: Optional[torch.Generator] = None,
                    use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield `max_new_tokens` sampled tokens, each of shape (B, 1), continuing `idx` (B, T).

    The context window holds at most max_context tokens. When it is full, it jumps forward: the
    newest max_context // 2 tokens are kept and the cache is rebuilt from them in one pass (a cache
    cannot just drop its oldest position, since every later position's keys were computed while
    attending to it). Without the cache the same window is recomputed at each step, so both
    routes give the same tokens and the cache makes each step cost one position.
    """
    check_sampling(temperature, top_k, top_p)
    was_training = model.training
    model.eval()
    try:
        context, cache = idx[:, -model.max_context:], None
        new = context  # the tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            if context.shape[1] > model.max_context:  # the window jumps; the cache is rebuilt
                context, cache = context[:, -(model.max_context // 2 or 1):], None
            if use_cache and cache is None:
                cache, new = KVCache(model, idx.shape[0]), context
            logits = model(new if use_cache else context, cache=cache)[0][:, -1]
            next_id = sample_next(logits, temperature, top_k, top_p, generator)
            yield next_id
            context, new = torch.cat([context, next_id], dim=1), next_id
    finally:  # also when the caller stops early, e.g. at a stop string
        model.train(was_training)


def generate(model: TransformerModel, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             top_p: Optional[float] = None, use_cache: bool = True) -> torch.Tensor:
    """Return `idx` (B, T) with `max_new_tokens` sampled tokens appended."""
    new = generate_tokens(model, idx, max_new_tokens, temperature, top_k, top_p, generator, use_cache)
    return torch.cat([idx, *new], dim=1)


def stream_text(model: TransformerModel, tokenizer: Tokenizer, prompt: str, length: int,
                temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                stop: Sequence[str] = (), lowercase: bool = True, normalize_whitespace: bool = True,
                seed: Optional[int] = None, use_cache: bool = True) -> Iterator[str]:
    """Yield the continuation of `prompt` piece by piece, as it is generated, for up to `length` tokens.

    The prompt gets the same preprocessing as the training text; an empty prompt starts from a
    newline (or token 0, for a vocabulary without one). Generation ends early when a `stop`
    string appears; the stop string itself is not yielded, so text that might begin one is held back.
    """
    prompt = prepare_text(prompt, lowercase, normalize_whitespace)
    try:
        prompt_ids = tokenizer.encode(prompt or "\n")
    except TinyLLMError as e:
        if prompt:
            raise TinyLLMError(f"the prompt has {e}, which the model never saw in training; "
                               "remove or replace them") from None
        prompt_ids = [0]  # a vocabulary without a newline
    stop = [s for s in stop if s]
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    pending, held = [], ""  # tokens not yet whole characters; text that may start a stop string
    for next_id in generate_tokens(model, idx, length, temperature, top_k, top_p, generator, use_cache):
        pending.append(int(next_id))
        piece = tokenizer.decode(pending)
        if piece.endswith("\ufffd") and len(pending) < 4:  # a UTF-8 character still incomplete
            continue
        held, pending = held + piece, []
        hits = [held.find(s) for s in stop if s in held]
        if hits:
            yield held[:min(hits)]
            return
        keep = max((n for s in stop for n in range(1, len(s)) if held.endswith(s[:n])), default=0)
        if len(held) > keep:
            yield held[:len(held) - keep]
            held = held[len(held) - keep:]
    if held or pending:
        yield held + tokenizer.decode(pending)


def sample_text(model: TransformerModel, tokenizer: Tokenizer, prompt: str, length: int,
                temperature: float = 1.0, top_k: Optional[int] = None, lowercase: bool = True,
                normalize_whitespace: bool = True, seed: Optional[int] = None, **options: Any) -> str:
    """The preprocessed prompt followed by its continuation (see `stream_text` for `options`)."""
    pieces = stream_text(model, tokenizer, prompt, length, temperature, top_k, lowercase=lowercase,
                         normalize_whitespace=normalize_whitespace, seed=seed, **options)
    return prepare_text(prompt, lowercase, normalize_whitespace) + "".join(pieces)


@torch.no_grad()
def evaluate_full(model: TransformerModel, ids: torch.Tensor, batch_size: int,
                  autocast: Callable = contextlib.nullcontext) -> float:
    """Mean loss per token over ALL of `ids`, cut into non-overlapping windows of max_context."""
    was_training = model.training
    model.eval()
    context, device = model.max_context, next(model.parameters()).device
    windows = TokenWindows(ids, context)
    n_windows = len(windows)
    total, count = torch.zeros((), device=device), 0
    for start in range(0, n_windows, batch_size):
        x, y = windows[list(range(start, min(start + batch_size, n_windows)))]
        with autocast():
            total += model(x.to(device), y.to(device))[1] * y.numel()
        count += y.numel()
    tail = ids[n_windows * context:].to(device)  # the last, shorter window
    if len(tail) > 1:
        with autocast():
            total += model(tail[None, :-1], tail[None, 1:])[1] * (len(tail) - 1)
        count += len(tail) - 1
    model.train(was_training)
    return total.item() / count


# ----------------------------------------------------------------------------------------------
# Training


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA, then Apple's MPS, then the CPU."""
    mps = getattr(torch.backends, "mps", None)
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": mps is not None and mps.is_available()}
    if name == "auto":
        return torch.device("cuda" if available["cuda"] else "mps" if available["mps"] else "cpu")
    if not available[name.split(":")[0]]:
        raise TinyLLMError(f"--device {name} was asked for but PyTorch cannot see one here; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> tuple:
    """Pick the autocast dtype and say why: bf16 only where the hardware runs it fast."""
    if name != "auto":
        return DTYPES[name], "asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "this CUDA GPU supports bfloat16"
        return torch.float16, "this CUDA GPU lacks bfloat16; float16 with a gradient scaler"
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        for probe, what in (("_is_amx_tile_supported", "AMX"), ("_is_avx512_bf16_supported", "AVX512-BF16")):
            if getattr(cpu, probe, lambda: False)():
                return torch.bfloat16, f"this CPU has {what}"
        return torch.float32, "this CPU has no AMX or AVX512-BF16, so bfloat16 would be slower"
    return torch.float32, f"the safe choice on {device.type}"


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


def init_distributed(device: torch.device) -> tuple:
    """Under torchrun (which sets RANK, WORLD_SIZE and LOCAL_RANK) join the process group: gloo on a
    CPU, nccl on CUDA with one GPU per process. Returns (device, rank, world_size); a plain
    `python` run gets (device, 0, 1) and takes no distributed path."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return device, 0, 1
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    """Wait for every process of a distributed run; nothing to wait for in a single process."""
    if dist.is_initialized():
        dist.barrier()


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Matrix-multiply FLOP/s this device reaches in `dtype`: the yardstick for model FLOPs utilisation.
    The fastest of a few timings is taken, since anything else running only slows a timing down."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    synchronize = getattr(getattr(torch, device.type, None), "synchronize", lambda: None)
    fastest = math.inf
    for _ in range(6):
        start = time.perf_counter()
        a @ b
        synchronize()
        fastest = min(fastest, time.perf_counter() - start)
    return 2 * n ** 3 / fastest


class TqdmLoggingHandler(logging.Handler):
    """Console log lines that do not tear through the progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stdout)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """The states of Python's, NumPy's and torch's random generators, as tensors and plain data,
    so that a checkpoint holding them still loads with weights_only=True."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss),
                      float(cached_gaussian)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states: dict) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def drop_metrics_after(path: Path, step: int) -> None:
    """Remove the metrics rows logged after `step`: a resumed run logs those steps again."""
    if not path.exists():
        return
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.DictReader(f) if int(row["step"]) <= step]
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise TinyLLMError(f"{path} is malformed ({e}); move it away to resume") from None
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=MetricsLogger.COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


class Trainer:
    """Owns one training run: data, model, optimizer, the loop, validation, samples and files.

    `Trainer(config, text).train()` returns the summary dict that is also written as summary.json.
    """

    RUN_FILES = ("best.pt", "last.pt", "tokenizer.json", "config.json", "tinyllm_training.log",
                 "metrics.csv", "samples.txt", "summary.json", "loss.png")

    def __init__(self, config: TrainingConfig, text: str, *, progress: Optional[bool] = None,
                 quiet: bool = False, overwrite: bool = False, resume: bool = False):
        """With `resume`, continue the run in config.out_dir from its last.pt with that run's settings;
        only out_dir, device and compile (where and how to run, not what to compute) come from `config`."""
        self.config, self.quiet = config, quiet
        self.progress = (sys.stdout.isatty() and not quiet) if progress is None else progress
        self.out_dir = Path(config.out_dir)
        self._check_out_dir(overwrite, resume)
        saved = load_checkpoint(self.out_dir / "last.pt") if resume else None
        if saved:
            self.config = config = dataclasses.replace(saved.config, out_dir=config.out_dir,
                                                       device=config.device, compile=config.compile)
        seed_everything(config.seed)
        self.device, self.rank, self.world_size = init_distributed(resolve_device(config.device))
        self.is_main = self.rank == 0  # the one process that logs and writes files
        self.progress = self.progress and self.is_main
        self.dtype, self.dtype_reason = resolve_dtype(config.dtype, self.device)
        self.peak_flops = measure_peak_flops(self.device, self.dtype)
        start = saved or (self._fine_tuning_start(config.init_from) if config.init_from else None)
        config = self.config  # fine-tuning takes the saved model's shape and preprocessing
        self._prepare_data(text, start.tokenizer if start else None)
        self.generator = torch.Generator().manual_seed(config.seed)
        batches = len(TokenWindows(self.train_ids, config.max_context)) // config.batch_size
        self.steps_per_epoch = max(1, batches // self.world_size)
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self._build_model(start.model if start else None)
        self.step, self.epoch, self.batch_in_epoch, self.tokens_seen = 0, 0, 0, 0  # epoch: those completed
        self.best_val_loss, self.last_val_loss, self.last_val_step = math.inf, math.nan, -1
        self.bad_validations = 0
        self.recent_losses: List[torch.Tensor] = []  # each step's loss since the last validation
        self.epoch_rng_state = self.generator.get_state()  # replayed on resume to cut the same batches
        self.elapsed_before, self.untimed_before = 0.0, 0.0
        if saved:
            self._restore(saved)

    def _prepare_data(self, text: str, tokenizer: Optional[Tokenizer]) -> None:
        """Preprocess, tokenize (fitting a new tokenizer, or growing a saved one) and split the text."""
        config = self.config
        text = prepare_text(text, config.lowercase, config.normalize_whitespace)
        if tokenizer is None:
            self.tokenizer = TOKENIZERS[config.tokenizer]().fit(text, vocab_size=config.vocab_size)
        else:
            self.tokenizer, self.added_tokens = tokenizer, tokenizer.extend(text)
        train_ids, val_ids = split_train_val(text, self.tokenizer, config.val_fraction, config.max_context)
        self.val_chars = int(len(text) * config.val_fraction)
        self.data_sha256 = hashlib.sha256(torch.cat([train_ids, val_ids]).numpy().tobytes()).hexdigest()
        self.train_ids, self.val_ids = train_ids.to(self.device), val_ids.to(self.device)
        self.val_batches = fixed_batches(self.val_ids, config.max_context, config.batch_size,
                                         config.val_batches, config.seed)
        try:  # fail now, not mid-run
            self.tokenizer.encode(prepare_text(config.sample_prompt, config.lowercase,
                                               config.normalize_whitespace))
        except TinyLLMError as e:
            raise TinyLLMError(f"sample_prompt has {e}, which the training text lacks") from None

    def _fine_tuning_start(self, path: str) -> Checkpoint:
        """Fine-tuning keeps the saved model's architecture, tokenizer and text preprocessing; the
        optimizer and learning-rate schedule start afresh."""
        start = load_checkpoint(path, self.device)
        if start.model.quantization:
            raise TinyLLMError(f"checkpoint {path} is {start.model.quantization}-quantized, which "
                               "cannot be trained; fine-tune from the float checkpoint it came from")
        inherited = ("model_size", *MODEL_FIELDS, "max_context", "tokenizer", "lowercase",
                     "normalize_whitespace")
        self.config = dataclasses.replace(self.config, **{f: getattr(start.config, f) for f in inherited})
        return start

    def _check_out_dir(self, overwrite: bool, resume: bool) -> None:
        """Refuse to clobber an earlier run unless asked (the old files go only when training starts)."""
        if overwrite and resume:
            raise TinyLLMError("--resume continues a run and --overwrite replaces it; choose one")
        if resume and not (self.out_dir / "last.pt").is_file():
            raise TinyLLMError(f"nothing to resume: {self.out_dir / 'last.pt'} does not exist; "
                               "start a new run without --resume")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TinyLLMError(f"cannot create output directory {self.out_dir}: {e.strerror}") from None
        existing = [f for f in self.RUN_FILES if (self.out_dir / f).exists()]
        if existing and not (overwrite or resume):
            raise TinyLLMError(f"{self.out_dir} already holds a training run ({', '.join(existing)}); pass "
                               "--resume to continue it, another --out-dir, or --overwrite to replace it")
        if not os.access(self.out_dir, os.W_OK):
            raise TinyLLMError(f"output directory {self.out_dir} is not writable; choose another --out-dir")

    def _restore(self, saved: Checkpoint) -> None:
        """Put the run back exactly where last.pt left it: optimizer, schedule, position in the
        epoch, validation history, timers and every random number generator."""
        path, state = self.out_dir / "last.pt", saved.training_state
        if not state or not saved.optimizer_state:
            raise TinyLLMError(f"{path} holds no training state to resume from")
        if state.get("data_sha256") != self.data_sha256:
            raise TinyLLMError(f"the text differs from the one the run in {self.out_dir} was trained on; "
                               "pass the same --data to resume it")
        try:
            self.optimizer.load_state_dict(saved.optimizer_state)
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.epoch, self.best_val_loss = saved.step, saved.epoch, saved.best_val_loss
            for name in ("batch_in_epoch", "tokens_seen", "bad_validations", "last_val_loss",
                         "last_val_step", "epoch_rng_state"):
                setattr(self, name, state[name])
            self.recent_losses = list(state["recent_losses"].to(self.device))
            self.elapsed_before, self.untimed_before = state["elapsed_seconds"], state["untimed_seconds"]
            set_rng_states(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise TinyLLMError(f"{path} cannot be resumed from ({str(e).splitlines()[0][:200]})") from None

    def _training_state(self) -> dict:
        """What `_restore` needs beyond the model, optimizer and step: tensors and plain data only."""
        return {
            "batch_in_epoch": self.batch_in_epoch, "tokens_seen": self.tokens_seen,
            "bad_validations": self.bad_validations, "last_val_loss": self.last_val_loss,
            "last_val_step": self.last_val_step, "epoch_rng_state": self.epoch_rng_state,
            "recent_losses": torch.stack(self.recent_losses).cpu() if self.recent_losses else torch.zeros(0),
            "elapsed_seconds": time.perf_counter() - self.start_time, "untimed_seconds": self.untimed_seconds,
            "scaler": self.scaler.state_dict(), "data_sha256": self.data_sha256, "rng": rng_states(),
        }

    def _open_outputs(self, resume: bool) -> None:
        """Clear an overwritten run's files (or, resuming, the metrics logged after last.pt), then
        start the log file and the metrics CSV."""
        if not self.is_main:  # the other processes of a distributed run stay silent
            self.log_handlers = [logging.NullHandler()]
            logger.addHandler(self.log_handlers[0])
            return
        if resume:
            drop_metrics_after(self.out_dir / "metrics.csv", self.step)
        for name in () if resume else self.RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                (self.out_dir / name).unlink()
        file_handler = logging.FileHandler(self.out_dir / "tinyllm_training.log", encoding="utf-8")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        console = TqdmLoggingHandler(logging.WARNING if self.quiet else logging.INFO)
        console.setFormatter(logging.Formatter("%(message)s"))
        self.log_handlers = [file_handler, console]
        for handler in self.log_handlers:
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        enabled = self.config.metrics_csv_enabled
        self.metrics = MetricsLogger(self.out_dir / "metrics.csv") if enabled else None

    def _build_model(self, model: Optional[TransformerModel] = None) -> None:
        """The model (new, or one to fine-tune, with rows for tokens its vocabulary lacked), its
        compiled training view, the optimizer and (for float16) a gradient scaler."""
        self.model = model or TransformerModel.from_config(self.config, self.tokenizer.vocab_size)
        self.model.to(self.device)
        if self.model.hparams["vocab_size"] < self.tokenizer.vocab_size:
            self.model.grow_vocabulary(self.tokenizer.vocab_size)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for float32 products
        # Compiling fuses the small operations between matrix products; evaluation and sampling
        # use the plain module, so changing mode or shape never triggers a recompile.
        planned_tokens = self.total_steps * self.config.batch_size * self.config.max_context
        self.compiled, self.compile_reason = resolve_compile(self.config.compile, self.device,
                                                             planned_tokens, self.config.time_budget)
        # Under torchrun, DistributedDataParallel averages the gradients of all processes in backward.
        self.eager_model = self.model
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.eager_model = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.train_model = self.eager_model
        if self.compiled:
            self.train_model = torch.compile(self.eager_model, dynamic=False)
        self.optimizer = self._make_optimizer()
        scaler_cls = getattr(torch.amp, "GradScaler", None) or torch.cuda.amp.GradScaler
        self.scaler = scaler_cls(enabled=self.dtype == torch.float16)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; weight decay only on matrices, since decaying gains and biases hurts."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.config.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        try:  # the fused kernel updates all parameters at once (CUDA; CPU since torch 2.4)
            return torch.optim.AdamW(groups, lr=self.config.learning_rate, betas=(0.9, 0.99), fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, lr=self.config.learning_rate, betas=(0.9, 0.99))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def learning_rate(self) -> float:
        """Linear warmup, then cosine decay to a tenth, driven by steps or by the time budget spent."""
        config = self.config
        warmup = min(config.warmup_steps, self.total_steps // 5)
        if self.step < warmup:
            return config.learning_rate * (self.step + 1) / warmup
        progress = (self.step - warmup) / max(1, self.total_steps - warmup)
        if config.time_budget is not None:
            elapsed = time.perf_counter() - self.start_time
            progress = max(progress, elapsed / max(config.time_budget - self._final_work_seconds(), 1e-9))
        progress = min(1.0, progress)
        return config.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One optimizer step; the loss stays a tensor so the step never waits on the device."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            loss = self._forward_loss(x, y)
        self.scaler.scale(loss).backward()
        if self.config.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        try:
            return self.train_model(x, y)[1]
        except Exception as e:  # compiling needs a C++ compiler (CPU) or Triton (GPU)
            if self.train_model is self.eager_model:
                raise
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            logger.warning("torch.compile failed (%s); training without it", reason)
            self.train_model, self.compiled = self.eager_model, False
            return self.eager_model(x, y)[1]

    def evaluate(self) -> float:
        """Mean loss over the fixed validation batches (shared out among the processes of a
        distributed run, then averaged)."""
        self.model.eval()
        with torch.no_grad(), self.autocast():
            losses = [self.model(x, y)[1].float() for x, y in self.val_batches[self.rank::self.world_size]]
        self.model.train()
        total = torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)
        return self.mean_over_processes(total, len(losses))

    def mean_over_processes(self, total: torch.Tensor, count: int) -> float:
        """sum(total) / sum(count) over every process; in a single process, total / count."""
        sums = torch.stack([total.detach().float(), torch.tensor(float(count), device=total.device)])
        if self.world_size > 1:
            dist.all_reduce(sums)
        return (sums[0] / sums[1]).item()

    def train(self) -> dict:
        """Run the whole training loop and write every output file; return the summary.

        Raises TrainingInterrupted after saving last.pt if SIGINT or SIGTERM arrives."""
        self.metrics, self.log_handlers = None, []
        try:
            barrier()  # every process has checked the out-dir before the first one writes to it
            self._open_outputs(resume=self.step > 0)
            self._log_start()
            stopped_because = self._loop()
            return self._finish(stopped_because)
        finally:
            if self.metrics:
                self.metrics.close()
            for handler in self.log_handlers:
                logger.removeHandler(handler)
                handler.close()

    def _log_start(self) -> None:
        c = self.config
        if self.is_main:
            self.config.to_json(self.out_dir / "config.json")
            self.tokenizer.save_state(self.out_dir / "tokenizer.json")
        logger.info("tinyllm: %d training and %d validation tokens, vocabulary of %d %s tokens",
                    len(self.train_ids), len(self.val_ids), self.tokenizer.vocab_size, c.tokenizer)
        if self.step:
            logger.info("resumed from %s at step %d (epoch %d, batch %d of it)", self.out_dir / "last.pt",
                        self.step, self.epoch, self.batch_in_epoch)
        elif c.init_from:
            logger.info("fine-tuning %s: %d tokens added to its vocabulary", c.init_from, self.added_tokens)
        logger.info("model %s: %d layers, %d heads, %d wide, context %d, %s parameters",
                    c.model_size, c.n_layer, c.n_head, c.n_embd, c.max_context,
                    f"{self.model.num_parameters():,}")
        logger.info("device %s, dtype %s (%s), peak %.2f TFLOP/s measured", self.device,
                    str(self.dtype).replace("torch.", ""), self.dtype_reason, self.peak_flops / 1e12)
        logger.info("torch.compile %s (%s)", "on" if self.compiled else "off", self.compile_reason)
        budget = f", time budget {c.time_budget:g} s" if c.time_budget else ""
        processes = f" per process x {self.world_size} processes = {c.batch_size * self.world_size}"
        logger.info("batch %d%s, %d steps per epoch, at most %d steps%s", c.batch_size,
                    processes if self.world_size > 1 else "", self.steps_per_epoch, self.total_steps, budget)

    def _loop(self) -> str:
        """Train until epochs, max_steps, the time budget, early stopping or a signal ends it."""
        now = time.perf_counter()
        self.start_time = now - self.elapsed_before  # a resumed run's budget counts the time spent
        self.window = (now, self.tokens_seen)  # the time and tokens_seen that throughput is measured from
        self.untimed_seconds, self.save_seconds, self.first_step = self.untimed_before, 0.0, self.step + 1
        self.bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step",
                        dynamic_ncols=True)
        with self.bar, self._stop_on_signals():
            stopped_because = self._run_epochs()
        if stopped_because == "interrupted":
            self._save_last()
            signal_number = self.stop_signal or signal.SIGTERM  # or another process's signal
            message = (f"stopped by {signal.Signals(signal_number).name} after step {self.step}; "
                       f"{self.out_dir / 'last.pt'} holds the run. "
                       "Continue it with --resume and the same --out-dir and --data")
            logger.warning(message)
            raise TrainingInterrupted(signal_number, message)
        if self.last_val_step != self.step:
            self._validate()
        return stopped_because

    @contextlib.contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) and SIGTERM end the run after the current step instead of mid-step."""
        self.stop_signal = None
        if threading.current_thread() is not threading.main_thread():  # only it may set handlers
            yield
            return
        def remember(signal_number: int, frame: Any) -> None:
            self.stop_signal = signal_number
        # A signal the parent set to be ignored (as a shell does for background jobs) stays ignored.
        previous = {s: signal.signal(s, remember) for s in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(s) is not signal.SIG_IGN}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _run_epochs(self) -> str:
        config = self.config
        while self.epoch < config.epochs:
            if self.batch_in_epoch == 0:
                self.epoch_rng_state = self.generator.get_state()
            self.generator.set_state(self.epoch_rng_state)  # resuming mid-epoch replays its shuffle
            loader = epoch_loader(self.train_ids, config.max_context, config.batch_size, self.generator,
                                  self.rank, self.world_size)
            for x, y in itertools.islice(loader, self.batch_in_epoch, None):
                stop = self._stop_reason()
                if stop:
                    return stop
                self.lr = self.learning_rate()
                self.recent_losses.append(self.train_step(x, y, self.lr))
                self.step, self.batch_in_epoch = self.step + 1, self.batch_in_epoch + 1
                self.tokens_seen += y.numel() * self.world_size
                self.bar.update()
                self._after_step()
            self.batch_in_epoch, self.epoch = 0, self.epoch + 1
        return "epochs"

    def _after_step(self) -> None:
        config = self.config
        if self.step == self.first_step:
            self._log_first_step()
        if self.step % config.val_frequency == 0:
            self._validate()
        if self.step % config.sample_frequency == 0:
            self._sample()
        if self.step % config.checkpoint_frequency == 0:
            started = time.perf_counter()
            self._save_last()
            self._exclude_from_throughput(started)

    def _log_first_step(self) -> None:
        """The first step compiles and warms up: report it, and keep it out of the tokens/s."""
        started = self.window[0]
        self.recent_losses[-1].item()  # wait for the device
        logger.info("first step took %.1f s (%s)", time.perf_counter() - started,
                    "compilation and warm-up" if self.compiled else "warm-up")
        self._exclude_from_throughput(started)

    STOP_REASONS = ("max_steps", "time_budget", "early_stopping", "interrupted")  # later ones win

    def _stop_reason(self) -> Optional[str]:
        """Why to stop now, if at all. All processes of a distributed run agree, since one that
        stopped alone would leave the others waiting for it forever."""
        reason = self._local_stop_reason()
        if self.world_size > 1:
            code = torch.tensor(self.STOP_REASONS.index(reason) + 1 if reason else 0, device=self.device)
            dist.all_reduce(code, op=dist.ReduceOp.MAX)
            reason = self.STOP_REASONS[code.item() - 1] if code.item() else None
        return reason

    def _local_stop_reason(self) -> Optional[str]:
        config = self.config
        if self.stop_signal is not None:
            return "interrupted"
        if config.max_steps is not None and self.step >= config.max_steps:
            return "max_steps"
        elapsed = time.perf_counter() - self.start_time
        if config.time_budget is not None and elapsed + self._final_work_seconds() >= config.time_budget:
            return "time_budget"
        patience = config.early_stopping_patience
        if patience is not None and self.bad_validations >= patience:
            return "early_stopping"
        return None

    def mfu(self, tokens_per_second: float) -> float:
        """Model FLOPs utilisation: the share of the measured matrix-multiply peak that training used."""
        return tokens_per_second / self.world_size * self.model.flops_per_token() / self.peak_flops

    def _final_work_seconds(self) -> float:
        """An estimate of what the run does after its last step (validation, sample, checkpoint), so
        that a time budget covers the whole run. A forward pass costs about a third of a training
        step per token; counting it as two thirds leaves a margin."""
        if not self.tokens_seen:
            return 0.0
        train_seconds = time.perf_counter() - self.start_time - self.untimed_seconds
        forward_tokens_per_second = 1.5 * self.tokens_seen / self.world_size / max(train_seconds, 1e-9)
        forward_tokens = (len(self.val_ids) + self.config.val_batches * self.config.batch_size
                          * self.config.max_context + self.config.sample_length * self.config.max_context)
        return forward_tokens / max(forward_tokens_per_second, 1.0) + self.save_seconds

    def _check_losses(self) -> None:
        """Stop at a NaN or infinite loss, naming its step, before anything more is saved."""
        if not self.recent_losses:
            return
        losses = torch.stack(self.recent_losses)
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            first = int(bad[0])
            raise TinyLLMError(f"training loss became {losses[first].item()} at step "
                               f"{self.step - len(losses) + 1 + first}; lower --learning-rate or set "
                               "grad_clip (best.pt and last.pt keep the last good state)")

    def _validate(self) -> None:
        """Validate, log a metrics row, save best.pt on improvement; stop on a NaN loss."""
        now = time.perf_counter()
        window_time, window_tokens = self.window
        self._check_losses()
        losses = torch.stack(self.recent_losses) if self.recent_losses else torch.zeros(0, device=self.device)
        train_loss = self.mean_over_processes(losses.sum(), len(losses)) if len(losses) else math.nan
        tokens_per_second = (self.tokens_seen - window_tokens) / max(now - window_time, 1e-9)
        self.last_val_loss, self.last_val_step = self.evaluate(), self.step
        if self.last_val_loss < self.best_val_loss:
            self.best_val_loss, self.bad_validations = self.last_val_loss, 0
            self._save("best.pt")
        else:
            self.bad_validations += 1
        elapsed = time.perf_counter() - self.start_time
        epoch = self.epoch + self._epoch_fraction()
        logger.info("step %d (epoch %.2f): train loss %.4f, val loss %.4f (%.3f bits/char), lr %.2e, "
                    "%.0f tokens/s, MFU %.1f%%", self.step, epoch, train_loss, self.last_val_loss,
                    self.bits_per_char(self.last_val_loss), self.lr, tokens_per_second,
                    100 * self.mfu(tokens_per_second))
        if self.metrics:
            self.metrics.log(step=self.step, epoch=round(epoch, 4), train_loss=round(train_loss, 5),
                             val_loss=round(self.last_val_loss, 5), learning_rate=self.lr,
                             tokens_per_second=round(tokens_per_second, 1), elapsed_seconds=round(elapsed, 3))
        self.bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{self.last_val_loss:.3f}",
                             tok_s=f"{tokens_per_second:.0f}")
        self.recent_losses = []
        self._exclude_from_throughput(now)

    def bits_per_char(self, loss: float) -> float:
        return bits_per_char(loss, len(self.val_ids), self.val_chars)

    def _exclude_from_throughput(self, since: float) -> None:
        """Validation, sampling and the first step are not counted in tokens/s: restart the window."""
        self.untimed_seconds += time.perf_counter() - since
        self.window = (time.perf_counter(), self.tokens_seen)

    def _epoch_fraction(self) -> float:
        return (self.step - self.epoch * self.steps_per_epoch) / self.steps_per_epoch

    def _sample(self, label: str = "") -> str:
        c = self.config
        if not self.is_main:
            return ""
        started = time.perf_counter()
        text = sample_text(self.model, self.tokenizer, c.sample_prompt, c.sample_length, c.temperature,
                           lowercase=c.lowercase, normalize_whitespace=c.normalize_whitespace)
        label = label or f"step {self.step}"
        logger.info("sample at %s:\n%s", label, text)
        with open(self.out_dir / "samples.txt", "a", encoding="utf-8") as f:
            f.write(f"=== {label} ===\n{text}\n\n")
        self._exclude_from_throughput(started)
        return text

    def _save(self, name: str) -> None:
        if not self.is_main:
            return
        started = time.perf_counter()
        save_checkpoint(self.out_dir / name, self.model, self.optimizer, self.config, self.tokenizer,
                        step=self.step, epoch=self.epoch, best_val_loss=self.best_val_loss,
                        training_state=self._training_state())
        self.save_seconds = time.perf_counter() - started

    def _save_last(self) -> None:
        self._check_losses()
        self._save("last.pt")

    def _plot(self) -> None:
        self.metrics.file.flush()
        try:
            logger.info("loss curves drawn in %s", plot_losses(self.out_dir))
        except TinyLLMError as e:  # a missing optional dependency must not fail a finished run
            logger.warning("no loss.png: %s", e)

    def _finish(self, stopped_because: str) -> dict:
        """Write last.pt, score the best model on the whole validation split, sample, summarise."""
        if not self.is_main:
            return {}
        train_seconds = time.perf_counter() - self.start_time - self.untimed_seconds
        self._save_last()
        best = load_checkpoint(self.out_dir / "best.pt", self.device).model
        self.model.load_state_dict(best.state_dict())
        full_val_loss = evaluate_full(self.model, self.val_ids, self.config.batch_size, self.autocast)
        sample = self._sample(f"the end, from the best model (step {self.step})")
        tokens_per_second = self.tokens_seen / max(train_seconds, 1e-9)
        summary = {
            "best_val_loss": self.best_val_loss, "final_val_loss": self.last_val_loss,
            "full_val_loss": full_val_loss, "full_val_bits_per_char": self.bits_per_char(full_val_loss),
            "steps": self.step,
            "epochs_completed": self.epoch,
            "tokens_seen": self.tokens_seen, "tokens_per_second": round(tokens_per_second, 1),
            "mfu": round(self.mfu(tokens_per_second), 4), "peak_tflops": round(self.peak_flops / 1e12, 3),
            "elapsed_seconds": round(time.perf_counter() - self.start_time, 3),
            "parameters": self.model.num_parameters(), "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""), "stopped_because": stopped_because,
            "sample": sample,
        }
        with atomic_write(self.out_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        if self.metrics:
            self._plot()
        logger.info("stopped after %d steps (%s) in %.1f s; best val loss %.4f, full val loss %.4f "
                    "(%.3f bits/char), %.0f tokens/s, MFU %.1f%%", self.step, stopped_because,
                    summary["elapsed_seconds"], self.best_val_loss, full_val_loss,
                    summary["full_val_bits_per_char"], tokens_per_second, 100 * summary["mfu"])
        return summary


# ----------------------------------------------------------------------------------------------
# Metrics and checkpoints


class MetricsLogger:
    """Append one CSV row per call and flush it, so a crash never loses a logged row."""

    COLUMNS = ("step", "epoch", "train_loss", "val_loss", "learning_rate", "tokens_per_second",
               "elapsed_seconds")

    def __init__(self, path: PathLike, columns: Sequence[str] = COLUMNS):
        self.path, self.columns = Path(path), tuple(columns)
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns)
        if new_file:
            self.writer.writeheader()
            self.file.flush()

    def log(self, **row: Any) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def plot_losses(out_dir: PathLike) -> Path:
    """Draw train and validation loss against step from `out_dir`/metrics.csv into loss.png."""
    try:  # an optional dependency; Figure without pyplot leaves any global plotting state alone
        from matplotlib.figure import Figure
    except ImportError:
        raise TinyLLMError("loss.png needs matplotlib: pip install 'tinyllm[plot]' "
                           "(or pip install matplotlib)") from None
    metrics = Path(out_dir) / "metrics.csv"
    try:
        with open(metrics, newline="", encoding="utf-8") as f:
            rows = [(int(r["step"]), float(r["train_loss"]), float(r["val_loss"])) for r in csv.DictReader(f)]
    except FileNotFoundError:
        raise TinyLLMError(f"{metrics} does not exist; point --out-dir at a training run") from None
    except (KeyError, TypeError, ValueError) as e:
        raise TinyLLMError(f"{metrics} is malformed ({e})") from None
    if not rows:
        raise TinyLLMError(f"{metrics} has no rows yet; a run logs one at each validation")
    steps, train_losses, val_losses = zip(*rows)
    figure = Figure(figsize=(7, 4), layout="tight")
    axes = figure.subplots()
    axes.plot(steps, train_losses, label="train (mean since the last validation)")
    axes.plot(steps, val_losses, label="validation")
    axes.set(xlabel="step", ylabel="loss (nats per token)", title=f"training run in {out_dir}")
    axes.grid(alpha=0.3)
    axes.legend()
    path = Path(out_dir) / "loss.png"
    with atomic_write(path) as f:
        figure.savefig(f, format="png", dpi=120)
    return path


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
    training_state: Optional[dict] = None  # what an exact resume needs (see Trainer._training_state)


def save_checkpoint(path: PathLike, model: TransformerModel, optimizer: Optional[torch.optim.Optimizer],
                    config: TrainingConfig, tokenizer: Tokenizer, step: int = 0, epoch: int = 0,
                    best_val_loss: float = math.inf, training_state: Optional[dict] = None) -> None:
    """Save weights, optimizer, config, tokenizer and progress as tensors and plain Python data."""
    state = {
        "format": "tinyllm-checkpoint", "version": 1, "model_args": dict(model.hparams),
        "model": model.state_dict(), "optimizer": optimizer.state_dict() if optimizer else None,
        "config": config.to_dict(), "tokenizer": {"type": tokenizer.type_name, **tokenizer.state()},
        "step": step, "epoch": epoch, "best_val_loss": float(best_val_loss),
        "quantization": model.quantization, "training_state": training_state,
    }
    with atomic_write(path) as f:
        torch.save(state, f)


def load_checkpoint(path: PathLike, device: Union[str, torch.device] = "cpu") -> Checkpoint:
    """Load a checkpoint safely (weights_only: no pickled code runs) and rebuild model and tokenizer."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise TinyLLMError(f"checkpoint {path} does not exist; train a model first or pass its path") \
            from None
    except Exception as e:  # torch raises many types for truncated, corrupt or unsafe files
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = (f"it holds a pickled {unsafe.group(1)}, which could run code, so it was not loaded"
                  if unsafe else "it is truncated, corrupted or not a PyTorch checkpoint")
        raise TinyLLMError(f"checkpoint {path} cannot be loaded safely: {reason}") from None
    if not isinstance(state, dict) or state.get("format") != "tinyllm-checkpoint":
        raise TinyLLMError(f"{path} is not a tinyllm checkpoint")
    try:
        config = TrainingConfig.from_dict(state["config"], source=f"checkpoint {path}")
        tokenizer = TOKENIZERS[state["tokenizer"]["type"]]()
        tokenizer.set_state(state["tokenizer"])
        model = TransformerModel(**state["model_args"])
        if state.get("quantization") == "int8":
            quantize_int8(model)
        model.load_state_dict(state["model"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise TinyLLMError(f"checkpoint {path} is inconsistent ({str(e).splitlines()[0][:200]})") from None
    if tokenizer.vocab_size != model.hparams["vocab_size"]:
        raise TinyLLMError(f"checkpoint {path}: tokenizer has {tokenizer.vocab_size} tokens, "
                           f"model expects {model.hparams['vocab_size']}")
    for field in ("max_context", *MODEL_FIELDS):
        if getattr(config, field) != model.hparams[field]:
            raise TinyLLMError(f"checkpoint {path} is inconsistent: its config has {field} "
                               f"{getattr(config, field)} but its weights were built with "
                               f"{model.hparams[field]}")
    return Checkpoint(model.to(device), tokenizer, config, state["optimizer"], state["step"],
                      state["epoch"], state["best_val_loss"], state.get("training_state"))
