"""One training step of S model copies at once: captured, simplified, compiled once.

The vectorized engine keeps every copy's parameters as one row of a ``(S, P)``
buffer. A step is ``torch.func.vmap`` over copies of ``grad_and_value`` of the
per-copy loss, with the model plugin's own module run through
``torch.func.functional_call`` -- nothing here knows the module is an MLP.

For small models a step is pure dispatch overhead (the MLP's matmuls take a few
microseconds), so the step is captured once per shape into a graph of aten ops
(``make_fx``), simplified (no-op views, ``x * 1``, ``bmm + bias`` -> ``baddbmm``,
double transposes), and run by TorchScript's interpreter (about 2x fewer
microseconds per step than the same graph run op by op from Python). Each level
falls back to the one below when the module cannot be captured, so any module
``vmap`` can run is supported: ``script`` -> ``fx`` -> ``eager``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.func import functional_call, grad_and_value, vmap

Backend = Literal["auto", "script", "fx", "eager"]

_ATEN = torch.ops.aten
_VIEW_OPS = {_ATEN.expand.default, _ATEN.view.default, _ATEN._unsafe_view.default, _ATEN.reshape.default, _ATEN.alias.default}
_ZEROS_OPS = {_ATEN.zeros.default, _ATEN.zeros_like.default, _ATEN.new_zeros.default}


@dataclass(frozen=True)
class ParamLayout:
    """Where each named parameter of a module lives in one flat row of ``P`` numbers."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numels: tuple[int, ...]

    @classmethod
    def of(cls, module: torch.nn.Module) -> ParamLayout:
        names, shapes, offsets, numels = [], [], [], []
        offset = 0
        for name, param in module.named_parameters():
            names.append(name)
            shapes.append(tuple(param.shape))
            offsets.append(offset)
            numels.append(param.numel())
            offset += param.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), tuple(numels))

    @property
    def size(self) -> int:
        return sum(self.numels)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-parameter views ``(S, *shape)`` of a ``(S, P)`` buffer (no copies)."""
        return [
            flat[:, o : o + n].view(flat.shape[0], *shape)
            for o, n, shape in zip(self.offsets, self.numels, self.shapes, strict=True)
        ]


def weighted_nll(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_i weight_i * cross_entropy(logits_i, target_i)``.

    With ``weight = class_weight[target] / sum(class_weight[target])`` over the real rows
    of a batch (0 on padding) this is exactly ``F.cross_entropy(..., weight=class_weight)``
    with mean reduction, which is the sequential engine's loss.
    """
    logp = torch.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (weight * nll).sum()


# ---------------------------------------------------------------- the step functions


