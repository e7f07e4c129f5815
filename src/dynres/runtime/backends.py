"""Kernel backends behind one interface: a registry of small builders (timm-style).

Each builder turns (model, example input, threads, artifact dir) into a shape-specialized callable that maps a
float32 NCHW tensor to logits. A builder that finds its artifact (ONNX file, OpenVINO blob, TVM library) already in
``artifact_dir`` loads it instead of recompiling, which is how :func:`dynres.runtime.kernels.load` skips re-tuning.
Heavy libraries are imported inside the builder that needs them; a missing one is a reason, never a crash.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dynres.errors import BackendError

Fn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Kernel:
    """A built implementation: ``kernel(x) -> logits`` for one (resolution, batch, threads)."""

    backend: str
    fn: Fn = field(repr=False)
    build_s: float = 0.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@dataclass(frozen=True)
class Backend:
    """A registry entry. ``requires`` are importable modules; ``default`` puts it in the default tuning grid
    (slow compilers such as inductor and TVM are opt-in so a 7-resolution grid tunes in minutes)."""

    name: str
    build: Callable[..., Fn]
    requires: tuple[str, ...] = ()
    default: bool = True
    takes_trials: bool = False

    def missing(self) -> str | None:
        """Why this backend cannot run here, or None."""
        for module in self.requires:
            if importlib.util.find_spec(module) is None:
                extra = {"onnxruntime": "ort", "onnx": "ort", "openvino": "openvino", "tvm": "tvm"}.get(module, module)
                return f"python package {module!r} is not installed (pip install 'dynres[{extra}]')"
        return None


BACKENDS: dict[str, Backend] = {}


def register(name: str, *, requires: Iterable[str] = (), default: bool = True, takes_trials: bool = False):
    """Decorator adding a builder to :data:`BACKENDS`; duplicate names are a bug."""

    def wrap(build: Callable[..., Fn]) -> Callable[..., Fn]:
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} is registered twice")
        BACKENDS[name] = Backend(name, build, tuple(requires), default, takes_trials)
        return build

    return wrap


def build_kernel(name: str, model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path,
                 **options) -> Kernel:
    """Build one backend; every failure (missing package, export or compile error) becomes a BackendError."""
    backend = BACKENDS.get(name)
    if backend is None:
        raise BackendError(name, f"unknown backend (known: {', '.join(BACKENDS)})")
    reason = backend.missing()
    if reason:
        raise BackendError(name, reason)
    if not backend.takes_trials:
        options.pop("trials", None)
    Path(artifact_dir).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        fn = backend.build(model, example, threads, Path(artifact_dir), **options)
        fn(example)  # first call: compile-on-first-run backends pay here, not in the timing
    except BackendError:
        raise
    except Exception as err:  # third-party compilers raise anything; keep the first line as the reason
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise BackendError(name, f"build failed: {type(err).__name__}: {first[:300]}") from err
    return Kernel(name, fn, time.perf_counter() - start)


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A private eval-mode copy, so layout changes and compilation never touch the caller's model."""
    return copy.deepcopy(model).eval()


def _torch_fn(model: nn.Module, memory_format=torch.contiguous_format) -> Fn:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.contiguous(memory_format=memory_format)).contiguous()

    return run


@register("eager")
def build_eager(model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path) -> Fn:
    torch.set_num_threads(threads)
    return _torch_fn(model.eval())


@register("channels_last")
def build_channels_last(model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path) -> Fn:
    torch.set_num_threads(threads)
    return _torch_fn(_frozen_copy(model).to(memory_format=torch.channels_last), torch.channels_last)


