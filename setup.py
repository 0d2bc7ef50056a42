"""Packaging for ebpo_megatron (EBPO on Megatron-Core).

Install torch first (``pip install torch==2.13.0`` gives the CPU build on a laptop); the
requirement below is a range that an installed torch already satisfies, so pip pulls nothing.
NVIDIA apex is *not* a dependency: the PyPI project called ``apex`` is unrelated, and
Megatron-Core runs without apex (it falls back to torch AdamW and plain layer norms).
"""

from setuptools import find_packages, setup

CORE_REQUIREMENTS = [
    "torch>=2.4",
    # 0.16.x is the last line that installs on Python 3.11; 0.17+ needs Python >= 3.12. The
    # patches of ebpo_megatron/parallel/megatron_patches.py are written for 0.16.x and refuse
    # another release at start-up (SUPPORTED_MEGATRON_CORE).
    "megatron-core>=0.16.1,<0.17",
    "numpy>=1.24",
    "pyyaml>=6.0",
    "sentencepiece>=0.2",
    "tqdm>=4.66",
    "matplotlib>=3.7",
    "wandb>=0.17",
    "psutil>=5.9",  # dist_checkpointing's writer process needs it
    "einops>=0.7",
    "xxhash>=3.0",  # checkpoint checksums (MANIFEST.json), about 15 GB/s
]

EXTRAS = {
    "gpu": ["transformer-engine[pytorch]>=1.13"],
    "vllm": ["vllm>=0.10.2"],  # sleep mode, collective_rpc weight loading, processed logprobs
    # the verifiable math reward and the math datasets (parquet, HF tokenizers from a local dir)
    "math": [
        "math-verify>=0.9",
        "pyarrow>=15",
        "transformers>=4.51",
        "tokenizers>=0.21",
        "tiktoken>=0.7",
    ],
    # the real-model demo (`make real`): tools/fetch_smollm2.py reads a GGUF file with transformers
    "smollm2": ["gguf>=0.10", "accelerate>=1.0", "transformers>=5.0"],
    # tests compare against Hugging Face `transformers` models built from configs (no download)
    # tools/compare.py: paired confidence intervals (scipy.stats)
    "study": ["scipy>=1.11"],
    "dev": ["pytest>=8.0", "pytest-timeout>=2.3", "hypothesis>=6.100", "transformers>=4.51", "safetensors>=0.4",
            "import-linter>=2.1"],
}

setup(
    name="ebpo_megatron",
    version="0.1.0",
    description="Empirical Bayes Policy Optimization (EBPO) for RLVR on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["ebpo_megatron", "ebpo_megatron.*"]),
    install_requires=CORE_REQUIREMENTS,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": [
            "ebpo-train=ebpo_megatron.train:main",
            "ebpo-plan=ebpo_megatron.planner:main",
            "ebpo-eval=ebpo_megatron.evaluate:main",
        ]
    },
)
