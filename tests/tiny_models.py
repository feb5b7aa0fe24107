"""Tiny, randomly initialised models of every family lors_hf supports, with matching inputs.

`build(family)` returns ``(model, inputs)``; ``model(**inputs)`` runs. Used by the core and the
persistence tests so that every family goes through the same checks.
`save_tiny_bert(path, ...)` saves a tiny BERT classifier with the real MiniLM tokenizer (CLI and
script tests).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

FAMILIES = ("bert", "gpt2", "detr", "llama", "vit", "t5", "whisper")


def _ids(vocab: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def build(family: str, seed: int = 0, layers: int = 3) -> tuple[tf.PreTrainedModel, dict[str, torch.Tensor]]:
    """A tiny model of `family` (fp32, eval mode) and inputs for one forward pass."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if family == "bert":
        config = tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)
        model = tf.BertForSequenceClassification(config)
        inputs = {"input_ids": _ids(99), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    elif family == "gpt2":
        config = tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=layers, n_head=2, n_positions=64,
                               bos_token_id=0, eos_token_id=0)
        model = tf.GPT2LMHeadModel(config)
        inputs = {"input_ids": _ids(99)}
    elif family == "llama":
        config = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                bos_token_id=0, eos_token_id=0, pad_token_id=0)
        model = tf.LlamaForCausalLM(config)
        inputs = {"input_ids": _ids(99)}
    elif family == "vit":
        config = tf.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=layers,
                              num_attention_heads=2, intermediate_size=64, num_labels=3)
        model = tf.ViTForImageClassification(config)
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    elif family == "t5":
        config = tf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_decoder_layers=layers,
                             num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = tf.T5ForConditionalGeneration(config)
        inputs = {"input_ids": _ids(99), "decoder_input_ids": _ids(99, length=7, seed=1)}
    elif family == "whisper":
        config = tf.WhisperConfig(vocab_size=99, num_mel_bins=8, d_model=32, encoder_layers=layers,
                                  decoder_layers=layers, encoder_attention_heads=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
                                  max_target_positions=32, decoder_start_token_id=1, pad_token_id=0,
                                  bos_token_id=1, eos_token_id=2, suppress_tokens=[], begin_suppress_tokens=[])
        model = tf.WhisperForConditionalGeneration(config)
        inputs = {"input_features": torch.randn(2, 8, 32, generator=gen), "decoder_input_ids": _ids(99, length=5)}
    elif family == "detr":
        backbone = tf.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                   layer_type="basic", out_features=["stage2"])
        config = tf.DetrConfig(backbone_config=backbone, d_model=32, encoder_layers=layers, decoder_layers=layers,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, num_queries=10, num_labels=3)
        model = tf.DetrForObjectDetection(config)
        inputs = {"pixel_values": torch.randn(2, 3, 64, 64, generator=gen)}
    else:
        raise ValueError(f"unknown family {family!r}")
    return model.eval(), inputs


def save_tiny_bert(path: Path, layers: int, max_positions: int) -> Path:
    """Save a tiny BERT classifier (random weights, seed 0) with the real MiniLM tokenizer into ``path``.

    With the real tokenizer, real text goes through it (the script and CLI tests).
    """
    import lors_hf.assets  # here, not at the top: some tests load this module where lors_hf is blocked

    tokenizer = tf.AutoTokenizer.from_pretrained(lors_hf.assets.minilm_path())
    torch.manual_seed(0)
    config = tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=layers,
                           num_attention_heads=2, intermediate_size=64, max_position_embeddings=max_positions)
    tf.BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def main_output(outputs) -> torch.Tensor:
    """The tensor to compare across models: logits (or DETR's logits and boxes)."""
    if hasattr(outputs, "pred_boxes"):
        return torch.cat([outputs.logits.flatten(), outputs.pred_boxes.flatten()])
    return outputs.logits
