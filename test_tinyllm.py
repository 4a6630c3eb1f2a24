"""Tests of the core, tinyllm.py, alone: properties (hypothesis), behaviour, and a run of the file
copied into an empty folder. test_tinyllm_plugins.py tests the plug-in modules and the command line."""
import csv
import dataclasses
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import tinyllm
from tinyllm import (CharacterTokenizer, TinyLLMError, TokenWindows, TrainingConfig, TransformerModel,
                     prepare_text)

ROOT = Path(__file__).resolve().parent
FAST = settings(max_examples=25, deadline=None)

# A small text with Shakespeare's shape: names, colons, line breaks, repetition.
PLAY = ("ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
        "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n\n") * 40


def tiny_model(vocab_size=11, max_context=16, n_layer=2, n_head=2, n_embd=16, seed=0):
    torch.manual_seed(seed)
    model = TransformerModel(vocab_size, max_context, n_layer, n_head, n_embd).eval()
    with torch.no_grad():  # a trained model's token shift and gates: a new model's zeros would hide mistakes
        model.token_shift.uniform_(-1, 1)
        for block in model.blocks:
            block.attn.gate.weight.normal_(0, 1)
    return model


def tiny_config(tmp_path, **overrides):
    fields = dict(model_size="tiny", max_context=32, batch_size=8, val_frequency=10, compile=False,
                  device="cpu", sample_frequency=1000, sample_length=20, out_dir=str(tmp_path / "out"))
    return TrainingConfig(**{**fields, **overrides})


# ---------------------------------------------------------------------------------------------
# Registries and the character tokenizer


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
    ({"optimizer": "sgd"}, "unknown optimizer 'sgd'; choose one of: adamw, muon"),
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
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.json"
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
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
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
    with pytest.raises(TinyLLMError, match="^config file .* is a folder; name a JSON file$"):
        TrainingConfig.from_json(tmp_path)
    (tmp_path / "c.json").write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)  # json's decoder recurses
    with pytest.raises(TinyLLMError, match="config file .*c.json is nested too deeply to read"):
        TrainingConfig.from_json(tmp_path / "c.json")
    (tmp_path / "t.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TinyLLMError, match="tokenizer file .*t.json is nested too deeply to read"):
        tinyllm.load_tokenizer(tmp_path / "t.json")


# ---------------------------------------------------------------------------------------------
# Data and batching


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
    with pytest.raises(TinyLLMError, match="text too short: 100 characters give 90 training and 10 "
                                           ".* a smaller `max_context`"):  # the field, not a flag
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


# ---------------------------------------------------------------------------------------------
# The model


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


def test_one_static_cache_serves_the_whole_generation_and_every_step_of_it_goes_through_decode_step():
    model, calls = tiny_model(), []  # max_context 16: the window jumps to the newest 8 tokens

    def step(tokens, positions, cache, race, **sampling):
        calls.append((tokens.shape[1], positions.tolist(), tuple(cache.keys[1].shape), id(cache)))
        assert race.shape == (2, 11) and sampling == {"temperature": 1.0, "top_k": 1, "top_p": None}
        return tinyllm.next_token(model, tokens, positions, cache, race, **sampling)
    idx = torch.randint(11, (2, 5))
    out = tinyllm.generate(model, idx, 40, top_k=1, decode_step=step)
    assert torch.equal(out, tinyllm.generate(model, idx, 40, top_k=1, use_cache=False))
    # The prompt fills positions 0-4 in one step, each jump fills 0-7 again in one, then a token a step.
    expected = [list(range(5)), *[[p] for p in range(5, 16)]]
    expected += 4 * [list(range(8)), *[[p] for p in range(8, 16)]]
    assert [positions for _, positions, _, _ in calls] == expected[:40]
    assert [length for length, *_ in calls] == [len(positions) for positions in expected[:40]]
    assert {cache_shape for _, _, cache_shape, _ in calls} == {(2, 2, 16, 8)}
    assert len({cache for *_, cache in calls}) == 1


def test_sampling_with_a_seed_is_reproducible_with_or_without_the_cache():
    model = tiny_model()
    idx = torch.zeros(1, 1, dtype=torch.long)
    runs = [tinyllm.generate(model, idx, 50, temperature=1.5, top_p=0.9, use_cache=use_cache,
                             generator=torch.Generator().manual_seed(7)) for use_cache in (True, False)]
    assert torch.equal(*runs)


def test_tokens_come_in_growing_blocks_and_a_seed_gives_the_same_first_tokens_however_many_are_asked():
    model, idx = tiny_model(), torch.zeros(2, 3, dtype=torch.long)
    blocks = list(tinyllm.generate_blocks(model, idx, 40, generator=torch.Generator().manual_seed(3)))
    assert [tuple(block.shape) for block in blocks] == [(2, n) for n in (1, 2, 4, 8, 16, 9)]
    longer = torch.cat(blocks, dim=1)
    for count in (1, 5, 23):  # each ends inside a block
        shorter = tinyllm.generate(model, idx, count, generator=torch.Generator().manual_seed(3))
        assert torch.equal(shorter[:, 3:], longer[:, :count])
    tokens = list(tinyllm.generate_tokens(model, idx, 7, generator=torch.Generator().manual_seed(3)))
    assert [tuple(t.shape) for t in tokens] == 7 * [(2, 1)]
    assert torch.equal(torch.cat(tokens, dim=1), longer[:, :7])


def test_top_k_and_top_p_sample_only_from_the_allowed_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)

    def draw(**kw):
        return {tinyllm.sample_next(logits, generator=generator, **kw).item() for _ in range(300)}
    assert draw(top_k=2) == {0, 1}
    assert draw(top_p=0.8) == {0, 1}  # 0.5 + 0.3 reaches 0.8: the nucleus is two tokens
    assert draw(top_p=0.81) == {0, 1, 2}
    assert draw(top_p=0.1) == {0}  # the most likely token is always kept
    assert draw() == {0, 1, 2, 3}


def test_sampling_draws_tokens_at_their_probabilities_and_as_torch_multinomial_does():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]]).expand(4000, -1)
    tokens = tinyllm.sample_next(probs.log(), generator=torch.Generator().manual_seed(0))
    shares = torch.bincount(tokens.flatten(), minlength=5) / len(tokens)
    assert torch.allclose(shares, probs[0], atol=0.025) and shares[4] == 0
    # the same generator state gives the very tokens torch.multinomial gives (sampled as before)
    expected = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(tinyllm.sample_next(probs.log(), generator=torch.Generator().manual_seed(1)), expected)


def test_a_tiny_temperature_samples_the_most_likely_token_instead_of_failing():
    logits = torch.tensor([[1.0, 3.0, 2.0], [-5.0, -9.0, -6.0]])
    for temperature in (1e-40, 1e-300, 5e-324):
        assert tinyllm.sample_next(logits, temperature=temperature).flatten().tolist() == [1, 0]
    tokenizer = CharacterTokenizer().fit(prepare_text(PLAY))
    text = tinyllm.sample_text(tiny_model(tokenizer.vocab_size), tokenizer, "romeo", 30, temperature=1e-40)
    assert len(text) == len("romeo") + 30


@pytest.mark.parametrize("options, message", [
    (dict(temperature=0), "`temperature` must be positive"), (dict(temperature=-1.0), "`temperature` must"),
    (dict(top_k=0), "`top_k` must be a positive whole number"), (dict(top_p=0.0), "`top_p` must be in"),
    (dict(top_p=1.5), "`top_p` must be in"), (dict(temperature="hot"), "`temperature` must .* got 'hot'"),
    (dict(top_k=1.5), "`top_k` must be a positive whole number, got 1.5"),
    (dict(top_p="0.9"), "`top_p` must")])
