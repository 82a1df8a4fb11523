"""Tests for edgelm.runtime against transformers on a tiny random Llama exported to ONNX."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgelm.runtime import Generator, IncrementalDecoder, SamplingSettings, StopStringFilter, read_manifest, resolve_providers
from edgelm.runtime.sampling import next_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "What is 2+2?",
    "Write a haiku about the sea.",
    "Tom has 3 apples and buys 5 more. How many apples does he have?",
]

CHATS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You solve math problems."}, {"role": "user", "content": "What is 7*6?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello, how can I help?"},
        {"role": "user", "content": "Say 'héllo 日本' back."},
    ],
]


@pytest.fixture(scope="session")
def runtime_model_dir(tiny_model_factory) -> Path:
    # initializer_range 0.3 makes the random model pick varied tokens; with the default 0.02
    # greedy decoding repeats one token, and the comparisons below would prove little.
    return tiny_model_factory("llama", initializer_range=0.3)


KV_KINDS = ["dynamic", "buffer", "buffer-new"]


@pytest.fixture(scope="session")
def export_dirs(runtime_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The tiny model exported once per KV cache interface, built on first use."""
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            out = tmp_path_factory.mktemp(f"runtime-export-{kind}") / "onnx"
            if kind == "dynamic":
                pytest.importorskip("edgelm.export.onnx_export").export_onnx(runtime_model_dir, out, check=False)
            else:
                pytest.importorskip("edgelm.export.kv_buffer").export_kv_buffer(runtime_model_dir, out, layout=kind)
            built[kind] = out
        return built[kind]

    return get


@pytest.fixture(scope="session", params=KV_KINDS)
def export_dir(export_dirs, request) -> Path:
    return export_dirs(request.param)


@pytest.fixture(scope="session")
def dynamic_export_dir(export_dirs) -> Path:
    return export_dirs("dynamic")


@pytest.fixture(scope="session")
def generator(export_dir) -> Generator:
    return Generator.from_pretrained(export_dir, intra_op_threads=1)


@pytest.fixture(scope="session")
def hf_model(runtime_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(runtime_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(runtime_model_dir)
    return model, tokenizer


def run_python(code: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT.parent), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, *(["-c", code] if code else []), *args],
        input=stdin, capture_output=True, text=True, timeout=120, env=env,
    )


# ----- imports -------------------------------------------------------------------------------


def test_runtime_imports_without_torch(export_dir):
    # A meta path finder that fails every torch or transformers import, as on a device where
    # they are not installed.
    code = textwrap.dedent(f"""
        import sys

        class BlockTorch:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError(f"{{name}} is blocked by the test")
                return None

        sys.meta_path.insert(0, BlockTorch())
        for name in [n for n in sys.modules if n.split(".")[0] in ("torch", "transformers")]:
            del sys.modules[name]
        from edgelm.runtime import Generator
        gen = Generator.from_pretrained({str(export_dir)!r}, intra_op_threads=1)
        ids = gen.generate_ids(gen.encode_prompt("hi"), max_new_tokens=3)
        assert len(ids[0]) >= 1, ids
        loaded = [name for name in sys.modules if name.startswith(("torch.", "transformers."))]
        assert not loaded, loaded
        print("ok")
    """)
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# Top-level packages that edgelm.runtime may import beyond the standard library: its four
# dependencies, jinja2's markupsafe, and the edgelm package itself.
RUNTIME_ALLOWED_PACKAGES = {"edgelm", "numpy", "onnxruntime", "tokenizers", "jinja2", "markupsafe"}


def test_runtime_imports_only_its_dependencies(dynamic_export_dir):
    code = textwrap.dedent(f"""
        import sys
        before = set(sys.modules)
        from edgelm.runtime import Generator
        gen = Generator.from_pretrained({str(dynamic_export_dir)!r}, intra_op_threads=1)
        gen.generate("hi", max_new_tokens=2)
        new = {{name.split(".")[0] for name in set(sys.modules) - before}}
        # cython_runtime and _cython_* are module objects that numpy's compiled extensions create.
        new = {{name for name in new if name != "cython_runtime" and not name.startswith("_cython")}}
        print(" ".join(sorted(new - set(sys.stdlib_module_names) - {{"_distutils_hack"}})))
    """)
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    third_party = set(result.stdout.split())
    assert third_party <= RUNTIME_ALLOWED_PACKAGES, sorted(third_party - RUNTIME_ALLOWED_PACKAGES)


