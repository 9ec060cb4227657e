//! The GPU side of the build: find nvcc, compile each kernel file into a fatbin, and
//! parse ptxas's resource report.
use crate::KernelFile;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the GPU build produced: fatbins per module, or the reason there are none.
pub struct GpuBuild {
    pub archs: Vec<u32>,
    pub nvcc: Option<PathBuf>,
    pub fatbins: Vec<(String, PathBuf)>,
    pub resources: Vec<Resources>,
    /// ptxas's warnings and performance notes, as (module, line).
    pub diagnostics: Vec<(String, String)>,
    pub note: String,
}

/// One kernel on one arch, as ptxas reported it.
#[derive(Default, Clone)]
pub struct Resources {
    pub kernel: String,
    pub arch: u32,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

const ENV: [&str; 6] = [
    "NVCC",
    "CUDA_HOME",
    "CUDA_PATH",
    "MOE_CUDA_ARCHS",
    "MOE_REQUIRE_KERNELS",
    "PATH",
];

pub fn build(root: &Path, out: &Path, files: &[KernelFile]) -> GpuBuild {
    for var in ENV {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let require = std::env::var("MOE_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let archs = target_archs();
    let Some(nvcc) = find_nvcc() else {
        let note = "no nvcc found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/cuda/bin, \
                    python site-packages nvidia/cu13/bin): built without GPU kernels; \
                    `pip install nvidia-cuda-nvcc nvidia-cuda-cccl` provides one"
            .to_string();
        if require {
            panic!("MOE_REQUIRE_KERNELS=1 but {note}");
        }
        println!("cargo:warning={note}");
        return GpuBuild {
            archs,
            nvcc: None,
            fatbins: vec![],
            resources: vec![],
            diagnostics: vec![],
            note,
        };
    };
    // One nvcc per file, all at once; each handles its archs in order so that its ptxas
    // report is not interleaved.
    let results: Vec<Result<(PathBuf, String), String>> = std::thread::scope(|s| {
        let jobs: Vec<_> = files
            .iter()
            .map(|f| s.spawn(|| compile(&nvcc, root, out, f, &archs)))
            .collect();
        jobs.into_iter().map(|j| j.join().expect("nvcc thread")).collect()
    });
    let mut build = GpuBuild {
        archs,
        nvcc: Some(nvcc.clone()),
        fatbins: vec![],
        resources: vec![],
        diagnostics: vec![],
        note: String::new(),
    };
    for (f, result) in files.iter().zip(results) {
        match result {
            Ok((fatbin, report)) => {
                build.resources.extend(parse_ptxas_report(&report));
                let diagnostics = ptxas_diagnostics(&report).map(|line| (f.module.clone(), line));
                build.diagnostics.extend(diagnostics);
                build.fatbins.push((f.module.clone(), fatbin));
            }
            Err(e) if require => panic!("MOE_REQUIRE_KERNELS=1 and nvcc failed:\n{e}"),
            Err(e) => {
                for line in e.lines().take(20) {
                    println!("cargo:warning={line}");
                }
                let note = format!("nvcc failed on {}: built without GPU kernels", f.path.display());
                println!("cargo:warning={note}");
                return GpuBuild {
                    archs: build.archs,
                    nvcc: None,
                    fatbins: vec![],
                    resources: vec![],
                    diagnostics: vec![],
                    note,
                };
            }
        }
    }
    build.note = format!("compiled with {}", nvcc.display());
    build
}

fn target_archs() -> Vec<u32> {
    let spec = std::env::var("MOE_CUDA_ARCHS").unwrap_or_else(|_| "80,90".into());
    let mut archs: Vec<u32> = spec
        .split(',')
        .map(|a| {
            a.trim()
                .parse()
                .unwrap_or_else(|_| panic!("MOE_CUDA_ARCHS={spec}: expected numbers like 80,90"))
        })
        .collect();
    archs.sort();
    archs.dedup();
    assert!(
        archs.iter().all(|&a| a >= 80),
        "MOE_CUDA_ARCHS={spec}: the kernels need sm_80 or newer (mma.sync bf16, cp.async)"
    );
    archs
}

fn find_nvcc() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = vec![];
    if let Some(p) = std::env::var_os("NVCC") {
        candidates.push(p.into());
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            candidates.push(PathBuf::from(p).join("bin/nvcc"));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|p| p.join("nvcc")));
    }
    candidates.push("/usr/local/cuda/bin/nvcc".into());
    candidates.extend(python_nvcc());
    candidates.into_iter().find(|p| p.is_file())
}

