//! The main example: a realistic small MoE layer, forward and backward, on the best device here
//! (a GPU if there is one, else the CPU emulator), checked against the whole-layer reference.
//!
//!     cargo run --release --example moe_layer [-- --help]
//!
//! Prints the device, the per-expert load, the router losses, the time of each stage, and the
//! layer's kernel launches and host syncs (none inside the layer). `--report DIR` also prints
//! the routing report (load imbalance, capacity, non-finite tokens, Chain-of-Experts
//! transitions, code use, margins, ESFT scores) and writes its figures into DIR.
use clap::{Parser, ValueEnum};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use half::{bf16, f16};
use moe_kernels::layers::esft::EsftTracker;
use moe_kernels::layers::{
    Captures, ChainOfExperts, HostWeights, Mode, MoeConfig, MoeLayer, RouterKind, VqMoe, VqWeights,
};
use moe_kernels::ops::FloatElement;
use moe_kernels::ops::esft::ScoreKind;
use moe_kernels::ops::gate::GateForm;
use moe_kernels::reference::layers as reference;
use moe_kernels::report::{RoutingReport, figures, text};
use moe_kernels::{Device, DeviceKind, DeviceSlice};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One MoE layer (d=256, h=512, E=16, k=2, SwiGLU experts) forward and backward, checked
/// against the CPU reference.
///
/// On a GPU each stage is timed by CUDA events, after one untimed warm-up pass; on the emulator
/// the times are CPU wall time of the emulated kernels (not GPU estimates).
#[derive(Parser)]
#[command(name = "moe_layer")]
struct Options {
    /// The router. quadratic: a low-rank gate, r=4. sigmoid: DeepSeek-V3 style (sigmoid
    /// scores, selection bias, 4 groups, top 2 groups, scale 2.5). codebook: VQ routing (the
    /// nearest of E codes picks the expert, k=1, weight 1; no router losses).
    #[arg(long, value_enum, default_value_t = RouterArg::Quadratic)]
    router: RouterArg,
    /// Chain-of-Experts: C iterations, one router each, shared expert weights (1: a plain MoE
    /// layer).
    #[arg(long, value_name = "C", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=MAX_CHAIN),
          conflicts_with_all = ["vq", "inference", "esft"])]
    chain: u32,
    /// VQ-MoE: the routed path plus a discrete path (each token's nearest of E codes picks its
    /// expert, applied to the straight-through mix), mixed by a 2-way softmax gate, with the VQ
    /// codebook and commitment losses.
    #[arg(long, conflicts_with_all = ["inference", "esft"])]
    vq: bool,
    /// ESFT: score the experts on this batch (gate scores), train only the shortest prefix of
    /// experts whose cumulative score reaches P (the paper uses 0.1; above the total score every
    /// expert trains); frozen experts get no weight-gradient work.
    #[arg(long, value_name = "P", value_parser = esft_threshold, conflicts_with = "inference",
          allow_negative_numbers = true)]
    esft: Option<f64>,
    /// Forward only, on a layer built for serving (Mode::Inference: no saved GU, no router
    /// losses, no gradient or backward buffers).
    #[arg(long)]
    inference: bool,
    /// Also capture the layer's pass (the forward, or forward and backward) into a graph,
    /// replay it on the same inputs, time the replay, and check it equals the eager pass
    /// bitwise.
    #[arg(long, conflicts_with_all = ["chain", "vq", "esft"])]
    graph: bool,
    /// Storage of activations and weights; routing and accumulation are always f32.
    #[arg(long, value_enum, default_value_t = Dtype::Bf16)]
    dtype: Dtype,
    /// Tokens in the batch.
    #[arg(long, value_name = "T", default_value_t = 1024, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=MAX_TOKENS))]
    tokens: u32,
    /// Print the routing report of the forward and write its figures (PNG) into DIR: load bars,
    /// transition heatmaps (--chain), code use (--vq, codebook), margin histograms (with the
    /// quadratic router, a linear gate's on the same inputs overlaid).
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
}

/// The most Chain-of-Experts iterations the example runs.
const MAX_CHAIN: i64 = 16;
/// The most tokens: the whole-layer reference runs on the CPU in f64, and must finish.
const MAX_TOKENS: i64 = 1 << 18;

