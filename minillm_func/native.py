"""A native CPU kernel for the pure AdamW update, compiled on first use; optional.

``optim.adamw``'s pure fast path needs an update that reads the old params
and moments and writes new ones, in one pass. torch has no such kernel: its
fused AdamW (``torch._fused_adamw_``) only writes in place, and a compiled or
``torch._foreach_*`` out-of-place update pays, on top of the 4 reads and 3
writes of the in-place kernel, a read of every output cache line before it is
written (the CPU's read-for-ownership): about 10/7 of the fused kernel's
memory traffic (the compiled update measured 1.7-2.2x the fused kernel,
``benchmarks/RESULTS.md``). This kernel writes its outputs with non-temporal
(streaming) stores, which skip that read, so an out-of-place update moves as
many bytes as the in-place one (measured 1.06-1.10x).

The C source below is compiled once per machine with the system C compiler
(``$CC``, else ``cc``) into a cache directory (``$MINILLM_FUNC_CACHE``, else
``~/.cache/minillm_func``, else the temporary directory), then loaded with
``ctypes``. Where there is no compiler, the build fails, or
``MINILLM_FUNC_NATIVE=0`` is set, :func:`available` is False and the caller
uses torch's kernels instead: no number depends on which one runs beyond float
rounding (the math follows ``torch._fused_adamw_``'s operation order).

Scope: float32, contiguous, CPU tensors, x86-64. Threads: OpenMP, as many as
``torch.get_num_threads()``, one parallel region per update; the library links
``libgomp.so.1``, which is the OpenMP runtime torch's own wheels load, so both
share one thread pool (with another runtime it still works, with two pools).
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "unavailable_reason", "eligible", "adamw_into"]

_SOURCE = r"""
#include <stdint.h>
#include <math.h>
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* Hyper-parameters as torch's fused AdamW casts them to float. */
typedef struct { float w1, b2, c2, neg_step, bc2_sqrt, eps; int lerp_from_end; } hyper_t;

/* One element; the same operations, in the same order, as ATen's fused AdamW
   (FusedAdamKernel.cpp): lerp for the first moment (torch's two-sided formula),
   then v*b2 + (1-b2)*g*g (one fma, as torch's build contracts it), then
   p*(1-lr*wd) + (-step)*m / (sqrt(v)/bc2_sqrt + eps). */
static inline void one(const float* p, const float* g, const float* m, const float* v,
                       float* po, float* mo, float* vo, int64_t i, float decay, const hyper_t* h) {
  float gg = g[i], mm = m[i];
  mm = h->lerp_from_end ? fmaf(h->w1 - 1.0f, gg - mm, gg) : fmaf(h->w1, gg - mm, mm);
  float vv = fmaf(h->c2 * gg, gg, v[i] * h->b2);
  float den = sqrtf(vv) / h->bc2_sqrt + h->eps;
  po[i] = p[i] * decay + h->neg_step * mm / den;
  mo[i] = mm;
  vo[i] = vv;
}

#if defined(__AVX512F__)
#define W 16
#define VT __m512
#define SET1 _mm512_set1_ps
#define LOADU _mm512_loadu_ps
#define ADD _mm512_add_ps
#define SUB _mm512_sub_ps
#define MUL _mm512_mul_ps
#define DIV _mm512_div_ps
#define SQRT _mm512_sqrt_ps
#define FMA _mm512_fmadd_ps
#define STREAM _mm512_stream_ps
#elif defined(__AVX2__) && defined(__FMA__)
#define W 8
#define VT __m256
#define SET1 _mm256_set1_ps
#define LOADU _mm256_loadu_ps
#define ADD _mm256_add_ps
#define SUB _mm256_sub_ps
#define MUL _mm256_mul_ps
#define DIV _mm256_div_ps
#define SQRT _mm256_sqrt_ps
#define FMA _mm256_fmadd_ps
#define STREAM _mm256_stream_ps
#endif

