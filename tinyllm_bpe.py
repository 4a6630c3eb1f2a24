"""Byte-level byte-pair encoding (BPE) for tinyllm: the `bpe` entry of tinyllm.TOKENIZERS.

tinyllm.py registers it by name and imports this module the first time `bpe` is asked for, so
`TrainingConfig(tokenizer="bpe")` or `--tokenizer bpe` is all a user writes.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Dict, List, Optional, Sequence

import tinyllm


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


class BytePairTokenizer(tinyllm.Tokenizer):
    """Byte-level BPE, as in GPT-2: tokens 0-255 are the UTF-8 bytes, and `fit` adds one token at a
    time for the most frequent adjacent pair, so any text encodes without unknowns."""
    # Text is first cut into pieces (a word with its leading space, a number, a run of punctuation,
    # whitespace) and merges never cross pieces, so each distinct piece is encoded once and cached.

    type_name = "bpe"
    learns_vocabulary = True
    default_vocab_size = 256 + 512
    MAX_TOKEN_BYTES = 1 << 16  # real merges make tokens of a few dozen bytes; a crafted file, of 2**N
    PIECES = re.compile(r" ?[^\W\d]+| ?\d+| ?[^\s\w]+|\s+(?!\S)|\s+")  # covers every character

    def __init__(self, merges: Sequence[Sequence[int]] = ()):
        self.set_state({"merges": [list(pair) for pair in merges]})

    def fit(self, text: str, vocab_size: Optional[int] = None) -> "BytePairTokenizer":
        """Learn merges until the vocabulary has `vocab_size` tokens (or no pair occurs twice)."""
        vocab_size = vocab_size or self.default_vocab_size
        if vocab_size < 256:
            raise tinyllm.TinyLLMError(f"a byte-level BPE vocabulary needs at least 256 tokens, "
                                       f"got {vocab_size}")
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
        lengths = [1] * 256  # bytes per token, checked before any token is built
        for rank, pair in enumerate(merges):
            if len(pair) != 2 or not all(type(i) is int and 0 <= i < 256 + rank for i in pair):
                raise ValueError(f"merge {rank} must be two ids of earlier tokens, got {list(pair)}")
            lengths.append(lengths[pair[0]] + lengths[pair[1]])
            if lengths[-1] > self.MAX_TOKEN_BYTES:
                raise ValueError(f"merge {rank} makes a token of {lengths[-1]} bytes, more than "
                                 f"{self.MAX_TOKEN_BYTES}")
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
                try:
                    self.cache[piece] = self._encode_piece(list(piece.encode("utf-8")))
                except UnicodeEncodeError as e:  # a lone surrogate, e.g. from a broken file name
                    unencodable = e.object[e.start:e.end]
                    raise tinyllm.TinyLLMError(f"characters that cannot be encoded as UTF-8: "
                                               f"{unencodable!r}") from None
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
        tinyllm.check_token_ids(ids, len(self.token_bytes))
        return b"".join(self.token_bytes[i] for i in ids).decode("utf-8", errors="replace")
