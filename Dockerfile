# GPU image: NVIDIA's PyTorch container already carries CUDA, NCCL, apex and triton.
#   docker build -t megatron_lite .
#   docker run --gpus all --ipc=host -v /data:/data megatron_lite bash examples/pretrain_gpt_345m_1gpu.sh
FROM nvcr.io/nvidia/pytorch:24.10-py3

WORKDIR /workspace/megatron_lite
COPY setup.py README.md ./
COPY megatron_lite ./megatron_lite
COPY tools ./tools
COPY benchmarks ./benchmarks
COPY examples ./examples
COPY tests ./tests
# --no-deps keeps the container's own CUDA build of torch (and its triton) instead of a PyPI wheel.
RUN pip install --no-cache-dir regex tokenizers tensorboard pytest pytest-timeout hypothesis \
 && pip install --no-cache-dir --no-deps -e .
ENV OMP_NUM_THREADS=1
CMD ["bash"]
