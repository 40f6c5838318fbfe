"""Model folders that travel: a trained run or cross-validation as one zip file that predicts on another machine.

``python -m medseg.export ckpt_path=<run or cross-validation folder> output=<name>.zip`` (:func:`write_model_zip`)
writes::

    medseg_model.json        manifest: name, medseg version, members, SHA-256 of every file, labels, point, flips
    MODEL_CARD.md            data, metrics with their definitions, intended use, limits (medseg.model_card)
    config.yaml              the training config, machine paths removed (what prediction rebuilds the model from)
    operating_point.json     threshold, minimum component volume and score per region, tuned on what
    labels.json              label names, values, regions or classes (data.labels)
    preprocessing.json       what preprocessing does to an input (orientation, spacing, intensity, crop)
    checkpoints/<k>.ckpt     each member's weights + config (paths removed) + operating point; nothing else
    report/...               the run's metrics.json or crossval.json, operating-point sweep, evaluation summary and pictures
                             (case_reports=true: also the split and the per-case table, whose case ids may identify patients)
    onnx/<k>.onnx            (include_onnx=true) each member's network for onnxruntime

``medseg.predict ckpt_path=<name>.zip`` (:func:`installed_checkpoints`, through :func:`medseg.ensemble.resolve_checkpoints`)
unpacks it once into ``$MEDSEG_CACHE/models/`` (else ``~/.cache/medseg/models/``), in a folder named by the zip's
SHA-256 (a renamed copy is the same model), checks every file against the manifest, and predicts with its
checkpoints as with the source's.

Machine paths: every string of the config (and of the JSON reports) that is a filesystem path of the training
machine (absolute, ``~``, ``./`` or ``../``) becomes ``null``; prediction never reads them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from medseg import __version__
from medseg.config import ConfigError
from medseg.build import preprocessing_options_from_config
from medseg.io import atomic_path
from medseg.postprocess import CHECKPOINT_KEY, TUNED_ON
from medseg.report import CASE_REPORT_FILES, REPORT_FILES

MANIFEST = "medseg_model.json"
FORMAT_VERSION = 1
CARD = "MODEL_CARD.md"
CHECKPOINT_DIR = "checkpoints"
ONNX_DIR = "onnx"
REPORT_DIR = "report"
_PATH_PREFIXES = ("/", "~", "./", "../", "\\\\")


def is_machine_path(value: Any) -> bool:
    """Whether ``value`` is a string naming a file or folder of the machine it was written on."""
    return isinstance(value, str) and (value.startswith(_PATH_PREFIXES) or os.path.isabs(value) or (len(value) > 2 and value[1] == ":" and value[2] in "\\/"))


def without_machine_paths(node: Any) -> Any:
    """A copy of a JSON-like ``node`` in which every machine path (:func:`is_machine_path`) is ``None``."""
    if isinstance(node, dict):
        return {k: without_machine_paths(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [without_machine_paths(v) for v in node]
    return None if is_machine_path(node) else node


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def portable_checkpoint(path: Path, member: str) -> dict[str, Any]:
    """What prediction needs of a checkpoint: weights, the config without machine paths, the operating point (tuned on
    this checkpoint: now on ``member``, its name in the zip; or on its cross-validation: kept)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("medseg_config"), dict) or "state_dict" not in checkpoint:
        raise ConfigError(f"checkpoint {str(path)!r} has no saved training config ('medseg_config') and weights; expected a checkpoint written by medseg.train")
    kept = {"state_dict": checkpoint["state_dict"], "medseg_config": without_machine_paths(checkpoint["medseg_config"])}
    if checkpoint.get(CHECKPOINT_KEY) is not None:
        point = dict(checkpoint[CHECKPOINT_KEY])
        kept[CHECKPOINT_KEY] = {**point, TUNED_ON: member} if point.get(TUNED_ON) == path.name else point
    return kept