def test_generate_refuses_bad_sampling_settings(options, message):
    with pytest.raises(TinyLLMError, match=message):
        tinyllm.generate(tiny_model(), torch.zeros(1, 1, dtype=torch.long), 3, **options)


@pytest.mark.parametrize("idx, max_new_tokens, message", [
    (torch.zeros(1, 0, dtype=torch.long), 3, r"at least one token, as torch.long; got shape \(1, 0\)"),
    (torch.zeros(3, dtype=torch.long), 3, r"of shape \(batch, tokens\).*got shape \(3,\)"),
    (torch.zeros(1, 3), 3, "got shape .* of torch.float32"),
    (torch.tensor([[1, 99]]), 3, r"outside the model's vocabulary \[0, 30\): 1 to 99"),
    (torch.tensor([[-1, 2]]), 3, "outside the model's vocabulary"),
    (torch.zeros(1, 2, dtype=torch.long), -1, "max_new_tokens must be a whole number, zero or more, got -1"),
    (torch.zeros(1, 2, dtype=torch.long), 2.5, "max_new_tokens must be a whole number, .* got 2.5")])
def test_generate_refuses_a_prompt_it_cannot_continue_in_one_line(idx, max_new_tokens, message):
    with pytest.raises(TinyLLMError, match=message):
        tinyllm.generate(tiny_model(30), idx, max_new_tokens)
    assert tinyllm.generate(tiny_model(30), torch.tensor([[29], [0]]), 0).tolist() == [[29], [0]]  # the edges


LONG = dict(dtype=torch.long)


@pytest.mark.parametrize("idx, targets", [(torch.zeros(1, 3), None), (torch.zeros(3, **LONG), None),
                                          (torch.zeros(1, 3, **LONG), torch.zeros(1, 4, **LONG))])
def test_the_model_refuses_inputs_of_the_wrong_shape_or_type_in_one_line(idx, targets):
    with pytest.raises(TinyLLMError, match=r"idx must be token ids of shape \(batch, tokens\), as "
                                           r"torch.long, and targets the same shape; got \("):
        tiny_model(30)(idx, targets)


def test_a_file_is_never_written_over_a_folder(tmp_path):
    with pytest.raises(TinyLLMError, match=f"{tmp_path} is a folder; name a file to write"):
        CharacterTokenizer().fit("abc").save_state(tmp_path)
    assert list(tmp_path.iterdir()) == [] and not list(tmp_path.parent.glob(f".{tmp_path.name}.*"))


def test_a_tokenizer_refuses_ids_outside_its_vocabulary_and_the_trainer_text_it_cannot_read(tmp_path):
    tokenizer = CharacterTokenizer().fit("abc")
    assert tokenizer.decode([0, 2]) == "ac"
    for ids in ([3], [-1, 0]):  # -1 would have counted from the end: 'c'
        with pytest.raises(TinyLLMError, match=r"token ids outside the tokenizer's vocabulary \[0, 3\): "):
            tokenizer.decode(ids)
    config = tiny_config(tmp_path, out_dir=None)
    for text, val_text in ((b"bytes", None), (PLAY, b"bytes"), (12345, None)):
        with pytest.raises(TinyLLMError, match="the text must be a string .* or a data source"):
            tinyllm.Trainer(config, text, val_text=val_text, quiet=True)


@pytest.mark.parametrize("fields, message", [
    ({"vocab_size": 0}, "'vocab_size' must be a whole number of at least 1, got 0"),
    ({"n_layer": 0}, "'n_layer' must be"), ({"n_embd": -4, "n_head": 2}, "'n_embd' must be"),
    ({"max_context": 8.0}, "'max_context' must be .* got 8.0"), ({"n_head": True}, "'n_head' must be"),
    ({"dropout": 1.0}, r"'dropout' must be in \[0, 1\), got 1.0"), ({"dropout": "0.1"}, "'dropout' must be")])
def test_a_model_config_out_of_range_is_refused_in_one_line(fields, message):
    with pytest.raises(TinyLLMError, match=message):
        tinyllm.TransformerModel(tinyllm.ModelConfig(**{"vocab_size": 30, **fields}))


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


def test_a_resumed_runs_metrics_lose_the_steps_it_retakes_and_a_broken_file_is_refused_untouched(tmp_path):
    path, columns = tmp_path / "metrics.csv", ("step", "train_loss")
    path.write_text("step,train_loss\n10,3.0\n20,2.5\n30,2.0\n")
    tinyllm.drop_metrics_after(path, 20, columns)
    assert path.read_text() == "step,train_loss\n10,3.0\n20,2.5\n"
    for broken, message in [("step,train_loss\nten,3.0\n", "is malformed .*'ten'"),
                            ("step,train_loss\n" + "1" * 200_000 + ",3.0\n", r"is malformed \(field larger"),
                            ("step,loss\n10,3.0\n", r"is malformed \(its columns are step,loss, not"),
                            ("step,train_loss\n10,3.0,2.9\n", "is malformed .*a row without one value for"),
                            ("step,train_loss\n10\n", "is malformed .*a row without one value for")]:
        path.write_text(broken)
        with pytest.raises(TinyLLMError, match=f"metrics.csv {message}.*; move it away to resume"):
            tinyllm.drop_metrics_after(path, 20, columns)
        assert path.read_text() == broken
    path.write_text("step,train_loss\n10,3.0\n")  # not the columns of the core's metrics.csv, the default
    with pytest.raises(TinyLLMError, match=r"its columns are step,train_loss, not step,epoch,train_loss,"):
        tinyllm.drop_metrics_after(path, 20)
    path.unlink()
    path.mkdir()
    with pytest.raises(TinyLLMError, match=r"cannot read .*metrics.csv \(Is a directory\); move it away"):
        tinyllm.drop_metrics_after(path, 20)


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_training_drives_the_loss_down(tmp_path, optimizer):
    config = tiny_config(tmp_path, max_steps=60, learning_rate=1e-2, warmup_steps=5, optimizer=optimizer)
    summary = tinyllm.Trainer(config, PLAY, quiet=True).train()
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["val_loss"])
    assert summary["steps"] == 60 and summary["stopped_because"] == "max_steps"
    assert last < 0.5 * first and summary["full_val_loss"] < 1.5
    assert summary["best_val_loss"] == pytest.approx(min(float(r["val_loss"]) for r in rows), abs=1e-4)


def test_the_smallest_model_trains_and_samples(tmp_path):
    config = tiny_config(tmp_path, n_layer=1, n_head=1, n_embd=2, max_context=1, max_steps=3)
    summary = tinyllm.Trainer(config, PLAY, quiet=True).train()  # Muon, on a feed-forward 16 wide
    assert summary["steps"] == 3 and math.isfinite(summary["full_val_loss"]) and len(summary["sample"]) == 20


def test_float16_on_a_cpu_trains_with_the_gradient_scaler(tmp_path, recwarn):
    trainer = tinyllm.Trainer(tiny_config(tmp_path, dtype="float16", max_steps=3), PLAY, quiet=True)
    assert trainer.scaler.is_enabled() and math.isfinite(trainer.train()["full_val_loss"])
    assert not [w for w in recwarn if "GradScaler" in str(w.message)]  # once: "CUDA is not available"


