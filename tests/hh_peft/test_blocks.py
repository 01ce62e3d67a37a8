"""Block layouts: one Householder-SVD block per projection of a fused qkv, square blocks on rectangular layers."""

import copy
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import hh_peft
from hh_peft import HouseholderConfig
from hh_peft.functional import AdapterSpec, BlockLayout, FoldedHTALinear, delta_weight, hta_factors

timm = pytest.importorskip("timm")


class TimmBlock(nn.Module):
    """A timm ``Attention`` (fused ``qkv`` 16 -> 48, q / k / v consecutive row blocks) and an FFN."""

    def __init__(self, dim=16):
        super().__init__()
        self.attn = timm.layers.Attention(dim, num_heads=2, qkv_bias=True)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc2(torch.relu(self.fc1(x)))


class Fused(nn.Module):
    def __init__(self, dim=6):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        return self.qkv(x)


class Separate(nn.Module):
    def __init__(self, dim=6):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def block_reference(layer, adapter="default"):
    """``delta_W`` of a block adapter rebuilt block by block from the one-block maths (float64); blocks that are
    not adapted are zero."""
    layout = layer.hta_layout[adapter]
    blocks = layout.unpack(layer._adapter_parameters(adapter))
    householder = layer.hta_householder[adapter]
    adapted = layout.adapted if layout.adapted is not None else range(layout.blocks)
    out_b, in_b = layout.block_shape(layer.out_features, layer.in_features)
    parts = [torch.zeros(out_b, in_b, dtype=blocks.d.dtype) for _ in range(layout.blocks)]
    for j, b in enumerate(adapted):
        A = blocks.A[j] if blocks.A is not None else None
        B = blocks.B[j] if blocks.B is not None else None
        parts[b] = delta_weight(*hta_factors(blocks.u_in[j], blocks.u_out[j], blocks.d[j], A, B, householder=householder))
    return torch.cat(parts, dim=0 if layout.side == "out" else 1)


def timm_model(**kwargs):
    torch.manual_seed(0)
    base = TimmBlock().double()
    kwargs.setdefault("target_modules", ["qkv", "proj", "fc1", "fc2"])
    kwargs.setdefault("init_weights", False)
    return base, get_peft_model(copy.deepcopy(base), HouseholderConfig(**kwargs))


def test_timm_qkv_gets_one_full_diagonal_per_projection():
    _, model = timm_model(lora_rank=0)
    config = model.peft_config["default"]
    assert config.block_layout == {"attn.qkv": [3, 1]}  # proj (square) and the FFN stay one block
    qkv = model.base_model.model.attn.qkv
    assert qkv.hta_u_in["default"].shape == (48,) and qkv.hta_d["default"].shape == (48,)
    delta = qkv.get_delta_weight("default")
    assert [torch.linalg.matrix_rank(block).item() for block in delta.split(16)] == [16, 16, 16]
    torch.testing.assert_close(delta, block_reference(qkv), rtol=0, atol=1e-12)


def test_output_blocks_one_keeps_the_fused_layout():
    _, model = timm_model(lora_rank=1, output_blocks=1)
    assert model.peft_config["default"].block_layout == {}
    delta = model.base_model.model.attn.qkv.get_delta_weight("default")
    assert [torch.linalg.matrix_rank(block).item() for block in delta.split(16)] == [16, 2, 2]


