"""Checkpoints: one ``.npz`` of plain arrays plus a JSON description, nothing pickled.

Every write goes to a temporary file in the same folder and is renamed over the old file
(``os.replace`` is atomic), so a crash mid-save leaves the previous checkpoint whole. Arrays
are saved from the host, so a checkpoint written on the GPU loads on the CPU and vice versa.
"""
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

_META = "__meta__"   # a 0-d unicode array holding JSON: loads without pickle


def atomic_write(path, write):
    """Call ``write(file_object)`` on a temporary file, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path, obj):
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False).encode("utf-8")))


def save_checkpoint(path, model, optimizer=None, schedule=None, meta=None):
    """Write ``model`` (and the optimiser/schedule state, for an exact resume) to ``path`` (.npz).

    ``meta`` is any JSON-able dict (step, epoch, random-generator state, …); it comes back from
    ``load_checkpoint``. Keys: ``model.<param name>``, ``optimizer.<buffer>.<i>``.
    """
    arrays = {f"model.{name}": array for name, array in model.state_dict().items()}
    info = {"meta": meta or {}, "config": _config(model)}
    if optimizer is not None:
        state = optimizer.state_dict()
        info["optimizer"] = {"type": type(optimizer).__name__, "step_count": state.pop("step_count"),
                             "lr": state.pop("lr")}
        arrays.update({f"optimizer.{k}": v for k, v in state.items()})
    if schedule is not None:
        info["schedule"] = schedule.state_dict()
    arrays[_META] = np.array(json.dumps(info))
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return Path(path)


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
    try:
        with np.load(path, allow_pickle=False) as npz:
            info = str(npz[_META]) if _META in npz.files else None
            loaded = {k: npz[k] for k in npz.files if k != _META} if arrays else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # truncated, corrupt or not an npz
        raise ValueError(f"checkpoint {path} cannot be read ({e})") from None
    if info is None:
        raise ValueError(f"checkpoint {path} is not a minitransformer checkpoint (no {_META})")
    try:
        return loaded, json.loads(info)
    except ValueError as e:  # json.JSONDecodeError
        raise ValueError(f"checkpoint {path} has an unreadable {_META} ({e})") from None


def load_checkpoint(path, model, optimizer=None, schedule=None, strict=True):
    """Load ``path`` into ``model`` (and optimiser/schedule when given); returns its ``meta``."""
    arrays, info = read_checkpoint(path)
    model.load_state_dict({k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")},
                          strict=strict)
    if optimizer is not None:
        if "optimizer" not in info:
            raise ValueError(f"checkpoint {path} holds no optimizer state")
        state = {k[len("optimizer."):]: v for k, v in arrays.items() if k.startswith("optimizer.")}
        state.update(step_count=info["optimizer"]["step_count"], lr=info["optimizer"]["lr"])
        optimizer.load_state_dict(state)
    if schedule is not None and "schedule" in info:
        schedule.load_state_dict(info["schedule"])
    return info["meta"]


def checkpoint_config(path):
    """The model configuration stored in a checkpoint (to rebuild the model before loading)."""
    return checkpoint_info(path)["config"]


def average_checkpoints(paths):
    """§6.1: the element-wise mean of the model parameters of several checkpoints, as a state
    dict for ``model.load_state_dict`` (accumulated in float64)."""
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
