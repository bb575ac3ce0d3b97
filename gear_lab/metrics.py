"""Error metrics and tensor statistics for KV-cache compression (pure tensor functions).

Every function takes tensors on any device and works there; sums are accumulated in float64.
Layout: ``[batch, kv_heads, seq, head_dim]`` (queries ``[batch, heads, seq, head_dim]``).

- Reconstruction: relative Frobenius error, max absolute error, cosine similarity and SNR of
  ``x_hat`` against ``x`` (GEAR, Kang et al. 2024, reports the first), whole or per index.
- Attention: how a compressed K or V changes causal softmax attention, with the grouped-query
  head mapping of transformers' ``repeat_kv``.
- Spectra: singular values of ``[seq, head_dim]`` matrices and the energy captured per rank, the
  quantity GEAR's low-rank term ``L`` exploits in the quantization residual.
- Next-token predictions: KL divergence and top-1 agreement of two logit tensors, agreement of
  two generated token sequences (the live checks of :mod:`gear_lab.fidelity`).
- Outliers: per-channel / per-token magnitude statistics (KIVI, Liu et al. 2024: key outliers sit
  in fixed channels).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from gear_lab import native
from gear_lab.errors import ConfigError, TensorError

if TYPE_CHECKING:
    from gear_lab.compression import CompressionConfig, TensorCompression

__all__ = [
    "AttentionReference",
    "attention_error",
    "attention_reference",
    "delta_perplexity",
    "energy_curve",
    "kl_quantiles",
    "next_token_kl",
    "outlier_stats",
    "quantization_residual",
    "rank_for_energy",
    "reconstruction",
    "reconstruction_profile",
    "singular_values",
    "token_agreement",
    "top1_agreement",
]

# dimension kept by each profile of a [batch, kv_heads, seq, head_dim] tensor
_PROFILE_DIM = {"head": 1, "token": 2, "channel": 3}
# AttentionReference.error_stack: query rows per causal block, scores per tile (4 MiB of float32:
# on the demo sweep with 2 threads 11 % faster than 1 MiB, as each tile's ops synchronize the
# threads; with 1 thread 1 % slower), |x| below which the torch rows take expm1(x) - x from its
# Taylor polynomial (both forms then err ~2e-6 relative in float32), and the largest score
# shift x it accepts
_BLOCK_ROWS = 32
_TILE_SCORES = 2**20
_TAYLOR_BELOW = 0.05
_MAX_SHIFT = 60.0


def _check_float(name: str, x: torch.Tensor, ndim: int | None = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TensorError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TensorError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise TensorError(f"{name} must have {ndim} dims, got shape {tuple(x.shape)}")


def _check_pair(x: torch.Tensor, x_hat: torch.Tensor, ndim: int | None = None) -> None:
    _check_float("x", x, ndim)
    _check_float("x_hat", x_hat, ndim)
    if x.shape != x_hat.shape:
        raise TensorError(f"x_hat shape {tuple(x_hat.shape)} differs from x shape {tuple(x.shape)}")


def _ratio(num: torch.Tensor, den: torch.Tensor, zero_zero: float) -> torch.Tensor:
    """``num / den`` with ``0 / 0 -> zero_zero`` and ``x / 0 -> inf`` (no NaN from exact zeros)."""
    out = num / torch.where(den == 0, torch.ones_like(den), den)
    out = torch.where((den == 0) & (num != 0), torch.full_like(out, math.inf), out)
    return torch.where((den == 0) & (num == 0), torch.full_like(out, zero_zero), out)


def _reconstruction(
    x: torch.Tensor, x_hat: torch.Tensor, dims: tuple[int, ...]
) -> dict[str, torch.Tensor]:
    """The four reconstruction metrics, reducing ``dims`` (float64; the error exact, each
    energy one pass, ``x . x_hat`` from them as ``(|x|^2 + |x_hat|^2 - |x_hat - x|^2) / 2``)."""
    err = x_hat.double().sub_(x)  # exact for float32 / 16 inputs (their differences fit)

    def energy(t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t, dim=dims, dtype=torch.float64).square()

    err2, ref2, hat2 = energy(err), energy(x), energy(x_hat)
    dot = (ref2 + hat2 - err2) / 2
    cos_den = (ref2 * hat2).sqrt()
    # two all-zero tensors agree perfectly; one zero tensor against a non-zero one has cosine 0
    cosine = torch.where((ref2 == 0) & (hat2 == 0), torch.ones_like(dot), _ratio(dot, cos_den, 0.0))
    return {
        "rel_fro": _ratio(err2, ref2, 0.0).sqrt(),
        "max_abs": torch.maximum(err.amax(dims), err.amin(dims).neg()),
        "cosine": cosine,
        "snr_db": 10.0 * torch.log10(_ratio(ref2, err2, math.inf)),
    }


def reconstruction(x: torch.Tensor, x_hat: torch.Tensor) -> dict[str, float]:
    """Reconstruction error of ``x_hat`` against ``x`` (any equal shapes).

    Returns ``rel_fro`` = ||x_hat - x||_F / ||x||_F, ``max_abs`` = max |x_hat - x|, ``cosine``
    (of the flattened tensors) and ``snr_db`` = 10 log10(||x||^2 / ||x_hat - x||^2); an exact
    reconstruction gives rel_fro 0 and snr_db inf.
    """
    _check_pair(x, x_hat)
    dims = tuple(range(x.dim()))
    return {k: float(v) for k, v in _reconstruction(x, x_hat, dims).items()}


def reconstruction_profile(
    x: torch.Tensor, x_hat: torch.Tensor, by: Literal["channel", "token", "head"] = "channel"
) -> dict[str, torch.Tensor]:
    """The metrics of :func:`reconstruction` per channel, token or head (float64 tensors).

    ``x``, ``x_hat``: ``[batch, kv_heads, seq, head_dim]``. Returns tensors of shape
    ``[head_dim]``, ``[seq]`` or ``[kv_heads]``; each entry pools every other axis.
    """
    if by not in _PROFILE_DIM:
        raise ConfigError(f"by must be one of {sorted(_PROFILE_DIM)}, got {by!r}")
    _check_pair(x, x_hat, ndim=4)
    dims = tuple(d for d in range(4) if d != _PROFILE_DIM[by])
    return _reconstruction(x, x_hat, dims)


@dataclass(frozen=True)
class AttentionReference:
    """Exact causal attention of one layer, computed once and compared against many K/V variants.

    Queries are grouped by KV head: ``q`` of ``[batch, heads, seq, d]`` is viewed as
    ``[batch, kv_heads, group, seq, d]`` so that query head ``h`` reads KV head
    ``h // group`` (transformers' ``repeat_kv``). All tensors are float64. The full ``scores``,
    ``probs`` and ``output`` are computed on first use (by :meth:`error`); :meth:`error_stack`
    computes only the causal blocks it reads.
    """

    q: torch.Tensor  # [batch, kv_heads, group, seq, d]
    k: torch.Tensor  # [batch, kv_heads, seq, d]
    v: torch.Tensor  # [batch, kv_heads, seq, d]
    scaling: float
    softcap: float | None
    mask: torch.Tensor  # [seq, seq] bool, True where query i may attend key j

    @functools.cached_property
    def scores(self) -> torch.Tensor:
        """``[batch, kv_heads, group, seq, seq]`` scores, masked entries 0."""
        return _scores(self.q, self.k, self.scaling, self.softcap).masked_fill(~self.mask, 0.0)

    @functools.cached_property
    def probs(self) -> torch.Tensor:
        """Same shape, masked entries 0 (a softmax, as :meth:`error` computes ``p_hat``)."""
        return torch.softmax(self.scores.masked_fill(~self.mask, -math.inf), dim=-1)

    @functools.cached_property
    def output(self) -> torch.Tensor:
        """``[batch, kv_heads, group, seq, d]`` attention output."""
        return torch.matmul(self.probs, self.v.unsqueeze(2))

    def error(
        self,
        k_hat: torch.Tensor | None = None,
        v_hat: torch.Tensor | None = None,
        kv_heads: slice | None = None,
    ) -> dict[str, float]:
        """Attention error when ``k_hat`` / ``v_hat`` replace the exact K / V (None: exact).

        ``kv_heads`` restricts the comparison to those KV heads (and their query heads); the
        replacements then hold only those heads. See :func:`attention_error` for the metrics.
        """
        sel = slice(None) if kv_heads is None else kv_heads
        k, v, q = self.k[:, sel], self.v[:, sel], self.q[:, sel]
        for name, new, old in (("k_hat", k_hat, k), ("v_hat", v_hat, v)):
            if new is not None:
                _check_float(name, new, ndim=4)
                if new.shape != old.shape:
                    raise TensorError(
                        f"{name} shape {tuple(new.shape)} differs from the reference {tuple(old.shape)}"
                    )
        probs, output = self.probs[:, sel], self.output[:, sel]
        constants = {name: value[:, sel] for name, value in self._constants.items()}
        result = {"score_rel": 0.0, "kl": 0.0, "tv": 0.0}
        probs_hat = probs
        if k_hat is not None:
            hidden = ~self.mask
            scores_hat = _scores(q, k_hat.to(q), self.scaling, self.softcap)
            err = (scores_hat - self.scores[:, sel]).masked_fill_(hidden, 0.0)
            masked = scores_hat.masked_fill_(hidden, -math.inf)
            probs_hat = torch.softmax(masked, dim=-1)
            log_hat = torch.log_softmax(masked, dim=-1).masked_fill_(hidden, 0.0)
            # KL(p || p_hat) per query row: sum p log p - sum p log p_hat (p = 0 at hidden keys)
            kl_rows = constants["neg_entropy"] - torch.linalg.vecdot(probs, log_hat)
            err2 = torch.linalg.vector_norm(err).square()
            result = {
                "score_rel": float(_ratio(err2, constants["score_ref2"].sum(), 0.0).sqrt()),
                "kl": float(kl_rows.mean()),
                "tv": float(
                    0.5 * torch.linalg.vector_norm(probs - probs_hat, ord=1) / kl_rows.numel()
                ),
            }
        v_used = v if v_hat is None else v_hat.to(v)
        out_err2 = (torch.matmul(probs_hat, v_used.unsqueeze(2)) - output).square().sum()
        out_ref2 = constants["out_ref2"].sum()
        result["output_rel"] = float(_ratio(out_err2, out_ref2, 0.0).sqrt())
        return result

    def error_stack(
        self,
        k_hat: torch.Tensor | None = None,
        v_hat: torch.Tensor | None = None,
        kv_heads: slice | None = None,
    ) -> dict[str, torch.Tensor]:
        """:meth:`error` of many replacements at once, in float32 on differences (fast).

        ``k_hat`` / ``v_hat``: ``[configs, batch, kv_sel, seq, d]`` (``kv_sel``: the heads of
        ``kv_heads``). Returns each metric of :meth:`error` as float64 ``[configs]``, as a rule
        within ~1e-6 relative however small the error, as only differences are formed (measured
        <= 7e-8 on the SmolLM2 dump); less where a row's score errors nearly coincide across its
        keys, as float32 ``d`` carries ~1e-7 ``|q| |k_hat - k|`` (tiny random rows: ~1e-4). Per
        query row, with ``d = scaling q (k_hat - k)^T`` (the score error), ``m = sum_j p d``
        and ``x = d - m``: ``p_hat = p (1 + expm1(x)) / (1 + z)``, ``z = sum_j p expm1(x)``, so

        - ``KL(p || p_hat) = log1p(sum_j p phi(x))``, ``phi(x) = expm1(x) - x >= 0`` (as
          ``sum_j p x = 0``; its Taylor polynomial where ``|x| < 0.05``; an error in ``m``
          enters only to second order),
        - ``p_hat - p = p (expm1(x) - z) / (1 + z)`` (TV),
        - output error ``(p_hat - p) v + p_hat (v_hat - v)``, with ``p v`` the reference output.

        Row sums are float32, sums over rows float64. Query rows go in causal blocks of
        ``_BLOCK_ROWS`` (a block reads only the keys its rows see). On CPU a block runs compiled
        (``csrc/attention.cpp``: the products and the row sums fused per config and tile of rows,
        ``phi`` without cancellation at any ``x``), else in torch, configs in tiles of
        ``_TILE_SCORES`` scores. Softcapped scores (Gemma 2), and configs shifting a score by
        more than 60 (beyond what float32 ``expm1`` and ``p`` resolve), are computed by
        :meth:`error` instead.
        """
        sel = slice(None) if kv_heads is None else kv_heads
        diffs: dict[str, torch.Tensor] = {}
        for name, new, old in (("k_hat", k_hat, self.k), ("v_hat", v_hat, self.v)):
            if new is not None:
                _check_float(name, new, ndim=5)
                if new.shape[1:] != old[:, sel].shape:
                    raise TensorError(
                        f"{name} shape {tuple(new.shape)} is not [configs] + the reference "
                        f"{tuple(old[:, sel].shape)}"
                    )
                exact32 = self._float32[name]
                if exact32 is not None and new.dtype != torch.float64:
                    diffs[name] = new.float() - exact32[:, sel]  # no float64 copies
                else:
                    diffs[name] = (new.to(old) - old[:, sel]).float()
        if not diffs:
            raise TensorError("error_stack needs k_hat or v_hat")
        dk, dv = diffs.get("k_hat"), diffs.get("v_hat")
        n = next(iter(diffs.values())).shape[0]
        if self.softcap is not None:
            return self._error_each(k_hat, v_hat, kv_heads, range(n))
        # score error^2, KL, |p_hat - p|, output error^2
        sums = torch.zeros(4, n, dtype=torch.float64, device=self.q.device)
        shifted = torch.zeros(n, dtype=torch.bool, device=self.q.device)
        heads = range(self.k.shape[1])[sel]
        lib = native.library() if self.q.device.type == "cpu" else None
        for b, (u, h) in itertools.product(range(self.k.shape[0]), enumerate(heads)):
            for block in self._stacked[0][b][h]:
                if lib is not None:
                    errors = [None if x is None else x[:, b, u, block.keys] for x in (dk, dv)]
                    _compiled_block(lib, block, *errors, sums, shifted)
                    continue
                step = max(1, _TILE_SCORES // block.probs.numel())
                for start in range(0, n, step):
                    cs = slice(start, start + step)
                    part, big = _block_error(
                        block,
                        None if dk is None else dk[cs, b, u, block.keys],
                        None if dv is None else dv[cs, b, u, block.keys],
                    )
                    sums[:, cs] += part
                    shifted[cs] |= big
        rows = self.k.shape[0] * len(heads) * self.q.shape[2] * self.q.shape[3]
        constants = {name: value[:, sel].sum() for name, value in self._stacked[1].items()}
        result = {
            "score_rel": _ratio(sums[0], constants["score_ref2"], 0.0).sqrt(),
            "kl": sums[1] / rows,
            "tv": 0.5 * sums[2] / rows,
            "output_rel": _ratio(sums[3], constants["out_ref2"], 0.0).sqrt(),
        }
        redo = shifted.nonzero().flatten().tolist()
        if redo:
            for name, exact in self._error_each(k_hat, v_hat, kv_heads, redo).items():
                result[name][redo] = exact
        return result

    def _error_each(
        self,
        k_hat: torch.Tensor | None,
        v_hat: torch.Tensor | None,
        kv_heads: slice | None,
        configs: Iterable[int],
    ) -> dict[str, torch.Tensor]:
        """:meth:`error` of the ``configs`` of a stack, one at a time, as float64 ``[configs]``."""
        each = [
            self.error(
                None if k_hat is None else k_hat[c], None if v_hat is None else v_hat[c], kv_heads
            )
            for c in configs
        ]
        return {
            name: torch.tensor([e[name] for e in each], dtype=torch.float64, device=self.q.device)
            for name in ("score_rel", "kl", "tv", "output_rel")
        }

    @functools.cached_property
    def _float32(self) -> dict[str, torch.Tensor | None]:
        """``k`` and ``v`` (keyed ``k_hat``, ``v_hat``) in float32 where that holds them
        exactly (a float32 dump), else None: :meth:`error_stack` then rounds each difference
        once, in float32, instead of forming it in float64."""
        kept: dict[str, torch.Tensor | None] = {}
        for name, x in (("k_hat", self.k), ("v_hat", self.v)):
            x32 = x.float()
            kept[name] = x32 if torch.equal(x32.double(), x) else None
        return kept

    @functools.cached_property
    def _stacked(self) -> tuple[list[list[list[_Block]]], dict[str, torch.Tensor]]:
        """What :meth:`error_stack` reads: the causal blocks of query rows of each
        ``[batch][kv_head]``, computed block by block in float64 (the keys a block's rows see,
        not the full ``[seq, seq]``), and the :attr:`_energies` summed over them."""
        batch, kv_heads, group, seq, _ = self.q.shape
        blocks: list[list[list[_Block]]] = [[[] for _ in range(kv_heads)] for _ in range(batch)]
        energies = {
            name: torch.zeros(batch, kv_heads, dtype=torch.float64, device=self.q.device)
            for name in ("score_ref2", "out_ref2")
        }
        queries = self.q * self.scaling

        def flat(x: torch.Tensor) -> torch.Tensor:  # [..., group, rows, n] -> float32 contiguous
            return x.float().contiguous()

        for r0 in range(0, seq, _BLOCK_ROWS):
            rows = slice(r0, min(seq, r0 + _BLOCK_ROWS))
            seen = self.mask[rows].any(0).nonzero().flatten()  # every row sees itself
            keys = slice(int(seen[0]), int(seen[-1]) + 1)
            visible = self.mask[rows, keys]
            hidden = (~visible).any(0).nonzero().flatten()  # key columns with a masked score
            masked = slice(int(hidden[0]), int(hidden[-1]) + 1) if len(hidden) else slice(0)
            # each row's visible keys are one range (causal, sliding window)
            index = torch.arange(visible.shape[1], device=visible.device)
            lo = torch.where(visible, index, visible.shape[1]).amin(1)
            hi = torch.where(visible, index, -1).amax(1) + 1
            ranges = torch.stack([lo, hi]).repeat(1, group).to("cpu", torch.int32)
            # exact float64 attention of the block, [batch, kv_heads, group, rows, keys] (no
            # softcap: error_stack hands softcapped scores to error)
            scores = torch.matmul(queries[..., rows, :], self.k[:, :, None, keys].mT)
            scores = scores.masked_fill(~visible, 0.0)
            probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1)
            output = torch.matmul(probs, self.v[:, :, None, keys])
            energies["score_ref2"] += scores.square().sum((-3, -2, -1))
            energies["out_ref2"] += output.square().sum((-3, -2, -1))
            # float32 copies for every (batch, KV head) at once; a block's rows are the block's
            # rows of each query head of the group ([group * rows, n] views)
            q32, p32, o32 = flat(queries[..., rows, :]), flat(probs), flat(output)
            v32 = flat(self.v[:, :, keys])
            visible32 = visible[:, masked].repeat(group, 1).float()
            for b, h in itertools.product(range(batch), range(kv_heads)):
                blocks[b][h].append(
                    _Block(
                        keys=keys,
                        queries=q32[b, h].flatten(0, 1),
                        probs=p32[b, h].flatten(0, 1),
                        output=o32[b, h].flatten(0, 1),
                        values=v32[b, h],
                        masked=masked,
                        visible=visible32,
                        ranges=ranges,
                    )
                )
        return blocks, energies

    @functools.cached_property
    def log_probs(self) -> torch.Tensor:
        """``log p`` ``[batch, kv_heads, group, seq, seq]``, masked entries -inf (computed on
        first use: only :meth:`error` needs it)."""
        return torch.log_softmax(self.scores.masked_fill(~self.mask, -math.inf), dim=-1)

    @functools.cached_property
    def _constants(self) -> dict[str, torch.Tensor]:
        """What every comparison of :meth:`error` reuses: the :attr:`_energies` and
        ``neg_entropy`` (``sum p log p`` per query row)."""
        visible_log = self.log_probs.masked_fill(~self.mask, 0.0)
        return {**self._energies, "neg_entropy": torch.linalg.vecdot(self.probs, visible_log)}

    @functools.cached_property
    def _energies(self) -> dict[str, torch.Tensor]:
        """``score_ref2`` and ``out_ref2``: score and output energy per ``[batch, kv_head]``."""
        dims = (-3, -2, -1)
        return {
            "score_ref2": self.scores.square().sum(dims),
            "out_ref2": self.output.square().sum(dims),
        }


@dataclass(frozen=True)
class _Block:
    """A causal block of query rows of one (batch, KV head), in float32, its rows the block's
    rows of each query head of the group: ``queries`` (times the scaling) and ``output``
    ``[rows, d]``, ``probs`` ``[rows, keys]`` over the key positions ``keys`` the rows see,
    ``values`` ``[keys, d]``, and ``visible`` (1 where a row sees the key, else 0) over the
    columns ``masked`` of ``keys`` that hold a masked score (causal: the last rows' keys), and
    ``ranges`` int32 ``[2, rows]`` (CPU): each row's first and one-past-last visible key."""

    keys: slice
    queries: torch.Tensor
    probs: torch.Tensor
    output: torch.Tensor
    values: torch.Tensor
    masked: slice
    visible: torch.Tensor
    ranges: torch.Tensor


def _block_error(
    block: _Block, dk: torch.Tensor | None, dv: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums of :meth:`AttentionReference.error_stack` over one block's rows: float64
    ``[4, configs]`` (score error^2, KL, ``|p_hat - p|``, output error^2) and bool ``[configs]``
    (a score shifted beyond ``_MAX_SHIFT``), for key / value errors ``dk`` / ``dv``
    ``[configs, keys, d]`` (None: exact)."""
    p = block.probs
    if dk is None:
        assert dv is not None
        # ||p dv||, transposed: one [configs * d, keys] x [keys, rows] product
        out2 = torch.matmul(dv.transpose(-1, -2), p.T).square().sum((-2, -1), dtype=torch.float64)
        zero = torch.zeros_like(out2)
        return torch.stack([zero, zero, zero, out2]), torch.zeros_like(out2, dtype=torch.bool)
    d = torch.matmul(block.queries, dk.transpose(-1, -2))  # [configs, rows, keys]
    score2, kl, dp, w, z, big = _torch_rows(block, d)
    norm = (1 + z.double()).squeeze(-1)
    out = torch.matmul(w, block.values).sub_(z * block.output)
    if dv is not None:
        out += torch.matmul(w + p, dv)
    out2 = out.square().sum(-1, dtype=torch.float64)
    sums = [score2, kl, (dp.double() / norm).sum(-1), (out2 / norm.square()).sum(-1)]
    return torch.stack(sums), big


_Rows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _torch_rows(block: _Block, d: torch.Tensor) -> _Rows:
    """From the score errors ``d`` ``[configs, rows, keys]`` (overwritten): float64
    ``[configs]`` sums of the score error^2 and of KL, float32 ``[configs, rows]`` of
    ``|p_hat - p| (1 + z)``, ``w = p expm1(x)`` ``[configs, rows, keys]``, ``z``
    ``[configs, rows, 1]`` and the bool ``[configs]`` shift flag (see ``_block_error``)."""
    p = block.probs
    d[..., block.masked].mul_(block.visible)  # (masked_fill_ is several times slower)
    score2 = torch.linalg.vecdot(d, d).sum(-1, dtype=torch.float64)
    x = d.sub_(torch.linalg.vecdot(d, p).unsqueeze(-1))  # x = d - m
    x2 = x.square()
    big = ~(x2.amax((-2, -1)) <= _MAX_SHIFT**2)  # NaN included
    e = torch.expm1(x)
    # phi = expm1(x) - x (exact subtraction, but e's rounding is ~1e-7 |x|), replaced by
    # x^2/2 + x^3/6 + x^4/24 where |x| < _TAYLOR_BELOW: ``small`` is 1 there and 0 elsewhere (a
    # clamped steep ramp, both forms accurate where it blends; torch.where is several times slower)
    taylor = (x2 * (1 / 24)).add_(x, alpha=1 / 6).add_(0.5).mul_(x2)
    small = x2.mul_(-1e30).add_(_TAYLOR_BELOW**2 * 1e30).clamp_(0.0, 1.0)
    direct = e - x
    phi = taylor.sub_(direct).mul_(small).add_(direct)
    kl = torch.log1p(torch.linalg.vecdot(phi, p).double()).sum(-1)
    w = e.mul_(p)  # p expm1(x) = (1 + z) p_hat - p
    z = w.sum(-1, keepdim=True)
    dp = torch.addcmul(w, p, z, value=-1.0).abs_().sum(-1)  # (vector_norm is slower)
    return score2, kl, dp, w, z, big


class _AttentionBlockArgs(ctypes.Structure):
    """``AttentionBlockArgs`` of ``csrc/attention.cpp``."""

    _fields_ = [
        ("q", ctypes.c_void_p), ("p", ctypes.c_void_p), ("o", ctypes.c_void_p),
        ("v", ctypes.c_void_p), ("lo", ctypes.c_void_p), ("hi", ctypes.c_void_p),
        ("dk", ctypes.c_void_p), ("dv", ctypes.c_void_p), ("dk_stride", ctypes.c_int64),
        ("dv_stride", ctypes.c_int64), ("configs", ctypes.c_int64), ("rows", ctypes.c_int64),
        ("keys", ctypes.c_int64), ("dim", ctypes.c_int64), ("sums", ctypes.c_void_p),
        ("shifted", ctypes.c_void_p), ("max_shift", ctypes.c_float), ("threads", ctypes.c_int32),
    ]  # fmt: skip


def _compiled_block(
    lib: ctypes.CDLL,
    block: _Block,
    dk: torch.Tensor | None,
    dv: torch.Tensor | None,
    sums: torch.Tensor,
    shifted: torch.Tensor,
) -> None:
    """:func:`_block_error` compiled (``csrc/attention.cpp``), its sums added to ``sums``
    float64 ``[4, configs]`` and its shift flags or-ed into ``shifted`` bool ``[configs]``;
    ``dk`` / ``dv`` ``[configs, keys, d]`` float32 (None: exact)."""
    keys, dim = block.values.shape
    # each config's [keys, d] rows contiguous (as sliced from error_stack's contiguous stacks)
    dk, dv = (x if x is None or x.stride()[1:] == (dim, 1) else x.contiguous() for x in (dk, dv))
    dk_ptr, dk_stride = (None, 0) if dk is None else (dk.data_ptr(), dk.stride(0))
    dv_ptr, dv_stride = (None, 0) if dv is None else (dv.data_ptr(), dv.stride(0))
    configs, rows = sums.shape[1], block.queries.shape[0]
    args = _AttentionBlockArgs(
        block.queries.data_ptr(), block.probs.data_ptr(), block.output.data_ptr(),
        block.values.data_ptr(), block.ranges[0].data_ptr(), block.ranges[1].data_ptr(),
        dk_ptr, dv_ptr, dk_stride, dv_stride, configs, rows, keys, dim, sums.data_ptr(),
        shifted.data_ptr(), _MAX_SHIFT, max(1, min(torch.get_num_threads(), configs * rows)),
    )  # fmt: skip
    lib.gear_attention_block(ctypes.byref(args))


def _scores(
    q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None
) -> torch.Tensor:
    """Scores ``[batch, kv_heads, group, seq, seq]`` (unmasked) from grouped ``q`` and ``k``."""
    # one [group * seq, d] x [d, seq] product per KV head (no broadcast copy of k); scaling q,
    # the smaller operand
    scores = torch.matmul((q * scaling).flatten(-3, -2), k.transpose(-1, -2))
    scores = scores.unflatten(-2, q.shape[-3:-1])
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    return scores


def _attention_mask(seq: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """[seq, seq] bool: key j is visible from query i when j <= i and i - j < sliding_window."""
    i = torch.arange(seq, device=device)[:, None]
    j = torch.arange(seq, device=device)[None, :]
    mask = j <= i
    if sliding_window is not None:
        mask &= (i - j) < sliding_window
    return mask


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> AttentionReference:
    """Precompute exact causal attention for repeated comparisons (see :func:`attention_error`)."""
    _check_float("q", q, ndim=4)
    _check_float("k", k, ndim=4)
    _check_float("v", v, ndim=4)
    if k.shape != v.shape:
        raise TensorError(f"k shape {tuple(k.shape)} differs from v shape {tuple(v.shape)}")
    b, heads, seq, d = q.shape
    kb, kv_heads, kseq, kd = k.shape
    if (kb, kseq, kd) != (b, seq, d):
        raise TensorError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch, seq or head_dim"
        )
    if heads % kv_heads:
        raise TensorError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if sliding_window is not None and sliding_window < 1:
        raise ConfigError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    scale = d**-0.5 if scaling is None else float(scaling)
    if not math.isfinite(scale) or scale <= 0:
        raise ConfigError(f"scaling must be a positive finite number, got {scaling}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ConfigError(f"softcap must be a positive number or None, got {softcap}")
    q64 = q.double().reshape(b, kv_heads, heads // kv_heads, seq, d)
    k64, v64 = k.double(), v.double()
    mask = _attention_mask(seq, sliding_window, q.device)
    return AttentionReference(q64, k64, v64, scale, softcap, mask)


def attention_error(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_hat: torch.Tensor,
    v_hat: torch.Tensor,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> dict[str, float]:
    """How compressed K/V change causal softmax attention (float64 throughout).

    ``q``: ``[batch, heads, seq, d]``; ``k``, ``v``, ``k_hat``, ``v_hat``:
    ``[batch, kv_heads, seq, d]``; query head ``h`` reads KV head ``h // (heads // kv_heads)``.
    Scores are ``q k^T * scaling`` (default ``d ** -0.5``; with ``softcap`` c, ``c tanh(s / c)``
    as Gemma 2) over causal positions (key ``j <= i``, and ``i - j < sliding_window`` when given,
    as transformers' sliding-window mask).

    Returns ``score_rel`` (relative Frobenius error of the scores over visible positions),
    ``kl`` (mean over query rows of KL(p_exact || p_hat)), ``tv`` (mean total variation
    ``0.5 * sum |p - p_hat|``) and ``output_rel`` (relative Frobenius error of
    ``softmax(scores) v``).
    """
    ref = attention_reference(
        q, k, v, scaling=scaling, sliding_window=sliding_window, softcap=softcap
    )
    return ref.error(k_hat, v_hat)


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values of each ``[seq, head_dim]`` matrix of ``x`` (``[..., seq, head_dim]``).

    Returns float64 ``[..., min(seq, head_dim)]``, descending.
    """
    _check_float("x", x)
    if x.dim() < 2:
        raise TensorError(f"x must have at least 2 dims, got shape {tuple(x.shape)}")
    return torch.linalg.svdvals(x.double())


def energy_curve(sv: torch.Tensor) -> torch.Tensor:
    """Share of ``sum(sv ** 2)`` captured by the best rank-r approximation, r = 1..k.

    ``sv``: ``[..., k]`` singular values (descending). Returns float64 ``[..., k]`` whose entry
    ``r - 1`` is the share at rank r (Eckart-Young); an all-zero matrix counts as fully captured.
    """
    _check_float("sv", sv)
    if sv.dim() < 1 or sv.shape[-1] == 0:
        raise TensorError(f"sv must hold at least one singular value, got shape {tuple(sv.shape)}")
    if bool((sv < 0).any()):
        raise TensorError("singular values must be non-negative")
    energy = sv.double().square().cumsum(-1)
    total = energy[..., -1:]
    return _ratio(energy, total.expand_as(energy), 1.0)


def rank_for_energy(sv: torch.Tensor, share: float) -> int | torch.Tensor:
    """Smallest rank whose approximation captures ``share`` of the energy (``0 <= share <= 1``).

    ``sv``: ``[k]`` -> int; ``[..., k]`` -> LongTensor ``[...]``. A share of 0 needs rank 0.
    """
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"share must lie in [0, 1], got {share}")
    curve = energy_curve(sv)
    reached = curve >= share - 1e-12  # tolerate float rounding of the final cumulative sum
    rank = reached.long().argmax(-1) + 1  # the last entry is 1, so some rank always reaches
    if share == 0.0:
        rank = torch.zeros_like(rank)
    return int(rank) if rank.dim() == 0 else rank


def quantization_residual(
    x: torch.Tensor,
    config: TensorCompression | CompressionConfig,
    kind: str = "keys",
) -> torch.Tensor:
    """The residual GEAR's low-rank term approximates: ``x - (D + S)`` (Kang et al. 2024, eq. 4).

    ``x``: ``[batch, kv_heads, seq, head_dim]``; ``config`` (its ``kind`` side when a
    :class:`CompressionConfig`) is applied with ``rank=0``, so D is its quantized backbone and S
    its kept outliers. Returns a tensor like ``x`` (its singular values are the residual spectrum).
    """
    from gear_lab.compression import CompressionConfig, compress

    _check_float("x", x, ndim=4)
    tc = config.for_kind(kind) if isinstance(config, CompressionConfig) else config
    backbone = compress(x, dataclasses.replace(tc, rank=0)).decompress()
    return x - backbone.to(x.dtype)


def outlier_stats(
    x: torch.Tensor, by: Literal["channel", "token"] = "channel", k_sigma: float = 3.0
) -> dict[str, torch.Tensor]:
    """Magnitude statistics of each channel (over tokens) or token (over channels) vector.

    ``x``: ``[..., seq, head_dim]``. Returns float64 tensors ``[..., head_dim]`` (by channel) or
    ``[..., seq]`` (by token): ``max_abs``; ``kurtosis``, the *excess* kurtosis
    ``E[(x - mu)^4] / sigma^4 - 3`` (0 for a Gaussian, NaN for a constant vector); and
    ``share_beyond``, the share of entries with ``|x - mu| > k_sigma * sigma`` (population sigma).
    """
    if by not in ("channel", "token"):
        raise ConfigError(f"by must be 'channel' or 'token', got {by!r}")
    _check_float("x", x)
    if x.dim() < 2:
        raise TensorError(f"x must have at least 2 dims, got shape {tuple(x.shape)}")
    if not (math.isfinite(k_sigma) and k_sigma > 0):
        raise ConfigError(f"k_sigma must be a positive number, got {k_sigma}")
    dim = -2 if by == "channel" else -1
    x64 = x.double()
    centred = x64 - x64.mean(dim, keepdim=True)
    var = centred.square().mean(dim)
    m4 = centred.pow(4).mean(dim)
    sigma = var.sqrt().unsqueeze(dim)
    return {
        "max_abs": x64.abs().amax(dim),
        "kurtosis": m4 / var.square() - 3.0,
        "share_beyond": (centred.abs() > k_sigma * sigma).double().mean(dim),
    }


def next_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference) || softmax(logits))`` in nats over the last axis, in float64.

    ``reference_logits`` and ``logits`` are ``[..., vocab]``; the result is ``[...]``.
    """
    log_p = torch.log_softmax(reference_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)


def top1_agreement(reference_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Whether the most likely next token agrees, ``[..., vocab]`` -> bool ``[...]``."""
    return reference_logits.argmax(dim=-1) == logits.argmax(dim=-1)


