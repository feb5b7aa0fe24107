"""Discovery: the stacks of every supported family, their projection groups, PEFT-style targeting."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lors_hf import LorsConfig, LorsLinear, lorsify
from lors_hf.discovery import find_groups, find_stacks, plan_ranks

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import FAMILIES, build  # noqa: E402

ATTENTION = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
EXPECTED_STACKS = {
    "bert": {"bert.encoder.layer": ["attention.self.query", "attention.self.key", "attention.self.value",
                                    "attention.output.dense", "intermediate.dense", "output.dense"]},
    "gpt2": {"transformer.h": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]},
    "detr": {
        "model.encoder.layers": [*ATTENTION, "self_attn.o_proj", "mlp.fc1", "mlp.fc2"],
        "model.decoder.layers": [*ATTENTION, "self_attn.o_proj", "encoder_attn.q_proj", "encoder_attn.k_proj",
                                 "encoder_attn.v_proj", "encoder_attn.o_proj", "mlp.fc1", "mlp.fc2"],
    },
    "llama": {"model.layers": [*ATTENTION, "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]},
    "vit": {"vit.layers": ["attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
                           "mlp.fc1", "mlp.fc2"]},
    "t5": {
        "encoder.block": [f"layer.0.SelfAttention.{p}" for p in "qkvo"]
        + ["layer.1.DenseReluDense.wi", "layer.1.DenseReluDense.wo"],
        "decoder.block": [f"layer.0.SelfAttention.{p}" for p in "qkvo"]
        + [f"layer.1.EncDecAttention.{p}" for p in "qkvo"]
        + ["layer.2.DenseReluDense.wi", "layer.2.DenseReluDense.wo"],
    },
    "whisper": {
        "model.encoder.layers": [*ATTENTION, "self_attn.out_proj", "fc1", "fc2"],
        "model.decoder.layers": [*ATTENTION, "self_attn.out_proj", "encoder_attn.q_proj", "encoder_attn.k_proj",
                                 "encoder_attn.v_proj", "encoder_attn.out_proj", "fc1", "fc2"],
    },
}


def _groups(stacks):
    return {stack.name: [group.relative_name for group in stack.groups] for stack in stacks}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_its_stacks_and_projection_groups(family):
    model, _ = build(family, layers=3)
    stacks = plan_ranks(model, LorsConfig(rank=2))
    found = _groups(stacks)
    assert {name: sorted(groups) for name, groups in found.items()} == {
        name: sorted(groups) for name, groups in EXPECTED_STACKS[family].items()
    }
    for stack in stacks:
        assert len(stack.blocks) == 3
        assert stack.blocks is model.get_submodule(stack.name)
        for group in stack.groups:
            assert group.layer_indices == [0, 1, 2] and group.ranks == [2, 2, 2]
            module = stack.blocks[0].get_submodule(group.relative_name)
            expected_out = module.nf if isinstance(module, Conv1D) else module.out_features
            assert (group.out_features, group.in_features) == (expected_out, module.weight.numel() // expected_out)


def test_encoder_and_decoder_stacks_are_separate_sharing_groups():
    model, _ = build("whisper")
    lorsify(model, rank=2)
    encoder_fc1 = model.model.encoder.layers[0].fc1
    decoder_fc1 = model.model.decoder.layers[0].fc1
    assert encoder_fc1.shared is not decoder_fc1.shared
    assert encoder_fc1.shared is model.model.encoder.layers[2].fc1.shared
    assert encoder_fc1.shared is model.get_submodule("model.encoder.lors_shared.layers.fc1")
    assert decoder_fc1.shared is model.get_submodule("model.decoder.lors_shared.layers.fc1")


def test_t5_block_zero_relative_attention_bias_is_left_alone():
    model, _ = build("t5")
    for stack in (model.encoder.block, model.decoder.block):
        assert stack[0].layer[0].SelfAttention.has_relative_attention_bias
    before = {name: module.relative_attention_bias.weight.detach().clone()
              for name, module in model.named_modules() if getattr(module, "has_relative_attention_bias", False)}
    assert len(before) == 2
    lorsify(model, rank=2, init="svd")
    for name, weight in before.items():
        bias = model.get_submodule(name).relative_attention_bias
        assert type(bias) is nn.Embedding
        torch.testing.assert_close(bias.weight, weight, rtol=0, atol=0)
    shared_names = [name for name, _ in model.named_parameters() if "lors_shared" in name]
    assert shared_names and not any("relative_attention_bias" in name for name in shared_names)


def test_gpt2_conv1d_projections_are_included():
    model, _ = build("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, Conv1D) and c_attn.weight.shape == (32, 96)
    stacks = plan_ranks(model, LorsConfig(rank=3))
    group = next(g for g in stacks[0].groups if g.relative_name == "attn.c_attn")
    assert (group.out_features, group.in_features) == (96, 32)  # (out, in) whatever the storage
    lorsify(model, rank=3)
    layer = model.transformer.h[1].attn.c_attn
    assert isinstance(layer, LorsLinear) and layer.fan_in_fan_out
    assert layer.shared.weight.shape == (96, 32) and layer.weight.shape == (32, 96)


def test_llama_gqa_key_value_projections_are_grouped_by_their_own_smaller_shape():
    model, _ = build("llama")
    stacks = plan_ranks(model, LorsConfig(rank="full"))
    shapes = {group.relative_name: (group.out_features, group.in_features) for group in stacks[0].groups}
    assert shapes["self_attn.q_proj"] == (32, 32)
    assert shapes["self_attn.k_proj"] == shapes["self_attn.v_proj"] == (16, 32)
    full = {group.relative_name: group.ranks for group in stacks[0].groups}
    assert full["self_attn.k_proj"] == [16, 16, 16] and full["self_attn.q_proj"] == [32, 32, 32]
    lorsify(model, rank=4)
    k_proj, v_proj = model.model.layers[2].self_attn.k_proj, model.model.layers[2].self_attn.v_proj
    assert k_proj.shared.weight.shape == v_proj.shared.weight.shape == (16, 32)
    assert k_proj.shared is not v_proj.shared


def test_target_modules_as_a_list_matches_name_suffixes():
    model, _ = build("bert")
    stacks = plan_ranks(model, LorsConfig(rank=2, target_modules=["query", "self.value"]))
    assert _groups(stacks) == {"bert.encoder.layer": ["attention.self.query", "attention.self.value"]}
    # a suffix is a whole name component: "uery" is not a module name
    with pytest.raises(ValueError, match="leave no projection"):
        plan_ranks(model, LorsConfig(rank=2, target_modules=["uery"]))


def test_a_name_as_error_messages_list_it_is_accepted_with_star_for_the_layer_index():
    """The unmatched-name error lists projections as ``bert.encoder.layer.*.intermediate.dense``; given back as a
    list entry, that was refused (the ``*`` was taken literally)."""
    model, _ = build("bert")
    with pytest.raises(ValueError, match=r"look like: .*bert\.encoder\.layer\.\*\.intermediate\.dense") as error:
        plan_ranks(model, LorsConfig(rank=2, target_modules=["intermediate.dens"]))
    assert "a * segment stands for any one name" in str(error.value)
    with pytest.raises(ValueError, match="entry 'intermediate.dens' matches no projection .*a \\* segment"):
        plan_ranks(model, LorsConfig(rank=2, target_modules=["query", "intermediate.dens"]))
    for entry in ("bert.encoder.layer.*.intermediate.dense", "layer.*.intermediate.dense", "*.intermediate.dense"):
        stacks = plan_ranks(model, LorsConfig(rank=2, target_modules=[entry]))
        assert _groups(stacks) == {"bert.encoder.layer": ["intermediate.dense"]}, entry
    stacks = plan_ranks(model, LorsConfig(rank=2, exclude_modules=["*.self.*"]))
    assert sorted(_groups(stacks)["bert.encoder.layer"]) == ["attention.output.dense", "intermediate.dense",
                                                             "output.dense"]
    with pytest.raises(ValueError, match="leave no projection"):  # * is one whole name, not part of one
        plan_ranks(model, LorsConfig(rank=2, target_modules=["inter*.dense"]))


def test_target_modules_as_a_regex_is_matched_in_full_against_the_module_path():
    model, _ = build("whisper")
    stacks = plan_ranks(model, LorsConfig(rank=2, target_modules=r".*decoder.*(q|v)_proj"))
    assert _groups(stacks) == {"model.decoder.layers": ["self_attn.v_proj", "self_attn.q_proj",
                                                        "encoder_attn.v_proj", "encoder_attn.q_proj"]}
    # full match, not search: "q_proj" alone matches no full path
    with pytest.raises(ValueError, match="leave no projection"):
        plan_ranks(model, LorsConfig(rank=2, target_modules=r"q_proj"))


def test_exclude_modules_keeps_matching_projections_dense():
    model, _ = build("bert")
    stacks = plan_ranks(model, LorsConfig(rank=2, exclude_modules=["output.dense"]))
    assert _groups(stacks) == {"bert.encoder.layer": ["attention.self.query", "attention.self.key",
                                                      "attention.self.value", "intermediate.dense"]}
    stacks = plan_ranks(model, LorsConfig(rank=2, target_modules=["query", "key"], exclude_modules=r".*key"))
    assert _groups(stacks) == {"bert.encoder.layer": ["attention.self.query"]}


@pytest.mark.parametrize("options, message", [
    ({"target_modules": ["query", "valeu"]}, r"target_modules entry 'valeu' matches no projection in the stacks"),
    ({"target_modules": ["query", "pooler.dense"]}, r"entry 'pooler.dense' matches no projection in the stacks"),
    ({"exclude_modules": ["value", "intermediat.dense"]}, r"exclude_modules entry 'intermediat.dense' matches no"),
    # a string is one regex matched in full: "value" alone is no module path
    ({"exclude_modules": "value"}, r"'value' matches no projection .* give a list \(exclude_modules=\['value'\]\)"),
    ({"rank": {"attn": 8, ".*": 2}}, r"rank dict key 'attn' matches no projection group; .*attention\.self\.query"),
])
def test_a_name_that_matches_nothing_is_a_value_error(options, message):
    """A typo, or another family's name, would otherwise convert the model otherwise than asked, silently."""
    model, _ = build("bert")
    with pytest.raises(ValueError, match=message):
        plan_ranks(model, LorsConfig(**{"rank": 2, **options}))


