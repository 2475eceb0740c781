"""Sharded training checkpoints (FSDP): torch.distributed.checkpoint (DCP), with
every guarantee of the single-file checkpoints (engine.checkpoint).

A sharded checkpoint is a folder `run_dir/ckpt_{step:06d}/`:

    __{rank}_{i}.distcp  each process's shards of the weights and of the optimizer state (DCP's files)
    .metadata            DCP's index of those shards (a pickle)
    train_state.pt       the rest of the training state: step, loaders, RNG, configs (a
                         single-file checkpoint without weights, with its checksum trailer)
    manifest.json        every file above with its size and sha256, then its own sha256

Writing. Every process writes into one hidden temp folder (named with rank 0's
token), then hashes the files it wrote; rank 0 writes train_state.pt and, last,
the manifest, and renames the folder to its final name once every rank has
written and hashed. A kill at any moment leaves the complete folder or a temp
folder that no reader looks at; a failed write on any rank fails the save on
every rank (RunFileError) and removes the temp folder.

Reading. The manifest is checked before anything else: its own checksum, then
every file's size and sha256. A changed or missing file is "damaged"; a folder
without a manifest of this engine is "not a training checkpoint of this engine".
Only then is anything unpickled, and never beyond an allow-list: `.metadata`
through an unpickler that accepts DCP's metadata classes alone (DCP's own reader
uses plain pickle), the state dict's non-tensor entries with
torch.load(weights_only=True) (DCP's default planner allows any object), the
tensors as DCP reads them (weights_only). `.metadata` may name only files the
manifest lists.

Loading reshards: DCP maps the saved shards onto the layout of the model it
loads into, FSDP over any number of processes or plain tensors in one process
(DDP, a single process, sample.py, `python -m engine.checkpoint export`).

Async saves (`AsyncSave`): the state is copied to CPU memory when the save
starts (a snapshot of that step), then written, hashed and renamed by a
background thread that talks only over a gloo group of its own, while training
goes on.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import shutil
import threading
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from engine import checkpoint as ckpt_lib
from engine.fileio import atomic_write, fsync_dir, os_reason
from engine.run_errors import RunFileError

MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
METADATA = ".metadata"
MANIFEST_FORMAT = "gpt2-engine sharded checkpoint"
MANIFEST_VERSION = 1

# What DCP's .metadata may hold: its dataclasses, the storage records, sizes,
# layouts and paths (the checkpoint id), and torch dtypes (checked by type).
_METADATA_GLOBALS = frozenset(
    [("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout")]
    + [("pathlib", name) for name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")])


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")


class SafeReader(FileSystemReader):
    """DCP's file reader, with `.metadata` unpickled through the allow-list and
    restricted to the files the manifest lists."""

    def __init__(self, path, listed=None):
        super().__init__(path)
        self.listed = listed
        self.refused = None  # why the metadata was refused, for the caller's message

    def read_metadata(self, *args, **kwargs):
        try:
            with open(pathlib.Path(self.path) / METADATA, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
            if self.listed is not None:
                for info in (metadata.storage_data or {}).values():
                    if getattr(info, "relative_path", None) not in self.listed:
                        raise pickle.UnpicklingError(f"it points at {getattr(info, 'relative_path', info)!r}, "
                                                     "which the manifest does not list")
        except (pickle.UnpicklingError, AttributeError, EOFError, ValueError, TypeError) as e:
            self.refused = f".metadata: {e}"
            raise
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading the non-tensor entries with weights_only=True."""

    refused = None  # why an entry was refused, for the caller's message

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            self.refused = f"its entry {read_item.dest_index.fqn} holds objects beyond tensors and plain containers"
            raise
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


# ------------------------------------------------------------------ reading

