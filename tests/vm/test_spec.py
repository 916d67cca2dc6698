"""VMSpec validation, TOML parsing (fuzzed) and domain XML, without booting anything."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hypervisor.errors import SpecError
from hypervisor.vm.runtime import VMRuntimeDir
from hypervisor.vm.spec import DiskSpec, HostLimits, VMSpec
from hypervisor.vm.xml import QEMU_XMLNS, domain_xml

HOST = HostLimits(memory=4 << 30, cpus=2)


@dataclass
class FakeImage:
    """Just the Image fields the XML builder reads (paths need not exist to build XML)."""

    kernel: Path = Path("/images/abc/vmlinuz")
    initrd: Path = Path("/images/abc/initrd.img")
    cmdline: str = "console=ttyS0 quiet"


def spec(**kw) -> VMSpec:
    base = {"name": "omega-test-v-unit", "image": "tiny"}
    base.update(kw)
    return VMSpec(**base)


@pytest.mark.parametrize("kw, message", [
    ({"memory": 0}, "memory: 0 must be larger than 0"),
    ({"memory": 8 << 30}, "more than the host has"),
    ({"memory": 1 << 20}, "below the minimum"),
    ({"vcpus": 0}, "vcpus: 0 must be an integer of at least 1"),
    ({"vcpus": 3}, "more than the host's 2 CPUs"),
    ({"name": "has space"}, "may only hold"),
    ({"name": "a/b"}, "may only hold"),
    ({"name": "x" * 65}, "at most 64"),
    ({"name": ""}, "name: required"),
    ({"image": ""}, "image: required"),
    ({"local_memory": 512 << 20}, "larger than memory"),
    ({"memory_backing": "hugepages"}, "memory_backing"),
    ({"graphics": "spice"}, "graphics"),
    ({"accel": "hvf"}, "accel"),
    ({"disk_size": 1000}, "multiple of 512"),
    ({"cmdline_extra": "a\nb"}, "one line"),
    ({"qemu_env": {"1BAD": "x"}}, "qemu_env"),
    ({"disks": [DiskSpec(kind="nfs")]}, "disks[0].kind"),
    ({"disks": [DiskSpec(kind="file")]}, "needs 'path'"),
    ({"disks": [DiskSpec(kind="netblock")]}, "needs 'export'"),
])
def test_validation_rejects_with_one_clear_line(kw, message):
    with pytest.raises(SpecError) as err:
        spec(**kw).validate(HOST)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_valid_spec_passes_and_roundtrips_through_dict():
    s = spec(vcpus=2, memory=512 << 20, disk_size=1 << 30, local_memory=128 << 20,
             memory_backing="memfd-shared", graphics="vnc", run_as_root=True,
             qemu_env={"LD_PRELOAD": "/x.so"}, qemu_args=["-S"],
             disks=[DiskSpec(kind="netblock", export="e", socket=Path("/run/n.sock"))])
    s.validate(HOST)
    assert s.uses_dsm
    assert VMSpec.from_dict(s.to_dict()) == s


def test_from_toml_reads_sizes_and_disks(tmp_path):
    path = tmp_path / "vm.toml"
    path.write_text('name = "omega-test-v-toml"\nimage = "tiny"\nvcpus = 2\nmemory = "512M"\n'
                    'disk_size = "1G"\ncmdline_extra = "foo=1"\n'
                    '[qemu_env]\nA = "b"\n'
                    '[[disks]]\nkind = "file"\npath = "/var/tmp/x.img"\nreadonly = true\n')
    s = VMSpec.from_toml(path)
    assert (s.name, s.vcpus, s.memory, s.disk_size) == ("omega-test-v-toml", 2, 512 << 20, 1 << 30)
    assert s.disks == [DiskSpec(kind="file", path=Path("/var/tmp/x.img"), readonly=True)]
    assert s.qemu_env == {"A": "b"}


@pytest.mark.parametrize("text, message", [
    ('name = "x"\nimage = ', "bad TOML"),
    ('name = "x"\nimage = "tiny"\ncolour = "red"\n', "unknown key(s) colour"),
    ('image = "tiny"\n', "'name' is required"),
    ('name = "x"\nimage = "tiny"\nvcpus = "two"\n', "vcpus: expected int"),
    ('name = "x"\nimage = "tiny"\nvcpus = true\n', "vcpus: expected int"),
    ('name = "x"\nimage = "tiny"\nmemory = "lots"\n', "not a size"),
    ('name = "x"\nimage = "tiny"\n[[disks]]\npath = "/a"\n', "'kind' is required"),
    ('name = "x"\nimage = "tiny"\n[[disks]]\nkind = "file"\nsize = 3\n', "unknown key(s) size"),
])
def test_from_toml_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as err:
        VMSpec.from_toml(path)
    assert message in str(err.value)


def test_from_toml_missing_file(tmp_path):
    with pytest.raises(SpecError, match="No such file"):
        VMSpec.from_toml(tmp_path / "absent.toml")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_fuzz_toml_only_spec_errors(text):
    """Arbitrary text either parses into a spec or fails with SpecError, nothing else."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        s = VMSpec.from_toml(f.name)
        s.validate(HOST)
    except SpecError:
        pass
    finally:
        Path(f.name).unlink()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(
    st.sampled_from(["name", "image", "vcpus", "memory", "disk_size", "disks", "accel",
                     "local_memory", "graphics", "qemu_env", "qemu_args", "run_as_root",
                     "bogus"]),
    st.one_of(st.none(), st.booleans(), st.integers(-5, 1 << 34), st.text(max_size=20),
              st.lists(st.one_of(st.text(max_size=5), st.dictionaries(
                  st.text(max_size=6), st.text(max_size=6), max_size=3)), max_size=3),
              st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3))))