/// nvcc from the `nvidia-cuda-nvcc` wheel: `<site-packages>/nvidia/cu13/bin/nvcc`.
fn python_nvcc() -> Vec<PathBuf> {
    let script = "import nvidia; print('\\n'.join(nvidia.__path__))";
    let Ok(out) = Command::new("python3").args(["-c", script]).output() else {
        return vec![];
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .flat_map(|dir| ["cu13", "cu12"].map(|v| PathBuf::from(dir).join(v).join("bin/nvcc")))
        .collect()
}

fn compile(
    nvcc: &Path,
    root: &Path,
    out: &Path,
    file: &KernelFile,
    archs: &[u32],
) -> Result<(PathBuf, String), String> {
    let fatbin = out.join(format!("{}.fatbin", file.module));
    let mut cmd = Command::new(nvcc);
    cmd.arg("-fatbin")
        .args(["-std=c++17", "-O3", "-lineinfo", "-Xptxas", "-v"])
        .arg("-I")
        .arg(root.join("kernels/include"));
    for &a in archs {
        let v = arch_variant(a);
        cmd.arg(format!("-gencode=arch=compute_{v},code=sm_{v}"));
    }
    let lowest = arch_variant(archs[0]);
    cmd.arg(format!("-gencode=arch=compute_{lowest},code=compute_{lowest}"));
    // The key is taken before the output path is added: OUT_DIR differs between feature sets
    // (clippy, rustdoc and the tests each run this script), the fatbin does not.
    let cache = NvccCache::new(out, &cmd, root, file);
    cmd.arg("-o").arg(&fatbin).arg(&file.path);
    if let Some(report) = cache.as_ref().and_then(|c| c.restore(&fatbin)) {
        return Ok((fatbin, report));
    }
    let output = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        return Err(format!("{cmd:?}\nexit: {}\n{stdout}{stderr}", output.status));
    }
    let report = format!("{stdout}{stderr}");
    if let Some(c) = cache {
        c.store(&fatbin, &report);
    }
    Ok((fatbin, report))
}

/// A cache of nvcc's outputs beside the target directory, keyed by everything the output
/// depends on: the command line (less the output path), the nvcc binary (size and modification time), the kernel
/// file and every header under `kernels/include`.
///
/// Why: cargo reruns this build script whenever an `MOE_EMU_*` variable changes (the
/// emulator's sanitizer and profiler builds), and for each profile; without the cache every
/// rerun recompiled every kernel for every arch, minutes each time, for identical fatbins.
/// A changed input changes the key, so a stale entry is never used; a cache that cannot be
/// read or written only costs the compile.
struct NvccCache {
    dir: PathBuf,
    key: u64,
}

