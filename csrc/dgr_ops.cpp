// dgr_ops: the WGAN-GP gradient penalty and the replay (mixing) loss of dgr.py as fused ops.
// Schemas and CPU kernels here; CUDA kernels in cuda/dgr_ops.cu; autograd and fake (meta) kernels are
// registered from Python (dgr.py, torch.library). The plain PyTorch reference sits in dgr.py:
//   gradient_penalty(g, lam)  = lam * mean_b (||g_b|| - 1)^2          (norm over all non-batch dims)
//   replay_loss(lr, y, lp, t, r) = r * CE(lr, y) + (1 - r) * CE(lp, t)   (t: class ids or probabilities)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>

#include "dgr_ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace dgr {

// ---------------------------------------------------------------------------------------------------
// Checks shared by the CPU and CUDA kernels.

at::Tensor rows_of(const at::Tensor& grad) {
  TORCH_CHECK(grad.dim() >= 1, "dgr::gradient_penalty: grad must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()),
              message("dgr::gradient_penalty: grad must be floating point, got ", grad.scalar_type()));
  int64_t D = 1;   // explicit, so that an empty batch (B = 0) still has a row length
  for (int64_t i = 1; i < grad.dim(); ++i) D *= grad.size(i);
  return grad.contiguous().view({grad.size(0), D});
}

void check_replay_inputs(const at::Tensor& logits_real, const at::Tensor& labels,
                         const at::Tensor& logits_replay, const at::Tensor& targets) {
  TORCH_CHECK(logits_real.dim() == 2 && logits_replay.dim() == 2,
              message("dgr::replay_loss: logits must be 2-d (batch, classes), got ", logits_real.sizes(),
                      " and ", logits_replay.sizes()));
  TORCH_CHECK(logits_real.size(1) == logits_replay.size(1),
              message("dgr::replay_loss: real and replayed logits have ", logits_real.size(1), " and ",
                      logits_replay.size(1), " classes"));
  TORCH_CHECK(logits_real.size(1) > 0, "dgr::replay_loss: logits need at least one class, got 0");
  TORCH_CHECK(at::isFloatingType(logits_real.scalar_type())
                  && logits_real.scalar_type() == logits_replay.scalar_type(),
              message("dgr::replay_loss: logits must share one floating dtype, got ",
                      logits_real.scalar_type(), " and ", logits_replay.scalar_type()));
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits_real.size(0) && labels.scalar_type() == at::kLong,
              message("dgr::replay_loss: labels must be int64 of shape (", logits_real.size(0), "), got ",
                      labels.scalar_type(), " ", labels.sizes()));
  bool soft = at::isFloatingType(targets.scalar_type());
  TORCH_CHECK(soft ? targets.sizes() == logits_replay.sizes()
                   : (targets.dim() == 1 && targets.size(0) == logits_replay.size(0)
                      && targets.scalar_type() == at::kLong),
              message("dgr::replay_loss: targets_replay must be int64 class ids of shape (",
                      logits_replay.size(0), ") or probabilities of shape ", logits_replay.sizes(), ", got ",
                      targets.scalar_type(), " ", targets.sizes()));
  for (const auto* t : {&labels, &logits_replay, &targets})
    TORCH_CHECK(t->device() == logits_real.device(),
                message("dgr::replay_loss: all inputs must be on ", logits_real.device(), ", got one on ",
                        t->device()));
}

// ---------------------------------------------------------------------------------------------------
// Gradient penalty, CPU.

// ||g_b||^2 of N rows at once (kRows, or 1 for each row of a last, partial group), accumulated in acc_t
// (float for half types). Each row is summed in index order, as a one-row loop would: the result does not
// depend on how rows are grouped. The rows are interleaved so that their additions overlap: one row's
// chain of dependent additions waits on the adder's latency, kRows chains keep it busy (bit for bit the same
// sums; its speed-up is in reference/README.md, "The CPU penalty, rows interleaved").
constexpr int64_t kRows = 8;

