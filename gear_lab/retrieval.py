"""Long-context retrieval through a compressed KV cache: passkey, needles, variable tracking.

Synthetic tasks, needing no data set (:data:`TASKS`):

- ``passkey``: the KIVI / landmark-attention prompt (Mohtashami and Jaggi, 2023): a task
  description, the filler "The grass is green. The sky is blue. ..." repeated, the key sentence
  "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a depth, and "What is the pass
  key? The pass key is";
- ``needle``: a "special magic number" sentence in CPython's pydoc text (the project's corpus,
  :func:`gear_lab.corpus.corpus_text`, from a seeded word offset);
- ``multikey``: the passkey prompt with pass keys for four names; the question asks for one, the
  three others are distractors at seeded depths;
- ``vartrack``: RULER-style variable tracking: ``VAR A = NNNNN.`` at the depth, then a chain
  ``VAR B = VAR A.`` ... spread over the rest of the filler; the question asks for the last
  variable's value.

A prompt (:func:`build_prompt`) has a length in tokens measured with the model's tokenizer
(within :data:`LENGTH_TOLERANCE` of the target), the target sentence at a depth (the share of the
filler before it) and keys drawn from ``random.Random(f"{task}:{seed}")``, so one seed gives the
same keys at every length and depth. Prompts are raw text by default (the chat template made
SmolLM2 worse); ``chat_template=True`` wraps the context and question in the tokenizer's template
and puts the answer prefix in the assistant turn.

:func:`run_retrieval` runs a grid: the prompt is prefilled once per trial in full precision (a
prefill's attention sees full-precision states with every cache, so its logits and its K/V are
the same for all of them), then each cache is filled with that prompt's K/V exactly as the
model's own prefill would fill it (:meth:`Cache.update` with the whole prompt per layer) and
decodes ``max_new_tokens`` greedy tokens through it. A GearCache compresses the prompt block by
block (``"blockwise"``, GEAR streaming) or as one block (``"oneshot"``, as transformers'
``QuantizedCache`` does). :func:`score_answer` takes the first number the model wrote: the key
is correct, a distractor's key or any other number is wrong.
"""

from __future__ import annotations

import bisect
import itertools
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicCache

from gear_lab.architecture import model_arch
from gear_lab.cache import PROMPT_COMPRESSIONS, GearCache, cache_kwarg
from gear_lab.cache_specs import CacheSpec, cache_nbytes, make_cache, method_label
from gear_lab.compression import CompressionConfig, get_preset, list_presets
from gear_lab.corpus import corpus_text
from gear_lab.errors import ConfigError, first_line
from gear_lab.models import model_id

TASKS = ("passkey", "needle", "multikey", "vartrack")
#: largest relative distance of a prompt's token count from its target
LENGTH_TOLERANCE = 0.02
#: answer outcomes of :func:`score_answer`
OUTCOMES = ("correct", "distractor", "wrong", "no number")
#: columns of :func:`run_retrieval`'s table, in order
COLUMNS = (
    "model",
    "task",
    "length",
    "tokens",
    "depth",
    "needle_depth",
    "seed",
    "cache",
    "prompt_compression",
    "chat_template",
    "expected",
    "answer",
    "correct",
    "outcome",
    "bits_per_entry",
    "cache_bytes",
    "prefill_s",
    "decode_s",
)

GRASS = (
    "The grass is green. ",
    "The sky is blue. ",
    "The sun is yellow. ",
    "Here we go. ",
    "There and back again. ",
)
NAMES = (
    "Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "James",
    "Karen", "Louis", "Maria", "Nora", "Oscar", "Paula",
)  # fmt: skip
_KEY_RANGE = (10000, 99999)  # five digits
_HOPS = 4  # variable tracking: assignments after the first
_MIN_DISTRACTOR_GAP = 0.1  # multikey: distractors at least this far (in depth) from the target


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalPrompt:
    """One prompt of a task: ``text`` (what the model reads, ending with the answer prefix),
    ``tokens`` (its measured length), ``expected`` (the key) and the ``distractors`` (other
    keys in the text); ``needle_depth`` is the measured share of filler tokens before the target
    sentence ``needle``."""

    task: str
    length: int
    depth: float
    seed: int
    chat_template: bool
    text: str
    tokens: int
    expected: str
    distractors: tuple[str, ...]
    needle: str
    needle_depth: float


