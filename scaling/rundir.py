"""Run and sweep directories: what this product writes into them, and how it reads them back.

JAX-free, so that reading results (`scaling report`, `scaling.results`) never starts a backend.

A directory this product creates holds a marker file, `.scaling`, that nothing else writes. Only
a marked directory is ever cleared (`--overwrite`), and then only of the entries this product
writes there (`OWN_ENTRIES`): a user's other files survive. A directory that is not empty, not
marked and not a run of the same config is refused, never written into. One process at a time
writes a run directory: the holder of an exclusive `flock` on its `.lock` file.

Reading is forgiving where writing is strict: a corrupt `trials.jsonl` line, `config.json` or
`summary.json` is skipped with one warning line, so one damaged file never hides the rest.
"""

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from scaling import ScalingError

MARKER = ".scaling"
LOCK = ".lock"
# What a run or sweep directory may hold that this product wrote (and so may clear).
OWN_ENTRIES = (
    MARKER, LOCK, "config.json", "summary.json", "metrics.jsonl", "train.log", "checkpoints",
    "trials.jsonl", "wandb",
)  # fmt: skip
# TensorBoard event files; the temporary files of `atomic_file`.
OWN_PREFIXES = ("events.out.tfevents.", ".config.json.", ".summary.json.", ".metrics.jsonl.")
# A sweep passes the descriptor of the trial's lock it holds to its trainer child.
LOCK_FD_VARIABLE = "SCALING_LOCK_FD"


def warn(message: str):
    """One warning line on stderr (a skipped file, a fallback): never silent, never a trace."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def safe_name(name) -> bool:
    """Whether `name` is one plain path component: a trial name can never leave its sweep."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and not any(c in name for c in "/\\\0")
        and Path(name).name == name
    )


# ---- JSON files ----
@contextlib.contextmanager
def atomic_file(path, mode="w"):
    """A file to write `path` through: written beside it and renamed into place when the block
    ends, so no reader (nor a kill) ever sees half of it; removed if the block raises."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, mode) as file:
            yield file
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path, obj):
    with atomic_file(path) as file:
        file.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path) -> dict | None:
    """The JSON object in `path`; None when it is absent, or (with one warning) damaged."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        warn(f"skipping {path}: unreadable ({first_line(e)})")
        return None
    if not isinstance(value, dict):
        warn(f"skipping {path}: not a JSON object")
        return None
    return value


