"""Images from the images directory, against a real `pyhv vmms serve` and the reference guest:
`pyhv vm create --image /etc/shadow` is refused with a message that says what to give; a name
the directory does not hold cannot start; a copy of the guest put in STATE/images boots by its
name and its shell answers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyhv.guest_image import image_path
from tests.vmms.vmms_process import VmmsProcess

pytestmark = pytest.mark.guest


def test_a_real_vmms_boots_images_by_name_and_refuses_host_paths(tmp_path: Path) -> None:
    host = VmmsProcess(tmp_path, "a", "1G")
    try:
        for path in ("/etc/shadow", "../../etc/shadow"):
            out = host.vm("create", "bad", "--image", path, check=False)
            assert "not an image name" in out and "host paths are refused" in out, out
        assert host.names() == []
        host.vm("create", "missing", "--image", "nothere.elf", "--memory", "128M")
        out = host.vm("start", "missing", check=False)
        assert "no image 'nothere.elf' in" in out, out
        shutil.copy(image_path(), host.state / "images" / "myguest.elf")
        host.vm("create", "g", "--image", "myguest.elf", "--memory", "128M")
        host.vm("start", "g")
        assert "visible" in host.shell("g", "mem", b"visible")
        host.vm("stop", "g")
    finally:
        host.close()