def make_train_step(module: torch.nn.Module, layout: ParamLayout) -> Callable[..., tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """``step(params, x, y, w) -> (grads, losses (S,))`` for S copies; ``grads`` per parameter ``(S, *shape)``.

    ``params`` is ``layout.views`` of the ``(S, P)`` buffer, ``x (S, B, F)``,
    ``y (S, B)``, ``w (S, B)`` the per-row loss weights (0 on padding rows). The caller
    lays the gradients out as ``(S, P)`` rows (:func:`flat_grads`) into a buffer it keeps:
    a fresh ``(S, P)`` result every step costs page faults on a new allocation (for
    thousands of copies, more than the copy itself).
    """
    mlp = make_mlp_train_step(module, layout)
    return mlp if mlp is not None else make_autograd_train_step(module, layout)


def make_autograd_train_step(module: torch.nn.Module, layout: ParamLayout) -> Callable[..., tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """The generic :func:`make_train_step`: autograd through ``vmap`` over copies, any module vmap can run."""
    names = layout.names

    def copy_loss(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = functional_call(module, dict(zip(names, params, strict=True)), (x,))
        return weighted_nll(logits, y, w)

    per_copy = vmap(grad_and_value(copy_loss))

    def step(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        grads, losses = per_copy(params, x, y, w)
        return tuple(grads), losses

    return step


def flat_grads(grads: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-parameter gradients ``(S, *shape)`` as the ``(S, P)`` rows of :class:`ParamLayout` (into ``out``)."""
    pieces = [g.reshape(g.shape[0], -1) for g in grads]
    return torch.cat(pieces, dim=1) if out is None else torch.cat(pieces, dim=1, out=out)


def make_dp_step(module: torch.nn.Module, layout: ParamLayout) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``step(params, x, y, w, clip, noise, row_scale) -> (noisy_grads (S, P), loss_sums (S,))`` (DP-SGD).

    Every row's gradient (per-sample loss ``w_i * nll_i``, ``w_i`` the row's class weight)
    is clipped to L2 norm ``clip`` (S,) with Opacus's factor ``min(1, C / (norm + 1e-6))``
    and weighed by ``row_scale`` (S, K): ``1 / B`` on real rows, 0 on padding, with ``B``
    Opacus's expected batch size. The result is ``sum_i row_scale_i * clipped_i + noise``,
    i.e. Opacus's ``(clipped_sum + N(0, (sigma C)^2)) / B`` with ``noise`` (S, P) drawn
    already divided by ``B`` by the caller, from each site's own generator. Scaling the
    per-row factors instead of the (S, P) sum saves two passes over every parameter per
    step. A step may write its result into ``noise`` (the caller refills it before each
    step and reads only the returned tensor). ``loss_sums`` is ``sum_i w_i * nll_i`` over the real rows; the caller divides by
    the number of real rows (the privacy plugin logs that mean).

    Models made only of ``nn.Linear`` layers on 2-D inputs take the ghost-norm path
    (:func:`make_ghost_dp_step`, what Opacus calls fast gradient clipping): per-sample
    gradients are never materialised; a plain MLP takes the same path written out by hand
    (:func:`make_mlp_dp_step`). Any other module gets per-sample gradients from
    ``vmap(grad)`` (Opacus's functorch fallback, generic but memory-bound).
    """
    for factory in (make_mlp_dp_step, make_ghost_dp_step):
        step = factory(module, layout)
        if step is not None:
            return step
    return make_vmap_dp_step(module, layout)


def make_vmap_dp_step(module: torch.nn.Module, layout: ParamLayout) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The generic DP step: per-sample gradients by vmap over copies of vmap over rows of grad."""
    names = layout.names

    def row_loss(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = functional_call(module, dict(zip(names, params, strict=True)), (x.unsqueeze(0),))
        return weighted_nll(logits, y.unsqueeze(0), w.unsqueeze(0))

    per_sample = vmap(vmap(grad_and_value(row_loss), in_dims=(None, 0, 0, 0)))

    def step(
        params: list[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        clip: torch.Tensor,
        noise: torch.Tensor,
        row_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        grads, row_losses = per_sample(params, x, y, w)
        flat = torch.cat([g.reshape(g.shape[0], g.shape[1], -1) for g in grads], dim=2)  # (S, K, P)
        return clip_and_sum(flat, clip, row_scale) + noise, row_losses.sum(dim=1)

    return step


def _ghost_layers(module: torch.nn.Module, layout: ParamLayout) -> list[tuple[torch.nn.Linear, int, int | None]] | None:
    """``(layer, weight index, bias index)`` in ``layout`` per Linear layer, when those are
    all the trainable parameters there are; else None."""
    index = {name: i for i, name in enumerate(layout.names)}
    layers: list[tuple[torch.nn.Linear, int, int | None]] = []
    covered: set[str] = set()
    for prefix, sub in module.named_modules():
        own = [n for n, _ in sub.named_parameters(recurse=False)]
        if not own:
            continue
        if type(sub) is not torch.nn.Linear:
            return None
        dotted = f"{prefix}." if prefix else ""
        weight = index[dotted + "weight"]
        bias = index.get(dotted + "bias") if sub.bias is not None else None
        layers.append((sub, weight, bias))
        covered.update(dotted + n for n in own)
    return layers if covered == set(layout.names) and layers else None


def make_ghost_dp_step(module: torch.nn.Module, layout: ParamLayout) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """DP step for all-Linear models without per-sample gradients (None for other models).

    For ``z = a W^T + b`` the row-i gradient of W is ``delta_i a_i^T``, so its norm is
    ``||delta_i|| * ||a_i||`` and the clipped sum is ``(c * delta)^T a`` -- one matmul.
    ``delta`` (the gradient at each layer's output) comes from ``grad`` with respect to a
    zero probe added to that output; one backward pass for all rows.
    """
    layers = _ghost_layers(module, layout)
    if layers is None:
        return None
    names = layout.names
    slot = {id(layer): i for i, (layer, _, _) in enumerate(layers)}

    def copy_loss(
        probes: list[torch.Tensor], params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, list[torch.Tensor]]]:
        inputs: list[torch.Tensor | None] = [None] * len(layers)

        def hook(layer: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            i = slot[id(layer)]
            if inputs[i] is not None or args[0].dim() != 2:
                raise NotImplementedError("ghost clipping needs each Linear used once, on 2-D input")
            inputs[i] = args[0]
            return output + probes[i]

        handles = [layer.register_forward_hook(hook) for layer, _, _ in layers]
        try:
            logits = functional_call(module, dict(zip(names, params, strict=True)), (x,))
        finally:
            for handle in handles:
                handle.remove()
        if any(a is None for a in inputs):
            raise NotImplementedError("a Linear layer was not used")
        loss = weighted_nll(logits, y, w)
        return loss, (loss, inputs)  # type: ignore[return-value]

    deltas_of = grad_and_value(copy_loss, has_aux=True)

    # Layers with a bias add ||delta_i||^2 to the row's squared gradient norm.
    bias_term = [0.0 if bias is None else 1.0 for _, _, bias in layers]

    def copy_step(
        params: list[torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
        w: torch.Tensor,
        clip: torch.Tensor,
        noise: torch.Tensor,
        row_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.shape[0]
        probes = [torch.zeros(rows, layer.out_features, dtype=x.dtype, device=x.device) for layer, _, _ in layers]
        deltas, (_, (loss, inputs)) = deltas_of(probes, params, x, y, w)
        # ||g_i||^2 = sum over layers of ||delta_i||^2 (||a_i||^2 + [bias]).
        delta_norms = torch.stack([torch.linalg.vector_norm(d, dim=1) for d in deltas], dim=1)
        input_norms = torch.stack([torch.linalg.vector_norm(a, dim=1) for a in inputs], dim=1)
        bias = torch.tensor(bias_term, dtype=x.dtype, device=x.device)
        norms2 = (delta_norms.square() * (input_norms.square() + bias)).sum(dim=1)
        factor = (clip / (norms2.sqrt() + 1e-6)).clamp(max=1.0) * row_scale
        pieces: list[torch.Tensor | None] = [None] * len(names)
        for (_, weight, bias_index), delta, a in zip(layers, deltas, inputs, strict=True):
            scaled = delta * factor.unsqueeze(1)
            pieces[weight] = scaled.t().mm(a).reshape(-1)
            if bias_index is not None:
                pieces[bias_index] = scaled.sum(dim=0)
        return torch.cat(pieces) + noise, loss  # type: ignore[arg-type]

    return vmap(copy_step)


# ------------------------------------------------ plain MLPs: the step written out


@dataclass(frozen=True)
class _Dense:
    """One ``nn.Linear`` of a plain MLP: its parameters' indexes in the layout and the activation after it."""

    weight: int
    bias: int
    activation: type[torch.nn.Module] | None


_ACTIVATIONS = (torch.nn.ReLU, torch.nn.Tanh)


def mlp_layers(module: torch.nn.Module, layout: ParamLayout) -> list[_Dense] | None:
    """The layers of a plain MLP -- an ``nn.Sequential`` of ``nn.Linear`` layers with biases,
    each but the last followed by one ``ReLU`` or ``Tanh`` -- whose parameters are all of
    ``layout``'s; None for any other module."""
    if type(module) is not torch.nn.Sequential:
        return None
    index = {name: i for i, name in enumerate(layout.names)}
    layers: list[_Dense] = []
    for name, sub in module.named_children():
        if type(sub) is torch.nn.Linear and sub.bias is not None and (not layers or layers[-1].activation is not None):
            layers.append(_Dense(index[f"{name}.weight"], index[f"{name}.bias"], None))
        elif type(sub) in _ACTIVATIONS and layers and layers[-1].activation is None:
            layers[-1] = _Dense(layers[-1].weight, layers[-1].bias, type(sub))
        else:
            return None
    if not layers or layers[-1].activation is not None or len(layout.names) != 2 * len(layers):
        return None
    return layers


def _mlp_forward(layers: Sequence[_Dense], params: Sequence[torch.Tensor], x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each layer's input ``(S, B, in)`` and the logits ``(S, B, C)`` of S copies (``nn.Linear`` is ``addmm``)."""
    inputs: list[torch.Tensor] = []
    a = x
    for layer in layers:
        inputs.append(a)
        z = torch.baddbmm(params[layer.bias].unsqueeze(1), a, params[layer.weight].transpose(1, 2))
        a = z if layer.activation is None else torch.relu(z) if layer.activation is torch.nn.ReLU else torch.tanh(z)
    return inputs, a


def _activation_backward(grad: torch.Tensor, out: torch.Tensor, activation: type[torch.nn.Module] | None) -> torch.Tensor:
    """The gradient at an activation's input from the one at its output ``out`` (what autograd computes)."""
    if activation is torch.nn.ReLU:
        return torch.ops.aten.threshold_backward(grad, out, 0)
    return torch.ops.aten.tanh_backward(grad, out)


def _nll_and_delta(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`weighted_nll` per copy ``(S,)`` and its gradient at every row's logits,
    ``w_i (softmax(z_i) - onehot(y_i))`` ``(S, B, C)``."""
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.zeros_like(logp).scatter_(-1, y.unsqueeze(-1), w.unsqueeze(-1))  # w_i at class y_i
    losses = -(target * logp).sum(dim=(1, 2))
    return losses, torch.exp(logp) * w.unsqueeze(-1) - target


def _mlp_deltas(layers: Sequence[_Dense], params: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], delta: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's output gradient ``(S, B, out)``, back from the logits' ``delta``."""
    deltas = [delta] * len(layers)
    for i in range(len(layers) - 1, 0, -1):
        delta = _activation_backward(torch.bmm(delta, params[layers[i].weight]), inputs[i], layers[i - 1].activation)
        deltas[i - 1] = delta
    return deltas


def make_mlp_train_step(module: torch.nn.Module, layout: ParamLayout) -> Callable[..., tuple[tuple[torch.Tensor, ...], torch.Tensor]] | None:
    """:func:`make_train_step` for a plain MLP (:func:`mlp_layers`; None otherwise), the backward pass written out.

    The same arithmetic as autograd through ``vmap``, in about half the operations (no
    batching-rule views, bias copies or the loss's gather/scatter round trip): for a small
    MLP a step's time is mostly per-operation overhead.
    """
    layers = mlp_layers(module, layout)
    if layers is None:
        return None

    def step(params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        inputs, logits = _mlp_forward(layers, params, x)
        losses, delta = _nll_and_delta(logits, y, w)
        grads: list[torch.Tensor] = list(params)
        for layer, a, d in zip(layers, inputs, _mlp_deltas(layers, params, inputs, delta), strict=True):
            grads[layer.weight] = torch.bmm(d.transpose(1, 2), a)
            grads[layer.bias] = d.sum(dim=1)
        return tuple(grads), losses

    return step


def make_mlp_dp_step(module: torch.nn.Module, layout: ParamLayout) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """:func:`make_ghost_dp_step` for a plain MLP (:func:`mlp_layers`; None otherwise), written out over the S copies.

    Row i's squared gradient norm is ``sum over layers of ||delta_i||^2 (||a_i||^2 + 1)``
    (weight and bias); the clipped, ``row_scale``-weighted sum of a layer's weight
    gradients is ``(factor * delta)^T a``, added into ``noise`` in place (the result is
    that buffer).
    """
    layers = mlp_layers(module, layout)
    if layers is None:
        return None

    def step(  # the signature of make_dp_step's steps
        params: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
        clip: torch.Tensor, noise: torch.Tensor, row_scale: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        inputs, logits = _mlp_forward(layers, params, x)
        losses, delta = _nll_and_delta(logits, y, w)
        deltas = _mlp_deltas(layers, params, inputs, delta)
        norms2 = torch.linalg.vecdot(deltas[0], deltas[0]) * (torch.linalg.vecdot(x, x) + 1.0)
        for d, a in zip(deltas[1:], inputs[1:], strict=True):
            norms2 = norms2 + torch.linalg.vecdot(d, d) * (torch.linalg.vecdot(a, a) + 1.0)
        factor = ((clip.unsqueeze(1) / (norms2.sqrt() + 1e-6)).clamp(max=1.0) * row_scale).unsqueeze(-1)
        # Each layer's clipped sum goes straight into the noise buffer (one pass over it,
        # where concatenating the layers and adding the noise took three new (S, P) tensors).
        out = layout.views(noise)
        for layer, a, d in zip(layers, inputs, deltas, strict=True):
            scaled = d * factor
            out[layer.weight].baddbmm_(scaled.transpose(1, 2), a)
            out[layer.bias].add_(scaled.sum(dim=1))
        return noise, losses

    return step


def clip_and_sum(per_sample: torch.Tensor, max_norm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum_i mask_i * g_i * min(1, C / (||g_i|| + 1e-6))`` for ``per_sample (S, K, P)``, ``C (S,)``.

    The clip factor is Opacus's (``opacus.optimizers.optimizer``), per copy; ``mask (S, K)``
    weighs each row (0 on padding; ``1 / B`` on real rows carries the division by the batch size).
    """
    norms = per_sample.norm(dim=2)
    factor = (max_norm.unsqueeze(1) / (norms + 1e-6)).clamp(max=1.0) * mask
    return torch.einsum("sk,skp->sp", factor, per_sample)


# ------------------------------------------------------------------- capture passes


def _layout_equal(a: Any, b: Any) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
    )


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def simplify_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove what vmap's batching rules leave behind; every rewrite keeps values equal
    (dropping ``t + zeros`` keeps a ``-0.0`` the add would make ``0.0``) except
    ``bmm + b -> baddbmm``, which is what ``nn.Linear`` itself computes (``addmm``)."""
    graph = gm.graph
    changed = True
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node.op != "call_function" or not node.users and node.target not in _VIEW_OPS:
                continue
            out = _val(node)
            source = node.args[0] if node.args else None
            identity = False
            if node.target in _VIEW_OPS:
                identity = _layout_equal(_val(source), out)
            elif node.target in (_ATEN.mul.Scalar, _ATEN.mul.Tensor) and not isinstance(node.args[1], torch.fx.Node):
                identity = node.args[1] == 1 and _layout_equal(_val(source), out)
            elif node.target is _ATEN.add.Tensor and len(node.args) == 2 and not node.kwargs:
                # ``t + zeros``: the ghost-clipping probes, there only for their gradients
                # (about 4 % of a DP step for 30 copies).
                zero, kept = node.args[1], node.args[0]
                if not (isinstance(zero, torch.fx.Node) and zero.target in _ZEROS_OPS):
                    zero, kept = kept, zero
                if isinstance(zero, torch.fx.Node) and zero.target in _ZEROS_OPS and _layout_equal(_val(kept), out):
                    source, identity = kept, True
            elif node.target is _ATEN.transpose.int and isinstance(source, torch.fx.Node):
                inner = source
                identity = (
                    inner.target is _ATEN.transpose.int
                    and sorted(node.args[1:3]) == sorted(inner.args[1:3])
                    and _layout_equal(_val(inner.args[0]), out)
                )
                if identity:
                    node.replace_all_uses_with(inner.args[0])
                    graph.erase_node(node)
                    changed = True
                    continue
            if identity:
                node.replace_all_uses_with(source)
                graph.erase_node(node)
                changed = True
                continue
            if node.target is _ATEN.add.Tensor and len(node.args) == 2 and not node.kwargs:
                changed = _fuse_baddbmm(graph, node, out) or changed
        graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm


def _fuse_baddbmm(graph: torch.fx.Graph, node: torch.fx.Node, out: Any) -> bool:
    a, b = node.args
    for bias, product in ((a, b), (b, a)):
        if (
            isinstance(product, torch.fx.Node)
            and isinstance(bias, torch.fx.Node)
            and product.target is _ATEN.bmm.default
            and len(product.users) == 1
            and isinstance(out, torch.Tensor)
            and _val(bias) is not None
            and _val(bias).dtype == out.dtype
            and _val(product).shape == out.shape
        ):
            with graph.inserting_before(node):
                fused = graph.call_function(_ATEN.baddbmm.default, (bias, *product.args))
            fused.meta["val"] = out
            node.replace_all_uses_with(fused)
            graph.erase_node(node)
            graph.erase_node(product)
            return True
    return False


def _copies(args: Sequence[Any]) -> list[Any]:
    """``args`` with every tensor (also inside lists) replaced by a copy of the same strides."""
    return torch.utils._pytree.tree_map(lambda a: _strided_copy(a) if isinstance(a, torch.Tensor) else a, list(args))


def _strided_copy(t: torch.Tensor) -> torch.Tensor:
    # A parameter view of an (S, P) buffer keeps its row stride (the traced graph then sees
    # the layouts the real calls will have) in a buffer of its own extent, not a copy of the
    # whole (S, P) base (for 1,000 copies: 62 MB per parameter and call).
    if 0 in t.stride():
        return t.clone()
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


def _outputs_close(a: Any, b: Any) -> bool:
    flat_a = [t for t in torch.utils._pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    flat_b = [t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    return len(flat_a) == len(flat_b) and all(
        x.shape == y.shape and torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(flat_a, flat_b, strict=True)
    )


class CompiledStep:
    """A step function specialised per input shape, at the fastest backend that works.

    :param fn: the eager step (``make_train_step`` / ``make_dp_step``).
    :param backend: ``auto`` (script, else fx, else eager) or one level forced.
    :param writes_args: ``fn`` may write into an argument (the DP steps' noise buffer), so every
        call made while compiling gets its own copy of the arguments; False saves those copies
        (for 1,000 copies, tens of MB at the peak).
    """

    def __init__(self, fn: Callable[..., Any], backend: Backend = "auto", writes_args: bool = True) -> None:
        self.fn = fn
        self.backend = backend
        self._fresh: Callable[[Sequence[Any]], list[Any]] = _copies if writes_args else list
        self._cache: dict[tuple[Any, ...], tuple[str, Callable[..., Any]]] = {}

    @staticmethod
    def _key(args: Sequence[Any]) -> tuple[Any, ...]:
        # List arguments (the parameter views) keep their shapes for the life of a step.
        return tuple((tuple(a.shape), a.dtype, a.device.type) for a in args if isinstance(a, torch.Tensor))

    def level(self, *args: Any) -> str:
        """The backend this shape runs at (compiling it if needed)."""
        return self._compiled(args)[0]

    def __call__(self, *args: Any) -> Any:
        return self._compiled(args)[1](*args)

    def resolve(self, *args: Any) -> Callable[..., Any]:
        """The compiled function for these arguments' shapes: a loop that calls one shape
        many times skips the per-call shape lookup (~10 us a step for a few copies)."""
        return self._compiled(args)[1]

    def _compiled(self, args: Sequence[Any]) -> tuple[str, Callable[..., Any]]:
        key = self._key(args)
        if key not in self._cache:
            self._cache[key] = self._reused(key, args) or self._compile(args)
        return self._cache[key]

    def _reused(self, key: tuple[Any, ...], args: Sequence[Any]) -> tuple[str, Callable[..., Any]] | None:
        """The graph last compiled for other sizes of the same ranks, when it computes these
        arguments as the eager step does; else None.

        A graph holds no sizes unless the step's operations do (autograd through vmap leaves
        views and zeros of fixed sizes; the written-out MLP steps leave none but the number
        of copies), so one graph can serve every batch width a DP run's Poisson batches
        take: one eager call checks it, where compiling a width anew takes ~0.1 s.
        """
        ranks = [(len(shape), *rest) for shape, *rest in key]
        for other, (level, fn) in reversed(self._cache.items()):
            if level == "eager" or [(len(shape), *rest) for shape, *rest in other] != ranks:
                continue
            try:
                same = _outputs_close(fn(*self._fresh(args)), self.fn(*self._fresh(args)))
            except Exception:  # noqa: BLE001 - sizes baked into the graph: compile this shape
                same = False
            return (level, fn) if same else None
        return None

    def _compile(self, args: Sequence[Any]) -> tuple[str, Callable[..., Any]]:
        if self.backend == "eager":
            return "eager", self.fn
        from torch.fx.experimental.proxy_tensor import make_fx

        # Every call made while compiling gets fresh arguments when the step writes into one.
        reference = self.fn(*self._fresh(args))
        try:
            gm = simplify_graph(make_fx(self.fn)(*self._fresh(args)))
            if not _outputs_close(gm(*self._fresh(args)), reference):
                raise RuntimeError("captured graph disagrees with eager")
        except Exception:  # noqa: BLE001 - any capture failure means: run eagerly
            if self.backend in ("script", "fx"):
                raise
            return "eager", self.fn
        if self.backend == "fx" or args[1].device.type != "cpu":
            return "fx", gm
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated upstream, yet its interpreter is still the
                # cheapest way to run a fixed small graph on CPU; "fx" is the fallback.
                warnings.simplefilter("ignore")
                scripted = torch.jit.trace(gm, tuple(self._fresh(args)), check_trace=False, strict=False)
            if not _outputs_close(scripted(*self._fresh(args)), reference):
                raise RuntimeError("scripted graph disagrees with eager")
        except Exception:  # noqa: BLE001
            if self.backend == "script":
                raise
            return "fx", gm
        # Calling forward directly skips nn.Module's hook machinery (runs once per step).
        return "script", scripted.forward



_SHARED: dict[tuple[Any, ...], CompiledStep] = {}


def shared_step(kind: Literal["train", "dp"], module: torch.nn.Module, layout: ParamLayout, backend: Backend) -> CompiledStep:
    """The process-wide compiled step for modules of this class, structure and layout.

    The module contributes only its code (parameters come from the stacked rows), so every
    run of a worker process -- each repeat, each round -- reuses the graphs compiled once.
    """
    dtype = next(module.parameters()).dtype
    device = next(module.parameters()).device
    key = (kind, type(module), repr(module), layout, dtype, device.type, backend)
    if key not in _SHARED:
        factory = make_train_step if kind == "train" else make_dp_step
        _SHARED[key] = CompiledStep(factory(module, layout), backend, writes_args=kind == "dp")
    return _SHARED[key]
