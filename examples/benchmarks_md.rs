//! Turns a bench log (stdin) into the benchmark page (stdout): what
//! `scripts/gpu-validate.sh` runs after `cargo bench` on a GPU.
//!
//!     cargo bench | cargo run --example benchmarks_md -- --device NAME --driver VERSION --date DATE
use moe_kernels::benchmarks::{Machine, markdown, records};
use std::io::Read;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut machine = Machine::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let field = match flag.as_str() {
            "--device" => &mut machine.device,
            "--driver" => &mut machine.driver,
            "--date" => &mut machine.date,
            other => {
                eprintln!("benchmarks_md: unknown argument '{other}'");
                return ExitCode::from(2);
            }
        };
        match args.next() {
            Some(value) => *field = value,
            None => {
                eprintln!("benchmarks_md: {flag} needs a value");
                return ExitCode::from(2);
            }
        }
    }
    let mut log = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut log) {
        eprintln!("benchmarks_md: reading the bench log: {e}");
        return ExitCode::FAILURE;
    }
    print!("{}", markdown(&machine, &records(&log)));
    ExitCode::SUCCESS
}
