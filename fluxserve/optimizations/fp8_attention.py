"""fp8 attention for FLUX: Q, K and V quantized per tensor to float8 e4m3, attention by the cuDNN frontend's fp8
SDPA graph on a GPU (compute capability 9.0+), or by an emulation of the same arithmetic on any other device.

Written here because no maintained library ships it for diffusers: diffusers' attention backends have no fp8 kernel
but SageAttention's (not installable at the version diffusers needs), and its backend registry is a closed enum, so
the kernel enters through an attention processor (`Fp8AttnProcessor`). The kernel is a torch custom op, so
torch.compile traces around it and fuses the quantization of Q, K and V into the kernels that produce them.

Scales, all powers of two (so scaling and descaling are exact), each the largest that maps a bound on the tensor's
absolute values to at most 448 (e4m3's largest finite value); values are saturated, never cast unscaled (an
unscaled cast of a value above 448 gives NaN in e4m3):
- Q and K: a bound known before they are computed, from the weights of the RMSNorm FLUX applies to each head
  (`rms_norm_bound`): no reduction over the tensor is needed, so Inductor fuses their quantization into the kernel
  that normalizes and rotates them (on the H200 this took Q's and K's quantization from 0.175 to 0.101 ms a call,
  perf.diagnostics.activation_quantization).
- V: its absolute maximum, computed on the device per call (no bound holds for a projection's output).
- the softmax probabilities P, which lie in [0, 1]: 256.
- the output O, a convex combination of V's rows so |O| <= max|V|: half of V's scale, leaving room for the
  rounding of P, whose quantized rows can sum to slightly more than 1.
"""

from __future__ import annotations

import importlib.util
import threading

import torch
from diffusers.models.transformers.transformer_flux import (
    FluxAttnProcessor,
    _get_qkv_projections,
    apply_rotary_emb,
)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SOFTMAX_SCALE = 256.0
CUDNN_FRONTEND_PACKAGE = "nvidia-cudnn-frontend"


def cudnn_frontend_available() -> bool:
    """True when the cuDNN frontend's Python package (`import cudnn`) is installed."""
    return importlib.util.find_spec("cudnn") is not None