@pytest.mark.parametrize("shape", [(24, 64), (64, 24)])
def test_orthogonalize_moves_every_direction_at_nearly_the_same_rate(shape):
    torch.manual_seed(0)
    left, right = (torch.linalg.qr(torch.randn(n, min(shape)))[0] for n in shape)
    update = left @ torch.diag(torch.logspace(0, -1.5, min(shape))) @ right.T  # singular values 1 to 0.03
    result = tinyllm.orthogonalize(update)
    assert result.shape == shape and result.dtype == update.dtype
    assert all(0.7 < value < 1.4 for value in torch.linalg.svdvals(result))
    in_update_directions = left.T @ result @ right  # diagonal: the update's own directions, rescaled
    assert torch.allclose(in_update_directions, in_update_directions.diag().diag(), atol=1e-4)
    other = torch.randn(shape)
    batch = tinyllm.orthogonalize(torch.stack([update, other]))  # each matrix on its own
    assert torch.allclose(batch[0], result, atol=1e-5)
    assert torch.allclose(batch[1], tinyllm.orthogonalize(other), atol=1e-5)


def test_muon_orthogonalises_each_matrix_on_its_own_also_when_stacked_or_batched():
    torch.manual_seed(0)
    shapes = [(8, 3), (4, 3), (3, 5)]
    stacked, same_shape, other_shape = (torch.nn.Parameter(torch.zeros(*shape)) for shape in shapes)
    for weight in (stacked, same_shape, other_shape):
        weight.grad = torch.randn(weight.shape)
    tinyllm.Muon([stacked, same_shape, other_shape], lr=1.0, weight_decay=0.0, momentum=0.0,
                 parts={stacked: 2}).step()  # the three 4 x 3 matrices are orthogonalised in one batch
    for weight, rows in [(stacked, slice(0, 4)), (stacked, slice(4, 8)), (same_shape, slice(0, 4)),
                         (other_shape, slice(0, 3))]:
        expected = -0.2 * math.sqrt(max(weight[rows].shape)) * tinyllm.orthogonalize(weight.grad[rows])
        assert torch.allclose(weight.detach()[rows], expected, atol=1e-5)


def test_muon_momentum_warms_up_from_a_tenth_below_and_a_state_saved_before_it_is_warm():
    weight = torch.nn.Parameter(torch.zeros(4, 3))
    muon = tinyllm.Muon([weight], lr=0.0, momentum=0.95, momentum_warmup=10)
    momenta = []
    for _ in range(12):
        weight.grad = torch.ones(4, 3)
        before = muon.state[weight]["momentum_buffer"].clone() if muon.state[weight] else torch.zeros(4, 3)
        muon.step()  # the buffer moves towards the gradient by 1 - momentum
        momenta.append(1 - (muon.state[weight]["momentum_buffer"][0, 0] - before[0, 0]).item()
                       / (1 - before[0, 0]).item())
    assert momenta[0] == pytest.approx(0.85 + 0.01) and momenta[4] == pytest.approx(0.85 + 0.05)
    assert momenta[9:] == pytest.approx([0.95] * 3)
    resumed = tinyllm.Muon([weight], lr=0.0, momentum=0.95, momentum_warmup=10)
    resumed.load_state_dict(muon.state_dict())
    assert resumed.next_momentum(resumed.param_groups[0], weight) == pytest.approx(0.95)
    saved = muon.state_dict()
    del saved["state"][0]["step"]  # as Muon saved it before the warmup existed
    old = tinyllm.Muon([weight], lr=0.0, momentum=0.95, momentum_warmup=300)
    old.load_state_dict(saved)
    assert old.next_momentum(old.param_groups[0], weight) == pytest.approx(0.95)


