from setuptools import find_packages, setup

setup(
    name="megatron_lite",
    version="0.1.0",
    description="A compact Megatron-style model-parallel GPT codebase: TP, PP, DP/ZeRO-1, fused softmax.",
    packages=find_packages(include=["megatron_lite", "megatron_lite.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "regex", "tokenizers", "tensorboard"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "hypothesis"],
        "gpu": ["triton"],
    },
)
