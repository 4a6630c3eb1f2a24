"""Tests for tinyllm: properties (hypothesis), behaviour, and the command line end to end."""
import csv
import dataclasses
import functools
import gc
import hashlib
import http.server
import importlib.util
import json
import math
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyllm
import train_shakespeare
from tinyllm import (CharacterTokenizer, TinyLLMError, TokenWindows, TrainingConfig, TransformerModel,
                     prepare_text)

ROOT = Path(__file__).resolve().parent
SCRIPT = ROOT / "train_shakespeare.py"
FAST = settings(max_examples=25, deadline=None)

# A small text with Shakespeare's shape: names, colons, line breaks, repetition.
PLAY = ("ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n\n") * 40


def tiny_model(vocab_size=11, max_context=16, n_layer=2, n_head=2, n_embd=16, seed=0):
    torch.manual_seed(seed)
    return TransformerModel(vocab_size, max_context, n_layer, n_head, n_embd).eval()


def tiny_config(tmp_path, **overrides):
    fields = dict(model_size="tiny", max_context=32, batch_size=8, val_frequency=10, compile=False,
                  sample_frequency=1000, sample_length=20, out_dir=str(tmp_path / "out"))
    return TrainingConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------
# Tokenizer


@FAST
@given(st.text(min_size=1))
def test_char_tokenizer_round_trips_any_text(text):
    tokenizer = CharacterTokenizer().fit(text)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.vocab_size == len(set(text))
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@FAST
@given(st.text(min_size=1), st.text())
def test_tokenizer_save_load_encodes_identically(fit_text, probe):
    tokenizer = CharacterTokenizer().fit(fit_text)
    probe = "".join(c for c in probe if c in tokenizer.index) or fit_text
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save_state(path)
        state = json.loads(path.read_text(encoding="utf-8"))
        loaded = tinyllm.load_tokenizer(path)
    assert state == {"type": "char", "version": 1, "chars": sorted(set(fit_text))}
    assert isinstance(loaded, CharacterTokenizer)
    assert loaded.encode(probe) == tokenizer.encode(probe)


def test_vocabulary_is_sorted_and_unknown_characters_are_named():
    tokenizer = CharacterTokenizer().fit("hello world")
    assert tokenizer.chars == sorted(set("hello world"))
    with pytest.raises(TinyLLMError, match="'QZ'"):
        tokenizer.encode("hello QZ")


