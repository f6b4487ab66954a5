"""Native (C++) code on the CPU: a training step for plain MLPs (``mlp_step.cpp`` beside this
file) and the Box-Muller transform of :class:`fedcore.noise.GaussianNoise` (``gaussian.cpp``).

For the paper's MLP a step of S stacked copies is ~35 tensor operations over all copies,
each a pass through memory, and MKL's matrix products are a quarter of its time. The native
step runs copy after copy: the forward pass, the backward pass and the gradient (or
DP-SGD's clipped sum, added into the noise buffer) of one copy in one call, its matrices in
the core's cache, its gradient written into its row of the ``(S, P)`` buffer (through an
aligned buffer where MKL computes it; or, with Adam inside, kept in that buffer for the
copy's Adam step).
The matrix products are libxsmm's kernels, made at run time for each product's shapes, where
libxsmm's header and static library are found (:func:`libxsmm_prefix`; ``install.sh`` fetches
Debian's ``libxsmm-dev``), else MKL's BLAS calls: :func:`matmul_library` says which.
Same formulas as :func:`~fedcore.engine.vectorized_step.make_mlp_train_step` and
:func:`~fedcore.engine.vectorized_step.make_mlp_dp_step`; the numbers agree to float
rounding (float64: to ~1e-15). Measured on the paper's workload in ``docs/speed.md``.

The source is compiled on first use by ``torch.utils.cpp_extension`` (a C++ compiler and
``ninja``; ~15 s once, then loaded from ``<cache>/native/``, keyed by the sources' hash:
:func:`library_path`), in a child process stopped after :data:`BUILD_TIMEOUT_S`.
Where it cannot be built or loaded -- no compiler, a torch without MKL's ``sgemm_``, no glibc
``libmvec`` -- the engine runs the compiled tensor-operation step and the noise its numpy
transform instead, with the same numbers to rounding; :func:`unavailable_reason` says why.
``FEDCORE_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import torch

from fedcore.cache import cache_root
from fedcore.engine.vectorized_step import ParamLayout, mlp_layers

#: the step, the Box-Muller transform of :class:`fedcore.noise.GaussianNoise`, and the header they share
SOURCES = tuple(Path(__file__).with_name(name) for name in ("mlp_step.cpp", "gaussian.cpp", "native.h"))
#: set to 0 to run the compiled tensor-operation steps instead
ENV = "FEDCORE_NATIVE"
#: libxsmm's install prefix (``include/libxsmm.h``, ``lib/libxsmm.a``), or 0 to build without it
LIBXSMM_ENV = "FEDCORE_LIBXSMM"
#: OpenSSL's install prefix (``include/openssl/evp.h``, ``libcrypto.so``), or 0 to build without it
OPENSSL_ENV = "FEDCORE_OPENSSL"
_ACTIVATION_CODES: dict[type[torch.nn.Module] | None, int] = {None: 0, torch.nn.ReLU: 1, torch.nn.Tanh: 2}
_DTYPES = (torch.float32, torch.float64)

_log = logging.getLogger(__name__)
_PIN = "OMP_PROC_BIND"
_lock = threading.Lock()
_loaded: str | None = None  # "" once loaded, else why not
_op: torch._ops.OpOverloadPacket | None = None  # type: ignore[name-defined]


@contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch runs ``ninja`` from PATH; the ``ninja`` package's binary sits in the
    environment's scripts folder, which is not on PATH unless the environment is active."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja  # type: ignore[import-untyped]
    except ImportError:
        yield
        return
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(ninja.BIN_DIR), before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


# Portable flags: the matrix products are MKL's (dispatched at run time); the loops around
# them are compiled for several instruction sets in the sources. No contraction into FMAs:
# Adam's arithmetic then rounds as torch's fused kernel does, and the noise's sine and cosine
# (gaussian.cpp) give the same bits in every clone. glibc's libmvec vectorizes the log.
_CFLAGS = ("-O3", "-fopenmp-simd", "-ffp-contract=off", "-fno-math-errno")
_LDFLAGS = ("-lmvec",)


def _libxsmm_archive(prefix: Path) -> Path | None:
    """``prefix``'s libxsmm static library, where it has one and the header beside it."""
    if not (prefix / "include" / "libxsmm.h").is_file():
        return None
    return next((a for a in (prefix / "lib" / "libxsmm.a", prefix / "lib" / "x86_64-linux-gnu" / "libxsmm.a") if a.is_file()), None)


