"""Tests of the plug-in modules (tinyllm_bpe, tinyllm_inference, tinyllm_hooks) and of the command
line, end to end: crash safety, exact resume, bad input, torchrun."""
import collections
import contextlib
import csv
import dataclasses
import functools
import hashlib
import http.server
import importlib.util
import io
import json
import math
import os
import random
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import tinyllm
import tinyllm_bpe
import tinyllm_data
import tinyllm_hooks
import tinyllm_inference
import train_shakespeare
from test_tinyllm import CUDA, FAST, PLAY, ROOT, StopAt, tiny_config, tiny_model
from tinyllm import CharacterTokenizer, TinyLLMError, TrainingConfig, prepare_text

SCRIPT = ROOT / "train_shakespeare.py"


@pytest.fixture(autouse=True, scope="session")
def measurements_in_a_temporary_folder(tmp_path_factory):
    """MeasuredSettings keeps its timings here, not in the user's home (in subprocesses too)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(cache))
        patch.setattr(tinyllm_hooks, "MEASUREMENTS", cache / "tinyllm" / "measurements.json")
        yield


# ---------------------------------------------------------------------------------------------
# tinyllm_bpe: byte-pair encoding


@FAST
@given(st.text(max_size=60), st.text(min_size=1, max_size=300))
def test_bpe_round_trips_any_text_with_merges_learned_on_other_text(text, fit_text):
    tokenizer = tinyllm_bpe.BytePairTokenizer().fit(fit_text * 3, vocab_size=300)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert ids == tokenizer.encode(text) == tinyllm_bpe.BytePairTokenizer(tokenizer.merges).encode(text)


@FAST
@given(st.text(min_size=1, max_size=200), st.text(max_size=40))
def test_bpe_save_load_round_trip(fit_text, probe):
    tokenizer = tinyllm_bpe.BytePairTokenizer().fit(fit_text * 2, vocab_size=280)
    path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    tokenizer.save_state(path)
    loaded = tinyllm.load_tokenizer(path)
    assert isinstance(loaded, tinyllm_bpe.BytePairTokenizer) and loaded.merges == tokenizer.merges
    assert loaded.encode(probe) == tokenizer.encode(probe)


def test_bpe_learns_frequent_pairs_first_and_stops_at_the_vocabulary_size():
    tokenizer = tinyllm_bpe.BytePairTokenizer().fit("the cat the hat the bat " * 50, vocab_size=260)
    assert tokenizer.vocab_size == 260
    assert tokenizer.decode([256]) in {" t", "th", "he", "at"}  # the most frequent pairs
    assert len(tokenizer.encode("the hat")) < len("the hat")
    data = json.loads(json.dumps(tokenizer.state()))
    assert data["merges"][0] == list(tokenizer.merges[0]) and len(data["merges"]) == 4
    with pytest.raises(ValueError, match="merge 0 must be two ids of earlier tokens"):
        tinyllm_bpe.BytePairTokenizer([[300, 1]])
    with pytest.raises(TinyLLMError, match="'vocab_size' applies only to tokenizers that learn"):
        TrainingConfig(vocab_size=100)


def test_training_with_bpe_reports_bits_per_character_and_samples_text(tmp_path):
    config = tiny_config(tmp_path, tokenizer="bpe", vocab_size=300, max_steps=20, lowercase=False)
    summary = tinyllm.Trainer(config, PLAY, quiet=True).train()
    val_text = PLAY[len(PLAY) - int(len(PLAY) * config.val_fraction):]
    checkpoint = tinyllm.load_checkpoint(tmp_path / "out" / "best.pt")
    assert isinstance(checkpoint.tokenizer, tinyllm_bpe.BytePairTokenizer)
    assert checkpoint.tokenizer.vocab_size == 300
    tokens = len(checkpoint.tokenizer.encode(val_text))
    assert summary["full_val_bits_per_char"] == pytest.approx(
        summary["full_val_loss"] * tokens / (len(val_text) * math.log(2)))
    assert "bits/char" in (tmp_path / "out" / "tinyllm_training.log").read_text()
    text = tinyllm.sample_text(checkpoint.model, checkpoint.tokenizer, "ROMEO:", 30, seed=1, lowercase=False)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_every_name_tinyllm_exported_before_the_plug_ins_still_imports_from_it():
    exported = ["TinyLLMError", "TrainingInterrupted", "Registry", "TOKENIZERS", "MODEL_SIZES", "Tokenizer",
                "CharacterTokenizer", "BytePairTokenizer", "load_tokenizer", "TrainingConfig",
                "prepare_text", "load_text", "split_train_val", "bits_per_char", "TokenWindows",
                "TransformerModel", "KVCache", "generate", "generate_tokens", "stream_text", "sample_text",
                "evaluate_full", "Trainer", "Int8Linear", "quantize_int8", "MetricsLogger", "plot_losses",
                "Checkpoint", "save_checkpoint", "load_checkpoint", "atomic_write",
                "measure_peak_flops", "merge_pair"]
    namespace = {}
    exec(f"from tinyllm import {', '.join(exported)}", namespace)
    assert namespace["BytePairTokenizer"] is tinyllm_bpe.BytePairTokenizer
    assert namespace["plot_losses"] is tinyllm_hooks.plot_losses
    assert set(tinyllm.__all__) >= set(exported) - {"measure_peak_flops", "merge_pair"}
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        tinyllm.nothing_here


# ---------------------------------------------------------------------------------------------
# Third-party plug-ins found through entry points, and the download of the default data


PLUGIN_MODULE = '''
import tinyllm


class ShoutTokenizer(tinyllm.CharacterTokenizer):
    """Characters, upper-cased."""

    type_name = "shout"

    def fit(self, text, vocab_size=None):
        return super().fit(text.upper())

    def encode(self, text):
        return super().encode(text.upper())


PICO = {"n_layer": 1, "n_head": 1, "n_embd": 8, "dropout": 0.0}
NOT_A_SIZE = ["n_layer", 1]
'''


PLUGIN_ENTRY_POINTS = """
[tinyllm.tokenizers]
shout = tinyllm_shout:ShoutTokenizer
missing = tinyllm_shout:DoesNotExist

[tinyllm.model_sizes]
pico = tinyllm_shout:PICO
odd = tinyllm_shout:NOT_A_SIZE
"""


def test_installed_plugins_add_a_tokenizer_and_a_size_and_broken_ones_only_warn(tmp_path, cli, monkeypatch):
    """A distribution's metadata on sys.path is what `pip install` leaves; no install needed. In this
    process, with the registries put back afterwards."""
    site = tmp_path / "site"
    (site / "tinyllm_shout-1.0.dist-info").mkdir(parents=True)
    info = site / "tinyllm_shout-1.0.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyllm-shout\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    (site / "tinyllm_shout.py").write_text(PLUGIN_MODULE)
    (tmp_path / "play.txt").write_text(PLAY)
    monkeypatch.syspath_prepend(str(site))
    for registry in (tinyllm.TOKENIZERS, tinyllm.MODEL_SIZES):
        monkeypatch.setattr(registry, "entries", dict(registry.entries))
    with pytest.warns(UserWarning) as warned:
        result = cli("--data", tmp_path / "play.txt", "--out-dir", tmp_path / "out", "--tokenizer", "shout",
                     "--size", "pico", "--max-steps", 5, "--max-context", 16, "--quiet")
    assert result.returncode == 0, result.stderr
    messages = " ".join(str(warning.message) for warning in warned)
    assert "tokenizer plugin 'missing' (tinyllm_shout:DoesNotExist) is ignored" in messages
    assert "model size plugin 'odd' (tinyllm_shout:NOT_A_SIZE) is ignored" in messages
    saved = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert saved["type"] == "shout" and "R" in saved["chars"] and "r" not in saved["chars"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_size"], config["n_layer"], config["n_embd"]) == ("pico", 1, 8)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def file_server(tmp_path):
    """Serve tmp_path/served over HTTP on 127.0.0.1 and yield its base URL."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # shutdown waits a poll
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_the_sha256(file_server, tmp_path):
    served, url = file_server
    payload = PLAY.encode()
    (served / "input.txt").write_bytes(payload)
    target_dir = tmp_path / "data"
    good = hashlib.sha256(payload).hexdigest()
    path = train_shakespeare.download(f"{url}/input.txt", target_dir / "shakespeare.txt", good)
    assert path.read_bytes() == payload

    bad_target = tmp_path / "other" / "shakespeare.txt"
    with pytest.raises(TinyLLMError, match="sha256"):
        train_shakespeare.download(f"{url}/input.txt", bad_target, "0" * 64)
    assert list(bad_target.parent.iterdir()) == []  # no file, not even a temporary one


def test_default_data_is_downloaded_once_then_read_locally(file_server, tmp_path, monkeypatch, capsys, cli):
    served, url = file_server
    (served / "input.txt").write_text(PLAY)
    monkeypatch.setattr(train_shakespeare, "SHAKESPEARE_URL", f"{url}/input.txt")
    monkeypatch.setattr(train_shakespeare, "SHAKESPEARE_SHA256", hashlib.sha256(PLAY.encode()).hexdigest())
    path = tmp_path / "data" / "shakespeare.txt"
    path.parent.mkdir()
    (path.parent / ".shakespeare.txt.k1ll3d.tmp").write_text("half a download")
    assert train_shakespeare.shakespeare_file(path).read_text() == PLAY and path.read_text() == PLAY
    assert [p.name for p in path.parent.iterdir()] == ["shakespeare.txt"]
    (served / "input.txt").unlink()  # a second call must not touch the network
    assert train_shakespeare.shakespeare_file(path).read_text() == PLAY
    assert capsys.readouterr().err == f"downloading Tiny Shakespeare to {path} ...\n"
    path.write_text(PLAY[:1000])  # cut short: used as it is, never deleted, but said
    assert train_shakespeare.shakespeare_file(path).read_text() == PLAY[:1000]
    assert capsys.readouterr().err == (
        f"warning: {path} is not the Tiny Shakespeare this program downloads (its sha256 differs: cut short "
        "or edited?); training on it as it is; delete it to download it again\n")
    monkeypatch.setattr(train_shakespeare, "DEFAULT_DATA", path)  # a training run checks it once
    result = cli("--size", "tiny", "--max-context", 32, "--max-steps", 1, "--out-dir", tmp_path / "out",
                 "--no-compile", "--device", "cpu", "--quiet")
    assert result.returncode == 0 and result.stderr.count("is not the Tiny Shakespeare") == 1, result.stderr


def test_download_failure_says_where_to_put_the_file(file_server, tmp_path):
    _, url = file_server
    with pytest.raises(TinyLLMError, match="save it as .*shakespeare.txt"):
        train_shakespeare.download(f"{url}/missing.txt", tmp_path / "shakespeare.txt", "0" * 64)
    assert not (tmp_path / "shakespeare.txt").exists()


# ---------------------------------------------------------------------------------------------
# tinyllm_data: folders of files, held-out documents


def write_files(root, files):
    for name, content in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content if isinstance(content, bytes) else content.encode())


AS_IT_IS = TrainingConfig(max_context=8, lowercase=False, normalize_whitespace=False)


def corpus_data(paths, tmp_path, config=None, tokenizer=None, **options):
    """A Corpus's TokenData and report, with the token cache under tmp_path."""
    corpus = tinyllm_data.Corpus(paths, cache_dir=tmp_path / "tokens", **options)
    data = corpus.prepare(config or AS_IT_IS, tokenizer)
    return data, corpus.report


def decoded(data, ids):
    return data.tokenizer.decode(ids.tolist())


