"""Progress bars: the notebook widget only where ipywidgets can draw it (else tqdm warns on every bar);
elsewhere without a terminal, plain lines (``LineProgress``), or none at all when disabled."""
import importlib.util

import pytest
import tqdm.auto
import tqdm.std

from minitransformer import progress


@pytest.mark.parametrize("has_ipywidgets", [False, True])
def test_the_widget_bar_only_with_ipywidgets(monkeypatch, has_ipywidgets):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (find_spec("tqdm") if has_ipywidgets else None) if name == "ipywidgets"
                        else find_spec(name, *a))
    bar = progress.progress_bar(total=3, disable=True)
    assert type(bar) is (tqdm.auto.tqdm if has_ipywidgets else tqdm.std.tqdm)
    bar.close()


@pytest.mark.parametrize("disable", [False, True])
def test_line_progress_writes_lines_and_nothing_when_disabled(capsys, disable):
    """Enabled: plain lines on stderr (every=0: at each update), the last one not repeated by close.
    Disabled (``train --no-progress``): no lines, but ``write`` still reaches stdout."""
    bar = progress.LineProgress(total=3, unit="step", every=0, disable=disable)
    for _ in range(3):
        bar.set_postfix(loss="1.000", refresh=False)
        bar.update(1)
    bar.write("step 3 | valid_loss 2.5")
    out, err = capsys.readouterr()
    bar.close()
    assert out == "step 3 | valid_loss 2.5\n" and capsys.readouterr() == ("", "")
    if disable:
        assert err == ""
    else:
        assert "\r" not in err
        assert err.splitlines()[-1].startswith("3/3 step (100%), 0:00") and err.endswith("loss=1.000\n")