def quantize_per_tensor(x: torch.Tensor, bound: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` as e4m3 scaled by the largest power of two that fits `bound` (default: x's absolute maximum) into e4m3's
    range, and the descale that undoes it (float32, shape (1, 1, 1, 1)). Stays on the device: no host sync."""
    if bound is None:
        bound = x.detach().abs().amax()
    bound = bound.float().clamp_min(torch.finfo(torch.float32).tiny)
    multiplier = torch.exp2(torch.floor(torch.log2(FP8_MAX / bound)))
    quantized = (x.float() * multiplier).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return quantized, multiplier.reciprocal().reshape(1, 1, 1, 1)


def rms_norm_bound(*norms: torch.nn.RMSNorm) -> torch.Tensor | None:
    """A bound on every value of a head vector normalized by any of `norms` and then rotated: RMSNorm leaves each
    vector with a root mean square of 1, so no element exceeds sqrt(head_dim) before the weight multiplies it, nor
    sqrt(head_dim) times the weight's largest magnitude after (a norm without a weight counts as weight 1); the
    rotary embedding rotates pairs of elements, which keeps each pair's norm. Values that bf16's rounding lifts past
    it saturate. None when no norm has a weight to put on the device (the absolute maximum is used then)."""
    weights = [norm.weight for norm in norms if norm.weight is not None]
    if not weights:
        return None
    magnitude = torch.stack([weight.detach().abs().amax() for weight in weights]).amax().float()
    if len(weights) < len(norms):
        magnitude = magnitude.clamp_min(1.0)
    return magnitude * norms[0].normalized_shape[-1] ** 0.5


def _output_scale(descale_value: torch.Tensor) -> torch.Tensor:
    """The scale O is quantized with: half of V's scale (|O| <= max|V|, with room for P's rounding)."""
    return 0.5 / descale_value


def emulated_fp8_attention(query, key, value, descale_query, descale_key, descale_value, scale: float):
    """The cuDNN kernel's arithmetic in float32 on any device: Q, K, V descaled, P rounded to e4m3 at
    `SOFTMAX_SCALE`, O quantized with `_output_scale`. The op's kernel off CUDA, and the GPU kernel's reference."""
    q = query.float().transpose(1, 2) * descale_query
    k = key.float().transpose(1, 2) * descale_key
    v = value.float().transpose(1, 2) * descale_value
    probabilities = torch.softmax((q @ k.transpose(-1, -2)) * scale, dim=-1)
    probabilities = (probabilities * SOFTMAX_SCALE).to(FP8).float() / SOFTMAX_SCALE
    out = (probabilities @ v) * _output_scale(descale_value)
    return out.clamp(-FP8_MAX, FP8_MAX).to(FP8).transpose(1, 2).contiguous()


@torch.library.custom_op("fluxserve::fp8_attention", mutates_args=())
def fp8_attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    descale_query: torch.Tensor, descale_key: torch.Tensor, descale_value: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Non-causal attention over e4m3 (batch, tokens, heads, head_dim) tensors; returns e4m3 O in that layout,
    quantized with `_output_scale(descale_value)`. cuDNN's kernel on CUDA (registered below), else the emulation."""
    return emulated_fp8_attention(query, key, value, descale_query, descale_key, descale_value, scale)


def _empty_output(query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The op's e4m3 output: query's (batch, tokens, heads) and value's head_dim, contiguous."""
    return query.new_empty((*query.shape[:-1], value.shape[-1]), dtype=FP8)


@fp8_attention_op.register_fake
def _(query, key, value, descale_query, descale_key, descale_value, scale):
    return _empty_output(query, value)


class _CudnnGraphs:
    """cuDNN frontend fp8 SDPA graphs, one per device and tensor geometry, built on first use (a FLUX stack has
    one geometry per image size), and one cuDNN handle per device."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._handles: dict[int, object] = {}
        self._graphs: dict[tuple, tuple] = {}
        self._constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def run(self, query, key, value, descale_query, descale_key, descale_value, scale: float) -> torch.Tensor:
        import cudnn

        device = query.device
        out = _empty_output(query, value)
        geometry = (device.index, scale, *(tuple(t.shape) + tuple(t.stride()) for t in (query, key, value)))
        with self._lock:
            if geometry not in self._graphs:
                self._graphs[geometry] = self._build(cudnn, device, query, key, value, out, scale)
            graph, uids, workspace_bytes = self._graphs[geometry]
            handle = self._handles[device.index]
            softmax_scale, softmax_descale = self._constants[device.index]
        scalar = softmax_scale.new_empty((1, 1, 1, 1))
        buffers = (query, key, value, descale_query, descale_key, descale_value, softmax_descale, softmax_scale,
                   _output_scale(descale_value), out, scalar, torch.empty_like(scalar))
        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        cudnn.set_stream(handle, torch.cuda.current_stream(device).cuda_stream)
        # Buffers in a fixed order with their uids: the frontend's cheapest execute on the host (it caches the
        # binding by value), which matters for every stack that is not replayed as a CUDA graph.
        graph.execute(buffers, workspace, handle=handle, tensor_uids=uids)
        return out

    def _build(self, cudnn, device, query, key, value, out, scale):
        with torch.cuda.device(device):
            if device.index not in self._handles:
                self._handles[device.index] = cudnn.create_handle()
                softmax_scale = torch.full((1, 1, 1, 1), SOFTMAX_SCALE, dtype=torch.float32, device=device)
                self._constants[device.index] = (softmax_scale, softmax_scale.reciprocal())
            handle = self._handles[device.index]
            e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
            graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                                  handle=handle)

            q, k, v = (graph.tensor(name=name, **_heads_first(t), data_type=e4m3)
                       for name, t in (("q", query), ("k", key), ("v", value)))
            scalars = [graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
                       for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
            o, _, amax_s, amax_o = graph.sdpa_fp8(
                q=q, k=k, v=v, descale_q=scalars[0], descale_k=scalars[1], descale_v=scalars[2],
                descale_s=scalars[3], scale_s=scalars[4], scale_o=scalars[5],
                is_inference=True, attn_scale=scale, use_causal_mask=False, name="fp8_attention",
            )
            o_layout = _heads_first(out)
            o.set_output(True).set_dim(o_layout["dim"]).set_stride(o_layout["stride"]).set_data_type(e4m3)
            for amax in (amax_s, amax_o):
                amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
            graph.validate()
            graph.build_operation_graph()
            graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            graph.check_support()
            graph.build_plans()
            uids = tuple(tensor.get_uid() for tensor in (q, k, v, *scalars, o, amax_s, amax_o))
            return graph, uids, graph.get_workspace_size()


def _heads_first(t: torch.Tensor) -> dict[str, list[int]]:
    """A (batch, tokens, heads, head_dim) tensor described in cuDNN's order, (batch, heads, tokens, head_dim), over
    the same memory."""
    order = (0, 2, 1, 3)
    return {"dim": [t.shape[i] for i in order], "stride": [t.stride(i) for i in order]}


_CUDNN = _CudnnGraphs()


@fp8_attention_op.register_kernel("cuda")
def _(query, key, value, descale_query, descale_key, descale_value, scale):
    return _CUDNN.run(query, key, value, descale_query, descale_key, descale_value, scale)


def quantized_operands(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       query_bound: torch.Tensor | None = None, key_bound: torch.Tensor | None = None) -> tuple:
    """`fp8_attention_op`'s arguments for (batch, tokens, heads, head_dim) query, key and value: each quantized
    (query and key scaled by their bounds when given, else by their absolute maxima), the three descales, and the
    softmax scale 1/sqrt(head_dim)."""
    (q, descale_q), (k, descale_k), (v, descale_v) = (
        quantize_per_tensor(t, bound) for t, bound in ((query, query_bound), (key, key_bound), (value, None)))
    return q, k, v, descale_q, descale_k, descale_v, query.shape[-1] ** -0.5


def fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  query_bound: torch.Tensor | None = None, key_bound: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of (batch, tokens, heads, head_dim) tensors through fp8, returned in the query's dtype. The bounds,
    when given, must hold for every value of query and key (see `rms_norm_bound`)."""
    operands = quantized_operands(query, key, value, query_bound, key_bound)
    descale_value = operands[5]
    out = fp8_attention_op(*operands)
    return (out.float() * _output_scale(descale_value).reciprocal()).to(query.dtype)


class Fp8AttnProcessor(FluxAttnProcessor):
    """diffusers' FLUX attention processor with the attention call replaced by `fp8_attention`: the same
    projections (fused or not), norms, rotary embedding and output projections, from diffusers' own helpers."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("fp8 attention takes no attention mask (FLUX.1 uses none)")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query_norms, key_norms = [attn.norm_q], [attn.norm_k]
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                t.unflatten(-1, (-1, attn.head_dim)) for t in (encoder_query, encoder_key, encoder_value)
            )
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query_norms.append(attn.norm_added_q)
            key_norms.append(attn.norm_added_k)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = fp8_attention(query, key, value, rms_norm_bound(*query_norms), rms_norm_bound(*key_norms))
        hidden_states = hidden_states.flatten(2, 3)
        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())
