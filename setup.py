from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="minitransformer",
    version="0.1.0",
    description='The Transformer of "Attention Is All You Need" from scratch on NumPy/CuPy, '
                "with a hand-written backward for every op",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["minitransformer", "minitransformer.*"]),
    install_requires=["numpy>=1.24", "sentencepiece>=0.1.99", "matplotlib>=3.6", "tqdm>=4.60",
                      "sacrebleu>=2.3"],
    extras_require={
        # PyTorch is only a reference for the parity tests and benchmarks, never a runtime need;
        # the tests execute the notebooks, as Jupyter would.
        "test": ["pytest>=7", "torch", "nbformat>=5", "nbclient>=0.7", "ipykernel>=6"],
        "notebooks": ["nbformat>=5", "nbclient>=0.7", "ipykernel>=6", "jupyterlab>=4", "ipywidgets>=8"],
        "cuda12": ["cupy-cuda12x>=13"],
        "cuda13": ["cupy-cuda13x>=14"],
    },
    entry_points={"console_scripts": ["minitransformer=minitransformer.cli:main"]},
)
