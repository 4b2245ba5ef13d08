"""``post_ln="repq"`` against an independent, deliberately naive RepQ-ViT implementation.

The reference follows the RepQ-ViT algorithm step by step on a timm ViT (explicit functional forward,
per-channel Python loops, ``torch.quantile``, quantizers that calibrate on their first call): calibrate
everything in one pass, reparameterise norm1 → qkv and norm2 → fc1 with z̃ = round(mean z), re-calibrate the
weights, evaluate. Our vectorised implementation must give the same logits.
"""

import copy

import models
import torch
import torch.nn.functional as F

from optimum_lrpqvit import LRPQConfig, quantize

PCTS = (0.999, 0.9999, 0.99999)


def _search(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    best = None
    for p in PCTS:
        high, low = torch.quantile(x.reshape(-1), p), torch.quantile(x.reshape(-1), 1 - p)
        scale = (high - low) / (2**bits - 1)
        zero = torch.round(-low / scale)
        xq = (torch.clamp(torch.round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale
        err = ((x - xq) ** 2).mean()
        if best is None or err < best[0]:
            best = (err, scale, zero)
    return best[1], best[2]


class RefUniform:
    def __init__(self, bits: int, channel_dim: int | None = None):
        self.bits, self.channel_dim, self.scale, self.zero = bits, channel_dim, None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            if self.channel_dim is None:
                self.scale, self.zero = _search(x, self.bits)
            else:
                cols = x.movedim(self.channel_dim, -1).reshape(-1, x.shape[self.channel_dim])
                pairs = [_search(cols[:, c], self.bits) for c in range(cols.shape[1])]
                shape = [1] * x.dim()
                shape[self.channel_dim] = -1
                self.scale = torch.stack([p[0] for p in pairs]).reshape(shape)
                self.zero = torch.stack([p[1] for p in pairs]).reshape(shape)
        return (torch.clamp(torch.round(x / self.scale) + self.zero, 0, 2**self.bits - 1) - self.zero) * self.scale


class RefLogSqrt2:
    def __init__(self, bits: int):
        self.bits, self.delta = bits, None

    def quant(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        q = torch.round(-2 * torch.log2(x / delta))
        zero = q >= 2**self.bits
        q = q.clamp(0, 2**self.bits - 1)
        out = 2 ** (-torch.ceil(q / 2)) * ((q % 2) * (2**0.5 - 1) + 1) * delta
        return torch.where(zero, torch.zeros_like(out), out)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.delta is None:
            candidates = [torch.quantile(x.reshape(-1), p) for p in PCTS]
            self.delta = min(candidates, key=lambda d: ((x - self.quant(x, d)) ** 2).mean())
        return self.quant(x, self.delta)


class RefRepQViT:
    """RepQ-ViT on a timm VisionTransformer, written out by hand."""

    def __init__(self, model, w_bits: int, a_bits: int):
        self.m = model
        blocks = len(model.blocks)
        self.wq = {n: RefUniform(w_bits, channel_dim=0) for n, _ in model.named_modules()
                   if isinstance(_, (torch.nn.Linear, torch.nn.Conv2d))}
        self.aq = {"patch": RefUniform(8), "head": RefUniform(a_bits)}
        for i in range(blocks):
            self.aq.update({f"{i}.qkv": RefUniform(a_bits, channel_dim=-1), f"{i}.q": RefUniform(a_bits),
                            f"{i}.k": RefUniform(a_bits), f"{i}.v": RefUniform(a_bits),
                            f"{i}.attn": RefLogSqrt2(a_bits), f"{i}.proj": RefUniform(a_bits),
                            f"{i}.fc1": RefUniform(a_bits, channel_dim=-1), f"{i}.fc2": RefUniform(a_bits)})

    def linear(self, name: str, x: torch.Tensor, act: str) -> torch.Tensor:
        layer = self.m.get_submodule(name)
        return F.linear(self.aq[act](x), self.wq[name](layer.weight), layer.bias)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.m
        conv = m.patch_embed.proj
        x = F.conv2d(self.aq["patch"](x), self.wq["patch_embed.proj"](conv.weight), conv.bias, conv.stride)
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([m.cls_token.expand(len(x), -1, -1), x], dim=1) + m.pos_embed
        for i, blk in enumerate(m.blocks):
            a = blk.attn
            qkv = self.linear(f"blocks.{i}.attn.qkv", blk.norm1(x), f"{i}.qkv")
            batch, tokens, _ = qkv.shape
            q, k, v = qkv.reshape(batch, tokens, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
            attn = (self.aq[f"{i}.q"](q) @ self.aq[f"{i}.k"](k).transpose(-2, -1)) * a.scale
            out = self.aq[f"{i}.attn"](attn.softmax(-1)) @ self.aq[f"{i}.v"](v)
            x = x + self.linear(f"blocks.{i}.attn.proj", out.transpose(1, 2).reshape(batch, tokens, -1), f"{i}.proj")
            h = F.gelu(self.linear(f"blocks.{i}.mlp.fc1", blk.norm2(x), f"{i}.fc1"))
            x = x + self.linear(f"blocks.{i}.mlp.fc2", h, f"{i}.fc2")
        return self.linear("head", m.norm(x)[:, 0], "head")

    @torch.no_grad()
    def reparameterize(self) -> None:
        for i, blk in enumerate(self.m.blocks):
            for norm, linear, act in ((blk.norm1, blk.attn.qkv, f"{i}.qkv"), (blk.norm2, blk.mlp.fc1, f"{i}.fc1")):
                quant = self.aq[act]
                s, z = quant.scale.reshape(-1), quant.zero.reshape(-1)
                s_t, z_t = s.mean(), z.mean().round()
                r = s / s_t
                b = (-z * s) / r + z_t * s_t
                norm.weight.data = norm.weight.data / r
                norm.bias.data = norm.bias.data / r - b
                linear.weight.data = linear.weight.data * r
                linear.bias.data = linear.bias.data + linear.weight.data @ b
                quant.channel_dim, quant.scale, quant.zero = None, s_t, z_t
                name = next(n for n, mod in self.m.named_modules() if mod is linear)
                self.wq[name] = RefUniform(self.wq[name].bits, channel_dim=0)


def test_repq_matches_a_naive_reference_implementation():
    model = models.timm_vit(seed=3)
    calib, test = models.images(32, seed=4), models.images(64, seed=5)
    reference = RefRepQViT(copy.deepcopy(model), w_bits=4, a_bits=4)
    reference(calib)  # calibrate everything on first use
    reference.reparameterize()
    reference(calib)  # re-calibrate the changed weights
    expected = reference(test)

    ours = models.logits(quantize(model, LRPQConfig(w_bits=4, a_bits=4, post_ln="repq"), calib), test)
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
