"""Per-layer bit allocation under a budget: each layer's compression from measured sensitivity.

Mixed-precision KV caches (KVQuant, Hooper et al. 2024, and the per-layer budgets of KVTuner,
Li et al. 2025) give sensitive layers more bits. Here sensitivity is *measured* on a dump:
:func:`allocate` runs :func:`gear_lab.sweeps.sweep` over every layer x candidate config, keys
and values separately (one whole-layer ``[1, kv_heads, seq, head_dim]`` row per sample, layer,
kind and config), and takes from each row its measured ``nbytes`` / ``numel`` and its attention
``output_rel`` (relative Frobenius error of ``softmax(q k^T) v`` over the layer, keys compressed
with exact values or the reverse).

The error of candidate ``c`` on layer ``l`` is ``e[l][c] = mean over samples of (output_rel_keys^2
+ output_rel_values^2)``: the energy of the attention-output perturbation relative to the output's,
with the key and value perturbations taken as independent (their energies add). It is the
second-order quantity a next-token KL grows with. The allocation minimises ``sum_l e[l][c_l]``
subject to the measured mean bits ``8 * sum_l bytes[l][c_l] / entries <= target`` (bytes summed
over keys, values and samples; entries: every K/V entry of those tensors).

That is a multiple-choice knapsack, solved exactly by :func:`solve_allocation`: a dynamic program
over the layers that keeps, after each layer, the Pareto frontier of partial allocations (least
error for each byte total, dominated ones dropped; a dominated partial allocation can be replaced
by its dominator in any completion, so nothing optimal is lost). Costs are the measured bytes
themselves (integers), so there is no discretisation and the budget holds exactly. The frontier
has at most one state per distinct byte total; with same-shaped layers that is at most a few
hundred states.

Calibrated objective (``calibrate``): the attention-output error says how much a layer's output
moves, not how much the next-token distribution does, and layers differ in that by an order of
magnitude. Given ``calibrate(config) -> per-layer KL`` (:func:`gear_lab.fidelity.layer_sensitivity`:
the live next-token KL with only that layer compressed), measured at the reference candidate
``r`` (the best uniform one under the attention objective), the error becomes the predicted KL
``e[l][c] = kl[l] * a[l][c] / a[l][r]`` (``a``: the attention error above): each layer's live KL
scaled by the dump's error ratio, and layers' KLs taken as additive.

The uniform baseline at the same budget is the best single candidate used on every layer whose
measured bits fit the target; it is a feasible point of the same problem, so the allocation's
predicted error is never above it. Predicted, not live: on SmolLM2-135M (``gear-lab ppl``, 8
pydoc windows, rotated 2..6-bit candidates) the attention objective alone did not beat the
uniform K5/V4 and K3/V2 live; calibrated, 5 bits gave KL 0.0017 and top-1 98.0 % against
uniform's 0.0023 and 97.8 %, while at 3 bits (KL 0.054 against 0.046) the 2-bit layers' KLs
compound instead of adding.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from gear_lab.capture import parse_indices
from gear_lab.compression import CompressionConfig, TensorCompression
from gear_lab.dump import Dump, open_dump
from gear_lab.errors import ConfigError
from gear_lab.files import atomic_write, check_output
from gear_lab.sweeps import expand_grid, sweep

__all__ = [
    "LayerAllocation",
    "allocate",
    "load_allocation",
    "save_allocation",
    "solve_allocation",
]

FORMAT = "gear-lab-allocation"
VERSION = 1
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
_OPTIONAL = {"dtype", "reference", "layer_kl"}  # LayerAllocation fields with defaults


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LayerAllocation:
    """A per-layer choice among candidate configs, with what the dump predicts of it.

    ``choices[l]`` indexes ``candidates`` for decoder layer ``l`` (:attr:`configs`). Predictions
    (measured on ``dump``'s ``samples``, K/V compressed in ``dtype``; ``None``: as stored):
    ``bits_per_entry`` (mean measured bits of all layers' K/V), ``error`` (the objective, sum of
    ``layer_errors``, see the module docstring), ``layer_bits``. ``uniform``: the candidate
    index of the best uniform allocation within ``target_bits``, with its ``uniform_bits`` and
    ``uniform_error``. ``dtype`` is also the ``storage_dtype`` the live cache uses. Calibrated
    (see the module docstring): ``layer_kl`` measured live at candidate ``reference``, and the
    errors are predicted KLs; else ``reference`` is ``None`` and ``layer_kl`` empty.
    """

    candidates: tuple[CompressionConfig, ...]
    choices: tuple[int, ...]
    target_bits: float
    bits_per_entry: float
    error: float
    layer_bits: tuple[float, ...]
    layer_errors: tuple[float, ...]
    uniform: int
    uniform_bits: float
    uniform_error: float
    dump: str
    model: str
    samples: tuple[int, ...]
    dtype: str | None = None
    reference: int | None = None
    layer_kl: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in ("candidates", "choices", "layer_bits", "layer_errors", "samples", "layer_kl"):
            value = getattr(self, name)
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise ConfigError(f"allocation {name} must be a list, got {type(value).__name__}")
            object.__setattr__(self, name, tuple(value))
        if not self.candidates or not all(
            isinstance(c, CompressionConfig) for c in self.candidates
        ):
            raise ConfigError(
                "an allocation needs a non-empty list of CompressionConfig candidates"
            )
        layers = len(self.choices)
        if not layers or len(self.layer_bits) != layers or len(self.layer_errors) != layers:
            raise ConfigError(
                f"an allocation needs one choice, bits and error per layer, got {layers}, "
                f"{len(self.layer_bits)} and {len(self.layer_errors)}"
            )
        if (self.reference is None) != (not self.layer_kl):
            raise ConfigError("a calibrated allocation needs both reference and layer_kl")
        if self.layer_kl and len(self.layer_kl) != layers:
            raise ConfigError(f"layer_kl has {len(self.layer_kl)} entries for {layers} layers")
        reference = () if self.reference is None else (self.reference,)
        for i in (*self.choices, self.uniform, *reference):
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.candidates):
                raise ConfigError(
                    f"allocation choice {i!r} out of range: {len(self.candidates)} candidates"
                )
        for i in self.samples:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ConfigError(f"allocation samples must be indices >= 0, got {i!r}")
        for name in ("target_bits", "bits_per_entry", "error", "uniform_bits", "uniform_error"):
            object.__setattr__(self, name, _finite(name, getattr(self, name)))
        for name in ("layer_bits", "layer_errors", "layer_kl"):
            object.__setattr__(self, name, tuple(_finite(name, v) for v in getattr(self, name)))
        if self.target_bits <= 0:
            raise ConfigError(f"target_bits must be > 0, got {self.target_bits}")
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise ConfigError(
                f"dtype must be one of {', '.join(STORAGE_DTYPES)} or None, got {self.dtype!r}"
            )
        if not isinstance(self.dump, str) or not isinstance(self.model, str):
            raise ConfigError("an allocation's dump and model are strings")

    @property
    def configs(self) -> tuple[CompressionConfig, ...]:
        """The config of each decoder layer (what ``GearCache(allocation.configs)`` runs)."""
        return tuple(self.candidates[i] for i in self.choices)

    @property
    def uniform_config(self) -> CompressionConfig:
        """The uniform baseline: one candidate on every layer."""
        return self.candidates[self.uniform]

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """``dtype`` as a torch dtype (``None``: the model's)."""
        return None if self.dtype is None else getattr(torch, self.dtype)

    @property
    def label(self) -> str:
        """``allocation (3.00 bits, 30 layers)``: the method name of a live run."""
        return f"allocation ({self.bits_per_entry:.2f} bits, {len(self.choices)} layers)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (candidates as :meth:`CompressionConfig.to_dict`)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "candidates": [c.to_dict() for c in self.candidates],
            **{
                name: list(value) if isinstance(value, tuple) else value
                for name, value in vars(self).items()
                if name != "candidates"
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerAllocation:
        """Inverse of :meth:`to_dict`; anything else raises :class:`ConfigError`."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise ConfigError(f"not a gear-lab allocation (no format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ConfigError(
                f"allocation version {data.get('version')!r} unknown (this reads {VERSION})"
            )
        items = {k: v for k, v in data.items() if k not in ("format", "version")}
        if not isinstance(items.get("candidates"), list):
            raise ConfigError("an allocation's candidates must be a list")
        items["candidates"] = [CompressionConfig.from_dict(c) for c in items["candidates"]]
        fields = set(cls.__dataclass_fields__)
        unknown, missing = sorted(set(items) - fields), sorted(fields - set(items) - _OPTIONAL)
        if unknown or missing:
            raise ConfigError(
                f"bad allocation fields: unknown {', '.join(unknown) or '-'}, "
                f"missing {', '.join(missing) or '-'}"
            )
        return cls(**items)


def save_allocation(
    allocation: LayerAllocation, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write ``allocation`` as JSON to ``path`` (atomically; an existing file needs
    ``overwrite``); return the path."""
    target = check_output(path, overwrite=overwrite)
    with atomic_write(target, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(allocation.to_dict(), indent=1) + "\n")
    return target


def load_allocation(path: str | os.PathLike[str]) -> LayerAllocation:
    """Read an allocation written by :func:`save_allocation` (:class:`ConfigError` when it is
    missing, unreadable or not one)."""
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"cannot read allocation {path}: {getattr(err, 'strerror', None) or err}"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"allocation {path} is not JSON: {err}") from None
    try:
        return LayerAllocation.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"allocation {path}: {err}") from None


def solve_allocation(
    errors: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], budget: int
) -> tuple[int, ...]:
    """Exact multiple-choice knapsack: one option per layer minimising ``sum errors[l][c_l]``
    with ``sum costs[l][c_l] <= budget`` (integer costs, e.g. bytes).

    Dynamic program over layers keeping the Pareto frontier of (cost, error) partial sums (see the
    module docstring); ties go to the lower cost, then to the earlier option. Raises
    :class:`ConfigError` when the cheapest options already exceed ``budget``.
    """
    if len(errors) != len(costs) or not errors:
        raise ConfigError(
            "an allocation needs errors and costs for the same, non-empty list of layers"
        )
    for layer, (errs, cs) in enumerate(zip(errors, costs, strict=True)):
        if len(errs) != len(cs) or not errs:
            raise ConfigError(f"layer {layer}: errors and costs need the same, non-empty options")
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in cs):
            raise ConfigError(f"layer {layer}: costs must be integers >= 0")
        if not all(math.isfinite(e) for e in errs):
            raise ConfigError(f"layer {layer}: errors must be finite")
    # cheapest cost of layers l.. (rest[l]); a partial sum that leaves no room for them is dropped
    rest = [0] * (len(costs) + 1)
    for layer in range(len(costs) - 1, -1, -1):
        rest[layer] = rest[layer + 1] + min(costs[layer])
    if rest[0] > budget:
        raise ConfigError(f"the cheapest options cost {rest[0]}, over the budget of {budget}")
    # frontier: (cost, error, back-pointer chain (option, previous chain)), cost ascending and
    # error strictly descending
    frontier: list[tuple[int, float, Any]] = [(0, 0.0, None)]
    for layer, (errs, cs) in enumerate(zip(errors, costs, strict=True)):
        room = budget - rest[layer + 1]
        states = [
            (cost + c, error + e, (option, chain))
            for cost, error, chain in frontier
            for option, (e, c) in enumerate(zip(errs, cs, strict=True))
            if cost + c <= room
        ]
        states.sort(key=lambda s: (s[0], s[1]))
        frontier = []
        for state in states:
            if not frontier or state[1] < frontier[-1][1]:
                frontier.append(state)
    chain = frontier[-1][2]  # the least error
    picked: list[int] = []
    while chain is not None:
        option, chain = chain
        picked.append(option)
    return tuple(reversed(picked))


