"""Dumps: choose, upload or capture the K/V dump every other page reads."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from gear_lab.constants import DEFAULT_MODEL
from gear_lab.dump import capture_dump, default_out
from gear_lab.errors import DumpError, DumpExistsError, GearLabError
from gear_lab.studio import state

st.title("Dumps")
st.caption(
    "A dump holds real per-layer keys, values (and queries) of a model on some text, "
    "in HDF5. Every page reads the dump chosen here."
)
with st.container(border=True):
    st.markdown("**Where to start** (each question opens its page)")
    for page, question in (
        ("explorer", "How large is the error of 2-bit GEAR on layer 10's keys?"),
        ("spectra", "What rank captures 90% of the quantization residual's energy?"),
        ("outliers", "Which channels hold the outliers?"),
        (
            "sweeps",
            "How does the error fall with rank, outliers and bits; which preset is on the Pareto front?",
        ),
        ("live", "Does the compressed model still generate the same text?"),
    ):
        title = {"explorer": "Error explorer", "live": "Live generation"}.get(page, page.title())
        st.page_link(
            f"app_pages/{page}.py",
            label=f"**{title}**: {question}",
            icon=":material/arrow_forward:",
        )


# --------------------------------------------------------------------------- choose
candidates = state.dump_candidates()
current = state.current_dump()
options = list(dict.fromkeys([*([current] if current else []), *candidates]))
left, right = st.columns([2, 1])
with left:
    if options:
        # no key: a new current dump (upload, capture) makes a fresh widget selecting it
        choice = st.selectbox("dump", options, format_func=lambda p: f"{p.name}  ({p.parent})")
        if choice != current:
            st.session_state[state.DUMP_KEY] = str(choice)
            current = choice
    else:
        st.info(
            "No dump found in `dumps/`. Capture one below, upload one, or run "
            f"`gear-capture --model {DEFAULT_MODEL} --corpus pydoc --samples 2 --max-tokens 512 "
            f"--with-queries --out {default_out(DEFAULT_MODEL, 'pydoc')}` and reload."
        )
with right:
    upload = st.file_uploader("or upload a dump (.h5)", type=["h5", "hdf5"], key="dumps-upload")
    if upload is not None and st.session_state.get("dumps-uploaded") != upload.file_id:
        try:
            path = state.save_upload(
                upload.name, upload.getvalue(), int(st.get_option("server.maxUploadSize"))
            )
        except GearLabError as err:
            state.show_error(err)
        else:
            st.session_state["dumps-uploaded"] = upload.file_id
            st.session_state[state.DUMP_KEY] = str(path)
            st.rerun()

# --------------------------------------------------------------------------- at a glance
if current is not None:
    try:
        info = state.dump_info(*state.dump_key(current))
    except GearLabError as err:
        state.show_error(err)
    else:
        st.subheader(Path(info["path"]).name)
        cols = st.columns([2, 1, 1, 1, 1])
        cols[0].metric("model", info["model_id"])
        cols[1].metric("samples", info["num_samples"])
        cols[2].metric("layers", len(info["layers"]))
        cols[3].metric("heads / kv heads", f"{info['num_heads']} / {info['num_kv_heads']}")
        cols[4].metric("head_dim", info["head_dim"])
        st.caption(f"kinds stored: {', '.join(info['kinds'])}")
        st.dataframe(
            pd.DataFrame(
                {
                    "sample": range(info["num_samples"]),
                    "tokens": info["seq_lens"],
                    "shape (per layer)": [
                        f"[{info['num_kv_heads']}, {n}, {info['head_dim']}]"
                        for n in info["seq_lens"]
                    ],
                    "text": [t[:160].replace("\n", " ") for t in info["texts"]],
                }
            ),
            hide_index=True,
            width="stretch",
        )
        with st.expander("summary"):
            st.code(info["summary"], language=None)

# --------------------------------------------------------------------------- capture
st.subheader("Capture a new dump")
with st.form("capture"):
    c1, c2, c3 = st.columns(3)
    model_name = state.model_picker("capture-model", c1)
    name = c2.text_input(
        "file name (in dumps/)",
        key="capture-name",
        placeholder="<model>-pydoc.h5",
    )
    samples = c3.number_input("samples (pydoc texts)", 1, 16, 2, key="capture-samples")
    max_tokens = c3.number_input(
        "tokens per sample", 16, 2048, 512, step=16, key="capture-max-tokens"
    )
    with_queries = c1.checkbox(
        "with queries (for attention error)", value=True, key="capture-queries"
    )
    pre_rope = c2.checkbox("with pre-RoPE keys", value=False, key="capture-pre-rope")
    overwrite = c3.checkbox("overwrite", value=False, key="capture-overwrite")
    submitted = st.form_submit_button(
        "Capture from the embedded model", type="primary", key="capture-submit"
    )
if submitted:
    name = name.strip() or default_out(model_name, "pydoc").name
    out = state.DUMPS_DIR / name
    status = None
    exists = (
        f"`{name}` already exists in `dumps/`: tick **overwrite** above to replace it, "
        "or give another file name"
    )
    try:
        if out.suffix != ".h5" or Path(name).name != name:
            raise DumpError(f"file name must be a plain name ending in .h5, got {name!r}")
        if out.exists() and not overwrite:  # said in the form's words, before anything starts
            raise DumpExistsError(exists)
        with st.status(f"capturing {out} ...", expanded=True) as status:
            st.write(f"loading {model_name} (cached after the first time)")
            loaded = state.model(model_name)
            bar = st.progress(0.0, text="capturing layers")
            path = capture_dump(
                out,
                corpus="pydoc",
                samples=int(samples),
                max_tokens=int(max_tokens),
                with_queries=with_queries,
                pre_rope_keys=pre_rope,
                overwrite=overwrite,
                progress=lambda done, total: bar.progress(
                    done / total, text=f"captured {done} of {total} layer passes"
                ),
                loaded=loaded,
            )
            status.update(label=f"captured {path}", state="complete")
    except GearLabError as err:
        if status is not None:  # never leave "capturing ..." with an empty bar behind
            status.update(label=f"capture of {name} failed", state="error", expanded=False)
        if isinstance(err, DumpExistsError):
            st.error(exists, icon=":material/error:")
        else:
            state.show_error(err)
    else:
        st.session_state[state.DUMP_KEY] = str(Path(path).resolve())
        st.rerun()
