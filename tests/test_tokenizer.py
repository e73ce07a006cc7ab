"""Tokenizer (issue 3, "Proof required"): from tokenizer files equivalent to the vocab-only
`ggml-vocab-gemma-4.gguf`, the converted GGUF tokenizes every `.inp` string to its `.out` ids in llama.cpp,
and its token arrays equal the vocab-only file's.

No Gemma 4 tokenizer files are on disk, so `write_tokenizer_files` rebuilds them from the vocab-only GGUF
(tokens, merges, special tokens, chat template) as a `tokenizers` BPE with byte fallback; that HF tokenizer
itself reproduces every `.out` vector, which is what makes the files equivalent. A tiny checkpoint with the
real 262144-token vocabulary is converted twice: with `tokenizer_from=` the vocab-only GGUF, and from the files.
"""

import json

import pytest

import tiny
from dglocal.convert import convert
from dglocal.runtime.gguf import read_header
from dglocal.runtime.upstream import sdist_file

pytestmark = pytest.mark.slow  # the real Gemma 4 tokenizer rebuilt: the full tier

N_VOCAB = 262144
VECTORS = "vendor/llama.cpp/models/ggml-vocab-gemma-4.gguf"
# Gemma4Model.set_vocab turns these special tokens USER_DEFINED; in the HF files they are special like the rest
VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
CONTROL, USER_DEFINED = 3, 4


def read_vectors() -> list[tuple[str, list[int]]]:
    """(text, ids) pairs as llama.cpp's tests/test-tokenizer-0.cpp reads them: `.inp` strings separated by
    "\\n__ggml_vocab_test__\\n", one line of space-separated ids per string in `.out`."""
    with open(sdist_file(VECTORS + ".inp"), encoding="utf-8", newline="") as f:
        texts = f.read().split("\n__ggml_vocab_test__\n")
    with open(sdist_file(VECTORS + ".out"), encoding="utf-8") as f:
        ids = [[int(t) for t in line.split()] for line in f.read().splitlines()]
    assert len(texts) == len(ids) > 40
    return list(zip(texts, ids))


def write_tokenizer_files(vocab_gguf, directory):
    """tokenizer.json, tokenizer_config.json and chat_template.jinja equivalent to a vocab-only gemma4 GGUF:
    SentencePiece-style BPE (spaces -> U+2581 by the normalizer, no pre-tokenizer, byte fallback <0xXX>)."""
    kv = read_header(vocab_gguf).kv
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    special = [i for i, t in enumerate(tokens) if types[i] == CONTROL or (types[i] == USER_DEFINED and t in VISIBLE)]
    model = {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
             "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
             "vocab": {t: i for i, t in enumerate(tokens)},
             "merges": [m.split(" ", 1) for m in kv["tokenizer.ggml.merges"]]}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": model,
    }
    ids = {k: kv[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "unknown", "padding", "mask")}
    named = {"bos_token": tokens[ids["bos"]], "eos_token": tokens[ids["eos"]], "unk_token": tokens[ids["unknown"]],
             "pad_token": tokens[ids["padding"]], "mask_token": tokens[ids["mask"]]}
    config = {"tokenizer_class": "GemmaTokenizer", **named,
              "extra_special_tokens": [tokens[i] for i in special if tokens[i] not in named.values()]}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "chat_template.jinja").write_text(kv["tokenizer.chat_template"], encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint with the real vocabulary size and the rebuilt Gemma 4 tokenizer files."""
    model = tiny.tiny_model(seed=0, vocab_size=N_VOCAB)
    directory = tiny.save_checkpoint(model, tmp_path_factory.mktemp("tok") / "ck")
    return write_tokenizer_files(tiny.vocab_gguf(), directory)


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory):
    """source -> f16 GGUF converted with the tokenizer from the vocab-only GGUF or from the files."""
    out = tmp_path_factory.mktemp("tok-gguf")
    return {"gguf": convert(checkpoint, out / "from-gguf.gguf", "f16", tokenizer_from=tiny.vocab_gguf()).path,
            "files": convert(checkpoint, out / "from-files.gguf", "f16").path}


def test_rebuilt_files_reproduce_the_vectors(checkpoint):
    """The rebuilt files are the real tokenizer as far as the vectors tell: HF tokenizers gives every .out."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    for text, ids in read_vectors():
        assert tok.encode(text, add_special_tokens=False).ids == ids, repr(text)


@pytest.mark.parametrize("source", ["gguf", "files"])
def test_token_arrays_equal_the_vocab_only_file(converted, source):
    """Every tokenizer.* key (tokens, scores, types, merges, special ids, flags, chat template): same value,
    same GGUF type, same order."""
    got, want = read_header(converted[source]), read_header(tiny.vocab_gguf())
    keys = [k for k in want.kv if k.startswith("tokenizer.")]
    assert [k for k in got.kv if k.startswith("tokenizer.")] == keys
    for key in keys:
        assert got.kv_types[key] == want.kv_types[key], key
        assert got.kv[key] == want.kv[key], key
    assert len(got.kv["tokenizer.ggml.tokens"]) == N_VOCAB


@pytest.mark.backend
@pytest.mark.parametrize("source", ["gguf", "files"])
def test_llama_cpp_tokenizes_the_vectors(converted, source):
    """As llama.cpp's test-tokenizer-0 does: add_special=false, parse_special=false."""
    import dglocal

    with dglocal.load(converted[source], n_ctx=64, kv_type="f32", flash_attn=False, n_threads=2) as m:
        assert m.n_vocab == N_VOCAB
        for text, ids in read_vectors():
            assert m.tokenize(text, add_special=False, parse_special=False) == ids, repr(text)
        assert m.tokenize("Hello", add_special=True) == [2, *m.tokenize("Hello", add_special=False)]  # add_bos
        turn = m.tokenize("<|turn>user\nHi<turn|>", add_special=False, parse_special=True)
        assert turn[0] == 105 and turn[-1] == 106 and m.eos_ids == (1, 106, 50)
