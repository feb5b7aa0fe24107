"""lorsify / merge_and_unload: exact conversion, the shared weight's ownership, bad input."""

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from lors_hf import (
    LorsConfig,
    LorsLinear,
    SharedWeight,
    get_lors_config,
    is_lorsified,
    lorsify,
    merge_and_unload,
)
from lors_hf.discovery import dense_weight, plan_ranks
from lors_hf.report import parameter_report

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import FAMILIES, build, main_output  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")


def _outputs(model, inputs) -> torch.Tensor:
    """The main output and every hidden state, flattened: all of it must match."""
    with torch.no_grad():
        outputs = model(**inputs, output_hidden_states=True)
    parts = [main_output(outputs).flatten()]
    for key in ("hidden_states", "encoder_hidden_states", "decoder_hidden_states"):
        states = getattr(outputs, key, None)
        if states is not None:
            parts += [state.flatten() for state in states]
    return torch.cat(parts)


def _lors_layers(model) -> list[LorsLinear]:
    return [module for module in model.modules() if isinstance(module, LorsLinear)]


def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output - reference).norm() / reference.norm()).item()


# --------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_svd_conversion_is_exact(family):
    model, inputs = build(family)
    reference = _outputs(model, inputs)
    returned = lorsify(model, LorsConfig(rank="full", init="svd"))
    assert returned is model and is_lorsified(model)
    planned = [g.module_name(i) for s in plan_ranks(build(family)[0], LorsConfig(rank=0)) for g in s.groups
               for i in g.layer_indices]
    assert planned and all(isinstance(model.get_submodule(name), LorsLinear) for name in planned)
    lors_outputs = _outputs(model, inputs)
    assert (lors_outputs - reference).abs().max().item() <= 1e-4
    # the check can fail: sharing everything (rank 0) changes the outputs far beyond the tolerance
    shared_only, _ = build(family)
    lorsify(shared_only, rank=0, init="svd")
    assert (_outputs(shared_only, inputs) - reference).abs().max().item() > 1e-2


@pytest.fixture(scope="module")
def minilm():
    from lors_hf.assets import minilm_path

    path = minilm_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    model = tf.AutoModel.from_pretrained(path).eval()
    sentences = [
        "The film was a delight from start to finish.",
        "I would not recommend this restaurant to anyone.",
        "Layers of a transformer can share most of their weights.",
    ]
    return model, dict(tokenizer(sentences, padding=True, return_tensors="pt"))


@pytest.mark.slow
def test_full_rank_conversion_of_pretrained_minilm_is_exact(minilm):
    dense, batch = minilm
    assert type(dense) is tf.BertModel
    with torch.no_grad():
        reference = dense(**batch).last_hidden_state
    model = lorsify(copy.deepcopy(dense), rank="full", init="svd")
    assert len(_lors_layers(model)) == 6 * 6
    with torch.no_grad():
        converted = model(**batch).last_hidden_state
    assert (converted - reference).abs().max().item() <= 1e-4
    assert reference.abs().max().item() > 1  # real activations, not a near-zero output


@pytest.mark.slow
def test_the_default_init_converts_a_pretrained_model_and_starts_a_new_one_as_the_paper(minilm):
    """`lorsify(model, LorsConfig(rank=32))` on a model from `from_pretrained` (the README's first example) used
    init="scratch": every layer of a stack started as its first layer, the pretrained weights of the others
    thrown away. The default, "auto", converts them ("svd") and keeps "scratch" for a model built from a config."""
    dense, batch = minilm
    with torch.no_grad():
        reference = dense(**batch).last_hidden_state
    model = lorsify(copy.deepcopy(dense), LorsConfig(rank="full"))
    assert model.config.lors_config["init"] == "svd"
    with torch.no_grad():
        assert (model(**batch).last_hidden_state - reference).abs().max().item() <= 1e-4
    built, _ = build("bert")
    assert not built.name_or_path
    lorsify(built, LorsConfig(rank=4))
    assert built.config.lors_config["init"] == "scratch"
    layers = [built.bert.encoder.layer[i].attention.self.query for i in range(3)]
    assert all(layer.lors_B.abs().max() == 0 for layer in layers)  # the paper's start: B = 0