@dataclass(frozen=True)
class _Parts:
    """A task instance before the filler is sized: needles are ``(depth, sentence)``, the target
    first; ``filler(n)`` gives ``n`` filler units (each with its trailing whitespace)."""

    description: str
    filler: Callable[[int], list[str]]
    needles: tuple[tuple[float, str], ...]
    question: str
    answer_prefix: str
    expected: str
    distractors: tuple[str, ...]


def _grass(n: int) -> list[str]:
    return [GRASS[i % len(GRASS)] for i in range(n)]


@lru_cache(maxsize=1)
def _pydoc_words() -> tuple[str, ...]:
    return tuple(re.findall(r"\S+\s*", corpus_text("pydoc")))


def _keys(rng: random.Random, count: int) -> list[str]:
    """``count`` distinct five-digit keys, none of which occurs in the pydoc corpus."""
    text = corpus_text("pydoc")
    keys: list[str] = []
    while len(keys) < count:
        key = str(rng.randint(*_KEY_RANGE))
        if key not in keys and key not in text:
            keys.append(key)
    return keys


def _passkey(rng: random.Random, depth: float) -> _Parts:
    (key,) = _keys(rng, 1)
    return _Parts(
        description=(
            "There is an important info hidden inside a lot of irrelevant text. Find it and "
            "memorize it. I will quiz you about the important information there."
        ),
        filler=_grass,
        needles=((depth, f"The pass key is {key}. Remember it. {key} is the pass key."),),
        question="What is the pass key?",
        answer_prefix="The pass key is",
        expected=key,
        distractors=(),
    )


def _needle(rng: random.Random, depth: float) -> _Parts:
    (key,) = _keys(rng, 1)
    words = _pydoc_words()
    offset = rng.randrange(len(words))

    def filler(n: int) -> list[str]:
        return [words[(offset + i) % len(words)] for i in range(n)]

    return _Parts(
        description=(
            "A special magic number is hidden within the following text. Make sure to memorize "
            "it. I will quiz you about the number afterwards."
        ),
        filler=filler,
        needles=((depth, f"The special magic number is: {key}."),),
        question="What is the special magic number mentioned in the provided text?",
        answer_prefix="The special magic number mentioned in the provided text is",
        expected=key,
        distractors=(),
    )


def _multikey(rng: random.Random, depth: float) -> _Parts:
    keys = _keys(rng, 4)
    names = rng.sample(NAMES, 4)
    depths = [depth]
    while len(depths) < 4:
        d = round(rng.random(), 3)
        if abs(d - depth) >= _MIN_DISTRACTOR_GAP:
            depths.append(d)
    needles = tuple(
        (d, f"The pass key for {name} is {key}. Remember it. {key} is the pass key for {name}.")
        for d, name, key in zip(depths, names, keys, strict=True)
    )
    return _Parts(
        description=(
            "There are important infos hidden inside a lot of irrelevant text. Find them and "
            "memorize them. I will quiz you about the important information there."
        ),
        filler=_grass,
        needles=needles,
        question=f"What is the pass key for {names[0]}?",
        answer_prefix=f"The pass key for {names[0]} is",
        expected=keys[0],
        distractors=tuple(keys[1:]),
    )


