"""Tests for tinyllm: properties (hypothesis), behaviour, and the command line end to end."""
import csv
import functools
import hashlib
import http.server
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import threading
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
    with pytest.raises(TinyLLMError, match="unknown tokenizer 'nope'; choose one of: char"):
        tinyllm.load_tokenizer(path)
    path.write_text('{"type": "char", "version": 1, "chars": ["ab"]}')
    with pytest.raises(TinyLLMError, match="malformed"):
        tinyllm.load_tokenizer(path)
    path.write_text('{"type": "char", "vers')
    with pytest.raises(TinyLLMError, match="not valid JSON"):
        tinyllm.load_tokenizer(path)


def test_registry_lists_known_names_on_a_miss():
    assert {"tiny", "small", "medium"} <= set(tinyllm.MODEL_SIZES.names())
    with pytest.raises(TinyLLMError, match="unknown model size 'huge'; choose one of: medium, small, tiny"):
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
    ({"model_size": "huge"}, "unknown model size"),
    ({"tokenizer": "words"}, "unknown tokenizer"),
    ({"device": "tpu"}, "unknown device"),
    ({"dtype": "int4"}, "unknown dtype"),
])
def test_bad_configs_raise_tinyllm_error(fields, message):
    with pytest.raises(TinyLLMError, match=message):
        TrainingConfig.from_dict(fields)


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
        assert torch.equal(x, ids[start:start + context]) and torch.equal(y, ids[start + 1:start + context + 1])


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
    ids = torch.arange(1000)
    train, val = tinyllm.split_train_val(ids, 0.1, 16)
    assert torch.equal(val, torch.arange(900, 1000)) and torch.equal(train, torch.arange(900))
    first = tinyllm.fixed_batches(val, 16, 4, 3, seed=1)
    second = tinyllm.fixed_batches(val, 16, 4, 3, seed=1)
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(first, second))
    with pytest.raises(TinyLLMError, match="text too short"):
        tinyllm.split_train_val(torch.arange(100), 0.1, 16)


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


def test_generate_slides_past_the_context_and_top_k_one_is_greedy():
    model = tiny_model()
    idx = torch.randint(11, (2, 5))
    out = tinyllm.generate(model, idx, 40, top_k=1)
    assert out.shape == (2, 45) and torch.equal(out[:, :5], idx)
    greedy = idx
    for _ in range(40):
        logits, _ = model(greedy[:, -16:])
        greedy = torch.cat([greedy, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, greedy)


@pytest.mark.parametrize("temperature", [0, -1.0])
def test_generate_refuses_a_non_positive_temperature(temperature):
    with pytest.raises(TinyLLMError, match="temperature must be positive"):
        tinyllm.generate(tiny_model(), torch.zeros(1, 1, dtype=torch.long), 3, temperature)


def test_sample_text_prepares_the_prompt_and_is_reproducible():
    tokenizer = CharacterTokenizer().fit(prepare_text(PLAY))
    model = tiny_model(tokenizer.vocab_size)
    first = tinyllm.sample_text(model, tokenizer, "ROMEO:  ", 30, seed=3)
    assert first.startswith("romeo:") and len(first) == len("romeo:") + 30
    assert first == tinyllm.sample_text(model, tokenizer, "ROMEO:  ", 30, seed=3)
    with pytest.raises(TinyLLMError, match="'z'"):
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
    assert (summary["stopped_because"], summary["steps"], summary["best_val_loss"]) == ("early_stopping", 4, 1.5)


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
    assert "torch.compile failed (no C++ compiler found)" in (tmp_path / "out" / "tinyllm_training.log").read_text()


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
    assert tinyllm.resolve_compile(None, cpu, 0, 180.0)[0] and not tinyllm.resolve_compile(False, cpu, 0, 180.0)[0]


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
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": "tinyllm-checkpoint", "x": Boom()}, protocol=2))
    with pytest.raises(TinyLLMError, match="cannot be loaded safely"):
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


def test_cli_generate_prints_a_continuation(trained_run):
    tmp, _ = trained_run
    result = run_cli("--generate", "--out-dir", tmp / "out", "--prompt", "JULIET:", "--num-chars", 50,
                     "--seed", 1)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("juliet:") and len(result.stdout.rstrip("\n")) >= len("juliet:")


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


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "abc"], "invalid int value"),
    (["--batch-size", "-4"], "'batch_size' must be positive"),
    (["--size", "huge"], "unknown model size"),
    (["--data", "no/such/file.txt"], "does not exist"),
    (["--generate", "--checkpoint", "no/such.pt"], "no checkpoint"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, args, message):
    (tmp_path / "play.txt").write_text(PLAY)
    data = [] if "--data" in args or "--generate" in args else ["--data", tmp_path / "play.txt"]
    result = run_cli(*data, *args, "--out-dir", tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
