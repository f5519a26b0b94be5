"""Files that are never half-written: one atomic_write for every file the project writes.

A file is written under a temporary name in its own directory, flushed to disk, then
renamed over its final name (os.replace is atomic on POSIX and Windows): a reader sees
the old file or the new one, never a mix, also when the writer is killed. A write that
fails (read-only directory, full disk) leaves the old file untouched and raises an
OSError that names the file.

Also here: JSON in and out with errors that name the file, and sha256 fingerprints of
tensors, so that files the project wrote can be verified when they are read back.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch


def atomic_write(path, write) -> Path:
    """write(tmp_path) fills a temporary file; it then replaces `path` in one step.

    The temporary file sits next to `path` (same file system, so the rename is atomic)
    and is removed if anything fails. OSError names the file and the reason.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give (some writers make 0600 files)
        with open(tmp, "rb+") as f:  # on disk before the rename, so a crash cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        reason = e.strerror or str(e)
        if e.errno == errno.ENOSPC:
            reason = "no space left on the device"
        raise OSError(e.errno, f"cannot write {path}: {reason}") from None
    except Exception as e:  # torch.save (RuntimeError), safetensors (SafetensorError) on a full disk
        if not disk_full(path.parent):
            raise
        raise OSError(errno.ENOSPC, f"cannot write {path}: no space left on the device") from None
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:           # e.g. the parent is a file: the error above says so
            pass
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def disk_full(directory, margin: int = 64 * 1024) -> bool:
    """Whether the file system holding `directory` has (almost) no space left. Writers that
    do not raise OSError (torch.save's RuntimeError, safetensors' SafetensorError) are told
    apart from other failures this way."""
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def atomic_directory(path, write) -> Path:
    """write(tmp_dir) fills a temporary sibling directory; it then takes the place of `path`.

    A kill before the swap leaves the old directory as it was; the swap itself is two
    renames (old aside, new in place), and read_directory finds the old one aside if a kill
    fell between them. The old one is removed only once the new one is in place.
    """
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp{os.getpid()}"), path.with_name(f".{path.name}.old{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return path


def restore_directory(path) -> Path:
    """`path`, put back from its aside copy (.NAME.oldPID) when a kill fell between the two
    renames of atomic_directory."""
    path = Path(path)
    if not path.exists():
        aside = sorted(path.parent.glob(f".{path.name}.old*")) if path.parent.is_dir() else []
        if aside:
            os.replace(aside[-1], path)
    return path


def remove_stale_temporaries(directory) -> list[Path]:
    """Remove the temporary files and directories (.NAME.tmpPID) that a killed writer left in
    `directory`; those of a process still alive are kept. Returns what was removed."""
    import re
    removed = []
    for p in Path(directory).glob(".*.tmp*") if Path(directory).is_dir() else []:
        m = re.fullmatch(r"\..+\.tmp(\d+)", p.name)
        if m and not process_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process `pid` exists (signal 0 checks without sending; another user's is alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path, obj, *, indent: int = 1) -> Path:
    """JSON with one trailing newline; floats such as numpy scalars are written as floats."""
    return write_text(path, json.dumps(obj, indent=indent, default=float) + "\n")


def read_json(path, *, missing_ok: bool = False):
    """The JSON in a file; None for a missing file when missing_ok. ValueError names the file."""
    path = Path(path)
    if missing_ok and not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path} as JSON (damaged?): {e}") from None


def save_figure(fig, path) -> Path:
    """A matplotlib figure as PNG, atomically; the figure is closed."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- fingerprints
def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and raw bytes: recognises a tensor exactly."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(memoryview(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()))  # no copy
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """One sha256 over the names, dtypes, shapes and bytes of a dict of tensors (any order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(f"{name}={tensor_sha256(tensors[name])}\n".encode())
    return h.hexdigest()
