//! Image preprocessing exactly as transformers' `Llama4ImageProcessor` does it: choose the tile
//! canvas, resize without distortion, pad, rescale and normalise in bf16, split into tiles, and
//! append a global tile when there is more than one tile.
//!
//! The arithmetic follows the reference's dtypes: canvas scales are float32 tensors, the
//! resize is torch's uint8 antialiased bilinear kernel ([`super::resize`]), and normalisation
//! is `bf16(bf16(bf16(p · rescale) − bf16(mean)) / bf16(std))`, one rounding per torch op.

use super::config::ProcessorConfig;
use super::resize::resize_bilinear_aa;
use half::bf16;

/// A decoded RGB image, planar `[3, height, width]` (the tensor layout torchvision uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    pub height: usize,
    pub width: usize,
    pub planar: Vec<u8>,
}

/// An image's `pixel_values`: `[tiles, 3, tile, tile]` bf16, row-major; the tiles of the
/// `grid` canvas in row-major order, then the global tile when `grid` has more than one tile.
/// Requests carry these to the worker that runs the vision encoder.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PixelValues {
    /// `(rows, cols)` of the canvas (the processor's `aspect_ratios`).
    pub grid: (usize, usize),
    pub tile: usize,
    pub values: Vec<bf16>,
}

impl PixelValues {
    pub fn tiles(&self) -> usize {
        self.values.len() / (3 * self.tile * self.tile)
    }

    /// Whether a global tile follows the canvas tiles.
    pub fn has_global_tile(&self) -> bool {
        self.grid.0 * self.grid.1 > 1
    }
}

/// The candidate canvases `(height, width)` in transformers' order (`find_supported_resolutions`):
/// tile counts from `max_tiles` down to 1, factor pairs in ascending order, grouped by aspect
/// ratio in order of first appearance. The order decides ties in [`best_canvas`].
pub fn candidate_canvases(max_tiles: usize, tile: usize) -> Vec<(usize, usize)> {
    // (reduced aspect ratio, its (rows, cols) pairs in order of appearance)
    type Group = ((usize, usize), Vec<(usize, usize)>);
    let mut groups: Vec<Group> = Vec::new();
    for n in (1..=max_tiles).rev() {
        for h in (1..=n).filter(|h| n.is_multiple_of(*h)) {
            let (h, w) = (h, n / h);
            // Python keys the groups by the float h / w; equal ratios are equal reduced fractions.
            let g = gcd(h, w);
            let key = (h / g, w / g);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, list)) => list.push((h, w)),
                None => groups.push((key, vec![(h, w)])),
            }
        }
    }
    groups.into_iter().flat_map(|(_, list)| list).map(|(h, w)| (h * tile, w * tile)).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// `get_best_fit`: the canvas that needs the least upscaling (or, if every canvas needs
/// downscaling, the least downscaling), smallest area on ties. Scales are float32, as the
/// reference divides int64 tensors.
pub fn best_canvas(size: (usize, usize), canvases: &[(usize, usize)], resize_to_max_canvas: bool) -> (usize, usize) {
    let (h, w) = (size.0 as f32, size.1 as f32);
    let scales: Vec<f32> = canvases
        .iter()
        .map(|&(ch, cw)| {
            let (sh, sw) = (ch as f32 / h, cw as f32 / w);
            if sh > sw { sw } else { sh }
        })
        .collect();
    let up = scales.iter().copied().filter(|&s| s >= 1.0);
    let selected = if scales.iter().any(|&s| s >= 1.0) {
        if resize_to_max_canvas { up.fold(f32::MIN, f32::max) } else { up.fold(f32::MAX, f32::min) }
    } else {
        scales.iter().copied().filter(|&s| s < 1.0).fold(f32::MIN, f32::max)
    };
    let mut best: Option<(usize, (usize, usize))> = None;
    for (&c, &s) in canvases.iter().zip(&scales) {
        if s == selected && best.is_none_or(|(area, _)| c.0 * c.1 < area) {
            best = Some((c.0 * c.1, c));
        }
    }
    best.map_or(canvases[0], |(_, c)| c)
}

