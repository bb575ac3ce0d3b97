"""Live generation: does the model still write the same text with a compressed KV cache?

Runs :func:`gear_lab.check_generation`: greedy generation with a full-precision cache and with
a :class:`gear_lab.GearCache` of the chosen method, then teacher-forced KL and top-1 agreement
per step along the full-precision continuation. On request it measures the serving benchmark's
equal-batch peak memory of ``DynamicCache`` and the chosen method, each in its own process
(:func:`gear_lab.serving.probe`).
"""

from __future__ import annotations

import html
import warnings
from dataclasses import asdict

import streamlit as st

from gear_lab import plots
from gear_lab.cache import DEFAULT_BLOCK_SIZE
from gear_lab.constants import DEFAULT_MODEL
from gear_lab.corpus import pydoc_topic
from gear_lab.errors import GearLabError, NothingCompressedWarning
from gear_lab.fidelity import check_generation
from gear_lab.serving import Workload, probe
from gear_lab.studio import state
from gear_lab.units import format_bytes

# longer than a few cache blocks: the newest block_size tokens always stay full precision
DEFAULT_PROMPT = pydoc_topic("for")[:800]
PROMPT_TAIL = 160  # characters of the prompt shown before each generation
# the equal-batch memory figure's shape: small, so each process takes a few seconds
MEMORY_BATCH = 2
MEMORY_WORKLOAD = {"prompt_tokens": 256, "new_tokens": 8}

st.title("Live generation")
st.caption(
    f"The chosen model ({DEFAULT_MODEL} by default) generates greedily twice: with a "
    "full-precision cache and with the compressed one. The first differing token is highlighted. "
    "The cache keeps "
    "the newest `block_size` tokens in full precision, so a prompt shorter than one block is not "
    "compressed at all."
)
left, right = st.columns([3, 2])
with left:
    model_name = state.model_picker("live-model")
    prompt = st.text_area("prompt", DEFAULT_PROMPT, height=200, key="live-prompt")
    max_new_tokens = st.slider("new tokens", 4, 128, 32, key="live-max-new-tokens")
    pre_rope = st.checkbox(
        "pre-RoPE keys",
        key="live-pre-rope",
        help="KVQuant: compress keys before RoPE and apply RoPE to the decompressed keys",
    )
with right, st.expander("method", expanded=True):
    config = state.method_settings(
        "live", initial={"bits": 2}, no_block=f"cache default ({DEFAULT_BLOCK_SIZE})"
    )
go = st.button("Generate", type="primary", disabled=config is None, key="live-run")

if go and config is not None:
    try:
        with st.status("generating ...", expanded=True) as status:
            st.write(f"loading {model_name} (once per server)")
            model, tokenizer = state.model(model_name)
            st.write(f"generating {max_new_tokens} tokens with both caches, then scoring each step")
            bar = st.progress(0.0, text="starting")

            def on_step(done: int, total: int, phase: str) -> None:
                bar.progress(min(done / max(total, 1), 1.0), text=f"{phase}: {done}/{total} steps")

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NothingCompressedWarning)
                check = check_generation(
                    model,
                    tokenizer,
                    prompt,
                    config,
                    max_new_tokens,
                    progress=on_step,
                    pre_rope=pre_rope,
                )
            st.session_state["live-warnings"] = [
                str(w.message) for w in caught if issubclass(w.category, NothingCompressedWarning)
            ]
            status.update(
                label=f"generated with `{check.method}`", state="complete", expanded=False
            )
    except GearLabError as err:
        state.show_error(err)
    else:
        st.session_state["live-result"] = check
        st.session_state["live-tokenizer"] = tokenizer  # decodes the result, whatever is picked