@pytest.mark.parametrize("householder", ["normalized", "paper"])
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_fused_blocks_equal_separate_layers(householder, rank):
    """The same vectors placed in separate q, k, v layers or in the blocks of one fused layer: the same delta_W,
    outputs and gradients (float64)."""
    torch.manual_seed(1)
    separate = Separate().double()
    fused = Fused().double()
    with torch.no_grad():
        fused.qkv.weight.copy_(torch.cat([separate.q.weight, separate.k.weight, separate.v.weight]))
        fused.qkv.bias.copy_(torch.cat([separate.q.bias, separate.k.bias, separate.v.bias]))
    common = dict(init_weights=False, lora_rank=rank, householder=householder)
    separate = get_peft_model(separate, HouseholderConfig(target_modules=["q", "k", "v"], **common))
    fused = get_peft_model(fused, HouseholderConfig(target_modules=["qkv"], output_blocks={"qkv": 3}, **common))
    assert fused.peft_config["default"].block_layout == {"qkv": [3, 1]}
    layers = [getattr(separate.base_model.model, name) for name in "qkv"]
    target = fused.base_model.model.qkv
    names = ["hta_u_in", "hta_u_out", "hta_d"] + (["hta_A", "hta_B"] if rank else [])
    with torch.no_grad():
        for name in names:
            dim = 1 if name == "hta_A" else 0
            getattr(target, name)["default"].copy_(torch.cat([getattr(l, name)["default"] for l in layers], dim=dim))
    expected = torch.cat([l.get_delta_weight("default") for l in layers])
    torch.testing.assert_close(target.get_delta_weight("default"), expected, rtol=0, atol=1e-12)
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    y_sep, y_fused = separate(x), fused(x)
    torch.testing.assert_close(y_fused, y_sep, rtol=0, atol=1e-12)
    g = torch.randn_like(y_sep)
    (y_sep * g).sum().backward()
    (y_fused * g).sum().backward()
    for name in names:
        dim = 1 if name == "hta_A" else 0
        expected_grad = torch.cat([getattr(l, name)["default"].grad for l in layers], dim=dim)
        torch.testing.assert_close(getattr(target, name)["default"].grad, expected_grad, rtol=0, atol=1e-11)


@pytest.mark.parametrize(
    "layout",
    [BlockLayout(3, "out"), BlockLayout(2, "in"), BlockLayout(2, "out"), BlockLayout(3, "out", (0, 2)), BlockLayout(2, "in", (1,))],
)
@pytest.mark.parametrize("householder", ["normalized", "paper"])
def test_folded_function_with_blocks_gradcheck(layout, householder):
    torch.manual_seed(0)
    out_features, in_features, rank = 6, 4, 1
    shapes = layout.parameter_shapes(out_features, in_features, rank)
    params = [torch.randn(shapes[name], dtype=torch.float64, requires_grad=True) for name in ("u_in", "u_out", "d", "A", "B")]
    x = torch.randn(5, in_features, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(out_features, in_features, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out_features, dtype=torch.float64, requires_grad=True)
    specs = (AdapterSpec(householder, 1e-12, layout), AdapterSpec(householder, 1e-12, BlockLayout()))
    one_block = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in BlockLayout().parameter_shapes(6, 4, 1).values()]
    inputs = (x, weight, bias, *params, *one_block)
    function = lambda x, w, b, *ps: FoldedHTALinear.apply(x, w, b, specs, *ps)  # noqa: E731
    torch.autograd.gradcheck(function, inputs)
    torch.autograd.gradgradcheck(function, inputs)


def test_column_blocks_and_square_blocks_option():
    """``rectangular="square_blocks"``: 16 -> 64 gets 4 row blocks, 64 -> 16 gets 4 column blocks, each 16 x 16 with
    its own full diagonal; the activation path (dropout) and the folded path agree."""
    base, model = timm_model(lora_rank=1, rectangular="square_blocks")
    layout = model.peft_config["default"].block_layout
    assert layout == {"attn.qkv": [3, 1], "fc1": [4, 1], "fc2": [1, 4]}
    inner = model.base_model.model
    for layer, split in ((inner.fc1, 0), (inner.fc2, 1)):
        assert layer.hta_d["default"].numel() == 64
        delta = layer.get_delta_weight("default")
        torch.testing.assert_close(delta, block_reference(layer), rtol=0, atol=1e-12)
        assert [torch.linalg.matrix_rank(b).item() for b in delta.split(16, dim=split)] == [16] * 4
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    folded = model(x)
    inner.fc2.hta_dropout["default"] = nn.Dropout(0.0)  # activation-space path with nothing dropped
    model.train()
    torch.testing.assert_close(model(x), folded, rtol=0, atol=1e-12)


def test_paper_form_blocks_start_orthogonal():
    _, model = timm_model(householder="paper", init_weights=True)
    qkv = model.base_model.model.attn.qkv
    norms = qkv.hta_u_in["default"].view(3, -1).norm(dim=-1) ** 2
    torch.testing.assert_close(norms, torch.full((3,), 2.0, dtype=torch.float64))
    assert not qkv.get_delta_weight("default").any()  # identity at init