static void span(const float* p, const float* g, const float* m, const float* v,
                 float* po, float* mo, float* vo, int64_t i, int64_t hi, float decay, const hyper_t* h) {
#ifdef W
  const uintptr_t align = W * sizeof(float) - 1;
  /* Streaming stores need aligned addresses: scalar steps until po is aligned;
     the vector loop runs only when mo and vo are then aligned too. */
  for (; i < hi && (((uintptr_t)(po + i)) & align); ++i) one(p, g, m, v, po, mo, vo, i, decay, h);
  if (((((uintptr_t)(mo + i)) | ((uintptr_t)(vo + i))) & align) == 0) {
    const VT d = SET1(decay), w1 = SET1(h->w1), w1m1 = SET1(h->w1 - 1.0f), b2 = SET1(h->b2), c2 = SET1(h->c2),
             ns = SET1(h->neg_step), bc = SET1(h->bc2_sqrt), eps = SET1(h->eps);
    for (; i + W <= hi; i += W) {
      VT gv = LOADU(g + i), mv = LOADU(m + i);
      mv = h->lerp_from_end ? FMA(w1m1, SUB(gv, mv), gv) : FMA(w1, SUB(gv, mv), mv);
      VT vv = FMA(MUL(c2, gv), gv, MUL(LOADU(v + i), b2));
      VT den = ADD(DIV(SQRT(vv), bc), eps);
      VT pv = ADD(MUL(LOADU(p + i), d), DIV(MUL(ns, mv), den));
      STREAM(po + i, pv);
      STREAM(mo + i, mv);
      STREAM(vo + i, vv);
    }
  }
#endif
  for (; i < hi; ++i) one(p, g, m, v, po, mo, vo, i, decay, h);
}

static void keep(const float* p, const float* m, const float* v, float* po, float* mo, float* vo,
                 int64_t i, int64_t hi) {
  for (; i < hi; ++i) { po[i] = p[i]; mo[i] = m[i]; vo[i] = v[i]; }
}

/* ptrs: 7 per leaf (p, g, m, v, p_out, m_out, v_out); the outputs may be the inputs (in place).
   *skip non-zero: the outputs receive the inputs unchanged (a skipped update; the flag is read
   here, so the caller never waits on it). Threads split the concatenation of all leaves into
   equal element ranges. */
