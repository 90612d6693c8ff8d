import math

import pytest
import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention as TimmAttention

import models
import pde_ssm
from models import DiT, UNet, build_model, DiT_models
from pde_ssm import PDESSM

MIXERS = ["attn", "pdessm"]


def tiny_dit(mixer="attn", **kwargs):
    options = dict(input_size=16, in_channels=3, num_classes=10, learn_sigma=False, mixer=mixer)
    options.update(kwargs)
    return build_model("DiT-T/2", **options)


def tiny_unet(**kwargs):
    options = dict(input_size=16, in_channels=3, num_classes=10, block_out_channels=(32, 64),
                   attention_levels=(1,), layers_per_block=1, attention_head_dim=16, norm_num_groups=8)
    options.update(kwargs)
    return UNet(**options)


def inputs(batch=2, channels=3, size=16, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.rand(batch, generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


def perturb_zero_init(model, std=0.1):
    """Give adaLN-Zero and the zero final layer random weights so every path carries signal."""
    torch.manual_seed(1)
    layers = [block.adaLN_modulation[-1] for block in model.blocks]
    layers += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(std=std)
            layer.bias.normal_(std=std)
    return model


#################################################################################
#                     Official DiT structure and equations                      #
#################################################################################

# facebookresearch/DiT models.py, DiT-S/2 (hidden 384, depth 12, 6 heads, patch 2) on a
# 4x32x32 latent with 1000 classes, learn_sigma=True (8 output channels), written out from
# its modules: PatchEmbed conv, TimestepEmbedder mlp (256 -> 384 -> 384), LabelEmbedder with
# 1000 + 1 null rows, 16x16 = 256 tokens, timm Attention/Mlp(4x) and adaLN (6 x 384) per
# block, FinalLayer (2 * 2 * 8 = 32 outputs, adaLN 2 x 384).
OFFICIAL_DIT_S2 = {
    "pos_embed": (1, 256, 384),
    "x_embedder.proj.weight": (384, 4, 2, 2),
    "x_embedder.proj.bias": (384,),
    "t_embedder.mlp.0.weight": (384, 256),
    "t_embedder.mlp.0.bias": (384,),
    "t_embedder.mlp.2.weight": (384, 384),
    "t_embedder.mlp.2.bias": (384,),
    "y_embedder.embedding_table.weight": (1001, 384),
    "final_layer.linear.weight": (32, 384),
    "final_layer.linear.bias": (32,),
    "final_layer.adaLN_modulation.1.weight": (768, 384),
    "final_layer.adaLN_modulation.1.bias": (768,),
}
OFFICIAL_DIT_S2_BLOCK = {
    "attn.qkv.weight": (1152, 384),
    "attn.qkv.bias": (1152,),
    "attn.proj.weight": (384, 384),
    "attn.proj.bias": (384,),
    "mlp.fc1.weight": (1536, 384),
    "mlp.fc1.bias": (1536,),
    "mlp.fc2.weight": (384, 1536),
    "mlp.fc2.bias": (384,),
    "adaLN_modulation.1.weight": (2304, 384),
    "adaLN_modulation.1.bias": (2304,),
}


def test_dit_s2_state_dict_is_official():
    expected = dict(OFFICIAL_DIT_S2)
    for i in range(12):
        expected.update({f"blocks.{i}.{key}": shape for key, shape in OFFICIAL_DIT_S2_BLOCK.items()})
    with torch.device("meta"):
        model = build_model("DiT-S/2", input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    got = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert got == expected
    assert not model.pos_embed.requires_grad


def test_attention_matches_timm_layout():
    # Official DiT checkpoints store timm's qkv layout; ours must read it the same way.
    ours = models.Attention(64, num_heads=4)
    reference = TimmAttention(64, num_heads=4, qkv_bias=True)
    reference.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(ours(x, (2, 5)), reference(x))
    ours.naive = True       # the written-out softmax(QK^T)V of the benchmarks: same function
    torch.testing.assert_close(ours(x, (2, 5)), reference(x))


def test_sincos_position_embedding_closed_form():
    # MAE/DiT layout: token (row i, col j) -> [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-k/(D/4)).
    D, H, W = 16, 3, 5
    omega = [10000 ** (-k / (D // 4)) for k in range(D // 4)]
    expected = torch.tensor([
        [math.sin(j * w) for w in omega] + [math.cos(j * w) for w in omega]
        + [math.sin(i * w) for w in omega] + [math.cos(i * w) for w in omega]
        for i in range(H) for j in range(W)
    ])
    torch.testing.assert_close(models.get_2d_sincos_pos_embed(D, (H, W)), expected)
    model = DiT(input_size=6, patch_size=2, in_channels=3, hidden_size=D, depth=1, num_heads=2, num_classes=0)
    torch.testing.assert_close(model.pos_embed[0], expected.view(H, W, D)[:3, :3].reshape(9, D))


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 0.37, 999.0])
    freqs = [math.exp(-math.log(10000) * k / 128) for k in range(128)]
    expected = torch.tensor([[math.cos(s * f) for f in freqs] + [math.sin(s * f) for f in freqs] for s in t.tolist()])
    torch.testing.assert_close(models.TimestepEmbedder.timestep_embedding(t, 256), expected, atol=2e-4, rtol=0)


@pytest.mark.parametrize("mixer", MIXERS)
def test_adaln_zero_identity_at_init(mixer):
    model = tiny_dit(mixer).eval()
    x, t, y = inputs()
    tokens = torch.randn(2, 64, 64)
    c = torch.randn(2, 64)
    for block in model.blocks:
        assert torch.equal(block(tokens, c, (8, 8)), tokens)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))


#################################################################################
#                          Mixer swap and the registry                          #
#################################################################################

def test_mixer_swap_changes_only_mixer_modules():
    def tree(model):
        return {name: type(module) for name, module in model.named_modules()}

    def outside_mixers(modules):
        return {name: kind for name, kind in modules.items()
                if not (name.startswith("blocks.") and name.split(".")[2:3] == ["attn"])}

    attn, pdessm = tree(build_model("DiT-T/2")), tree(build_model("PDESSM-DiT-T/2"))
    assert outside_mixers(attn) == outside_mixers(pdessm)
    for i in range(4):
        assert attn[f"blocks.{i}.attn"] is models.Attention
        assert pdessm[f"blocks.{i}.attn"] is PDESSM


def test_registry_names_configs_and_mixer_override():
    sizes = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6), "T": (4, 64, 4)}
    dit_names = [f"DiT-{s}/{p}" for s in "XL L B S".split() for p in (2, 4, 8)] + [f"DiT-T/{p}" for p in (1, 2, 4)]
    assert set(DiT_models) == set(dit_names) | {"PDESSM-" + n for n in dit_names} | {"UNet-S", "UNet-B", "UNet-T"}
    for name in ["DiT-XL/2", "DiT-L/4", "PDESSM-DiT-B/8", "PDESSM-DiT-S/2", "DiT-T/1"]:
        size, patch = name.split("-")[-1].split("/")
        with torch.device("meta"):
            model = build_model(name)
        assert (len(model.blocks), model.pos_embed.shape[-1], model.num_heads) == sizes[size]
        assert model.patch_size == int(patch)
        assert model.mixer == ("pdessm" if name.startswith("PDESSM") else "attn")
    pdessm = build_model("PDESSM-DiT-T/2")
    assert pdessm.blocks[0].attn.coupling == "pairwise"
    assert build_model("PDESSM-DiT-T/2", mixer="attn").mixer == "attn"
    assert build_model("DiT-T/2", mixer="pdessm").mixer == "pdessm"
    diagonal = build_model("DiT-T/2", mixer="pdessm", pdessm_coupling="diagonal", pdessm_hidden=32)
    assert (diagonal.blocks[0].attn.coupling, diagonal.blocks[0].attn.hidden_dim) == ("diagonal", 32)
    # The heads coupling takes as many channel groups as the config has attention heads, unless told.
    for name, groups in (("PDESSM-DiT-S/2", 6), ("PDESSM-DiT-B/2", 12), ("PDESSM-DiT-XL/2", 16)):
        with torch.device("meta"):
            mixer = build_model(name, pdessm_coupling="heads").blocks[0].attn
        assert (mixer.coupling, mixer.num_heads) == ("heads", groups)
    assert build_model("PDESSM-DiT-T/2", pdessm_coupling="heads", pdessm_heads=2).blocks[0].attn.num_heads == 2


