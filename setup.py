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
    install_requires=["torch>=2.1", "triton>=3.0; platform_system == 'Linux'", "numpy"],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "hypothesis>=6"],
        "dev": ["ruff>=0.6"],
    },
)