def test_load_tokenizer_rejects_unknown_type_and_bad_files(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('{"type": "nope", "version": 1}')
    with pytest.raises(TinyLLMError, match="unknown tokenizer 'nope'; choose one of: bpe, char"):
        tinyllm.load_tokenizer(path)
    path.write_text('{"type": "char", "version": 1, "chars": ["ab"]}')
    with pytest.raises(TinyLLMError, match="malformed"):
        tinyllm.load_tokenizer(path)
    path.write_text('{"type": "char", "vers')
    with pytest.raises(TinyLLMError, match="not valid JSON"):
        tinyllm.load_tokenizer(path)


@FAST
@given(st.text(max_size=60), st.text(min_size=1, max_size=300))
def test_bpe_round_trips_any_text_with_merges_learned_on_other_text(text, fit_text):
    tokenizer = tinyllm.BytePairTokenizer().fit(fit_text * 3, vocab_size=300)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert ids == tokenizer.encode(text) == tinyllm.BytePairTokenizer(tokenizer.merges).encode(text)


@FAST
@given(st.text(min_size=1, max_size=200), st.text(max_size=40))
def test_bpe_save_load_round_trip(fit_text, probe):
    tokenizer = tinyllm.BytePairTokenizer().fit(fit_text * 2, vocab_size=280)
    path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    tokenizer.save_state(path)
    loaded = tinyllm.load_tokenizer(path)
    assert isinstance(loaded, tinyllm.BytePairTokenizer) and loaded.merges == tokenizer.merges
    assert loaded.encode(probe) == tokenizer.encode(probe)


def test_bpe_learns_frequent_pairs_first_and_stops_at_the_vocabulary_size():
    tokenizer = tinyllm.BytePairTokenizer().fit("the cat the hat the bat " * 50, vocab_size=260)
    assert tokenizer.vocab_size == 260
    assert tokenizer.decode([256]) in {" t", "th", "he", "at"}  # the most frequent pairs
    assert len(tokenizer.encode("the hat")) < len("the hat")
    data = json.loads(json.dumps(tokenizer.state()))
    assert data["merges"][0] == list(tokenizer.merges[0]) and len(data["merges"]) == 4
    with pytest.raises(ValueError, match="merge 0 must be two ids of earlier tokens"):
        tinyllm.BytePairTokenizer([[300, 1]])
    with pytest.raises(TinyLLMError, match="'vocab_size' applies only to tokenizers that learn"):
        TrainingConfig(vocab_size=100)


def test_training_with_bpe_reports_bits_per_character_and_samples_text(tmp_path):
    config = tiny_config(tmp_path, tokenizer="bpe", vocab_size=300, max_steps=20, lowercase=False)
    summary = tinyllm.Trainer(config, PLAY, progress=False, quiet=True).train()
    val_text = PLAY[len(PLAY) - int(len(PLAY) * config.val_fraction):]
    checkpoint = tinyllm.load_checkpoint(tmp_path / "out" / "best.pt")
    assert isinstance(checkpoint.tokenizer, tinyllm.BytePairTokenizer)
    assert checkpoint.tokenizer.vocab_size == 300
    tokens = len(checkpoint.tokenizer.encode(val_text))
    assert summary["full_val_bits_per_char"] == pytest.approx(
        summary["full_val_loss"] * tokens / (len(val_text) * math.log(2)))
    assert "bits/char" in (tmp_path / "out" / "tinyllm_training.log").read_text()
    text = tinyllm.sample_text(checkpoint.model, checkpoint.tokenizer, "ROMEO:", 30, seed=1, lowercase=False)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_registry_lists_known_names_on_a_miss():
    assert {"tiny", "small", "medium"} <= set(tinyllm.MODEL_SIZES.names())
    message = "unknown model size 'huge'; choose one of: large, medium, small, tiny"
    with pytest.raises(TinyLLMError, match=message):
        tinyllm.MODEL_SIZES["huge"]
    registry = tinyllm.Registry("widget")

    @registry.register("a")
    class A:
        pass
    assert registry["a"] is A and "a" in registry and registry.names() == ["a"]


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


def test_installed_plugins_add_a_tokenizer_and_a_size_and_broken_ones_only_warn(tmp_path):
    """A distribution's metadata on sys.path is what `pip install` leaves; no install needed."""
    site = tmp_path / "site"
    (site / "tinyllm_shout-1.0.dist-info").mkdir(parents=True)
    info = site / "tinyllm_shout-1.0.dist-info"
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyllm-shout\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    (site / "tinyllm_shout.py").write_text(PLUGIN_MODULE)
    (tmp_path / "play.txt").write_text(PLAY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    command = [sys.executable, str(SCRIPT), "--data", str(tmp_path / "play.txt"),
               "--out-dir", str(tmp_path / "out"), "--tokenizer", "shout", "--size", "pico",
               "--max-steps", "5", "--max-context", "16", "--quiet", "--no-compile"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "tokenizer plugin 'missing' (tinyllm_shout:DoesNotExist) is ignored" in result.stderr
    assert "model size plugin 'odd' (tinyllm_shout:NOT_A_SIZE) is ignored" in result.stderr
    saved = json.loads((tmp_path / "out" / "tokenizer.json").read_text())
    assert saved["type"] == "shout" and "R" in saved["chars"] and "r" not in saved["chars"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_size"], config["n_layer"], config["n_embd"]) == ("pico", 1, 8)


# ---------------------------------------------------------------------------------------------
# Configuration


def test_config_json_round_trip(tmp_path):
    config = TrainingConfig(model_size="tiny", n_embd=48, learning_rate=3e-4, time_budget=60,
                            early_stopping_patience=3, lowercase=False)
    config.to_json(tmp_path / "c.json")
    assert TrainingConfig.from_json(tmp_path / "c.json") == config
    assert config.n_layer == tinyllm.MODEL_SIZES["tiny"]["n_layer"] and config.n_embd == 48


def test_config_file_fields_are_overridden_by_keyword_overrides(tmp_path):
    (tmp_path / "c.json").write_text('{"n_layer": 3, "batch_size": 7}')
    config = TrainingConfig.from_json(tmp_path / "c.json", batch_size=9, model_size="medium")
    assert (config.n_layer, config.batch_size) == (3, 9)
    assert config.n_embd == tinyllm.MODEL_SIZES["medium"]["n_embd"]


@pytest.mark.parametrize("fields, message", [
    ({"colour": "red"}, "unknown key"),
    ({"batch_size": "32"}, "'batch_size' must be int"),
    ({"batch_size": 3.5}, "'batch_size' must be int"),
    ({"epochs": True}, "'epochs' must be int"),
    ({"lowercase": 1}, "'lowercase' must be bool"),
    ({"n_embd": 30, "n_head": 4}, "divisible"),
    ({"learning_rate": 0}, "'learning_rate' must be positive"),
    ({"batch_size": -1}, "'batch_size' must be positive"),
    ({"max_context": 0}, "'max_context' must be positive"),
    ({"time_budget": -5}, "'time_budget' must be positive"),
    ({"temperature": float("nan")}, "'temperature' must be positive"),
    ({"val_fraction": 0.0}, "val_fraction"),
    ({"val_fraction": 0.6}, "val_fraction"),
    ({"dropout": 1.0}, "dropout"),
    ({"seed": -1}, "'seed' must be in"),
    ({"device": "cuda:x"}, "unknown device"),
    ({"checkpoint_frequency": 0}, "'checkpoint_frequency' must be positive"),
    ({"learning_rate": 10**400}, "'learning_rate' must be positive"),
    ({"model_size": "huge"}, "unknown model size"),
    ({"tokenizer": "words"}, "unknown tokenizer"),
    ({"device": "tpu"}, "unknown device"),
    ({"dtype": "int4"}, "unknown dtype"),
])
def test_bad_configs_raise_tinyllm_error(fields, message):
    with pytest.raises(TinyLLMError, match=message):
        TrainingConfig.from_dict(fields)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
CONFIG_KEYS = st.sampled_from([f.name for f in dataclasses.fields(TrainingConfig)]) | st.text(max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(CONFIG_KEYS, JSON_VALUES, max_size=6) | JSON_VALUES)
def test_any_json_config_file_loads_or_raises_tinyllm_error(data):
    path = Path(tempfile.mkdtemp()) / "config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    try:
        config = TrainingConfig.from_json(path)
    except TinyLLMError:
        return
    assert isinstance(config, TrainingConfig) and isinstance(data, dict)


@settings(max_examples=200, deadline=None)
@given(st.fixed_dictionaries({}, optional={"type": st.sampled_from(["char", "bpe"]) | JSON_VALUES,
                                           "version": st.just(1) | JSON_VALUES,
                                           "chars": st.lists(st.text(max_size=2), max_size=5) | JSON_VALUES,
                                           "merges": st.lists(st.lists(st.integers(-1, 300), max_size=3),
                                                              max_size=4) | JSON_VALUES})
       | JSON_VALUES, st.booleans())
def test_any_json_tokenizer_file_loads_or_raises_tinyllm_error(data, truncate):
    path = Path(tempfile.mkdtemp()) / "tokenizer.json"
    text = json.dumps(data)
    path.write_text(text[:len(text) // 2] if truncate else text, encoding="utf-8")
    try:
        tokenizer = tinyllm.load_tokenizer(path)
    except TinyLLMError:
        return
    probe = tokenizer.decode(range(tokenizer.vocab_size)) if tokenizer.type_name == "char" else "any text ü"
    assert tokenizer.decode(tokenizer.encode(probe)) == probe


def test_config_file_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "c.json").write_text("[1, 2]")
    with pytest.raises(TinyLLMError, match="JSON object"):
        TrainingConfig.from_json(tmp_path / "c.json")


# ---------------------------------------------------------------------------------------------
# Data


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("aB \t\r\n\u00c9x.")))
def test_prepare_text_is_idempotent_and_tidy(text):
    once = prepare_text(text)
    assert prepare_text(once) == once
    assert "\r" not in once and "\t" not in once and "  " not in once and "\n\n\n" not in once
    assert " \n" not in once and not once.endswith(" ")
    assert once.count("\n") <= text.count("\n") + text.count("\r")


def test_prepare_text_keeps_lines_and_each_step_is_switchable():
    text = "ROMEO:\r\n\tBut  soft!  \n\n\n\nJULIET:"
    assert prepare_text(text) == "romeo:\n but soft!\n\njuliet:"
    assert prepare_text(text, lowercase=False) == "ROMEO:\n But soft!\n\nJULIET:"
    assert prepare_text(text, normalize_whitespace=False) == text.lower()
    assert prepare_text(text, False, False) == text


@FAST
@given(st.integers(20, 300), st.integers(1, 16), st.integers(0, 15))
def test_dataset_windows_are_shifted_by_one(length, context, offset):
    ids = torch.randint(50, (length,))
    windows = TokenWindows(ids, context, offset % context)
    for i in range(len(windows)):
        x, y = windows[i]
        assert x.shape == y.shape == (context,)
        assert torch.equal(x[1:], y[:-1])
        start = offset % context + i * context
        assert torch.equal(x, ids[start:start + context])
        assert torch.equal(y, ids[start + 1:start + context + 1])


def test_an_epoch_makes_every_token_a_target_once():
    ids = torch.arange(1000)
    loader = tinyllm.epoch_loader(ids, 16, 8, torch.Generator().manual_seed(0))
    targets = torch.cat([y.flatten() for _, y in loader])
    assert len(set(targets.tolist())) == len(targets)  # no target twice
    assert len(targets) >= len(ids) - 16 * (8 + 1)  # all but an incomplete batch and the ends
    x, y = next(iter(loader))
    assert x.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])


def test_epochs_are_cut_at_fresh_offsets():
    generator = torch.Generator().manual_seed(0)
    firsts = {int(next(iter(tinyllm.epoch_loader(torch.arange(500), 16, 100, generator)))[0].min() % 16)
              for _ in range(10)}
    assert len(firsts) > 1


def test_validation_split_is_the_end_of_the_text_and_batches_are_fixed():
    text = "abcdefghij" * 100
    tokenizer = CharacterTokenizer().fit(text)
    train, val = tinyllm.split_train_val(text, tokenizer, 0.1, 16)
    assert tokenizer.decode(val.tolist()) == text[900:] and tokenizer.decode(train.tolist()) == text[:900]
    first = tinyllm.fixed_batches(val, 16, 4, 3, seed=1)
    second = tinyllm.fixed_batches(val, 16, 4, 3, seed=1)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    with pytest.raises(TinyLLMError, match="text too short: 100 characters give 90 training and 10"):
        tinyllm.split_train_val(text[:100], tokenizer, 0.1, 16)


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"), (b"", "empty"), (b"   \n", "empty"),
    (b"abc\x00def", "binary"), (b"caf\xe9 au lait", "not UTF-8"),
])
def test_load_text_explains_bad_files(tmp_path, content, message):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(TinyLLMError, match=message):
        tinyllm.load_text(path)