def test_merge_unmerge_and_mixed_batch():
    base, model = timm_model()
    model.eval()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    y = model(x)
    with model.disable_adapter():
        y_base = model(x)
    model.add_adapter("other", HouseholderConfig(target_modules=["qkv"], init_weights=False))
    mixed = model(x, adapter_names=["default", "__base__", "other"])
    torch.testing.assert_close(mixed[0], y[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(mixed[1], y_base[1], rtol=0, atol=1e-12)
    model.set_adapter("other")
    torch.testing.assert_close(mixed[2], model(x)[2], rtol=0, atol=1e-12)
    model.set_adapter("default")
    weight = model.base_model.model.attn.qkv.base_layer.weight.clone()
    model.merge_adapter()
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-12)
    model.unmerge_adapter()
    torch.testing.assert_close(model.base_model.model.attn.qkv.base_layer.weight, weight, rtol=0, atol=1e-13)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), y, rtol=0, atol=1e-12)


def test_save_load_keeps_the_layout(tmp_path):
    base, model = timm_model(rectangular="square_blocks")
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y = model(x)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["block_layout"] == {"attn.qkv": [3, 1], "fc1": [4, 1], "fc2": [1, 4]}
    # Loading follows the saved layout, not the detection: even a config asking for one block everywhere would not
    # change it, because the resolved block_layout decides.
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].block_layout == saved["block_layout"]
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)


def test_adapter_saved_before_blocks_loads_in_the_old_layout(tmp_path):
    """A config saved before block layouts existed has neither ``output_blocks`` nor ``block_layout``: its fused
    qkv is one block (the old tensor shapes), although a fresh config would now cut it into three."""
    base, model = timm_model(output_blocks=1)  # the old layout
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y = model(x)
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    for new_field in ("output_blocks", "input_blocks", "rectangular", "block_layout"):
        del saved[new_field]
    config_path.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].block_layout == {}
    assert loaded.base_model.model.attn.qkv.hta_u_in["default"].shape == (16,)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    # the same file with a fresh config (no block_layout) is refused: the detected layout does not fit its tensors
    fresh = HouseholderConfig(target_modules=saved["target_modules"], lora_rank=saved["lora_rank"])
    with pytest.raises(ValueError, match="qkv"):
        PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, config=fresh)


@pytest.mark.parametrize("combination_type", ["linear"])
def test_add_weighted_adapter_combines_blocks(combination_type):
    base, model = timm_model(target_modules=["qkv", "fc1"], rectangular="square_blocks")
    second = HouseholderConfig(target_modules=["qkv", "fc1"], rectangular="square_blocks", init_weights=False)
    model.add_adapter("second", second)
    if combination_type == "linear":
        for layer in (model.base_model.model.attn.qkv, model.base_model.model.fc1):
            with torch.no_grad():
                layer.hta_u_in["second"].copy_(layer.hta_u_in["default"])
                layer.hta_u_out["second"].copy_(layer.hta_u_out["default"])
    model.add_weighted_adapter(["default", "second"], [0.5, -2.0], "combined", combination_type=combination_type)
    for layer in (model.base_model.model.attn.qkv, model.base_model.model.fc1):
        expected = 0.5 * layer.get_delta_weight("default") - 2.0 * layer.get_delta_weight("second")
        torch.testing.assert_close(layer.get_delta_weight("combined"), expected, rtol=0, atol=1e-12)
        assert layer.hta_layout["combined"] == layer.hta_layout["default"]


def test_add_weighted_adapter_scales_one_block_adapter_and_refuses_cat():
    base, model = timm_model(target_modules=["qkv"])
    model.add_weighted_adapter(["default"], [3.0], "scaled", combination_type="cat")  # one adapter: always linear
    qkv = model.base_model.model.attn.qkv
    torch.testing.assert_close(qkv.get_delta_weight("scaled"), 3.0 * qkv.get_delta_weight("default"), rtol=0, atol=1e-12)
    model.add_adapter("second", HouseholderConfig(target_modules=["qkv"], init_weights=False))
    with pytest.raises(ValueError, match="combination_type='cat' is not supported yet for HTA adapters with blocks"):
        model.add_weighted_adapter(["default", "second"], [1.0, 1.0], "combined", combination_type="cat")
    assert "combined" not in model.peft_config


