// Shared between the CPU (dgr_ops.cpp) and CUDA (cuda/dgr_ops.cu) kernels of the dgr ops.
#pragma once
#include <ATen/ATen.h>

#include <string>

namespace dgr {
// An error message as one std::string, built without iostreams. TORCH_CHECK(cond, a, b, ...) streams its
// parts through a std::ostringstream compiled into this module; a compiler that links libstdc++ statically
// (the one on the lent H200 did, -lstdc++ or not) leaves that copy's number formatting unset, and there a
// message with a number crashed the process instead of raising. TORCH_CHECK(cond, message(a, b, ...))
// hands c10 one finished string, which it passes on without a stream.
inline std::string message_part(const char* text) { return text; }
inline std::string message_part(int64_t value) { return std::to_string(value); }
inline std::string message_part(c10::ScalarType dtype) { return c10::toString(dtype); }
inline std::string message_part(const c10::Device& device) { return device.str(); }
inline std::string message_part(c10::IntArrayRef sizes) {
  std::string text = "[";
  for (size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}
template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string text;
  (text.append(message_part(parts)), ...);
  return text;
}

// grad as a contiguous (B, D) view, D = all non-batch dimensions; checks dtype and rank.
at::Tensor rows_of(const at::Tensor& grad);
// Shapes, dtypes and devices of replay_loss's inputs, with messages that name the argument.
void check_replay_inputs(const at::Tensor& logits_real, const at::Tensor& labels,
                         const at::Tensor& logits_replay, const at::Tensor& targets);
}  // namespace dgr
