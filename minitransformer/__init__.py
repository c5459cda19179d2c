"""minitransformer: the Transformer of "Attention Is All You Need" (Vaswani et al., 2017),
from scratch on NumPy, unchanged on the GPU through CuPy, with a hand-written backward per op.

    import minitransformer as mt
    from minitransformer import functional as F
"""
from . import backend, functional, nn, optim
from .backend import (cuda_is_available, get_default_dtype, manual_seed, set_default_dtype)
from .gradcheck import GradcheckError, gradcheck
from .tensor import Tensor, is_grad_enabled, no_grad, tensor

__version__ = "0.1.0"

__all__ = ["Tensor", "tensor", "no_grad", "is_grad_enabled", "functional", "nn", "optim", "backend",
           "cuda_is_available", "manual_seed", "set_default_dtype", "get_default_dtype",
           "gradcheck", "GradcheckError"]