def test_a_folder_is_read_in_sorted_order_through_its_patterns_skipping_what_is_not_text(tmp_path):
    code = tmp_path / "code"
    write_files(code, [("z.py", "z = 1\n" * 9), ("a/b.py", "def b():\n    return 2\n" * 3), ("a/c.txt", "c"),
                       ("sub/dir/d.py", "d = 4\n" * 9), (".git/x.py", "hidden"), ("bin.py", b"\x00\x01"),
                       ("latin.py", "\xe9t\xe9".encode("latin-1")), ("empty.py", b"")])
    listed = [p.relative_to(code).as_posix() for p, _ in tinyllm_data.list_files([code], ["*.py"])]
    assert listed == ["a/b.py", "bin.py", "empty.py", "latin.py", "sub/dir/d.py", "z.py"]
    data, report = corpus_data([code], tmp_path, include=["*.py"])
    assert report["read"].startswith("3 files read (174 characters); 3 skipped as not UTF-8 text or empty, "
                                     f"e.g. {code / 'bin.py'} (looks binary")
    end = tinyllm_data.DOCUMENT_END
    documents = (decoded(data, data.train_ids) + decoded(data, data.val_ids)).split(end)[:-1]
    assert sorted(documents) == sorted(["def b():\n    return 2\n" * 3, "d = 4\n" * 9, "z = 1\n" * 9])
    everything, _ = corpus_data([code, code / "z.py"], tmp_path)  # several paths: c.txt too, z.py once
    every_text = decoded(everything, everything.train_ids) + decoded(everything, everything.val_ids)
    assert every_text.count(end) == 4 and every_text.count("z = 1\n" * 9) == 1
    with pytest.raises(TinyLLMError, match="looks binary"):  # a file named directly must be text
        corpus_data([code / "bin.py"], tmp_path)
    if Path("/dev/zero").exists():  # never read to the end, not even to hash it
        with pytest.raises(TinyLLMError, match="data path /dev/zero is not a regular file"):
            corpus_data(["/dev/zero"], tmp_path)
    with pytest.raises(TinyLLMError, match=r"no UTF-8 text files matching \*.rs in .*; check --data"):
        corpus_data([code], tmp_path, include=["*.rs"])


