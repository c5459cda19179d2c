"""Every op in ``minitransformer.functional``: a float64 gradcheck and a PyTorch parity test
(forward and every input gradient, float64 and float32), on random shapes; then the errors
each op raises for bad input.

A case is ``make(rng) -> (arrays, ours, theirs)``: the float arrays become inputs that require
grad, the integer/boolean ones constants (ids, targets, masks); ``ours`` takes mt tensors and
``theirs`` the matching torch tensors, in the same order.
"""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import minitransformer as mt
from minitransformer import backend
from minitransformer import functional as F

TOL = {"float64": dict(rtol=1e-6, atol=1e-6), "float32": dict(rtol=1e-5, atol=1e-6)}
TORCH_DTYPE = {"float64": torch.float64, "float32": torch.float32}

CASES = []          # pytest.param(op, make, id=...)
COVERED = set()     # op names with at least one case


def case(op, name):
    """Register ``make`` as a gradcheck + parity case of ``F.<op>``."""
    def register(make):
        CASES.append(pytest.param(op, make, id=f"{op}-{name}"))
        COVERED.add(op)
        return make
    return register


def normal(rng, *shape):
    return rng.standard_normal(shape)


def nonzero(rng, *shape, gap=0.2):
    """Normal values pushed at least ``gap`` away from 0 (divisors, ReLU's kink)."""
    x = rng.standard_normal(shape)
    return np.where(x >= 0, 1.0, -1.0) * (np.abs(x) + gap)


def positive(rng, *shape):
    return rng.uniform(0.5, 2.0, size=shape)


# ---- element-wise -------------------------------------------------------------------------

BINARY = [("add", F.add, torch.add), ("sub", F.sub, torch.sub),
          ("mul", F.mul, torch.mul), ("div", F.div, torch.div)]
BINARY_SHAPES = [((3, 4), (3, 4)), ((3, 1, 4), (5, 4)), ((5, 4), (3, 1, 4)), ((1,), (2, 3)),
                 ((2, 3), (1,)), ((), (2, 3)), ((4, 1), (1, 5)), ((2, 1, 3), (2, 4, 1))]

for _op, _ours, _theirs in BINARY:
    for _sa, _sb in BINARY_SHAPES:
        def _make(rng, sa=_sa, sb=_sb, op=_op, ours=_ours, theirs=_theirs):
            b = nonzero(rng, *sb) if op == "div" else normal(rng, *sb)
            return [normal(rng, *sa), b], ours, theirs
        case(_op, f"{_sa}-{_sb}")(_make)

UNARY = [("exp", F.exp, torch.exp, normal), ("log", F.log, torch.log, positive),
         ("sqrt", F.sqrt, torch.sqrt, positive), ("tanh", F.tanh, torch.tanh, normal),
         ("relu", F.relu, torch.relu, nonzero), ("neg", F.neg, torch.neg, normal)]
for _op, _ours, _theirs, _draw in UNARY:
    for _shape in [(7,), (3, 4), (2, 3, 2)]:
        def _make(rng, shape=_shape, ours=_ours, theirs=_theirs, draw=_draw):
            return [draw(rng, *shape)], ours, theirs
        case(_op, f"{_shape}")(_make)

def with_zeros(rng, *shape):
    """Normal values with some exact zeros (where x**0's derivative 0·x**-1 must not be nan)."""
    x = rng.standard_normal(shape)
    x.reshape(-1)[::3] = 0.0
    return x


for _p, _draw in [(2, normal), (3, normal), (0.5, positive), (-1.5, positive), (1, normal), (0, with_zeros)]:
    @case("pow", f"p={_p}")
    def _make(rng, p=_p, draw=_draw):
        return [draw(rng, 3, 4)], (lambda x: F.pow(x, p)), (lambda x: torch.pow(x, p))


@case("astype", "to-float64")
def _make(rng):
    return [normal(rng, 3, 4)], (lambda x: F.astype(x, np.float64) * 2.0), \
        (lambda x: x.to(torch.float64) * 2.0)


# ---- products -----------------------------------------------------------------------------

for _sa, _sb in [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((3, 4), (2, 4, 3)),
                 ((4,), (4, 3)), ((3, 4), (4,)), ((4,), (2, 4, 3)), ((5,), (5,))]:
    @case("matmul", f"{_sa}@{_sb}")
    def _make(rng, sa=_sa, sb=_sb):
        return [normal(rng, *sa), normal(rng, *sb)], F.matmul, torch.matmul

for _xs, _out, _bias in [((5, 4), 3, True), ((2, 3, 4), 5, False), ((2, 2, 3, 4), 2, True), ((4,), 3, True)]:
    @case("linear", f"x{_xs}-out{_out}-{'bias' if _bias else 'nobias'}")
    def _make(rng, xs=_xs, out=_out, bias=_bias):
        arrays = [normal(rng, *xs), normal(rng, out, xs[-1])] + ([normal(rng, out)] if bias else [])
        return arrays, F.linear, TF.linear


# ---- reductions, softmax, normalisation ---------------------------------------------------

for _op, _ours, _theirs in [("sum", F.sum, torch.sum), ("mean", F.mean, torch.mean)]:
    for _shape, _axis, _keep in [((3, 4), None, False), ((2, 3, 4), 1, False), ((2, 3, 4), -1, True),
                                 ((2, 3, 4), (0, 2), False), ((2, 3, 4), (0, 2), True), ((5,), 0, True)]:
        def _make(rng, shape=_shape, axis=_axis, keep=_keep, ours=_ours, theirs=_theirs):
            if axis is None:
                return [normal(rng, *shape)], (lambda x: ours(x)), (lambda x: theirs(x))
            return ([normal(rng, *shape)], (lambda x: ours(x, axis, keep)),
                    (lambda x: theirs(x, dim=axis, keepdim=keep)))
        case(_op, f"{_shape}-axis{_axis}-keep{_keep}")(_make)

for _op, _ours, _theirs in [("softmax", F.softmax, torch.softmax), ("log_softmax", F.log_softmax, torch.log_softmax)]:
    for _shape, _axis in [((6,), -1), ((3, 5), -1), ((3, 5), 0), ((2, 3, 4), 1), ((2, 2, 5), -1)]:
        def _make(rng, shape=_shape, axis=_axis, ours=_ours, theirs=_theirs):
            return [3 * normal(rng, *shape)], (lambda x: ours(x, axis)), (lambda x: theirs(x, dim=axis))
        case(_op, f"{_shape}-axis{_axis}")(_make)

for _shape, _w, _b, _eps in [((4, 6), True, True, 1e-5), ((2, 3, 5), True, True, 1e-6),
                             ((3, 4), True, False, 1e-5), ((3, 4), False, True, 1e-5),
                             ((2, 5), False, False, 1e-3), ((6,), True, True, 1e-5)]:
    @case("layer_norm", f"{_shape}-w{_w}-b{_b}-eps{_eps}")
    def _make(rng, shape=_shape, w=_w, b=_b, eps=_eps):
        d = shape[-1]
        x = normal(rng, *shape) * rng.uniform(0.5, 3.0) + rng.normal()
        arrays = [x] + ([1.0 + 0.3 * normal(rng, d)] if w else []) + ([normal(rng, d)] if b else [])

        def split_params(params):
            params = list(params)
            return (params.pop(0) if w else None), (params.pop(0) if b else None)

        def ours(x, *params):
            return F.layer_norm(x, *split_params(params), eps=eps)

        def theirs(x, *params):
            return TF.layer_norm(x, (d,), *split_params(params), eps=eps)
        return arrays, ours, theirs