# ----- prompts and chat template -------------------------------------------------------------


@pytest.mark.parametrize("messages", CHATS, ids=["user", "system", "multi-turn"])
def test_chat_template_matches_transformers(generator, hf_model, messages):
    _, tokenizer = hf_model
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert generator.apply_chat_template(messages) == expected


@pytest.mark.parametrize("messages", CHATS, ids=["user", "system", "multi-turn"])
def test_prompt_ids_match_transformers(generator, hf_model, messages):
    _, tokenizer = hf_model
    expected = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert generator.encode_prompt(messages) == list(expected)


def test_string_prompt_is_user_message(generator):
    assert generator.encode_prompt("Hello!") == generator.encode_prompt([{"role": "user", "content": "Hello!"}])


def test_chat_template_raise_exception(generator):
    from edgelm.runtime import ChatTemplateError
    from edgelm.runtime.chat_template import render_chat_template

    template = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok"
    assert render_chat_template(template, [{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ChatTemplateError, match="first message must be from the user"):
        render_chat_template(template, [{"role": "assistant", "content": "x"}])


# ----- greedy decoding against transformers ------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(generator, hf_model, prompt):
    import torch

    model, _ = hf_model
    ids = generator.encode_prompt(prompt)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=20, do_sample=False,
        )
    expected = out[0, len(ids):].tolist()
    assert generator.generate_ids(ids, max_new_tokens=20) == [expected]


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_matches_transformers(generator, hf_model, penalty):
    import torch

    model, _ = hf_model
    ids = generator.encode_prompt(PROMPTS[1])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=16, do_sample=False, repetition_penalty=penalty)
    expected = out[0, len(ids):].tolist()
    assert generator.generate_ids(ids, max_new_tokens=16, repetition_penalty=penalty) == [expected]


def test_score_matches_transformers(generator, hf_model):
    import torch

    model, _ = hf_model
    ids = generator.encode_prompt(PROMPTS[2])
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    logits = generator.score(ids)
    assert logits.shape == (len(ids), generator.manifest.vocab_size)
    np.testing.assert_allclose(logits, expected, atol=1e-3, rtol=1e-3)


def test_batch_matches_one_by_one(generator):
    batch = [generator.encode_prompt(p) for p in PROMPTS]
    assert len({len(ids) for ids in batch}) > 1, "prompts must differ in length to test left padding"
    singles = [generator.generate_ids(ids, max_new_tokens=12)[0] for ids in batch]
    assert generator.generate_ids(batch, max_new_tokens=12) == singles


def test_generate_batch_text_matches_generate(generator):
    expected = [generator.generate(p, max_new_tokens=12) for p in PROMPTS]
    assert generator.generate_batch(PROMPTS, max_new_tokens=12) == expected


def test_ignore_eos_generates_exact_count(generator):
    ids = generator.encode_prompt(PROMPTS[0])
    first = generator.generate_ids(ids, max_new_tokens=6)[0]
    # Treat the third greedy token as end of turn: without ignore_eos generation would stop there.
    eos_generator = with_eos(generator, first[2])
    assert len(eos_generator.generate_ids(ids, max_new_tokens=6, ignore_eos=True)[0]) == 6


def test_on_token_sees_every_token(generator):
    ids = generator.encode_prompt(PROMPTS[0])
    seen = []
    out = generator.generate_ids(ids, max_new_tokens=5, on_token=lambda row, token: seen.append((row, token)))
    assert seen == [(0, token) for token in out[0]]


# ----- stopping ------------------------------------------------------------------------------


def with_eos(generator: Generator, token_id: int) -> Generator:
    manifest = dataclasses.replace(generator.manifest, eos_token_ids=(token_id,))
    return Generator(generator.session, generator.tokenizer, manifest, generator.chat_template, generator.special_tokens)