def test_validation_holds_out_whole_documents_by_a_seeded_choice(tmp_path):
    texts = [f"document {i}\n" * (i + 1) for i in range(20)]
    write_files(tmp_path / "docs", [(f"{i:02d}.txt", text) for i, text in enumerate(texts)])
    end = tinyllm_data.DOCUMENT_END
    data, report = corpus_data([tmp_path / "docs"], tmp_path, dataclasses.replace(AS_IT_IS, seed=1))
    train, val = decoded(data, data.train_ids), decoded(data, data.val_ids)
    assert sorted((train + val).split(end)[:-1]) == sorted(texts)  # every document once, whole, ended
    assert 0.1 <= len(val) / (len(train) + len(val)) < 0.3 and "files held out whole" in report["validation"]
    assert data.val_chars == len(val) and data.chars == (len(train) + len(val),) * 2
    again, _ = corpus_data([tmp_path / "docs"], tmp_path, dataclasses.replace(AS_IT_IS, seed=1))
    other, _ = corpus_data([tmp_path / "docs"], tmp_path, dataclasses.replace(AS_IT_IS, seed=2))
    assert decoded(again, again.val_ids) == val and decoded(other, other.val_ids) != val
    (tmp_path / "one.txt").write_text(PLAY)  # a single file: its last tenth, as the in-memory path
    one, report = corpus_data([tmp_path / "one.txt"], tmp_path)
    assert decoded(one, one.val_ids) == PLAY[len(PLAY) - len(PLAY) // 10:]
    assert report["validation"] == "validation: the last 10% of the text"
    apart, report = corpus_data([tmp_path / "one.txt"], tmp_path, val_paths=[tmp_path / "docs"])
    assert decoded(apart, apart.train_ids) == PLAY and decoded(apart, apart.val_ids).count(end) == 20
    assert report["validation"].startswith("validation: 20 file(s) given apart")


def test_a_file_given_for_validation_is_left_out_of_the_training_folder_it_sits_in(tmp_path):
    write_files(tmp_path / "docs", [("a.txt", "training text\n" * 20), ("val.txt", "validation text\n" * 20)])
    val = tmp_path / "docs" / "val.txt"
    data, report = corpus_data([tmp_path / "docs"], tmp_path, val_paths=[val])
    assert decoded(data, data.train_ids) == "training text\n" * 20  # val.txt is not trained on
    assert decoded(data, data.val_ids) == "validation text\n" * 20
    assert report["read"] == f"1 file read (280 characters); 1 left out, as given for validation, e.g. {val}"
    with pytest.raises(TinyLLMError, match=r"every file of --data .*docs is also given for validation"):
        corpus_data([tmp_path / "docs"], tmp_path, val_paths=[tmp_path / "docs"])


def test_a_named_file_that_is_missing_is_refused_even_where_the_rest_are_in_the_token_cache(tmp_path):
    (tmp_path / "a.txt").write_text(PLAY)
    corpus_data([tmp_path / "a.txt"], tmp_path)  # now in the token cache
    for paths, val_paths in (([tmp_path / "a.txt", tmp_path / "gone.txt"], []),
                             ([tmp_path / "a.txt"], [tmp_path / "gone.txt"])):
        with pytest.raises(TinyLLMError, match=r"data file .*gone.txt does not exist"):
            corpus_data(paths, tmp_path, val_paths=val_paths)


def test_a_token_cache_that_is_a_file_is_named_as_one(tmp_path):
    (tmp_path / "a.txt").write_text(PLAY)
    for cache in (tmp_path / "a.txt", tmp_path / "a.txt" / "tokens"):
        with pytest.raises(TinyLLMError, match=f"^cannot write the token cache in {re.escape(str(cache))} "
                                               r"\(.*a.txt is a file, not a folder\); give another folder"):
            tinyllm_data.Corpus([tmp_path / "a.txt"], cache_dir=cache).prepare(AS_IT_IS, None)
    assert (tmp_path / "a.txt").read_text() == PLAY


def test_one_path_given_alone_is_one_path_not_a_list_of_its_letters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where "." (one of the letters of "a.txt") would be the whole folder
    write_files(tmp_path, [("a.txt", PLAY), ("other.txt", "other text\n" * 50), ("val.txt", PLAY[:1000])])
    data, report = corpus_data("a.txt", tmp_path, include="*.txt", val_paths="val.txt")
    assert report["read"] == "1 file read (4,400 characters)"
    assert decoded(data, data.train_ids) == PLAY and decoded(data, data.val_ids) == PLAY[:1000]


def test_a_file_with_the_same_text_as_another_is_read_once_so_no_copy_trains_on_validation_text(tmp_path):
    texts = [f"document {i}\n" * (i + 1) for i in range(20)]
    files = [(f"{i:02d}.txt", text) for i, text in enumerate(texts)] + [("zz_copy.txt", texts[3])]
    write_files(tmp_path / "docs", files)
    data, report = corpus_data([tmp_path / "docs"], tmp_path)
    end = tinyllm_data.DOCUMENT_END
    train, val = (decoded(data, ids).split(end)[:-1] for ids in (data.train_ids, data.val_ids))
    assert sorted(train + val) == sorted(texts)  # the copy is not read, whichever side 03.txt went to
    assert report["read"].endswith(f"; 1 skipped as a copy, e.g. {tmp_path / 'docs' / 'zz_copy.txt'} (the "
                                   f"same text as {tmp_path / 'docs' / '03.txt'})")
    (tmp_path / "val.txt").write_text(texts[5])  # a copy given for validation: out of training
    apart, report = corpus_data([tmp_path / "docs"], tmp_path, val_paths=[tmp_path / "val.txt"])
    assert texts[5] not in decoded(apart, apart.train_ids) and decoded(apart, apart.val_ids) == texts[5]
    assert "; 2 skipped as copies, e.g. " in report["read"]
    with pytest.raises(TinyLLMError, match=r"every text file of --data .*05.txt has the same text as a "
                                           r"file of --val-data, e.g. .*05.txt as .*val.txt; validate on"):
        corpus_data([tmp_path / "docs" / "05.txt"], tmp_path, val_paths=[tmp_path / "val.txt"])


def test_memory_mapped_tokens_give_exactly_the_batches_of_the_in_memory_path(tmp_path):
    (tmp_path / "play.txt").write_text(PLAY)
    config = tiny_config(tmp_path, max_context=16, batch_size=4, lowercase=False)
    in_memory = tinyllm.prepare_data(config, PLAY, None, None)
    mapped, _ = corpus_data([tmp_path / "play.txt"], tmp_path, config)
    assert mapped.train_ids.dtype == torch.uint8  # 40-odd characters: a byte a token
    assert (mapped.sha256, mapped.chars, mapped.val_chars) == (in_memory.sha256, in_memory.chars,
                                                               in_memory.val_chars)
    assert mapped.tokenizer.state() == in_memory.tokenizer.state()
    for ids, other in ((mapped.train_ids, in_memory.train_ids), (mapped.val_ids, in_memory.val_ids)):
        first = tinyllm.epoch_loader(ids, 16, 4, torch.Generator().manual_seed(3))
        second = tinyllm.epoch_loader(other, 16, 4, torch.Generator().manual_seed(3))
        for (x, y), (x2, y2) in zip(first, second, strict=True):
            assert x.dtype == torch.long and torch.equal(x, x2) and torch.equal(y, y2)
        for (x, y), (x2, y2) in zip(tinyllm.fixed_batches(ids, 16, 4, 3, seed=1),
                                    tinyllm.fixed_batches(other, 16, 4, 3, seed=1)):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    model = tiny_model(vocab_size=in_memory.tokenizer.vocab_size)
    scores = [tinyllm.evaluate_full(model, data.val_ids, 4) for data in (mapped, in_memory)]
    assert scores[0] == scores[1]


def test_the_token_cache_is_hit_then_invalidated_by_a_changed_file_tokenizer_or_damage(tmp_path, monkeypatch,
                                                                                       caplog):
    write_files(tmp_path / "docs", [(f"{i}.txt", f"text number {i}\n" * 20) for i in range(5)])
    first, report = corpus_data([tmp_path / "docs"], tmp_path)
    assert report["tokens"].startswith("tokenized in ")
    tokenize = tinyllm_data.Corpus._tokenize
    monkeypatch.setattr(tinyllm_data.Corpus, "_tokenize", lambda *a: pytest.fail("tokenized again"))
    again, report = corpus_data([tmp_path / "docs"], tmp_path)  # a hit: nothing tokenized
    assert report["tokens"].startswith("from the token cache, ") and again.sha256 == first.sha256
    assert torch.equal(again.train_ids.long(), first.train_ids.long())
    fitted, _ = corpus_data([tmp_path / "docs"], tmp_path, tokenizer=first.tokenizer)  # as a resumed run asks
    assert fitted.sha256 == first.sha256
    monkeypatch.setattr(tinyllm_data.Corpus, "_tokenize", tokenize)
    (tmp_path / "docs" / "3.txt").write_text("a changed file, with new characters: Q!\n" * 20)
    changed, report = corpus_data([tmp_path / "docs"], tmp_path)
    assert report["tokens"].startswith("tokenized in ") and changed.sha256 != first.sha256
    assert "Q" in changed.tokenizer.chars
    grown, _ = corpus_data([tmp_path / "docs"], tmp_path, tokenizer=CharacterTokenizer("abc"))
    assert grown.added_tokens == changed.tokenizer.vocab_size - 3
    bpe, report = corpus_data([tmp_path / "docs"], tmp_path, dataclasses.replace(AS_IT_IS, tokenizer="bpe"))
    assert report["tokens"].startswith("tokenized in ") and bpe.tokenizer.type_name == "bpe"
    assert bpe.train_ids.dtype == torch.uint16  # more than 256 tokens
    again, report = corpus_data([tmp_path / "docs"], tmp_path, dataclasses.replace(AS_IT_IS, tokenizer="bpe"))
    assert report["tokens"].startswith("from the token cache, ") and again.sha256 == bpe.sha256
    lowercase = dataclasses.replace(AS_IT_IS, lowercase=True)
    lowered, report = corpus_data([tmp_path / "docs"], tmp_path, lowercase)
    assert report["tokens"].startswith("tokenized in ") and "Q" not in lowered.tokenizer.chars
    entry = tmp_path / "tokens" / report["tokens"].rsplit("/", 1)[-1]
    hand_edited = json.loads(entry.read_text()) | {"chars": ["many", 1]}
    deep = "[" * 100_000 + "]" * 100_000  # json's decoder recurses once per level
    for damage in ('{"format": 1, "dtype": "float64"', "[]", json.dumps(hand_edited), deep):  # cut, edited
        entry.write_text(damage)
        again, report = corpus_data([tmp_path / "docs"], tmp_path, lowercase)
        assert report["tokens"].startswith("tokenized in ") and again.sha256 == lowered.sha256
    assert "is damaged" in caplog.text
    meta = json.loads(entry.read_text())
    train_file = tmp_path / "tokens" / f"{meta['files']}.train"
    ids = train_file.read_bytes()
    for damage in (ids[:-1], ids[1:] + ids[:1]):  # a token file cut short; its ids changed, each one valid
        train_file.write_bytes(damage)
        again, report = corpus_data([tmp_path / "docs"], tmp_path, lowercase)
        assert report["tokens"].startswith("tokenized in ") and again.sha256 == lowered.sha256
        assert train_file.read_bytes() == ids


def test_large_texts_are_encoded_in_pieces_and_bpe_fits_on_a_bounded_sample(tmp_path, monkeypatch):
    monkeypatch.setattr(tinyllm_data, "ENCODE_CHARS", 50)
    monkeypatch.setattr(tinyllm_data, "FIT_SAMPLE_CHARS", 500)
    fitted_on = []
    fit = tinyllm.TOKENIZERS["bpe"].fit

    def recorded_fit(self, text, vocab_size=None):
        fitted_on.append(len(text))
        return fit(self, text, vocab_size)
    monkeypatch.setattr(tinyllm.TOKENIZERS["bpe"], "fit", recorded_fit)
    write_files(tmp_path / "docs", [(f"{i}.txt", PLAY[:300 * (i + 1)]) for i in range(6)])
    config = TrainingConfig(max_context=8, tokenizer="bpe", vocab_size=300, val_fraction=0.2)
    data, _ = corpus_data([tmp_path / "docs"], tmp_path, config)
    assert fitted_on and fitted_on[0] <= 500 + 5  # the sample, with a separator between its documents
    assert data.train_ids.dtype == torch.uint16  # 300 tokens
    assert [tinyllm_data.token_dtype(n).name for n in (256, 257, 65536, 65537)] == [
        "uint8", "uint16", "uint16", "uint32"]
    end = tinyllm_data.DOCUMENT_END
    for ids in (data.train_ids, data.val_ids):  # the ids of each whole document, encoded at once
        whole = [data.tokenizer.encode(text + end) for text in decoded(data, ids).split(end)[:-1]]
        assert ids.tolist() == [i for piece in whole for i in piece]


def test_cli_trains_on_a_folder_and_says_what_it_held_out(tmp_path, cli):
    for i in range(8):
        (tmp_path / "code" / f"m{i}.py").parent.mkdir(exist_ok=True)
        (tmp_path / "code" / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 30)
    (tmp_path / "code" / "notes.md").write_text("not code")
    out = tmp_path / "out"
    result = cli("--data", tmp_path / "code", "--include", "*.py", "--size", "tiny", "--max-context", 16,
                 "--batch-size", 4, "--max-steps", 4, "--val-frequency", 2, "--out-dir", out)
    assert result.returncode == 0, result.stderr
    data = json.loads((out / "summary.json").read_text())["data"]
    assert data["read"] == "8 files read (6,720 characters)"  # 28 characters x 30 lines x 8 files
    held_out = "validation: 1 of 8 files held out whole (841 characters, seed 1337), e.g. "
    assert data["validation"].startswith(held_out)
    log = (out / "tinyllm_training.log").read_text()
    assert "data: 8 files read" in log and "held out whole" in log
    result = cli("--evaluate", "--checkpoint", out / "best.pt", "--data", tmp_path / "code", "--include",
                 "*.py")  # the same files held out
    assert result.returncode == 0 and "on 840 tokens" in result.stdout, result.stderr
    tuned = cli("--data", tmp_path / "code", "--include", "*.py", "--init-from", out / "best.pt",
                "--max-steps", 2, "--max-context", 16, "--batch-size", 4, "--out-dir", tmp_path / "tuned")
    assert tuned.returncode == 0, tuned.stderr  # fine-tuning on the same files finds their tokens
    assert "tokens: from the token cache, " in (tmp_path / "tuned" / "tinyllm_training.log").read_text()
    (tmp_path / "code" / "m0.py").write_text("ß = 'a character the vocabulary lacks'\n" * 30)
    result = cli("--evaluate", "--checkpoint", out / "best.pt", "--data", tmp_path / "code",
                 "--include", "*.py")
    assert result.returncode == 2 and "character(s) that the vocabulary of " in result.stderr


# ---------------------------------------------------------------------------------------------
# tinyllm_inference: streamed text and int8 weights


def test_streaming_ends_before_a_stop_string_and_never_shows_part_of_one():
    tokenizer = CharacterTokenizer().fit(prepare_text(PLAY))
    model = tiny_model(tokenizer.vocab_size)
    full = "".join(tinyllm_inference.stream_text(model, tokenizer, "", 200, seed=5))
    assert full == tinyllm.sample_text(model, tokenizer, "", 200, seed=5)  # the same tokens, in pieces
    stop = full[60:63]
    first = full.index(stop)
    pieces = list(tinyllm_inference.stream_text(model, tokenizer, "", 200, seed=5, stop=[stop, "not there"]))
    assert "".join(pieces) == full[:first] and len(pieces) > 10  # streamed, and nothing past the stop
    assert "".join(tinyllm_inference.stream_text(model, tokenizer, "", 200, seed=5, stop=["#"])) == full
    alone = "".join(tinyllm_inference.stream_text(model, tokenizer, "", 200, seed=5, stop=stop))
    assert alone == full[:first]  # one string alone is one stop string, not a stop at each of its letters
    with pytest.raises(TinyLLMError, match=r"stop strings must be strings, got \[5\]"):
        list(tinyllm_inference.stream_text(model, tokenizer, "", 200, stop=[5]))
    assert tinyllm.stream_text is tinyllm_inference.stream_text  # the name still imports from tinyllm


def test_batched_samples_are_reproducible_and_each_ends_at_its_own_stop_string():
    tokenizer = CharacterTokenizer().fit(prepare_text(PLAY))
    model = tiny_model(tokenizer.vocab_size)
    texts = tinyllm_inference.sample_texts(model, tokenizer, "to", 60, num_samples=4, seed=1)
    assert len(set(texts)) == 4 and all(t.startswith("to") and len(t) == 62 for t in texts)
    assert tinyllm_inference.sample_texts(model, tokenizer, "to", 60, num_samples=4, seed=1) == texts
    assert tinyllm_inference.sample_texts(model, tokenizer, "to", 60, num_samples=4, seed=2) != texts
    stop = texts[1][20:22]  # sample 1 stops there; any other sample at its first own match, if any
    pieces = list(tinyllm_inference.stream_samples(model, tokenizer, "to", 60, num_samples=4, seed=1,
                                                   stop=[stop]))
    for number, text in enumerate(texts):
        streamed = "".join(piece for n, piece in pieces if n == number)
        assert streamed == text[2:].split(stop)[0], number
    assert len(pieces) > 20  # streamed piece by piece, not at the end
    with pytest.raises(TinyLLMError, match="num_samples must be at least 1"):
        next(tinyllm_inference.stream_samples(model, tokenizer, "to", 5, num_samples=0))
    too_many = 10**12  # refused before anything is allocated, where it would have been killed for memory
    with pytest.raises(TinyLLMError, match=r"1,000,000,000,000 samples in one batch need about [\d,.]+ "
                                           r"GiB of memory \([\d.]+ MiB each: .* ask for fewer samples"):
        next(tinyllm_inference.stream_samples(model, tokenizer, "to", 5, num_samples=too_many))


@pytest.fixture
def fake_aoti(monkeypatch, tmp_path):
    """AOTInductor without its C++ build: an exported program runs as torch.export captured it, so a
    test checks the export, the library folder and the choices in a second instead of half a minute.
    Yields the libraries packed so far, each a dict of its programs' (graph module, example inputs)."""
    from torch._inductor import package
    built = []

    def package_aoti(path, programs):
        built.append(programs)
        Path(path).write_text(str(len(built) - 1))

    def load_program(path, name):
        module = built[int(Path(path).read_text())][name][0]

        def boxed_run(inputs):
            assert all(tensor.is_contiguous() for tensor in inputs)  # the library reads them as laid out
            return [module(*inputs)]
        return types.SimpleNamespace(boxed_run=boxed_run)
    monkeypatch.setattr(torch._inductor, "aot_compile", lambda module, inputs, options: (module, inputs))
    monkeypatch.setattr(package, "package_aoti", package_aoti)
    monkeypatch.setattr(tinyllm_inference, "load_program", load_program)
    monkeypatch.setattr(tinyllm_inference, "DECODE_PACKAGES", tmp_path / "decode")
    yield built


def test_a_compiled_one_token_step_on_a_cpu_gives_the_eager_tokens_and_its_library_is_built_once(
        fake_aoti, tmp_path):
    model, idx = tiny_model(), torch.randint(11, (1, 4)).expand(3, -1)  # as batched sampling has it

    def tokens(step=None, **sampling):
        return tinyllm.generate(model, idx, 24, generator=torch.Generator().manual_seed(3), decode_step=step,
                                **sampling)
    for sampling in ({"top_k": 1}, {"temperature": 1.5, "top_p": 0.9}):  # past max_context (16)
        step = tinyllm_inference.compile_decode_step(model, tmp_path)
        assert torch.equal(tokens(step, **sampling), tokens(**sampling))
        assert step.module is not step.eager  # it did not fall back
    assert len(fake_aoti) == 2  # a library for each sampling
    step = tinyllm_inference.compile_decode_step(model, tmp_path)  # as in the next run: loaded, not built
    assert torch.equal(tokens(step, top_k=1), tokens(top_k=1)) and len(fake_aoti) == 2
    assert sorted(p.name[:7] for p in tmp_path.iterdir()) == ["decode-"] * 2  # no partial builds left
    with torch.no_grad():  # other weights, another library, also for a step made before (it held the old)
        model.lm_head.weight.mul_(2)
    assert torch.equal(tokens(step, top_k=1), tokens(top_k=1)) and len(fake_aoti) == 3
    step = tinyllm_inference.compile_decode_step(model, tmp_path)
    assert torch.equal(tokens(step, top_k=1), tokens(top_k=1)) and len(fake_aoti) == 3
    library = step.module.path(3, tinyllm_inference.with_defaults({"top_k": 1}))
    library.write_text("truncat")  # a library that does not load is built again
    step = tinyllm_inference.compile_decode_step(model, tmp_path)
    assert torch.equal(tokens(step, top_k=1), tokens(top_k=1)) and len(fake_aoti) == 4
    assert step.module is not step.eager and library.read_text() == "3"


def test_each_batch_size_has_a_library_of_its_own(fake_aoti, tmp_path):
    # A library is built for one batch size; loading one built for another aborted the process.
    model = tiny_model()
    step = tinyllm_inference.compile_decode_step(model, tmp_path)
    for batch in (2, 3, 2):
        idx = torch.randint(11, (batch, 4))
        assert torch.equal(tinyllm.generate(model, idx, 5, top_k=1, decode_step=step),
                           tinyllm.generate(model, idx, 5, top_k=1))
    assert len(fake_aoti) == 2 and len(list(tmp_path.glob("decode-*.pt2"))) == 2


def test_a_library_holds_the_one_token_step_and_the_refill_and_a_prompt_runs_eager(fake_aoti, tmp_path):
    model, idx = tiny_model(), torch.randint(11, (1, 5))  # max_context 16: a jump refills 8 tokens
    step, sampling = tinyllm_inference.compile_decode_step(model, tmp_path), {"top_k": 1}
    programs = step.module.programs(1, tinyllm_inference.with_defaults(sampling))
    runs = collections.Counter()
    for length, program in programs.items():  # count each program's runs
        run = program.boxed_run
        program.boxed_run = lambda inputs, run=run, length=length: runs.update([length]) or run(inputs)
    assert torch.equal(tinyllm.generate(model, idx, 30, decode_step=step, **sampling),
                       tinyllm.generate(model, idx, 30, **sampling))
    assert len(fake_aoti) == 1 and set(fake_aoti[0]) == {"tokens1", "tokens8"}
    # The prompt's 5 tokens eager; 11 steps to position 15, a refill, 8 steps, a refill, 8 steps.
    assert runs == {1: 27, 8: 2}


@CUDA
def test_a_compiled_one_token_step_on_cuda_replays_cuda_graphs_and_gives_the_eager_tokens(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # a Trainer on CUDA turns it on
    torch._dynamo.reset()
    model = tiny_model().cuda()
    step = tinyllm_inference.compile_decode_step(model)
    idx = torch.randint(11, (2, 4), device="cuda")
    skips = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    for _ in range(2):  # the second run's new cache has the graph recorded again, not skipped
        assert torch.equal(tinyllm.generate(model, idx, 40, top_k=1, decode_step=step),
                           tinyllm.generate(model, idx, 40, top_k=1))
    assert step.module is not step.eager  # it did not fall back
    assert torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] == skips  # written in place


def test_the_one_token_step_is_compiled_only_where_the_time_it_saves_exceeds_its_cost(
        tmp_path, caplog, fake_aoti):
    model, record = tiny_model(), tmp_path / "measurements.json"
    timings = {"eager": 1e-3, "compiled": 2e-4, "compile seconds": 10.0, "warm compile seconds": 2.0,
               "library load seconds": 0.1}
    tinyllm_inference.record_decode_timings(model, 1, timings, record)
    choose = functools.partial(tinyllm_inference.choose_decode_step, model, record_path=record, top_k=None)
    caplog.set_level("INFO", logger="tinyllm")
    assert isinstance(choose(tokens=12000), functools.partial)  # eager: saves 9.6 s, building costs 10 s
    assert "one-token step eager: 12,000 tokens at 1.00 ms eager, compiled 0.20 ms (measured), compiling " \
        "10.0 s" in caplog.text
    assert isinstance(choose(tokens=13000), tinyllm_hooks.EagerFallback)  # saves 10.4 s; builds the library
    assert tinyllm_inference.recorded_decode_timings(model, 1, record)["compile seconds"] < 10.0
    tinyllm_inference.record_decode_timings(model, 1, timings, record)  # the fake library's are slow
    assert isinstance(choose(tokens=2000), tinyllm_hooks.EagerFallback)  # now only loading it, 0.1 s
    assert "compiled 0.20 ms (measured), loading it 0.1 s" in caplog.text and len(fake_aoti) == 1
    assert isinstance(choose(tokens=100), functools.partial)  # saves 0.08 s
    assert isinstance(choose(tokens=10, compile=True), tinyllm_hooks.EagerFallback)  # as asked
    assert isinstance(choose(tokens=10**9, compile=False), functools.partial)
    assert isinstance(choose(tokens=10**9, batch_size=2), tinyllm_hooks.EagerFallback)
    assert "(timed now)" in caplog.text and "(a guess)" in caplog.text  # batch 2 was never measured
    timings = tinyllm_inference.recorded_decode_timings(model, 2, record)
    assert set(timings) == {"compile seconds", "compiled"}  # the step it compiled was timed and kept


@pytest.fixture
def no_compiler(monkeypatch):
    """torch.compile as it fails where there is no C++ compiler: when the compiled code first runs."""
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")
        return compiled

    def broken_build(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(torch._inductor, "aot_compile", broken_build)


def test_a_one_token_step_that_fails_to_compile_falls_back_to_eager_with_a_warning(
        no_compiler, caplog, tmp_path, monkeypatch):
    monkeypatch.setattr(tinyllm_inference, "DECODE_PACKAGES", tmp_path)
    model = tiny_model()
    step = tinyllm_inference.choose_decode_step(model, tokens=10, compile=True)
    idx = torch.randint(11, (1, 3))
    assert torch.equal(tinyllm.generate(model, idx, 30, top_k=1, decode_step=step),
                       tinyllm.generate(model, idx, 30, top_k=1))
    assert "torch.compile failed (no C++ compiler found); running without it" in caplog.text


def test_int8_weights_are_a_quarter_of_the_size_and_score_like_float(tmp_path):
    model = tiny_model(vocab_size=11, n_layer=2, n_head=2, n_embd=64)
    ids = torch.randint(11, (400,))
    float_loss = tinyllm.evaluate_full(model, ids, batch_size=8)
    config = TrainingConfig(model_size="tiny", n_embd=64, max_context=16)
    tokenizer = CharacterTokenizer("abcdefghijk")
    tinyllm.save_checkpoint(tmp_path / "float.pt", model, None, config, tokenizer)
    quantized = tinyllm_inference.quantize_int8(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    tinyllm.save_checkpoint(tmp_path / "int8.pt", quantized, None, config, tokenizer)
    loaded = tinyllm.load_checkpoint(tmp_path / "int8.pt").model
    assert loaded.quantization == "int8" and loaded.lm_head.weight.dtype == torch.int8
    assert (tmp_path / "int8.pt").stat().st_size < 0.4 * (tmp_path / "float.pt").stat().st_size
    probe = torch.randint(11, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(probe)[0], quantized(probe)[0])
    assert abs(tinyllm.evaluate_full(loaded, ids, batch_size=8) - float_loss) < 0.01
    assert tinyllm.generate(loaded, probe, 20).shape == (2, 36)  # the KV cache works on int8 too
    config_with_start = tiny_config(tmp_path, init_from=str(tmp_path / "int8.pt"))
    with pytest.raises(TinyLLMError, match="int8-quantized, which cannot be trained"):
        tinyllm.Trainer(config_with_start, PLAY, quiet=True)


# ---------------------------------------------------------------------------------------------
# tinyllm_hooks: trainer plug-ins


def test_a_failing_compile_falls_back_to_plain_pytorch(tmp_path, no_compiler):
    settings = tinyllm_hooks.MeasuredSettings(record_path=tmp_path / "measurements.json")
    summary = tinyllm.Trainer(tiny_config(tmp_path, compile=True, max_steps=3), PLAY, quiet=True,
                              callbacks=[settings]).train()
    assert summary["steps"] == 3
    log = (tmp_path / "out" / "tinyllm_training.log").read_text()
    assert "torch.compile failed (no C++ compiler found); running without it" in log


@pytest.fixture
def measured(tmp_path, caplog):
    """On-start of MeasuredSettings with fake timings {(dtype, compiled): seconds per step}: the
    trainer it set up, and the settings it timed."""
    threads = torch.get_num_threads()

    def measure(seconds, **fields):
        calls = []

        def timer(trainer, setting, module, **limits):
            calls.append(str(setting))
            step = seconds[setting.dtype, setting.compiled]
            return (25.0 if setting.compiled else step), step
        config = tiny_config(tmp_path, out_dir=None, compile=None, dtype="auto", **fields)
        trainer = tinyllm.Trainer(config, PLAY, quiet=True)
        trainer.clock = tinyllm.RunClock(config.time_budget)
        settings = tinyllm_hooks.MeasuredSettings(timer=timer, record_path=tmp_path / "measurements.json")
        caplog.clear()
        with caplog.at_level("INFO", logger="tinyllm"):
            settings.on_start(trainer)
        return trainer, calls
    yield measure
    torch.set_num_threads(threads)


def test_a_run_that_compiling_asked_for_took_past_its_budget_says_so(caplog):
    settings = tinyllm_hooks.MeasuredSettings()
    for compile, elapsed, warned in ((True, 29.3, True), (True, 4.9, False), (None, 29.3, False)):
        caplog.clear()
        config = TrainingConfig(time_budget=5, compile=compile)
        settings.on_end(types.SimpleNamespace(config=config), {"elapsed_seconds": elapsed})
        assert ("the run took 29.3 s, past its time budget of 5 s; with compiling asked for" in caplog.text) \
            is warned


def test_two_cpus_of_one_name_with_other_instruction_sets_are_told_apart(tmp_path):
    # Timings and compiled libraries are kept by chip: one built with AVX-512 would crash an AVX2 chip.
    for name, text in (("avx2", "flags\t\t: fpu avx2\n"), ("avx512", "flags\t\t: fpu avx2 avx512f\n")):
        (tmp_path / name).write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\n{text}processor\t: 1\n"
                                     f"model name\t: Other\nflags\t\t: fpu\n")
    avx2, avx512 = (tinyllm_hooks.cpu_name(tmp_path / name) for name in ("avx2", "avx512"))
    assert avx2.startswith("AMD EPYC (instruction sets ") and avx512.startswith("AMD EPYC (")
    assert avx2 != avx512
    assert tinyllm_hooks.cpu_name(tmp_path / "avx2") == avx2  # the same chip, the same name
    (tmp_path / "arm").write_text("processor\t: 0\nFeatures\t: fp asimd\n")
    assert tinyllm_hooks.cpu_name(tmp_path / "arm").endswith(")")
    assert tinyllm_hooks.cpu_name(tmp_path / "missing")  # not Linux: the platform's name, without a digest


def test_auto_trains_in_the_fastest_measured_dtype_and_compiles_only_where_it_pays(measured, caplog):
    seconds = {("float32", False): 0.20, ("bfloat16", False): 0.26, ("float32", True): 0.12,
               ("bfloat16", True): 0.30}
    trainer, calls = measured(seconds, time_budget=200.0)  # a guessed 30% of 200 s beats 30 s
    assert trainer.dtype == torch.float32 and trainer.autocast is contextlib.nullcontext
    assert isinstance(trainer.train_model, tinyllm_hooks.EagerFallback)
    assert any("compiled" in call for call in calls) and "torch.compile on: 0.1200 s per step" in caplog.text
    assert "training in float32 eager" in caplog.text
    trainer, calls = measured(seconds, time_budget=200.0)  # 40% faster on record: compiled, not timed again
    assert isinstance(trainer.train_model, tinyllm_hooks.EagerFallback) and calls == []
    assert "torch.compile on: measured before at 0.1200 s per step against 0.2000 eager" in caplog.text
    # Measured now: 40% of 10 s is less than a warm compile, guessed at a fifth of the cold 25 s.
    trainer, calls = measured(seconds, time_budget=10.0)
    assert trainer.train_model is trainer.eager_model and calls == []  # the record answered
    assert "it would save 40% (measured) of the 10 s left, less than its cost of 5 s" in caplog.text
    trainer, calls = measured({**seconds, ("bfloat16", False): 0.10, ("bfloat16", True): 0.15},
                              time_budget=200.0, batch_size=4)  # another batch: measured afresh
    assert trainer.dtype == torch.bfloat16 and trainer.train_model is trainer.eager_model
    assert "torch.compile off: 0.1500 s per step against 0.1000 eager" in caplog.text
    trainer, calls = measured(seconds, time_budget=200.0, dropout=0.1)  # dropout: measured afresh
    assert any(call.startswith("float32 eager") for call in calls)
    trainer, calls = measured(seconds, time_budget=200.0, optimizer="adamw")  # a cheaper step: afresh
    assert any(call.startswith("float32 eager") for call in calls)


def test_a_compiled_step_once_measured_slower_is_timed_again_in_a_long_enough_run(measured, caplog):
    slower = {("float32", False): 0.20, ("bfloat16", False): 0.26, ("float32", True): 0.30,
              ("bfloat16", True): 0.40}
    trainer, calls = measured(slower, time_budget=200.0)
    assert trainer.train_model is trainer.eager_model  # measured: compiling loses
    faster = {**slower, ("float32", True): 0.12}  # that timing met a slow moment of the machine
    trainer, calls = measured(faster, time_budget=90.0)  # twenty re-checks (warm: 5 s each) cost more
    assert trainer.train_model is trainer.eager_model and calls == []
    trainer, calls = measured(faster, time_budget=200.0)
    assert isinstance(trainer.train_model, tinyllm_hooks.EagerFallback)
    assert "measured slower before (0.3000 s per step against 0.2000 eager); timing it again" in caplog.text


def test_a_short_run_is_not_measured_and_a_broken_record_is_ignored(measured, tmp_path, caplog):
    (tmp_path / "measurements.json").write_text('{"some cpu": {"float32": "fast"}}')
    trainer, calls = measured({("float32", False): 0.01}, max_steps=100)  # about 1 s of training
    assert trainer.train_model is trainer.eager_model and trainer.dtype == torch.float32
    assert len(calls) == 2 and "the run is too short to win back the time" in caplog.text
    assert tinyllm_hooks.compile_pays(relative_gain=0.5, remaining_seconds=100, compile_seconds=40)
    (tmp_path / "measurements.json").unlink()
    (tmp_path / "measurements.json").mkdir()  # not even a file: neither read nor written, and no error
    tinyllm_hooks.write_measurements(tmp_path / "measurements.json", "some cpu", {"float32": 0.1})
    assert tinyllm_hooks.read_measurements(tmp_path / "measurements.json") == {}
    assert not tinyllm_hooks.compile_pays(relative_gain=0.5, remaining_seconds=60, compile_seconds=40)
    for value in ("Infinity", "NaN", "-1", "0", "true"):  # JSON that Python reads as a number, each unusable
        (tmp_path / f"{value}.json").write_text(f'{{"some cpu": {{"float32": 0.1, "peak": {value}}}}}')
        assert tinyllm_hooks.read_measurements(tmp_path / f"{value}.json") == {}


def test_flops_per_token_counts_matrix_weights_six_times():
    model = tiny_model(vocab_size=11, max_context=16, n_layer=2, n_head=2, n_embd=16)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2) - 11 * 16
    assert tinyllm_hooks.flops_per_token(model) == 6 * matrices + 12 * 2 * 16 * 16


def test_mfu_is_logged_at_each_validation_and_summarised(tmp_path):
    config = tiny_config(tmp_path, max_steps=20)
    meter = tinyllm_hooks.ModelFlopsUtilization()
    summary = tinyllm.Trainer(config, PLAY, quiet=True, callbacks=[meter]).train()
    assert 0 < summary["mfu"] < 1 and summary["peak_tflops"] > 0
    log = (tmp_path / "out" / "tinyllm_training.log").read_text()
    assert log.count("tokens/s, MFU ") == 3
    assert "TFLOP/s (a matrix multiply in float32, the best measured on this machine;" in log


def test_the_peak_is_the_best_measured_on_this_chip_so_far(tmp_path, monkeypatch):
    monkeypatch.setattr(tinyllm_hooks, "MEASUREMENTS", tmp_path / "measurements.json")
    measured = iter([2e12, 1e12, 3e12])  # the second start-up is slowed by other work
    monkeypatch.setattr(tinyllm_hooks, "measure_peak_flops", lambda device, dtype: next(measured))
    best = [tinyllm_hooks.best_peak_flops(torch.device("cpu"), torch.float32) for _ in range(3)]
    assert best == [2e12, 2e12, 3e12]
    record = tinyllm_hooks.read_measurements(tmp_path / "measurements.json")
    assert [timings["float32"] for key, timings in record.items() if key.endswith("| peak")] == [3e12]
    (tmp_path / "measurements.json").write_text("[" * 100_000 + "]" * 100_000)  # only a cache: no record
    assert tinyllm_hooks.read_measurements(tmp_path / "measurements.json") == {}


def test_loss_plot_is_drawn_from_the_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    header = "step,epoch,train_loss,val_loss,learning_rate,tokens_per_second,elapsed_seconds\n"
    (tmp_path / "metrics.csv").write_text(header + "10,0.5,3.1,3.0,0.001,100,1\n20,1,2.5,2.6,0.001,100,2\n")
    path = tinyllm_hooks.plot_losses(tmp_path)
    assert path == tmp_path / "loss.png" and path.read_bytes().startswith(b"\x89PNG")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TinyLLMError, match="does not exist"):
        tinyllm_hooks.plot_losses(tmp_path / "empty")
    (tmp_path / "metrics.csv").write_text(header + "1" * 200_000 + ",0.5,3.1,3.0,0.001,100,1\n")
    with pytest.raises(TinyLLMError, match=r"metrics.csv is malformed \(field larger than field limit"):
        tinyllm_hooks.plot_losses(tmp_path)
    renamed = header.replace("train_loss", "loss")
    (tmp_path / "metrics.csv").write_text(renamed + "10,0.5,3.1,3.0,0.001,100,1\n")
    with pytest.raises(TinyLLMError, match=r"metrics.csv is malformed \(it has no train_loss column\)$"):
        tinyllm_hooks.plot_losses(tmp_path)
    (tmp_path / "metrics.csv").unlink()
    (tmp_path / "metrics.csv").mkdir()
    with pytest.raises(TinyLLMError, match=r"cannot read .*metrics.csv \(Is a directory\)"):
        tinyllm_hooks.plot_losses(tmp_path)


