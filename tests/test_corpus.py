"""The built-in corpus: one text for capture samples and the perplexity protocol."""

from __future__ import annotations

import pytest

from gear_lab.corpus import corpus_ids, corpus_text, corpus_texts, pydoc_topic
from gear_lab.errors import ConfigError


def test_corpus_text_joins_the_pydoc_topics_in_name_order():
    from pydoc_data.topics import topics

    text = corpus_text("pydoc")
    first, second = sorted(topics)[:2]
    assert text.startswith(topics[first] + "\n\n" + topics[second])
    assert pydoc_topic("for") == topics["for"] and pydoc_topic("for") in text
    with pytest.raises(ConfigError):
        corpus_text("wikipedia")
    with pytest.raises(ConfigError):
        pydoc_topic("no such topic")


def test_corpus_texts_are_deterministic_distinct_and_long_enough(smol):
    _, tokenizer = smol
    texts = corpus_texts("pydoc", 3, tokenizer, 64)
    assert texts == corpus_texts("pydoc", 3, tokenizer, 64)
    assert len(set(texts)) == 3
    assert all(len(tokenizer(t).input_ids) >= 60 for t in texts)
    with pytest.raises(ConfigError):
        corpus_texts("wikipedia", 1, tokenizer, 64)
    with pytest.raises(ConfigError):
        corpus_texts("pydoc", 10_000, tokenizer, 512)


def test_capture_samples_and_perplexity_windows_read_the_same_text(smol):
    _, tokenizer = smol
    (sample,) = corpus_texts("pydoc", 1, None, 64)
    assert corpus_text("pydoc").startswith(sample)
    ids = corpus_ids(tokenizer, "pydoc")
    assert ids.ndim == 1 and ids.dtype.is_floating_point is False
    head = tokenizer(sample, add_special_tokens=False).input_ids[:32]
    assert ids[:32].tolist() == head