def test_the_default_init_follows_whether_weights_were_loaded_not_the_config_path(tmp_path):
    """`name_or_path` told them apart before: `from_config` of a Hub config (random weights) got "svd", and
    pretrained weights put in with `load_state_dict` got "scratch" (3% off at full rank)."""
    dense, inputs = build("bert")
    dense.save_pretrained(tmp_path)
    fresh = tf.AutoModelForSequenceClassification.from_config(tf.AutoConfig.from_pretrained(tmp_path))
    assert fresh.name_or_path  # what the old rule looked at
    assert lorsify(fresh, LorsConfig(rank=4)).config.lors_config["init"] == "scratch"
    built = tf.BertForSequenceClassification(dense.config).eval()
    built.config._name_or_path = ""
    built.load_state_dict(dense.state_dict())
    lorsify(built, LorsConfig(rank="full"))
    assert built.config.lors_config["init"] == "svd"
    torch.testing.assert_close(_outputs(built, inputs), _outputs(dense, inputs), atol=1e-5, rtol=1e-5)


def _give_layers_structured_differences(model: nn.Module, seed: int = 0, decay: float = 0.7) -> None:
    """Make the layers of every group differ by residuals with decaying singular values, like trained ones."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stack in plan_ranks(model, LorsConfig(rank=0)):
            for group in stack.groups:
                out_features, in_features = group.out_features, group.in_features
                common = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
                for index in group.layer_indices:
                    module = stack.blocks[index].get_submodule(group.relative_name)
                    u = torch.linalg.qr(torch.randn(out_features, out_features, generator=generator))[0]
                    v = torch.linalg.qr(torch.randn(in_features, in_features, generator=generator))[0]
                    rank = min(out_features, in_features)
                    spectrum = 0.8 * decay ** torch.arange(rank, dtype=torch.float32)
                    weight = common + u[:, :rank] * spectrum @ v[:, :rank].T
                    dense_weight(module).copy_(weight)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_output_error_falls_as_the_private_rank_grows(family):
    errors = []
    for rank in (0, 1, 4, 16, "full"):
        model, inputs = build(family, layers=4)
        _give_layers_structured_differences(model)
        reference = _outputs(model, inputs)
        lorsify(model, rank=rank, init="svd")
        errors.append(_relative_error(_outputs(model, inputs), reference))
    assert errors[0] > errors[1] > errors[2] > errors[3] > errors[4]
    assert errors[3] < 0.2 * errors[0]
    assert errors[4] < 1e-5


def test_alternating_init_is_closer_to_the_dense_weights_than_svd():
    def weight_error(init):
        model, _ = build("bert", layers=4)
        _give_layers_structured_differences(model, decay=0.9)
        dense = {name: dense_weight(m).detach().clone() for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and ".layer." in name}
        lorsify(model, rank=2, init=init)
        return sum((model.get_submodule(name).effective_weight() - w).pow(2).sum().item() for name, w in dense.items())

    assert weight_error("alternating") < weight_error("svd")


def test_calibration_data_lowers_the_projection_output_error_on_that_data():
    """Data-aware conversion minimises each projection's error on the activations it really sees."""
    dense, _ = build("bert", layers=4)
    with torch.no_grad():  # anisotropic activations, as in trained models
        embeddings = dense.bert.embeddings
        for table in (embeddings.word_embeddings, embeddings.position_embeddings, embeddings.token_type_embeddings):
            table.weight.mul_(torch.logspace(1, -2, 32))
    calibration = [torch.randint(0, 99, (2, 10), generator=torch.Generator().manual_seed(seed)) for seed in (5, 6)]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [module.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(args[0]))
             for name, module in dense.named_modules() if name.endswith(("self.query", "intermediate.dense"))]
    with torch.no_grad():
        for batch in calibration:
            dense(input_ids=batch)
    for hook in hooks:
        hook.remove()
    reference = {name: dense.get_submodule(name)(torch.cat(xs)).detach() for name, xs in seen.items()}

    def output_error(model):
        return sum((model.get_submodule(name)(torch.cat(xs)) - reference[name]).pow(2).sum().item()
                   for name, xs in seen.items())

    plain = lorsify(copy.deepcopy(dense), rank=4, init="alternating")
    aware = lorsify(copy.deepcopy(dense), rank=4, init="alternating", calibration_data=calibration)
    assert output_error(aware) < 0.5 * output_error(plain)
    assert get_lors_config(aware).init == "alternating"


