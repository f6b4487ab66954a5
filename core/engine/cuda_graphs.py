"""CUDA graphs for the vectorized engine: one optimizer step of every copy, captured once, replayed.

On a GPU, a stacked step of a small model is a few dozen kernels of a few microseconds
each; launched one by one from Python (the step's FX graph, the optimizer), the CPU's
launch cost bounds it, not the GPU. Captured as a CUDA graph, a whole step -- gathering
its batch, forward and backward, clipping and noise under DP, Adam -- is one launch.

A captured step cannot take new Python arguments, so it reads everything from buffers
that live as long as the graph: the epoch's batches as ``(S, steps, B)`` index tensors,
and a step counter on the device that the step itself advances. An epoch is then
``steps`` replays with no other work on the CPU (:class:`ReplayedStep`), and the
:class:`~fedcore.engine.vectorized.StackedTrainer` copies each epoch's plan into the
graph's buffers (:class:`EpochBuffers`) before replaying.

The numbers are the eager step's: the same kernels on the same inputs. DP noise comes
from each copy's own generator, registered with the graph, so every replay advances it
exactly as the eager draw would (:meth:`torch.cuda.CUDAGraph.register_generator_state`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch


#: steps captured in one graph: a replay's fixed costs (the launch, and two small copies per
#: registered generator to set its seed and offset) are shared by this many steps
STEPS_PER_GRAPH = 32


class ReplayedStep:
    """``body()`` (one step, no arguments, no result) run once eagerly, then captured and replayed.

    The first call of :meth:`run` runs ``body`` for real on a side stream (the warm-up a
    capture needs: cuBLAS handles, lazy initialisation), which is also the epoch's first
    step. Steps are then captured ``unroll`` at a time into one graph (and the epoch's
    remainder into a graph of its own length), so ``steps`` steps are about
    ``steps / unroll`` replays. Where capture fails (an operation a graph cannot hold), the
    steps run eagerly from then on and a warning says why: the numbers are the same.

    :param body: one training step that reads and writes only long-lived tensors.
    :param generators: the CUDA generators ``body`` draws from (advanced by every replay).
    :param capture: False runs every step eagerly (a CPU: the same body, no graph).
    :param unroll: steps per graph.
    """

    def __init__(
        self,
        body: Callable[[], None],
        generators: Sequence[torch.Generator] = (),
        capture: bool = True,
        unroll: int = STEPS_PER_GRAPH,
    ) -> None:
        self.body = body
        self.generators = list(generators)
        self.unroll = max(1, unroll)
        #: captured graphs by the number of steps each holds
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        #: why the steps run eagerly (capture off, or failed), or None
        self.failure: str | None = None if capture else "capture off"
        self._warm = False
        self._pool: object = None

    def run(self, steps: int) -> None:
        """Run ``steps`` steps."""
        done = 0
        if self.failure is None and not self._warm and steps > 0:
            self._warm_up()
            done = 1
        full, rest = divmod(steps - done, self.unroll)
        for count, times in ((self.unroll, full), (rest, 1 if rest else 0)):
            if times == 0:
                continue
            graph = self._graph(count)
            if graph is None:
                for _ in range(count * times):
                    self.body()
                continue
            for _ in range(times):
                graph.replay()

    def _warm_up(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.body()
        torch.cuda.current_stream().wait_stream(stream)
        self._warm = True

    def _graph(self, count: int) -> torch.cuda.CUDAGraph | None:
        """The graph of ``count`` steps (captured now if new), or None where steps run eagerly."""
        if self.failure is not None:
            return None
        if count in self.graphs:
            return self.graphs[count]
        graph = torch.cuda.CUDAGraph()
        try:
            for generator in self.generators:
                graph.register_generator_state(generator)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # one memory pool for this step's graphs
            with torch.cuda.graph(graph, pool=self._pool):
                for _ in range(count):
                    self.body()
        except Exception as exc:  # noqa: BLE001 - any capture failure: run the same body eagerly
            self.failure = f"{type(exc).__name__}: {exc}".splitlines()[0]
            warnings.warn(f"CUDA graph capture failed, steps run eagerly: {self.failure}", RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize()
            return None
        self.graphs[count] = graph
        return graph


@dataclass
class EpochBuffers:
    """The long-lived tensors a captured step reads: the epoch's inputs, a step counter, a loss sum.

    :ivar inputs: one buffer per named input (shape and dtype fixed for the graph's life).
    :ivar t: the step counter, ``(1,)`` int64 on the device; the step advances it.
    :ivar loss: the epoch's summed per-copy loss, ``(S,)`` float64.
    """

    inputs: dict[str, torch.Tensor]
    t: torch.Tensor
    loss: torch.Tensor
    step: ReplayedStep | None = field(default=None)

    @classmethod
    def like(cls, inputs: Mapping[str, torch.Tensor], copies: int) -> EpochBuffers:
        """Buffers shaped as ``inputs``, on their device."""
        device = next(iter(inputs.values())).device
        return cls(
            {name: torch.empty_like(value) for name, value in inputs.items()},
            torch.zeros(1, dtype=torch.long, device=device),
            torch.zeros(copies, dtype=torch.float64, device=device),
        )

    def load(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """This epoch's inputs into the buffers; the counter and the loss back to zero."""
        for name, value in inputs.items():
            self.inputs[name].copy_(value)
        self.t.zero_()
        self.loss.zero_()

    def at(self, name: str, copies: int) -> torch.Tensor:
        """Step ``t``'s slice of input ``name`` laid out ``(S, steps, ...)``: ``(S, ...)``."""
        value = self.inputs[name]
        return value.index_select(1, self.t).view(copies, *value.shape[2:])

    @staticmethod
    def key(kind: tuple[object, ...], inputs: Mapping[str, torch.Tensor]) -> tuple[object, ...]:
        """What a captured step is specialised on: its kind and its inputs' shapes and dtypes."""
        return (*kind, *((name, tuple(v.shape), v.dtype) for name, v in inputs.items()))