for _shape, _w, _b in [((3, 4, 5), True, True), ((2, 7), True, False), ((6,), False, False)]:
    @case("add_and_norm", f"{_shape}-w{_w}-b{_b}")
    def _make(rng, shape=_shape, w=_w, b=_b):
        d = shape[-1]
        arrays = [normal(rng, *shape), normal(rng, *shape) * 2.0]
        arrays += ([1.0 + 0.3 * normal(rng, d)] if w else []) + ([normal(rng, d)] if b else [])

        def split_params(params):
            params = list(params)
            return (params.pop(0) if w else None), (params.pop(0) if b else None)

        def ours(x, s, *params):      # no dropout here: see test_add_and_norm_is_dropout_add_layer_norm
            return F.add_and_norm(x, s, *split_params(params))

        def theirs(x, s, *params):
            return TF.layer_norm(x + s, (d,), *split_params(params))
        return arrays, ours, theirs


# ---- lookups and the loss -----------------------------------------------------------------

for _ids_shape, _vocab, _d in [((3, 5), 4, 6), ((7,), 10, 3), ((2, 2, 3), 3, 2)]:
    @case("embedding", f"ids{_ids_shape}-vocab{_vocab}")
    def _make(rng, ids_shape=_ids_shape, vocab=_vocab, d=_d):
        ids = rng.integers(0, vocab, size=ids_shape)
        ids.reshape(-1)[:2] = vocab - 1             # at least one repeated id, and the last row
        return [ids, normal(rng, vocab, d)], (lambda i, w: F.embedding(i, w)), \
            (lambda i, w: TF.embedding(i, w))

for _n, _c, _ignore, _ls in [(6, 5, None, 0.0), (6, 5, 0, 0.0), (5, 4, -100, 0.0), (6, 5, None, 0.1),
                             (8, 5, 2, 0.3), (4, 3, -100, 0.2), (5, 4, 1, 1.0)]:
    @case("cross_entropy", f"N{_n}-C{_c}-ignore{_ignore}-ls{_ls}")
    def _make(rng, n=_n, c=_c, ignore=_ignore, ls=_ls):
        target = rng.integers(0, c, size=n)
        if ignore is not None:
            target[: n // 3 + 1] = ignore           # some rows are ignored, never all of them
            target[-1] = (ignore + 1) % c if ignore >= 0 else c - 1
            rng.shuffle(target)
        logits = 2 * normal(rng, n, c)

        def ours(x, t):
            return F.cross_entropy(x, t, ignore_index=ignore, label_smoothing=ls)

        def theirs(x, t):
            return TF.cross_entropy(x, t, ignore_index=-100 if ignore is None else ignore,
                                    label_smoothing=ls)
        return [logits, target], ours, theirs


# ---- shape ops ----------------------------------------------------------------------------

for _xs, _ms, _value in [((3, 4), (3, 4), 0.0), ((3, 4), (4,), -1e4), ((2, 3, 4), (3, 1), 2.5),
                         ((2, 3, 4), (2, 1, 4), -math.inf)]:
    @case("masked_fill", f"x{_xs}-mask{_ms}-value{_value}")
    def _make(rng, xs=_xs, ms=_ms, value=_value):
        mask = rng.random(ms) < 0.4
        if value == -math.inf:   # -inf then exp, as attention does: filled places give 0
            return ([normal(rng, *xs), mask], (lambda x, m: F.exp(F.masked_fill(x, m, value))),
                    (lambda x, m: torch.exp(torch.masked_fill(x, m, value))))
        return ([normal(rng, *xs), mask], (lambda x, m: F.masked_fill(x, m, value)),
                (lambda x, m: torch.masked_fill(x, m, value)))

for _shapes, _axis in [([(2, 3), (4, 3)], 0), ([(2, 3), (2, 1), (2, 4)], 1),
                       ([(2, 3, 2), (2, 3, 1)], -1), ([(3,), (2,), (1,)], 0)]:
    @case("concat", f"{_shapes}-axis{_axis}")
    def _make(rng, shapes=_shapes, axis=_axis):
        return ([normal(rng, *s) for s in shapes], (lambda *ts: F.concat(ts, axis)),
                (lambda *ts: torch.cat(ts, dim=axis)))

for _shape, _sizes, _axis in [((7, 3), 3, 0), ((7, 3), [2, 4, 1], 0), ((2, 6), 2, 1),
                              ((2, 6, 2), [1, 5], -2), ((4,), 4, 0)]:
    @case("split", f"{_shape}-{_sizes}-axis{_axis}")
    def _make(rng, shape=_shape, sizes=_sizes, axis=_axis):
        # weight each chunk differently, so a gradient sent to the wrong chunk shows
        def ours(x):
            return F.concat([c * float(i + 1) for i, c in enumerate(F.split(x, sizes, axis))], axis)

        def theirs(x):
            return torch.cat([c * float(i + 1) for i, c in enumerate(torch.split(x, sizes, dim=axis))], dim=axis)
        return [normal(rng, *shape)], ours, theirs

for _name, _index in [("slices", (slice(1, None), slice(None, None, 2))), ("int", 1), ("neg-int", -2),
                      ("int-slice", (2, slice(0, 3))), ("none-ellipsis", (Ellipsis, None, 0)),
                      ("ids-repeated", [0, 3, 0, 0, 2]), ("ids-axis1", (slice(None), [1, 1, 0])),
                      ("id-pairs", ([0, 0, 3, 1], [2, 2, 0, 2])),
                      # copies, not views, although no array is in them: NumPy's advanced indexing
                      ("bool-scalar", True), ("int-bool", (0, True)), ("range", range(1, 3)),
                      ("tuple-in-tuple", (slice(None), (2, 0))),
                      ("bool-mask", np.array([True, False, True, True])),
                      ("bool-mask-2d", (slice(None), np.array([[True, False], [False, True], [True, True]])))]:
    @case("getitem", _name)
    def _make(rng, index=_index):
        return [normal(rng, 4, 3, 2)], (lambda x: F.getitem(x, index)), (lambda x: x[torch_index(index)])


def torch_index(index):
    """The same index for a torch tensor: arrays as tensors, ranges and tuples inside as lists."""
    def one(i):
        if isinstance(i, np.ndarray):
            return torch.from_numpy(i)
        return list(i) if isinstance(i, (range, tuple)) else i
    return tuple(one(i) for i in index) if isinstance(index, tuple) else one(index)

for _shape, _axes in [((2, 3, 4), (1, 0, 2)), ((2, 3, 4, 5), (2, 0, 3, 1)), ((3, 4), (0, 1))]:
    @case("contiguous", f"{_shape}-{_axes}")
    def _make(rng, shape=_shape, axes=_axes):
        # a strided view made contiguous (a copy), then weighted so a misplaced gradient shows
        weights = rng.standard_normal(tuple(shape[a] for a in axes))
        return ([normal(rng, *shape)], (lambda x: F.contiguous(F.transpose(x, axes)) * mt.tensor(weights, dtype=x.dtype, device=x.device)),
                (lambda x: x.permute(axes).contiguous() * torch.tensor(weights, dtype=x.dtype)))

for _shape, _new in [((2, 3, 4), (6, 4)), ((2, 3, 4), (-1,)), ((12,), (3, 2, 2)), ((3, 4), (4, 1, 3))]:
    @case("reshape", f"{_shape}->{_new}")
    def _make(rng, shape=_shape, new=_new):
        return [normal(rng, *shape)], (lambda x: F.reshape(x, *new)), (lambda x: x.reshape(new))

for _shape, _axes in [((3, 4), ()), ((2, 3, 4), (1, 0, 2)), ((2, 3, 4), (2, 0, 1)), ((2, 3, 4, 2), (0, 2, 1, 3))]:
    @case("transpose", f"{_shape}-{_axes}")
    def _make(rng, shape=_shape, axes=_axes):
        full = axes or tuple(reversed(range(len(shape))))
        return [normal(rng, *shape)], (lambda x: F.transpose(x, *axes)), (lambda x: x.permute(*full))


# ---- attention (§3.2.1) -------------------------------------------------------------------

def causal(lq, lk):
    return np.tril(np.ones((lq, lk), dtype=bool))


def one_key_rows(rng, shape):
    """A mask where some rows allow exactly one key, the rest a random non-empty set."""
    mask = rng.random(shape) < 0.5
    only = rng.integers(0, shape[-1], size=shape[:-1])
    np.put_along_axis(mask, only[..., None], True, axis=-1)       # no row is empty
    single = rng.random(shape[:-1]) < 0.5
    single.reshape(-1)[0] = True                                   # at least one single-key row
    lone = np.zeros(shape, dtype=bool)
    np.put_along_axis(lone, only[..., None], True, axis=-1)
    return np.where(single[..., None], lone, mask)


def key_padding(rng, batch, lk, extra_axes):
    """(B, 1, …, Lk): True for real keys, False for padding; every sequence keeps one key."""
    lengths = rng.integers(1, lk + 1, size=batch)
    lengths[0] = 1
    mask = np.arange(lk)[None, :] < lengths[:, None]
    return mask.reshape((batch,) + (1,) * extra_axes + (lk,))


ATTENTION = [  # name, q shape, k shape, v shape, mask(rng) or None
    ("plain", (2, 3, 4), (2, 5, 4), (2, 5, 6), None),
    ("self-causal", (2, 4, 3), (2, 4, 3), (2, 4, 3), lambda rng: causal(4, 4)),
    ("heads-causal", (2, 2, 4, 3), (2, 2, 4, 3), (2, 2, 4, 2), lambda rng: causal(4, 4)),
    ("key-padding", (3, 2, 4), (3, 5, 4), (3, 5, 3), lambda rng: key_padding(rng, 3, 5, 1)),
    ("heads-key-padding", (2, 2, 3, 4), (2, 2, 5, 4), (2, 2, 5, 3), lambda rng: key_padding(rng, 2, 5, 2)),
    ("one-key-rows", (2, 4, 3), (2, 5, 3), (2, 5, 2), lambda rng: one_key_rows(rng, (2, 4, 5))),
    ("one-key-rows-heads", (1, 2, 3, 2), (1, 2, 4, 2), (1, 2, 4, 3), lambda rng: one_key_rows(rng, (1, 2, 3, 4))),
    ("2d", (3, 4), (5, 4), (5, 2), lambda rng: one_key_rows(rng, (3, 5))),
]


def torch_attention_weights(q, k, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return torch.softmax(scores, dim=-1)


for _name, _qs, _ks, _vs, _mask in ATTENTION:
    @case("scaled_dot_product_attention", _name)
    def _make(rng, qs=_qs, ks=_ks, vs=_vs, make_mask=_mask):
        arrays = [normal(rng, *qs), normal(rng, *ks), normal(rng, *vs)]
        if make_mask is None:
            return (arrays, (lambda q, k, v: F.scaled_dot_product_attention(q, k, v)[0]),
                    (lambda q, k, v: TF.scaled_dot_product_attention(q, k, v)))
        return (arrays + [make_mask(rng)],
                (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, mask=m)[0]),
                (lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m)))


