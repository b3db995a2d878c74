//! Running the model: KV cache, sampling, and the generation loop.

pub mod sampler;
