"""Your own data, at any size: a file, a folder read recursively (a code base), or several paths,
tokenized once into a memory-mapped token file.

`Corpus(paths)` is a data source: `tinyllm.Trainer(config, Corpus(["my_code/"], include=["*.py"]))`.
Files in a folder that are not UTF-8 text are skipped and counted; each document of several ends
with DOCUMENT_END, so that no window glues two files together unnoticed; validation is held out by
whole documents (or given apart). The token ids go to a file in the token cache, named by the hash
of the files' contents, the tokenizer and the preprocessing, and training reads its windows from
that file through a memory map: the corpus is never held in memory, and a second run (a resumed
one too) tokenizes nothing. train_shakespeare.py's --data, --include, --val-data and --token-cache
use it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import tempfile
import time
from pathlib import Path, PurePath
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from tqdm import tqdm

import tinyllm
from tinyllm import TinyLLMError, fcntl, logger

# ASCII's "file separator": one character, so one token of the character tokenizer, that ends every
# document of several; the model learns where files end, and a sample may contain it.
DOCUMENT_END = "\x1c"
FORMAT = 2  # of the token cache's files and what they hold: a change makes old entries unread
FIT_SAMPLE_CHARS = 4_000_000  # a tokenizer that learns merges (BPE) fits on a seeded sample this large
ENCODE_CHARS = 1 << 20  # encoded at once: a large file never becomes one list of a billion ids
# Pieces are cut after a newline that a non-space follows: BPE's pieces never span one.
PIECE_END = re.compile(r"\n(?=\S)")


def token_cache_dir() -> Path:
    """Where token files are kept unless a Corpus is given its own folder: the user's cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinyllm" / "tokens"


# ----------------------------------------------------------------------------------------------
# Reading: which files, and which of them are text


def _included(path: Path, root: Path, include: Sequence[str]) -> bool:
    """Whether a file found under `root` is read: not inside a hidden folder or hidden itself (.git),
    and matching one of the `include` patterns where there are any."""
    relative = path.relative_to(root)
    if any(part.startswith(".") for part in relative.parts):
        return False
    return not include or any(PurePath(relative).match(pattern) for pattern in include)


def list_files(paths: Sequence[tinyllm.PathLike], include: Sequence[str] = ()) -> List[Tuple[Path, bool]]:
    """(path, named directly) for every file named, and every file under each folder named (recursively,
    sorted by path) that `include` admits; each file once, however often it is named."""
    # A copy held out for validation while another trains would make the validation loss a lie.
    files: Dict[Path, Tuple[Path, bool]] = {}
    for path in map(Path, paths):
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and _included(p, path, include):
                    files.setdefault(p.resolve(), (p, False))
        else:
            files.setdefault(path.resolve(), (path, True))
    return list(files.values())


def read_text(path: Path) -> str:
    """The file's text, or a TinyLLMError that says why it is not UTF-8 text. A binary file is known
    by its first 8 kB, so a checkpoint in a code folder is never read whole."""
    if path.is_file():  # a device such as /dev/zero is left to load_text, which says what it is
        with contextlib.suppress(OSError), open(path, "rb") as f:
            if b"\x00" in f.read(1 << 13):
                raise TinyLLMError(f"data file {path} looks binary (NUL bytes in its first 8 kB); "
                                   "pass a text file")
    return tinyllm.load_text(path)