#################################################################################
#                      Gradients, guidance, label dropout                       #
#################################################################################

def assert_every_parameter_gets_gradient(model, x, t, y):
    model.train()
    model(x, t, y).square().mean().backward()
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not missing


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_reach_every_parameter_dit(mixer):
    model = perturb_zero_init(tiny_dit(mixer, class_dropout_prob=0.5))
    torch.manual_seed(0)  # label dropout: some samples keep labels, some take the null row
    x, t, y = inputs(batch=4)
    assert_every_parameter_gets_gradient(model, x, t, y)


def test_gradients_reach_every_parameter_unet():
    torch.manual_seed(0)
    x, t, y = inputs(batch=4)
    assert_every_parameter_gets_gradient(tiny_unet(class_dropout_prob=0.5), x, t, y)


def test_grad_checkpoint_gives_same_gradients():
    reference = perturb_zero_init(tiny_dit("pdessm", class_dropout_prob=0.0))
    x, t, y = inputs()
    grads = []
    for flag in (False, True):
        model = tiny_dit("pdessm", class_dropout_prob=0.0, grad_checkpoint=flag)
        model.load_state_dict(reference.state_dict())
        model.train()(x, t, y).square().mean().backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])


GUIDANCE_CASES = {
    "dit": lambda: perturb_zero_init(tiny_dit("attn")),
    "dit-learn-sigma": lambda: perturb_zero_init(tiny_dit("pdessm", learn_sigma=True)),
    "unet": tiny_unet,
}


