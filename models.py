# Diffusion backbones: DiT (Peebles & Xie, 2023) whose blocks mix tokens with either
# self-attention or PDE-SSM (paper section 3), and a U-Net baseline of comparable size.
# With mixer="attn" and learn_sigma=True the state_dict is exactly official DiT's, so its
# released checkpoints load with strict=True. Models never rescale t: flow.py decides
# which time the network sees.

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from timm.models.vision_transformer import PatchEmbed, Mlp
from diffusers import UNet2DModel

from pde_ssm import PDESSM


def modulate(x, shift, scale):
    """adaLN modulation: x (B, N, D), shift and scale (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


#################################################################################
#                     Input Checks and Guidance (all backbones)                 #
#################################################################################

def has_null_class(model):
    """Whether the model was trained with label dropout and so has the extra null label."""
    return model.num_classes > 0 and model.class_dropout_prob > 0


def check_inputs(model, x, t, y, size_multiple):
    """Raise ValueError for inputs the model cannot take (the label-range check is skipped while compiling
    or capturing a CUDA graph)."""
    if x.ndim != 4 or x.shape[1] != model.in_channels:
        raise ValueError(f"expected x of shape (B, {model.in_channels}, H, W), got {tuple(x.shape)}")
    if x.shape[2] % size_multiple or x.shape[3] % size_multiple:
        raise ValueError(f"image size {tuple(x.shape[2:])} is not divisible by {size_multiple}")
    if t.shape != x.shape[:1]:
        raise ValueError(f"expected t of shape ({x.shape[0]},), got {tuple(t.shape)}")
    if model.num_classes == 0:
        return
    if y is None or y.shape != x.shape[:1] or y.dtype.is_floating_point:
        raise ValueError(f"class-conditional model needs integer labels y of shape ({x.shape[0]},), "
                         f"got {y if y is None else f'{y.dtype} {tuple(y.shape)}'}")
    # A value check needs a host sync and a data-dependent branch: skip it inside compiled and CUDA graphs.
    if not (torch.compiler.is_compiling() or (y.is_cuda and torch.cuda.is_current_stream_capturing())):
        top = model.num_classes + has_null_class(model)
        if bool(((y < 0) | (y >= top)).any()):
            raise ValueError(f"class labels must be integers in [0, {top - 1}] "
                             f"({model.num_classes} classes{' + null class' if top > model.num_classes else ''}), "
                             f"got {y.tolist() if y.numel() <= 16 else 'values out of range'}")


def drop_labels(labels, num_classes, dropout_prob):
    """Replace each label by the null label num_classes with probability dropout_prob (CFG training)."""
    drop = torch.rand(labels.shape[0], device=labels.device) < dropout_prob
    return torch.where(drop, num_classes, labels)


def classifier_free_guidance(model, x, t, y, cfg_scale):
    """
    Guided prediction uncond + cfg_scale * (cond - uncond) from one batched forward.
    y holds the conditional labels; the null-label half is built here. With learn_sigma the
    first in_channels are guided and the variance channels pass through from the conditional half.
    """
    if not has_null_class(model):
        raise ValueError("classifier-free guidance needs a class-conditional model trained with label "
                         f"dropout (num_classes > 0 and class_dropout_prob > 0), got num_classes="
                         f"{model.num_classes}, class_dropout_prob={model.class_dropout_prob}")
    null = torch.full_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    cond, uncond = out.chunk(2)
    # Official DiT guides only 3 channels for bit-reproducibility of its paper; all in_channels
    # is the standard rule (and the one its code comment recommends).
    c = model.in_channels
    guided = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
    return torch.cat([guided, cond[:, c:]], dim=1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar times with sinusoidal frequencies followed by an MLP (as DiT)."""
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """t (B,) possibly fractional -> (B, dim): [cos(t w_k), sin(t w_k)], w_k = max_period^(-k/half)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Embeds class labels; with dropout_prob > 0 it has a null label (index num_classes) for CFG."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels, train):
        if train and self.dropout_prob > 0:
            labels = drop_labels(labels, self.num_classes, self.dropout_prob)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class Attention(nn.Module):
    """
    Multi-head self-attention with timm's qkv layout (so DiT checkpoints load), run by SDPA
    (flash / memory-efficient kernels where available). naive=True writes softmax(QK^T / sqrt(d)) V
    out instead, materializing the N x N scores: the baseline of the benchmarks.
    """
    def __init__(self, dim, num_heads, naive=False):
        super().__init__()
        self.num_heads = num_heads
        self.naive = naive
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x, grid_size):
        # grid_size is unused: attention sees tokens as a set and gets position from pos_embed.
        # It is accepted so that attention and PDE-SSM are interchangeable in DiTBlock.
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.naive:
            scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5     # (B, heads, N, N)
            x = scores.softmax(dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)                 # (B, heads, N, D / heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning; `attn` is the spatial mixer (attention or PDE-SSM)."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, mixer="attn", pdessm_options=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        if mixer == "attn":
            self.attn = Attention(hidden_size, num_heads)
        else:
            self.attn = PDESSM(hidden_size, **pdessm_options)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        approx_gelu = partial(nn.GELU, approximate="tanh")
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio), act_layer=approx_gelu, drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c, grid_size):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), grid_size)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final adaLN-modulated linear map from tokens to patches of out_channels."""
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """
    Diffusion Transformer; mixer="attn" is official DiT, mixer="pdessm" replaces every block's
    self-attention by PDE-SSM and changes nothing else (paper section 4, evaluation protocol).
    PDE-SSM's channel coupling (section 2.2) is pdessm_coupling: "pairwise" (the paper's), "diagonal",
    or "heads", pairwise inside pdessm_heads channel groups (default: as many as attention's heads).
    """
    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        mixer="attn",
        pdessm_coupling="pairwise",
        pdessm_hidden=None,
        pdessm_heads=None,
        pdessm_terms=("diffusion", "convection", "reaction"),
        grad_checkpoint=False,
    ):
        super().__init__()
        if mixer not in ("attn", "pdessm"):
            raise ValueError(f"mixer must be 'attn' or 'pdessm', got {mixer!r}")
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        if hidden_size % 4 or (mixer == "attn" and hidden_size % num_heads):
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 (2-D sin-cos position "
                             f"embedding) and, for attention, by num_heads {num_heads}")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.mixer = mixer
        self.grad_checkpoint = grad_checkpoint
        self.grid_size = (input_size // patch_size, input_size // patch_size)

        # strict_img_size=False: other resolutions are allowed; forward checks divisibility itself.
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True, strict_img_size=False)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if num_classes > 0:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed sin-cos table for the build resolution (a frozen Parameter, as in DiT checkpoints):
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], hidden_size), requires_grad=False)

        pdessm_options = dict(hidden_dim=pdessm_hidden, coupling=pdessm_coupling, num_heads=pdessm_heads or num_heads,
                              terms=pdessm_terms)
        self.blocks = nn.ModuleList([
            DiTBlock(hidden_size, num_heads, mlp_ratio, mixer, pdessm_options) for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        # Linear layers (PDE-SSM's included) get DiT's xavier init; PDE-SSM's own PDE
        # parameters (K, b, r, tau) keep the initialization PDESSM gives them.
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        # Fixed (frozen) 2-D sin-cos position embedding:
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))

        # Patch embedding initialized like nn.Linear (instead of nn.Conv2d):
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        if self.num_classes > 0:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero modulation makes every block the identity at init.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero output layer: the model predicts exactly 0 at init.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def position_embedding(self, grid_size, device):
        """(1, H*W, D) table: the stored one at the build grid, recomputed (not stored) for any other."""
        if tuple(grid_size) == self.grid_size:
            return self.pos_embed
        return get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid_size, device).unsqueeze(0)

    def unpatchify(self, x, grid_size):
        """x (B, h*w, p*p*C) -> images (B, C, h*p, w*p)."""
        h, w = grid_size
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y=None):
        """
        x: (B, C, H, W) images or latents, H and W multiples of patch_size
        t: (B,) times, embedded as given
        y: (B,) class labels (index num_classes = null label); ignored when num_classes == 0
        returns (B, out_channels, H, W)
        """
        check_inputs(self, x, t, y, self.patch_size)
        grid_size = (x.shape[2] // self.patch_size, x.shape[3] // self.patch_size)
        x = self.x_embedder(x) + self.position_embedding(grid_size, x.device)  # (B, N, D), N = H * W / p ** 2
        c = self.t_embedder(t)                                                   # (B, D)
        if self.num_classes > 0:
            c = c + self.y_embedder(y, self.training)
        for block in self.blocks:
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # Blocks draw no random numbers: no RNG state to save and restore (nor to touch in a CUDA graph).
                x = checkpoint(block, x, c, grid_size, use_reentrant=False, preserve_rng_state=False)
            else:
                x = block(x, c, grid_size)                                       # (B, N, D)
        x = self.final_layer(x, c)                                               # (B, N, p * p * out_channels)
        return self.unpatchify(x, grid_size)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guided prediction; y holds the conditional labels of the B samples."""
        return classifier_free_guidance(self, x, t, y, cfg_scale)


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_1d_sincos_pos_embed(embed_dim, pos):
    """pos (M,) float64 -> (M, embed_dim): [sin(pos w_k), cos(pos w_k)], w_k = 10000^(-2k/embed_dim)."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64, device=pos.device) / (embed_dim / 2))
    out = pos[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size, device=None):
    """
    Fixed 2-D table (H*W, embed_dim) float32 for a row-major grid_size=(H, W): the first half
    encodes each token's column, the second its row (MAE / DiT layout; computed in float64).
    """
    h, w = grid_size
    rows = torch.arange(h, dtype=torch.float64, device=device).repeat_interleave(w)
    cols = torch.arange(w, dtype=torch.float64, device=device).repeat(h)
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)], dim=1)
    return emb.float()


