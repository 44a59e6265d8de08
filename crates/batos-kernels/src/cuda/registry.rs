//! The kernel module registry: one [`ModuleId`] per `kernels/*.cu` file, embedded
//! with `include_str!`, compiled with NVRTC (or loaded as precompiled PTX) on
//! first use and cached per device by [`super::CudaDevice`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::error::{CudaError, CudaResult};

/// The prelude every module is compiled with (f16/bf16 storage types, reductions).
pub const PRELUDE: &str = include_str!("../../../../kernels/prelude.cuh");

/// One CUDA source module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ModuleId {
    /// RMSNorm, RoPE, SiLU·mul, embedding gather (`kernels/elementwise.cu`).
    Elementwise,
    /// Arg-max and top-p sampling (`kernels/sampling.cu`).
    Sampling,
    /// int4 AWQ matvec and tensor-core matmul (`kernels/awq.cu`).
    Awq,
    /// Batched multi-LoRA shrink/expand, BGMV and SGMV (`kernels/lora.cu`).
    Lora,
    /// Paged attention decode (split-K) and prefill, KV write (`kernels/attention.cu`).
    Attention,
    /// Dense f16-weight matmul and the row kernels of the device-resident model
    /// runtime (`kernels/dense.cu`).
    Dense,
}

impl ModuleId {
    /// Every module, for compile checks and warm-up.
    pub const ALL: [ModuleId; 6] = [
        ModuleId::Elementwise,
        ModuleId::Sampling,
        ModuleId::Awq,
        ModuleId::Lora,
        ModuleId::Attention,
        ModuleId::Dense,
    ];

    /// The module's file stem in `kernels/`.
    pub fn name(self) -> &'static str {
        match self {
            ModuleId::Elementwise => "elementwise",
            ModuleId::Sampling => "sampling",
            ModuleId::Awq => "awq",
            ModuleId::Lora => "lora",
            ModuleId::Attention => "attention",
            ModuleId::Dense => "dense",
        }
    }

    fn body(self) -> &'static str {
        match self {
            ModuleId::Elementwise => include_str!("../../../../kernels/elementwise.cu"),
            ModuleId::Sampling => include_str!("../../../../kernels/sampling.cu"),
            ModuleId::Awq => include_str!("../../../../kernels/awq.cu"),
            ModuleId::Lora => include_str!("../../../../kernels/lora.cu"),
            ModuleId::Attention => include_str!("../../../../kernels/attention.cu"),
            ModuleId::Dense => include_str!("../../../../kernels/dense.cu"),
        }
    }

    /// The full translation unit NVRTC compiles: prelude, then the module body
    /// with a `#line` so compiler messages point into the `.cu` file.
    pub fn source(self) -> String {
        format!(
            "{PRELUDE}\n#line 1 \"kernels/{}.cu\"\n{}",
            self.name(),
            self.body()
        )
    }

    /// Every `extern "C"` entry point the module defines (one per kernel and dtype).
    pub fn entry_points(self) -> Vec<String> {
        let bases: &[&str] = match self {
            ModuleId::Elementwise => &["rms_norm", "rope", "silu_mul", "embedding"],
            ModuleId::Sampling => &["argmax", "top_p"],
            ModuleId::Awq => &[
                "awq_gemv_t1v4",
                "awq_gemv_t1v1",
                "awq_gemv_t4v1",
                "awq_reduce",
                "awq_gemm",
            ],
            ModuleId::Lora => &[
                "bgmv_shrink",
                "bgmv_expand",
                "sgmv_shrink",
                "sgmv_expand",
                "grouped_shrink",
                "grouped_expand",
            ],
            ModuleId::Attention => &[
                "write_kv",
                "paged_decode",
                "paged_decode_reduce",
                "paged_prefill",
            ],
            ModuleId::Dense => &[
                "dense_matmul",
                "add_rows",
                "gather_rows",
                "copy_cols",
                "embed_h",
            ],
        };
        // Kernels that exist for f16 activations only (packed-half2 arithmetic).
        let f16_only: &[&str] = match self {
            ModuleId::Awq => &["awq_gemv_h2v4", "awq_gemv_h2v1", "awq_gemv_h2t4"],
            _ => &[],
        };
        // Kernels that do not depend on the activation type.
        let untyped: &[&str] = match self {
            ModuleId::Lora => &["lora_scatter_words"],
            _ => &[],
        };
        bases
            .iter()
            .flat_map(|b| ["f32", "f16", "bf16"].map(|s| format!("{b}_{s}")))
            .chain(f16_only.iter().map(|b| format!("{b}_f16")))
            .chain(untyped.iter().map(|b| b.to_string()))
            .collect()
    }

    /// File name of this module's precompiled PTX for `arch` (e.g. `awq-sm_90.ptx`).
    pub fn ptx_file_name(self, arch: Arch) -> String {
        format!("{}-{}.ptx", self.name(), arch.as_str())
    }
}

