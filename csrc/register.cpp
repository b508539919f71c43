// Entry point of one ISA build of fastgpt's CPU kernels (fastgpt/_C_{default,avx2,avx512}.so).
//
// The op schemas are defined once, in Python (fastgpt/ops/<op>.py), next to their fake and CUDA
// implementations. Each ISA build only provides CPU kernels. Python loads the build the CPU
// supports (or the one FASTGPT_CPU_ISA forces) and calls fastgpt_register_cpu_kernels(); the
// returned handle owns the registrations, so fastgpt_unregister_cpu_kernels() removes them again.
// That lets the tests switch between ISA builds inside one process.
#include "common.h"
#include "gemm.h"

#define FASTGPT_STR2(x) #x
#define FASTGPT_STR(x) FASTGPT_STR2(x)

namespace fastgpt {
std::vector<RegisterFn>& op_registrars() {
  static std::vector<RegisterFn> fns;  // function-local: safe across static-init order
  return fns;
}
}  // namespace fastgpt

extern "C" {

__attribute__((visibility("default"))) void* fastgpt_register_cpu_kernels() {
  auto* lib = new torch::Library(torch::Library::IMPL, "fastgpt", c10::DispatchKey::CPU,
                                 __FILE__, __LINE__);
  for (auto fn : fastgpt::op_registrars()) fn(*lib);
  return lib;
}

__attribute__((visibility("default"))) void fastgpt_unregister_cpu_kernels(void* handle) {
  delete static_cast<torch::Library*>(handle);
}

// The ISA this build was compiled for and the float vector width it uses, for tests and bench.
__attribute__((visibility("default"))) const char* fastgpt_cpu_isa() {
  return FASTGPT_STR(CPU_CAPABILITY);
}

__attribute__((visibility("default"))) int fastgpt_float_lanes() {
  return static_cast<int>(at::vec::Vectorized<float>::size());
}

// Which library runs fp32 matrix products (csrc/gemm.h): 0 auto, 1 onednn, 2 aten.
__attribute__((visibility("default"))) void fastgpt_set_gemm_choice(int choice) {
  fastgpt::gemm::choice().store(choice);
}

// Whether oneDNN's fp32 matmul can run here (symbol, CPU, torch.backends.mkldnn.enabled).
__attribute__((visibility("default"))) int fastgpt_onednn_usable() {
  return fastgpt::gemm::onednn_usable() ? 1 : 0;
}

}  // extern "C"
