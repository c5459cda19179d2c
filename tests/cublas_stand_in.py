"""A ``libcublas`` for the CPU: the few cuBLAS entry points ``kernels/capture.py`` calls through
``ctypes`` (a captured step's products, and the eager ones with ``kernels.OWN_HANDLE``), written as
plain column-major loops in C with cuBLAS's signatures, so that what we pass them — operand order,
transposes, leading dimensions, strides, α and β, the handle's stream and workspace — is checked
without a GPU. Tests hand it to ``capture.bind`` in place of the library ``capture._libcublas``
finds (on a GPU machine, the real one: the stand-in must not meet device pointers).
"""
import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from kernel_emulator import _compiler

SOURCE = r"""
#include <stddef.h>
#include <vector>
#define API extern "C"
typedef struct { void *stream, *workspace; size_t workspace_size; int alive; } Handle;
static Handle handles[64];
static int created = 0;

API int cublasCreate_v2(Handle **h) { if (created == 64) return 1; handles[created].alive = 1; *h = &handles[created++]; return 0; }
API int cublasDestroy_v2(Handle *h) { h->alive = 0; return 0; }
API int cublasSetStream_v2(Handle *h, void *s) { h->stream = s; return 0; }
API int cublasSetWorkspace_v2(Handle *h, void *w, size_t n) { h->workspace = w; h->workspace_size = n; return 0; }
/* what a test reads back: the handle's stream, workspace, workspace size */
API void stand_in_handle(Handle *h, void **stream, void **workspace, size_t *size) {
    *stream = h->stream; *workspace = h->workspace; *size = h->workspace_size; }

template<typename T>
static void gemm(int ta, int tb, int m, int n, int k, const T *alpha, const T *A, int lda, long long sa,
                 const T *B, int ldb, long long sb, const T *beta, T *C, int ldc, long long sc, int batch) {
    std::vector<double> column(m);                  /* C[:, j] summed in double, in the order that
                                                       walks A's memory in a row (fast enough for tests) */
    for (int p = 0; p < batch; ++p)
        for (int j = 0; j < n; ++j) {
            const T *a = A + p * sa, *b = B + p * sb;
            for (int i = 0; i < m; ++i) column[i] = 0;
            if (!ta)                                /* op(A) = A: column l of A is contiguous */
                for (int l = 0; l < k; ++l) {
                    double blj = tb ? b[l * ldb + j] : b[j * ldb + l];              /* op(B)[l, j] */
                    for (int i = 0; i < m; ++i) column[i] += (double)a[l * lda + i] * blj;
                }
            else                                    /* op(A) = Aᵀ: row i of op(A) is contiguous */
                for (int i = 0; i < m; ++i) {
                    double s = 0;
                    for (int l = 0; l < k; ++l) s += (double)a[i * lda + l] * (tb ? b[l * ldb + j] : b[j * ldb + l]);
                    column[i] = s;
                }
            for (int i = 0; i < m; ++i) {
                T *c = &C[p * sc + j * ldc + i];
                *c = (T)(*alpha * column[i] + (*beta == 0 ? 0 : *beta * *c));
            }
        }
}

API int cublasSgemm_v2(Handle *h, int ta, int tb, int m, int n, int k, const float *al, const float *A, int lda,
                   const float *B, int ldb, const float *be, float *C, int ldc) {
    gemm<float>(ta, tb, m, n, k, al, A, lda, 0, B, ldb, 0, be, C, ldc, 0, 1); return 0; }
API int cublasDgemm_v2(Handle *h, int ta, int tb, int m, int n, int k, const double *al, const double *A, int lda,
                   const double *B, int ldb, const double *be, double *C, int ldc) {
    gemm<double>(ta, tb, m, n, k, al, A, lda, 0, B, ldb, 0, be, C, ldc, 0, 1); return 0; }
/* types: 0 CUDA_R_32F, 1 CUDA_R_64F; compute 68 (32F), 70 (64F), 77 (32F fast TF32) */
API int cublasGemmStridedBatchedEx(Handle *h, int ta, int tb, int m, int n, int k, const void *al, const void *A,
                               int at, int lda, long long sa, const void *B, int bt, int ldb, long long sb,
                               const void *be, void *C, int ct, int ldc, long long sc, int batch, int compute, int algo) {
    if (at != bt || at != ct || (at == 0 && compute != 68 && compute != 77) || (at == 1 && compute != 70)) return 7;
    if (at == 0) gemm<float>(ta, tb, m, n, k, (const float *)al, (const float *)A, lda, sa, (const float *)B, ldb, sb,
                             (const float *)be, (float *)C, ldc, sc, batch);
    else gemm<double>(ta, tb, m, n, k, (const double *)al, (const double *)A, lda, sa, (const double *)B, ldb, sb,
                      (const double *)be, (double *)C, ldc, sc, batch);
    return 0;
}
API int cublasGemmEx(Handle *h, int ta, int tb, int m, int n, int k, const void *al, const void *A, int at, int lda,
                 const void *B, int bt, int ldb, const void *be, void *C, int ct, int ldc, int compute, int algo) {
    return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, al, A, at, lda, 0, B, bt, ldb, 0, be, C, ct, ldc, 0, 1,
                                      compute, algo); }

template<typename T>
static void gemv(int t, int m, int n, const T *alpha, const T *A, int lda, const T *x, int incx,
                 const T *beta, T *y, int incy) {
    int rows = t ? n : m, cols = t ? m : n;
    for (int i = 0; i < rows; ++i) {
        double s = 0;
        for (int j = 0; j < cols; ++j) s += (double)(t ? A[i * lda + j] : A[j * lda + i]) * x[j * incx];
        y[i * incy] = (T)(*alpha * s + (*beta == 0 ? 0 : *beta * y[i * incy]));
    }
}
API int cublasSgemv_v2(Handle *h, int t, int m, int n, const float *al, const float *A, int lda, const float *x, int incx,
                   const float *be, float *y, int incy) { gemv<float>(t, m, n, al, A, lda, x, incx, be, y, incy); return 0; }
API int cublasDgemv_v2(Handle *h, int t, int m, int n, const double *al, const double *A, int lda, const double *x, int incx,
                   const double *be, double *y, int incy) { gemv<double>(t, m, n, al, A, lda, x, incx, be, y, incy); return 0; }
"""


def load():
    """Build (once per source) and load the stand-in; returns its ``ctypes.CDLL``."""
    digest = hashlib.sha1(SOURCE.encode()).hexdigest()[:16]
    build = Path(tempfile.gettempdir()) / f"mt-cublas-stand-in-{digest}"
    build.mkdir(exist_ok=True)
    lib = build / "libcublas_stand_in.so"
    if not lib.exists():   # built under this process's names, then moved: parallel test workers race
        source, built = build / f"stand_in.{os.getpid()}.cpp", build / f"libcublas.{os.getpid()}.so"
        source.write_text(SOURCE)
        result = subprocess.run([*_compiler(), "-O2", "-shared", "-fPIC", "-o", str(built), str(source)],
                                capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"compiling the cuBLAS stand-in failed:\n{result.stderr[:4000]}")
        os.replace(built, lib)
    library = ctypes.CDLL(str(lib))
    library.stand_in_handle.argtypes = [ctypes.c_void_p] + [ctypes.c_void_p] * 3
    return library