/// A GPU architecture the kernels are built for (all need `mma.sync`, sm_80+).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Arch {
    /// Ampere A100.
    Sm80,
    /// Ampere GA10x.
    Sm86,
    /// Ada.
    Sm89,
    /// Hopper H100/H200.
    Sm90,
}

impl Arch {
    /// Every architecture, oldest first.
    pub const ALL: [Arch; 4] = [Arch::Sm80, Arch::Sm86, Arch::Sm89, Arch::Sm90];

    /// NVRTC's `--gpu-architecture` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm86 => "sm_86",
            Arch::Sm89 => "sm_89",
            Arch::Sm90 => "sm_90",
        }
    }

    /// The newest known architecture not newer than compute capability `major.minor`
    /// (PTX for it JIT-compiles forward on newer GPUs); `None` below 8.0.
    pub fn for_compute_capability(major: i32, minor: i32) -> Option<Arch> {
        let cc = major * 10 + minor;
        Arch::ALL.iter().rev().copied().find(|a| a.cc() <= cc)
    }

    fn cc(self) -> i32 {
        match self {
            Arch::Sm80 => 80,
            Arch::Sm86 => 86,
            Arch::Sm89 => 89,
            Arch::Sm90 => 90,
        }
    }
}

/// Where kernel PTX comes from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KernelSource {
    /// Compile the embedded sources with NVRTC at first use (needs libnvrtc).
    #[default]
    Nvrtc,
    /// Load `<dir>/<module>-<arch>.ptx` files made ahead of time (see
    /// `scripts/gpu-prepare.sh`); fall back to NVRTC for a missing file.
    PrecompiledPtx(PathBuf),
}

impl KernelSource {
    /// Reads the `BATOS_CUDA_PTX_DIR` variable: for test and bench binaries, which
    /// are configured from their environment. Libraries pass a `KernelSource`.
    pub fn from_env() -> KernelSource {
        match std::env::var_os("BATOS_CUDA_PTX_DIR") {
            Some(dir) if !dir.is_empty() => KernelSource::PrecompiledPtx(PathBuf::from(dir)),
            _ => KernelSource::Nvrtc,
        }
    }
}

/// Extra NVRTC options for a module compile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompileConfig {
    /// Folders passed with `--include-path` (the kernels need none; kept for
    /// modules that may include CUDA headers later).
    pub include_paths: Vec<String>,
}

/// Whether libnvrtc can be loaded under one of the names cudarc tries.
pub fn nvrtc_available() -> bool {
    // SAFETY: `is_culib_present` only attempts `dlopen` on cudarc's candidate
    // names and drops the handles; it calls no NVRTC function.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Library names cudarc tries for `lib` (for error messages).
pub(crate) fn candidates(lib: &str) -> Vec<String> {
    cudarc::get_lib_name_candidates(lib)
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}

/// Runs `f`, turning a panic inside the CUDA libraries into a typed error.
pub(crate) fn guard<T>(op: &'static str, f: impl FnOnce() -> CudaResult<T>) -> CudaResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(CudaError::LibraryPanic {
            op,
            message: panic_message(p),
        }),
    }
}

