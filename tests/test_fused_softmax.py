"""The Triton scale-mask-softmax kernel against the torch reference, and FusedScaleMaskSoftmax's dispatch.

Without CUDA the kernel runs under Triton's CPU interpreter: TRITON_INTERPRET=1 must be in the
environment before the kernels are decorated, so it is set here, at import, before anything
imports megatron_lite.kernels.triton_softmax. With CUDA the same checks run on the GPU.
Interpreter runs are slow, so shapes are tiny and the multi-block loop is forced with a small
``max_block`` instead of long rows.
"""
import os
import platform
import subprocess
import sys

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from megatron_lite.kernels import fused_softmax as fs  # noqa: E402
from megatron_lite.kernels.fused_softmax import (FusedScaleMaskSoftmax, causal_mask,  # noqa: E402
                                                 fused_scale_mask_softmax, kernel_fits,
                                                 scale_mask_softmax_reference)

DEVICE = "cuda" if HAS_CUDA else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# setup.py's test extra installs triton wherever it has wheels (Linux x86-64): missing there, it is a broken
# install and the kernel tests fail; elsewhere they skip with a reason that says the kernel went untested.
TRITON_EXPECTED = platform.system() == "Linux" and platform.machine() == "x86_64"


def require_triton():
    if fs.triton_importable():
        return
    message = "triton is not importable, so the Triton softmax kernel was NOT tested"
    if TRITON_EXPECTED:
        pytest.fail(f"{message}; on Linux x86-64 `pip install -e '.[test]'` installs it", pytrace=False)
    pytest.skip(f"{message} (no triton wheels for {platform.system()} {platform.machine()})")


@pytest.fixture
def triton_required():
    require_triton()


needs_triton = pytest.mark.usefixtures("triton_required")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture
def kernel():
    """fused_scale_mask_softmax, after checking it can run here (GPU, or the CPU interpreter)."""
    require_triton()
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was overridden to off and there is no CUDA device")
    mod = sys.modules.get("megatron_lite.kernels.triton_softmax")
    if mod is not None and not HAS_CUDA and "Interpreted" not in type(mod._softmax_fwd_kernel).__name__:
        pytest.skip("triton_softmax was imported before TRITON_INTERPRET=1 was set in this process")
    return fused_scale_mask_softmax


def upstream_grad(x, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(x.shape, generator=g).to(device=x.device, dtype=x.dtype)


def value_and_grad(fn, x, dy, *args):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, *args)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


def run_both(kernel, x, mask, scale, causal, max_block=None):
    """(y_kernel, y_ref, dx_kernel, dx_ref) for the same input and upstream gradient."""
    dy = upstream_grad(x)
    yk, dxk = value_and_grad(kernel, x, dy, mask, scale, causal, max_block)
    yr, dxr = value_and_grad(scale_mask_softmax_reference, x, dy, mask, scale, causal)
    return yk, yr, dxk, dxr


def rand_scores(b, np_, sq, sk, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(b, np_, sq, sk, generator=g)).to(device=DEVICE, dtype=dtype)


