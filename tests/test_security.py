"""Hostile input (docs/security.md): a dump is read only from its own bytes, uploads stay in a
private folder, and ``gear-lab app`` checks its settings before it serves.

Every hostile dump is crafted with h5py from a small schema-valid dump and must be refused with
one ``DumpError`` line by :func:`open_dump`, by ``gear-lab info`` (exit 2) and by the studio's
upload path, without any byte of another file coming back.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from gear_lab.cli import main
from gear_lab.dump import open_dump
from gear_lab.errors import DumpError
from gear_lab.studio import DUMP_ENV, STUDIO_SCRIPT, state

HEADS, KV_HEADS, SEQ, DIM = 4, 2, 8, 4
KEYS = "sample_0000/layer_00/keys"
LAYER = "sample_0000/layer_00"
SECRET = b"TOP-SECRET-" * 32


def write_valid(path: Path, samples: int = 2, layers: tuple[int, ...] = (0, 1)) -> Path:
    """A small dump following dumps/README.md (what ``write_dump`` writes), made with h5py."""
    rng = np.random.default_rng(0)
    kinds = ["keys", "values", "queries"]
    with h5py.File(path, "w") as f:
        for s in range(samples):
            g = f.create_group(f"sample_{s:04d}")
            g.create_dataset("token_ids", data=np.arange(SEQ, dtype=np.int32))
            g.create_dataset("text", data="hello world", dtype=h5py.string_dtype("utf-8"))
            for layer in layers:
                lg = g.create_group(f"layer_{layer:02d}")
                lg.attrs.update(
                    attention_type="full_attention",
                    sliding_window=0,
                    rope_theta=10000.0,
                    scaling=DIM**-0.5,
                    softcap=0.0,
                )
                for kind in kinds:
                    heads = HEADS if kind == "queries" else KV_HEADS
                    data = rng.standard_normal((heads, SEQ, DIM)).astype(np.float32)
                    lg.create_dataset(
                        kind, data=data, chunks=(1, SEQ, DIM), compression="gzip", shuffle=True
                    )
        f.attrs.update(
            format="gear-lab-dump",
            schema_version=1,
            model_id="tiny",
            config=json.dumps({"model_type": "llama"}),
            versions=json.dumps({"gear_lab": "0"}),
            device="cpu",
            dtype="float32",
            storage_dtype="float32",
            created="2026-01-01T00:00:00+00:00",
            source="prompts",
            max_tokens=SEQ,
            num_samples=samples,
            layers=np.asarray(layers, dtype=np.int32),
            kinds=json.dumps(kinds),
            num_heads=HEADS,
            num_kv_heads=KV_HEADS,
            head_dim=DIM,
        )
    return path


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside any dump that must never be read through one."""
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET)
    return path


@pytest.fixture
def other_h5(tmp_path: Path) -> Path:
    """Another HDF5 file, with a dataset of the shape the keys must have."""
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.full((KV_HEADS, SEQ, DIM), 7.0, dtype=np.float32))
    return path


Edit = Callable[[h5py.File, Path, Path], None]  # (file, secret file, other HDF5 file)
SHAPE = (KV_HEADS, SEQ, DIM)


def _replace(f: h5py.File, where: str, **dataset: object) -> None:
    del f[where]
    f.create_dataset(where, **dataset)


def dataset(where: str = KEYS, **spec: object) -> Edit:
    """Replace the dataset at ``where`` by one made with ``spec``."""
    return lambda f, secret, other: _replace(f, where, **spec)


def link(where: str, make: Callable[[h5py.File, Path, Path], object], new: bool = False) -> Edit:
    """Put the link (or object) ``make(...)`` at ``where`` (replacing what is there)."""

    def edit(f: h5py.File, secret: Path, other: Path) -> None:
        target = make(f, secret, other)
        if not new:
            del f[where]
        f[where] = target

    return edit


def attr(where: str, name: str, value: object = None) -> Edit:
    """Set attribute ``name`` of ``where`` to ``value`` (delete it when None)."""

    def edit(f: h5py.File, secret: Path, other: Path) -> None:
        if value is None:
            del f[where].attrs[name]
        else:
            f[where].attrs[name] = value

    return edit


def external_storage(f: h5py.File, secret: Path, other: Path) -> None:
    nbytes = 4 * int(np.prod(SHAPE))
    _replace(f, KEYS, shape=SHAPE, dtype="<f4", external=[(str(secret), 0, nbytes)])


