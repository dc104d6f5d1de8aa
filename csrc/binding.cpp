// binding.cpp -- thin torch binding of the packed 2-bit decode GEMV (module pyquant._C, function packed_gemv).
//
// The kernel (packed_gemv.cu) knows nothing about torch; everything torch-specific happens here, in this order
// (the Triton-tutorial wrapper order): check every argument, allocate the output, launch on the current stream,
// check the launch.  Every failed check names the argument and the expected value.  Shape/dtype/value problems
// raise ValueError (TORCH_CHECK_VALUE); device problems and CUDA errors raise RuntimeError (TORCH_CHECK).
//
// Only c10/cuda headers are used (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE/cuSOLVER headers);
// c10::cuda::getCurrentCUDAStream is the function at::cuda::getCurrentCUDAStream forwards to.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "packed_gemv.h"

namespace {

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

int to_pyquant_dtype(at::ScalarType t) {
    switch (t) {
        case at::kHalf:
            return PYQUANT_DTYPE_FLOAT16;
        case at::kBFloat16:
            return PYQUANT_DTYPE_BFLOAT16;
        case at::kFloat:
            return PYQUANT_DTYPE_FLOAT32;
        default:
            return -1;
    }
}

void check_cuda_same_device(const at::Tensor& t, const char* name, const at::Tensor& x) {
    TORCH_CHECK(t.is_cuda(), "packed_gemv: ", name, " must be a CUDA tensor, got device ", t.device());
    TORCH_CHECK(t.device() == x.device(), "packed_gemv: ", name, " is on ", t.device(), " but x is on ", x.device(),
                "; expected every tensor on ", x.device());
}

}  // namespace