def test_excluding_a_projection_outside_the_stacks_is_allowed():
    model, _ = build("bert")
    stacks = plan_ranks(model, LorsConfig(rank=2, exclude_modules=["pooler.dense", "value"]))
    assert "attention.self.value" not in _groups(stacks)["bert.encoder.layer"]


def test_excluding_one_layer_leaves_the_others_sharing():
    model, _ = build("bert")
    config = LorsConfig(rank=2, target_modules=["query"], exclude_modules=["bert.encoder.layer.1.attention.self.query"])
    (stack,) = plan_ranks(model, config)
    assert stack.groups[0].layer_indices == [0, 2]
    lorsify(model, config)
    layers = model.bert.encoder.layer
    assert type(layers[1].attention.self.query) is nn.Linear
    assert layers[0].attention.self.query.shared is layers[2].attention.self.query.shared


def test_a_group_needs_two_layers():
    model, _ = build("bert")
    config = LorsConfig(rank=2, target_modules=r"bert\.encoder\.layer\.0\.attention\.self\.query")
    with pytest.raises(ValueError, match="two or more layers.*attention.self.query"):
        plan_ranks(model, config)


def test_module_lists_that_are_not_stacks_are_ignored():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            repeated = Block()
            self.repeated = nn.ModuleList([repeated, repeated])  # already shared
            self.mixed = nn.ModuleList([Block(), nn.Sequential(nn.Linear(4, 4))])  # different classes
            self.bare = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])  # projections, not blocks
            self.empty = nn.ModuleList([nn.ReLU(), nn.ReLU()])  # nothing to share
            self.single = nn.ModuleList([Block()])
            self.real = nn.ModuleList([Block(), Block(), Block()])

    assert [stack.name for stack in find_stacks(Holder())] == ["real"]


