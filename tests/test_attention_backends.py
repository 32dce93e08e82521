"""--attention-backend unfused | fused_softmax | sdpa | auto through the whole GPT model (fp32, dropout 0).

The three backends must give the same per-token loss and the same gradient for every parameter.
On CPU the fused_softmax backend normally falls back to the torch softmax; here it is also run with
the Triton kernel forced on (the kernel under Triton's CPU interpreter), so the model-level parity
covers the kernel itself, forward and backward. --no-masked-softmax-fusion must keep the torch path.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports the Triton kernels

from megatron_lite.config import ModelConfig, parse_args  # noqa: E402
from megatron_lite.kernels import fused_softmax as fs  # noqa: E402
from megatron_lite.kernels.fused_softmax import FusedScaleMaskSoftmax, kernel_fits  # noqa: E402
from megatron_lite.model import GPTModel, get_ltor_masks_and_position_ids, resolve_attention_backend  # noqa: E402
from megatron_lite.parallel.state import ParallelState  # noqa: E402

B, S, V, EOD = 2, 16, 128, 0


def tiny(**kw) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=S, vocab_size=V,
                padded_vocab_size=V, hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return ModelConfig(**base)


def batch(with_documents: bool):
    """Tokens, labels, position ids and (with documents) the reset-attention-mask [B, 1, S, S]."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, V, (B, S), generator=g)
    labels = torch.randint(1, V, (B, S), generator=g)
    ids[0, 5] = EOD
    ids[1, 11] = EOD
    mask, _, pos = get_ltor_masks_and_position_ids(ids, EOD, with_documents, with_documents, False)
    return ids, labels, pos, mask


def loss_and_grads(model, ids, labels, pos, mask):
    model.zero_grad(set_to_none=True)
    loss = model(ids, pos, mask, labels=labels)
    loss.mean().backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def close(actual, expected, rel=1e-5):
    """Within rel of the reference, relative to the reference tensor's largest magnitude."""
    scale = float(expected.abs().max()) + 1e-30
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def softmax_modules(model):
    return [m for m in model.modules() if isinstance(m, FusedScaleMaskSoftmax)]