def virtual(f: h5py.File, secret: Path, other: Path) -> None:
    layout = h5py.VirtualLayout(SHAPE, np.float32)
    layout[:] = h5py.VirtualSource(str(other), "x", SHAPE)
    del f[KEYS]
    f.create_virtual_dataset(KEYS, layout)


def soft_loop(f: h5py.File, secret: Path, other: Path) -> None:
    f["sample_0000/a"] = h5py.SoftLink("/sample_0000/b")
    f["sample_0000/b"] = h5py.SoftLink("/sample_0000/a")


def group_instead(f: h5py.File, secret: Path, other: Path) -> None:
    del f[KEYS]
    f.create_group(KEYS)


# name -> (edit of a valid dump, expected message)
HOSTILE: dict[str, tuple[Edit, str]] = {
    "external raw storage": (external_storage, "external files"),
    "external link": (link(KEYS, lambda f, s, o: h5py.ExternalLink(str(o), "x")), "ExternalLink"),
    "external link to a group": (
        link("sample_0000/extra", lambda f, s, o: h5py.ExternalLink(str(o), "/"), new=True),
        "ExternalLink",
    ),
    "virtual dataset": (virtual, "virtual dataset"),
    "soft link": (link(KEYS, lambda f, s, o: h5py.SoftLink(f"/{LAYER}/values")), "SoftLink"),
    "soft link loop": (soft_loop, "SoftLink"),
    "hard link loop": (
        link(f"{LAYER}/loop", lambda f, s, o: f[LAYER], new=True),
        "linked more than once",
    ),
    "hard link to the root": (
        link(f"{LAYER}/root", lambda f, s, o: f["/"], new=True),
        "linked more than once",
    ),
    "aliased tensor": (link(KEYS, lambda f, s, o: f[f"{LAYER}/values"]), "linked more than once"),
    "named datatype": (link("t", lambda f, s, o: np.dtype("<f4"), new=True), "Datatype"),
    "string tensor": (
        dataset(data=np.full(SHAPE, "1.0", dtype=object), dtype=h5py.string_dtype()),
        "expected a float dtype",
    ),
    "object tensor": (
        dataset(shape=SHAPE, dtype=h5py.vlen_dtype(np.float32)),
        "expected a float dtype",
    ),
    "reference tensor": (dataset(shape=SHAPE, dtype=h5py.ref_dtype), "expected a float dtype"),
    "compound tensor": (
        dataset(shape=SHAPE, dtype=np.dtype([("a", "<f4"), ("b", "<f4")])),
        "expected a float dtype",
    ),
    "lossy scale-offset filter": (
        dataset(data=np.ones(SHAPE, "f4"), chunks=SHAPE, scaleoffset=2),
        "HDF5 filters",
    ),
    "integer tensor": (dataset(data=np.ones(SHAPE, dtype=np.int32)), "expected a float dtype"),
    "wrong tensor shape": (dataset(data=np.ones((KV_HEADS, SEQ + 1, DIM), "f4")), "has shape"),
    "scalar tensor": (dataset(data=1.0), "has shape"),
    "tensor is a group": (group_instead, "missing dataset"),
    "float token ids": (
        dataset("sample_0000/token_ids", data=np.ones(SEQ, "f4")),
        "expected integer",
    ),
    "2-d token ids": (
        dataset("sample_0000/token_ids", data=np.ones((1, SEQ), "i4")),
        "expected integer",
    ),
    "numeric text": (dataset("sample_0000/text", data=3), "expected a string"),
    "missing scaling": (attr(LAYER, "scaling"), "lacks attributes"),
    "missing attention_type": (attr(LAYER, "attention_type"), "lacks attributes"),
    "string sliding_window": (attr(LAYER, "sliding_window", "4096"), "sliding_window"),
    "NaN scaling": (attr(LAYER, "scaling", np.nan), "scaling"),
    "numeric attention_type": (attr(LAYER, "attention_type", 1), "attention_type"),
    "string num_heads": (attr("/", "num_heads", "4"), "num_heads"),
    "zero num_samples": (attr("/", "num_samples", 0), "num_samples"),
    "kinds not a list": (attr("/", "kinds", json.dumps({"keys": 1})), "kinds"),
    "versions not an object": (attr("/", "versions", json.dumps([1])), "versions"),
    "string layers": (attr("/", "layers", "0,1"), "layers"),
    "negative layer": (attr("/", "layers", np.array([0, -1], "i4")), "layers"),
    "array format": (attr("/", "format", np.array([1, 2])), "not a gear-lab dump"),
}


