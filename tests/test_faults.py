"""Faults survived, and said plainly (issue 16).

A full disk under ``--out``, ``--checkpoint`` or fit-many's parts, a SIGKILL in the middle of
an output or checkpoint write, damaged or wrong-format inputs and outputs that can never be
written: each ends in one ``error:`` line that names the file, exit code 2, and leaves what
was on disk as it was (a killed run leaves only its hidden temporary files).

The full-disk tests mount a 256 KiB tmpfs (Linux, as root: CI); elsewhere they are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from gradfit.cli.app import app
from gradfit.fitting.checkpoint import read_checkpoint

runner = CliRunner()
MODEL = "a*exp(-k*x)+c"
NO_SPACE = "No space left on device"


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result, code: int = 2) -> str:
    """The one ``error:`` line of a run that exited with ``code``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (None for a folder)."""
    return {
        str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes()
        for p in sorted(folder.rglob("*"))
    }


def visible(tree: dict[str, bytes | None]) -> dict[str, bytes | None]:
    """``tree`` without hidden entries (a killed writer's temporary files)."""
    return {k: v for k, v in tree.items() if not any(p.startswith(".") for p in Path(k).parts)}


def decay_rows(n: int = 40, k: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(0, 10, n)
    return x, 8 * np.exp(-k * x) + 1 + 0.01 * np.sin(7 * x)


@pytest.fixture
def decay_csv(tmp_path: Path) -> Path:
    x, y = decay_rows()
    path = tmp_path / "decay.csv"
    path.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x, y, strict=True)))
    return path


@pytest.fixture
def groups_parquet(tmp_path: Path) -> Path:
    x, _ = decay_rows(20)
    keys = np.repeat(np.arange(12), x.size)
    xs = np.tile(x, 12)
    ys = (6 + keys) * np.exp(-0.3 * xs) + 1 + 0.01 * np.cos(5 * xs + keys)
    path = tmp_path / "groups.parquet"
    pq.write_table(pa.table({"g": keys, "x": xs, "y": ys}), path)
    return path


# --- a full disk ------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs at ``tmp_path/disk``; skipped where mounting is not allowed."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux and mount(8)")
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave: int = 0) -> Path:
    """Fill the disk under ``folder`` but ``leave`` bytes (in whole 4 KiB pages)."""
    stat = os.statvfs(folder)
    pages = (stat.f_bavail * stat.f_frsize - leave) // 4096
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as handle:
        for _ in range(pages if leave else pages + 1):  # with leave=0: until it is refused
            try:
                handle.write(b"\0" * 4096)
            except OSError:
                break
    return filler


@pytest.mark.parametrize("out", ["run", "new/run"])
def test_full_disk_under_out_names_the_file(small_disk, decay_csv, out):
    fill(small_disk)
    before = snapshot(small_disk)
    line = error_line(invoke("fit", decay_csv, "--model", MODEL, "--out", small_disk / out,
                             "--report"))  # fmt: skip
    assert line.startswith(f"error: cannot write {small_disk / out / 'results.json'}: {NO_SPACE}")
    assert line.endswith("free some space or choose another --out")
    assert snapshot(small_disk) == before  # no run/, no new/, no staging folder


def test_full_disk_under_checkpoint_keeps_the_previous_one(small_disk, decay_csv):
    checkpoint = small_disk / "fit.ckpt"
    args = ["fit", decay_csv, "--model", MODEL, "--optimizer", "adam", "--lr", "0.05",
            "--checkpoint-every", "50"]  # fmt: skip
    assert invoke(*args, "--epochs", 100, "--checkpoint", checkpoint).exit_code == 0
    fill(small_disk)
    before = snapshot(small_disk)
    line = error_line(invoke(*args, "--epochs", 200, "--resume", checkpoint))
    assert line == (
        f"error: cannot write {checkpoint}: {NO_SPACE}; free some space or choose another "
        "--checkpoint"
    )
    assert snapshot(small_disk) == before
    assert read_checkpoint(checkpoint)["epoch"] == 100  # the previous one, whole
    fresh = small_disk / "deeper" / "other.ckpt"
    line = error_line(invoke(*args, "--epochs", 100, "--checkpoint", fresh))
    assert line.startswith(f"error: cannot write {fresh}: {NO_SPACE}")
    assert snapshot(small_disk) == before  # not even the folder deeper/


