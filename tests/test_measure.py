"""`measure` reproduces `qemu-img measure --output=json -O qcow2` exactly.

Against the goldens (several -o option sets per sample image, captured by sample_images/build.sh)
and, when qemu-img is installed, live for more option sets, for `--size`, for a LUKS image opened
with its key and for a sparse metadata-preallocated image.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLE_NAMES, Samples, needs_qemu, qemu_img_json

from qinspect.analysis.measure import MeasureOptions, calc_prealloc_size, measure, parse_options, refcount_metadata_size
from qinspect.cli import main
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import open_image

LIVE_OPTIONS = ["cluster_size=512", "cluster_size=1M,refcount_bits=1", "preallocation=full",
                "extended_l2=on,cluster_size=2M", "refcount_bits=8,preallocation=metadata", "backing_file=x.qcow2"]


def _golden_measure(samples: Samples, name: str) -> dict[str, Any] | None:
    p = samples.golden(name, "measure.json")
    return json.loads(p.read_text()) if p.exists() else None


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_measure_matches_golden(samples: Samples, name: str) -> None:
    gold = _golden_measure(samples, name)
    if gold is None:
        # qemu-img failed on this image (LUKS without a key, invalid entries): nothing to compare.
        assert samples.golden(name, "measure.exit").exists()
        return
    with open_image(samples.path(name)) as img:
        for opts, exp in gold.items():
            assert measure(img, parse_options(opts)).to_json() == exp, opts


def test_measure_fails_like_qemu_on_invalid_entries(samples: Samples) -> None:
    with open_image(samples.path("invalid_subcluster")) as img, pytest.raises(Qcow2Error):
        measure(img)


@needs_qemu
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_measure_matches_live_qemu(samples: Samples, name: str) -> None:
    if _golden_measure(samples, name) is None:
        pytest.skip("qemu-img cannot measure this image")
    path = samples.path(name)
    with open_image(path) as img:
        for opts in LIVE_OPTIONS:
            exp = qemu_img_json("measure", "--output=json", "-O", "qcow2", "-o", opts, path.name, cwd=samples.dir)
            assert measure(img, parse_options(opts)).to_json() == exp, opts


@needs_qemu
@pytest.mark.parametrize("size", ["0", "1", "100M", "1G", "3T"])
@pytest.mark.parametrize("opts", ["", "cluster_size=4k", "cluster_size=2M,extended_l2=on", "refcount_bits=64",
                                  "compat=0.10", "preallocation=falloc"])
def test_measure_size_matches_live_qemu(tmp_path: Path, size: str, opts: str) -> None:
    args = ["measure", "--output=json", "-O", "qcow2", "--size", size] + (["-o", opts] if opts else [])
    r = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False, cwd=tmp_path)
    n = {"0": 0, "1": 1, "100M": 100 << 20, "1G": 1 << 30, "3T": 3 << 40}[size]
    if r.returncode:
        with pytest.raises(Qcow2Error):
            measure(None, parse_options(opts), size=n)
        return
    assert measure(None, parse_options(opts), size=n).to_json() == json.loads(r.stdout)


@needs_qemu
def test_measure_luks_image_matches_qemu_with_key(samples: Samples) -> None:
    """qemu-img needs the key to open the source; its answer with the key is what we compute."""
    r = subprocess.run(["qemu-img", "measure", "--output=json", "-O", "qcow2", "--object",
                        "secret,id=sec0,data=qinspect", "--image-opts",
                        "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0"],
                       capture_output=True, text=True, check=True, cwd=samples.dir)
    with open_image(samples.path("luks")) as img:
        assert measure(img).to_json() == json.loads(r.stdout)


@needs_qemu
def test_measure_sparse_preallocated_image(tmp_path: Path) -> None:
    """Metadata preallocation makes QEMU ask the host file for holes (BDRV_BLOCK_RECURSE)."""
    path = tmp_path / "pre.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(path), "2G"],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 100M 3M", str(path)], check=True,
                   capture_output=True)
    with open_image(path) as img:
        for opts in ("", "cluster_size=2M"):
            exp = qemu_img_json("measure", "--output=json", "-O", "qcow2", *(["-o", opts] if opts else []),
                                path.name, cwd=tmp_path)
            assert measure(img, parse_options(opts)).to_json() == exp


def test_measure_1t_table_from_fact_sheet() -> None:
    """`measure --size 1T` figures quoted in docs/qcow2-format.md §3.4."""
    cases = {"": (168034304, 1099679662080), "cluster_size=2M": (12582912, 1099524210688),
             "cluster_size=4k": (2690920448, 1102202548224), "extended_l2=on": (302252032, 1099813879808),
             "refcount_bits=64": (268697600, 1099780325376), "preallocation=full": (1099679662080, 1099679662080)}
    for opts, (required, full) in cases.items():
        r = measure(None, parse_options(opts), size=1 << 40)
        assert (r.required, r.fully_allocated, r.bitmaps) == (required, full, None), opts


def test_refcount_metadata_fixed_point() -> None:
    # One refcount block (32768 entries at 64k/16-bit) and one table cluster cover 32766 clusters.
    assert refcount_metadata_size(32766, 65536, 4) == 2 * 65536
    assert refcount_metadata_size(32767, 65536, 4) == 3 * 65536
    # An empty disk needs no L1 table: header, refcount table, one block (qemu-iotests 178).
    assert calc_prealloc_size(0, 65536, 4, False) == 3 * 65536


@pytest.mark.parametrize("opts, message", [
    ("cluster_size=3k", "power of two"), ("cluster_size=4M", "power of two"),
    ("extended_l2=on,cluster_size=8k", "at least 16384"), ("refcount_bits=3", "power of two"),
    ("compat=0.10,refcount_bits=8", "compatibility level"), ("compat=2", "Invalid compatibility level"),
    ("bogus=1", "Invalid parameter"), ("encrypt.format=luks", "LUKS"),
])
def test_option_errors(opts: str, message: str) -> None:
    with pytest.raises(Qcow2Error, match=message):
        parse_options(opts)


def test_too_large_for_cluster_size() -> None:
    with pytest.raises(Qcow2Error, match="too large"):
        measure(None, MeasureOptions(cluster_size=512), size=1 << 50)


def test_cli_measure_json_and_human(samples: Samples, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(samples.path("bitmaps"))
    assert main(["measure", path, "-o", "cluster_size=2M", "--output=json"]) == 0
    gold = _golden_measure(samples, "bitmaps")
    assert gold is not None
    assert json.loads(capsys.readouterr().out) == {**gold["cluster_size=2M"], "in-use": None}  # + qinspect's key
    assert main(["measure", path]) == 0
    out = capsys.readouterr().out
    assert "required" in out and "fully allocated" in out and "bitmaps" in out
    assert main(["measure", "--size", "1T", "--output=json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"required": 168034304, "fully-allocated": 1099679662080}


def test_cli_measure_errors(samples: Samples, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure", str(samples.path("basic64k")), "-o", "cluster_size=3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qinspect: ") and "power of two" in err and "Traceback" not in err
    assert main(["measure"]) == 1
