"""Incremental detokenization against real (small, trained in-test) tokenizers.

Two tokenizer families: GPT-2 style byte-level BPE (SmolLM2, Llama 3, Qwen), and
SentencePiece style (Llama 2, Mistral: "▁" for spaces, byte-fallback tokens for characters
outside the vocabulary, and a decoder that strips the sequence's leading space).
"""
import json
import random

import pytest
from hypothesis import given, settings, strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tidal.engine.detokenizer import IncrementalDetokenizer
from tidal.sampling import SamplingParams

CORPUS = ["héllo wörld 日本語 🙂", "hello world, this is a test.", "the quick brown fox jumps over the lazy dog",
          "日本語のテキスト and émojis 🙂🙃", "wörld héllo again </end> stop"] * 3
# Text drawn from this alphabet mixes characters the vocabulary knows with characters it
# only has bytes for, so multi-byte characters get split across tokens.
ALPHABET = "ab hélo wörd日本語のテキ🙂🙃ñ€,.<>/end"


def _byte_level():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def _sentencepiece_like():
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"])
    trainer_tok.train_from_iterator(CORPUS, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(trained["vocab"], key=trained["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in trained["merges"]],
                               unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = trainer_tok.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


TOKENIZERS = {"byte_level": _byte_level(), "sentencepiece": _sentencepiece_like()}


def _decode(tok, ids, skip=True):
    return tok.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def _run(tok, prompt, out, **params):
    """Feed `out` token by token -> (deltas, stopped, detokenizer); stops feeding at a stop string."""
    detok = IncrementalDetokenizer(tok, prompt, SamplingParams(**params))
    deltas, stopped = [], False
    for t in out:
        delta, stopped = detok.append(t)
        deltas.append(delta)
        assert detok.output_text == "".join(deltas)
        if stopped:
            break
    deltas.append(detok.flush())
    assert detok.output_text == "".join(deltas)
    return deltas, stopped, detok


def _expected_text(tok, prompt, out, skip=True):
    full, prefix = _decode(tok, prompt + out, skip), _decode(tok, prompt, skip)
    assert full.startswith(prefix)
    return full[len(prefix):]


def test_tokenizers_really_split_multibyte_characters():
    for tok in TOKENIZERS.values():
        pieces = [_decode(tok, [i]) for i in tok.encode("€ñ🙃テキ", add_special_tokens=False)]
        assert any("\ufffd" in p for p in pieces)  # otherwise the tests below prove nothing


@pytest.mark.parametrize("name", list(TOKENIZERS))
@settings(max_examples=150, deadline=None)
@given(prompt=st.text(ALPHABET, max_size=12), text=st.text(ALPHABET, min_size=1, max_size=30),
       skip=st.booleans(), eos_at=st.integers(0, 40))
def test_deltas_add_up_to_the_full_decode(name, prompt, text, skip, eos_at):
    tok = TOKENIZERS[name]
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    out = tok.encode(text, add_special_tokens=False)
    # A special token mid-output, between characters (inside one it would make invalid UTF-8).
    boundaries = [i for i in range(len(out) + 1) if "\ufffd" not in _decode(tok, out[:i])]
    out.insert(boundaries[eos_at % len(boundaries)], tok.eos_token_id)
    deltas, stopped, _ = _run(tok, prompt_ids, out, skip_special_tokens=skip)
    expected = _expected_text(tok, prompt_ids, out, skip)
    assert not stopped and "".join(deltas) == expected
    assert ("</s>" in expected) == (not skip)
    assert all("\ufffd" not in d for d in deltas)  # a split character is never streamed half-done


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_random_token_ids_add_up_to_the_full_decode(name):
    # Arbitrary ids make invalid UTF-8 too (lone continuation bytes); the text must still add up.
    tok, rng = TOKENIZERS[name], random.Random(0)
    pool = list(range(len(tok)))
    if name == "sentencepiece":  # see below: lone byte tokens only make sense in valid runs
        pool = [i for i in pool if not tok.convert_ids_to_tokens(i).startswith("<0x")]
    for _ in range(300):
        prompt = rng.choices(pool, k=rng.randrange(0, 8))
        out = rng.choices(pool, k=rng.randrange(1, 25))
        if not _decode(tok, prompt + out).startswith(_decode(tok, prompt)):
            continue  # prompt ends inside a character: the output's first character is not its own
        expected = _expected_text(tok, prompt, out)
        if name == "sentencepiece" and "\ufffd" in expected:
            # ByteFallback decodes a run of byte tokens with any invalid byte as one U+FFFD per
            # token, valid bytes included: earlier text depends on later tokens without bound.
            # No incremental decoder can match that; it only happens on invalid UTF-8.
            continue
        deltas, _, _ = _run(tok, prompt, out)
        assert "".join(deltas) == expected


def test_leading_space_is_kept_after_a_prompt_and_dropped_at_the_start():
    tok = TOKENIZERS["sentencepiece"]
    out = tok.encode("hello world", add_special_tokens=False)
    assert "".join(_run(tok, tok.encode("this is", add_special_tokens=False), out)[0]) == " hello world"
    assert "".join(_run(tok, [], out)[0]) == "hello world"


def _reference_stop(text, stops, include):
    """The match that ends first in the whole text (ties: the longer one)."""
    hits = [(text.find(s) + len(s), text.find(s), s) for s in stops if s in text]
    if not hits:
        return text, False
    end, start, _ = min(hits)
    return text[:end] if include else text[:start], True


@settings(max_examples=300, deadline=None)
@given(text=st.text(ALPHABET, min_size=1, max_size=40), data=st.data(), include=st.booleans())
def test_stop_strings_cut_exactly_and_are_never_streamed_early(text, data, include):
    tok = TOKENIZERS["byte_level"]
    ids = tok.encode(text, add_special_tokens=False)
    assert _decode(tok, ids) == text
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):  # a substring, so it matches, often across token boundaries
            i = data.draw(st.integers(0, len(text) - 1))
            stops.append(text[i:i + data.draw(st.integers(1, 6))])
        else:
            stops.append(data.draw(st.text(ALPHABET, min_size=1, max_size=4)))
    expected, should_stop = _reference_stop(text, stops, include)
    deltas, stopped, detok = _run(tok, [], ids, stop=stops, include_stop_str_in_output=include)
    assert stopped == should_stop
    assert "".join(deltas) == expected == detok.output_text
    if should_stop and not include:
        # Everything streamed at any point is a prefix of the final text, so no delta ever
        # carried the beginning of the stop string that matched.
        streamed = ""
        for d in deltas:
            streamed += d
            assert expected.startswith(streamed)


def test_stop_string_prefix_is_held_back_then_released_when_it_does_not_match():
    tok = TOKENIZERS["byte_level"]
    pieces = ["a", " <", "/", "e", "x", " b", " <", "/", "end", ">", " tail"]
    released_after = ["a", "a ", "a ", "a ", "a </ex", "a </ex b", "a </ex b ", "a </ex b ", "a </ex b ", "a </ex b "]
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop="</end>"))
    for piece, released in zip(pieces, released_after):
        for t in tok.encode(piece, add_special_tokens=False):
            delta, stopped = detok.append(t)
        assert detok.output_text == released
    assert stopped and detok.flush() == ""
    assert detok.append(tok.encode("a")[0]) == ("", True)  # appending after a stop changes nothing

    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["</end>"], include_stop_str_in_output=True))
    ids = [t for p in pieces for t in tok.encode(p, add_special_tokens=False)]
    streamed = "".join(detok.append(t)[0] for t in ids)
    assert streamed == "a </ex b </end>" == detok.output_text and detok.stopped


def test_held_back_text_is_released_by_flush():
    tok = TOKENIZERS["byte_level"]
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["</end>"]))
    streamed = "".join(detok.append(t)[0] for t in tok.encode("hello </en", add_special_tokens=False))
    assert streamed == "hello " and detok.output_text == "hello "
    assert detok.flush() == "</en" and detok.output_text == "hello </en"


def test_first_stop_string_to_complete_wins_even_inside_one_token():
    tok = TOKENIZERS["byte_level"]
    ids = tok.encode("héllo wörld", add_special_tokens=False)
    assert len(ids) == 2  # " wörld" is a single token, so both stops complete in the same step
    # Character by character, "wö" completes before "llo wörld"; token boundaries must not change that.
    deltas, stopped, _ = _run(tok, [], ids, stop=["llo wörld", "wö"])
    assert stopped and "".join(deltas) == "héllo "
