"""The integer-GEMM path (``torch._int_mm``) against the fake-quant forward, on small shapes on the CPU."""

import models
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_lrpqvit import LRPQConfig, quantize, unpack_weights
from optimum_lrpqvit.integer_matmul import int_mm_linear, int_mm_supported, use_integer_matmul
from optimum_lrpqvit.nn import QuantLinear, weight_modules
from optimum_lrpqvit.quantizers import dequantize_uniform, fake_quant_uniform


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), fan_in=st.integers(2, 48), out=st.integers(1, 24), x_bits=st.integers(2, 8),
       w_bits=st.integers(2, 8), seed=st.integers(0, 2**16))
def test_integer_gemm_equals_the_fake_quant_product(rows, fan_in, out, x_bits, w_bits, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, fan_in, generator=g) * 3
    x_scale = float(torch.rand((), generator=g) * 0.1 + 0.01)
    x_zero = int(torch.randint(-20, 2**x_bits + 20, (), generator=g))  # zero points off the grid too
    codes = torch.randint(0, 2**w_bits, (out, fan_in), generator=g).to(torch.uint8)
    w_scale = torch.rand(out, generator=g) * 0.05 + 1e-3
    w_zero = torch.randint(-3, 2**w_bits + 3, (out,), generator=g).to(torch.int16)
    bias = torch.randn(out, generator=g)
    x_hat = fake_quant_uniform(x, torch.tensor(x_scale), torch.tensor(float(x_zero)), x_bits)
    w_hat = dequantize_uniform(codes, w_scale[:, None], w_zero[:, None].float())
    expected = F.linear(x_hat, w_hat, bias)
    got = int_mm_linear(x, x_scale, x_zero, x_bits, codes, w_scale, w_zero, bias)
    # exact integer sums scaled once vs a float32 sum of products: float32 rounding of the larger terms
    bound = 1e-5 * (x_hat.abs() @ w_hat.abs().t() + bias.abs()).max() + 1e-6
    assert (got - expected).abs().max() <= bound


@pytest.mark.parametrize(("family", "options"), [("hf_vit", {}), ("timm_vit", {}), ("hf_swin", {}),
                                                 ("hf_vit", {"gelu_quantizer": "adalog"})])  # fc2 stays fake-quant
def test_model_with_integer_matmul_gives_the_fake_quant_logits(family, options):
    model = quantize(models.FAMILIES[family](), LRPQConfig(w_bits=4, a_bits=4, **options), models.images(8))
    x = models.images(4, seed=2)
    expected = models.logits(model, x)
    use_integer_matmul(model)
    assert all("forward" in m.__dict__ for m in weight_modules(model).values() if isinstance(m, QuantLinear))
    got = models.logits(model, x)
    assert (got.argmax(1) == expected.argmax(1)).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    use_integer_matmul(model, enabled=False)  # undone: the fake-quant forward again, bit for bit
    assert not any("forward" in m.__dict__ for m in weight_modules(model).values())
    assert torch.equal(models.logits(model, x), expected)


def test_integer_matmul_needs_packed_weights():
    model = unpack_weights(quantize(models.timm_vit(), LRPQConfig(), models.images(8)))
    with pytest.raises(ValueError, match="pack_weights"):
        use_integer_matmul(model)


def test_cuda_shape_rules():
    cuda = torch.device("cuda")
    assert int_mm_supported(197, 384, 1536, cuda) and not int_mm_supported(16, 384, 1536, cuda)
    assert not int_mm_supported(197, 384, 10, cuda) and int_mm_supported(1, 3, 10, torch.device("cpu"))
    assert not int_mm_supported(4, 1, 10, torch.device("cpu"))
