//! RING_HASH (ketama ring) and MAGLEV tables over a priority level's hosts, built exactly as
//! Envoy builds them (same host keys, xxHash64, weights, ring scaling and Maglev permutation),
//! so a request hash picks the host Envoy would.

use std::sync::Arc;

use super::cluster::Host;
use crate::router::hash_policy::xxhash64;

/// Envoy's defaults.
pub const DEFAULT_MIN_RING: u64 = 1024;
pub const DEFAULT_MAX_RING: u64 = 8 * 1024 * 1024;
pub const DEFAULT_MAGLEV_TABLE: u64 = 65537;

/// Which table a cluster balances with, and its size settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HashLb {
    Ring { min: u64, max: u64 },
    Maglev { table_size: u64 },
}

/// A built table: indexes into the level's hosts.
#[derive(Debug)]
pub enum HashTable {
    /// Sorted (hash, host) points.
    Ring(Vec<(u64, u32)>),
    Maglev(Vec<u32>),
}

/// Each host's weight over the sum (Envoy's `normalizeHostWeights`, no locality weights).
fn normalized(hosts: &[Arc<Host>]) -> Vec<f64> {
    let sum: u64 = hosts.iter().map(|h| h.weight as u64).sum();
    hosts
        .iter()
        .map(|h| h.weight as f64 / sum.max(1) as f64)
        .collect()
}

/// The key a host is hashed by: its address, as Envoy's `asString`.
fn key(h: &Host) -> String {
    h.address.to_string()
}

impl HashTable {
    pub fn build(lb: HashLb, hosts: &[Arc<Host>]) -> Option<HashTable> {
        if hosts.is_empty() {
            return None;
        }
        let weights = normalized(hosts);
        let min_w = weights.iter().cloned().fold(f64::INFINITY, f64::min);
        let max_w = weights.iter().cloned().fold(0.0, f64::max);
        Some(match lb {
            HashLb::Ring { min, max } => {
                // Enough points that the lightest host gets a whole number of them.
                let scale = ((min_w * min as f64).ceil() / min_w).min(max as f64);
                let mut ring = Vec::with_capacity(scale.ceil() as usize);
                let (mut current, mut target) = (0.0f64, 0.0f64);
                for (i, (h, w)) in hosts.iter().zip(&weights).enumerate() {
                    let k = key(h);
                    target += scale * w;
                    let mut n = 0u64;
                    while current < target {
                        ring.push((xxhash64(format!("{k}_{n}").as_bytes()), i as u32));
                        n += 1;
                        current += 1.0;
                    }
                }
                ring.sort_by_key(|(hash, _)| *hash);
                HashTable::Ring(ring)
            }
            HashLb::Maglev { table_size } => {
                struct Entry {
                    host: u32,
                    offset: u64,
                    skip: u64,
                    weight: f64,
                    target: f64,
                    next: u64,
                }
                // Envoy fills the table in the order of the hosts' keys, so that the table does
                // not depend on the order hosts were configured in.
                let mut order: Vec<(String, usize)> =
                    hosts.iter().enumerate().map(|(i, h)| (key(h), i)).collect();
                order.sort();
                let mut entries: Vec<Entry> = order
                    .into_iter()
                    .map(|(k, i)| {
                        let w = &weights[i];
                        Entry {
                            host: i as u32,
                            offset: xxhash64(k.as_bytes()) % table_size,
                            skip: xxhash_rust::xxh64::xxh64(k.as_bytes(), 1) % (table_size - 1) + 1,
                            weight: *w,
                            target: 0.0,
                            next: 0,
                        }
                    })
                    .collect();
                let mut table = vec![u32::MAX; table_size as usize];
                let mut filled = 0u64;
                let mut iteration = 1u64;
                while filled < table_size {
                    for e in entries.iter_mut() {
                        if filled >= table_size {
                            break;
                        }
                        // A host of the heaviest weight fills a slot every iteration, one of a
                        // third of it every third.
                        if (iteration as f64) * e.weight < e.target {
                            continue;
                        }
                        e.target += max_w;
                        let mut c = (e.offset + e.skip * e.next) % table_size;
                        while table[c as usize] != u32::MAX {
                            e.next += 1;
                            c = (e.offset + e.skip * e.next) % table_size;
                        }
                        table[c as usize] = e.host;
                        e.next += 1;
                        filled += 1;
                    }
                    iteration += 1;
                }
                HashTable::Maglev(table)
            }
        })
    }

    /// The host index for a hash; `attempt` > 0 moves off it (Envoy's retry host selection).
    pub fn pick(&self, hash: u64, attempt: u32) -> usize {
        match self {
            HashTable::Ring(ring) => {
                // The first point at or after the hash, wrapping (ketama's search).
                let at = ring.partition_point(|(p, _)| *p < hash);
                let at = if at == ring.len() { 0 } else { at };
                let at = (at + attempt as usize) % ring.len();
                ring[at].1 as usize
            }
            HashTable::Maglev(table) => {
                let h = if attempt > 0 {
                    hash ^ (u64::MAX - attempt as u64 + 1)
                } else {
                    hash
                };
                table[(h % table.len() as u64) as usize] as usize
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: u16) -> Vec<Arc<Host>> {
        (0..n)
            .map(|i| Arc::new(Host::original_dst(([10, 0, 0, 1], 80 + i).into())))
            .collect()
    }

    #[test]
    fn ring_sizes_and_stickiness() {
        let hs = hosts(3);
        let Some(HashTable::Ring(r)) = HashTable::build(
            HashLb::Ring {
                min: DEFAULT_MIN_RING,
                max: DEFAULT_MAX_RING,
            },
            &hs,
        ) else {
            panic!()
        };
        // 1/3 each: ceil(1024/3)·3 = 1026 points, 342 per host.
        assert_eq!(r.len(), 1026);
        assert!(r.windows(2).all(|w| w[0].0 <= w[1].0));
        let t = HashTable::Ring(r);
        assert_eq!(t.pick(12345, 0), t.pick(12345, 0));
        assert_eq!(t.pick(u64::MAX, 0), t.pick(0, 0), "wraps around");
    }

    #[test]
    fn maglev_spreads_evenly_and_by_weight() {
        let hs = hosts(3);
        let Some(HashTable::Maglev(t)) =
            HashTable::build(HashLb::Maglev { table_size: 65537 }, &hs)
        else {
            panic!()
        };
        let count = |i: u32| t.iter().filter(|x| **x == i).count();
        assert!((count(0) as i64 - count(1) as i64).abs() <= 1);
        assert_eq!(count(0) + count(1) + count(2), 65537);
        let mut heavy = Host::original_dst(([10, 0, 0, 9], 80).into());
        heavy.weight = 3;
        let hs = vec![hs[0].clone(), Arc::new(heavy)];
        let Some(HashTable::Maglev(t)) = HashTable::build(HashLb::Maglev { table_size: 7 }, &hs)
        else {
            panic!()
        };
        assert!(t.iter().all(|x| *x != u32::MAX));
        assert!(t.iter().filter(|x| **x == 1).count() > t.iter().filter(|x| **x == 0).count());
    }
}