@pytest.mark.parametrize("calibrated", [False, True])
def test_lorsify_inside_an_autocast_block_converts_in_float32(calibrated):
    """Inside a bf16 autocast block (a training script's) the conversion ran in bf16: its factors, the calibration
    passes and input moments, so even a full-rank conversion was lossy (tiny GPT-2 logits 9e-4 off with svd, 0.087
    off with calibration_data; 2e-7 outside autocast)."""
    dense, inputs = build("gpt2", layers=4)
    calibration = [torch.randint(0, 99, (2, 12), generator=torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    with torch.no_grad():
        reference = dense(**inputs).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model = lorsify(copy.deepcopy(dense), rank="full", init="alternating" if calibrated else "svd",
                        calibration_data=calibration if calibrated else None)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_unload_restores_a_stock_model_with_the_same_outputs(family):
    model, inputs = build(family)
    dense_keys = set(model.state_dict())
    dense_types = {name: type(module) for name, module in model.named_modules()}
    lorsify(model, rank=2, init="svd")
    lors_outputs = _outputs(model, inputs)
    merged = merge_and_unload(model)
    assert merged is model
    assert not _lors_layers(model)
    assert not any(isinstance(module, SharedWeight) for module in model.modules())
    assert not any("lors_shared" in name for name, _ in model.named_modules())
    assert getattr(model.config, "lors_config", None) is None and "lors_config" not in model.config.to_dict()
    assert not is_lorsified(model)
    assert {name: type(module) for name, module in model.named_modules()} == dense_types
    assert set(model.state_dict()) == dense_keys
    torch.testing.assert_close(_outputs(model, inputs), lors_outputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_merge_and_unload_under_autocast_keeps_the_parameters_dtype(family):
    """Merged inside an autocast block (a training loop's), the layers came out in bf16 inside a float32 model: its
    next forward pass failed in torch ("mat1 and mat2 must have the same dtype"), and the weights had lost their
    float32 precision. The LORS layer's ``weight`` under autocast is float32 too, as an nn.Linear's."""
    model, inputs = build(family)
    lorsify(model, rank=2, init="svd")
    lors_outputs = _outputs(model, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(layer.weight.dtype == torch.float32 for layer in _lors_layers(model))
        merge_and_unload(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    torch.testing.assert_close(_outputs(model, inputs), lors_outputs, rtol=1e-5, atol=1e-5)


def test_merged_gpt2_uses_conv1d_again_and_can_be_lorsified_anew():
    model, inputs = build("gpt2")
    lorsify(model, rank=3, init="svd")
    merge_and_unload(model)
    assert all(type(block.attn.c_attn) is Conv1D and block.attn.c_attn.weight.shape == (32, 96)
               for block in model.transformer.h)
    lorsify(model, rank=1)
    assert is_lorsified(model)


class _Wrapper(nn.Module):
    """A user's module around a transformers model (as DistributedDataParallel is): no ``config`` of its own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def test_merge_and_unload_and_get_lors_config_see_through_a_wrapper(tmp_path):
    """On a wrapper, merge_and_unload merged every layer, then raised AttributeError at ``model.config``: the
    inner model was left dense with its lors_config, which save_pretrained refused. get_lors_config said
    None ("dense") of a wrapper is_lorsified called a LORS model."""
    model, inputs = build("bert")
    lorsify(model, rank=4, init="svd")
    wrapper = _Wrapper(model)
    assert get_lors_config(wrapper) == get_lors_config(model) is not None
    lors_outputs = _outputs(model, inputs)
    assert merge_and_unload(wrapper) is wrapper
    assert not is_lorsified(model) and get_lors_config(model) is None and get_lors_config(wrapper) is None
    torch.testing.assert_close(_outputs(model, inputs), lors_outputs, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)  # raised: a lors_config but dense layers


def test_lorsify_after_merge_converts_the_merged_weights():
    """A model built from a config, lorsified ("scratch"), trained, merged and lorsified again with the default
    init got "scratch" once more: every layer restarted as its stack's first, the training thrown away."""
    model, inputs = build("bert")
    lorsify(model, rank=4)
    assert model.config.lors_config["init"] == "scratch"
    with torch.no_grad():  # stands for training: the private parts move away from B = 0
        for module in model.modules():
            if isinstance(module, LorsLinear):
                module.lors_B.normal_(0, 0.1)
    merge_and_unload(model)
    trained = _outputs(model, inputs)
    lorsify(model, rank="full")
    assert model.config.lors_config["init"] == "svd"
    torch.testing.assert_close(_outputs(model, inputs), trained, rtol=1e-4, atol=1e-4)


def test_merge_and_unload_refuses_a_dense_model():
    model, _ = build("bert")
    with pytest.raises(ValueError, match="no LORS layers"):
        merge_and_unload(model)


@pytest.mark.parametrize("function", [is_lorsified, merge_and_unload])
def test_a_checkpoint_path_instead_of_a_model_is_a_type_error_naming_from_pretrained(function, tmp_path):
    """Was an AttributeError: 'str' object has no attribute 'modules'."""
    with pytest.raises(TypeError, match=rf"{function.__name__} takes a model .* got str .*from_pretrained\(path\)"):
        function(str(tmp_path))


# --------------------------------------------------------------------------------------------- shared weight


def test_state_dict_holds_each_shared_weight_once():
    model, _ = build("bert")
    stacks = plan_ranks(model, LorsConfig(rank=4))
    groups = [group for stack in stacks for group in stack.groups]
    lorsify(model, rank=4)
    state = model.state_dict()
    shared_keys = sorted(key for key in state if "lors_shared" in key)
    assert shared_keys == sorted(f"bert.encoder.lors_shared.layer.{g.relative_name}.weight" for g in groups)
    for key in shared_keys:
        pointer = state[key].data_ptr()
        assert sum(tensor.data_ptr() == pointer for tensor in state.values()) == 1
    assert not any(key.endswith("query.weight") for key in state if "encoder.layer." in key)


def test_num_parameters_counts_the_shared_weight_once():
    model, _ = build("bert", layers=4)
    dense_count = model.num_parameters()
    config = LorsConfig(rank=[1, 2, 3, 4])
    groups = [group for stack in plan_ranks(model, config) for group in stack.groups]
    lorsify(model, config)
    expected = dense_count - sum(
        len(g.layer_indices) * g.out_features * g.in_features  # dense weights gone
        - g.out_features * g.in_features  # one shared weight
        - sum(g.ranks) * (g.out_features + g.in_features)  # private factors
        for g in groups
    )
    assert model.num_parameters() == expected == parameter_report(model).total.lors
    assert sum(p.numel() for p in model.parameters()) == expected


def test_shared_weight_is_registered_once_and_referenced_by_every_layer():
    model, _ = build("llama")
    lorsify(model, rank=2)
    registered = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    assert len(registered) == len(set(registered))
    for name, module in model.named_modules():
        if not isinstance(module, SharedWeight):
            continue
        parameter = module.weight
        assert [n for n, p in model.named_parameters(remove_duplicate=False) if p is parameter] == [f"{name}.weight"]
        relative = name.removeprefix("model.lors_shared.layers.")
        users = [block.get_submodule(relative) for block in model.model.layers]
        assert all(isinstance(user, LorsLinear) and user.shared is module for user in users)


def _assert_references_own_shared_modules(model):
    owned = {id(module) for module in model.modules() if isinstance(module, SharedWeight)}
    layers = _lors_layers(model)
    assert layers and all(id(layer.shared) in owned for layer in layers)


def test_dtype_and_device_moves_keep_the_reference_on_the_models_own_shared_weight():
    model, inputs = build("gpt2")
    lorsify(model, rank="full", init="svd")
    reference = _outputs(model, inputs)
    model.to(torch.float64)
    _assert_references_own_shared_modules(model)
    assert {layer.shared.weight.dtype for layer in _lors_layers(model)} == {torch.float64}
    torch.testing.assert_close(_outputs(model, inputs).float(), reference, rtol=1e-4, atol=1e-4)
    # also when the conversion replaces Parameter objects instead of their data
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.to(torch.float32)
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    _assert_references_own_shared_modules(model)
    assert {layer.shared.weight.dtype for layer in _lors_layers(model)} == {torch.float32}
    torch.testing.assert_close(_outputs(model, inputs), reference, rtol=1e-4, atol=1e-4)


def test_deepcopy_references_the_copys_own_shared_weight():
    model, inputs = build("bert")
    lorsify(model, rank=2, init="svd")
    clone = copy.deepcopy(model)
    _assert_references_own_shared_modules(clone)
    original_ids = {id(module) for module in model.modules() if isinstance(module, SharedWeight)}
    assert not any(id(layer.shared) in original_ids for layer in _lors_layers(clone))
    torch.testing.assert_close(_outputs(clone, inputs), _outputs(model, inputs), rtol=0, atol=0)
    with torch.no_grad():
        clone.bert.encoder.lors_shared.layer.attention.self.query.weight.add_(1.0)
    assert not torch.equal(_outputs(clone, inputs), _outputs(model, inputs))


# --------------------------------------------------------------------------------------------- config


def test_lors_config_records_the_resolved_per_layer_ranks():
    model, _ = build("bert", layers=3)
    lorsify(model, rank={"attention": [1, 2, 3], ".*": 4}, init="svd")
    recorded = get_lors_config(model)
    assert recorded.init == "svd" and recorded.target_reduction is None
    assert recorded.rank[r"^bert\.encoder\.layer\.attention\.self\.query$"] == [1, 2, 3]
    assert recorded.rank[r"^bert\.encoder\.layer\.intermediate\.dense$"] == [4, 4, 4]
    layers = model.bert.encoder.layer
    assert [layer.attention.self.key.rank for layer in layers] == [1, 2, 3]
    assert [layer.attention.self.key.lors_A.shape[0] for layer in layers] == [1, 2, 3]
    assert [layer.output.dense.lors_B.shape[1] for layer in layers] == [4, 4, 4]
    # the recorded config rebuilds exactly the same plan on a dense model
    replanned = plan_ranks(build("bert", layers=3)[0], recorded)
    assert {g.name: g.ranks for g in replanned[0].groups} == {
        f"bert.encoder.layer.{name}": [m.rank for m in (b.get_submodule(name) for b in layers)]
        for name in [g.relative_name for g in replanned[0].groups]
    }


def test_overrides_and_dict_configs_are_accepted():
    model, _ = build("bert")
    lorsify(model, {"rank": 8, "init": "svd"}, rank=3, target_modules=["query"])
    assert [layer.rank for layer in _lors_layers(model)] == [3, 3, 3]
    assert type(model.bert.encoder.layer[0].attention.self.key) is nn.Linear
    assert get_lors_config(model).init == "svd"


# --------------------------------------------------------------------------------------------- target_reduction


@pytest.mark.parametrize(("family", "target"), [("bert", 0.6), ("gpt2", 0.3), ("llama", 0.6)])
def test_target_reduction_picks_the_largest_rank_that_reaches_it(family, target):
    model, _ = build(family, layers=4)
    lorsify(model, target_reduction=target)
    reduction = parameter_report(model).stacks_total.reduction
    assert reduction >= target
    (rank,) = {layer.rank for layer in _lors_layers(model)}
    bigger, _ = build(family, layers=4)
    lorsify(bigger, rank=rank + 1)
    assert parameter_report(bigger).stacks_total.reduction < target


def _gqa_llama():
    # grouped-query attention: k/v are 8 x 64 (largest rank 8). Four layers of them hold 2,048 weights
    # dense; as LORS, even at rank 7 they would hold 512 + 4 * 7 * 72 = 2,528.
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=99, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=1, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0))


def test_target_reduction_leaves_dense_what_lors_would_not_make_smaller():
    model = _gqa_llama()
    dense = copy.deepcopy(model)
    lorsify(model, target_reduction=0.2, init="svd")
    reduction = parameter_report(model).stacks_total.reduction
    assert 0.2 <= reduction < 0.25
    layer = model.model.layers[2].self_attn
    assert type(layer.k_proj) is type(layer.v_proj) is nn.Linear  # kept dense and exact
    assert torch.equal(layer.k_proj.weight, dense.model.layers[2].self_attn.k_proj.weight)
    assert isinstance(layer.q_proj, LorsLinear) and isinstance(model.model.layers[2].mlp.down_proj, LorsLinear)
    rank = layer.q_proj.rank
    assert rank > 8
    ranks = get_lors_config(model).rank
    assert {name for name, spec in ranks.items() if spec == "dense"} == {
        r"^model\.layers\.self_attn\.k_proj$", r"^model\.layers\.self_attn\.v_proj$"}
    # the largest rank: one more (k/v still dense) misses the target
    bigger = _gqa_llama()
    lorsify(bigger, rank={r"(k|v)_proj": "dense", ".*": rank + 1})
    assert parameter_report(bigger).stacks_total.reduction < 0.2
    # merging gives the dense model back, the k/v that stayed dense included
    merged = merge_and_unload(copy.deepcopy(model))
    assert not any(isinstance(module, LorsLinear) for module in merged.modules())
    assert torch.equal(merged.model.layers[2].self_attn.v_proj.weight, dense.model.layers[2].self_attn.v_proj.weight)
    # sharing k/v as well, at their largest rank, would have cost parameters instead of saving them
    shared_kv = _gqa_llama()
    lorsify(shared_kv, rank={r"(k|v)_proj": 8, ".*": rank})
    assert parameter_report(shared_kv).stacks_total.lors > parameter_report(model).stacks_total.lors


def test_rank_dict_can_leave_groups_dense_and_the_plan_reloads(tmp_path):
    model, inputs = build("llama")
    lorsify(model, rank={r"(k|v)_proj": "dense", ".*": 4}, init="svd")
    attention = model.model.layers[1].self_attn
    assert type(attention.k_proj) is nn.Linear and isinstance(attention.q_proj, LorsLinear)
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(reloaded.model.layers[1].self_attn.v_proj) is nn.Linear
    with torch.no_grad():
        assert torch.equal(main_output(reloaded.eval()(**inputs)), main_output(model.eval()(**inputs)))


def test_a_plan_with_nothing_left_dense_adds_no_dense_entry():
    model, _ = build("llama")
    lorsify(model, target_reduction=0.5)
    assert "dense" not in get_lors_config(model).rank.values()


def test_unreachable_target_reduction_is_refused():
    model, _ = build("bert")
    with pytest.raises(ValueError, match=r"target_reduction=0.95 cannot be reached.*even rank 0"):
        lorsify(model, target_reduction=0.95)
    assert not is_lorsified(model)


# --------------------------------------------------------------------------------------------- bad input


class _OneBlockConfig(tf.PretrainedConfig):
    model_type = "one_block_test"


class _OneBlockModel(tf.PreTrainedModel):
    config_class = _OneBlockConfig

    def __init__(self, config):
        super().__init__(config)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))])
        self.post_init()