def write_model_zip(ckpt_path: Any, output: str | os.PathLike, name: str | None = None, include_onnx: bool = False, overwrite: bool = False, case_reports: bool = False) -> dict[str, Any]:
    """Write the model zip of a run, cross-validation or checkpoint(s) (see the module docstring).

    Args:
        ckpt_path: what ``medseg.predict ckpt_path=`` accepts (run folder, cross-validation folder, ``.ckpt``, a list).
        output: the ``.zip`` to write (atomically; refused if it exists, unless ``overwrite``).
        name: the model's name (default: the run or cross-validation folder's name).
        include_onnx: also export each member's network to ``onnx/<k>.onnx`` (the ``onnx`` extra), with the same
            metadata as ``format=onnx`` (so that each file also predicts alone).
        case_reports: also ship the report files that name the cases (:data:`CASE_REPORT_FILES`: the split, the
            per-case evaluation table); off by default, since case ids of clinical data may identify patients.

    Returns:
        The manifest written.

    Raises:
        ConfigError: ``output`` is not a new ``.zip`` file, or ``ckpt_path`` names no medseg checkpoint.
    """
    from medseg.ensemble import resolve_checkpoints
    from medseg.model_card import model_card

    output = new_output(output, ".zip", overwrite)
    paths = resolve_checkpoints(ckpt_path)
    source = source_folder(ckpt_path, paths)
    name = name or default_name(source, paths)
    members = [portable_checkpoint(p, f"{k}.ckpt") for k, p in enumerate(paths)]
    config = members[0]["medseg_config"]
    point = members[0].get(CHECKPOINT_KEY)
    files: dict[str, bytes] = {}
    for k, member in enumerate(members):
        buffer = io.BytesIO()
        torch.save(member, buffer)
        files[f"{CHECKPOINT_DIR}/{k}.ckpt"] = buffer.getvalue()
    files["config.yaml"] = OmegaConf.to_yaml(OmegaConf.create(config)).encode()
    files["operating_point.json"] = json.dumps(point, indent=2).encode()
    files["labels.json"] = json.dumps(config["data"]["labels"], indent=2).encode()
    files["preprocessing.json"] = json.dumps({"modalities": config["data"].get("modalities"), "in_channels": config["data"].get("in_channels"), **preprocessing_options_from_config(config["data"])}, indent=2, default=list).encode()
    report = {}
    for relative in (*REPORT_FILES, *(CASE_REPORT_FILES if case_reports else ())) if source is not None else ():
        path = source / relative
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".json":
                report[relative] = without_machine_paths(json.loads(data))
                data = json.dumps(report[relative], indent=2).encode()
            files[f"{REPORT_DIR}/{relative}"] = data
    if include_onnx:
        for k, path in enumerate(paths):
            with tempfile.TemporaryDirectory() as tmp:
                files[f"{ONNX_DIR}/{k}.onnx"] = write_onnx(path, Path(tmp) / "net.onnx", name=f"{name} (fold {k})" if len(paths) > 1 else name).read_bytes()
    manifest = {
        "format": FORMAT_VERSION, "name": name, "medseg_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "members": [f"{CHECKPOINT_DIR}/{k}.ckpt" for k in range(len(members))], "onnx": [f"{ONNX_DIR}/{k}.onnx" for k in range(len(members))] if include_onnx else [],
        "labels": config["data"]["labels"], "operating_point": point, "tta_flip_axes": (point or {}).get("tta_flip_axes", config["model"].get("tta_flip_axes")),
        "source": "cross-validation" if len(members) > 1 else "run", "files": {},
    }  # fmt: skip
    files[CARD] = model_card(manifest, config, report).encode()
    manifest["files"] = {path: hashlib.sha256(data).hexdigest() for path, data in sorted(files.items())}
    with atomic_path(output, keep_suffix=True) as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            archive.writestr(MANIFEST, json.dumps(manifest, indent=2), compress_type=zipfile.ZIP_DEFLATED)
            for path, data in files.items():  # checkpoints are zip files themselves: stored, not deflated again
                archive.writestr(path, data, compress_type=zipfile.ZIP_STORED if path.endswith((".ckpt", ".png")) else zipfile.ZIP_DEFLATED)
    return manifest