/// Compiles one module to PTX text with NVRTC, without any device. Results are
/// cached per process by (module, arch), so several devices compile once.
pub fn compile_ptx(id: ModuleId, arch: Arch, config: &CompileConfig) -> CudaResult<String> {
    static CACHE: OnceLock<Mutex<HashMap<(ModuleId, Arch), String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if config.include_paths.is_empty() {
        if let Some(ptx) = cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(id, arch))
        {
            return Ok(ptx.clone());
        }
    }
    if !nvrtc_available() {
        return Err(CudaError::NoNvrtc {
            module: id.name(),
            tried: candidates("nvrtc"),
        });
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch.as_str()),
        include_paths: config.include_paths.clone(),
        options: vec!["--std=c++17".into(), "-lineinfo".into()],
        name: Some(format!("{}.cu", id.name())),
        ..Default::default()
    };
    let src = id.source();
    let ptx = guard("nvrtc compile", || {
        cudarc::nvrtc::compile_ptx_with_opts(&src, opts).map_err(|e| CudaError::Compile {
            module: id.name(),
            arch: arch.as_str(),
            log: match e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => other.to_string(),
            },
        })
    })?;
    let text = ptx.to_src();
    if config.include_paths.is_empty() {
        cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert((id, arch), text.clone());
    }
    Ok(text)
}

/// Loads `<dir>/<module>-<arch>.ptx`, trying older architectures down to sm_80
/// (their PTX JIT-compiles forward). `Ok(None)` when no file exists.
pub(crate) fn load_precompiled(dir: &Path, id: ModuleId, arch: Arch) -> CudaResult<Option<String>> {
    for a in Arch::ALL.iter().rev().copied().filter(|a| *a <= arch) {
        let path = dir.join(id.ptx_file_name(a));
        match std::fs::read_to_string(&path) {
            Ok(text) => return Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(CudaError::PtxFile { path, source }),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_follows_compute_capability() {
        assert_eq!(Arch::for_compute_capability(7, 5), None);
        assert_eq!(Arch::for_compute_capability(8, 0), Some(Arch::Sm80));
        assert_eq!(Arch::for_compute_capability(8, 7), Some(Arch::Sm86));
        assert_eq!(Arch::for_compute_capability(9, 0), Some(Arch::Sm90));
        // Newer GPUs run the newest PTX we make (JIT-compiled forward).
        assert_eq!(Arch::for_compute_capability(12, 0), Some(Arch::Sm90));
    }

    #[test]
    fn sources_hold_every_entry_point_and_no_headers() {
        for id in ModuleId::ALL {
            let src = id.source();
            assert!(src.starts_with(PRELUDE));
            assert!(
                !src.contains("#include"),
                "{}: kernels must not need CUDA headers",
                id.name()
            );
            for entry in id.entry_points() {
                let (base, suffix) = entry.rsplit_once('_').expect("name_suffix");
                // Entry points are stamped out by a macro (`<base>_##S` with S = suffix),
                // or written out for the f16-only kernels.
                assert!(
                    src.contains(&format!("{base}_##S")) || src.contains(&format!("{entry}(")),
                    "{}: {entry}",
                    id.name()
                );
                assert!(["f32", "f16", "bf16"].contains(&suffix));
            }
        }
    }

    #[test]
    fn precompiled_ptx_falls_back_to_older_arch_files() {
        let dir = std::env::temp_dir().join(format!("batos-ptx-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(ModuleId::Awq.ptx_file_name(Arch::Sm80)), "ptx80").unwrap();
        assert_eq!(
            load_precompiled(&dir, ModuleId::Awq, Arch::Sm90)
                .unwrap()
                .as_deref(),
            Some("ptx80")
        );
        assert_eq!(
            load_precompiled(&dir, ModuleId::Lora, Arch::Sm90).unwrap(),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