@case("scaled_dot_product_attention", "broadcast-k-v")
def _make(rng):   # one set of keys/values shared by the batch: their gradient sums over it
    arrays = [normal(rng, 2, 3, 4), normal(rng, 5, 4), normal(rng, 5, 2), one_key_rows(rng, (3, 5))]
    return (arrays, (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, mask=m)[0]),
            (lambda q, k, v, m: torch_attention_weights(q, k, m) @ v))


for _name, _bias in {"bias": True, "no-bias": False}.items():
    @case("linear_relu", _name)
    def _make(rng, bias=_bias):   # as relu(linear(x, W, b))
        arrays = [normal(rng, 2, 5, 6), normal(rng, 7, 6)] + ([normal(rng, 7)] if bias else [])
        return arrays, (lambda x, w, *b: F.linear_relu(x, w, *b)), (lambda x, w, *b: TF.relu(TF.linear(x, w, *b)))


for _name, (_n, _h, _dk, _bias) in {"qkv": (3, 2, 3, True), "one-head-no-bias": (1, 1, 4, False),
                                    "kv": (2, 4, 2, True)}.items():
    @case("linear_heads", _name)
    def _make(rng, n=_n, h=_h, d_k=_dk, bias=_bias):   # as linear, reshape, transpose, contiguous
        arrays = [normal(rng, 2, 5, 6), normal(rng, n * h * d_k, 6)] + ([normal(rng, n * h * d_k)] if bias else [])

        def theirs(x, w, *b):
            return TF.linear(x, w, *b).reshape(2, 5, n, h, d_k).permute(2, 0, 3, 1, 4)
        return arrays, (lambda x, w, *b: F.linear_heads(x, w, b[0] if b else None, n, h)), theirs


@case("scaled_dot_product_attention", "concat-heads")
def _make(rng):   # Concat(head_1, …, head_h), (B, Lq, h·d_v), as multi-head attention takes it
    arrays = [normal(rng, 2, 3, 4, 5), normal(rng, 2, 3, 6, 5), normal(rng, 2, 3, 6, 2), key_padding(rng, 2, 6, 2)]
    return (arrays, (lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, mask=m, concat_heads=True)[0]),
            (lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m).transpose(1, 2).reshape(2, 4, 6)))