def _vartrack(rng: random.Random, depth: float) -> _Parts:
    (value,) = _keys(rng, 1)
    names: list[str] = []
    while len(names) < _HOPS + 1:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    lines = [f"VAR {names[0]} = {value}."]
    lines += [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    depths = [depth + (1 - depth) * k / (_HOPS + 1) for k in range(_HOPS + 1)]
    return _Parts(
        description=(
            "Memorize and track the chain of variable assignments hidden in the following text."
        ),
        filler=_grass,
        needles=tuple(zip(depths, lines, strict=True)),
        question=f"What is the value of VAR {names[-1]}?",
        answer_prefix=f"The value of VAR {names[-1]} is",
        expected=value,
        distractors=(),
    )


_TASK_BUILDERS: dict[str, Callable[[random.Random, float], _Parts]] = {
    "passkey": _passkey,
    "needle": _needle,
    "multikey": _multikey,
    "vartrack": _vartrack,
}


def _unit_tokens(tokenizer: Any, units: Sequence[str]) -> list[int]:
    """Tokens of each filler unit inside the joined filler (a fast tokenizer's offsets; each
    unit on its own for a slow one), so that they sum to the filler's length."""
    if not units:
        return []
    if not getattr(tokenizer, "is_fast", False):
        return [len(ids) for ids in tokenizer(list(units), add_special_tokens=False).input_ids]
    encoded = tokenizer("".join(units), add_special_tokens=False, return_offsets_mapping=True)
    starts = [start for start, _ in encoded["offset_mapping"]]
    ends = itertools.accumulate(len(unit) for unit in units)
    cumulative = [0, *(bisect.bisect_left(starts, end) for end in ends)]
    cumulative[-1] = len(starts)
    return [b - a for a, b in itertools.pairwise(cumulative)]


def _boundary(units: Sequence[str], sizes: Sequence[int], depth: float) -> int:
    """The unit boundary whose share of the filler's tokens is nearest ``depth``, moved to a
    sentence end within 1 % of the filler's tokens where there is one."""
    cumulative = list(itertools.accumulate(sizes, initial=0))
    goal = depth * cumulative[-1]
    window = cumulative[-1] / 100
    ends = [
        j
        for j in range(1, len(units))
        if abs(cumulative[j] - goal) <= window
        and (units[j - 1].endswith("\n") or units[j - 1].rstrip().endswith("."))
    ]
    candidates = ends or range(len(cumulative))
    return min(candidates, key=lambda j: abs(cumulative[j] - goal))


def _compose(parts: _Parts, units: Sequence[str], sizes: Sequence[int]) -> tuple[str, int]:
    """``(context + question, boundary of the target)`` with these filler units. Needles at the
    same boundary keep their order (a variable chain stays in order)."""
    slots = sorted(
        (_boundary(units, sizes, d), i, text) for i, (d, text) in enumerate(parts.needles)
    )
    pieces, previous = [parts.description], 0
    for at, _, text in slots:
        pieces += [s for s in ("".join(units[previous:at]).strip(),) if s] + [text]
        previous = at
    pieces += [s for s in ("".join(units[previous:]).strip(),) if s]
    target = next(at for at, i, _ in slots if i == 0)
    return "\n".join(pieces) + "\n" + parts.question, target


def _render(tokenizer: Any, body: str, answer_prefix: str, chat_template: bool) -> str:
    if not chat_template:
        return f"{body} {answer_prefix}"
    messages = [{"role": "user", "content": body}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + answer_prefix


def encode(tokenizer: Any, text: str, chat_template: bool) -> list[int]:
    """Token ids of a prompt's ``text`` (a chat-templated text holds its own special tokens)."""
    return tokenizer(text, add_special_tokens=not chat_template).input_ids


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; known: {', '.join(TASKS)}")


def build_prompt(
    task: str,
    tokenizer: Any,
    length: int,
    depth: float = 0.5,
    seed: int = 0,
    *,
    chat_template: bool = False,
) -> RetrievalPrompt:
    """A ``task`` prompt of ``length`` tokens (within :data:`LENGTH_TOLERANCE`) with the target
    sentence at ``depth`` (0: start of the filler, 1: its end) and keys drawn from ``seed``.

    Raises :class:`ConfigError` for an unknown task, a depth outside [0, 1], or a length shorter
    than the task's fixed text.
    """
    _check_task(task)
    if not 0.0 <= depth <= 1.0:
        raise ConfigError(f"depth must be in [0, 1], got {depth}")
    parts = _TASK_BUILDERS[task](random.Random(f"{task}:{seed}"), depth)

    def count(n: int) -> tuple[int, str, list[str], list[int], int]:
        units = parts.filler(n)
        sizes = _unit_tokens(tokenizer, units)
        body, target = _compose(parts, units, sizes)
        text = _render(tokenizer, body, parts.answer_prefix, chat_template)
        return len(encode(tokenizer, text, chat_template)), text, units, sizes, target

    fixed = count(0)[0]
    if length < fixed + 16:
        raise ConfigError(
            f"length {length} is too short for {task}: its fixed text alone is {fixed} tokens"
        )
    per_unit = sum(_unit_tokens(tokenizer, parts.filler(256))) / 256
    n = round((length - fixed) / per_unit)
    best: tuple[int, str, list[str], list[int], int] | None = None
    for _ in range(12):
        tokens, text, units, sizes, target = count(n)
        if best is None or abs(tokens - length) < abs(best[0] - length):
            best = (tokens, text, units, sizes, target)
        delta = length - tokens
        if abs(delta) <= max(2, length // 200):
            break
        # add (remove) whole units worth at most |delta| tokens, at least one
        moved = _unit_tokens(tokenizer, parts.filler(n + delta)[n:]) if delta > 0 else sizes[::-1]
        steps = sum(1 for total in itertools.accumulate(moved) if total <= abs(delta))
        n = max(0, n + (max(steps, 1) if delta > 0 else -max(steps, 1)))
    tokens, text, units, sizes, target = best
    if abs(tokens - length) > LENGTH_TOLERANCE * length:
        raise ConfigError(f"could not fit {task} to {length} tokens (got {tokens})")
    filler_tokens = sum(sizes)
    return RetrievalPrompt(
        task=task,
        length=length,
        depth=depth,
        seed=seed,
        chat_template=chat_template,
        text=text,
        tokens=tokens,
        expected=parts.expected,
        distractors=parts.distractors,
        needle=parts.needles[0][1],
        needle_depth=sum(sizes[:target]) / filler_tokens if filler_tokens else 0.0,
    )


def score_answer(answer: str, expected: str, distractors: Sequence[str] = ()) -> str:
    """The outcome of an answer (:data:`OUTCOMES`): its first number is the key (``correct``),
    a distractor's key (``distractor``), another number (``wrong``) or absent (``no number``)."""
    found = re.search(r"\d+", answer)
    if found is None:
        return "no number"
    number = found.group()
    if number == expected:
        return "correct"
    return "distractor" if number in distractors else "wrong"


# --------------------------------------------------------------------------------------------
# grid
# --------------------------------------------------------------------------------------------


def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1500"`` -> 1500; anything else raises :class:`ConfigError`."""
    value = text.strip().lower()
    try:
        return int(value[:-1]) * 1024 if value.endswith("k") else int(value)
    except ValueError:
        raise ConfigError(f"bad length {text!r}: use tokens such as 512, 1k or 4k") from None


@dataclass(frozen=True)
class RetrievalGrid:
    """What :func:`run_retrieval` runs: every task x length (tokens) x depth x seed, each cache
    in each ``prompt_compression`` mode (``"blockwise"`` / ``"oneshot"``; GearCache only: a
    ``QuantizedCache`` always compresses the prompt in one shot, full precision never)."""

    tasks: tuple[str, ...] = ("passkey",)
    lengths: tuple[int, ...] = (1024,)
    depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    seeds: tuple[int, ...] = (0,)
    prompt_compression: tuple[str, ...] = ("blockwise",)
    chat_template: bool = False
    max_new_tokens: int = 8

    def __post_init__(self) -> None:
        for name in ("tasks", "lengths", "depths", "seeds", "prompt_compression"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str | int | float) else tuple(value)
            if not value:
                raise ConfigError(f"{name} must not be empty")
            object.__setattr__(self, name, value)
        for task in self.tasks:
            _check_task(task)
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ConfigError(f"lengths must be positive integers, got {self.lengths}")
        if any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ConfigError(f"depths must be in [0, 1], got {self.depths}")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise ConfigError(f"seeds must be integers, got {self.seeds}")
        bad = set(self.prompt_compression) - set(PROMPT_COMPRESSIONS)
        if bad:
            raise ConfigError(
                f"prompt_compression must be in {PROMPT_COMPRESSIONS}, got {sorted(bad)}"
            )
        if isinstance(self.max_new_tokens, bool) or not 1 <= self.max_new_tokens <= 64:
            raise ConfigError(f"max_new_tokens must be in 1..64, got {self.max_new_tokens}")

    @property
    def trials(self) -> int:
        """Prompts in the grid (each run through every cache)."""
        return len(self.tasks) * len(self.lengths) * len(self.depths) * len(self.seeds)


def check_context(model: torch.nn.Module, grid: RetrievalGrid) -> None:
    """Raise :class:`ConfigError` when a length plus the answer exceeds the model's context."""
    context = model_arch(model).max_context
    if context is None:
        return
    for length in grid.lengths:
        if length + grid.max_new_tokens > context:
            raise ConfigError(
                f"length {length} tokens + {grid.max_new_tokens} answer tokens exceeds the "
                f"model's context of {context} tokens"
            )


@dataclass(frozen=True)
class _Setting:
    """One cache of the grid: its spec (a factory for GearCache settings) and labels."""

    spec: CacheSpec
    label: str
    prompt_compression: str


def _settings(
    caches: Sequence[CacheSpec], modes: Sequence[str], storage_dtype: torch.dtype | None
) -> list[_Setting]:
    settings: list[_Setting] = []
    for spec in caches:
        config = spec if isinstance(spec, CompressionConfig) else None
        if isinstance(spec, str) and spec in list_presets():
            config = get_preset(spec)
        if config is None:
            mode = "none" if spec == "dynamic" else "oneshot"
            settings.append(_Setting(spec, method_label(spec), mode))
            continue
        for mode in modes:

            def factory(model: torch.nn.Module, config=config, mode=mode) -> Cache:
                return GearCache(
                    config,
                    model_config=model.config,
                    storage_dtype=storage_dtype,
                    prompt_compression=mode,
                    workspace=True,  # decoding decompresses nothing; nbytes() is the same
                )

            settings.append(_Setting(factory, config.name, mode))
    return settings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _prefill(model: torch.nn.Module, ids: torch.Tensor) -> tuple[DynamicCache, int, float]:
    """Full-precision prefill into a config-less ``DynamicCache`` (every layer keeps every
    token): the cache, the first greedy token and the seconds it took."""
    cache = DynamicCache()
    _sync(ids.device)
    start = time.perf_counter()
    logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    first = int(logits.logits[0, -1].argmax())
    _sync(ids.device)
    return cache, first, time.perf_counter() - start


def _fill(cache: Cache, prefilled: DynamicCache) -> None:
    """Give ``cache`` the prompt's K/V as the model's prefill would (one update per layer)."""
    for index, layer in enumerate(prefilled.layers):
        cache.update(layer.keys, layer.values, index)


def _decode(
    model: torch.nn.Module, cache: Cache, first: int, steps: int, stop: set[int]
) -> list[int]:
    """Greedy tokens through ``cache``, starting with ``first``; ends at a stop token."""
    device = next(model.parameters()).device
    key = cache_kwarg(model)
    ids = [first]
    while len(ids) < steps and ids[-1] not in stop:
        step = torch.tensor([[ids[-1]]], device=device)
        ids.append(
            int(model(input_ids=step, use_cache=True, **{key: cache}).logits[0, -1].argmax())
        )
    return ids


def _stop_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    found = {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)}
    stop: set[int] = set()
    for item in found:
        stop.update(item if isinstance(item, list) else [item] if item is not None else [])
    return stop


@torch.inference_mode()
def run_retrieval(
    model: torch.nn.Module,
    tokenizer: Any,
    caches: Sequence[CacheSpec],
    grid: RetrievalGrid | None = None,
    *,
    model_name: str | None = None,
    storage_dtype: torch.dtype | None = None,
    progress: bool = True,
    on_trial: Callable[[int, int], None] | None = None,
) -> pd.DataFrame:
    """Run ``grid`` through every cache spec (:func:`gear_lab.cache_specs.make_cache`) of
    ``caches``; one row (:data:`COLUMNS`) per model x task x length x depth x seed x cache.

    GearCache settings (configs, preset names) run in each of ``grid.prompt_compression``, with
    ``storage_dtype`` as their block dtype. ``bits_per_entry`` and ``cache_bytes`` are measured
    right after the prompt (``8 * bytes / cached K/V entries``); ``prefill_s`` is the shared
    full-precision prefill plus this cache's own filling (its compression of the prompt);
    ``decode_s`` the greedy answer. Specs, lengths (against the model's context) and prompts are
    all checked, raising :class:`ConfigError`, before the first forward pass. ``on_trial(done,
    total)`` is called after each cache run.
    """
    grid = grid or RetrievalGrid()
    if not caches:
        raise ConfigError("give at least one cache spec")
    check_context(model, grid)
    settings = _settings(caches, grid.prompt_compression, storage_dtype)
    for setting in settings:
        make_cache(setting.spec, model)  # an unknown spec or a missing backend fails now
    prompts = [
        build_prompt(task, tokenizer, length, depth, seed, chat_template=grid.chat_template)
        for task in grid.tasks
        for length in grid.lengths
        for depth in grid.depths
        for seed in grid.seeds
    ]
    name = model_name or model_id(model)
    arch = model_arch(model)
    device = next(model.parameters()).device
    stop = _stop_ids(model, tokenizer)
    total = len(prompts) * len(settings)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=total, desc="retrieval", unit="run", disable=not progress)
    for prompt in prompts:
        ids = torch.tensor([encode(tokenizer, prompt.text, prompt.chat_template)], device=device)
        prefilled, first, prefill_s = _prefill(model, ids)
        for setting in settings:
            bar.set_postfix_str(f"{prompt.task} {prompt.length} {setting.label}", refresh=False)
            cache = make_cache(setting.spec, model)
            start = time.perf_counter()
            _fill(cache, prefilled)
            _sync(device)
            fill_s = time.perf_counter() - start
            nbytes = cache_nbytes(cache)
            start = time.perf_counter()
            new = _decode(model, cache, first, grid.max_new_tokens, stop)
            _sync(device)
            decode_s = time.perf_counter() - start
            answer = tokenizer.decode(new, skip_special_tokens=True)
            outcome = score_answer(answer, prompt.expected, prompt.distractors)
            rows.append(
                {
                    "model": name,
                    "task": prompt.task,
                    "length": prompt.length,
                    "tokens": ids.shape[1],
                    "depth": prompt.depth,
                    "needle_depth": prompt.needle_depth,
                    "seed": prompt.seed,
                    "cache": setting.label,
                    "prompt_compression": setting.prompt_compression,
                    "chat_template": prompt.chat_template,
                    "expected": prompt.expected,
                    "answer": answer.strip(),
                    "correct": outcome == "correct",
                    "outcome": outcome,
                    "bits_per_entry": 8 * nbytes / arch.cached_entries(ids.shape[1]),
                    "cache_bytes": nbytes,
                    "prefill_s": prefill_s + fill_s,
                    "decode_s": decode_s,
                }
            )
            bar.update()
            if on_trial is not None:
                on_trial(len(rows), total)
    bar.close()
    return pd.DataFrame(rows, columns=list(COLUMNS))


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Accuracy per model x task x cache x prompt compression x length: ``accuracy``,
    ``correct``, ``trials``, mean ``bits_per_entry``, ``prefill_s`` and ``decode_s``."""
    keys = ["model", "task", "cache", "prompt_compression", "length"]
    return (
        df.groupby(keys, sort=False)
        .agg(
            accuracy=("correct", "mean"),
            correct=("correct", "sum"),
            trials=("correct", "size"),
            bits_per_entry=("bits_per_entry", "mean"),
            prefill_s=("prefill_s", "mean"),
            decode_s=("decode_s", "mean"),
        )
        .reset_index()
    )


def setting_labels(df: pd.DataFrame) -> pd.Series:
    """One name per cache setting of a results table: the cache's label, with `` · <prompt
    compression>`` where the table runs that cache in more than one mode."""
    modes = df.groupby("cache")["prompt_compression"].transform("nunique")
    return df["cache"].where(modes <= 1, df["cache"] + " · " + df["prompt_compression"])


def read_results(path: Any) -> pd.DataFrame:
    """A table written by ``gear-lab needle`` (CSV or Parquet, a path or a file object with a
    ``name``); raises :class:`ConfigError` when it lacks :data:`COLUMNS`."""
    name = str(getattr(path, "name", path))
    try:
        if name.lower().endswith(".parquet"):
            df = pd.read_parquet(path)
        else:  # keys and answers stay text ("11111." is not a float)
            df = pd.read_csv(path, dtype={"expected": str, "answer": str})
    except (OSError, ValueError, ImportError) as err:
        raise ConfigError(f"cannot read {name}: {first_line(err)}") from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{name} is not a retrieval table: no column {', '.join(missing)}")
    for column in ("expected", "answer"):
        df[column] = df[column].fillna("").astype(str)
    return df


__all__ = [
    "COLUMNS",
    "LENGTH_TOLERANCE",
    "OUTCOMES",
    "PROMPT_COMPRESSIONS",
    "TASKS",
    "RetrievalGrid",
    "RetrievalPrompt",
    "build_prompt",
    "check_context",
    "encode",
    "parse_length",
    "read_results",
    "run_retrieval",
    "score_answer",
    "setting_labels",
    "summarize",
]