def test_stops_at_eos(generator):
    ids = generator.encode_prompt(PROMPTS[1])
    free = generator.generate_ids(ids, max_new_tokens=20)[0]
    eos = free[5]
    stop_at = free.index(eos)
    out = with_eos(generator, eos).generate_ids(ids, max_new_tokens=20)[0]
    assert out == free[: stop_at + 1]


def test_eos_not_in_text(generator):
    ids = generator.encode_prompt(PROMPTS[1])
    free = generator.generate_ids(ids, max_new_tokens=20)[0]
    eos_generator = with_eos(generator, free[5])
    stop_at = free.index(free[5])
    assert eos_generator.generate(PROMPTS[1], max_new_tokens=20) == generator.decode(free[:stop_at])


def test_batch_rows_stop_independently(generator):
    batch = [generator.encode_prompt(p) for p in PROMPTS[:2]]
    free = generator.generate_ids(batch, max_new_tokens=10)
    eos = free[0][3]
    eos_generator = with_eos(generator, eos)
    out = eos_generator.generate_ids(batch, max_new_tokens=10)
    for row in range(2):
        expected = free[row][: free[row].index(eos) + 1] if eos in free[row] else free[row]
        assert out[row] == expected


def test_stop_string_cuts_text(generator):
    full = generator.generate(PROMPTS[2], max_new_tokens=20)
    assert len(full) > 12, f"need a longer reply to pick a stop string from: {full!r}"
    stop = full[8:12]
    expected = full[: full.index(stop)]
    assert generator.generate(PROMPTS[2], max_new_tokens=20, stop=[stop]) == expected
    assert generator.generate_batch([PROMPTS[2]], max_new_tokens=20, stop=[stop]) == [expected]
    # A bare string is one stop string, not one per character.
    assert generator.generate(PROMPTS[2], max_new_tokens=20, stop=stop) == expected


def test_stop_filter_across_pieces():
    stop_filter = StopStringFilter(["</answer>"])
    emitted = [stop_filter.push(piece) for piece in ["The answer is 4<", "/ans", "wer> and more"]]
    assert "".join(emitted) == "The answer is 4"
    assert stop_filter.stopped
    assert emitted[0] == "The answer is 4", "the possible start of a stop string must be held back"
    assert stop_filter.flush() == ""


def test_stop_filter_releases_false_start():
    stop_filter = StopStringFilter(["</answer>"])
    text = stop_filter.push("a </an") + stop_filter.push("d b")
    assert text + stop_filter.flush() == "a </and b"
    assert not stop_filter.stopped


# ----- streaming -----------------------------------------------------------------------------


def test_stream_pieces_join_to_text(generator):
    pieces = list(generator.stream(PROMPTS[1], max_new_tokens=20))
    assert len(pieces) > 1
    ids = generator.generate_ids(generator.encode_prompt(PROMPTS[1]), max_new_tokens=20)[0]
    assert "".join(pieces) == generator.decode(ids)
    assert "".join(pieces) == generator.generate(PROMPTS[1], max_new_tokens=20)


def test_incremental_decoder_multibyte(generator):
    text = "héllo 日本語 🙂 naïve — done"
    ids = generator.tokenizer.encode(text, add_special_tokens=False).ids
    decoder = IncrementalDecoder(generator.tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(ids) > len(text.split()), "the text should split characters over several tokens"


# ----- sampling ------------------------------------------------------------------------------


def test_sampling_seed_reproducible(generator):
    ids = generator.encode_prompt(PROMPTS[0])
    first = generator.generate_ids(ids, max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.95, seed=123)
    second = generator.generate_ids(ids, max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.95, seed=123)
    other = generator.generate_ids(ids, max_new_tokens=15, temperature=1.0, top_k=50, top_p=0.95, seed=124)
    assert first == second
    assert first != other


def test_top_k_one_is_greedy(generator):
    ids = generator.encode_prompt(PROMPTS[0])
    greedy = generator.generate_ids(ids, max_new_tokens=10)
    assert generator.generate_ids(ids, max_new_tokens=10, temperature=0.7, top_k=1, seed=0) == greedy


def test_top_k_and_top_p_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    top_k = {int(next_tokens(logits, SamplingSettings(1.0, top_k=2), rng)[0]) for _ in range(200)}
    assert top_k == {0, 1}
    top_p = {int(next_tokens(logits, SamplingSettings(1.0, top_p=0.7), rng)[0]) for _ in range(200)}
    assert top_p == {0, 1}
    top_p_small = {int(next_tokens(logits, SamplingSettings(1.0, top_p=0.1), rng)[0]) for _ in range(50)}
    assert top_p_small == {0}


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(temperature=float("inf")), dict(top_k=-1),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=float("nan"))])
def test_invalid_sampling_settings(generator, kwargs):
    with pytest.raises(ValueError):
        generator.generate("hi", max_new_tokens=2, **kwargs)


