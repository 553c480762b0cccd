"""Incremental detokenization and stop strings: the text pipeline between token ids
and what a client sees."""

import pytest
from transformers import AutoTokenizer

from splitserve.frontend.detokenizer import REPLACEMENT, IncrementalDetokenizer
from splitserve.frontend.stop_strings import StopStringMatcher


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def _stream(tokenizer, ids, step=1):
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(ids[i:i + step]) for i in range(0, len(ids), step)]
    deltas.append(detok.flush())
    return deltas


@pytest.mark.parametrize("text", ["café", "€uro and ¥en", "hi 😀 there", "日本語", "😀😀"])
def test_multibyte_characters_split_across_tokens_are_never_emitted_broken(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode())  # byte tokenizer: characters really are split
    deltas = _stream(tokenizer, ids)
    assert all(REPLACEMENT not in d for d in deltas), deltas
    assert "".join(deltas) == text
    # The held-back bytes come out with the token that completes the character.
    emoji_end = len("hi 😀".encode()) - 1 if text.startswith("hi") else None
    if emoji_end is not None:
        assert deltas[emoji_end].endswith("😀")


def test_invalid_bytes_are_released_at_the_end_as_the_full_decode_has_them(tokenizer):
    ids = tokenizer.encode("ok", add_special_tokens=False) + tokenizer.encode("é", add_special_tokens=False)[:1]
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == "ok" + REPLACEMENT
    assert deltas[-1] == REPLACEMENT  # only flush() released it


def test_special_tokens_are_skipped_and_chunks_of_several_tokens_work(tokenizer):
    ids = tokenizer.encode("a€b", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert "".join(_stream(tokenizer, ids, step=2)) == "a€b"


@pytest.mark.parametrize("pieces, stops, emitted, stopped", [
    (["Hello wo", "rld!"], ["world"], "Hello ", True),          # spans two deltas
    (["ab", "c", "d", "e"], ["cde"], "ab", True),               # spans three
    (["the en", "d of it"], ["end", "of"], "the ", True),       # earliest of several
    (["x<", "y"], ["<|stop|>"], "x<y", False),                  # partial match released
    (["abc"], [], "abc", False),
    (["STOP at once"], ["STOP"], "", True),
])
def test_stop_strings_across_boundaries(pieces, stops, emitted, stopped):
    m = StopStringMatcher(stops)
    out = "".join(m.feed(p) for p in pieces)
    out += m.flush()
    assert (out, m.stopped) == (emitted, stopped)


def test_partial_stop_prefix_is_held_back_until_decided():
    m = StopStringMatcher(["</s>"])
    assert m.feed("abc</") == "abc"
    assert m.feed("x") == "</x"
    assert m.feed("</s") == ""
    assert m.feed(">tail") == ""
    assert m.stopped and m.feed("more") == "" and m.flush() == ""