def test_load_text_refuses_a_directory(tmp_path):
    with pytest.raises(TinyLLMError, match="is a directory"):
        tinyllm.load_text(tmp_path)


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
    thread = threading.Thread(target=server.serve_forever, daemon=True)
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


def test_default_data_is_downloaded_once_then_read_locally(file_server, tmp_path, monkeypatch):
    served, url = file_server
    (served / "input.txt").write_text(PLAY)
    monkeypatch.setattr(train_shakespeare, "SHAKESPEARE_URL", f"{url}/input.txt")
    monkeypatch.setattr(train_shakespeare, "SHAKESPEARE_SHA256", hashlib.sha256(PLAY.encode()).hexdigest())
    path = tmp_path / "data" / "shakespeare.txt"
    assert train_shakespeare.shakespeare_text(path) == PLAY and path.read_text() == PLAY
    (served / "input.txt").unlink()  # a second call must not touch the network
    assert train_shakespeare.shakespeare_text(path) == PLAY


def test_download_failure_says_where_to_put_the_file(file_server, tmp_path):
    _, url = file_server
    with pytest.raises(TinyLLMError, match="save it as .*shakespeare.txt"):
        train_shakespeare.download(f"{url}/missing.txt", tmp_path / "shakespeare.txt", "0" * 64)
    assert not (tmp_path / "shakespeare.txt").exists()


# ---------------------------------------------------------------------------------------------
# Model


@FAST
@given(st.integers(1, 4), st.integers(1, 16), st.sampled_from([(1, 1, 8), (2, 2, 16), (1, 4, 32)]),
       st.integers(2, 40))
def test_logits_have_the_right_shape_and_the_loss_is_finite(batch, length, shape, vocab):
    n_layer, n_head, n_embd = shape
    model = tiny_model(vocab, 16, n_layer, n_head, n_embd)
    idx, targets = torch.randint(vocab, (batch, length)), torch.randint(vocab, (batch, length))
    logits, loss = model(idx, targets)
    assert logits.shape == (batch, length, vocab)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model(idx)[1] is None


@FAST
@given(st.integers(2, 16), st.data())
def test_attention_is_causal(length, data):
    model = tiny_model()
    idx = torch.randint(11, (1, length))
    t = data.draw(st.integers(0, length - 2))
    changed = idx.clone()
    changed[0, t + 1:] = (changed[0, t + 1:] + 1) % 11
    with torch.no_grad():
        before, after = model(idx)[0], model(changed)[0]
    assert torch.allclose(before[0, :t + 1], after[0, :t + 1], atol=1e-6)
    assert not torch.allclose(before[0, t + 1:], after[0, t + 1:])


def test_heads_must_split_the_width_into_even_sizes():
    with pytest.raises(TinyLLMError, match="even head size"):
        TransformerModel(10, 16, 1, 4, 18)  # 18 wide does not split into 4 heads
    TransformerModel(10, 16, 1, 3, 18)  # but into 3 heads of 6
    with pytest.raises(TinyLLMError, match="even head size"):
        TrainingConfig(n_embd=30, n_head=2)  # head size 15 is odd


def test_flops_per_token_counts_matrix_weights_six_times():
    model = tiny_model(vocab_size=11, max_context=16, n_layer=2, n_head=2, n_embd=16)
    matrices = sum(p.numel() for p in model.parameters() if p.dim() == 2) - 11 * 16
    assert model.flops_per_token() == 6 * matrices + 12 * 2 * 16 * 16


def test_input_longer_than_the_context_is_refused():
    with pytest.raises(TinyLLMError, match="max_context is 16"):
        tiny_model()(torch.zeros(1, 17, dtype=torch.long))


def test_initial_loss_is_near_uniform_guessing():
    model = tiny_model(vocab_size=50)
    _, loss = model(torch.randint(50, (4, 16)), torch.randint(50, (4, 16)))
    assert abs(loss.item() - math.log(50)) < 0.1


# ---------------------------------------------------------------------------------------------
# Sampling


