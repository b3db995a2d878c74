//! The image token block: each `<|image|>` the chat template writes becomes the block the
//! processor builds (`Llama4Processor._prompt_split_image`), whose `<|patch|>` positions later
//! take the image's feature rows.
//!
//! One tile: `<|image_start|> <|image|> <|patch|>×P <|image_end|>`. A rows×cols canvas:
//! `<|image_start|>`, per tile row the tiles' `<|patch|>×P` joined by `<|tile_x_separator|>`
//! and followed by `<|tile_y_separator|>`, then `<|image|>`, the global tile's `<|patch|>×P`,
//! `<|image_end|>`.

use super::VisionError;
use crate::tokenizer::Tokenizer;

/// The special ids of the image block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageTokens {
    pub image_start: u32,
    pub image_end: u32,
    /// `<|image|>`: the placeholder the template writes, and the global tile's marker.
    pub image: u32,
    /// `<|patch|>`: one feature row each.
    pub patch: u32,
    pub tile_x_separator: u32,
    pub tile_y_separator: u32,
}

impl ImageTokens {
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self, VisionError> {
        let id = |t: &str| tok.token_to_id(t).ok_or_else(|| VisionError::MissingToken(t.to_owned()));
        Ok(Self {
            image_start: id("<|image_start|>")?,
            image_end: id("<|image_end|>")?,
            image: id("<|image|>")?,
            patch: id("<|patch|>")?,
            tile_x_separator: id("<|tile_x_separator|>")?,
            tile_y_separator: id("<|tile_y_separator|>")?,
        })
    }

    /// The block of one image with a `(rows, cols)` canvas and `per_tile` patch tokens per tile.
    pub fn block(&self, (rows, cols): (usize, usize), per_tile: usize) -> Vec<u32> {
        let mut out = vec![self.image_start];
        if rows * cols > 1 {
            for _ in 0..rows {
                for c in 0..cols {
                    out.extend(std::iter::repeat_n(self.patch, per_tile));
                    if c + 1 < cols {
                        out.push(self.tile_x_separator);
                    }
                }
                out.push(self.tile_y_separator);
            }
        }
        out.push(self.image);
        out.extend(std::iter::repeat_n(self.patch, per_tile));
        out.push(self.image_end);
        out
    }

    /// Replace the `<|image|>` placeholders of `ids`, in order, by `blocks`; their counts must
    /// agree.
    pub fn expand(&self, ids: &[u32], blocks: &[Vec<u32>]) -> Result<Vec<u32>, VisionError> {
        let placeholders = ids.iter().filter(|&&t| t == self.image).count();
        if placeholders != blocks.len() {
            return Err(VisionError::PlaceholderCount { placeholders, images: blocks.len() });
        }
        let mut out = Vec::with_capacity(ids.len() + blocks.iter().map(Vec::len).sum::<usize>());
        let mut next = blocks.iter();
        for &t in ids {
            match (t == self.image).then(|| next.next()).flatten() {
                Some(block) => out.extend_from_slice(block),
                None => out.push(t),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: ImageTokens =
        ImageTokens { image_start: 1, image_end: 2, image: 3, patch: 9, tile_x_separator: 4, tile_y_separator: 5 };

    #[test]
    fn single_tile_block() {
        assert_eq!(T.block((1, 1), 2), vec![1, 3, 9, 9, 2]);
    }

    #[test]
    fn multi_tile_block_has_separators_and_global_tile() {
        assert_eq!(T.block((2, 2), 1), vec![1, 9, 4, 9, 5, 9, 4, 9, 5, 3, 9, 2]);
        // Real sizes: rows·cols·(P+1) + P + 3 tokens; 2x2 with P = 144 is 727.
        assert_eq!(T.block((2, 2), 144).len(), 727);
        assert_eq!(T.block((4, 4), 144).len(), 2467);
        assert_eq!(T.block((1, 1), 144).len(), 147);
    }

    #[test]
    fn expand_in_order_and_count_checked() {
        let blocks = vec![T.block((1, 1), 1), T.block((1, 2), 1)];
        let out = T.expand(&[7, 3, 8, 3], &blocks).expect("two placeholders");
        assert_eq!(out, vec![7, 1, 3, 9, 2, 8, 1, 9, 4, 9, 5, 3, 9, 2]);
        assert!(matches!(T.expand(&[3], &blocks), Err(VisionError::PlaceholderCount { placeholders: 1, images: 2 })));
    }
}