def test_linear_subclasses_that_compute_something_else_are_left_dense():
    """A subclass of nn.Linear with its own forward (a MoE router returning scores and indices, a quantized layer)
    or a weight that is not a plain float tensor is not a projection LORS can share: replacing it by a plain
    linear map broke Phimoe's forward deep inside the model."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.PhimoeConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=64)
    model = tf.PhimoeForCausalLM(config).eval()
    ids = torch.randint(0, 99, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    router_class = type(model.model.layers[0].mlp.router)
    lorsify(model, LorsConfig(rank="full", init="svd"))
    assert all(type(layer.mlp.router) is router_class for layer in model.model.layers)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LorsLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=1e-5, rtol=1e-5)

    class ScaledLinear(nn.Linear):  # its own forward
        def forward(self, x):
            return 2 * super().forward(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain, self.scaled, self.half_precision = nn.Linear(4, 4), ScaledLinear(4, 4), nn.Linear(4, 4)
            self.integer = nn.Linear(4, 4)
            self.integer.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    holder = nn.Module()
    holder.layers = nn.ModuleList([Block(), Block()])
    (stack,) = find_groups(holder, LorsConfig(rank=1))
    assert [group.relative_name for group in stack.groups] == ["plain", "half_precision"]


def test_falcon_linear_computes_the_plain_map_and_is_shared(tmp_path):
    """Falcon's projections are FalconLinear, an nn.Linear subclass whose own forward is x @ W.T + b: left alone
    as a subclass, Falcon had no stack and lorsify failed saying so. Other subclasses are still named."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             bos_token_id=0, eos_token_id=0)
    model = tf.FalconForCausalLM(config).eval()
    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(input_ids=ids).logits
    lorsify(model, LorsConfig(rank="full", init="svd"))
    assert isinstance(model.transformer.h[0].self_attention.dense, LorsLinear)
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)

    class ScaledLinear(nn.Linear):  # its own forward
        def forward(self, x):
            return 2 * super().forward(x)

    holder = nn.Module()
    holder.layers = nn.ModuleList([nn.Sequential(ScaledLinear(4, 4)) for _ in range(3)])
    with pytest.raises(ValueError, match="found no stack.*class ScaledLinear do not count: an nn.Linear subclass"):
        find_groups(holder, LorsConfig(rank=1))