@pytest.mark.parametrize(
    ("make_model", "kwargs", "error", "message"),
    [
        (lambda: lorsify(build("bert")[0], rank=2), {"rank": 2}, ValueError, r"already a LORS model.*merge_and_unload"),
        (lambda: tf.BertModel(tf.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=32)), {}, ValueError, r"found no stack of layers in BertModel"),
        (lambda: _OneBlockModel(_OneBlockConfig()), {}, ValueError, r"found no stack of layers in _OneBlockModel"),
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), {}, TypeError, r"expects a transformers PreTrainedModel"),
        (lambda: build("bert")[0], {"target_modules": ["c_attn"]}, ValueError, r"leave no projection shared.*attention\.self\.query"),
        (lambda: build("bert")[0], {"rank": 33}, ValueError, r"rank 33 does not fit .*the largest useful rank is 32"),
        (lambda: build("llama")[0], {"rank": {"k_proj": 17, ".*": 4}}, ValueError, r"rank 17 does not fit .*k_proj.*16x32"),
        (lambda: build("bert")[0], {"rank": [2, 2]}, ValueError, r"has 2 entries but stack .* has 3 layers"),
        (lambda: build("bert")[0], {"rank": {"query": 2}}, ValueError, r"no key of the rank dict .* add a default entry"),
        (lambda: build("bert")[0], {"rank": {".*": "dense"}}, ValueError,
         r"maps every projection group to 'dense', so nothing would be shared; give some groups a rank"),
        (lambda: build("bert")[0], {"rank": "dense"}, ValueError, r"rank`='dense' would leave every projection dense"),
        (lambda: build("bert")[0], {"init": "kaiming"}, ValueError, r"unknown init 'kaiming'"),
        (lambda: build("bert")[0], {"config": "rank=4"}, TypeError, r"must be a LorsConfig or a dict"),
        (lambda: build("bert")[0], {"config": {"rnak": 4}}, ValueError,
         r"`config` has keys \['rnak'\] that LorsConfig does not take; its fields are \[.*'rank'"),
        (lambda: build("bert")[0], {"target_reduction": 0.99}, ValueError, r"cannot be reached"),
        (lambda: build("bert")[0], {"calibration_data": [torch.zeros(1, 4, dtype=torch.long)], "init": "scratch"},
         ValueError,
         r"calibration_data converts pretrained weights; use init='svd'"),
    ],
)
def test_bad_input_is_refused_with_a_message_naming_the_fix(make_model, kwargs, error, message):
    model = make_model()
    before = copy.deepcopy(model.state_dict())
    config = kwargs.pop("config", None)
    with pytest.raises(error, match=message):
        lorsify(model, config, **kwargs)
    # nothing was half-converted
    assert set(model.state_dict()) == set(before)