def test_generate_jumps_the_window_past_the_context_and_top_k_one_is_greedy():
    model = tiny_model()  # max_context 16: once full, the newest 8 tokens are kept
    idx = torch.randint(11, (2, 5))
    out = tinyllm.generate(model, idx, 40, top_k=1)
    assert out.shape == (2, 45) and torch.equal(out[:, :5], idx)
    greedy, start = idx, 0
    for _ in range(40):
        if greedy.shape[1] - start > 16:
            start = greedy.shape[1] - 8
        logits, _ = model(greedy[:, start:])
        greedy = torch.cat([greedy, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, greedy)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([(1, 2, 8), (2, 2, 16), (3, 4, 16)]),
       st.integers(1, 30), st.integers(1, 70), st.integers(2, 12))
def test_cached_generation_matches_full_recomputation(seed, shape, prompt_length, new_tokens, context):
    """Greedy decoding gives the same tokens with and without the cache, also far past
    max_context. float64 keeps rounding from flipping a near-tie between two tokens."""
    n_layer, n_head, n_embd = shape
    model = tiny_model(13, context, n_layer, n_head, n_embd, seed=seed).double()
    idx = torch.randint(13, (2, prompt_length), generator=torch.Generator().manual_seed(seed))
    cached = tinyllm.generate(model, idx, new_tokens, top_k=1, use_cache=True)
    assert torch.equal(cached, tinyllm.generate(model, idx, new_tokens, top_k=1, use_cache=False))


def test_cache_gives_the_logits_of_a_full_forward_pass():
    model = tiny_model()
    idx = torch.randint(11, (2, 12))
    cache = tinyllm.KVCache(model, batch_size=2)
    with torch.no_grad():  # a prefill, one token, then three at once
        pieces = [model(idx[:, a:b], cache=cache)[0] for a, b in [(0, 6), (6, 7), (7, 10), (10, 12)]]
        full = model(idx)[0]
    assert cache.length == 12
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    with pytest.raises(TinyLLMError, match="max_context is 16"):
        model(torch.zeros(2, 5, dtype=torch.long), cache=cache)


def test_sampling_with_a_seed_is_reproducible_with_or_without_the_cache():
    model = tiny_model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    runs = [tinyllm.generate(model, idx, 50, 1.5, top_p=0.9, use_cache=use_cache,
                             generator=torch.Generator().manual_seed(7)) for use_cache in (True, False)]
    assert torch.equal(*runs)


def test_top_k_and_top_p_sample_only_from_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draw = lambda **kw: {tinyllm.sample_next(logits, generator=generator, **kw).item() for _ in range(300)}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8: the nucleus is two tokens
    assert draw(top_p=0.81) == {0, 1, 2}
    assert draw(top_p=0.1) == {0}  # the most likely token is always kept
    assert draw() == {0, 1, 2, 3}


@pytest.mark.parametrize("options, message", [
    (dict(temperature=0), "temperature must be positive"), (dict(temperature=-1.0), "temperature must"),
    (dict(top_k=0), "top_k must be positive"), (dict(top_p=0.0), "top_p must be in"),
    (dict(top_p=1.5), "top_p must be in")])
def test_generate_refuses_bad_sampling_settings(options, message):
    with pytest.raises(TinyLLMError, match=message):
        tinyllm.generate(tiny_model(), torch.zeros(1, 1, dtype=torch.long), 3, **options)


def test_streaming_ends_before_a_stop_string_and_never_shows_part_of_one():
    tokenizer = CharacterTokenizer().fit(prepare_text(PLAY))
    model = tiny_model(tokenizer.vocab_size)
    full = "".join(tinyllm.stream_text(model, tokenizer, "", 200, seed=5))
    stop = full[60:63]
    first = full.index(stop)
    pieces = list(tinyllm.stream_text(model, tokenizer, "", 200, seed=5, stop=[stop, "not there"]))
    assert "".join(pieces) == full[:first] and len(pieces) > 10  # streamed, and nothing past the stop
    assert "".join(tinyllm.stream_text(model, tokenizer, "", 200, seed=5, stop=["#"])) == full


def test_sample_text_prepares_the_prompt_and_is_reproducible():
    tokenizer = CharacterTokenizer().fit(prepare_text(PLAY))
    model = tiny_model(tokenizer.vocab_size)
    first = tinyllm.sample_text(model, tokenizer, "ROMEO:  ", 30, seed=3)
    assert first.startswith("romeo:") and len(first) == len("romeo:") + 30
    assert first == tinyllm.sample_text(model, tokenizer, "ROMEO:  ", 30, seed=3)
    with pytest.raises(TinyLLMError, match="prompt has .*'z'.*never saw"):
        tinyllm.sample_text(model, tokenizer, "zebra", 5)


def test_full_evaluation_scores_every_validation_token_once():
    model = tiny_model()
    ids = torch.randint(11, (50,))  # three windows of 16, then a tail with one target
    total = 0.0
    for start, end in [(0, 16), (16, 32), (32, 48), (48, 49)]:
        logits, _ = model(ids[None, start:end])
        total += F.cross_entropy(logits[0], ids[start + 1:end + 1], reduction="sum").item()
    assert tinyllm.evaluate_full(model, ids, batch_size=2) == pytest.approx(total / 49, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Training, metrics and checkpoints


def test_training_drives_the_loss_down(tmp_path):
    config = tiny_config(tmp_path, max_steps=60, learning_rate=1e-2, warmup_steps=5)
    summary = tinyllm.Trainer(config, PLAY, progress=False, quiet=True).train()
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["val_loss"])
    assert summary["steps"] == 60 and summary["stopped_because"] == "max_steps"
    assert last < 0.5 * first and summary["full_val_loss"] < 1.5
    assert summary["best_val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in rows), abs=1e-4)


def test_early_stopping_ends_a_run_after_patience_validations_without_improvement(tmp_path):
    config = tiny_config(tmp_path, val_frequency=1, early_stopping_patience=2)
    trainer = tinyllm.Trainer(config, PLAY, progress=False, quiet=True)
    val_losses = iter([2.0, 1.5, 1.6, 1.7, 1.8, 1.9])
    trainer.evaluate = lambda: next(val_losses)
    summary = trainer.train()
    stopped = (summary["stopped_because"], summary["steps"], summary["best_val_loss"])
    assert stopped == ("early_stopping", 4, 1.5)


def test_a_run_ends_after_its_epochs(tmp_path):
    summary = tinyllm.Trainer(tiny_config(tmp_path, epochs=2), PLAY, progress=False, quiet=True).train()
    steps_per_epoch = (len(PLAY) * 0.9 // 32) // 8
    assert summary["stopped_because"] == "epochs" and summary["epochs_completed"] == 2
    assert 2 * steps_per_epoch - 2 <= summary["steps"] <= 2 * steps_per_epoch


def test_learning_rate_warms_up_then_decays_to_a_tenth(tmp_path):
    trainer = tinyllm.Trainer(tiny_config(tmp_path, max_steps=100, warmup_steps=10, learning_rate=1.0),
                              PLAY, progress=False, quiet=True)
    rates = []
    for trainer.step in range(100):
        rates.append(trainer.learning_rate())
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[9:], rates[10:]))  # never rises after warmup
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_a_time_budget_covers_the_whole_run(tmp_path):
    config = tiny_config(tmp_path, time_budget=4.0, epochs=1000, val_frequency=50)
    summary = tinyllm.Trainer(config, PLAY * 5, progress=False, quiet=True).train()
    assert summary["stopped_because"] == "time_budget"
    assert 2.0 < summary["elapsed_seconds"] < 6.0  # generous: this machine's timing is noisy
    assert 0 < summary["mfu"] < 1 and summary["peak_tflops"] > 0