def write_onnx(ckpt_path: Any, output: str | os.PathLike, fold: int | None = None, name: str | None = None, overwrite: bool = False) -> Path:
    """The network of one checkpoint as an ONNX file (:func:`medseg.onnx_backend.export_network`), its config (machine
    paths removed) and operating point as metadata, so that the file alone predicts (``backend=onnxruntime``).

    Args:
        ckpt_path: what ``medseg.predict ckpt_path=`` accepts; several checkpoints need ``fold``.
        output: the ``.onnx`` file (refused if it exists, unless ``overwrite``).
        fold: which of several checkpoints (0-based).
        name: the model's name in the metadata (default: :func:`default_name`).

    Raises:
        ConfigError: ``output`` is not a new ``.onnx`` file, or several checkpoints without a valid ``fold``.
    """
    from medseg.ensemble import resolve_checkpoints
    from medseg.onnx_backend import export_network
    from medseg.prediction import load_model

    output = new_output(output, ".onnx", overwrite)
    paths = resolve_checkpoints(ckpt_path)
    if fold is None and len(paths) > 1:
        raise ConfigError(f"ckpt_path names {len(paths)} checkpoints (a cross-validation); ONNX holds one network: pass fold=<0..{len(paths) - 1}>, or format=zip include_onnx=true for all")
    if fold is not None and not 0 <= int(fold) < len(paths):
        raise ConfigError(f"expected fold in 0..{len(paths) - 1}, got {fold}")
    path = paths[int(fold or 0)]
    model, cfg = load_model(path)
    metadata = {
        "medseg_version": __version__, "model": name or default_name(source_folder(ckpt_path, paths), [path]), CHECKPOINT_KEY: json.dumps(model.postprocessing.to_dict()),
        "medseg_config": json.dumps(without_machine_paths(OmegaConf.to_container(cfg, resolve=True))),
    }  # fmt: skip
    return export_network(model.net, int(cfg.data.in_channels), output, list(model.inferer["roi_size"]), metadata=metadata)


def new_output(output: str | os.PathLike, suffix: str, overwrite: bool) -> Path:
    """``output`` as a path, refused (:class:`ConfigError`) without ``suffix`` or, unless ``overwrite``, when it exists."""
    path = Path(output).expanduser()
    if path.suffix != suffix:
        raise ConfigError(f"expected output=<name>{suffix}, got {str(path)!r}")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; choose another name or pass overwrite=true")
    return path


def source_folder(ckpt_path: Any, paths: Sequence[Path]) -> Path | None:
    """The run or cross-validation folder ``ckpt_path`` names (its reports), or ``None`` for bare checkpoint files."""
    if isinstance(ckpt_path, (str, os.PathLike)) and Path(ckpt_path).expanduser().is_dir():
        return Path(ckpt_path).expanduser().resolve()
    if len(paths) == 1 and paths[0].parent.name == "checkpoints":
        return paths[0].parent.parent.resolve()
    return None


def default_name(source: Path | None, paths: Sequence[Path]) -> str:
    """A model's name when none is given: ``<task>_<run>`` for a folder of ``outputs/<task>/{runs,crossval}/``, else the
    folder's or the checkpoint file's name."""
    if source is None:
        return paths[0].stem
    return f"{source.parent.parent.name}_{source.name}" if source.parent.name in ("runs", "crossval", "multiruns") else source.name


