"""How many GPU launches one training step of ours makes — counted on the CPU, no GPU needed.

    python benchmarks/launch_count.py --config small [--three-products] [--tree DIR]

The step runs through the model's GPU code path with the fused kernels emulated on the CPU
(``tests/kernel_emulator.py``) and every array an instance of ``Counted``, a NumPy array that
counts each operation as the launch CuPy would make for it: an element-wise op or a reduction
one kernel, a matrix product one GEMM, a copy (``ascontiguousarray`` of a strided view, a reshape
that cannot be a view, advanced indexing, ``setitem``, ``astype``, ``fill``, ``zeros``) one, an
upload of a host array one. It is a model of CuPy, not CuPy: CuPy may split or merge a few of
these; the counts compare code with code. ``--tree`` counts another checkout (an earlier commit's
files) with this checkout's emulator.
"""
import argparse
import collections
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

COUNTS = collections.Counter()


def _plain(x):
    if isinstance(x, Counted):
        return x.view(np.ndarray)
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(i) for i in x)
    return x


def _arrays(x):
    if isinstance(x, np.ndarray):
        yield x
    elif isinstance(x, (list, tuple)):
        for i in x:
            yield from _arrays(i)
    elif isinstance(x, dict):
        for i in x.values():
            yield from _arrays(i)


def _counted(x, *inputs):
    """``x`` (a NumPy result) as a Counted array: a view where it shares memory with one of
    ``inputs``, otherwise an array of its own (a fresh CuPy result owns its memory: base None)."""
    if isinstance(x, tuple):
        return tuple(_counted(i, *inputs) for i in x)
    if type(x) is not np.ndarray:
        return x
    if any(np.may_share_memory(x, i) for i in _arrays(inputs)):
        return x.view(Counted)
    out = owned(x.shape, x.dtype)
    out.view(np.ndarray)[...] = x
    return out


def owned(shape, dtype):
    """A Counted array that owns its memory (its slices have it as their base, as on a GPU)."""
    return np.ndarray.__new__(Counted, shape, dtype=dtype)