def _libxsmm() -> tuple[Path, Path] | None:
    """libxsmm's prefix and static library (:func:`libxsmm_prefix` says where it looks), or None."""
    setting = os.environ.get(LIBXSMM_ENV, "").strip()
    if setting.lower() in ("0", "false", "no", "off") or sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    candidates = [Path(setting)] if setting else [cache_root() / "libxsmm" / "usr", Path("/usr"), Path("/usr/local")]
    for prefix in candidates:
        if (archive := _libxsmm_archive(prefix)) is not None:
            return prefix, archive
    if setting:
        _log.warning("%s=%s has no include/libxsmm.h and lib/libxsmm.a: the native step's products are MKL's", LIBXSMM_ENV, setting)
    return None


def libxsmm_prefix() -> Path | None:
    """Where libxsmm is, for the native step's small-matrix kernels: ``FEDCORE_LIBXSMM``, else
    the copy of Debian's package that ``install.sh`` unpacks into ``<cache>/libxsmm/usr`` where
    it may not install packages, else ``/usr`` and ``/usr/local``. None where none has
    ``include/libxsmm.h`` and ``lib/libxsmm.a``, with ``FEDCORE_LIBXSMM=0``, or off x86-64
    Linux (libxsmm's kernels are x86 code): the step's products are then MKL's."""
    found = _libxsmm()
    return None if found is None else found[0]


def openssl_prefix() -> Path | None:
    """Where OpenSSL's libcrypto is for the native step's noise streams (``OPENSSL_ENV``, else
    ``/usr`` and ``/usr/local``): a prefix with ``include/openssl/evp.h`` and a ``libcrypto.so``
    in its ``lib`` (or its multiarch ``lib/<triplet>``, ``lib64``); Debian's ``libssl-dev``, which
    ``install.sh`` installs where it may. None where none has both, or with ``FEDCORE_OPENSSL=0``:
    the noise is then drawn by :class:`fedcore.noise.GaussianNoise` in Python and handed to the step."""
    found = _openssl()
    return None if found is None else found[0]


def _openssl() -> tuple[Path, Path] | None:
    """OpenSSL's prefix and the folder of its ``libcrypto.so`` (:func:`openssl_prefix`), or None."""
    setting = os.environ.get(OPENSSL_ENV, "").strip()
    if setting.lower() in ("0", "false", "no", "off") or sys.platform != "linux":
        return None
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    for prefix in [Path(setting)] if setting else [Path("/usr"), Path("/usr/local")]:
        if not (prefix / "include" / "openssl" / "evp.h").is_file():
            continue
        for lib in (prefix / "lib" / multiarch, prefix / "lib", prefix / "lib64"):
            if (lib / "libcrypto.so").exists():
                return prefix, lib
    if setting:
        _log.warning("%s=%s has no include/openssl/evp.h and libcrypto.so: the noise is drawn in Python", OPENSSL_ENV, setting)
    return None