def test_a_failing_compile_falls_back_to_plain_pytorch(tmp_path, monkeypatch):
    def broken_compile(model, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found")
        return compiled
    monkeypatch.setattr(torch, "compile", broken_compile)
    summary = tinyllm.Trainer(tiny_config(tmp_path, compile=True, max_steps=3), PLAY,
                              progress=False, quiet=True).train()
    assert summary["steps"] == 3
    log = (tmp_path / "out" / "tinyllm_training.log").read_text()
    assert "torch.compile failed (no C++ compiler found)" in log


def test_auto_dtype_uses_bfloat16_only_on_cpus_that_run_it_fast(monkeypatch):
    cpu = torch.device("cpu")
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert tinyllm.resolve_dtype("auto", cpu)[0] == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert tinyllm.resolve_dtype("auto", cpu) == (torch.bfloat16, "this CPU has AMX")
    assert tinyllm.resolve_dtype("float16", cpu)[0] == torch.float16
    assert tinyllm.resolve_compile(None, cpu, 10_000_000, None)[0]  # long runs compile
    assert not tinyllm.resolve_compile(None, cpu, 100_000, None)[0]  # short ones do not
    assert not tinyllm.resolve_compile(None, cpu, 10_000_000, 30.0)[0]
    assert tinyllm.resolve_compile(None, cpu, 0, 180.0)[0]
    assert not tinyllm.resolve_compile(False, cpu, 0, 180.0)[0]


def test_a_finished_run_is_never_overwritten_by_accident(tmp_path):
    config = tiny_config(tmp_path, max_steps=2)
    tinyllm.Trainer(config, PLAY, progress=False, quiet=True).train()
    before = (tmp_path / "out" / "best.pt").read_bytes()
    with pytest.raises(TinyLLMError, match="--overwrite"):
        tinyllm.Trainer(config, PLAY, progress=False, quiet=True)
    with pytest.raises(TinyLLMError, match="too short"):  # a failed start leaves the old run alone
        tinyllm.Trainer(config, "too little text", progress=False, quiet=True, overwrite=True)
    assert (tmp_path / "out" / "best.pt").read_bytes() == before
    tinyllm.Trainer(config, PLAY, progress=False, quiet=True, overwrite=True).train()


def test_fine_tuning_grows_the_vocabulary_and_keeps_the_old_logits(tmp_path):
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=10), PLAY, progress=False, quiet=True).train()
    start = tinyllm.load_checkpoint(tmp_path / "out" / "best.pt")
    old_vocab = start.tokenizer.vocab_size
    new_text = PLAY + "\nZOUNDS! Quoth the jester; 42 jokes.\n" * 20
    config = tiny_config(tmp_path, out_dir=str(tmp_path / "tuned"),
                         init_from=str(tmp_path / "out" / "best.pt"), model_size="small", max_context=16,
                         lowercase=False, max_steps=10)
    trainer = tinyllm.Trainer(config, new_text, progress=False, quiet=True)
    # The architecture and preprocessing come from the checkpoint, not from the config passed in.
    assert (trainer.config.n_embd, trainer.config.max_context, trainer.config.lowercase) == (32, 32, True)
    assert trainer.steps_per_epoch == len(TokenWindows(trainer.train_ids, 32)) // 8
    assert trainer.tokenizer.chars[:old_vocab] == start.tokenizer.chars
    added = trainer.tokenizer.chars[old_vocab:]
    assert added == sorted(set(prepare_text(new_text)) - set(start.tokenizer.chars)) and "z" in added
    probe = torch.tensor([start.tokenizer.encode("romeo, romeo")])
    with torch.no_grad():
        before, after = start.model(probe)[0], trainer.model(probe)[0]
    assert after.shape[-1] == trainer.tokenizer.vocab_size > old_vocab
    assert torch.equal(after[..., :old_vocab], before)
    summary = trainer.train()
    assert summary["steps"] == 10 and math.isfinite(summary["full_val_loss"])
    tuned = tinyllm.load_checkpoint(tmp_path / "tuned" / "best.pt")
    assert tuned.tokenizer.chars == trainer.tokenizer.chars == tinyllm.load_tokenizer(
        tmp_path / "tuned" / "tokenizer.json").chars
    assert tuned.config.init_from == str(tmp_path / "out" / "best.pt")


def test_int8_weights_are_a_quarter_of_the_size_and_score_like_float(tmp_path):
    model = tiny_model(vocab_size=11, n_layer=2, n_head=2, n_embd=64)
    ids = torch.randint(11, (400,))
    float_loss = tinyllm.evaluate_full(model, ids, batch_size=8)
    config = TrainingConfig(model_size="tiny", n_embd=64, max_context=16)
    tokenizer = CharacterTokenizer("abcdefghijk")
    tinyllm.save_checkpoint(tmp_path / "float.pt", model, None, config, tokenizer)
    quantized = tinyllm.quantize_int8(model)
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
        tinyllm.Trainer(config_with_start, PLAY, progress=False, quiet=True)


def test_every_size_builds_and_fields_override_it():
    assert {"tiny", "small", "medium", "large"} <= set(tinyllm.MODEL_SIZES.names())
    config = TrainingConfig(model_size="large", n_layer=3)
    assert (config.n_layer, config.n_head, config.n_embd) == (3, 8, 512)
    assert TransformerModel.from_config(config, 65).num_parameters() > 9_000_000


