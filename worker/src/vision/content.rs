//! Image parts of chat messages. Llama 4's chat template renders a content part of type
//! `image` as `<|image|>` and ignores other types, so every accepted image part is rewritten
//! to `{"type": "image"}` before rendering, and its source is returned in prompt order.
//!
//! Accepted parts: `{"type": "image", "path": FILE}` (files: `herd eval` / `generate`),
//! `{"type": "image_url", "image_url": {"url": URL}}` (OpenAI) and `{"type": "image", "url": URL}`
//! (transformers), where URL is a `data:image/...;base64,` URL or, only where the caller
//! allows it, an `http(s)` URL.

use super::VisionError;
use serde_json::{Value, json};
use std::path::PathBuf;

/// Where an image part's bytes come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// A file path as written in the part.
    Path(PathBuf),
    /// The decoded payload of a data URL.
    Bytes(Vec<u8>),
    /// An http(s) URL (not fetched here).
    Remote(String),
}

/// Rewrite the image parts of `messages` to `{"type": "image"}` and return their sources in
/// order. A malformed image part is an error naming the message and part.
pub fn extract_images(messages: &mut [Value]) -> Result<Vec<ImageSource>, VisionError> {
    let mut out = Vec::new();
    for (mi, message) in messages.iter_mut().enumerate() {
        let Some(parts) = message.get_mut("content").and_then(Value::as_array_mut) else { continue };
        for (pi, part) in parts.iter_mut().enumerate() {
            let bad = |m: &str| VisionError::BadPart { message: mi, part: pi, reason: m.to_owned() };
            let source = match part.get("type").and_then(Value::as_str) {
                Some("image_url") => {
                    let url = part.get("image_url").and_then(|u| u.get("url").or(Some(u))).and_then(Value::as_str);
                    url_source(url.ok_or_else(|| bad("image_url needs {\"url\": ...}"))?).map_err(|r| bad(&r))?
                }
                Some("image") => match (part.get("path"), part.get("url").or_else(|| part.get("image"))) {
                    (Some(Value::String(p)), _) => ImageSource::Path(PathBuf::from(p)),
                    (None, Some(Value::String(u))) => url_source(u).map_err(|r| bad(&r))?,
                    _ => return Err(bad("an image part needs \"path\" or \"url\"")),
                },
                _ => continue,
            };
            *part = json!({"type": "image"});
            out.push(source);
        }
    }
    Ok(out)
}

fn url_source(url: &str) -> Result<ImageSource, String> {
    if let Some(rest) = url.strip_prefix("data:") {
        return parse_data_url(rest).map(ImageSource::Bytes);
    }
    let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Ok(ImageSource::Remote(url.to_owned()));
    }
    Err("the URL must be a data: URL (data:image/png;base64,...) or http(s)".into())
}

/// The payload of `data:[<media type>][;base64],<data>` (after `data:`); only base64 payloads.
fn parse_data_url(rest: &str) -> Result<Vec<u8>, String> {
    let (meta, data) = rest.split_once(',').ok_or("a data URL needs a comma before its payload")?;
    if !meta.split(';').any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err("only base64 data URLs are accepted".into());
    }
    let media = meta.split(';').next().unwrap_or("");
    if !media.is_empty() && !media.to_ascii_lowercase().starts_with("image/") {
        return Err(format!("media type {media:?} is not an image"));
    }
    base64_decode(data).ok_or_else(|| "the data URL's payload is not valid base64".into())
}

/// Standard base64 (RFC 4648 §4), padding optional, no whitespace.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A lone trailing character (6 bits) cannot end a valid encoding.
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_values() {
        assert_eq!(base64_decode("aGVsbG8=").as_deref(), Some(&b"hello"[..]));
        assert_eq!(base64_decode("aGVsbG8").as_deref(), Some(&b"hello"[..]));
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode("/+8="), Some(vec![0xff, 0xef]));
        assert_eq!(base64_decode("aGVsb G8="), None);
        assert_eq!(base64_decode("a"), None);
    }

    #[test]
    fn parts_are_rewritten_in_order() {
        let mut messages = vec![
            json!({"role": "system", "content": "plain text"}),
            json!({"role": "user", "content": [
                {"type": "text", "text": "look"},
                {"type": "image", "path": "a.png"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
            ]}),
        ];
        let sources = extract_images(&mut messages).expect("valid parts");
        assert_eq!(
            sources,
            vec![
                ImageSource::Path("a.png".into()),
                ImageSource::Bytes(b"hi".to_vec()),
                ImageSource::Remote("https://example.com/x.png".into())
            ]
        );
        assert_eq!(messages[1]["content"][1], json!({"type": "image"}));
        assert_eq!(messages[1]["content"][3], json!({"type": "image"}));
        assert_eq!(messages[1]["content"][0]["type"], "text");
    }

    #[test]
    fn malformed_parts_are_errors() {
        for part in [
            json!({"type": "image_url"}),
            json!({"type": "image_url", "image_url": {"url": "data:image/png,notbase64"}}),
            json!({"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}}),
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}),
            json!({"type": "image_url", "image_url": {"url": "ftp://x"}}),
            json!({"type": "image"}),
        ] {
            let mut m = vec![json!({"role": "user", "content": [part.clone()]})];
            assert!(matches!(extract_images(&mut m), Err(VisionError::BadPart { .. })), "{part}");
        }
    }
}