@case("scaled_dot_product_attention", "packed-q-k-v")
def _make(rng):   # q, k, v read out of one array, as MultiHeadAttention's one product does
    arrays = [normal(rng, 3, 2, 2, 4, 3), key_padding(rng, 2, 4, 2)]
    return (arrays, (lambda s, m: F.scaled_dot_product_attention(s[0], s[1], s[2], mask=m)[0]),
            (lambda s, m: TF.scaled_dot_product_attention(s[0], s[1], s[2], attn_mask=m)))


@case("scaled_dot_product_attention", "packed-k-v")
def _make(rng):   # cross-attention: k and v out of one array, q on its own
    arrays = [normal(rng, 2, 2, 3, 4), normal(rng, 2, 2, 2, 5, 4), key_padding(rng, 2, 5, 2)]
    return (arrays, (lambda q, s, m: F.scaled_dot_product_attention(q, s[0], s[1], mask=m)[0]),
            (lambda q, s, m: TF.scaled_dot_product_attention(q, s[0], s[1], attn_mask=m)))


@case("scaled_dot_product_attention", "packed-q-and-k-v")
def _make(rng):   # cross-attention as MultiHeadAttention lays it out: q out of a (1, …), k and v out of a (2, …)
    arrays = [normal(rng, 1, 2, 2, 3, 4), normal(rng, 2, 2, 2, 5, 4), key_padding(rng, 2, 5, 2)]
    return (arrays, (lambda sq, s, m: F.scaled_dot_product_attention(sq[0], s[0], s[1], mask=m)[0]),
            (lambda sq, s, m: TF.scaled_dot_product_attention(sq[0], s[0], s[1], attn_mask=m)))


# ---- the harness --------------------------------------------------------------------------

def build(make, rng, dtype, device):
    """(mt inputs, torch inputs, ours, theirs) for one case."""
    arrays, ours, theirs = make(rng)
    mine, ref = [], []
    for a in arrays:
        a = np.asarray(a)
        differentiable = a.dtype.kind == "f"
        mine.append(mt.tensor(a, dtype=dtype if differentiable else None, device=device,
                              requires_grad=differentiable))
        ref.append(torch.tensor(a, dtype=TORCH_DTYPE[dtype] if differentiable else None,
                                requires_grad=differentiable))
    return mine, ref, ours, theirs


def grad_of(t):
    return backend.to_numpy(t.grad)


def assert_close(ours, theirs, dtype, what):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    np.testing.assert_allclose(ours, theirs, err_msg=what, **TOL[dtype])


def test_every_op_has_a_case():
    assert COVERED | {"dropout"} == set(F.__all__), "ops with no gradcheck/parity case"


@pytest.mark.parametrize("op, make", CASES)
def test_gradcheck(op, make, device, rng):
    inputs, _, ours, _ = build(make, rng, "float64", device)
    assert mt.gradcheck(ours, *inputs)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("op, make", CASES)
def test_matches_torch(op, make, dtype, device, rng):
    mine, ref, ours, theirs = build(make, rng, dtype, device)
    out, expected = ours(*mine), theirs(*ref)
    assert out.device == device
    assert out.shape == tuple(expected.shape)
    if op != "astype":
        assert out.dtype == np.dtype(dtype), f"{op} turned {dtype} into {out.dtype}"
    assert_close(out.numpy(), expected, dtype, f"{op} forward")
    g = rng.standard_normal(out.shape)
    if not np.isfinite(out.numpy()).all():     # masked_fill(-inf) then exp: 0 there, keep g finite
        g = np.where(np.isfinite(out.numpy()), g, 0.0)
    out.backward(g)
    expected.backward(torch.tensor(g, dtype=expected.dtype))
    for i, (t, r) in enumerate(zip(mine, ref)):
        if not t.requires_grad:
            continue
        assert t.grad is not None, f"{op}: input {i} got no gradient"
        assert t.grad.dtype == t.dtype and t.grad.shape == t.shape
        assert backend.device_of(t.grad) == device
        assert_close(grad_of(t), r.grad, dtype, f"{op} gradient of input {i}")


# ---- attention weights, dropout inside attention, fully masked rows -----------------------

@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name, qs, ks, vs, make_mask", ATTENTION, ids=[a[0] for a in ATTENTION])
def test_attention_weights_match_torch_softmax(name, qs, ks, vs, make_mask, dtype, device, rng):
    q, k, v = normal(rng, *qs), normal(rng, *ks), normal(rng, *vs)
    mask = make_mask(rng) if make_mask else None
    mt_mask = None if mask is None else mt.tensor(mask, device=device)
    _, weights = F.scaled_dot_product_attention(*(mt.tensor(a, dtype=dtype, device=device) for a in (q, k, v)),
                                                mask=mt_mask)
    assert not weights.requires_grad and weights.dtype == np.dtype(dtype)
    expected = torch_attention_weights(torch.tensor(q), torch.tensor(k),
                                       None if mask is None else torch.tensor(mask))
    assert_close(weights.numpy(), expected, dtype, "attention weights")
    if mask is not None:
        assert (weights.numpy()[~np.broadcast_to(mask, weights.shape)] == 0).all()


def test_fully_masked_row_attends_to_nothing(device, randn):
    q, k, v = randn(2, 3, 4), randn(2, 5, 4), randn(2, 5, 2)
    mask = np.ones((2, 3, 5), dtype=bool)
    mask[1, 2] = False
    out, weights = F.scaled_dot_product_attention(q, k, v, mask=mt.tensor(mask, device=device))
    assert (out.numpy()[1, 2] == 0).all() and (weights.numpy()[1, 2] == 0).all()
    out.sum().backward()
    for t in (q, k, v):
        assert np.isfinite(grad_of(t)).all()
    assert (grad_of(q)[1, 2] == 0).all()
    np.testing.assert_allclose(weights.numpy()[mask.any(-1)].sum(-1), 1.0)


def dropout_keep_mask(shape, p, seed, device):
    """The mask ``F.dropout`` draws after ``manual_seed(seed)``: 0 or 1/(1-p)."""
    mt.manual_seed(seed)
    return F.dropout(mt.tensor(np.ones(shape), dtype="float64", device=device), p).numpy()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_attention_dropout_matches_torch_with_the_same_mask(dtype, device, rng):
    q, k, v = normal(rng, 2, 4, 3), normal(rng, 2, 5, 3), normal(rng, 2, 5, 2)
    mask = one_key_rows(rng, (2, 4, 5))
    p = 0.4
    mine = [mt.tensor(a, dtype=dtype, device=device, requires_grad=True) for a in (q, k, v)]
    mt.manual_seed(123)
    out, weights = F.scaled_dot_product_attention(*mine, mask=mt.tensor(mask, device=device),
                                                  dropout_p=p, training=True)
    keep = dropout_keep_mask((2, 4, 5), p, 123, device)
    assert set(np.unique(keep)) <= {0.0, 1 / (1 - p)} and (keep == 0).any()
    ref = [torch.tensor(a, dtype=TORCH_DTYPE[dtype], requires_grad=True) for a in (q, k, v)]
    P = torch_attention_weights(ref[0], ref[1], torch.tensor(mask))
    expected = (P * torch.tensor(keep, dtype=TORCH_DTYPE[dtype])) @ ref[2]
    assert_close(out.numpy(), expected, dtype, "attention with dropout")
    assert_close(weights.numpy(), P, dtype, "weights are taken before dropout")
    g = rng.standard_normal(out.shape)
    out.backward(g)
    expected.backward(torch.tensor(g, dtype=TORCH_DTYPE[dtype]))
    for i, (t, r) in enumerate(zip(mine, ref)):
        assert_close(grad_of(t), r.grad, dtype, f"gradient of input {i}")