def _sha256(path: pathlib.Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            sha.update(block)
    return sha.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def verify(folder) -> dict:
    """The manifest of a sharded checkpoint whose files all match it; otherwise a
    CheckpointError naming the folder (damaged, or not this engine's)."""
    folder = pathlib.Path(folder)
    try:
        text = (folder / MANIFEST).read_text()
    except FileNotFoundError:
        raise ckpt_lib.CheckpointError(folder, f"no {MANIFEST}: not written by this engine, or its save did not "
                                       "finish", damaged=False) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ckpt_lib.CheckpointError(folder, f"{MANIFEST} cannot be read ({os_reason(e)})", damaged=True) from None
    try:
        manifest = json.loads(text)
    except ValueError:
        raise ckpt_lib.CheckpointError(folder, f"{MANIFEST} is not valid JSON", damaged=True) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ckpt_lib.CheckpointError(folder, f"its {MANIFEST} is not this engine's", damaged=False)
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise ckpt_lib.CheckpointError(folder, f"{MANIFEST}: sha256 mismatch: it changed after it was written",
                                       damaged=True)
    files = manifest.get("files")
    if manifest.get("version") != MANIFEST_VERSION or not isinstance(files, dict) or not {
            METADATA, TRAIN_STATE} <= set(files):
        raise ckpt_lib.CheckpointError(folder, f"manifest version {manifest.get('version')}; this engine writes "
                                       f"version {MANIFEST_VERSION}", damaged=False)
    for name, entry in sorted(files.items()):
        path = folder / name
        if not isinstance(entry, dict):
            raise ckpt_lib.CheckpointError(folder, f"{MANIFEST}: malformed entry for {name}", damaged=False)
        if pathlib.Path(name).name != name or not path.is_file():
            raise ckpt_lib.CheckpointError(folder, f"{name} is missing", damaged=True)
        size = path.stat().st_size
        if size != entry.get("size"):
            raise ckpt_lib.CheckpointError(folder, f"{name} has {size:,} bytes, {entry.get('size')} were written",
                                           damaged=True)
        if _sha256(path) != entry.get("sha256"):
            raise ckpt_lib.CheckpointError(folder, f"{name}: sha256 mismatch: its bytes changed after it was "
                                           "written", damaged=True)
    return manifest


def read_train_state(folder) -> dict:
    """The training state of a verified sharded checkpoint, without the weights and
    the optimizer state (which `restore_tensors` reads): `state["sharded"]` is the
    folder, `state["sharded_files"]` the files its manifest lists."""
    folder = pathlib.Path(folder)
    manifest = verify(folder)
    try:
        state = ckpt_lib.load_checkpoint(folder / TRAIN_STATE, weights=False)
    except ckpt_lib.CheckpointError as e:
        raise ckpt_lib.CheckpointError(folder, f"{TRAIN_STATE}: {e.reason}", damaged=e.damaged) from None
    state["sharded"] = str(folder)
    state["sharded_files"] = sorted(manifest["files"])
    return state


def load_into(folder, state_dict: dict, listed=None) -> None:
    """Fill `state_dict` (tensors of any layout: DTensors of an FSDP model, plain
    ones) in place from a sharded checkpoint, through the safe reader and planner.
    Under a process group every process must call it."""
    folder = pathlib.Path(folder)
    if listed is None:
        listed = set(verify(folder)["files"])
    reader, planner = SafeReader(folder, listed), SafeLoadPlanner()
    try:
        with warnings.catch_warnings():
            # Loading in one process without a process group is what we mean: DCP warns anyway.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
            dcp.load(state_dict, storage_reader=reader, planner=planner)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP wraps every failure in its own exception
        refused = reader.refused or planner.refused
        if refused:
            raise ckpt_lib.CheckpointError(folder, f"its contents cannot be loaded safely: {refused}",
                                           damaged=False) from None
        raise ckpt_lib.CheckpointError(folder, f"its state does not fit this model: {_failure(e)}",
                                       damaged=False) from None


def _failure(e: BaseException) -> str:
    """Why DCP failed: the first failure a CheckpointException wraps (or `e`), in short."""
    failures = getattr(e, "failures", None)
    if failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) else first
    return os_reason(e)[:300]


