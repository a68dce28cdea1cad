"""A VM's image is a name in the VMMS's images directory (issue 11, finding 10): host paths and
".." are refused with a 400 that says what to give; a name is looked up in the directory at
start (409 if it holds no such file); "pyhv-guest" or no image is the bundled guest; a VM
arriving by live migration boots the destination's file of that name, whatever path the
source's configuration carried."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhv.vmms.client import ClientError, VmmsClient
from pyhv.vmms.images import ImageError, check_image_name
from pyhv.vmms.service import Vmms
from tests.vmms.fakes import FakeIncomingBase, FakeWorker, fake_service

BUNDLED = __file__  # what the fixture's bundled-guest resolver answers (fakes boot nothing)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name", ["/etc/shadow", "../../etc/shadow", "a/b", ".hidden", "x..y", "", "a\0b", "é"]
)
def test_paths_and_dotdot_are_not_image_names(name: str) -> None:
    with pytest.raises(ImageError, match="host paths are refused"):
        check_image_name(name)


@pytest.mark.unit
def test_plain_file_names_are_image_names() -> None:
    for name in ("pyhv-guest", "guest.elf", "linux-6.1_pvh.bin"):
        assert check_image_name(name) == name


class _Incoming(FakeIncomingBase):
    """An incoming worker that records what it was told (it never gets a VM)."""

    seen: list[dict[str, Any]] = []

    def __init__(self, token: str, listen: tuple[str, int], output: Any, **kw: Any) -> None:
        super().__init__(token, listen, output, **kw)
        _Incoming.seen.append(kw)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Vmms, VmmsClient]]:
    with fake_service(
        tmp_path,
        image_resolver=lambda: BUNDLED,
        images_dir=tmp_path / "images",
        migration={"incoming_factory": _Incoming},
    ) as service:
        yield service


@pytest.mark.simulation
def test_a_host_path_is_refused_with_a_400_that_says_what_to_give(
    service: tuple[Vmms, VmmsClient],
) -> None:
    _, c = service
    for image in ("/etc/shadow", "../../etc/shadow", "images/../../etc/shadow"):
        with pytest.raises(ClientError, match="not an image name.*images directory") as e:
            c.request("POST", "/api/vms", {"name": "bad", "image": image})
        assert e.value.status == 400
    c.request("POST", "/api/vms", {"name": "ok"})
    with pytest.raises(ClientError, match="host paths are refused") as e:
        c.request("PATCH", "/api/vms/ok", {"image": "/etc/shadow"})
    assert e.value.status == 400
    assert [vm["name"] for vm in c.request("GET", "/api/vms")["vms"]] == ["ok"]


@pytest.mark.simulation
def test_an_image_name_boots_the_file_of_that_name_in_the_images_directory(
    service: tuple[Vmms, VmmsClient], tmp_path: Path
) -> None:
    _, c = service
    c.request("POST", "/api/vms", {"name": "mine", "image": "guest.elf"})
    with pytest.raises(ClientError, match="no image 'guest.elf' in .*images") as e:
        c.request("POST", "/api/vms/mine/start")
    assert e.value.status == 409
    (tmp_path / "images" / "guest.elf").write_bytes(b"\x7fELF")
    c.request("POST", "/api/vms/mine/start")
    assert FakeWorker.instances[-1].config.image == tmp_path / "images" / "guest.elf"
    for name, image in (("default", None), ("named", "pyhv-guest")):
        c.request("POST", "/api/vms", {"name": name, **({"image": image} if image else {})})
        c.request("POST", f"/api/vms/{name}/start")
        assert str(FakeWorker.instances[-1].config.image) == BUNDLED


@pytest.mark.simulation
def test_a_migrating_vm_boots_the_destinations_file_not_the_sources_path(
    service: tuple[Vmms, VmmsClient], tmp_path: Path
) -> None:
    vmms, _ = service
    _Incoming.seen.clear()
    settings = {"name": "mig", "memory": 512 << 20, "image": "guest.elf"}
    with pytest.raises(Exception, match="no image 'guest.elf'"):
        vmms.migrations.prepare_incoming({"settings": settings, "source": "a"})
    assert _Incoming.seen == []  # refused before any worker
    (tmp_path / "images" / "guest.elf").write_bytes(b"\x7fELF")
    vmms.migrations.prepare_incoming({"settings": settings, "source": "a"})
    assert _Incoming.seen[-1]["image"] == str(tmp_path / "images" / "guest.elf")
    # A source that sends a host path in the settings is refused outright.
    with pytest.raises(Exception, match="host paths are refused"):
        vmms.migrations.prepare_incoming(
            {"settings": {**settings, "name": "m2", "image": "/etc/shadow"}, "source": "a"}
        )
