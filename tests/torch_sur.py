"""The official SUR-adapter class in PyTorch (`SUR_adapter.py`, Qrange-group/SUR-adapter 5d97aa3,
as ../SUR_SPEC.md states it), written here as a test reference: its state dict names are the
official ones, so `load_state_dict(strict=True)` says whether a file loads in the official code.
tests/test_sur.py first checks it against the official numbers in fixtures/reference/sur."""

import torch
from torch import nn


class Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.width = width
        self.query_layer = nn.Linear(width, width)
        self.key_layer = nn.Linear(width, width)
        self.value_layer = nn.Linear(width, width)  # in the state dict, never applied
        self.output_layer = nn.Sequential(
            nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)
        )

    def forward(self, query, key, value):
        scores = self.query_layer(query) @ self.key_layer(key).transpose(-1, -2)
        hidden = torch.softmax(scores / self.width**0.5, dim=-1) @ value + value
        return self.output_layer(hidden) + hidden


class Adapter(nn.Module):
    def __init__(self, depth=2, adapter_weight=0.1, sd_text_size=768, batch_first=False):
        super().__init__()
        self.encoder_layer = nn.TransformerEncoderLayer(
            d_model=sd_text_size, nhead=8, dim_feedforward=2048, batch_first=batch_first
        )
        self.transformer_encoder = nn.TransformerEncoder(
            self.encoder_layer, num_layers=depth, enable_nested_tensor=False
        )
        self.attention = Attention(sd_text_size)
        self.fc = nn.Linear(sd_text_size, sd_text_size)
        nn.init.zeros_(self.fc.weight)
        self.adapter_weight = adapter_weight

    def forward(self, x):
        encoded = self.transformer_encoder(x)
        llm_out = self.fc(self.attention(encoded, x, x))
        return self.adapter_weight * llm_out + (1 - self.adapter_weight) * x, encoded, llm_out