def model_cache_dir() -> Path:
    """Where zips are unpacked: ``$MEDSEG_CACHE/models``, else ``~/.cache/medseg/models``."""
    base = os.environ.get("MEDSEG_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "medseg") / "models"


def installed_folder(archive: str | os.PathLike) -> Path:
    """The folder a model zip is unpacked into (once, named by the zip's SHA-256, checked against its manifest), and
    unpacks it if needed (again when a member went missing from it).

    Raises:
        ConfigError: not a medseg model zip, a file differs from the manifest's checksum, or the cache is not writable.
    """
    archive = Path(archive).expanduser().resolve()
    stat = archive.stat()
    return _installed_folder(archive, stat.st_size, stat.st_mtime_ns, str(model_cache_dir()))


@functools.lru_cache(maxsize=8)
def _installed_folder(archive: Path, size: int, mtime_ns: int, cache: str) -> Path:
    """:func:`installed_folder`, once per zip file version (path, size, modification time) and cache: a prediction
    resolves its checkpoints several times, and a zip of several folds is worth hashing once."""
    digest = sha256_file(archive)
    folder = Path(cache) / digest[:16]
    if _complete(folder):
        return folder
    try:
        _unpack(archive, folder)
    except OSError as err:
        raise ConfigError(f"cannot unpack {archive} into {folder} ({type(err).__name__}: {err}); set MEDSEG_CACHE to a writable folder") from err
    return folder


def _complete(folder: Path) -> bool:
    """An unpacked zip with its manifest and every member it lists."""
    if not (folder / MANIFEST).is_file():
        return False
    manifest = json.loads((folder / MANIFEST).read_text())
    return all((folder / p).is_file() for p in [*manifest.get("members", []), *manifest.get("onnx", [])])


def _unpack(archive: Path, folder: Path) -> None:
    """Unpack ``archive`` into ``folder`` through a staging folder beside it, every file checked against the manifest."""
    if folder.exists():  # incomplete (a member removed by a cache cleaner): unpacked again
        shutil.rmtree(folder, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            if MANIFEST not in zf.namelist():
                raise ConfigError(f"{archive}: no {MANIFEST}; expected a model zip written by python -m medseg.export")
            manifest = json.loads(zf.read(MANIFEST))
            unsafe = [n for n in [*zf.namelist(), *manifest.get("members", []), *manifest.get("onnx", [])] if n.startswith(("/", "\\")) or ".." in Path(n).parts]
            if unsafe:
                raise ConfigError(f"{archive}: unsafe member paths {unsafe[:3]}")
            unlisted = [n for n in [*manifest.get("members", []), *manifest.get("onnx", [])] if n not in manifest.get("files", {})]
            if unlisted:
                raise ConfigError(f"{archive}: members without a checksum in {MANIFEST}: {unlisted[:3]}")
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            try:
                zf.extractall(staging)
                bad = [p for p, h in manifest.get("files", {}).items() if not (staging / p).is_file() or sha256_file(staging / p) != h]
                if bad:
                    raise ConfigError(f"{archive}: {len(bad)} file(s) differ from the manifest's checksums ({', '.join(bad[:3])}); the zip is damaged")
                try:
                    os.replace(staging, folder)  # another process may have installed it meanwhile: then keep its copy
                except OSError:
                    if not _complete(folder):
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except zipfile.BadZipFile as err:
        raise ConfigError(f"{archive}: not a zip file ({err})") from err


def installed_checkpoints(archive: str | os.PathLike) -> list[Path]:
    """The checkpoints of a model zip, unpacked (:func:`installed_folder`), in the manifest's order."""
    folder = installed_folder(archive)
    manifest = json.loads((folder / MANIFEST).read_text())
    if int(manifest.get("format", 0)) > FORMAT_VERSION:
        raise ConfigError(f"{archive}: model zip format {manifest.get('format')} is newer than this medseg reads ({FORMAT_VERSION}); update medseg")
    return [folder / m for m in manifest["members"]]


def installed_onnx(checkpoint: Path) -> Path | None:
    """The ONNX network exported beside an unpacked zip's checkpoint (``onnx/<k>.onnx``), if the zip has one."""
    candidate = checkpoint.parent.parent / ONNX_DIR / f"{checkpoint.stem}.onnx"
    return candidate if checkpoint.parent.name == CHECKPOINT_DIR and (checkpoint.parent.parent / MANIFEST).is_file() and candidate.is_file() else None
