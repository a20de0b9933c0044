"""A small byte-level GPT in plain PyTorch (the main job's model)."""
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 256
    seq_len: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    dropout: float = 0.0


PRESETS = {
    "tiny": GPTConfig(seq_len=64, n_layer=2, n_head=2, d_model=64),
    "small": GPTConfig(seq_len=128, n_layer=4, n_head=4, d_model=128),
    "medium": GPTConfig(seq_len=256, n_layer=6, n_head=6, d_model=384),
    "large": GPTConfig(seq_len=512, n_layer=12, n_head=12, d_model=768),
    "gpt2": GPTConfig(seq_len=1024, n_layer=12, n_head=12, d_model=768),  # GPT-2 124M's shape; the GPU default
}


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model)
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        self.ln2 = nn.LayerNorm(c.d_model)
        self.fc = nn.Linear(c.d_model, 4 * c.d_model)
        self.out = nn.Linear(4 * c.d_model, c.d_model)
        self.n_head = c.n_head
        self.dropout = c.dropout

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.pos = nn.Embedding(c.seq_len, c.d_model)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.tok.weight  # tied: appears once among the parameters
        self.apply(self._init)
        for b in self.blocks:  # scaled residual projections (GPT-2)
            nn.init.normal_(b.proj.weight, std=0.02 / math.sqrt(2 * c.n_layer))
            nn.init.normal_(b.out.weight, std=0.02 / math.sqrt(2 * c.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx, targets=None):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    @torch.no_grad()
    def generate(self, idx, n_new, temperature=0.8, top_k=40, generator=None):
        for _ in range(n_new):
            logits = self(idx[:, -self.config.seq_len:])[:, -1, :].float() / temperature
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def decay_groups(model, weight_decay):
    """Weight decay on matrices and embeddings, none on biases and norms (the usual GPT split)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def flops_per_token(model_params: int, c: GPTConfig, seq_len: int) -> int:
    """Forward and backward FLOPs per token: 6 per parameter, plus attention's 12 x layers x
    sequence x width (PaLM's accounting)."""
    return 6 * model_params + 12 * c.n_layer * seq_len * c.d_model


def build_model(args, device):
    torch.manual_seed(args.seed)
    return GPT(replace(PRESETS[args.model], seq_len=args.seq_len)).to(device)