def test_full_disk_under_fit_many_parts_keeps_finished_chunks(small_disk, groups_parquet):
    out = small_disk / "o.parquet"
    args = ["fit-many", groups_parquet, "--group", "g", "--model", MODEL, "--chunk-size", 2]
    fill(small_disk)
    before = snapshot(small_disk)
    line = error_line(invoke(*args, "--out", out))  # full from the start: nothing kept
    assert line.startswith(f"error: cannot write {out}.parts/manifest.json: {NO_SPACE}")
    assert line.endswith("free some space or choose another --out")
    assert snapshot(small_disk) == before

    (small_disk / "filler").unlink()
    fill(small_disk, leave=6 * 4096)  # room for the manifest and a chunk or more, not all six
    line = error_line(invoke(*args, "--out", out))
    assert line.startswith(f"error: cannot write {out}.parts/part-")
    assert NO_SPACE in line
    assert line.endswith(f"the finished chunks are kept in {out}.parts/ for --resume")
    kept = sorted(p.name for p in (small_disk / "o.parquet.parts").iterdir())
    assert kept[0] == "manifest.json" and 1 <= len(kept) - 1 < 6, kept  # and some parts
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "o.parquet.parts"]

    (small_disk / "filler").unlink()  # space freed: --resume finishes the run
    assert invoke(*args, "--out", out, "--resume").exit_code == 0
    alone = groups_parquet.with_name("alone.parquet")
    assert invoke(*args, "--out", alone).exit_code == 0
    assert pq.read_table(out).equals(pq.read_table(alone))
    assert sorted(p.name for p in small_disk.iterdir()) == ["o.parquet"]


# --- SIGKILL while writing ------------------------------------------------------------------

# Runs gradfit with os.replace held up when it is about to move ``NAME``'s temporary file into
# place: the new file is written whole, the old one not yet replaced. It then says where it is
# (the marker file) and waits to be killed.
HELD_WRITER = """
import os, sys, time
from pathlib import Path

marker, name = Path(sys.argv[1]), sys.argv[2]
replace = os.replace

def held_replace(src, dst, *args, **kwargs):
    if Path(src).name.startswith(f".{name}.") and str(src).endswith(".tmp"):
        marker.write_text(str(src))
        time.sleep(300)
    return replace(src, dst, *args, **kwargs)

os.replace = held_replace
from gradfit.cli.app import app

sys.argv = ["gradfit", *sys.argv[3:]]
app()
"""


def kill_while_writing(tmp_path: Path, name: str, *args: object) -> Path:
    """Run ``gradfit *args``, SIGKILL it while it writes ``name``; return the temporary file."""
    script, marker = tmp_path / "held_writer.py", tmp_path / "writing"
    script.write_text(HELD_WRITER)
    command = [sys.executable, str(script), str(marker), name, *map(str, args)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"ended before writing {name}: {process.stderr.read().decode()}")
            assert time.monotonic() < deadline, f"never wrote {name}"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    temporary = Path(marker.read_text())
    marker.unlink()
    script.unlink()
    assert temporary.exists()  # killed in the middle of the write
    return temporary


def test_sigkill_during_an_output_write_keeps_the_previous_output(tmp_path, decay_csv):
    out = tmp_path / "run"
    assert invoke("fit", decay_csv, "--model", MODEL, "--out", out).exit_code == 0
    before = snapshot(tmp_path)
    kill_while_writing(tmp_path, "results.json", "fit", decay_csv, "--model", MODEL,
                       "--loss", "huber", "--out", out, "--overwrite")  # fmt: skip
    assert visible(snapshot(tmp_path)) == visible(before)  # every old file, byte for byte
    results = json.loads((out / "results.json").read_text())
    assert results["loss_name"] == "mse" and set(results["params"]) == {"a", "k", "c"}
    assert invoke("fit", decay_csv, "--model", MODEL, "--out", out, "--overwrite").exit_code == 0


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, decay_csv):
    checkpoint = tmp_path / "fit.ckpt"
    args = ["fit", decay_csv, "--model", MODEL, "--optimizer", "adam", "--lr", "0.05",
            "--checkpoint-every", "50"]  # fmt: skip
    assert invoke(*args, "--epochs", 100, "--checkpoint", checkpoint).exit_code == 0
    before = snapshot(tmp_path)
    kill_while_writing(tmp_path, "fit.ckpt", *args, "--epochs", 200, "--resume", checkpoint)
    assert visible(snapshot(tmp_path)) == visible(before)
    assert read_checkpoint(checkpoint)["epoch"] == 100  # loadable, and the previous one
    assert invoke(*args, "--epochs", 200, "--resume", checkpoint, "--json").exit_code == 0
    assert read_checkpoint(checkpoint)["epoch"] == 200


# --- damaged and wrong-format inputs --------------------------------------------------------


def parquet(path: Path, **columns: object) -> Path:
    pq.write_table(pa.table(columns), path)
    return path


def footer_cut_off(tmp_path: Path) -> Path:
    path = parquet(tmp_path / "cut.parquet", x=np.arange(9.0), y=np.arange(9.0))
    path.write_bytes(path.read_bytes()[:-30])
    return path