def test_a_run_keeps_every_steps_loss_for_the_plot_and_a_resumed_run_drops_the_steps_it_retakes(tmp_path):
    matplotlib = importlib.util.find_spec("matplotlib")
    config = tiny_config(tmp_path, max_steps=60, val_frequency=25, checkpoint_frequency=20)
    tinyllm.Trainer(config, PLAY, quiet=True, callbacks=[tinyllm_hooks.LossPlot(), StopAt(45)]).train()
    steps = list(csv.DictReader(open(tmp_path / "out" / "steps.csv")))
    assert [int(row["step"]) for row in steps] == list(range(1, 46))  # 45 written, at the end too
    where = TrainingConfig(out_dir=config.out_dir, device="cpu", compile=False)
    summary = tinyllm.Trainer(where, PLAY, quiet=True, resume=True,
                              callbacks=[tinyllm_hooks.LossPlot()]).train()
    steps = list(csv.DictReader(open(tmp_path / "out" / "steps.csv")))
    assert summary["steps"] == 60 and [int(row["step"]) for row in steps] == list(range(1, 61))
    assert all(math.isfinite(float(row["train_loss"])) and float(row["learning_rate"]) > 0 for row in steps)
    if matplotlib:
        assert (tmp_path / "out" / "loss.png").read_bytes().startswith(b"\x89PNG")
        title = tinyllm_hooks.plot_title(tmp_path / "out", summary)
        assert title.startswith("tiny: 2 layers x 2 heads x 32 wide, context 32\n") and "60 steps" in title


