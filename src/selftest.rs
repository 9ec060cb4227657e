//! Self-test kernels (`kernels/selftest.cu`): placeholder until written.