void adamw_f32(int64_t n_leaves, float** ptrs, const int64_t* sizes, const float* decays,
               const hyper_t* h, int nthreads, const unsigned char* skip) {
  const int skipped = *skip != 0;
  int64_t total = 0;
  for (int64_t k = 0; k < n_leaves; ++k) total += sizes[k];
#ifdef _OPENMP
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1 && total >= 65536)
#endif
  {
    int t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    int64_t lo = total * t / nt, hi = total * (t + 1) / nt, base = 0;
    for (int64_t k = 0; k < n_leaves && base < hi; base += sizes[k], ++k) {
      int64_t a = lo > base ? lo - base : 0, b = hi - base < sizes[k] ? hi - base : sizes[k];
      float** q = ptrs + 7 * k;
      if (a < b && skipped) {
        if (q[4] != q[0]) keep(q[0], q[2], q[3], q[4], q[5], q[6], a, b);
      } else if (a < b) {
        span(q[0], q[1], q[2], q[3], q[4], q[5], q[6], a, b, decays[k], h);
      }
    }
#ifdef W
    _mm_sfence(); /* streaming stores are weakly ordered: publish them before returning */
#endif
  }
}
"""

# -ffp-contract=off: no fused multiply-adds beyond the ones written above (torch's order).
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared"]


class _Hyper(ctypes.Structure):
    _fields_ = [("w1", ctypes.c_float), ("b2", ctypes.c_float), ("c2", ctypes.c_float),
                ("neg_step", ctypes.c_float), ("bc2_sqrt", ctypes.c_float), ("eps", ctypes.c_float),
                ("lerp_from_end", ctypes.c_int)]


_lock = threading.Lock()
_lib = None          # the loaded library, once built
_failure: str | None = None  # why it could not be built (then never retried in this process)


def _cache_dir() -> Path:
    for candidate in (os.environ.get("MINILLM_FUNC_CACHE"), Path.home() / ".cache" / "minillm_func",
                      Path(tempfile.gettempdir()) / f"minillm_func-{os.getuid() if hasattr(os, 'getuid') else 0}"):
        if not candidate:
            continue
        try:
            Path(candidate).mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                return Path(candidate)
        except OSError:
            continue
    raise OSError("no writable cache directory for the native AdamW kernel")


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (a cache shared across machines stays valid)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def _build():
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc or platform.machine() not in ("x86_64", "AMD64"):
        raise OSError("no C compiler on PATH" if not cc else f"no kernel for {platform.machine()}")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    last_error = ""
    for omp in (["-fopenmp"], []):  # a compiler without OpenMP still gives a (one-thread) kernel
        flags = _FLAGS + omp
        key = hashlib.sha256("\0".join([_SOURCE, " ".join(flags), cc, version, _cpu_key()]).encode()).hexdigest()[:16]
        target = _cache_dir() / f"adamw-{key}.so"
        if not target.exists():
            src = target.with_suffix(f".{os.getpid()}.c")
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            src.write_text(_SOURCE)
            try:
                done = subprocess.run([cc, *flags, str(src), "-o", str(tmp), "-lm"], capture_output=True,
                                      text=True, timeout=300)
                if done.returncode != 0:
                    last_error = done.stderr[-2000:]
                    continue
                os.replace(tmp, target)  # atomic: a concurrent build never loads a half-written file
            finally:
                for leftover in (src, tmp):
                    leftover.unlink(missing_ok=True)
        lib = ctypes.CDLL(str(target))
        lib.adamw_f32.restype = None
        lib.adamw_f32.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                                  ctypes.POINTER(ctypes.c_float), ctypes.POINTER(_Hyper), ctypes.c_int,
                                  ctypes.c_void_p]
        return lib
    raise OSError(f"the C compiler failed: {last_error}")


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call: about a second, once per machine)."""
    global _lib, _failure
    if _lib is not None:
        return True
    if _failure is not None:
        return False
    with _lock:
        if _lib is None and _failure is None:
            if os.environ.get("MINILLM_FUNC_NATIVE", "1") == "0":
                _failure = "disabled by MINILLM_FUNC_NATIVE=0"
            else:
                try:
                    _lib = _build()
                except (OSError, subprocess.SubprocessError) as e:
                    _failure = str(e)
    return _lib is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked yet)."""
    return _failure


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eligible(ps, gs, ms, vs) -> bool:
    """Whether every tensor is what the kernel reads through its raw address: float32, contiguous, on the
    CPU, a plain tensor (not a subclass); gradients also not a lazy zero tensor or a negated view."""
    f32 = torch.float32
    return (all(x.dtype == f32 and x.device.type == "cpu" and type(x) in _PLAIN and x.is_contiguous()
                for xs in (ps, gs, ms, vs) for x in xs)
            and not any(g.is_neg() or g._is_zerotensor() for g in gs))


def adamw_into(ps, gs, ms, vs, out_p, out_m, out_v, decays, *, lr: float, b1: float, b2: float, eps: float,
               weight_decay: float, step: int, skip: torch.Tensor | None = None) -> None:
    """One AdamW step (update number ``step``, counted from 1) written into ``out_*``.

    Reads ``ps, gs, ms, vs``; ``out_*`` may be those same tensors (in place) or
    other tensors of the same sizes. ``decays[i]`` says whether leaf ``i`` is
    decayed. Hyper-parameters are Python numbers; the bias corrections are
    computed here in float64, as torch does. ``skip``: a 0-d bool CPU tensor; when
    true the outputs receive the inputs unchanged (read inside the kernel).
    """
    if not available():
        raise RuntimeError(f"the native AdamW kernel is not available: {_failure}")
    n = len(ps)
    step_size = lr / (1 - b1 ** step)
    h = _Hyper(w1=1 - b1, b2=b2, c2=1 - b2, neg_step=-step_size, bc2_sqrt=math.sqrt(1 - b2 ** step), eps=eps,
               lerp_from_end=int(abs(1 - b1) >= 0.5))
    ptrs = (ctypes.c_void_p * (7 * n))(*[x.data_ptr() for group in zip(ps, gs, ms, vs, out_p, out_m, out_v)
                                         for x in group])
    sizes, factors = _sizes_and_factors(tuple(x.numel() for x in ps), tuple(decays), 1 - lr * weight_decay)
    flag = (torch.zeros((), dtype=torch.uint8) if skip is None else skip.to(torch.uint8)).contiguous()
    _lib.adamw_f32(n, ptrs, sizes, factors, ctypes.byref(h), torch.get_num_threads(), ctypes.c_void_p(flag.data_ptr()))


_last_arrays: list = [None, None]  # (key, arrays): the previous call's, reused while nothing changes


def _sizes_and_factors(sizes: tuple, decays: tuple, factor: float):
    key = (sizes, decays, factor)
    if _last_arrays[0] != key:
        arrays = ((ctypes.c_int64 * len(sizes))(*sizes),
                  (ctypes.c_float * len(sizes))(*[factor if d else 1.0 for d in decays]))
        _last_arrays[:] = [key, arrays]
    return _last_arrays[1]