def test_a_hand_edited_steps_csv_is_kept_aside_when_the_run_resumes(tmp_path, caplog):
    config = tiny_config(tmp_path, max_steps=30, checkpoint_frequency=10)
    tinyllm.Trainer(config, PLAY, quiet=True, callbacks=[tinyllm_hooks.LossPlot(), StopAt(15)]).train()
    out, where = tmp_path / "out", TrainingConfig(out_dir=config.out_dir, device="cpu", compile=False)
    kept = []
    for stop_at, steps in ((22, range(16, 23)), (None, range(23, 31))):  # stopped at 15, then at 22
        edit = (f"\n{steps[0] - 1},", "\nabc,") if stop_at else ("step,train_loss,", "step,loss,")
        kept.append((out / "steps.csv").read_text().replace(*edit))  # a row hand-edited, then the header
        (out / "steps.csv").write_text(kept[-1])
        callbacks = [tinyllm_hooks.LossPlot()] + ([StopAt(stop_at)] if stop_at else [])
        tinyllm.Trainer(where, PLAY, quiet=True, resume=True, callbacks=callbacks).train()
        assert [int(row["step"]) for row in csv.DictReader(open(out / "steps.csv"))] == list(steps)
    # Each kept whole, the second beside the first.
    assert [(out / name).read_text() for name in ("steps.csv.malformed", "steps.csv.malformed.1")] == kept
    assert "steps.csv is malformed (not rows of step, train_loss and learning_rate), so it is kept as " \
           "steps.csv.malformed, and a new steps.csv starts after step 15" in caplog.text


def test_without_matplotlib_a_run_says_how_to_get_the_plot_and_finishes(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(TinyLLMError, match=r"pip install 'tinyllm\[plot\]'"):
        tinyllm_hooks.plot_losses(tmp_path)
    summary = tinyllm.Trainer(tiny_config(tmp_path, max_steps=10), PLAY, quiet=True,
                              callbacks=[tinyllm_hooks.LossPlot()]).train()
    assert summary["steps"] == 10 and not (tmp_path / "out" / "loss.png").exists()
    assert "tinyllm[plot]" in caplog.text


FAKE_PYTHON = """#!/bin/sh
echo "$*" | tr '\\n' ' ' >> "$CALLS" && echo >> "$CALLS"  # a call a line
case "$*" in *summary.json*) cat > /dev/null; echo "full_val_loss 1.4625, best at step 500";; esac
"""


@pytest.mark.skipif(shutil.which("bash") is None, reason="the GPU check is a bash script")
def test_the_gpu_check_runs_each_part_and_a_variant_without_the_suite(tmp_path):
    """Its steps in order, through a stand-in for python that logs its arguments (no GPU needed)."""
    (tmp_path / "python").write_text(FAKE_PYTHON)
    (tmp_path / "python").chmod(0o755)
    (tmp_path / "text.txt").write_text(PLAY)

    def check(**env):
        calls = tmp_path / f"calls{len(env)}.txt"
        env = {**os.environ, "PYTHON": str(tmp_path / "python"), "CALLS": str(calls),
               "TINYLLM_DATA": str(tmp_path / "text.txt"), "GPU_CHECK_OUT": str(tmp_path / "out"), **env}
        result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], capture_output=True,
                                text=True, timeout=60, env=env)
        assert result.returncode == 0, result.stderr
        return result.stdout, [line.split()[0] for line in calls.read_text().splitlines()], calls.read_text()
    out, programs, calls = check()  # the device, pytest's check, the suite, training, its summary, generation
    assert programs == ["-c", "-c", "-m", "train_shakespeare.py", "-", "train_shakespeare.py"]
    assert f"--data {tmp_path / 'text.txt'} --size medium --time-budget 180" in calls
    assert "--generate --benchmark" in calls
    assert "full_val_loss 1.4625, best at step 500" in out
    out, programs, calls = check(GPU_CHECK_SUITE="0", GPU_CHECK_TRAIN_FLAGS="--dropout 0.3")
    assert "skipped: GPU_CHECK_SUITE=0" in out and "-m" not in programs
    assert "--quiet --dropout 0.3 \n" in calls  # the variant's flags, last on the training command
    assert "== 180-s run: --size medium --dropout 0.3 on raw Tiny Shakespeare" in out


def test_a_budgeted_run_on_a_gpu_gets_a_batch_and_context_that_fill_it():
    h200 = tinyllm_hooks.DeviceDescription("NVIDIA H200", 139.8)
    small = tinyllm_hooks.DeviceDescription("GT", 4)
    both = {"batch_size", "max_context"}
    assert tinyllm_hooks.fill_the_device(h200, both) == (
        {"batch_size": 256, "max_context": 256},
        "NVIDIA H200 (140 GiB): batch_size 256 and max_context 256 chosen for a budgeted run, to keep the "
        "GPU busy")
    assert tinyllm_hooks.fill_the_device(tinyllm_hooks.DeviceDescription("T4", 15.6), both)[0] == {
        "batch_size": 32, "max_context": 256}
    assert tinyllm_hooks.fill_the_device(h200, {"max_context"})[0] == {"max_context": 256}  # the user's batch
    assert tinyllm_hooks.fill_the_device(small, both) == ({}, "GT (4 GiB): batch and context as set")


def test_a_run_that_memorised_its_text_ends_with_a_note_of_what_helps(caplog):
    caplog.set_level("INFO", logger="tinyllm")

    def run(best, last, dropout, init_from=None):  # a run's end, as the trainer leaves it
        state = tinyllm.RunState(step=615, best_val_loss=best, last_val_loss=last)
        config = TrainingConfig(dropout=dropout, init_from=init_from, out_dir=None)
        trainer = types.SimpleNamespace(state=state, config=config, best_step=300, steps_per_epoch=43)
        caplog.clear()
        tinyllm_hooks.MemorisingNote().on_end(trainer, {})
        return caplog.text
    assert "the validation loss was lowest at step 300 (epoch 7.0: 1.5401) and 2.0436 at the end: the " \
        "model memorised the text after that step, whose weights are scored; with `dropout` 0.2, or a " \
        "smaller model, it would learn more" in run(1.5401, 2.0436, 0.0)  # the README's 100,000 characters
    assert "with more `dropout` than 0.2, or a smaller model" in run(1.5401, 2.0436, 0.2)
    assert "scored; fewer steps (`max_steps`) would end the run there sooner" in run(1.57, 1.9, 0.0, "a.pt")
    assert run(1.5401, 1.5401, 0.0) == run(1.5401, 1.6, 0.0) == ""  # ended at its best, or near it
    assert any(isinstance(c, tinyllm_hooks.MemorisingNote) for c in tinyllm_hooks.standard_callbacks())


def test_progress_lines_of_a_run_that_only_its_time_budget_ends(tmp_path, caplog):
    caplog.set_level("INFO", logger="tinyllm")
    config = tiny_config(tmp_path, time_budget=1.5, val_frequency=10**6)
    tinyllm.Trainer(config, PLAY, quiet=True, callbacks=[tinyllm_hooks.ProgressLog(every=0.3)]).train()
    lines = re.findall(r"step \d+ \((\d+)%\), epoch [\d.]+: train loss [\d.]+, [^;]+; \d+ s elapsed, "
                       r"about \d+ s left", caplog.text)
    assert len(lines) >= 4 and int(lines[-1]) >= 50, caplog.text  # no "of N steps": the budget ends it