with st.expander("peak memory at equal batch (each cache in its own process)"):
    st.caption(
        "The serving benchmark's equal-batch measurement (`benchmarks/serving.py`) at a small "
        f"shape: batch {MEMORY_BATCH}, a {MEMORY_WORKLOAD['prompt_tokens']}-token corpus prompt "
        f"prefilled in chunks of {Workload.chunk}, {MEMORY_WORKLOAD['new_tokens']} new "
        "tokens; `DynamicCache` and the chosen method, each in a fresh process. *peak above the "
        "model*: the process's peak RSS (CUDA: peak allocated) minus its memory after loading "
        "the model; *held by the cache*: the bytes it keeps allocated at the end (compressed "
        "blocks, block index, buffers and the one shared reconstruction buffer)."
    )
    if st.button("Measure peak memory", disabled=config is None, key="live-memory-run"):
        workload = Workload(model=model_name, device="auto", **MEMORY_WORKLOAD)
        try:
            with st.spinner("measuring both caches, each in its own process ..."):
                probes = [probe(s, MEMORY_BATCH, workload) for s in ("dynamic", config.to_json())]
        except GearLabError as err:
            state.show_error(err)
        else:
            names = ("DynamicCache", config.name)
            st.session_state["live-memory"] = [
                {**asdict(p), "cache": name} for p, name in zip(probes, names, strict=True)
            ]
    measured = st.session_state.get("live-memory")
    if measured:
        full_probe, comp_probe = measured
        m = st.columns(3)
        m[0].metric("full precision peak", f"{full_probe['peak_mib']:.1f} MiB")
        m[1].metric("compressed peak", f"{comp_probe['peak_mib']:.1f} MiB")
        lower = full_probe["peak_mib"] / max(comp_probe["peak_mib"], 1e-3)
        m[2].metric("peak lower by", f"{lower:.2f}x")
        st.plotly_chart(plots.fig_peak_memory(measured), key="live-memory-chart")

check = st.session_state.get("live-result")
if check is None:
    st.info("Press **Generate** to compare the two generations.")
    st.stop()


def highlighted(prompt: str, ids: list[int], divergence: int | None) -> str:
    """HTML of the prompt's tail (grey) and the generation, highlighted from the first divergence."""
    tokenizer = st.session_state["live-tokenizer"]
    cut = len(ids) if divergence is None else divergence
    same = html.escape(tokenizer.decode(ids[:cut], skip_special_tokens=True))
    rest = html.escape(tokenizer.decode(ids[cut:], skip_special_tokens=True))
    tail = html.escape(("…" if len(prompt) > PROMPT_TAIL else "") + prompt[-PROMPT_TAIL:])
    mark = f'<mark style="background:#ffc9c9">{rest}</mark>' if rest else ""
    return (
        f'<div style="white-space:pre-wrap;font-family:monospace;font-size:0.85rem">'
        f'<span style="color:#888">{tail}</span>{same}{mark}</div>'
    )


st.subheader(f"`{check.method}`")
c = st.columns(4)
c[0].metric(
    "first divergence",
    "none" if check.first_divergence is None else f"token {check.first_divergence}",
)
c[1].metric("same tokens", f"{check.token_agreement:.0%}")
c[2].metric("mean KL per step", state.fmt(check.mean_kl))
c[3].metric("top-1 agreement", f"{check.top1_agreement:.0%}")
full, comp = st.columns(2)
for col, title, ids, nbytes, resident, tps in (
    (
        full,
        "full precision",
        check.full_ids,
        check.full_cache_bytes,
        check.full_resident_bytes,
        check.full_tokens_per_s,
    ),
    (
        comp,
        "compressed",
        check.compressed_ids,
        check.compressed_cache_bytes,
        check.compressed_resident_bytes,
        check.compressed_tokens_per_s,
    ),
):
    with col:
        st.markdown(f"**{title}**")
        st.html(highlighted(check.prompt, ids, check.first_divergence))
        m = st.columns(3)
        m[0].metric(f"{title} cache", format_bytes(nbytes))
        m[1].metric(f"{title} resident", format_bytes(resident))
        m[2].metric(f"{title} tok/s", f"{tps:.1f}")
for message in st.session_state.get("live-warnings", []):
    st.warning(message)
st.caption(
    f"cache ratio: {check.full_cache_bytes / max(check.compressed_cache_bytes, 1):.2f}x smaller; "
    "sizes are measured from the tensors each cache holds. *cache*: the K/V held (compressed "
    "blocks plus full-precision buffers); *resident*: every byte the cache keeps allocated "
    "(adds the one reconstruction buffer shared by all layers, or the decompressed workspace "
    "of `GearCache(workspace=True)`)."
)
st.plotly_chart(
    plots.fig_generation_steps(check.kl, check.top1, divergence=check.first_divergence),
    key="live-steps",
)
if check.kl:
    stats = check.kl_statistics()
    q = st.columns(4)
    for col, (key, name) in zip(
        q, {"kl_median": "median", "kl_p99": "p99", "kl_p999": "p99.9"}.items(), strict=False
    ):
        col.metric(f"KL {name}", state.fmt(stats[key]))
    q[3].metric("scored steps", len(check.kl))
    st.plotly_chart(plots.fig_kl_distribution(check.kl, stats), key="live-kl")
    st.caption(
        "Per-step KL along the full-precision continuation, as llama.cpp's perplexity tool "
        "reports it for a new quantization type: the mean hides rare large misses, the p99 and "
        "p99.9 show them. For many tokens, run `gear-lab ppl`."
    )