def test_loss_plot_is_drawn_from_the_metrics(tmp_path):
    pytest.importorskip("matplotlib")
    header = "step,epoch,train_loss,val_loss,learning_rate,tokens_per_second,elapsed_seconds\n"
    (tmp_path / "metrics.csv").write_text(header + "10,0.5,3.1,3.0,0.001,100,1\n20,1,2.5,2.6,0.001,100,2\n")
    path = tinyllm.plot_losses(tmp_path)
    assert path == tmp_path / "loss.png" and path.read_bytes().startswith(b"\x89PNG")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TinyLLMError, match="does not exist"):
        tinyllm.plot_losses(tmp_path / "empty")


def test_without_matplotlib_a_run_says_how_to_get_the_plot_and_finishes(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(TinyLLMError, match=r"pip install 'tinyllm\[plot\]'"):
        tinyllm.plot_losses(tmp_path)
    summary = tinyllm.Trainer(tiny_config(tmp_path, max_steps=10), PLAY, progress=False, quiet=True).train()
    assert summary["steps"] == 10 and not (tmp_path / "out" / "loss.png").exists()
    assert "tinyllm[plot]" in caplog.text


def test_metrics_logger_writes_a_parseable_csv_with_one_header(tmp_path):
    path = tmp_path / "metrics.csv"
    for step in (1, 2):
        metrics = tinyllm.MetricsLogger(path)
        metrics.log(step=step, epoch=0.5, train_loss=2.5, val_loss=2.4, learning_rate=1e-3,
                    tokens_per_second=1000.0, elapsed_seconds=1.5)
        assert path.read_text().count("step,") == 1  # flushed before close
        metrics.close()
    rows = list(csv.DictReader(open(path)))
    assert [int(r["step"]) for r in rows] == [1, 2] and float(rows[0]["val_loss"]) == 2.4
    with pytest.raises(ValueError, match="colour"):
        tinyllm.MetricsLogger(path).log(colour=1)


def test_checkpoint_round_trip_reproduces_logits_exactly(tmp_path):
    tokenizer = CharacterTokenizer().fit("abcdefghijk")
    config = TrainingConfig(model_size="tiny", max_context=16)
    model = TransformerModel.from_config(config, tokenizer.vocab_size).eval()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(11, (2, 16)), torch.randint(11, (2, 16)))[1].backward()
    optimizer.step()
    tinyllm.save_checkpoint(tmp_path / "c.pt", model, optimizer, config, tokenizer, step=7, epoch=1,
                            best_val_loss=1.25)
    loaded = tinyllm.load_checkpoint(tmp_path / "c.pt")
    idx = torch.randint(11, (3, 16))
    assert torch.equal(model(idx)[0], loaded.model.eval()(idx)[0])
    assert (loaded.step, loaded.epoch, loaded.best_val_loss, loaded.config) == (7, 1, 1.25, config)
    assert loaded.tokenizer.chars == tokenizer.chars and loaded.optimizer_state["state"]
    assert torch.equal(TransformerModel.from_checkpoint(tmp_path / "c.pt")(idx)[0], model(idx)[0])


def test_unsafe_or_broken_checkpoints_are_refused(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    evil = {"format": "tinyllm-checkpoint", "x": Boom()}
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(TinyLLMError, match=r"it holds a pickled \w+\.system, which could run code"):
        tinyllm.load_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04truncated")
    with pytest.raises(TinyLLMError, match="cut.pt"):
        tinyllm.load_checkpoint(tmp_path / "cut.pt")
    with pytest.raises(TinyLLMError, match="does not exist"):
        tinyllm.load_checkpoint(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------
# The command line, end to end


def run_cli(*args, cwd=None):
    """Run the command line; compiling is left off, since each test's shapes would compile anew."""
    args = [*map(str, args), *([] if "--compile" in args or "--generate" in args else ["--no-compile"])]
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One short real training run through the command line, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "play.txt").write_text(PLAY, encoding="utf-8")
    result = run_cli("--data", tmp / "play.txt", "--out-dir", tmp / "out", "--size", "tiny",
                     "--max-steps", 40, "--val-frequency", 10, "--sample-frequency", 20,
                     "--max-context", 32, "--batch-size", 8, "--learning-rate", 0.01, "--quiet")
    return tmp, result


def test_cli_training_writes_every_file(trained_run):
    tmp, result = trained_run
    assert result.returncode == 0, result.stderr
    out = tmp / "out"
    expected = {"best.pt", "last.pt", "tokenizer.json", "config.json", "tinyllm_training.log",
                "metrics.csv", "samples.txt", "summary.json"}
    assert expected <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "summary.json").read_text())
    for key in ("best_val_loss", "final_val_loss", "full_val_loss", "steps", "epochs_completed",
                "tokens_seen", "tokens_per_second", "elapsed_seconds", "parameters", "device",
                "dtype", "stopped_because"):
        assert key in summary
    assert summary["steps"] == 40 and summary["tokens_seen"] > 0 and summary["device"] == "cpu"
    assert 0 < summary["full_val_loss"] < math.log(summary["parameters"])
    assert summary["best_val_loss"] <= summary["final_val_loss"]
    assert TrainingConfig.from_json(out / "config.json").max_context == 32
    assert tinyllm.load_tokenizer(out / "tokenizer.json").vocab_size == len(set(prepare_text(PLAY)))
    assert len(list(csv.DictReader(open(out / "metrics.csv")))) == 4
    assert "=== step 20 ===" in (out / "samples.txt").read_text()
    assert "step 40" in (out / "tinyllm_training.log").read_text()
    assert tinyllm.load_checkpoint(out / "best.pt").step <= 40
    if importlib.util.find_spec("matplotlib"):
        assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_generate_refuses_a_prompt_with_unseen_characters(trained_run):
    tmp, _ = trained_run
    result = run_cli("--generate", "--out-dir", tmp / "out", "--prompt", "ROMEO: ¿sé?")
    assert result.returncode == 2 and result.stdout == ""
    assert "'¿é'" in result.stderr and "never saw" in result.stderr and len(result.stderr.splitlines()) == 1