/// A number as the reference holds it: a Python float (f64), or a 0-dim float32 tensor.
#[derive(Clone, Copy)]
enum Num {
    F64(f64),
    F32(f32),
}

impl Num {
    fn is_f32(self) -> bool {
        matches!(self, Num::F32(_))
    }
    fn f32(self) -> f32 {
        match self {
            Num::F64(v) => v as f32,
            Num::F32(v) => v,
        }
    }
    fn f64(self) -> f64 {
        match self {
            Num::F64(v) => v,
            Num::F32(v) => f64::from(v),
        }
    }
    /// `a < b` with torch's promotion (a tensor compares in float32).
    fn lt(self, other: Num) -> bool {
        if self.is_f32() || other.is_f32() { self.f32() < other.f32() } else { self.f64() < other.f64() }
    }
    /// `math.floor(n * self)`.
    fn floor_times(self, n: usize) -> usize {
        match self {
            Num::F64(v) => (n as f64 * v).floor() as usize,
            Num::F32(v) => (n as f32 * v).floor() as usize,
        }
    }
}

/// The size the image is resized to before padding (`get_max_res_without_distortion` with the
/// upscaling cap). The canvas dims are tensors in the reference while the image dims are
/// Python ints; `min(max(dim, tile), canvas)` yields whichever is smaller (the int on ties),
/// and a tensor operand makes the following arithmetic float32.
pub fn resized_size(size: (usize, usize), canvas: (usize, usize), cfg: &ProcessorConfig) -> (usize, usize) {
    let (h, w) = size;
    let target = |dim: usize, canvas: usize| -> (usize, bool) {
        if cfg.resize_to_max_canvas {
            return (canvas, true);
        }
        let capped = dim.max(cfg.tile);
        if canvas < capped { (canvas, true) } else { (capped, false) }
    };
    let ((th, th_tensor), (tw, tw_tensor)) = (target(h, canvas.0), target(w, canvas.1));
    let scale = |t: usize, tensor: bool, d: usize| {
        if tensor { Num::F32(t as f32 / d as f32) } else { Num::F64(t as f64 / d as f64) }
    };
    let (sw, sh) = (scale(tw, tw_tensor, w), scale(th, th_tensor, h));
    let (nh, nw) = if sw.lt(sh) { (sw.floor_times(h).min(th), tw) } else { (th, sh.floor_times(w).min(tw)) };
    (nh.max(1), nw.max(1))
}

/// Per channel, the normalised bf16 value of each 8-bit level.
fn normalise_table(cfg: &ProcessorConfig) -> [[bf16; 256]; 3] {
    let rescale = cfg.rescale_factor as f32;
    let mut t = [[bf16::ZERO; 256]; 3];
    for (c, row) in t.iter_mut().enumerate() {
        let mean = bf16::from_f32(cfg.mean[c]).to_f32();
        let std = bf16::from_f32(cfg.std[c]).to_f32();
        for (p, out) in row.iter_mut().enumerate() {
            let x = bf16::from_f32(p as f32 * rescale).to_f32();
            let y = bf16::from_f32(x - mean).to_f32();
            *out = bf16::from_f32(y / std);
        }
    }
    t
}

