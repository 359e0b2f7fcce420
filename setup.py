from setuptools import setup

setup(
    name="fusedres",
    version="0.1.0",
    description="Fused Triton kernels for ResNet blocks: conv + batch-norm + ReLU + residual add",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fusedres", "fusedres.kernels"],
    # The device code lives in the top-level kernels/ folder but is installed as fusedres.kernels:
    # a top-level "kernels" package name is taken on PyPI.
    package_dir={"fusedres": "fusedres", "fusedres.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        # Triton ships wheels for Linux only; elsewhere the package still installs and falls back.
        'triton; platform_system == "Linux"',
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["fusedres = fusedres.cli:main"]},
)
