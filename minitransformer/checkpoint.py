"""Checkpoints: one ``.npz`` of plain arrays plus a JSON description, nothing pickled.

Every write goes to a temporary file in the same folder and is renamed over the old file
(``os.replace`` is atomic), so a crash mid-save leaves the previous checkpoint whole. Arrays
are saved from the host, so a checkpoint written on the GPU loads on the CPU and vice versa.
"""
import json
import os
import tempfile
import tokenize
import zipfile
from pathlib import Path

import numpy as np

_META = "__meta__"   # a 0-d unicode array holding JSON: loads without pickle
_NPY_MAGIC = b"\x93NUMPY"   # the first bytes of a .npy file; an .npz is a zip archive ("PK…")
# Configuration keys that change training but not the function the trained model computes: a model
# may load a checkpoint whose value differs (e.g. evaluated with another dropout).
TRAINING_ONLY_CONFIG = ("dropout", "label_smoothing")


def atomic_write(path, write):
    """Call ``write(file_object)`` on a temporary file, then rename it to ``path``: a crash (or a
    full disk) leaves the previous file, never half of one. Every file the project writes (checkpoints,
    JSON, tokenizers, plots, the corpus) goes through here. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes the file private (0600); a run is shared as open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")))


def save_checkpoint(path, model, optimizer=None, schedule=None, meta=None):
    """Write ``model`` (and the optimiser/schedule state, for an exact resume) to ``path`` (.npz).

    ``meta`` is any JSON-able dict (step, epoch, random-generator state, …); NumPy scalars and 0-d
    arrays in it are stored as Python numbers. It comes back from ``load_checkpoint``. Keys:
    ``model.<param name>``, ``optimizer.<buffer>.<i>``. Anything that cannot be stored raises
    before a byte is written.
    """
    info = {"meta": _jsonable(meta or {}, "meta"), "config": _jsonable(_config(model), "config")}
    arrays = {f"model.{name}": array for name, array in model.state_dict().items()}
    if optimizer is not None:
        state = optimizer.state_dict()
        info["optimizer"] = _jsonable({"type": type(optimizer).__name__, "step_count": state.pop("step_count"),
                                       "lr": state.pop("lr")}, "optimizer")
        arrays.update({f"optimizer.{k}": v for k, v in state.items()})
    if schedule is not None:
        info["schedule"] = _jsonable(schedule.state_dict(), "schedule")
    arrays[_META] = np.array(json.dumps(info))
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return Path(path)


def _jsonable(value, where):
    """``value`` with NumPy scalars and 0-d arrays turned into Python numbers (recursively), ready for
    ``json.dumps``; anything else JSON cannot hold is a ``TypeError`` naming where it is."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.generic) or (isinstance(value, np.ndarray) and value.ndim == 0):
        return _jsonable(value.item(), where)         # np.int64(3) -> 3, np.array(0.5) -> 0.5
    if isinstance(value, dict):
        out = {}
        for key, v in value.items():
            key = key.item() if isinstance(key, np.generic) else key
            if not (key is None or isinstance(key, (str, bool, int, float))):
                raise TypeError(f"save_checkpoint: {where} has the key {key!r} of type {type(key).__name__}: "
                                f"JSON keys are strings (or numbers, stored as strings)")
            out[key] = _jsonable(v, f"{where}[{key!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"save_checkpoint: {where} is of type {type(value).__name__}, which JSON cannot store "
                    f"(use numbers, strings, booleans, None, lists and dicts; an array: .tolist())")


def _config(model):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config if isinstance(config, dict) else dict(vars(config))


def read_checkpoint(path):
    """``(arrays, info)`` from a checkpoint file, loaded with ``allow_pickle=False``."""
    return _read(path, arrays=True)


def checkpoint_info(path):
    """A checkpoint's ``info`` (``meta``, ``config``, …) without loading its arrays."""
    return _read(path, arrays=False)[1]


def _read(path, arrays):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        start = f.read(len(_NPY_MAGIC))
    if start.startswith(_NPY_MAGIC):     # np.load would hand back one array, not an archive
        raise ValueError(f"{path} is not a minitransformer checkpoint (an .npy array, not an .npz archive)")
    if start and not start.startswith(b"PK"):
        raise ValueError(f"{path} is not a minitransformer checkpoint (not an .npz archive: "
                         f"it starts with {start[:8]!r})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            info = str(npz[_META]) if _META in npz.files else None
            loaded = {k: npz[k] for k in npz.files if k != _META} if arrays else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, SyntaxError, tokenize.TokenError) as e:
        # truncated, corrupt or not an npz (a damaged array header fails in NumPy's header parser)
        raise ValueError(f"checkpoint {path} cannot be read ({e})") from None
    if info is None:
        raise ValueError(f"checkpoint {path} is not a minitransformer checkpoint (no {_META})")
    try:
        return loaded, json.loads(info)
    except ValueError as e:  # json.JSONDecodeError
        raise ValueError(f"checkpoint {path} has an unreadable {_META} ({e})") from None


