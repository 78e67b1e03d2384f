"""Lightweight LoRA (LiDB, HyperDreamBooth): a rank-r LoRA factored through frozen random orthogonal bases.

``delta_W = A_aux @ A_train @ B_train @ B_aux`` with ``A_aux (out x a)``, ``A_train (a x r)``,
``B_train (r x b)``, ``B_aux (b x in)``; only ``A_train`` and ``B_train`` are predicted or trained
(``r * (a + b)`` numbers a layer, 150 with the defaults r=1, a=100, b=50). In LoRA terms
``up = A_aux @ A_train`` and ``down = B_train @ B_aux``.

The aux bases must come out bit-identical wherever and whenever they are rebuilt: a subject LoRA
stores only the trainables and a seed. A public re-implementation regenerated them with another RNG
state on reload and got distorted images. Gaussian sampling plus QR cannot promise identical bits
across machines (torch's CPU normal sampler has vectorised and scalar code paths, LAPACK blocking
varies), so the bases here use only integer randomness and exactly representable arithmetic:

    basis = rows of (H_2^k (x) I_m) / sqrt(2^k), with columns randomly permuted and sign-flipped,

where ``dim = 2^k * m`` and H is the Sylvester Hadamard matrix. That matrix is orthogonal, so any
subset of its rows is a set of orthonormal rows of constant magnitude (every nonzero entry is
+-1/sqrt(2^k)). The permutation, the signs and the row choice come from SplitMix64 streams seeded by
SHA-256 of (seed, layer name, role): plain integer arithmetic, the same on every platform, device,
dtype and library version. The aux bases are always built on the CPU in float32, then moved.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .errors import FileFormatError, HyperNetError, require_int
from .lora import LoraWeights
from .targets import TargetLayer

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class LidbConfig:
    """LiDB hyper-parameters. ``a``/``b`` are clamped per layer to the layer's out/in width."""

    rank: int = 1
    a: int = 100
    b: int = 50
    seed: int = 0
    learned_aux: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("rank", 1), ("a", 1), ("b", 1), ("seed", None)):
            require_int(f"lidb.{name}", getattr(self, name), minimum)
        if not isinstance(self.learned_aux, bool):
            raise HyperNetError(f"lidb.learned_aux must be true or false, not {self.learned_aux!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LidbConfig":
        if not isinstance(data, dict):
            raise HyperNetError(f"lidb must be a JSON object, not {data!r}")
        return cls(**{k: data[k] for k in ("rank", "a", "b", "seed", "learned_aux") if k in data})

    def layer_dims(self, layer: TargetLayer) -> tuple[int, int]:
        """Effective (a, b) of one layer: an orthonormal set can't be larger than the space it lives in."""
        return min(self.a, layer.out_features), min(self.b, layer.in_features)

    def trainables_per_layer(self, layer: TargetLayer) -> int:
        a, b = self.layer_dims(layer)
        return self.rank * (a + b)


def _splitmix64(seed: int, count: int) -> np.ndarray:
    """``count`` outputs of the SplitMix64 generator (Steele et al.), vectorised, uint64."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed & _MASK64) + _GOLDEN_GAMMA * np.arange(1, count + 1, dtype=np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _stream_seed(seed: int, layer_name: str, role: str) -> int:
    digest = hashlib.sha256(f"lidb-aux/v1/{seed}/{layer_name}/{role}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _permutation(seed: int, n: int) -> np.ndarray:
    # argsort of random keys; a stable sort breaks the (astronomically unlikely) ties by index.
    return np.argsort(_splitmix64(seed, n), kind="stable")


def _popcount_parity(values: np.ndarray) -> np.ndarray:
    # Sylvester Hadamard entry H[i, j] = (-1) ** popcount(i & j); numpy < 2 has no bitwise_count.
    parity = np.zeros_like(values)
    while values.any():
        parity ^= values & 1
        values = values >> 1
    return parity


def orthonormal_rows(count: int, dim: int, seed: int, layer_name: str, role: str) -> torch.Tensor:
    """``count`` orthonormal rows in R^dim (``count <= dim``), float32 on the CPU, bit-reproducible."""
    if not 0 < count <= dim:
        raise ValueError(f"cannot draw {count} orthonormal rows in {dim} dimensions")
    block = dim & -dim  # largest power of two dividing dim
    groups = dim // block
    column_perm = _permutation(_stream_seed(seed, layer_name, role + "/columns"), dim)
    signs = np.where(_splitmix64(_stream_seed(seed, layer_name, role + "/signs"), dim) >> np.uint64(63), -1.0, 1.0)
    rows = _permutation(_stream_seed(seed, layer_name, role + "/rows"), dim)[:count]
    # Row i of H (x) I_m is (hadamard row i // m) on column group i % m; column c is (c // m, c % m).
    h_row, g_row = rows // groups, rows % groups
    source = column_perm  # column c of the result is column column_perm[c] of H (x) I_m
    h_col, g_col = source // groups, source % groups
    parity = _popcount_parity(np.bitwise_and(h_row[:, None], h_col[None, :]))
    values = np.where(parity == 1, -1.0, 1.0) * (g_row[:, None] == g_col[None, :]) * signs[None, :]
    return torch.from_numpy(values / np.sqrt(float(block))).to(torch.float32)


class LidbBasis(nn.Module):
    """The aux bases of every target layer, plus the expansion trainables -> standard LoRA factors.

    With ``learned_aux`` the bases are trainable parameters (initialised as above) and must be stored
    with the hypernetwork; otherwise they are non-persistent buffers rebuilt from the seed.
    """

    def __init__(self, layers: Sequence[TargetLayer], config: LidbConfig):
        super().__init__()
        self.layers = list(layers)
        self.config = config
        self.up_aux = nn.ParameterDict() if config.learned_aux else None
        self.down_aux = nn.ParameterDict() if config.learned_aux else None
        self._frozen: dict[str, tuple[str, str]] = {}
        for index, layer in enumerate(self.layers):
            a, b = config.layer_dims(layer)
            up_aux = orthonormal_rows(a, layer.out_features, config.seed, layer.name, "up").T.contiguous()
            down_aux = orthonormal_rows(b, layer.in_features, config.seed, layer.name, "down")
            if config.learned_aux:
                self.up_aux[layer.name] = nn.Parameter(up_aux)
                self.down_aux[layer.name] = nn.Parameter(down_aux)
            else:
                up_key, down_key = f"up_aux_{index}", f"down_aux_{index}"
                self.register_buffer(up_key, up_aux, persistent=False)
                self.register_buffer(down_key, down_aux, persistent=False)
                self._frozen[layer.name] = (up_key, down_key)

    def aux(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_aux, B_aux)`` = ``(out x a, b x in)`` of one layer."""
        if self.config.learned_aux:
            return self.up_aux[name], self.down_aux[name]
        up_key, down_key = self._frozen[name]
        return getattr(self, up_key), getattr(self, down_key)

    def split(self, name: str, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat trainables ``(..., r*(a+b))`` -> ``A_train (..., a, r)``, ``B_train (..., r, b)``."""
        layer = next(layer for layer in self.layers if layer.name == name)
        a, b = self.config.layer_dims(layer)
        r = self.config.rank
        a_train = flat[..., : a * r].reshape(*flat.shape[:-1], a, r)
        b_train = flat[..., a * r :].reshape(*flat.shape[:-1], r, b)
        return a_train, b_train

    def expand(self, trainables: dict[str, torch.Tensor]) -> LoraWeights:
        """Flat per-layer trainables (optionally batched) -> standard LoRA factors (differentiable)."""
        down, up = {}, {}
        for layer in self.layers:
            a_train, b_train = self.split(layer.name, trainables[layer.name])
            up_aux, down_aux = self.aux(layer.name)
            up[layer.name] = up_aux.to(a_train.dtype) @ a_train
            down[layer.name] = b_train @ down_aux.to(b_train.dtype)
        return LoraWeights(down, up)

    def expand_exact(self, trainables: dict[str, torch.Tensor]) -> LoraWeights:
        """The same expansion computed in float64 on the CPU, rounded once to float32.

        Used for files, so a compact subject LoRA expands to the very bits of the standard one.
        """
        cpu = {n: t.detach().to("cpu", torch.float64) for n, t in trainables.items()}
        exact = self._expand64(cpu)
        return LoraWeights(
            {n: d.to(torch.float32) for n, d in exact.down.items()},
            {n: u.to(torch.float32) for n, u in exact.up.items()},
        )

    def _expand64(self, trainables: dict[str, torch.Tensor]) -> LoraWeights:
        down, up = {}, {}
        for layer in self.layers:
            a_train, b_train = self.split(layer.name, trainables[layer.name])
            up_aux, down_aux = (t.detach().to("cpu", torch.float64) for t in self.aux(layer.name))
            up[layer.name] = up_aux @ a_train
            down[layer.name] = b_train @ down_aux
        return LoraWeights(down, up)

    def num_trainables(self) -> int:
        return sum(self.config.trainables_per_layer(layer) for layer in self.layers)

    def checksum(self) -> str:
        """SHA-256 of every aux basis (float32, little-endian, canonical order)."""
        digest = hashlib.sha256()
        for layer in self.layers:
            for tensor in self.aux(layer.name):
                digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
        return digest.hexdigest()

    def verify(self, expected_checksum: str, what: str) -> None:
        actual = self.checksum()
        if actual != expected_checksum:
            raise FileFormatError(
                f"{what}: the LiDB aux bases rebuilt from seed {self.config.seed} (a {self.config.a}, b {self.config.b}) do not "
                f"match the file (checksum {actual[:12]} != {expected_checksum[:12]} in metadata field 'lidb_aux_sha256'); "
                "the file was made by an incompatible version or has been altered (metadata fields 'lidb', 'config')"
            )
