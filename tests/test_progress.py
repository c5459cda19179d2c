"""Progress bars: the notebook widget only where ipywidgets can draw it (else tqdm warns on every bar)."""
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
