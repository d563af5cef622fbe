"""The PyTorch twin of the `tiny` EMMA preset, for the CPU race (`scripts/race_pytorch.py`).

Built from transformers parts where they exist (SigLIP and DINOv2-with-registers towers, the
Mamba LM's blocks, the pixel decoder's Mamba-2 mixer) and plain torch for the rest (projector,
multi-scale fusion, cross-attention, pixel target), with the parameter names emma-rs uses, so
that one safetensors file loads into both. The shapes mirror `EmmaConfig::preset("tiny")` in
`emma/src/config.rs`; emma-rs checks every name and shape when it loads the file, so a drift
between the two is an error, not a silent difference.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# EmmaConfig::preset("tiny").
IMAGE, PATCH = 32, 8
GRID = IMAGE // PATCH
TOKENS = GRID * GRID
VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=IMAGE, patch_size=PATCH,
           layer_norm_eps=1e-6)
SIGLIP_MLP, DINO_MLP, DINO_REGISTERS = 64, 64, 1
FEATURES = 32 + 32
PROJECTOR_HIDDEN = 4 * FEATURES
LM = dict(hidden_size=64, num_hidden_layers=4, vocab_size=512, state_size=8, time_step_rank=4, expand=2,
          conv_kernel=4, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5, tie_word_embeddings=True)
FUSION_LAYERS = (1, 2, 3)
DEC_HEADS, DEC_HEAD_DIM = 4, 16
DEC_MAMBA = dict(state_size=8, head_dim=16, chunk_size=8)
PIXEL_WEIGHT = 1e-5
IGNORE = np.iinfo(np.uint32).max

# The race's batch: 32 examples of 16 image tokens and 24 text tokens, the last 4 of them answer.
BATCH, TEXT, ANSWER = 32, 24, 4
ADAMW = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)


def position_embeddings_2d(grid: int, dim: int) -> np.ndarray:
    """emma's fixed 2-D sine-cosine embeddings [grid², dim] (emma/src/alignment.rs)."""
    quarter = dim // 4
    out = np.zeros((grid * grid, dim))
    for r in range(grid):
        for c in range(grid):
            row = out[r * grid + c]
            for half, pos in ((0, r), (1, c)):
                for k in range(quarter):
                    omega = 1.0 / 10000 ** (k / max(quarter, 1))
                    row[half * 2 * quarter + k] = math.sin(pos * omega)
                    row[half * 2 * quarter + quarter + k] = math.cos(pos * omega)
    return out.astype(np.float32)


class Projector(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, PROJECTOR_HIDDEN)
        self.fc2 = nn.Linear(PROJECTOR_HIDDEN, LM["hidden_size"])
        self.fc3 = nn.Linear(LM["hidden_size"], LM["hidden_size"])

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


class CrossAttention(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, q, kv, mask):
        b, n, d = q.shape
        split = lambda t: t.view(b, -1, DEC_HEADS, DEC_HEAD_DIM).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(self.q_proj(q)), split(self.k_proj(kv)), split(self.v_proj(kv)),
                                           attn_mask=mask)
        return self.out_proj(o.transpose(1, 2).reshape(b, n, d))


class DecoderBlock(nn.Module):
    def __init__(self, d: int, mixer_config):
        super().__init__()
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

        self.norm_q, self.norm_kv, self.norm_mamba = (nn.LayerNorm(d, eps=1e-5) for _ in range(3))
        self.cross_attn = CrossAttention(d)
        self.mixer = Mamba2Mixer(mixer_config, layer_idx=0)


class Decoder(nn.Module):
    def __init__(self, d: int, scales: int):
        super().__init__()
        import transformers as tf

        mixer_config = tf.Mamba2Config(hidden_size=d, num_heads=2 * d // DEC_MAMBA["head_dim"], n_groups=1,
                                       expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
                                       layer_norm_epsilon=1e-5, **DEC_MAMBA)
        self.query = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.blocks = nn.ModuleList(DecoderBlock(d, mixer_config) for _ in range(scales))
        self.norm_out = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, VIT["hidden_size"])


class Alignment(nn.Module):
    """Multi-scale fusion, the block-causal pixel decoder and the pixel loss against SigLIP's
    patch embedding of the image, as emma/src/alignment.rs computes them."""

    def __init__(self, siglip_patch: nn.Conv2d):
        super().__init__()
        d, scales = LM["hidden_size"], len(FUSION_LAYERS) + 1
        self.feature_norms = nn.ModuleList(nn.LayerNorm(d, eps=1e-5) for _ in range(scales))
        self.fusion = nn.Linear(scales * d, scales * d)
        self.decoder = Decoder(d, scales)
        self.target_patch_embed = nn.Conv2d(3, VIT["hidden_size"], PATCH, stride=PATCH)
        self.target_patch_embed.load_state_dict(siglip_patch.state_dict())
        self.register_buffer("pos", torch.from_numpy(position_embeddings_2d(GRID, d))[None], persistent=False)
        row = torch.arange(TOKENS) // GRID
        self.register_buffer("mask", row[None, :] <= row[:, None], persistent=False)

    def loss(self, per_layer, siglip_pixels):
        picked = [per_layer[l - 1] for l in FUSION_LAYERS] + [per_layer[-1]]
        normed = [norm(h[:, :TOKENS]) for h, norm in zip(picked, self.feature_norms)]
        maps = self.fusion(torch.cat(normed, 2)).chunk(len(normed), 2)
        dec = self.decoder
        q = (dec.query + self.pos).expand(siglip_pixels.shape[0], TOKENS, -1)
        for block, kv in zip(dec.blocks, maps):
            q = q + block.cross_attn(block.norm_q(q), block.norm_kv(kv), self.mask)
            q = q + block.mixer(block.norm_mamba(q))
        pred = dec.head(dec.norm_out(q))
        raw = self.target_patch_embed(siglip_pixels).flatten(2).transpose(1, 2)
        target = F.layer_norm(raw, (raw.shape[-1],), eps=1e-6)
        return (pred - target).pow(2).sum() * PIXEL_WEIGHT


