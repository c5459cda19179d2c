"""Progress bars: tqdm's widget in a notebook that can draw it, its text bar at a terminal, and plain
lines everywhere else (a log file, a pipe), which a redrawn bar would fill with ``\\r`` frames."""
import importlib.util
import sys
import time

LINE_EVERY_SECONDS = 30   # without a terminal: at most one progress line this often (and one at the end)


def progress_bar(**kwargs):
    """``tqdm(**kwargs)`` in Jupyter, when stderr is a terminal or when the bar is disabled (it draws
    nothing), else a ``LineProgress``. ``tqdm.auto``
    picks the notebook widget inside Jupyter, which needs ipywidgets: without it tqdm warns
    ("IProgress not found") on every bar, so take the text bar."""
    if not (kwargs.get("disable") or _in_jupyter() or _is_a_terminal(kwargs.get("file") or sys.stderr)):
        return LineProgress(**kwargs)
    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm
    return tqdm(**kwargs)


def _is_a_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # no isatty, or a closed stream
        return False


def _in_jupyter():
    """Inside a Jupyter kernel (whose stderr is no terminal but draws bars): asked only when IPython
    is already loaded, so a command does not import it."""
    if "IPython" not in sys.modules:
        return False
    shell = sys.modules["IPython"].get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class LineProgress:
    """The part of tqdm's interface the package uses, written as plain lines: ``desc: 120/1500 step
    (8%), 0:48, 2.5 step/s, loss=3.210 …`` at most every ``every`` seconds, and once more on ``close``
    (unless ``leave=False``); with ``disable=True``, no lines at all. ``write`` prints to stdout, as
    ``tqdm.write`` does, but flushed (also when disabled), so a log file gets each line as it is written."""

    def __init__(self, total=None, initial=0, unit="it", desc=None, leave=True, disable=False, file=None,
                 unit_scale=False, every=LINE_EVERY_SECONDS, **_):
        self.total, self.n, self.unit, self.desc, self.leave = total, initial, unit, desc, leave
        self.disable, self.file, self.unit_scale, self.every = disable, file, unit_scale, every
        self.postfix = {}
        self.started = self.last_line = time.perf_counter()
        self.initial, self.shown_n, self.closed = initial, None, False

    def update(self, n=1):
        self.n += n
        self._maybe_line()

    def set_postfix(self, refresh=True, **kwargs):
        self.postfix = {k: v for k, v in kwargs.items()}
        self._maybe_line()

    def write(self, s, file=None, **_):
        print(s, file=file or sys.stdout, flush=True)

    def close(self):
        if not self.closed and self.leave and self.shown_n != self.n:
            self._line()
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _maybe_line(self):
        if time.perf_counter() - self.last_line >= self.every:
            self._line()

    def _line(self):
        if self.disable:
            return
        now = time.perf_counter()
        self.last_line, self.shown_n = now, self.n
        elapsed = now - self.started
        count = f"{self._amount(self.n)}/{self._amount(self.total)}" if self.total else self._amount(self.n)
        parts = [f"{count} {self.unit}" + (f" ({100 * self.n / self.total:.0f}%)" if self.total else ""),
                 f"{int(elapsed) // 60}:{int(elapsed) % 60:02d}"]
        if elapsed > 0 and self.n > self.initial:
            parts.append(f"{self._amount((self.n - self.initial) / elapsed, rate=True)} {self.unit}/s")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        print((f"{self.desc}: " if self.desc else "") + ", ".join(parts), file=self.file or sys.stderr, flush=True)

    def _amount(self, n, rate=False):
        if self.unit_scale:
            for prefix in ("", "k", "M", "G"):
                if abs(n) < 1000:
                    return f"{n:.1f}{prefix}" if prefix or rate else f"{n:.0f}"
                n /= 1000
            return f"{n:.1f}T"
        return f"{n:.1f}" if rate else f"{n:g}" if isinstance(n, float) else str(n)