template <int64_t N, typename acc_t, typename scalar_t>
void rows_sum_squares(const scalar_t* rows, int64_t D, acc_t* ss) {
  acc_t s[N] = {};
  for (int64_t i = 0; i < D; ++i)
    for (int64_t r = 0; r < N; ++r) { acc_t v = rows[r * D + i]; s[r] += v * v; }
  for (int64_t r = 0; r < N; ++r) ss[r] = s[r];
}

// f(b, ||g_b||) for every row b, groups of kRows rows spread over threads.
template <typename acc_t, typename scalar_t, typename F>
void for_each_row_norm(const scalar_t* p, int64_t B, int64_t D, F&& f) {
  at::parallel_for(0, (B + kRows - 1) / kRows, 1, [&](int64_t begin, int64_t end) {
    acc_t ss[kRows];
    for (int64_t grp = begin; grp < end; ++grp) {
      const int64_t b0 = grp * kRows, n = std::min(kRows, B - b0);
      if (n == kRows) rows_sum_squares<kRows>(p + b0 * D, D, ss);
      else for (int64_t r = 0; r < n; ++r) rows_sum_squares<1>(p + (b0 + r) * D, D, ss + r);   // last group
      for (int64_t r = 0; r < n; ++r) f(b0 + r, std::sqrt(ss[r]));
    }
  });
}

at::Tensor gradient_penalty_cpu(const at::Tensor& grad, double lam) {
  at::Tensor g = rows_of(grad);
  const int64_t B = g.size(0), D = g.size(1);
  at::Tensor loss = at::zeros({}, g.options());
  if (B == 0) return loss;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_penalty_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> row_penalty(B);
    for_each_row_norm<acc_t>(g.data_ptr<scalar_t>(), B, D, [&](int64_t b, acc_t norm) {
      row_penalty[b] = (norm - acc_t(1)) * (norm - acc_t(1));
    });
    acc_t total = 0;
    for (int64_t b = 0; b < B; ++b) total += row_penalty[b];   // fixed order: deterministic
    loss.fill_(static_cast<double>(total) * lam / B);
  });
  return loss;
}

// d loss / d grad_b = grad_out * 2*lam/B * (||g_b|| - 1) * g_b / ||g_b||, taken as 0 where ||g_b|| = 0
// (the subgradient of ||.|| at 0 is chosen as 0, where torch's norm backward also gives 0).
at::Tensor gradient_penalty_backward_cpu(const at::Tensor& grad_out, const at::Tensor& grad, double lam) {
  at::Tensor g = rows_of(grad);
  const int64_t B = g.size(0), D = g.size(1);
  at::Tensor out = at::empty_like(g);
  if (B == 0) return out.view(grad.sizes());
  const double go = grad_out.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_penalty_backward_cpu",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* p = g.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_row_norm<acc_t>(p, B, D, [&](int64_t b, acc_t norm) {   // the row is still in cache: rescale it
      acc_t scale = norm > 0 ? acc_t(go * 2.0 * lam / B) * (norm - acc_t(1)) / norm : acc_t(0);
      for (int64_t i = 0; i < D; ++i) o[b * D + i] = static_cast<scalar_t>(scale * acc_t(p[b * D + i]));
    });
  });
  return out.view(grad.sizes());
}

// ---------------------------------------------------------------------------------------------------
// Replay loss, CPU: per row one pass computes log-sum-exp, the row's loss and d loss / d logits.

template <typename scalar_t, typename acc_t>
acc_t ce_row(const scalar_t* x, int64_t C, const int64_t* hard, const scalar_t* soft, acc_t weight,
             scalar_t* dx) {
  acc_t mx = x[0];
  for (int64_t c = 1; c < C; ++c) mx = std::max(mx, acc_t(x[c]));
  acc_t se = 0;
  for (int64_t c = 0; c < C; ++c) se += std::exp(acc_t(x[c]) - mx);
  const acc_t lse = mx + std::log(se);
  acc_t tsum = 1, dot = 0;
  if (soft) {
    tsum = 0;
    for (int64_t c = 0; c < C; ++c) { tsum += acc_t(soft[c]); dot += acc_t(soft[c]) * acc_t(x[c]); }
  } else {
    TORCH_CHECK(*hard >= 0 && *hard < C,
                message("dgr::replay_loss: class id ", *hard, " out of range [0, ", C, ")"));
    dot = x[*hard];
  }
  for (int64_t c = 0; c < C; ++c) {
    acc_t t = soft ? acc_t(soft[c]) : acc_t(c == *hard);
    dx[c] = static_cast<scalar_t>(weight * (std::exp(acc_t(x[c]) - lse) * tsum - t));
  }
  return weight * (lse * tsum - dot);
}

