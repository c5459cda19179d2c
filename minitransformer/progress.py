"""Progress bars: tqdm's widget in a notebook that can draw it, its text bar everywhere else."""
import importlib.util


def progress_bar(**kwargs):
    """``tqdm(**kwargs)``. ``tqdm.auto`` picks the notebook widget inside Jupyter, which needs
    ipywidgets: without it tqdm warns ("IProgress not found") on every bar, so take the text bar."""
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(**kwargs)
