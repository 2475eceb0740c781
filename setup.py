"""Installs the GPT-2 training engine: the `engine` and `gpt2_kernels` packages.

CPU-only machines should install the CPU build of PyTorch first
(`pip install torch==2.13.0`); a bare `torch` requirement otherwise pulls a
multi-GB CUDA build.

Each floor below is a version CI installs and tests: `.ci/run` pins every `>=`
here to `==` in an environment of its own and runs the `smoke` tests there (and
the sm_90 compile check, whose Triton is the floor's).
"""
from setuptools import find_packages, setup

# `python -m engine.data prepare` of Parquet (pyarrow), .zst JSON lines (zstandard)
# and Hugging Face datasets (datasets: 2.20 is the first whose IterableDataset.state_dict resumes a stream).
DATA_EXTRA = ["pyarrow>=15", "zstandard>=0.19", "datasets>=2.20"]

setup(
    name="gpt2-triton-engine",
    version="0.1.0",
    description="GPT-2 training engine whose layers run hand-written Triton kernels",
    # Only the engine and its kernels are import names of this distribution:
    # tests/ and bench/ run from a checkout.
    packages=find_packages(include=["engine", "engine.*", "gpt2_kernels", "gpt2_kernels.*"]),
    python_requires=">=3.11",  # tomllib
    install_requires=[
        # 2.13: the oldest CPU build CI can install (older Linux wheels on PyPI are
        # CUDA builds of several GB); the code needs at least torch.nn.utils.get_total_norm
        # and torch.mm(..., out_dtype=).
        "torch>=2.13",
        "numpy>=1.24",
        "tiktoken>=0.6",
        "matplotlib>=3.7",  # loss.png of every run, the report's plots
        # Triton ships for Linux only; macOS and Windows users run the PyTorch path.
        # 3.6: the oldest Triton the kernels are compiled and interpreted with.
        'triton>=3.6; platform_system == "Linux"',
    ],
    extras_require={
        "test": [
            "pytest>=8.1.1",  # pytest-benchmark 5.2's floor (8.1.0 was withdrawn)
            "pytest-benchmark>=5.2",  # pedantic(teardown=...)
            "hypothesis>=6",
            "transformers>=4.40",
            "safetensors>=0.4.1",  # transformers 4.40's own floor
            *DATA_EXTRA,  # the tests prepare Parquet, .zst and Hugging Face inputs
        ],
        "data": DATA_EXTRA,
        # What the benchmarks compare ours with beside PyTorch (bench/cases.py): rows
        # whose package is missing say so and are skipped.
        "peers": ["liger-kernel>=0.5"],
    },
)
