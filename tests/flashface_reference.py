"""An independent PyTorch re-statement of the released FlashFace computation (ali-vilab/FlashFace, MIT:
`ldm/models/unet.py`, `flashface/all_finetune/models/reference_unet.py`, `ops/context_diffusion.py`), written from
its description for the parity tests: LDM-style module tree and state-dict names (`encoder` / `middle` / `decoder` /
`head`, `ref_*` copies, `ori_*` aliases, `self_attn.self_attn_first`), the reference pass that records norm1(x) in
the middle block and the ReferenceNet decoder, and the 2-way / 3-way guidance with the gate and rescale.

NCHW, float32; GroupNorms with 32 groups and eps 1e-6 as released. Not a copy of the released code.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def group_norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, ch, eps=1e-6)


class Res(nn.Module):
    def __init__(self, cin, emb, cout):
        super().__init__()
        self.layer1 = nn.Sequential(group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.embedding = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.layer2 = nn.Sequential(group_norm(cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, e):
        h = self.layer1(x) + self.embedding(e)[:, :, None, None]
        return self.layer2(h) + self.shortcut(x)


class MHA(nn.Module):
    def __init__(self, dim, ctx_dim, heads):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.v = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.o = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n = x.shape[0], self.heads

        def split(z):
            return z.view(b, z.shape[1], n, -1).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(context)), split(self.v(context))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.o((w @ v).transpose(1, 2).reshape(b, x.shape[1], -1))


class GeGLU(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Linear(cin, 2 * cout)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class Block(nn.Module):
    """One transformer block; `state` (shared dict) decides: 'w' records norm1(x) under `key` (if `patched`),
    'pr' adds the reference self-attention with the per-row lambda state['lam'] (if `patched`)."""

    def __init__(self, dim, ctx_dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = MHA(dim, None, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = MHA(dim, ctx_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(GeGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        object.__setattr__(self, "state", None)
        object.__setattr__(self, "key", None)

    def forward(self, x, context):
        y = self.norm1(x)
        x = x + self.self_attn(y)
        st = self.state
        if st is not None and st["mode"] == "w":
            st[self.key] = y
        elif st is not None and st["mode"] == "pr":
            refs = st[self.key]  # (R, L, C): all references' tokens, concatenated for every row
            b, _, c = y.shape
            ctx = torch.cat([y, refs.reshape(1, -1, c).expand(b, -1, -1)], dim=1)
            lam = st["lam"][:, None, None]
            sa = self.self_attn.self_attn_first
            x = x + lam * sa(y, ctx) + (1 - lam) * sa(y)
        x = x + self.cross_attn(self.norm2(x), context)
        return x + self.ffn(self.norm3(x))


class Stacked(nn.Module):
    def __init__(self, dim, ctx_dim, heads):
        super().__init__()
        self.norm1 = group_norm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 1)
        self.blocks = nn.ModuleList([Block(dim, ctx_dim, heads)])
        self.conv2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        z = self.conv1(self.norm1(x)).view(b, c, -1).transpose(1, 2)
        for blk in self.blocks:
            z = blk(z, context)
        return self.conv2(z.transpose(1, 2).reshape(b, c, h, w)) + x


class UpTo(nn.Module):
    def forward(self, x, reference):
        return F.interpolate(x, size=reference.shape[-2:], mode="nearest")


class ReleasedUNet(nn.Module):
    """The LDM-style UNet (`encoder`, `middle`, `decoder`, `head`) with `attn_levels` the levels that have attention."""

    def __init__(self, dim=32, dim_mult=(1, 2), ctx_dim=16, heads=2, num_res=1, attn_levels=(0, 1)):
        super().__init__()
        emb = 4 * dim
        self.dim = dim
        self.time_embedding = nn.Sequential(nn.Linear(dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.encoder = nn.ModuleList([nn.Conv2d(4, dim, 3, padding=1)])
        skip_dims = [dim]
        cin = dim
        n = len(dim_mult)
        for i, m in enumerate(dim_mult):
            cout = dim * m
            for j in range(num_res):
                blk = nn.ModuleList([Res(cin, emb, cout)])
                if i in attn_levels:
                    blk.append(Stacked(cout, ctx_dim, heads))
                self.encoder.append(blk)
                skip_dims.append(cout)
                cin = cout
            if i != n - 1:
                self.encoder.append(nn.Conv2d(cout, cout, 3, stride=2, padding=1))
                skip_dims.append(cout)
        self.middle = nn.ModuleList([Res(cin, emb, cin), Stacked(cin, ctx_dim, heads), Res(cin, emb, cin)])
        self.decoder = nn.ModuleList()
        for i, m in enumerate(reversed(dim_mult)):
            level = n - 1 - i
            cout = dim * m
            for j in range(num_res + 1):
                blk = nn.ModuleList([Res(cin + skip_dims.pop(), emb, cout)])
                if level in attn_levels:
                    blk.append(Stacked(cout, ctx_dim, heads))
                if level != 0 and j == num_res:
                    blk.append(nn.Sequential(UpTo(), nn.Conv2d(cout, cout, 3, padding=1)))
                self.decoder.append(blk)
                cin = cout
        self.head = nn.Sequential(group_norm(cin), nn.SiLU(), nn.Conv2d(cin, 4, 3, padding=1))

    @staticmethod
    def _run(module, x, e, ctx, reference=None):
        if isinstance(module, Res):
            return module(x, e)
        if isinstance(module, Stacked):
            return module(x, ctx)
        if isinstance(module, nn.Sequential) and isinstance(module[0], UpTo):
            return module[1](module[0](x, reference))
        if isinstance(module, nn.ModuleList):
            for sub in module:
                x = ReleasedUNet._run(sub, x, e, ctx, reference)
            return x
        return module(x)

    def unet_pass(self, encoder, decoder, x, e, ctx):
        xs = []
        for blk in encoder:
            x = self._run(blk, x, e, ctx)
            xs.append(x)
        for blk in self.middle:
            x = self._run(blk, x, e, ctx)
        for blk in decoder:
            x = torch.cat([x, xs.pop()], dim=1)
            x = self._run(blk, x, e, ctx, xs[-1] if xs else None)
        return self.head(x)


class ReleasedFlashFace(ReleasedUNet):
    """The released reference UNet: `ref_*` deep copies, `ori_*` the same objects as encoder / middle / decoder,
    SA' (`self_attn_first`) in ori_middle / ori_decoder, a 5-channel conv in ori_encoder[0]."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.state = {}
        self.ref_encoder = copy.deepcopy(self.encoder)
        self.ref_decoder = copy.deepcopy(self.decoder)
        self.ref_middle = copy.deepcopy(self.middle)
        self.ori_encoder = self.encoder
        self.ori_decoder = self.decoder
        self.ori_middle = self.middle
        for coder, prefix in ((self.ref_decoder, "decoder"), (self.ori_decoder, "decoder"), (self.middle, "middle")):
            for name, m in coder.named_modules():
                if isinstance(m, Block):
                    object.__setattr__(m, "state", self.state)
                    object.__setattr__(m, "key", f"{prefix}.{name}")
        for coder in (self.ori_decoder, self.ori_middle):
            for name, m in coder.named_modules():
                if isinstance(m, Block):
                    m.self_attn.self_attn_first = copy.deepcopy(m.self_attn)
        old = self.encoder[0]
        conv = nn.Conv2d(5, old.out_channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :4].copy_(old.weight)
            conv.bias.copy_(old.bias)
        self.ori_encoder[0] = conv

    def forward(self, x, t, context, refs, ref_context, masks, lam):
        """x (nB, 4, H, W), t (nB,), context (nB, L, D), refs (R, 4, h, w), ref_context (R, L, D), masks
        (nB, H, W), lam (nB,): one model call of the released sampler (reference pass with e[:1])."""
        e = self.time_embedding(sinusoid(t, self.dim))
        self.state.clear()
        self.state["mode"] = "w"
        self.unet_pass(self.ref_encoder, self.ref_decoder, refs, e[:1].repeat_interleave(len(refs), 0), ref_context)
        self.state["mode"] = "pr"
        self.state["lam"] = lam
        out = self.unet_pass(self.ori_encoder, self.ori_decoder, torch.cat([x, masks[:, None]], 1), e, context)
        self.state["mode"] = None
        return out

    def features(self):
        return {k: v for k, v in self.state.items() if k not in ("mode", "lam")}