def test_empty_calibration_data_is_refused():
    model, _ = build("bert")
    with pytest.raises(ValueError, match="calibration_data is empty"):
        lorsify(model, rank=2, init="svd", calibration_data=[])
    assert not is_lorsified(model)


def test_lorsify_leaves_a_model_built_from_the_same_config_dense(tmp_path):
    """Two models built from one config object share it; lorsify must not make the other one "LORS"."""
    config = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                           intermediate_size=64)
    dense, lors = tf.BertForSequenceClassification(config), tf.BertForSequenceClassification(config)
    lorsify(lors, rank=2)
    assert getattr(config, "lors_config", None) is None and getattr(dense.config, "lors_config", None) is None
    assert lors.bert.config is lors.config and lors.config.lors_config is not None  # submodules see the copy
    assert not is_lorsified(dense)
    lorsify(dense, rank=2)  # not "already a LORS model"
    dense.save_pretrained(tmp_path / "a")


@pytest.mark.parametrize("where", ["initialisation", "calibration"])
def test_failed_lorsify_leaves_the_dense_model_untouched(where, monkeypatch):
    import lors_hf.calibration
    import lors_hf.surgery

    model, inputs = build("bert")
    expected = main_output(model(**inputs)).detach()
    names = sorted(name for name, _ in model.named_modules())

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory")

    kwargs = {}
    if where == "initialisation":
        monkeypatch.setattr(lors_hf.surgery, "_initialise", fail)
    else:
        monkeypatch.setattr(lors_hf.calibration, "decompose", fail)
        kwargs = {"calibration_data": [inputs], "init": "svd"}
    with pytest.raises(RuntimeError, match="out of memory"):
        lorsify(model, rank=2, **kwargs)
    assert not is_lorsified(model) and getattr(model.config, "lors_config", None) is None
    assert sorted(name for name, _ in model.named_modules()) == names
    assert torch.equal(main_output(model(**inputs)), expected)
    monkeypatch.undo()
    lorsify(model, rank=2, **kwargs)  # and it can be converted afterwards
    assert is_lorsified(model)


