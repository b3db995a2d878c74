//! The Llama 4 model.