/// Preprocess one image into its tiles.
pub fn preprocess(img: &Rgb8, cfg: &ProcessorConfig) -> PixelValues {
    let tile = cfg.tile;
    let size = (img.height, img.width);
    let canvas = best_canvas(size, &candidate_canvases(cfg.max_tiles, tile), cfg.resize_to_max_canvas);
    let (nh, nw) = resized_size(size, canvas, cfg);
    let resized =
        if (nh, nw) == size { img.planar.clone() } else { resize_bilinear_aa(&img.planar, 3, size, (nh, nw)) };
    let table = normalise_table(cfg);
    let grid = (canvas.0 / tile, canvas.1 / tile);
    let n_tiles = grid.0 * grid.1;
    let global = n_tiles > 1;
    let plane = tile * tile;
    let mut values = Vec::with_capacity((n_tiles + usize::from(global)) * 3 * plane);
    // Padding is black (0) before normalisation.
    let pad = [table[0][0], table[1][0], table[2][0]];
    for r in 0..grid.0 {
        for col in 0..grid.1 {
            for c in 0..3 {
                let src = &resized[c * nh * nw..(c + 1) * nh * nw];
                for y in r * tile..(r + 1) * tile {
                    for x in col * tile..(col + 1) * tile {
                        values.push(if y < nh && x < nw { table[c][src[y * nw + x] as usize] } else { pad[c] });
                    }
                }
            }
        }
    }
    if global {
        let g = if size == (tile, tile) {
            img.planar.clone()
        } else {
            resize_bilinear_aa(&img.planar, 3, size, (tile, tile))
        };
        for (i, &p) in g.iter().enumerate() {
            values.push(table[i / plane][p as usize]);
        }
    }
    PixelValues { grid, tile, values }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(tile: usize, max_tiles: usize) -> ProcessorConfig {
        ProcessorConfig { tile, max_tiles, ..ProcessorConfig::default() }
    }

    #[test]
    fn canvases_follow_transformers_order() {
        // transformers' docstring example: find_supported_resolutions(5, 224) — here with 4.
        let c = candidate_canvases(4, 1);
        assert_eq!(c, vec![(1, 4), (2, 2), (1, 1), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1)]);
        assert_eq!(candidate_canvases(16, 336).len(), 1 + 2 + 2 + 3 + 2 + 4 + 2 + 4 + 3 + 4 + 2 + 6 + 2 + 4 + 4 + 5);
    }

    #[test]
    fn best_fit_docstring_example() {
        let canvases = [(224, 672), (672, 224), (224, 448), (448, 224), (224, 224)];
        assert_eq!(best_canvas((200, 300), &canvases, false), (224, 448));
    }

    #[test]
    fn resize_target_examples() {
        // get_max_res_without_distortion's docstring examples, as transformers 5.23 computes them
        // (the docstring itself says (134, 200) and (450, 338), which floor() cannot give).
        let c = ProcessorConfig { resize_to_max_canvas: true, ..cfg(1, 1) };
        assert_eq!(resized_size((200, 300), (450, 200), &c), (133, 200));
        assert_eq!(resized_size((800, 600), (450, 1300), &c), (450, 337));
        // Upscaling is capped at the tile size: a 17x23 image on a 28x28 canvas becomes 20x28.
        assert_eq!(resized_size((17, 23), (28, 28), &cfg(28, 4)), (20, 28));
    }

    #[test]
    fn tiles_and_global_tile() {
        let c = cfg(4, 4);
        let img = Rgb8 { height: 2, width: 9, planar: (0..54).map(|v| (v * 4) as u8).collect() };
        let pv = preprocess(&img, &c);
        assert_eq!(pv.grid, (1, 3));
        assert_eq!(pv.tiles(), 4);
        assert!(pv.has_global_tile());
        // The 2x9 image is not resized (it fits the 4x12 canvas); rows 2 and 3 are black padding,
        // which normalises to -1 with mean = std = 0.5.
        let table = normalise_table(&c);
        assert_eq!(pv.values[1], table[0][4]);
        assert_eq!(pv.values[3 * 4].to_f32(), -1.0);
        assert_eq!(pv.values[4 + 1], table[0][40]); // pixel (1, 1) holds 4 x (9 + 1)
        let small = Rgb8 { height: 4, width: 4, planar: vec![255; 48] };
        let pv = preprocess(&small, &c);
        assert_eq!((pv.grid, pv.tiles()), ((1, 1), 1));
        assert!(pv.values.iter().all(|v| v.to_f32() == 1.0));
    }

    #[test]
    fn normalisation_is_bf16_per_op() {
        let t = normalise_table(&ProcessorConfig::default());
        assert_eq!(t[0][0].to_f32(), -1.0);
        assert_eq!(t[0][255].to_f32(), 1.0);
        // 1/255 in bf16 steps: level 1 -> bf16(0.00392) - 0.5 -> bf16 -> /0.5.
        let x = bf16::from_f32(1.0f32 * (1.0 / 255.0) as f32).to_f32();
        assert_eq!(t[0][1], bf16::from_f32(bf16::from_f32(x - 0.5).to_f32() / 0.5));
    }
}
