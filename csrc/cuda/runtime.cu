// Runtime probes of the CUDA build: device count and error strings for the Python glue. With
// the static cudart linked in, these work (and report "no device") on machines without a GPU
// or driver; nothing here runs at import time.
#include <cuda_runtime.h>

#include "edmfast/ops.h"

namespace edmfast {

int cuda_device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // do not leave the error for the next launch check
  }
  return static_cast<int>(err);
}

const char* cuda_error_string(int status) {
  if (status == kBadArgument) return "invalid argument (rejected by the edmfast launcher before any launch)";
  if (status == kNoCuda) return "edmfast._C was built without CUDA";
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace edmfast