def full_model_state(folder, model_config: dict) -> dict:
    """The weights of a sharded checkpoint as one state dict of plain CPU tensors."""
    from engine.config import GPTConfig
    from engine.model import GPT
    model = GPT(GPTConfig.from_dict({**model_config, "backend": "torch"}))
    weights = model.state_dict()  # the tied LM head shares the token embedding's storage
    repeats = tied_repeats(model)
    load_into(folder, {"model": {k: v for k, v in weights.items() if k not in repeats}})
    return weights


# ------------------------------------------------------------------ writing

def _own_files(folder: pathlib.Path, rank: int) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f"__{rank}_") and p.is_file())


def write_manifest(folder: pathlib.Path, step: int, world_size: int, files: dict) -> None:
    """manifest.json, atomically: `files` ({name: {"size", "sha256"}}) and its own sha256."""
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step, "world_size": world_size,
                "files": files}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    text = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write(folder / MANIFEST, lambda f: f.write(text))
    fsync_dir(folder)


def hash_files(folder: pathlib.Path, names) -> dict:
    """{name: {"size", "sha256"}} of the files `names` in `folder`."""
    return {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}


class SaveJob:
    """One save of a sharded checkpoint, from the temp folder to its final name.

    `write()` has DCP write the shards (every rank); `finish()` hashes them and
    (rank 0) writes train_state.pt and the manifest and renames the folder; it
    returns the final path on every rank or raises RunFileError on every rank.
    All collectives of a job run on one group: `group` (None: the default one)."""

    def __init__(self, run_dir, step: int, rank: int, world_size: int, token: str, train_state: dict,
                 keep: int = 0, group=None):
        self.run_dir, self.step, self.rank, self.world_size = pathlib.Path(run_dir), step, rank, world_size
        self.final = self.run_dir / ckpt_lib.checkpoint_name(step, sharded=True)
        self.tmp = self.run_dir / f"{ckpt_lib.TMP_PREFIX}{step:06d}.{token}{ckpt_lib.TMP_SUFFIX}"
        self.train_state, self.keep, self.group = train_state, keep, group
        self._error = None

    def write(self, state_dict: dict) -> None:
        """Write `state_dict` (tensors_state's, or its cpu_snapshot) into the temp folder."""
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            dcp.save(state_dict, storage_writer=FileSystemWriter(self.tmp, sync_files=True), process_group=self.group)
        except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP reports any rank's failure on every rank
            self._error = _failure(e)

    def finish(self) -> pathlib.Path:
        mine = {}
        if self._error is None:
            try:
                mine = hash_files(self.tmp, _own_files(self.tmp, self.rank))
            except OSError as e:
                self._error = os_reason(e)
        reports = [(mine, self._error)]
        if self.world_size > 1:
            reports = [None] * self.world_size
            dist.all_gather_object(reports, (mine, self._error), group=self.group)
        outcome = None
        if self.rank == 0:
            outcome = self._publish(reports)
        if self.world_size > 1:
            box = [outcome]
            dist.broadcast_object_list(box, src=0, group=self.group)
            outcome = box[0]
        path, error = outcome
        if error:
            raise RunFileError(error)
        return pathlib.Path(path)

    def _publish(self, reports) -> tuple[str | None, str | None]:
        """Rank 0: train_state.pt, the manifest, the rename, the rotation."""
        errors = [e for _, e in reports if e]
        try:
            if errors:
                raise OSError(errors[0])
            files = {}
            for part, _ in reports:
                files.update(part)
            ckpt_lib.write_state_file(self.tmp / TRAIN_STATE, self.train_state)
            files.update(hash_files(self.tmp, [METADATA, TRAIN_STATE]))
            write_manifest(self.tmp, self.step, self.world_size, files)
            self._rename()
        except (OSError, RuntimeError) as e:
            shutil.rmtree(self.tmp, ignore_errors=True)
            latest = ckpt_lib.latest_checkpoint(self.run_dir)
            return None, (f"checkpoint: could not write {self.final} ({os_reason(e)}); the earlier checkpoints "
                          f"are intact (latest: {latest or 'none'})")
        ckpt_lib.rotate(self.run_dir, self.keep)
        return str(self.final), None

    def _rename(self) -> None:
        # A folder of the same step (written before an earlier resume) is swapped
        # out, not deleted first: some checkpoint of this step exists at every moment.
        old = None
        if self.final.exists():
            old = self.tmp.with_name(self.tmp.name.removesuffix(ckpt_lib.TMP_SUFFIX) + ".old" + ckpt_lib.TMP_SUFFIX)
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        fsync_dir(self.run_dir)
        if old is not None:
            ckpt_lib.remove_checkpoint(old)