@pytest.mark.parametrize("calibrated", [False, True])
def test_what_the_user_froze_stays_frozen_through_lorsify_and_merge(calibrated):
    model, inputs = build("bert")
    model.bert.embeddings.requires_grad_(False)
    model.bert.encoder.layer[0].requires_grad_(False)  # one frozen layer: its private parts stay frozen
    model.bert.encoder.layer[1].attention.self.query.bias.requires_grad_(False)
    extra = {"init": "svd", "calibration_data": [inputs["input_ids"]]} if calibrated else {}
    lorsify(model, rank=2, **extra)
    query = [layer.attention.self.query for layer in model.bert.encoder.layer]
    assert not query[0].lors_A.requires_grad and not query[0].lors_B.requires_grad and not query[0].bias.requires_grad
    assert query[1].lors_A.requires_grad and query[1].lors_B.requires_grad and not query[1].bias.requires_grad
    assert query[0].shared.weight.requires_grad  # other layers still train it
    assert not any(p.requires_grad for p in model.bert.embeddings.parameters())
    model.bert.encoder.requires_grad_(False)  # all frozen: merging keeps them frozen
    merge_and_unload(model)
    assert not any(p.requires_grad for p in model.bert.encoder.parameters())
    frozen_whole = lorsify(build("bert")[0].requires_grad_(False), rank=2)
    assert not any(p.requires_grad for p in frozen_whole.parameters())
    trainable = merge_and_unload(lorsify(build("bert")[0], rank=2))
    assert all(p.requires_grad for p in trainable.parameters())


