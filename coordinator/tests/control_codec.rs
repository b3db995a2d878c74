//! Requests cross the QUIC control channel as bincode frames (`herd_net::frame`): every shape
//! of [`Request`] — with and without images, prompt logits or logprobs — must decode to
//! itself, or a worker drops the channel on the first request of that shape.

use half::bf16;
use herd_net::frame::{FrameCodec, HEADER_LEN};
use herd_worker::control::ToWorker;
use herd_worker::engine::request::Request;
use herd_worker::engine::sampler::SamplingParams;
use herd_worker::vision::PixelValues;

fn round_trip(msg: &ToWorker) -> ToWorker {
    let codec = FrameCodec::new(64 << 20);
    let frame = codec.encode(msg).expect("encode");
    let header: &[u8; HEADER_LEN] = frame[..HEADER_LEN].try_into().expect("header");
    let len = codec.parse_header(header).expect("header");
    codec.decode(&frame[HEADER_LEN..HEADER_LEN + len]).expect("decode")
}

#[test]
fn submits_with_and_without_images_survive_the_control_codec() {
    let text = Request {
        id: 3,
        prompt: vec![1, 2, 3],
        params: SamplingParams::default(),
        prompt_logits: false,
        images: Vec::new(),
    };
    let params = SamplingParams { logprobs: Some(2), ..SamplingParams::default() };
    // A 1×2 grid of 2 px tiles plus the global tile: 3 tiles of 3·2·2 values.
    let image =
        PixelValues { grid: (1, 2), tile: 2, values: (0..36).map(|i| bf16::from_f32(i as f32 / 8.0)).collect() };
    let with_image = Request { id: 4, prompt: vec![9; 5], params, prompt_logits: true, images: vec![image] };
    for req in [text, with_image] {
        let msg = ToWorker::Submit(req);
        assert_eq!(round_trip(&msg), msg);
    }
}
