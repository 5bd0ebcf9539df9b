from setuptools import setup

setup(
    name="fused_xent",
    version="0.1.0",
    description="One-pass Triton softmax cross-entropy (loss and gradient) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fused_xent", "fused_xent.kernels"],
    # kernels/ sits at the top of the repository but installs inside the package, so no module
    # named plain `kernels` lands in site-packages.
    package_dir={"fused_xent": "fused_xent", "fused_xent.kernels": "kernels"},
    # numpy: Triton's CPU interpreter (TRITON_INTERPRET=1) runs kernels with it.
    # torch 2.4: torch.library.custom_op / register_fake (fused_xent/ops.py) and the
    # device-generic torch.get_autocast_dtype / is_autocast_enabled(device_type) (functional.py).
    # Triton 3.6: the oldest release the kernels are compiled with (3.6 on the GPU machine, 3.9
    # from PyPI on the CPU).
    install_requires=["torch>=2.4", "triton>=3.6; platform_system == 'Linux'", "numpy"],
    extras_require={
        # expecttest: tests/test_opinfo.py imports torch's OpInfo database, which needs it.
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "pytest-xdist>=3",
            "hypothesis>=6",
            "expecttest",
        ],
        "dev": ["ruff>=0.6"],
        # bench/report.py draws report.png with it (and skips the plot without it).
        "bench": ["matplotlib>=3.7"],
        # fused_xent.hf (tests/test_hf.py, examples/hf_finetune.py); tested with transformers
        # 4.57.6, 5.24.0 and 5.25.0 (2026-12-07, with kernels 0.19.1). accelerate: transformers'
        # Trainer needs it (5.x: >= 1.1).
        "hf": ["transformers>=4.57,<6", "accelerate>=1.1"],
        # TRL's trainers served by fused_xent.hf.patch (fused_xent/_trl.py reads TRL's internals:
        # tested with 1.16.0, 2026-12-08) and PEFT models / LoRA heads (tested with 0.22.0).
        "trl": ["trl>=1.16,<1.17"],
        "peft": ["peft>=0.22,<0.23"],
    },
)