class Counted(np.ndarray):
    """A NumPy array whose operations are counted as GPU launches (see the module docstring)."""

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        COUNTS["reduction" if method != "__call__" else "matmul" if ufunc is np.matmul else "elementwise"] += 1
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = _plain(out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None:                 # in place: the very array written to
            return out[0] if len(out) == 1 else out
        return _counted(result, inputs)

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        if name == "concatenate":
            COUNTS["copy"] += len(args[0])              # CuPy copies each piece (up to 8)
        elif name in ("where", "copy", "stack", "tril", "triu", "zeros_like", "ones_like", "full_like"):
            COUNTS["copy" if name in ("copy", "stack") else "elementwise"] += 1
        return _counted(func(*_plain(args), **_plain(kwargs)), args)

    def copy(self, order="C"):
        COUNTS["copy"] += 1
        return _counted(self.view(np.ndarray).copy(order))      # shares nothing: an array of its own

    def astype(self, dtype, *args, copy=True, **kwargs):
        if copy or np.dtype(dtype) != self.dtype:
            COUNTS["copy"] += 1
        return _counted(self.view(np.ndarray).astype(dtype, *args, copy=copy, **kwargs), self)

    def fill(self, value):
        COUNTS["elementwise"] += 1
        self.view(np.ndarray).fill(value)

    # Views are made from the Counted array itself (not through a plain one): NumPy then gives them
    # the owner as base, as CuPy does (the packed parameters' test for "a view of this buffer").
    def reshape(self, *shape, **kwargs):
        out = np.ndarray.reshape(self, *shape, **kwargs)
        if out.size and not np.may_share_memory(out, self):
            COUNTS["copy"] += 1
            return _counted(out.view(np.ndarray))
        return out

    def __getitem__(self, index):
        out = np.ndarray.__getitem__(self, _plain(index))
        if isinstance(out, np.ndarray) and out.size and not np.may_share_memory(out, self):
            COUNTS["copy"] += 1                          # advanced indexing gathers
            return _counted(out.view(np.ndarray))
        return out

    def __setitem__(self, index, value):
        COUNTS["copy"] += 1
        self.view(np.ndarray)[_plain(index)] = _plain(value)


class CountingNumpy:
    """``numpy`` as ``backend.get_array_module`` gives it for a Counted array: new arrays are Counted."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return owned(shape, dtype)

    @staticmethod
    def empty_like(a, dtype=None):
        return owned(a.shape, dtype or a.dtype)

    @staticmethod
    def full(shape, value, dtype=float):
        out = owned(shape, dtype)
        out.fill(value)                  # one launch
        return out

    def zeros(self, shape, dtype=float):
        return self.full(shape, 0, dtype)

    def zeros_like(self, a, dtype=None):
        return self.full(a.shape, 0, dtype or a.dtype)

    def ones(self, shape, dtype=float):
        return self.full(shape, 1, dtype)

    def ones_like(self, a, dtype=None):
        return self.full(a.shape, 1, dtype or a.dtype)

    @staticmethod
    def ascontiguousarray(a):          # NumPy's does not dispatch to subclasses: it would hand back a plain array
        if not isinstance(a, Counted):
            return upload(np.ascontiguousarray(a))
        if a.flags.c_contiguous:
            return a
        COUNTS["copy"] += 1
        return _counted(np.ascontiguousarray(_plain(a)))

    @staticmethod
    def asarray(a, dtype=None):
        if isinstance(a, Counted):
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        return upload(np.asarray(a, dtype=dtype))

    @staticmethod
    def broadcast_to(a, shape):
        return _counted(np.broadcast_to(_plain(a), shape), a)


def upload(host):
    COUNTS["upload"] += 1
    out = owned(host.shape, host.dtype)
    out.view(np.ndarray)[...] = host
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="small")
    parser.add_argument("--three-products", action="store_true", help="Q, K, V by three products")
    parser.add_argument("--tree", default=str(ROOT), help="the checkout whose minitransformer is counted")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--by-op", action="store_true", help="also the launches of each op, forward and backward")
    parser.add_argument("--decode", type=int, metavar="ROWS", default=0,
                        help="instead: one step of cached decoding (fixed-size cache, as beam search replays "
                             "it) for ROWS hypotheses, up to the log-probabilities")
    args = parser.parse_args()
    sys.path[:0] = [args.tree, str(ROOT / "tests"), str(ROOT / "benchmarks")]
    import minitransformer as mt
    from minitransformer import backend, kernels
    from minitransformer.data import Batch
    from minitransformer.train import batch_loss
    from kernel_emulator import Emulator
    from train_step import CONFIGS, make_batch, model_kwargs
    from minitransformer.kernels._source import NAMES

    emulator = Emulator(tuple(n for n in NAMES if n not in ("beam_topk_partial", "beam_topk_final")))

    def kernel(name, dtype):
        launch = emulator.kernel(name, dtype)

        def counted_launch(grid, block, arguments):
            COUNTS["kernel"] += 1
            launch(grid, block, _plain(arguments))
        return counted_launch

    def batched_matmul(a, b, out=None):  # kernels.batched_matmul: copies only what is neither C- nor transposed-contiguous
        for x in (a, b):
            if not (x.flags.c_contiguous or x.swapaxes(-1, -2).flags.c_contiguous):
                COUNTS["copy"] += 1
        COUNTS["matmul"] += 1
        if out is not None:                # written into a part of a bigger array: no new one
            np.matmul(_plain(a), _plain(b), out=_plain(out))
            return out
        return _counted(_plain(a) @ _plain(b))

    def matmul(a, b):
        COUNTS["matmul"] += 1
        return _counted(_plain(a) @ _plain(b))

    def column_sum(g):                 # one GEMV on the GPU
        COUNTS["matmul"] += 1
        return _counted(_plain(g).sum(axis=0))

    real_adam_step = kernels.adam_step

    def adam_step(*arguments):         # a tree before 2026-11-26 read CuPy's pointers (a.data.ptr):
        try:                           # there Adam counts as its kernel and its pointer-table upload
            real_adam_step(*arguments)
        except AttributeError:
            COUNTS["kernel"] += 1
            COUNTS["upload"] += 1

    counting_np = CountingNumpy()
    kernels._kernel = kernel
    kernels.batched_matmul, kernels.matmul, kernels.column_sum = batched_matmul, matmul, column_sum
    kernels.adam_step = adam_step
    backend.cupy = lambda: counting_np
    get_array_module = backend.get_array_module
    backend.get_array_module = lambda a: counting_np if isinstance(a, Counted) else get_array_module(a)
    backend.fused = lambda *arrays: all(a.dtype in (np.float32, np.float64) for a in arrays)
    backend.to_device = lambda a, device: a if isinstance(a, Counted) else upload(np.asarray(a))

    by_op = {"forward": collections.Counter(), "backward": collections.Counter()}
    mark = [0]                         # launches counted up to the last op's make_op
    if args.by_op:                     # each op's forward work ends in make_op; its backward is a closure
        import importlib
        import pkgutil
        import minitransformer.functional as functional
        tensor_module = importlib.import_module("minitransformer.tensor")
        make_op = tensor_module.make_op

        def counting_make_op(data, parents, backward, op):
            total = sum(COUNTS.values())
            by_op["forward"][op] += total - mark[0]
            if type(backward) is tensor_module.PartBackward:   # kept: attention looks for it
                mark[0] = total
                return make_op(data, parents, backward, op)

            def counted_backward(g):
                before = sum(COUNTS.values())
                result = backward(g)
                by_op["backward"][op] += sum(COUNTS.values()) - before
                return result
            out = make_op(data, parents, counted_backward, op)
            mark[0] = sum(COUNTS.values())
            return out
        for info in pkgutil.iter_modules(functional.__path__):
            module = importlib.import_module(f"minitransformer.functional.{info.name}")
            if hasattr(module, "make_op"):
                module.make_op = counting_make_op

    c = CONFIGS[args.config]
    mt.manual_seed(0)
    model = mt.nn.Transformer(**model_kwargs(c, args.dropout))
    if args.three_products:
        for m in model.modules():
            if isinstance(m, mt.nn.MultiHeadAttention):
                m.one_product = False
    model.to("cpu")                    # every parameter and buffer becomes a Counted array
    for m in model.modules():
        for name in m._buffers:
            object.__setattr__(m, name, upload(np.asarray(getattr(m, name))))
    if args.decode:
        count_decoding_step(model, c, args)
        return
    from minitransformer.optim import Adam
    optimizer = Adam(model.parameters())
    src, tgt_in, tgt_out = make_batch(c)
    batch = Batch(src, tgt_in, tgt_out, np.arange(len(src)))
    parts = {}
    for step in range(2):              # the second step is counted (the first makes lazily built state)
        COUNTS.clear()
        mark[0] = 0
        for counter in by_op.values():
            counter.clear()
        model.train()
        optimizer.zero_grad()
        loss = batch_loss(model, batch, 0.1)
        parts["forward"] = sum(COUNTS.values())
        loss.backward()
        parts["backward"] = sum(COUNTS.values()) - parts["forward"]
        optimizer.step()
        parts["optimizer"] = sum(COUNTS.values()) - parts["forward"] - parts["backward"]
    total = sum(COUNTS.values())
    escaped = [n for n, p in model.named_parameters() if not isinstance(p.grad, Counted)]
    if escaped:                        # an op left the counted arrays: the counts would be low
        raise RuntimeError(f"uncounted arrays reached the gradients of {escaped[:5]}")
    print(f"{args.config}{' (three Q/K/V products)' if args.three_products else ''}, {args.tree}: "
          f"{total} launches a training step — forward {parts['forward']}, backward {parts['backward']}, "
          f"optimizer {parts['optimizer']}; by kind: {dict(sorted(COUNTS.items()))}")
    if args.by_op:
        for phase, counter in by_op.items():
            print(f"  {phase} by op: {dict(counter.most_common())}")
        print(f"  backward outside the ops (the walk adding up gradients): "
              f"{parts['backward'] - sum(by_op['backward'].values())}")


def count_decoding_step(model, c, args):
    """Launches of one fixed-cache decoding step (the second: the first also computes the
    cross-attention keys and values), from the decoder to the log-probabilities."""
    import minitransformer as mt
    from minitransformer.decode import _step_logprobs
    model.eval()
    rng = np.random.default_rng(0)
    src = rng.integers(4, c["vocab_size"], size=(args.decode, c["length"]))
    with mt.no_grad():
        memory, src_mask = model.encode(src)
        cache = model.new_cache(args.decode, 16)
        tokens = upload(np.full((args.decode, 1), 1, dtype=np.int64))
        for step in range(2):
            COUNTS.clear()
            _step_logprobs(model, tokens, memory, src_mask, cache)
    print(f"{args.config}, {args.tree}: {sum(COUNTS.values())} launches a decoding step for {args.decode} "
          f"hypotheses (fixed cache, decoder and log-softmax); by kind: {dict(sorted(COUNTS.items()))}")


if __name__ == "__main__":
    main()
