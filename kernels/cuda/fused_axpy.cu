// fused_axpy: out_i = param_i + scale * direction_i for every tensor of a list, in one launch.
//
// `meta` is an int64 table built on the host: sizes, param pointers, direction
// pointers and output pointers (n_tensors entries each), then one (tensor, start)
// pair per thread block. Each block handles CHUNK consecutive elements of one tensor.

#define CHUNK 4096

template <typename T>
__device__ void fused_axpy(const long long* meta, long long n_tensors, T scale) {
    const long long* pair = meta + 4 * n_tensors + 2 * (long long)blockIdx.x;
    const long long t = pair[0];
    const long long start = pair[1];
    const long long numel = meta[t];
    const T* param = reinterpret_cast<const T*>(meta[n_tensors + t]);
    const T* direction = reinterpret_cast<const T*>(meta[2 * n_tensors + t]);
    T* out = reinterpret_cast<T*>(meta[3 * n_tensors + t]);
    const long long stop = start + CHUNK < numel ? start + CHUNK : numel;
    for (long long i = start + threadIdx.x; i < stop; i += blockDim.x) {
        out[i] = param[i] + scale * direction[i];
    }
}

extern "C" __global__ void fused_axpy_f32(const long long* meta, long long n_tensors, float scale) {
    fused_axpy<float>(meta, n_tensors, scale);
}

extern "C" __global__ void fused_axpy_f64(const long long* meta, long long n_tensors, double scale) {
    fused_axpy<double>(meta, n_tensors, scale);
}
