//! Seeded random weights for a list of parameters: what `narx demo` exports when no
//! checkpoint is at hand, and what tests and benchmarks of full-size shapes use. Random
//! weights generate noise; the point is to exercise the whole pipeline with nothing
//! downloaded.

use crate::checkpoint::InMemory;

/// Every parameter of `parameters` (names and shapes, e.g. `ModelArgs::parameters()`),
/// reproducible from `seed`: norm scales 1, biases 0, convolution kernels uniform with
/// standard deviation 1/√fan-in (so activations keep their scale through a deep decoder),
/// everything else uniform with standard deviation 0.02 (upstream's `initializer_range`).
pub fn random_weights(parameters: &[(String, Vec<usize>)], seed: u64) -> InMemory {
    let mut state = seed;
    let mut weights = InMemory::new();
    for (name, shape) in parameters {
        let count = shape.iter().product();
        let std = match shape.as_slice() {
            [_, fan_in, kh, kw] => 1.0 / ((fan_in * kh * kw) as f32).sqrt(),
            _ => 0.02,
        };
        let data = if name.contains("norm") && name.ends_with(".weight") {
            vec![1.0; count]
        } else if name.ends_with(".bias") {
            vec![0.0; count]
        } else {
            // Uniform on [-a, a] has standard deviation a/√3.
            let amplitude = std * 3f32.sqrt();
            (0..count)
                .map(|_| (unit(&mut state) * 2.0 - 1.0) * amplitude)
                .collect()
        };
        weights.insert(name.clone(), shape.clone(), data);
    }
    weights
}

/// SplitMix64 mapped to [0, 1): small, fast and good enough for weights.
fn unit(state: &mut u64) -> f32 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::TensorSource;
    use narx_graphs::nar::ModelArgs;

    #[test]
    fn random_weights_are_complete_and_reproducible() {
        let args = ModelArgs {
            dim: 32,
            n_layer: 1,
            n_head: 2,
            vocab_size: 64,
            num_classes: 4,
            multiple_of: 32,
            ..ModelArgs::default()
        };
        let params = args.parameters();
        let a = random_weights(&params, 7);
        let b = random_weights(&params, 7);
        for (name, shape) in args.parameters() {
            assert_eq!(a.shape(&name), Some(shape));
            assert_eq!(a.read_f32(&name).unwrap(), b.read_f32(&name).unwrap());
        }
        let w = a.read_f32("tok_embeddings.weight").unwrap();
        let std = (w.iter().map(|x| x * x).sum::<f32>() / w.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.002, "{std}");
        assert_ne!(
            w,
            random_weights(&params, 8)
                .read_f32("tok_embeddings.weight")
                .unwrap()
        );
    }
}
