// fused_stats in two launches: per-block partials, then one block reduces them.
//
// `meta` is an int64 table: sizes, gradient pointers and update pointers
// (n_tensors entries each; update pointers are ignored when has_updates == 0),
// then one (tensor, start) pair per thread block of the first launch. Partials are
// doubles so the counts stay exact: per block Σg², Σu², Σg·u, max|g| over the
// non-NaN entries, the non-finite count and the NaN count (WIDTH = 6).

#define CHUNK 4096
#define THREADS 256
#define WIDTH 6

__device__ double max_abs(double a, double b) { return a > b ? a : b; }

// Tree reduction of THREADS values in shared memory; `is_max` picks max instead of sum.
__device__ double block_reduce(double* scratch, double value, bool is_max) {
    scratch[threadIdx.x] = value;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            double other = scratch[threadIdx.x + stride];
            scratch[threadIdx.x] = is_max ? max_abs(scratch[threadIdx.x], other) : scratch[threadIdx.x] + other;
        }
        __syncthreads();
    }
    double result = scratch[0];
    __syncthreads();
    return result;
}

template <typename T>
__device__ void stats_partials(const long long* meta, long long n_tensors, int has_updates, double* partials) {
    __shared__ double scratch[THREADS];
    const long long* pair = meta + 3 * n_tensors + 2 * (long long)blockIdx.x;
    const long long t = pair[0];
    const long long start = pair[1];
    const long long numel = meta[t];
    const T* grad = reinterpret_cast<const T*>(meta[n_tensors + t]);
    const T* update = reinterpret_cast<const T*>(meta[2 * n_tensors + t]);
    const long long stop = start + CHUNK < numel ? start + CHUNK : numel;
    T grad_sq = 0, update_sq = 0, dot = 0;
    double largest = 0, nonfinite = 0, nans = 0;
    for (long long i = start + threadIdx.x; i < stop; i += blockDim.x) {
        const T g = grad[i];
        const double a = fabs((double)g);
        grad_sq += g * g;
        // NaN fails every comparison: `a <= max` is false exactly for +-inf and NaN.
        nonfinite += a <= 1.7976931348623157e308 ? 0.0 : 1.0;
        if (g != g) {
            nans += 1.0;
        } else {
            largest = max_abs(largest, a);
        }
        if (has_updates) {
            const T u = update[i];
            update_sq += u * u;
            dot += g * u;
        }
    }
    double* row = partials + WIDTH * (long long)blockIdx.x;
    const double values[WIDTH] = {(double)grad_sq, (double)update_sq, (double)dot, largest, nonfinite, nans};
    for (int k = 0; k < WIDTH; ++k) {
        const double total = block_reduce(scratch, values[k], k == 3);
        if (threadIdx.x == 0) row[k] = total;
    }
}

template <typename T>
__device__ void stats_finish(const double* partials, long long n_rows, const T* loss, T* out) {
    __shared__ double scratch[THREADS];
    double values[WIDTH] = {0, 0, 0, 0, 0, 0};
    for (long long r = threadIdx.x; r < n_rows; r += blockDim.x) {
        for (int k = 0; k < WIDTH; ++k) {
            const double v = partials[WIDTH * r + k];
            values[k] = k == 3 ? max_abs(values[k], v) : values[k] + v;
        }
    }
    double totals[WIDTH];
    for (int k = 0; k < WIDTH; ++k) totals[k] = block_reduce(scratch, values[k], k == 3);
    if (threadIdx.x == 0) {
        out[0] = loss[0];
        out[1] = (T)totals[0];
        out[2] = (T)totals[1];
        out[3] = (T)totals[2];
        out[4] = totals[5] > 0 ? (T)nan("") : (T)totals[3];
        out[5] = (T)totals[4];
    }
}

extern "C" __global__ void stats_partials_f32(const long long* meta, long long n_tensors, int has_updates,
                                              double* partials) {
    stats_partials<float>(meta, n_tensors, has_updates, partials);
}

extern "C" __global__ void stats_partials_f64(const long long* meta, long long n_tensors, int has_updates,
                                              double* partials) {
    stats_partials<double>(meta, n_tensors, has_updates, partials);
}

extern "C" __global__ void stats_finish_f32(const double* partials, long long n_rows, const float* loss,
                                            float* out) {
    stats_finish<float>(partials, n_rows, loss, out);
}

extern "C" __global__ void stats_finish_f64(const double* partials, long long n_rows, const double* loss,
                                            double* out) {
    stats_finish<double>(partials, n_rows, loss, out);
}