def test_attention_dropout_gradcheck(device, randn, rng):
    q, k, v = randn(2, 3, 4), randn(2, 4, 4), randn(2, 4, 2)
    mask = mt.tensor(one_key_rows(rng, (2, 3, 4)), device=device)

    def attend(q, k, v):           # re-seed so every evaluation draws the same dropout mask
        mt.manual_seed(7)
        return F.scaled_dot_product_attention(q, k, v, mask=mask, dropout_p=0.3, training=True)
    assert mt.gradcheck(attend, q, k, v)


def test_attention_writes_the_gradients_of_q_k_v_read_out_of_one_tensor_into_one_array(device, randn):
    """q, k, v = s[0], s[1], s[2] (all of s): the op's parent is s itself, whose gradient is one
    array the products wrote into; it equals the gradients of three separate inputs. With k, v
    swapped, dropout, and s also read elsewhere (its parts then add to that array)."""
    s, mask = randn(3, 2, 2, 4, 3), mt.tensor(np.tril(np.ones((4, 4), bool)), device=device)
    w = randn(4, 3)
    parts = [mt.tensor(s.numpy()[i], requires_grad=True, device=device) for i in range(3)]
    for order in ((0, 1, 2), (0, 2, 1)):
        for p in [s, *parts]:
            p.zero_grad()
        mt.manual_seed(3)
        out, _ = F.scaled_dot_product_attention(*(s[i] for i in order), mask=mask, dropout_p=0.2, training=True)
        assert len(out.parents) == 1 and out.parents[0] is s
        ((out * w).sum() + (s[1] * w).sum()).backward()
        mt.manual_seed(3)
        ref, _ = F.scaled_dot_product_attention(*(parts[i] for i in order), mask=mask, dropout_p=0.2, training=True)
        ((ref * w).sum() + (parts[1] * w).sum()).backward()
        np.testing.assert_allclose(backend.to_numpy(s.grad), np.stack([backend.to_numpy(p.grad) for p in parts]), rtol=1e-12, atol=1e-12)


def test_attention_keeps_separate_gradients_for_inputs_that_retain_them(device, randn):
    """Only inputs that use up their array, each once, and whose own gradient nobody keeps, are
    packed; q from one array and k, v from another are two packed parents."""
    s = randn(3, 2, 4, 3)
    q, k, v = s[0].retain_grad(), s[1], s[2]
    out, _ = F.scaled_dot_product_attention(q, k, v)
    assert all(a is b for a, b in zip(out.parents, (q, k, v)))     # k and v alone do not use up s
    out.sum().backward()
    assert q.grad is not None and q.grad.shape == (2, 4, 3)
    np.testing.assert_allclose(backend.to_numpy(s.grad)[0], backend.to_numpy(q.grad), rtol=1e-12)
    assert F.scaled_dot_product_attention(s[0], s[1], s[1])[0].parents[0] is not s   # s[2] unused, s[1] twice
    t = randn(4, 2, 4, 3)
    assert all(p is not t for p in F.scaled_dot_product_attention(t[0], t[1], t[2])[0].parents)   # t[3] unused
    one, two = randn(1, 2, 4, 3), randn(2, 2, 4, 3)
    parents = F.scaled_dot_product_attention(one[0], two[0], two[1])[0].parents
    assert len(parents) == 2 and parents[0] is one and parents[1] is two      # two arrays, each used up


def test_attention_eval_ignores_dropout(device, randn):
    q, k, v = randn(2, 3, 4), randn(2, 4, 4), randn(2, 4, 2)
    plain, _ = F.scaled_dot_product_attention(q, k, v)
    evaluated, _ = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, training=False)
    np.testing.assert_array_equal(plain.numpy(), evaluated.numpy())


# ---- dropout (§5.4) -----------------------------------------------------------------------

@pytest.mark.parametrize("shape, p", [((50,), 0.1), ((4, 6), 0.5), ((2, 3, 5), 0.3)])
def test_dropout_gradcheck(shape, p, device, randn):
    x = randn(*shape)

    def drop(x):                   # re-seed so every evaluation draws the same mask
        mt.manual_seed(11)
        return F.dropout(x, p)
    assert mt.gradcheck(drop, x)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_is_inverted_dropout(p, dtype, device, randn, rng):
    x = randn(40, 50, dtype=dtype, away_from_zero=0.1)
    y = F.dropout(x, p)
    assert y.dtype == x.dtype and y.shape == x.shape
    out, inp = y.numpy(), x.numpy()
    dropped = out == 0
    np.testing.assert_allclose(out[~dropped], inp[~dropped] / (1 - p), **TOL[dtype])
    # keep rate ~ Binomial(n, 1 - p): allow 5 standard deviations
    n = inp.size
    kept = (~dropped).sum()
    assert abs(kept - n * (1 - p)) < 5 * math.sqrt(n * p * (1 - p)), (kept, n, p)
    g = rng.standard_normal(x.shape)
    y.backward(g)
    grad = grad_of(x)
    np.testing.assert_allclose(grad[~dropped], g[~dropped] / (1 - p), **TOL[dtype])
    assert (grad[dropped] == 0).all()


def test_dropout_same_seed_same_mask(device, randn):
    x = randn(8, 9)
    mt.manual_seed(3)
    a = F.dropout(x, 0.5).numpy()
    b = F.dropout(x, 0.5).numpy()      # the generator moved on: a new mask
    mt.manual_seed(3)
    c = F.dropout(x, 0.5).numpy()
    np.testing.assert_array_equal(a, c)
    assert not np.array_equal(a == 0, b == 0)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_add_and_norm_is_dropout_add_layer_norm(dtype, device, randn, rng):
    """With dropout, "Add & Norm" is F.dropout, add, F.layer_norm in a row: the same mask for the
    same seed, the same output and the same gradients (and a gradcheck with the mask held fixed)."""
    x, s = randn(3, 5, 8, dtype=dtype), randn(3, 5, 8, dtype=dtype)
    w, b = randn(8, dtype=dtype), randn(8, dtype=dtype)
    g = mt.tensor(rng.standard_normal((3, 5, 8)), dtype=dtype, device=device)
    results = []
    for fused in (True, False):
        mt.manual_seed(5)
        y = (F.add_and_norm(x, s, w, b, dropout_p=0.3, training=True) if fused
             else F.layer_norm(x + F.dropout(s, 0.3), w, b))
        y.backward(g)
        results.append([y.numpy()] + [grad_of(t) for t in (x, s, w, b)])
        for t in (x, s, w, b):
            t.grad = None
    for ours, theirs in zip(*results):
        np.testing.assert_allclose(ours, theirs, **TOL[dtype])
    assert (results[0][2] == 0).mean() > 0.15     # the mask dropped about 30 % of ds
    if dtype == "float64":
        def add_norm(x, s, w, b):
            mt.manual_seed(5)
            return F.add_and_norm(x, s, w, b, dropout_p=0.3, training=True)
        assert mt.gradcheck(add_norm, x, s, w, b)
    evaluated = F.add_and_norm(x, s, w, b, dropout_p=0.3, training=False)
    np.testing.assert_allclose(evaluated.numpy(), F.layer_norm(x + s, w, b).numpy(), **TOL[dtype])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("op", ["dropout", "add_and_norm"])
