//! Decoding untrusted image bytes (PNG, JPEG, WebP, GIF's first frame) into RGB, with the size
//! limits checked before any pixel is decoded: the encoded length first, then the dimensions
//! read from the header, so a small file that declares a huge canvas (a decompression bomb)
//! is refused without allocating it.

use super::VisionError;
use super::preprocess::Rgb8;
use image::{DynamicImage, ImageFormat, ImageReader, Limits};
use std::io::Cursor;

/// Bounds on one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most encoded bytes.
    pub max_bytes: usize,
    /// Most pixels (width × height) declared by the header.
    pub max_pixels: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // 20 MB and 50 megapixels: any photo a client sends, far below what a bomb declares.
        Self { max_bytes: 20 << 20, max_pixels: 50_000_000 }
    }
}

/// Decode an image, refusing formats other than PNG, JPEG, WebP and GIF.
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Rgb8, VisionError> {
    if bytes.len() > limits.max_bytes {
        return Err(VisionError::TooManyBytes { bytes: bytes.len(), max: limits.max_bytes });
    }
    let format = image::guess_format(bytes).map_err(|_| VisionError::UnknownFormat)?;
    if !matches!(format, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif) {
        return Err(VisionError::UnsupportedFormat(format!("{format:?}")));
    }
    let (w, h) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| VisionError::Corrupt(e.to_string()))?;
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 {
        return Err(VisionError::Corrupt(format!("the header declares a {w}x{h} image")));
    }
    if pixels > limits.max_pixels {
        return Err(VisionError::TooManyPixels { width: w, height: h, max: limits.max_pixels });
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut lim = Limits::default();
    lim.max_image_width = Some(w);
    lim.max_image_height = Some(h);
    // RGBA16 is the widest buffer a decoder may use; leave room for one conversion copy.
    lim.max_alloc = Some(pixels * 8 * 2 + (1 << 20));
    reader.limits(lim);
    let img = reader.decode().map_err(|e| VisionError::Corrupt(e.to_string()))?;
    Ok(to_rgb(&img))
}

/// RGB planar `[3, H, W]`. Transparent images are composited onto white with Pillow's integer
/// `alpha_composite` arithmetic, as transformers' `convert_to_rgb` does.
fn to_rgb(img: &DynamicImage) -> Rgb8 {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut planar = vec![0u8; 3 * w * h];
    let plane = w * h;
    if img.color().has_alpha() {
        for (i, px) in img.to_rgba8().pixels().enumerate() {
            let a = u32::from(px.0[3]);
            for c in 0..3 {
                planar[c * plane + i] = over_white(u32::from(px.0[c]), a);
            }
        }
    } else {
        for (i, px) in img.to_rgb8().pixels().enumerate() {
            for c in 0..3 {
                planar[c * plane + i] = px.0[c];
            }
        }
    }
    Rgb8 { height: h, width: w, planar }
}

/// Pillow's `ImagingAlphaComposite` for a source channel `v` with alpha `a` over opaque white.
fn over_white(v: u32, a: u32) -> u8 {
    if a == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    // With an opaque destination the output alpha is 255 and the coefficients reduce to a and 255 - a.
    let coef1 = a << PRECISION_BITS;
    let coef2 = (255 << PRECISION_BITS) - coef1;
    let tmp = v * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, RgbImage, RgbaImage};

    fn png(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).expect("encode png");
        out
    }

    #[test]
    fn decodes_png_planar() {
        let img = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8, y as u8, 9]));
        let rgb = decode(&png(&DynamicImage::ImageRgb8(img)), &DecodeLimits::default()).expect("decode");
        assert_eq!((rgb.height, rgb.width), (2, 3));
        assert_eq!(rgb.planar, vec![0, 1, 2, 0, 1, 2, 0, 0, 0, 1, 1, 1, 9, 9, 9, 9, 9, 9]);
    }

    #[test]
    fn decodes_gif_jpeg_and_webp() {
        let img = RgbaImage::from_fn(4, 4, |x, _| image::Rgba([x as u8 * 60, 0, 0, 255]));
        let mut gif = Vec::new();
        DynamicImage::ImageRgba8(img.clone()).write_to(&mut Cursor::new(&mut gif), ImageFormat::Gif).expect("gif");
        assert_eq!(decode(&gif, &DecodeLimits::default()).expect("gif decodes").width, 4);
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
            .write_image(DynamicImage::ImageRgba8(img).to_rgb8().as_raw(), 4, 4, image::ExtendedColorType::Rgb8)
            .expect("jpeg");
        assert_eq!(decode(&jpeg, &DecodeLimits::default()).expect("jpeg decodes").height, 4);
        // WebP (lossless) decodes to the exact pixels.
        let rgb = RgbImage::from_fn(3, 2, |x, y| image::Rgb([x as u8 * 80, y as u8 * 200, 7]));
        let mut webp = Vec::new();
        DynamicImage::ImageRgb8(rgb).write_to(&mut Cursor::new(&mut webp), ImageFormat::WebP).expect("webp");
        let decoded = decode(&webp, &DecodeLimits::default()).expect("webp decodes");
        assert_eq!(decoded.planar, vec![0, 80, 160, 0, 80, 160, 0, 0, 0, 200, 200, 200, 7, 7, 7, 7, 7, 7]);
    }

    #[test]
    fn transparency_composites_onto_white() {
        assert_eq!(over_white(0, 0), 255);
        assert_eq!(over_white(10, 255), 10);
        assert_eq!(over_white(0, 128), 127);
        let img = RgbaImage::from_fn(1, 1, |_, _| image::Rgba([0, 0, 0, 0]));
        let rgb = decode(&png(&DynamicImage::ImageRgba8(img)), &DecodeLimits::default()).expect("decode");
        assert_eq!(rgb.planar, vec![255, 255, 255]);
    }

    #[test]
    fn bad_input_is_an_error() {
        let limits = DecodeLimits::default();
        assert!(matches!(decode(b"hello, not an image", &limits), Err(VisionError::UnknownFormat)));
        let good = png(&DynamicImage::ImageRgb8(RgbImage::new(8, 8)));
        assert!(matches!(decode(&good[..good.len() / 2], &limits), Err(VisionError::Corrupt(_))));
        let small = DecodeLimits { max_bytes: 10, ..limits };
        assert!(matches!(decode(&good, &small), Err(VisionError::TooManyBytes { .. })));
        let few = DecodeLimits { max_pixels: 63, ..limits };
        assert!(matches!(decode(&good, &few), Err(VisionError::TooManyPixels { .. })));
    }

    #[test]
    fn a_bomb_is_refused_from_its_header() {
        // A valid PNG (signature, IHDR declaring 100000 x 100000 pixels, the start of an IDAT)
        // of 60 bytes: decoding it would allocate 30 GB.
        let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
        let mut chunk = |kind: &[u8], data: &[u8]| {
            let mut body = kind.to_vec();
            body.extend(data);
            bytes.extend((data.len() as u32).to_be_bytes());
            bytes.extend(&body);
            bytes.extend(crc32(&body).to_be_bytes());
        };
        let mut ihdr = 100_000u32.to_be_bytes().to_vec();
        ihdr.extend(100_000u32.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        chunk(b"IHDR", &ihdr);
        chunk(b"IDAT", &[0x78, 0x9c, 0, 0]);
        let err = decode(&bytes, &DecodeLimits::default()).expect_err("bomb");
        assert!(matches!(err, VisionError::TooManyPixels { width: 100_000, height: 100_000, .. }), "{err}");
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }
}
