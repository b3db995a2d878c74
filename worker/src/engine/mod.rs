//! Running the model: KV cache, sampling, stop conditions and the generation loop.

pub mod generate;
pub mod kv_cache;
pub mod sampler;
pub mod stop;
