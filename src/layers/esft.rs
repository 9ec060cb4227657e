//! Expert-specialized fine-tuning (SPEC §8).