def test_a_model_that_shares_its_one_block_already_is_told_so():
    """ALBERT runs one block at every depth: lorsify said only that it found no stack."""
    import transformers as tf

    albert = tf.AlbertModel(tf.AlbertConfig(vocab_size=99, embedding_size=16, hidden_size=32, num_hidden_layers=3,
                                            num_attention_heads=2, intermediate_size=64))
    with pytest.raises(ValueError, match=r"found no stack.*albert_layer_groups.* each hold one block.*\(ALBERT\) "
                                         r"already shares"):
        lorsify(albert, LorsConfig(rank=2))


def test_projections_that_rwkv_rescales_in_place_stay_dense():
    """RWKV divides its blocks' attention.output and feed_forward.value weights in place when it switches to
    eval mode (and multiplies them back for training); on a LORS layer the write was lost: converted at full
    rank in train mode, the model's eval logits were 0.72 off the dense model's."""
    import copy

    import transformers as tf

    torch.manual_seed(0)
    config = tf.RwkvConfig(vocab_size=50, hidden_size=32, num_hidden_layers=8, attention_hidden_size=32,
                           intermediate_size=64, context_length=32)
    dense = tf.RwkvForCausalLM(config).train()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    lors = lorsify(copy.deepcopy(dense), LorsConfig(rank="full", init="svd"))
    block = lors.rwkv.blocks[0]
    assert isinstance(block.attention.key, LorsLinear) and isinstance(block.feed_forward.key, LorsLinear)
    assert type(block.attention.output) is nn.Linear and type(block.feed_forward.value) is nn.Linear
    with torch.no_grad():
        for mode in ("eval", "train", "eval"):  # each switch rescales
            getattr(dense, mode)(), getattr(lors, mode)()
            torch.testing.assert_close(lors(ids).logits, dense(ids).logits, atol=1e-4, rtol=1e-4)
    unscaled = tf.RwkvForCausalLM(tf.RwkvConfig(**{**config.to_dict(), "rescale_every": 0}))
    lorsify(unscaled, LorsConfig(rank=4))
    assert isinstance(unscaled.rwkv.blocks[0].attention.output, LorsLinear)  # no rescaling: shared as usual