def test_muon_takes_the_blocks_matrices_and_adamw_every_other_weight(tmp_path):
    trainer = tinyllm.Trainer(tiny_config(tmp_path, out_dir=None), PLAY, quiet=True)
    muon, adamw = trainer.optimizer.optimizers
    ids = {name: {id(p) for group in o.param_groups for p in group["params"]}
           for name, o in (("muon", muon), ("adamw", adamw))}
    assert isinstance(muon, tinyllm.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert ids["muon"] == {id(p) for p in trainer.model.blocks.parameters() if p.dim() == 2}
    assert ids["muon"] | ids["adamw"] == {id(p) for p in trainer.model.parameters()}
    assert not ids["muon"] & ids["adamw"]
    block = trainer.model.blocks[0]  # queries, keys and values, and the gate and its value, one by one
    assert muon.parts[block.attn.qkv.weight] == 3 and muon.parts[block.ffn.up.weight] == 2
    trainer.optimizer.load_state_dict(trainer.optimizer.state_dict())  # as a resumed run does
    for group in trainer.optimizer.param_groups:  # as the schedule does
        group["lr"] = 0.5
    assert all(group["lr"] == 0.5 for o in trainer.optimizer.optimizers for group in o.param_groups)


def test_a_data_source_may_hand_the_trainer_narrow_token_ids_and_trains_the_same(tmp_path):
    class NarrowIds:  # as a memory-mapped token file gives them: uint8, with progress wrapped
        def prepare(self, config, tokenizer):
            data = tinyllm.prepare_data(config, PLAY, None, tokenizer)
            return dataclasses.replace(data, train_ids=data.train_ids.to(torch.uint8),
                                       val_ids=data.val_ids.to(torch.uint8))
    narrow = tinyllm.Trainer(tiny_config(tmp_path / "a", max_steps=12), NarrowIds(), quiet=True)
    batches = []
    narrow.evaluation_progress = lambda pieces, total: batches.append(total) or pieces
    summary = narrow.train()
    reference = tinyllm.Trainer(tiny_config(tmp_path / "b", max_steps=12), PLAY, quiet=True).train()
    assert summary["full_val_loss"] == reference["full_val_loss"]
    assert batches == [math.ceil(len(narrow.val_ids) // 32 / 8) + 1]  # whole windows, then the tail


def test_early_stopping_ends_a_run_after_patience_validations_without_improvement(tmp_path):
    config = tiny_config(tmp_path, val_frequency=1, early_stopping_patience=2)
    trainer = tinyllm.Trainer(config, PLAY, quiet=True)
    val_losses = iter([2.0, 1.5, 1.6, 1.7, 1.8, 1.9])
    trainer.evaluate = lambda: next(val_losses)
    summary = trainer.train()
    stopped = (summary["stopped_because"], summary["steps"], summary["best_val_loss"])
    assert stopped == ("early_stopping", 4, 1.5)


def test_a_run_ends_after_its_epochs(tmp_path):
    summary = tinyllm.Trainer(tiny_config(tmp_path, epochs=2), PLAY, quiet=True).train()
    steps_per_epoch = (len(PLAY) * 0.9 // 32) // 8
    assert summary["stopped_because"] == "epochs" and summary["epochs_completed"] == 2
    assert 2 * steps_per_epoch - 2 <= summary["steps"] <= 2 * steps_per_epoch


def test_learning_rate_warms_up_holds_then_decays_to_a_tenth(tmp_path):
    trainer = tinyllm.Trainer(tiny_config(tmp_path, max_steps=100, warmup_steps=10, learning_rate=1.0),
                              PLAY, quiet=True)
    rates = []
    for trainer.state.step in range(101):
        rates.append(trainer.learning_rate())
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert rates[9:56] == [1.0] * 47  # stable for half of the 90 steps after warmup
    assert all(a > b for a, b in zip(rates[55:], rates[56:]))  # then a straight decay
    assert rates[100] == pytest.approx(0.03) and rates[82] == pytest.approx(0.03 + 0.97 * (18 / 90) / 0.5)


def test_tokens_per_second_leaves_out_the_warm_up_steps_tokens_as_it_does_its_time(tmp_path):
    one = tinyllm.Trainer(tiny_config(tmp_path, max_steps=1, out_dir=None), PLAY, quiet=True).train()
    assert one["tokens_per_second"] == 0  # its only step was the warm-up: none was timed (not 800,000/s)
    trainer = tinyllm.Trainer(tiny_config(tmp_path, max_steps=4, out_dir=None), PLAY, quiet=True)
    summary = trainer.train()
    assert trainer.clock.untimed_tokens == summary["tokens_seen"] // 4 and summary["tokens_per_second"] > 0


def test_a_time_budget_covers_the_whole_run_and_without_epochs_is_the_stopping_rule(tmp_path):
    config = tiny_config(tmp_path, time_budget=3.0, val_frequency=50)
    summary = tinyllm.Trainer(config, PLAY[:1100], quiet=True).train()  # 3 steps an epoch: a busy machine
    assert summary["stopped_because"] == "time_budget"
    assert summary["epochs_completed"] > 10  # ten epochs would have ended it, were they set
    assert 1.5 < summary["elapsed_seconds"] < 4.5  # generous: this machine's timing is noisy
    assert "no step limit, time budget 3 s" in (tmp_path / "out" / "tinyllm_training.log").read_text()


def test_a_time_budget_reckons_the_work_after_the_last_step_at_the_pace_last_timed(tmp_path, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(tinyllm.time, "perf_counter", lambda: now[0])
    clock = tinyllm.RunClock(100.0, 30_000, sample_tokens=6_000, step_tokens=1_000)
    now[0] += 10.0  # 10 s of training, 20,000 tokens: 2,000 a second
    assert clock.final_seconds(0) == 0.0 and clock.budget_spent(0) == pytest.approx(0.1)  # nothing yet
    guessed = (30_000 + 6_000) / 3_000  # forward passes at 1.5x the training pace
    assert clock.final_seconds(20_000) == pytest.approx(guessed)
    assert clock.budget_spent(20_000) == pytest.approx((10 + 0.5 + guessed) / 100)  # 0.5 s: the next step
    clock.forward_rate = 10_000.0  # timed: counted with a quarter to spare, the sample too until it is timed
    assert clock.final_seconds(20_000) == pytest.approx(1.25 * (30_000 + 6_000) / 10_000)
    clock.sample_seconds, clock.save_seconds = 0.5, 0.2
    assert clock.final_seconds(20_000) == pytest.approx(1.25 * (3.0 + 0.5) + 0.2)
    monkeypatch.undo()

    class AfterStepOne(tinyllm.Callback):
        def __init__(self):
            self.seen = None

        def on_step_end(self, trainer):
            if trainer.state.step == 1:
                self.seen = (trainer.clock.forward_rate, trainer.state.last_val_step)

    seen = AfterStepOne()
    trainer = tinyllm.Trainer(tiny_config(tmp_path, max_steps=3, time_budget=600.0), PLAY, quiet=True,
                              callbacks=[seen])
    trainer.train()
    assert seen.seen[0] > 0 and seen.seen[1] == -1  # timed at the first step, long before a validation
    assert trainer.clock.sample_seconds > 0  # and the final sample's time is kept


def test_the_final_evaluation_of_a_large_split_scores_a_seeded_choice_of_whole_windows(tmp_path):
    model, ids = tiny_model(), torch.randint(11, (16 * 50 + 1,))  # 50 windows of max_context 16
    assert tinyllm.scored_tokens(len(ids), 16, None) == tinyllm.scored_tokens(len(ids), 16, 800) == 800
    assert tinyllm.scored_tokens(len(ids), 16, 170) == 160 and tinyllm.scored_tokens(len(ids), 16, 3) == 16
    part = tinyllm.evaluate_full(model, ids, 8, max_tokens=170, seed=3)
    assert part == tinyllm.evaluate_full(model, ids, 8, max_tokens=170, seed=3)  # the same windows
    assert part != tinyllm.evaluate_full(model, ids, 8)
    windows = TokenWindows(ids, 16)
    chosen = torch.randperm(50, generator=torch.Generator().manual_seed(3))[:10].tolist()
    with torch.no_grad():
        by_hand = sum(model(*windows[[i]])[1].item() for i in chosen) / 10
    assert part == pytest.approx(by_hand, rel=1e-5)
    config = tiny_config(tmp_path, max_steps=2, full_val_tokens=64)
    summary = tinyllm.Trainer(config, PLAY * 3, quiet=True).train()
    assert summary["full_val_tokens"] == 64
    assert "the final evaluation scores 64 of the" in (tmp_path / "out" / "tinyllm_training.log").read_text()


def test_auto_dtype_is_float32_on_a_cpu_whatever_its_flags_say(monkeypatch):
    cpu = torch.device("cpu")
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: True, raising=False)
    assert tinyllm.resolve_dtype("auto", cpu) == (torch.float32, "the safe default on cpu")
    assert tinyllm.resolve_dtype("bfloat16", cpu) == (torch.bfloat16, "asked for")


def test_a_finished_run_is_never_overwritten_by_accident(tmp_path):
    config = tiny_config(tmp_path, max_steps=2)
    tinyllm.Trainer(config, PLAY, quiet=True).train()
    before = (tmp_path / "out" / "best.pt").read_bytes()
    with pytest.raises(TinyLLMError, match="`overwrite` to replace it"):
        tinyllm.Trainer(config, PLAY, quiet=True)
    with pytest.raises(TinyLLMError, match="too short"):  # a failed start leaves the old run alone
        tinyllm.Trainer(config, "too little text", quiet=True, overwrite=True)
    assert (tmp_path / "out" / "best.pt").read_bytes() == before
    tinyllm.Trainer(config, PLAY, quiet=True, overwrite=True).train()


def test_fine_tuning_grows_the_vocabulary_and_keeps_the_old_logits(tmp_path):
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=10), PLAY, quiet=True).train()
    start = tinyllm.load_checkpoint(tmp_path / "out" / "best.pt")
    old_vocab = start.tokenizer.vocab_size
    new_text = PLAY + "\nZOUNDS! Quoth the jester; 42 jokes.\n" * 20
    config = tiny_config(tmp_path, out_dir=str(tmp_path / "tuned"),
                         init_from=str(tmp_path / "out" / "best.pt"), model_size="small", max_context=16,
                         lowercase=False, max_steps=10)
    trainer = tinyllm.Trainer(config, new_text, quiet=True)
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


def test_every_size_builds_and_fields_override_it():
    assert {"tiny", "small", "medium", "large"} <= set(tinyllm.MODEL_SIZES.names())
    config = TrainingConfig(model_size="large", n_layer=3)
    assert (config.n_layer, config.n_head, config.n_embd) == (3, 8, 512)
    assert TransformerModel.from_config(config, 65).num_parameters() > 9_000_000


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
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    del state["config"]["optimizer"]  # as checkpoints from before the setting: they trained with AdamW
    torch.save(state, tmp_path / "old.pt")
    assert tinyllm.load_checkpoint(tmp_path / "old.pt").config.optimizer == "adamw"


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


def test_a_checkpoint_asked_onto_a_device_that_is_not_here_blames_the_device_not_the_file(tmp_path):
    tokenizer = CharacterTokenizer([chr(65 + i) for i in range(30)])
    tinyllm.save_checkpoint(tmp_path / "m.pt", tiny_model(30), None, tiny_config(tmp_path), tokenizer)
    with pytest.raises(TinyLLMError, match=r"unknown device 'gpu'; choose one of: auto, cpu, cuda, mps"):
        tinyllm.load_checkpoint(tmp_path / "m.pt", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(TinyLLMError, match="`device` cuda was asked for but PyTorch cannot see one here"):
            tinyllm.load_checkpoint(tmp_path / "m.pt", device="cuda")
    loaded = tinyllm.load_checkpoint(tmp_path / "m.pt", device=torch.device("cpu"))
    assert loaded.model.config.vocab_size == 30 and loaded.tokenizer.decode([29]) == "^"


class StopAt(tinyllm.Callback):
    """Asks the trainer to stop after `step` (0: before the first step), as a signal handler would."""

    def __init__(self, step):
        self.step = step

    def on_start(self, trainer):
        if self.step == 0:
            trainer.request_stop()

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            trainer.request_stop()


def test_resuming_keeps_the_time_already_spent_and_refuses_other_text(tmp_path):
    config = tiny_config(tmp_path, max_steps=60, checkpoint_frequency=10, time_budget=100.0)
    assert tinyllm.Trainer(config, PLAY, quiet=True, callbacks=[StopAt(30)]).train()["steps"] == 30
    resumed = tinyllm.Trainer(TrainingConfig(out_dir=config.out_dir, compile=False, device="cpu"), PLAY,
                              resume=True)
    assert resumed.state.step == 30 and resumed.config.time_budget == 100.0
    assert resumed.state.elapsed_seconds > 0 and resumed.config.n_embd == 32
    with pytest.raises(TinyLLMError, match="the text differs"):
        tinyllm.Trainer(TrainingConfig(out_dir=config.out_dir, compile=False, device="cpu"), PLAY + "more",
                        resume=True)


def test_a_damaged_best_pt_is_refused_on_resume_and_without_it_the_next_validation_is_the_best(tmp_path):
    config = tiny_config(tmp_path, max_steps=40, checkpoint_frequency=10)
    tinyllm.Trainer(config, PLAY, quiet=True, callbacks=[StopAt(20)]).train()
    out, where = tmp_path / "out", TrainingConfig(out_dir=config.out_dir, compile=False, device="cpu")
    (out / "best.pt").write_bytes((out / "best.pt").read_bytes()[:3000])  # cut short
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with pytest.raises(TinyLLMError, match=r"best.pt cannot be loaded safely: .*; move it away to resume"):
        tinyllm.Trainer(where, PLAY, quiet=True, resume=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "best.pt").unlink()
    summary = tinyllm.Trainer(where, PLAY, quiet=True, resume=True).train()
    best = tinyllm.load_checkpoint(out / "best.pt")
    assert summary["best_step"] == best.step > 20 and summary["best_val_loss"] == best.best_val_loss


class CrashAt(tinyllm.Callback):
    """Ends the run at `step` as a crash or kill -9 would: nothing after the latest last.pt is saved."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer):
        if trainer.state.step == self.step:
            raise RuntimeError("crashed")


def test_a_run_that_crashed_resumes_to_the_same_samples_without_repeating_any(tmp_path):
    config = tiny_config(tmp_path, max_steps=40, checkpoint_frequency=20, sample_frequency=10)
    whole = dataclasses.replace(config, out_dir=str(tmp_path / "whole"))
    tinyllm.Trainer(whole, PLAY, quiet=True).train()
    with pytest.raises(RuntimeError, match="crashed"):  # at step 33, after the sample at step 30
        tinyllm.Trainer(config, PLAY, quiet=True, callbacks=[CrashAt(33)]).train()
    assert tinyllm.load_checkpoint(tmp_path / "out" / "last.pt").step == 20
    tinyllm.Trainer(TrainingConfig(out_dir=config.out_dir, compile=False, device="cpu"), PLAY, quiet=True,
                    resume=True).train()
    samples = (tmp_path / "out" / "samples.txt").read_text()
    assert samples == (tmp_path / "whole" / "samples.txt").read_text()
    assert samples.count("=== step 30 ===") == 1 and samples.count("\n=== ") == 4  # 10, 20, 30, 40, the end


@pytest.mark.parametrize("field", ["token_shift", "attention_gate"])
def test_a_run_saved_before_the_token_shift_or_the_gates_existed_resumes_without_them(tmp_path, field):
    config = tiny_config(tmp_path, max_steps=20, checkpoint_frequency=10)
    shape = dataclasses.replace(config.model_config(len(set(prepare_text(PLAY)))), **{field: False})
    old_model = TransformerModel(shape)
    tinyllm.Trainer(config, PLAY, model=old_model, quiet=True, callbacks=[StopAt(10)]).train()
    path = tmp_path / "out" / "last.pt"
    state = torch.load(path, weights_only=True)
    del state["model_args"][field]  # as such a file has it
    torch.save(state, path)
    old = tinyllm.load_checkpoint(path).model
    names = {"token_shift": "token_shift", "attention_gate": "blocks.0.attn.gate.weight"}
    assert getattr(old.config, field) is False and names[field] not in old.state_dict()
    resumed = tinyllm.Trainer(TrainingConfig(out_dir=config.out_dir, compile=False, device="cpu"), PLAY,
                              resume=True, quiet=True)
    assert getattr(resumed.model.config, field) is False and resumed.train()["steps"] == 20


def test_a_loss_that_becomes_nan_stops_the_run_and_spares_the_checkpoints(tmp_path, monkeypatch):
    config = tiny_config(tmp_path, max_steps=100, val_frequency=10, checkpoint_frequency=10)
    trainer = tinyllm.Trainer(config, PLAY, quiet=True)
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda x, y, lr: real_step(x, y, lr) * (
        math.nan if trainer.state.step + 1 == 25 else 1.0))
    with pytest.raises(TinyLLMError, match="loss became nan at step 25"):
        trainer.train()
    for name in ("best.pt", "last.pt"):
        saved = tinyllm.load_checkpoint(tmp_path / "out" / name)
        assert saved.step == 20 and all(torch.isfinite(p).all() for p in saved.model.parameters())


def test_save_checkpoint_always_writes_one_that_loads_and_a_disagreeing_one_is_refused(tmp_path):
    model = tiny_model(vocab_size=5, n_layer=2, n_head=2, n_embd=16)
    config = TrainingConfig(model_size="tiny", n_layer=3, n_embd=16, max_context=16)
    tinyllm.save_checkpoint(tmp_path / "odd.pt", model, None, config, CharacterTokenizer("abcde"))
    assert tinyllm.load_checkpoint(tmp_path / "odd.pt").config.n_layer == 2  # the weights' own shape
    tinyllm.save_checkpoint(tmp_path / "bare.pt", model, tokenizer=CharacterTokenizer("abcde"))  # no config
    assert tinyllm.load_checkpoint(tmp_path / "bare.pt").model.config == model.config
    with pytest.raises(TinyLLMError, match=r"needs the tokenizer of the model's 5 tokens \(got none\)"):
        tinyllm.save_checkpoint(tmp_path / "none.pt", model)
    assert not (tmp_path / "none.pt").exists()
    edited = torch.load(tmp_path / "odd.pt", weights_only=True)
    edited["config"]["n_layer"] = 3  # a hand-edited file
    torch.save(edited, tmp_path / "odd.pt")
    with pytest.raises(TinyLLMError, match="odd.pt is inconsistent: its config has n_layer 3"):
        tinyllm.load_checkpoint(tmp_path / "odd.pt")


# ---------------------------------------------------------------------------------------------
# The API researchers know, plug-in points, runs in memory, and the core on its own


def test_a_model_builds_from_its_config_and_samples_with_keyword_options_only():
    config = tinyllm.ModelConfig(vocab_size=11, max_context=16, n_layer=1, n_head=2, n_embd=16)
    model = TransformerModel(config)
    assert model.config == config and TransformerModel(11, 16, 1, 2, 16).config == config
    assert TransformerModel.from_config(tiny_config(Path("."), max_context=16), 11).config.n_embd == 32
    idx = torch.zeros(2, 3, dtype=torch.long)
    generator = torch.Generator().manual_seed(1)
    out = model.generate(idx, 5, temperature=0.5, top_k=3, top_p=0.9, generator=generator)
    assert out.shape == (2, 8) and torch.equal(out[:, :3], idx)
    with pytest.raises(TypeError):  # a float can never bind to the generator by position
        tinyllm.generate(model, idx, 5, 1.0, 3)
    with pytest.raises(TypeError):
        model.generate(idx, 5, 0.5)


def test_training_in_memory_writes_nothing_and_runs_again(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(tmp_path, max_steps=20, out_dir=None)
    for _ in range(2):  # a notebook cell run twice
        trainer = tinyllm.Trainer(config, PLAY, quiet=True)
        summary = trainer.train()
        assert summary["steps"] == 20 and math.isfinite(summary["full_val_loss"])
    assert list(tmp_path.iterdir()) == []
    # The trainer's model holds the best weights when training ends.
    assert tinyllm.evaluate_full(trainer.model, trainer.val_ids, 8) == pytest.approx(summary["full_val_loss"])
    with pytest.raises(TinyLLMError, match="nothing to resume"):
        tinyllm.Trainer(config, PLAY, quiet=True, resume=True)


def test_a_model_tokenizer_and_validation_text_can_be_handed_to_the_trainer():
    tokenizer = CharacterTokenizer().fit(prepare_text(PLAY + "zebra"))
    model = TransformerModel(tinyllm.ModelConfig(tokenizer.vocab_size, max_context=16, n_layer=1, n_head=2,
                                                 n_embd=16))
    val_text = "JULIET:\nA zebra, Romeo? Wherefore a zebra?\n\n" * 5
    config = tiny_config(Path("."), max_steps=5, out_dir=None)  # its max_context of 32 yields to the model's
    trainer = tinyllm.Trainer(config, PLAY, val_text=val_text, model=model, tokenizer=tokenizer, quiet=True)
    assert trainer.model is model and trainer.tokenizer is tokenizer and trainer.config.max_context == 16
    assert tokenizer.decode(trainer.val_ids.tolist()) == prepare_text(val_text)
    assert tokenizer.decode(trainer.train_ids.tolist()) == prepare_text(PLAY)
    summary = trainer.train()
    assert summary["full_val_bits_per_char"] == pytest.approx(summary["full_val_loss"] / math.log(2))


def test_a_model_with_more_token_ids_than_its_tokenizer_is_refused_before_training(tmp_path):
    tokenizer = CharacterTokenizer().fit(prepare_text(PLAY))  # its checkpoints would not load, its samples
    model = TransformerModel(tinyllm.ModelConfig(tokenizer.vocab_size + 5, max_context=16, n_layer=1,  # fail
                                                 n_head=2, n_embd=16))
    n = tokenizer.vocab_size
    with pytest.raises(TinyLLMError, match=f"the model has {n + 5} token ids but the tokenizer {n}; build "
                                           f"it with vocab_size={n}, or pass the tokenizer it was built for"):
        tinyllm.Trainer(tiny_config(tmp_path), PLAY, model=model, tokenizer=tokenizer, quiet=True)
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]


def test_a_tokenizer_registered_without_a_type_name_round_trips_through_a_checkpoint(tmp_path):
    @tinyllm.TOKENIZERS.register("reversed")
    class ReversedTokenizer(CharacterTokenizer):  # inherits no type_name of its own: not "char"
        def encode(self, text):
            return super().encode(text[::-1])

        def decode(self, ids):
            return super().decode(ids)[::-1]
    try:
        tinyllm.Trainer(tiny_config(tmp_path, tokenizer="reversed", max_steps=3), PLAY, quiet=True).train()
        loaded = tinyllm.load_checkpoint(tmp_path / "out" / "best.pt")
        assert type(loaded.tokenizer) is ReversedTokenizer and ReversedTokenizer.type_name == "reversed"
        from_file = tinyllm.load_tokenizer(tmp_path / "out" / "tokenizer.json")
        assert type(from_file) is ReversedTokenizer
        assert from_file.encode("romeo") == loaded.tokenizer.encode("romeo")
    finally:
        del tinyllm.TOKENIZERS.entries["reversed"]


def test_a_model_size_that_gives_only_some_fields_takes_the_defaults_for_the_rest(tmp_path):
    tinyllm.MODEL_SIZES.register("narrow", {"n_layer": 1, "n_head": 2, "n_embd": 16})
    try:
        config = tiny_config(tmp_path, model_size="narrow", max_steps=3)
        assert (config.n_layer, config.n_embd, config.dropout) == (1, 16, 0.0)
        assert tinyllm.Trainer(config, PLAY, quiet=True).train()["steps"] == 3
    finally:
        del tinyllm.MODEL_SIZES.entries["narrow"]


def test_a_registry_entry_may_name_a_module_imported_on_first_use(tmp_path, monkeypatch):
    (tmp_path / "lazy_sizes.py").write_text('WIDE = {"n_layer": 1, "n_head": 2, "n_embd": 64}\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_sizes", raising=False)
    registry = tinyllm.Registry("model size")
    registry.register("wide", "lazy_sizes:WIDE")
    registry.register("gone", "no_such_module:WIDE")
    assert "lazy_sizes" not in sys.modules and registry.names() == ["gone", "wide"]
    assert registry["wide"]["n_embd"] == 64 and "lazy_sizes" in sys.modules
    with pytest.raises(TinyLLMError, match="model size 'gone' needs no_such_module.py beside tinyllm.py"):
        registry["gone"]
    monkeypatch.delitem(sys.modules, "lazy_sizes")


def test_callbacks_see_each_moment_and_may_stop_the_run_and_add_notes(tmp_path):
    class Recorder(tinyllm.Callback):
        def __init__(self):
            self.seen = []

        def on_start(self, trainer):
            self.seen.append("start")

        def on_step_end(self, trainer):
            self.seen.append("step")
            if trainer.state.step == 15:
                trainer.request_stop()

        def on_validation(self, trainer, row):
            self.seen.append(f"validation {row['step']}")
            return "noted by the recorder"

        def on_stop(self, trainer, reason):
            self.seen.append(f"stop: {reason}")

        def on_end(self, trainer, summary):
            summary["recorded"] = len(self.seen)
            return "the recorder's last word"
    recorder = Recorder()
    config = tiny_config(tmp_path, max_steps=40)
    summary = tinyllm.Trainer(config, PLAY, callbacks=[recorder], quiet=True).train()
    assert recorder.seen == (["start"] + ["step"] * 10 + ["validation 10"] + ["step"] * 5
                             + ["stop: interrupted", "validation 15"])  # a step's end, then its validation
    assert summary["stopped_because"] == "interrupted" and summary["steps"] == 15
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["recorded"] == len(recorder.seen)
    log = (tmp_path / "out" / "tinyllm_training.log").read_text()
    assert "tokens/s, noted by the recorder" in log and "the recorder's last word" in log


def test_a_run_with_no_time_for_one_step_ends_cleanly_and_is_finished(tmp_path):
    config = tiny_config(tmp_path, time_budget=1e-6)
    summary = tinyllm.Trainer(config, PLAY, quiet=True).train()
    assert (summary["steps"], summary["stopped_because"]) == (0, "time_budget")
    assert math.isfinite(summary["full_val_loss"])
    assert tinyllm.load_checkpoint(tmp_path / "out" / "last.pt").step == 0
    where = TrainingConfig(out_dir=config.out_dir, device="cpu", compile=False)
    with pytest.raises(TinyLLMError, match=r"finished at step 0 \(time_budget\); to train on, start a new "
                                           r"run with `init_from` .*best.pt"):
        tinyllm.Trainer(where, PLAY, quiet=True, resume=True)


def test_a_run_stopped_before_its_first_step_resumes_and_keeps_its_files(tmp_path):
    config = tiny_config(tmp_path, max_steps=5)
    assert tinyllm.Trainer(config, PLAY, quiet=True, callbacks=[StopAt(0)]).train()["steps"] == 0
    where = TrainingConfig(out_dir=config.out_dir, device="cpu", compile=False)
    assert tinyllm.Trainer(where, PLAY, quiet=True, resume=True).train()["steps"] == 5
    log = (tmp_path / "out" / "tinyllm_training.log").read_text()
    assert "stopped after 0 steps" in log and "stopped after 5 steps" in log  # nothing was set aside
    samples = (tmp_path / "out" / "samples.txt").read_text()  # but the sample after last.pt came again
    assert samples.count("=== the end") == 1 and "=== the end, from the best model (step 5) ===" in samples


def test_one_run_at_a_time_in_an_out_dir_and_no_temporary_file_left_behind(tmp_path):
    (tmp_path / "out").mkdir()
    stale = tmp_path / "out" / ".last.pt.x1y2z3.tmp"  # what kill -9 leaves in the middle of a write
    stale.write_bytes(b"half a checkpoint")
    refusals = []

    class SecondRun(tinyllm.Callback):
        def on_step_end(self, trainer):
            if trainer.state.step == 3:
                with pytest.raises(TinyLLMError) as refusal:
                    tinyllm.Trainer(tiny_config(tmp_path), PLAY, quiet=True, overwrite=True).train()
                refusals.append(str(refusal.value))
    summary = tinyllm.Trainer(tiny_config(tmp_path, max_steps=6), PLAY, quiet=True,
                              callbacks=[SecondRun()]).train()
    assert summary["steps"] == 6 and tinyllm.load_checkpoint(tmp_path / "out" / "last.pt").step == 6
    assert refusals == [f"{tmp_path / 'out'} is in use by another training run (process {os.getpid()}); "
                        "wait for it to end, or choose another `out_dir`"]
    assert not stale.exists()
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=2), PLAY, quiet=True, overwrite=True).train()  # released


def test_a_folder_or_file_where_the_run_keeps_the_other_is_one_line_and_the_earlier_run_stays(tmp_path):
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=2), PLAY, quiet=True).train()
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / ".replaced").write_text("a note of the user's")  # where an earlier run is set aside
    with pytest.raises(TinyLLMError) as error:
        tinyllm.Trainer(tiny_config(tmp_path, max_steps=2), PLAY, quiet=True, overwrite=True).train()
    assert str(error.value) == (f"cannot use {out / '.replaced'} for the run (a file, where the run keeps a "
                                "folder); move it away, or choose another `out_dir`")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {
        **before, ".replaced": b"a note of the user's"}
    (out / ".replaced").unlink()
    (out / ".tinyllm.lock").unlink()
    (out / ".tinyllm.lock").mkdir()  # where a run takes its lock
    with pytest.raises(TinyLLMError, match=r"cannot use .*\.tinyllm\.lock for the run \(a folder, where "):
        tinyllm.Trainer(tiny_config(tmp_path, max_steps=2), PLAY, quiet=True, overwrite=True).train()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {
        name: data for name, data in before.items() if name != ".tinyllm.lock"}


CORE_ALONE = """
import sys
import tinyllm

config = tinyllm.TrainingConfig(model_size="tiny", max_steps=30, max_context=32, batch_size=8,
                                val_frequency=10, device="cpu", out_dir="run", sample_length=20)
summary = tinyllm.Trainer(config, tinyllm.load_text("play.txt")).train()
checkpoint = tinyllm.load_checkpoint("run/best.pt")
print("SAMPLE", repr(tinyllm.sample_text(checkpoint.model, checkpoint.tokenizer, "ROMEO:", 40, seed=1)))
small = tinyllm.TrainingConfig(model_size="tiny", max_steps=5, max_context=32, device="cpu", out_dir=None)
in_memory = tinyllm.Trainer(small, "To be, or not to be, that is the question. " * 50)
print("STEPS", summary["steps"], in_memory.train()["steps"])
print("PLUG-INS IMPORTED", sorted(name for name in sys.modules if name.startswith("tinyllm_")))
"""


def test_the_core_alone_in_an_empty_folder_trains_and_samples(tmp_path):
    (tmp_path / "tinyllm.py").write_bytes((ROOT / "tinyllm.py").read_bytes())
    (tmp_path / "play.txt").write_text(PLAY, encoding="utf-8")
    (tmp_path / "demo.py").write_text(CORE_ALONE)
    result = subprocess.run([sys.executable, "-E", "demo.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "SAMPLE 'romeo:" in result.stdout and "STEPS 30 5" in result.stdout
    assert "PLUG-INS IMPORTED []" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["__pycache__", "demo.py", "play.txt", "run",
                                                          "tinyllm.py"]
    run_files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"best.pt", "last.pt", "metrics.csv", "summary.json"} <= run_files


def test_untrusted_files_give_one_line_and_no_huge_allocation(tmp_path):
    if Path("/dev/zero").exists():  # read to the end, it would fill the memory
        with pytest.raises(TinyLLMError, match="data path /dev/zero is not a regular file"):
            tinyllm.load_text("/dev/zero")
    config = tiny_config(tmp_path, max_steps=3, checkpoint_frequency=1)
    tinyllm.Trainer(config, PLAY, quiet=True, callbacks=[StopAt(2)]).train()
    saved = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    saved["model"]["lm_head.weight"][0, 0] = math.nan
    torch.save(saved, tmp_path / "nan.pt")
    with pytest.raises(TinyLLMError, match="nan.pt holds NaN or infinite weights"):
        tinyllm.load_checkpoint(tmp_path / "nan.pt")
    saved = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    saved["model"]["lm_head.weight"] = saved["model"]["lm_head.weight"].double()
    torch.save(saved, tmp_path / "double.pt")
    with pytest.raises(TinyLLMError, match="double.pt is inconsistent .*lm_head.weight is torch.float64"):
        tinyllm.load_checkpoint(tmp_path / "double.pt")
    edits = [(lambda s: s.update(version=2),
              r"has format version 2, and this tinyllm .* reads version 1; load it with the tinyllm"),
             (lambda s: s.update(step="two"),
              r"is inconsistent \(step and epoch must be whole numbers and best_val_loss a number, got"),
             (lambda s: s["tokenizer"].update(chars=["a", "a"]),
              r"is inconsistent \(its tokenizer is malformed \('chars' must be a list of distinct"),
             (lambda s: s["model"].update({"lm_head.weight": torch.zeros(3, 3)}),
              r"is inconsistent \(.* size mismatch for lm_head.weight: .* torch.Size\(\[3, 3\]\)")]
    for edit, message in edits:
        saved = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
        edit(saved)
        torch.save(saved, tmp_path / "edited.pt")
        with pytest.raises(TinyLLMError, match=f"^checkpoint .*edited.pt {message}"):
            tinyllm.load_checkpoint(tmp_path / "edited.pt")
    saved = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    saved["training_state"]["epoch_rng_state"] = "not a generator state"
    torch.save(saved, tmp_path / "rng.pt")
    (tmp_path / "rng").mkdir()
    (tmp_path / "rng" / "last.pt").write_bytes((tmp_path / "rng.pt").read_bytes())
    with pytest.raises(TinyLLMError, match="last.pt cannot be resumed from .*random generator states"):
        tinyllm.Trainer(TrainingConfig(out_dir=str(tmp_path / "rng"), device="cpu"), PLAY, resume=True)
    good = (tmp_path / "out" / "last.pt").read_bytes()
    for name, value in (("step", "two"), ("samples_bytes", -1), ("samples_bytes", []),
                        ("untimed_tokens", 2.5)):
        (tmp_path / "out" / "last.pt").write_bytes(good)  # one field wrong at a time
        saved = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
        saved["training_state"][name] = value
        torch.save(saved, tmp_path / "out" / "last.pt")
        before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir())
        with pytest.raises(TinyLLMError, match="last.pt cannot be resumed from .*whole numbers"):
            tinyllm.Trainer(TrainingConfig(out_dir=config.out_dir, device="cpu"), PLAY, resume=True)
        assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "out").iterdir()) == before


def test_overwrite_keeps_the_earlier_run_until_the_new_one_has_a_checkpoint(tmp_path, monkeypatch):
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=10), PLAY, quiet=True).train()
    earlier = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    failing = tinyllm.Trainer(tiny_config(tmp_path, max_steps=20), PLAY, quiet=True, overwrite=True)
    real_step = failing.train_step
    monkeypatch.setattr(failing, "train_step", lambda x, y, lr: real_step(x, y, lr) * (
        math.nan if failing.state.step + 1 == 3 else 1.0))
    with pytest.raises(TinyLLMError, match=r"nan at step 3; .*\(nothing from that step on was saved\)"):
        failing.train()  # before its first checkpoint: the earlier run is put back
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == earlier
    summary = tinyllm.Trainer(tiny_config(tmp_path, max_steps=12), PLAY, quiet=True, overwrite=True).train()
    assert summary["steps"] == 12 and tinyllm.load_checkpoint(tmp_path / "out" / "last.pt").step == 12
    assert not (tmp_path / "out" / ".replaced").exists()


def test_overwriting_a_run_replaces_its_int8_copy_too_which_would_be_of_the_old_model(tmp_path):
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=2), PLAY, quiet=True).train()
    (tmp_path / "out" / "best.int8.pt").write_bytes(b"the earlier model, quantized")
    with pytest.raises(TinyLLMError, match=r"already holds a training run \(best.pt, .*, best.int8.pt\)"):
        tinyllm.Trainer(tiny_config(tmp_path), PLAY, quiet=True)
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=2), PLAY, quiet=True, overwrite=True).train()
    assert not (tmp_path / "out" / "best.int8.pt").exists()


def test_an_earlier_run_set_aside_by_a_killed_overwrite_is_put_back_at_the_next_start(tmp_path):
    tinyllm.Trainer(tiny_config(tmp_path, max_steps=10), PLAY, quiet=True).train()
    out = tmp_path / "out"
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / ".replaced").mkdir()  # what a replacing run killed before its first checkpoint leaves
    for name in earlier:
        (out / name).rename(out / ".replaced" / name)
    (out / "config.json").write_text("{}")  # the replacing run's own start
    with pytest.raises(TinyLLMError, match="already holds a training run"):
        tinyllm.Trainer(tiny_config(tmp_path), PLAY, quiet=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == earlier
    assert not (out / ".replaced").exists()


def test_a_run_refused_before_it_starts_leaves_no_empty_out_dir_behind(tmp_path):
    with pytest.raises(TinyLLMError, match="text too short"):
        tinyllm.Trainer(tiny_config(tmp_path, out_dir=str(tmp_path / "new" / "run")), "too short", quiet=True)
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TinyLLMError, match=r"cannot create output directory .*file/run: .*file is not a dir"):
        tinyllm.Trainer(tiny_config(tmp_path, out_dir=str(tmp_path / "file" / "run")), PLAY, quiet=True)
    summary = tinyllm.Trainer(tiny_config(tmp_path, out_dir=str(tmp_path / "new" / "run"), max_steps=2), PLAY,
                              quiet=True).train()  # made once the run starts
    assert summary["steps"] == 2 and (tmp_path / "new" / "run" / "last.pt").is_file()


@pytest.mark.parametrize("fields", [dict(batch_size=1_000_000), dict(n_embd=100_000, n_head=4),
                                    dict(val_batches=10**9)])
def test_a_run_too_big_for_the_memory_is_refused_before_allocating_it(tmp_path, fields):
    started = time.perf_counter()
    with pytest.raises(TinyLLMError, match=r"this run needs at least [\d,.]+ GiB of memory .* more than the"):
        tinyllm.Trainer(tiny_config(tmp_path, **fields), PLAY, quiet=True)
    assert time.perf_counter() - started < 10


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU (skipped without one)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])  # float16 runs with the gradient scaler
def test_training_on_cuda_in_reduced_precision_lowers_the_loss(tmp_path, dtype):
    config = tiny_config(tmp_path, device="cuda", dtype=dtype, max_steps=60, val_frequency=20)
    summary = tinyllm.Trainer(config, PLAY * 3, quiet=True).train()
    assert summary["device"].startswith("cuda") and summary["dtype"] == dtype
    rows = list(csv.DictReader(open(tmp_path / "out" / "metrics.csv")))
    assert float(rows[-1]["val_loss"]) < float(rows[0]["val_loss"])
    assert math.isfinite(summary["full_val_loss"])


@CUDA
def test_a_cuda_checkpoint_loads_and_samples_on_the_cpu(tmp_path):
    tinyllm.Trainer(tiny_config(tmp_path, device="cuda", max_steps=5), PLAY, quiet=True).train()
    checkpoint = tinyllm.load_checkpoint(tmp_path / "out" / "best.pt", "cpu")
    assert {p.device.type for p in checkpoint.model.parameters()} == {"cpu"}
    text = tinyllm.sample_text(checkpoint.model, checkpoint.tokenizer, "romeo", 20, seed=1)
    assert text.startswith("romeo") and len(text) == 25


@CUDA
def test_cached_generation_on_cuda_matches_full_recomputation_in_float32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # a Trainer on CUDA turns it on
    model = tiny_model(13, 16, 2, 2, 16, seed=3).cuda()
    idx = torch.randint(13, (2, 5), device="cuda")
    cached = tinyllm.generate(model, idx, 40, top_k=1)
    assert cached.device.type == "cuda"
    assert torch.equal(cached, tinyllm.generate(model, idx, 40, top_k=1, use_cache=False))
