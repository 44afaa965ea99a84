"""Greedy decoding with a key/value cache: the base model plus a LoRA-FA adapter, one row.

The training program has no cache, so decoding through it runs the whole window again for
every new token. A CachedDecoder keeps each layer's keys and values in fixed-size buffers
(Hugging Face's StaticCache, registered as module buffers so export turns them into mutable
program state) and offers the two calls a generation loop needs:
  prefill(input_ids [1, P], length [1])  the prompt, right-padded to P, written to cache
                                         positions 0..P-1; logits [1, vocab] at length - 1
  decode(token [1, 1], position [1])     one token at `position`; its logits [1, vocab]
Right padding is harmless: the pad tokens' keys land at positions >= length, which a query at
position p < them never sees (the causal mask works on absolute positions), and decoding
overwrites them one by one. The adapter is the PRGEStep's unperturbed B (set_adapter /
get_adapter, the same flat layout as training), so one program serves any trained adapter.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from prge.step import PRGEStep

DEFAULT_CACHE_LEN = 256  # positions of the cache: prompt plus new tokens (11.5 MB on SmolLM2-135M)


class CachedDecoder(nn.Module):
    def __init__(self, step: PRGEStep, max_len: int) -> None:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer
        from transformers.integrations.executorch import get_head_shapes

        super().__init__()
        if step.head is None:
            raise ValueError("this step has label-word logits only; build it with a full-vocabulary loss to decode")
        self.step = step  # the backbone is reached through it: a second name for it would alias its weights
        self.max_len = max_len
        config = step.body.backbone.config.get_text_config()
        self.cache = StaticCache(max_cache_len=max_len, config=config)
        # A sliding-window layer rolls its buffer with data-dependent control flow that export
        # cannot trace; a full-length layer holds every position, and the sliding-window mask
        # (built from the config) still hides what the window would have dropped.
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, StaticSlidingWindowLayer):
                self.cache.layers[i] = StaticLayer(max_len)
        num_heads, head_dim = get_head_shapes(config)
        self.cache.early_initialization(1, num_heads, head_dim, torch.float32, torch.device("cpu"))
        for i, layer in enumerate(self.cache.layers):  # buffers, so export makes them program state
            self.register_buffer(f"keys_{i}", layer.keys, persistent=False)
            self.register_buffer(f"values_{i}", layer.values, persistent=False)
            self.register_buffer(f"length_{i}", layer.cumulative_length, persistent=False)

    def _logits(self, input_ids: Tensor, first_position: Tensor, last: Tensor) -> Tensor:
        for i, layer in enumerate(self.cache.layers):
            # Read the buffers through the module on every call: export swaps a module's buffers
            # for traced stand-ins, and a cache still holding the originals would bake them in
            # as constants instead of mutating program state.
            layer.keys, layer.values = getattr(self, f"keys_{i}"), getattr(self, f"values_{i}")
            layer.cumulative_length = getattr(self, f"length_{i}")
            layer.cumulative_length.copy_(first_position.reshape(()))  # where this call writes
        positions = (torch.arange(input_ids.shape[1]) + first_position).unsqueeze(0)
        hidden = self.step.body.backbone(input_ids=input_ids, position_ids=positions, past_key_values=self.cache,
                               use_cache=True).last_hidden_state
        return self.step.head_logits(hidden.index_select(1, last)[:, 0], full_vocab=True)

    def prefill(self, input_ids: Tensor, length: Tensor) -> Tensor:
        return self._logits(input_ids, torch.zeros_like(length), length - 1)

    def decode(self, token: Tensor, position: Tensor) -> Tensor:
        return self._logits(token, position, torch.zeros_like(position))

    def get_adapter(self) -> Tensor:
        return self.step.get_adapter()

    def set_adapter(self, flat: Tensor) -> Tensor:
        return self.step.set_adapter(flat)


@torch.no_grad()
def greedy_tokens(decoder: CachedDecoder, prompt: list[int], prefill_len: int, new_tokens: int) -> list[int]:
    """Exactly new_tokens greedy tokens (no stop token) by prefill + decode in eager PyTorch: the
    reference a generation program's tokens are held to."""
    ids = torch.zeros(1, prefill_len, dtype=torch.int64)
    ids[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.int64)
    logits = decoder.prefill(ids, torch.tensor([len(prompt)]))
    tokens: list[int] = []
    for position in range(len(prompt), len(prompt) + new_tokens):
        tokens.append(int(logits.argmax(-1)))
        logits = decoder.decode(torch.tensor([[tokens[-1]]]), torch.tensor([position]))
    return tokens