# ---------------------------------------------------------------------------------------------
# The command line, end to end


def cli_args(args):
    """On the CPU, without compiling (each test's shapes would compile anew), and where a new run trains
    from flags alone, with samples of 40 tokens instead of 300 (quicker)."""
    new_run = not {"--generate", "--evaluate", "--plot", "--quantize", "--resume", "--config",
                   "--sample-length"} & set(map(str, args))
    return [*map(str, args), *([] if "--compile" in args or "--generate" in args else ["--no-compile"]),
            *([] if "--device" in args else ["--device", "cpu"]),
            *(["--sample-length", "40"] if new_run else [])]


@pytest.fixture
def cli(capsys):
    """Run the command line in this process, saving an interpreter's start-up; returns a CompletedProcess."""
    def run(*args):
        try:
            code = train_shakespeare.main(cli_args(args))
        except SystemExit as e:  # argparse's way out
            code = e.code
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short real training run through the command line (in this process, its output not a
    terminal, as under nohup or in CI), shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "play.txt").write_text(PLAY, encoding="utf-8")
    args = cli_args(["--data", tmp / "play.txt", "--out-dir", tmp / "out", "--size", "tiny",
                     "--max-steps", 40, "--val-frequency", 10, "--sample-frequency", 20,
                     "--max-context", 32, "--batch-size", 8, "--learning-rate", 0.01, "--lowercase",
                     "--normalize-whitespace"])
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = train_shakespeare.main(args)
    return tmp, subprocess.CompletedProcess(args, code, stdout.getvalue(), stderr.getvalue())


def test_cli_training_writes_every_file(trained_run):
    tmp, result = trained_run
    assert result.returncode == 0, result.stderr
    out = tmp / "out"
    expected = {"best.pt", "last.pt", "tokenizer.json", "config.json", "tinyllm_training.log",
                "metrics.csv", "samples.txt", "summary.json"}
    assert expected <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    for key in ("best_val_loss", "best_step", "final_val_loss", "full_val_loss", "steps", "epochs_completed",
                "tokens_seen", "tokens_per_second", "elapsed_seconds", "parameters", "device",
                "dtype", "stopped_because"):
        assert key in summary
    assert summary["steps"] == 40 and summary["tokens_seen"] > 0 and summary["device"] == "cpu"
    vocab_size = len(set(prepare_text(PLAY)))
    assert 0 < summary["full_val_loss"] < 0.5 * math.log(vocab_size)  # well below uniform guessing
    assert summary["best_val_loss"] <= summary["final_val_loss"]
    config = TrainingConfig.from_json(out / "config.json")
    assert config.max_context == 32 and config.sample_length == 40  # --sample-length, from cli_args
    assert len(summary["sample"]) == 40  # an empty prompt, then 40 characters
    assert tinyllm.load_tokenizer(out / "tokenizer.json").vocab_size == len(set(prepare_text(PLAY)))
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    best_row = min(rows, key=lambda row: float(row["val_loss"]))
    assert len(rows) == 4 and int(best_row["step"]) == summary["best_step"]  # the weights scored
    assert "=== step 20 ===" in (out / "samples.txt").read_text()
    assert "step 40" in (out / "tinyllm_training.log").read_text()
    # No terminal, so no progress bar: progress lines at 1%, 10%, 25%, 50%, 75% and 90% of the run.
    progress = re.findall(r"step (\d+) of 40 \((\d+)%\), epoch [\d.]+ of 10: train loss [\d.]+, "
                          r"([\d,]+ tokens/s|no tokens/s yet); \d+ s elapsed(?:, about \d+ s left)?",
                          result.stdout)
    assert [int(step) for step, _, _ in progress] == [1, 4, 10, 20, 30, 36], result.stdout
    assert f"text: {len(PLAY):,} characters, lowercased and whitespace tidied: " in result.stdout
    assert tinyllm.load_checkpoint(out / "best.pt").step <= 40
    if importlib.util.find_spec("matplotlib"):
        assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_generate_refuses_a_prompt_with_unseen_characters(trained_run, cli):
    tmp, _ = trained_run
    result = cli("--generate", "--out-dir", tmp / "out", "--prompt", "ROMEO: ¿sé?")
    assert result.returncode == 2 and result.stdout == ""
    assert "'¿é'" in result.stderr and "never saw" in result.stderr and len(result.stderr.splitlines()) == 1