impl NvccCache {
    fn new(out: &Path, cmd: &Command, root: &Path, file: &KernelFile) -> Option<Self> {
        use std::hash::{Hash, Hasher};
        // OUT_DIR is <target>/<profile>/build/<package>-<hash>/out: share one cache per target
        // directory, across profiles and features.
        let build = out.ancestors().nth(2)?;
        let dir = if build.file_name()? == "build" {
            build.parent()?.parent()?.join("moe-nvcc-cache")
        } else {
            out.join("nvcc-cache")
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        format!("{cmd:?}").hash(&mut h);
        let meta = std::fs::metadata(cmd.get_program()).ok()?;
        (meta.len(), meta.modified().ok()?).hash(&mut h);
        std::fs::read(&file.path).ok()?.hash(&mut h);
        let mut headers = vec![];
        collect_files(&root.join("kernels/include"), &mut headers);
        headers.sort();
        for header in headers {
            header.hash(&mut h);
            std::fs::read(&header).ok()?.hash(&mut h);
        }
        Some(Self {
            dir: dir.join(&file.module),
            key: h.finish(),
        })
    }

    fn paths(&self) -> (PathBuf, PathBuf) {
        let stem = format!("{:016x}", self.key);
        (
            self.dir.join(format!("{stem}.fatbin")),
            self.dir.join(format!("{stem}.ptxas")),
        )
    }

    /// The cached ptxas report, after copying the cached fatbin to `fatbin`.
    fn restore(&self, fatbin: &Path) -> Option<String> {
        let (bin, report) = self.paths();
        let report = std::fs::read_to_string(report).ok()?;
        std::fs::copy(bin, fatbin).ok()?;
        Some(report)
    }

    /// Keeps one entry per module: older keys are removed first.
    fn store(&self, fatbin: &Path, report: &str) {
        let _ = std::fs::remove_dir_all(&self.dir);
        if std::fs::create_dir_all(&self.dir).is_err() {
            return;
        }
        let (bin, report_path) = self.paths();
        // The report is written last: an entry without it is never restored.
        if std::fs::copy(fatbin, bin).is_ok() {
            let _ = std::fs::write(report_path, report);
        }
    }
}

fn collect_files(dir: &Path, into: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for path in entries.flatten().map(|e| e.path()) {
        if path.is_dir() {
            collect_files(&path, into);
        } else {
            into.push(path);
        }
    }
}

/// The target nvcc builds for `arch`: sm_90 becomes sm_90a, whose wgmma, setmaxnreg and
/// friends plain sm_90 lacks. `-arch=sm_90a` would not do: with nvcc 13.0 it also runs a
/// plain sm_90 pass that rejects them. sm_90a code runs only on sm_90 devices (no forward
/// compatibility), which is why the other archs keep their own SASS and the lowest its PTX;
/// the driver picks the image that matches the device.
fn arch_variant(arch: u32) -> String {
    if arch == 90 { "90a".into() } else { arch.to_string() }
}

/// ptxas's warnings and its "Potential Performance Loss" notes, e.g.
/// ```text
/// ptxas info    : (C7508) Potential Performance Loss: 'setmaxnreg' ignored; unable to determine register count at entry.
/// ```
/// They do not reliably name the kernel (that one comes before "Compiling entry function").
fn ptxas_diagnostics(report: &str) -> impl Iterator<Item = String> + '_ {
    report
        .lines()
        .filter(|l| l.starts_with("ptxas") && (l.contains("Potential Performance Loss") || l.contains("warning")))
        .map(|l| l.trim().to_string())
}

/// Parses `-Xptxas -v` output:
/// ```text
/// ptxas info    : Compiling entry function 'k' for 'sm_80'   (or 'sm_90a': arch 90)
/// ptxas info    : Function properties for k
///     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
/// ptxas info    : Used 12 registers, used 1 barriers, 128 bytes smem, 368 bytes cmem[0]
/// ```
fn parse_ptxas_report(report: &str) -> Vec<Resources> {
    let mut all = vec![];
    let mut current: Option<Resources> = None;
    let mut properties_of_current = false; // the stack line follows "Function properties for <fn>"
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let head = &line[..line.find(unit)?];
        head.split(|c: char| !c.is_ascii_digit())
            .rfind(|s| !s.is_empty())?
            .parse()
            .ok()
    };
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            all.extend(current.take());
            let mut parts = rest.split('\'');
            let kernel = parts.next().unwrap_or_default().to_string();
            let arch = parts
                .nth(1)
                .and_then(|a| a.trim_start_matches("sm_").trim_end_matches('a').parse().ok())
                .unwrap_or(0);
            current = Some(Resources {
                kernel,
                arch,
                ..Default::default()
            });
        } else if let Some(r) = current.as_mut() {
            if let Some(name) = line.split("Function properties for ").nth(1) {
                properties_of_current = name.trim() == r.kernel;
            } else if line.contains("bytes stack frame") && properties_of_current {
                r.stack_bytes = number_before(line, " bytes stack frame").unwrap_or(0);
                r.spill_store_bytes = number_before(line, " bytes spill stores").unwrap_or(0);
                r.spill_load_bytes = number_before(line, " bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") && line.contains(" registers") {
                r.registers = number_before(line, " registers").unwrap_or(0);
                r.shared_bytes = number_before(line, " bytes smem").unwrap_or(0);
            }
        }
    }
    all.extend(current);
    all
}
