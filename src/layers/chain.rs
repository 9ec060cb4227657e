//! [`ChainOfExperts`] (SPEC §7): C routed passes over one set of expert weights.