def test_cli_generate_prints_a_continuation(trained_run, cli):
    tmp, _ = trained_run
    result = cli("--generate", "--out-dir", tmp / "out", "--prompt", "JULIET:", "--num-chars", 50,
                 "--seed", 1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("juliet:") and len(result.stdout.rstrip("\n")) > len("juliet:")


def test_cli_generate_samples_reproducibly_with_top_k_top_p_and_a_stop_string(trained_run, cli):
    tmp, _ = trained_run
    common = ["--generate", "--out-dir", tmp / "out", "--prompt", "ROMEO:", "--num-chars", 80, "--seed", 3]
    first = cli(*common, "--top-k", 5, "--top-p", 0.9, "--temperature", 1.2)
    assert first.returncode == 0, first.stderr
    assert first.stdout == cli(*common, "--top-k", 5, "--top-p", 0.9, "--temperature", 1.2).stdout
    greedy = cli(*common, "--top-k", 1).stdout
    stop = greedy[len("romeo:") + 5:len("romeo:") + 7]
    stopped = cli(*common, "--top-k", 1, "--stop", stop).stdout
    assert stopped == greedy[:greedy.index(stop, len("romeo:"))] + "\n"


def test_cli_draws_several_samples_in_one_batch_each_under_its_own_header(trained_run, cli):
    common = ["--generate", "--out-dir", trained_run[0] / "out", "--prompt", "ROMEO:", "--num-chars", 40,
              "--seed", 3, "--num-samples", 3]
    result = cli(*common)
    assert result.returncode == 0, result.stderr
    samples = re.split(r"--- sample \d of 3 ---\n", result.stdout)[1:]
    assert len(samples) == 3 and len(set(samples)) == 3 and all(s.startswith("romeo:") for s in samples)
    assert cli(*common).stdout == result.stdout  # the same seed, the same samples
    assert "one-token step eager: 40 tokens" in result.stderr  # the choice, on stderr
    result = cli(*common[:-1], 0)
    assert result.returncode == 2 and result.stderr == "error: --num-samples must be positive, got 0\n"


def test_cli_threads_sets_the_thread_count_as_omp_num_threads_does(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # put back (unset) after the test
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # this process keeps its threads
    cli("--threads", 1, "--plot", "--out-dir", tmp_path)
    assert calls == [1] and os.environ["OMP_NUM_THREADS"] == "1"  # which MeasuredSettings leaves alone
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # two cores
    result = cli("--threads", 9999, "--plot", "--out-dir", tmp_path)  # would stall the machine for minutes
    assert calls == [1, 2] and os.environ["OMP_NUM_THREADS"] == "2"
    assert "warning: --threads 9999 is more than the 2 CPU cores this process may use" in result.stderr


def test_python_m_tinyllm_is_the_command_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tinyllm", "--threads", "0"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("tinyllm", run_name="__main__")
    assert exit.value.code == 2 and capsys.readouterr().err == "error: --threads must be at least 1, got 0\n"
    real_find_spec = importlib.util.find_spec  # and without train_shakespeare.py beside it:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "train_shakespeare"
                        else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exit:
        runpy.run_module("tinyllm", run_name="__main__")
    assert exit.value.code == 2 and "put that file beside tinyllm.py" in capsys.readouterr().err


def test_cli_generation_benchmark_times_a_compiled_step(trained_run, cli, fake_aoti):
    result = cli("--generate", "--benchmark", "--out-dir", trained_run[0] / "out", "--num-chars", 10,
                 "--num-samples", 2)
    assert result.returncode == 0, result.stderr
    assert "batch 2, 10 tokens each" in result.stdout and "cached, compiled" in result.stdout
    assert "compiled is" in result.stdout and "the compiled step was ready after" in result.stdout
    assert len(fake_aoti) == 1  # built once, then loaded twice, and the load's time recorded for `auto`
    model = tinyllm.load_checkpoint(trained_run[0] / "out" / "best.pt").model
    assert {"eager", "compiled", "compile seconds", "library load seconds"} <= set(
        tinyllm_inference.recorded_decode_timings(model, 2))


def test_ctrl_c_while_generating_ends_quietly_with_exit_code_130(trained_run):
    tmp, _ = trained_run
    process = start_cli("--generate", "--out-dir", tmp / "out", "--num-chars", 10**6, "--no-compile")
    first_line = process.stdout.readline()  # generation has started
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and first_line
    assert stderr.strip() == "interrupted" and "Traceback" not in stderr


def test_cli_quantizes_evaluates_and_generates_with_int8(trained_run, cli):
    tmp, _ = trained_run
    result = cli("--quantize", "int8", "--checkpoint", tmp / "out" / "best.pt")
    assert result.returncode == 0 and "best.int8.pt" in result.stdout, result.stderr
    losses = {}
    for name in ("best.pt", "best.int8.pt"):
        result = cli("--evaluate", "--checkpoint", tmp / "out" / name, "--data", tmp / "play.txt")
        assert result.returncode == 0, result.stderr
        losses[name] = float(result.stdout.split("full validation loss ")[1].split()[0])
    assert abs(losses["best.int8.pt"] - losses["best.pt"]) < 0.02
    result = cli("--generate", "--checkpoint", tmp / "out" / "best.pt", "--quantize", "int8",
                 "--benchmark", "--num-chars", 30, "--no-compile")
    assert result.returncode == 0 and "int8" in result.stdout and "cached is" in result.stdout


def test_cli_fine_tunes_a_checkpoint_on_new_text(trained_run, cli):
    tmp, _ = trained_run
    (tmp / "new.txt").write_text("QUEEN: 1, 2, 3 (and 4)!\n" * 200, encoding="utf-8")
    result = cli("--init-from", tmp / "out" / "best.pt", "--data", tmp / "new.txt", "--out-dir",
                 tmp / "tuned", "--max-steps", 10, "--quiet")
    assert result.returncode == 0, result.stderr
    chars = tinyllm.load_tokenizer(tmp / "tuned" / "tokenizer.json").chars
    assert chars[:len(set(prepare_text(PLAY)))] == sorted(set(prepare_text(PLAY))) and "4" in chars


def test_cli_plots_an_existing_run(trained_run, cli):
    pytest.importorskip("matplotlib")
    tmp, _ = trained_run
    (tmp / "out" / "loss.png").unlink()  # drawn at the end of training; --plot draws it again
    result = cli("--plot", "--out-dir", tmp / "out")
    assert result.returncode == 0 and (tmp / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_to_overwrite_a_run(trained_run, cli):
    tmp, _ = trained_run
    before = {p.name: p.read_bytes() for p in (tmp / "out").iterdir()}
    result = cli("--data", tmp / "play.txt", "--out-dir", tmp / "out", "--size", "tiny")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp / "out").iterdir()} == before


def test_cli_with_a_null_out_dir_trains_in_memory_and_says_so(tmp_path, cli, monkeypatch):
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    (tmp_path / "c.json").write_text('{"out_dir": null}')
    monkeypatch.chdir(tmp_path)
    result = cli("--data", "play.txt", "--size", "tiny", "--max-context", 32, "--max-steps", 3,
                 "--config", "c.json")
    assert result.returncode == 0, result.stderr
    assert "; no files written (out_dir is null)\n" in result.stdout and "None" not in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.json", "play.txt"]


def test_cli_resume_accepts_the_runs_own_settings_and_names_real_changes(tmp_path, cli):
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    (tmp_path / "c.json").write_text('{"val_frequency": 10, "grad_clip": 1.0}')
    run = ["--data", tmp_path / "play.txt", "--out-dir", tmp_path / "out", "--size", "tiny",
           "--max-context", 32, "--max-steps", 40, "--seed", 7, "--config", tmp_path / "c.json", "--quiet",
           "--checkpoint-frequency", 20]
    stopped = stop_with_a_signal(start_cli(*cli_args(run)), signal.SIGTERM, tmp_path / "out")
    assert stopped < 40
    again = cli(*run, "--resume")  # the same command, resumed, with the same tokens from the cache
    assert again.returncode == 0, again.stderr
    log = (tmp_path / "out" / "tinyllm_training.log").read_text()
    assert log.count("tokens: tokenized in ") == 1 and log.count("tokens: from the token cache, ") == 1
    (tmp_path / "c.json").write_text('{"val_frequency": 10, "grad_clip": 0.5}')
    changed = cli(*[80 if part == 40 else part for part in run], "--resume")
    assert changed.returncode == 2 and len(changed.stderr.splitlines()) == 1
    assert "--max-steps 80 (saved: 40)" in changed.stderr
    assert "grad_clip 0.5 (saved: 1.0)" in changed.stderr
    assert "--seed" not in changed.stderr and "val_frequency" not in changed.stderr


def test_flags_that_the_chosen_use_does_not_read_are_named_as_ignored(trained_run, cli, tmp_path):
    out = trained_run[0] / "out"
    result = cli("--generate", "--out-dir", out, "--num-chars", 5, "--no-compile", "--seed", 1,
                 "--batch-size", 5, "--max-context", 64)
    assert result.returncode == 0 and result.stderr.splitlines()[0] == (
        "warning: --max-context, --batch-size do not apply to --generate, which trains nothing; ignored")
    result = cli("--plot", "--out-dir", out, "--resume")
    assert result.returncode == 0 and result.stderr == (
        "warning: --resume does not apply to --plot, which trains nothing; ignored\n")
    result = cli("--generate", "--out-dir", out, "--num-chars", 5, "--no-compile", "--seed", 1)
    assert result.returncode == 0 and "warning" not in result.stderr  # --seed seeds the samples
    result = cli("--generate", "--out-dir", out, "--num-chars", 5, "--no-compile", "--dtype", "bfloat16",
                 "--lowercase", "--data", tmp_path / "x.txt")  # the checkpoint's dtype and preparation
    assert result.returncode == 0 and result.stderr.splitlines()[0] == (
        "warning: --data, --lowercase, --dtype do not apply to --generate, which trains nothing; ignored")
    result = cli("--evaluate", "--out-dir", out, "--data", trained_run[0] / "play.txt", "--seed", 3)
    assert result.returncode == 0 and result.stderr.splitlines()[0] == (
        "warning: --seed does not apply to --evaluate, which trains nothing; ignored")
    result = cli("--data", tmp_path / "missing.txt", "--top-k", 5, "--prompt", "ROMEO:")
    assert result.returncode == 2 and result.stderr.splitlines()[0] == (
        "warning: --prompt, --top-k do not apply to training; ignored")


def test_cli_quantize_never_replaces_an_int8_file_unasked_nor_quantizes_one_again(trained_run, tmp_path, cli):
    (tmp_path / "best.pt").write_bytes((trained_run[0] / "out" / "best.pt").read_bytes())
    assert cli("--quantize", "int8", "--checkpoint", tmp_path / "best.pt").returncode == 0
    before = (tmp_path / "best.int8.pt").read_bytes()
    again = cli("--quantize", "int8", "--checkpoint", tmp_path / "best.pt")
    assert again.returncode == 2 and "best.int8.pt already exists; pass --overwrite" in again.stderr
    assert (tmp_path / "best.int8.pt").read_bytes() == before
    assert cli("--quantize", "int8", "--checkpoint", tmp_path / "best.pt", "--overwrite").returncode == 0
    twice = cli("--quantize", "int8", "--checkpoint", tmp_path / "best.int8.pt")
    assert twice.returncode == 2 and twice.stderr == (
        f"error: {tmp_path / 'best.int8.pt'} is int8-quantized already; quantize the float checkpoint it "
        "came from\n")
    assert not (tmp_path / "best.int8.int8.pt").exists()


def test_cli_generation_benchmark_ignores_stop_strings_and_seeds_are_checked(trained_run, cli):
    checkpoint = trained_run[0] / "out" / "best.pt"
    result = cli("--generate", "--benchmark", "--checkpoint", checkpoint, "--num-chars", 20, "--stop", "e",
                 "--no-compile")
    assert result.returncode == 0 and "cached is" in result.stdout, result.stderr
    assert "compiled" not in result.stdout  # --no-compile leaves the compiled step out
    for seed in (-1, 2**32):
        result = cli("--generate", "--checkpoint", checkpoint, "--seed", seed)
        assert result.returncode == 2 and "--seed must be in [0, 2**32)" in result.stderr


def close_the_reader(process, read=0):
    """Read `read` bytes of the process's output, close the pipe as `| head -c N` does, and let the
    process end; return what it wrote to stderr."""
    process.stdout.read(read)
    process.stdout.close()
    try:
        stderr = process.stderr.read()
        process.wait(timeout=120)
    finally:
        process.kill()
    return stderr


def test_cli_generating_into_a_closed_pipe_ends_quietly(trained_run):
    process = start_cli("--generate", "--out-dir", trained_run[0] / "out", "--num-chars", 10**6,
                        "--no-compile")
    assert close_the_reader(process, read=5) == "" and process.returncode == 128 + signal.SIGPIPE


def test_pip_install_gives_a_tinyllm_command_and_a_version(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", *(p.name for p in ROOT.glob("*.py"))):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(tmp_path / "site"), str(source)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([str(tmp_path / "site" / "bin" / "tinyllm"), "--help"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and "--time-budget" in result.stdout, result.stderr
    assert "(default: 1337)" in result.stdout  # defaults are shown
    metadata = next((tmp_path / "site").glob("tinyllm-*.dist-info")) / "METADATA"
    assert f"Version: {tinyllm.__version__}" in metadata.read_text()


def test_cli_benchmark_prints_throughput(tmp_path, cli, monkeypatch):
    (tmp_path / "play.txt").write_text(PLAY)
    monkeypatch.chdir(tmp_path)
    result = cli("--benchmark", "--data", tmp_path / "play.txt", "--size", "tiny", "--max-context", 32)
    assert result.returncode == 0, result.stderr
    assert re.search(r"cpu \w+ eager: [\d,]+ tokens/s .*MFU", result.stdout), result.stdout  # --no-compile
    assert re.search(r"a plain GPT-2-style model of this shape, float32, eager, AdamW: [\d,]+ tokens/s; "
                     r"tinyllm is [\d.]+x that", result.stdout), result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["play.txt"]  # nothing written where it ran


def test_cli_with_no_time_for_one_step_ends_cleanly_and_the_run_is_finished(tmp_path, cli):
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    args = ["--data", tmp_path / "play.txt", "--out-dir", tmp_path / "out", "--quiet"]
    result = cli(*args, "--size", "tiny", "--max-context", 32, "--time-budget", 0.000001)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 0
    resumed = cli(*args, "--resume")
    assert resumed.returncode == 2 and "finished at step 0 (time_budget)" in resumed.stderr


# ---------------------------------------------------------------------------------------------
# Crash safety, exact resume, and bad input


def start_cli(*args):
    """Start the command line as a terminal would: a test runner started in the background
    passes an ignored SIGINT on to its children, so the default action is restored."""
    return subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def long_run_args(tmp_path, **changes):
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    flags = {"--data": tmp_path / "play.txt", "--size": "tiny", "--max-context": 32, "--batch-size": 8,
             "--epochs": 10_000, "--max-steps": 200, "--val-frequency": 25, "--checkpoint-frequency": 20,
             "--sample-frequency": 250, "--seed": 5, **changes}
    return [*(str(part) for item in flags.items() for part in item), "--quiet", "--no-compile",
            "--device", "cpu"]


def test_a_run_killed_with_sigkill_resumes_to_bitwise_the_same_weights(tmp_path, cli, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # --threads sets it; put back after the test
    # Only the killed run needs a process of its own; all three use this process's thread count.
    (tmp_path / "short_samples.json").write_text('{"sample_length": 60}')  # five samples a run: quick ones
    args = long_run_args(tmp_path, **{"--threads": torch.get_num_threads(), "--max-steps": 80,
                                      "--val-frequency": 20, "--sample-frequency": 30,
                                      "--config": tmp_path / "short_samples.json"})
    whole = cli(*args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    process = start_cli(*args, "--out-dir", cut)
    wait_for(lambda: (cut / "last.pt").exists() and (cut / "best.pt").exists())  # so resuming reloads best.pt
    time.sleep(random.uniform(0.0, 0.5))  # a random step after the first checkpoint
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = tinyllm.load_checkpoint(cut / "last.pt").step
    assert 20 <= killed_at < 80
    resumed = cli("--resume", "--out-dir", cut, "--data", tmp_path / "play.txt", "--quiet", "--threads",
                  torch.get_num_threads())
    assert resumed.returncode == 0, resumed.stderr
    a, b = (tinyllm.load_checkpoint(d / "last.pt") for d in (tmp_path / "whole", cut))
    assert a.step == b.step == 80, f"killed at step {killed_at}"
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), f"{name} differs (killed at step {killed_at})"
    for key in ("full_val_loss", "best_val_loss", "best_step", "final_val_loss", "steps", "tokens_seen",
                "sample"):
        assert json.loads((cut / "summary.json").read_text())[key] == \
            json.loads((tmp_path / "whole" / "summary.json").read_text())[key]
    rows = [[(r["step"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(open(d / "metrics.csv"))]
            for d in (tmp_path / "whole", cut)]
    assert rows[0] == rows[1] and len(rows[0]) == 4  # no row lost or logged twice (every 20 of 80 steps)
    steps = [(d / "steps.csv").read_text().splitlines() for d in (tmp_path / "whole", cut)]
    assert steps[0] == steps[1] and len(steps[0]) == 81  # every step's loss, once, and the same
    assert (cut / "samples.txt").read_text() == (tmp_path / "whole" / "samples.txt").read_text()


def stop_with_a_signal(process, signal_number, out):
    """Send a training process the signal once it has validated (so has a checkpoint); return the step
    its last.pt holds (checked by stopped_by)."""
    metrics = out / "metrics.csv"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 1)
    process.send_signal(signal_number)
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    return stopped_by(signal_number, out, process.returncode, stdout + stderr)


def stopped_by(signal_number, out, exit_code, output):
    """Check that a run stopped by the signal ended with 128 + its number, no traceback and a log that
    says how to resume; return the step its last.pt holds."""
    assert exit_code == 128 + signal_number, output
    assert "Traceback" not in output
    stopped_at = tinyllm.load_checkpoint(out / "last.pt").step
    log = (out / "tinyllm_training.log").read_text()
    assert f"stopped by {signal.Signals(signal_number).name} after step {stopped_at}" in log
    assert "--resume" in log and not (out / "summary.json").exists()
    return stopped_at


def test_ctrl_c_saves_last_pt_and_the_resumed_run_keeps_every_steps_loss(tmp_path, cli, monkeypatch):
    """Ctrl-C here in this process, between two validations (test_cli_resume_accepts_the_runs_own_
    settings_and_names_real_changes stops a process of its own with SIGTERM)."""
    after_step = tinyllm.Trainer._after_step

    def after_step_press_ctrl_c(trainer):
        after_step(trainer)
        if trainer.state.step == 33 and trainer.resumed_at is None:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at once: before the next step
    monkeypatch.setattr(tinyllm.Trainer, "_after_step", after_step_press_ctrl_c)
    out, args = tmp_path / "out", long_run_args(tmp_path, **{"--max-steps": 60})
    runners = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, not ignored
    try:
        result = cli(*args, "--out-dir", out)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run put it back
    finally:
        signal.signal(signal.SIGINT, runners)
    assert stopped_by(signal.SIGINT, out, result.returncode, result.stdout + result.stderr) == 33
    assert cli("--resume", "--out-dir", out, "--data", tmp_path / "play.txt", "--quiet").returncode == 0
    steps = [int(row["step"]) for row in csv.DictReader(open(out / "steps.csv"))]
    assert steps == list(range(1, 61))  # those after the last validation (25) too, once


def test_cli_stops_an_exploding_run_with_exit_code_2(tmp_path, cli):
    (tmp_path / "noclip.json").write_text('{"grad_clip": null, "warmup_steps": 0}')
    args = long_run_args(tmp_path, **{"--learning-rate": 1e9, "--config": tmp_path / "noclip.json"})
    result = cli(*args, "--out-dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "loss became nan at step" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.fixture
def earlier_run(tmp_path):
    """An out-dir holding an earlier run's files, which no bad command may change."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("best.pt", "config.json", "metrics.csv", "tinyllm_training.log"):
        (out / name).write_text(f"precious {name}")
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    return tmp_path


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


BAD_INPUTS = [  # (arguments after --out-dir <earlier run>, what the one line must say)
    (["--data", "missing.txt", "--overwrite"], "does not exist"),
    (["--data", "empty.txt", "--overwrite"], "is empty"),
    (["--data", "binary.bin", "--overwrite"], "looks binary"),
    (["--data", "latin1.txt", "--overwrite"], "is not UTF-8"),
    (["--data", "short.txt", "--overwrite"], "or a model with a smaller --max-context"),  # a flag
    (["--data", "out", "--include", "*.md", "--overwrite"], "no UTF-8 text files matching *.md in out"),
    (["--data", "play.txt", "--out-dir", "play.txt"], "cannot create output directory"),
    (["--data", "play.txt", "--config", "not_json.json", "--overwrite"], "not valid JSON"),
    (["--data", "play.txt", "--config", "unknown_key.json", "--overwrite"], "unknown key(s) colour"),
    (["--data", "play.txt", "--config", "wrong_type.json", "--overwrite"], "'epochs' must be int"),
    (["--data", "play.txt", "--config", "impossible.json", "--overwrite"], "divisible"),
    (["--data", "play.txt", "--size", "huge", "--overwrite"], "unknown model size 'huge'"),
    (["--data", "play.txt", "--tokenizer", "words", "--overwrite"], "unknown tokenizer 'words'"),
    (["--data", "play.txt", "--n-layer", "0", "--overwrite"], "'n_layer' must be positive"),
    (["--data", "play.txt", "--batch-size", "-8", "--overwrite"], "'batch_size' must be positive"),
    (["--data", "play.txt", "--learning-rate", "0", "--overwrite"], "'learning_rate' must be positive"),
    (["--data", "play.txt", "--temperature", "-1", "--overwrite"], "'temperature' must be positive"),
    (["--data", "play.txt", "--time-budget", "0", "--overwrite"], "'time_budget' must be positive"),
    (["--data", "play.txt", "--time-budget", "inf", "--overwrite"], "'time_budget' must be positive and fin"),
    (["--data", "play.txt", "--size", "tiny"], "--resume to continue it, another --out-dir, or --overwrite"),
    (["--generate"], "best.pt cannot be loaded safely: it is truncated, corrupted or not a PyTorch"),
    (["--generate", "--checkpoint", "best.pt"], "no checkpoint at"),
    (["--generate", "--checkpoint", "out"],
     f"checkpoint out is a folder; pass a checkpoint file in it, such as {Path('out') / 'best.pt'}"),
    (["--generate", "--checkpoint", "model.pt", "--prompt", "ROMEO: ¿sé?"], "never saw"),
    (["--generate", "--checkpoint", "model.pt", "--temperature", "0"], "--temperature must be positive"),
    (["--generate", "--checkpoint", "model.pt", "--top-k", "0"], "--top-k must be a positive whole number"),
    (["--data", "play.txt", "--resume"], "nothing to resume"),
    (["--data", "play.txt", "--init-from", "model.pt", "--size", "tiny", "--max-context", "64",
      "--overwrite"],
     "--init-from model.pt fine-tunes its model with its tokenizer and text preparation, and these differ: "
     "--max-context 64 (saved: 32); drop them, or train a new model without --init-from"),
    (["--batch-size", "many"], "invalid int value"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_cli_bad_input_is_one_line_exit_2_and_changes_nothing(earlier_run, trained_run, args, message,
                                                              monkeypatch, capsys):
    """In-process for speed: any exception other than the handled ones would fail the test."""
    tmp = earlier_run
    (tmp / "empty.txt").write_text("  \n")
    (tmp / "binary.bin").write_bytes(b"\x00\x01binary")
    (tmp / "latin1.txt").write_bytes("café crème\n".encode("latin-1") * 100)
    (tmp / "short.txt").write_text("too short\n")
    (tmp / "not_json.json").write_text("{epochs: 3")
    (tmp / "unknown_key.json").write_text('{"colour": "red"}')
    (tmp / "wrong_type.json").write_text('{"epochs": "ten"}')
    (tmp / "impossible.json").write_text('{"n_embd": 30, "n_head": 4}')
    (tmp / "model.pt").write_bytes((trained_run[0] / "out" / "best.pt").read_bytes())
    before = snapshot(tmp / "out")
    monkeypatch.chdir(tmp)
    try:
        code = train_shakespeare.main(["--out-dir", "out", *args])
    except SystemExit as e:  # argparse's way out
        code = e.code
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert snapshot(tmp / "out") == before


def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, monkeypatch, capsys):
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=10), PLAY, quiet=True, callbacks=[StopAt(5)]).train()
    before = snapshot(tmp_path / "out")
    (tmp_path / "play.txt").write_text(PLAY)

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    code = train_shakespeare.main(["--resume", "--out-dir", str(tmp_path / "out"), "--data",
                                   str(tmp_path / "play.txt"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1
    for name in ("best.pt", "last.pt", "summary.json"):
        assert (tmp_path / "out" / name).read_bytes() == before[name]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# More than one process: torchrun and DistributedDataParallel (gloo on the CPU)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, script=SCRIPT):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(script), *map(str, args), "--no-compile", "--device", "cpu"]  # gloo, one CPU each
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_trains_with_one_writer_and_as_one_process_with_the_same_global_batch(tmp_path, cli):
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    run = ["--data", tmp_path / "play.txt", "--size", "tiny", "--max-context", 32, "--max-steps", 20,
           "--val-frequency", 10, "--quiet"]
    result = torchrun(*run, "--out-dir", tmp_path / "two", "--batch-size", 8)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {"best.pt", "last.pt", "tokenizer.json", "config.json", "tinyllm_training.log", "metrics.csv",
                "samples.txt", "summary.json", "steps.csv"}
    names = {p.name for p in (tmp_path / "two").iterdir()}
    assert expected <= names and not [name for name in names if name.endswith(".tmp")], (names, result.stderr)
    log = (tmp_path / "two" / "tinyllm_training.log").read_text()
    assert "batch 8 per process x 2 processes = 16" in log, log
    assert log.count("stopped after 20 steps") == 1, log
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["tokens_seen"] == 20 * 16 * 32
    one = cli(*run, "--out-dir", tmp_path / "one", "--batch-size", 16, "--no-compile", "--device", "cpu")
    assert one.returncode == 0, one.stderr
    two, one = (tinyllm.load_checkpoint(tmp_path / name / "last.pt") for name in ("two", "one"))
    assert two.step == one.step == 20  # and every step took the same batch and the same update:
    for name, weight in one.model.state_dict().items():
        assert torch.allclose(two.model.state_dict()[name], weight, atol=1e-5), name
    for file, steps in (("steps.csv", list(range(1, 21))), ("metrics.csv", [10, 20])):  # whole batches
        two_rows, one_rows = (list(csv.DictReader(open(tmp_path / name / file))) for name in ("two", "one"))
        assert [int(row["step"]) for row in two_rows] == [int(row["step"]) for row in one_rows] == steps
        assert [float(row["train_loss"]) for row in two_rows] == \
            pytest.approx([float(row["train_loss"]) for row in one_rows], abs=2e-5), file
    assert tinyllm.generate(two.model, torch.zeros(1, 1, dtype=torch.long), 5).shape == (1, 6)


FAILS_ON_ONE_RANK = """
import os, sys
sys.path.insert(0, {root!r})
import tinyllm, train_shakespeare

def fail(trainer):
    raise tinyllm.TinyLLMError("only process {rank} met this")

if os.environ["RANK"] == "{rank}":  # in the middle of training, while the other waits in a collective
    tinyllm.Trainer._validate = fail
sys.exit(train_shakespeare.command_line())
"""


def test_an_error_on_one_process_alone_is_printed_once_and_every_process_exits_with_code_2(tmp_path):
    rank = 1  # not process 0, which prints a shared error: the first process to fail prints it
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    (tmp_path / "fails.py").write_text(FAILS_ON_ONE_RANK.format(root=str(ROOT), rank=rank))
    started = time.monotonic()
    result = torchrun("--data", tmp_path / "play.txt", "--out-dir", tmp_path / "out", "--size", "tiny",
                      "--max-context", 32, "--batch-size", 8, "--max-steps", 20, "--val-frequency", 5,
                      "--quiet", script=tmp_path / "fails.py")
    assert result.returncode != 0 and time.monotonic() - started < 120
    assert result.stderr.count(f"error: only process {rank} met this") == 1, result.stderr[-3000:]
    assert "[rank0]: Traceback" not in result.stderr and "[rank1]: Traceback" not in result.stderr
    assert result.stderr.count("exitcode  : 2") == 2, result.stderr[-3000:]  # torchrun's report


def test_a_crafted_bpe_file_cannot_demand_a_huge_token_and_unencodable_text_is_one_line(tmp_path):
    doubling = [[65, 65]] + [[256 + i, 256 + i] for i in range(60)]  # token 316 would be 2**61 bytes
    (tmp_path / "t.json").write_text(json.dumps({"type": "bpe", "version": 1, "merges": doubling}))
    with pytest.raises(TinyLLMError, match="malformed .*makes a token of 131072 bytes"):
        tinyllm.load_tokenizer(tmp_path / "t.json")
    tokenizer = tinyllm_bpe.BytePairTokenizer().fit("plain text " * 20, vocab_size=260)
    with pytest.raises(TinyLLMError, match="cannot be encoded as UTF-8: '\\\\ud800'"):
        tokenizer.encode("a lone \ud800 surrogate")
    model = tiny_model(tokenizer.vocab_size)
    with pytest.raises(TinyLLMError, match="the prompt has characters that cannot be encoded as UTF-8"):
        tinyllm.sample_text(model, tokenizer, "\ud800", 5)


def test_a_training_run_whose_console_goes_away_finishes_quietly(tmp_path):
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    process = start_cli("--data", tmp_path / "play.txt", "--out-dir", tmp_path / "out", "--size", "tiny",
                        "--max-context", 32, "--max-steps", 30, "--val-frequency", 10, "--no-compile")
    assert close_the_reader(process) == "" and process.returncode in (0, 128 + signal.SIGPIPE)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 30


def test_torchrun_with_more_processes_than_gpus_says_what_to_run_instead(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # this process keeps its SIGTERM handler
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    world = tinyllm_hooks.world_from_environment()
    with pytest.raises(TinyLLMError) as error:
        world.join(torch.device("cuda"))
    assert train_shakespeare.in_flags(str(error.value)) == (
        "torchrun started 2 processes on this machine, which has 1 GPU; start one per GPU (torchrun "
        "--nproc_per_node=1), or train on the CPU with --device cpu (gloo)")


def test_when_every_process_fails_the_first_to_count_itself_prints_and_each_waits_for_the_rest(monkeypatch):
    """Through a real key-value store, as torchrun's agent keeps one (the job end to end: the test above)."""
    store = torch.distributed.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", store.port), ("WORLD_SIZE", 2)):
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # this process keeps its SIGTERM handler
    worlds = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        worlds.append(tinyllm_hooks.DistributedWorld())

    def exit_now(code):
        raise SystemExit(code)
    monkeypatch.setattr(os, "_exit", exit_now)
    assert worlds[0].first_to_fail()  # it prints the error
    started = time.monotonic()
    with pytest.raises(SystemExit, match="2"):  # but first gives the other a while to fail too
        worlds[0].exit(2, wait=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert not worlds[1].first_to_fail()  # the same error, met a moment later: not printed again
    started = time.monotonic()
    with pytest.raises(SystemExit, match="2"):  # every process has failed: nothing to wait for
        worlds[1].exit(2, wait=60)
    assert time.monotonic() - started < 5


def test_a_benchmark_whose_text_gives_no_batch_per_process_says_so(tmp_path, cli, monkeypatch):
    class TwoProcesses(tinyllm.World):
        rank, size = 0, 2
    monkeypatch.setattr(tinyllm_hooks, "world_from_environment", TwoProcesses)
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    result = cli("--benchmark", "--data", tmp_path / "play.txt", "--size", "tiny", "--max-context", 32,
                 "--batch-size", 64, "--no-compile", "--device", "cpu")
    assert result.returncode == 2 and result.stderr == (
        "error: the text gives no batch of 64 x 32 tokens per process; use more text or a smaller "
        "--batch-size\n")