def test_an_explicit_rank_past_the_break_even_warns_and_names_the_groups():
    # k/v of _gqa_llama: 2,048 weights dense, 512 + 4 * 7 * 72 = 2,528 as LORS at rank 7
    with pytest.warns(UserWarning, match=r"k_proj: 2,528 as LORS, 2,048 dense.*'k_proj': 'dense'"):
        lorsify(_gqa_llama(), rank=7, init="svd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorsify(_gqa_llama(), rank=5, init="svd")  # 1,952 as LORS: still smaller
        lorsify(_gqa_llama(), rank="full", init="svd")  # exact: asked for on purpose
        lorsify(_gqa_llama(), target_reduction=0.2, init="svd")  # the budget keeps k/v dense itself


def test_get_lors_config_reads_a_model_or_its_config_and_refuses_a_path(tmp_path):
    model, _ = build("bert")
    assert get_lors_config(model) is None and get_lors_config(model.config) is None
    lorsify(model, rank=2, init="svd")
    assert get_lors_config(model) == get_lors_config(model.config) and get_lors_config(model).init == "svd"
    model.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"not PosixPath.*load_lors_config\(path\)"):
        get_lors_config(tmp_path)  # a checkpoint folder: its config was silently "dense" (None)


def test_lorsify_refuses_weights_a_device_map_offloaded(tmp_path):
    """Offloaded to disk, the weights sit on the meta device: converting them read nothing, and the model computed
    NaN. A model built with no device_map on meta (init_empty_weights) still gets its structure."""
    model, inputs = build("llama")
    model.save_pretrained(tmp_path / "dense")
    offloaded = type(model).from_pretrained(tmp_path / "dense", device_map={"": "disk"},
                                            offload_folder=str(tmp_path / "offload"))
    with pytest.raises(ValueError, match=r"projection weights to convert .* are offloaded by the model's device_map"):
        lorsify(offloaded, rank=2)
    assert not is_lorsified(offloaded)
    with torch.device("meta"):
        empty = type(model)(model.config)
    assert is_lorsified(lorsify(empty, rank=2, init="svd"))


@pytest.mark.parametrize("family", ["gpt2", "llama"])  # Conv1D and nn.Linear
def test_merge_and_unload_runs_no_random_initialisation_it_would_overwrite(family, monkeypatch):
    """The merged layers were built with their random init (kaiming / normal), then overwritten: 0.5 s per
    4096 x 11008 layer on 2 cores, about a minute for a 7B model. Now their memory is left uninitialised."""
    model, inputs = build(family)
    lorsify(model, rank=2)
    with torch.no_grad():
        expected = main_output(model(**inputs))
    initialised = []
    for name in ("kaiming_uniform_", "uniform_", "normal_"):
        original = getattr(torch.nn.init, name)

        def recording(tensor, *args, _original=original, _name=name, **kwargs):
            if tensor.device.type != "meta":
                initialised.append((_name, tuple(tensor.shape)))
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.nn.init, name, recording)
    merge_and_unload(model)
    assert initialised == []
    with torch.no_grad():
        torch.testing.assert_close(main_output(model(**inputs)), expected, rtol=1e-5, atol=1e-5)
