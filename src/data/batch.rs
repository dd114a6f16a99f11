//! Length-grouped batching, padded batches with per-token weights, and a data fingerprint.

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use sha2::{Digest, Sha256};

use super::mask::{LossWeights, TokenizedExample};

/// How many batches form one mega-chunk that is sorted by length (transformers'
/// `LengthGroupedSampler` uses 50): large enough to group lengths, small enough to stay random.
const MEGA_CHUNK_BATCHES: usize = 50;

/// Batches of indices into `lens`, grouping similar lengths to cut padding.
///
/// With `shuffle`, indices are permuted with `seed`, cut into mega-chunks that are each sorted by
/// length (longest first), split into batches, and the batch order is shuffled with the same
/// seed. Without it, the same happens on the original order and the batch order is kept. The
/// result is deterministic for a seed; every index appears exactly once.
pub fn length_grouped_batches(
    lens: &[usize],
    batch_size: usize,
    seed: u64,
    shuffle: bool,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut order: Vec<usize> = (0..lens.len()).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    if shuffle {
        order.shuffle(&mut rng);
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for chunk in order.chunks(batch_size * MEGA_CHUNK_BATCHES) {
        let mut chunk = chunk.to_vec();
        // Stable sort: ties keep the (shuffled) order, so the result depends only on the seed.
        chunk.sort_by(|a, b| lens[*b].cmp(&lens[*a]));
        batches.extend(chunk.chunks(batch_size).map(<[usize]>::to_vec));
    }
    if shuffle {
        batches.shuffle(&mut rng);
    }
    batches
}

/// A right-padded batch, row-major `batch x seq_len`, ready to become tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub ids: Vec<u32>,
    /// Loss weight per position: 0 on padding and at t = 0 of every row.
    pub weights: Vec<f32>,
    /// Unpadded length of each row (the attention mask is `t < seq_lens[b]`).
    pub seq_lens: Vec<usize>,
    pub batch: usize,
    pub seq_len: usize,
}

impl Batch {
    pub fn new(examples: &[&TokenizedExample], weights: &LossWeights, pad_id: u32) -> Self {
        let batch = examples.len();
        let seq_len = examples.iter().map(|e| e.len()).max().unwrap_or(0);
        let mut ids = vec![pad_id; batch * seq_len];
        let mut w = vec![0.0f32; batch * seq_len];
        let mut seq_lens = Vec::with_capacity(batch);
        for (b, ex) in examples.iter().enumerate() {
            let row = b * seq_len;
            ids[row..row + ex.len()].copy_from_slice(&ex.ids);
            w[row..row + ex.len()].copy_from_slice(&weights.token_weights(ex));
            seq_lens.push(ex.len());
        }
        Self {
            ids,
            weights: w,
            seq_lens,
            batch,
            seq_len,
        }
    }

    /// Fraction of the `batch x seq_len` positions that are padding.
    pub fn padding_fraction(&self) -> f32 {
        let total = self.batch * self.seq_len;
        if total == 0 {
            return 0.0;
        }
        let real: usize = self.seq_lens.iter().sum();
        (total - real) as f32 / total as f32
    }

    /// Number of positions with a non-zero weight (the WIT loss divides by this).
    pub fn counted_tokens(&self) -> usize {
        self.weights.iter().filter(|w| **w != 0.0).count()
    }
}

/// Padding fraction of a whole schedule of batches, to compare batching strategies.
pub fn padding_fraction(lens: &[usize], batches: &[Vec<usize>]) -> f32 {
    let (mut total, mut real) = (0usize, 0usize);
    for b in batches {
        let max = b.iter().map(|i| lens[*i]).max().unwrap_or(0);
        total += max * b.len();
        real += b.iter().map(|i| lens[*i]).sum::<usize>();
    }
    if total == 0 {
        0.0
    } else {
        (total - real) as f32 / total as f32
    }
}

/// SHA-256 (hex) of the tokenized data: counts and values as little-endian integers, kinds as
/// one-byte codes, so the same data gives the same fingerprint on any machine.
pub fn fingerprint(examples: &[TokenizedExample]) -> String {
    let mut h = Sha256::new();
    h.update((examples.len() as u64).to_le_bytes());
    for ex in examples {
        h.update((ex.ids.len() as u64).to_le_bytes());
        for id in &ex.ids {
            h.update(id.to_le_bytes());
        }
        h.update((ex.kinds.len() as u64).to_le_bytes());
        h.update(ex.kinds.iter().map(|k| k.code()).collect::<Vec<u8>>());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::TokenKind::{Response as R, User as U};

    fn ex(ids: &[u32], prompt: usize) -> TokenizedExample {
        TokenizedExample {
            ids: ids.to_vec(),
            kinds: (0..ids.len())
                .map(|i| if i < prompt { U } else { R })
                .collect(),
        }
    }

    #[test]
    fn batch_pads_right_and_zeroes_weights() {
        let a = ex(&[5, 6, 7, 8], 2);
        let b = ex(&[9, 10], 1);
        let batch = Batch::new(&[&a, &b], &LossWeights::new(0.5, 1.0), 2);
        assert_eq!((batch.batch, batch.seq_len), (2, 4));
        assert_eq!(batch.ids, vec![5, 6, 7, 8, 9, 10, 2, 2]);
        assert_eq!(batch.weights, vec![0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
        assert_eq!(batch.seq_lens, vec![4, 2]);
        assert_eq!(batch.padding_fraction(), 0.25);
        assert_eq!(batch.counted_tokens(), 4);
    }

    #[test]
    fn length_grouping_is_a_deterministic_partition() {
        let lens: Vec<usize> = (0..1000).map(|i| (i * 7919) % 500 + 1).collect();
        let a = length_grouped_batches(&lens, 8, 42, true);
        assert_eq!(a, length_grouped_batches(&lens, 8, 42, true));
        assert_ne!(a, length_grouped_batches(&lens, 8, 43, true));
        let mut all: Vec<usize> = a.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
        assert!(a.iter().all(|b| b.len() <= 8));
        let naive: Vec<Vec<usize>> = (0..1000)
            .collect::<Vec<_>>()
            .chunks(8)
            .map(|c| c.to_vec())
            .collect();
        assert!(padding_fraction(&lens, &a) < padding_fraction(&lens, &naive) / 2.0);
        let plain = length_grouped_batches(&lens, 8, 0, false);
        assert_eq!(plain[0].len(), 8);
        assert!(lens[plain[0][0]] >= lens[plain[0][7]]);
    }

    #[test]
    fn fingerprint_sees_ids_and_kinds() {
        let a = ex(&[1, 2, 3], 1);
        let b = ex(&[1, 2, 3], 2);
        let fa = fingerprint(std::slice::from_ref(&a));
        assert_eq!(fa.len(), 64);
        assert_eq!(fa, fingerprint(&[ex(&[1, 2, 3], 1)]));
        assert_ne!(fa, fingerprint(&[b]));
        assert_ne!(fa, fingerprint(&[ex(&[1, 2, 4], 1)]));
    }
}