def load_checkpoint(path, model, optimizer=None, schedule=None, strict=True):
    """Load ``path`` into ``model`` (and optimiser/schedule when given); returns its ``meta``.

    Before anything is copied: the parameter names (with ``strict``) and shapes are checked, then
    (with ``strict``) the stored configuration against ``model.config`` — a model with other heads,
    ``pad_id``, ``max_len``, … computes another function from the same arrays; only
    ``TRAINING_ONLY_CONFIG`` keys such as ``dropout`` may differ — and the optimiser's type.
    ``strict=False`` loads the parameters two different models share.
    """
    arrays, info = read_checkpoint(path)
    state = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    differ = _config_differences(info.get("config"), _config(model)) if strict else ""
    try:
        model.check_state_dict(state, strict=strict)
    except (KeyError, ValueError) as e:
        if differ:   # say why the parameters do not fit
            raise type(e)(f"{e.args[0]} (the checkpoint's configuration differs: {differ})") from None
        raise
    if differ:       # the same parameters, another function
        raise ValueError(f"checkpoint {path} was saved from a model with another configuration: {differ}; "
                         f"rebuild the model with Transformer.from_config(checkpoint_config(path))")
    if optimizer is not None:
        if "optimizer" not in info:
            raise ValueError(f"checkpoint {path} holds no optimizer state")
        stored = info["optimizer"].get("type")
        if stored is not None and stored != type(optimizer).__name__:
            raise ValueError(f"checkpoint {path} holds the state of an optimizer of type {stored}, "
                             f"but the optimizer given is a {type(optimizer).__name__}")
    if schedule is not None and "schedule" in info:
        check = getattr(schedule, "check_state_dict", None)   # a schedule of another kind may lack it
        if check is not None:
            check(info["schedule"])                           # before the optimiser changes
    # the optimiser checks its buffers' shapes itself (strict=False can pass a model whose parameters
    # differ from the stored ones), so it loads before the model's arrays are copied
    if optimizer is not None:
        optimizer_state = {k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")}
        optimizer_state.update(step_count=info["optimizer"]["step_count"], lr=info["optimizer"]["lr"])
        optimizer.load_state_dict(optimizer_state)
    if schedule is not None and "schedule" in info:
        schedule.load_state_dict(info["schedule"])
    model.load_state_dict(state, strict=strict)
    return info["meta"]


def _config_differences(stored, current):
    """Every key, outside ``TRAINING_ONLY_CONFIG``, whose value differs between the checkpoint's
    config and the model's, as ``"num_heads: 4 in the checkpoint, 2 in the model; …"`` ("" when none).
    A plain Module or a checkpoint without a config has nothing to compare; a key only one side has
    (from an older version) is skipped."""
    if not isinstance(stored, dict) or not current:
        return ""
    current = json.loads(json.dumps(_jsonable(current, "config")))   # as stored: tuples as lists, …
    return "; ".join(f"{key}: {stored[key]!r} in the checkpoint, {current[key]!r} in the model"
                     for key in stored if key in current and key not in TRAINING_ONLY_CONFIG
                     and stored[key] != current[key])


def checkpoint_config(path):
    """The model configuration stored in a checkpoint (to rebuild the model before loading)."""
    return checkpoint_info(path)["config"]


def average_checkpoints(paths):
    """§6.1: the element-wise mean of the model parameters of several checkpoints, as a state
    dict for ``model.load_state_dict`` (accumulated in float64)."""
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError(f"average_checkpoints takes a list of checkpoint paths, got the single path {paths!r}")
    paths = list(paths)
    if not paths:
        raise ValueError("average_checkpoints: no checkpoint paths given")
    total = None
    for path in paths:
        arrays, _ = read_checkpoint(path)
        params = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
        if total is None:
            total = {k: v.astype(np.float64) for k, v in params.items()}
            dtypes = {k: v.dtype for k, v in params.items()}
        else:
            if params.keys() != total.keys():
                raise ValueError(f"average_checkpoints: {path} has different parameters than {paths[0]}")
            for k, v in params.items():
                if v.shape != total[k].shape:
                    raise ValueError(f"average_checkpoints: {k} has shape {v.shape} in {path}, "
                                     f"{total[k].shape} in {paths[0]}")
                total[k] += v
    return {k: (v / len(paths)).astype(dtypes[k]) for k, v in total.items()}