class TinyEmma(nn.Module):
    def __init__(self):
        super().__init__()
        import transformers as tf

        self.vision = nn.Module()
        self.vision.siglip = tf.SiglipVisionModel(tf.SiglipVisionConfig(
            intermediate_size=SIGLIP_MLP, hidden_act="gelu_pytorch_tanh", vision_use_head=False, **VIT))
        self.vision.dinov2 = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(
            mlp_ratio=DINO_MLP // VIT["hidden_size"], hidden_act="gelu", num_register_tokens=DINO_REGISTERS, **VIT))
        self.projector = Projector()
        self.lm = tf.MambaForCausalLM(tf.MambaConfig(**LM))
        self.alignment = Alignment(self.vision.siglip.embeddings.patch_embedding)

    def losses(self, siglip_pixels, dinov2_pixels, ids, labels):
        """(total, text, pixel), as `Emma::losses`."""
        s = self.vision.siglip(pixel_values=siglip_pixels, output_hidden_states=True).hidden_states[-2]
        d = self.vision.dinov2(pixel_values=dinov2_pixels, output_hidden_states=True).hidden_states[-2]
        image = self.projector(torch.cat([d[:, 1 + DINO_REGISTERS:], s], 2))
        x = torch.cat([image, self.lm.backbone.embeddings(ids)], 1)
        per_layer = []
        for block in self.lm.backbone.layers:
            x = block(x)
            per_layer.append(x)
        hidden = self.lm.backbone.norm_f(x)
        t = ids.shape[1]
        logits = self.lm.lm_head(hidden[:, TOKENS - 1:TOKENS - 1 + t])
        text = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        pixel = self.alignment.loss(per_layer, siglip_pixels)
        return text + pixel, text, pixel

    def emma_state_dict(self):
        """The parameters under emma-rs's names: the transformers parts as `save_pretrained`
        writes them (checkpoint names, the tied LM head left out), the rest as they are."""
        import tempfile

        from safetensors.numpy import load_file
        from transformers.utils import logging

        logging.disable_progress_bar()

        out = {}
        hf = {"vision.siglip": self.vision.siglip, "vision.dinov2": self.vision.dinov2, "lm": self.lm}
        for prefix, part in hf.items():
            with tempfile.TemporaryDirectory() as tmp:
                part.save_pretrained(tmp, safe_serialization=True)
                out.update({f"{prefix}.{k}": v for k, v in load_file(f"{tmp}/model.safetensors").items()})
        out.update({k: v.detach().contiguous().numpy() for k, v in self.state_dict().items()
                    if not any(k.startswith(p + ".") for p in hf)})
        return out


def inputs(rng: np.random.Generator) -> dict:
    """The race's batch, under the names both sides read."""
    ids = rng.integers(0, LM["vocab_size"], size=(BATCH, TEXT), dtype=np.uint32)
    labels = np.full_like(ids, IGNORE)
    labels[:, -ANSWER:] = ids[:, -ANSWER:]
    return {
        "emma_siglip_pixels": rng.standard_normal((BATCH, 3, IMAGE, IMAGE), dtype=np.float32),
        "emma_dinov2_pixels": rng.standard_normal((BATCH, 3, IMAGE, IMAGE), dtype=np.float32),
        "emma_ids": ids,
        "emma_labels": labels,
    }


def built() -> TinyEmma:
    """The twin with its random weights: seed 0, so the file `prepare` wrote holds these values
    (the race's agreement check would show it if not)."""
    torch.manual_seed(0)
    return TinyEmma()


def prepare(folder) -> None:
    """Writes the twin's random weights as folder/model.safetensors and the batch as
    folder/inputs.safetensors (once)."""
    from safetensors.numpy import save_file

    if (folder / "inputs.safetensors").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    save_file(built().emma_state_dict(), str(folder / "model.safetensors"))
    save_file(inputs(np.random.default_rng(0)), str(folder / "inputs.safetensors"))


def train_step_runner(files: dict):
    """Builds the twin and returns `step()`: one training step (zero the gradients, losses,
    backward, AdamW) returning (total, text, pixel) and the compared gradients of that step."""
    model = built().train()
    opt = torch.optim.AdamW(model.parameters(), **ADAMW)
    labels = files["emma_labels"].astype(np.int64)
    labels[files["emma_labels"] == IGNORE] = -100
    batch = (torch.from_numpy(files["emma_siglip_pixels"]), torch.from_numpy(files["emma_dinov2_pixels"]),
             torch.from_numpy(files["emma_ids"].astype(np.int64)), torch.from_numpy(labels))
    params = dict(model.named_parameters())

    def step():
        opt.zero_grad(set_to_none=True)
        total, text, pixel = model.losses(*batch)
        total.backward()
        grads = {name: params[key].grad.clone() for name, key in COMPARED_GRADS.items()}
        opt.step()
        return (total, text, pixel), grads

    return step


# The gradients compared between the two sides: one that flows through everything (the
# projector's first layer) and one of the pixel decoder.
COMPARED_GRADS = {
    "grad": "projector.fc1.weight",
    "grad_decoder": "alignment.decoder.blocks.0.mixer.in_proj.weight",
}