def test_cli_generate_prints_a_continuation(trained_run):
    tmp, _ = trained_run
    result = run_cli("--generate", "--out-dir", tmp / "out", "--prompt", "JULIET:", "--num-chars", 50,
                     "--seed", 1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("juliet:") and len(result.stdout.rstrip("\n")) >= len("juliet:")


def test_cli_generate_samples_reproducibly_with_top_k_top_p_and_a_stop_string(trained_run):
    tmp, _ = trained_run
    common = ["--generate", "--out-dir", tmp / "out", "--prompt", "ROMEO:", "--num-chars", 80, "--seed", 3]
    first = run_cli(*common, "--top-k", 5, "--top-p", 0.9, "--temperature", 1.2)
    assert first.returncode == 0, first.stderr
    assert first.stdout == run_cli(*common, "--top-k", 5, "--top-p", 0.9, "--temperature", 1.2).stdout
    greedy = run_cli(*common, "--top-k", 1).stdout
    stop = greedy[len("romeo:") + 5:len("romeo:") + 7]
    stopped = run_cli(*common, "--top-k", 1, "--stop", stop).stdout
    assert stopped == greedy[:greedy.index(stop, len("romeo:"))] + "\n"


def test_ctrl_c_while_generating_ends_quietly_with_exit_code_130(trained_run):
    tmp, _ = trained_run
    process = start_cli("--generate", "--out-dir", tmp / "out", "--num-chars", 10**6)
    first_line = process.stdout.readline()  # generation has started
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and first_line
    assert stderr.strip() == "interrupted" and "Traceback" not in stderr


def test_cli_quantizes_evaluates_and_generates_with_int8(trained_run):
    tmp, _ = trained_run
    result = run_cli("--quantize", "int8", "--checkpoint", tmp / "out" / "best.pt")
    assert result.returncode == 0 and "best.int8.pt" in result.stdout, result.stderr
    losses = {}
    for name in ("best.pt", "best.int8.pt"):
        result = run_cli("--evaluate", "--checkpoint", tmp / "out" / name, "--data", tmp / "play.txt")
        assert result.returncode == 0, result.stderr
        losses[name] = float(result.stdout.split("full validation loss ")[1].split()[0])
    assert abs(losses["best.int8.pt"] - losses["best.pt"]) < 0.02
    result = run_cli("--generate", "--checkpoint", tmp / "out" / "best.pt", "--quantize", "int8",
                     "--benchmark", "--num-chars", 30)
    assert result.returncode == 0 and "int8" in result.stdout and "with the KV cache" in result.stdout


def test_cli_fine_tunes_a_checkpoint_on_new_text(trained_run):
    tmp, _ = trained_run
    (tmp / "new.txt").write_text("QUEEN: 1, 2, 3 (and 4)!\n" * 200, encoding="utf-8")
    result = run_cli("--init-from", tmp / "out" / "best.pt", "--data", tmp / "new.txt", "--out-dir",
                     tmp / "tuned", "--max-steps", 10, "--quiet")
    assert result.returncode == 0, result.stderr
    chars = tinyllm.load_tokenizer(tmp / "tuned" / "tokenizer.json").chars
    assert chars[:len(set(prepare_text(PLAY)))] == sorted(set(prepare_text(PLAY))) and "4" in chars


def test_cli_plots_an_existing_run(trained_run):
    pytest.importorskip("matplotlib")
    tmp, _ = trained_run
    (tmp / "out" / "loss.png").unlink()  # drawn at the end of training; --plot draws it again
    result = run_cli("--plot", "--out-dir", tmp / "out")
    assert result.returncode == 0 and (tmp / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_refuses_to_overwrite_a_run(trained_run):
    tmp, _ = trained_run
    before = {p.name: p.read_bytes() for p in (tmp / "out").iterdir()}
    result = run_cli("--data", tmp / "play.txt", "--out-dir", tmp / "out", "--size", "tiny")
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp / "out").iterdir()} == before


def test_cli_benchmark_prints_throughput(tmp_path):
    (tmp_path / "play.txt").write_text(PLAY)
    result = run_cli("--benchmark", "--data", tmp_path / "play.txt", "--size", "tiny", "--max-context", 32)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stdout and "MFU" in result.stdout and not list(tmp_path.glob("out*"))


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
             "--epochs": 10_000, "--max-steps": 600, "--val-frequency": 50, "--checkpoint-frequency": 20,
             "--sample-frequency": 250, "--seed": 5, **changes}
    return [*(str(part) for item in flags.items() for part in item), "--quiet", "--no-compile"]


def test_a_run_killed_with_sigkill_resumes_to_bitwise_the_same_weights(tmp_path):
    args = long_run_args(tmp_path)
    whole = run_cli(*args, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    cut = tmp_path / "cut"
    process = start_cli(*args, "--out-dir", cut)
    wait_for(lambda: (cut / "last.pt").exists())
    time.sleep(random.uniform(0.0, 0.5))  # a random step after the first checkpoint
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = tinyllm.load_checkpoint(cut / "last.pt").step
    assert 20 <= killed_at < 600
    resumed = run_cli("--resume", "--out-dir", cut, "--data", tmp_path / "play.txt", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (tinyllm.load_checkpoint(d / "last.pt") for d in (tmp_path / "whole", cut))
    assert a.step == b.step == 600, f"killed at step {killed_at}"
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), f"{name} differs (killed at step {killed_at})"
    for key in ("full_val_loss", "best_val_loss", "final_val_loss", "steps", "tokens_seen", "sample"):
        assert json.loads((cut / "summary.json").read_text())[key] == \
            json.loads((tmp_path / "whole" / "summary.json").read_text())[key]
    rows = [[(r["step"], r["train_loss"], r["val_loss"]) for r in csv.DictReader(open(d / "metrics.csv"))]
            for d in (tmp_path / "whole", cut)]
    assert rows[0] == rows[1] and len(rows[0]) == 12  # no row lost or logged twice


def test_resuming_keeps_the_time_already_spent_and_refuses_other_text(tmp_path):
    config = tiny_config(tmp_path, max_steps=30, checkpoint_frequency=10, time_budget=100.0)
    first = tinyllm.Trainer(config, PLAY, progress=False, quiet=True)
    first.train()
    resumed = tinyllm.Trainer(TrainingConfig(out_dir=config.out_dir, compile=False), PLAY, progress=False,
                              resume=True)
    assert resumed.step == 30 and resumed.config.time_budget == 100.0
    assert resumed.elapsed_before > 0 and resumed.config.n_embd == 32
    with pytest.raises(TinyLLMError, match="the text differs"):
        tinyllm.Trainer(TrainingConfig(out_dir=config.out_dir, compile=False), PLAY + "more", progress=False,
                        resume=True)


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_last_pt_and_says_how_to_resume(tmp_path, signal_number, exit_code):
    out = tmp_path / "out"
    process = start_cli(*long_run_args(tmp_path, **{"--max-steps": 10**6}), "--out-dir", out)
    metrics = out / "metrics.csv"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 1)
    process.send_signal(signal_number)
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr + stdout
    stopped_at = tinyllm.load_checkpoint(out / "last.pt").step
    log = (out / "tinyllm_training.log").read_text()
    assert f"stopped by {signal.Signals(signal_number).name} after step {stopped_at}" in log
    assert "--resume" in log
    assert stopped_at >= 50 and not (out / "summary.json").exists()


