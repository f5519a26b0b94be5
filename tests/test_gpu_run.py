"""The GPU script's plumbing, at tiny size on the CPU: the asset cache in parts and back, and
one run of every part writing the files docs/results/gpu/README.md is made from."""
import json

import pytest

import eval as ev
from loranull_mini import gpu_run


def test_the_cache_packs_into_verified_parts_and_unpacks_only_when_all_are_there(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "model").mkdir(parents=True)
    (cache / "model" / "weights.gguf").write_bytes(bytes(range(256)) * 400)    # 100 KiB
    (cache / "tok.json").write_text('{"a": 1}')
    monkeypatch.setattr(gpu_run, "PART_BYTES", 40 * 1024)
    manifest = gpu_run.pack_cache(cache, tmp_path / "carry")
    assert len(manifest["parts"]) >= 3 and all(p["bytes"] <= 40 * 1024 for p in manifest["parts"])
    last = tmp_path / "carry" / manifest["parts"][-1]["name"]
    kept = last.read_bytes()
    last.unlink()                                             # the second call has not come yet
    assert gpu_run.unpack_cache(tmp_path / "carry", tmp_path / "out").startswith("waiting for")
    assert not (tmp_path / "out").exists()
    last.write_bytes(kept[:-1] + b"x")                        # damaged on the way
    with pytest.raises(ValueError, match="does not match its sha256"):
        gpu_run.unpack_cache(tmp_path / "carry", tmp_path / "out")
    last.write_bytes(kept)
    gpu_run.unpack_cache(tmp_path / "carry", tmp_path / "out")
    assert (tmp_path / "out" / "model" / "weights.gguf").read_bytes() == (cache / "model" / "weights.gguf").read_bytes()
    assert (tmp_path / "out" / "tok.json").read_text() == '{"a": 1}'


def test_the_gpu_script_at_tiny_size_writes_the_files_its_readme_section_reads(tmp_path):
    out = tmp_path / "gpu"
    result = ev.main(["--suite", "gpu", "--quick", "--out", str(out), "--budget-s", "600"])
    saved = json.loads((out / "gpu.json").read_text())
    assert saved["parts"].keys() == {"shape7b", "bench", "study"}
    s = saved["parts"]["shape7b"]
    assert s["ours_s"] > 0 and s["params"] > 0 and s["shape"] == gpu_run.SHAPE_TINY
    assert "theirs_s" in s or s["theirs"].startswith("skipped")
    st = saved["parts"]["study"]
    assert st["runs_done"] == st["runs_total"] == 4 and st["finished"], st
    assert (out / "real-long-tiny" / "results.md").is_file()
    readme = (out / "README.md").read_text()
    for heading in ("## 7B-shaped calibration", "## Bench, bfloat16 rows", "## The long study"):
        assert heading in readme
    assert result["parts"]["bench"]["skipped"].startswith("--tiny")
    # a budget already spent starts no run: the study stops in time and says how to go on
    again = ev.main(["--suite", "gpu", "--quick", "--out", str(tmp_path / "late"), "--budget-s", "0"])
    assert again["parts"]["study"]["runs_done"] == 0 and not again["parts"]["study"]["finished"]