def _inductor(model: nn.Module, threads: int, mode: str | None, freezing: bool) -> Fn:
    import torch._inductor.config as inductor_config

    torch.set_num_threads(threads)
    inductor_config.freezing = freezing  # read at compile time, i.e. on the first call inside build_kernel
    compiled = torch.compile(_frozen_copy(model), mode=mode, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # freezing needs no_grad, not inference_mode
            return compiled(x).clone()

    return run


@register("inductor", default=False)
def build_inductor(model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path) -> Fn:
    return _inductor(model, threads, None, freezing=False)


@register("inductor_max", default=False)
def build_inductor_max(model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path) -> Fn:
    return _inductor(model, threads, "max-autotune", freezing=True)


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, any_shape: bool = False) -> Path:
    """ONNX export, static shapes or with ``any_shape`` dynamic batch, height and width. The TorchScript exporter
    (opset 17), not dynamo: it exports far faster, and the tuner exports once per setting (docs/bench-kernels.md)."""
    if not path.exists():
        tmp = path.with_suffix(".tmp.onnx")
        axes = {"input": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}} if any_shape else None
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is chosen for its speed
            torch.onnx.export(model.eval(), (example,), str(tmp), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"], dynamic_axes=axes)
        os.replace(tmp, path)
    return path


def _ort_session(path: Path, threads: int, spinning: bool) -> Fn:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"input": x.detach().contiguous().numpy()})[0])

    return run


def _ort(model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path, spinning: bool) -> Fn:
    return _ort_session(export_onnx(model, example, artifact_dir / "model.onnx"), threads, spinning)


def ort_any_shape(model: nn.Module, threads: int, artifact_dir: Path) -> Fn:
    """One ONNX Runtime session for every batch size and image size: what evaluation runs many shapes through
    without tuning (faster than eager PyTorch over the demo's grid, same outputs: docs/bench-kernels.md). Its
    threads sleep between calls, because evaluation decodes the next views on the same cores meanwhile. The
    session holds the graph in memory: ``artifact_dir`` may go once this returns."""
    example = torch.rand(2, 3, 64, 64)
    return _ort_session(export_onnx(model, example, artifact_dir / "model_any_shape.onnx", any_shape=True),
                        threads, spinning=False)


@register("ort", requires=("onnx", "onnxruntime"))
def build_ort(model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path) -> Fn:
    """ORT's default: worker threads spin between calls. Fastest alone on idle cores, but where other threads need
    the cores, as the engines' decode workers do, the spinning takes their time: :func:`dynres.runtime.kernels.load`
    turns it off there (``spinning=False``; measurements: docs/bench-pipeline.md)."""
    return _ort(model, example, threads, artifact_dir, spinning=True)


@register("ort_nospin", requires=("onnx", "onnxruntime"))
def build_ort_nospin(model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path) -> Fn:
    """Worker threads sleep instead of spinning between calls: faster on a busy machine, slower on an idle one,
    so the tuner times both (docs/bench-kernels.md)."""
    return _ort(model, example, threads, artifact_dir, spinning=False)


@register("openvino", requires=("onnx", "openvino"))
def build_openvino(model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path) -> Fn:
    import openvino as ov

    core = ov.Core()
    # f32 explicitly: on CPUs with bf16/AMX OpenVINO would otherwise silently run bf16 and fail the 1e-4 check.
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
    blob = artifact_dir / "model.blob"
    if blob.exists():
        compiled = core.import_model(io.BytesIO(blob.read_bytes()), "CPU", config)
    else:
        onnx_path = export_onnx(model, example, artifact_dir / "model.onnx")
        compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", config)
        tmp = blob.with_suffix(".tmp")
        exported = compiled.export_model()  # a BytesIO in recent OpenVINO, bytes in older ones
        tmp.write_bytes(exported.getvalue() if hasattr(exported, "getvalue") else exported)
        os.replace(tmp, blob)
        onnx_path.unlink()  # the blob is the artifact; the ONNX file was only a stepping stone
    request = compiled.create_infer_request()

    def run(x: torch.Tensor) -> torch.Tensor:
        request.infer({0: x.detach().contiguous().numpy()})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


