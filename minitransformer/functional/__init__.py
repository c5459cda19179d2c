"""Every op as a forward/backward pair, imported as ``F`` (``from minitransformer import functional as F``).

One family per file; each op's docstring states its backward formula, derived in docs/backward.md.
"""
from .attention import scaled_dot_product_attention
from .dropout import dropout
from .elementwise import add, astype, div, exp, log, mul, neg, pow, relu, sqrt, sub, tanh
from .embedding import embedding
from .linear import linear, linear_heads, linear_relu, matmul
from .loss import cross_entropy
from .normalization import add_and_norm, layer_norm
from .reduction import mean, sum
from .shape import concat, contiguous, getitem, masked_fill, reshape, split, transpose
from .softmax import log_softmax, softmax

__all__ = ["add", "add_and_norm", "astype", "concat", "contiguous", "cross_entropy", "div", "dropout", "embedding", "exp",
           "getitem", "layer_norm", "linear", "linear_heads", "linear_relu", "log", "log_softmax", "masked_fill", "matmul", "mean",
           "mul", "neg", "pow", "relu", "reshape", "scaled_dot_product_attention", "softmax", "split",
           "sqrt", "sub", "sum", "tanh", "transpose"]
