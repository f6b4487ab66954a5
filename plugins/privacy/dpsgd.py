"""DP-SGD of one site, as the sequential trainer runs it: Poisson batches, per-sample
gradients, clipping and noise.

The step itself is the :class:`fedcore.components.DPStep` a record-level stage
declares; these functions are its sequential implementation (the vectorized engine
runs the same step with its stacked kernels, :mod:`fedcore.engine.vectorized_step`).
Each does the arithmetic of Opacus's ``DPOptimizer``: clip every per-sample gradient
to ``max_grad_norm`` (over all parameters together), sum, add ``N(0, (noise_multiplier * max_grad_norm)^2)`` per
coordinate, divide by the *expected* batch size ``sample_rate * n``. The noise comes
from a :class:`fedcore.noise.GaussianNoise` stream (AES-128-CTR bits) under the round's
key, and the batches from the round's sampling generator, both derived from the step's
secret (:meth:`DPStep.noise_key`, :meth:`DPStep.sampling_generator`) as the vectorized
engine derives them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch.func import functional_call, grad_and_value, vmap

from fedcore.components import DPStep
from fedcore.noise import GaussianNoise
from fedcore.sampling import poisson_batches as draw_poisson_batches

LossFn = Callable[..., torch.Tensor]


#: the calibrated step a record-level stage declares (:meth:`LocalTrainingStage.dp_step`)
DPSGDParameters = DPStep


def poisson_schedule(n_train: int, batch_size: int) -> tuple[float, int]:
    """Sampling rate and steps per epoch for an expected batch of ``batch_size`` rows.

    As Opacus's ``DPDataLoader``: q = batch_size / n and one epoch is about 1 / q steps
    (rounded up, like the non-private loop's number of batches).
    """
    sample_rate = min(1.0, batch_size / n_train)
    return sample_rate, max(1, math.ceil(n_train / batch_size))


def poisson_batches(
    x: torch.Tensor, y: torch.Tensor, sample_rate: float, steps: int, generator: torch.Generator
) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """A sampler whose every batch holds each row independently with probability ``sample_rate``.

    This is the sampling the accountant's subsampled-Gaussian analysis assumes; batch sizes
    vary (and may be 0). Each epoch draws its ``steps`` batches at once from ``generator``
    with :func:`fedcore.sampling.poisson_batches`, as the vectorized engine does.
    """

    def epoch(_: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in draw_poisson_batches(len(y), sample_rate, steps, generator):
            chosen = batch[batch >= 0]
            yield x[chosen], y[chosen]

    return epoch


#: modules a :func:`linear_chain` may contain besides ``Linear``: elementwise, parameter-free
_ELEMENTWISE = (torch.nn.ReLU, torch.nn.Tanh, torch.nn.GELU, torch.nn.Sigmoid, torch.nn.LeakyReLU, torch.nn.Identity)


def linear_chain(module: torch.nn.Module) -> list[torch.nn.Module] | None:
    """The layers of ``module`` if it is a ``Sequential`` of ``Linear`` and elementwise layers, else None.

    For such a model (the paper's MLP, logistic regression) a row's gradient of a
    ``Linear`` layer is the outer product of the gradient at the layer's output and its
    input, so norms and the clipped sum need no per-sample gradient tensors.
    """
    if not isinstance(module, torch.nn.Sequential):
        return None
    layers = list(module)
    for layer in layers:
        if isinstance(layer, torch.nn.Linear):
            if not layer.weight.requires_grad or (layer.bias is not None and not layer.bias.requires_grad):
                return None
        elif not isinstance(layer, _ELEMENTWISE):
            return None
    return layers if any(isinstance(layer, torch.nn.Linear) for layer in layers) else None


def linear_chain_clipped_sum(
    layers: Sequence[torch.nn.Module], loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Sum of per-sample gradients clipped to ``max_grad_norm``, for a :func:`linear_chain`.

    One forward and one backward pass. Row i's squared gradient norm of a Linear layer is
    ``|g_i|^2 (|a_i|^2 + 1)`` (g: gradient at the output, a: input; +1 for the bias),
    and the clipped sum is ``(c * g)^T a`` -- Opacus's "ghost clipping" identity.
    Returns the gradients in parameter order, the per-sample norms and per-sample losses.
    """
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    h = x
    for layer in layers:
        if isinstance(layer, torch.nn.Linear):
            inputs.append(h)
            h = layer(h)
            outputs.append(h)
        else:
            h = layer(h)
    losses = loss_fn(h, y, reduction="none")
    output_grads = torch.autograd.grad(losses.sum(), outputs)
    squares = torch.zeros(len(y), dtype=x.dtype)
    linears = [layer for layer in layers if isinstance(layer, torch.nn.Linear)]
    for layer, a, g in zip(linears, inputs, output_grads, strict=True):
        g_sq = g.pow(2).sum(dim=1)
        squares = squares + g_sq * (a.detach().pow(2).sum(dim=1) + (1.0 if layer.bias is not None else 0.0))
    norms = squares.sqrt()
    factors = clip_factors(norms, max_grad_norm)
    grads: list[torch.Tensor] = []
    for layer, a, g in zip(linears, inputs, output_grads, strict=True):
        scaled = g * factors.unsqueeze(1)
        grads.append(scaled.t() @ a.detach())
        if layer.bias is not None:
            grads.append(scaled.sum(dim=0))
    return grads, norms, losses.detach()


def add_noise_and_average(
    summed: Sequence[torch.Tensor], noise: torch.Tensor, expected_batch_size: float
) -> list[torch.Tensor]:
    """``(sum + noise) / expected_batch_size`` per tensor (new tensors).

    ``noise`` is one flat draw of ``N(0, noise_std^2)`` covering every tensor in order.
    """
    pieces = torch.split(noise.to(summed[0].dtype), [s.numel() for s in summed])
    return [(s + n.view_as(s)) / expected_batch_size for s, n in zip(summed, pieces, strict=True)]


def per_sample_gradients(
    module: torch.nn.Module, loss_fn: LossFn, x: torch.Tensor, y: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per-sample gradients (one ``(batch, *p.shape)`` tensor per trainable parameter) and losses.

    ``loss_fn(logits, target, reduction="sum")`` on a one-row batch is the row's loss
    (class weights included), computed with torch.func's ``vmap(grad)``.
    """
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    buffers = dict(module.named_buffers())

    def row_loss(trainable: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        logits = functional_call(module, ({**trainable, **frozen}, buffers), (xi.unsqueeze(0),))
        return loss_fn(logits, yi.unsqueeze(0), reduction="sum")

    grads, losses = vmap(grad_and_value(row_loss), in_dims=(None, 0, 0), randomness="different")(params, x, y)
    return [grads[n] for n in names], losses


def per_sample_norms(per_sample_grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each sample's whole gradient (all parameters together), shape ``(batch,)``."""
    squares = [g.reshape(len(g), -1).pow(2).sum(dim=1) for g in per_sample_grads]
    return torch.stack(squares, dim=1).sum(dim=1).sqrt()


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """Opacus's per-sample scale ``min(1, C / (norm + 1e-6))``."""
    return (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_and_noise(
    per_sample_grads: Sequence[torch.Tensor], max_grad_norm: float, noise: torch.Tensor, expected_batch_size: float
) -> list[torch.Tensor]:
    """The DP-SGD gradient: clip each sample to ``max_grad_norm``, sum, add ``noise``, average.

    ``noise`` is one flat draw covering every parameter in order. Returns new tensors
    shaped like the parameters; the inputs are not modified.
    """
    return add_noise_and_average(clipped_sum(per_sample_grads, max_grad_norm), noise, expected_batch_size)


def clipped_sum(per_sample_grads: Sequence[torch.Tensor], max_grad_norm: float) -> list[torch.Tensor]:
    """``sum_i g_i * min(1, C / (||g_i|| + 1e-6))`` per parameter (zeros for an empty batch)."""
    if not len(per_sample_grads[0]):
        return [g.sum(dim=0) for g in per_sample_grads]
    factors = clip_factors(per_sample_norms(per_sample_grads), max_grad_norm)
    return [torch.einsum("b,b...->...", factors, g) for g in per_sample_grads]


def dp_gradient_step(
    params: DPSGDParameters, loss_fn: LossFn, noise_key: bytes
) -> Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``GradientStep`` for the local-training loop: writes the DP-SGD gradient into ``p.grad``.

    Linear chains (the paper's MLP) take the one-backward clipped sum of
    :func:`linear_chain_clipped_sum`; any other module takes torch.func's per-sample
    gradients. Both add noise from one :class:`~fedcore.noise.GaussianNoise` stream
    under ``noise_key`` (the round's, :meth:`DPStep.noise_key`); an empty Poisson batch releases the
    noise alone (Opacus steps on it too).
    """
    stream: GaussianNoise | None = None

    def draw(trainable: Sequence[torch.Tensor]) -> torch.Tensor:
        nonlocal stream
        if stream is None:
            dtype = trainable[0].dtype if trainable[0].dtype == torch.float64 else torch.float32
            stream = GaussianNoise([noise_key], sum(p.numel() for p in trainable), dtype)
        return stream.sample(params.noise_std)

    def step(module: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        trainable = [p for p in module.parameters() if p.requires_grad]
        layers = linear_chain(module)
        if len(yb) == 0:
            summed = [torch.zeros_like(p) for p in trainable]
            loss = torch.zeros(())
        elif layers is not None:
            summed, _, losses = linear_chain_clipped_sum(layers, loss_fn, xb, yb, params.max_grad_norm)
            loss = losses.mean()
        else:
            per_sample, losses = per_sample_gradients(module, loss_fn, xb, yb)
            summed = clipped_sum(per_sample, params.max_grad_norm)
            loss = losses.detach().mean()
        grads = add_noise_and_average(summed, draw(trainable), params.expected_batch_size)
        for p, g in zip(trainable, grads, strict=True):
            p.grad = g
        return loss

    return step