@register("tvm", requires=("tvm",), default=False, takes_trials=True)
def build_tvm(model: nn.Module, example: torch.Tensor, threads: int, artifact_dir: Path, *,
              trials: int = 0) -> Fn:
    """Apache TVM (relax + MetaSchedule, the paper's tuner; its cost model needs xgboost). ``trials`` = 0 compiles
    untuned, far slower kernels than ONNX Runtime's; a competitive schedule needs thousands of trials, hours per
    shape on a small machine, so TVM is opt-in (measurements: docs/bench-kernels.md)."""
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))  # read when TVM's thread pool starts
    import tvm
    from tvm import relax

    lib_path = artifact_dir / f"model-t{trials}.so"
    if not lib_path.exists():
        from tvm.relax.frontend.torch import from_exported_program

        target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
                                    "num-cores": threads})
        with torch.no_grad():
            mod = from_exported_program(torch.export.export(_frozen_copy(model), (example,)))
        pipeline = relax.get_pipeline("static_shape_tuning", target=target, work_dir=str(artifact_dir / "tuning"),
                                      total_trials=trials, max_trials_per_task=max(1, trials // 16) if trials else None)
        executable = tvm.compile(pipeline(mod), target=target)
        tmp = lib_path.with_suffix(".tmp.so")
        executable.export_library(str(tmp))
        os.replace(tmp, lib_path)
    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_path)), device)
    main = vm["main"]

    def run(x: torch.Tensor) -> torch.Tensor:
        out = main(tvm.runtime.tensor(x.detach().contiguous().numpy(), device))
        out = out if hasattr(out, "numpy") else out[0]
        return torch.from_numpy(out.numpy())

    return run


# --- machine limits ---------------------------------------------------------------------------------------------

_FMA_C = r"""
#include <omp.h>
typedef float vec __attribute__((vector_size(VEC_BYTES)));
/* ACC independent FMA chains per thread hide the FMA latency; returns seconds for `iters` rounds. */
double fma_run(long iters, int threads) {
    double t0 = omp_get_wtime();
    float sink = 0.f;
    #pragma omp parallel num_threads(threads) reduction(+:sink)
    {
        vec acc[ACC], a, b;
        for (int i = 0; i < (int)(VEC_BYTES / 4); i++) { a[i] = 0.999999f; b[i] = 1e-7f; }
        for (int k = 0; k < ACC; k++) acc[k] = a * (float)(k + 1);
        for (long n = 0; n < iters; n++)
            for (int k = 0; k < ACC; k++) acc[k] = acc[k] * a + b;
        for (int k = 0; k < ACC; k++) sink += acc[k][0];
    }
    return sink == 12345.f ? -1.0 : omp_get_wtime() - t0;
}
"""


def gemm_gflops(threads: int, n: int = 2048, runs: int = 7) -> tuple[float, float]:
    """(best, median) GFLOP/s of an n x n fp32 GEMM through torch: the peak a well-tuned library reaches."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    secs = []
    for _ in range(runs):
        t0 = time.perf_counter()
        torch.mm(a, b)
        secs.append(time.perf_counter() - t0)
    flop = 2 * n**3 / 1e9
    return flop / min(secs), flop / sorted(secs)[len(secs) // 2]


def fma_gflops(threads: int, iters: int = 20_000_000) -> tuple[float | None, str]:
    """The FMA ceiling (independent vector FMAs on every thread), compiled with the system C compiler.
    Returns (GFLOP/s or None, how it was measured or why not)."""
    import ctypes
    import shutil
    import subprocess
    import tempfile

    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None, "no C compiler found"
    wide = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    vec_bytes, acc = (64, 12) if wide else (32, 12)
    with tempfile.TemporaryDirectory() as tmp:
        src, lib = Path(tmp) / "fma.c", Path(tmp) / "fma.so"
        src.write_text(_FMA_C.replace("VEC_BYTES", str(vec_bytes)).replace("ACC", str(acc)))
        cmd = [cc, "-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", str(src),
               "-o", str(lib)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return None, f"compiling the FMA loop failed: {done.stderr.strip()[:200]}"
        fn = ctypes.CDLL(str(lib)).fma_run
        fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_long, ctypes.c_int]
        fn(iters // 10, threads)
        best = min(fn(iters, threads) for _ in range(5))
    flop = 2.0 * (vec_bytes // 4) * acc * iters * threads
    return flop / best / 1e9, f"{threads} threads x {acc} chains of {vec_bytes * 8}-bit FMAs ({cc} -march=native)"


def measure_limits(threads: int, fma: bool = True) -> dict:
    """The machine's fp32 limits, measured now (the fraction-of-peak columns are relative to these)."""
    best, median = gemm_gflops(threads)
    limits = {"threads": threads, "gemm_gflops_per_s": best, "gemm_gflops_per_s_median": median,
              "gemm_note": "torch.mm 2048x2048 fp32, best of 7 (noise only slows a run down)"}
    if fma:
        limits["fma_gflops_per_s"], limits["fma_note"] = fma_gflops(threads)
    return limits
