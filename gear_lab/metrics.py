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

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

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
    """The four reconstruction metrics, reducing ``dims`` (float64)."""
    x64, h64 = x.double(), x_hat.double()
    err = h64 - x64
    err2 = err.square().sum(dims)
    ref2 = x64.square().sum(dims)
    hat2 = h64.square().sum(dims)
    dot = (x64 * h64).sum(dims)
    cos_den = (ref2 * hat2).sqrt()
    # two all-zero tensors agree perfectly; one zero tensor against a non-zero one has cosine 0
    cosine = torch.where((ref2 == 0) & (hat2 == 0), torch.ones_like(dot), _ratio(dot, cos_den, 0.0))
    return {
        "rel_fro": _ratio(err2, ref2, 0.0).sqrt(),
        "max_abs": err.abs().amax(dims),
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
    ``h // group`` (transformers' ``repeat_kv``). All tensors are float64.
    """

    q: torch.Tensor  # [batch, kv_heads, group, seq, d]
    k: torch.Tensor  # [batch, kv_heads, seq, d]
    v: torch.Tensor  # [batch, kv_heads, seq, d]
    scaling: float
    softcap: float | None
    mask: torch.Tensor  # [seq, seq] bool, True where query i may attend key j
    scores: torch.Tensor  # [batch, kv_heads, group, seq, seq], masked entries 0
    log_probs: torch.Tensor  # same shape; masked entries -inf
    probs: torch.Tensor  # same shape; masked entries 0
    output: torch.Tensor  # [batch, kv_heads, group, seq, d]

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

    @functools.cached_property
    def _constants(self) -> dict[str, torch.Tensor]:
        """What every comparison reuses: ``score_ref2`` and ``out_ref2`` (score and output
        energy per ``[batch, kv_head]``) and ``neg_entropy`` (``sum p log p`` per query row)."""
        dims = (-3, -2, -1)
        visible_log = self.log_probs.masked_fill(~self.mask, 0.0)
        return {
            "score_ref2": self.scores.square().sum(dims),
            "out_ref2": self.output.square().sum(dims),
            "neg_entropy": torch.linalg.vecdot(self.probs, visible_log),
        }


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
    scores = _scores(q64, k64, scale, softcap).masked_fill(~mask, 0.0)
    masked = scores.masked_fill(~mask, -math.inf)
    log_probs = torch.log_softmax(masked, dim=-1)
    probs = torch.softmax(masked, dim=-1)  # as AttentionReference.error computes p_hat
    output = torch.matmul(probs, v64.unsqueeze(2))
    return AttentionReference(q64, k64, v64, scale, softcap, mask, scores, log_probs, probs, output)


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
