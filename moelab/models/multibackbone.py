"""A two-backbone model: a vision MoE encoder and a text MoE decoder, each with its own experts backend.

Like Qwen3-VL-MoE, in miniature: the image is cut into patches, the vision encoder (bidirectional attention +
SparseMoE blocks) embeds them, a linear projector maps them into the text width, and the text decoder reads
[image tokens; text tokens]. The two backbones are the sub-configs `text_config` and `vision_config`, so
`experts_implementation` can be a dict:

    MultiBackboneForCausalLM(config, experts_implementation={"": "grouped_mm", "vision_config": "eager"})

Dimension letters as declared in `moelab.core`, plus C channels, Hi x Wi image size, p patch size,
Q = (Hi / p) * (Wi / p) patches, Hv vision width.
"""

from __future__ import annotations

import torch
from torch import nn

from ..layer.moe import SparseMoE
from .blocks import KVCache, MoEBlock, MoEDecoder, RMSNorm
from .causal_lm import CausalLMOutput, MoEPreTrainedModel, init_weights, model_output
from .configs import MoEVisionConfig, MultiBackboneConfig, check_input_ids


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """pixel_values [B, C, Hi, Wi] -> patches [B, Q, C*p*p], row-major over the patch grid."""
    B, C, Hi, Wi = pixel_values.shape
    p = patch_size
    patches = pixel_values.unfold(2, p, p).unfold(3, p, p)  # [B, C, Hi/p, Wi/p, p, p]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(B, (Hi // p) * (Wi // p), C * p * p)


def synthetic_pixel_values(config: MoEVisionConfig, batch_size: int = 1, seed: int = 0) -> torch.Tensor:
    """A reproducible random image batch [B, C, Hi, Wi] of the size `config` expects."""
    generator = torch.Generator().manual_seed(seed)
    size = (batch_size, config.num_channels, config.image_size, config.image_size)
    return torch.randn(size, generator=generator)


class MoEVisionEncoder(nn.Module):
    """Patch embedding + learned positions, bidirectional MoE blocks, final norm."""

    def __init__(self, config: MoEVisionConfig, experts_implementation: str):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Linear(config.num_channels * config.patch_size ** 2, config.hidden_size, bias=False)
        self.position_embed = nn.Embedding(config.num_patches, config.hidden_size)
        self.layers = nn.ModuleList(
            MoEBlock(config.hidden_size, config.num_attention_heads, config.moe, config.rms_norm_eps, causal=False,
                     experts_implementation=experts_implementation)
            for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, pixel_values: torch.Tensor, router_outputs: list | None = None) -> torch.Tensor:
        """pixel_values [B, C, Hi, Wi] -> patch states [B, Q, Hv]; each layer's RouterOutput appended to
        `router_outputs` when given."""
        x = self.patch_embed(patchify(pixel_values, self.config.patch_size))  # [B, Q, Hv]
        x = x + self.position_embed.weight  # [B, Q, Hv]: where each patch sits
        for layer in self.layers:
            x = layer(x, router_outputs=router_outputs)
        return self.norm(x)


class MultiBackboneForCausalLM(MoEPreTrainedModel):
    """Text generation conditioned on an optional image; the two backbones select experts backends separately.

    `experts_implementation`: a str (both backbones) or a dict keyed by `""`, `"text_config"`,
    `"vision_config"`; `get_experts_implementation()` returns all three keys. The vision encoder runs in prefill
    only (the image tokens are then in the KV cache), so decode records only the text layers.
    """

    config_class = MultiBackboneConfig
    model_type = "moelab_multi_backbone"
    sub_configs = MultiBackboneConfig.sub_configs

    def __init__(self, config: MultiBackboneConfig | None = None, experts_implementation: str | dict | None = None,
                 *, dtype: torch.dtype | str | None = None, device=None, seed: int | None = None):
        super().__init__()
        config = MultiBackboneConfig() if config is None else config
        if not isinstance(config, MultiBackboneConfig):
            raise ValueError(f"config must be a moelab.MultiBackboneConfig, got {type(config).__name__}")
        self.config = config
        text, vision = config.text_config, config.vision_config
        self.vision_model = MoEVisionEncoder(vision, "eager")  # backends are set from the selection below
        self.projector = nn.Linear(vision.hidden_size, text.hidden_size, bias=False)  # patches -> text width
        self.language_model = MoEDecoder(text, "eager")
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self._finish_init(experts_implementation, dtype, device, seed)

    @property
    def text_config(self) -> MoEModelConfig:
        return self.config.text_config

    def reset_parameters(self, seed: int | None = None) -> None:
        """Re-draw every weight (each backbone with its own initializer_range); reproducible under `seed`."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        text_std = self.config.text_config.initializer_range
        init_weights(self.vision_model, self.config.vision_config.initializer_range, generator)
        for part in (self.projector, self.language_model, self.lm_head):
            init_weights(part, text_std, generator)

    def _experts_groups(self) -> dict[str, list[SparseMoE]]:
        return {"text_config": [layer.moe for layer in self.language_model.layers],
                "vision_config": [layer.moe for layer in self.vision_model.layers]}

    def _prefill_length(self, input_ids, pixel_values=None, **model_kwargs) -> int:
        return input_ids.shape[1] + (self.config.vision_config.num_patches if pixel_values is not None else 0)

    def _check_pixel_values(self, pixel_values, batch_size: int) -> torch.Tensor:
        vision = self.config.vision_config
        expected = [batch_size, vision.num_channels, vision.image_size, vision.image_size]
        if not isinstance(pixel_values, torch.Tensor) or not pixel_values.dtype.is_floating_point:
            got = pixel_values.dtype if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a floating tensor {expected}, got {got}")
        if list(pixel_values.shape) != expected:
            raise ValueError(f"pixel_values must have shape {expected} (batch of input_ids, channels, height, "
                             f"width), got {list(pixel_values.shape)}")
        return pixel_values.to(self.dtype)  # images usually arrive in float32; the model may be bfloat16

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None, *,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                labels: torch.Tensor | None = None, output_router_logits: bool = False,
                global_load=None) -> CausalLMOutput:
        """input_ids [B, N] (+ pixel_values [B, C, Hi, Wi]) -> logits [B, N, V] for the text positions.

        With an image the decoder sees [Q image tokens; N text tokens]; pass the image once, in the first
        forward, and later forwards attend to it through the KV cache. The router losses and outputs are as in
        `MoEForCausalLM.forward`, over the vision layers (when an image is given) then the text layers, weighed
        by the text config's coefficients.
        """
        check_input_ids(input_ids, self.text_config.vocab_size)
        use_cache = use_cache or past_key_values is not None
        if use_cache and past_key_values is None:
            past_key_values = KVCache()
        router_outputs = [] if labels is not None or output_router_logits else None
        inputs_embeds = self.language_model.embed_tokens(input_ids)  # [B, N, H]
        if pixel_values is not None:
            pixel_values = self._check_pixel_values(pixel_values, input_ids.shape[0])
            image_embeds = self.projector(self.vision_model(pixel_values, router_outputs))  # [B, Q, H]
            inputs_embeds = torch.cat([image_embeds, inputs_embeds], dim=1)  # [B, Q + N, H]
        hidden_states = self.language_model(inputs_embeds, past_key_values, router_outputs)  # [B, Q + N, H]
        logits = self.lm_head(hidden_states[:, -input_ids.shape[1]:])  # [B, N, V]: text positions only
        return model_output(self.text_config, logits, past_key_values if use_cache else None, labels,
                            router_outputs, output_router_logits, input_ids.shape[0], global_load)