@pytest.mark.parametrize("widths, members", [([16, 32, 32, 32], [1, 2, 3]), ([32, 32, 32, 16], [0, 1, 2]),
                                             ([16, 32, 16, 32], [0, 2])])
def test_a_projection_is_grouped_over_the_blocks_of_its_most_common_shape(widths, members):
    """The odd block out stays dense wherever it sits (a first block of another width hid the group of the
    three others); on a tie, the first block's shape wins."""

    class Block(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.fc, self.proj = nn.Linear(8, width), nn.Linear(width, 8)

    holder = nn.Module()
    holder.layers = nn.ModuleList(Block(width) for width in widths)
    (stack,) = find_groups(holder, LorsConfig(rank=1))
    assert [(group.relative_name, group.layer_indices) for group in stack.groups] == [("fc", members),
                                                                                       ("proj", members)]


def test_the_outer_stack_wins_over_stacks_nested_inside_it():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    outer = nn.Module()
    outer.layers = nn.ModuleList([Inner(), Inner()])
    (stack,) = find_groups(outer, LorsConfig(rank=1))
    assert stack.name == "layers"
    assert [group.relative_name for group in stack.groups] == ["heads.0.0", "heads.1.0"]


def test_rank_dict_first_match_wins_and_per_layer_lists_follow_the_layers():
    model, _ = build("bert", layers=3)
    config = LorsConfig(rank={r"attention\.self": [1, 2, 3], r"intermediate": "full", r".*": 5})
    ranks = {group.relative_name: group.ranks for group in plan_ranks(model, config)[0].groups}
    assert ranks["attention.self.query"] == [1, 2, 3]
    assert ranks["intermediate.dense"] == [32, 32, 32]
    assert ranks["output.dense"] == ranks["attention.output.dense"] == [5, 5, 5]


def test_stages_of_different_widths_give_way_to_the_blocks_inside_them(tmp_path):
    """Swin's outer list holds stages of different widths (nothing shareable across them): each stage's
    block list is a stack; converted exactly at full rank, counted once, saved and reloaded."""
    import transformers as tf

    from lors_hf import parameter_report

    torch.manual_seed(0)
    model = tf.SwinModel(tf.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                       window_size=2)).eval()
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixels).last_hidden_state
    dense_total = model.num_parameters()
    lorsify(model, LorsConfig(rank="full", init="svd"))
    report = parameter_report(model)
    assert [row.name for row in report.stacks] == ["encoder.layers.0.blocks", "encoder.layers.1.blocks"]
    assert report.total.dense == dense_total and report.total.lors == model.num_parameters()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).last_hidden_state, expected, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path)
    reloaded = tf.SwinModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=pixels).last_hidden_state,
                           model(pixel_values=pixels).last_hidden_state)