template <typename scalar_t>
void replay_rows_cpu(const at::Tensor& logits, const at::Tensor& targets, double weight, at::Tensor& dlogits,
                     std::vector<at::opmath_type<scalar_t>>& row_loss) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = logits.size(0), C = logits.size(1);
  row_loss.assign(B, acc_t(0));
  if (B == 0) return;
  const bool soft = at::isFloatingType(targets.scalar_type());
  const scalar_t* x = logits.data_ptr<scalar_t>();
  const int64_t* hard = soft ? nullptr : targets.data_ptr<int64_t>();
  const scalar_t* probs = soft ? targets.data_ptr<scalar_t>() : nullptr;
  scalar_t* dx = dlogits.data_ptr<scalar_t>();
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      row_loss[b] = ce_row<scalar_t, acc_t>(x + b * C, C, hard ? hard + b : nullptr,
                                            probs ? probs + b * C : nullptr, acc_t(weight), dx + b * C);
  });
}

// Returns (loss, d loss / d logits_real, d loss / d logits_replay).
std::tuple<at::Tensor, at::Tensor, at::Tensor> replay_loss_fwd_cpu(
    const at::Tensor& logits_real, const at::Tensor& labels, const at::Tensor& logits_replay,
    const at::Tensor& targets_replay, double r) {
  check_replay_inputs(logits_real, labels, logits_replay, targets_replay);
  at::Tensor lr = logits_real.contiguous(), lp = logits_replay.contiguous(), y = labels.contiguous();
  at::Tensor t = at::isFloatingType(targets_replay.scalar_type())
                     ? targets_replay.to(lp.scalar_type()).contiguous() : targets_replay.contiguous();
  at::Tensor d_real = at::empty_like(lr), d_rep = at::empty_like(lp);
  at::Tensor loss = at::zeros({}, lr.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lr.scalar_type(), "replay_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> loss_real, loss_rep;
    const int64_t Br = lr.size(0), Bp = lp.size(0);
    replay_rows_cpu<scalar_t>(lr, y, Br ? r / Br : 0.0, d_real, loss_real);
    replay_rows_cpu<scalar_t>(lp, t, Bp ? (1.0 - r) / Bp : 0.0, d_rep, loss_rep);
    acc_t total = 0;
    for (acc_t v : loss_real) total += v;
    for (acc_t v : loss_rep) total += v;
    loss.fill_(static_cast<double>(total));
  });
  return {loss, d_real, d_rep};
}

// ---------------------------------------------------------------------------------------------------
// Registration. CUDA kernels are registered in cuda/dgr_ops.cu when that file is compiled in.

TORCH_LIBRARY(dgr, m) {
  m.def("gradient_penalty(Tensor grad, float lam) -> Tensor");
  m.def("gradient_penalty_backward(Tensor grad_out, Tensor grad, float lam) -> Tensor");
  m.def("replay_loss_fwd(Tensor logits_real, Tensor labels, Tensor logits_replay, Tensor targets_replay, "
        "float r) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dgr, CPU, m) {
  m.impl("gradient_penalty", &gradient_penalty_cpu);
  m.impl("gradient_penalty_backward", &gradient_penalty_backward_cpu);
  m.impl("replay_loss_fwd", &replay_loss_fwd_cpu);
}

}  // namespace dgr

// An importable Python module (python setup.py build_ext); the ops register themselves on load.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "dgr fused ops: see torch.ops.dgr"; }