def cpu_snapshot(state: dict) -> dict:
    """A copy of `state` in CPU memory (DTensors stay DTensors of the same layout),
    taken now: what an async save writes while training changes the originals."""
    from torch.distributed.tensor import DTensor
    from torch.utils._pytree import tree_map_only

    def copy(t):
        if isinstance(t, DTensor):
            local = t.to_local().detach().to("cpu", copy=True)
            return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False, shape=t.shape,
                                      stride=t.stride())
        return t.detach().to("cpu", copy=True)

    return tree_map_only(torch.Tensor, copy, state)


class AsyncSave:
    """A sharded save written and finished by a background thread from a CPU
    snapshot, while training goes on. The thread's collectives run on the job's
    group, a gloo group of its own, so the training collectives on the default
    group never meet them. `wait()` returns its path or raises its error."""

    def __init__(self, job: SaveJob, snapshot: dict):
        self.job = job
        self._result = None
        self._thread = threading.Thread(target=self._run, args=(snapshot,), name=f"checkpoint-{job.step}",
                                        daemon=True)
        self._thread.start()

    def _run(self, snapshot):
        try:
            self.job.write(snapshot)
            self._result = (self.job.finish(), None)
        except BaseException as e:  # noqa: BLE001 - handed to wait()
            self._result = (None, e)

    def wait(self) -> pathlib.Path:
        self._thread.join()
        path, error = self._result
        if error is not None:
            raise error
        return path


def checkpoint_group(backend: str = "gloo"):
    """A process group of every process for checkpoint traffic (all must call this)."""
    return dist.new_group(backend=backend)


def tied_repeats(model) -> dict[str, str]:
    """{name: the name it repeats} for parameters listed under a second name (the
    LM head tied to the token embedding): the same on every process."""
    first, repeats = {}, {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            repeats[name] = first[id(p)]
        else:
            first[id(p)] = name
    return repeats


def tensors_state(model, optimizer) -> dict:
    """{"model", "optimizer"}: DCP's view of the weights and the optimizer state
    (DTensors under FSDP, plain tensors otherwise), aliasing the live tensors; a
    tied weight once."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optimizer_state = get_state_dict(model, optimizer)
    repeats = tied_repeats(model)
    return {"model": {k: v for k, v in model_state.items() if k not in repeats}, "optimizer": optimizer_state}


def restore_tensors(folder, model, optimizer, listed=None) -> None:
    """Load a sharded checkpoint's weights and optimizer state into `model` and
    `optimizer` (any layout), keeping the optimizer's learning-rate objects."""
    from torch.distributed.checkpoint.state_dict import set_state_dict
    state = tensors_state(model, optimizer)
    # The groups' hyperparameters are this run's (its configuration is the saved
    # one's): only the tensors are read, so torch's AdamW and FusedAdamW, whose
    # groups hold different keys, resume from each other's checkpoints.
    groups = state["optimizer"].pop("param_groups")
    load_into(folder, state, listed)
    state["optimizer"]["param_groups"] = groups
    for name, kept in tied_repeats(model).items():
        state["model"][name] = state["model"][kept]
    lrs = [g["lr"] for g in optimizer.param_groups]
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr

