"""CUDA C++ of the fused kernels (compiled by NVRTC through CuPy, for float and double).

Each kernel computes the same formula as its array twin in ``minitransformer.functional`` (the
docstring there names it); one thread block handles one row where a row reduction is needed.
Compiled with ``--fmad=false`` so a multiply-add rounds twice, as the array version does.
"""

PRELUDE = r"""
template<typename T> __device__ __forceinline__ T neg_inf();
template<> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template<> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000ULL); }
__device__ __forceinline__ float t_exp(float x) { return expf(x); }
__device__ __forceinline__ double t_exp(double x) { return exp(x); }
__device__ __forceinline__ float t_log(float x) { return logf(x); }
__device__ __forceinline__ double t_log(double x) { return log(x); }
__device__ __forceinline__ float t_sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ double t_sqrt(double x) { return sqrt(x); }
template<typename T> __device__ __forceinline__ T t_max(T a, T b) { return a > b ? a : b; }

template<typename T, bool IS_MAX> __device__ __forceinline__ T warp_reduce(T v) {
    for (int o = 16; o > 0; o >>= 1) {
        T other = __shfl_xor_sync(0xffffffffu, v, o);
        v = IS_MAX ? t_max(v, other) : v + other;
    }
    return v;
}

// Sum (or max) over the block; every thread gets the result. smem holds 33 values.
template<typename T, bool IS_MAX> __device__ T block_reduce(T v, T* smem) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_reduce<T, IS_MAX>(v);
    __syncthreads();                      // earlier readers of smem are done
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    if (warp == 0) {
        T w = lane < warps ? smem[lane] : (IS_MAX ? neg_inf<T>() : T(0));
        w = warp_reduce<T, IS_MAX>(w);
        if (lane == 0) smem[32] = w;
    }
    __syncthreads();
    return smem[32];
}

// SplitMix64: number i of a stream is mix(key + (offset + i) * golden) (counter-based, stateless).
__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
__device__ __forceinline__ float uniform01(unsigned long long key, unsigned long long counter) {
    return (float)(mix64(key + counter * 0x9E3779B97F4A7C15ULL) >> 40) * (1.0f / 16777216.0f);
}
"""

