"""LorsLinear and SharedWeight: both forward paths, rank 0, the `weight` property, scratch init."""

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lors_hf import LorsLinear, SharedWeight, lorsify
from lors_hf.layer import _MaterializedLorsLinear

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build  # noqa: E402


def _layer(out_features=12, in_features=7, rank=3, bias=True, fan_in_fan_out=False, seed=0):
    torch.manual_seed(seed)
    shared = SharedWeight(out_features, in_features)
    nn.init.normal_(shared.weight)
    layer = LorsLinear(shared, rank, bias=bias, fan_in_fan_out=fan_in_fan_out)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_()
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 7), (2, 5, 7), (1, 1, 7)])
def test_materialised_and_factored_paths_agree(shape, bias):
    layer = _layer(bias=bias)
    x = torch.randn(*shape)
    expected = x @ (layer.shared.weight + layer.lors_B @ layer.lors_A).T
    if bias:
        expected = expected + layer.bias
    layer.materialize_above = 0  # every input materialises W_shared + B A
    materialised = layer(x)
    layer.materialize_above = math.inf  # every input takes x W^T + (x A^T) B^T
    factored = layer(x)
    assert materialised.shape == (*shape[:-1], 12)
    torch.testing.assert_close(materialised, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(factored, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("materialize_above", [0, math.inf])
def test_an_input_of_another_dtype_fails_on_both_paths_as_for_nn_linear(materialize_above):
    """Outside autocast a bf16 input to a float32 layer is the caller's error, whatever the number of tokens (the
    materialised path cast it silently, the factored one failed)."""
    layer = _layer()
    layer.materialize_above = materialize_above
    x = torch.randn(4, 7, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="dtype"):
        nn.Linear(7, 12)(x)
    with pytest.raises(RuntimeError, match="dtype"):
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast both run, in bf16
        assert layer(x).dtype == torch.bfloat16


def test_both_paths_give_the_same_gradients():
    x = torch.randn(3, 5, 7)
    grads = []
    for threshold in (0, math.inf):
        layer = _layer()
        layer.materialize_above = threshold
        layer(x).pow(2).sum().backward()
        grads.append([layer.shared.weight.grad, layer.lors_A.grad, layer.lors_B.grad, layer.bias.grad])
    for materialised, factored in zip(*grads, strict=True):
        assert materialised.abs().sum() > 0
        torch.testing.assert_close(materialised, factored, rtol=1e-4, atol=1e-4)


def test_materialised_training_path_passes_gradcheck():
    torch.manual_seed(0)
    shapes = [(2, 3, 4), (5, 4), (2, 4), (5, 2), (5,)]  # x, shared, A, B, bias
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    assert torch.autograd.gradcheck(_MaterializedLorsLinear.apply, inputs)
    assert torch.autograd.gradcheck(_MaterializedLorsLinear.apply, [*inputs[:4], None])


def test_materialised_training_path_is_twice_differentiable():
    """Gradient penalties and MAML-style steps differentiate the backward pass: it must build a graph too (it
    was marked once-differentiable, so large batches failed or gave None where small ones worked)."""
    torch.manual_seed(0)
    shapes = [(2, 3, 4), (5, 4), (2, 4), (5, 2), (5,)]  # x, shared, A, B, bias
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    assert torch.autograd.gradgradcheck(_MaterializedLorsLinear.apply, inputs)
    layer = _layer().double()
    layer.shared.double()  # not a submodule of the layer: a model's .double() converts it, the layer's does not
    x = torch.randn(64, 7, dtype=torch.float64, requires_grad=True)  # above materialize_above: that path
    assert x.shape[0] > layer.materialize_above
    (grad_x,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    penalty = torch.autograd.grad(grad_x.square().sum(), layer.lors_B, allow_unused=True)[0]
    assert penalty is not None and penalty.abs().sum() > 0


def test_materialised_training_path_works_under_torch_func():
    """torch.func (grad, per-sample gradients with vmap, jvp) works on a LORS layer as on nn.Linear: it failed on
    the materialised path only ("must override the setup_context staticmethod"), i.e. for many tokens."""
    from torch.func import functional_call, grad, jvp, vmap

    layer = _layer().double()
    layer.shared.double()
    x = torch.randn(4, 16, 7, dtype=torch.float64)
    assert x[0].numel() // 7 > layer.materialize_above  # even one sample takes the materialised path
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def plain(p, inp):  # the same layer as plain autograd ops
        return F.linear(inp, layer.shared.weight.detach() + p["lors_B"] @ p["lors_A"], p["bias"])

    def lors(p, inp):
        return functional_call(layer, p, (inp,))

    def loss(forward):
        return lambda p, inp: forward(p, inp).square().sum()

    got, expected = grad(loss(lors))(params, x), grad(loss(plain))(params, x)
    per_sample = vmap(grad(loss(lors)), in_dims=(None, 0))(params, x)
    per_sample_expected = vmap(grad(loss(plain)), in_dims=(None, 0))(params, x)
    tangents = {name: torch.randn_like(p) for name, p in params.items()}
    x_tangent = torch.randn_like(x)
    _, forward_mode = jvp(lors, (params, x), (tangents, x_tangent))
    _, forward_mode_expected = jvp(plain, (params, x), (tangents, x_tangent))
    for name in params:
        torch.testing.assert_close(got[name], expected[name])
        torch.testing.assert_close(per_sample[name], per_sample_expected[name])
    torch.testing.assert_close(forward_mode, forward_mode_expected)

    # what eager mode runs (compiled code runs its parent, which dynamo can trace)
    from lors_hf.layer import _MaterializedLorsLinearWithJvp

    torch.manual_seed(0)
    shapes = [(2, 3, 4), (5, 4), (2, 4), (5, 2), (5,)]  # x, shared, A, B, bias
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in shapes]
    for function in (_MaterializedLorsLinear, _MaterializedLorsLinearWithJvp):
        assert torch.autograd.gradcheck(function.apply, inputs, check_batched_grad=True)
    function = _MaterializedLorsLinearWithJvp.apply
    assert torch.autograd.gradcheck(function, inputs, check_forward_ad=True, check_batched_forward_grad=True)
    assert torch.autograd.gradcheck(function, [*inputs[:4], None], check_forward_ad=True)


def test_materialised_training_path_computes_only_the_gradients_asked_for():
    layer = _layer()
    layer.materialize_above = 0
    layer.shared.weight.requires_grad_(False)  # e.g. a frozen shared weight
    x = torch.randn(6, 7)  # an input without grad
    layer(x).sum().backward()
    assert layer.shared.weight.grad is None
    assert layer.lors_A.grad is not None and layer.lors_B.grad is not None and layer.bias.grad is not None


def test_training_keeps_no_materialised_weight_for_backward():
    """Autograd would save each layer's (out, in) weight S + B A; the layer saves only its parameters and input."""
    layer = _layer(out_features=48, in_features=40, rank=4)
    layer.materialize_above = 0
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = layer(torch.randn(64, 40, requires_grad=True))  # inside a model, inputs need grad
    parameters = {p.data_ptr() for p in (layer.shared.weight, layer.lors_A, layer.lors_B)}
    weight_sized = [t for t in saved if t.numel() == 48 * 40 and t.data_ptr() not in parameters]
    assert saved and not weight_sized
    out.sum().backward()


def test_materialised_training_path_under_bf16_autocast_matches_plain_autograd():
    x = torch.randn(4, 9, 7)
    results = []
    for custom in (True, False):
        layer = _layer()
        layer.materialize_above = 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if custom:
                out = layer(x)
            else:
                weight = torch.addmm(layer.shared.weight, layer.lors_B, layer.lors_A)
                out = F.linear(x, weight, layer.bias)
        assert out.dtype == torch.bfloat16
        out.float().pow(2).mean().backward()
        grads = [layer.shared.weight.grad, layer.lors_A.grad, layer.lors_B.grad, layer.bias.grad]
        assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        results.append((out.float(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for ours, reference in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)


def _saved_activation_bytes(run, parameters) -> int:
    """Bytes of the tensors autograd keeps for backward while `run()` builds the graph, `parameters` excluded,
    each storage counted once."""
    parameters = {p.untyped_storage().data_ptr() for p in parameters}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


@pytest.mark.parametrize("tokens", [1, 64])  # the factored and the materialised path
def test_forward_on_the_meta_device_gives_the_shape(tokens):
    """Shape inference with meta tensors: asking whether autocast is on raised for meta ("unknown device type"),
    a RuntimeError from torch before any shape was computed."""
    layer = _layer(out_features=16, in_features=32, rank=2).to("meta")
    layer.shared.to("meta")  # owned by the model, not the layer
    layer.materialize_above = 8
    assert layer(torch.empty(tokens, 32, device="meta")).shape == (tokens, 16)


def test_materialised_path_under_autocast_keeps_its_input_in_the_compute_dtype():
    """Under bf16 autocast backward must keep the bf16 input, as F.linear under autocast does: keeping the float32
    input (a LayerNorm's output in a transformer) held twice the activation bytes of the dense layer."""
    layer = _layer(out_features=16, in_features=32, rank=2)
    layer.materialize_above = 0
    x = torch.randn(64, 32, requires_grad=True)
    dense = nn.Linear(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _saved_activation_bytes(lambda: layer(x), [*layer.parameters(), layer.shared.weight])
        reference = _saved_activation_bytes(lambda: dense(x), dense.parameters())
    assert ours == x.numel() * 2  # the bf16 input and nothing else
    assert ours <= reference  # the dense layer keeps the same input (and its bf16 weight)


def test_factored_path_under_autocast_keeps_one_copy_of_its_input():
    """On the factored path (few tokens: small-batch fine-tuning) autocast cast a float32 input once for each of its
    two matmuls (x S^T and x A^T), and backward kept both bf16 copies: twice the dense layer's input bytes."""
    layer = _layer(out_features=16, in_features=32, rank=2)
    layer.materialize_above = math.inf
    x = torch.randn(64, 32, requires_grad=True)
    dense = nn.Linear(32, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = _saved_activation_bytes(lambda: layer(x), [*layer.parameters(), layer.shared.weight])
        reference = _saved_activation_bytes(lambda: dense(x), dense.parameters())  # bf16 input and weight
    low_rank = (layer.lors_A.numel() + layer.lors_B.numel() + x.shape[0] * layer.rank) * 2  # bf16 A, B and x A^T
    assert ours == reference + low_rank  # was 9664 bytes: a second bf16 copy of x (4096) more


def test_lors_gpt2_under_autocast_keeps_no_more_activations_than_dense():
    """The model-level view of the test above: a lorsified GPT-2 trained under bf16 autocast keeps no more for
    backward than the dense one (it kept more before, the float32 inputs of c_attn and c_fc)."""
    dense = build("gpt2")[0]
    lors = lorsify(build("gpt2")[0], rank=2)
    for module in lors.modules():
        if isinstance(module, LorsLinear):
            module.materialize_above = 0  # the training path, as for long sequences
    ids = torch.randint(0, 99, (8, 64), generator=torch.Generator().manual_seed(0))  # activations outweigh weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved = {name: _saved_activation_bytes(lambda model=model: model(input_ids=ids, labels=ids).loss,
                                               model.parameters())
                 for name, model in (("dense", dense), ("lors", lors))}
    assert saved["lors"] <= saved["dense"], saved


def test_default_threshold_picks_factored_path_for_few_tokens_and_materialises_for_many(monkeypatch):
    layer = _layer(out_features=64, in_features=64, rank=2)
    assert 1 < layer.materialize_above < 1000
    materialised = []
    original_addmm = torch.addmm

    def counting_addmm(*args, **kwargs):
        if args[0].shape == (64, 64):  # S + B A, not the factored path's (tokens, out) accumulation
            materialised.append(1)
        return original_addmm(*args, **kwargs)

    monkeypatch.setattr(torch, "addmm", counting_addmm)
    layer(torch.randn(1, 64))
    assert not materialised
    layer(torch.randn(1000, 64))
    assert len(materialised) == 1


@pytest.mark.parametrize("bias", [True, False])
def test_rank_zero_is_the_shared_weight_plus_private_bias(bias):
    layer = _layer(rank=0, bias=bias)
    assert layer.lors_A.shape == (0, 7) and layer.lors_B.shape == (12, 0)
    x = torch.randn(2, 3, 7)
    torch.testing.assert_close(layer(x), F.linear(x, layer.shared.weight, layer.bias), rtol=0, atol=0)
    assert layer.effective_weight() is layer.shared.weight


def test_weight_property_follows_the_replaced_modules_layout():
    linear_like = _layer(out_features=12, in_features=7, fan_in_fan_out=False)
    conv_like = _layer(out_features=12, in_features=7, fan_in_fan_out=True)
    assert linear_like.weight.shape == nn.Linear(7, 12).weight.shape == (12, 7)
    assert conv_like.weight.shape == Conv1D(12, 7).weight.shape == (7, 12)
    torch.testing.assert_close(conv_like.weight, conv_like.effective_weight().T)
    expected = conv_like.shared.weight + conv_like.lors_B @ conv_like.lors_A
    torch.testing.assert_close(conv_like.effective_weight(), expected)
    # the Conv1D maths is x @ weight + bias, the Linear maths x @ weight.T + bias: same outputs
    x = torch.randn(4, 7)
    torch.testing.assert_close(conv_like(x), x @ conv_like.weight + conv_like.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("rank", [0, 3])
def test_writing_into_the_weight_property_leaves_the_shared_weight_alone(rank, fan_in_fan_out):
    """GPT-2's _init_weights writes into ``attn.c_proj.weight`` in place; at rank 0 that must not reach the
    shared weight (which every layer of the stack reads)."""
    layer = _layer(rank=rank, fan_in_fan_out=fan_in_fan_out)
    before = layer.shared.weight.detach().clone()
    with torch.no_grad():
        layer.weight.normal_()
    assert torch.equal(layer.shared.weight, before)


def test_shared_weight_is_not_a_registered_submodule_of_the_layer():
    layer = _layer()
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"lors_A", "lors_B", "bias"}
    assert "shared" not in dict(layer.named_modules())
    assert "shared.weight" not in layer.state_dict()


@pytest.mark.parametrize("rank", [0, 3])
def test_a_layer_away_from_its_shared_weight_says_so(rank):
    # What nn.DataParallel's replicate() does to a layer: a shallow copy whose own parameters move to another
    # device, while the plain reference still points at the original shared weight ("meta" stands in for GPU 1).
    layer = _layer(rank=rank)
    replica = layer._replicate_for_data_parallel()
    for name, param in layer.named_parameters():
        replica._parameters[name] = nn.Parameter(param.detach().to("meta"))
    with pytest.raises(RuntimeError, match=r"(?s)shared weight is on cpu.*on meta.*DataParallel.*torchrun"):
        replica(torch.randn(3, 7, device="meta"))
    layer(torch.randn(3, 7))  # the original, all on one device, still runs


def test_reset_private_is_the_papers_init():
    layer = _layer(rank=4)
    layer.reset_private()
    assert torch.count_nonzero(layer.lors_B) == 0
    assert torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(layer.lors_A) == layer.lors_A.numel()
    bound = 1 / math.sqrt(layer.in_features)  # kaiming_uniform(a=sqrt(5)) bound
    assert layer.lors_A.abs().max() <= bound + 1e-6


def test_rank_zero_scratch_init_warns_nothing():
    model, _ = build("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorsify(model, rank=0, init="scratch")
    assert {layer.rank for layer in model.modules() if isinstance(layer, LorsLinear)} == {0}


def test_scratch_init_starts_every_layer_equal_to_the_shared_weight():
    model, inputs = build("bert", layers=3)
    first_query = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    biases = [block.attention.self.query.bias.detach().clone() for block in model.bert.encoder.layer]
    lorsify(model, rank=4, init="scratch")
    layers = [module for module in model.modules() if isinstance(module, LorsLinear)]
    assert len(layers) == 6 * 3
    for layer in layers:
        assert torch.count_nonzero(layer.lors_B) == 0
        assert torch.count_nonzero(layer.lors_A) > 0  # A is Kaiming, so B's gradient is nonzero
        torch.testing.assert_close(layer.effective_weight(), layer.shared.weight, rtol=0, atol=0)
    queries = [block.attention.self.query for block in model.bert.encoder.layer]
    torch.testing.assert_close(queries[0].shared.weight, first_query, rtol=0, atol=0)
    for query, bias in zip(queries, biases, strict=True):
        torch.testing.assert_close(query.bias, bias, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_weight_cache_matches_and_follows_weight_updates():
    from lors_hf.layer import set_weight_cache

    torch.manual_seed(0)
    shared = SharedWeight(8, 6)
    torch.nn.init.normal_(shared.weight)
    layer = LorsLinear(shared, rank=2, bias=True)
    torch.nn.init.normal_(layer.lors_A)
    torch.nn.init.normal_(layer.lors_B)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(1, 6)
    with torch.no_grad():
        plain = layer(x)
        set_weight_cache(layer)
        cached = layer(x)
        assert layer._cached is not None
        torch.testing.assert_close(cached, plain)
        layer.lors_B.add_(1.0)  # an in-place update must invalidate the cache
        updated = layer(x)
    set_weight_cache(layer, False)
    with torch.no_grad():
        torch.testing.assert_close(updated, layer(x))
    assert not torch.allclose(updated, plain)
    assert layer._cached is None
    set_weight_cache(layer)
    y = layer(x)  # gradients enabled: the cache is never used, the graph reaches A and B
    y.sum().backward()
    assert layer.lors_A.grad is not None and layer.lors_B.grad is not None


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_the_weight_property_serves_the_cache_and_a_write_into_it_rebuilds_it(fan_in_fan_out, monkeypatch):
    """T5's feed-forward reads ``wo.weight`` twice per call: with the cache on, no read builds the weight again;
    a write into what it returned (a model's _init_weights) neither reaches the shared weight nor stays cached."""
    from lors_hf.layer import set_weight_cache

    layer = _layer(fan_in_fan_out=fan_in_fan_out)
    shared_before = layer.shared.weight.detach().clone()
    x = torch.randn(3, 7)
    builds = []
    build = LorsLinear.effective_weight
    monkeypatch.setattr(LorsLinear, "effective_weight", lambda self: builds.append(1) or build(self))
    set_weight_cache(layer)
    with torch.no_grad():
        expected = F.linear(x, build(layer), layer.bias)
        layer(x)
        for _ in range(4):
            assert layer.weight.dtype == torch.float32
        assert len(builds) == 1
        layer.weight.zero_()  # in place, into the cached tensor
        torch.testing.assert_close(layer(x), expected)  # rebuilt, not the zeros
        assert len(builds) == 2
    torch.testing.assert_close(layer.shared.weight, shared_before)
    layer.weight.sum().backward()  # with gradients: a fresh weight, in the graph of the parameters
    assert layer.lors_B.grad is not None


def test_weight_cache_of_a_conv1d_layer_runs_the_conv1d_product_on_its_layout():
    """The cache keeps a GPT-2 ``Conv1D``'s ``(in, out)`` layout and its ``addmm``: in ``nn.Linear``'s layout a
    one-token product is a different kernel, and GPT-2's cached decode was slower than the dense model's."""
    from lors_hf.layer import set_weight_cache

    layer = _layer(out_features=96, in_features=40, rank=5, fan_in_fan_out=True)
    conv = Conv1D(96, 40)
    with torch.no_grad():
        conv.weight.copy_(layer.effective_weight().t())
        conv.bias.copy_(layer.bias)
        set_weight_cache(layer)
        for shape in [(1, 1, 40), (3, 40), (2, 5, 40)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(layer(x), conv(x), rtol=0, atol=0)  # the same kernel on the same values
        cached = layer._cached[1]
        assert cached.shape == (40, 96) and cached.is_contiguous()
        assert layer.weight is cached


def test_weight_cache_built_under_autocast_serves_a_float32_pass_too():
    from lors_hf.layer import set_weight_cache

    torch.manual_seed(0)
    layer = LorsLinear(SharedWeight(8, 6), rank=2)
    torch.nn.init.normal_(layer.shared.weight)
    layer.reset_private()
    torch.nn.init.normal_(layer.lors_B)
    x = torch.randn(3, 6)
    with torch.no_grad():
        plain = layer(x)
        set_weight_cache(layer)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
        assert layer._cached[1].dtype == torch.float32
        torch.testing.assert_close(layer(x), plain)  # was: "self and mat2 must have the same dtype"
        layer.lors_B.data = layer.lors_B.data * 0  # a new tensor behind .data: seen (its data_ptr)
        torch.testing.assert_close(layer(x), F.linear(x, layer.shared.weight, layer.bias))
        layer.lors_B.data.add_(1.0)  # in place through .data: invisible to the cache until it is reset
        set_weight_cache(layer)
        torch.testing.assert_close(layer(x), F.linear(x, layer.effective_weight(), layer.bias))


def test_weight_cache_on_parameters_created_under_inference_mode():
    from lors_hf.layer import set_weight_cache

    x = torch.randn(3, 7)
    with torch.inference_mode():  # inference tensors track no version: an in-place edit must still show
        layer = _layer()
        set_weight_cache(layer)
        torch.testing.assert_close(layer(x), F.linear(x, layer.effective_weight(), layer.bias))
        layer.lors_B.add_(1.0)
        torch.testing.assert_close(layer(x), F.linear(x, layer.effective_weight(), layer.bias))


def test_torch_compile_with_the_weight_cache_on_traces_in_one_graph():
    """The cache's bookkeeping cannot be traced: with it on, torch.compile(fullgraph=True) failed ("Encountered
    tensor.is_inference() during tracing") and a plain compile broke the graph in every layer. Compiled code
    skips the cache and stays equal to eager (which uses it), also after a weight changes."""
    from lors_hf.layer import set_weight_cache

    model, inputs = build("gpt2", layers=2)
    lorsify(model, rank=2, init="svd")
    set_weight_cache(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    prompt, token = inputs["input_ids"], inputs["input_ids"][:, :1]  # both paths: materialised, factored
    with torch.no_grad():
        for ids in (prompt, token):
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
        model.transformer.lors_shared.h.attn.c_attn.weight.add_(0.5)
        for ids in (prompt, token):
            torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits)
    assert any(m._cached is not None for m in model.modules() if isinstance(m, LorsLinear))  # eager used it


def test_pickling_and_deepcopy_leave_the_weight_cache_behind():
    """torch.save(model) and copy.deepcopy copied every layer's cached dense weight along with the compact ones."""
    import copy
    import io

    from lors_hf.layer import set_weight_cache

    model, inputs = build("gpt2", layers=2)
    lorsify(model, rank=2, init="svd")
    set_weight_cache(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert all(m._cached is not None for m in model.modules() if isinstance(m, LorsLinear))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        layers = [m for m in other.modules() if isinstance(m, LorsLinear)]
        assert layers and all(m._cached is None and m.cache_weight for m in layers)
        with torch.no_grad():
            torch.testing.assert_close(other(**inputs).logits, expected)
        assert all(m._cached is not None for m in layers)  # rebuilt on use
    assert all(m._cached is not None for m in model.modules() if isinstance(m, LorsLinear))  # the original keeps its