def test_dropout_matches_torch_with_the_same_mask(op, dtype, device, rng):
    """PyTorch draws its own masks: with ours handed over, ``dropout(x)`` is ``x·m`` and Add & Norm
    with dropout ``LayerNorm(x + s·m)`` (§5.4), forward and gradients."""
    p, shape = 0.3, (3, 5, 8)
    keep = dropout_keep_mask(shape, p, 5, device)
    assert (keep == 0).any() and (keep != 0).any()
    arrays = [normal(rng, *shape), normal(rng, *shape), 1.0 + 0.3 * normal(rng, 8), normal(rng, 8)]
    if op == "dropout":
        arrays = arrays[:1]
    mine = [mt.tensor(a, dtype=dtype, device=device, requires_grad=True) for a in arrays]
    ref = [torch.tensor(a, dtype=TORCH_DTYPE[dtype], requires_grad=True) for a in arrays]
    m = torch.tensor(keep, dtype=TORCH_DTYPE[dtype])
    mt.manual_seed(5)
    if op == "dropout":
        out, expected = F.dropout(mine[0], p), ref[0] * m
    else:
        out = F.add_and_norm(*mine, dropout_p=p, training=True)
        expected = TF.layer_norm(ref[0] + ref[1] * m, (8,), ref[2], ref[3])
    assert_close(out.numpy(), expected, dtype, f"{op} forward")
    g = rng.standard_normal(shape)
    out.backward(g)
    expected.backward(torch.tensor(g, dtype=TORCH_DTYPE[dtype]))
    for i, (t, r) in enumerate(zip(mine, ref)):
        assert_close(grad_of(t), r.grad, dtype, f"{op} gradient of input {i}")


def test_astype_to_integers_has_no_gradient(device, randn):
    """As in PyTorch: a cast to integers or booleans gives a constant, not an integer tensor
    that claims a gradient."""
    x = randn(3, 4)
    for dtype in (np.int64, np.int32, np.bool_):
        y = F.astype(x, dtype)
        assert y.dtype == dtype and not y.requires_grad and y.is_leaf
    assert F.astype(x, np.float32).requires_grad


def test_dropout_eval_and_p0_are_identity(device, randn):
    x = randn(3, 4)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x


# ---- split, concat: each piece vs torch ---------------------------------------------------

@pytest.mark.parametrize("sizes", [2, 3, 7, [1, 4, 2], [7], [0, 7]])
def test_split_pieces_match_torch(sizes, device, randn):
    x = randn(7, 2)
    ours = F.split(x, sizes)
    theirs = torch.split(torch.tensor(x.numpy()), sizes)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    ours[-1].sum().backward()           # only the last piece's rows get a gradient
    expected = np.zeros((7, 2))
    expected[7 - ours[-1].shape[0]:] = 1.0
    np.testing.assert_array_equal(grad_of(x), expected)


def test_concat_gradient_skips_constant_inputs(device, randn):
    a, b = randn(2, 3), randn(4, 3, requires_grad=False)
    y = F.concat([a, b], axis=0)
    (y * y).sum().backward()
    np.testing.assert_allclose(grad_of(a), 2 * a.numpy())
    assert b.grad is None


def test_concat_of_packed_parameters_is_a_view_with_the_same_gradients(device, rng):
    """Parameters packed side by side (as W^Q, W^K, W^V are) are joined without a copy; values and
    gradients are those of the copying concat."""
    from minitransformer.nn.module import Parameter, pack
    arrays = [rng.standard_normal((2, 3)), rng.standard_normal((4, 3)), rng.standard_normal((1, 3))]
    packed = [Parameter(mt.tensor(a, device=device).data) for a in arrays]
    loose = [Parameter(mt.tensor(a, device=device).data) for a in arrays]
    pack(packed)
    weights = mt.tensor(rng.standard_normal((7, 3)), dtype="float64", device=device)
    joined = F.concat(packed)
    assert backend.address(joined.data) == backend.address(packed[0].data)   # a view: no copy
    assert F.concat(packed[1:]).data.shape == (5, 3)                         # a run of them too
    copied = F.concat(loose)
    np.testing.assert_array_equal(joined.numpy(), copied.numpy())
    (joined * weights).sum().backward()
    (copied * weights).sum().backward()
    for p, q in zip(packed, loose):
        np.testing.assert_array_equal(grad_of(p), grad_of(q))
    # out of order, or with a gap, the pieces are copied
    for pieces in ([packed[1], packed[0]], [packed[0], packed[2]]):
        out = F.concat(pieces)
        assert backend.address(out.data) not in [backend.address(p.data) for p in packed]
        np.testing.assert_array_equal(out.numpy(), np.concatenate([p.numpy() for p in pieces]))
    # packed side by side but of other widths: not one (n, 3) view, the shape error as for any tensors
    odd = [Parameter(mt.tensor(rng.standard_normal(s), device=device).data) for s in ((2, 3), (2, 4))]
    pack(odd)
    with pytest.raises(ValueError, match="concat: all shapes must match except along axis 0"):
        F.concat(odd)


def test_masked_fill_accepts_a_list_mask(device, randn):
    x = randn(3)
    y = F.masked_fill(x, [True, False, True], 0.0)
    np.testing.assert_array_equal(y.numpy(), [0.0, x.numpy()[1], 0.0])


def test_astype_gradient_comes_back_in_the_source_dtype(device, randn, rng):
    x = randn(3, 4, dtype="float32")
    y = F.astype(x, np.float64)
    assert y.dtype == np.float64
    g = rng.standard_normal((3, 4))
    y.backward(g)
    assert x.grad.dtype == np.float32
    np.testing.assert_allclose(grad_of(x), g.astype(np.float32))


def test_cross_entropy_all_ignored_gives_zero(device, randn):
    logits = randn(3, 4)
    loss = F.cross_entropy(logits, [5, 5, 5], ignore_index=5)
    assert loss.item() == 0.0
    loss.backward()
    assert (grad_of(logits) == 0).all()


def test_cross_entropy_accepts_target_tensor_on_device(device, randn, rng):
    logits = randn(4, 3)
    target = rng.integers(0, 3, size=4)
    a = F.cross_entropy(logits, mt.tensor(target, device=device)).item()
    b = TF.cross_entropy(torch.tensor(logits.numpy()), torch.tensor(target)).item()
    assert a == pytest.approx(b, rel=1e-12)