@pytest.mark.parametrize("case", list(GUIDANCE_CASES))
def test_forward_with_cfg(case):
    model = GUIDANCE_CASES[case]().eval()
    x, t, y = inputs()
    null = torch.full_like(y, 10)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond, atol=1e-5, rtol=1e-5)
        guided = model.forward_with_cfg(x, t, y, 4.0)
    c = model.in_channels
    assert guided.shape == (2, model.out_channels, 16, 16)
    torch.testing.assert_close(guided[:, :c], uncond[:, :c] + 4.0 * (cond[:, :c] - uncond[:, :c]), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(guided[:, c:], cond[:, c:], atol=1e-5, rtol=1e-5)  # variance channels, if any


def test_unet_has_null_class_and_keeps_shapes():
    model = build_model("UNet-S", input_size=16, in_channels=3, num_classes=10)
    assert model.unet.class_embedding.weight.shape[0] == 11
    assert (model.in_channels, model.out_channels, model.num_classes) == (3, 3, 10)
    x, t, y = inputs()
    assert tiny_unet()(x, t, y).shape == x.shape


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_label_dropout_one_means_null_class(make):
    model = make(class_dropout_prob=1.0)
    if isinstance(model, DiT):
        perturb_zero_init(model)
    x, t, y = inputs()
    with torch.no_grad():
        dropped = model.train()(x, t, y)
        null = model.eval()(x, t, torch.full_like(y, 10))
        kept = model(x, t, y)
    torch.testing.assert_close(dropped, null)
    assert not torch.allclose(kept, null)


def test_unconditional_model_ignores_labels():
    model = perturb_zero_init(tiny_dit(num_classes=0)).eval()
    assert not hasattr(model, "y_embedder")
    x, t, y = inputs()
    torch.testing.assert_close(model(x, t, None), model(x, t, y))
    with pytest.raises(ValueError, match="guidance"):
        model.forward_with_cfg(x, t, y, 2.0)


#################################################################################
#               Resolution change, compile, autocast, bad input                 #
#################################################################################

@pytest.mark.parametrize("mixer", MIXERS)
def test_runs_at_other_resolutions(mixer):
    model = perturb_zero_init(tiny_dit(mixer)).eval()
    stored = model.pos_embed
    torch.testing.assert_close(model.position_embedding((8, 8), "cpu"), stored)
    torch.testing.assert_close(models.get_2d_sincos_pos_embed(64, (8, 8))[None], stored)
    for size in [(24, 24), (32, 32), (24, 32)]:
        x = torch.randn(2, 3, *size)
        t, y = torch.rand(2), torch.tensor([1, 7])
        with torch.no_grad():
            out = model(x, t, y)
        assert out.shape == x.shape and torch.isfinite(out).all()
        # The recomputed table must be the one a model built at this size stores.
        if size[0] == size[1]:
            native = tiny_dit(mixer, input_size=size[0])
            state = dict(model.state_dict(), pos_embed=native.pos_embed)
            native.load_state_dict(state)
            with torch.no_grad():
                torch.testing.assert_close(native.eval()(x, t, y), out)


@pytest.mark.parametrize("mixer", MIXERS)
def test_torch_compile_fullgraph(mixer):
    torch._dynamo.reset()
    model = perturb_zero_init(DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2,
                                  num_heads=2, num_classes=10, learn_sigma=False, mixer=mixer)).eval()
    x, t, y = inputs(size=8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model(x, t, y))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused product and inductor's GPU code need CUDA")