def test_add_weighted_adapter_refuses_different_layouts():
    base, model = timm_model(target_modules=["qkv"])
    model.add_adapter("fused", HouseholderConfig(target_modules=["qkv"], output_blocks=1, init_weights=False))
    with pytest.raises(ValueError, match=r"layer 'attn.qkv' has 'default': \[3, 1\], 'fused': \[1, 1\]"):
        model.add_weighted_adapter(["default", "fused"], [1.0, 1.0], "combined", combination_type="linear")
    assert "combined" not in model.peft_config


def test_hotswap_block_adapters(tmp_path):
    base, model = timm_model(target_modules=["qkv"])
    model.save_pretrained(tmp_path / "a")
    torch.manual_seed(5)
    other = get_peft_model(copy.deepcopy(base), HouseholderConfig(target_modules=["qkv"], init_weights=False))
    other.save_pretrained(tmp_path / "b")
    one_block = get_peft_model(copy.deepcopy(base), HouseholderConfig(target_modules=["qkv"], output_blocks=1))
    one_block.save_pretrained(tmp_path / "c")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    hh_peft.hotswap_adapter(loaded, str(tmp_path / "b"), adapter_name="default", torch_device="cpu")
    torch.testing.assert_close(loaded(x), other.eval()(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        hh_peft.hotswap_adapter(loaded, str(tmp_path / "c"), adapter_name="default", torch_device="cpu")


def test_gpt2_c_attn_detected():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32, n_positions=8)
    base = transformers.GPT2Model(config)
    model = get_peft_model(base, HouseholderConfig(target_modules=["c_attn", "c_proj"], init_weights=False, lora_rank=0))
    assert model.peft_config["default"].block_layout == {"h.0.attn.c_attn": [3, 1]}
    layer = model.base_model.model.h[0].attn.c_attn
    delta = layer.get_delta_weight("default")  # Conv1D layout (in, out)
    assert [torch.linalg.matrix_rank(b).item() for b in delta.double().split(16, dim=1)] == [16, 16, 16]
    model(torch.tensor([[1, 2, 3]])).last_hidden_state.sum().backward()


def test_bad_block_settings_are_refused():
    with pytest.raises(ValueError, match="output_blocks"):
        HouseholderConfig(target_modules=["qkv"], output_blocks=0)
    with pytest.raises(ValueError, match="rectangular"):
        HouseholderConfig(target_modules=["qkv"], rectangular="square")
    with pytest.raises(ValueError, match=r"'fc1'.*5 output blocks do not divide out_features=64"):
        timm_model(output_blocks={"fc1": 5})


def test_adapted_blocks_q_and_v_only(tmp_path):
    """``adapted_blocks={"qkv": [0, 2]}``: q and v of the fused qkv get a block each, k none (no parameters)."""
    base, model = timm_model(target_modules=["qkv"], adapted_blocks={"qkv": [0, 2]})
    assert model.peft_config["default"].block_layout == {"attn.qkv": [3, 1, [0, 2]]}
    qkv = model.base_model.model.attn.qkv
    assert qkv.hta_u_in["default"].shape == (32,) and qkv.hta_B["default"].shape == (32, 1)
    delta = qkv.get_delta_weight("default")
    torch.testing.assert_close(delta, block_reference(qkv), rtol=0, atol=1e-12)
    assert not delta[16:32].any() and delta[:16].any() and delta[32:].any()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    y = model(x)
    model.train()
    qkv.hta_dropout["default"] = nn.Dropout(0.0)  # the activation-space path
    torch.testing.assert_close(model(x), y, rtol=0, atol=1e-12)
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x), y, rtol=0, atol=0)
    with pytest.raises(ValueError, match="adapted blocks must be distinct indices"):
        timm_model(target_modules=["qkv"], adapted_blocks={"qkv": [3]})