# ---- bad input: the op that received it says what it expected and what it got --------------

def raises(exc, *fragments):
    """pytest.raises whose message must contain every fragment (literally)."""
    return pytest.raises(exc, match="(?s)" + ".*".join(re.escape(f) for f in fragments))


def test_bad_matmul_shapes(device, randn):
    with raises(ValueError, "matmul", "(2, 3)", "(4, 5)"):
        randn(2, 3) @ randn(4, 5)
    with raises(ValueError, "matmul", "batch", "(2, 3, 4)", "(3, 4, 5)"):
        randn(2, 3, 4) @ randn(3, 4, 5)
    with raises(ValueError, "matmul", "(3,)", "(4,)"):
        F.matmul(randn(3), randn(4))


def test_bad_linear_shapes(device, randn):
    with raises(ValueError, "linear", "in_features=5", "(4, 5)", "(2, 3)"):
        F.linear(randn(2, 3), randn(4, 5))
    with raises(ValueError, "linear", "bias", "(4,)", "(3,)"):
        F.linear(randn(2, 5), randn(4, 5), randn(3))
    with raises(ValueError, "linear", "2-D", "(4, 5, 1)"):
        F.linear(randn(2, 5), randn(4, 5, 1))
    with raises(ValueError, "linear_relu", "in_features=5", "(4, 5)", "(2, 3)"):
        F.linear_relu(randn(2, 3), randn(4, 5))
    op = "linear_heads"
    with raises(ValueError, op, "in_features=5", "(12, 5)", "(2, 3, 4)"):
        F.linear_heads(randn(2, 3, 4), randn(12, 5), None, 3, 2)
    with raises(ValueError, op, "(B, L, d)", "(6, 5)"):
        F.linear_heads(randn(6, 5), randn(12, 5), None, 3, 2)
    with raises(ValueError, op, "12 rows", "3 projections of 8 heads"):
        F.linear_heads(randn(2, 3, 5), randn(12, 5), None, 3, 8)


def test_elementwise_shapes_that_do_not_broadcast(device, randn):
    for op in (F.add, F.sub, F.mul, F.div):
        with raises(ValueError, op.__name__, "(2, 3)", "(4,)"):
            op(randn(2, 3), randn(4))


def test_attention_bad_shapes_and_masks(device, randn):
    q, k, v = randn(2, 3, 4), randn(2, 5, 4), randn(2, 5, 6)
    op = "scaled_dot_product_attention"
    with raises(ValueError, op, "mask", "(4,)", "(2, 3, 5)"):
        F.scaled_dot_product_attention(q, k, v, mask=mt.tensor(np.ones(4, dtype=bool), device=device))
    with raises(ValueError, op, "mask", "(3, 3, 5)", "(2, 3, 5)"):   # would broadcast *up*, silently
        F.scaled_dot_product_attention(q, k, v, mask=mt.tensor(np.ones((3, 3, 5), dtype=bool), device=device))
    with raises(TypeError, op, "boolean", "float"):
        F.scaled_dot_product_attention(q, k, v, mask=mt.tensor(np.ones((3, 5)), device=device))
    with raises(TypeError, op, "boolean", "int64"):
        F.scaled_dot_product_attention(q, k, v, mask=mt.tensor(np.ones((3, 5), dtype=np.int64), device=device))
    with raises(ValueError, op, "d_k", "(2, 3, 4)", "(2, 5, 3)"):
        F.scaled_dot_product_attention(q, randn(2, 5, 3), v)
    with raises(ValueError, op, "Lk", "(2, 5, 4)", "(2, 6, 6)"):
        F.scaled_dot_product_attention(q, k, randn(2, 6, 6))
    with raises(ValueError, op, "[0, 1)", "1.0"):
        F.scaled_dot_product_attention(q, k, v, dropout_p=1.0, training=True)
    with raises(ValueError, op, "concat_heads", "(B, h, L, d)", "(2, 3, 4)"):
        F.scaled_dot_product_attention(q, k, v, concat_heads=True)


def test_masked_fill_bad_masks(device, randn):
    x = randn(2, 3)
    with raises(TypeError, "masked_fill", "boolean", "float"):
        F.masked_fill(x, mt.tensor(np.ones((2, 3)), device=device), 0.0)
    with raises(ValueError, "masked_fill", "(4,)", "(2, 3)"):
        F.masked_fill(x, mt.tensor(np.ones(4, dtype=bool), device=device), 0.0)
    with raises(ValueError, "masked_fill", "(2, 2, 3)", "(2, 3)"):
        F.masked_fill(x, mt.tensor(np.ones((2, 2, 3), dtype=bool), device=device), 0.0)


def test_embedding_bad_ids(device, randn):
    w = randn(10, 4)
    with raises(IndexError, "embedding", "10", "[0, 10)"):
        F.embedding([1, 10, 2], w)
    with raises(IndexError, "embedding", "-1", "[0, 10)"):
        F.embedding(np.array([[0, -1]]), w)
    for bad in ([[3, 12], [0, 1]], [[0, -2]]):     # ids already on the weights' device are checked there
        with raises(IndexError, "embedding", str(np.max(bad) if np.min(bad) >= 0 else np.min(bad)), "[0, 10)"):
            F.embedding(mt.backend.to_device(np.array(bad), w.device), w)
    with raises(TypeError, "embedding", "integers", "float64"):
        F.embedding(np.array([1.0, 2.0]), w)
    with raises(ValueError, "embedding", "2-D", "(10,)"):
        F.embedding([1], randn(10))


def test_cross_entropy_bad_targets(device, randn):
    logits = randn(4, 5)
    with raises(ValueError, "cross_entropy", "(4,)", "(4, 1)"):
        F.cross_entropy(logits, np.zeros((4, 1), dtype=np.int64))
    with raises(ValueError, "cross_entropy", "(4,)", "(3,)"):
        F.cross_entropy(logits, [0, 1, 2])
    with raises(IndexError, "cross_entropy", "5", "[0, 5)"):
        F.cross_entropy(logits, [0, 5, 1, 2])
    with raises(IndexError, "cross_entropy", "-1", "[0, 5)"):
        F.cross_entropy(logits, [0, -1, 1, 2])
    with raises(IndexError, "cross_entropy", "-100", "[0, 5)"):   # -100 is not ignored unless asked
        F.cross_entropy(logits, [0, -100, 1, 2])
    with raises(TypeError, "cross_entropy", "integers", "float64"):
        F.cross_entropy(logits, np.array([0.0, 1.0, 1.0, 2.0]))
    with raises(ValueError, "cross_entropy", "(N, C)", "(2, 2, 5)"):
        F.cross_entropy(randn(2, 2, 5), [0, 1])
    with raises(ValueError, "cross_entropy", "label_smoothing", "1.5"):
        F.cross_entropy(logits, [0, 1, 2, 3], label_smoothing=1.5)


