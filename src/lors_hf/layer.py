"""The LORS layer: ``y = x (W_shared + B_i A_i)^T + b_i``.

`SharedWeight` owns the one weight a stack shares for one projection; it is registered exactly once
in the model (so the state dict, DDP and ``num_parameters()`` see it once). Each layer's
`LorsLinear` reaches it through a plain, non-registered reference to that *module* (not to the
Parameter, which ``from_pretrained`` replaces when it loads weights).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

_optimizer_steps = 0
"""Optimizer steps taken since `set_weight_cache` first turned a cache on (part of each cached weight's key)."""
_optimizer_hook = None


def _count_optimizer_step(*_: object) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _written_into(tensor: torch.Tensor, version: int | None) -> bool:
    """Whether `tensor` changed in place since its version counter read `version` (None: it has none)."""
    return version is not None and tensor._version != version


class SharedWeight(nn.Module):
    """The ``(out_features, in_features)`` weight shared by every layer of one projection group."""

    def __init__(self, out_features: int, in_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"out_features={self.weight.shape[0]}, in_features={self.weight.shape[1]}"


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype when it is on for `device_type`, else None (also for devices without autocast, such as
    meta, where ``torch.is_autocast_enabled`` raises)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_off(device_type: str):
    """A context with autocast off for `device_type` where it is on (else, meta included, one that does nothing):
    for results in the parameters' dtype inside a caller's autocast block."""
    return torch.autocast(device_type, enabled=False) if _autocast_dtype(device_type) is not None else nullcontext()


class _MaterializedLorsLinear(torch.autograd.Function):
    """``x (S + B A)^T + b`` through one materialised weight that is *not* kept for backward.

    Plain autograd would save each layer's ``(out, in)`` weight ``S + B A`` until backward, as much
    memory as the dense model's weights again; here backward rebuilds it (``out*in*r`` flops, small
    next to the ``tokens*out*in`` of the matmuls), so training keeps only the compact parameters.
    Without grad (inference) it is the plain materialised matmul. ``forward`` / ``setup_context`` are
    separate and ``generate_vmap_rule`` is set (and `_MaterializedLorsLinearWithJvp` adds forward mode), so
    that ``torch.func`` (``grad``, per-sample gradients with ``vmap``, ``jvp``, ``jacrev``) works as for a dense
    model: without them every transform failed on this path only (many tokens), not on the factored one.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, shared, lors_A, lors_B, bias):
        autocast_dtype = _autocast_dtype(x.device.type)  # the dtype F.linear would compute in here
        dtype, autocast = autocast_dtype or shared.dtype, autocast_dtype is not None
        with torch.autocast(x.device.type, enabled=False) if autocast else nullcontext():
            weight = torch.addmm(shared.to(dtype), lors_B.to(dtype), lors_A.to(dtype))
            # only autocast casts the input: without it an input of another dtype fails as for nn.Linear
            return F.linear(x.to(dtype) if autocast else x, weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, shared, lors_A, lors_B, bias = inputs
        ctx.save_for_backward(x, shared, lors_A, lors_B)
        ctx.dtype, ctx.bias_dtype = output.dtype, None if bias is None else bias.dtype  # output: compute dtype

    @staticmethod
    def backward(ctx, grad_output):  # plain torch ops: with create_graph=True they build a graph (double backward)
        x, shared, lors_A, lors_B = ctx.saved_tensors
        dtype = ctx.dtype
        needs_x, needs_shared, needs_A, needs_B, needs_bias = ctx.needs_input_grad
        grad_output = grad_output.to(dtype)
        grad_x = grad_shared = grad_A = grad_B = grad_bias = None
        a, b = lors_A.to(dtype), lors_B.to(dtype)
        if needs_x:
            weight = torch.addmm(shared.to(dtype), b, a)
            grad_x = (grad_output @ weight).to(x.dtype)
            del weight
        if needs_shared or needs_A or needs_B:
            flat_grad = grad_output.reshape(-1, grad_output.shape[-1])
            grad_weight = flat_grad.mT @ x.to(dtype).reshape(-1, x.shape[-1])  # (out, in)
            if needs_A:
                grad_A = (b.mT @ grad_weight).to(lors_A.dtype)
            if needs_B:
                grad_B = (grad_weight @ a.mT).to(lors_B.dtype)
            if needs_shared:
                grad_shared = grad_weight.to(shared.dtype)
        if needs_bias and ctx.bias_dtype is not None:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_shared, grad_A, grad_B, grad_bias


class _MaterializedLorsLinearWithJvp(_MaterializedLorsLinear):
    """`_MaterializedLorsLinear` with forward-mode derivatives (``torch.func.jvp``, ``jacfwd``,
    ``torch.autograd.forward_ad``), for eager mode: torch.compile cannot trace an autograd.Function
    that defines ``jvp`` (a graph break), so compiled code runs the parent class."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _MaterializedLorsLinear.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    @staticmethod
    def jvp(ctx, x_t, shared_t, A_t, B_t, bias_t):
        """``dx W^T + x (dS + dB A + B dA)^T + db`` with ``W = S + B A``, in the forward pass's dtype."""
        x, shared, lors_A, lors_B = ctx.saved_tensors
        dtype = ctx.dtype
        a, b = lors_A.to(dtype), lors_B.to(dtype)
        weight_t = None if shared_t is None else shared_t.to(dtype)
        if B_t is not None:
            weight_t = B_t.to(dtype) @ a if weight_t is None else torch.addmm(weight_t, B_t.to(dtype), a)
        if A_t is not None:
            weight_t = b @ A_t.to(dtype) if weight_t is None else torch.addmm(weight_t, b, A_t.to(dtype))
        out_t = None
        if x_t is not None:
            out_t = F.linear(x_t.to(dtype), torch.addmm(shared.to(dtype), b, a))
        if weight_t is not None:
            term = F.linear(x.to(dtype), weight_t)
            out_t = term if out_t is None else out_t + term
        if bias_t is not None:
            out_t = bias_t.to(dtype).expand(*x.shape[:-1], -1) if out_t is None else out_t + bias_t.to(dtype)
        if out_t is None:
            out_t = torch.zeros(*x.shape[:-1], shared.shape[0], dtype=dtype, device=x.device)
        return out_t


class LorsLinear(nn.Module):
    """A linear layer whose weight is a shared weight plus a private rank-``r`` residual ``B @ A``.

    Computes ``y = x @ (W_shared + lors_B @ lors_A)^T + bias``. For many tokens it materialises the
    weight once and calls one ``F.linear`` (in training without keeping that weight for backward,
    which rebuilds it); for few tokens (decoding) it computes
    ``x W_shared^T + (x A^T) B^T`` and never builds the ``out x in`` matrix. Both give the same result.

    Args:
        shared: the `SharedWeight` module of the group (kept as a plain reference).
        rank: private rank ``r`` (0 = the layer is exactly the shared weight plus its bias).
        bias: whether the layer has its private bias.
        fan_in_fan_out: the layer replaced a GPT-2 ``Conv1D`` (weight stored ``(in, out)``);
            only `weight` and `merge` honour it, the maths is the same.

    Example:
        >>> shared = SharedWeight(8, 4)
        >>> layer = LorsLinear(shared, rank=2, bias=True)
        >>> layer(torch.randn(3, 4)).shape
        torch.Size([3, 8])
    """

    def __init__(
        self, shared: SharedWeight, rank: int, bias: bool = True, fan_in_fan_out: bool = False, device=None, dtype=None
    ) -> None:
        super().__init__()
        out_features, in_features = shared.weight.shape
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.fan_in_fan_out = fan_in_fan_out
        factory = {"device": device if device is not None else shared.weight.device,
                   "dtype": dtype if dtype is not None else shared.weight.dtype}
        self.lors_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lors_B = nn.Parameter(torch.empty(out_features, rank, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        # Plain attribute, not a submodule: the shared weight is owned (and saved) elsewhere.
        self.__dict__["shared"] = shared
        # Token count above which materialising W_shared + B A (out*in*(r+1) flops once) is cheaper than
        # the factored path (tokens*r*(in+out) extra flops).
        self.materialize_above = math.inf if rank == 0 else out_features * in_features * (rank + 1) / (
            rank * (in_features + out_features)
        )
        # Opt-in inference cache of W_shared + B A (see `set_weight_cache`): dense speed, dense memory.
        self.cache_weight = False
        self._cached: tuple[tuple, torch.Tensor, int | None] | None = None

    def reset_private(self) -> None:
        """The paper's initialisation of the private part: A Kaiming-uniform, B zeros, bias zeros."""
        if self.rank > 0:  # kaiming_uniform_ warns on the empty (0, in) tensor of rank 0
            nn.init.kaiming_uniform_(self.lors_A, a=math.sqrt(5))
        nn.init.zeros_(self.lors_B)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def delta_weight(self) -> torch.Tensor:
        """The private residual ``B @ A`` as an ``(out, in)`` matrix."""
        return self.lors_B @ self.lors_A

    def effective_weight(self) -> torch.Tensor:
        """``W_shared + B @ A`` in the ``(out, in)`` convention of ``nn.Linear``, in the parameters' dtype even under
        autocast (as an ``nn.Linear``'s weight): built in autocast's bf16, `merge_and_unload` inside an autocast
        block wrote bf16 layers into a float32 model, whose next forward pass failed on the mixed dtypes."""
        shared = self.shared.weight
        if self.rank == 0:
            return shared
        with autocast_off(shared.device.type):
            return torch.addmm(shared, self.lors_B, self.lors_A)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight, stored like the module it replaced (``(in, out)`` for ``Conv1D``).

        For code that inspects ``module.weight`` (dtype checks and the like); it is computed on access, and is
        never a parameter: an in-place write to it (a model's ``_init_weights``, e.g. GPT-2's re-initialisation
        of ``c_proj.weight`` when ``from_pretrained`` finishes) must not reach the shared weight, which at rank 0
        would otherwise be the very tensor returned. With the weight cache on (`set_weight_cache`) and no
        gradients, it is the cached weight (T5's feed-forward reads ``wo.weight`` twice per call: building it
        each time made decoding several times slower); a write into it makes the cache rebuild.
        """
        if self.rank > 0 and self._use_cache():
            cached = self._cached_weight()
            if cached is not None and not cached.is_inference():  # an inference tensor's writes go unseen
                return cached
        weight = self.effective_weight()
        if self.rank == 0:
            weight = weight.clone()
        return weight.t() if self.fan_in_fan_out else weight

    def _use_cache(self) -> bool:
        """Whether this call may use the weight cache: it is on, no gradients, and not inside torch.compile (the
        cache's bookkeeping, version counters and data pointers, cannot be traced: ``fullgraph=True`` failed on
        ``tensor.is_inference()`` and a plain compile broke the graph in every layer and hit the recompile limit;
        compiled code computes the weight itself, which the compiler can fuse)."""
        return self.cache_weight and not torch.is_grad_enabled() and not torch.compiler.is_compiling()

    def _cached_weight(self) -> torch.Tensor | None:
        """The cached effective weight, stored as the replaced module stored its own (``(in, out)`` for ``Conv1D``).

        Which layout multiplies one token (a decode step) faster depends on the CPU and the shape, both ways; in
        ``nn.Linear``'s layout GPT-2's cached decode was slower than dense on the CPU (bench_speed). In the
        module's own layout the cached model runs the dense model's very kernels."""
        # read once: each parameter read goes through nn.Module.__getattr__ (~0.7 us), and this runs per call
        shared, lors_a, lors_b = self.shared.weight, self.lors_A, self.lors_B
        if shared.is_inference() or lors_a.is_inference() or lors_b.is_inference():
            # Parameters created under torch.inference_mode() have no version counter, so an in-place
            # change could not be seen: no cache for them (the uncached paths give the same result).
            return None
        # Fused optimizers (torch's AdamW(fused=True), the Trainer's default "adamw_torch_fused") update the
        # weights without bumping their version counters: any optimizer step invalidates the cache too.
        key = (shared.data_ptr(), shared._version, lors_a.data_ptr(), lors_a._version, lors_b.data_ptr(), lors_b._version,
               shared.dtype, _optimizer_steps)
        if self._cached is None or self._cached[0] != key or _written_into(*self._cached[1:]):
            # effective_weight is in the parameters' dtype even under autocast (which then casts it per call, as
            # for a dense weight): a bf16 copy built under autocast would break a later float32 forward pass
            weight = self.effective_weight()
            if self.fan_in_fan_out:
                weight = weight.t().contiguous()
            self._cached = (key, weight, None if weight.is_inference() else weight._version)
        return self._cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared.weight
        if shared.device != self.lors_A.device:
            raise RuntimeError(
                f"LorsLinear: the shared weight is on {shared.device} but this layer's private parameters are on "
                f"{self.lors_A.device}. The layers of a stack read one shared weight, so the whole stack must sit on "
                "one device: nn.DataParallel replicas (use DistributedDataParallel, e.g. `torchrun`, instead), a "
                "device_map that splits a stack or offloads it (to disk: the shared weight then stays on meta), or "
                "moving single layers with `.to()` break that; load with one device (device_map='cpu') and move "
                "the whole model with `model.to(device)`."
            )
        if self.rank == 0:
            return F.linear(x, shared, self.bias)
        if self._use_cache() and (cached := self._cached_weight()) is not None:
            if not self.fan_in_fan_out:
                return F.linear(x, cached, self.bias)
            flat = x.reshape(-1, self.in_features)  # Conv1D's own product on its (in, out) layout
            output = flat @ cached if self.bias is None else torch.addmm(self.bias, flat, cached)
            return output.view(*x.shape[:-1], self.out_features)
        if (autocast_dtype := _autocast_dtype(x.device.type)) is not None:
            # cast here, once, as autocast does for F.linear, so that backward keeps one input in the compute dtype:
            # cast inside the materialised function, a float32 input (a LayerNorm's output) was kept at twice the
            # bytes; on the factored path autocast cast it for each of its two matmuls, and both copies were kept
            x = x.to(autocast_dtype)
        tokens = x.numel() // self.in_features
        if tokens > self.materialize_above:
            function = _MaterializedLorsLinear if torch.compiler.is_compiling() else _MaterializedLorsLinearWithJvp
            return function.apply(x, shared, self.lors_A, self.lors_B, self.bias)
        # x S^T + b, then (x A^T) B^T added in the same matmul call (addmm): three kernels, no extra add.
        flat = x.reshape(-1, self.in_features)
        output = torch.addmm(F.linear(flat, shared, self.bias), F.linear(flat, self.lors_A), self.lors_B.mT)
        return output.view(*x.shape[:-1], self.out_features)

    def __getstate__(self) -> dict:
        """Without the cached weight: ``torch.save(model)`` and ``copy.deepcopy`` copied each layer's dense
        ``out x in`` cache (which their copy, with other weights, rebuilds anyway) along with the compact weights."""
        state = super().__getstate__()
        state["_cached"] = None
        return state

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}" + (", fan_in_fan_out=True" if self.fan_in_fan_out else ""))


def set_weight_cache(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Cache each layer's ``W_shared + B A`` for inference (no-grad forward passes), or stop caching.

    Decoding then runs exactly the dense model's matmuls (one per projection) at the price of the dense
    model's weight memory; the cache is rebuilt automatically when a weight changes (any ``torch.optim``
    optimizer step, fused ones included, ``.to()``, ``load_state_dict``) and is never used while gradients
    are enabled or inside ``torch.compile`` (compiled code does not use it). A change made through
    ``param.data`` (some EMA helpers) bypasses the version counter the cache watches: call
    ``set_weight_cache(model)`` again after one, which drops every cached weight. Off by default: LORS layers
    then keep only the compact weights.

    Example:
        >>> # set_weight_cache(model); model.generate(...); set_weight_cache(model, False)
    """
    global _optimizer_hook
    if enabled and _optimizer_hook is None:
        _optimizer_hook = register_optimizer_step_post_hook(_count_optimizer_step)
    for module in model.modules():
        if isinstance(module, LorsLinear):
            module.cache_weight = enabled
            module._cached = None
    return model
