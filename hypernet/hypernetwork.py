"""The hypernetwork: image features -> one LoRA (LiDB trainables or plain factors) per target layer.

Architecture (HyperDreamBooth, Fig. 4): features ``f`` from a frozen image encoder are computed once;
a transformer decoder runs over one token per target layer (positional embedding + an embedding of
the current weight estimate) with cross-attention to ``f``; per-layer linear heads turn the tokens
into weight *deltas*, and the estimate is refined ``iterations`` times from zero:
``theta_k = theta_{k-1} + heads(T(f, embed(theta_{k-1}) + pos))``, ``theta_0 = 0``.

Initialisation makes a fresh hypernetwork predict ``delta_W = 0`` exactly while still receiving
gradients: heads are zero, and a learned per-layer offset holds a small random ``down`` (``B_train``)
and a zero ``up`` (``A_train``) -- LoRA's own init. (Zero for both factors would be a saddle point
with zero gradient.)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

import torch
from torch import nn

from .errors import FeatureError, HyperNetError, require_int, require_number
from .lidb import LidbBasis, LidbConfig
from .lora import LoraWeights
from .targets import TargetLayer

HIDDEN_STATES = ("last_hidden_state", "penultimate_hidden_states", "image_embeds")
MAX_ITERATIONS = 100  # refinement rounds; HyperDreamBooth uses 4. A damaged file must not make a prediction hang


@dataclass(frozen=True)
class FeatureSpec:
    """What the image encoder must deliver: ``(tokens, dim)`` features of ``hidden_state``.

    ``hidden_state`` uses ComfyUI's CLIP_VISION output names (``last_hidden_state`` is the encoder
    output before the final layer norm; ``image_embeds`` is the projected pooled vector, one token).
    """

    dim: int
    tokens: int
    hidden_state: str = "penultimate_hidden_states"
    image_size: int = 224
    encoder: str = ""

    def __post_init__(self) -> None:
        for name in ("dim", "tokens", "image_size"):
            require_int(f"features.{name}", getattr(self, name), 1)
        if self.hidden_state not in HIDDEN_STATES:
            raise HyperNetError(f"features.hidden_state must be one of {HIDDEN_STATES}, not {self.hidden_state!r}")
        if not isinstance(self.encoder, str):
            raise HyperNetError(f"features.encoder must be a string, not {self.encoder!r}")


@dataclass(frozen=True)
class HyperNetConfig:
    features: FeatureSpec
    width: int = 512
    depth: int = 2
    heads: int = 8
    iterations: int = 4
    mlp_ratio: float = 4.0
    output: str = "lidb"  # "lidb" (LiDB trainables) or "lora" (plain rank-r factors)
    lidb: LidbConfig = field(default_factory=LidbConfig)
    lora_rank: int = 1
    token_embedding_dim: int = 0  # > 0: also predict a subject word embedding (tuning-encoder option)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.features, FeatureSpec) or not isinstance(self.lidb, LidbConfig):
            raise HyperNetError("features must be a FeatureSpec and lidb a LidbConfig")
        for name, minimum in (("width", 1), ("depth", 1), ("heads", 1), ("iterations", 1), ("lora_rank", 1), ("token_embedding_dim", 0)):
            require_int(name, getattr(self, name), minimum)
        if self.iterations > MAX_ITERATIONS:
            raise HyperNetError(f"iterations must be <= {MAX_ITERATIONS} (each is a decoder pass per prediction), not {self.iterations}")
        require_number("mlp_ratio", self.mlp_ratio, 0, math.inf, low_inclusive=False)
        require_number("dropout", self.dropout, 0, 1, high_inclusive=False)
        if self.output not in ("lidb", "lora"):
            raise HyperNetError(f"output must be 'lidb' or 'lora', not {self.output!r}")
        if self.width % self.heads:
            raise HyperNetError(f"width {self.width} is not divisible by heads {self.heads}")
        if int(self.width * self.mlp_ratio) < 1:
            raise HyperNetError(f"mlp_ratio {self.mlp_ratio} gives an empty feed-forward layer at width {self.width}")

    @property
    def rank(self) -> int:
        return self.lidb.rank if self.output == "lidb" else self.lora_rank

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HyperNetConfig":
        """The config a file stores; :class:`HyperNetError` names the first missing, unknown or invalid field."""
        if not isinstance(data, dict):
            raise HyperNetError(f"the config must be a JSON object, not {type(data).__name__}")
        if not isinstance(data.get("features"), dict):
            raise HyperNetError("features must be a JSON object (dim, tokens, hidden_state, image_size, encoder)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known) or sorted(set(data["features"]) - {f.name for f in fields(FeatureSpec)})
        if unknown:
            raise HyperNetError(f"unknown config field(s) {', '.join(unknown)}")
        missing = [f"features.{name}" for name in ("dim", "tokens") if name not in data["features"]]
        if missing:
            raise HyperNetError(f"config field {missing[0]} is missing")
        data = dict(data)
        data["features"] = FeatureSpec(**data["features"])
        data["lidb"] = LidbConfig.from_dict(data.get("lidb", {}))
        return cls(**data)


@dataclass
class HyperNetOutput:
    trainables: dict[str, torch.Tensor]  # flat per-layer prediction (LiDB numbers, or raw LoRA factors), (B, P_layer)
    lora: LoraWeights  # per-sample factors, (B, r, in) / (B, out, r)
    token_embedding: torch.Tensor | None = None  # (B, token_embedding_dim)


class GroupedLinear(nn.Module):
    """One independent linear map per target layer, batched over layers that share a shape."""

    def __init__(self, in_sizes: Sequence[int], out_sizes: Sequence[int]):
        super().__init__()
        self.groups: list[tuple[int, int, list[int]]] = []
        by_shape: dict[tuple[int, int], list[int]] = {}
        for index, shape in enumerate(zip(in_sizes, out_sizes)):
            by_shape.setdefault(shape, []).append(index)
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for group, ((fan_in, fan_out), indices) in enumerate(by_shape.items()):
            self.groups.append((fan_in, fan_out, indices))
            self.register_buffer(f"index_{group}", torch.tensor(indices), persistent=False)
            bound = 1 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(len(indices), fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.zeros(len(indices), fan_out)))

    def index(self, group: int) -> torch.Tensor:
        return getattr(self, f"index_{group}")

    def zero_(self) -> "GroupedLinear":
        with torch.no_grad():
            for w in self.weights:
                w.zero_()
        return self

    def forward_groups(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-group inputs ``(B, n_g, in_g)`` -> per-group outputs ``(B, n_g, out_g)``."""
        return [torch.einsum("bni,nio->bno", x, w) + b for x, w, b in zip(inputs, self.weights, self.biases)]


