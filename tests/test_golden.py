"""qinspect's info / map / check / read agree with qemu-img on every sample image.

Goldens in sample_images/golden/ were captured by sample_images/build.sh with qemu-img 7.2 on the
files exactly as committed; when qemu-img is installed the same comparisons run live too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import SAMPLE_NAMES, Samples, needs_qemu

from qinspect.analysis.check import check_image
from qinspect.analysis.info import chain_info, image_info
from qinspect.analysis.map import map_json
from qinspect.qcow2.errors import Qcow2Error
from qinspect.qcow2.image import Image, open_image

# Reading the whole guest disk is only done for disks up to this size.
FULL_READ_LIMIT = 1 << 30


def _golden(samples: Samples, name: str, kind: str) -> Any:
    p = samples.golden(name, kind)
    if not p.exists():
        return None
    text = p.read_text()
    if not text.strip():
        return None
    return json.loads(text) if kind.endswith(".json") else text.strip()


def _norm_info(info: Any) -> Any:
    """actual-size depends on the filesystem (st_blocks); it is checked separately."""
    if isinstance(info, list):
        return [_norm_info(i) for i in info]
    return {k: v for k, v in info.items() if k != "actual-size"}


def _rel(samples: Samples, name: str) -> str:
    return samples.path(name).name


def _openable(img: Image, check: bool = False) -> None:
    """What qemu-img map / check need before they start: an open QEMU accepts (check's with
    BDRV_O_CHECK) and the external data file."""
    img.require_openable(check=check)
    img.data_file()


@pytest.fixture
def in_samples(samples: Samples, monkeypatch: pytest.MonkeyPatch) -> Samples:
    monkeypatch.chdir(samples.dir)
    return samples


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_info_matches_golden(in_samples: Samples, name: str) -> None:
    exp = _golden(in_samples, name, "info.json")
    if exp is None:
        pytest.skip("qemu-img info failed on this image")
    rel = _rel(in_samples, name)
    with open_image(rel) as img:
        got = image_info(img, rel)
        assert _norm_info(got) == _norm_info(exp)
        assert got["actual-size"] == os.stat(rel).st_blocks * 512
        chain_exp = _golden(in_samples, name, "info-chain.json")
        if chain_exp is not None:
            assert _norm_info(chain_info(img, rel)) == _norm_info(chain_exp)


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_map_matches_golden(in_samples: Samples, name: str) -> None:
    rel = _rel(in_samples, name)
    # qemu-img needs the key to map a LUKS image; qinspect does not (metadata is in the clear).
    exp = _golden(in_samples, name, "map.json") or _golden(in_samples, name, "map-with-key.json")
    with open_image(rel) as img:
        if exp is None:
            if _golden(in_samples, name, "map.exit") is None:
                pytest.skip("no map golden")
            with pytest.raises(Qcow2Error):
                _openable(img)
                map_json(img)
            return
        _openable(img)
        got = map_json(img)
    for g in got:
        g.pop("compressed")
    assert got == exp


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_check_matches_golden(in_samples: Samples, name: str) -> None:
    rel = _rel(in_samples, name)
    exp = _golden(in_samples, name, "check.json")
    code = _golden(in_samples, name, "check.exit")
    with open_image(rel) as img:
        if img.encrypted:
            exp, code = _check_with_key(in_samples, rel)
        if exp is None:
            if code is None:
                pytest.skip("no check golden")
            with pytest.raises(Qcow2Error):
                _openable(img, check=True)
                if check_image(img, filename=rel).failed is not None:  # the check itself failed
                    raise Qcow2Error("check failed")
            return
        _openable(img, check=True)
        res = check_image(img, filename=rel)
    assert res.to_json() == exp
    if code is not None:
        assert res.exit_code == int(code)


LUKS_SECRET = "qinspect"  # the sample LUKS image's passphrase (sample_images/README.md)


def _check_with_key(samples: Samples, rel: str) -> tuple[Any, Any]:
    """qemu-img check of an encrypted sample, given its key (qemu-img cannot check without it)."""
    if subprocess.run(["which", "qemu-img"], capture_output=True, check=False).returncode:
        pytest.skip("qemu-img needs the key to check an encrypted image; not installed")
    r = subprocess.run(["qemu-img", "check", "--output=json", "--object", f"secret,id=sec0,data={LUKS_SECRET}",
                        "--image-opts", f"driver=qcow2,file.filename={rel},encrypt.key-secret=sec0"],
                       cwd=samples.dir, capture_output=True, text=True, check=False)
    if not r.stdout.strip():  # refused at open even with the key (a damaged LUKS header)
        return None, str(r.returncode)
    exp = json.loads(r.stdout)
    exp["filename"] = rel
    return exp, str(r.returncode)


def _sha_of_read(path: str) -> tuple[str, int]:
    h = hashlib.sha256()
    with open_image(path) as img:
        size = img.virtual_size
        step = 16 << 20
        for off in range(0, size, step):
            h.update(img.read(off, min(step, size - off)))
    return h.hexdigest(), size


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_read_matches_convert(in_samples: Samples, name: str) -> None:
    rel = _rel(in_samples, name)
    sha = _golden(in_samples, name, "raw.sha256")
    if sha is None:
        with open_image(rel) as img:
            if img.encrypted:
                with pytest.raises(Qcow2Error, match="encrypted"):
                    _sha_of_read(rel)
                return
            if _golden(in_samples, name, "convert.exit") is not None:
                # qemu-img convert fails (a corrupt structure): so must the read, with a clear error.
                with pytest.raises(Qcow2Error):
                    _sha_of_read(rel)
                return
        pytest.skip("no raw golden for this sample")
    with open_image(rel) as img:
        if img.virtual_size > FULL_READ_LIMIT:
            pytest.skip("disk too large to read whole; covered by test_read_mapped_ranges_live")
    got, size = _sha_of_read(rel)
    assert size == int(_golden(in_samples, name, "raw.size"))
    assert got == sha.split()[0]


# -- the same against a live qemu-img, on the materialised copies ---------------------------------------
def _qemu(args: list[str], cwd: Path) -> tuple[int, str]:
    r = subprocess.run(["qemu-img", *args], cwd=cwd, capture_output=True, text=True, check=False)
    return r.returncode, r.stdout


@needs_qemu
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_live_qemu_img(in_samples: Samples, name: str) -> None:
    rel = _rel(in_samples, name)
    rc, out = _qemu(["info", "--output=json", rel], in_samples.dir)
    with open_image(rel) as img:
        if rc != 0:
            with pytest.raises(Qcow2Error):
                img.require_openable()
            return
        img.require_openable()
        assert image_info(img, rel) == json.loads(out)
        try:
            _openable(img, check=True)
        except Qcow2Error:
            assert _qemu(["check", "--output=json", rel], in_samples.dir)[0] == 1
            return
        res = check_image(img, filename=rel)
        if img.encrypted:
            exp, code = _check_with_key(in_samples, rel)
            assert (res.to_json(), str(res.exit_code)) == (exp, code)
        else:
            rc, out = _qemu(["check", "--output=json", rel], in_samples.dir)
            assert res.exit_code == rc
            if out.strip():
                assert res.to_json() == json.loads(out)
        rc, out = _qemu(["map", "--output=json", rel], in_samples.dir)
        if rc == 0:
            got = map_json(img)
            for g in got:
                g.pop("compressed")
            assert got == json.loads(out)


@needs_qemu
@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_read_mapped_ranges_live(in_samples: Samples, name: str, tmp_path: Path) -> None:
    """Every mapped data range reads back as qemu-img convert -O raw has it."""
    rel = _rel(in_samples, name)
    with open_image(rel) as img:
        if img.encrypted or img.virtual_size > 64 << 30:
            pytest.skip("encrypted or huge")
        rc, out = _qemu(["map", "--output=json", rel], in_samples.dir)
        if rc != 0:
            pytest.skip("qemu-img map fails on this image")
        raw = tmp_path / "out.raw"
        if subprocess.run(["qemu-img", "convert", "-O", "raw", rel, str(raw)], cwd=in_samples.dir,
                          capture_output=True, check=False).returncode:
            pytest.skip("qemu-img convert fails on this image")
        with open(raw, "rb") as f:
            for e in json.loads(out):
                if not e["data"]:
                    continue
                n = min(e["length"], 4 << 20)
                f.seek(e["start"])
                assert img.read(e["start"], n) == f.read(n), f"range at {e['start']}"
