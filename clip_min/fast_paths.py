"""The bf16/fp16 training paths of clip_min/model.py, arranged for speed and equal to its formulas up to that
precision's rounding: attention in a CPU training step as two batched products around a softmax, and QuickGELU's
backward in one pass. fp32, inference and GPUs never take them (fp32 training stays bit for bit the formulas')."""
import functools

import torch


def fused_quick_gelu(x):
    """Whether QuickGELU takes the one-pass backward: bf16/fp16 with grad (it rounds differently from autograd's)."""
    return x.requires_grad and x.dtype in (torch.bfloat16, torch.float16)


class QuickGELUWithFusedBackward(torch.autograd.Function):
    """quick_gelu, differentiated in one pass: its derivative is silu'(1.702 x), one torch kernel, where autograd
    through the formula takes five element-wise passes and keeps two tensors instead of one. It rounds differently
    from autograd's chain of passes, hence bf16/fp16 only."""

    @staticmethod
    def forward(ctx, x):
        z = 1.702 * x  # kept for the backward instead of x: the same size, and one pass fewer there
        ctx.save_for_backward(z)
        return x * torch.sigmoid(z)  # quick_gelu(x), the same operations

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, z)


def spelled_out_attention(qkv):
    """Whether attention is computed as softmax(q k^T / sqrt(d) + mask) v between two batched matrix products in
    the products' precision (attention_by_matmul) rather than by scaled_dot_product_attention: in a CPU training
    step under bf16/fp16. There torch's fused kernel has a slow backward for CLIP's short sequences, and its unfused
    one casts q, k and v to fp32 by default, checks its softmax rows for all -inf and builds the causal mask at every
    call; torch.compile traces the same three plain kernels (it would lower scaled_dot_product_attention to the fused
    one). fp32, inference and GPUs keep torch's kernel. The two differ by rounding only."""
    return qkv.device.type == "cpu" and qkv.dtype in (torch.bfloat16, torch.float16) and torch.is_grad_enabled()


def causal_bias(tokens, dtype, device):
    """0 on and below the diagonal, -inf above: added to the scores, it hides later tokens. No row is all -inf, so
    softmax needs no guard. Eager calls build it once per shape; a compiled graph builds it inside, where it fuses."""
    return (_causal_bias.__wrapped__ if torch.compiler.is_compiling() else _causal_bias)(tokens, dtype, device)


@functools.lru_cache(maxsize=64)
def _causal_bias(tokens, dtype, device):
    return torch.full((tokens, tokens), float("-inf"), dtype=dtype, device=device).triu(1)


def attention_by_matmul(qkv, causal):
    """qkv: [batch, tokens, 3, heads, dim] -> [batch, tokens, heads * dim]."""
    batch, tokens, _, heads, dim = qkv.shape
    # One copy puts q, k and v head-major, where each head's rows are contiguous for the batched products.
    q, k, v = qkv.permute(2, 0, 3, 1, 4).reshape(3, batch * heads, tokens, dim).unbind(0)
    # The scale rides in the product (alpha), in its backward too; with beta=0 the bias is not read.
    bias = causal_bias(tokens, q.dtype, q.device) if causal else q.new_zeros(1, 1, 1)
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1 if causal else 0, alpha=dim ** -0.5)
    out = torch.bmm(scores.softmax(dim=-1), v)
    return out.view(batch, heads, tokens, dim).transpose(1, 2).reshape(batch, tokens, heads * dim)
