/* python/src/dlpack.h: the DLPack data structures, ABI version 1.0.
 *
 * Written from the public DLPack specification, dmlc/dlpack include/dlpack/dlpack.h at v1.0
 * (https://github.com/dmlc/dlpack, Apache-2.0; the Python exchange protocol is described at
 * https://dmlc.github.io/dlpack/latest/python_spec.html). Only what threadloom uses is kept;
 * the layouts and enum values are those of the spec and must not change. Not installed. */
#ifndef THREADLOOM_PY_DLPACK_H
#define THREADLOOM_PY_DLPACK_H

#include <stddef.h>
#include <stdint.h>

#define DLPACK_MAJOR_VERSION 1
#define DLPACK_MINOR_VERSION 0

/* The capsule names of the Python protocol: a producer names its capsule *_UNUSED; a consumer
 * that takes ownership renames it *_USED, after which the capsule's destructor must not call
 * the managed tensor's deleter. */
#define DLPACK_CAPSULE_NAME "dltensor"
#define DLPACK_CAPSULE_USED_NAME "used_dltensor"
#define DLPACK_VERSIONED_CAPSULE_NAME "dltensor_versioned"
#define DLPACK_VERSIONED_CAPSULE_USED_NAME "used_dltensor_versioned"

typedef struct {
  uint32_t major;
  uint32_t minor;
} DLPackVersion;

typedef enum {
  kDLCPU = 1,
  kDLCUDA = 2,
  kDLCUDAHost = 3,
  kDLOpenCL = 4,
  kDLVulkan = 7,
  kDLMetal = 8,
  kDLVPI = 9,
  kDLROCM = 10,
  kDLROCMHost = 11,
  kDLExtDev = 12,
  kDLCUDAManaged = 13,
  kDLOneAPI = 14,
  kDLWebGPU = 15,
  kDLHexagon = 16,
  kDLMAIA = 17,
} DLDeviceType;

typedef struct {
  DLDeviceType device_type;
  int32_t device_id;
} DLDevice;

typedef enum {
  kDLInt = 0U,
  kDLUInt = 1U,
  kDLFloat = 2U,
  kDLOpaqueHandle = 3U,
  kDLBfloat = 4U,
  kDLComplex = 5U,
  kDLBool = 6U,
} DLDataTypeCode;

typedef struct {
  uint8_t code;    /* a DLDataTypeCode */
  uint8_t bits;    /* bits per lane */
  uint16_t lanes;  /* 1 for scalars */
} DLDataType;

typedef struct {
  void* data;           /* base address; the first element is at data + byte_offset */
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;       /* ndim entries */
  int64_t* strides;     /* ndim entries, in elements; NULL: compact row-major */
  uint64_t byte_offset;
} DLTensor;

/* The pre-1.0 (unversioned) managed tensor: capsule name "dltensor". */
typedef struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensor* self);
} DLManagedTensor;

#define DLPACK_FLAG_BITMASK_READ_ONLY (UINT64_C(1) << 0)
#define DLPACK_FLAG_BITMASK_IS_COPIED (UINT64_C(1) << 1)

/* The 1.0 managed tensor: capsule name "dltensor_versioned". */
typedef struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(struct DLManagedTensorVersioned* self);
  uint64_t flags;
  DLTensor dl_tensor;
} DLManagedTensorVersioned;

#endif /* THREADLOOM_PY_DLPACK_H */