@pytest.fixture(params=sorted(HOSTILE))
def hostile(request, tmp_path: Path, secret: Path, other_h5: Path) -> tuple[Path, str]:
    """``(path, expected message)`` of one crafted hostile dump."""
    edit, match = HOSTILE[request.param]
    path = write_valid(tmp_path / "hostile.h5")
    with h5py.File(path, "r+") as f:
        edit(f, secret, other_h5)
    return path, match


def _assert_one_line(message: str) -> None:
    assert "\n" not in message and "TOP-SECRET" not in message


def test_the_crafted_base_dump_is_valid(tmp_path: Path) -> None:
    with open_dump(write_valid(tmp_path / "ok.h5")) as dump:
        assert dump.load("keys", 1, sample=1).shape == SHAPE
        assert dump.text(0) == "hello world"


def test_open_dump_refuses_hostile_files(hostile: tuple[Path, str]) -> None:
    path, match = hostile
    with pytest.raises(DumpError, match=match) as info:
        open_dump(path)
    assert str(path) in str(info.value)
    _assert_one_line(str(info.value))


def test_gear_lab_info_refuses_hostile_files(hostile: tuple[Path, str], capsys) -> None:
    path, match = hostile
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("gear-lab: error: ") and match in err
    _assert_one_line(err.strip())


def test_studio_upload_refuses_hostile_files(hostile: tuple[Path, str], uploads: Path) -> None:
    path, match = hostile
    with pytest.raises(DumpError, match=match) as info:
        state.save_upload("hostile.h5", path.read_bytes(), limit_mb=10)
    _assert_one_line(str(info.value))
    assert list(state.upload_dir().iterdir()) == []  # nothing refused is kept