def padding_mask(b, sq, sk, seed=1):
    """[b, 1, sq, sk] like a padded batch: each sample masks its trailing keys, plus random holes."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, 1, sq, sk, generator=g) < 0.25
    for i in range(b):
        m[i, :, :, max(1, sk - i * 2):] = True
    return m.to(DEVICE)


def assert_fp32_close(yk, yr, dxk, dxr, scale=1.0):
    """Probabilities within 1e-6; gradients within 1e-6 of the unscaled softmax gradient (dx / scale)."""
    torch.testing.assert_close(yk, yr, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dxk, dxr, rtol=1e-6, atol=1e-6 * max(1.0, abs(scale)))


# ---- kernel vs reference, fp32 ----

@pytest.mark.parametrize("sk", [1, 7, 100, 129])
@pytest.mark.parametrize("masking", ["causal", "padding", "causal+padding", "none"])
def test_single_block_fp32(kernel, sk, masking):
    sq = min(sk, 5) if sk > 1 else 2  # sq != sk also exercises the causal offset i + (sk - sq)
    x = rand_scores(2, 3, sq, sk)
    mask = padding_mask(2, sq, sk) if "padding" in masking else None
    assert_fp32_close(*run_both(kernel, x, mask, 0.37, "causal" in masking))


@pytest.mark.parametrize("sk,max_block", [(100, 16), (129, 32), (7, 2)])
@pytest.mark.parametrize("masking", ["causal", "padding", "causal+padding"])
def test_multi_block_fp32(kernel, sk, max_block, masking):
    """Rows longer than one block: the online max/sum loop and the normalize pass."""
    x = rand_scores(2, 2, 3, sk, seed=sk)
    mask = padding_mask(2, 3, sk) if "padding" in masking else None
    assert_fp32_close(*run_both(kernel, x, mask, 1.9, "causal" in masking, max_block=max_block), scale=1.9)


def test_scale_one_and_large_scale(kernel):
    x = rand_scores(1, 2, 4, 33)
    for scale in (1.0, 8.0):  # 8 * 3 * randn spreads logits widely: max subtraction must hold
        assert_fp32_close(*run_both(kernel, x, None, scale, True), scale=scale)


@pytest.mark.parametrize("mask_shape", [(2, 1, 4, 9), (1, 3, 4, 9), (2, 3, 4, 9), (4, 9)])
def test_mask_broadcast_shapes(kernel, mask_shape):
    x = rand_scores(2, 3, 4, 9)
    g = torch.Generator().manual_seed(7)
    mask = (torch.rand(mask_shape, generator=g) < 0.4).to(DEVICE)
    assert_fp32_close(*run_both(kernel, x, mask, 0.5, False))


@pytest.mark.parametrize("max_block", [None, 4])
def test_fully_masked_rows_give_zeros(kernel, max_block):
    """A padding row masking every key, and causal rows with no key (sq > sk): zeros, never NaN."""
    sq, sk = 6, 10
    x = rand_scores(2, 2, sq, sk)
    mask = torch.zeros(2, 1, sq, sk, dtype=torch.bool)
    mask[0, :, 1, :] = True
    mask = mask.to(DEVICE)
    yk, yr, dxk, dxr = run_both(kernel, x, mask, 0.8, False, max_block)
    assert torch.isfinite(yk).all() and torch.isfinite(dxk).all()
    assert (yk[0, :, 1] == 0).all() and (dxk[0, :, 1] == 0).all()
    assert_fp32_close(yk, yr, dxk, dxr)

    xc = rand_scores(1, 2, 8, 5)  # causal with sq > sk: queries 0..2 see no key at all
    yk, yr, dxk, dxr = run_both(kernel, xc, None, 0.8, True, max_block)
    assert torch.isfinite(yk).all() and torch.isfinite(dxk).all()
    assert (yk[:, :, :3] == 0).all() and (dxk[:, :, :3] == 0).all()
    torch.testing.assert_close(yk[:, :, 3:].sum(-1), torch.ones(1, 2, 5, device=DEVICE))
    assert_fp32_close(yk, yr, dxk, dxr)


# ---- half precision: fp32 arithmetic inside, output in the input dtype ----

def assert_relative(actual, expected, rel):
    """Elementwise within rel of the fp32 reference, with an absolute floor of rel x the tensor's max."""
    a, e = actual.float(), expected.float()
    torch.testing.assert_close(a, e, rtol=rel, atol=rel * e.abs().max().item())


def softmax_grad_from_saved(y, dy, scale):
    """dx = scale * y * (dy - sum(dy * y)) in fp32 from a saved half-precision y."""
    y, dy = y.float(), dy.float()
    return scale * y * (dy - (dy * y).sum(-1, keepdim=True))


def native_half_softmax(x, mask, scale, causal):
    """torch's own softmax in the input's half precision: the accuracy a half-precision model gets today."""
    full = mask if mask is not None else torch.zeros(x.shape[-2:], dtype=torch.bool, device=x.device)
    if causal:
        full = full | causal_mask(x.shape[-2], x.shape[-1], x.device)
    return torch.softmax((x * scale).masked_fill(full, float("-inf")), dim=-1)


def assert_half_precision_matches(yk, dxk, x, dy, mask, scale, causal):
    """Forward: elementwise within 1e-2 of the fp32 math on the same rounded input.
    Backward: elementwise within 1e-2 of the fp32 formula on the kernel's own saved y (the backward
    kernel's math), and, against the exact fp32 gradient, a normwise error within 1e-2 or within twice
    torch's native half-precision softmax's. Elementwise against the exact gradient is out of reach for
    any softmax that saves a half-precision y: where dy ~ sum(dy * y), one ulp of y is amplified many
    times. (Triton's interpreter also truncates fp32 -> bf16 where the GPU rounds to nearest.)"""
    assert_relative(yk, scale_mask_softmax_reference(x.float(), mask, scale, causal), 1e-2)
    assert_relative(dxk, softmax_grad_from_saved(yk, dy, scale), 1e-2)
    _, dx_exact = value_and_grad(scale_mask_softmax_reference, x.float(), dy.float(), mask, scale, causal)
    _, dx_native = value_and_grad(native_half_softmax, x, dy, mask, scale, causal)

    def err(dx):
        return ((dx.float() - dx_exact).norm() / dx_exact.norm()).item()
    assert err(dxk) <= max(1e-2, 2 * err(dx_native)), f"gradient error {err(dxk):.3g}, torch's {err(dx_native):.3g}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("max_block", [None, 16])
