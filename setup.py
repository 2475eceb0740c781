"""Installs the GPT-2 training engine: the `engine` and `gpt2_kernels` packages.

CPU-only machines should install the CPU build of PyTorch first
(`pip install torch==2.13.0`); a bare `torch` requirement otherwise pulls a
multi-GB CUDA build.
"""
from setuptools import setup

# `python -m engine.data prepare` of Parquet (pyarrow), .zst JSON lines (zstandard)
# and Hugging Face datasets (datasets; its IterableDataset.state_dict resumes a stream).
DATA_EXTRA = ["pyarrow>=15", "zstandard>=0.19", "datasets>=2.19"]

setup(
    name="gpt2-triton-engine",
    version="0.1.0",
    description="GPT-2 training engine whose layers run hand-written Triton kernels",
    packages=["engine", "gpt2_kernels"],
    python_requires=">=3.11",
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        "tiktoken>=0.6",
        "matplotlib>=3.7",  # loss.png of every run, the report's plots
        # Triton ships for Linux only; macOS and Windows users run the PyTorch path.
        'triton>=3.0; platform_system == "Linux"',
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "transformers>=4.40",
            "safetensors>=0.4",
            *DATA_EXTRA,  # the tests prepare Parquet, .zst and Hugging Face inputs
        ],
        "data": DATA_EXTRA,
        # What the benchmarks compare ours with beside PyTorch (bench/cases.py): rows
        # whose package is missing say so and are skipped.
        "peers": ["liger-kernel>=0.5"],
    },
)