def read_metrics(path):
    """Records of a metrics.jsonl; a partial or damaged line (a killed writer) is ignored."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def json_config(config) -> dict:
    """The config as plain JSON data (what config.json holds)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def recorded_config(workdir: Path) -> dict | None:
    """The config.json of the run in `workdir` (None if it has none); a damaged one is one
    ScalingError, never a guess."""
    saved = Path(workdir) / "config.json"
    if not saved.exists():
        return None
    try:
        config = json.loads(saved.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ScalingError(f"{saved} is unreadable ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise ScalingError(f"{saved} is not a run's config (not a JSON object)")
    return config


def config_conflicts(workdir: Path, config) -> list[str]:
    """Top-level keys in which `config` differs from the run recorded in `workdir` (if any). A
    key the record lacks is a field added since the run began, and where a run's metrics are
    mirrored (`wandb`) does not change the run: neither is a conflict."""
    old = recorded_config(workdir)
    if old is None:
        return []
    new = json_config(config)
    keys = (set(old) | set(new)) - {"wandb"}
    return sorted(k for k in keys if old.get(k, new.get(k)) != new.get(k))


# ---- The sweep index ----
def read_index(workdir: Path) -> dict[str, dict]:
    """{trial name: record} of `workdir/trials.jsonl`. A damaged line, or a record whose name is
    not one plain path component (`../x`), is skipped with a warning."""
    path = Path(workdir) / "trials.jsonl"
    if not path.exists():
        return {}
    records = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            warn(f"{path}:{number}: skipping a damaged line")
            continue
        if not isinstance(record, dict) or not safe_name(record.get("name")):
            warn(f"{path}:{number}: skipping a record without a plain trial name")
            continue
        records[record["name"]] = record
    return records


def write_index(workdir: Path, records: dict[str, dict]):
    with atomic_file(Path(workdir) / "trials.jsonl") as file:
        file.write("".join(json.dumps(r) + "\n" for r in records.values()))


def rewind_metrics(path: Path, step: int) -> list[dict]:
    """Keep the records of `path` up to `step` (a resumed run redoes the steps after its
    checkpoint; a line a kill cut short goes too); returns them."""
    kept = [r for r in read_metrics(path) if r["step"] <= step]
    if Path(path).exists():
        with atomic_file(path) as file:
            file.write("".join(json.dumps(r) + "\n" for r in kept))
    return kept


# ---- Ownership ----
def is_marked(directory: Path) -> bool:
    return (Path(directory) / MARKER).is_file()


def mark(directory: Path, kind: str):
    """Record that this product created `directory` (a "run" or a "sweep")."""
    if not is_marked(directory):
        write_json_atomic(Path(directory) / MARKER, {"product": "scaling", "kind": kind})


def own_entries(directory: Path) -> list[Path]:
    return [
        p for p in Path(directory).iterdir()
        if p.name in OWN_ENTRIES or p.name.startswith(OWN_PREFIXES)
    ]  # fmt: skip


def check_writable(directory: Path, what: str):
    """One clear error, before any work, when `directory` cannot hold our files."""
    directory = Path(directory)
    if str(directory) == "":
        raise ScalingError(f"{what} is empty")
    if directory.exists() and not directory.is_dir():
        raise ScalingError(f"{what} {directory} exists and is not a directory")
    existing = next(p for p in [directory, *directory.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise ScalingError(f"{what} {directory}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ScalingError(f"{what} {directory}: {existing} is not writable")


def check_run_directory(workdir: Path, config, overwrite: bool):
    """Refuse, before anything is written, a workdir this run may not use: a file; a directory
    with other files than a run's; a run of another config (unless --overwrite, which only a
    marked directory, neither the current directory nor one of its parents, allows)."""
    workdir = Path(workdir)
    check_writable(workdir, "--workdir")
    if not workdir.exists() or all(p.name == LOCK for p in workdir.iterdir()):
        return
    conflicts = config_conflicts(workdir, config)
    if not is_marked(workdir) and (conflicts or not (workdir / "config.json").exists()):
        raise ScalingError(
            f"{workdir} is not empty and is not a scaling run directory (no {MARKER} marker); "
            "choose a new or empty workdir"
        )
    if not conflicts:
        return
    if not overwrite:
        raise ScalingError(
            f"{workdir} holds a run with a different config (differs in: {', '.join(conflicts)}); "
            "use another workdir or --overwrite"
        )
    if Path.cwd().resolve().is_relative_to(workdir.resolve()):
        raise ScalingError(
            f"--overwrite refuses {workdir}: it is or contains the current directory"
        )


def prepare_run_directory(workdir: Path, config, overwrite: bool):
    """Create (or, with --overwrite, clear of our own entries) the run directory; mark it;
    record the config. Call `check_run_directory` first, and hold the lock."""
    workdir = Path(workdir)
    check_run_directory(workdir, config, overwrite)
    if (workdir / "config.json").exists() and config_conflicts(workdir, config):
        for entry in own_entries(workdir):
            if entry.name not in (MARKER, LOCK):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    mark(workdir, "run")
    if not (workdir / "config.json").exists():
        write_json_atomic(workdir / "config.json", json_config(config))


@contextlib.contextmanager
def lock(directory: Path):
    """Hold the exclusive lock of a run directory, or raise ScalingError when another process
    holds it. A lock inherited from the sweep that started this trainer counts as held."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    if inherited_lock(path):
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ScalingError(
                f"another process is training in {directory}; wait for it or stop it"
            ) from None
        except OSError as e:  # some network file systems have no flock
            warn(f"cannot lock {directory} ({e.strerror}); make sure nothing else writes there")
        yield
    finally:
        os.close(fd)


def inherited_lock(path: Path) -> bool:
    fd = os.environ.get(LOCK_FD_VARIABLE, "")
    if not fd.isdigit() or not path.exists():
        return False
    try:
        held, here = os.fstat(int(fd)), path.stat()
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (here.st_dev, here.st_ino)