def released_guidance(model, xt, t, c, nc, refs, ref_context, mask, text, reference, gate, lam, lam_before,
                      rescale):
    """The released `ContextGaussianDiffusion.denoise` guidance (its `out`): xt (B, 4, H, W), t (B,), mask (B, H, W);
    the model sees t and the mask repeat_interleaved per branch, as released."""
    b = xt.shape[0]
    ref_guidance = reference
    if (t > gate).any():
        ref_guidance, sim = 0, lam_before
    else:
        sim = lam
    if ref_guidance > 0:
        lam_rows = torch.tensor([sim, 0.0, 0.0]).repeat_interleave(b)
        raw = model(xt.repeat(3, 1, 1, 1), t.repeat_interleave(3), torch.cat([c, c, nc]), refs, ref_context,
                    mask.repeat_interleave(3, 0), lam_rows)
        y_ref, y, u = raw.split(b)
        out = u + text * (y - u) + ref_guidance * (y_ref - y)
    else:
        raw = model(xt.repeat(2, 1, 1, 1), t.repeat_interleave(2), torch.cat([c, nc]), refs, ref_context,
                    mask.repeat_interleave(2, 0), torch.full((2 * b,), float(sim)))
        y, u = raw.split(b)
        out = u + text * (y - u)
    if rescale is not None:
        ratio = (y.flatten(1).std(dim=1) / (out.flatten(1).std(dim=1) + 1e-12)).view(-1, 1, 1, 1)
        out = out * (rescale * ratio + (1 - rescale))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The released VAE (`ldm/models/vae.py`: `sd_v1_vae`), with its mid-block attention's reshape as a switch.
