"""The CPU kernels of rows_gemm.c, ``out_nM = x_nK @ W_MK.T`` in float32 on AVX2 + FMA (and AVX-512 for MXFP4 where
the CPU has it), and the panel layout.

- ``panels_matmul``: any number of rows through weights packed by ``pack_panels`` (``[ceil(M/16), K, 16]``), an
  outer-product micro-kernel that never repacks them: 1.1-1.9x MKL from 4 to 256 rows (BENCHMARKS.md). CPU
  workers hold their experts packed this way (``PackedExpertWeights``).
- ``rows_matmul``: 1-8 rows (longer ones in chunks) through weights in the canonical ``[M, K]`` layout, a
  dot-product kernel: 1.2-2x MKL there.
- ``quantized_rows_matmul`` / ``quantized_panels_matmul``: both kinds of kernel on FP8 / MXFP4 weights as
  checkpoints store them (``kernels/quantized.py``), dequantized inside: in registers for a few rows (a dot-product
  kernel), 16 weight rows at a time into an L2-resident panel for more (the panel micro-kernel). No float32 copy
  of an expert is written. The MXFP4 rows kernel has an AVX-512 variant, used where the CPU has AVX-512
  F/BW/VL/DQ (``avx512_enabled()``; 1.5-2.5x the AVX2 one, BENCHMARKS.md): the library is built for AVX2, those
  functions alone for AVX-512 (target attributes), and the kernel is chosen at run time from cpuid, so one build
  runs on both kinds of CPU. ``MOERAY_CPU_AVX512=0`` keeps the AVX2 kernel.

Built on first use with the system's C compiler into a per-user cache (``MOERAY_KERNEL_CACHE``), into a temporary
file first and then renamed, so several workers starting at once do not race; loaded with ctypes, which releases
the GIL during a call. Built with ``-fopenmp``, the library binds to the libgomp torch already loaded (same
soname), so the work is split over ``torch.get_num_threads()`` threads of torch's own OpenMP team rather than over
threads that would compete with that team's spinning ones. A compiler that cannot build the AVX-512 functions gets a
second try without them (``-DMOERAY_NO_AVX512``). No compiler, no AVX2, or ``MOERAY_CPU_KERNEL=0``: ``available()``
is False and the torch path stays on BLAS.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from moeray.kernels.quantized import FP8, MXFP4_BLOCK, ExpertQuant

log = logging.getLogger(__name__)

MAX_ROWS = 8  # rows per kernel call; longer segments go in chunks of this many
_SOURCE = Path(__file__).with_name("rows_gemm.c")


def _cache_dir() -> Path:
    return Path(os.environ.get("MOERAY_KERNEL_CACHE", Path.home() / ".cache" / "moeray" / "kernels"))


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return "avx2" in flags and "fma" in flags


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("MOERAY_CPU_KERNEL", "1") == "0" or not _cpu_has_avx2_fma():
        return None
    source = _SOURCE.read_bytes()
    target = _cache_dir() / f"rows_gemm-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not target.exists():
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            log.warning("no C compiler found: expert GEMMs of 1-8 rows stay on BLAS (slower on decode)")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            for extra in ([], ["-DMOERAY_NO_AVX512"]):  # the second for compilers without AVX-512 intrinsics
                cmd = [compiler, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", *extra, "-o", str(built),
                       str(_SOURCE)]
                result = subprocess.run(cmd, capture_output=True, text=True)
                if result.returncode == 0:
                    break
                log.warning("building the CPU rows kernel failed (%s): %s", " ".join(cmd),
                            result.stderr.strip()[-500:])
            else:
                log.warning("expert GEMMs of 1-8 rows stay on BLAS")
                return None
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    lib.rows_gemm_f32.restype = ctypes.c_int
    lib.rows_gemm_f32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p, ctypes.c_long, ctypes.c_void_p,
                                  ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    lib.panels_gemm_f32.restype = ctypes.c_int
    lib.panels_gemm_f32.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long,
                                    ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int]
    p, n = ctypes.c_void_p, ctypes.c_long
    for name in ("fp8_rows_gemm", "fp8_panels_gemm"):  # q, K, scale, BN, BK, x, ldx, y, ldy, n, M, threads
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = [p, n, p, n, n, p, n, p, n, n, n, ctypes.c_int]
    for name in ("mxfp4_rows_gemm", "mxfp4_rows_gemm_avx2", "mxfp4_panels_gemm"):  # q, e8m0, K, x, ldx, y, ldy,
        getattr(lib, name).restype = ctypes.c_int  # n, M, threads
        getattr(lib, name).argtypes = [p, p, n, p, n, p, n, n, n, ctypes.c_int]
    lib.rows_gemm_avx512.restype = ctypes.c_int
    lib.rows_gemm_avx512.argtypes = []
    return lib


def available() -> bool:
    return _library() is not None


@functools.cache
def cpu_has_avx512() -> bool:
    """Whether this CPU runs the AVX-512 MXFP4 rows kernel (AVX-512 F, BW, VL and DQ, from cpuid in the library)."""
    lib = _library()
    return lib is not None and bool(lib.rows_gemm_avx512())


def avx512_enabled() -> bool:
    """Whether ``quantized_rows_matmul`` runs MXFP4 on the AVX-512 kernel by default: the CPU has it and
    ``MOERAY_CPU_AVX512`` is not 0."""
    return cpu_has_avx512() and os.environ.get("MOERAY_CPU_AVX512", "1") != "0"


def _checked_library(name: str, tensors: tuple[torch.Tensor, ...], dims: tuple[int, ...]) -> ctypes.CDLL:
    """The loaded library, once ``tensors`` are float32 CPU tensors of ``dims`` dimensions with contiguous rows."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the CPU kernels are not available here (see moeray.kernels.cpu_rows)")
    if tuple(t.dim() for t in tensors) != dims:
        raise ValueError(f"{name} takes tensors of {dims} dimensions; got shapes {[tuple(t.shape) for t in tensors]}")
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or t.stride(-1) != 1:
            raise ValueError(f"{name} needs float32 CPU tensors with contiguous rows; got {t.dtype} on "
                             f"{t.device} with strides {t.stride()}")
    return lib