def _measure(
    dump: Dump,
    candidates: Sequence[CompressionConfig],
    kind: str,
    samples: list[int],
    sweep_options: dict[str, Any],
) -> tuple[list[list[int]], list[list[float]], list[int]]:
    """Per layer and candidate, for ``kind``: measured bytes (summed over samples) and error
    (mean over samples of ``output_rel`` squared); per layer: the entries measured. Candidates
    with the same ``kind`` settings and block size are measured once."""
    groups: dict[tuple[TensorCompression, int | None], int] = {}
    member = [groups.setdefault((c.for_kind(kind), c.block_size), len(groups)) for c in candidates]
    grid = [candidates[member.index(g)] for g in range(len(groups))]
    df = sweep(dump, grid, kinds=(kind,), samples=samples, per_head=False, **sweep_options)
    df["err2"] = df["output_rel"] ** 2
    table = df.groupby(["layer", "config_index"]).agg(
        nbytes=("nbytes", "sum"), numel=("numel", "sum"), err2=("err2", "mean")
    )
    nbytes, errors, entries = [], [], []
    for layer in sorted(dump.layers):
        rows = [table.loc[(layer, group)] for group in member]
        nbytes.append([int(row["nbytes"]) for row in rows])
        errors.append([float(row["err2"]) for row in rows])
        entries.append(int(rows[0]["numel"]))
    return nbytes, errors, entries


