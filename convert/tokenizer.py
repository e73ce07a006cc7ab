"""The Gemma 4 tokenizer, written as llama.cpp's own Gemma 4 conversion writes it.

Two sources: the checkpoint's tokenizer files (mirrors conversion/gemma.py Gemma4Model.set_vocab,
through gguf-py's LlamaHfVocab + SpecialVocab), or every `tokenizer.*` key of another GGUF copied
verbatim with its value types (`--tokenizer-from`).
"""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFValueType, GGUFWriter, LlamaHfVocab, SpecialVocab, TokenType

from dglocal.errors import ConvertError

from ..gguf_read import read_header

# Gemma4Model.set_vocab: always render these tokens so the chat parser can read them.
VISIBLE_TOKENS = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>",
                  "<tool_response|>", '<|"|>'}


def tokenizer_from_gguf(path, vocab_size: int) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """Every tokenizer.* key of a GGUF as (key, value, type, sub_type); the vocabulary must have `vocab_size` tokens."""
    header = read_header(path)
    tokens = header.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ConvertError(f"{path}: no tokenizer.ggml.tokens, not a GGUF with a tokenizer")
    if header.get("tokenizer.ggml.model") != "gemma4":
        raise ConvertError(f"{path}: tokenizer.ggml.model is {header.get('tokenizer.ggml.model')!r}, expected 'gemma4'")
    if len(tokens) != vocab_size:
        raise ConvertError(f"{path}: tokenizer has {len(tokens)} tokens, the checkpoint's vocab_size is {vocab_size}")
    return [(k, v, *header.kv_types[k]) for k, v in header.kv.items() if k.startswith("tokenizer.")]


def tokenizer_from_files(directory: Path, vocab_size: int) -> tuple[LlamaHfVocab, SpecialVocab]:
    """Read tokenizer.json (+ tokenizer_config.json, chat template) as llama.cpp's Gemma 4 conversion does."""
    if not (directory / "tokenizer.json").is_file():
        raise ConvertError(f"{directory}: no tokenizer.json (give a tokenizer with --tokenizer-from FILE.gguf)")
    try:
        vocab = LlamaHfVocab(directory)  # needs transformers (AutoTokenizer)
    except ImportError as e:
        raise ConvertError(f"{directory}: reading tokenizer.json needs transformers ({e}); "
                           "or give --tokenizer-from FILE.gguf") from e
    except (FileNotFoundError, TypeError, ValueError, KeyError) as e:
        raise ConvertError(f"{directory / 'tokenizer.json'}: not a Gemma 4 BPE tokenizer ({e})") from e
    if vocab.vocab_size != vocab_size:
        raise ConvertError(f"{directory / 'tokenizer.json'}: {vocab.vocab_size} tokens, "
                           f"the checkpoint's vocab_size is {vocab_size}")
    return vocab, SpecialVocab(directory, load_merges=True)


def write_tokenizer(w: GGUFWriter, source) -> None:
    """Write a tokenizer got from tokenizer_from_gguf or tokenizer_from_files."""
    if isinstance(source, list):
        for key, value, vtype, sub in source:
            w.add_key_value(key, value, vtype, sub)
        return
    vocab, special = source
    tokens, scores, types = [], [], []
    for text, score, toktype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(TokenType.USER_DEFINED if text.decode() in VISIBLE_TOKENS else toktype)
    w.add_tokenizer_model("gemma4")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    special.add_to_gguf(w)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)
