// CUDA kernels of the dgr ops (schemas and CPU reference kernels: ../dgr_ops.cpp).
// Gradient penalty: one block per row, 16-byte vector loads, fp32 (fp64 for double) accumulation.
// Replay loss: one warp per row; log-sum-exp, the row's loss and d loss / d logits in one pass.
// Row results are summed by a one-block kernel in a fixed order, so results are deterministic.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "../dgr_ops.h"

namespace dgr {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
  for (int off = 16; off > 0; off >>= 1) v = max(v, __shfl_xor_sync(0xffffffff, v, off));
  return v;
}

// Sum over a block of kThreads threads (every launch here uses kThreads), the result given to every thread.
template <typename T>
__device__ T block_sum(T v) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_sum: whole warps, at most 1024 threads");
  CUDA_KERNEL_ASSERT(blockDim.x == kThreads && "block_sum: launched with another block size");
  __shared__ T partial[kThreads / 32];
  v = warp_sum(v);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  T total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += partial[w];   // same order in every thread
  __syncthreads();
  return total;
}

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

// Sum of squares of one row, VEC elements per 16-byte load.
template <typename scalar_t, typename acc_t, int VEC>
__device__ acc_t row_sumsq(const scalar_t* __restrict__ row, int64_t D) {
  acc_t ss = 0;
  const auto* packs = reinterpret_cast<const Pack<scalar_t, VEC>*>(row);
  for (int64_t i = threadIdx.x; i < D / VEC; i += blockDim.x) {
    Pack<scalar_t, VEC> p = packs[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) { acc_t x = p.v[k]; ss += x * x; }
  }
  return block_sum(ss);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void gp_rows_kernel(const scalar_t* __restrict__ g, int64_t D, acc_t* __restrict__ row_penalty) {
  const acc_t dev = sqrt(row_sumsq<scalar_t, acc_t, VEC>(g + blockIdx.x * D, D)) - acc_t(1);
  if (threadIdx.x == 0) row_penalty[blockIdx.x] = dev * dev;
}

// out = scale * sum(rows), one block, fixed summation order.
template <typename acc_t, typename out_t>
__global__ void sum_rows_kernel(const acc_t* __restrict__ rows, int64_t n, acc_t scale,
                                out_t* __restrict__ out) {
  acc_t s = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += rows[i];
  s = block_sum(s);
  if (threadIdx.x == 0) *out = static_cast<out_t>(scale * s);
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void gp_backward_kernel(const acc_t* __restrict__ grad_out, const scalar_t* __restrict__ g,
                                   int64_t D, acc_t two_lam_over_b, scalar_t* __restrict__ out) {
  const scalar_t* row = g + blockIdx.x * D;
  const acc_t norm = sqrt(row_sumsq<scalar_t, acc_t, VEC>(row, D));
  const acc_t scale = norm > 0 ? acc_t(*grad_out) * two_lam_over_b * (norm - acc_t(1)) / norm : acc_t(0);
  const auto* in = reinterpret_cast<const Pack<scalar_t, VEC>*>(row);
  auto* dst = reinterpret_cast<Pack<scalar_t, VEC>*>(out + blockIdx.x * D);
  for (int64_t i = threadIdx.x; i < D / VEC; i += blockDim.x) {
    Pack<scalar_t, VEC> p = in[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = static_cast<scalar_t>(scale * acc_t(p.v[k]));
    dst[i] = p;
  }
}

// 16-byte packs when the rows allow them, else one element at a time.
template <typename scalar_t, typename F>
void with_vec(const at::Tensor& g, F&& launch) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool aligned = reinterpret_cast<uintptr_t>(g.data_ptr()) % 16 == 0 && g.size(1) % kVec == 0;
  if (aligned) launch(std::integral_constant<int, kVec>{});
  else launch(std::integral_constant<int, 1>{});
}

at::Tensor gradient_penalty_cuda(const at::Tensor& grad, double lam) {
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor g = rows_of(grad);
  const int64_t B = g.size(0), D = g.size(1);
  TORCH_CHECK(B <= INT32_MAX,
              message("dgr::gradient_penalty: at most 2^31-1 rows on CUDA (one block each), got ", B));
  at::Tensor loss = at::empty({}, g.options());
  if (B == 0) return loss.zero_();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_penalty_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor rows = at::empty({B}, g.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    with_vec<scalar_t>(g, [&](auto vec) {
      gp_rows_kernel<scalar_t, acc_t, decltype(vec)::value><<<B, kThreads, 0, stream>>>(
          g.data_ptr<scalar_t>(), D, rows.data_ptr<acc_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_rows_kernel<acc_t, scalar_t><<<1, kThreads, 0, stream>>>(rows.data_ptr<acc_t>(), B, acc_t(lam / B),
                                                                 loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return loss;
}

at::Tensor gradient_penalty_backward_cuda(const at::Tensor& grad_out, const at::Tensor& grad, double lam) {
  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor g = rows_of(grad);
  const int64_t B = g.size(0), D = g.size(1);
  TORCH_CHECK(B <= INT32_MAX,
              message("dgr::gradient_penalty_backward: at most 2^31-1 rows on CUDA, got ", B));
  at::Tensor out = at::empty_like(g);
  if (B == 0) return out.view(grad.sizes());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_penalty_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;   // grad_out in acc_t: fp64 stays fp64
    at::Tensor go = grad_out.to(g.device(), c10::CppTypeToScalarType<acc_t>::value).contiguous();
    with_vec<scalar_t>(g, [&](auto vec) {
      gp_backward_kernel<scalar_t, acc_t, decltype(vec)::value><<<B, kThreads, 0, stream>>>(
          go.data_ptr<acc_t>(), g.data_ptr<scalar_t>(), D, acc_t(2.0 * lam / B), out.data_ptr<scalar_t>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out.view(grad.sizes());
}

// One warp per row over the real rows then the replayed rows. Row loss and gradient carry the
// weight r/B_real or (1-r)/B_replay. `soft` holds probabilities (or is null and `hard` holds ids).
template <typename scalar_t, typename acc_t>
__global__ void replay_rows_kernel(const scalar_t* __restrict__ xr, const int64_t* __restrict__ yr,
                                   int64_t Br, const scalar_t* __restrict__ xp,
                                   const int64_t* __restrict__ hard, const scalar_t* __restrict__ soft,
                                   int64_t Bp, int64_t C, acc_t w_real, acc_t w_rep,
                                   scalar_t* __restrict__ dr, scalar_t* __restrict__ dp,
                                   acc_t* __restrict__ row_loss) {
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= Br + Bp) return;
  const bool is_real = row < Br;
  const int64_t b = is_real ? row : row - Br;
  const scalar_t* x = (is_real ? xr : xp) + b * C;
  scalar_t* dx = (is_real ? dr : dp) + b * C;
  const scalar_t* t = is_real ? nullptr : (soft ? soft + b * C : nullptr);
  const int64_t label = t ? -1 : (is_real ? yr[b] : hard[b]);
  CUDA_KERNEL_ASSERT((t || (label >= 0 && label < C)) && "dgr::replay_loss: class id out of range");
  const acc_t w = is_real ? w_real : w_rep;

  acc_t mx = -INFINITY;
  for (int64_t c = lane; c < C; c += 32) mx = max(mx, acc_t(x[c]));
  mx = warp_max(mx);
  acc_t se = 0, tsum = 0, dot = 0;
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t xc = x[c], tc = t ? acc_t(t[c]) : acc_t(c == label);
    se += exp(xc - mx);
    tsum += tc;
    dot += tc * xc;
  }
  se = warp_sum(se), tsum = warp_sum(tsum), dot = warp_sum(dot);
  const acc_t lse = mx + log(se);
  for (int64_t c = lane; c < C; c += 32) {
    const acc_t tc = t ? acc_t(t[c]) : acc_t(c == label);
    dx[c] = static_cast<scalar_t>(w * (exp(acc_t(x[c]) - lse) * tsum - tc));
  }
  if (lane == 0) row_loss[row] = w * (lse * tsum - dot);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> replay_loss_fwd_cuda(
    const at::Tensor& logits_real, const at::Tensor& labels, const at::Tensor& logits_replay,
    const at::Tensor& targets_replay, double r) {
  check_replay_inputs(logits_real, labels, logits_replay, targets_replay);
  const c10::cuda::CUDAGuard guard(logits_real.device());
  at::Tensor lr = logits_real.contiguous(), lp = logits_replay.contiguous(), y = labels.contiguous();
  const bool soft = at::isFloatingType(targets_replay.scalar_type());
  at::Tensor t = soft ? targets_replay.to(lp.scalar_type()).contiguous() : targets_replay.contiguous();
  at::Tensor d_real = at::empty_like(lr), d_rep = at::empty_like(lp);
  at::Tensor loss = at::empty({}, lr.options());
  const int64_t Br = lr.size(0), Bp = lp.size(0), C = lr.size(1), rows = Br + Bp;
  TORCH_CHECK(rows / (kThreads / 32) < INT32_MAX,
              message("dgr::replay_loss: too many rows for one grid, got ", rows));
  if (rows == 0) return {loss.zero_(), d_real, d_rep};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lr.scalar_type(), "replay_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor row_loss = at::empty({rows}, lr.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const int64_t rows_per_block = kThreads / 32;
    const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
    replay_rows_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
        lr.data_ptr<scalar_t>(), y.data_ptr<int64_t>(), Br, lp.data_ptr<scalar_t>(),
        soft ? nullptr : t.data_ptr<int64_t>(), soft ? t.data_ptr<scalar_t>() : nullptr, Bp, C,
        acc_t(Br ? r / Br : 0.0), acc_t(Bp ? (1.0 - r) / Bp : 0.0), d_real.data_ptr<scalar_t>(),
        d_rep.data_ptr<scalar_t>(), row_loss.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    sum_rows_kernel<acc_t, scalar_t><<<1, kThreads, 0, stream>>>(row_loss.data_ptr<acc_t>(), rows, acc_t(1),
                                                                 loss.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, d_real, d_rep};
}

}  // namespace

TORCH_LIBRARY_IMPL(dgr, CUDA, m) {
  m.impl("gradient_penalty", &gradient_penalty_cuda);
  m.impl("gradient_penalty_backward", &gradient_penalty_backward_cuda);
  m.impl("replay_loss_fwd", &replay_loss_fwd_cuda);
}

}  // namespace dgr