def column_damaged(tmp_path: Path) -> Path:
    path = parquet(tmp_path / "damaged.parquet", x=np.arange(9.0), y=np.arange(9.0))
    data = bytearray(path.read_bytes())
    data[4:40] = b"\xff" * 36  # the first column chunk's page header; the footer is whole
    path.write_bytes(bytes(data))
    return path


def text_named_parquet(tmp_path: Path) -> Path:
    path = tmp_path / "text.parquet"
    path.write_text("x,y\n1,2\n")
    return path


def nul_byte(tmp_path: Path) -> Path:
    path = tmp_path / "nul.csv"
    path.write_bytes(b"x,y\n0,1\n1,\x002\n2,3\n3,4\n")
    return path


def ends_mid_row(tmp_path: Path) -> Path:
    path = tmp_path / "cut.csv"
    path.write_bytes(b"x,y\n0,1\n1,2\n2,3\n3")
    return path


def strings_in_y(tmp_path: Path) -> Path:
    return parquet(tmp_path / "strings.parquet", x=np.arange(4.0), y=["1.5", "2", "two", "4"])


def times_in_y(tmp_path: Path) -> Path:
    times = pa.array(np.arange(4).astype("datetime64[s]"))
    return parquet(tmp_path / "times.parquet", x=np.arange(4.0), y=times)


def lists_in_y(tmp_path: Path) -> Path:
    return parquet(tmp_path / "lists.parquet", x=np.arange(3.0), y=[[1.0], [2.0], [3.0]])


INPUTS = [
    (footer_cut_off, "cannot read as parquet: no Parquet footer at its end"),
    (column_damaged, "cannot read as parquet: column 'x' is damaged"),
    (text_named_parquet, "cannot read as parquet: no Parquet footer at its end"),
    (nul_byte, "line 3, column 'y' holds a NUL byte: not a text file"),
    (ends_mid_row, "the file ends mid-row: line 5 has 1 of 2 fields ('3'), no value for "
                   "column 'y'"),
    (strings_in_y, "column 'y': row 2 is not a number ('two')"),
    (times_in_y, "column 'y': dates and times are not numbers"),
    (lists_in_y, "column 'y': row 0 is not a number (a list [1.0])"),
]  # fmt: skip


@pytest.mark.parametrize("command", ["fit", "fit-many"])
@pytest.mark.parametrize(("build", "message"), INPUTS, ids=[b.__name__ for b, _ in INPUTS])
def test_damaged_input_is_one_line_naming_file_and_column(tmp_path, build, message, command):
    data = build(tmp_path)
    before = snapshot(tmp_path)
    if command == "fit":
        args = ["fit", data, "--model", "a*x+b", "--out", tmp_path / "run"]
    else:  # x as the group key: the reading fails first
        args = ["fit-many", data, "--group", "x", "--model", "a*x+b", "--out",
                tmp_path / "out.parquet"]  # fmt: skip
    line = error_line(invoke(*args))
    assert line.startswith(f"error: {data}: {message}"), line
    assert snapshot(tmp_path) == before


# --- outputs that can never be written ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "target", "message"),
    [
        (["fit", "--out"], "decay.csv/run", "--out {target}: {tmp}/decay.csv is not a folder"),
        (["fit", "--checkpoint"], "decay.csv/fit.ckpt",
         "--checkpoint {target}: {tmp}/decay.csv is not a folder"),
        (["fit-many", "--out"], "decay.csv/o.parquet",
         "--out {target}: {tmp}/decay.csv is not a folder"),
        (["fit", "--out"], "full", "--out {target}: folder exists and is not empty; "
                                   "use --overwrite"),
        (["fit-many", "--out"], "empty.parquet",
         "--out {target}: is a folder; give a .parquet or .csv file name"),
        (["fit", "--checkpoint"], "empty.parquet", "--checkpoint {target}: is a folder; "
                                                   "name a file"),
    ],
    ids=["out-under-a-file", "checkpoint-under-a-file", "fit-many-out-under-a-file",
         "out-existing-folder", "fit-many-out-a-folder", "checkpoint-a-folder"],
)  # fmt: skip
def test_output_that_cannot_be_written_is_refused_first(tmp_path, decay_csv, args, target,
                                                        message):  # fmt: skip
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "empty.parquet").mkdir()
    before = snapshot(tmp_path)
    command, option = args
    extra = ["--group", "x"] if command == "fit-many" else []
    line = error_line(invoke(command, decay_csv, "--model", "a*x+b", *extra, option,
                             tmp_path / target))  # fmt: skip
    assert line == "error: " + message.format(target=tmp_path / target, tmp=tmp_path)
    assert snapshot(tmp_path) == before