@pytest.mark.parametrize("case", ["external raw storage", "soft link", "string tensor"])
def test_studio_pages_show_one_line(
    case: str, tmp_path: Path, secret: Path, other_h5: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_valid(tmp_path / "hostile.h5")
    with h5py.File(path, "r+") as f:
        HOSTILE[case][0](f, secret, other_h5)
    monkeypatch.setenv(DUMP_ENV, str(path))
    monkeypatch.chdir(tmp_path)
    at = AppTest.from_file(str(STUDIO_SCRIPT), default_timeout=120).run()
    for page in (None, "app_pages/explorer.py"):  # the Dumps page, then the heatmaps' page
        if page:
            at.switch_page(page).run()
        assert not at.exception, [e.message for e in at.exception]
        errors = [e.value for e in at.error]
        assert len(errors) == 1 and errors[0].startswith("DumpError: ")
        _assert_one_line(errors[0])
        assert not at.get("plotly_chart")


def test_real_dump_with_external_storage_is_refused(smol_dump: Path, tmp_path: Path, secret):
    path = tmp_path / "real.h5"
    shutil.copyfile(smol_dump, path)
    with h5py.File(path, "r+") as f:
        shape, dtype = f[KEYS].shape, f[KEYS].dtype
        _replace(
            f,
            KEYS,
            shape=shape,
            dtype=dtype,
            external=[(str(secret), 0, dtype.itemsize * np.prod(shape))],
        )
    with pytest.raises(DumpError, match="external files"):
        open_dump(path)


def test_big_endian_tensors_and_bad_utf8_text_still_read(tmp_path: Path) -> None:
    path = write_valid(tmp_path / "odd.h5")
    with h5py.File(path, "r+") as f:
        data = f[KEYS][()]
        _replace(f, KEYS, data=data.astype(">f4"))
        _replace(f, "sample_0000/text", data=b"caf\xe9", dtype=h5py.string_dtype("utf-8"))
        _replace(f, "sample_0001/text", data=np.bytes_(b"fixed"))  # fixed-length ASCII
    with open_dump(path) as dump:
        np.testing.assert_array_equal(dump.load("keys", 0).numpy(), data)
        assert dump.text(0) == "caf\ufffd" and dump.text(1) == "fixed"


def test_loading_beyond_float16_range_names_the_range(tmp_path: Path) -> None:
    import torch

    path = write_valid(tmp_path / "big.h5")
    with h5py.File(path, "r+") as f:
        f[KEYS][0, 0, 0] = 1e6
    with open_dump(path) as dump:
        assert dump.load("keys", 0).dtype == torch.float32
        with pytest.raises(DumpError, match="values exceed the float16 range"):
            dump.load("keys", 0, dtype=torch.float16)


def test_eval_in_float16_names_the_range_not_nan(tmp_path: Path, capsys) -> None:
    path = write_valid(tmp_path / "big.h5")
    with h5py.File(path, "r+") as f:
        f[KEYS][0, 0, 0] = 1e6
    assert main(["eval", str(path), "--dtype", "float16"]) == 2
    err = capsys.readouterr().err  # after the progress bar
    line = err[err.index("gear-lab: error: ") :]
    assert line.count("\n") == 1 and "values exceed the float16 range" in line
    assert "NaN" not in err


# --------------------------------------------------------------------------- uploads


@pytest.fixture
def uploads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The system temp folder as seen by the studio, with a fresh per-process upload folder."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setattr(state, "_upload_dir", None)
    return tmp


def test_upload_folder_is_private_and_fresh(uploads: Path) -> None:
    legacy = uploads / "gear-lab-uploads"  # the old fixed folder, planted by someone else
    legacy.mkdir(mode=0o777)
    folder = state.upload_dir()
    assert folder.parent == uploads and folder != legacy
    assert folder.name.startswith(state.UPLOAD_PREFIX)
    assert stat.S_IMODE(os.lstat(folder).st_mode) == 0o700
    assert state.upload_dir() == folder  # one per process
    folder.chmod(0o755)  # no longer private: a new one is made
    assert state.upload_dir() != folder


def test_upload_never_writes_through_planted_symlinks(uploads: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    data = write_valid(tmp_path / "ok.h5").read_bytes()
    digest = __import__("hashlib").sha256(data).hexdigest()[:12]
    legacy = uploads / "gear-lab-uploads"  # the old fixed location of the part file
    legacy.mkdir()
    for name in (f"ok-{digest}.h5.part", f"ok-{digest}.h5"):
        (legacy / name).symlink_to(victim)
    folder = state.upload_dir()
    (folder / f"ok-{digest}.h5").symlink_to(victim)  # the final name in the new folder
    path = state.save_upload("ok.h5", data, limit_mb=10)
    assert path == folder / f"ok-{digest}.h5" and not path.is_symlink()
    assert victim.read_bytes() == b"precious"
    with open_dump(path) as dump:
        assert dump.num_samples == 2


@pytest.mark.parametrize(
    "name", ["../../etc/passwd.h5", "..", "a/../b.h5", "x\0.h5", "", "/", "...h5", "\\..\\x"]
)
def test_upload_names_cannot_escape_the_folder(name: str, uploads: Path) -> None:
    with pytest.raises(DumpError, match="invalid upload file name"):
        state.upload_name(name, "0" * 12)


@pytest.mark.parametrize(
    ("name", "stored"),
    [
        ("C:\\Users\\me\\run.h5", "run"),
        ("dir/sub/run.h5", "run"),
        ("my run!.hdf5", "my-run"),
        (".h5", "h5"),
    ],
)
def test_upload_names_keep_only_a_plain_stem(name: str, stored: str) -> None:
    assert state.upload_name(name, "abc") == f"{stored}-abc.h5"


# --------------------------------------------------------------------------- gear-lab app


def _one_line_exit_2(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "http://" not in out  # refused before the serving URL is printed
    assert err.startswith("gear-lab: error: ") and err.count("\n") == 1
    return err


@pytest.mark.parametrize("mb", ["-1", "0"])
def test_app_refuses_a_non_positive_upload_limit(mb: str, capsys) -> None:
    assert "--max-upload-mb" in _one_line_exit_2(["app", "--max-upload-mb", mb], capsys)


def test_app_refuses_a_port_in_use(capsys) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = _one_line_exit_2(["app", "--port", str(port)], capsys)
    assert f"127.0.0.1:{port}" in err


def test_app_refuses_an_unknown_host(capsys) -> None:
    assert "--host" in _one_line_exit_2(["app", "--host", "no such host!"], capsys)
