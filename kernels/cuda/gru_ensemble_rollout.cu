// gru_ensemble_rollout: E independent GRUs over T steps in one launch, one thread block per member.
//
// Layouts (row-major): w_x (E, D, 3H), w_h (E, H, 3H), b_x and b_h (E, 3H), h0 (E, H),
// x (E, T, D), out (E, T, H). Gates r, z, n along the 3H axis (PyTorch's order):
//   r = sigmoid(a_r + g_r), z = sigmoid(a_z + g_z), n = tanh(a_n + r * g_n), h' = (1 - z) * n + z * h
// with a = x W_x + b_x and g = h W_h + b_h. Each thread computes the units j = tid, tid + blockDim, ...
// reading W[.., j] (consecutive j: coalesced); the state lives in shared memory (H values).

template <typename T>
__device__ T sigmoid(T v) { return T(1) / (T(1) + exp(-v)); }

template <typename T>
__device__ void gru_rollout(const T* w_x, const T* w_h, const T* b_x, const T* b_h, const T* h0, const T* x,
                            T* out, long long T_steps, long long D, long long H) {
    extern __shared__ __align__(8) unsigned char shared_bytes[];
    T* h = reinterpret_cast<T*>(shared_bytes);
    const long long e = blockIdx.x;
    const long long G = 3 * H;
    const T* wx = w_x + e * D * G;
    const T* wh = w_h + e * H * G;
    const T* bx = b_x + e * G;
    const T* bh = b_h + e * G;
    const T* xe = x + e * T_steps * D;
    T* oe = out + e * T_steps * H;
    for (long long j = threadIdx.x; j < H; j += blockDim.x) h[j] = h0[e * H + j];
    __syncthreads();
    for (long long t = 0; t < T_steps; ++t) {
        const T* xt = xe + t * D;
        for (long long j = threadIdx.x; j < H; j += blockDim.x) {
            T ar = bx[j], az = bx[H + j], an = bx[2 * H + j];
            T gr = bh[j], gz = bh[H + j], gn = bh[2 * H + j];
            for (long long k = 0; k < D; ++k) {
                const T xk = xt[k];
                ar += xk * wx[k * G + j];
                az += xk * wx[k * G + H + j];
                an += xk * wx[k * G + 2 * H + j];
            }
            for (long long k = 0; k < H; ++k) {
                const T hk = h[k];
                gr += hk * wh[k * G + j];
                gz += hk * wh[k * G + H + j];
                gn += hk * wh[k * G + 2 * H + j];
            }
            const T r = sigmoid(ar + gr);
            const T z = sigmoid(az + gz);
            const T n = tanh(an + r * gn);
            oe[t * H + j] = (T(1) - z) * n + z * h[j];
        }
        // Every thread has read h_{t-1}; only now may the new state replace it.
        __syncthreads();
        for (long long j = threadIdx.x; j < H; j += blockDim.x) h[j] = oe[t * H + j];
        __syncthreads();
    }
}

extern "C" __global__ void gru_rollout_f32(const float* w_x, const float* w_h, const float* b_x, const float* b_h,
                                           const float* h0, const float* x, float* out, long long T_steps,
                                           long long D, long long H) {
    gru_rollout<float>(w_x, w_h, b_x, b_h, h0, x, out, T_steps, D, H);
}

extern "C" __global__ void gru_rollout_f64(const double* w_x, const double* w_h, const double* b_x,
                                           const double* b_h, const double* h0, const double* x, double* out,
                                           long long T_steps, long long D, long long H) {
    gru_rollout<double>(w_x, w_h, b_x, b_h, h0, x, out, T_steps, D, H);
}
