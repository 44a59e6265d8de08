//! The device seam: CPU runs the kernels, CUDA without the feature is a typed error.

use batos_kernels::{Device, KernelError, WeightView};
use batos_types::DeviceKind;

#[test]
fn cpu_device_runs_kernels() {
    let w = [1.0f32, 2.0];
    let mut y = [0.0f32; 1];
    Device::Cpu
        .matmul(&[3.0, 4.0], &WeightView::f32(&w, 1, 2).unwrap(), &mut y)
        .unwrap();
    assert_eq!(y, [11.0]);
    assert_eq!(Device::from_kind(DeviceKind::Cpu), Device::Cpu);
    assert_eq!(Device::Cuda(1).kind(), DeviceKind::Cuda(1));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_typed_error() {
    let w = [1.0f32, 2.0];
    let mut y = [0.0f32; 1];
    let err = Device::Cuda(0)
        .matmul(&[3.0, 4.0], &WeightView::f32(&w, 1, 2).unwrap(), &mut y)
        .unwrap_err();
    assert_eq!(
        err,
        KernelError::CudaNotCompiled {
            op: "matmul",
            ordinal: 0
        }
    );
    assert!(err.to_string().contains("`cuda` feature"));
    let mut out = [0.0f32; 2];
    assert!(matches!(
        Device::Cuda(0).rms_norm(&[1.0, 2.0], &[1.0, 1.0], 1e-5, &mut out),
        Err(KernelError::CudaNotCompiled { op: "rms_norm", .. })
    ));
}