def rows_matmul(x_nK: torch.Tensor, w_MK: torch.Tensor, out_nM: torch.Tensor) -> torch.Tensor:
    """out_nM = x_nK @ w_MK.T for float32 CPU tensors with contiguous rows; any n (in chunks of MAX_ROWS)."""
    lib = _checked_library("rows_matmul", (x_nK, w_MK, out_nM), (2, 2, 2))
    n, k = x_nK.shape
    m = w_MK.shape[0]
    if not w_MK.is_contiguous() or w_MK.shape[1] != k or tuple(out_nM.shape) != (n, m):
        raise ValueError(f"rows_matmul: x {tuple(x_nK.shape)}, w {tuple(w_MK.shape)} (contiguous: "
                         f"{w_MK.is_contiguous()}), out {tuple(out_nM.shape)} do not fit together")
    threads = torch.get_num_threads()
    for start in range(0, n, MAX_ROWS):
        lib.rows_gemm_f32(w_MK.data_ptr(), k, x_nK[start].data_ptr(), x_nK.stride(0), out_nM[start].data_ptr(),
                          out_nM.stride(0), min(MAX_ROWS, n - start), m, threads)
    return out_nM


PANEL = 16  # weight rows per panel of the packed layout


def pack_panels(w_SMK: torch.Tensor) -> torch.Tensor:
    """[S, M, K] -> [S, ceil(M/16), K, 16]: each panel holds 16 rows of W column by column (zero rows past M)."""
    s, m, k = w_SMK.shape
    padded = -(-m // PANEL) * PANEL
    if padded != m:
        w_SMK = torch.cat([w_SMK, w_SMK.new_zeros(s, padded - m, k)], dim=1)
    return w_SMK.reshape(s, padded // PANEL, PANEL, k).transpose(2, 3).contiguous()


def unpack_panels(panels_PK16: torch.Tensor, m: int) -> torch.Tensor:
    """One slot's panels back to its [M, K] weights (a copy)."""
    p, k, _ = panels_PK16.shape
    return panels_PK16.transpose(1, 2).reshape(p * PANEL, k)[:m].contiguous()


def panels_matmul(x_nK: torch.Tensor, panels_PK16: torch.Tensor, m: int, out_nM: torch.Tensor) -> torch.Tensor:
    """out_nM = x_nK @ W_MK.T for W packed by ``pack_panels`` (one slot's [P, K, 16]); float32 CPU tensors."""
    lib = _checked_library("panels_matmul", (x_nK, panels_PK16, out_nM), (2, 3, 2))
    n, k = x_nK.shape
    if (not panels_PK16.is_contiguous() or panels_PK16.shape[1:] != (k, PANEL)
            or panels_PK16.shape[0] != -(-m // PANEL) or tuple(out_nM.shape) != (n, m)):
        raise ValueError(f"panels_matmul: x {tuple(x_nK.shape)}, panels {tuple(panels_PK16.shape)} for {m} rows, "
                         f"out {tuple(out_nM.shape)} do not fit together")
    lib.panels_gemm_f32(panels_PK16.data_ptr(), m, k, x_nK.data_ptr(), x_nK.stride(0), out_nM.data_ptr(),
                        out_nM.stride(0), n, torch.get_num_threads())
    return out_nM


def _quantized_kernel(kind: str, x_nK: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, quant: ExpertQuant,
                      out_nM: torch.Tensor, avx512: bool | None = None):
    """Check one projection's quantized weights (``q``, ``scale`` as QuantizedExpertWeights holds one slot's)
    against x and out; return ``run(row, rows)``, which computes ``rows`` rows of out from ``row`` on. ``avx512``
    (the MXFP4 rows kernel only): None for ``avx512_enabled()``, False for the AVX2 kernel, True for the AVX-512
    one (an error on a CPU without it)."""
    name = f"quantized_{kind}_matmul"
    lib = _checked_library(name, (x_nK, out_nM), (2, 2))
    (n, k), m = x_nK.shape, out_nM.shape[1]
    fp8 = quant.format == FP8
    want = {"q": (quant.weight_shape(m, k), torch.float8_e4m3fn if fp8 else torch.uint8),
            "scale": (quant.scale_shape(m, k), torch.float32 if fp8 else torch.uint8)}
    for label, t in (("q", q), ("scale", scale)):
        shape, dtype = want[label]
        if tuple(t.shape) != shape or t.dtype != dtype or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"{name}: {label} is {t.dtype} {tuple(t.shape)} on {t.device} (contiguous: "
                             f"{t.is_contiguous()}); x {tuple(x_nK.shape)} and out {tuple(out_nM.shape)} need it "
                             f"{dtype} {shape}, contiguous, on the CPU")
    if out_nM.shape[0] != n:
        raise ValueError(f"{name}: x {tuple(x_nK.shape)} and out {tuple(out_nM.shape)} do not fit together")
    if not fp8 and k % MXFP4_BLOCK:
        raise ValueError(f"{name}: mxfp4 needs K to be a multiple of {MXFP4_BLOCK}; got {k}")
    name_suffix = ""
    if not fp8 and kind == "rows":
        if avx512 is None:
            avx512 = avx512_enabled()
        elif avx512 and not cpu_has_avx512():
            raise RuntimeError(f"{name}: this CPU has no AVX-512 (F, BW, VL and DQ) for the AVX-512 kernel")
        name_suffix = "" if avx512 else "_avx2"
    fn = getattr(lib, f"{quant.format}_{kind}_gemm{name_suffix}")
    head = (q.data_ptr(), k, scale.data_ptr(), *quant.block) if fp8 else (q.data_ptr(), scale.data_ptr(), k)

    def run(row: int, rows: int) -> None:
        status = fn(*head, x_nK[row].data_ptr(), x_nK.stride(0), out_nM[row].data_ptr(), out_nM.stride(0), rows, m,
                    torch.get_num_threads())
        if status == -2:
            raise MemoryError(f"{name}: the kernel could not allocate its buffers")
        if status != 0:
            raise RuntimeError(f"{name}: the kernel refused its arguments (status {status})")

    return run


def quantized_rows_matmul(x_nK: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, quant: ExpertQuant,
                          out_nM: torch.Tensor, avx512: bool | None = None) -> torch.Tensor:
    """out_nM = x_nK @ W.T for one projection's quantized weights, decoded in registers (``fp8_rows_gemm``,
    ``mxfp4_rows_gemm``); any n, in chunks of MAX_ROWS that each decode W again. ``avx512`` picks MXFP4's kernel:
    None (default) the AVX-512 one where ``avx512_enabled()``, False the AVX2 one, True the AVX-512 one or an error."""
    run = _quantized_kernel("rows", x_nK, q, scale, quant, out_nM, avx512)
    for start in range(0, x_nK.shape[0], MAX_ROWS):
        run(start, min(MAX_ROWS, x_nK.shape[0] - start))
    return out_nM


def quantized_panels_matmul(x_nK: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, quant: ExpertQuant,
                            out_nM: torch.Tensor) -> torch.Tensor:
    """out_nM = x_nK @ W.T for one projection's quantized weights, dequantized 16 rows at a time into a panel
    that every row of x passes over (``fp8_panels_gemm``, ``mxfp4_panels_gemm``); any n."""
    if x_nK.shape[0]:
        _quantized_kernel("panels", x_nK, q, scale, quant, out_nM)(0, x_nK.shape[0])
    return out_nM