#[derive(Clone, Copy, ValueEnum)]
enum RouterArg {
    Linear,
    Quadratic,
    Sigmoid,
    Codebook,
}

impl RouterArg {
    fn kind(self) -> RouterKind {
        match self {
            RouterArg::Linear => RouterKind::Linear,
            RouterArg::Quadratic => RouterKind::Quadratic {
                form: GateForm::LowRank,
                rank: 4,
            },
            RouterArg::Sigmoid => RouterKind::Sigmoid {
                groups: 4,
                topk_groups: 2,
            },
            RouterArg::Codebook => RouterKind::Codebook,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

/// `--esft P`: a finite threshold >= 0.
fn esft_threshold(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(p) if p.is_finite() && p >= 0.0 => Ok(p),
        Ok(p) => Err(format!("{p} is not a finite threshold >= 0")),
        Err(e) => Err(e.to_string()),
    }
}

fn main() -> ExitCode {
    let options = Options::parse();
    let result = match options.dtype {
        Dtype::F32 => run::<f32>(&options),
        Dtype::F16 => run::<f16>(&options),
        Dtype::Bf16 => run::<bf16>(&options),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("the device disagrees with the reference");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Uniform values in [-1, 1) from a seed (ChaCha8), rounded to T.
fn random<T: FloatElement>(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len)
        .map(|_| T::from_f32(rng.random_range(-1.0f32..1.0)).to_f32())
        .collect()
}

fn to_t<T: FloatElement>(values: &[f32]) -> Vec<T> {
    values.iter().map(|&v| T::from_f32(v)).collect()
}

/// Stage timer. On a GPU a CUDA event is recorded after each stage's launches (nothing waits;
/// the times are read once at the end); on the emulator, which runs each launch to completion,
/// the wall time between marks.
struct Timer {
    stream: Option<Arc<CudaStream>>,
    /// Per mark its stage name (empty: a pause not reported, e.g. the ESFT selection).
    names: Vec<String>,
    /// GPU: the start event, then one per mark.
    events: Vec<CudaEvent>,
    /// Emulator: the time of each mark's stage.
    wall: Vec<Duration>,
    last: Instant,
}

impl Timer {
    fn new(device: &Device) -> Self {
        Self {
            stream: match device {
                Device::Cuda(gpu) => Some(gpu.stream().clone()),
                _ => None,
            },
            names: vec![],
            events: vec![],
            wall: vec![],
            last: Instant::now(),
        }
    }

    fn record(&mut self) -> bool {
        let Some(stream) = &self.stream else { return true };
        match stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT)) {
            Ok(event) => {
                self.events.push(event);
                true
            }
            Err(_) => false,
        }
    }

    fn start(&mut self) {
        self.record();
        self.last = Instant::now();
    }

    fn mark(&mut self, prefix: &str, stage: &str) {
        if !self.record() {
            return;
        }
        let now = Instant::now();
        self.wall.push(now - self.last);
        self.last = now;
        self.names.push(if stage.is_empty() {
            String::new()
        } else {
            format!("{prefix}{stage}")
        });
    }

    /// Each named stage's milliseconds.
    fn stages(&self) -> moe_kernels::Result<Vec<(String, f64)>> {
        let times: Vec<f64> = if self.stream.is_some() {
            let pairs = self.events.windows(2);
            pairs
                .map(|w| w[0].elapsed_ms(&w[1]).map(f64::from))
                .collect::<Result<_, _>>()?
        } else {
            self.wall.iter().map(|d| d.as_secs_f64() * 1e3).collect()
        };
        let named = self.names.iter().zip(times).filter(|(name, _)| !name.is_empty());
        Ok(named.map(|(name, ms)| (name.clone(), ms)).collect())
    }
}

/// `‖got − want‖ / ‖want‖`.
fn relative_error(got: &[f32], want: &[f64]) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        diff += (g as f64 - w).powi(2);
        norm += w * w;
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// [`relative_error`] over the experts that train (`[E, ...]` gradients; all without a mask): a
/// frozen expert's gradient is never written, so it holds whatever it held before.
fn trained_error(got: &[f32], want: &[f64], trained: Option<&[bool]>) -> f64 {
    let Some(trained) = trained else {
        return relative_error(got, want);
    };
    let per_expert = got.len() / trained.len();
    let keep = |i: &usize| trained[i / per_expert];
    let got: Vec<f32> = (0..got.len()).filter(keep).map(|i| got[i]).collect();
    let want: Vec<f64> = (0..want.len()).filter(keep).map(|i| want[i]).collect();
    relative_error(&got, &want)
}

fn download_f32<T: FloatElement>(device: &Device, buffer: &impl DeviceSlice<T>) -> moe_kernels::Result<Vec<f32>> {
    Ok(device.download(buffer)?.iter().map(|v| v.to_f32()).collect())
}

fn run<T: FloatElement>(options: &Options) -> moe_kernels::Result<bool> {
    let device = Device::best()?;
    let timing = match device.kind() {
        DeviceKind::Cuda => "GPU time between CUDA events",
        DeviceKind::Emulator => "CPU wall time on the emulator",
    };
    println!("device: {}", device.description());
    // Codebook routing has one expert per token and no logits (no router losses).
    let router = options.router.kind();
    let codebook = router == RouterKind::Codebook;
    let sigmoid = matches!(router, RouterKind::Sigmoid { .. });
    let config = MoeConfig {
        router,
        experts: 16,
        k: if codebook { 1 } else { 2 },
        dim: 256,
        hidden: 512,
        aux_alpha: if codebook { 0.0 } else { 0.01 },
        z_loss: if codebook { 0.0 } else { 1e-3 },
        // DeepSeek-V3's renormalized, scaled weights go with its sigmoid router.
        normalize_topk: sigmoid,
        route_scale: if sigmoid { 2.5 } else { 1.0 },
        max_tokens: options.tokens as usize,
        ..MoeConfig::default()
    };
    let t = options.tokens as usize;
    println!(
        "layer: {:?} router, E={} k={} d={} h={}, {} tokens, {}{}",
        config.router,
        config.experts,
        config.k,
        config.dim,
        config.hidden,
        t,
        T::NAME,
        if options.chain > 1 {
            format!(", Chain-of-Experts C={}", options.chain)
        } else {
            String::new()
        }
    );
    let x_host = random::<T>(t * config.dim, 1);
    let dy_host = random::<T>(t * config.dim, 2);
    let x = device.upload(&to_t::<T>(&x_host))?;
    let dy = device.upload(&to_t::<T>(&dy_host))?;
    let mut y = device.alloc_zeros::<T>(t * config.dim)?;
    let mut dx = device.alloc_zeros::<T>(t * config.dim)?;
    let mut timer = Timer::new(&device);
    if options.chain > 1 {
        return run_chain::<T>(options, &device, config, &x_host, &dy_host);
    }
    if options.vq {
        return run_vq::<T>(options, &device, config, &x_host, &dy_host);
    }
    if options.inference {
        return run_inference::<T>(&device, config, &x_host, options);
    }
    let weights = HostWeights::random(&config, 42).rounded::<T>(&config);
    let mut layer = MoeLayer::<T>::new(&device, config, &weights)?;
    if device.kind() == DeviceKind::Cuda {
        // One untimed pass first, so the stage times do not include loading the kernels' modules.
        layer.forward(&x, t, &mut y)?;
        layer.backward(&x, &dy, &mut dx)?;
    }

    let before = device.stats();
    timer.start();
    layer.forward_observed(&x, t, &mut y, Some(&mut |stage| timer.mark("forward: ", stage)))?;
    let middle = device.stats();
    let mut selected = None;
    let mut esft_tracker = None;
    if let Some(p) = options.esft {
        let tracker = esft_tracker.insert(EsftTracker::new(&device, config.experts, config.k)?);
        tracker.accumulate(&layer)?;
        let mask = tracker.select(p, ScoreKind::Gate)?;
        println!(
            "ESFT: p = {p}, {} of {} experts train (gate scores of this batch)",
            mask.active_count, config.experts
        );
        selected = Some(tracker.selected().to_vec());
        layer.set_expert_mask(Some(mask))?;
        timer.mark("", "");
    }
    let middle_after_esft = device.stats();
    layer.backward_observed(&x, &dy, &mut dx, Some(&mut |stage| timer.mark("backward: ", stage)))?;
    let after = device.stats();
    let stages = timer.stages()?;

    if let Some(dir) = &options.report {
        let mut report = RoutingReport::of_layer(&layer)?;
        if let Some(tracker) = &esft_tracker {
            report = report.with_esft(&device, tracker)?;
        }
        let linear = match config.router {
            RouterKind::Quadratic { .. } => Some(linear_gate_report::<T>(&device, config, &x)?),
            _ => None,
        };
        write_report(&report, dir, "quadratic", linear.as_ref().map(|r| ("linear", r)))?;
        #[cfg(feature = "checkpoint")]
        if let Some(ids) = &selected {
            export_selected(&device, &layer, ids, dir)?;
        }
    }
    let counts = device.download(layer.expert_counts())?;
    println!("\nexpert load (tokens routed to each expert):");
    let most = counts.iter().copied().max().unwrap_or(1).max(1);
    for (e, &c) in counts.iter().enumerate() {
        let bar = "#".repeat((c as usize * 40).div_ceil(most as usize));
        println!("  expert {e:2} {c:6} {bar}");
    }
    let losses = layer.losses()?;
    if codebook {
        println!("\nno router losses: the codebook router has no logits");
    } else {
        println!(
            "\naux loss {:.6} (α = {}), z-loss {:.6} (coefficient {})",
            losses.aux, config.aux_alpha, losses.z, config.z_loss
        );
    }

    println!("\nstages ({timing}):");
    for (stage, ms) in &stages {
        println!("  {stage:60} {ms:9.3} ms");
    }
    let total: f64 = stages.iter().map(|(_, ms)| ms).sum();
    println!("  {:60} {total:9.3} ms", "total");
    println!(
        "\nlaunches: forward {} (+{} memsets), backward {} (+{} memsets); host syncs: forward {}, backward {}",
        middle.launches - before.launches,
        middle.memsets - before.memsets,
        after.launches - middle_after_esft.launches,
        after.memsets - middle_after_esft.memsets,
        middle.host_syncs - before.host_syncs,
        after.host_syncs - middle_after_esft.host_syncs,
    );

    // The reference, in f64 with the device's roundings, checks every output.
    let check_start = Instant::now();
    let store = |v: f64| T::from_f32(v as f32).to_f32();
    let forward = reference::moe_forward(&config, &weights, &x_host, t, None, &store);
    let mask: Option<Vec<bool>> = selected
        .as_ref()
        .map(|ids: &Vec<usize>| (0..config.experts).map(|e| ids.contains(&e)).collect());
    let grads = reference::moe_backward(
        &config,
        &weights,
        &x_host,
        &forward,
        &dy_host,
        false,
        mask.as_deref(),
        &store,
    );
    let ids = device.download(&layer.routing()?.0)?;
    let routing_agrees = ids.iter().zip(&forward.ids).filter(|(a, b)| a == b).count();
    let near_ties = near_ties(&ids, &forward.ids, &forward.z, &config, &weights.router_bias, T::NAME);
    let bound = match T::NAME {
        "f32" => 1e-4,
        "f16" => 1e-2,
        _ => 5e-2,
    };
    let expert_grads = layer.expert_grads();
    let mut checks = vec![
        ("y".to_string(), relative_error(&download_f32(&device, &y)?, &forward.y)),
        ("dx".into(), relative_error(&download_f32(&device, &dx)?, &grads.dx)),
        (
            "dW1".into(),
            trained_error(&device.download(&expert_grads.w1)?, &grads.w1, mask.as_deref()),
        ),
        (
            "dW2".into(),
            trained_error(&device.download(&expert_grads.w2)?, &grads.w2, mask.as_deref()),
        ),
    ];
    for ((name, got), (_, want)) in layer.router_grads().tensors().iter().zip(&grads.gate) {
        checks.push((format!("d gate.{name}"), relative_error(&device.download(got)?, want)));
    }
    checks.push(("aux loss".into(), relative_error(&[losses.aux], &[forward.aux_loss])));
    checks.push(("z-loss".into(), relative_error(&[losses.z], &[forward.z_loss])));
    println!(
        "\nreference check ({:.1} s on the CPU): routing agrees on {routing_agrees} of {} slots{}",
        check_start.elapsed().as_secs_f64(),
        ids.len(),
        match (ids.len() - routing_agrees, near_ties) {
            (0, _) => String::new(),
            (differ, ties) =>
                format!(" ({ties} of the {differ} others are near-ties in the reference's selection or group scores)"),
        }
    );
    let mut ok = routing_agrees + near_ties == ids.len();
    for (name, error) in checks {
        let verdict = if error <= bound { "ok" } else { "MISMATCH" };
        ok &= error <= bound;
        println!("  {name:12} relative error {error:.2e} (bound {bound:.0e}) {verdict}");
    }
    if options.graph {
        let eager = [download_f32(&device, &y)?, download_f32(&device, &dx)?];
        ok &= replay_graph(
            &device,
            &mut layer,
            Captures::ForwardBackward,
            &x_host,
            &dy_host,
            &eager,
        )?;
    }
    Ok(ok)
}

/// `--report DIR`: prints `report` (and the margin comparison with `compare`) and writes its
/// figures into `dir`.
fn write_report(
    report: &RoutingReport,
    dir: &Path,
    name: &str,
    compare: Option<(&str, &RoutingReport)>,
) -> moe_kernels::Result<()> {
    println!("\n{report}");
    if let Some((other, other_report)) = compare {
        println!(
            "margins on the same inputs (both gates random, untrained: this compares their initial scales, not what training makes of them; see the quadratic_demo example):"
        );
        print!("{}", text::margin_comparison(name, report, other, other_report));
    }
    for path in figures::write_all(report, dir, name, compare)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// `--esft P --report DIR`: writes the selected experts as an ESFT delta file into `dir` and
/// prints its storage ratio. The example takes no optimizer step, so the file holds the
/// selected experts as they are; a fine-tuning loop would write them after its steps.
#[cfg(feature = "checkpoint")]
fn export_selected<T: FloatElement>(
    device: &Device,
    layer: &MoeLayer<T>,
    ids: &[usize],
    dir: &Path,
) -> moe_kernels::Result<()> {
    use moe_kernels::checkpoint::esft::export_tuned;
    let path = dir.join("esft_experts.safetensors");
    let prefix = "model.layers.0.mlp.";
    let tuned = export_tuned(device, layer.config(), layer.weights(), prefix, ids, false, &path)?;
    println!(
        "ESFT delta: experts {ids:?} in {} ({} bytes, {:.1}% of the layer's weights)",
        path.display(),
        tuned.tuned_bytes,
        100.0 * tuned.storage_ratio(layer.weights())
    );
    Ok(())
}

/// The routing report of a linear gate (random, seed 42) on the same `x`: the quadratic gate's
/// margin comparison. A forward-only layer.
fn linear_gate_report<T: FloatElement>(
    device: &Device,
    config: MoeConfig,
    x: &impl DeviceSlice<T>,
) -> moe_kernels::Result<RoutingReport> {
    let linear = MoeConfig {
        router: RouterKind::Linear,
        ..config
    };
    let weights = HostWeights::random(&linear, 42).rounded::<T>(&linear);
    let mut layer = MoeLayer::<T>::with_mode(device, linear, &weights, Mode::Inference)?;
    let t = x.len() / config.dim;
    let mut y = device.alloc_zeros::<T>(t * config.dim)?;
    layer.forward(x, t, &mut y)?;
    RoutingReport::of_layer(&layer)
}

/// `--graph`: captures the layer's pass at this token count, writes the same inputs into the
/// graph's buffers, replays it (once untimed on a GPU, then timed), and checks y (and dx) equal
/// the eager pass's `eager` outputs bitwise.
fn replay_graph<T: FloatElement>(
    device: &Device,
    layer: &mut MoeLayer<T>,
    captures: Captures,
    x_host: &[f32],
    dy_host: &[f32],
    eager: &[Vec<f32>],
) -> moe_kernels::Result<bool> {
    let t = x_host.len() / layer.config().dim;
    layer.capture(t, captures)?;
    let mut io = layer.graph_io()?;
    device.upload_into(&to_t::<T>(x_host), &mut io.x)?;
    if captures == Captures::ForwardBackward {
        device.upload_into(&to_t::<T>(dy_host), &mut io.dy)?;
    }
    if device.kind() == DeviceKind::Cuda {
        layer.replay()?; // the first launch of a graph uploads it
        device.synchronize()?;
    }
    let before = device.stats();
    let start = Instant::now();
    layer.replay()?;
    let after = device.stats();
    device.synchronize()?;
    let elapsed = start.elapsed();
    let io = layer.graph_io()?;
    let outputs = [download_f32(device, &io.y)?, download_f32(device, &io.dx)?];
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let same = outputs.iter().zip(eager).all(|(got, want)| bits(got) == bits(want));
    println!(
        "
graph replay of the {}: {:.3} ms wall ({}), {} launches and {} memsets in one submission, host syncs {}; equals the eager pass bitwise: {}",
        if captures == Captures::Forward { "forward" } else { "forward and backward" },
        elapsed.as_secs_f64() * 1e3,
        match device.kind() {
            DeviceKind::Cuda => "host wall time around the replay and one synchronize",
            DeviceKind::Emulator => "CPU wall time on the emulator",
        },
        after.launches - before.launches,
        after.memsets - before.memsets,
        after.host_syncs - before.host_syncs,
        if same { "yes" } else { "NO" },
    );
    Ok(same)
}

/// Slots where the device picked another expert than the reference although the reference's
/// decision there is within the rounding of the layer's dtype (math §9: either id is then right):
/// the two experts' selection keys, or (group-limited routing) their groups' scores, are within
/// a relative 1e-3 (16-bit) or 1e-5 (f32) of each other. Logits of the same inputs differ between
/// devices by the accumulation order only; a gap that small is where that order can flip a choice.
fn near_ties(got: &[i32], want: &[i32], logits: &[f32], config: &MoeConfig, bias: &[f32], dtype: &str) -> usize {
    use moe_kernels::reference::router::{group_scores, selection_keys};
    let (experts, k) = (config.experts, config.k);
    let router = config.router_config();
    let tolerance = if dtype == "f32" { 1e-5 } else { 1e-3 };
    let close = |a: f64, b: f64| (a - b).abs() <= tolerance * a.abs().max(b.abs()).max(1.0);
    let tied = |slot: usize, a: usize, b: usize| {
        let row = &logits[(slot / k) * experts..][..experts];
        let keys = selection_keys(&router, row, (!bias.is_empty()).then_some(bias));
        let size = experts / router.groups.max(1);
        let groups = group_scores(&router, &keys);
        close(keys[a], keys[b]) || (router.groups > 1 && close(groups[a / size], groups[b / size]))
    };
    let valid = |id: i32| (0..experts as i32).contains(&id);
    (0..got.len())
        .filter(|&slot| got[slot] != want[slot] && valid(got[slot]) && valid(want[slot]))
        .filter(|&slot| tied(slot, got[slot] as usize, want[slot] as usize))
        .count()
}

/// Runs `pass(false)` (forward) then `pass(true)` (backward) and prints each one's wall time and
/// launches, and the host syncs of both (the chain and VQ-MoE runners' one-line report).
fn timed_pass(
    device: &Device,
    label: &str,
    mut pass: impl FnMut(bool) -> moe_kernels::Result<()>,
) -> moe_kernels::Result<()> {
    let before = device.stats();
    let start = Instant::now();
    pass(false)?;
    let forward_time = start.elapsed();
    let middle = device.stats();
    pass(true)?;
    let backward_time = start.elapsed() - forward_time;
    let after = device.stats();
    println!(
        "{label}forward {:.1} ms ({} launches), backward {:.1} ms ({} launches), host syncs {}",
        forward_time.as_secs_f64() * 1e3,
        middle.launches - before.launches,
        backward_time.as_secs_f64() * 1e3,
        after.launches - middle.launches,
        after.host_syncs - before.host_syncs
    );
    Ok(())
}

/// The inference variant of [`run`]: one forward of a `Mode::Inference` layer, timed, its launches
/// and host syncs, and y against the reference.
fn run_inference<T: FloatElement>(
    device: &Device,
    config: MoeConfig,
    x_host: &[f32],
    options: &Options,
) -> moe_kernels::Result<bool> {
    let graph = options.graph;
    let t = x_host.len() / config.dim;
    let weights = HostWeights::random(&config, 42).rounded::<T>(&config);
    let mut layer = MoeLayer::<T>::with_mode(device, config, &weights, Mode::Inference)?;
    let x = device.upload(&to_t::<T>(x_host))?;
    let mut y = device.alloc_zeros::<T>(t * config.dim)?;
    if device.kind() == DeviceKind::Cuda {
        layer.forward(&x, t, &mut y)?; // loads the kernels' modules outside the timed pass
    }
    let before = device.stats();
    let start = Instant::now();
    layer.forward(&x, t, &mut y)?;
    let after = device.stats();
    device.synchronize()?;
    let elapsed = start.elapsed();
    if let Some(dir) = &options.report {
        write_report(&RoutingReport::of_layer(&layer)?, dir, "gate", None)?;
    }
    println!(
        "inference forward: {:.1} ms wall ({}), {} launches, {} memsets, host syncs {}",
        elapsed.as_secs_f64() * 1e3,
        match device.kind() {
            DeviceKind::Cuda => "host wall time around the pass and one synchronize",
            DeviceKind::Emulator => "CPU wall time on the emulator",
        },
        after.launches - before.launches,
        after.memsets - before.memsets,
        after.host_syncs - before.host_syncs,
    );
    if let Some(dir) = &options.report {
        write_report(&RoutingReport::of_layer(&layer)?, dir, "gate", None)?;
    }
    let store = |v: f64| T::from_f32(v as f32).to_f32();
    let forward = reference::moe_forward(&config, &weights, x_host, t, None, &store);
    let error = relative_error(&download_f32(device, &y)?, &forward.y);
    let bound = if T::NAME == "f32" { 1e-4 } else { 5e-2 };
    println!("  y    relative error {error:.2e} (bound {bound:.0e})");
    let mut ok = error <= bound;
    if graph {
        let eager = [download_f32(device, &y)?];
        ok &= replay_graph(device, &mut layer, Captures::Forward, x_host, &[], &eager)?;
    }
    Ok(ok)
}

/// The Chain-of-Experts variant of [`run`].
fn run_chain<T: FloatElement>(
    options: &Options,
    device: &Device,
    config: MoeConfig,
    x_host: &[f32],
    dy_host: &[f32],
) -> moe_kernels::Result<bool> {
    let t = options.tokens as usize;
    let weights: Vec<HostWeights> = (0..options.chain)
        .map(|i| HostWeights::random(&config, 42 + i as u64).rounded::<T>(&config))
        .collect();
    let mut chain = ChainOfExperts::<T>::new(device, config, &weights)?;
    let x = device.upload(&to_t::<T>(x_host))?;
    let dy = device.upload(&to_t::<T>(dy_host))?;
    let mut y = device.alloc_zeros::<T>(t * config.dim)?;
    let mut dx = device.alloc_zeros::<T>(t * config.dim)?;
    timed_pass(device, "", |backward| match backward {
        false => chain.forward(&x, t, &mut y),
        true => chain.backward(&x, &dy, &mut dx),
    })?;
    println!(
        "kept for backward: {} bytes per token per iteration",
        ChainOfExperts::<T>::saved_bytes_per_token_per_iteration(&config)?
    );
    if let Some(dir) = &options.report {
        write_report(&RoutingReport::of_chain(&chain)?, dir, "gate", None)?;
    }
    let store = |v: f64| T::from_f32(v as f32).to_f32();
    let result = reference::chain(&config, &weights, x_host, dy_host, None, &store);
    let (forward, grads) = (result.y, result.grads);
    let bound = if T::NAME == "f32" { 1e-4 } else { 5e-2 };
    let mut ok = true;
    let expert_grads = chain.expert_grads();
    for (name, error) in [
        ("y", relative_error(&download_f32(device, &y)?, &forward)),
        ("dx", relative_error(&download_f32(device, &dx)?, &grads.dx)),
        ("dW1", relative_error(&device.download(&expert_grads.w1)?, &grads.w1)),
        ("dW2", relative_error(&device.download(&expert_grads.w2)?, &grads.w2)),
    ] {
        ok &= error <= bound;
        println!("  {name:4} relative error {error:.2e} (bound {bound:.0e})");
    }
    Ok(ok)
}

/// The VQ-MoE variant of [`run`].
fn run_vq<T: FloatElement>(
    options: &Options,
    device: &Device,
    config: MoeConfig,
    x_host: &[f32],
    dy_host: &[f32],
) -> moe_kernels::Result<bool> {
    let t = options.tokens as usize;
    let weights = VqWeights::random(&config, 42).rounded::<T>(&config);
    let mut layer = VqMoe::<T>::new(device, config, &weights)?;
    let x = device.upload(&to_t::<T>(x_host))?;
    let dy = device.upload(&to_t::<T>(dy_host))?;
    let mut y = device.alloc_zeros::<T>(t * config.dim)?;
    let mut dx = device.alloc_zeros::<T>(t * config.dim)?;
    timed_pass(device, "VQ-MoE: ", |backward| match backward {
        false => layer.forward(&x, t, &mut y),
        true => layer.backward(&x, &dy, &mut dx),
    })?;
    let codes = device.download(&layer.codes()?)?;
    let mut uses = vec![0usize; config.experts];
    for &c in &codes {
        uses[c as usize] += 1;
    }
    println!("code (discrete expert) use: {uses:?}");
    if let Some(dir) = &options.report {
        write_report(&RoutingReport::of_vq(&layer)?, dir, "gate", None)?;
    }
    let vq_losses = device.download(layer.vq_losses())?;
    println!("codebook loss {:.6}, commitment loss {:.6}", vq_losses[0], vq_losses[1]);
    let store = |v: f64| T::from_f32(v as f32).to_f32();
    let forward = reference::vq_forward(&config, &weights, x_host, t, &store);
    let grads = reference::vq_backward(&config, &weights, x_host, &forward, dy_host, &store);
    let bound = if T::NAME == "f32" { 1e-4 } else { 5e-2 };
    let mut ok = codes == forward.codes;
    println!("codes agree with the reference: {ok}");
    let expert_grads = layer.expert_grads();
    for (name, error) in [
        ("y", relative_error(&download_f32(device, &y)?, &forward.y)),
        ("dx", relative_error(&download_f32(device, &dx)?, &grads.dx)),
        ("dW1", relative_error(&device.download(&expert_grads.w1)?, &grads.w1)),
        ("dW2", relative_error(&device.download(&expert_grads.w2)?, &grads.w2)),
        (
            "dC",
            relative_error(&device.download(layer.codebook_grad())?, &grads.codebook),
        ),
    ] {
        ok &= error <= bound;
        println!("  {name:4} relative error {error:.2e} (bound {bound:.0e})");
    }
    Ok(ok)
}

/// `cargo test` runs these (`test = true` for this example in Cargo.toml).
#[cfg(test)]
mod tests {
    use super::Options;
    use clap::Parser;
    use clap::error::ErrorKind;

    fn refusal(args: &str) -> ErrorKind {
        let argv = std::iter::once("moe_layer").chain(args.split_whitespace());
        match Options::try_parse_from(argv) {
            Ok(_) => panic!("`{args}` was accepted"),
            Err(e) => e.kind(),
        }
    }

    #[test]
    fn numbers_are_integers_in_range() {
        for args in [
            "--tokens -1",
            "--tokens NaN",
            "--tokens 2.9",
            "--tokens 1e20",
            "--tokens 1e12",
        ] {
            assert_eq!(refusal(args), ErrorKind::ValueValidation, "{args}");
        }
        for args in [
            "--tokens 0",
            "--tokens 262145",
            "--chain 0",
            "--chain 17",
            "--esft -1",
            "--esft NaN",
            "--esft inf",
        ] {
            assert_eq!(refusal(args), ErrorKind::ValueValidation, "{args}");
        }
        let options = Options::try_parse_from(["moe_layer", "--tokens", "7", "--chain", "3", "--esft", "0.1"]);
        assert!(options.is_err(), "--chain with --esft conflicts");
        let options = Options::try_parse_from(["moe_layer", "--tokens", "7", "--chain", "3"]).unwrap();
        assert_eq!((options.tokens, options.chain, options.esft), (7, 3, None));
        let options = Options::try_parse_from(["moe_layer", "--report", "out/figures"]).unwrap();
        assert_eq!(options.report.as_deref(), Some(std::path::Path::new("out/figures")));
        assert_eq!(refusal("--report"), ErrorKind::InvalidValue);
    }

    #[test]
    fn conflicting_modes_are_refused() {
        for args in [
            "--vq --chain 2",
            "--chain 2 --inference",
            "--chain 2 --esft 0.1",
            "--inference --esft 0.1",
            "--vq --inference",
            "--vq --esft 0.1",
        ] {
            assert_eq!(refusal(args), ErrorKind::ArgumentConflict, "{args}");
        }
        assert!(Options::try_parse_from(["moe_layer", "--vq", "--dtype", "f32"]).is_ok());
    }
}