def test_fuzz_from_dict_only_spec_errors(data):
    try:
        VMSpec.from_dict(data).validate(HOST)
    except SpecError:
        pass


def _xml(s: VMSpec, accel: str = "tcg") -> ET.Element:
    text = domain_xml(s, FakeImage(), accel=accel, runtime=VMRuntimeDir(Path("/vms/v")))
    return ET.fromstring(text)


def test_xml_defaults_tcg_serial_log_no_network():
    s = spec(cmdline_extra="omega.poweroff=1", disk_size=1 << 20)
    root = _xml(s)
    assert root.get("type") == "qemu"
    assert root.findtext("os/kernel") == "/images/abc/vmlinuz"
    assert root.findtext("os/cmdline") == "console=ttyS0 quiet omega.poweroff=1"
    assert root.findtext("on_poweroff") == "destroy"
    assert root.find("devices/serial/log").get("file") == "/vms/v/serial.log"
    assert root.find("devices/console/target").get("type") == "serial"
    assert root.find("devices/disk/source").get("file") == "/vms/v/scratch.img"
    assert root.find("devices/disk/target").get("dev") == "vda"
    assert root.find("devices/interface") is None
    assert root.find("devices/graphics") is None
    assert root.find("memoryBacking") is None
    assert root.find("seclabel") is None
    assert VMSpec.from_domain_xml(ET.tostring(root, encoding="unicode")) == s


def test_xml_kvm_dsm_vnc_netblock_root():
    s = spec(memory_backing="memfd-shared", graphics="vnc", run_as_root=True,
             qemu_env={"OMEGA_DSM_SOCKET": "/vms/v/dsm.sock"}, qemu_args=["-S"],
             disks=[DiskSpec(kind="netblock", export="exp1", socket=Path("/run/nb.sock"),
                             readonly=True)])
    root = _xml(s, accel="kvm")
    assert root.get("type") == "kvm"
    assert root.find("memoryBacking/source").get("type") == "memfd"
    assert root.find("memoryBacking/access").get("mode") == "shared"
    assert root.find("devices/graphics").get("socket") == "/vms/v/vnc.sock"
    assert root.find("devices/input").attrib == {"type": "tablet", "bus": "usb"}
    assert root.find("devices/video/model").get("type") == "vga"
    disk = root.find("devices/disk")
    assert disk.get("type") == "network"
    assert disk.find("source").attrib == {"protocol": "nbd", "name": "exp1"}
    assert disk.find("source/host").attrib == {"transport": "unix", "socket": "/run/nb.sock"}
    assert disk.find("readonly") is not None
    assert root.find("seclabel/label").text == "+0:+0"
    env = root.find(f"{{{QEMU_XMLNS}}}commandline/{{{QEMU_XMLNS}}}env")
    assert env.attrib == {"name": "OMEGA_DSM_SOCKET", "value": "/vms/v/dsm.sock"}
    arg = root.find(f"{{{QEMU_XMLNS}}}commandline/{{{QEMU_XMLNS}}}arg")
    assert arg.get("value") == "-S"


def test_xml_netblock_without_socket_is_an_error():
    s = spec(disks=[DiskSpec(kind="netblock", export="e")])
    with pytest.raises(SpecError, match="no NBD socket"):
        _xml(s)


def test_from_domain_xml_without_metadata():
    with pytest.raises(SpecError, match="no Omega metadata"):
        VMSpec.from_domain_xml("<domain type='qemu'><name>x</name></domain>")
    with pytest.raises(SpecError, match="domain XML"):
        VMSpec.from_domain_xml("<domain")


_line = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r\x00"),
                max_size=40)


@settings(max_examples=200, deadline=None)
@given(cmdline=_line, env_value=_line, arg=_line,
       export=st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12),
       graphics=st.sampled_from(["none", "vnc"]), vcpus=st.integers(1, 2))
def test_fuzz_xml_roundtrips_the_spec(cmdline, env_value, arg, export, graphics, vcpus):
    """Whatever text goes into the spec comes back out of the domain XML's metadata."""
    import re as _re

    s = spec(cmdline_extra=cmdline, qemu_env={"V": env_value}, qemu_args=[arg],
             graphics=graphics, vcpus=vcpus,
             disks=[DiskSpec(kind="netblock", export=export, socket=Path("/run/n.sock"))])
    # XML 1.0 cannot carry most control characters: the spec refuses them.
    if _re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]", cmdline + env_value + arg + export):
        with pytest.raises(SpecError, match="control characters"):
            s.validate(HOST)
        return
    s.validate(HOST)
    text = domain_xml(s, FakeImage(), accel="tcg", runtime=VMRuntimeDir(Path("/vms/v")))
    assert VMSpec.from_domain_xml(text) == s
    root = ET.fromstring(text)
    assert root.findtext("os/cmdline") == " ".join(
        p for p in ("console=ttyS0 quiet", cmdline.strip()) if p)