# ---------------------------------------------------------------------------------------------------------------


class VRes(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.residual = nn.Sequential(group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                      group_norm(cout), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(cout, cout, 3, padding=1))
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class VAttn(nn.Module):
    """One-head attention; `quirk`: the (L, C) output read as (C, H, W) without a transpose, as released."""

    def __init__(self, dim, quirk):
        super().__init__()
        self.quirk = quirk
        self.norm = group_norm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        z = self.to_qkv(self.norm(x)).reshape(b, 3 * c, h * w).transpose(1, 2)
        q, k, v = z.chunk(3, dim=-1)
        o = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1) @ v  # (b, L, c)
        o = o.reshape(b, c, h, w) if self.quirk else o.transpose(1, 2).reshape(b, c, h, w)
        return self.proj(o) + x


class VResample(nn.Module):
    def __init__(self, dim, mode):
        super().__init__()
        if mode == "down":
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest"),
                                          nn.Conv2d(dim, dim, 3, padding=1))

    def forward(self, x):
        return self.resample(x)


class ReleasedVAE(nn.Module):
    def __init__(self, dim=32, z_dim=4, dim_mult=(1, 2), num_res=1, quirk=True):
        super().__init__()
        enc_dims = [dim * u for u in (1,) + tuple(dim_mult)]
        self.encoder = nn.Module()
        self.encoder.conv1 = nn.Conv2d(3, enc_dims[0], 3, padding=1)
        blocks = []
        for i, (cin, cout) in enumerate(zip(enc_dims[:-1], enc_dims[1:])):
            for _ in range(num_res):
                blocks.append(VRes(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                blocks.append(VResample(cout, "down"))
        self.encoder.downsamples = nn.Sequential(*blocks)
        top = enc_dims[-1]
        self.encoder.middle = nn.Sequential(VRes(top, top), VAttn(top, quirk), VRes(top, top))
        self.encoder.head = nn.Sequential(group_norm(top), nn.SiLU(), nn.Conv2d(top, 2 * z_dim, 3, padding=1))
        self.conv1 = nn.Conv2d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = nn.Conv2d(z_dim, z_dim, 1)
        dec_dims = [dim * u for u in (dim_mult[-1],) + tuple(reversed(dim_mult))]
        self.decoder = nn.Module()
        self.decoder.conv1 = nn.Conv2d(z_dim, dec_dims[0], 3, padding=1)
        self.decoder.middle = nn.Sequential(VRes(dec_dims[0], dec_dims[0]), VAttn(dec_dims[0], quirk),
                                            VRes(dec_dims[0], dec_dims[0]))
        blocks = []
        for i, (cin, cout) in enumerate(zip(dec_dims[:-1], dec_dims[1:])):
            for _ in range(num_res + 1):
                blocks.append(VRes(cin, cout))
                cin = cout
            if i != len(dim_mult) - 1:
                blocks.append(VResample(cout, "up"))
        self.decoder.upsamples = nn.Sequential(*blocks)
        self.decoder.head = nn.Sequential(group_norm(dec_dims[-1]), nn.SiLU(), nn.Conv2d(dec_dims[-1], 3, 3, padding=1))

    def encode_mean(self, x):
        e = self.encoder
        h = e.head(e.middle(e.downsamples(e.conv1(x))))
        return self.conv1(h).chunk(2, dim=1)[0]

    def decode(self, z):
        d = self.decoder
        return d.head(d.upsamples(d.middle(d.conv1(self.conv2(z)))))


# ---------------------------------------------------------------------------------------------------------------
# The released CLIP text tower (`ldm/models/clip.py`: `TextTransformer`, read as the demo's `encode_text`).
# ---------------------------------------------------------------------------------------------------------------


class TBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.to_qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, s, c = x.shape
        q, k, v = self.attn.to_qkv(self.norm1(x)).view(b, s, 3, self.heads, -1).unbind(2)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, c)
        x = x + self.attn.proj(o)
        h = self.mlp[0](self.norm2(x))
        return x + self.mlp[2](h * torch.sigmoid(1.702 * h))


class ReleasedTextTower(nn.Module):
    def __init__(self, vocab=100, text_len=8, dim=32, heads=2, layers=2):
        super().__init__()
        self.textual = nn.Module()
        self.textual.token_embedding = nn.Embedding(vocab, dim)
        self.textual.pos_embedding = nn.Parameter(0.01 * torch.randn(1, text_len, dim))
        self.textual.transformer = nn.Sequential(*[TBlock(dim, heads) for _ in range(layers)])
        self.textual.norm = nn.LayerNorm(dim)
        self.textual.head = nn.Parameter(torch.randn(dim, dim))
        self.log_scale = nn.Parameter(torch.ones([]))

    def encode_text(self, ids):
        t = self.textual
        return t.norm(t.transformer(t.token_embedding(ids) + t.pos_embedding))
