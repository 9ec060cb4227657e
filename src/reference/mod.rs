//! The CPU oracle: plain loops with f64 accumulation, one module per op family, written
//! to be obviously correct rather than fast. Tests compare every device against it
//! (tolerances in math §9). It depends on nothing but the ops' configuration types.

pub mod codebook;
pub mod dispatch;
pub mod esft;
pub mod gate;
pub mod gemm;
pub mod layers;
pub mod mix;
pub mod router;
