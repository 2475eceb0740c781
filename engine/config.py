"""Model configuration: one dataclass, its presets, and their validation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BACKENDS = ("auto", "torch", "triton")
RESIDUAL_DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class Fusions:
    """What the triton backend fuses beyond one kernel per op; each can be turned
    off to measure it against the path before it (GPTConfig.fusions names them).

    epilogues: the attention's and the MLP's linear layers run on the Triton
        matmul with the bias in the forward's epilogue, the GELU derivative in
        the epilogue of the matmul that makes its input's gradient, and each bias
        gradient summed inside the dW matmul (off: cuBLAS under autocast, a
        separate GELU-backward pass and bias sums).
    cross_entropy: the LM head's logits matmul takes each row's log-sum-exp in
        its epilogue, so the loss reads the logits once (off: twice).
    grad_accumulation: in the training step (GPT.forward_backward) every weight
        gradient is added into its .grad inside the kernel that computes it, in
        fp32 (off: autograd hands each one over and adds it with a separate pass;
        the embeddings then take PyTorch's lookup).
    bf16_weights: in the training step under bf16 autocast the matmuls read bf16
        copies of the weights that the optimizer writes once per step (off: a
        cast of every weight in every micro-step).
    """

    epilogues: bool = True
    cross_entropy: bool = True
    grad_accumulation: bool = True
    bf16_weights: bool = True

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def parse(cls, text: str) -> "Fusions":
        """"all", "none", or a comma-separated list of names (the ones on)."""
        if text == "all":
            return cls()
        wanted = set() if text == "none" else {t.strip() for t in text.split(",") if t.strip()}
        unknown = sorted(wanted - set(cls.names()))
        if unknown or not (wanted or text == "none"):
            raise ValueError(f"{text!r} is not all, none or a comma-separated list of "
                             f"{', '.join(cls.names())}")
        return cls(**{name: name in wanted for name in cls.names()})

    def text(self) -> str:
        on = [name for name in self.names() if getattr(self, name)]
        return "all" if len(on) == len(self.names()) else ",".join(on) or "none"


# Precisions, by name, declared once. A run trains in one of TRAIN_DTYPES (bf16:
# autocast over fp32 weights; bf16-params: the weights themselves in bf16); a loaded
# model runs in one of INFERENCE_DTYPES; the AUTOCAST_DTYPES names mean autocast
# over fp32 weights (engine.step maps each name to its torch dtype).
TRAIN_DTYPES = ("fp32", "bf16", "bf16-params")
INFERENCE_DTYPES = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = ("bf16", "fp16")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position embedding covers
    vocab_size: int = 50257  # number of token ids (GPT-2 BPE: 50257)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on attention probabilities and residual branches; 0 for pretraining
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has
    backend: str = "auto"  # auto | torch | triton: which op layer backend the model calls
    # The triton backend's attention backward without atomics: the same
    # gradients, bit for bit, every run (what an exact resume needs). False
    # takes the faster atomic 5-matmul backward on Hopper, whose dq varies in
    # its last bits from run to run.
    deterministic: bool = True
    # The embedding / LM-head rows are padded to a multiple of this (64 turns
    # 50257 into 50304, which matmuls like better). Padded rows are never
    # sampled and never counted in the loss.
    vocab_multiple: int = 1
    layer_norm_eps: float = 1e-5
    # The dtype the residual stream is stored in between blocks (each add and
    # LayerNorm computes in fp32 and rounds the stream once): "fp32" keeps the
    # embeddings' dtype (fp32 master weights: fp32), "bf16" halves the bytes every
    # fused add+LayerNorm moves.
    residual_dtype: str = "fp32"
    # What the triton backend fuses (Fusions): "all", "none" or a list of names.
    fusions: str = "all"

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GPTConfig.{name} must be an int, got {value!r}")
            if value <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {value}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.deterministic, bool):
            raise ValueError(f"GPTConfig.deterministic must be a bool, got {self.deterministic!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"GPTConfig.backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.residual_dtype not in RESIDUAL_DTYPES:
            raise ValueError(f"GPTConfig.residual_dtype must be one of {RESIDUAL_DTYPES}, "
                             f"got {self.residual_dtype!r}")
        try:
            Fusions.parse(self.fusions)
        except ValueError as e:
            raise ValueError(f"GPTConfig.fusions: {e}") from None
        if not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be positive, got {self.layer_norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """A preset by name (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"GPTConfig: unknown preset {name!r}; known: {', '.join(PRESETS)}")
        fields = dict(PRESETS[name])
        known = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in known:
                raise ValueError(f"GPTConfig: unknown field {key!r}")
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"GPTConfig: unknown field(s) {', '.join(unknown)}")
        return cls(**d)


PRESETS: dict[str, dict] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Trains in seconds on a laptop CPU; the full GPT-2 vocabulary keeps it a real LM.
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
}
