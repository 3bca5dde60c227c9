"""Blues: Mixture-of-Experts language models trained with DeepSpeed.

The Triton kernels live in the top-level ``kernels/`` folder but install as
``blues.kernels``: another widely installed distribution already owns the
import name ``kernels``.
"""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="blues",
    version="0.1.0",
    description="Mixture-of-Experts language models trained with DeepSpeed",
    long_description=Path("README.md").read_text(encoding="utf-8") if Path("README.md").is_file() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["blues", "blues.*"]) + ["blues.kernels", "blues.assets"],
    package_dir={"blues.kernels": "kernels"},
    package_data={"blues.assets": ["tokenizer.json", "tokenizer.tiktoken"]},
    include_package_data=True,
    # launch/ (the sbatch template, shell entry points) for regular, non-editable installs.
    data_files=[("share/blues/launch", ["launch/blues.sbatch", "launch/train.sh", "launch/slurm_setup.sh",
                                        "launch/train.py"])],
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.16",
        "triton>=3.0; platform_system == 'Linux'",
        "tiktoken>=0.7",
        "datasets>=3.0",
        "safetensors>=0.4",
        "rustbpe>=0.1",
        "numpy",
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        # transformers: tests/test_hf.py's references (tiny Mixtral / Qwen3-MoE built from a config, no download);
        # matplotlib: blues-experts plot and benchmarks/quality.py's PNG. 5.23+ breaks DeepSpeed 0.19.8's AutoEP.
        # Pillow: blues-prepare --images and the vision tests; tokenizers (with transformers): a Hugging Face
        # tokenizer.json (blues/data/hf_tokenizer.py); transformers in vision: vision_pretrained's CLIP / SigLIP towers
        "dev": ["pytest>=8", "pytest-timeout", "tensorboard", "ruff==0.17.6", "transformers==5.22.2",
                "matplotlib>=3.8", "Pillow>=9"],
        "hf": ["tokenizers>=0.15"],
        "vision": ["Pillow>=9", "transformers==5.22.2"],
        "flash": ["flash-attn>=2.6"],
        # benchmarks/ep_throughput.py: DeepSpeed 0.19.8's AutoEP on HF Mixtral (5.23+ breaks its preset);
        # benchmarks/quality.py: its PNG of validation loss against steps and seconds
        "bench": ["transformers==5.22.2", "matplotlib>=3.8"],
    },
    entry_points={
        "console_scripts": [
            "blues-prepare=blues.cli.prepare:main",
            "blues-train=blues.cli.train:entry_point",
            "blues-generate=blues.cli.generate:main",
            "blues-probe=blues.cli.probe:main",
            "blues-submit=blues.cli.submit:main",
            "blues-import=blues.cli.hf:import_main",
            "blues-export=blues.cli.hf:export_main",
            "blues-experts=blues.cli.experts:main",
            "blues-prune=blues.cli.prune:main",
            "blues-upcycle=blues.cli.upcycle:main",
        ]
    },
)
