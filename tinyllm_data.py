"""Your own data as documents: a file, a folder read recursively (a code base), or several paths.

Files in a folder that are not UTF-8 text are skipped and counted, each document ends with
DOCUMENT_END so that no window glues two files together unnoticed, and validation is held out by
whole documents. train_shakespeare.py's --data, --include and --val-data use it; from code,
`read_documents` then `training_texts` give the `text` and `val_text` a tinyllm.Trainer takes.
"""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path, PurePath
from typing import List, Optional, Sequence, Tuple

import tinyllm
from tinyllm import TinyLLMError, logger

# ASCII's "file separator": one character, so one token of the character tokenizer, that ends every
# document of a folder; the model learns where files end, and a sample may contain it.
DOCUMENT_END = "\x1c"


@dataclasses.dataclass
class Documents:
    """Texts read from the paths given, in a stable order, and the files skipped (path, why)."""

    paths: List[Path] = dataclasses.field(default_factory=list)
    texts: List[str] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[Path, str]] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        """What was read and skipped, for the log."""
        read = f"{len(self.texts):,} file{'s' if len(self.texts) != 1 else ''} read " \
               f"({sum(map(len, self.texts)):,} characters)"
        if not self.skipped:
            return read
        path, why = self.skipped[0]
        return f"{read}; {len(self.skipped):,} skipped as not UTF-8 text or empty, e.g. {path} ({why})"


def _included(path: Path, root: Path, include: Sequence[str]) -> bool:
    """Whether a file found under `root` is read: not inside a hidden folder or hidden itself (.git),
    and matching one of the `include` patterns where there are any."""
    relative = path.relative_to(root)
    if any(part.startswith(".") for part in relative.parts):
        return False
    return not include or any(PurePath(relative).match(pattern) for pattern in include)


def read_documents(paths: Sequence[tinyllm.PathLike], include: Sequence[str] = ()) -> Documents:
    """Every file named, and every file under each folder named (recursively, sorted by path) that
    `include` admits. A file named directly must be UTF-8 text; one found in a folder that is not
    (binary, another encoding, empty) is skipped and counted instead of failing the run."""
    documents = Documents()
    for path in map(Path, paths):
        if not path.is_dir():
            documents.paths.append(path)
            documents.texts.append(tinyllm.load_text(path))
            continue
        for file in sorted(p for p in path.rglob("*") if p.is_file() and _included(p, path, include)):
            try:
                text = tinyllm.load_text(file)
            except TinyLLMError as e:  # its message names the file; keep the reason after the name
                documents.skipped.append((file, str(e).split(f"{file} ", 1)[-1].split(";")[0]))
                continue
            documents.paths.append(file)
            documents.texts.append(text)
    if not documents.texts:
        patterns = f" matching {', '.join(include)}" if include else ""
        raise TinyLLMError(f"no UTF-8 text files{patterns} in {', '.join(map(str, paths))} "
                           f"({len(documents.skipped)} skipped); check --data and --include")
    return documents


def joined(texts: Sequence[str]) -> str:
    """Documents as one text, each ended by DOCUMENT_END."""
    return "".join(text + DOCUMENT_END for text in texts)


def held_out(documents: Documents, val_fraction: float, seed: int) -> List[int]:
    """The indices of a seeded choice of whole documents holding about `val_fraction` of the
    characters, in reading order; at least one document, and never all of them."""
    total, chosen, size = sum(map(len, documents.texts)), [], 0
    for index in random.Random(seed).sample(range(len(documents.texts)), len(documents.texts)):
        if size >= val_fraction * total or len(chosen) == len(documents.texts) - 1:
            break
        chosen.append(index)
        size += len(documents.texts[index])
    return sorted(chosen)


def training_texts(documents: Documents, *, val_fraction: float, seed: int,
                   val_documents: Optional[Documents] = None) -> Tuple[str, Optional[str], str]:
    """(training text, validation text or None, what was held out): the validation documents if
    given; else, for several documents, a seeded choice of them; else None, so that the trainer
    holds out the end of the one text, as for a single file."""
    def one_text(texts: List[str]) -> str:  # a single file stays as it is
        return texts[0] if len(texts) == 1 else joined(texts)
    if val_documents is not None:
        val_text = one_text(val_documents.texts)
        return one_text(documents.texts), val_text, (f"validation: {len(val_documents.texts):,} file(s) "
                                                     f"given apart ({len(val_text):,} characters)")
    if len(documents.texts) == 1:
        return documents.texts[0], None, f"validation: the last {val_fraction:.0%} of the text"
    val = set(held_out(documents, val_fraction, seed))
    train_text = joined([t for i, t in enumerate(documents.texts) if i not in val])
    val_text = joined([t for i, t in enumerate(documents.texts) if i in val])
    example = documents.paths[min(val)]
    return train_text, val_text, (f"validation: {len(val):,} of {len(documents.texts):,} files held out "
                                  f"whole ({len(val_text):,} characters, seed {seed}), e.g. {example}")


class DataReport(tinyllm.Callback):
    """What was read and held out: in the run's log at the start, and in summary.json as `data`."""

    def __init__(self, read: str, validation: str):
        self.read, self.validation = read, validation

    def on_start(self, trainer: tinyllm.Trainer) -> None:
        logger.info("data: %s", self.read)
        logger.info("%s", self.validation)

    def on_end(self, trainer: tinyllm.Trainer, summary: dict) -> None:
        summary["data"] = {"read": self.read, "validation": self.validation}
