"""Figures for the notebooks and the CLI: attention grids (§3.2, Figures 3–5 of the paper), the
positional encoding table (§3.5), the learning-rate schedule (§5.3) and loss curves.

Everything here takes plain arrays (NumPy, or anything ``np.asarray`` accepts) and returns a
matplotlib ``Figure``; nothing knows about tensors or gradients. Figures are built on the Agg
canvas directly, without pyplot, so no global figure state builds up and no display is needed.
In a notebook a returned Figure shows itself (it is its own PNG for IPython, so no pyplot
backend is needed); ``save_figure`` writes it to a PNG atomically.
"""
import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_CMAP = "viridis"


class _ShownFigure(Figure):
    """A Figure that IPython shows as a PNG when it ends a notebook cell. A plain Figure is shown
    only once pyplot's inline backend has registered a printer for it (after ``%matplotlib inline``
    or any pyplot figure); that printer, where there is one, still comes first."""

    def _repr_png_(self):
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


def _figure(width, height, layout=None):
    fig = _ShownFigure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, dpi=100):
    """Write ``fig`` to ``path`` (format from the suffix, PNG by default) via a temporary file and a
    rename, so a crash never leaves half an image; creates the folder. Returns the path."""
    from .checkpoint import atomic_write
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi))


# ---------------------------------------------------------------------------------------------------
# Attention (§3.2): one panel per head, queries down the rows, keys along the columns
# ---------------------------------------------------------------------------------------------------

def _check_weights(weights, what):
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim == 2:
        weights = weights[None]
    if weights.ndim != 3:
        raise ValueError(f"{what}: attention weights must be (h, Lq, Lk), got shape {weights.shape}")
    return weights


def _check_labels(labels, n, what, axis):
    if labels is None:
        return [str(i) for i in range(n)]
    labels = [str(s) for s in labels]
    if len(labels) != n:
        raise ValueError(f"{what}: {len(labels)} {axis} labels for {n} {'keys' if axis == 'x' else 'queries'}")
    return labels


# The attention figures are laid out by hand, in inches: every cell of every panel is CELL × CELL, so
# panels of different lengths line up and nothing overlaps, however many layers and heads there are.
CELL = 0.2           # inches per token
_GAP = 0.3           # between panels
_HEADER = 0.3        # the row's name ("cross-attention, layer 2")
_TITLE = 0.2         # "head 3" above each panel
_CHAR = 0.075        # width of one character of a 7-pt tick label
_CBAR = 0.12         # width of the colorbar, right of the last head
_CBAR_ROOM = 0.55    # its tick labels and name


def _label_room(labels):
    return 0.15 + _CHAR * max((len(s) for s in labels), default=1)


