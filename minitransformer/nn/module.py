"""``Module`` and ``Parameter``: named, nested containers of trainable tensors.

A module registers every ``Parameter`` and sub-``Module`` assigned to it as an attribute, so
``named_parameters()`` yields names like ``encoder.layers.0.self_attn.q_proj.weight``: the
keys of ``state_dict()`` and of checkpoints.
"""
import os
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from .. import backend
from ..tensor import Tensor


class Parameter(Tensor):
    """A tensor that is trained: a leaf with ``requires_grad=True``.

    ``packed`` is ``(buffer, start)`` when ``pack`` put its array in a buffer shared with others."""

    def __init__(self, data, requires_grad=True):
        super().__init__(data, requires_grad=requires_grad)
        self.packed = None


class Module:
    _keep_activations = False      # see keep_activations(); an instance attribute only once asked

    def __init__(self):
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "training", True)

    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        for registry in (self._parameters, self._modules, self._buffers):
            registry.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name, array):
        """A constant array that moves with the module (e.g. the sinusoid table), not trained."""
        self._buffers[name] = True
        object.__setattr__(self, name, array)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} must define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- walking the tree --------------------------------------------------------------
    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self):
        return [m for _, m in self.named_modules()]

    def named_parameters(self, prefix=""):
        seen = set()
        for module_name, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                if id(p) not in seen:  # a tied parameter is listed once, under its first name
                    seen.add(id(p))
                    yield (f"{module_name}.{name}" if module_name else name), p

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ---- modes and devices -------------------------------------------------------------
    def train(self, mode=True):
        """Training mode: dropout on. Returns self."""
        object.__setattr__(self, "training", mode)
        for child in self._modules.values():   # not named_modules(): no names to build, every step
            child.train(mode)
        return self

    def eval(self):
        """Evaluation mode: dropout off. Returns self."""
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # ---- looking inside ----------------------------------------------------------------
    def keep_activations(self, mode=True):
        """Keep the intermediate tensors of every following forward pass, for reading: each layer
        that records them (the encoder and decoder layers, the Transformer's embeddings and logits)
        puts them in its ``activations`` dict, named after the boxes of Figure 1, and after
        ``backward()`` each holds its gradient (``retain_grad``). They keep the arrays of the last
        forward alive, so it is for looking, not for training runs. ``False`` forgets them.
        Returns self."""
        for module in self.modules():
            object.__setattr__(module, "_keep_activations", mode)
            object.__setattr__(module, "activations", {})
        return self

    def _record(self, **tensors):
        """With ``keep_activations`` on, keep these tensors (and their gradients) in ``activations``."""
        if self._keep_activations:
            self.activations.update((name, t.retain_grad()) for name, t in tensors.items())

    def to(self, device):
        """Move every parameter and buffer to ``device`` in place (tied parameters stay tied, and
        parameters packed side by side in one buffer by ``pack`` stay packed)."""
        device = backend.check_device(device)
        moved = {}   # id(buffer) -> the buffer on ``device``: a packed buffer moves once, whole
        for p in self.parameters():
            if p.packed is not None and p.data.base is p.packed[0]:
                buffer, start = p.packed
                if id(buffer) not in moved:
                    moved[id(buffer)] = backend.to_device(buffer, device)
                p.packed = (moved[id(buffer)], start)
                p.data = p.packed[0][start:start + p.size].reshape(p.shape)
            else:
                p.data, p.packed = backend.to_device(p.data, device), None
            if p.grad is not None:
                p.grad = backend.to_device(p.grad, device)
        for m in self.modules():
            for name in m._buffers:
                object.__setattr__(m, name, backend.to_device(getattr(m, name), device))
        return self

    @property
    def device(self):
        for _, p in self.named_parameters():    # the first parameter is enough (asked per forward)
            return p.device
        return "cpu"

    # ---- state -------------------------------------------------------------------------
    def state_dict(self):
        """``{name: host NumPy array}`` of every parameter (copies, device-neutral)."""
        return OrderedDict((name, backend.to_numpy(p.data).copy()) for name, p in self.named_parameters())

    def load_state_dict(self, state, strict=True):
        """Copy arrays into the parameters, checking names and shapes (``check_state_dict``) first.

        With ``strict`` a missing or unexpected key is an error; a wrong shape always is. Nothing is
        copied unless every check passes. The values are copied *into* the parameters' arrays:
        packed parameters stay packed, and a CUDA graph that reads the weights where they are sees
        the loaded ones. Returns ``(missing, unexpected)`` key lists.
        """
        missing, unexpected = self.check_state_dict(state, strict)
        for name, p in self.named_parameters():
            if name in state:
                value = np.asarray(backend.to_numpy(state[name]))
                p.data[...] = backend.to_device(value.astype(p.dtype, copy=False), p.device)
        return missing, unexpected

    def check_state_dict(self, state, strict=True):
        """What ``load_state_dict`` checks, without copying anything: ``state`` is a dict of arrays,
        its names match the parameters' (with ``strict``) and every shared name has the parameter's
        shape. Returns ``(missing, unexpected)``; raises ``TypeError``, ``KeyError`` or ``ValueError``."""
        if isinstance(state, (str, bytes, os.PathLike)):
            raise TypeError(f"load_state_dict takes a dict of arrays {{name: array}}, got the path {state!r}; "
                            f"to load a file use checkpoint.load_checkpoint(path, model)")
        if not isinstance(state, Mapping):
            raise TypeError(f"load_state_dict takes a dict of arrays {{name: array}}, got {type(state).__name__}")
        params = dict(self.named_parameters())
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if strict and (missing or unexpected):
            raise KeyError(f"load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, p in params.items():
            if name in state:
                shape = tuple(np.shape(state[name]))
                if shape != p.shape:
                    raise ValueError(f"load_state_dict: {name} has shape {shape} in the state dict, "
                                     f"expected {p.shape}")
        return missing, unexpected

    def __repr__(self):
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + (")" if len(lines) == 1 else "\n)")

    def extra_repr(self):
        return ""


def pack(params):
    """Put the arrays of ``params`` (one dtype, one device) one after another in one new buffer,
    values unchanged, each parameter's ``.data`` becoming a view of it. ``F.concat`` of packed
    parameters along axis 0 is then a view, not a copy: how multi-head attention computes Q, K and
    V with one product while W^Q, W^K, W^V stay three parameters with their own names and grads."""
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device for p in params):
        raise ValueError(f"pack: parameters must share dtype and device, got "
                         f"{[(str(p.dtype), p.device) for p in params]}")
    buffer = first.xp.empty(sum(p.size for p in params), dtype=first.dtype)
    start = 0
    for p in params:
        view = buffer[start:start + p.size].reshape(p.shape)
        view[...] = p.data
        p.data, p.packed = view, (buffer, start)
        start += p.size


class ModuleList(Module):
    """A list of modules, registered as ``0``, ``1``, … (the ``N`` identical layers of §3.1)."""

    def __init__(self, modules=()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module):
        setattr(self, str(len(self._modules)), module)

    def __getitem__(self, i):
        return list(self._modules.values())[i]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self):
        return len(self._modules)
