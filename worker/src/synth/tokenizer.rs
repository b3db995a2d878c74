//! A working Llama 4-style `tokenizer.json`: byte-level BPE trained on a built-in corpus.
//!
//! Layout (as in Meta's Llama 3/4 files): no normalizer; pre-tokenizer = Split on the
//! o200k-style regex (Isolated) then ByteLevel (no prefix space, no regex); BPE with
//! `ignore_merges`; post-processor = ByteLevel + a template that prepends
//! `<|begin_of_text|>`; ByteLevel decoder. Ids `0..256` are the 256 bytes (id = byte value),
//! so any UTF-8 text encodes and decodes back exactly.
//!
//! The merges come from a deterministic BPE run on [`CORPUS`] (a few KB of self-written
//! English): the most frequent adjacent pair wins, ties go to the smallest id pair. When
//! every corpus word is one token and the vocabulary is still short, it is filled with
//! "synthetic" merges of a learned token and a learned lowercase suffix (`the` + `ing`),
//! enumerated by increasing rank sum, so that every id below the special tokens decodes to
//! word-like text. The [`SPECIAL_TOKENS`] take the top ids `vocab_size - 19 .. vocab_size`.

use std::collections::HashMap;
use std::str::FromStr;

use serde_json::{Value, json};
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper};

use super::{SynthConfig, SynthError};

/// The Llama 4 special tokens, in Meta's id order; they occupy the top of the vocabulary.
pub const SPECIAL_TOKENS: [&str; 19] = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|header_start|>",
    "<|header_end|>",
    "<|eom|>",
    "<|eot|>",
    "<|step|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|finetune_right_pad|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|tile_x_separator|>",
    "<|tile_y_separator|>",
    "<|image|>",
    "<|patch|>",
];

pub const BOS_TOKEN: &str = "<|begin_of_text|>";
pub const END_OF_TEXT_TOKEN: &str = "<|end_of_text|>";
pub const EOM_TOKEN: &str = "<|eom|>";
/// The instruct end-of-sequence token (end of turn).
pub const EOS_TOKEN: &str = "<|eot|>";
pub const PAD_TOKEN: &str = "<|finetune_right_pad|>";

/// The pre-tokenizer split regex of Llama 4 (tiktoken's o200k pattern).
pub const SPLIT_PATTERN: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"|\s*[\r\n]+",
    r"|\s+(?!\S)",
    r"|\s+",
);

/// The BPE training corpus (self-written English prose, a recipe, code, numbers, accents).
pub const CORPUS: &str = include_str!("corpus.txt");

/// The ids of the special tokens for a vocabulary of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialIds {
    /// Id of `SPECIAL_TOKENS[0]`; `SPECIAL_TOKENS[k]` has id `first + k`.
    pub first: u32,
    pub bos: u32,
    pub end_of_text: u32,
    pub eom: u32,
    pub eot: u32,
    pub pad: u32,
}

impl SpecialIds {
    /// Special ids when they sit at the top of a `vocab_size` vocabulary.
    pub fn for_vocab(vocab_size: usize) -> Self {
        let first = vocab_size.saturating_sub(SPECIAL_TOKENS.len()) as u32;
        let id = |token: &str| {
            let k = SPECIAL_TOKENS.iter().position(|t| *t == token).unwrap_or(0);
            first + k as u32
        };
        Self {
            first,
            bos: id(BOS_TOKEN),
            end_of_text: id(END_OF_TEXT_TOKEN),
            eom: id(EOM_TOKEN),
            eot: id(EOS_TOKEN),
            pad: id(PAD_TOKEN),
        }
    }

    /// The generation stop ids: `<|end_of_text|>`, `<|eom|>`, `<|eot|>`.
    pub fn stop_tokens(&self) -> [u32; 3] {
        [self.end_of_text, self.eom, self.eot]
    }
}