def allocate(
    dump: Dump | str | os.PathLike[str],
    candidates: Sequence[CompressionConfig] | Mapping[str, Any],
    target_bits: float,
    *,
    samples: str | Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    progress: bool = False,
    calibrate: Callable[[CompressionConfig], Sequence[float]] | None = None,
) -> LayerAllocation:
    """Choose each layer's config among ``candidates`` so that the measured mean bits per K/V
    entry on ``dump`` is at most ``target_bits`` and the summed attention-output error is least.

    ``dump``: an open dump or a path, with queries and every layer ``0..n-1`` (the live model's);
    ``candidates``: configs, or a grid mapping for :func:`gear_lab.sweeps.expand_grid`;
    ``samples``: the dump samples measured (``None``: all); ``dtype``: the dtype K/V are
    compressed in (``"float16"``, as a half-precision cache holds them; ``None``: as stored), also
    the live cache's storage dtype. ``calibrate``: the per-layer live KL of a config
    (:func:`gear_lab.fidelity.layer_sensitivity`), called once with the reference candidate;
    the objective is then the predicted KL (module docstring). Raises :class:`ConfigError` when no candidate fits
    ``target_bits`` on every layer (the uniform baseline must exist).
    """
    target = _finite("target_bits", target_bits)
    if target <= 0:
        raise ConfigError(f"target_bits must be > 0, got {target_bits}")
    configs = list(expand_grid(candidates) if isinstance(candidates, Mapping) else candidates)
    if not configs or not all(isinstance(c, CompressionConfig) for c in configs):
        raise ConfigError("candidates must be a non-empty list of CompressionConfig or a grid")
    for config in configs:
        if config.prefill_rank is not None:
            raise ConfigError(
                f"candidate {config.name!r} sets prefill_rank: the dump measures one rank, "
                "give the rank itself"
            )
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise ConfigError(
            f"dtype must be one of {', '.join(STORAGE_DTYPES)} or None, got {dtype!r}"
        )
    with ExitStack() as stack:
        opened = dump if isinstance(dump, Dump) else stack.enter_context(open_dump(dump))
        if "queries" not in opened.kinds:
            raise ConfigError(
                f"{opened.path} holds no queries: capture it with --with-queries to measure "
                "attention errors"
            )
        if sorted(opened.layers) != list(range(len(opened.layers))):
            raise ConfigError(
                f"{opened.path} holds layers {min(opened.layers)}-{max(opened.layers)} of "
                f"{len(opened.layers)}: an allocation needs every layer from 0"
            )
        picked = parse_indices(samples, opened.num_samples, "sample")
        compute = getattr(torch, dtype) if dtype else None
        options = {"device": device, "dtype": compute, "progress": progress}
        key_bytes, key_err, key_entries = _measure(opened, configs, "keys", picked, options)
        value_bytes, value_err, value_entries = _measure(opened, configs, "values", picked, options)
        source, model = str(opened.path), opened.model_id
    pairs = zip(key_bytes, value_bytes, strict=True)
    cost = [[k + v for k, v in zip(*pair, strict=True)] for pair in pairs]
    pairs = zip(key_err, value_err, strict=True)
    error = [[k + v for k, v in zip(*pair, strict=True)] for pair in pairs]
    layer_entries = [k + v for k, v in zip(key_entries, value_entries, strict=True)]
    entries = sum(layer_entries)
    budget = math.floor(Fraction(target) * entries / 8)  # exact: 8 * bytes / entries <= target

    def bits(nbytes: int) -> float:
        return 8 * nbytes / entries

    totals = [sum(row[c] for row in cost) for c in range(len(configs))]
    fitting = [c for c in range(len(configs)) if totals[c] <= budget]
    if not fitting:
        cheapest = min(range(len(configs)), key=totals.__getitem__)
        raise ConfigError(
            f"target {target:g} bits per entry is below the cheapest candidate "
            f"({configs[cheapest].name}: {bits(totals[cheapest]):.3f} bits on {source})"
        )

    def best_uniform() -> int:
        return min(fitting, key=lambda c: (sum(row[c] for row in error), totals[c]))

    uniform = best_uniform()
    reference, layer_kl = None, ()
    if calibrate is not None:
        reference, layer_kl = uniform, tuple(calibrate(configs[uniform]))
        error = _calibrated(error, reference, layer_kl)
        uniform = best_uniform()
    choices = solve_allocation(error, cost, budget)
    layer_cost = [row[c] for row, c in zip(cost, choices, strict=True)]
    layer_errors = tuple(row[c] for row, c in zip(error, choices, strict=True))
    return LayerAllocation(
        candidates=tuple(configs),
        choices=choices,
        target_bits=target,
        bits_per_entry=bits(sum(layer_cost)),
        error=sum(layer_errors),
        layer_bits=tuple(8 * b / n for b, n in zip(layer_cost, layer_entries, strict=True)),
        layer_errors=layer_errors,
        uniform=uniform,
        uniform_bits=bits(totals[uniform]),
        uniform_error=sum(row[uniform] for row in error),
        dump=source,
        model=model,
        samples=tuple(picked),
        dtype=dtype,
        reference=reference,
        layer_kl=layer_kl,
    )


def _calibrated(
    error: list[list[float]], reference: int, layer_kl: tuple[float, ...]
) -> list[list[float]]:
    """Predicted KL ``kl[l] * error[l][c] / error[l][reference]`` (module docstring)."""
    if len(layer_kl) != len(error):
        raise ConfigError(f"calibrate gave {len(layer_kl)} KLs for {len(error)} layers")
    if not all(isinstance(k, int | float) and math.isfinite(k) and k >= 0 for k in layer_kl):
        raise ConfigError("calibrate must give finite KLs >= 0")
    if any(row[reference] <= 0 for row in error):
        raise ConfigError("the reference candidate is exact on some layer: nothing to scale by")
    return [[kl * e / row[reference] for e in row] for kl, row in zip(layer_kl, error, strict=True)]