at::Tensor packed_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero_point, const c10::optional<at::Tensor>& bias,
                       int64_t group_size, double code_offset, const c10::optional<at::Tensor>& workspace,
                       bool mma) {
    // ---- x: [M, K], fp16/bf16, CUDA, contiguous, 1 <= M <= 8 -------------------------------------------------
    TORCH_CHECK(x.is_cuda(), "packed_gemv: x must be a CUDA tensor, got device ", x.device());
    TORCH_CHECK_VALUE(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
                      "packed_gemv: x must be float16 or bfloat16, got ", dtype_name(x.scalar_type()));
    TORCH_CHECK_VALUE(x.dim() == 2, "packed_gemv: x must be 2-D [M, K], got shape ", x.sizes());
    TORCH_CHECK_VALUE(x.is_contiguous(), "packed_gemv: x must be contiguous (row-major [M, K]), got strides ",
                      x.strides());
    const int64_t M = x.size(0);
    const int64_t K = x.size(1);
    TORCH_CHECK_VALUE(M >= 1 && M <= PYQUANT_GEMV_MAX_M, "packed_gemv: x has M=", M,
                      " rows; expected 1 <= M <= ", PYQUANT_GEMV_MAX_M, " (decode GEMV; use a GEMM for larger M)");
    TORCH_CHECK_VALUE(K >= 1 && K <= std::numeric_limits<int32_t>::max() - 64, "packed_gemv: x has K=", K,
                      " columns; expected 1 <= K < 2^31 - 64");

    // ---- qweight: uint8 [N, ceil(K/64)*16], CUDA, contiguous, 16-byte aligned -----------------------------------
    check_cuda_same_device(qweight, "qweight", x);
    TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte, "packed_gemv: qweight must be uint8, got ",
                      dtype_name(qweight.scalar_type()));
    TORCH_CHECK_VALUE(qweight.dim() == 2, "packed_gemv: qweight must be 2-D [N, packed_cols(K)], got shape ",
                      qweight.sizes());
    const int64_t packed_cols = (K + 63) / 64 * 16;
    TORCH_CHECK_VALUE(qweight.size(1) == packed_cols, "packed_gemv: qweight has ", qweight.size(1),
                      " columns; K=", K, " (from x) needs packed_cols(K) = ceil(K/64)*16 = ", packed_cols);
    TORCH_CHECK_VALUE(qweight.is_contiguous(), "packed_gemv: qweight must be contiguous, got strides ",
                      qweight.strides());
    TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(qweight.data_ptr()) % 16 == 0,
                      "packed_gemv: qweight's data pointer must be 16-byte aligned (the kernel uses 16-byte loads);"
                      " got an offset view, pass qweight.contiguous().clone()");
    const int64_t N = qweight.size(0);
    TORCH_CHECK_VALUE(N <= std::numeric_limits<int32_t>::max(), "packed_gemv: qweight has N=", N,
                      " rows; expected N < 2^31");

    // ---- group_size / code_offset --------------------------------------------------------------------------
    TORCH_CHECK_VALUE(group_size >= 1 && K % group_size == 0, "packed_gemv: group_size=", group_size,
                      " must be a positive divisor of K=", K);
    TORCH_CHECK_VALUE(group_size % 32 == 0 || group_size == K, "packed_gemv: group_size=", group_size,
                      " must be a multiple of 32 (32, 64, 128, 256, ...) or equal to K=", K);
    TORCH_CHECK_VALUE(std::isfinite(code_offset), "packed_gemv: code_offset=", code_offset, " must be finite");
    const int64_t n_groups = K / group_size;

    // ---- scale: [N, K/group_size], fp16/bf16/fp32 -------------------------------------------------------------
    check_cuda_same_device(scale, "scale", x);
    const int scale_dtype = to_pyquant_dtype(scale.scalar_type());
    TORCH_CHECK_VALUE(scale_dtype >= 0, "packed_gemv: scale must be float16, bfloat16 or float32, got ",
                      dtype_name(scale.scalar_type()));
    TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == N && scale.size(1) == n_groups,
                      "packed_gemv: scale must have shape [N, K/group_size] = [", N, ", ", n_groups, "], got ",
                      scale.sizes());
    TORCH_CHECK_VALUE(scale.is_contiguous(), "packed_gemv: scale must be contiguous, got strides ",
                      scale.strides());

    // ---- zero_point (optional): like scale ---------------------------------------------------------------------
    const void* zero_ptr = nullptr;
    if (zero_point.has_value()) {
        const at::Tensor& z = *zero_point;
        check_cuda_same_device(z, "zero_point", x);
        TORCH_CHECK_VALUE(z.scalar_type() == scale.scalar_type(), "packed_gemv: zero_point must have scale's dtype ",
                          dtype_name(scale.scalar_type()), ", got ", dtype_name(z.scalar_type()));
        TORCH_CHECK_VALUE(z.dim() == 2 && z.size(0) == N && z.size(1) == n_groups,
                          "packed_gemv: zero_point must have shape [N, K/group_size] = [", N, ", ", n_groups,
                          "], got ", z.sizes());
        TORCH_CHECK_VALUE(z.is_contiguous(), "packed_gemv: zero_point must be contiguous, got strides ",
                          z.strides());
        zero_ptr = z.data_ptr();
    }

    // ---- bias (optional): [N], x's dtype -------------------------------------------------------------------------
    const void* bias_ptr = nullptr;
    if (bias.has_value()) {
        const at::Tensor& b = *bias;
        check_cuda_same_device(b, "bias", x);
        TORCH_CHECK_VALUE(b.scalar_type() == x.scalar_type(), "packed_gemv: bias must have x's dtype ",
                          dtype_name(x.scalar_type()), ", got ", dtype_name(b.scalar_type()));
        TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == N, "packed_gemv: bias must have shape [N] = [", N,
                          "], got ", b.sizes());
        TORCH_CHECK_VALUE(b.is_contiguous(), "packed_gemv: bias must be contiguous, got strides ", b.strides());
        bias_ptr = b.data_ptr();
    }

    // ---- workspace (split-K only): uint8, on x's device, contiguous, >= plan.workspace_bytes ------------------------
    pyquant_gemv_plan plan{};
    if (N > 0 && mma) {
        const int rc = pyquant_packed_gemv_mma_plan(static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
                                                    static_cast<int>(group_size), &plan);
        TORCH_CHECK_VALUE(rc != -1, "packed_gemv: mma=True needs group_size=", group_size, " to be a multiple of ",
                          M <= 2 ? 64 : 128, " (or K) at M=", M, "; use mma=False");
        TORCH_CHECK(rc == 0, "packed_gemv: no launch plan for M=", M, ", N=", N, ", K=", K);
    } else if (N > 0) {
        TORCH_CHECK(pyquant_packed_gemv_plan(static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), &plan) == 0,
                    "packed_gemv: no launch plan for M=", M, ", N=", N, ", K=", K);
    }
    void* ws_ptr = nullptr;
    size_t ws_bytes = 0;
    if (workspace.has_value()) {
        const at::Tensor& w = *workspace;
        check_cuda_same_device(w, "workspace", x);
        TORCH_CHECK_VALUE(w.scalar_type() == at::kByte && w.dim() == 1 && w.is_contiguous(),
                          "packed_gemv: workspace must be a contiguous 1-D uint8 tensor, got ",
                          dtype_name(w.scalar_type()), " of shape ", w.sizes());
        ws_ptr = w.data_ptr();
        ws_bytes = static_cast<size_t>(w.numel());
    }
    TORCH_CHECK_VALUE(plan.workspace_bytes == 0 || ws_bytes >= plan.workspace_bytes, "packed_gemv: this shape (M=", M,
                      ", N=", N, ", K=", K, ") splits K ", plan.splits, " ways and needs a zero-initialized workspace of ",
                      plan.workspace_bytes, " bytes, got ", ws_bytes,
                      " (pyquant._cuda_ext.packed_gemv keeps one per device and stream)");

    // ---- allocate, launch on the current stream of x's device, check ---------------------------------------------
    const c10::cuda::CUDAGuard device_guard(x.device());
    at::Tensor y = at::empty({M, N}, x.options());
    if (N == 0) return y;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
    const int err = (mma ? pyquant_packed_gemv_mma_launch : pyquant_packed_gemv_launch)(
        x.data_ptr(), static_cast<const uint8_t*>(qweight.data_ptr()), scale.data_ptr(), zero_ptr, bias_ptr,
        y.data_ptr(), static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), static_cast<int>(group_size),
        static_cast<float>(code_offset), to_pyquant_dtype(x.scalar_type()), scale_dtype, ws_ptr, ws_bytes, stream);
    TORCH_CHECK(err == 0, "packed_gemv: CUDA kernel launch failed: ",
                cudaGetErrorString(static_cast<cudaError_t>(err)), " (M=", M, ", N=", N, ", K=", K,
                ", group_size=", group_size, ")");
    return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "pyquant CUDA kernels (csrc/): 2-bit packed decode GEMV";
    m.def("packed_gemv", &packed_gemv,
          "y[M, N] = x[M, K] @ ((codes - zero) * scale)^T (+ bias) for 2-bit packed weights (layout: "
          "pyquant.formats). M in 1..8; x float16/bfloat16; scale float16/bfloat16/float32; zero_point None "
          "(use code_offset) or like scale; bias None or [N] in x's dtype; group_size a multiple of 32 dividing K, "
          "or K; workspace None or a zero-initialized uint8 buffer kept across calls (required when the shape "
          "splits K; see pyquant._cuda_ext.packed_gemv); mma: run the tensor-core kernel (its own plan and "
          "workspace size; pyquant._cuda_ext.plan_mma). Returns a new [M, N] tensor in x's dtype.",
          pybind11::arg("x"), pybind11::arg("qweight"), pybind11::arg("scale"), pybind11::arg("zero_point"),
          pybind11::arg("bias"), pybind11::arg("group_size"), pybind11::arg("code_offset"),
          pybind11::arg("workspace") = pybind11::none(), pybind11::arg("mma") = false);
}
