"""The built-in text corpus: one definition, shared by capture, the perplexity check and benchmarks.

``"pydoc"`` is CPython's ``pydoc_data.topics.topics`` (about 465,000 characters of English
documentation, shipped with Python): the topics in name order, each as stored (they end with a
newline), joined with blank lines. The perplexity protocol
(:func:`gear_lab.fidelity.perplexity_check`) tokenizes this text whole (its full-precision
perplexity on SmolLM2-135M, 13.15, is published in the README); :func:`corpus_texts` cuts the same
text into capture samples.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

from gear_lab.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

CORPORA = ("pydoc",)


def _pydoc_topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def pydoc_topic(name: str) -> str:
    """One pydoc topic's text (e.g. ``"for"``, ``"if"``), for short prompts."""
    topics = _pydoc_topics()
    if name not in topics:
        raise ConfigError(f"unknown pydoc topic {name!r}")
    return topics[name]


@lru_cache(maxsize=len(CORPORA))
def corpus_text(name: str = "pydoc") -> str:
    """The whole text of a built-in corpus (see the module docstring)."""
    if name not in CORPORA:
        raise ConfigError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    topics = _pydoc_topics()
    return "\n\n".join(topics[key] for key in sorted(topics))


@lru_cache(maxsize=4)
def corpus_ids(tokenizer: PreTrainedTokenizerBase, name: str = "pydoc") -> torch.Tensor:
    """The whole corpus tokenized without special tokens: LongTensor ``[tokens]``."""
    import torch  # lazily: the CLI imports this module for CORPORA

    return torch.tensor(tokenizer(corpus_text(name), add_special_tokens=False).input_ids)


def corpus_texts(
    name: str = "pydoc",
    samples: int = 1,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_tokens: int = 512,
) -> list[str]:
    """``samples`` deterministic, non-overlapping text windows of :func:`corpus_text`.

    Sample ``i`` is the ``i``-th window of ``8 * max_tokens`` characters (from its first word
    boundary), cut to a few tokens more than ``max_tokens`` when a ``tokenizer`` is given
    (:func:`gear_lab.capture.capture_samples` truncates).
    """
    if samples < 1 or max_tokens < 1:
        raise ConfigError(f"samples and max_tokens must be >= 1, got {samples} and {max_tokens}")
    text = corpus_text(name)
    chars = 8 * max_tokens
    if samples * chars > len(text):
        raise ConfigError(
            f"corpus {name!r} holds {len(text)} characters: too little for "
            f"{samples} samples of {max_tokens} tokens"
        )
    # each window starts at a word boundary (its first whitespace), so samples read naturally
    texts = [text[i * chars : (i + 1) * chars] for i in range(samples)]
    texts = [t[len(t.split(maxsplit=1)[0]) :].lstrip() if i else t for i, t in enumerate(texts)]
    if tokenizer is not None:
        texts = [
            # a few spare tokens: decode -> encode may merge tokens at the cut
            tokenizer.decode(tokenizer(t, add_special_tokens=False).input_ids[: max_tokens + 8])
            for t in texts
        ]
    return texts