def _flags(libxsmm: tuple[Path, Path] | None, openssl: tuple[Path, Path] | None = None) -> tuple[list[str], list[str]]:
    """The compiler's and the linker's flags: :data:`_CFLAGS` and :data:`_LDFLAGS`, with
    libxsmm's (its header folder, its static library linked in) and OpenSSL's (its headers,
    libcrypto linked) where they are found."""
    cflags, ldflags = list(_CFLAGS), list(_LDFLAGS)
    if libxsmm is not None:
        prefix, archive = libxsmm
        cflags += ["-DFEDCORE_LIBXSMM", f"-I{prefix / 'include'}"]
        ldflags = [str(archive), *ldflags, "-lpthread", "-ldl"]
    if openssl is not None:
        prefix, lib = openssl
        cflags += ["-DFEDCORE_OPENSSL", f"-I{prefix / 'include'}"]
        ldflags += [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lcrypto"]
    return cflags, ldflags


def library_path() -> Path:
    """Where the built library is kept: ``<cache>/native/``, named by a hash of the sources,
    the flags (libxsmm's library with its size and time), torch's and Python's versions and
    the machine (a change to any builds anew)."""
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    libxsmm = _libxsmm()
    cflags, ldflags = _flags(libxsmm, _openssl())
    for part in (*cflags, *ldflags, torch.__version__, sys.version, platform.machine()):
        digest.update(part.encode())
    if libxsmm is not None:
        stat = libxsmm[1].stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_root() / "native" / f"fedcore_native-{digest.hexdigest()[:20]}.so"


#: the longest the first build may take (~20 s on a 2-core machine); past it the compiler is
#: stopped and the engine runs the compiled tensor-operation steps (``FEDCORE_NATIVE_BUILD_TIMEOUT``)
BUILD_TIMEOUT_S = 600.0
#: how long a stopped build's processes get to end before they are killed
_STOP_GRACE_S = 5.0


def _compile(folder: str) -> None:
    """Compile the sources into ``folder`` with torch's extension builder (what :func:`_build`
    runs in a child process)."""
    from torch.utils.cpp_extension import load

    cflags, ldflags = _flags(_libxsmm(), _openssl())
    with _ninja_on_path():
        load(
            name="fedcore_native", sources=[str(p) for p in SOURCES if p.suffix == ".cpp"], extra_cflags=cflags,
            extra_ldflags=ldflags, build_directory=folder, is_python_module=False,
        )  # fmt: skip


def _run_child(code: str, args: list[str], timeout: float) -> None:
    """``python -c code args`` in its own process group, killed whole (the compiler with it)
    past ``timeout`` seconds; a RuntimeError with the end of its output when it fails."""
    child = subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: ninja runs each compiler in a process group of its own and stops them
        # when it is asked to stop; then SIGKILL for whatever is left of the group.
        # Waits on the child itself, not on its output: a compiler that outlived ninja in a
        # group of its own could hold the pipe open until it finishes.
        os.killpg(child.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            child.wait(timeout=_STOP_GRACE_S)
        with suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
        raise RuntimeError(
            f"the native build took longer than {timeout:g} s and was stopped (FEDCORE_NATIVE_BUILD_TIMEOUT raises the limit)"
        ) from None
    if child.returncode != 0:
        raise RuntimeError(" ".join(output.split()[-60:]) or f"the native build exited with {child.returncode}")


def _build(path: Path) -> None:
    """Compile the library and keep it at ``path``.

    The compiler runs in a child process with a time limit (:data:`BUILD_TIMEOUT_S`): a build
    that hangs stops there instead of holding up the run. Each build has its own temporary
    folder and the library is moved into place in one rename: processes that build at once
    each finish (the same bytes), and a build killed halfway leaves nothing that blocks the
    next one. (torch's shared build folder holds a lock file while it builds; one left by a
    killed process makes every later process wait for it forever.)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    timeout = float(os.environ.get("FEDCORE_NATIVE_BUILD_TIMEOUT", BUILD_TIMEOUT_S))
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as folder:
        _run_child("import sys; from fedcore.engine.native import _compile; _compile(sys.argv[1])", [folder], timeout)
        built = sorted(Path(folder).glob("fedcore_native*.so"))
        if not built:
            raise RuntimeError("the native build made no library")
        os.replace(built[-1], path)


def _load() -> str:
    """Build (once per machine and sources) and load the native code; ``""`` when it loaded, else why not."""
    global _op
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"turned off by {ENV}={os.environ[ENV]}"
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        torch.ops.load_library(str(path))
        _op = torch.ops.fedcore_native.mlp_steps
        library = torch.ops.fedcore_native.matmul_library()  # initializes libxsmm, where the build has it
        if _PIN not in os.environ:
            # libxsmm's initialization asks OpenMP to pin threads (OMP_PROC_BIND=TRUE, in the C
            # environment) where nothing else set it; every worker process started afterwards
            # would pin its thread to the first core: two workers on one core.
            os.unsetenv(_PIN)
        _log.info("native step loaded; its matrix products: %s", library)
    except Exception as error:  # noqa: BLE001 - any failure to build or load: run the tensor-operation step
        reason = " ".join(str(error).split())[:300]
        _log.info("native code unavailable, running the compiled tensor-operation step and numpy's noise transform: %s", reason)
        return reason or type(error).__name__
    return ""


def gaussian_from_bits() -> Callable[..., None] | None:
    """The native Box-Muller transform (``gaussian.cpp``), or None where the native code
    cannot run (:func:`unavailable_reason`)."""
    return None if unavailable_reason() is not None else torch.ops.fedcore_native.gaussian_from_bits


def matmul_library() -> str | None:
    """What computes the native step's matrix products (``"libxsmm 1.17 (cpx)"``: its version
    and the instruction set of its kernels; ``"BLAS"``: MKL's), or None where the native code
    cannot run."""
    return None if unavailable_reason() is not None else str(torch.ops.fedcore_native.matmul_library())


def noise_library() -> str | None:
    """Whose AES the native step's own noise streams use (``"OpenSSL 3.0.19 27 Jan 2026"``), or
    None where the native code cannot run or was built without OpenSSL (:func:`openssl_prefix`):
    DP-SGD's noise is then drawn in Python and handed to the step."""
    if unavailable_reason() is not None:
        return None
    return str(torch.ops.fedcore_native.noise_library()) or None


def unavailable_reason() -> str | None:
    """Why the native step cannot run in this process (None when it can); the first call
    builds or loads it."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
    return _loaded or None


@dataclass(frozen=True)
class AdamStep:
    """Adam's state and settings for the native step to apply copy by copy, each copy right
    after each of its gradients (torch's fused Adam arithmetic).

    :ivar exp_avg: ``(S, P)`` first moments, updated in place.
    :ivar exp_avg_sq: ``(S, P)`` second moments, updated in place.
    :ivar settings: ``(lr, beta1, beta2, weight_decay, eps)``.
    :ivar taken: ``(S,)`` int64, each copy's Adam steps before the call (its first step in
        the call counts ``taken + 1``).
    """

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    settings: tuple[float, float, float, float, float]
    taken: torch.Tensor


@dataclass(frozen=True)
class NoiseStreams:
    """DP-SGD's noise streams for the native step to draw from itself, each copy's right
    before each of its steps (:meth:`fedcore.noise.GaussianNoise.native_streams`): the same
    keystream and transform as the Python streams, so the same values.

    :ivar keys: ``(S, 16)`` uint8, each copy's AES-128 key.
    :ivar at: ``(S,)`` int64, the bytes of each stream drawn so far; advanced in place.
    :ivar std: each copy's standard deviation.
    """

    keys: torch.Tensor
    at: torch.Tensor
    std: tuple[float, ...]


@dataclass(frozen=True)
class NativeMLPStep:
    """The native step for one plain MLP's layout: each layer's ``(weight offset, bias
    offset, in, out, activation code)``, flattened."""

    layers: tuple[int, ...]

    @classmethod
    def of(cls, module: torch.nn.Module, layout: ParamLayout, dtype: torch.dtype, device: torch.device) -> NativeMLPStep | None:
        """The native step for ``module``'s copies, or None where it does not apply (not a
        plain MLP, not float32/float64 on the CPU) or cannot run here."""
        dense = mlp_layers(module, layout)
        if dense is None or device.type != "cpu" or dtype not in _DTYPES or unavailable_reason() is not None:
            return None
        layers: list[int] = []
        for d in dense:
            out_features, in_features = layout.shapes[d.weight]
            layers += [layout.offsets[d.weight], layout.offsets[d.bias], in_features, out_features, _ACTIVATION_CODES[d.activation]]
        return cls(tuple(layers))

    def train(
        self, params: torch.Tensor, x_all: torch.Tensor, index: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
        grad: torch.Tensor | None, adam: AdamStep | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """One plain step of every copy: gradients of ``sum_i w_i nll_i`` into ``grad``; the losses ``(S,)``.

        :param params: ``(S, P)`` the copies' parameters (contiguous; updated in place by ``adam``).
        :param x_all: ``(N, F)`` every copy's rows.
        :param index: ``(S, B)`` the rows of ``x_all`` each copy's batch takes.
        :param y: ``(S, B)`` their labels (int64).
        :param w: ``(S, B)`` their weights (0 on padding).
        :param grad: ``(S, P)`` overwritten with the gradients; None with ``adam``, when the
            caller does not need them (each copy's gradient then stays in the core's cache
            for its Adam step, and no ``(S, P)`` buffer is written and read back).
        :param adam: Adam's step to take with them, copy by copy (None: the caller steps).
        """
        if grad is None and adam is None:
            raise ValueError("a plain step without Adam must return its gradients: pass grad")
        out = None if grad is None else grad.unsqueeze(0)
        return self._call(params, x_all, _one(index), _one(y), _one(w), out, None, None, None, None, adam)[:, 0]

    def dp(
        self, params: torch.Tensor, x_all: torch.Tensor, index: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
        clip: torch.Tensor, noise: torch.Tensor, row_scale: torch.Tensor, sizes: torch.Tensor | None = None,
        adam: AdamStep | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """One DP-SGD step's clipped sums of every copy, added into ``noise``; the losses ``(S,)``.

        :param params: as :meth:`train`; ``x_all``, ``index``, ``y``, ``w`` likewise.
        :param clip: ``(S,)`` each copy's clipping bound C.
        :param noise: ``(S, P)`` the step's noise; the clipped, scaled sum is added into it.
        :param row_scale: ``(S, B)`` each row's weight in the sum (0 on padding, ``1 / B`` on real rows).
        :param sizes: ``(S,)`` int64, each copy's own batch size: its first ``sizes[s]`` rows are
            its batch, the rest padding, which is skipped (copies step in lockstep at the
            widest of their Poisson batches; the others need not compute its padding).
        :param adam: Adam's step to take with the noised sums, copy by copy (None: the caller steps).
        """
        own = None if sizes is None else sizes.view(-1, 1)
        return self._call(
            params, x_all, _one(index), _one(y), _one(w), noise.unsqueeze(0), clip, _one(row_scale), own, None, adam
        )[:, 0]

    def steps(
        self, params: torch.Tensor, x_all: torch.Tensor, index: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
        adam: AdamStep, steps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
        clip: torch.Tensor | None = None, row_scale: torch.Tensor | None = None, sizes: torch.Tensor | None = None,
        streams: NoiseStreams | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``T`` steps of every copy with Adam inside, copy after copy (a copy's parameters
        and moments stay in the core's cache across its steps); the losses ``(S, T)``.

        The numbers are those of ``T`` calls of :meth:`train` (or :meth:`dp`, with ``noise``)
        with Adam: the copies are independent, so the order changes none.

        :param params: as :meth:`train`; ``x_all`` likewise.
        :param index: ``(S, T, B)`` the rows of each copy's batch at each step; ``y``, ``w`` likewise.
        :param adam: Adam's step after each gradient.
        :param steps: ``(S,)`` int64, how many of the ``T`` steps each copy takes (default all);
            the losses of steps not taken are 0.
        :param noise: DP-SGD: ``(T, S, P)`` each step's noise (the clipped sums are added into it);
            or none, with ``streams``.
        :param clip: DP-SGD: ``(S,)`` each copy's clipping bound.
        :param row_scale: DP-SGD: ``(S, T, B)`` each row's weight in the sum.
        :param sizes: ``(S, T)`` int64, each copy's own batch size at each step (as :meth:`dp`).
        :param streams: DP-SGD: the noise streams the step draws each step's noise from, where
            :func:`noise_library` is not None (instead of ``noise``); a copy draws at the steps it takes.
        """
        return self._call(params, x_all, index, y, w, noise, clip, row_scale, sizes, steps, adam, streams)

    def _call(
        self, params: torch.Tensor, x_all: torch.Tensor, index: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
        out: torch.Tensor | None, clip: torch.Tensor | None, row_scale: torch.Tensor | None, sizes: torch.Tensor | None,
        steps: torch.Tensor | None, adam: AdamStep | None, streams: NoiseStreams | None = None,
    ) -> torch.Tensor:  # fmt: skip
        assert _op is not None
        moments = (None, None, None, ()) if adam is None else (adam.exp_avg, adam.exp_avg_sq, adam.taken, adam.settings)
        noise = (None, None, ()) if streams is None else (streams.keys, streams.at, streams.std)
        return _op(params, x_all, index, y.long(), w, self.layers, out, clip, row_scale, sizes, steps, *moments, *noise)


def _one(rows: torch.Tensor) -> torch.Tensor:
    """An ``(S, B)`` argument of one step as the ``(S, 1, B)`` of a call of one step."""
    return rows.unsqueeze(1)
