//! narx integration tests: one test binary. Fixtures are read from `../shared/fixtures`
//! beside the project; ONNX Runtime tests need its library (`.ci/run` installs it) and fail,
//! never skip, without it.

mod bad_input;
mod calibrate_inputs;
mod calibration;
mod cli;
mod common;
mod gpu;
mod graphs;
mod parity;
mod pictures;
mod raster;
mod select;
mod video;
