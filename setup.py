from setuptools import find_packages, setup

setup(
    name="megatron_lite",
    version="0.1.0",
    description="A compact Megatron-style model-parallel GPT codebase: TP, PP, DP/ZeRO-1, fused softmax.",
    packages=find_packages(include=["megatron_lite", "megatron_lite.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "regex", "tokenizers", "tiktoken", "tensorboard", "safetensors"],
    extras_require={
        # triton's interpreter runs the fused-softmax kernel tests on CPU; it has wheels only for Linux
        # x86-64, where tests/test_fused_softmax.py therefore fails (rather than skips) without it.
        # transformers: the HuggingFace GPT-2 export/import parity tests; matplotlib: the layout sweep's
        # PNG chart is part of what its test checks
        "test": ["pytest", "pytest-timeout", "hypothesis", "transformers", "matplotlib",
                 'triton; platform_system == "Linux" and platform_machine == "x86_64"'],
        "gpu": ["triton"],
        # the layout benchmark's PNG chart (benchmarks/benchmark_layouts.py); without it the chart is skipped
        "plots": ["matplotlib"],
    },
)