/// Builds `tokenizer.json` (pretty-printed) for `cfg.vocab_size` and checks that it loads.
pub fn build_tokenizer_json(cfg: &SynthConfig) -> Result<String, SynthError> {
    let vocab_size = cfg.vocab_size;
    let ids = SpecialIds::for_vocab(vocab_size);
    let bpe = train_bpe(CORPUS, ids.first as usize)?;

    let vocab: serde_json::Map<String, Value> =
        bpe.vocab.iter().enumerate().map(|(id, token)| (token.clone(), Value::from(id))).collect();
    let merges: Vec<Value> = bpe.merges.iter().map(|(a, b)| json!([a, b])).collect();
    let added_tokens: Vec<Value> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(k, token)| {
            json!({
                "id": ids.first as usize + k,
                "content": token,
                "single_word": false,
                "lstrip": false,
                "rstrip": false,
                "normalized": false,
                "special": true,
            })
        })
        .collect();
    let bos = |type_id: u32| json!({"SpecialToken": {"id": BOS_TOKEN, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_json(),
        "post_processor": {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
                {
                    "type": "TemplateProcessing",
                    "single": [bos(0), seq("A", 0)],
                    "pair": [bos(0), seq("A", 0), bos(1), seq("B", 1)],
                    "special_tokens": {
                        BOS_TOKEN: {"id": BOS_TOKEN, "ids": [ids.bos], "tokens": [BOS_TOKEN]},
                    },
                },
            ],
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": true,
            "vocab": vocab,
            "merges": merges,
        },
    });
    let text = serde_json::to_string_pretty(&tokenizer)
        .map_err(|source| SynthError::Json { what: "tokenizer.json", source })?;
    check_tokenizer(&text, vocab_size, &ids)?;
    Ok(text + "\n")
}

/// Loads the built tokenizer and checks its size and special ids.
fn check_tokenizer(text: &str, vocab_size: usize, ids: &SpecialIds) -> Result<(), SynthError> {
    let tok = tokenizers::Tokenizer::from_str(text).map_err(|e| SynthError::Tokenizer(e.to_string()))?;
    let size = tok.get_vocab_size(true);
    if size != vocab_size {
        return Err(SynthError::Tokenizer(format!("the tokenizer has {size} ids, expected {vocab_size}")));
    }
    for (k, token) in SPECIAL_TOKENS.iter().enumerate() {
        let want = ids.first + k as u32;
        if tok.token_to_id(token) != Some(want) {
            return Err(SynthError::Tokenizer(format!("{token} does not have id {want}")));
        }
    }
    Ok(())
}

/// The pre-tokenizer: Split on [`SPLIT_PATTERN`] (Isolated), then ByteLevel without regex.
fn pre_tokenizer_json() -> Value {
    json!({
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ],
    })
}

/// GPT-2's byte → printable char map used by ByteLevel (printable Latin-1 maps to itself,
/// the other 68 bytes to U+0100 onwards in byte order).
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[b as usize] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap_or('\u{FFFD}')
        };
    }
    chars
}

/// A trained byte-level BPE: tokens by id and merges by rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainedBpe {
    pub vocab: Vec<String>,
    pub merges: Vec<(String, String)>,
}

