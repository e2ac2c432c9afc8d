"""The miniature word tokenizer: every synthfaces caption word is ONE token. transformers' own CLIPTokenizer is
the reference (it applies BPE merges by priority, which is what split five words before)."""

from __future__ import annotations

import itertools

from fusion_jax.data import synthfaces as sf
from fusion_jax.miniature import caption_vocabulary, write_word_tokenizer


def _clip_tokenizer(folder):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def test_every_caption_word_is_one_token(tmp_path):
    words = caption_vocabulary()
    tok = _clip_tokenizer(write_word_tokenizer(tmp_path / "tok", words))
    pieces = {w: tok.tokenize(w) for w in words}
    split = {w: p for w, p in pieces.items() if p != [w + "</w>"]}
    assert not split, f"words split into several tokens: {split}"
    # the five words the old left-to-right merges split (an earlier merge of another word fired inside them)
    for w in ("person", "purple", "striped", "surprised", "yellow"):
        assert pieces[w] == [w + "</w>"]


def test_every_caption_is_one_token_per_word(tmp_path):
    tok = _clip_tokenizer(write_word_tokenizer(tmp_path / "tok", caption_vocabulary()))
    values = [v + (None,) for v in sf.ATTRIBUTE_VALUES.values()]  # stated or not
    for combo in itertools.product(*values):
        caption = sf.build_caption(sf.PromptAttributes(*combo))
        words = caption.replace(",", " ,").split()
        assert tok.tokenize(caption) == [w + "</w>" for w in words], caption


def test_adversarial_vocabulary(tmp_path):
    # 'o'+'n</w>' (from "on") outranks person's chain; 'a'+'t</w>' (from "at") outranks "cat", "hat", "that"
    words = sorted(["on", "person", "at", "cat", "hat", "that", "a", "ta", "tat"])
    tok = _clip_tokenizer(write_word_tokenizer(tmp_path / "tok", words))
    assert {w: tok.tokenize(w) for w in words} == {w: [w + "</w>"] for w in words}
    assert tok.tokenize("a cat on that hat") == ["a</w>", "cat</w>", "on</w>", "that</w>", "hat</w>"]