def test_invalid_max_new_tokens(generator):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate_ids([1, 2, 3], max_new_tokens=-1)


def test_zero_new_tokens(generator):
    assert generator.generate_ids([[1, 2], [3]], max_new_tokens=0) == [[], []]


def test_empty_prompt_rejected(generator):
    with pytest.raises(ValueError, match="at least one token"):
        generator.generate_ids([[1, 2], []], max_new_tokens=2)


def test_token_ids_outside_vocab_rejected(generator):
    vocab_size = generator.manifest.vocab_size
    with pytest.raises(ValueError, match=f"outside \\[0, {vocab_size}\\)"):
        generator.generate_ids([1, vocab_size], max_new_tokens=1)
    with pytest.raises(ValueError, match=f"outside \\[0, {vocab_size}\\)"):
        generator.score([1, -1])
    logits, cache = generator.prefill([1, 2, 3])
    with pytest.raises(ValueError, match="must be in \\[0"):
        generator.decode_step(cache, np.array([vocab_size]))


def test_prefill_and_decode_accept_flat_ids(generator):
    logits, cache = generator.prefill([1, 2, 3])
    assert logits.shape == (1, generator.manifest.vocab_size)
    assert generator.decode_step(cache, 5).shape == (1, generator.manifest.vocab_size)


def test_numpy_integer_max_new_tokens(generator):
    assert len(generator.generate_ids([1, 2], max_new_tokens=np.int64(3), ignore_eos=True)[0]) == 3


def test_negative_seed_rejected(generator):
    with pytest.raises(ValueError, match="seed=-1 must be a non-negative integer"):
        generator.generate("hi", max_new_tokens=2, temperature=1.0, seed=-1)


def test_empty_message_list_rejected(generator):
    with pytest.raises(ValueError, match="empty list of messages"):
        generator.generate([], max_new_tokens=2)


def test_message_without_content_rejected(generator):
    with pytest.raises(ValueError, match="message 1 is .*'role' and 'content'"):
        generator.generate([{"role": "user", "content": "hi"}, {"role": "user"}], max_new_tokens=2)


# ----- loading -------------------------------------------------------------------------------


def test_manifest_fields(export_dir, runtime_model_dir):
    import json

    config = json.loads((runtime_model_dir / "config.json").read_text())
    manifest = read_manifest(export_dir)
    assert manifest.num_layers == config["num_hidden_layers"]
    assert manifest.num_kv_heads == config["num_key_value_heads"]
    assert manifest.vocab_size == config["vocab_size"]


def test_manifest_wrong_format(tmp_path):
    (tmp_path / "edgelm_export.json").write_text('{"format": "other", "format_version": 1}')
    with pytest.raises(ValueError, match="format is 'other'"):
        read_manifest(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="export_onnx"):
        Generator.from_pretrained(tmp_path)


def test_missing_export_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="export folder .*nope not found"):
        Generator.from_pretrained(tmp_path / "nope")


def test_unknown_keyword_is_type_error(dynamic_export_dir):
    with pytest.raises(TypeError, match="unknown keyword arguments \\['thread'\\]"):
        Generator.from_pretrained(dynamic_export_dir, thread=2)


def test_provider_aliases():
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers("CPUExecutionProvider") == ["CPUExecutionProvider"]
    assert resolve_providers([("cpu", {})]) == [("CPUExecutionProvider", {})]


def test_invalid_provider_entry():
    with pytest.raises(ValueError, match="provider entry 3 is invalid"):
        resolve_providers([3])


