//! CPython's `random.Random` (MT19937 seeded by `init_by_array`) and its `sample`, so few-shot
//! examples drawn with the harness's seed are the very examples the harness draws.

const N: usize = 624;
const M: usize = 397;

/// `random.Random(seed)` for a non-negative integer seed.
pub struct PyRandom {
    state: [u32; N],
    index: usize,
}

impl PyRandom {
    pub fn new(seed: u64) -> Self {
        // CPython seeds with the 32-bit words of abs(seed), least significant first.
        let mut key = vec![seed as u32];
        if seed >> 32 != 0 {
            key.push((seed >> 32) as u32);
        }
        let mut r = Self {
            state: [0; N],
            index: N,
        };
        r.init_by_array(&key);
        r
    }

    fn init_genrand(&mut self, s: u32) {
        self.state[0] = s;
        for i in 1..N {
            let prev = self.state[i - 1];
            self.state[i] = 1812433253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19650218);
        let (mut i, mut j) = (1usize, 0usize);
        for _ in 0..N.max(key.len()) {
            let prev = self.state[i - 1];
            self.state[i] = (self.state[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1664525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.state[0] = self.state[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
        }
        for _ in 0..N - 1 {
            let prev = self.state[i - 1];
            self.state[i] = (self.state[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1566083941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.state[0] = self.state[N - 1];
                i = 1;
            }
        }
        self.state[0] = 0x8000_0000;
    }

    fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            for k in 0..N {
                let y = (self.state[k] & 0x8000_0000) | (self.state[(k + 1) % N] & 0x7fff_ffff);
                let mut v = self.state[(k + M) % N] ^ (y >> 1);
                if y & 1 != 0 {
                    v ^= 0x9908_b0df;
                }
                self.state[k] = v;
            }
            self.index = 0;
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// `getrandbits(k)` for `k <= 64`.
    pub fn getrandbits(&mut self, k: u32) -> u64 {
        if k == 0 {
            return 0;
        }
        if k <= 32 {
            return u64::from(self.next_u32() >> (32 - k));
        }
        let low = u64::from(self.next_u32());
        let high = u64::from(self.next_u32() >> (64 - k));
        low | (high << 32)
    }

    /// `_randbelow(n)`: uniform in `0..n` by rejection on `n.bit_length()` bits.
    pub fn randbelow(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let bits = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(bits) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `sample(population, k)`: `k` distinct items in selection order (`k` is capped at the
    /// population's size).
    pub fn sample<'a, T>(&mut self, population: &'a [T], k: usize) -> Vec<&'a T> {
        let n = population.len();
        let k = k.min(n);
        let mut setsize = 21usize;
        if k > 5 {
            let exponent = ((k * 3) as f64).ln() / 4f64.ln();
            setsize += 4usize.pow(exponent.ceil() as u32);
        }
        let mut out = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            for i in 0..k {
                let j = self.randbelow(n - i);
                out.push(&population[pool[j]]);
                pool[j] = pool[n - i - 1];
            }
        } else {
            let mut selected = std::collections::HashSet::new();
            for _ in 0..k {
                let mut j = self.randbelow(n);
                while selected.contains(&j) {
                    j = self.randbelow(n);
                }
                selected.insert(j);
                out.push(&population[j]);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected values printed by CPython 3.11:
    // random.Random(1234).sample(range(10), 2) etc.
    #[test]
    fn matches_cpython() {
        let pop: Vec<usize> = (0..10).collect();
        let got: Vec<usize> = PyRandom::new(1234)
            .sample(&pop, 2)
            .into_iter()
            .copied()
            .collect();
        assert_eq!(got, vec![7, 1]);

        let pop: Vec<usize> = (0..7473).collect();
        let mut r = PyRandom::new(1234);
        let a: Vec<usize> = r.sample(&pop, 5).into_iter().copied().collect();
        let b: Vec<usize> = r.sample(&pop, 5).into_iter().copied().collect();
        assert_eq!(a, vec![6374, 3610, 957, 61, 742]);
        assert_eq!(b, vec![7462, 6610, 4769, 286, 5501]);

        let pop: Vec<usize> = (0..30).collect();
        let mut r = PyRandom::new(1234);
        let c: Vec<usize> = r.sample(&pop, 6).into_iter().copied().collect();
        assert_eq!(c, vec![24, 14, 3, 0, 2, 18]);
        assert_eq!(r.getrandbits(32), 150006740);

        assert_eq!(PyRandom::new((1 << 40) + 5).getrandbits(32), 2166296868);
    }
}
