"""The tokenizer: Gemma 4's, written as llama.cpp's own Gemma 4 conversion writes it, or a small WordLevel one.

Three sources: the checkpoint's Gemma 4 tokenizer files (mirrors conversion/gemma.py Gemma4Model.set_vocab,
through gguf-py's LlamaHfVocab + SpecialVocab); a WordLevel tokenizer.json (the Sudoku model's), written as a
`gpt2` BPE vocabulary without merges; or every `tokenizer.*` key of another GGUF copied verbatim with its value
types (`--tokenizer-from`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFValueType, GGUFWriter, LlamaHfVocab, SpecialVocab, TokenType

from dglocal.errors import ConvertError
from dglocal.runtime.checks import is_integer

from dglocal.runtime.gguf import read_header

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


# llama.cpp has no WordLevel model. A BPE vocabulary without merges tokenizes exactly like one as long as every
# word is one character or one special token: each character is looked up on its own, specials are matched whole.
# llama.cpp requires the merges key and gguf-py cannot write an empty array, so the list holds one merge of two
# multi-character strings: BPE merges pair adjacent symbols that start as single characters, so it never fires.
INERT_MERGE = "<pad> <pad>"


@dataclass(frozen=True)
class WordLevelVocab:
    """A WordLevel tokenizer.json: one token string per id; special (added, `special`) tokens are CONTROL."""
    tokens: list[str]
    types: list[TokenType]
    special: SpecialVocab


def _is_id(value) -> bool:
    return is_integer(value) and value >= 0


def word_level_vocab(directory: Path, vocab_size: int) -> WordLevelVocab | None:
    """The vocabulary of a WordLevel tokenizer.json, or None if the file holds another model type."""
    from .source import read_json

    path = directory / "tokenizer.json"
    data = read_json(path)
    model = data.get("model") or {}
    if not isinstance(model, dict):
        raise ConvertError(f"{path}: 'model' must be an object, got {type(model).__name__}")
    if model.get("type") != "WordLevel":
        return None
    vocab, added_tokens = model.get("vocab") or {}, data.get("added_tokens") or []
    if not isinstance(vocab, dict) or not all(_is_id(i) and isinstance(t, str) for t, i in vocab.items()):
        raise ConvertError(f"{path}: model.vocab must map token strings to integer ids")
    if not isinstance(added_tokens, list) or not all(
            isinstance(a, dict) and _is_id(a.get("id")) and isinstance(a.get("content"), str) for a in added_tokens):
        raise ConvertError(f"{path}: added_tokens must be objects with an integer 'id' and a string 'content'")
    by_id: dict[int, str] = {i: text for text, i in vocab.items()}
    special = set()
    for added in added_tokens:
        by_id[added["id"]] = added["content"]
        if added.get("special"):
            special.add(added["id"])
    if sorted(by_id) != list(range(vocab_size)):
        raise ConvertError(f"{path}: WordLevel ids are not 0..{vocab_size - 1} (the checkpoint's vocab_size is "
                           f"{vocab_size}); got {len(by_id)} ids, {min(by_id, default=0)}..{max(by_id, default=-1)}")
    tokens = [by_id[i] for i in range(vocab_size)]
    if len(set(tokens)) != vocab_size:
        raise ConvertError(f"{path}: WordLevel vocabulary has duplicate token strings")
    long_words = [t for i, t in enumerate(tokens) if i not in special and len(t) != 1]
    if long_words:  # without merges BPE only ever yields single characters and whole special tokens
        raise ConvertError(f"{path}: WordLevel tokens must be single characters or special tokens, "
                           f"got {long_words[:5]}")
    types = [TokenType.CONTROL if i in special else TokenType.NORMAL for i in range(vocab_size)]
    return WordLevelVocab(tokens, types, SpecialVocab(directory, load_merges=False, n_vocab=vocab_size))


def tokenizer_from_files(directory: Path, vocab_size: int) -> tuple[LlamaHfVocab, SpecialVocab] | WordLevelVocab:
    """Read tokenizer.json (+ tokenizer_config.json, chat template) as llama.cpp's Gemma 4 conversion does;
    a WordLevel tokenizer.json gives a WordLevelVocab instead."""
    if not (directory / "tokenizer.json").is_file():
        raise ConvertError(f"{directory}: no tokenizer.json (give a tokenizer with --tokenizer-from FILE.gguf)")
    word_level = word_level_vocab(directory, vocab_size)
    if word_level is not None:
        return word_level
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
        tokens = next((value for key, value, _, _ in source if key == "tokenizer.ggml.tokens"), [])
        _add_mask_id(w, tokens)
        return
    if isinstance(source, WordLevelVocab):
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(source.tokens)
        w.add_token_types(source.types)
        w.add_token_merges([INERT_MERGE])
        source.special.add_to_gguf(w)  # bos/eos/pad/unk ids and the chat template
        w.add_add_bos_token(True)  # the chat template leaves BOS to the tokenizer, as Gemma 4's does
        w.add_add_eos_token(False)
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
    _add_mask_id(w, [t.decode() for t in tokens])
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)


def _add_mask_id(w: GGUFWriter, tokens) -> None:
    """tokenizer.ggml.mask_token_id for a vocabulary with a `<mask>` token (Gemma 4: id 4), if the source did not
    give one: llama.cpp's DiffusionGemma readers refuse files without it."""
    key = "tokenizer.ggml.mask_token_id"
    if any(key in kv for kv in w.kv_data):
        return
    ids = [i for i, t in enumerate(tokens) if t == "<mask>"]
    if ids:
        w.add_mask_token_id(ids[0])