#################################################################################
#                           U-Net Baseline (diffusers)                          #
#################################################################################

class UNet(nn.Module):
    """
    Class-conditional U-Net baseline (diffusers UNet2DModel) with DiT's interface: forward(x, t, y),
    forward_with_cfg, label dropout to an extra null class, and t passed to the network unchanged.
    Attention (at attention_levels and in the middle block) uses DiT-S's head width of 64.
    """
    def __init__(
        self,
        input_size=32,
        in_channels=4,
        num_classes=1000,
        class_dropout_prob=0.1,
        learn_sigma=False,
        block_out_channels=(128, 256, 256, 256),
        attention_levels=(1,),
        layers_per_block=2,
        attention_head_dim=64,
        norm_num_groups=32,
    ):
        super().__init__()
        if learn_sigma:
            raise ValueError("the U-Net baseline predicts a velocity only: use learn_sigma=False")
        self.size_multiple = 2 ** (len(block_out_channels) - 1)
        if input_size % self.size_multiple:
            raise ValueError(f"input_size {input_size} must be divisible by {self.size_multiple} "
                             f"(2^(levels-1) for {len(block_out_channels)} levels)")
        self.learn_sigma = learn_sigma
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        levels = range(len(block_out_channels))
        self.unet = UNet2DModel(
            sample_size=input_size,
            in_channels=in_channels,
            out_channels=in_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=tuple("AttnDownBlock2D" if i in attention_levels else "DownBlock2D" for i in levels),
            up_block_types=tuple("AttnUpBlock2D" if i in attention_levels else "UpBlock2D" for i in reversed(levels)),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            num_class_embeds=num_classes + (class_dropout_prob > 0) if num_classes > 0 else None,
        )

    def forward(self, x, t, y=None):
        """x (B, C, H, W) with H, W multiples of 2^(levels-1), t (B,), y (B,) labels -> (B, C, H, W)."""
        check_inputs(self, x, t, y, self.size_multiple)
        if self.num_classes == 0:
            y = None
        elif self.training and self.class_dropout_prob > 0:
            y = drop_labels(y, self.num_classes, self.class_dropout_prob)
        return self.unet(x, t, class_labels=y, return_dict=False)[0]

    def forward_with_cfg(self, x, t, y, cfg_scale):
        """Classifier-free guided prediction; y holds the conditional labels of the B samples."""
        return classifier_free_guidance(self, x, t, y, cfg_scale)