def test_a_loss_that_becomes_nan_stops_the_run_and_spares_the_checkpoints(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, max_steps=100, val_frequency=10, checkpoint_frequency=10)
    trainer = tinyllm.Trainer(config, PLAY, progress=False, quiet=True)
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda x, y, lr: real_step(x, y, lr) * (
        math.nan if trainer.step + 1 == 25 else 1.0))
    with pytest.raises(TinyLLMError, match="loss became nan at step 25"):
        trainer.train()
    for name in ("best.pt", "last.pt"):
        saved = tinyllm.load_checkpoint(tmp_path / "out" / name)
        assert saved.step == 20 and all(torch.isfinite(p).all() for p in saved.model.parameters())


def test_cli_stops_an_exploding_run_with_exit_code_2(tmp_path):
    (tmp_path / "noclip.json").write_text('{"grad_clip": null, "warmup_steps": 0}')
    args = long_run_args(tmp_path, **{"--learning-rate": 1e9, "--config": tmp_path / "noclip.json"})
    result = run_cli(*args, "--out-dir", tmp_path / "out")
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
    (["--data", "short.txt", "--overwrite"], "text too short"),
    (["--data", ".", "--overwrite"], "is a directory"),
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
    (["--data", "play.txt", "--size", "tiny"], "pass --resume to continue it"),
    (["--generate"], "best.pt cannot be loaded safely: it is truncated, corrupted or not a PyTorch"),
    (["--generate", "--checkpoint", "best.pt"], "no checkpoint at"),
    (["--generate", "--checkpoint", "model.pt", "--prompt", "ROMEO: ¿sé?"], "never saw"),
    (["--generate", "--checkpoint", "model.pt", "--temperature", "0"], "temperature must be positive"),
    (["--data", "play.txt", "--resume"], "nothing to resume"),
    (["--data", "play.txt", "--resume", "--epochs", "3"], "--resume continues a run with the settings"),
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
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=10), PLAY, progress=False, quiet=True).train()
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


def test_a_checkpoint_whose_config_and_weights_disagree_is_refused(tmp_path):
    model = tiny_model(vocab_size=5, n_layer=2, n_head=2, n_embd=16)
    config = TrainingConfig(model_size="tiny", n_layer=3, n_embd=16, max_context=16)
    tinyllm.save_checkpoint(tmp_path / "odd.pt", model, None, config, CharacterTokenizer("abcde"))
    with pytest.raises(TinyLLMError, match="odd.pt is inconsistent: its config has n_layer 3"):
        tinyllm.load_checkpoint(tmp_path / "odd.pt")


# ---------------------------------------------------------------------------------------------
# More than one process: torchrun and DistributedDataParallel (gloo on the CPU)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_step_in_process(rank, world_size, port, batch_size, out_dir, result_path):
    """Runs in a spawned process: one forward and backward pass of a Trainer, as under torchrun."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    config = TrainingConfig(model_size="tiny", max_context=32, batch_size=batch_size, compile=False,
                            device="cpu", out_dir=out_dir)
    trainer = tinyllm.Trainer(config, PLAY, progress=False, quiet=True)
    loader = tinyllm.epoch_loader(trainer.train_ids, 32, batch_size, trainer.generator, trainer.rank,
                                  trainer.world_size)
    x, y = next(iter(loader))
    loss = trainer.train_model(x, y)[1]
    loss.backward()  # DistributedDataParallel averages the gradients here
    mean_loss = trainer.mean_over_processes(loss, 1)
    if rank == 0:
        grads = {name: p.grad for name, p in trainer.model.named_parameters()}
        torch.save({"loss": mean_loss, "grads": grads}, result_path)
    del trainer, loader, loss  # DistributedDataParallel goes before the process group it uses
    gc.collect()
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    results = {}
    for world_size, batch_size in [(1, 16), (2, 8)]:
        path = tmp_path / f"{world_size}.pt"
        args = (world_size, free_port(), batch_size, str(tmp_path / "out"), str(path))
        torch.multiprocessing.spawn(first_step_in_process, nprocs=world_size, args=args)
        results[world_size] = torch.load(path)
    one, two = results[1], results[2]
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)
    for name, grad in one["grads"].items():
        assert torch.allclose(two["grads"][name], grad, atol=1e-5), name


def torchrun(*args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(SCRIPT), *map(str, args), "--no-compile"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_trains_with_one_writer_and_a_checkpoint_one_process_loads(tmp_path):
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    result = torchrun("--data", tmp_path / "play.txt", "--out-dir", tmp_path / "out", "--size", "tiny",
                      "--max-context", 32, "--batch-size", 8, "--max-steps", 20, "--val-frequency", 10,
                      "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {"best.pt", "last.pt", "tokenizer.json", "config.json", "tinyllm_training.log", "metrics.csv",
                "samples.txt", "summary.json"}
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert expected <= names and not [name for name in names if name.endswith(".tmp")], (names, result.stderr)
    log = (tmp_path / "out" / "tinyllm_training.log").read_text()
    assert "batch 8 per process x 2 processes = 16" in log, log
    assert log.count("stopped after 20 steps") == 1, log
    assert len(list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))) == 2
    checkpoint = tinyllm.load_checkpoint(tmp_path / "out" / "last.pt")
    assert checkpoint.step == 20
    assert tinyllm.generate(checkpoint.model, torch.zeros(1, 1, dtype=torch.long), 5).shape == (1, 6)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["tokens_seen"] == 20 * 16 * 32


def test_a_failing_process_ends_the_whole_job_with_the_error_printed_once(tmp_path):
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    started = time.monotonic()
    result = torchrun("--data", tmp_path / "play.txt", "--out-dir", tmp_path / "out", "--size", "huge")
    assert result.returncode != 0 and time.monotonic() - started < 120
    assert result.stderr.count("unknown model size 'huge'") == 1