def _draw_head(fig, box, w, x_labels, y_labels, title):
    """One head's ``(Lq, Lk)`` weights in ``box`` = (left, bottom, width, height) in inches;
    labels None leave that axis bare (a neighbouring panel names it)."""
    W, H = fig.get_size_inches()
    left, bottom, width, height = box
    ax = fig.add_axes((left / W, bottom / H, width / W, height / H))
    ax.imshow(w, cmap=_CMAP, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    if x_labels is None:
        ax.set_xticks([])
    else:
        ax.set_xticks(range(len(x_labels)), x_labels, rotation=90, fontsize=7)
    if y_labels is None:
        ax.set_yticks([])
    else:
        ax.set_yticks(range(len(y_labels)), y_labels, fontsize=7)
    ax.tick_params(length=0, pad=2)
    ax.set_title(title, fontsize=7, pad=2)
    return ax


def _colorbar(fig, ax, box):
    """One colorbar for the whole figure, 0 to 1 (every panel is drawn on that scale: weights are
    probabilities), in ``box`` = (left, bottom, width, height) in inches. It is a child of the panel
    ``ax``, so ``fig.axes`` holds the panels only, one per head."""
    W, H = fig.get_size_inches()
    left, bottom, width, height = box
    cax = ax.inset_axes((left / W, bottom / H, width / W, height / H), transform=fig.transFigure)
    bar = fig.colorbar(ax.images[0], cax=cax, ticks=[0, 0.5, 1])
    bar.ax.tick_params(labelsize=7, length=2, pad=1)
    bar.set_label("attention weight", fontsize=7, labelpad=2)
    return bar


def _grid(rows, title):
    """rows: (row name, weights (h, Lq, Lk), x labels or None, y labels) → Figure, one row of heads each,
    and a colorbar right of the first row."""
    heads = max(w.shape[0] for _, w, _, _ in rows)
    col = max(CELL * max(w.shape[2] for _, w, _, _ in rows), 0.6) + _GAP
    left = max(_label_room(ys) for _, _, _, ys in rows)
    top = 0.15 + (0.45 if title else 0)
    heights = [(_HEADER if name else 0) + _TITLE + CELL * w.shape[1] + (_label_room(xs) if xs is not None else 0.05)
               + _GAP for name, w, xs, _ in rows]
    W, H = left + heads * col + _CBAR + _CBAR_ROOM, top + sum(heights)
    fig = _figure(max(W, 3.0), H)
    y = H - top
    for (name, w, xs, ys), h in zip(rows, heights):
        if name:
            fig.text(0.1 / fig.get_size_inches()[0], (y - 0.2) / H, name, fontsize=9, fontweight="bold")
        panel_height = CELL * w.shape[1]
        bottom = y - (_HEADER if name else 0) - _TITLE - panel_height
        for i in range(w.shape[0]):
            ax = _draw_head(fig, (left + i * col, bottom, CELL * w.shape[2], panel_height), w[i], xs,
                            ys if i == 0 else None, f"head {i + 1}")
        if y == H - top:         # first row: the colorbar beside it, as tall as its panels (within 1–2 inches)
            panels_top = bottom + panel_height
            bar_height = min(max(panel_height, 1.0), 2.0, panels_top - 0.1)
            _colorbar(fig, ax, (left + heads * col, panels_top - bar_height, _CBAR, bar_height))
        y -= h
    if title:
        fig.suptitle(title, y=1 - 0.15 / H, va="top")
    return fig


def plot_attention_grid(weights, x_labels=None, y_labels=None, title=None):
    """All heads of one attention layer side by side. ``weights`` is ``(h, Lq, Lk)`` (or one
    ``(Lq, Lk)`` head); row i of a panel is the distribution of query i over the keys.
    ``x_labels`` name the keys (rotated), ``y_labels`` the queries. Every panel has one colour
    scale, 0 to 1, shown by the colorbar on the right."""
    weights = _check_weights(weights, "plot_attention_grid")
    _, Lq, Lk = weights.shape
    x_labels = _check_labels(x_labels, Lk, "plot_attention_grid", "x")
    y_labels = _check_labels(y_labels, Lq, "plot_attention_grid", "y")
    return _grid([("", weights, x_labels, y_labels)], title)


def _layer_numbers(layers, n, name):
    """Indices into ``n`` layers (negative from the end) → sorted 0-based layer numbers."""
    picked = []
    for i in layers:
        if not -n <= int(i) < n:
            raise ValueError(f"plot_all_attention: layer index {i} is out of range for the {n} layers of {name}")
        picked.append(int(i) % n)
    return sorted(set(picked))


def plot_all_attention(enc_self, dec_self, cross, src_tokens, tgt_tokens, path=None, title=None, layers=None):
    """One figure with every layer and head of the three kinds of attention (§3.2.3):

    - encoder self-attention, ``(h, S, S)`` per layer: source tokens attend to source tokens;
    - decoder self-attention, ``(h, T, T)`` per layer: masked, each target token sees its past;
    - encoder-decoder (cross) attention, ``(h, T, S)`` per layer: target tokens attend to the source.

    Each argument is a list over layers (or an array ``(N, h, Lq, Lk)``). ``tgt_tokens`` are the
    decoder's input pieces (``<s>`` + translation). Rows are layers, grouped by kind; columns are
    heads; queries run down each panel, keys along it; one colorbar (0 to 1, every panel's scale)
    stands right of the first row. The first head of a row names the queries
    and the last layer of a kind names the keys (labelling all 144 panels of the base model would
    cost most of the drawing time). ``layers`` draws only these layers of each kind (indices as
    for a list, e.g. ``[-1]`` for the last; a panel keeps a fixed size per token, so the figure
    grows with the layers drawn). With ``path`` the PNG is written too. Returns the Figure.
    """
    groups = [("encoder self-attention", enc_self, src_tokens, src_tokens),
              ("decoder self-attention", dec_self, tgt_tokens, tgt_tokens),
              ("cross-attention", cross, src_tokens, tgt_tokens)]
    rows = []
    for name, weights, x_labels, y_labels in groups:
        weights = list(weights)
        picked = range(len(weights)) if layers is None else _layer_numbers(layers, len(weights), name)
        for n in picked:
            w = _check_weights(weights[n], f"plot_all_attention ({name}, layer {n + 1})")
            xs = _check_labels(x_labels, w.shape[2], f"plot_all_attention ({name})", "x")
            ys = _check_labels(y_labels, w.shape[1], f"plot_all_attention ({name})", "y")
            rows.append((f"{name}, layer {n + 1}", w, xs if n == picked[-1] else None, ys))
    if not rows:
        raise ValueError("plot_all_attention: no attention weights given")
    fig = _grid(rows, title)
    if path is not None:
        save_figure(fig, path, dpi=80)
    return fig


# ---------------------------------------------------------------------------------------------------
# Positional encoding (§3.5), learning rate (§5.3), losses
# ---------------------------------------------------------------------------------------------------

def plot_positional_encoding(table, dims=(4, 5, 6, 7), title="Sinusoidal positional encoding (§3.5)"):
    """Left: the ``(positions, d_model)`` table as an image. Right: a few of its columns ``dims``
    along the positions. Column 2i is the sine and column 2i + 1 the cosine of dimension pair i
    (the i of the paper's formula), whose wavelength grows with i."""
    table = np.asarray(table, dtype=np.float64)
    if table.ndim != 2:
        raise ValueError(f"plot_positional_encoding: table must be (positions, d_model), got shape {table.shape}")
    fig = _figure(12, 4, "constrained")
    left, right = fig.subplots(1, 2)
    im = left.imshow(table, cmap="RdBu", vmin=-1, vmax=1, aspect="auto", interpolation="nearest")
    left.set_xlabel("column: 2i (sine) and 2i + 1 (cosine) of pair i")
    left.set_ylabel("position pos")
    fig.colorbar(im, ax=left)
    for d in dims:
        if d < table.shape[1]:
            right.plot(np.arange(table.shape[0]), table[:, d],
                       label=f"column {d}: {'sin' if d % 2 == 0 else 'cos'}, i = {d // 2}")
    right.set_xlabel("position pos")
    right.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def plot_learning_rate(schedule_fn, steps, title="Learning rate (§5.3)"):
    """``schedule_fn(step)`` for step = 1…``steps`` (or for each step of an iterable ``steps``).
    Pass a function of the step, e.g. ``NoamSchedule(opt, 512, 4000).rate``, or a dict
    ``{label: function}`` to compare several schedules."""
    xs = np.arange(1, int(steps) + 1) if np.isscalar(steps) else np.asarray(list(steps))
    fns = schedule_fn if isinstance(schedule_fn, dict) else {None: schedule_fn}
    fig = _figure(7, 4, "constrained")
    ax = fig.subplots()
    for label, fn in fns.items():
        ax.plot(xs, [fn(int(s)) for s in xs], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    if any(label is not None for label in fns):
        ax.legend()
    ax.set_title(title)
    return fig


def _curves(history):
    """Normalise the accepted history formats to ``{name: (steps, values)}``."""
    if isinstance(history, dict):
        items = history.items()
    else:
        history = list(history)
        if history and isinstance(history[0], dict):      # Trainer.history: [{"step": s, "valid_loss": …}, …]
            keys = dict.fromkeys(k for r in history for k in r if k != "step")
            items = [(k, [(r["step"], r[k]) for r in history if isinstance(r.get(k), (int, float))]) for k in keys]
        else:                                             # Trainer.losses: [(step, loss), …]
            items = [("train loss", history)]
    curves = {}
    for name, points in items:
        points = [(float(s), float(v)) for s, v in points]
        if points:
            steps, values = zip(*points)
            curves[name] = (np.array(steps), np.array(values))
    return curves


def plot_losses(history, title="Loss", logy=False, smooth=0):
    """Loss curves against the step. ``history`` is a list of (step, loss) pairs (``Trainer.losses``),
    a list of dicts with a ``"step"`` key (``Trainer.history``: every numeric key is a curve), or a
    dict ``{name: [(step, value), …]}``, e.g. ``{"train": trainer.losses, "valid": …}``.
    ``smooth=n``: a curve with more than n points is drawn faintly, under its mean over a sliding window
    of n points (single batches' losses are noisy)."""
    if smooth < 0:
        raise ValueError(f"plot_losses: smooth must be >= 0 points, got {smooth}")
    curves = _curves(history)
    if not curves:
        raise ValueError("plot_losses: the history holds no (step, value) points")
    fig = _figure(7, 4, "constrained")
    ax = fig.subplots()
    for name, (steps, values) in curves.items():
        if smooth > 1 and len(values) > smooth:
            line, = ax.plot(steps, values, alpha=0.3, linewidth=0.8)
            mean = np.convolve(values, np.ones(smooth) / smooth, mode="valid")  # window ending at each step
            ax.plot(steps[smooth - 1:], mean, color=line.get_color(), label=f"{name}, mean of {smooth}")
            continue
        ax.plot(steps, values, label=name, marker="o" if len(steps) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if logy:
        ax.set_yscale("log")
    ax.legend()
    ax.set_title(title)
    return fig