def test_provider_with_options_loads(dynamic_export_dir):
    generator = Generator.from_pretrained(dynamic_export_dir, providers=[("cpu", {})], threads=1)
    assert generator.session.get_providers() == ["CPUExecutionProvider"]


def test_missing_provider_lists_available():
    with pytest.raises(ValueError, match="available providers: .*CPUExecutionProvider"):
        resolve_providers(["no-such-provider"])


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_export_generates(export_dir, tmp_path, scheme):
    quantize = pytest.importorskip("edgelm.export.quantize").quantize
    out = tmp_path / scheme
    quantize(export_dir, out, scheme, check=False)
    quantized = Generator.from_pretrained(out, intra_op_threads=1)
    assert quantized.manifest.variant == scheme
    ids = quantized.encode_prompt(PROMPTS[0])
    assert len(quantized.generate_ids(ids, max_new_tokens=5, ignore_eos=True)[0]) == 5
    assert quantized.score(ids).shape == (len(ids), quantized.manifest.vocab_size)


@pytest.mark.parametrize("broken_file, content, message", [
    ("model.onnx", b"not a protobuf", "onnxruntime could not load"),
    ("tokenizer.json", b"{broken", "invalid tokenizer file"),
    ("edgelm_export.json", b"{broken", "invalid JSON"),
    ("chat_template.jinja", b"{% for %}", "invalid chat template"),
])
def test_corrupt_export_file_is_one_clear_error(export_dir, tmp_path, broken_file, content, message):
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(export_dir, copy)
    (copy / broken_file).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        Generator.from_pretrained(copy).generate("hi", max_new_tokens=1)


def test_context_length_limits_prompt_and_new_tokens(export_dir, caplog):
    generator = Generator.from_pretrained(export_dir, intra_op_threads=1)
    assert generator.context_length == 512  # the tiny test model's max_position_embeddings
    generator.context_length = 40
    with pytest.raises(ValueError, match="more than the model's context length 40"):
        generator.generate_ids([list(range(1, 42))], max_new_tokens=1)
    out = generator.generate_ids([list(range(1, 31))], max_new_tokens=50, ignore_eos=True)
    assert len(out[0]) == 10
    assert "would pass the context length 40" in caplog.text
    caplog.clear()
    with pytest.raises(ValueError, match="more than the model's context length 40"):
        generator.generate_ids([list(range(1, 42))], max_new_tokens=5)
    assert "would pass the context length" not in caplog.text
    with pytest.raises(ValueError, match="more than the model's context length 40"):
        generator.score(list(range(1, 42)))


# ----- fixed-capacity KV cache ---------------------------------------------------------------


@pytest.fixture(scope="session")
def dynamic_generator(dynamic_export_dir) -> Generator:
    return Generator.from_pretrained(dynamic_export_dir, intra_op_threads=1)


def test_manifest_records_kv_cache_kind(export_dir):
    kind = read_manifest(export_dir).kv_cache
    assert kind in KV_KINDS
    generator = Generator.from_pretrained(export_dir, threads=1)
    assert generator.decoder.kind == kind


def test_buffer_cache_is_updated_in_place(export_dirs, dynamic_generator):
    generator = Generator.from_pretrained(export_dirs("buffer"), threads=1)
    ids = generator.encode_prompt(PROMPTS[0])
    logits, cache = generator.prefill([ids], capacity=len(ids) + 4)
    buffers = {name: array.ctypes.data for name, array in cache.past.items()}
    token = logits.argmax(-1)
    logits = generator.decode_step(cache, token).copy()

    name = "past_key_values.0.key"
    assert {n: a.ctypes.data for n, a in cache.past.items()} == buffers, "decode replaced a cache buffer"
    assert cache.values[name].data_ptr() == buffers[name], "the bound OrtValue does not share the numpy buffer"
    assert np.abs(cache.past[name][0, :, len(ids)]).sum() > 0, "the new key was not written at its slot"
    assert np.abs(cache.past[name][0, :, len(ids) + 1:]).sum() == 0, "slots past the new token changed"
    expected_logits, expected_cache = dynamic_generator.prefill([ids])
    expected = dynamic_generator.decode_step(expected_cache, expected_logits.argmax(-1))
    np.testing.assert_allclose(logits, expected, atol=1e-4)


