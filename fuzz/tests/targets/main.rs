//! The fuzz targets: every parser of input that crosses a trust boundary, each checked for
//! properties beyond "no panic" (round trips where an encoder exists, rejections that are
//! error values with a message, accepted values that meet the validation rules, outputs
//! bounded by their inputs).
//!
//! Under `cargo test` each target runs for `BOLERO_RANDOM_TEST_TIME_MS` (1 s unless set) on
//! random inputs, after the corpus in `__fuzz__/<target>/corpus` and any crash inputs in
//! `__fuzz__/<target>/crashes`; under `cargo bolero test` the same targets run
//! coverage-guided. docs/fuzzing.md says how to run them longer.

mod envelope;
mod ingest;
mod inputs;
mod jwt;
mod packets;
mod rest;
