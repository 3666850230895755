// Shared between the CPU (dgr_ops.cpp) and CUDA (cuda/dgr_ops.cu) kernels of the dgr ops.
#pragma once
#include <ATen/ATen.h>

namespace dgr {
// grad as a contiguous (B, D) view, D = all non-batch dimensions; checks dtype and rank.
at::Tensor rows_of(const at::Tensor& grad);
// Shapes, dtypes and devices of replay_loss's inputs, with messages that name the argument.
void check_replay_inputs(const at::Tensor& logits_real, const at::Tensor& labels, const at::Tensor& logits_replay,
                         const at::Tensor& targets);
}  // namespace dgr