@pytest.mark.parametrize("mixer", MIXERS)
def test_torch_compile_fullgraph_on_cuda(mixer):
    # On CUDA PDE-SSM takes the dense transforms and the fused product, whose launches are
    # custom operators: the model, backward included, compiles into one graph with inductor
    # and matches eager mode.
    torch._dynamo.reset()
    model = perturb_zero_init(tiny_dit(mixer)).cuda().eval()     # eval: no random label dropout
    x, t, y = (v.cuda() for v in inputs())
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for net in (model, compiled):
        model.zero_grad()
        out = net(x, t, y)
        out.square().mean().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad])
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5)


def test_torch_compile_fullgraph_with_dense_transforms(monkeypatch):
    # The dense transforms, which PDE-SSM takes on small grids on CUDA, trace into one graph too
    # (here with the PyTorch product; on CUDA with the fused one, test_torch_compile_fullgraph_on_cuda).
    monkeypatch.setattr(pde_ssm, "DENSE_TRANSFORMS", True)
    test_torch_compile_fullgraph("pdessm")


@pytest.mark.parametrize("mixer", MIXERS)
def test_bf16_autocast_forward_is_finite(mixer):
    model = perturb_zero_init(tiny_dit(mixer)).eval()
    x, t, y = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out.float()).all()


def test_unknown_model_name_lists_choices():
    with pytest.raises(ValueError, match="DiT-S/2.*PDESSM-DiT-T/2.*UNet-S"):
        build_model("DiT-Q/2")


@pytest.mark.parametrize("make", [tiny_dit, tiny_unet])
def test_bad_inputs_raise_clear_errors(make):
    model = make().eval()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="not divisible"):
        model(torch.randn(2, 3, 15, 16), t, y)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(2, 4, 16, 16), t, y)
    with pytest.raises(ValueError, match=r"in \[0, 10\]"):
        model(x, t, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match=r"in \[0, 10\]"):
        model(x, t, torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="labels"):
        model(x, t, None)
    with pytest.raises(ValueError, match="t of shape"):
        model(x, t[:1], y)
    model(x, t, torch.tensor([10, 10]))  # the null class is a valid label


def test_bad_configurations_raise_clear_errors():
    no_null = tiny_dit(class_dropout_prob=0.0)
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"in \[0, 9\]"):
        no_null(x, t, torch.tensor([10, 0]))
    with pytest.raises(ValueError, match="class_dropout_prob"):
        no_null.forward_with_cfg(x, t, y, 2.0)
    with pytest.raises(ValueError, match="patch_size"):
        tiny_dit(input_size=15)
    with pytest.raises(ValueError, match="mixer"):
        tiny_dit("conv")
    with pytest.raises(ValueError, match="learn_sigma"):
        tiny_unet(learn_sigma=True)
    with pytest.raises(ValueError, match="divisible by 2"):
        tiny_unet(input_size=15)
    with pytest.raises(ValueError, match="no token mixer"):
        build_model("UNet-S", mixer="pdessm")