class HyperNetwork(nn.Module):
    def __init__(self, config: HyperNetConfig, layers: Sequence[TargetLayer]):
        super().__init__()
        if not layers:
            raise HyperNetError("a hypernetwork needs at least one target layer")
        self.config = config
        self.layers = list(layers)
        width = config.width
        if config.output == "lidb":
            self.basis = LidbBasis(self.layers, config.lidb)
            sizes = [config.lidb.trainables_per_layer(layer) for layer in self.layers]
        else:
            self.basis = None
            sizes = [config.lora_rank * (layer.out_features + layer.in_features) for layer in self.layers]
        self.trainable_sizes = sizes

        self.feature_norm = nn.LayerNorm(config.features.dim)
        self.feature_proj = nn.Linear(config.features.dim, width)
        self.feature_pos = nn.Parameter(torch.randn(config.features.tokens, width) * 0.02)
        self.layer_pos = nn.Parameter(torch.randn(len(self.layers), width) * 0.02)
        self.weight_embed = GroupedLinear(sizes, [width] * len(sizes))
        decoder_layer = nn.TransformerDecoderLayer(
            width, config.heads, int(width * config.mlp_ratio), config.dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(decoder_layer, config.depth, norm=nn.LayerNorm(width))
        self.heads = GroupedLinear([width] * len(sizes), sizes).zero_()
        self.offset = nn.Parameter(self._initial_offset())
        if config.token_embedding_dim > 0:
            self.token_query = nn.Parameter(torch.randn(1, width) * 0.02)
            self.token_head = nn.Linear(width, config.token_embedding_dim)
        else:
            self.token_query = None
            self.token_head = None

    def _initial_offset(self) -> torch.Tensor:
        """Concatenated per-layer offsets: random ``down`` (std 1/sqrt(its width)), zero ``up``."""
        generator = torch.Generator().manual_seed(0)
        parts = []
        r = self.config.rank
        for layer in self.layers:
            if self.config.output == "lidb":
                a, b = self.config.lidb.layer_dims(layer)
                up_size, down_size, down_width = a * r, r * b, b
            else:
                up_size, down_size, down_width = layer.out_features * r, r * layer.in_features, layer.in_features
            down = torch.randn(down_size, generator=generator) / math.sqrt(down_width)
            parts.append(torch.cat([torch.zeros(up_size), down]))
        return torch.cat(parts)

    # ------------------------------------------------------------------ features

    def check_features(self, features: torch.Tensor) -> torch.Tensor:
        spec = self.config.features
        if features.dim() == 2:
            features = features.unsqueeze(1)
        if features.dim() != 3 or features.shape[-1] != spec.dim or features.shape[1] != spec.tokens:
            raise FeatureError(
                f"this hypernetwork expects image features of shape (batch, {spec.tokens}, {spec.dim}) "
                f"from {spec.encoder or 'its image encoder'} ({spec.hidden_state}); got {tuple(features.shape)}. "
                "Use the CLIP vision model the hypernetwork was trained with."
            )
        if not torch.isfinite(features).all():
            raise FeatureError("image features contain NaN or infinite values; check the image and the CLIP vision model")
        return features

    # ------------------------------------------------------------------ forward

    def _split_groups(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """``(B, sum P)`` -> per-group ``(B, n_g, P_g)`` in GroupedLinear group order."""
        chunks = torch.split(flat, self.trainable_sizes, dim=-1)
        return [torch.stack([chunks[i] for i in indices], dim=1) for _, _, indices in self.weight_embed.groups]

    def _join_groups(self, grouped: list[torch.Tensor]) -> torch.Tensor:
        chunks: list[torch.Tensor | None] = [None] * len(self.layers)
        for (_, _, indices), tensor in zip(self.heads.groups, grouped):
            for position, index in enumerate(indices):
                chunks[index] = tensor[:, position]
        return torch.cat(chunks, dim=-1)

    def _scatter_tokens(self, grouped: list[torch.Tensor], batch: int) -> torch.Tensor:
        tokens = grouped[0].new_zeros(batch, len(self.layers), self.config.width)
        for group, tensor in enumerate(grouped):
            tokens = tokens.index_copy(1, self.weight_embed.index(group), tensor)
        return tokens

    def _gather_tokens(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        return [tokens.index_select(1, self.heads.index(group)) for group in range(len(self.heads.groups))]

    def forward(self, features: torch.Tensor) -> HyperNetOutput:
        """``features (B, tokens, dim)`` (one subject per batch element) -> per-sample LoRAs."""
        features = self.check_features(features)
        batch = features.shape[0]
        memory = self.feature_proj(self.feature_norm(features)) + self.feature_pos
        refined = features.new_zeros(batch, sum(self.trainable_sizes))  # theta_0 = 0, then theta_k = T(f, theta_{k-1})
        extra = self.token_query.expand(batch, 1, -1) if self.token_query is not None else None
        for _ in range(self.config.iterations):
            embedded = self.weight_embed.forward_groups(self._split_groups(refined))
            tokens = self._scatter_tokens(embedded, batch) + self.layer_pos
            if extra is not None:
                tokens = torch.cat([tokens, extra], dim=1)
            hidden = self.decoder(tokens, memory)
            if extra is not None:
                hidden, extra = hidden[:, : len(self.layers)], hidden[:, len(self.layers) :]
            refined = refined + self._join_groups(self.heads.forward_groups(self._gather_tokens(hidden)))
        flat = refined + self.offset
        chunks = torch.split(flat, self.trainable_sizes, dim=-1)
        trainables = {layer.name: chunk for layer, chunk in zip(self.layers, chunks)}
        token_embedding = self.token_head(extra[:, 0]) if extra is not None else None
        return HyperNetOutput(trainables, self.trainables_to_lora(trainables), token_embedding)

    def trainables_to_lora(self, trainables: dict[str, torch.Tensor]) -> LoraWeights:
        """Flat per-layer predictions -> LoRA factors (batched if the inputs are)."""
        if self.basis is not None:
            return self.basis.expand(trainables)
        r = self.config.lora_rank
        down, up = {}, {}
        for layer in self.layers:
            flat = trainables[layer.name]
            up[layer.name] = flat[..., : layer.out_features * r].reshape(*flat.shape[:-1], layer.out_features, r)
            down[layer.name] = flat[..., layer.out_features * r :].reshape(*flat.shape[:-1], r, layer.in_features)
        return LoraWeights(down, up)

    @torch.no_grad()
    def predict(self, reference_features: torch.Tensor) -> HyperNetOutput:
        """One subject from several reference images: features ``(N, tokens, dim)`` are averaged first."""
        features = self.check_features(reference_features)
        if features.shape[0] == 0:
            raise FeatureError("no reference images given")
        return self(features.mean(dim=0, keepdim=True))

    def num_predicted(self) -> int:
        return sum(self.trainable_sizes)