def test_half_precision(kernel, dtype, max_block):
    x = rand_scores(2, 2, 4, 40).to(dtype)
    mask = padding_mask(2, 4, 40)
    dy = upstream_grad(x)
    yk, dxk = value_and_grad(kernel, x, dy, mask, 0.6, True, max_block)
    assert yk.dtype == dtype and dxk.dtype == dtype
    assert_half_precision_matches(yk, dxk, x, dy, mask, 0.6, True)


# ---- dispatch rules (no kernel run needed) ----

def test_dispatch_cpu_and_no_fusion_take_torch_path(monkeypatch):
    x = rand_scores(2, 2, 4, 8).cpu()
    off = FusedScaleMaskSoftmax(causal=True, scale=0.5, masked_softmax_fusion=False)
    assert off.kernel_available is False and not off.uses_kernel(x)
    on = FusedScaleMaskSoftmax(causal=True, scale=0.5, masked_softmax_fusion=True)
    assert on.kernel_available == (HAS_CUDA and fs.triton_importable())
    on.kernel_available = True  # even where the kernel could run, a CPU tensor goes to torch
    assert not on.uses_kernel(x)
    monkeypatch.setattr(fs, "fused_scale_mask_softmax", lambda *a, **k: pytest.fail("kernel path taken"))
    torch.testing.assert_close(on(x), scale_mask_softmax_reference(x, None, 0.5, True), rtol=0, atol=0)
    torch.testing.assert_close(off(x), scale_mask_softmax_reference(x, None, 0.5, True), rtol=0, atol=0)


def test_kernel_fits_shape_rules():
    assert kernel_fits((2, 4, 128, 128), torch.bfloat16)
    assert kernel_fits((2, 4, 128, 16384), torch.float32, (2, 1, 128, 16384), torch.bool)
    assert kernel_fits((2, 4, 8, 8), torch.float16, (8, 8), torch.bool)
    assert not kernel_fits((2, 4, 1, 128), torch.bfloat16)  # sq == 1: decoding
    assert not kernel_fits((2, 4, 128, 16385), torch.bfloat16)  # past the longest fused row
    assert not kernel_fits((2, 4, 8, 8), torch.float64)
    assert not kernel_fits((4, 8, 8), torch.float32)
    assert not kernel_fits((2, 4, 8, 8), torch.float32, (2, 1, 8, 8), torch.uint8)  # additive/int masks
    assert not kernel_fits((2, 4, 8, 8), torch.float32, (3, 1, 8, 8), torch.bool)


def test_module_imports_and_runs_without_triton():
    """Block triton in a fresh interpreter: the package imports, builds and runs on the torch path,
    and importing it never pulls in triton."""
    code = (
        "import sys\n"
        "import megatron_lite.kernels as k\n"
        "assert 'triton' not in sys.modules, 'megatron_lite.kernels imported triton'\n"
        "sys.modules['triton'] = None\n"
        "import torch\n"
        "assert not k.fused_softmax.triton_importable()\n"
        "m = k.FusedScaleMaskSoftmax(causal=True, scale=2.0)\n"
        "assert m.kernel_available is False\n"
        "x = torch.randn(1, 2, 3, 3)\n"
        "assert torch.equal(m(x), k.scale_mask_softmax_reference(x, None, 2.0, True))\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ---- compiled (not interpreted) kernels ----

@needs_triton
@pytest.mark.timeout(300)
def test_kernels_compile_for_sm90():
    """The interpreter accepts code the compiler rejects (loop-carried types, int widths): compile every
    constexpr variant to an sm_90 cubin with triton's bundled ptxas, in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-m", "megatron_lite.kernels.compile_check"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=280)
    if out.returncode == 3:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


@needs_cuda
@needs_triton
def test_gpu_module_uses_kernel_long_rows():
    """On a GPU: the module dispatches to the kernel, and 8k/16k rows (looped path) match the reference."""
    m = FusedScaleMaskSoftmax(causal=True, scale=0.125)
    assert m.kernel_available
    for sk in (8192, 16384):
        x = torch.randn(1, 2, 64, sk, device="cuda", dtype=torch.bfloat16)
        assert m.uses_kernel(x)
        dy = upstream_grad(x)
        yk, dxk = value_and_grad(m, x, dy)
        assert_half_precision_matches(yk, dxk, x, dy, None, 0.125, True)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA behaviour")
def test_benchmark_kernels_without_cuda_measures_nothing(tmp_path, capsys):
    import importlib.util
    path = os.path.join(ROOT, "benchmarks", "benchmark_kernels.py")
    spec = importlib.util.spec_from_file_location("benchmark_kernels", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "k.json"
    assert tool.main(["--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == "no CUDA device: nothing measured"
    assert not out.exists()
