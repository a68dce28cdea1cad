"""A VM's configuration as the VMMS stores it: values checked with clear messages, defaults as
Hyper-V's, and the book's rules for changing the memory of a running VM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyhv.vmms.config import VmSettingsError, apply_changes, settings_from_dict
from pyhv.vmms.store import ConfigStore

pytestmark = pytest.mark.unit

M = 1 << 20


def test_a_new_vm_gets_the_defaults_buffer_20_percent_and_weight_50() -> None:
    s = settings_from_dict({"name": "testvm", "memory": "512M", "dynamic_memory": True})
    assert (s.memory, s.buffer, s.weight, s.vps) == (512 * M, 20, 50, 1)
    assert (s.minimum, s.maximum) == (256 * M, 2048 * M)
    assert s.memory_settings().startup_pages == 512 * M // 4096


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"memory": "512M"}, "name is required"),
        ({"name": "../etc"}, "VM name '../etc' is not usable"),
        ({"name": "a b"}, "is not usable"),
        ({"name": "x", "memory": "lots"}, "memory size 'lots' is not understood"),
        ({"name": "x", "memory": "1M"}, "out of range"),
        ({"name": "x", "memory": 1.5}, "Expected `int | str`, got `float` - at `$.memory`"),
        (
            {"name": "x", "vps": 0},
            "Expected `int` >= 1 - at `$.vps` (vps: virtual processors, 1..64)",
        ),
        ({"name": "x", "vps": "2"}, "Expected `int`, got `str` - at `$.vps`"),
        (
            {"name": "x", "dynamic_memory": "yes"},
            "Expected `bool`, got `str` - at `$.dynamic_memory`",
        ),
        ({"name": "x", "buffer": 4}, "Expected `int` >= 5 - at `$.buffer`"),
        ({"name": "x", "buffer": 2001}, "5..2000"),
        ({"name": "x", "weight": 101}, "at `$.weight` (weight: memory weight (priority) 0..100"),
        ({"name": "x", "memory": "512M", "minimum": "1G"}, "minimum <= startup <= maximum"),
        ({"name": "x", "memory": "512M", "maximum": "256M"}, "minimum <= startup <= maximum"),
        ({"name": "x", "colour": "red"}, "unknown setting(s) 'colour'"),
        ({"name": "x", "dirty_ring_entries": 1000}, "power of two from 256 to 65536"),
        ({"name": "x", "dirty_ring_entries": 1 << 17}, "at `$.dirty_ring_entries`"),
    ],
)
def test_a_bad_setting_is_refused_with_what_was_wrong(raw: dict[str, object], words: str) -> None:
    with pytest.raises(VmSettingsError) as e:
        settings_from_dict(raw)
    assert words in str(e.value)


def test_a_vm_with_a_dirty_ring_passes_it_to_its_worker_and_back(tmp_path: Path) -> None:
    from pyhv.worker.config import VmConfig

    image = tmp_path / "guest.elf"
    image.write_bytes(b"\x7fELF")
    s = settings_from_dict({"name": "w", "memory": "256M", "dirty_ring_entries": 16384})
    cfg = s.worker_config(str(image))
    assert cfg.dirty_ring_entries == 16384
    # the migration's CONFIG frame carries it: the destination creates the same ring
    assert VmConfig.from_dict(cfg.to_dict()).dirty_ring_entries == 16384
    assert settings_from_dict({"name": "b"}).dirty_ring_entries == 0  # the bitmap by default


def _running() -> object:
    return settings_from_dict(
        {"name": "t", "memory": "512M", "dynamic_memory": True, "minimum": "256M", "maximum": "1G"}
    )


def test_while_the_vm_runs_minimum_may_go_down_and_maximum_up() -> None:
    s = apply_changes(_running(), {"minimum": "128M", "maximum": "4G", "buffer": 50}, running=True)  # type: ignore[arg-type]
    assert (s.minimum, s.maximum, s.buffer) == (128 * M, 4096 * M, 50)


def test_while_the_vm_runs_minimum_may_not_go_up() -> None:
    with pytest.raises(VmSettingsError, match="minimum can only go down while VM 't' runs"):
        apply_changes(_running(), {"minimum": "384M"}, running=True)  # type: ignore[arg-type]


def test_while_the_vm_runs_maximum_may_not_go_down() -> None:
    with pytest.raises(VmSettingsError, match="maximum can only go up while VM 't' runs"):
        apply_changes(_running(), {"maximum": "768M"}, running=True)  # type: ignore[arg-type]


def test_while_the_vm_runs_startup_memory_is_fixed() -> None:
    with pytest.raises(VmSettingsError, match="memory cannot change while VM 't' runs"):
        apply_changes(_running(), {"memory": "1G"}, running=True)  # type: ignore[arg-type]


def test_an_off_vm_may_change_anything_but_its_name() -> None:
    s = apply_changes(_running(), {"memory": "1G", "minimum": "512M", "vps": 2}, running=False)  # type: ignore[arg-type]
    assert (s.memory, s.minimum, s.vps) == (1024 * M, 512 * M, 2)
    with pytest.raises(VmSettingsError, match="unknown setting"):
        apply_changes(_running(), {"name": "other"}, running=False)  # type: ignore[arg-type]


def test_configurations_are_stored_one_file_per_vm_and_read_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = ConfigStore(tmp_path)
    s = settings_from_dict({"name": "a", "memory": "256M", "dynamic_memory": True})
    store.save(s)
    (tmp_path / "vms" / "broken.json").write_text("{not json")
    (tmp_path / "vms" / "liar.json").write_text(json.dumps({"name": "other"}))
    again = ConfigStore(tmp_path).load_all()
    assert again == {"a": s}
    store.load_all()
    assert set(store.broken) == {"broken.json", "liar.json"}
    assert oct((tmp_path).stat().st_mode & 0o777) == "0o700"
    store.delete("a")
    assert store.load_all() == {}
