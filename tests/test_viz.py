"""Tests for minitransformer.viz: every figure function returns a Figure and writes a real PNG."""
from types import SimpleNamespace

import numpy as np
import pytest
from matplotlib.figure import Figure

from minitransformer import viz
from minitransformer.nn.layers import sinusoid_table
from minitransformer.optim import NoamSchedule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def attention(rng, h, Lq, Lk):
    w = rng.random((h, Lq, Lk))
    return w / w.sum(-1, keepdims=True)


def assert_png(path):
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def assert_one_colorbar_from_0_to_1(fig):
    """Weights are read off one shared scale (a child of one panel: fig.axes stays one per head)."""
    bars = [c for ax in fig.axes for c in ax.child_axes]
    assert len(bars) == 1 and bars[0].get_ylim() == (0.0, 1.0)


def test_plot_attention_grid(rng, tmp_path):
    h, Lq, Lk = int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
    fig = viz.plot_attention_grid(attention(rng, h, Lq, Lk), [f"k{i}" for i in range(Lk)],
                                  [f"q{i}" for i in range(Lq)], title="one layer")
    assert isinstance(fig, Figure) and len(fig.axes) == h
    assert_one_colorbar_from_0_to_1(fig)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [f"k{i}" for i in range(Lk)]
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == [f"q{i}" for i in range(Lq)]
    assert_png(viz.save_figure(fig, tmp_path / "grid.png"))


def test_a_figure_shows_itself_in_a_notebook_without_pyplot(rng):
    # IPython displays an object that ends a cell through its _repr_png_
    png = viz.plot_attention_grid(attention(rng, 2, 3, 4))._repr_png_()
    assert png[:8] == PNG_MAGIC


def test_plot_attention_grid_accepts_one_head_and_no_labels(rng):
    assert len(viz.plot_attention_grid(attention(rng, 1, 3, 4)[0]).axes) == 1


def test_plot_attention_grid_rejects_wrong_labels(rng):
    with pytest.raises(ValueError, match="labels"):
        viz.plot_attention_grid(attention(rng, 2, 3, 4), ["a", "b"], ["x", "y", "z"])
    with pytest.raises(ValueError, match=r"\(h, Lq, Lk\)"):
        viz.plot_attention_grid(np.zeros((1, 2, 3, 4)))


def test_plot_all_attention(rng, tmp_path):
    N, h, S, T = int(rng.integers(1, 4)), int(rng.integers(1, 5)), int(rng.integers(2, 9)), int(rng.integers(2, 9))
    src, tgt = [f"▁s{i}" for i in range(S)], ["<s>"] + [f"▁t{i}" for i in range(T - 1)]
    path = tmp_path / "sub" / "attention.png"
    fig = viz.plot_all_attention([attention(rng, h, S, S)] * N, np.stack([attention(rng, h, T, T)] * N),
                                 [attention(rng, h, T, S)] * N, src, tgt, path, title="a → b")
    assert isinstance(fig, Figure) and len(fig.axes) == 3 * N * h
    assert_one_colorbar_from_0_to_1(fig)
    assert_png(path)
    labelled = {tuple(t.get_text() for t in ax.get_xticklabels()) for ax in fig.axes} - {()}
    assert labelled == {tuple(src), tuple(tgt)}      # keys: source for encoder and cross, target for decoder


def test_plot_all_attention_draws_only_the_layers_asked_for(rng):
    h, S, T = 2, 3, 4
    kinds = ([attention(rng, h, S, S) for _ in range(3)], [attention(rng, h, T, T) for _ in range(3)],
             [attention(rng, h, T, S) for _ in range(3)])
    fig = viz.plot_all_attention(*kinds, list("abc"), list("wxyz"), layers=[-1, 0])
    assert len(fig.axes) == 3 * 2 * h
    names = [t.get_text() for t in fig.texts]
    assert names == [f"{kind}, layer {n}" for kind in ("encoder self-attention", "decoder self-attention",
                                                       "cross-attention") for n in (1, 3)]
    # each kind's last drawn layer names the keys, and the weights drawn are those of layer 3
    np.testing.assert_array_equal(fig.axes[2].images[0].get_array(), kinds[0][2][0])
    assert [t.get_text() for t in fig.axes[2].get_xticklabels()] == list("abc")
    with pytest.raises(ValueError, match="layer index 3 is out of range for the 3 layers of encoder self-attention"):
        viz.plot_all_attention(*kinds, list("abc"), list("wxyz"), layers=[3])


def test_plot_all_attention_checks_shapes(rng):
    with pytest.raises(ValueError, match="cross-attention"):
        viz.plot_all_attention([attention(rng, 2, 3, 3)], [attention(rng, 2, 4, 4)], [attention(rng, 2, 4, 5)],
                               list("abc"), list("wxyz"))


def test_helper_plots(tmp_path):
    figs = {
        "pe": viz.plot_positional_encoding(sinusoid_table(50, 32)),
        "lr": viz.plot_learning_rate(NoamSchedule(SimpleNamespace(lr=0.0), 512, 4000).rate, 10000),
        "lr2": viz.plot_learning_rate({"warmup 4000": lambda s: min(s ** -0.5, s * 4000 ** -1.5),
                                       "warmup 8000": lambda s: min(s ** -0.5, s * 8000 ** -1.5)}, range(1, 20000, 10)),
        "losses": viz.plot_losses([(10, 5.0), (20, 4.0), (30, 3.5)]),
        "history": viz.plot_losses([{"step": 10, "valid_loss": 4.5, "samples": ["x"]}, {"step": 20, "valid_loss": 4.0}]),
        "dict": viz.plot_losses({"train": [(1, 3.0), (2, 2.0)], "valid": [(2, 2.5)]}, logy=True),
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure)
        assert_png(viz.save_figure(fig, tmp_path / f"{name}.png"))


def test_plot_losses_needs_points():
    with pytest.raises(ValueError, match="no"):
        viz.plot_losses([])
    with pytest.raises(ValueError, match="smooth must be >= 0"):
        viz.plot_losses([(1, 2.0)], smooth=-1)


def test_plot_losses_smooths_long_curves():
    """smooth=n: a curve with more than n points is drawn faintly, under its mean over windows of n
    points ending at each step; shorter curves are drawn as they are."""
    train = [(10 * i, float(v)) for i, v in enumerate([5, 1, 3, 7, 2, 2, 6], start=1)]
    fig = viz.plot_losses({"train": train, "valid": [(20, 4.0), (70, 3.0)]}, smooth=3)
    raw, mean, valid = fig.axes[0].get_lines()
    np.testing.assert_array_equal(raw.get_ydata(), [5, 1, 3, 7, 2, 2, 6])
    np.testing.assert_array_equal(mean.get_xdata(), [30, 40, 50, 60, 70])
    np.testing.assert_allclose(mean.get_ydata(), [3, 11 / 3, 4, 11 / 3, 10 / 3])
    assert mean.get_color() == raw.get_color() and raw.get_alpha() < 1
    np.testing.assert_array_equal(valid.get_ydata(), [4.0, 3.0])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["train, mean of 3", "valid"]


def test_save_figure_is_atomic(tmp_path, rng):
    """A figure that fails to render leaves neither a partial file nor a temporary one."""
    fig = viz.plot_attention_grid(attention(rng, 1, 2, 2))
    with pytest.raises(ValueError):
        viz.save_figure(fig, tmp_path / "figure.notaformat")
    assert list(tmp_path.iterdir()) == []