def test_other_bad_arguments(device, randn):
    x = randn(2, 3)
    with raises(ValueError, "layer_norm", "weight", "(3,)", "(2,)"):
        F.layer_norm(x, randn(2), randn(3))
    with raises(ValueError, "layer_norm", "bias", "(3,)", "(4,)"):
        F.layer_norm(x, randn(3), randn(4))
    with raises(ValueError, "dropout", "[0, 1)", "1.5"):
        F.dropout(x, 1.5)
    with raises(ValueError, "concat", "axis 0", "(2, 3)", "(2, 4)"):
        F.concat([x, randn(2, 4)], axis=0)
    with raises(ValueError, "split", "[1, 1]", "2", "3"):
        F.split(x, [1, 1], axis=1)
    with raises(ValueError, "split", "positive", "0"):
        F.split(x, 0)
    with raises(TypeError, "pow", "exponent", "Tensor"):
        F.pow(x, randn(1))


def test_axes_out_of_range_and_scalars(device, randn):
    x = randn(2, 3)
    for op in (F.softmax, F.log_softmax):
        with raises(ValueError, op.__name__, "axis 2", "(2, 3)"):
            op(x, axis=2)
    with raises(ValueError, "concat", "axis 2", "(2, 3)"):     # was taken modulo 2: joined on axis 0
        F.concat([x, x], axis=2)
    with raises(ValueError, "split", "axis -3", "(2, 3)"):
        F.split(x, 1, axis=-3)
    with raises(ValueError, "softmax", "axis True"):          # a bool is not an axis (True == 1)
        F.softmax(x, axis=True)
    with raises(ValueError, "concat", "scalars"):
        F.concat([randn(), randn()])
    with raises(ValueError, "layer_norm", "scalar"):
        F.layer_norm(randn(), None, None)


def test_operands_that_are_not_numbers(device, randn):
    x = randn(2)
    for bad in (None, "1.0", [[1.0], [2.0, 3.0]]):      # NumPy would make an object array: NaN, garbage
        with raises(TypeError, "expected a tensor, an array or numbers", type(bad).__name__):
            x + bad
    with raises(TypeError, "linear", "floating point", "int64", "Embedding"):
        F.linear(mt.tensor(np.ones((2, 3), dtype=np.int64), device=device), randn(4, 3))
    with raises(TypeError, "cross_entropy", "floating point", "int64"):
        F.cross_entropy(mt.tensor(np.ones((2, 3), dtype=np.int64), device=device), [0, 1])
    with raises(ValueError, "cross_entropy", "label_smoothing", "None"):
        F.cross_entropy(randn(2, 3), [0, 1], label_smoothing=None)


def test_attention_batch_of_v_and_no_keys(device, randn):
    op = "scaled_dot_product_attention"
    with raises(ValueError, op, "batch axes of v", "(3, 5, 4)", "(2, 3, 4)"):
        F.scaled_dot_product_attention(randn(2, 3, 4), randn(2, 5, 4), randn(3, 5, 4))
    with raises(ValueError, op, "no keys", "Lk = 0"):
        F.scaled_dot_product_attention(randn(2, 3, 4), randn(2, 0, 4), randn(2, 0, 4))
    out, _ = F.scaled_dot_product_attention(randn(2, 3, 4), randn(2, 5, 4), randn(5, 2))   # v shared: fine
    assert out.shape == (2, 3, 2)


@pytest.mark.parametrize("op, call", [
    ("softmax", lambda a: F.softmax(a)), ("log_softmax", lambda a: F.log_softmax(a)),
    ("layer_norm", lambda a: F.layer_norm(a, None, None)), ("dropout", lambda a: F.dropout(a, 0.5)),
    ("reshape", lambda a: F.reshape(a, 6)), ("transpose", lambda a: F.transpose(a)),
    ("sum", lambda a: F.sum(a, 1)), ("mean", lambda a: F.mean(a)), ("neg", lambda a: F.neg(a)),
    ("pow", lambda a: F.pow(a, 2)), ("astype", lambda a: F.astype(a, np.float64)),
    ("getitem", lambda a: F.getitem(a, 1)), ("contiguous", lambda a: F.contiguous(a)),
    ("split", lambda a: F.split(a, 1, axis=1)[1]),
    ("masked_fill", lambda a: F.masked_fill(a, a > 2, 0.0))])
def test_every_op_takes_a_plain_array(op, call, device):
    """As add, matmul and linear always did: an array of the device is wrapped as a constant."""
    array = mt.backend.xp_for(device).asarray(np.arange(6.0).reshape(2, 3))
    mt.manual_seed(0)                               # (dropout: the same mask both times)
    out = call(array)
    mt.manual_seed(0)
    expected = call(mt.tensor(np.arange(6.0).reshape(2, 3), device=device))
    assert isinstance(out, mt.Tensor) and not out.requires_grad
    np.testing.assert_allclose(out.numpy(), expected.numpy())


def test_backward_on_non_scalar_loss_without_grad(device, randn):
    out = F.linear(randn(4, 3), randn(2, 3))
    with raises(ValueError, "backward", "(4, 2)"):
        out.backward()


@pytest.mark.skipif(mt.cuda_is_available(), reason="this machine has a GPU and CuPy")
def test_cuda_without_gpu_says_how_to_install():
    with raises(RuntimeError, "cuda", 'pip install "minitransformer[cuda12]"'):
        mt.tensor([1.0], device="cuda")
    with raises(RuntimeError, 'pip install "minitransformer[cuda12]"'):
        mt.tensor([1.0]).to("cuda")


def test_cuda_without_cupy_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backend, "_cupy", None)     # as on a machine without CuPy
    assert mt.cuda_is_available() is False
    with raises(RuntimeError, "CuPy is not installed", 'pip install "minitransformer[cuda12]"'):
        mt.tensor([1.0], device="cuda:0")


@pytest.mark.parametrize("device", ["cuda"], indirect=True)
def test_mixing_devices_raises(device, rng):
    a = mt.tensor(rng.standard_normal((2, 3)), device="cpu", requires_grad=True)
    b = mt.tensor(rng.standard_normal((2, 3)), device=device, requires_grad=True)
    w = mt.tensor(rng.standard_normal((4, 3)), device=device)
    for fn, name in [(lambda: a + b, "add"), (lambda: a * b, "mul"), (lambda: a @ b.T, "matmul"),
                     (lambda: F.linear(a, w), "linear"), (lambda: F.concat([a, b]), "concat"),
                     (lambda: F.scaled_dot_product_attention(a, b, b), "scaled_dot_product_attention"),
                     (lambda: F.layer_norm(a, mt.tensor(np.ones(3), device=device), None), "layer_norm"),
                     (lambda: F.masked_fill(b, mt.tensor(np.ones((2, 3), dtype=bool)), 0.0), "masked_fill"),
                     (lambda: F.embedding(mt.tensor([0, 1]), w), "embedding"),
                     (lambda: F.cross_entropy(b, mt.tensor([0, 1])), "cross_entropy")]:
        with pytest.raises(ValueError, match=f"^{name}: ") as info:    # named by the op, both devices said
            fn()
        assert "cpu" in str(info.value) and "cuda" in str(info.value), str(info.value)