@pytest.fixture
def kernel_on_any_device(monkeypatch):
    """Lift the CUDA-only part of the dispatch rule (the Triton interpreter runs CPU tensors), keep the
    shape rules, and count kernel calls. Returns (enable(model), calls)."""
    if not fs.triton_importable():
        pytest.skip("triton is not installed")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA device and TRITON_INTERPRET is off")
    calls = []
    real_kernel = fs.fused_scale_mask_softmax

    def counting_kernel(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real_kernel(*args, **kwargs)

    def uses_kernel(self, scores, mask=None):
        return self.kernel_available and kernel_fits(
            tuple(scores.shape), scores.dtype, None if mask is None else tuple(mask.shape),
            None if mask is None else mask.dtype)

    monkeypatch.setattr(fs, "fused_scale_mask_softmax", counting_kernel)
    monkeypatch.setattr(FusedScaleMaskSoftmax, "uses_kernel", uses_kernel)

    def enable(model):
        # What construction decides on a CUDA machine: available wherever fusion was asked for.
        for m in softmax_modules(model):
            m.kernel_available = m.masked_softmax_fusion and fs.triton_importable()
    return enable, calls


@pytest.mark.timeout(120)
@pytest.mark.parametrize("with_documents", [False, True])
def test_backends_same_loss_and_grads(with_documents, kernel_on_any_device):
    enable, calls = kernel_on_any_device
    ids, labels, pos, mask = batch(with_documents)
    results = {}
    for backend in ("unfused", "fused_softmax", "sdpa"):
        model = GPTModel(tiny(attention_backend=backend), ParallelState())
        assert model.attention_backend == backend
        results[backend] = loss_and_grads(model, ids, labels, pos, mask)
    assert not calls  # without the override nothing on CPU reaches the kernel

    model = GPTModel(tiny(attention_backend="fused_softmax"), ParallelState())
    enable(model)
    results["fused_softmax (Triton kernel)"] = loss_and_grads(model, ids, labels, pos, mask)
    assert len(calls) == 2 and all(shape == (B, 4, S, S) for shape in calls)  # one per layer

    ref_loss, ref_grads = results["unfused"]
    assert torch.isfinite(ref_loss).all()
    for backend, (loss, grads) in results.items():
        close(loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            close(grads[name], g)


def test_no_masked_softmax_fusion_maps_to_torch_path(kernel_on_any_device):
    enable, calls = kernel_on_any_device
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", str(S),
             "--vocab-size", str(V), "--hidden-dropout", "0", "--attention-dropout", "0"]
    cfg = parse_args(flags + ["--attention-backend", "fused_softmax", "--no-masked-softmax-fusion"]).model
    assert cfg.masked_softmax_fusion is False
    model = GPTModel(cfg, ParallelState())
    enable(model)  # even where the kernel could run, the flag keeps every layer on torch
    mods = softmax_modules(model)
    assert len(mods) == 2 and all(not m.masked_softmax_fusion and not m.kernel_available for m in mods)
    ids, labels, pos, mask = batch(True)
    loss, _ = loss_and_grads(model, ids, labels, pos, mask)
    assert not calls
    # The unfused backend is the same torch code: bitwise-equal losses.
    unfused = GPTModel(parse_args(flags + ["--attention-backend", "unfused"]).model, ParallelState())
    enable(unfused)
    assert all(not m.masked_softmax_fusion for m in softmax_modules(unfused))
    assert torch.equal(loss, loss_and_grads(unfused, ids, labels, pos, mask)[0])
    assert not calls


def test_auto_resolves_to_an_available_backend():
    assert resolve_attention_backend(tiny(attention_backend="auto")) in (
        "sdpa", "fused_softmax", "unfused")
    model = GPTModel(tiny(attention_backend="auto"), ParallelState())
    assert model.attention_backend == resolve_attention_backend(tiny(attention_backend="auto"))
    with pytest.raises(ValueError, match="--attention-backend"):
        resolve_attention_backend(tiny(attention_backend="flash"))


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_fused_backend_takes_kernel_on_cuda():
    """On a GPU, with no override: the fused_softmax backend's layers run the Triton kernel and match unfused."""
    from megatron_lite.parallel.state import ParallelState
    if not fs.triton_importable():
        pytest.skip("triton is not installed")
    ids, labels, pos, mask = (t.cuda() if t is not None else None for t in batch(True))
    pstate = ParallelState(backend="nccl")  # its .device is then the current CUDA device (no group needed at TP=1)
    fused = GPTModel(tiny(attention_backend="fused_softmax"), pstate)
    assert all(m.kernel_available for m in softmax_modules(fused))
    scores = torch.empty(B, 4, S, S, device="cuda")
    assert all(m.uses_kernel(scores, mask) for m in softmax_modules(fused))
    unfused = GPTModel(tiny(attention_backend="unfused"), pstate)
    loss_f, grads_f = loss_and_grads(fused, ids, labels, pos, mask)
    loss_u, grads_u = loss_and_grads(unfused, ids, labels, pos, mask)
    close(loss_f, loss_u)
    for name, g in grads_u.items():
        close(grads_f[name], g)


# ---- benchmarks/benchmark_throughput.py on CPU (in-process: no extra torch import) ----

def load_tool(name):
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"tool_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_throughput_benchmark_cpu(tmp_path, capsys):
    """One tiny fp32 step per backend: the JSON's figures are consistent with the step time and the
    analytic FLOP count, and MFU uses the peak it says it used."""
    import json
    from megatron_lite.model.flops import num_floating_point_operations
    tool = load_tool("benchmark_throughput")
    out = tmp_path / "throughput.json"
    for backend in ("unfused", "sdpa"):
        rc = tool.main(["--device", "cpu", "--models", "tiny", "--seq-lengths", "32", "--micro-batch-size", "2",
                        "--warmup", "0", "--iters", "2", "--attention-backend", backend, "--peak-tflops", "0.5",
                        "--output", str(out)])
        assert rc == 0
        res = json.loads(out.read_text())
        assert res["peak_tflops"] == 0.5 and res["peak_source"] == "--peak-tflops"
        (row,) = res["rows"]
        assert row["attention_backend"] == backend and row["optimizer"].startswith("megatron_lite.optim")
        cfg = tool.model_config("tiny", 32, tool.parse_args(["--device", "cpu"]))
        assert row["flops_per_step"] == num_floating_point_operations(cfg, 2)
        assert row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_time_s"])
        assert row["tflops_per_device"] == pytest.approx(row["flops_per_step"] / row["step_time_s"] / 1e12)
        assert row["mfu_pct"] == pytest.approx(100 * row["tflops_per_device"] / 0.5)
        assert row["last_loss"] < row["first_loss"]  # the optimizer step really updates the model
        assert row["peak_memory_gib"] > 0
    printed = capsys.readouterr().out
    assert "MFU peak: 0.5 TFLOP/s (--peak-tflops)" in printed and "tokens/s" in printed


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA refusal")
def test_throughput_benchmark_refuses_cuda_without_device(capsys):
    tool = load_tool("benchmark_throughput")
    with pytest.raises(SystemExit) as e:
        tool.parse_args(["--device", "cuda"])
    assert e.value.code == 2 and "no CUDA device" in capsys.readouterr().err