#################################################################################
#                                 Model Configs                                 #
#################################################################################

def DiT_XL_2(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=2, num_heads=16, **kwargs)
def DiT_XL_4(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=4, num_heads=16, **kwargs)
def DiT_XL_8(**kwargs): return DiT(depth=28, hidden_size=1152, patch_size=8, num_heads=16, **kwargs)
def DiT_L_2(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=2, num_heads=16, **kwargs)
def DiT_L_4(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=4, num_heads=16, **kwargs)
def DiT_L_8(**kwargs): return DiT(depth=24, hidden_size=1024, patch_size=8, num_heads=16, **kwargs)
def DiT_B_2(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=2, num_heads=12, **kwargs)
def DiT_B_4(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=4, num_heads=12, **kwargs)
def DiT_B_8(**kwargs): return DiT(depth=12, hidden_size=768, patch_size=8, num_heads=12, **kwargs)
def DiT_S_2(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=2, num_heads=6, **kwargs)
def DiT_S_4(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=4, num_heads=6, **kwargs)
def DiT_S_8(**kwargs): return DiT(depth=12, hidden_size=384, patch_size=8, num_heads=6, **kwargs)
# Tiny configs for CPU demos and tests:
def DiT_T_1(**kwargs): return DiT(depth=4, hidden_size=64, patch_size=1, num_heads=4, **kwargs)
def DiT_T_2(**kwargs): return DiT(depth=4, hidden_size=64, patch_size=2, num_heads=4, **kwargs)
def DiT_T_4(**kwargs): return DiT(depth=4, hidden_size=64, patch_size=4, num_heads=4, **kwargs)
# U-Nets: UNet-S is DDPM's CIFAR-10 layout sized near DiT-S/2 (paper Table 1); UNet-B doubles the width.
def UNet_S(**kwargs): return UNet(block_out_channels=(128, 256, 256, 256), **kwargs)
def UNet_B(**kwargs): return UNet(block_out_channels=(256, 512, 512, 512), **kwargs)
# Tiny U-Net for CPU demos and tests:
def UNet_T(**kwargs): return UNet(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=32, norm_num_groups=8, **kwargs)