KERNELS = r"""
// softmax(S * scale) over the last axis of rows of length Lk, masked places (mask == 0) get 0;
// a row with no key left is all 0. The mask is read through its broadcast strides (ms0..ms3).
// With p_drop > 0 it also writes Pt = P * m, m the mask dropout_apply would use on P (the same
// numbers: dropout on the attention weights without a launch of its own).
template<typename T>
__global__ void masked_softmax_fwd(const T* __restrict__ S, const unsigned char* __restrict__ mask, int has_mask,
                                   long long ms0, long long ms1, long long ms2, long long ms3,
                                   int d1, int Lq, int Lk, T scale, T* __restrict__ P,
                                   unsigned long long key, unsigned long long offset,
                                   const unsigned long long* __restrict__ base, float p_drop, T keep_scale,
                                   T* __restrict__ Pt) {
    __shared__ T smem[33];
    const long long row = blockIdx.x;
    const T* s = S + row * Lk;
    T* p = P + row * Lk;
    if (p_drop > 0.0f && base != nullptr) offset += *base;
    const unsigned char* m = mask;
    if (has_mask) {
        const long long iq = row % Lq, rest = row / Lq, i1 = rest % d1, i0 = rest / d1;
        m = mask + i0 * ms0 + i1 * ms1 + iq * ms2;
    }
    T mx = neg_inf<T>();
    for (int k = threadIdx.x; k < Lk; k += blockDim.x)
        if (!has_mask || m[k * ms3]) mx = t_max(mx, s[k] * scale);
    mx = block_reduce<T, true>(mx, smem);
    const bool empty = !(mx > neg_inf<T>());
    T total = 0;
    if (!empty)
        for (int k = threadIdx.x; k < Lk; k += blockDim.x)
            if (!has_mask || m[k * ms3]) total += t_exp(s[k] * scale - mx);
    total = block_reduce<T, false>(total, smem);
    for (int k = threadIdx.x; k < Lk; k += blockDim.x) {
        const T v = (!empty && (!has_mask || m[k * ms3])) ? t_exp(s[k] * scale - mx) / total : T(0);
        p[k] = v;
        if (p_drop > 0.0f) Pt[row * Lk + k] = uniform01(key, offset + row * Lk + k) >= p_drop ? v * keep_scale : T(0);
    }
}

// dS = P * (dP - sum_k dP * P) * scale, row by row. With p_drop > 0, dP is first multiplied by the
// dropout mask of the forward's P (dropout_apply's numbers, drawn again): dP * m in the same pass.
template<typename T>
__global__ void softmax_bwd(const T* __restrict__ P, const T* __restrict__ dP, int L, T scale,
                            unsigned long long key, unsigned long long offset,
                            const unsigned long long* __restrict__ base, float p_drop, T keep_scale,
                            T* __restrict__ dS) {
    __shared__ T smem[33];
    const long long row = blockIdx.x;
    const T* p = P + row * L;
    const T* dp = dP + row * L;
    if (p_drop > 0.0f && base != nullptr) offset += *base;
    T dot = 0;
    for (int k = threadIdx.x; k < L; k += blockDim.x) {
        const T d = p_drop > 0.0f ? (uniform01(key, offset + row * L + k) >= p_drop ? dp[k] * keep_scale : T(0)) : dp[k];
        dot += d * p[k];
    }
    dot = block_reduce<T, false>(dot, smem);
    for (int k = threadIdx.x; k < L; k += blockDim.x) {
        const T d = p_drop > 0.0f ? (uniform01(key, offset + row * L + k) >= p_drop ? dp[k] * keep_scale : T(0)) : dp[k];
        dS[row * L + k] = p[k] * (d - dot) * scale;
    }
}

// log_softmax over rows of length L: y = (x - max) - log(sum(exp(x - max))), the array formula.
template<typename T>
__global__ void log_softmax_fwd(const T* __restrict__ x, int L, T* __restrict__ y) {
    __shared__ T smem[33];
    const long long r0 = (long long)blockIdx.x * L;
    T m = neg_inf<T>();
    for (int k = threadIdx.x; k < L; k += blockDim.x) m = t_max(m, x[r0 + k]);
    m = block_reduce<T, true>(m, smem);
    T acc = 0;
    for (int k = threadIdx.x; k < L; k += blockDim.x) acc += t_exp(x[r0 + k] - m);
    const T lse = t_log(block_reduce<T, false>(acc, smem));
    for (int k = threadIdx.x; k < L; k += blockDim.x) y[r0 + k] = (x[r0 + k] - m) - lse;
}

// dx = g - exp(y) * sum(g) over rows of length L (exp(y) is the softmax).
template<typename T>
__global__ void log_softmax_bwd(const T* __restrict__ y, const T* __restrict__ g, int L, T* __restrict__ dx) {
    __shared__ T smem[33];
    const long long r0 = (long long)blockIdx.x * L;
    T acc = 0;
    for (int k = threadIdx.x; k < L; k += blockDim.x) acc += g[r0 + k];
    const T total = block_reduce<T, false>(acc, smem);
    for (int k = threadIdx.x; k < L; k += blockDim.x) dx[r0 + k] = g[r0 + k] - t_exp(y[r0 + k]) * total;
}

// y = x * m with m = [u >= p] * scale, u = uniform01(key, offset + i): inverted dropout whose mask
// is recomputed from (key, offset) in the backward instead of being stored. In a captured CUDA graph
// the offset is relative to *base, which the host sets before each replay (fresh masks every step).
template<typename T>
__global__ void dropout_apply(const T* __restrict__ x, T* __restrict__ y, long long n, unsigned long long key,
                              unsigned long long offset, const unsigned long long* __restrict__ base,
                              float p, T scale) {
    if (base != nullptr) offset += *base;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = uniform01(key, offset + i) >= p ? x[i] * scale : T(0);
}

// LayerNorm over rows of length d: y = (x - mean) * rstd * w + b; keeps mean and rstd per row.
template<typename T>
__global__ void layer_norm_fwd(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                               int has_w, int has_b, int d, T eps, T* __restrict__ y,
                               T* __restrict__ mean_out, T* __restrict__ rstd_out) {
    __shared__ T smem[33];
    const long long row = blockIdx.x;
    const T* xr = x + row * d;
    T acc = 0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) acc += xr[k];
    const T mean = block_reduce<T, false>(acc, smem) / T(d);
    acc = 0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) { T c = xr[k] - mean; acc += c * c; }
    const T rstd = T(1) / t_sqrt(block_reduce<T, false>(acc, smem) / T(d) + eps);
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        T out = (xr[k] - mean) * rstd;
        if (has_w) out = out * w[k];
        if (has_b) out = out + b[k];
        y[row * d + k] = out;
    }
    if (threadIdx.x == 0) { mean_out[row] = mean; rstd_out[row] = rstd; }
}

// dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)) with dxh = g * w, xh = (x - mean) * rstd.
template<typename T>
__global__ void layer_norm_bwd_dx(const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ w,
                                  int has_w, const T* __restrict__ mean, const T* __restrict__ rstd, int d,
                                  T* __restrict__ dx) {
    __shared__ T smem[33];
    const long long row = blockIdx.x;
    const T mu = mean[row], rs = rstd[row];
    const T* xr = x + row * d;
    const T* gr = g + row * d;
    T a = 0, c = 0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        T xh = (xr[k] - mu) * rs, dxh = has_w ? gr[k] * w[k] : gr[k];
        a += dxh;
        c += dxh * xh;
    }
    a = block_reduce<T, false>(a, smem) / T(d);
    c = block_reduce<T, false>(c, smem) / T(d);
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        T xh = (xr[k] - mu) * rs, dxh = has_w ? gr[k] * w[k] : gr[k];
        dx[row * d + k] = rs * (dxh - a - xh * c);
    }
}

// Partial column sums of g * xh (for dw) and g (for db) over chunks of rows, into part (chunks, 2, d):
// part[c, 0] for dw, part[c, 1] for db, so that one sum over the chunks gives both.
template<typename T>
__global__ void layer_norm_bwd_dwdb(const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ mean,
                                    const T* __restrict__ rstd, long long R, int d, int rows_per_chunk,
                                    T* __restrict__ part) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const long long r0 = (long long)blockIdx.x * rows_per_chunk;
    const long long r1 = r0 + rows_per_chunk < R ? r0 + rows_per_chunk : R;
    T aw = 0, ab = 0;
    for (long long r = r0; r < r1; ++r) {
        T gv = g[r * d + j];
        aw += gv * ((x[r * d + j] - mean[r]) * rstd[r]);
        ab += gv;
    }
    part[(2 * (long long)blockIdx.x) * d + j] = aw;
    part[(2 * (long long)blockIdx.x + 1) * d + j] = ab;
}

// "Add & Norm": z = x + s * m, m = dropout_apply's mask of s (number offset + i of the stream, i the
// element's index) when p > 0, else 1; then LayerNorm of z exactly as layer_norm_fwd. Keeps z, mean
// and rstd for the backward.
template<typename T>
__global__ void add_norm_fwd(const T* __restrict__ x, const T* __restrict__ s, const T* __restrict__ w,
                             const T* __restrict__ b, int has_w, int has_b, int d, T eps,
                             unsigned long long key, unsigned long long offset,
                             const unsigned long long* __restrict__ base, float p, T scale,
                             T* __restrict__ z, T* __restrict__ y, T* __restrict__ mean_out,
                             T* __restrict__ rstd_out) {
    __shared__ T smem[33];
    const long long r0 = (long long)blockIdx.x * d;
    if (base != nullptr) offset += *base;
    T acc = 0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        T sk = s[r0 + k];
        if (p > 0.f) sk = uniform01(key, offset + r0 + k) >= p ? sk * scale : T(0);
        const T zk = x[r0 + k] + sk;
        z[r0 + k] = zk;                 // read back below by the same thread only
        acc += zk;
    }
    const T mean = block_reduce<T, false>(acc, smem) / T(d);
    acc = 0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) { T c = z[r0 + k] - mean; acc += c * c; }
    const T rstd = T(1) / t_sqrt(block_reduce<T, false>(acc, smem) / T(d) + eps);
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        T out = (z[r0 + k] - mean) * rstd;
        if (has_w) out = out * w[k];
        if (has_b) out = out + b[k];
        y[r0 + k] = out;
    }
    if (threadIdx.x == 0) { mean_out[blockIdx.x] = mean; rstd_out[blockIdx.x] = rstd; }
}

// dz as layer_norm_bwd_dx computes dx (z in place of x), and, when p > 0, ds = dz * m with the mask
// of add_norm_fwd regenerated from (key, offset).
template<typename T>
__global__ void add_norm_bwd(const T* __restrict__ z, const T* __restrict__ g, const T* __restrict__ w,
                             int has_w, const T* __restrict__ mean, const T* __restrict__ rstd, int d,
                             unsigned long long key, unsigned long long offset,
                             const unsigned long long* __restrict__ base, float p, T scale,
                             T* __restrict__ dz, T* __restrict__ ds) {
    __shared__ T smem[33];
    const long long r0 = (long long)blockIdx.x * d;
    const T mu = mean[blockIdx.x], rs = rstd[blockIdx.x];
    if (base != nullptr) offset += *base;
    T a = 0, c = 0;
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        T zh = (z[r0 + k] - mu) * rs, dzh = has_w ? g[r0 + k] * w[k] : g[r0 + k];
        a += dzh;
        c += dzh * zh;
    }
    a = block_reduce<T, false>(a, smem) / T(d);
    c = block_reduce<T, false>(c, smem) / T(d);
    for (int k = threadIdx.x; k < d; k += blockDim.x) {
        T zh = (z[r0 + k] - mu) * rs, dzh = has_w ? g[r0 + k] * w[k] : g[r0 + k];
        const T v = rs * (dzh - a - zh * c);
        dz[r0 + k] = v;
        if (p > 0.f) ds[r0 + k] = uniform01(key, offset + r0 + k) >= p ? v * scale : T(0);
    }
}

// Label-smoothed cross-entropy of one row of logits: with lse = log sum exp x,
// loss = (1 - eps) (lse - x_t) + eps (lse - mean x). Keeps lse for the backward.
template<typename T>
__global__ void cross_entropy_fwd(const T* __restrict__ logits, const long long* __restrict__ target, int C,
                                  T eps_ls, T* __restrict__ loss_row, T* __restrict__ lse_out) {
    __shared__ T smem[33];
    const long long row = blockIdx.x;
    const T* xr = logits + row * C;
    T mx = neg_inf<T>(), sx = 0;
    for (int k = threadIdx.x; k < C; k += blockDim.x) { T v = xr[k]; mx = t_max(mx, v); sx += v; }
    mx = block_reduce<T, true>(mx, smem);
    sx = block_reduce<T, false>(sx, smem);
    T total = 0;
    for (int k = threadIdx.x; k < C; k += blockDim.x) total += t_exp(xr[k] - mx);
    total = block_reduce<T, false>(total, smem);
    if (threadIdx.x == 0) {
        const T lse = mx + t_log(total);
        loss_row[row] = (T(1) - eps_ls) * (lse - xr[target[row]]) + eps_ls * (lse - sx / T(C));
        lse_out[row] = lse;
    }
}

// dlogits = (softmax(x) - eps/C - (1 - eps) [c == t]) * row_scale, row_scale = counted * g / n.
template<typename T>
__global__ void cross_entropy_bwd(const T* __restrict__ logits, const long long* __restrict__ target,
                                  const T* __restrict__ lse, const T* __restrict__ row_scale, int C, T eps_ls,
                                  T* __restrict__ dlogits) {
    const long long row = blockIdx.x;
    const T L = lse[row], s = row_scale[row], off = eps_ls / T(C);
    const long long t = target[row];
    for (int k = threadIdx.x; k < C; k += blockDim.x) {
        T v = t_exp(logits[row * C + k] - L) - off;
        if (k == t) v -= T(1) - eps_ls;
        dlogits[row * C + k] = v * s;
    }
}

// ReLU (§3.3): y = max(0, x); backward dx = g * [y > 0] (y > 0 exactly where x > 0).
template<typename T>
__global__ void relu_fwd(const T* __restrict__ x, T* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        y[i] = x[i] > T(0) ? x[i] : T(0);
}
// y = max(0, y + b) in place over rows of length d: a linear layer's bias and ReLU in one pass (§3.3).
template<typename T>
__global__ void bias_relu_fwd(T* __restrict__ y, const T* __restrict__ b, long long n, int d) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const T v = y[i] + b[i % d];
        y[i] = v > T(0) ? v : T(0);
    }
}
template<typename T>
__global__ void relu_bwd(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dx[i] = y[i] > T(0) ? g[i] : T(0);
}

// dW[v, :] = sum of g[i, :] over the positions i with ids[i] == v, in increasing i: deterministic
// (no atomics). The positions come sorted by id (order, sorted_ids); the thread at the first position
// of each id sums that id's run; every other thread returns at once.
template<typename T>
__global__ void embedding_bwd(const long long* __restrict__ sorted_ids, const long long* __restrict__ order,
                              const T* __restrict__ g, long long n, int d, T* __restrict__ dW) {
    const long long p = blockIdx.x;
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const long long id = sorted_ids[p];
    if (p > 0 && sorted_ids[p - 1] == id) return;
    T acc = 0;
    for (long long q = p; q < n && sorted_ids[q] == id; ++q) acc += g[order[q] * d + j];
    dW[id * d + j] = acc;
}

// Adam over many tensors in one launch: block b updates chunk b of tensor chunk_tensor[b];
// ptrs holds (p, g, m, v) device pointers per tensor. Same order of operations as optim.Adam.
template<typename T>
__global__ void adam_step(const unsigned long long* __restrict__ ptrs, const long long* __restrict__ sizes,
                          const int* __restrict__ chunk_tensor, const long long* __restrict__ chunk_start,
                          int chunk_size, T beta1, T beta2, T one_minus_beta1, T one_minus_beta2,
                          T step_size, T sqrt_correction2, T eps, const T* __restrict__ scalars) {
    // In a captured CUDA graph the two per-step numbers are read from the device (set before each replay).
    if (scalars != nullptr) { step_size = scalars[0]; sqrt_correction2 = scalars[1]; }
    const int t = chunk_tensor[blockIdx.x];
    const long long start = chunk_start[blockIdx.x];
    const long long end = start + chunk_size < sizes[t] ? start + chunk_size : sizes[t];
    T* p = (T*)ptrs[4 * t];
    const T* g = (const T*)ptrs[4 * t + 1];
    T* m = (T*)ptrs[4 * t + 2];
    T* v = (T*)ptrs[4 * t + 3];
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const T gi = g[i];
        const T mi = m[i] * beta1 + one_minus_beta1 * gi;
        const T vi = v[i] * beta2 + one_minus_beta2 * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] - step_size * (mi / (t_sqrt(vi) / sqrt_correction2 + eps));
    }
}

// Beam search's candidates: per sentence b, the n best of c = scores[b, k] + logp[b*K + k, v] over
// its K*V entries (index k*V + v), best first, ties to the lower index, as backend.top_k on the
// formed (B, K*V) float64 array. Pass 1 (grid P x B): each block keeps its chunk's n best, each
// thread its own sorted list, then merged; pass 2 (one block per sentence): the n best of the P lists.
#define TOPK_MAX 32
#define TOPK_NONE 0x7fffffffffffffffLL
__device__ __forceinline__ bool topk_better(double a, long long ia, double b, long long ib) {
    return a > b || (a == b && ia < ib);
}
__device__ __forceinline__ void topk_insert(double* val, long long* idx, int n, double v, long long i) {
    if (!topk_better(v, i, val[n - 1], idx[n - 1])) return;
    int j = n - 1;
    for (; j > 0 && topk_better(v, i, val[j - 1], idx[j - 1]); --j) { val[j] = val[j - 1]; idx[j] = idx[j - 1]; }
    val[j] = v;
    idx[j] = i;
}
// n rounds: the best head among the threads' lists is written out and popped (blockDim a power of 2).
__device__ void topk_block_merge(const double* val, const long long* idx, int n, double* out_val, long long* out_idx) {
    __shared__ double s_val[1024];
    __shared__ long long s_idx[1024];
    __shared__ int s_tid[1024];
    const int tid = threadIdx.x;
    int head = 0;
    for (int r = 0; r < n; ++r) {
        s_val[tid] = head < n ? val[head] : neg_inf<double>();
        s_idx[tid] = head < n ? idx[head] : TOPK_NONE;
        s_tid[tid] = tid;
        __syncthreads();
        for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
            if (tid < s && topk_better(s_val[tid + s], s_idx[tid + s], s_val[tid], s_idx[tid])) {
                s_val[tid] = s_val[tid + s]; s_idx[tid] = s_idx[tid + s]; s_tid[tid] = s_tid[tid + s];
            }
            __syncthreads();
        }
        if (tid == 0) { out_val[r] = s_val[0]; out_idx[r] = s_idx[0]; }
        if (tid == s_tid[0]) ++head;
        __syncthreads();                  // all have read s_tid[0] before the next round writes
    }
}
template<typename T>
__global__ void beam_topk_partial(const double* __restrict__ scores, const T* __restrict__ logp, long long K,
                                  long long V, int n, long long chunk, double* part_val, long long* part_idx) {
    const long long b = blockIdx.y, p = blockIdx.x, P = gridDim.x, KV = K * V;
    const long long start = p * chunk, end = min(KV, start + chunk);
    double val[TOPK_MAX];
    long long idx[TOPK_MAX];
    for (int j = 0; j < n; ++j) { val[j] = neg_inf<double>(); idx[j] = TOPK_NONE; }
    const T* row = logp + b * KV;
    for (long long c = start + threadIdx.x; c < end; c += blockDim.x)
        topk_insert(val, idx, n, scores[b * K + c / V] + (double)row[c], c);
    topk_block_merge(val, idx, n, part_val + (b * P + p) * n, part_idx + (b * P + p) * n);
}
template<typename T>
__global__ void beam_topk_final(const double* __restrict__ part_val, const long long* __restrict__ part_idx,
                                int parts, int n, double* top_val, long long* top_idx) {
    const long long b = blockIdx.x, m = (long long)parts * n;
    double val[TOPK_MAX];
    long long idx[TOPK_MAX];
    for (int j = 0; j < n; ++j) { val[j] = neg_inf<double>(); idx[j] = TOPK_NONE; }
    for (long long j = threadIdx.x; j < m; j += blockDim.x)
        topk_insert(val, idx, n, part_val[b * m + j], part_idx[b * m + j]);
    topk_block_merge(val, idx, n, top_val + b * n, top_idx + b * n);
    __syncthreads();
    // with fewer than n entries in a row (never: callers ask for n <= K*V) no index would be left
    // unset; keep every index valid anyway, as argmax rounds would
    if (threadIdx.x < n && top_idx[b * n + threadIdx.x] == TOPK_NONE) top_idx[b * n + threadIdx.x] = 0;
}
"""

NAMES = ("masked_softmax_fwd", "softmax_bwd", "log_softmax_fwd", "log_softmax_bwd", "dropout_apply", "layer_norm_fwd", "layer_norm_bwd_dx",
         "layer_norm_bwd_dwdb", "add_norm_fwd", "add_norm_bwd", "cross_entropy_fwd", "cross_entropy_bwd", "relu_fwd", "bias_relu_fwd", "relu_bwd", "embedding_bwd",
         "adam_step", "beam_topk_partial", "beam_topk_final")