def test_a_list_of_layer_lists_shares_within_each_inner_list():
    """Funnel's encoder is a list of blocks, each a list of layers: layers share within their block, and the
    shared weights are not put into the outer list (Funnel iterates it)."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.FunnelModel(tf.FunnelConfig(vocab_size=50, block_sizes=[2, 2], block_repeats=[1, 1], d_model=32,
                                           n_head=2, d_head=16, d_inner=64)).eval()
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    lorsify(model, LorsConfig(rank="full", init="svd"))
    stacks = {stack.name for stack in find_groups(model, LorsConfig())}
    assert stacks == {"encoder.blocks.0", "encoder.blocks.1", "decoder.layers"}
    assert len(model.encoder.blocks) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, expected, atol=1e-5, rtol=0)


def test_tied_projections_are_left_alone_and_late_projections_are_grouped():
    class Block(nn.Module):
        def __init__(self, with_extra: bool):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 4)
            if with_extra:  # like the shared experts of MoE layers that follow a dense first layer
                self.extra = nn.Linear(4, 6)

    model = nn.Module()
    model.layers = nn.ModuleList([Block(False), Block(True), Block(True)])
    for block in model.layers[1:]:  # tied to block 0's, like Deformable DETR's box heads
        block.head.weight = model.layers[0].head.weight
    (stack,) = find_groups(model, LorsConfig(rank=1))
    groups = {group.relative_name: group.layer_indices for group in stack.groups}
    assert groups == {"proj": [0, 1, 2], "extra": [1, 2]}


def test_a_gate_that_no_rank_would_shrink_stays_dense_under_a_uniform_rank(tmp_path):
    """Qwen2-MoE's shared_expert_gate is 1 x d: rank 1 is its largest and already holds more than dense, so every
    uniform rank above 1 failed on it. It stays dense (as under target_reduction); the rest gets the rank."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen2MoeConfig(vocab_size=99, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                               shared_expert_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=4, num_experts_per_tok=2)
    model = lorsify(tf.Qwen2MoeForCausalLM(config).eval(), LorsConfig(rank=4))
    layer = model.model.layers[0]
    assert type(layer.mlp.shared_expert_gate) is nn.Linear and isinstance(layer.self_attn.q_proj, LorsLinear)
    assert model.config.lors_config["rank"][r"^model\.layers\.mlp\.shared_expert_gate$"] == "dense"
    model.save_pretrained(tmp_path)
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 99, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    # a group that a smaller rank would shrink is not left dense unasked: the rank is wrong for it
    with pytest.raises(ValueError, match=r"rank 20 does not fit 'model.layers.self_attn.k_proj' \(16x32\)"):
        lorsify(build("llama")[0], LorsConfig(rank=20))


def test_a_module_reused_in_two_stacks_stays_one_dense_module():
    """A T5 whose decoder reuses the encoder's attention and feed-forward modules: each stack gave the module
    its own LORS layer, untying encoder and decoder (one decoder step then moved them 0.43 apart)."""
    model, inputs = build("t5")
    for encoder_block, decoder_block in zip(model.encoder.block, model.decoder.block, strict=True):
        decoder_block.layer[0].SelfAttention.q = encoder_block.layer[0].SelfAttention.q
        decoder_block.layer[2].DenseReluDense = encoder_block.layer[1].DenseReluDense
    with torch.no_grad():
        reference = model(**inputs).logits
    lorsify(model, LorsConfig(rank="full", init="svd"))
    encoder_q, decoder_q = model.encoder.block[0].layer[0].SelfAttention.q, model.decoder.block[0].layer[0].SelfAttention.q
    assert encoder_q is decoder_q and type(encoder_q) is nn.Linear
    assert model.decoder.block[0].layer[2].DenseReluDense is model.encoder.block[0].layer[1].DenseReluDense
    assert isinstance(model.decoder.block[0].layer[1].EncDecAttention.q, LorsLinear)  # not reused: shared
    assert isinstance(model.encoder.block[0].layer[0].SelfAttention.k, LorsLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference, atol=1e-4, rtol=1e-4)


def test_a_rank_too_large_for_a_small_projection_names_the_ways_out():
    model, _ = build("bert")
    with pytest.raises(ValueError, match=r"exclude_modules=\['query'\]\) or give it its own rank"):
        lorsify(model, rank=33)