DiT_models = {
    "DiT-XL/2": DiT_XL_2, "DiT-XL/4": DiT_XL_4, "DiT-XL/8": DiT_XL_8,
    "DiT-L/2": DiT_L_2, "DiT-L/4": DiT_L_4, "DiT-L/8": DiT_L_8,
    "DiT-B/2": DiT_B_2, "DiT-B/4": DiT_B_4, "DiT-B/8": DiT_B_8,
    "DiT-S/2": DiT_S_2, "DiT-S/4": DiT_S_4, "DiT-S/8": DiT_S_8,
    "DiT-T/1": DiT_T_1, "DiT-T/2": DiT_T_2, "DiT-T/4": DiT_T_4,
}
# Each PDESSM-DiT config is its DiT twin with the mixer swapped (a mixer keyword still overrides it).
DiT_models.update({"PDESSM-" + name: partial(config, mixer="pdessm") for name, config in list(DiT_models.items())})
DiT_models.update({"UNet-S": UNet_S, "UNet-B": UNet_B, "UNet-T": UNet_T})


def build_model(name, mixer=None, **kwargs):
    """Build a registry model; mixer ("attn" | "pdessm") overrides the mixer of DiT configs."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(DiT_models)}")
    if mixer is not None:
        if name.startswith("UNet"):
            raise ValueError(f"{name} is a U-Net and has no token mixer; drop the mixer override ({mixer!r})")
        kwargs["mixer"] = mixer
    return DiT_models[name](**kwargs)


def print_config_table():
    """Print every registry config with its parameter counts (models built on the meta device)."""
    inputs = {"pixel 3x32x32, 10 cl.": dict(in_channels=3, num_classes=10),
              "latent 4x32x32, 1000 cl.": dict(in_channels=4, num_classes=1000)}
    print("trainable parameters, learn_sigma=False, input_size=32")
    print(f"{'name':<16} {'depth':>5} {'width':>18} {'heads':>5} {'patch':>5}" + "".join(f" {k:>25}" for k in inputs))
    for name in DiT_models:
        counts = []
        for options in inputs.values():
            with torch.device("meta"):
                model = build_model(name, input_size=32, learn_sigma=False, **options)
            counts.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        if isinstance(model, DiT):
            shape = (len(model.blocks), model.pos_embed.shape[-1], model.num_heads, model.patch_size)
        else:
            shape = ("-", "-".join(map(str, model.unet.config.block_out_channels)), "-", "-")
        print(f"{name:<16} {shape[0]:>5} {shape[1]:>18} {shape[2]:>5} {shape[3]:>5}" + "".join(f" {n / 1e6:>24.2f}M" for n in counts))


if __name__ == "__main__":
    print_config_table()