/// Trains a byte-level BPE with exactly `target` tokens on `corpus` (see the module docs).
pub fn train_bpe(corpus: &str, target: usize) -> Result<TrainedBpe, SynthError> {
    let mut vocab: Vec<String> = byte_chars().iter().map(|c| c.to_string()).collect();
    if target < vocab.len() {
        return Err(SynthError::Tokenizer(format!("a byte-level vocabulary needs at least 256 tokens, not {target}")));
    }
    let mut index: HashMap<String, u32> = vocab.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut merges = Vec::new();

    // Distinct pre-tokens with their counts, as symbol ids, in first-seen order.
    let mut words: Vec<(Vec<u32>, u64)> = Vec::new();
    let mut word_index: HashMap<String, usize> = HashMap::new();
    for piece in pre_tokenize(corpus)? {
        match word_index.get(&piece) {
            Some(&w) => words[w].1 += 1,
            None => {
                let symbols = piece
                    .chars()
                    .map(|c| {
                        index
                            .get(&c.to_string())
                            .copied()
                            .ok_or_else(|| SynthError::Tokenizer(format!("{c:?} is not a byte-level symbol")))
                    })
                    .collect::<Result<_, _>>()?;
                word_index.insert(piece, words.len());
                words.push((symbols, 1));
            }
        }
    }

    // Learned merges: most frequent adjacent pair, ties to the smallest ids.
    while vocab.len() < target {
        words.retain(|(symbols, _)| symbols.len() > 1);
        let mut counts: HashMap<(u32, u32), u64> = HashMap::new();
        for (symbols, count) in &words {
            for pair in symbols.windows(2) {
                *counts.entry((pair[0], pair[1])).or_default() += count;
            }
        }
        let Some((&(a, b), _)) = counts.iter().max_by(|(p, c), (q, d)| c.cmp(d).then(q.cmp(p))) else {
            break;
        };
        let merged = format!("{}{}", vocab[a as usize], vocab[b as usize]);
        let id = *index.entry(merged.clone()).or_insert_with(|| {
            vocab.push(merged);
            vocab.len() as u32 - 1
        });
        merges.push((vocab[a as usize].clone(), vocab[b as usize].clone()));
        for (symbols, _) in &mut words {
            apply_merge(symbols, (a, b), id);
        }
    }

    // Synthetic merges: learned token ending in a letter + learned lowercase suffix.
    let is_lower = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase());
    let learned = &vocab[256..];
    let heads: Vec<String> =
        learned.iter().filter(|t| t.chars().last().is_some_and(|c| c.is_ascii_alphabetic())).cloned().collect();
    let tails: Vec<String> = learned.iter().filter(|t| is_lower(t)).cloned().collect();
    let mut sum = 0;
    while vocab.len() < target {
        if heads.is_empty() || tails.is_empty() || sum > heads.len() + tails.len() {
            return Err(SynthError::Tokenizer(format!(
                "the corpus yields only {} tokens, {target} requested",
                vocab.len()
            )));
        }
        for (i, head) in heads.iter().enumerate().take(sum + 1) {
            let Some(tail) = tails.get(sum - i) else {
                continue;
            };
            let merged = format!("{head}{tail}");
            if vocab.len() < target && !index.contains_key(&merged) {
                index.insert(merged.clone(), vocab.len() as u32);
                vocab.push(merged);
                merges.push((head.clone(), tail.clone()));
            }
        }
        sum += 1;
    }
    Ok(TrainedBpe { vocab, merges })
}

/// Replaces every non-overlapping occurrence of `pair` (left to right) by `id`.
fn apply_merge(symbols: &mut Vec<u32>, pair: (u32, u32), id: u32) {
    let mut out = 0;
    let mut i = 0;
    while i < symbols.len() {
        if i + 1 < symbols.len() && (symbols[i], symbols[i + 1]) == pair {
            symbols[out] = id;
            i += 2;
        } else {
            symbols[out] = symbols[i];
            i += 1;
        }
        out += 1;
    }
    symbols.truncate(out);
}

/// Splits `text` with the tokenizer's own pre-tokenizer into byte-level strings.
fn pre_tokenize(text: &str) -> Result<Vec<String>, SynthError> {
    let pre: PreTokenizerWrapper = serde_json::from_value(pre_tokenizer_json())
        .map_err(|source| SynthError::Json { what: "the pre-tokenizer", source })?;
    let mut pts = PreTokenizedString::from(text);
    pre.pre_tokenize(&mut pts).map_err(|e| SynthError::Tokenizer(e.to_string()))?;
    Ok(pts
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .map(|(s, _, _)| s.to_string())
        .collect())
}