def content_sha256(files: Sequence[Tuple[Path, bool]], digest: Any) -> None:
    """Feed every file's length and bytes to `digest`, a megabyte at a time; what is missing, unreadable
    or not a regular file (/dev/zero would be read forever) is fed as its name."""
    # No cache entry made without that file then matches, so the reading that follows says what is
    # wrong with it, by name.
    for path, _ in files:
        try:
            if not path.is_file():
                raise OSError
            digest.update(f"{path.stat().st_size}:".encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            digest.update(f"not read: {path}".encode("utf-8", "surrogateescape"))
        digest.update(b"\n")


# ----------------------------------------------------------------------------------------------
# The plan: documents, their sizes, and which characters go to validation


@dataclasses.dataclass
class Document:
    """One file's place in the corpus: its raw and preprocessed sizes, and its pieces."""

    path: Path
    raw_chars: int
    chars: int
    # pieces of the preprocessed text: (start, end, followed by DOCUMENT_END, held out for validation)
    segments: List[Tuple[int, int, bool, bool]] = dataclasses.field(default_factory=list)

    @property
    def separators(self) -> int:
        return sum(ends for _, _, ends, _ in self.segments)

    @property
    def val_chars(self) -> int:
        return sum(end - start + ends for start, end, ends, is_val in self.segments if is_val)


def held_out(sizes: Sequence[int], val_fraction: float, seed: int) -> List[int]:
    """The indices of a seeded choice of whole documents holding about `val_fraction` of the
    characters, in reading order; at least one document, and never all of them."""
    total, chosen, size = sum(sizes), [], 0
    for index in random.Random(seed).sample(range(len(sizes)), len(sizes)):
        if size >= val_fraction * total or len(chosen) == len(sizes) - 1:
            break
        chosen.append(index)
        size += sizes[index]
    return sorted(chosen)


def plan_segments(documents: List[Document], n_val_documents: int, *, val_fraction: float,
                  seed: int) -> str:
    """Fill in each document's segments; return what was held out, for the log."""
    # The last `n_val_documents` were given apart for validation; else several documents hold out a
    # seeded choice of whole ones, and a single one its last `val_fraction` of characters, as ever.
    train_docs = documents[:len(documents) - n_val_documents]
    if n_val_documents:
        val_docs = documents[len(train_docs):]
        for group, is_val in ((train_docs, False), (val_docs, True)):
            for doc in group:
                doc.segments = [(0, doc.chars, len(group) > 1, is_val)]
        return (f"validation: {len(val_docs):,} file(s) given apart "
                f"({sum(d.val_chars for d in val_docs):,} characters)")
    if len(documents) == 1:
        doc, n_val = documents[0], int(documents[0].chars * val_fraction)
        doc.segments = [(0, doc.chars - n_val, False, False), (doc.chars - n_val, doc.chars, False, True)]
        return f"validation: the last {val_fraction:.0%} of the text"
    val = set(held_out([d.chars for d in documents], val_fraction, seed))
    for index, doc in enumerate(documents):
        doc.segments = [(0, doc.chars, True, index in val)]
    return (f"validation: {len(val):,} of {len(documents):,} files held out whole "
            f"({sum(d.val_chars for d in documents):,} characters, seed {seed}), "
            f"e.g. {documents[min(val)].path}")


def encoded_pieces(tokenizer: tinyllm.Tokenizer, text: str) -> Iterator[Tuple[np.ndarray, int]]:
    """(ids, characters) of `text`, encoded about ENCODE_CHARS at a time."""
    start = 0
    while start < len(text):
        cut = PIECE_END.search(text, start + ENCODE_CHARS) if len(text) - start > ENCODE_CHARS else None
        end = cut.end() if cut else len(text)
        yield np.asarray(tokenizer.encode(text[start:end]), dtype=np.int64), end - start
        start = end


def tokenizer_state(tokenizer: tinyllm.Tokenizer) -> dict:
    """The tokenizer as plain JSON data, as Tokenizer.from_state reads it back."""
    return {"type": tokenizer.type_name, "version": tokenizer.version, **tokenizer.state()}


def cache_key(content: str, tokenizer: Optional[tinyllm.Tokenizer], config: tinyllm.TrainingConfig) -> str:
    """The token cache's name for a content hash and a tokenizer: the one given, or the one to fit."""
    spec = tokenizer_state(tokenizer) if tokenizer else {
        "fit": config.tokenizer, "vocab_size": config.vocab_size, "sample": FIT_SAMPLE_CHARS}
    return hashlib.sha256(f"{content}:{json.dumps(spec, sort_keys=True)}".encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer that holds every token id."""
    return np.dtype(next(t for t in (np.uint8, np.uint16, np.uint32) if vocab_size <= np.iinfo(t).max + 1))


# ----------------------------------------------------------------------------------------------
# The corpus: a data source for tinyllm.Trainer


class Corpus:
    """Files and folders as a data source for `tinyllm.Trainer`, tokenized once into the token cache;
    `val_paths`: validation documents given apart; `include`: patterns for the files in folders."""

    def __init__(self, paths: Sequence[tinyllm.PathLike], *, include: Sequence[str] = (),
                 val_paths: Sequence[tinyllm.PathLike] = (), cache_dir: Optional[tinyllm.PathLike] = None,
                 progress: bool = True):  # progress: a bar while tokenizing, where there is a terminal
        # One path given alone is one path, not a sequence of one-letter names ("." among them).
        paths, include, val_paths = ([given] if isinstance(given, (str, os.PathLike)) else list(given or ())
                                     for given in (paths, include, val_paths))
        if not paths:
            raise TinyLLMError("a Corpus needs at least one file or folder")
        self.paths, self.include, self.val_paths = paths, include, val_paths
        self.cache_dir = Path(cache_dir) if cache_dir else token_cache_dir()
        self.progress = progress
        self.report: dict = {}  # what prepare() read, held out and cached, for the log and summary.json
        self.copies: List[Tuple[Path, Path]] = []  # (a file left out, the file with the same text read first)

    def prepare(self, config: tinyllm.TrainingConfig,
                tokenizer: Optional[tinyllm.Tokenizer]) -> tinyllm.TokenData:
        """The corpus's token ids for `config`, from the cache or tokenized now, and the tokenizer:
        a fitted one, or `tokenizer` grown by the characters it lacks."""
        files, val_files = list_files(self.paths, self.include), list_files(self.val_paths, self.include)
        if not files:
            raise self._nothing_read(0)
        files, left_out = self._without_validation(files, val_files)
        content = hashlib.sha256(json.dumps([FORMAT, config.lowercase, config.normalize_whitespace,
                                             config.val_fraction, config.seed]).encode())
        content_sha256(files, content)
        content.update(b"validation:")
        content_sha256(val_files, content)
        entry = TokenFile(self.cache_dir, cache_key(content.hexdigest(), tokenizer, config))
        with entry.locked():  # the processes of a torchrun job, or two runs: one tokenizes, the rest read
            data = entry.load()
            if data is None:
                data = self._tokenize(files, val_files, config, tokenizer, entry)
                # The same tokens, named by the tokenizer made: runs resumed or tuned from this one find them.
                entry.alias(cache_key(content.hexdigest(), data.tokenizer, config))
        tinyllm.check_token_counts(len(data.train_ids), len(data.val_ids), config.max_context, data.chars[1])
        self.report = {**entry.report, "read": entry.report["read"] + left_out}
        return data

    def _without_validation(self, files: List[Tuple[Path, bool]],
                            val_files: List[Tuple[Path, bool]]) -> Tuple[List[Tuple[Path, bool]], str]:
        """The training files less those given for validation too (say a folder's val.txt), and a note
        for the report: a model scored on text it trained on would report a loss that measures nothing."""
        held_out = {path.resolve() for path, _ in val_files}
        kept = [(path, named) for path, named in files if path.resolve() not in held_out]
        if not kept:
            raise TinyLLMError(f"every file of --data {', '.join(map(str, self.paths))} is also given for "
                               "validation (--val-data); validate on other files, or drop --val-data")
        left_out = [path for path, _ in files if path.resolve() in held_out]
        return kept, (f"; {len(left_out):,} left out, as given for validation, e.g. {left_out[0]}"
                      if left_out else "")

    def _nothing_read(self, skipped: int) -> TinyLLMError:
        patterns = f" matching {', '.join(self.include)}" if self.include else ""
        return TinyLLMError(f"no UTF-8 text files{patterns} in {', '.join(map(str, self.paths))} "
                            f"({skipped} skipped); check --data and --include")

    def _survey(self, files: List[Tuple[Path, bool]], config: tinyllm.TrainingConfig,
                seen: Dict[str, Path]) -> tuple:
        """Read every file once: (documents, the files skipped with why, the set of characters in the
        rest); a file in a folder that is not UTF-8 text is skipped (one named directly must be)."""
        # A file with the same text as one read before (`seen`, by hash) is skipped too: a copy on each
        # side of the validation split would make the validation loss measure memory.
        documents, skipped, chars = [], [], set()
        for path, named in files:
            try:
                text = read_text(path)
            except TinyLLMError as e:
                if named:
                    raise
                skipped.append((path, str(e).split(f"{path} ", 1)[-1].split(";")[0]))  # why, after the name
                continue
            digest = hashlib.sha256(text.encode()).hexdigest()
            if digest in seen:
                self.copies.append((path, seen[digest]))
                continue
            seen[digest] = path
            prepared = tinyllm.prepare_text(text, config.lowercase, config.normalize_whitespace)
            chars.update(prepared)
            documents.append(Document(path, len(text), len(prepared)))
        return documents, skipped, chars

    def _read_prepared(self, doc: Document, config: tinyllm.TrainingConfig) -> str:
        text = tinyllm.load_text(doc.path)
        return tinyllm.prepare_text(text, config.lowercase, config.normalize_whitespace)

    def _fitted(self, documents: List[Document], chars: set, config: tinyllm.TrainingConfig,
                tokenizer: Optional[tinyllm.Tokenizer]) -> Tuple[tinyllm.Tokenizer, int]:
        """The tokenizer and how many tokens it gained."""
        # A tokenizer that learns merges fits on a seeded sample of the training documents of at most
        # FIT_SAMPLE_CHARS characters; any other needs only the set of characters.
        every_char = "".join(sorted(chars))
        if tokenizer is not None:
            return tokenizer, tokenizer.extend(every_char)
        kind = tinyllm.TOKENIZERS[config.tokenizer]
        if not kind.learns_vocabulary:
            return kind().fit(every_char, vocab_size=config.vocab_size), 0
        training = [d for d in documents if not any(is_val for *_, is_val in d.segments)] or documents[:1]
        sample, size = [], 0
        for doc in random.Random(config.seed).sample(training, len(training)):
            if size >= FIT_SAMPLE_CHARS:
                break
            sample.append(self._read_prepared(doc, config)[:FIT_SAMPLE_CHARS - size])
            size += len(sample[-1])
        return kind().fit(DOCUMENT_END.join(sample), vocab_size=config.vocab_size), 0

    def _tokenize(self, files: List[Tuple[Path, bool]], val_files: List[Tuple[Path, bool]],
                  config: tinyllm.TrainingConfig, tokenizer: Optional[tinyllm.Tokenizer],
                  entry: TokenFile) -> tinyllm.TokenData:
        """Read, preprocess and encode every document, streaming, into the cache entry's files."""
        started, seen, self.copies = time.perf_counter(), {}, []
        val_documents, val_skipped, val_chars = self._survey(val_files, config, seen)  # first: they stay
        if val_files and not val_documents:
            raise TinyLLMError(f"no UTF-8 text files in --val-data {', '.join(map(str, self.val_paths))}")
        documents, skipped, chars = self._survey(files, config, seen)
        if not documents and self.copies:
            copy, original = self.copies[0]
            raise TinyLLMError(f"every text file of --data {', '.join(map(str, self.paths))} has the same "
                               f"text as a file of --val-data, e.g. {copy} as {original}; validate on other "
                               "text, or drop --val-data")
        if not documents:
            raise self._nothing_read(len(skipped))
        validation = plan_segments(documents + val_documents, len(val_documents),
                                   val_fraction=config.val_fraction, seed=config.seed)
        everything = documents + val_documents
        if any(doc.separators for doc in everything):
            chars.add(DOCUMENT_END)
        tokenizer, added = self._fitted(everything, chars | val_chars, config, tokenizer)
        total = sum(doc.chars + doc.separators for doc in everything)
        with entry.writer(token_dtype(tokenizer.vocab_size)) as write, \
                tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing",
                     disable=None if self.progress else True) as bar:
            for doc in everything:
                text = self._read_prepared(doc, config)
                for start, end, ends, is_val in doc.segments:
                    for ids, n_chars in encoded_pieces(tokenizer, text[start:end] + DOCUMENT_END * ends):
                        write(ids, is_val)
                        bar.update(n_chars)
        skipped += val_skipped
        read = f"{len(documents):,} file{'s' if len(documents) != 1 else ''} read " \
               f"({sum(d.raw_chars for d in documents):,} characters)"
        if skipped:
            read += f"; {len(skipped):,} skipped as not UTF-8 text or empty, e.g. {skipped[0][0]} " \
                    f"({skipped[0][1]})"
        if self.copies:
            copies = "a copy" if len(self.copies) == 1 else "copies"
            read += f"; {len(self.copies):,} skipped as {copies}, e.g. {self.copies[0][0]} (the same text " \
                    f"as {self.copies[0][1]})"
        given = sum(doc.raw_chars + doc.separators for doc in everything)
        return entry.finish(tokenizer, added=added, chars=(given, total),
                            val_chars=sum(doc.val_chars for doc in everything),
                            read=read, validation=validation, seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------
# The token cache: <key>.json says what <key>.train and <key>.val hold


def check_fields(meta: dict) -> None:
    """Raise ValueError unless a token cache entry's JSON has every field, of the right kind."""
    counts = [*meta["chars"], meta["val_chars"], meta["added_tokens"]]
    hashes = [meta["files"], meta["sha256"]]
    if meta["format"] != FORMAT or np.dtype(meta["dtype"]) not in (np.uint8, np.uint16, np.uint32) \
            or not all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes) \
            or len(counts) != 4 or not all(type(n) is int and n >= 0 for n in counts) \
            or meta["val_chars"] < 1 \
            or not all(isinstance(meta["report"].get(k), str) for k in ("read", "validation")):
        raise ValueError("a field is missing or of the wrong kind")


class TokenFile:
    """One entry of the token cache: <key>.json, written last, names the pair of raw token files
    (<files>.train, <files>.val) that holds its ids, with their type, lengths and tokenizer."""
    # It also holds what the log says about them. Several entries may share one pair.

    def __init__(self, folder: Path, key: str):
        self.folder, self.key, self.files = folder, key, key  # files: the key naming the token files
        self.meta_path = folder / f"{key}.json"
        self.meta: dict = {}
        self.report: dict = {}
        self.dtype = np.dtype(np.uint8)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the entry's lock file (where the system has locks): one process at a time builds it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = open(self.folder / f"{self.key}.lock", "a")
        except OSError as e:
            raise self.unwritable(e) from None
        with lock:
            if fcntl:
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def path(self, is_val: bool) -> Path:
        return self.folder / f"{self.files}.{'val' if is_val else 'train'}"

    def load(self) -> Optional[tinyllm.TokenData]:
        """The entry's data, memory-mapped; None if there is none, or it is damaged (then it is rebuilt)."""
        if not self.meta_path.exists():
            return None
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
            self.dtype, self.files = np.dtype(meta["dtype"]), meta["files"]
            check_fields(meta)
            tokenizer = tinyllm.Tokenizer.from_state(meta["tokenizer"], str(self.meta_path))
            train, val = (self._mapped(v, meta[f"{'val' if v else 'train'}_tokens"]) for v in (False, True))
            # NumPy's max: torch has none for uint16 or uint32 tensors (vocabularies over 256 tokens)
            if max(int(ids.numpy().max()) for ids in (train, val)) >= tokenizer.vocab_size:
                raise ValueError("a token id past the vocabulary")
            if tinyllm.ids_sha256(train, val) != meta["sha256"]:  # 17 ms a million tokens, here
                raise ValueError("its token ids differ from those it was written with")
            self.meta = meta
            self.report = {**meta["report"], "tokens": f"from the token cache, {self.meta_path}"}
            return tinyllm.TokenData(tokenizer, train, val, tuple(meta["chars"]), meta["val_chars"],
                                     meta["sha256"], meta["added_tokens"])
        except (OSError, ValueError, KeyError, TypeError, TinyLLMError, RecursionError) as e:
            logger.warning("token cache entry %s is damaged (%s); tokenizing again", self.meta_path,
                           str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            self.files = self.key
            return None

    def _mapped(self, is_val: bool, count: int) -> torch.Tensor:
        """The ids of one token file, read where training asks for them, never whole; it must hold `count`."""
        path = self.path(is_val)
        if not isinstance(count, int) or count < 1 or path.stat().st_size != count * self.dtype.itemsize:
            raise ValueError(f"{path.name} does not hold {count} tokens")
        return torch.from_numpy(np.memmap(path, dtype=self.dtype, mode="c", shape=(count,)))

    @contextlib.contextmanager
    def writer(self, dtype: np.dtype) -> Iterator:
        """A function write(ids, validation) appending ids to the entry's files; they are renamed into
        place only when all is written, so a killed run leaves no half entry."""
        self.dtype = dtype
        try:
            temporary = {v: tempfile.NamedTemporaryFile(dir=self.folder, prefix=f".{self.path(v).name}.",
                                                        suffix=".tmp", delete=False) for v in (False, True)}
        except OSError as e:
            raise self.unwritable(e) from None
        try:
            yield lambda ids, is_val: temporary[is_val].write(ids.astype(dtype).tobytes())
            for is_val, f in temporary.items():
                f.close()
                os.replace(f.name, self.path(is_val))
        finally:
            for f in temporary.values():
                f.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f.name)

    def finish(self, tokenizer: tinyllm.Tokenizer, *, added: int, chars: tuple, val_chars: int, read: str,
               validation: str, seconds: float) -> tinyllm.TokenData:
        """Write the entry's JSON, which makes it whole, and return its data, memory-mapped. Too few
        tokens to train on leave no entry; the caller says so."""
        sizes = [self.path(v).stat().st_size // self.dtype.itemsize for v in (False, True)]
        train, val = (self._mapped(v, n) if n else torch.zeros(0, dtype=torch.long)
                      for v, n in zip((False, True), sizes))
        self.report = {"read": read, "validation": validation,
                       "tokens": f"tokenized in {seconds:.1f} s into the token cache, {self.meta_path}"}
        self.meta = {"format": FORMAT, "files": self.files, "dtype": self.dtype.name,
                     "train_tokens": sizes[0], "val_tokens": sizes[1],
                     "tokenizer": tokenizer_state(tokenizer),
                     "chars": list(chars), "val_chars": val_chars, "sha256": tinyllm.ids_sha256(train, val),
                     "added_tokens": added, "report": {"read": read, "validation": validation}}
        if all(sizes):
            self._write_meta(self.meta_path, self.meta)
        return tinyllm.TokenData(tokenizer, train, val, chars, val_chars, self.meta["sha256"], added)

    def alias(self, key: str) -> None:
        """Let `key` name this entry's tokens too, as tokens of a tokenizer that gains nothing."""
        path = self.folder / f"{key}.json"
        if key != self.key and self.meta and not path.exists():
            self._write_meta(path, {**self.meta, "added_tokens": 0})

    def _write_meta(self, path: Path, meta: dict) -> None:
        try:
            with tinyllm.atomic_write(path, "w") as f:
                json.dump(meta, f, ensure_ascii=False)
        except OSError as e:
            raise self.unwritable(e) from None

    def unwritable(self, error: OSError) -> TinyLLMError:
        nearest = tinyllm.nearest_existing(self.folder)
        reason = f"{nearest} is a file, not a folder" if not nearest.is_dir() else error.strerror
        return TinyLLMError(f"cannot write the token cache in {self.folder} ({reason}); "
                            "give another folder with --token-cache")


class DataReport(tinyllm.Callback):
    """What a Corpus read, held out and cached: in the run's log at the start, and in summary.json
    as `data`."""

    def __init__(self, corpus: Corpus):
        self.corpus = corpus

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        report = self.corpus.report
        logger.info("data: %s", report["read"])
        logger.info("%s", report["validation"])
        logger.info("tokens: %s", report["tokens"])

    def on_end(self, trainer: tinyllm.Trainer, summary: dict) -> None:
        summary["data"] = dict(self.corpus.report)