def token_agreement(reference: list[int], other: list[int]) -> tuple[float, int | None]:
    """Share of positions where two generations agree (over the longer one), and the first
    position where they differ (``None`` when identical)."""
    length = max(len(reference), len(other))
    if length == 0:
        return 1.0, None
    same = [
        i < len(reference) and i < len(other) and reference[i] == other[i] for i in range(length)
    ]
    first = next((i for i, ok in enumerate(same) if not ok), None)
    return sum(same) / length, first


def kl_quantiles(kl: torch.Tensor) -> dict[str, float]:
    """Mean, median, 99th and 99.9th percentile of per-token KL values ``[n]`` (the tail
    statistics llama.cpp's perplexity tool reports for a quantization type)."""
    _check_float("kl", kl)
    if kl.numel() == 0:
        raise TensorError("kl_quantiles needs at least one KL value")
    values = kl.detach().double().flatten().cpu()
    q = torch.quantile(values, torch.tensor([0.5, 0.99, 0.999], dtype=torch.float64))
    return {
        "kl_mean": values.mean().item(),
        "kl_median": q[0].item(),
        "kl_p99": q[1].item(),
        "kl_p999": q[2].item(),
    }


def delta_perplexity(
    nll_full: list[torch.Tensor], nll_compressed: list[torch.Tensor], confidence: float = 0.95
) -> tuple[float, float]:
    """Perplexity change (compressed minus full, pooled over every scored token) and the
    half-width of its ``confidence`` interval across windows (Student's t over the windows'
    paired differences; ``nan`` for a single window). Each list holds one ``[tokens]`` tensor of
    per-token negative log-likelihoods per window, paired by position."""
    if len(nll_full) != len(nll_compressed) or not nll_full:
        raise TensorError("delta_perplexity needs the same, non-zero number of windows for both")
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    full, comp = torch.cat(nll_full).double(), torch.cat(nll_compressed).double()
    delta = math.exp(comp.mean().item()) - math.exp(full.mean().item())
    per_window = torch.tensor(
        [
            math.exp(c.double().mean().item()) - math.exp(f.double().mean().item())
            for f, c in zip(nll_full, nll_compressed, strict=True)
        ],
        dtype=torch.float64,
    )
    n = per_window.numel()
    if n < 2:
        return delta, math.nan
    from scipy.stats import t

    half = t.ppf(0.5 + confidence / 2, n - 1) * per_window.std().item() / math.sqrt(n)
    return delta, float(half)