@pytest.mark.parametrize("kind", ["buffer", "buffer-new"])
def test_buffer_cache_grows_past_capacity(export_dirs, dynamic_generator, kind):
    generator = Generator.from_pretrained(export_dirs(kind), threads=1)
    ids = generator.encode_prompt(PROMPTS[2])
    logits, cache = generator.prefill([ids], capacity=len(ids) + 2)
    tokens = []
    for _ in range(6):
        token = logits.argmax(-1)
        tokens.append(int(token[0]))
        logits = generator.decode_step(cache, token)
    assert cache.capacity >= len(ids) + 6
    assert tokens == dynamic_generator.generate_ids(ids, max_new_tokens=6, ignore_eos=True)[0]


def test_export_kv_buffer_rejects_unknown_layout(runtime_model_dir, tmp_path):
    export_kv_buffer = pytest.importorskip("edgelm.export.kv_buffer").export_kv_buffer
    with pytest.raises(ValueError, match="layout='ring'"):
        export_kv_buffer(runtime_model_dir, tmp_path / "out", layout="ring")


def test_export_kv_buffer_qwen2_parity(tiny_model_factory, tmp_path):
    export_kv_buffer = pytest.importorskip("edgelm.export.kv_buffer").export_kv_buffer
    manifest = export_kv_buffer(tiny_model_factory("qwen2"), tmp_path / "qwen2", check=True)
    assert manifest["parity"]["passed"], manifest["parity"]
    assert manifest["kv_cache"] == "buffer"


def test_unknown_kv_cache_kind_rejected(dynamic_export_dir, tmp_path):
    import json
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(dynamic_export_dir, copy)
    manifest = json.loads((copy / "edgelm_export.json").read_text())
    manifest["kv_cache"] = "paged"
    (copy / "edgelm_export.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="kv_cache 'paged' is not supported"):
        read_manifest(copy)


def test_kv_cache_kind_must_match_graph(export_dirs, tmp_path):
    import json
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(export_dirs("buffer"), copy)
    manifest = json.loads((copy / "edgelm_export.json").read_text())
    manifest["kv_cache"] = "dynamic"
    (copy / "edgelm_export.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="has inputs .*'cache_position'.* that kv_cache='dynamic'"):
        Generator.from_pretrained(copy)


# ----- session options and backends ----------------------------------------------------------


def test_session_options_keep_output(dynamic_export_dir, dynamic_generator, tmp_path):
    tuned = Generator.from_pretrained(dynamic_export_dir, threads=1, allow_spinning=False, memory_arena=False,
                                      optimization_level="extended", profile_prefix=str(tmp_path / "profile"))
    ids = tuned.encode_prompt(PROMPTS[0])
    assert tuned.generate_ids(ids, max_new_tokens=5) == dynamic_generator.generate_ids(ids, max_new_tokens=5)
    assert Path(tuned.session.end_profiling()).is_file()


def test_invalid_optimization_level(dynamic_export_dir):
    with pytest.raises(ValueError, match="optimization_level='fast'"):
        Generator.from_pretrained(dynamic_export_dir, optimization_level="fast")


def test_both_provider_keywords_rejected(dynamic_export_dir):
    with pytest.raises(TypeError, match="either providers or provider"):
        Generator.from_pretrained(dynamic_export_dir, providers="cpu", provider="cpu")


def test_cann_needs_static_export(dynamic_export_dir):
    with pytest.raises(ValueError, match="only on the static Ascend export"):
        Generator.from_pretrained(dynamic_export_dir, provider="cann")


def test_missing_cuda_names_package():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="Install onnxruntime-gpu"):
        resolve_providers("cuda")


def test_om_backend_names_what_to_install(tmp_path):
    import importlib.util

    from edgelm.runtime.static import OmGraphs

    if importlib.util.find_spec("ais_bench") is not None:
        pytest.skip("ais_bench is installed here")
    with pytest.raises(ImportError, match="needs ais_bench"):
        OmGraphs(tmp_path, {"prefill_om": "prefill.om", "decode_om": "decode.om"})
    with pytest.raises(FileNotFoundError, match="has no OM files"):
        OmGraphs(tmp_path, {"prefill": "prefill.onnx", "decode": "decode.onnx"})
